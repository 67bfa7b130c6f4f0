"""Preparing a host before any VM runs: what doctor checks of it (the ``host.*`` checks), and
the systemd unit that arms the wiring trace at boot (bootunit)."""
