"""`vhostorch lab`: building, booting, running a command, and the errors a user can meet."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support import testhost
from tests.support.kernel import vhostorch
from vhostorch.lab import image, run, watch
from vhostorch.qemu import monitor

VHOSTORCH = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "vhostorch")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.testhost(outside=True)
def test_boot_reaches_the_command_in_under_15_s(testhost_boot: run.Outcome) -> None:
    assert testhost_boot.boot_seconds is not None
    print(f"test host reached its command in {testhost_boot.boot_seconds:.1f} s")
    assert testhost_boot.boot_seconds < 15


@pytest.mark.testhost(outside=True)
def test_lab_run_streams_output_returns_status_and_shares_results(tmp_path: Path) -> None:
    script = (
        "echo out-$((6*7)); pwd; ls /sys/class/net; test -c /dev/vhost-net && echo vhost-ok; "
        'echo kept > "$VHOSTORCH_LAB_RESULTS/kept"; echo "$GREETING"; '
        "touch /usr/share/vhostorch-lab-scratch; exit 3"
    )
    done = vhostorch(
        "lab",
        "run",
        "--results",
        str(tmp_path),
        "--env",
        "GREETING=hello there",
        "--",
        "sh",
        "-c",
        script,
    )
    assert done.returncode == 3, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "out-42"
    assert lines[1] == os.getcwd()
    assert lines[2] == "lo"  # the test host has no network device of its own
    assert "vhost-ok" in lines and "hello there" in lines
    assert (tmp_path / "kept").read_text() == "kept\n"
    # Writes elsewhere went to the throwaway overlay, not to this machine.
    assert not os.path.exists("/usr/share/vhostorch-lab-scratch")
    assert re.search(r"exit 3; booted in [\d.]+ s", done.stderr)


@pytest.mark.testhost(outside=True)
def test_lab_run_timeout_stops_the_test_host_by_pid(tmp_path: Path) -> None:
    done = vhostorch(
        "lab", "run", "--timeout", "12", "--results", str(tmp_path), "--", "sleep", "600"
    )
    assert done.returncode == 124, done.stderr
    found = re.search(r"within 12 s; stopped it \(QEMU pid (\d+)\)", done.stderr)
    assert found, done.stderr
    assert not _alive(int(found.group(1)))


@pytest.mark.testhost(outside=True)
def test_a_test_host_that_cannot_reach_its_command_says_why(tmp_path: Path) -> None:
    built = image.ensure_image()
    # A real initramfs without the 9p modules: it boots, cannot mount the root, powers off.
    broken = image.initramfs(
        built.root, built.kver, "host-init", ("virtio_pci",), str(tmp_path), "broken", None
    )
    with pytest.raises(image.LabError, match=r"did not reach its command.*cannot mount the host"):
        run.run(
            ["true"],
            image=built.replace(host_initrd=broken),
            results=str(tmp_path / "r"),
            timeout=120,
        )


def test_missing_qemu_is_a_clear_error() -> None:
    done = subprocess.run(
        [VHOSTORCH, "lab", "run", "--", "true"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": "/nonexistent"},
        check=False,
    )
    assert done.returncode == 125
    assert done.stderr.strip() == (
        "vhostorch: error: QEMU is missing: qemu-system-x86_64 not found "
        "(install the Debian package qemu-system-x86)"
    )


def test_not_enough_memory_is_a_clear_error() -> None:
    done = vhostorch("lab", "run", "--memory", "4194304", "--", "true")
    assert done.returncode == 125
    assert re.fullmatch(
        r"vhostorch: error: not enough memory: the test host needs 4194560 MiB, \d+ MiB are "
        r"available\n",
        done.stderr,
    )


def test_a_results_directory_too_long_for_the_monitor_socket_is_a_clear_error(
    tmp_path: Path,
) -> None:
    results = tmp_path / ("r" * (100 - len(str(tmp_path))))
    done = vhostorch("lab", "run", "--results", str(results), "--", "true")
    assert done.returncode == 125
    assert done.stderr == (
        f"vhostorch: error: the results directory {str(results)!r} is too long: QEMU's monitor "
        "socket goes there and a socket path has at most 107 bytes\n"
    )
    assert not results.exists()


def test_kernel_package_not_obtainable_is_a_clear_error(tmp_path: Path) -> None:
    # A real apt with no package sources and an empty cache: nothing can be fetched.
    for d in ("lists/partial", "cache/archives/partial"):
        (tmp_path / d).mkdir(parents=True)
    conf = tmp_path / "apt.conf"
    conf.write_text(
        f'Dir::Etc::sourcelist "/dev/null"; Dir::Etc::sourceparts "{tmp_path}/none";\n'
        f'Dir::State::lists "{tmp_path}/lists"; Dir::Cache "{tmp_path}/cache";\n'
    )
    env = {**os.environ, "APT_CONFIG": str(conf), "VHOSTORCH_CACHE": str(tmp_path / "vc")}
    done = subprocess.run(
        [VHOSTORCH, "lab", "build"], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 125, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "vhostorch: error: kernel package not obtainable: apt knows no linux-image-amd64"
    )


def test_lab_build_is_cached_and_reports_its_files() -> None:
    first = vhostorch("lab", "build", "--json")
    assert first.returncode == 0, first.stderr
    again = vhostorch("lab", "build", "--json")
    assert again.returncode == 0 and again.stdout == first.stdout
    assert "building" not in again.stderr and "fetching" not in again.stderr
    import json

    built = json.loads(first.stdout)
    cached = built["image"]
    for key in ("kernel", "host_initrd", "guest_initrd"):
        assert os.path.getsize(cached[key]) > 0
    # What a guest inside the test host boots, for scripts that use only the CLI (the demo).
    assert built["guest"] == {
        "kernel": cached["kernel"],
        "initrd": cached["guest_initrd"],
        "cmdline": image.GUEST_APPEND,
    }
    with open(cached["kernel"], "rb") as f:
        assert f.read(4) == b"\x7fELF"  # booted through PVH, not decompressed under TCG


def test_lab_build_kernel_series_fetches_the_newest_of_it_and_caches_it() -> None:
    import json

    from vhostorch.lab.userland import codename

    if codename() != "bookworm":
        # Debian 13's archive has one series, 6.12, its default (no linux-image-6.12-amd64).
        series = vhostorch("lab", "build", "--kernel", "6.12", "--json")
        assert series.returncode == 0, series.stderr
        assert series.stdout == vhostorch("lab", "build", "--json").stdout
        assert json.loads(series.stdout)["image"]["kver"].startswith("6.12.")
        return
    debian = subprocess.run(
        ["apt-cache", "depends", "linux-image-6.12-amd64"], capture_output=True, text=True
    ).stdout
    newest = re.search(r"Depends: linux-image-(6\.12\.\S+)", debian)
    assert newest, debian
    first = vhostorch("lab", "build", "--kernel", "6.12", "--json")
    assert first.returncode == 0, first.stderr
    cached = json.loads(first.stdout)["image"]
    assert cached["kver"] == newest.group(1)
    assert cached["root"] == f"{image.CACHE}/lab/{cached['kver']}/root"
    with open(cached["kernel"], "rb") as f:
        assert f.read(4) == b"\x7fELF"  # 6.12's bzImage is zstd: unpacked by zstd, not lzma
    again = vhostorch("lab", "build", "--kernel", "6.12", "--json")
    assert again.stdout == first.stdout and "fetching" not in again.stderr
    # The default stays linux-image-amd64's kernel (6.1), cached beside it.
    default = json.loads(vhostorch("lab", "build", "--json").stdout)["image"]
    assert default["kver"].startswith("6.1.") and default["kver"] != cached["kver"]
    assert (
        vhostorch("lab", "build", "--kernel", "6.1", "--json").stdout
        == vhostorch("lab", "build", "--json").stdout
    )


def test_a_kernel_series_apt_does_not_know_is_not_obtainable() -> None:
    done = vhostorch("lab", "build", "--kernel", "5.99")
    assert done.returncode == 125
    assert done.stderr == (
        "vhostorch: error: kernel package not obtainable: apt knows no Linux 5.99 "
        "(neither linux-image-amd64 nor linux-image-5.99-amd64 gives one)\n"
    )


@pytest.mark.testhost(outside=True)
@pytest.mark.parametrize("kernel", ["default", "6.12"])
def test_lab_run_boots_the_chosen_kernel(kernel: str, tmp_path: Path) -> None:
    import json

    image = json.loads(vhostorch("lab", "build", "--kernel", kernel, "--json").stdout)["image"]
    done = vhostorch(
        "lab", "run", "--kernel", kernel, "--results", str(tmp_path), "--", "uname", "-r"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == image["kver"]


@pytest.mark.testhost(outside=True)
def test_lab_run_boots_a_debian_13_userland_with_its_kernel_and_the_checkouts_venv(
    tmp_path: Path,
) -> None:
    import json

    built = json.loads(vhostorch("lab", "build", "--userland", "trixie", "--json").stdout)
    land, image = built["userland"], built["image"]
    assert image["kver"].startswith("6.12.")  # Debian 13's series by default
    probe = (
        "cat /etc/debian_version; .venv/bin/python -c 'import sys, vhostorch; "
        "print(sys.version_info[:2], vhostorch.__file__)'; qemu-system-x86_64 --version; "
        "uname -r; test -c /dev/vhost-net && echo vhost-net"
    )
    done = vhostorch(
        "lab", "run", "--userland", "trixie", "--results", str(tmp_path), "--", "sh", "-c", probe
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("13."), lines
    # Python 3.13 from the userland's virtualenv, running this checkout's code.
    root = Path(__file__).resolve().parents[2]
    assert lines[1] == f"(3, 13) {root}/vhostorch/__init__.py", lines
    assert lines[2].startswith("QEMU emulator version 10."), lines
    assert lines[-2] == image["kver"] and lines[-1] == "vhost-net", lines
    # The results directory's mount point, made in the cached root for the boot, is gone.
    assert not os.path.exists(land["root"] + str(tmp_path.resolve()))


@pytest.mark.testhost(outside=True)
def test_a_debian_13_test_host_run_from_above_its_results_directory_still_reports(
    tmp_path: Path,
) -> None:
    # The working directory is shown copy-on-write over the Debian root: over /tmp, it hid
    # the results share below it, and the exit status written there never came back.
    from tests.support.kernel import EXE

    results = tmp_path / "results"
    done = subprocess.run(
        [EXE, "lab", "run", "--userland", "trixie", "--results", str(results), "--", "pwd"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path)
    assert (results / "exit-status").read_text().strip() == "0"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lab", "run"], "lab run: COMMAND is required"),
        (["lab", "build", "--userland", "sid"], "--userland takes one of default, trixie, not"),
        (["lab", "build", "--kernel", "6"], "--kernel takes a series such as 6.12"),
        (["lab", "build", "--kernel", "latest"], "--kernel takes a series such as 6.12"),
        (["lab", "build", "--kernel", "6.1.0"], "--kernel takes a series such as 6.12"),
        (["lab", "run", "--kernel", "6.x", "--", "true"], "not '6.x'"),
        (["lab", "run", "--env", "NOEQUALS", "--", "true"], "--env needs KEY=VALUE"),
        (["lab", "run", "--timeout", "0", "--", "true"], "--timeout 0 is out of range 1..86400"),
        (["lab", "run", "--memory", "lots", "true"], "--memory needs a whole number"),
        (["lab", "build", "extra"], "unexpected argument 'extra'"),
    ],
)
def test_lab_bad_usage_exits_2(argv: list[str], message: str) -> None:
    done = vhostorch(*argv)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.splitlines()) == 1


# Recorded on this machine: the test host with 2 vCPUs (QEMU 7.2 TCG) froze while kprobes
# were armed and disarmed next to running inner guests: CPU 0 patching kernel text waits
# for CPU 1, which loops on an int3 the patch had already removed.
LOCKUP = Path(__file__).parents[1] / "fixtures" / "soft-lockup-linux-6.1-tcg-smp2.txt"


def test_lockup_names_each_cpu_with_its_task_and_call_chain() -> None:
    found = watch.lockup(LOCKUP.read_text(), cpus=2)
    assert found is not None
    head, cpu0, cpu1 = found.split("; ")
    assert head == "soft lockup, CPU#0 stuck for 44s [python:131]"
    assert cpu0.startswith("CPU 0 python:131: smp_call_function_many_cond < on_each_cpu_cond_mask")
    assert "text_poke_bp" in cpu0 and "?" not in cpu0  # unreliable "? frame" entries left out
    assert cpu1.startswith("CPU 1 swapper/1:0: exc_int3 < asm_exc_int3 < __schedule")


def test_lockup_says_which_cpu_gave_no_backtrace_and_none_without_a_lockup() -> None:
    text = LOCKUP.read_text()
    found = watch.lockup(text, cpus=3)
    assert found is not None and found.endswith("CPU 2: no backtrace (not even an NMI got through)")
    assert watch.lockup(text.split("watchdog: BUG")[0], cpus=2) is None


def test_a_lockup_counts_as_a_freeze_only_once_it_lasts() -> None:
    text = LOCKUP.read_text()
    assert not watch.frozen(text)  # 44 s and 71 s: a long stall, not yet a verdict
    stuck = text.replace("stuck for 71s!", f"stuck for {watch.FROZEN_AFTER}s!")
    assert watch.frozen(stuck)


# Recorded on this machine: the test host (1 vCPU, its LAPIC timer one-shot then) stalled in a
# loop of `vhostorch up`/`down`, and QEMU's monitor showed what QEMU 7.2's lost wakeup leaves.
STALL = Path(__file__).parents[1] / "fixtures" / "lost-wakeup-qemu-7.2-tcg-hmp.txt"


def _hmp() -> dict[str, str]:
    """The fixture's sections: HMP command line → what QEMU printed."""
    sections = STALL.read_text().split("### ")[1:]
    return dict(tuple(s.split("\n", 1)) for s in sections)  # type: ignore[misc]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])  # HMP over QMP sends CRLF
def test_stall_evidence_names_a_lost_wakeup(newline: str) -> None:
    hmp = {k: v.replace("\n", newline) for k, v in _hmp().items()}
    found = watch.stall_evidence(hmp["info registers -a"], {0: hmp["info lapic 0"]})
    assert found.startswith("a lost wakeup: CPU 0 halted with interrupts on")
    assert found.endswith(
        "CPU 0: halted, interrupts on, RIP ffffffff81a592eb; "
        "LAPIC timer one-shot not armed, IRR 236, ISR none"
    )


@pytest.mark.parametrize(
    ("change", "state"),
    [
        (("IRR\t 236", "IRR\t (none)"), "interrupts on, RIP ffffffff81a592eb; "),
        (("RFL=00000246", "RFL=00000046"), "halted, interrupts off"),
        (("ISR\t (none)", "ISR\t 236"), "IRR 236, ISR 236"),
        (("PPR 0x10", "PPR 0xf0"), "IRR 236, ISR none"),  # masked by the processor priority
        (("HLT=1", "HLT=0"), "CPU 0: running"),
    ],
)
def test_stall_evidence_blames_no_one_when_no_interrupt_was_lost(
    change: tuple[str, str], state: str
) -> None:
    hmp = _hmp()
    registers, lapic = hmp["info registers -a"], hmp["info lapic 0"]
    assert change[0] in registers + lapic
    found = watch.stall_evidence(registers.replace(*change), {0: lapic.replace(*change)})
    assert found.startswith("CPU 0: ") and state in found


def test_a_stopped_emulator_is_no_lost_wakeup() -> None:
    """The same state while QMP `stop` holds the emulator (its timer raises interrupts no CPU
    may take then): in CI a stopped test host was called a lost wakeup, the emulator's fault."""
    hmp = _hmp()
    found = watch.stall_evidence(hmp["info registers -a"], {0: hmp["info lapic 0"]}, False)
    assert found == (
        "CPU 0: halted, interrupts on, RIP ffffffff81a592eb; "
        "LAPIC timer one-shot not armed, IRR 236, ISR none"
    )


def test_stall_evidence_without_a_monitor_answer_says_so() -> None:
    assert watch.stall_evidence("", {}) == "no CPU state from the monitor"


def test_heartbeat_silence_is_timed_by_this_machines_clock(tmp_path: Path) -> None:
    path = tmp_path / "heartbeat"
    beat = watch.Heartbeat(str(path), now=100.0)
    assert beat.silent_for(130.0) == 30.0  # never written: silent since the clock started
    path.write_text("12.51\n")
    assert beat.silent_for(140.0) == 0.0
    assert beat.silent_for(200.0) == 60.0  # the same beat again
    path.write_text("17.52\n")
    assert beat.silent_for(205.0) == 0.0


@pytest.mark.testhost(outside=True)
def test_a_test_host_whose_cpus_stop_is_stopped_at_once_with_their_state(
    tmp_path: Path,
) -> None:
    # A stall made on demand: QMP `stop` halts the vCPU as the lost wakeup does, so the
    # heartbeat goes silent while the timeout is still far away.
    results = tmp_path / "r"

    def pause() -> None:
        while not (results / "ready").exists():
            time.sleep(0.2)
        sock = monitor.QmpSocket(str(results / run.MONITOR), 10.0)
        sock.open()
        try:
            sock.execute("stop", None)
        finally:
            sock.close()

    threading.Thread(target=pause, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(run.LabFrozen) as caught:
        run.run(["sleep", "600"], results=str(results), timeout=300, stalled_after=15)
    took = time.monotonic() - started
    found = re.search(
        r"no heartbeat for (\d+) s \((.*)\); stopped it \(QEMU pid (\d+)\)$", str(caught.value)
    )
    assert found, caught.value
    # At least stalled_after; more when CI's load delays the watch's next look.
    assert int(found[1]) >= 15, caught.value
    assert took < 60, took
    evidence = caught.value.evidence
    assert found[2] == evidence and "lost wakeup" not in evidence
    # Wherever `stop` caught the CPU, its LAPIC timer is periodic (nohz=off highres=off,
    # see run.qemu_command) and running.
    assert re.fullmatch(
        r"CPU 0: (halted|running), interrupts (on|off), RIP [0-9a-f]{16}; "
        r"LAPIC timer periodic armed, IRR ([\d ]+|none), ISR ([\d ]+|none)",
        evidence,
    ), evidence
    assert not _alive(int(found[3]))


def test_testhost_tests_get_one_id_per_kernel() -> None:
    assert testhost.kernel_id("test_x", "6.12") == "test_x[linux-6.12]"
    assert testhost.kernel_id("test_x[qmp-4]", "6.1") == "test_x[qmp-4-linux-6.1]"
    assert testhost.kernel_id("test_x", "6.12@trixie") == "test_x[linux-6.12@trixie]"


@pytest.mark.parametrize(
    ("sessions", "per_userland", "own"),
    [
        ("6.1 6.12 6.12@trixie", "6.12 6.12@trixie", "6.1 6.12"),  # the default on Debian 12
        ("6.12", "6.12", "6.12"),
        ("6.12@trixie", "6.12@trixie", "6.12@trixie"),  # no session on this machine's: all
        ("6.1 6.12@trixie", "6.1 6.12@trixie", "6.1"),
    ],
)
def test_per_userland_and_own_userland_sessions(sessions: str, per_userland: str, own: str) -> None:
    assert testhost.userland_once(sessions.split()) == per_userland.split()
    assert testhost.own_userland(sessions.split()) == own.split()


@pytest.mark.parametrize(
    ("sessions", "each_once"),
    [
        ("6.1 6.12 6.12@trixie", "6.1 6.12@trixie"),  # the default on Debian 12
        ("6.12 6.1 6.12@trixie", "6.1 6.12@trixie"),
        ("6.12 6.12@trixie", "6.12 6.12@trixie"),  # two userlands: both
        ("6.1 6.12", "6.1 6.12"),  # two kernels: both
        ("6.12", "6.12"),  # a quick loop on one: it runs there
        ("6.12@trixie", "6.12@trixie"),
        ("6.1 6.12@trixie 6.12", "6.1 6.12@trixie"),
        ("6.1 6.12 6.1@trixie 6.12@trixie", "6.1 6.12@trixie"),
    ],
)
def test_a_test_marked_each_once_runs_in_the_fewest_sessions_covering_kernels_and_userlands(
    sessions: str, each_once: str
) -> None:
    assert testhost.covering(sessions.split()) == each_once.split()


def test_testhost_kernels_come_from_the_option_then_the_environment() -> None:
    script = (
        "import sys\nfrom tests.support import testhost\n"
        "def test_k(pytestconfig):\n    print('K=' + ','.join(testhost.kernels(pytestconfig)))\n"
    )
    root = Path(__file__).resolve().parents[2]
    base = [str(root / ".venv" / "bin" / "pytest"), "-s", "-q", "-p", "no:cacheprovider"]

    def run(*args: str, env: str | None = None) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k != testhost.KERNELS_ENV}
        if env is not None:
            environ[testhost.KERNELS_ENV] = env
        return subprocess.run(
            [*base, *args, str(probe)], capture_output=True, text=True, env=environ, cwd=root
        )

    probe = root / "tests" / f"test_kernels_probe_{os.getpid()}.py"
    probe.write_text(script)
    try:
        # The default sessions follow this machine's release (6.1 6.12 6.12@trixie on 12).
        assert f"K={testhost.default_kernels().replace(' ', ',')}\n" in run().stdout
        assert "K=6.12" in run(env="6.12").stdout
        assert "K=6.1" in run("--testhost-kernels", "6.1", env="6.12").stdout
        assert "K=6.12,default" in run("--testhost-kernels", "6.12,default 6.12").stdout
        # Another userland is a session of its own beside the same kernel on this machine's.
        assert "K=6.12,6.12@trixie" in run("--testhost-kernels", "6.12 6.12@trixie").stdout
        bad = run("--testhost-kernels", "six")
        assert bad.returncode == 4 and "--kernel takes a series" in bad.stderr
        bad = run("--testhost-kernels", "6.12@sid")
        assert bad.returncode == 4 and "--userland takes one of default, trixie" in bad.stderr
    finally:
        probe.unlink()
