"""`oisp demo`: a throwaway lab in which the whole recording path runs, with no
internet and no API key (see oisp/cli/demo.py)."""
