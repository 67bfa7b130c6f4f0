"""Proving vhost: the verdicts (report), the wiring trace, what is seen of a QEMU (observe), the
pure verdict functions (verify), and the targets a check is about. Preparing the host (doctor,
the boot unit) is vhostorch.host's."""
