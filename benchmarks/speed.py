#!/usr/bin/env python3
"""Registration speed of the engine's real code path: one pass and test-time refinement.

For 2D 128^2, 3D 64^3 and 3D 128^3, affine and B-spline (untrained default-config ISTN-i
models built with `istn.config.ModelConfig`, exported and re-loaded as TorchScript like a
user's model; B-spline control points every 10 voxels), on CPU with one thread, on CPU with
all threads, and on CUDA when available:

- one pass: ``istn.registration.register(fixed, moving, model, iterations=0)``; reported are
  its ``timings["one_pass"]`` (both ITN passes, the STN, the warp and the loss) and its
  ``timings["total"]`` (plus reading the images onto the network grids and making the
  output maps); median of repeats after warm-up;
- refinement: ``istn.refinement.refine(module, s_map, t_map, N)`` (what `register` runs
  after the one pass; fresh Adam on the STN, ITN frozen): iterations per second and the
  time of 50 iterations (measured, or extrapolated from N < 50 iterations where marked *);
- peak memory: the rise of the process's peak resident set size (VmHWM, reset before each
  phase through /proc/self/clear_refs) above the resident size at the start of the phase
  (warm-up included; for refinement the ITN maps already exist), and
  ``torch.cuda.max_memory_allocated`` on the GPU.

Each measurement runs in a fresh subprocess so memory peaks and thread settings do not leak.
Results go to ``benchmarks/results/speed.{md,json}``; runs from other machines already in
speed.json are kept (keyed by ``--label``), so a GPU machine's run can be added later.

    python benchmarks/speed.py                        # everything this machine can do
    python benchmarks/speed.py --quick                # a fast smoke run into runs/speed-quick
    python benchmarks/speed.py --profile              # + torch.profiler of the 2D refinement loop
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))

# 2019 release, one CPU thread, 128^2 (method.md)
ANCHOR = {"one_pass_ms": 6.0, "refine50_s": {"affine": 0.35, "bspline": 1.4}}

CONFIGS = {
    # name: (ndim, size, one-pass repeats, refinement iterations per repeat, refinement repeats)
    "2d-128": (2, 128, 20, 50, 5),
    "3d-64": (3, 64, 5, 20, 3),
    "3d-128": (3, 128, 2, 5, 1),
}


# --------------------------------------------------------------------------
# worker (one measurement, in its own process)
# --------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident-set rise (MB) over a block of code."""

    def __enter__(self) -> "PeakRSS":
        self.exact = _reset_peak()
        self.start_kb = _status_kb("VmRSS") or 0
        self.start_max_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc) -> None:
        hwm = _status_kb("VmHWM") if self.exact else None
        if hwm is None:  # fallback: ru_maxrss never decreases, so this only sees new peaks
            hwm = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, self.start_max_kb)
        self.mb = max(0, hwm - self.start_kb) / 1024.0


def _test_images(ndim: int, size: int):
    """A smooth synthetic pair (moving = fixed shifted and rotated a little)."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    ax = [np.linspace(-1, 1, size)] * ndim
    mesh = np.meshgrid(*ax, indexing="ij")
    arr = np.zeros((size,) * ndim, np.float32)
    for _ in range(6):
        c = rng.uniform(-0.5, 0.5, ndim)
        arr += np.exp(-sum((m - ci) ** 2 for m, ci in zip(mesh, c)) / 0.05).astype(np.float32)
    fixed = sitk.GetImageFromArray(arr)
    tx = sitk.Euler2DTransform() if ndim == 2 else sitk.Euler3DTransform()
    tx.SetCenter([(size - 1) / 2.0] * ndim)
    tx.SetTranslation([3.0] * ndim)
    moving = sitk.Resample(fixed, fixed, tx, sitk.sitkLinear, 0.0)
    return fixed, moving


def worker(spec: dict) -> dict:
    import numpy as np
    import torch

    from istn.config import ModelConfig, TrainConfig
    from istn.export import build_metadata, export_model, load_model
    from istn.refinement import refine
    from istn.registration import register

    ndim, size, transform, device, threads = spec["ndim"], spec["size"], spec["transform"], spec["device"], spec["threads"]
    torch.set_num_threads(threads)
    cfg = ModelConfig(ndim=ndim, grid_size=(size,) * ndim, grid_spacing=1.0, transform=transform, variant="istn-i",
                      cp_spacing_mm=10.0)
    torch.manual_seed(0)
    from istn.networks import ISTN

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        export_model(ISTN(cfg), build_metadata(TrainConfig(model=cfg)), path)
        model = load_model(path)
    n_params = sum(p.numel() for p in model.module.parameters())
    n_stn = sum(p.numel() for p in model.module.stn.parameters())
    fixed, moving = _test_images(ndim, size)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    out = {**spec, "params": n_params, "stn_params": n_stn, "torch_threads": torch.get_num_threads()}

    # one pass (register with 0 iterations), warm-up then repeats
    def one() -> dict:
        c0 = time.process_time()
        r = register(fixed, moving, model, iterations=0, device=device, threads=threads)
        return {**r.timings, "cpu": time.process_time() - c0}

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:  # the window includes the warm-up: the first call's memory counts too
        for _ in range(spec["warmup"]):
            one()
        times = [one() for _ in range(spec["repeats"])]
    out["one_pass_ms"] = 1000 * statistics.median(t["one_pass"] for t in times)
    out["register_total_ms"] = 1000 * statistics.median(t["total"] for t in times)
    out["register_total_cpu_ms"] = 1000 * statistics.median(t["cpu"] for t in times)
    out["one_pass_rss_mb"] = mem.mb
    if cuda:
        out["one_pass_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20

    # refinement: refine() on the ITN maps, as register() does
    module = model.to(dev).module
    with torch.no_grad():
        from istn.data import image_to_tensor, intensity_window, network_grid
        import SimpleITK as sitk

        g_f, g_m = network_grid(fixed, cfg), network_grid(moving, cfg)
        src = image_to_tensor(moving, g_m, intensity_window(sitk.GetArrayViewFromImage(moving))).to(dev)
        trg = image_to_tensor(fixed, g_f if transform == "affine" else g_m,
                              intensity_window(sitk.GetArrayViewFromImage(fixed))).to(dev)
        s_map, t_map = module.representation(src), module.representation(trg)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    n = spec["refine_iterations"]
    with PeakRSS() as mem:
        refine(module, s_map, t_map, iterations=spec["refine_warmup"])
        rt, ct = [], []
        for _ in range(spec["refine_repeats"]):
            t0, c0 = time.perf_counter(), time.process_time()
            r = refine(module, s_map, t_map, iterations=n)  # ends with a float(): synchronised
            rt.append(time.perf_counter() - t0)
            ct.append(time.process_time() - c0)
    t = statistics.median(rt)
    out["refine50_cpu_s"] = 50 * statistics.median(ct) / n
    out["refine_iterations"] = n
    out["refine_s"] = t
    out["refine_it_per_s"] = n / t
    out["refine50_s"] = 50 * t / n
    out["refine50_extrapolated"] = n < 50
    out["refine_rss_mb"] = mem.mb
    if cuda:
        out["refine_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["refine_loss_drop"] = [r.losses[0], r.final_loss] if r.losses else None
    assert np.isfinite(r.final_loss)
    return out


def profile_refine(transform: str, iterations: int = 50) -> str:
    """torch.profiler table of the 2D 128^2 refinement loop (one thread), for finding where the time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from istn.config import ModelConfig, TrainConfig
    from istn.export import build_metadata, export_model, load_model
    from istn.networks import ISTN
    from istn.refinement import refine

    torch.set_num_threads(1)
    cfg = ModelConfig(ndim=2, grid_size=(128, 128), transform=transform, variant="istn-i", cp_spacing_mm=10.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.pt"
        export_model(ISTN(cfg), build_metadata(TrainConfig(model=cfg)), path)
        module = load_model(path).module
    torch.manual_seed(0)
    x, y = torch.rand(1, 1, 128, 128), torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        s, t = module.representation(x), module.representation(y)
    refine(module, s, t, iterations=5)
    t0 = time.perf_counter()
    refine(module, s, t, iterations=iterations)
    plain = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        refine(module, s, t, iterations=iterations)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=44)
    # the same loop with the eager (non-scripted) network, for comparison
    eager = ISTN(cfg).eval()
    eager.load_state_dict(module.state_dict())
    refine(eager, s, t, iterations=5)
    t0 = time.perf_counter()
    refine(eager, s, t, iterations=iterations)
    eager_s = time.perf_counter() - t0
    # phases of one iteration (forward / backward / Adam step), and the candidate fix: fused Adam
    import functools

    import istn.registration as reg
    from istn.losses import refinement_loss

    phases = {}
    for name, kw in (("Adam (engine)", {}), ("Adam(fused=True)", {"fused": True})):
        stn = list(module.stn.parameters())
        for p in module.parameters():
            p.requires_grad_(False)
        for p in stn:
            p.requires_grad_(True)
        opt = torch.optim.Adam(stn, lr=1e-3, **kw)
        f = b = st = 0.0
        for k in range(iterations + 5):
            t0 = time.perf_counter()
            loss = refinement_loss(module.warp(s, module.sampling_grid(module.predict(s, t))), t)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            if k >= 5:
                f, b, st = f + t1 - t0, b + t2 - t1, st + t3 - t2
        phases[name] = (f, b, st)
    original = reg.torch.optim.Adam
    try:
        reg.torch.optim.Adam = functools.partial(original, fused=True)
        refine(module, s, t, iterations=5)
        t0 = time.perf_counter()
        refine(module, s, t, iterations=iterations)
        fused_s = time.perf_counter() - t0
    finally:
        reg.torch.optim.Adam = original
    lines = "\n".join(f"| {k} | {1000 * v[0] / iterations:.2f} | {1000 * v[1] / iterations:.2f} | "
                      f"{1000 * v[2] / iterations:.2f} | {1000 * sum(v) / iterations:.2f} |" for k, v in phases.items())
    return (f"### 2D 128^2 {transform}: {iterations} refinement iterations, 1 thread\n\n"
            f"- `istn.refinement.refine` as it is (TorchScript module): {plain:.3f} s\n"
            f"- same weights, eager module: {eager_s:.3f} s\n"
            f"- `refine` with `torch.optim.Adam(..., fused=True)` patched in: {fused_s:.3f} s\n\n"
            "Per iteration (ms), the loop of `refine` written out:\n\n"
            "| optimizer | forward (STN + grid + warp + loss) | backward | optimizer step | total |\n"
            "| --- | --- | --- | --- | --- |\n" + lines + "\n\n"
            f"torch.profiler, ops by self CPU time (`refine` as it is):\n\n```\n{table}\n```\n")


def profile_one_pass(repeats: int = 30) -> str:
    """Where the 2D 128^2 one-pass time goes: ITN (twice) vs STN + warp, one thread, median ms."""
    import torch

    from istn.config import ModelConfig
    from istn.networks import ISTN

    torch.set_num_threads(1)
    rows = []
    for transform in ("affine", "bspline"):
        m = ISTN(ModelConfig(ndim=2, grid_size=(128, 128), transform=transform, variant="istn-i")).eval()
        x, y = torch.rand(1, 1, 128, 128), torch.rand(1, 1, 128, 128)
        itn, stn = [], []
        with torch.no_grad():
            for k in range(repeats + 3):
                t0 = time.perf_counter()
                s, t = m.representation(x), m.representation(y)
                t1 = time.perf_counter()
                m.warp(s, m.sampling_grid(m.predict(s, t)))
                t2 = time.perf_counter()
                if k >= 3:
                    itn.append(t1 - t0)
                    stn.append(t2 - t1)
        n_itn = sum(p.numel() for p in m.itn.parameters())
        rows.append(f"| {transform} | {1000 * statistics.median(itn):.1f} | {1000 * statistics.median(stn):.1f} | {n_itn} |")
    return ("### 2D 128^2 one pass, 1 thread (eager, no grad, median ms)\n\n"
            "| transform | ITN on both images | STN + sampling grid + warp | ITN parameters |\n| --- | --- | --- | --- |\n"
            + "\n".join(rows) + "\n")


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------


def run_worker(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    env["MKL_NUM_THREADS"] = str(spec["threads"])
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        return {**spec, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


def machine_info(label: str) -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"label": label, "host": socket.gethostname(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def render_markdown(data: dict, profile_text: str) -> str:
    L = ["# Registration speed (`benchmarks/speed.py`)\n",
         "Untrained default-config ISTN-i models (`ModelConfig()`, variant istn-i; B-spline control points every "
         "10 voxels), exported and loaded as TorchScript like a user's model; synthetic images of the grid size. "
         "One pass = `register(..., iterations=0)` `timings['one_pass']` (ITN on both images, STN, warp, loss; "
         "'register total' adds resampling the images onto the network grids and building the output maps). "
         "Refinement = `istn.refinement.refine` (fresh Adam on the STN, ITN frozen) on the ITN maps. Median of "
         "repeats after warm-up. Memory: rise of the process's peak RSS over the phase, warm-up included (VmHWM reset "
         "before it; the model is loaded before the one-pass phase, the ITN maps exist before the refinement phase) and "
         "`torch.cuda.max_memory_allocated` on GPU. * = 50-iteration time extrapolated from fewer iterations. "
         "(CPU ...) = process CPU time of the same work (all threads summed): on a shared, loaded machine the "
         "one-thread CPU time is the better estimate of the uncontended wall time.\n"]
    for run in data["runs"]:
        m = run["machine"]
        L.append(f"## {m['label']}: {m['cpu']} ({m['cpu_count']} logical CPUs)"
                 + (f", {m['gpu']}" if m.get("gpu") else ", no CUDA GPU") + f", torch {m['torch']}, {m['date']}\n")
        L.append(f"Load average at start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}. Command: "
                 f"`{run['command']}`; {run['seconds'] / 60:.1f} min.\n")
        L.append("| grid | transform | device | threads | one pass ms | register total ms (CPU ms) | refine it/s | "
                 "50 its s (CPU s) | peak RSS one pass MB | peak RSS refine MB | CUDA one pass MB | CUDA refine MB |")
        L.append("| --- " * 12 + "|")
        for r in run["results"]:
            grid = f"{r['ndim']}D {r['size']}^{r['ndim']}"
            dev = r["device"]
            if "error" in r:
                L.append(f"| {grid} | {r['transform']} | {dev} | {r['threads']} | {r['error']} | | | | | | | |")
                continue
            star = "*" if r.get("refine50_extrapolated") else ""
            cpu_reg = f" ({r['register_total_cpu_ms']:.0f})" if "register_total_cpu_ms" in r else ""
            cpu_ref = f" ({r['refine50_cpu_s']:.2f})" if "refine50_cpu_s" in r else ""
            L.append(f"| {grid} | {r['transform']} | {dev} | {r['threads']} | {r['one_pass_ms']:.1f} | "
                     f"{r['register_total_ms']:.1f}{cpu_reg} | {r['refine_it_per_s']:.1f} | {r['refine50_s']:.2f}{star}{cpu_ref} | "
                     f"{r['one_pass_rss_mb']:.0f} | {r['refine_rss_mb']:.0f} | {_f(r.get('one_pass_cuda_mb'), '.0f')} | "
                     f"{_f(r.get('refine_cuda_mb'), '.0f')} |")
        L.append("")
        ref = [r for r in run["results"] if r["ndim"] == 2 and r["size"] == 128 and r["device"] == "cpu"
               and r["threads"] == 1 and "error" not in r]
        if ref:
            L.append("Against the 2019 release anchor (one CPU thread, 128^2; method.md): one pass "
                     f"{ANCHOR['one_pass_ms']:.0f} ms, 50 refinement steps {ANCHOR['refine50_s']['affine']} s affine, "
                     f"{ANCHOR['refine50_s']['bspline']} s B-spline. Here:\n")
            for r in ref:
                L.append(f"- {r['transform']}: one pass {r['one_pass_ms']:.1f} ms "
                         f"({r['one_pass_ms'] / ANCHOR['one_pass_ms']:.2f}x the anchor), 50 refinement steps "
                         f"{r['refine50_s']:.2f} s ({r['refine50_s'] / ANCHOR['refine50_s'][r['transform']]:.2f}x the anchor); "
                         f"{r['params']} parameters, {r['stn_params']} of them in the STN.")
            L.append("")
    if profile_text:
        L.append("## Where the time goes (2D 128^2, one thread)\n")
        L.append(profile_text)
    notes = Path(__file__).resolve().parent / "results" / "speed_notes.md"
    if notes.exists():
        L.append(notes.read_text().strip() + "\n")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--transforms", nargs="+", default=["affine", "bspline"], choices=["affine", "bspline"])
    p.add_argument("--devices", nargs="+", default=["cpu1", "cpuall", "cuda"], choices=["cpu1", "cpuall", "cuda"],
                   help="cpu1 = CPU one thread, cpuall = CPU all threads (os.cpu_count()), cuda = GPU when available")
    p.add_argument("--label", default=None, help="name of this machine's run in speed.json (default: host name)")
    p.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results (--quick: runs/speed-quick)")
    p.add_argument("--profile", action="store_true", help="also profile the 2D refinement loop")
    p.add_argument("--quick", action="store_true", help="2D only, few repeats")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    out_dir = args.out_dir or (REPO / "runs" / "speed-quick" if args.quick else REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    label = args.label or socket.gethostname()
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    info = machine_info(label)
    all_threads = os.cpu_count() or 1
    devices = []
    for d in args.devices:
        if d == "cpu1":
            devices.append(("cpu", 1))
        elif d == "cpuall":
            if all_threads > 1 or "cpu1" not in args.devices:
                devices.append(("cpu", all_threads))
        elif torch.cuda.is_available():
            devices.append(("cuda", 1))
        else:
            print("CUDA not available on this machine: no GPU rows", flush=True)
    results = []
    print(f"{'grid':>9} {'transform':>9} {'device':>6} {'thr':>3} {'1pass ms':>9} {'reg ms':>8} {'it/s':>7} "
          f"{'50its s':>8} {'RSS1 MB':>8} {'RSSr MB':>8} {'CUDA MB':>8}", flush=True)
    for name in args.configs:
        ndim, size, repeats, n_ref, ref_rep = CONFIGS[name]
        if args.quick:
            repeats, n_ref, ref_rep = max(2, repeats // 5), max(5, n_ref // 5), 1
        for transform in args.transforms:
            for device, threads in devices:
                big = size >= 128 and ndim == 3
                spec = {"ndim": ndim, "size": size, "transform": transform, "device": device, "threads": threads,
                        "warmup": 1 if big else 3, "repeats": repeats if device == "cpu" else max(repeats, 10),
                        "refine_warmup": 2 if big and device == "cpu" else 5,
                        "refine_iterations": n_ref if device == "cpu" else 50,
                        "refine_repeats": ref_rep if device == "cpu" else 3}
                r = run_worker(spec, args.timeout)
                results.append(r)
                grid = f"{ndim}D {size}"
                if "error" in r:
                    print(f"{grid:>9} {transform:>9} {device:>6} {threads:>3} ERROR {r['error']}", flush=True)
                else:
                    print(f"{grid:>9} {transform:>9} {device:>6} {threads:>3} {r['one_pass_ms']:9.1f} "
                          f"{r['register_total_ms']:8.1f} {r['refine_it_per_s']:7.1f} {r['refine50_s']:7.2f}"
                          f"{'*' if r['refine50_extrapolated'] else ' '} {r['one_pass_rss_mb']:8.0f} "
                          f"{r['refine_rss_mb']:8.0f} {_f(r.get('refine_cuda_mb'), '8.0f'):>8}", flush=True)
    profile_text = ""
    if args.profile:
        profile_text = "\n".join([profile_one_pass()] + [profile_refine(t) for t in args.transforms])
        print(profile_text)
    run = {"machine": info, "command": command, "seconds": time.perf_counter() - t_start, "anchor_2019": ANCHOR,
           "results": results}
    js = out_dir / "speed.json"
    data = json.loads(js.read_text()) if js.exists() else {"runs": []}
    data["runs"] = [r for r in data["runs"] if r["machine"]["label"] != label] + [run]
    if profile_text:
        data["profile"] = profile_text
    js.write_text(json.dumps(data, indent=1) + "\n")
    (out_dir / "speed.md").write_text(render_markdown(data, data.get("profile", "")))
    print(f"wrote {out_dir}/speed.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
