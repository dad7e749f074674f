"""Data-parallel training: 2 CPU processes under torchrun (gloo) give the single-process result."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import REPO, tiny_config
from istn import distributed
from istn.config import TrainConfig, to_dict
from istn.distributed import BatchSplitError
from istn.training import build_datasets, load_checkpoint, train

# Each rank runs this: train() creates the process group, then a second train() in the same
# process resumes inside it (from rank 0's last.pt); it dumps what train() returned on this rank.
WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    from istn.config import train_config_from_dict
    from istn.training import build_datasets, train

    spec = json.load(open(sys.argv[1]))
    rank = int(os.environ["RANK"])
    cfg = train_config_from_dict(spec["cfg"])
    torch.set_default_dtype(torch.float64)


    class Float64(torch.utils.data.Dataset):
        def __init__(self, d):
            self.d = d

        def __len__(self):
            return len(self.d)

        def __getitem__(self, i):
            return {k: v.double() for k, v in self.d[i].items()}


    train_set, val_set = (Float64(d) for d in build_datasets(cfg))
    if rank != 0:
        cfg.out_dir = spec["other_out"]  # only rank 0 may read or write checkpoints
    cfg.steps = spec["first_steps"]
    assert not dist.is_initialized()
    train(cfg, train_set, val_set, progress=False)
    assert dist.is_initialized() and dist.get_backend() == "gloo"  # kept for the process's life
    cfg.steps = spec["steps"]
    res = train(cfg, train_set, val_set, progress=False)  # resumes from rank 0's last.pt
    torch.save({"model": res.model.state_dict(), "history": res.history, "best_val": res.best_val,
                "step": res.step, "rank": res.rank, "world_size": res.world_size},
               os.path.join(spec["dump"], f"rank{rank}.pt"))
''')


class Float64(torch.utils.data.Dataset):
    def __init__(self, d):
        self.d = d

    def __len__(self):
        return len(self.d)

    def __getitem__(self, i):
        return {k: v.double() for k, v in self.d[i].items()}


def _cfg(root, out, steps):
    # 6 pairs: 4 train (one global batch of 4 per step, 2 per rank), 2 validation
    return TrainConfig(model=tiny_config(2, "affine", "istn-i", grid_size=(32, 32), grid_spacing=1.0),
                       train_csv=str(root / "pairs.csv"), soi_csv=str(root / "soi.csv"), soi_kind="soft",
                       steps=steps, batch_size=4, val_every=3, val_fraction=0.34, out_dir=str(out), lr=1e-2,
                       device="cpu", threads=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: dict, b: dict, atol: float) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol) for k in a)


def test_two_cpu_processes_match_single_process_training(toy_csv, tmp_path):
    """In float64: in float32 the rounding of a different summation order (which a single process
    shows too, e.g. with the pairs of a batch reversed) is amplified by Adam in the weights whose true
    gradient is zero (conv biases before InstanceNorm) to ~1e-2 after a few steps at lr 1e-2."""
    steps, first = 6, 3
    spec = {"cfg": to_dict(_cfg(toy_csv, tmp_path / "ddp", steps)), "first_steps": first, "steps": steps,
            "other_out": str(tmp_path / "rank1-out"), "dump": str(tmp_path)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "worker.py").write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "ISTNRegistration"), env.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(tmp_path / "worker.py"), str(tmp_path / "spec.json")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the launcher stops its workers (a SIGKILL would orphan them)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail("torchrun hung:\n" + output[-3000:])
    assert proc.returncode == 0, output[-3000:]
    ddp_seconds = time.perf_counter() - t0

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2) and r0["step"] == r1["step"] == steps
    # the best is the last validation (step 6, after the resume), so what each rank returned is its own
    # final weights (a best from before a resume would be rank 0's best.pt, broadcast)
    assert r0["best_val"] == r0["history"][-1]["soi_mse"] < r0["history"][0]["soi_mse"]
    # both ranks: the same weights, history and best/last choice
    assert all(torch.equal(r0["model"][k], r1["model"][k]) for k in r0["model"])
    assert r0["history"] == r1["history"] and r0["best_val"] == r1["best_val"]
    # only rank 0 wrote checkpoints
    assert not (tmp_path / "rank1-out").exists()
    ddp_last = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ddp_last["step"] == steps and len(ddp_last["history"]) == 2  # validations at steps 3 and 6

    # the same global batches in one process (uninterrupted)
    cfg = _cfg(toy_csv, tmp_path / "single", steps)
    torch.set_default_dtype(torch.float64)
    try:
        single = train(cfg, *(Float64(d) for d in build_datasets(cfg)), progress=False)
    finally:
        torch.set_default_dtype(torch.float32)
    single_last = load_checkpoint(single.last_checkpoint)
    assert _close(ddp_last["model"], single_last["model"], atol=1e-5), "final weights differ from one process"
    assert _close(r0["model"], single.model.state_dict(), atol=1e-5), "best weights differ from one process"
    assert r0["best_val"] == pytest.approx(single.best_val, rel=1e-4)
    for hd, hs in zip(r0["history"], single.history, strict=True):
        assert hd["step"] == hs["step"]
        assert hd["loss"] == pytest.approx(hs["loss"], rel=1e-4)  # the global-batch loss, not rank 0's half
        assert hd["soi_mse"] == pytest.approx(hs["soi_mse"], rel=1e-4)
    diff = max((ddp_last["model"][k] - single_last["model"][k]).abs().max().item() for k in single_last["model"]
               if single_last["model"][k].numel())
    print(f"torchrun 2 x CPU: {ddp_seconds:.1f} s; max |weight difference| from one process {diff:.1e}")


def test_a_global_batch_that_does_not_split_evenly_is_a_clear_error(toy_csv, tmp_path, monkeypatch):
    assert distributed.shard([5, 1, 4, 2], 1, 2) == [4, 2]
    with pytest.raises(BatchSplitError, match="cannot be split evenly over 2 processes"):
        distributed.shard([5, 1, 4], 0, 2)
    # raised by train() before any process group is created (WORLD_SIZE as torchrun sets it)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _cfg(toy_csv, tmp_path / "odd", steps=1)
    cfg.batch_size = 3
    with pytest.raises(BatchSplitError, match="batch_size"):
        train(cfg, progress=False)
    assert not (tmp_path / "odd").exists()


def test_without_torchrun_training_is_single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx, dev = distributed.setup(torch.device("cpu"))
    assert not ctx.enabled and ctx.rank == 0 and ctx.world_size == 1 and dev == torch.device("cpu")
