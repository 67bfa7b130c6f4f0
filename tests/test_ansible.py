"""The Ansible collection (ansible/) with real ansible-core: playbooks against localhost over
the local connection, the modules running with this virtualenv's Python (which has vhostorch).

On this machine the role runs with its libvirt files pointed into a temporary directory
(hooks, a copy of qemu.conf) and without restarting libvirtd (there is no service manager
here); in the test host it runs on the real files. Every test ends with nothing left.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from tests import guests, kernel
from vhostorch import taps
from vhostorch.check import wiring
from vhostorch.kernel import procfs
from vhostorch.vm import state as vmstate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE_0_1 = "740c2ef"  # the last commit of vhostorch 0.1.0
COLLECTION = os.path.join(REPO, "ansible")
BIN = os.path.dirname(sys.executable)
RECAP = re.compile(
    r"localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)"
)


class Ansible:
    """ansible-playbook with the collection from this checkout."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(os.path.join(root, "ansible_collections", "vhostorch"))
        os.symlink(COLLECTION, os.path.join(root, "ansible_collections", "vhostorch", "vhost"))
        self.env = {
            **os.environ,
            "ANSIBLE_COLLECTIONS_PATH": root,
            "ANSIBLE_HOME": os.path.join(root, "home"),
            "ANSIBLE_LOCAL_TEMP": os.path.join(root, "tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_PIPELINING": "1",  # one Python per task, no module file copied first
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        }

    def play(self, text: str, *args: str) -> tuple[int, str, dict[str, int]]:
        path = os.path.join(self.root, f"play-{kernel.unique('p')}.yml")
        with open(path, "w") as f:
            f.write(text)
        done = subprocess.run(
            [os.path.join(BIN, "ansible-playbook"), "-i", "localhost,", "-c", "local",
             "-e", f"ansible_python_interpreter={sys.executable}", path, *args],
            capture_output=True, text=True, env=self.env, timeout=600,
        )  # fmt: skip
        found = RECAP.search(done.stdout)
        recap = {}
        if found:
            recap = dict(zip(("ok", "changed", "unreachable", "failed", "skipped"),
                             map(int, found.groups()), strict=True))  # fmt: skip
        return done.returncode, done.stdout + done.stderr, recap


@pytest.fixture
def ansible() -> Iterator[Ansible]:
    root = tempfile.mkdtemp(prefix="vho-ansible-")
    os.chmod(root, 0o755)
    yield Ansible(root)
    subprocess.run(["rm", "-rf", root], check=False)


def vm_task(name: str, tap: str, vhost: str, accel: str, extra: str = "") -> str:
    img = guests.image()
    return f"""
    - name: The VM
      vhostorch.vhost.vm:
        name: {name}
        accel: {accel}
        memory: 256
        kernel: {img.kernel}
        initrd: {img.guest_initrd}
        cmdline: "{guests.GUEST_APPEND}"
        nics:
          - {{tap: {tap}, vhost: {vhost}, queues: 2}}
{extra}      register: vm
"""


LIBVIRT = "        backend: libvirt\n"


def teardown(ansible: Ansible, vm: str, taps_: list[tuple[str, str | None]]) -> None:
    tasks = f"    - vhostorch.vhost.vm: {{name: {vm}, state: absent}}\n"
    for tap, ns in taps_:
        netns = f", netns: {ns}" if ns else ""
        tasks += f"    - vhostorch.vhost.tap: {{name: {tap}, state: absent{netns}}}\n"
    code, out, _ = ansible.play(f"- hosts: localhost\n  gather_facts: false\n  tasks:\n{tasks}")
    assert code == 0, out[-2000:]


def test_role_tap_and_vm_converge_and_check_mode_changes_nothing(ansible: Ansible, ns: str) -> None:
    vm, vm_tap, tap = kernel.unique("vho-av"), kernel.unique("va"), kernel.unique("vt")
    hooks = os.path.join(ansible.root, "hooks")
    conf = os.path.join(ansible.root, "qemu.conf")
    subprocess.run(["cp", "/etc/libvirt/qemu.conf", conf], check=True)
    with open(conf, "rb") as f:
        original = f.read()
    play = f"""
- hosts: localhost
  gather_facts: false
  roles:
    - role: vhostorch.vhost.vhost_host
      vars:
        vhost_host_require_vhost: false
        vhost_host_hooks_dir: {hooks}
        vhost_host_qemu_conf: {conf}
        vhost_host_restart_libvirtd: false
        vhost_host_vhostorch_command: {BIN}/vhostorch
  tasks:
    - name: A 4-queue tap in a namespace
      vhostorch.vhost.tap: {{name: {tap}, queues: 4, mtu: 9000, netns: {ns}}}
{vm_task(vm, vm_tap, "preferred", "tcg")}
    - name: Its check (TCG here, so vhost fell back - warnings, no failure)
      vhostorch.vhost.check: {{pid: "{{{{ vm.vm.pid }}}}"}}
      register: checked
      when: not ansible_check_mode
    - name: The check says why
      ansible.builtin.assert:
        that:
          - checked.ok
          - checked.reports[0].checks | selectattr('id', 'equalto', 'nic.vhost.requested')
            | map(attribute='status') | list == ['warn']
      when: not ansible_check_mode
    - name: Strictly, the fallback is a failure, reported without failing when asked
      vhostorch.vhost.check: {{pid: "{{{{ vm.vm.pid }}}}", strict: true, fail_on_check: false}}
      register: strictly
      when: not ansible_check_mode
    - name: And it fails the task otherwise
      vhostorch.vhost.check: {{pid: "{{{{ vm.vm.pid }}}}", strict: true}}
      register: failing
      ignore_errors: true
      when: not ansible_check_mode
    - name: Both say so
      ansible.builtin.assert:
        that:
          - not strictly.ok and strictly is not failed
          - failing is failed and 'vhost check failed for QEMU pid' in failing.msg
      when: not ansible_check_mode
"""
    try:
        code, out, recap = ansible.play(play, "--check", "--diff")
        assert code == 0 and recap["failed"] == 0, out[-3000:]
        assert '+    "queue_mode": "multi"' in out, out[-3000:]  # the tap's diff
        assert recap["changed"] >= 3  # qemu.conf, tap, VM would change (the hook task is a command)
        assert taps.show(netns=ns) == [] and vmstate.load(vm) is None
        assert not os.path.exists(hooks)
        with open(conf, "rb") as f:
            assert f.read() == original

        code, out, recap = ansible.play(play)
        assert code == 0 and recap["failed"] == 0, out[-3000:]
        assert recap["changed"] >= 4, out[-3000:]  # hook, qemu.conf, tap, VM
        [made] = taps.show(tap, netns=ns)
        assert (made.queue_mode, made.mtu) == ("multi", 9000)
        state = vmstate.load(vm)
        assert state is not None and procfs.alive(state.pid)
        assert os.access(os.path.join(hooks, "qemu.d", "vhostorch"), os.X_OK)
        with open(conf) as f:
            assert '"/dev/vhost-net"' in f.read()

        code, out, recap = ansible.play(play)
        assert code == 0 and recap["changed"] == 0 and recap["failed"] == 0, out[-3000:]
        assert vmstate.load(vm) == state  # the same VM, not restarted
    finally:
        teardown(ansible, vm, [(tap, ns)])
    assert taps.show(netns=ns) == [] and vmstate.load(vm) is None
    assert not os.path.exists(f"/sys/class/net/{vm_tap}")


BAD = {
    "unknown option": (
        "vhostorch.vhost.tap: {name: TAP, colour: red}",
        "Unsupported parameters for (vhostorch.vhost.tap) module: colour",
    ),
    "bad queues": (
        "vhostorch.vhost.tap: {name: TAP, queues: 0}",
        "queues 0 is out of range 1..256",
    ),
    "bad vhost mode": (
        "vhostorch.vhost.vm: {name: VM, kernel: /k, nics: [{tap: TAP, vhost: sometimes}]}",
        "vhost must be one of: required, preferred, off",
    ),
    "vhost required here": ("", "cannot be had: this host has no usable /dev/vhost-net"),
    "not a QEMU": ("vhostorch.vhost.check: {pid: PID}", "is not a QEMU (it runs python"),
    "two targets": ("vhostorch.vhost.check: {pid: 1, all: true}", "mutually exclusive"),
}


def test_a_host_without_the_library_is_told_so(ansible: Ansible) -> None:
    # Debian's own Python: it can run modules, and has no vhostorch.
    code, out, recap = ansible.play(
        "- hosts: localhost\n  gather_facts: false\n  tasks:\n"
        "    - vhostorch.vhost.check: {all: true}\n",
        "-e", "ansible_python_interpreter=/usr/bin/python3",
    )  # fmt: skip
    assert code != 0 and recap.get("failed") == 1, out[-3000:]
    assert "Failed to import the required Python library (vhostorch)" in out, out[-3000:]


def test_a_host_with_another_release_of_the_library_is_told_so(ansible: Ansible) -> None:
    # The library as released before 0.2 (modules not yet in packages), from this history.
    old = os.path.join(ansible.root, "old")
    os.makedirs(old)
    subprocess.run(f"git -C {REPO} archive {RELEASE_0_1} vhostorch | tar -x -C {old}",
                   shell=True, check=True)  # fmt: skip
    ansible.env["PYTHONPATH"] = old  # ahead of this virtualenv's vhostorch
    code, out, recap = ansible.play(
        "- hosts: localhost\n  gather_facts: false\n  tasks:\n"
        "    - vhostorch.vhost.check: {all: true}\n"
    )
    assert code != 0 and recap.get("failed") == 1, out[-3000:]
    assert (
        "vhostorch 0.1.0 is on the managed host, and this collection drives vhostorch 0.2.x" in out
    )
    assert "Traceback" not in out


def test_the_collection_and_the_library_are_one_release() -> None:
    import vhostorch

    with open(os.path.join(COLLECTION, "galaxy.yml")) as f:
        galaxy = re.search(r"^version: (\S+)$", f.read(), re.M)
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        project = re.search(r'^version = "(\S+)"$', f.read(), re.M)
    assert galaxy and project
    assert galaxy.group(1) == project.group(1) == vhostorch.__version__
    common = os.path.join(COLLECTION, "plugins", "module_utils", "common.py")
    with open(common) as f:
        library = re.search(r"^LIBRARY = \((\d+), (\d+)\)$", f.read(), re.M)
    assert library and ".".join(library.groups()) == ".".join(vhostorch.__version__.split(".")[:2])


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_argument_fails_clearly_and_leaves_nothing(ansible: Ansible, case: str) -> None:
    vm, tap = kernel.unique("vho-ab"), kernel.unique("vb")
    task, message = BAD[case]
    if task:
        task = task.replace("TAP", tap).replace("VM", vm).replace("PID", str(os.getpid()))
        body = f"    - name: {case}\n      {task}\n"
    else:  # this machine has no usable /dev/vhost-net
        body = vm_task(vm, tap, "required", "kvm")
    code, out, recap = ansible.play(f"- hosts: localhost\n  gather_facts: false\n  tasks:\n{body}")
    assert code != 0 and recap.get("failed") == 1, out[-3000:]
    assert message in out, out[-3000:]
    assert "Traceback" not in out
    assert not os.path.exists(f"/sys/class/net/{tap}") and vmstate.load(vm) is None


def test_ansible_lint_is_clean() -> None:
    done = subprocess.run(
        [os.path.join(BIN, "ansible-lint"), "--offline", "--profile", "production"],
        cwd=COLLECTION, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
             "NO_COLOR": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_every_module_and_the_role_document_themselves(ansible: Ansible) -> None:
    for name in ("tap", "vm", "check"):
        done = subprocess.run(
            [os.path.join(BIN, "ansible-doc"), "--json", f"vhostorch.vhost.{name}"],
            capture_output=True, text=True, env=ansible.env,
        )  # fmt: skip
        assert done.returncode == 0 and '"examples"' in done.stdout and '"return"' in done.stdout
    done = subprocess.run([os.path.join(BIN, "ansible-doc"), "-t", "role",
                           "vhostorch.vhost.vhost_host"], capture_output=True, text=True,
                          env=ansible.env)  # fmt: skip
    assert done.returncode == 0 and "vhost_host_require_vhost" in done.stdout


@pytest.mark.testhost
@pytest.mark.timeout(600)  # ansible-playbook starts a Python per task: ~3 min under nested TCG
def test_role_and_vhost_vms_pass_the_check_in_the_test_host(
    ansible: Ansible, libvirtd: str
) -> None:
    vm, tap = kernel.unique("vho-at"), kernel.unique("vt")
    domain, domain_tap = kernel.unique("vho-ad"), kernel.unique("vd")
    was_armed = wiring.armed()  # starting a VM arms the wiring trace host-wide
    with open("/etc/libvirt/qemu.conf", "rb") as f:
        conf = f.read()
    play = f"""
- hosts: localhost
  gather_facts: false
  roles:
    - role: vhostorch.vhost.vhost_host
      vars:
        vhost_host_install_packages: false  # apt is exercised here, on this machine; slow there
        vhost_host_restart_libvirtd: false
        vhost_host_vhostorch_command: {BIN}/vhostorch
  tasks:
{vm_task(vm, tap, "required", "kvm")}
    - name: Every NIC and queue of it passes, strictly
      vhostorch.vhost.check: {{pid: "{{{{ vm.vm.pid }}}}", strict: true}}
      register: checked
{vm_task(domain, domain_tap, "required", "kvm", LIBVIRT)}
    - name: The libvirt domain passes too (checked by name)
      vhostorch.vhost.check: {{domain: {domain}}}
    - name: Show the verdicts
      ansible.builtin.debug:
        msg: "{{{{ checked.reports[0].checks | map(attribute='status') | list }}}}"
"""
    try:
        code, out, recap = ansible.play(play)
        assert code == 0 and recap["failed"] == 0, out[-4000:]
        print(f"\nansible in the test host: {recap}")
    finally:
        teardown(ansible, vm, [])
        teardown(ansible, domain, [])
        subprocess.run([f"{BIN}/vhostorch", "hook", "uninstall"], capture_output=True, check=False)
        with open("/etc/libvirt/qemu.conf", "wb") as f:
            f.write(conf)
        if not was_armed:
            wiring.disarm()
    for name, nic in ((vm, tap), (domain, domain_tap)):
        assert vmstate.load(name) is None and not os.path.exists(f"/sys/class/net/{nic}")
