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
    """A fake 16-core machine: ``machine(affinity, quota, omp, idle)``; ``idle``: idle CPUs, None unknown, "real"."""
    def _set(affinity=16, quota=None, omp=None, idle=None):
        if idle != "real":
            monkeypatch.setattr(threads, "idle_cpus", lambda *a: idle)
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
    machine(affinity=16, idle=2.6)  # other jobs hold all but ~2.6 cores: 3 threads
    assert threads.default_threads(3) == 3
    machine(affinity=16, idle=0.2)
    assert threads.default_threads(3) == 1
    assert threads.default_threads(2) == 1  # tiny 2D networks: one thread


def test_busy_cpus_are_left_out(machine, monkeypatch):
    """Spinning OpenMP threads on cores other jobs hold are far slower than fewer threads: count idle CPUs."""
    machine(affinity=8, idle="real")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)

    def sampled(*pairs):  # successive (idle, total) jiffies of /proc/stat's "cpu" line
        it = iter(pairs)
        monkeypatch.setattr(threads, "_cpu_times", lambda: next(it))

    sampled((1000, 4000), (1300, 4800))  # 300 of 800 jiffies idle: 3 of 8 CPUs
    assert threads.idle_cpus(0.0) == pytest.approx(3.0)
    sampled((1000, 4000), (1300, 4800))
    assert threads.default_threads(3) == 3
    sampled((1000, 4000), (1010, 4800))  # a fully busy machine: one thread, not none
    assert threads.default_threads(3) == 1


def test_cpu_times_parse_proc_stat(monkeypatch, tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 700 20 1 2 3 0 0\ncpu0 1 2 3 4\n")
    monkeypatch.setattr(threads, "PROC_STAT", stat)
    assert threads._cpu_times() == (720.0, 881.0)
    monkeypatch.setattr(threads, "PROC_STAT", tmp_path / "missing")
    assert threads._cpu_times() is None and threads.idle_cpus(0.0) is None


def test_idle_cpus_of_this_machine_is_a_plausible_number():
    idle = threads.idle_cpus(0.02)
    if idle is not None:  # Linux
        assert 0.0 <= idle <= (os.cpu_count() or 1) + 1e-6
