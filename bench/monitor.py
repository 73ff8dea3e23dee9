"""Resource use of a process tree (a command and everything it starts: Ray's raylet, workers, actors).

A background thread samples the tree with psutil: resident memory summed over the live processes (RSS, and
PSS, which counts shared pages once), and CPU time per process, kept after a process exits and split by role
(the process title: `ray::MapBatches(featurize)`, `ray::MapWorker(...)`, `raylet`, the driver `ser`, ...).
CPU time the rest of the machine used meanwhile (less this monitor's own, the kernel's threads' and the
interrupt handlers') is reported too, so figures taken on a busy machine are flagged.

On Linux the monitoring process becomes a child subreaper: a process of the tree whose parent exits first (Ray's
daemons and workers once the driver is gone) is re-parented to it instead of to init, stays in the sampled tree,
and is reaped here, so its CPU up to its exit is counted exactly rather than lost after its last sample.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import psutil

SAMPLE_SECONDS = 0.5  # the monitor costs about 1% of one core at this rate
PSS_EVERY = 4  # PSS (a read of smaps_rollup per process, costly) on every 4th sample only
PYTHON_NAMES = ("python", "python3", "python3.11")
BUSY_MACHINE = 0.05  # other processes using more than 5% of the cores: the figures are not trustworthy
PR_SET_CHILD_SUBREAPER = 36  # prctl(2) option: orphans below this process are re-parented to it, not to init
ORPHAN_GRACE_SECONDS = 10.0  # how long to wait, after the command, for its adopted orphans to finish exiting


@dataclass(frozen=True)
class Usage:
    """What a process tree used while it ran."""

    wall_s: float
    cpu_s: float
    cpu_utilisation: float  # tree CPU seconds / (wall seconds * cores)
    other_cpu_utilisation: float  # the same for every process outside the tree
    kernel_cpu_utilisation: float  # the same for kernel threads and interrupt handling (not counted as other)
    peak_rss_bytes: int
    peak_pss_bytes: int
    peak_processes: int
    cpu_s_by_role: dict[str, float] = field(default_factory=dict)

    @property
    def contended(self) -> bool:
        return self.other_cpu_utilisation > BUSY_MACHINE

    def to_dict(self) -> dict:
        return {**asdict(self), "contended": self.contended}


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle since boot, steal (the hypervisor giving this VM's
    cores to others: real contention) included; guest time is inside user and nice already."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - sum(getattr(times, name, 0.0) for name in ("iowait", "guest", "guest_nice"))


def interrupt_seconds() -> float:
    """CPU seconds spent in interrupt handlers since boot. Most of it is softirq network processing, which
    Linux charges to no process: on loopback that is Ray's own RPC and object transfers, so it belongs to
    the measured tree rather than to another workload."""
    times = psutil.cpu_times()
    return getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)


def kernel_thread_seconds() -> float:
    """CPU seconds used so far by the kernel's own threads (kthreadd and its children: page reclaim, memory
    monitoring such as kdamond, workqueues). They work for every process, the measured tree first of all,
    so they are not another workload competing with it."""
    total = 0.0
    for proc in psutil.process_iter(["pid", "ppid", "cpu_times"]):
        if proc.info["cpu_times"] and (proc.info["pid"] == 2 or proc.info["ppid"] == 2):
            total += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return total


def kernel_seconds() -> float:
    """CPU seconds of kernel work done for whoever runs: the kernel's threads and the interrupt handlers."""
    return kernel_thread_seconds() + interrupt_seconds()


def reaped_seconds() -> float:
    """CPU seconds of this process's children that have exited and been waited for, with their own reaped ones."""
    times = psutil.Process().cpu_times()
    return times.children_user + times.children_system


def become_subreaper() -> bool:
    """Make this process adopt the orphans of its descendants (Linux only); whether it now does."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def cpu_with_reaped_children(proc: psutil.Process) -> float:
    """A live process's CPU seconds with those of the children it has reaped (gone from every sample);
    0 once it has exited."""
    try:
        times = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return 0.0
    return times.user + times.system + times.children_user + times.children_system


def role(command: list[str]) -> str:
    """A short name for what a process is: its title (Ray workers set one), or the script a Python runs."""
    if not command:
        return "?"
    first = os.path.basename(command[0])
    if first in PYTHON_NAMES and len(command) > 1:
        script = next((c for c in command[1:] if not c.startswith("-")), first)
        return os.path.basename(script)
    return command[0].split(" ")[0] if command[0].startswith("ray::") else first


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _reap_if_exited(child: psutil.Process) -> None:
    """Wait for a child that has exited (WNOHANG: one still running is left alone), so the kernel adds its CPU
    (and its reaped children's) to ours."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)


class TreeMonitor:
    """Context manager sampling the tree below `pid` until exit; `usage` holds the result afterwards."""

    def __init__(self, pid: int | None = None, interval: float = SAMPLE_SECONDS):
        self.root = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.cpu: dict[tuple[int, float], float] = {}  # (pid, create time) -> last seen CPU seconds
        self.by_role: Counter = Counter()  # CPU seconds per role, each interval charged to the role seen then
        self.peak_rss = self.peak_pss = self.peak_processes = self.samples = 0
        self.usage: Usage | None = None
        self._me = psutil.Process()
        self._adopting = False
        self._not_ours: set[int] = set()  # the root and the children this process had before: others wait for them
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-monitor", daemon=True)

    def __enter__(self) -> TreeMonitor:
        self._started = time.perf_counter()
        self._busy, self._own, self._reaped = machine_busy_seconds(), sum(self._me.cpu_times()[:2]), reaped_seconds()
        self._kernel = kernel_seconds()
        self._adopting = become_subreaper()
        self._not_ours = {child.pid for child in self._me.children()} | {self.root.pid}
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        wall = time.perf_counter() - self._started
        capacity = wall * (psutil.cpu_count() or 1)
        # a process's CPU after its last sample is lost when it exits, unless it is reaped along a chain that ends
        # here (the root, waited for by the caller, and the orphans this subreaper adopted): the kernel adds those
        # to our children times, and the processes still alive carry the CPU of the children they reaped
        still_running = sum(cpu_with_reaped_children(proc) for proc in self.processes())
        tree_cpu = max(sum(self.cpu.values()), reaped_seconds() - self._reaped + still_running)
        own = sum(self._me.cpu_times()[:2]) - self._own
        kernel = kernel_seconds() - self._kernel
        other = max(0.0, machine_busy_seconds() - self._busy - tree_cpu - own - kernel)
        self.usage = Usage(
            wall_s=wall,
            cpu_s=tree_cpu,
            cpu_utilisation=tree_cpu / capacity,
            other_cpu_utilisation=other / capacity,
            kernel_cpu_utilisation=kernel / capacity,
            peak_rss_bytes=self.peak_rss,
            peak_pss_bytes=self.peak_pss,
            peak_processes=self.peak_processes,
            cpu_s_by_role={name: round(seconds, 2) for name, seconds in self.by_role.most_common()},
        )
        self._wait_for_orphans()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)
        self.sample()

    def adopted(self) -> list[psutil.Process]:
        """Orphans of the tree that were re-parented to this process (none unless it is a subreaper)."""
        if not self._adopting:
            return []
        return [child for child in self._me.children() if child.pid not in self._not_ours]

    def processes(self, orphans: list[psutil.Process] | None = None) -> list[psutil.Process]:
        """Every live process of the tree: the root's descendants and the adopted `orphans` (default: those
        adopted now) with theirs."""
        return [proc for top in (self.root, *(self.adopted() if orphans is None else orphans)) for proc in _tree(top)]

    def _wait_for_orphans(self) -> None:
        """Reap the adopted processes still exiting after the command (Ray's shutdown kills them), so that
        they are neither left as zombies nor booked to the next tree this process monitors."""
        deadline = time.monotonic() + ORPHAN_GRACE_SECONDS
        while (orphans := self.adopted()) and time.monotonic() < deadline:
            psutil.wait_procs(orphans, timeout=max(0.0, deadline - time.monotonic()))

    def sample(self) -> None:
        """One look at the tree: memory now (PSS every PSS_EVERY samples), CPU time so far; exited orphans
        are reaped."""
        with_pss = self.samples % PSS_EVERY == 0
        self.samples += 1
        rss = pss = alive = 0
        orphans = self.adopted()  # one scan of the process table for both uses
        for orphan in orphans:
            _reap_if_exited(orphan)
        for proc in self.processes(orphans):
            try:
                with proc.oneshot():
                    memory = proc.memory_full_info() if with_pss else proc.memory_info()
                    times = proc.cpu_times()
                    key = (proc.pid, proc.create_time())
                    name = role(proc.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss, pss, alive = rss + memory.rss, pss + getattr(memory, "pss", 0), alive + 1
            total = times.user + times.system
            self.by_role[name] += total - self.cpu.get(key, 0.0)
            self.cpu[key] = total
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, alive)


def run_monitored(command: list[str], env: dict[str, str] | None = None, stdout=None,
                  ok_codes: tuple[int, ...] = (0,)) -> tuple[int, Usage]:
    """Run `command` to the end while sampling its process tree; its exit code and what it used.

    An exit code outside `ok_codes` raises RuntimeError with the end of the command's stderr.
    """
    process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=stdout, stderr=subprocess.PIPE,
                               text=True)
    with TreeMonitor(process.pid) as monitor:
        _, errors = process.communicate()
    if process.returncode not in ok_codes:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited {process.returncode}:\n{errors[-4000:]}")
    return process.returncode, monitor.usage
