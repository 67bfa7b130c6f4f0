"""The shipped metrics timer and alerting rules (deploy/), and Debian's real Prometheus and
node_exporter started on loopback for a test: the timer's command line as its unit says,
each daemon started and ended by pid, and Prometheus' HTTP API read with urllib."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
SERVICE = SYSTEMD / "vhostorch-metrics.service"
TIMER = SYSTEMD / "vhostorch-metrics.timer"
RULES = ROOT / "deploy" / "prometheus" / "vhostorch.rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "vhostorch.rules.test.yml"
# Debian's prometheus-node-exporter reads its textfiles there (the unit's default).
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
TEXTFILE = "vhostorch.prom"
NODE_EXPORTER = "prometheus-node-exporter"  # Debian's name for node_exporter


def unit_values(path: Path, key: str) -> list[str]:
    """Every value of ``key=`` in a unit file (comments skipped)."""
    found = []
    for line in path.read_text().splitlines():
        name, eq, value = line.partition("=")
        if eq and not line.startswith("#") and name == key:
            found.append(value)
    return found


def with_program(text: str, program: str) -> str:
    """A unit's text with ``program`` for the bare ``vhostorch`` its Exec*= lines run (after
    their prefixes: ``-`` and the like), as the Ansible role puts its command there."""
    return re.sub(r"(?m)^(Exec[A-Za-z]*=[-@:+!]*)vhostorch ", rf"\g<1>{program} ", text)


def timer_command(program: str, directory: str) -> list[str]:
    """The service's ExecStart as systemd splits it, with its program and textfile directory
    replaced: the command line the timer runs, for this checkout's vhostorch and a test's
    directory."""
    [start] = unit_values(SERVICE, "ExecStart")
    words = shlex.split(start)
    output = words.index("--output") + 1
    assert words[output] == f"{TEXTFILE_DIR}/{TEXTFILE}", words
    words[0] = program
    words[output] = os.path.join(directory, TEXTFILE)
    return words


def readme_alert() -> dict[str, Any]:
    """The alert the README shows, as Prometheus' /api/v1/alerts returns it."""
    text = (ROOT / "README.md").read_text()
    [block] = [
        b for b in re.findall(r"^```json\n(.*?)^```$", text, re.M | re.S) if "Vhostorch" in b
    ]
    shown: dict[str, Any] = json.loads(block)
    return shown


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the daemon binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_until(what: str, found: Any, timeout: float, log: Path | None = None) -> Any:
    """``found()`` once truthy, polled every 0.2 s; fails after ``timeout`` seconds, with the
    daemon's log when one is given."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = found()
        except OSError:
            value = None  # not listening yet
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"no {what} within {timeout} s\n{tail}")
        time.sleep(0.2)


@contextmanager
def daemon(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` running, its output in ``log``; ended by its pid (TERM, then KILL)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Stack:
    """node_exporter serving ``textfiles`` and a Prometheus scraping it every second with the
    shipped rules, both on 127.0.0.1."""

    def __init__(self, work: Path, textfiles: Path) -> None:
        self.work = work
        self.textfiles = textfiles
        self.node_port = free_port()
        self.prom_port = free_port()
        self.api = f"http://127.0.0.1:{self.prom_port}/api/v1"

    def node_exporter_argv(self) -> list[str]:
        return [
            NODE_EXPORTER, "--collector.disable-defaults", "--collector.textfile",
            f"--collector.textfile.directory={self.textfiles}",
            f"--web.listen-address=127.0.0.1:{self.node_port}",
        ]  # fmt: skip

    def prometheus_argv(self) -> list[str]:
        config = self.work / "prometheus.yml"
        # JSON is YAML: the shipped rules file as it is, scraped and evaluated every second.
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {
                            "job_name": "node",
                            "static_configs": [{"targets": [f"127.0.0.1:{self.node_port}"]}],
                        }
                    ],
                }
            )
        )
        return [
            "prometheus", f"--config.file={config}",
            f"--storage.tsdb.path={self.work / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.prom_port}",
        ]  # fmt: skip

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = get(f"{self.api}/query?" + urllib.parse.urlencode({"query": promql}))
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        answer = get(f"{self.api}/alerts")
        assert answer["status"] == "success", answer
        found: list[dict[str, Any]] = answer["data"]["alerts"]
        return found

    def rules_loaded(self) -> bool:
        groups = get(f"{self.api}/rules")["data"]["groups"]
        return any(g["name"] == "vhostorch" and g["file"] == str(RULES) for g in groups)

    @contextmanager
    def running(self) -> Iterator[None]:
        with (
            daemon(self.node_exporter_argv(), self.work / "node_exporter.log"),
            daemon(self.prometheus_argv(), self.work / "prometheus.log"),
        ):
            log = self.work / "prometheus.log"
            wait_until("Prometheus ready", self.rules_loaded, 60, log)
            up = 'up{job="node"} == 1'
            wait_until("node_exporter scraped", lambda: self.query(up), 60, log)
            yield


# The service's sandboxing directives that hardened_argv reproduces, and those it leaves out,
# which restrict no file, capability or device check reads (said per directive).
EMULATED = {"CapabilityBoundingSet", "NoNewPrivileges"}
NOT_EMULATED = {
    "RestrictAddressFamilies": "a seccomp filter on socket(); check opens AF_UNIX and AF_NETLINK",
    "RestrictRealtime": "realtime scheduling, never asked",
    "RestrictSUIDSGID": "making set-uid files",
    "LockPersonality": "personality(2)",
    "SystemCallArchitectures": "non-native system calls",
    "UMask": "the mode of files made; --output sets 0644 itself",
}
# The service's directives that are not sandboxing.
UNSANDBOXING = {
    "Description", "After", "Type", "ExecStartPre", "ExecStart", "SuccessExitStatus",
    "TimeoutStartSec", "Nice",
}  # fmt: skip


def directives(path: Path) -> list[str]:
    return [
        line.partition("=")[0]
        for line in path.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    ]


def hardened_argv(argv: list[str]) -> list[str]:
    """``argv`` under what the service's sandboxing does to a root process, without systemd
    as PID 1: setpriv's capability bounding set (CapabilityBoundingSet=) and no_new_privs.
    Root's capabilities after exec are its bounding set, as under systemd."""
    unknown = set(directives(SERVICE)) - EMULATED - set(NOT_EMULATED) - UNSANDBOXING
    assert not unknown, f"say how the test emulates {unknown}, or why it need not"
    [caps] = unit_values(SERVICE, "CapabilityBoundingSet")
    bounding = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps.split())])
    return ["setpriv", "--no-new-privs", f"--bounding-set={bounding}", "--", *argv]
