"""Capture tools: packets to pcapng with process attribution, and the live flow table."""
