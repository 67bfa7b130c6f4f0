from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from hypothesis import settings

from tests.support import kernel

# Hypothesis' per-example deadline measures the machine's load, not behaviour: on a shared
# 2-core machine a hook fuzz example once took 541 ms for the first run and 14 ms for the next.
settings.register_profile("vhostorch", deadline=None)
settings.load_profile("vhostorch")

pytest_plugins = ["tests.support.testhost"]

# The tests send SIGINT and SIGHUP to processes they start and expect them to act as they do
# for an operator. A run started by `nohup`, or as `cmd &` from a script (a non-interactive
# shell starts background commands with SIGINT ignored), hands its children those signals
# ignored, and an ignored disposition survives exec: five signal tests then saw their SIGINT
# or SIGHUP do nothing (a vhostorch run so started rightly ignores them, as nohup asks). Here
# they act by default again, for every process the tests start.
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def ns() -> Iterator[str]:
    """A throwaway network namespace; tests that use it need root, as CI has."""
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to make namespaces")
    with kernel.namespace() as name:
        yield name


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[str]:
    """qemu:///system served by a libvirtd (started here if none runs, and then stopped)."""
    from tests.support import daemons

    daemons.OURS.extend(daemons.start())
    try:
        yield "qemu:///system"
    finally:
        daemons.stop(daemons.OURS)
        daemons.OURS.clear()


@pytest.fixture(scope="module")
def traced(in_testhost: None) -> Iterator[None]:
    """The wiring trace, armed before any guest of the module starts its driver (put back as it
    was afterwards: it is host-wide)."""
    from vhostorch.check import wiring

    was_armed = wiring.armed()
    wiring.arm()
    yield
    if not was_armed:
        wiring.disarm()


@pytest.fixture
def untraced(in_testhost: None) -> Iterator[None]:
    """The trace disarmed (VMs then start unwired; a module's `traced` may have armed it),
    and put back as it was afterwards."""
    from vhostorch.check import wiring

    was = wiring.armed()
    wiring.disarm()
    yield
    if was:
        wiring.arm()
    else:
        wiring.disarm()
