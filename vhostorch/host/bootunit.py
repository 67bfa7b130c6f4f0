"""The systemd unit that arms the wiring trace at boot, before libvirt starts any VM:
writing it (``install``, ``uninstall``) and reading whether it will run (``state``).

Where the kernel's live state cannot be read (check.live: no BTF, no bpf, lockdown),
nic.kick and nic.call are proved only for vrings wired while the trace is armed, so it
must be armed before libvirtd (or virtqemud) and libvirt-guests start autostarted and
resumed domains. The unit is ``Type=oneshot`` with ``RemainAfterExit=yes``: its
ExecStart runs ``vhostorch trace arm`` once, ordered ``Before=`` those daemons; stopping
it (at shutdown, after them) runs ``trace disarm``. It only orders itself before them
and never requires them, and nothing requires it: a host whose trace cannot be armed
still starts its VMs (``doctor`` says why kick and call are unknown).

Enabled means linked from a ``*.wants/`` directory, as ``systemctl enable`` does for
``WantedBy=``: multi-user.target for the boot, and libvirtd.service and
virtqemud.service so that a socket-activated daemon started early pulls it into the
same transaction (where ``Before=`` orders them). The links are made here, so a unit
installed in an image or a chroot without a running systemd is enabled all the same;
when systemd runs, it is told to reload.
"""

from __future__ import annotations

import os
import sys

from vhostorch import files, rootcode
from vhostorch.errors import InvalidSpec, NotManaged, OperationFailed
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from typing import Literal

    # What install and uninstall did (the JSON's "action"; "changed" unless unchanged/absent).
    Action = Literal["installed", "updated", "unchanged", "removed", "absent"]

UNIT_DIR = "/etc/systemd/system"
NAME = "vhostorch-trace.service"
MARKER = "# vhostorch trace unit"
WANTED_BY = ("multi-user.target", "libvirtd.service", "virtqemud.service")
BEFORE = ("libvirtd.service", "virtqemud.service", "libvirt-guests.service")
# Where systemd keeps its runtime state when it is the running init (sd_booted(3)).
SYSTEMD_RUNNING = "/run/systemd/system"
DIR_MODE = 0o755  # the unit directory and its *.wants/, made here, whatever the umask


# Characters an Exec*= word may hold as they are; any other word is quoted (exec_word).
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+:,@=")


def exec_word(program: str) -> str:
    """``program`` as the first word of an Exec*= line, as systemd splits and unescapes it
    (systemd.service(5), "Command lines"; systemd.unit(5), "Specifiers").

    A path of plain characters stays as it is; any other is double-quoted (a blank splits
    words otherwise) with ``%`` doubled (systemd reads ``%x`` as a specifier, quoted or not).
    Raises OperationFailed for what systemd will not run or reads back otherwise: a quote or
    a backslash ("Executable name contains special characters", systemd-analyze verify), a
    control character, or ``$`` (variables are expanded in the argv[0] passed, not in the
    path run, and ``$$`` is not undone in the path).
    """
    if program and set(program) <= _PLAIN:
        return program
    refused = sorted({ch for ch in program if ch in "\"'\\$" or not ch.isprintable()})
    if refused:
        raise OperationFailed(
            f"the interpreter path {program!r} holds {''.join(refused)!r}, which systemd "
            "does not run as a unit's program"
        )
    return '"' + program.replace("%", "%%") + '"'


def exec_words(line: str) -> list[str]:
    """The words of an Exec*= line as this module writes it (exec_word's inverse)."""
    import shlex

    return shlex.split(line.replace("%%", "%"))


def command(verb: str) -> str:
    """This vhostorch's ``trace VERB`` as an ExecStart line: this interpreter (a virtualenv's
    keeps its packages), isolated from the environment and the user's site."""
    return f"{exec_word(sys.executable)} {rootcode.UNIT_FLAGS} -m vhostorch trace {verb}"


def unit_text() -> str:
    return f"""{MARKER}: arms the kick/call wiring trace before libvirt starts any VM.
# Written by `vhostorch trace install-unit`, removed by `vhostorch trace uninstall-unit`.
[Unit]
Description=vhostorch wiring trace (proves vhost kick/call wiring of VMs started after it)
After=sys-kernel-tracing.mount
Before={" ".join(BEFORE)}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={command("arm")}
ExecStop={command("disarm")}

[Install]
WantedBy={" ".join(WANTED_BY)}
"""


class Installed(Record):
    path: str
    action: Action
    enabled: bool
    reloaded: bool = False


class BootState(Record):
    """What the next boot will do about the trace."""

    path: str
    installed: bool
    enabled_by: tuple[str, ...]  # the *.wants/ links that point at the unit
    exec_start: str | None
    runs: bool  # ExecStart's program exists and is executable
    refused: str | None = None  # why what is at ``path`` is not vhostorch's unit

    @property
    def armed_at_boot(self) -> bool:
        return self.installed and "multi-user.target" in self.enabled_by and self.runs


def _ours(path: str) -> str | None:
    """The unit's text if vhostorch wrote it; None if absent. Raises NotManaged.

    Only a regular file can be ours: anything else (a FIFO, which would hang the read, a
    symlink) is refused without being opened (files.read_installed).
    """
    text = files.read_installed(path, "a unit vhostorch wrote")
    if text is None:
        return None
    if not text.startswith(MARKER):
        raise NotManaged(f"{path} exists and vhostorch did not write it; not replacing it")
    return text


def _points_at(link: str, path: str) -> bool:
    """Whether ``link`` is a symlink to ``path``: its target, relative to the link's own
    directory if relative (as systemd reads it), normalised. The one comparison."""
    try:
        target = os.readlink(link)
    except OSError:
        return False
    return os.path.normpath(os.path.join(os.path.dirname(link), target)) == path


def _links(unit_dir: str, path: str) -> tuple[str, ...]:
    """The ``X.wants`` directories whose link named NAME points at ``path``; a ``.wants``
    that is a symlink is not followed (what it leads to is outside ``unit_dir``)."""
    try:
        entries = sorted(os.listdir(unit_dir))
    except OSError:
        return ()
    return tuple(
        entry.removesuffix(".wants")
        for entry in entries
        if entry.endswith(".wants")
        and not os.path.islink(os.path.join(unit_dir, entry))
        and _points_at(os.path.join(unit_dir, entry, NAME), path)
    )


def _missing_links(unit_dir: str, path: str) -> list[str]:
    """The WANTED_BY links still to make; raises NotManaged, before anything is written,
    when one is in the way (something else at the link's name, or at its ``.wants``)."""
    missing = []
    for wanted_by in WANTED_BY:
        wants = os.path.join(unit_dir, f"{wanted_by}.wants")
        link = os.path.join(wants, NAME)
        # A symlink there would lead the link out of unit_dir (isdir follows it).
        if os.path.islink(wants):
            raise NotManaged(f"{wants} is a symlink; not following it out of {unit_dir}")
        if os.path.lexists(wants) and not os.path.isdir(wants):
            raise NotManaged(f"{wants} is not a directory; not replacing it")
        if _points_at(link, path):
            continue
        if os.path.lexists(link):
            raise NotManaged(f"{link} exists and does not point at {path}; not replacing it")
        missing.append(wanted_by)
    return missing


def _link(unit_dir: str, wanted_by: str, path: str) -> None:
    wants = os.path.join(unit_dir, f"{wanted_by}.wants")
    files.makedirs(wants, DIR_MODE)
    link = os.path.join(wants, NAME)
    try:
        os.symlink(path, link)
    except FileExistsError:
        if _points_at(link, path):
            return  # made meanwhile, as we would have
        raise NotManaged(f"{link} exists and does not point at {path}; not replacing it") from None


def _unit_path(unit_dir: str) -> str:
    """The unit's path in ``unit_dir``; an empty one is refused, never read as the cwd."""
    if not unit_dir:
        raise InvalidSpec("the unit directory must be a path, not an empty string")
    return os.path.join(os.path.abspath(unit_dir), NAME)


def _reload(root_is_live: bool) -> bool:
    """Tell a running systemd to read its units again; False when none runs here."""
    import subprocess

    if not root_is_live or not os.path.isdir(SYSTEMD_RUNNING):
        return False
    done = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True)
    if done.returncode != 0:
        why = " ".join(done.stderr.split()) or f"exit {done.returncode}"
        raise OperationFailed(f"systemctl daemon-reload failed: {why}")
    return True


def install(unit_dir: str = UNIT_DIR) -> Installed:
    """Write the unit (idempotent) and enable it; replace only a unit vhostorch wrote.

    Raises InvalidSpec (an empty directory), NotManaged (someone else's file or link is
    there), OperationFailed (rootcode.refusal: root must not run this interpreter and package).
    """
    path = _unit_path(unit_dir)
    directory = os.path.dirname(path)
    old = _ours(path)
    missing = _missing_links(directory, path)  # all or nothing: refused before any write
    text = unit_text()
    why = rootcode.refusal(sys.executable, rootcode.UNIT_FLAGS)
    if why:
        raise OperationFailed(f"not installing {path}: {why}")
    try:
        if old != text:
            files.makedirs(directory, DIR_MODE)
            files.replace(path, text.encode(), 0o644, durable=True)
        for wanted_by in missing:
            _link(directory, wanted_by, path)
    except OSError as err:
        raise OperationFailed(f"cannot install {path}: {err.strerror or err}") from err
    action: Action
    if old == text:
        action = "updated" if missing else "unchanged"  # re-enabled: a link was missing
    else:
        action = "installed" if old is None else "updated"
    reloaded = _reload(os.path.dirname(path) == UNIT_DIR) if action != "unchanged" else False
    return Installed(path, action, True, reloaded)


def uninstall(unit_dir: str = UNIT_DIR) -> Installed:
    """Disable and remove the unit if vhostorch wrote it (the trace itself stays as it is).

    Raises NotManaged, OperationFailed.
    """
    path = _unit_path(unit_dir)
    directory = os.path.dirname(path)
    present = _ours(path) is not None
    links = _links(directory, path)
    try:
        for wanted_by in links:
            os.unlink(os.path.join(directory, f"{wanted_by}.wants", NAME))
        if present:
            os.unlink(path)
    except OSError as err:
        raise OperationFailed(f"cannot remove {path}: {err.strerror or err}") from err
    action: Action = "removed" if present or links else "absent"
    reloaded = _reload(directory == UNIT_DIR) if action == "removed" else False
    return Installed(path, action, False, reloaded)


def state(unit_dir: str = UNIT_DIR) -> BootState:
    """Whether the unit is there, which ``*.wants/`` link it, and whether its ExecStart runs."""
    path = _unit_path(unit_dir)
    refused = None
    try:
        text = _ours(path)
    except NotManaged as err:
        text, refused = None, str(err).removesuffix("; not replacing it")
    exec_start = None
    for line in (text or "").splitlines():
        if line.startswith("ExecStart="):
            exec_start = line.removeprefix("ExecStart=")
    try:
        program = exec_words(exec_start)[0] if exec_start else ""
    except (ValueError, IndexError):  # unbalanced quotes, or nothing: not a program
        program = ""
    runs = bool(program) and os.access(program, os.X_OK)
    links = _links(os.path.dirname(path), path)
    return BootState(path, text is not None, links, exec_start, runs, refused)
