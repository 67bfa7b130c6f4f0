"""`vhostorch hook install|uninstall`: the libvirt hook's file in qemu.d."""

from __future__ import annotations

from vhostorch.cli.argv import PATH, VALUE, Command, Option, Parsed
from vhostorch.cli.output import JSON, emit
from vhostorch.errors import EXIT_OK

HOOK_EXIT_CODES = """libvirt looks for hooks when it starts: restart libvirtd (or virtqemud) after
installing or removing one. An existing /etc/libvirt/hooks/qemu is left alone (libvirt
runs it, then qemu.d/* in name order). What the hook does: pydoc vhostorch.hook.

exit codes:
  0  done, or nothing to do
  1  a file of that name exists that vhostorch did not install (left as it is), or the
     hook would make root run an interpreter or package others can change (doctor says which)
  2  bad usage"""

HOOK_NAME = Option("--name", VALUE, "file name in qemu.d (default vhostorch)")
HOOKS_DIR = Option("--hooks-dir", PATH, "libvirt's hook directory (default /etc/libvirt/hooks)")

COMMANDS = (
    Command(
        ("hook", "install"),
        "install the libvirt hook (qemu.d/NAME): domains' declared taps, vhost check at start",
        "",
        "0",
        (HOOK_NAME, HOOKS_DIR, JSON),
        HOOK_EXIT_CODES,
    ),
    Command(
        ("hook", "uninstall"),
        "remove the libvirt hook vhostorch installed",
        "",
        "0",
        (HOOK_NAME, HOOKS_DIR, JSON),
        HOOK_EXIT_CODES,
    ),
)


def _hook(args: Parsed) -> int:
    from vhostorch.hook import install

    name, given = args.text("name"), args.text("hooks_dir")
    name = install.DEFAULT_NAME if name is None else name
    hooks_dir = install.HOOKS_DIR if given is None else given
    if args.command.path[1] == "install":
        done = install.install(name, hooks_dir)
        restart = "restart libvirtd (or virtqemud) so that it runs the hook"
    else:
        done = install.uninstall(name, hooks_dir)
        restart = "restart libvirtd (or virtqemud) so that it stops looking for it"
    text = f"{done.path}: {done.action}"
    if done.action in ("installed", "removed"):
        text += f"; {restart}"
    if done.other_hooks:
        text += f"\nother qemu hooks, left as they are: {', '.join(done.other_hooks)}"
    emit({"ok": True, **done.asdict()}, args.flag("json"), text)
    return EXIT_OK


HANDLERS = {"hook": _hook}
