"""
twisted-postcopy: postcopy live migration in the format of QEMU 7.2's
migration stream, written on Twisted.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
