"""How many CPU threads a registration should use: the cores this process really has, not the machine's.

``os.cpu_count()`` counts the machine's cores. A container or a batch job
often gets fewer: an affinity mask (taskset, Slurm) or a cgroup CPU quota
(Docker ``--cpus``, Kubernetes limits). Torch sized to the machine then runs
more threads than cores, and its spinning threads slow every iteration down.
The count is never more than the cores this process may use. On a machine
that other jobs keep busy, pass a smaller ``threads`` (``istn register
--threads``) or set ``OMP_NUM_THREADS``: the load average cannot tell this
process's own recent threads from other jobs', so it is not guessed from.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")  # a module attribute so tests can point it at a fake tree
MAX_THREADS = 8  # beyond this, batch-1 3D convolutions on the network grid gain nothing (benchmarks/results/speed.md)


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


def default_threads(ndim: int) -> int:
    """Threads for a registration of ``ndim``-D images when the caller gives none.

    2D networks are tiny and fastest on one thread. 3D: the usable cores
    (`usable_cpus`), at most `MAX_THREADS`; ``OMP_NUM_THREADS``, when set, is
    an upper bound (the user's or the batch system's word).
    """
    if ndim == 2:
        return 1
    n = min(usable_cpus(), MAX_THREADS)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        n = min(n, int(env))
    return n
