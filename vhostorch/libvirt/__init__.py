"""libvirt: domain XML to and from the model (domxml), libvirt's qemu.conf, and the connection
(the only importer of libvirt-python)."""
