"""Proving vhost: the verdicts (report), the wiring trace, what is seen of a QEMU (observe), the
pure verdict functions (verify), the targets a check is about, and the host check (doctor)."""
