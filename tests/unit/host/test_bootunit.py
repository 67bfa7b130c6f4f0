"""The boot unit that arms the wiring trace before libvirt (``trace install-unit``): what it
says, as systemd-analyze reads it; how it is written and enabled; what doctor says about it.

The unit is written into a temporary unit directory here; the test host runs its ExecStart
before libvirtd (tests/testhost/test_rewire_testhost.py).
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.kernel import vhostorch
from vhostorch.errors import NotManaged
from vhostorch.host import bootunit, doctor


def install(unit_dir: Path, *more: str) -> tuple[int, dict[str, object], str]:
    done = vhostorch("trace", "install-unit", "--unit-dir", str(unit_dir), "--json", *more)
    return done.returncode, json.loads(done.stdout) if done.stdout else {}, done.stderr


def unit_lines(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        key, eq, value = line.partition("=")
        if eq and not line.startswith("#"):
            found.setdefault(key, []).append(value)
    return found


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    code, _, err = install(tmp_path)
    assert code == 0, err
    unit = tmp_path / bootunit.NAME
    # --man=no: no man pages here; verify then loads the unit and checks every directive and
    # that ExecStart/ExecStop's programs are executables. Any complaint is printed.
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stderr
    # The oracle bites: the same unit with a bad value and a missing program is reported.
    broken = tmp_path / "broken" / bootunit.NAME
    broken.parent.mkdir()
    text = unit.read_text().replace("RemainAfterExit=yes", "RemainAfterExit=perhaps")
    broken.write_text(text.replace(f"ExecStart={bootunit.sys.executable}", "ExecStart=/nowhere"))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(broken)], capture_output=True, text=True
    )
    assert "perhaps" in done.stderr and "/nowhere" in done.stderr


def test_the_unit_orders_the_trace_before_libvirt_and_disarms_on_stop(tmp_path: Path) -> None:
    code, result, err = install(tmp_path)
    assert code == 0 and result["action"] == "installed" and result["enabled"] is True, err
    unit = tmp_path / bootunit.NAME
    lines = unit_lines(unit)
    before = lines["Before"][0].split()
    assert {"libvirtd.service", "virtqemud.service", "libvirt-guests.service"} <= set(before)
    assert lines["Type"] == ["oneshot"] and lines["RemainAfterExit"] == ["yes"]
    assert "multi-user.target" in lines["WantedBy"][0].split()
    assert "Requires" not in lines  # a trace that cannot be armed never holds VMs back
    start, stop = shlex.split(lines["ExecStart"][0]), shlex.split(lines["ExecStop"][0])
    assert start[-2:] == ["trace", "arm"] and stop[-2:] == ["trace", "disarm"]
    # ExecStart is this vhostorch: run as the boot runs it, with `status` for `arm` (this
    # machine has no tracefs to arm), it answers as `vhostorch trace status` does.
    status = subprocess.run([*start[:-1], "status"], capture_output=True, text=True, env={})
    assert status.returncode == 0 and status.stdout == vhostorch("trace", "status").stdout
    assert os.stat(unit).st_mode & 0o777 == 0o644
    for wanted_by in ("multi-user.target", "libvirtd.service", "virtqemud.service"):
        link = tmp_path / f"{wanted_by}.wants" / bootunit.NAME
        assert os.readlink(link) == str(unit), wanted_by
    code, again, _ = install(tmp_path)
    assert code == 0 and again["action"] == "unchanged" and again["changed"] is False


def test_doctor_warns_until_the_unit_is_installed_and_enabled(tmp_path: Path) -> None:
    def boot_check() -> tuple[str, str]:
        (found,) = [
            c for c in doctor.doctor(doctor.Paths(systemd=str(tmp_path))).checks
            if c.id == "host.trace.boot"
        ]  # fmt: skip
        return found.status, found.message

    status, message = boot_check()
    assert status == "warn" and "will not be armed at next boot" in message
    assert "vhostorch trace install-unit" in message
    assert install(tmp_path)[0] == 0
    assert boot_check()[0] == "pass"
    (tmp_path / "multi-user.target.wants" / bootunit.NAME).unlink()  # systemctl disable
    status, message = boot_check()
    assert status == "warn" and "not enabled" in message
    assert install(tmp_path)[0] == 0 and boot_check()[0] == "pass"
    code, removed, _ = (lambda d: (d.returncode, json.loads(d.stdout), d.stderr))(
        vhostorch("trace", "uninstall-unit", "--unit-dir", str(tmp_path), "--json")
    )
    assert code == 0 and removed["action"] == "removed"
    assert not (tmp_path / bootunit.NAME).exists()
    assert not any(
        (tmp_path / f"{w}.wants" / bootunit.NAME).is_symlink() for w in bootunit.WANTED_BY
    )
    assert boot_check()[0] == "warn"


def test_a_unit_vhostorch_did_not_write_is_left_alone(tmp_path: Path) -> None:
    unit = tmp_path / bootunit.NAME
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    code, _, err = install(tmp_path)
    assert code == 1 and "vhostorch did not write it" in err and len(err.splitlines()) == 1
    assert unit.read_text() == "[Service]\nExecStart=/bin/true\n"
    with pytest.raises(NotManaged):
        bootunit.uninstall(str(tmp_path))
    assert unit.exists()


def test_a_symlink_planted_at_the_unit_path_is_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (tmp_path / bootunit.NAME).symlink_to(victim)
    code, _, err = install(tmp_path)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert victim.read_text() == "keep me\n"
    # Once the link is gone the unit is written (a new O_EXCL|O_NOFOLLOW file under a random
    # name, renamed over the path): the victim is untouched and no temporary file is left.
    (tmp_path / bootunit.NAME).unlink()
    assert install(tmp_path)[0] == 0
    assert victim.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def run_unit(verb: str, unit_dir: Path, umask: int = -1) -> subprocess.CompletedProcess[str]:
    """``vhostorch trace VERB --unit-dir``, as a user runs it, cut off after 20 s (a hang is
    the failure, not the test's)."""
    exe = os.path.join(os.path.dirname(bootunit.sys.executable), "vhostorch")
    return subprocess.run(
        [exe, "trace", verb, "--unit-dir", str(unit_dir)],
        capture_output=True, text=True, timeout=20, umask=umask,
    )  # fmt: skip


def doctor_boot_check(unit_dir: Path) -> dict[str, object]:
    """doctor's host.trace.boot for ``unit_dir``, in a child cut off after 20 s."""
    code = (
        "import json, sys\n"
        "from vhostorch.host import doctor\n"
        "(c,) = [c for c in doctor.doctor(doctor.Paths(systemd=sys.argv[1])).checks"
        " if c.id == 'host.trace.boot']\n"
        "print(json.dumps({'status': c.status, 'message': c.message}))\n"
    )
    done = subprocess.run(
        [bootunit.sys.executable, "-c", code, str(unit_dir)],
        capture_output=True, text=True, timeout=20, check=True,
    )  # fmt: skip
    found = json.loads(done.stdout)
    assert isinstance(found, dict)
    return found


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_what_is_not_a_regular_file_at_the_unit_path_is_refused_in_one_line(
    tmp_path: Path, kind: str
) -> None:
    # A FIFO is never opened (reading one waits for a writer: install, uninstall and doctor
    # hung); a directory is refused as not ours, not an internal IsADirectoryError.
    unit = tmp_path / bootunit.NAME
    os.mkfifo(unit) if kind == "fifo" else unit.mkdir()
    what = {"fifo": "is a FIFO", "directory": "is a directory"}[kind]
    for verb in ("install-unit", "uninstall-unit"):
        done = run_unit(verb, tmp_path)
        assert done.returncode == 1, (verb, done.stderr)
        assert len(done.stderr.splitlines()) == 1 and what in done.stderr, done.stderr
        assert "not replacing it" in done.stderr and "internal error" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [bootunit.NAME]  # nothing written
    with pytest.raises(NotManaged, match=what):
        bootunit.install(str(tmp_path))
    found = bootunit.state(str(tmp_path))
    assert not found.installed and found.refused and what in found.refused
    check = doctor_boot_check(tmp_path)
    assert check["status"] == "warn" and what in str(check["message"]), check
    assert stat_kind(unit) == kind  # left as it was


def stat_kind(path: Path) -> str:
    mode = os.lstat(path).st_mode
    return "fifo" if stat.S_ISFIFO(mode) else "directory" if stat.S_ISDIR(mode) else "other"


def test_a_relative_wants_link_to_the_unit_is_ours_to_install_and_remove(tmp_path: Path) -> None:
    # `ln -s ../vhostorch-trace.service multi-user.target.wants/` (as systemctl may write it):
    # install and state read it as one comparison does, relative to the link's directory.
    wants = tmp_path / "multi-user.target.wants"
    wants.mkdir()
    (wants / bootunit.NAME).symlink_to(f"../{bootunit.NAME}")
    done = run_unit("install-unit", tmp_path)
    assert done.returncode == 0, done.stderr
    assert os.readlink(wants / bootunit.NAME) == f"../{bootunit.NAME}"  # left as it was
    found = bootunit.state(str(tmp_path))
    assert found.installed and set(found.enabled_by) == set(bootunit.WANTED_BY)
    assert found.armed_at_boot
    assert run_unit("uninstall-unit", tmp_path).returncode == 0
    assert not (wants / bootunit.NAME).is_symlink() and not (tmp_path / bootunit.NAME).exists()


def test_a_foreign_wants_link_refuses_the_install_before_anything_is_written(
    tmp_path: Path,
) -> None:
    # All or nothing: the link in the way is found before the unit or any other link is made.
    wants = tmp_path / "virtqemud.service.wants"
    wants.mkdir()
    (wants / bootunit.NAME).symlink_to("/etc/systemd/system/someone-else.service")
    done = run_unit("install-unit", tmp_path)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "does not point at" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["virtqemud.service.wants"]
    assert [p.name for p in wants.iterdir()] == [bootunit.NAME]
    # A file where a .wants directory goes is refused the same way.
    (wants / bootunit.NAME).unlink()
    wants.rmdir()
    wants.write_text("")
    done = run_unit("install-unit", tmp_path)
    assert done.returncode == 1 and "is not a directory" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["virtqemud.service.wants"]


def test_directories_made_are_0755_whatever_the_umask(tmp_path: Path) -> None:
    new = tmp_path / "new" / "system"
    done = run_unit("install-unit", new, umask=0o077)
    assert done.returncode == 0, done.stderr
    made = [tmp_path / "new", new, *(new / f"{w}.wants" for w in bootunit.WANTED_BY)]
    assert {str(d): os.stat(d).st_mode & 0o777 for d in made} == {str(d): 0o755 for d in made}
    assert os.stat(new / bootunit.NAME).st_mode & 0o777 == 0o644
    # A directory already there keeps its mode.
    kept = tmp_path / "kept"
    (kept / "multi-user.target.wants").mkdir(parents=True)
    os.chmod(kept, 0o750)
    os.chmod(kept / "multi-user.target.wants", 0o700)
    assert run_unit("install-unit", kept, umask=0o077).returncode == 0
    assert os.stat(kept).st_mode & 0o777 == 0o750
    assert os.stat(kept / "multi-user.target.wants").st_mode & 0o777 == 0o700
    assert os.stat(kept / "libvirtd.service.wants").st_mode & 0o777 == 0o755


def test_a_wants_directory_that_is_a_symlink_is_never_followed_out_of_the_unit_dir(
    tmp_path: Path,
) -> None:
    # A `.wants` pointing elsewhere led install to make its link there, and uninstall to
    # delete a link there, outside the directory it was given.
    units, outside = tmp_path / "units", tmp_path / "outside"
    units.mkdir()
    outside.mkdir()
    (units / "libvirtd.service.wants").symlink_to(outside)
    done = run_unit("install-unit", units)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "libvirtd.service.wants is a symlink; not following it" in done.stderr
    assert list(outside.iterdir()) == []
    assert [p.name for p in units.iterdir()] == ["libvirtd.service.wants"]  # nothing written
    # Installed with real directories, then one is swapped for a symlink to a directory
    # holding a link to the unit: uninstall removes the unit and its own links only.
    (units / "libvirtd.service.wants").unlink()
    assert run_unit("install-unit", units).returncode == 0
    unit = units / bootunit.NAME
    (units / "libvirtd.service.wants" / bootunit.NAME).unlink()
    (units / "libvirtd.service.wants").rmdir()
    (units / "libvirtd.service.wants").symlink_to(outside)
    (outside / bootunit.NAME).symlink_to(unit)
    assert bootunit.state(str(units)).enabled_by == ("multi-user.target", "virtqemud.service")
    done = run_unit("uninstall-unit", units)
    assert done.returncode == 0, done.stderr
    assert os.readlink(outside / bootunit.NAME) == str(unit)  # not followed, left as it was
    assert not unit.exists()


def test_execstart_quotes_an_interpreter_path_as_systemd_reads_it(tmp_path: Path) -> None:
    """A virtualenv under a directory with blanks, '%' and ';' in its name: the unit passes
    systemd-analyze verify and its ExecStart runs (unquoted, systemd split the path at the
    blank and read '%' as a specifier). A path systemd cannot run is refused in one line."""
    venv = tmp_path / "venv of 100%; x"
    (venv / "bin").mkdir(parents=True)
    real = Path(bootunit.sys.prefix)  # this virtualenv: its interpreter, pyvenv.cfg, packages
    (venv / "bin" / "python3").symlink_to(os.path.realpath(bootunit.sys.executable))
    (venv / "pyvenv.cfg").write_text((real / "pyvenv.cfg").read_text())
    (venv / "lib").symlink_to(real / "lib")
    units = tmp_path / "units"
    done = subprocess.run(
        [str(venv / "bin" / "python3"), "-m", "vhostorch", "trace", "install-unit",
         "--unit-dir", str(units)],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    unit = units / bootunit.NAME
    start = unit_lines(unit)["ExecStart"][0]
    assert start.startswith(f'"{venv}'.replace("%", "%%")), start
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True
    )
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stderr
    words = bootunit.exec_words(start)
    assert words[0] == str(venv / "bin" / "python3") and words[-2:] == ["trace", "arm"]
    found = bootunit.state(str(units))
    assert found.runs and found.armed_at_boot
    status = subprocess.run([*words[:-1], "status"], capture_output=True, text=True, env={})
    assert status.returncode == 0 and status.stdout == vhostorch("trace", "status").stdout
    assert bootunit.exec_word("/usr/bin/python3") == "/usr/bin/python3"  # plain: as it is
    for bad in ("/opt/py\nthon", "/opt/$HOME/python", '/opt/"py"', "/opt/py\\"):
        with pytest.raises(bootunit.OperationFailed, match="which systemd does not run"):
            bootunit.exec_word(bad)
