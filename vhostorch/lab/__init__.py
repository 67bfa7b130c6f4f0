"""The disposable test host: its boot files (image), its liveness watch (watch), booting it and
running a command inside (run), and the files its initramfs is made of (files/)."""
