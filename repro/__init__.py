"""Reproduce the claims of the AlexNet paper, claim by claim, at any scale."""
__version__ = "0.1.0"
