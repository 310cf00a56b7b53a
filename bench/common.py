"""Shared pieces of the benchmarks: timing, machine description, data, process sampling.

Timing rules used everywhere: one warm-up that is not recorded, then several
repeats; figures are medians; two things compared are run alternately in the
same process (A, B, A, B, ...) so that drifts of the machine hit both alike.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parent.parent
CIFAR_JPEG = REPO.parent / "shared" / "data" / "cifar10-test-jpeg"
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(
    runs: dict[str, Callable[[], float]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Call every ``runs[name]()`` (each returns seconds) in turn, ``repeats`` rounds.

    The first ``warmup`` rounds are run and dropped. Returns the recorded seconds
    per name, in round order.
    """
    out: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(warmup + repeats):
        GUARD.wait()
        for name, fn in runs.items():
            seconds = fn()
            if r >= warmup:
                out[name].append(seconds)
    return out


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def wait_for_quiet(threshold: float, max_wait_s: float, poll_s: float = 30.0) -> dict[str, Any]:
    """Poll the 1-minute load average until it is below ``threshold`` (or time runs out)."""
    t0 = time.monotonic()
    seen = [load_average()]
    while seen[-1][0] >= threshold and time.monotonic() - t0 < max_wait_s:
        print(
            f"[bench] load average {seen[-1][0]:.2f} >= {threshold}; waiting "
            f"({time.monotonic() - t0:.0f}/{max_wait_s:.0f} s)",
            flush=True,
        )
        time.sleep(poll_s)
        seen.append(load_average())
    return {
        "threshold": threshold,
        "waited_s": round(time.monotonic() - t0, 1),
        "quiet": seen[-1][0] < threshold,
        "load_at_start": seen[-1],
    }


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs together, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def cpu_busy(seconds: float = 3.0) -> float:
    """Fraction of all CPUs busy over the next ``seconds`` (this process sleeps meanwhile)."""
    idle0, total0 = _cpu_times()
    time.sleep(seconds)
    idle1, total1 = _cpu_times()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_idle(max_wait_s: float, threshold: float = 0.15, poll_s: float = 30.0) -> dict:
    """Between figures: wait while other processes keep more than ``threshold`` of the CPUs
    busy (the load average still counts the figure just finished, so it is not used here)."""
    t0 = time.monotonic()
    busy = cpu_busy(1.0)
    while busy > threshold and time.monotonic() - t0 < max_wait_s:
        print(f"[bench] CPUs {100 * busy:.0f}% busy with other work; waiting", flush=True)
        time.sleep(poll_s)
        busy = cpu_busy(1.0)
    return {"waited_s": round(time.monotonic() - t0, 1), "busy_before": round(busy, 3)}


class Guard:
    """Waits, between the timed pieces of a figure, while other work keeps the CPUs busy.

    ``wait()`` samples the CPUs for ``window`` seconds while this process sleeps;
    anything busy then is other work (or this process's leftovers, e.g. Ray
    workers shutting down) and it waits, polling, up to ``max_wait`` seconds.
    Disabled by ``python -m bench --no-wait``.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.threshold = 0.15
        self.window = 0.5
        self.max_wait = 300.0
        self.waited_s = 0.0
        self.checks = 0
        self.gave_up = 0

    def wait(self) -> None:
        if not self.enabled:
            return
        t0 = time.monotonic()
        self.checks += 1
        busy = cpu_busy(self.window)
        while busy > self.threshold:
            if time.monotonic() - t0 > self.max_wait:
                self.gave_up += 1
                break
            time.sleep(5.0)
            busy = cpu_busy(self.window)
        self.waited_s += time.monotonic() - t0 - self.window

    def summary(self) -> dict[str, Any]:
        return {
            "checks": self.checks,
            "waited_s": round(self.waited_s, 1),
            "gave_up": self.gave_up,
            "threshold_busy": self.threshold,
        }


GUARD = Guard()


class _Background:
    """A sampler thread: ``_tick()`` once on entry, every ``interval`` seconds, and once
    on exit."""

    interval: float
    _stop: threading.Event
    _thread: threading.Thread | None

    def _tick(self) -> None:
        raise NotImplementedError

    def _begin(self) -> None:
        self._tick()

    def _end(self) -> None:
        pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._tick()

    def __enter__(self) -> Self:
        self._begin()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._tick()
        self._end()


class OtherWork(_Background):
    """Measures the CPU time that processes outside this benchmark's process tree use
    while a figure runs (polls ``/proc`` every second; processes shorter than that
    are missed). One pass over ``/proc/*/stat`` per poll, every 2 s by default."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.other_cpu_s = 0.0
        self.own_cpu_s = 0.0
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self.wall_s = 0.0

    def _poll(self) -> None:
        parents: dict[int, int] = {}
        deltas: dict[int, float] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                parents[pid] = int(fields[1])
                cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
            except (OSError, ValueError, IndexError):
                continue
            deltas[pid] = cpu - self._last.get(pid, cpu)
            self._last[pid] = cpu
        mine, frontier = {os.getpid()}, [os.getpid()]
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for kid in children.get(frontier.pop(), []):
                mine.add(kid)
                frontier.append(kid)
        for pid, delta in deltas.items():
            if delta > 0:
                if pid in mine:
                    self.own_cpu_s += delta
                else:
                    self.other_cpu_s += delta

    def _tick(self) -> None:
        self._poll()

    def _begin(self) -> None:
        self._t0 = time.monotonic()
        self._poll()
        self.other_cpu_s = self.own_cpu_s = 0.0

    def _end(self) -> None:
        self.wall_s = time.monotonic() - self._t0

    def summary(self) -> dict[str, float]:
        cores = os.cpu_count() or 1
        return {
            "wall_s": round(self.wall_s, 1),
            "other_processes_cpu_s": round(self.other_cpu_s, 1),
            "other_share_of_machine": round(self.other_cpu_s / max(self.wall_s * cores, 1e-9), 4),
            "benchmark_cpu_s": round(self.own_cpu_s, 1),
        }


def machine() -> dict[str, Any]:
    """What the numbers were measured on (no host name, no paths)."""
    import torch

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("ray", "mlflow", "torchvision"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {
        "label": "cpu2" if (os.cpu_count() or 0) == 2 else f"cpu{os.cpu_count()}",
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "system": f"{platform.system()} {platform.machine()}",
        **versions,
    }


# --- data ---------------------------------------------------------------------------
_DATA: dict[str, Any] = {}


def cifar_jpeg():
    """The CIFAR-10 test JPEG folder as a DataBundle (loaded once per process)."""
    from trainables.data import load_data

    if "cifar" not in _DATA:
        if not CIFAR_JPEG.is_dir():
            raise SystemExit(f"benchmark data missing: {CIFAR_JPEG} (the CIFAR-10 JPEG folder)")
        _DATA["cifar"] = load_data("imagefolder", str(CIFAR_JPEG))
    return _DATA["cifar"]


# --- /proc sampling ------------------------------------------------------------------
def _read_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "PPid"):
                out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def rss_mib(pid: int | None = None) -> float:
    """Resident memory (VmRSS) of a process in MiB."""
    return _read_status(pid or os.getpid()).get("VmRSS", 0) / 1024


def peak_rss_mib(pid: int | None = None) -> float:
    """Peak resident memory (VmHWM) of a process in MiB."""
    return _read_status(pid or os.getpid()).get("VmHWM", 0) / 1024


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


def descendants(root: int) -> list[int]:
    """Processes below ``root`` (children, grandchildren, ...)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found.extend(kids)
        frontier.extend(kids)
    return found


@dataclass
class ProcInfo:
    name: str
    first_t: float
    last_t: float
    rss_mib: float = 0.0
    peak_mib: float = 0.0
    cpu_first: float | None = None
    cpu_last: float | None = None
    named_t: float | None = None  # first seen running an actor (``ray::X``, not IDLE)

    @property
    def cpu_util(self) -> float | None:
        """Average CPUs used between the first and last sample."""
        if self.cpu_first is None or self.cpu_last is None or self.last_t <= self.first_t:
            return None
        return (self.cpu_last - self.cpu_first) / (self.last_t - self.first_t)


@dataclass
class ProcSampler(_Background):
    """Samples this process and every process below it every ``interval`` seconds.

    Records per process its name (the command line, which Ray sets to the actor
    and method a worker runs), resident and peak memory and CPU time; and a time
    series of this process's resident memory alongside ``probe()`` (any number,
    e.g. trials finished so far).
    """

    interval: float = 0.25
    probe: Callable[[], float] | None = None
    procs: dict[int, ProcInfo] = field(default_factory=dict)
    series: list[tuple[float, float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        now = time.monotonic()
        me = os.getpid()
        self.series.append((now, rss_mib(me), self.probe() if self.probe else 0.0))
        for pid in descendants(me):
            st = _read_status(pid)
            if not st:
                continue
            info = self.procs.get(pid)
            if info is None:
                try:
                    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                    name = raw.replace(b"\0", b" ").decode(errors="replace").strip()[:120]
                except OSError:
                    name = "?"
                info = self.procs[pid] = ProcInfo(name, now, now, cpu_first=_cpu_seconds(pid))
                if name.startswith("ray::") and "IDLE" not in name:
                    info.named_t = now
            else:
                try:  # Ray renames a worker to what it runs (ray::ImplicitFunc.train ...)
                    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                    name = raw.replace(b"\0", b" ").decode(errors="replace").strip()[:120]
                    if name.startswith("ray::") and "IDLE" not in name:
                        info.name = name
                        if info.named_t is None:
                            info.named_t = now
                except OSError:
                    pass
            info.last_t = now
            info.rss_mib = st.get("VmRSS", 0) / 1024
            info.peak_mib = max(info.peak_mib, st.get("VmHWM", 0) / 1024)
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                info.cpu_last = cpu

    def _tick(self) -> None:
        self._sample()


def without(runs: dict[str, list[dict[str, Any]]], key: str) -> dict[str, list[dict]]:
    """``runs`` (lists of records by name) with ``key`` left out of every record."""
    return {
        name: [{k: v for k, v in r.items() if k != key} for r in rs] for name, rs in runs.items()
    }


def render(rows: list[list[str]], head: list[str] | None = None) -> str:
    """A Markdown table of ``rows`` under ``head`` (the benchmark table's columns by default)."""
    head = head or ["fig", "measure", "value", "target", "met"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}"
