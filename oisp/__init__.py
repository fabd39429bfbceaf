"""oisp: see what local programs send to AI providers, at the network layer."""

__version__ = "0.1.0"
