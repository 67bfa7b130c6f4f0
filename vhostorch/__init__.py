"""vhostorch: provision, start and prove vhost-net accelerated virtio-net for QEMU/KVM guests."""

__version__ = "0.2.0"
