"""Thread count from the cores this process really has (affinity, cgroup quota, OMP_NUM_THREADS)."""

import os

import pytest

from istn import threads


def _fake_cgroup(tmp_path, v2=None, v1=None):
    tmp_path.mkdir(parents=True)
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2)
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(str(v1[0]))
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(str(v1[1]))
    return tmp_path


def test_cgroup_quota_v2_v1_and_unlimited(tmp_path):
    assert threads.cgroup_cpu_limit(_fake_cgroup(tmp_path / "a", v2="150000 100000\n")) == 1.5
    assert threads.cgroup_cpu_limit(_fake_cgroup(tmp_path / "b", v2="max 100000\n")) is None
    assert threads.cgroup_cpu_limit(_fake_cgroup(tmp_path / "c", v1=(300000, 100000))) == 3.0
    assert threads.cgroup_cpu_limit(_fake_cgroup(tmp_path / "d", v1=(-1, 100000))) is None
    assert threads.cgroup_cpu_limit(tmp_path / "missing") is None


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A fake 16-core machine: ``machine(affinity, quota, omp)``."""
    def _set(affinity=16, quota=None, omp=None):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
        root = tmp_path / f"cg{affinity}-{quota}"
        root.mkdir(exist_ok=True)
        if quota is not None:
            (root / "cpu.max").write_text(f"{int(quota * 100000)} 100000")
        monkeypatch.setattr(threads, "CGROUP_ROOT", root)
        if omp is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", str(omp))
    return _set


def test_default_threads_follow_affinity_quota_and_omp(machine):
    machine(affinity=16)
    assert threads.usable_cpus() == 16 and threads.default_threads(3) == threads.MAX_THREADS
    machine(affinity=4)
    assert threads.default_threads(3) == 4
    machine(affinity=16, quota=2.5)  # docker --cpus 2.5: 3 threads, not 16
    assert threads.usable_cpus() == 3 and threads.default_threads(3) == 3
    machine(affinity=2, quota=6)
    assert threads.default_threads(3) == 2
    machine(affinity=16, omp=1)
    assert threads.default_threads(3) == 1
    assert threads.default_threads(2) == 1  # tiny 2D networks: one thread
