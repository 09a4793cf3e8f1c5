"""ftvm: fault tolerance for QEMU virtual machines on ordinary Linux hosts."""

__version__ = "0.1.0"
