"""scripts/setup.sh installs prometheus and prometheus-node-exporter with their services kept
stopped: a policy-rc.d that denies (exit 101, policy-rc.d(8)) is there during that install only,
removed after it whether apt-get succeeded, failed or was interrupted, and one already there is
never overwritten.

setup.sh's own block runs, as written, in a mount namespace whose /usr/sbin is an empty
directory of the test's (this machine has a policy-rc.d of its own, which must stay), with
stand-ins for dpkg-query (the packages missing) and apt-get (which runs the policy as
invoke-rc.d would and records its answer): nothing is installed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel  # root: a mount namespace

SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup.sh"
FAKE_APT = """#!/bin/bash
[[ $1 == install ]] || exit 0
policy=/usr/sbin/policy-rc.d
if [[ -x $policy ]]; then "$policy" prometheus start; echo "policy $?" >>"$LOG"
else echo "no policy" >>"$LOG"; fi
[[ ${APT_HANGS:-} ]] && { echo started >>"$LOG"; sleep 60; }
exit "${APT_EXIT:-0}"
"""


def services_block() -> str:
    found = re.search(r"^services=\(.*?^fi\n", SETUP.read_text(), re.M | re.S)
    assert found is not None
    return found.group(0)


def prepare(tmp: Path, existing: str | None = None) -> str:
    """setup.sh's block, to run with /usr/sbin the test's ``tmp/sbin`` (holding ``existing``
    as its policy-rc.d) and the stand-ins first on PATH."""
    sbin, bin_ = tmp / "sbin", tmp / "bin"
    sbin.mkdir()
    bin_.mkdir()
    if existing is not None:
        (sbin / "policy-rc.d").write_text(existing)
        (sbin / "policy-rc.d").chmod(0o755)
    (bin_ / "apt-get").write_text(FAKE_APT)
    (bin_ / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")  # nothing installed
    for tool in ("apt-get", "dpkg-query"):
        (bin_ / tool).chmod(0o755)
    (tmp / "apt.log").touch()
    return f"""set -euo pipefail
mount --bind {sbin} /usr/sbin
export PATH={bin_}:/usr/bin:/bin LOG={tmp / "apt.log"}
{services_block()}"""


def run(tmp: Path, existing: str | None = None, **env: str) -> tuple[int, str, str | None]:
    """The block's exit code, what apt-get saw, and what /usr/sbin/policy-rc.d holds after
    (None: absent)."""
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", prepare(tmp, existing)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    policy = tmp / "sbin" / "policy-rc.d"
    return (
        done.returncode,
        (tmp / "apt.log").read_text(),
        policy.read_text() if policy.exists() else None,
    )


def test_the_services_are_denied_during_the_install_and_the_policy_removed(tmp_path: Path) -> None:
    code, seen, left = run(tmp_path)
    assert code == 0 and seen == "policy 101\n" and left is None


def test_a_failed_install_removes_the_policy_too(tmp_path: Path) -> None:
    code, seen, left = run(tmp_path, APT_EXIT="100")
    assert code == 100 and seen == "policy 101\n" and left is None


def test_an_interrupted_install_removes_the_policy_too(tmp_path: Path) -> None:
    """Ctrl-C while apt-get runs: SIGINT to the whole foreground process group."""
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", prepare(tmp_path)],
        env={"APT_HANGS": "1"}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    log, policy = tmp_path / "apt.log", tmp_path / "sbin" / "policy-rc.d"
    try:
        deadline = time.monotonic() + 30
        while "started" not in log.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert policy.exists()  # there while apt-get runs
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # the group this test started (its own session)
        code = proc.wait(timeout=90)
    assert code == 130 and not policy.exists()


def test_a_policy_already_there_is_left_as_it_is(tmp_path: Path) -> None:
    mine = "#!/bin/sh\n# the container's own\nexit 101\n"
    code, seen, left = run(tmp_path, existing=mine)
    assert code == 0 and seen == "policy 101\n" and left == mine
