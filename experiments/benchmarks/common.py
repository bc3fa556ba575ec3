"""What the performance benchmarks share: the machine, timings, CSV and plot output.

Each benchmark is one command (``python -m radfed.experiments.benchmarks.NAME``) that
measures radfed and a baseline side by side in one run, prints their ratios, and writes
``NAME.csv`` and ``NAME.png`` (plus ``NAME-summary.csv``) into ``--out``. ``--smoke``
runs it on tiny inputs (CI checks that it runs and writes finite ratios, never speed).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m radfed.experiments.benchmarks.{name}",
        description=(doc or "").split("\n\n")[0],
    )
    p.add_argument("--out", default=f"benchmark-{name}", help="folder for the CSV and PNG")
    p.add_argument("--smoke", action="store_true", help="tiny inputs: checks it runs (CI)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per timing (median)")
    return p


def machine() -> dict[str, Any]:
    """The machine a benchmark ran on (for docs/performance.md)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "load_1min": round(os.getloadavg()[0], 2),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
    }


def describe_machine(info: Mapping[str, Any]) -> str:
    return (
        f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB, "
        f"Python {info['python']}, load {info['load_1min']} at start\n"
        f"command: {info['command']}"
    )


@dataclass
class Timed:
    """Wall and CPU seconds (this process and its finished children) and peak memory."""

    wall: float
    cpu: float
    max_rss_mb: float


def timed(fn: Callable[[], Any]) -> tuple[Any, Timed]:
    """Run ``fn`` and measure it (CPU time includes child processes that ended)."""
    before = os.times()
    start = time.perf_counter()
    value = fn()
    wall = time.perf_counter() - start
    after = os.times()
    cpu = sum(a - b for a, b in zip(after[:4], before[:4], strict=True))
    return value, Timed(wall, cpu, peak_rss_mb())


def peak_rss_mb() -> float:
    """This process's peak resident memory (ru_maxrss, kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_process(
    args: Sequence[str], env: Mapping[str, str] | None = None, quiet: bool = True
) -> Timed:
    """Time a whole process as ``/usr/bin/time -v`` would: wall, user+sys, peak RSS
    (of the process and of its largest finished child). ``quiet`` drops its stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        list(args),
        env=dict(env) if env is not None else None,
        stdout=subprocess.DEVNULL if quiet else None,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)} exited with {proc.returncode}")
    return Timed(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def ratio(a: float, b: float) -> float:
    """``a / b``; ``inf`` when ``b`` is zero and ``a`` is not."""
    if b == 0:
        return math.inf if a else math.nan
    return a / b


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.4, 4.2)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False)
    return fig, axes


def save_figure(fig: Any, path: Path, note: str = "") -> Path:
    import matplotlib.pyplot as plt

    if note:
        fig.text(0.01, 0.005, note, fontsize=6, color="#555555", va="bottom")
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
