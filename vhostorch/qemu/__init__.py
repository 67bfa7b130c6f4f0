"""QEMU itself: what its command line asked for (args) and what its monitor says (monitor, the
only importer of qemu.qmp)."""
