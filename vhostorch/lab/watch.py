"""Whether the test host is still alive, and once it is not, what its last state says.

Nothing inside a stopped test host can report, so there are two witnesses outside it:

- the serial console, where the kernel's lockup detector names a CPU stuck in the
  kernel (``lockup``, ``frozen``): this needs another CPU still running;
- a heartbeat the test host writes every few seconds into its results directory
  (see files/stage2): when no CPU runs at all, nothing is printed, and only the
  heartbeat's silence tells (``Heartbeat``). QEMU's monitor then shows each CPU's
  last state (``monitor_evidence``, condensed by ``stall_evidence``).
"""

from __future__ import annotations

import re

from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

# A CPU stuck this long in the kernel under TCG is a deadlock, not slowness: the
# slowest step seen in a healthy test host keeps a CPU busy for seconds, and a
# frozen one was seen stuck for 20 minutes (then only the timeout stopped it).
FROZEN_AFTER = 180
# The heartbeat is written every 5 s. Over about 230 rounds of `up`/`down` in test hosts
# sharing two cores (two to four at a time), no healthy one went 45 s without it; a
# stalled one stays silent until the timeout.
STALLED_AFTER = 90
HEARTBEAT = "heartbeat"

_LOCKUP = re.compile(r"soft lockup - CPU#(\d+) stuck for (\d+)s! \[(.*)\]")
_STAMP = re.compile(r"^\[\s*[\d.]+\] ")
_TASK = re.compile(r"^CPU: (\d+) PID: (\d+) Comm: (\S+)")
_FRAME = re.compile(r"^(\? )?([\w.]+)\+0x[0-9a-f]+/0x[0-9a-f]+")
# HMP `info registers -a` and `info lapic N`, as QEMU 7.2 prints them.
_CPU = re.compile(r"^CPU#(\d+)$", re.M)
_RIP = re.compile(r"^RIP=([0-9a-f]+) RFL=([0-9a-f]+) .*HLT=(\d)", re.M)
_TIMER = re.compile(r"^LVTT\s+0x([0-9a-f]+).*?(one-shot|periodic)", re.M)
_COUNT = re.compile(r"current_count = (\d+)")
_VECTORS = re.compile(r"^(ISR|IRR)\s+(.*)$", re.M)
_PPR = re.compile(r"PPR 0x([0-9a-f]+)")
_IF = 0x200  # RFLAGS.IF
_MASKED = 0x10000  # LVT mask bit


def lockup(console: str, cpus: int) -> str | None:
    """The first soft lockup of ``console`` (a kernel log) condensed, or None if there is none.

    One line per CPU whose stack the kernel printed (the stuck one, then the others,
    since the test host boots with softlockup_all_cpu_backtrace): where it ran and
    its innermost reliable frames. A CPU that printed nothing could not take even an
    NMI, which is itself the finding.
    """
    lines = [_STAMP.sub("", line).strip() for line in console.splitlines()]
    first = next((i for i, line in enumerate(lines) if _LOCKUP.search(line)), None)
    if first is None:
        return None
    found = _LOCKUP.search(lines[first])
    assert found is not None
    cpu, seconds, task = found.groups()
    stacks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines[first + 1 : first + 400]:
        if _LOCKUP.search(line):
            break  # the next report repeats the first
        if task_line := _TASK.match(line):
            current = stacks.setdefault(f"CPU {task_line[1]} {task_line[3]}:{task_line[2]}", [])
        elif current is not None and line.startswith("RIP: 0010:"):
            current.append(line.removeprefix("RIP: 0010:").split("+")[0])
        elif current is not None and (frame := _FRAME.match(line)) and not frame[1]:
            current.append(frame[2])
    told = [f"{who}: {' < '.join(frames[:8]) or 'no frames'}" for who, frames in stacks.items()]
    silent = [c for c in range(cpus) if not any(k.startswith(f"CPU {c} ") for k in stacks)]
    told += [f"CPU {c}: no backtrace (not even an NMI got through)" for c in silent]
    return f"soft lockup, CPU#{cpu} stuck for {seconds}s [{task}]; " + "; ".join(told)


def frozen(console: str) -> bool:
    """True once the kernel says a CPU has been stuck for FROZEN_AFTER seconds or more."""
    return any(int(m[2]) >= FROZEN_AFTER for m in _LOCKUP.finditer(console))


class Heartbeat:
    """How long the test host's heartbeat file has kept the same content, by this
    machine's clock (the test host's own clock stops with it)."""

    def __init__(self, path: str, now: float) -> None:
        self.path = path
        self.seen = ""
        self.changed = now

    def silent_for(self, now: float) -> float:
        try:
            with open(self.path) as f:
                text = f.read()
        except OSError:
            text = ""  # not written yet: silent since the clock started
        if text != self.seen:
            self.seen, self.changed = text, now
        return now - self.changed


def _vectors(text: str) -> list[int]:
    return [int(v) for v in text.split() if v.isdigit()]


def _listed(vectors: list[int]) -> str:
    return " ".join(str(v) for v in vectors) or "none"


def stall_evidence(registers: str, lapics: dict[int, str], running: bool = True) -> str:
    """Each CPU's state from HMP ``info registers -a`` and ``info lapic N``, in one line.

    Names the failure when the state shows it: a CPU halted with interrupts on while
    its LAPIC holds an interrupt it may take (IRR above the processor priority, none
    in service) was never told about it. That is a lost wakeup in the emulator, not
    anything the guest did: QEMU 7.2 loses one now and then (see lab.qemu_command).
    Not while the emulator is stopped (``running`` False: QMP ``stop``): its timer still
    raises interrupts that no CPU may take then (under CI's load one came in before the
    look, and a stop was called a lost wakeup).
    """
    registers = registers.replace("\r\n", "\n")  # HMP over QMP ends lines with CRLF
    lapics = {cpu: text.replace("\r\n", "\n") for cpu, text in lapics.items()}
    told: list[str] = []
    lost: list[int] = []
    starts = [(m.start(), int(m[1])) for m in _CPU.finditer(registers)]
    for index, (start, cpu) in enumerate(starts):
        end = starts[index + 1][0] if index + 1 < len(starts) else len(registers)
        regs = _RIP.search(registers, start, end)
        if regs is None:
            told.append(f"CPU {cpu}: no registers")
            continue
        halted, irq_on = regs[3] == "1", bool(int(regs[2], 16) & _IF)
        state = f"CPU {cpu}: {'halted' if halted else 'running'}"
        state += f", interrupts {'on' if irq_on else 'off'}, RIP {regs[1]}"
        lapic = lapics.get(cpu, "")
        if timer := _TIMER.search(lapic):
            count = _COUNT.search(lapic)
            armed = not int(timer[1], 16) & _MASKED and count is not None and count[1] != "0"
            state += f"; LAPIC timer {timer[2]} {'armed' if armed else 'not armed'}"
        found = dict(_VECTORS.findall(lapic))
        irr, isr = _vectors(found.get("IRR", "")), _vectors(found.get("ISR", ""))
        if "IRR" in found:
            state += f", IRR {_listed(irr)}, ISR {_listed(isr)}"
        ppr = _PPR.search(lapic)
        takes = irr and not isr and ppr and max(irr) >> 4 > int(ppr[1], 16) >> 4
        if running and halted and irq_on and takes:
            lost.append(cpu)
        told.append(state)
    if not told:
        return "no CPU state from the monitor"
    verdict = ""
    if lost:
        cpus = ", ".join(str(c) for c in lost)
        verdict = (
            f"a lost wakeup: CPU {cpus} halted with interrupts on and an interrupt pending "
            "that it was never woken for (the emulator's fault; see lab.qemu_command); "
        )
    return verdict + "; ".join(told)


def monitor_evidence(execute: Callable[[str], str], cpus: int) -> str:
    """stall_evidence from a live monitor; ``execute`` runs one HMP command line."""
    running = "running" in execute("info status")  # "VM status: running" / "...: paused"
    registers = execute("info registers -a")
    lapics = {c: execute(f"info lapic {c}") for c in range(cpus)}
    return stall_evidence(registers, lapics, running)
