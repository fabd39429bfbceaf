"""pcapng files: write a capture, read one back."""
from oisp.pcapng.writer import PcapngWriter  # noqa: F401
