"""Compiled modules built from the top-level `_native/` sources (see setup.py)."""
