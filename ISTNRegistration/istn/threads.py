"""How many CPU threads a registration should use: the cores this process really has, not the machine's.

``os.cpu_count()`` counts the machine's cores. A container or a batch job
often gets fewer: an affinity mask (taskset, Slurm) or a cgroup CPU quota
(Docker ``--cpus``, Kubernetes limits). Torch sized to the machine then runs
more threads than cores, and its spinning threads slow every iteration down.
The count is never more than the cores this process may use.

A busy machine is worse still: torch's OpenMP threads spin while they wait for
each other, so two threads on two cores that another job also wants ran a 3D
refinement 16x slower than one thread (25 s against 1.5 s, measured here at a
load of 3.5 on 2 cores). So the default also leaves out the cores that are busy
right now: the idle share of the CPUs, sampled from ``/proc/stat`` over
`IDLE_SAMPLE_S` just before the registration (when this process itself is
not computing, unlike the load average, which counts this process's own last
minute).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")  # a module attribute so tests can point it at a fake tree
MAX_THREADS = 8  # beyond this, batch-1 3D convolutions on the network grid gain nothing (benchmarks/results/speed.md)
IDLE_SAMPLE_S = 0.05
PROC_STAT = Path("/proc/stat")  # module attributes so tests can fake them


def cgroup_cpu_limit(root: Path | None = None) -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None when unlimited/unknown."""
    root = CGROUP_ROOT if root is None else root
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max" and float(period) > 0:
            return float(quota) / float(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = float((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = float((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """Cores this process may run on: the affinity mask, capped by the cgroup quota (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    return max(1, n)


def _cpu_times() -> tuple[float, float] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, None where unavailable."""
    try:
        fields = PROC_STAT.read_text().splitlines()[0].split()
        values = [float(v) for v in fields[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    return idle, sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)


def idle_cpus(sample_s: float = IDLE_SAMPLE_S) -> float | None:
    """CPUs' worth of idle time over the next ``sample_s`` seconds (machine-wide), None where unknown."""
    import time

    before = _cpu_times()
    if before is None:
        return None
    time.sleep(sample_s)
    after = _cpu_times()
    if after is None or after[1] <= before[1]:
        return None
    share = (after[0] - before[0]) / (after[1] - before[1])
    return share * (os.cpu_count() or 1)


def default_threads(ndim: int) -> int:
    """Threads for a registration of ``ndim``-D images when the caller gives none.

    2D networks are tiny and fastest on one thread. 3D: the usable cores
    (`usable_cpus`), at most `MAX_THREADS`, no more than the CPUs idle right
    now (`idle_cpus`, rounded, at least 1); ``OMP_NUM_THREADS``, when set, is
    an upper bound (the user's or the batch system's word).
    """
    if ndim == 2:
        return 1
    n = min(usable_cpus(), MAX_THREADS)
    idle = idle_cpus()
    if idle is not None:
        n = max(1, min(n, int(idle + 0.5)))
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        n = min(n, int(env))
    return n
