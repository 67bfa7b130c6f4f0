"""pytest plugin: tests marked ``testhost`` run inside the test host, one boot per kernel
per session, the boots side by side (one vCPU each: one more at once than this machine has
CPUs, as memory allows, or $VHOSTORCH_LAB_PARALLEL), each line of their output prefixed with
the kernel, while the other tests run here (this machine's benchmarks first, alone).

The kernels are ``--testhost-kernels`` (or $VHOSTORCH_LAB_KERNELS), series
separated by spaces or commas; by default (on Debian 12, DEFAULT_KERNELS) "6.1 6.12
6.12@trixie": 6.1 (Debian 12's default, vhost workers are kernel threads), 6.12
(vhost workers are vhost_task threads inside QEMU), and 6.12 on Debian 13's userland.
Outside, each such test is replaced by one stand-in per
kernel (``test_x[linux-6.12]``, ``test_x[a-linux-6.12]`` for a parametrized
one) whose result is read from that kernel's boot report, so it passes or fails
here with the inner failure text and output; a failure on any kernel fails the
run. For a quick loop on one kernel: ``pytest -m testhost --testhost-kernels 6.12``.
A word ``SERIES@USERLAND`` boots that kernel on another userland than this
machine's root (lab.userland): ``6.12@trixie`` runs the tests on Debian 13's
QEMU 10, libvirt 11 and Python 3.13 (``test_x[linux-6.12@trixie]``).
Inside (VHOSTORCH_IN_TESTHOST=1), the same tests run for real and this plugin
writes the report. ``@pytest.mark.testhost(outside=True)`` marks a slow test
that runs here and may use the ``testhost_boot`` fixture (the outcome of the
first kernel's boot) or boot the test host itself. To keep CI inside its budget, three
keywords run a test in fewer sessions: ``testhost(each_once=True)``, a test that depends on
the kernel or on the userland but not on the two together (the Ansible play), runs in the
fewest sessions that boot every kernel series and every userland of the run (`covering`: of
"6.1 6.12 6.12@trixie", 6.1 and 6.12@trixie); ``testhost(userland_once=True)``, one that
depends on the userland alone (QEMU's answers while a stop drains slow storage), in one
session per userland (`userland_once`: 6.12 and 6.12@trixie); ``testhost(own_userland=True)``,
a benchmark, in the sessions on this machine's own userland (`own_userland`: 6.1 and 6.12),
whose QEMU and Python its baselines are measured with.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

INSIDE = os.environ.get("VHOSTORCH_IN_TESTHOST") == "1"
# A whole session's bound: ~18 min on an idle core, more when sessions share the cores.
TIMEOUT = float(os.environ.get("VHOSTORCH_LAB_TIMEOUT", "2700"))
# One test's bound inside: the slowest take about 60 s alone, four times that with three
# sessions and the tests here sharing two cores.
TEST_TIMEOUT = 480
KERNELS_ENV = "VHOSTORCH_LAB_KERNELS"
PARALLEL_ENV = "VHOSTORCH_LAB_PARALLEL"
SLOWEST = 12  # tests listed per session at the end, with their seconds
# The sessions of a whole run, by this machine's Debian release (its root is the default
# userland; kernels come from its archive). On Debian 12: 6.1 (its default kernel, vhost
# workers are kernel threads), 6.12 (its newer series, workers are vhost_task threads of QEMU,
# >= 6.4), and Debian 13's userland (QEMU 10, libvirt 11, Python 3.13) with 6.12. On Debian
# 13, whose archive has no 6.1: its own root with 6.12. Elsewhere: the archive's default.
DEFAULT_KERNELS = {"bookworm": "6.1 6.12 6.12@trixie", "trixie": "6.12"}
OS_RELEASE = "/etc/os-release"


def default_kernels(os_release: str = OS_RELEASE) -> str:
    """The default sessions for the Debian release this machine runs."""
    from vhostorch.lab.userland import codename

    return DEFAULT_KERNELS.get(codename(os_release), "default")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--testhost-report", default=None, help="(inside) write results here")
    parser.addoption(
        "--testhost-kernels",
        default=None,
        help=f"kernel series the testhost tests run on, one boot each (default: "
        f"${KERNELS_ENV} or, on this machine, {default_kernels()!r}); e.g. '6.12' for a "
        "quick loop on one; "
        "SERIES@USERLAND boots another userland, e.g. '6.12@trixie' (Debian 13)",
    )


def kernels(config: pytest.Config) -> list[str]:
    """The kernel series to boot (``SERIES`` or ``SERIES@USERLAND``), in order, each once;
    a bad value stops the session."""
    from vhostorch.errors import InvalidSpec
    from vhostorch.lab.image import kernel_series
    from vhostorch.lab.userland import userland_name

    given = config.getoption("--testhost-kernels") or os.environ.get(KERNELS_ENV)
    chosen: list[str] = []
    for word in (given or default_kernels()).replace(",", " ").split():
        try:
            kernel, at, land = word.partition("@")
            series = kernel_series(kernel) + (f"@{userland_name(land)}" if at else "")
        except InvalidSpec as err:
            raise pytest.UsageError(str(err)) from None
        if series not in chosen:
            chosen.append(series)
    if not chosen:
        raise pytest.UsageError(f"--testhost-kernels / ${KERNELS_ENV} names no kernel")
    return chosen


def kernel_id(name: str, kernel: str) -> str:
    """``test_x`` → ``test_x[linux-6.12]``; ``test_x[a]`` → ``test_x[a-linux-6.12]``."""
    if name.endswith("]"):
        return f"{name[:-1]}-linux-{kernel}]"
    return f"{name}[linux-{kernel}]"


def _userland(session: str) -> str:
    from vhostorch.lab.userland import DEFAULT_USERLAND

    return session.partition("@")[2] or DEFAULT_USERLAND


def covering(sessions: list[str]) -> list[str]:
    """The fewest of ``sessions`` (``SERIES`` or ``SERIES@USERLAND``) that boot every kernel
    series and every userland among them, the earliest such in their order."""

    def covers(chosen: Iterable[str]) -> tuple[set[str], set[str]]:
        return {s.partition("@")[0] for s in chosen}, {_userland(s) for s in chosen}

    every = covers(sessions)
    for size in range(1, len(sessions)):
        for chosen in itertools.combinations(sessions, size):
            if covers(chosen) == every:
                return list(chosen)
    return list(sessions)


def userland_once(sessions: list[str]) -> list[str]:
    """One session per userland among ``sessions``: the last of each, in their order (of
    "6.1 6.12 6.12@trixie", 6.12 and 6.12@trixie: 6.1 runs what `covering` picks)."""
    last = {_userland(s): s for s in sessions}
    return [s for s in sessions if last[_userland(s)] == s]


def own_userland(sessions: list[str]) -> list[str]:
    """The sessions on this machine's own userland (all, when none is)."""
    from vhostorch.lab.userland import DEFAULT_USERLAND

    return [s for s in sessions if _userland(s) == DEFAULT_USERLAND] or list(sessions)


def _sessions(item: pytest.Item, chosen: list[str]) -> list[str]:
    """The sessions ``item`` runs in: all, or as its ``testhost`` marker's keyword says."""
    marker = item.get_closest_marker("testhost")
    kwargs = marker.kwargs if marker else {}
    if kwargs.get("each_once"):
        return covering(chosen)
    if kwargs.get("userland_once"):
        return userland_once(chosen)
    if kwargs.get("own_userland"):
        return own_userland(chosen)
    return chosen


def _outside_only(item: pytest.Item) -> bool:
    marker = item.get_closest_marker("testhost")
    return marker is not None and bool(marker.kwargs.get("outside"))


class Boot:
    """One kernel's boot in this session: which tests it runs and, once run, their results."""

    def __init__(self, config: pytest.Config, nodeids: list[str], kernel: str) -> None:
        from vhostorch.lab.userland import DEFAULT_USERLAND

        self.config = config
        self.nodeids = nodeids
        self.kernel = kernel  # as given: SERIES or SERIES@USERLAND
        self.series, _, land = kernel.partition("@")
        self.userland = land or DEFAULT_USERLAND
        self.outcome: Any = None
        self.error: str | None = None
        self.report: dict[str, dict[str, Any]] = {}
        self.results = ""
        self.frozen: list[str] = []
        self._started = False
        # Waited on, not Thread.join: a join interrupted by an exception (pytest-timeout's
        # SIGALRM) marks the still running thread stopped, and every later join returns at
        # once (CPython's bpo-45274 handling), so each later test would find no result.
        self._done = threading.Event()

    def start(self, slots: threading.Semaphore) -> None:
        """Run this boot in the background once a slot is free (see `_together`)."""
        if not self._started:
            self._started = True
            threading.Thread(target=self._run_in, args=(slots,), daemon=True).start()

    def _run_in(self, slots: threading.Semaphore) -> None:
        try:
            with slots:
                self.run()
        except BaseException as err:  # reported by the tests waiting for it
            self.error = f"the test-host session crashed: {type(err).__name__}: {err}"
        finally:
            self._done.set()

    def finished(self) -> bool:
        return self._done.is_set()

    def benchmarks_done(self) -> bool:
        """Whether this running boot has reported every benchmark it runs."""
        benchmarks = [n for n in self.nodeids if n.startswith("tests/bench/")]
        if not benchmarks:
            return True
        if not self.results:
            return False
        try:
            with open(os.path.join(self.results, "report-1.json")) as f:
                reported = json.load(f)
        except (OSError, ValueError):
            return False
        return all(n in reported for n in benchmarks)

    def wait(self) -> None:
        if self._started:
            self._done.wait()
        else:
            self.run()

    def run(self) -> None:
        if self.outcome is not None or self.error is not None:
            return
        self.results = tempfile.mkdtemp(prefix=f"vhostorch-testhost-{self.kernel}-", dir="/tmp")
        left = list(self.nodeids)
        # A test host that stops making progress (run.LabFrozen: a CPU stuck in its kernel
        # for minutes, or its heartbeat silent) is the emulated machine failing, not a test.
        # QEMU 7.2's TCG did both; run.qemu_command says what the test host does against
        # each. Should it happen again, what was seen is printed and summarized at the end,
        # and the tests without a result run in one more boot; a second freeze fails them.
        for attempt in (1, 2):
            if not self._boot(left, attempt) or attempt == 2:
                return
            left = [n for n in left if n not in self.report]
            if not left:
                return
            print(
                f"[test host linux-{self.kernel}] booting again for the {len(left)} test(s) left",
                flush=True,
            )

    def _boot(self, nodeids: list[str], attempt: int) -> bool:
        """Run ``nodeids`` in one boot; True when it froze (and another boot may help)."""
        from vhostorch.errors import VhostorchError
        from vhostorch.lab import run

        report = os.path.join(self.results, f"report-{attempt}.json")
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "--color=no",
            # A hang inside fails that test with its stack, not the whole boot at the deadline.
            f"--timeout={TEST_TIMEOUT}",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=--strict-markers",
            f"--testhost-report={report}",
            *nodeids,
        ]
        if self.config.getoption("capture") == "no":
            command.insert(3, "-s")  # -s here: stream the tests' own output from in there too
        if not nodeids:
            command = ["true"]
        print(f"\n[test host linux-{self.kernel}] booting for {len(nodeids)} test(s)", flush=True)
        try:
            self.outcome = run.run(
                command,
                cwd=str(self.config.rootpath),
                timeout=TIMEOUT,
                results=self.results,
                output=_Lines(f"[{self.kernel}] "),
                log=print,
                kernel=self.series,
                userland=self.userland,
            )
        except run.LabFrozen as err:
            self._load(report)
            running = run.read_text(report + ".running").strip()
            running = f"after {running}" if running in self.report else running or "at start"
            self.frozen.append(f"linux-{self.kernel}, {running}: {err.evidence}")
            print(f"[test host linux-{self.kernel}] froze ({running}): {err.evidence}", flush=True)
            self.error = f"the test host failed before this test finished: {err}"
            return True
        except VhostorchError as err:
            # Tests that finished before it stopped keep their results.
            self.error = f"the test host failed before this test finished: {err}"
            hang = run.read_text(report + ".hang").strip()
            if hang:
                self.error += "\n" + hang
            self._load(report)
            return False
        self.error = None
        print(
            f"[test host linux-{self.kernel}] exit {self.outcome.status}, booted in "
            f"{self.outcome.boot_seconds:.1f} s, {self.outcome.seconds:.1f} s in all",
            flush=True,
        )
        if nodeids and not self._load(report):  # with none, `true` ran and wrote none
            self.error = f"the test host gave no report; exit {self.outcome.status}"
        return False

    def _load(self, path: str) -> bool:
        try:
            with open(path) as f:
                self.report.update(json.load(f))
        except (OSError, ValueError):
            return False
        return True

    def cleanup(self) -> None:
        if self.results:
            shutil.rmtree(self.results, ignore_errors=True)


# The session's boots by kernel series, in the order the kernels were given.
BOOTS = pytest.StashKey[dict[str, Boot]]()
STARTED = pytest.StashKey[bool]()


def _together(config: pytest.Config) -> dict[str, Boot]:
    """The session's boots, all started at the first that is needed: each test host has one
    vCPU (lab.run says why), and as many run at once as `_parallel` says
    ($VHOSTORCH_LAB_PARALLEL to choose; 1: one after the other). Their images are made
    first, one at a time, as they share a cache."""
    from vhostorch.errors import VhostorchError
    from vhostorch.lab.image import ensure_image
    from vhostorch.lab.userland import ensure_userland

    boots = config.stash[BOOTS]
    if not config.stash.get(STARTED, False):
        config.stash[STARTED] = True
        for boot in boots.values():
            if boot.nodeids:
                try:
                    ensure_userland(boot.userland, log=print)
                    ensure_image(log=print, kernel=boot.series)
                except VhostorchError as err:  # its tests fail with it; the others still run
                    boot.error = f"the test host's image could not be made: {err}"
        slots = threading.Semaphore(_parallel(len(boots)))
        for boot in boots.values():
            boot.start(slots)
    return boots


def _parallel(sessions: int) -> int:
    """How many sessions boot at once: one more than the CPUs, as memory allows (a test host
    takes 3 GiB and its QEMU a little more). One more than the CPUs pays: a session often
    waits (a guest's timer, a paused VM, a 60 s bound) and another uses the CPU meanwhile
    (three sessions on 2 cores took 1.7 times as long as two, not 1.5 times as many)."""
    chosen = int(os.environ.get(PARALLEL_ENV, "0"))
    if chosen > 0:
        return chosen
    from vhostorch.lab.run import available_mib

    return max(1, min(sessions, (os.cpu_count() or 1) + 1, available_mib() // (3072 + 1024)))


class _Lines:
    """Output of one test host, a whole line at a time, each prefixed with its kernel (two
    sessions print at once)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.encode()
        self.partial = b""

    def __call__(self, chunk: bytes) -> None:
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        if lines:
            with _PRINTING:
                sys.stdout.buffer.write(b"".join(self.prefix + line + b"\n" for line in lines))
                sys.stdout.buffer.flush()


_PRINTING = threading.Lock()


class RemoteFailure(Exception):
    """A test failed inside the test host; the message is its report there."""


class Remote(pytest.Item):
    """A ``testhost`` test on one kernel seen from outside: its result comes from that
    kernel's boot, where the test has its own node id (``inner``)."""

    kernel = ""
    inner = ""

    def runtest(self) -> None:
        boot = _together(self.config)[self.kernel]
        boot.wait()
        result = boot.report.get(self.inner)
        if result is None:
            raise RemoteFailure(boot.error or "no result from the test host for this test")
        if result["outcome"] == "skipped":
            pytest.skip(f"in the test host: {result['text']}")
        if result["outcome"] != "passed":
            raise RemoteFailure(result["text"])

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, RemoteFailure):
            return f"[in the test host, linux-{self.kernel}]\n{excinfo.value}"
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"{self.name} (in the test host)"


def _waits_for_boots(item: pytest.Item) -> bool:
    names = getattr(item, "fixturenames", ())
    return isinstance(item, Remote) or "testhost_boot" in names or "testhost_sessions" in names


def _order(item: pytest.Item) -> int:
    if not _waits_for_boots(item):
        return 0
    return 1 if "testhost_sessions" in getattr(item, "fixturenames", ()) else 2


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Outside: the sessions start at the first test that is not a benchmark of this machine
    (those are timed on an idle one, first), and run while the other tests here do; the
    stand-ins, last, wait for them."""
    if INSIDE or item.config.stash.get(STARTED, False):
        return
    if not any(b.nodeids for b in item.config.stash.get(BOOTS, {}).values()):
        return
    benchmark = item.get_closest_marker("bench") or "bench" in item.path.parts
    if _waits_for_boots(item) or not benchmark:
        _together(item.config)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if INSIDE:
        outer = [i for i in items if _outside_only(i)]
        if outer:
            config.hook.pytest_deselected(items=outer)
            items[:] = [i for i in items if not _outside_only(i)]
        # Tests that run libvirt domains go last: twice, after one of them, the next
        # VHOST_SET_OWNER in the test host blocked in the kernel (see _Watchdog).
        items.sort(key=lambda i: "libvirtd" in getattr(i, "fixturenames", ()))
        return
    inner = [i for i in items if i.get_closest_marker("testhost") and not _outside_only(i)]
    chosen = kernels(config)
    runs_in = {i.nodeid: _sessions(i, chosen) for i in inner}
    config.stash[BOOTS] = {
        k: Boot(config, [i.nodeid for i in inner if k in runs_in[i.nodeid]], k) for k in chosen
    }
    expanded: list[pytest.Item] = []
    for item in items:
        if item not in inner:
            expanded.append(item)
            continue
        for kernel in runs_in[item.nodeid]:
            remote = Remote.from_parent(item.parent, name=kernel_id(item.name, kernel))
            remote.kernel, remote.inner = kernel, item.nodeid
            # Not its timeout: the test has it inside; outside, the first test of a session
            # waits for the whole boot (bounded by TIMEOUT).
            remote.own_markers.extend(m for m in item.iter_markers() if m.name != "timeout")
            expanded.append(remote)
    # The tests here first, the sessions running meanwhile; then the tests that boot their
    # own test host once a session is done; then the sessions' stand-ins.
    expanded.sort(key=_order)
    items[:] = expanded


def pytest_terminal_summary(terminalreporter: Any) -> None:
    boots = terminalreporter.config.stash.get(BOOTS, {})
    frozen = [line for boot in boots.values() for line in boot.frozen]
    if frozen:
        terminalreporter.section("the test host froze")
        for line in frozen:
            terminalreporter.write_line(line)
    ran = [boot for boot in boots.values() if boot.outcome is not None]
    if ran:
        terminalreporter.section("test host boots")
        for boot in ran:
            terminalreporter.write_line(
                f"linux-{boot.kernel}: {len(boot.nodeids)} test(s), booted in "
                f"{boot.outcome.boot_seconds or 0:.1f} s, {boot.outcome.seconds:.0f} s in all"
            )
            # Where a session's time goes, for keeping CI inside its budget.
            slowest = sorted(boot.report.items(), key=lambda kv: -kv[1].get("seconds", 0))
            for nodeid, entry in slowest[:SLOWEST]:
                terminalreporter.write_line(f"  {entry.get('seconds', 0):6.1f} s  {nodeid}")


def pytest_unconfigure(config: pytest.Config) -> None:
    for boot in config.stash.get(BOOTS, {}).values():
        boot.cleanup()


@pytest.fixture(scope="session")
def testhost_sessions(request: pytest.FixtureRequest) -> None:
    """Wait until one session's test host has finished and every other is past its
    benchmarks (they run first in each): for a test that boots a test host of its own with
    more than one CPU, which must not share the cores with a benchmark, and need not wait
    for the last session (its tail ran alone for two minutes)."""
    boots = [b for b in request.config.stash.get(BOOTS, {}).values() if b.nodeids]
    if not boots:
        return  # no session was asked for (this test alone): nothing to wait for
    _together(request.config)
    while not any(b.finished() for b in boots):
        time.sleep(2)
    while not all(b.finished() or b.benchmarks_done() for b in boots):
        time.sleep(2)


@pytest.fixture(scope="session")
def testhost_boot(request: pytest.FixtureRequest) -> Any:
    """The outcome of the first kernel's test-host boot (booting now if no test did yet)."""
    boot = next(iter(_together(request.config).values()))
    boot.wait()
    if boot.error:
        pytest.fail(boot.error, pytrace=False)
    return boot.outcome


class _Reporter:
    """Inside: collect each test's phases; write {nodeid: {outcome, text}} at the end."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.results: dict[str, dict[str, Any]] = {}

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.results.setdefault(
            report.nodeid, {"outcome": "passed", "text": "", "seconds": 0.0}
        )
        entry["seconds"] += report.duration  # setup, call and teardown
        if report.outcome == "passed" or entry["outcome"] != "passed":
            return
        text = report.longreprtext
        if report.skipped and isinstance(report.longrepr, tuple):
            text = str(report.longrepr[2])
        for title, content in report.sections:
            text += f"\n----- {title} -----\n{content}"
        entry.update(outcome=report.outcome, text=f"({report.when}) {text}".strip())

    @pytest.hookimpl
    def pytest_runtest_logfinish(self) -> None:
        # Written after every test, so a boot stopped midway still reports what finished.
        with open(self.path + ".part", "w") as f:
            json.dump(self.results, f)
        os.replace(self.path + ".part", self.path)


class _Watchdog:
    """Inside: if a test outlasts the per-test timeout (a task stuck in the kernel cannot
    be interrupted), write the kernel stacks of every task in D state next to the report."""

    def __init__(self, path: str, running: str) -> None:
        import threading

        self.path = path
        self.running = running
        self.started = 0.0
        self.test = ""
        threading.Thread(target=self._watch, daemon=True).start()

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        import time

        self.test, self.started = nodeid, time.monotonic()
        # Read from outside if the whole test host freezes: which test it was running.
        with open(self.running, "w") as f:
            f.write(nodeid)

    def _watch(self) -> None:
        import time

        while True:
            time.sleep(10)
            if self.started and time.monotonic() - self.started > TEST_TIMEOUT + 20:
                with open(self.path, "w") as f:
                    f.write(f"{self.test} stuck; tasks in D state:\n{_blocked_tasks()}")
                self.started = 0.0


def _blocked_tasks() -> str:
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if ") D " not in f.read():
                    continue
            with open(f"/proc/{pid}/comm") as f, open(f"/proc/{pid}/stack") as g:
                found.append(f"{pid} {f.read().strip()}\n{g.read()}")
        except OSError:
            continue
    return "\n".join(found) or "(none)"


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--testhost-report")
    if path:
        config.pluginmanager.register(_Reporter(path), "vhostorch-testhost-reporter")
        config.pluginmanager.register(
            _Watchdog(path + ".hang", path + ".running"), "vhostorch-testhost-watchdog"
        )


@pytest.fixture(scope="session")
def in_testhost() -> Iterator[None]:
    """For tests that must only ever run inside the test host (they change the host)."""
    if not INSIDE:
        pytest.fail("this test changes the host it runs on: run it with -m testhost")
    yield
