#!/usr/bin/env python3
"""ISTN side by side with classical registration on real 3D brain MRI (held-out Colin27 -> ICBM 2009c), on the
files users bring: brain-extracted and whole-head moving images, three storage layouts, and self-registration.

Protocol
--------
- Fixed: ICBM 2009c T1 (skull-stripped) with its HCPex-derived labels, from ``python -m istn.data.brain DIR``
  (``DIR/eval/icbm2009c_{t1,labels}.nii.gz``, 2 mm). Fixed brain mask: ``icbm2009c_t1 > 0``.
- Moving, BOTH variants in one run, every method given the same files:
  ``brain``: Colin27 brain-extracted (``colin27_t1_brain``); ``whole-head``: Colin27 whole head (``colin27_t1``).
  Colin27 was never in any training set. Moving brain mask: ``colin27_t1_brain > 0``.
- Each pair: Colin27 placed in a scanner position by a seeded random affine (`istn.data.brain.scanner_perturbation`,
  10-20 deg, 10-20 mm, +-10 %; seeds 101, 102, ...), image resampled linearly and labels and brain mask
  nearest-neighbour onto a 20 mm padded grid (`istn.demo.place_in_scanner`); the two variants of one seed share
  the scanner position exactly.
- Storage layouts (``--layouts``): ``LPS`` as prepared (identity direction); ``RAS`` (fixed, moving, labels and
  masks all re-stored with ``sitk.DICOMOrient(img, "RAS")``: the same world content in flipped voxel order, as
  NIfTI converters write); ``sagittal`` (``DICOMOrient`` code ``--sagittal-code``, default ``ASL``: sagittal
  slices, left-handed voxel axes). Re-storing is a pure permutation/flip of voxels (no resampling). Each method
  gets the re-stored files as its input.
- Counts: ``--pairs`` seeds in LPS for every method and both variants; the first ``--layout-pairs`` seeds also
  in every other layout; self-registration (unless ``--no-self``): the fixed image registered to itself and the
  whole-head moving image (seed 101, LPS) registered to itself.
- Scored in world space, whatever the layout: every method's result is one ITK world transform (fixed ->
  moving points); the moving labels / brain mask AS STORED for the case are warped through it with the same
  nearest-neighbour resampling onto the LPS fixed grid. Per pair: Dice, ASD (average symmetric surface
  distance, mm), HD95 (mm), each the mean over labels 1..8 (L/R caudate, putamen, pallidum, thalamus;
  `istn.metrics`); brain-mask Dice (fixed mask vs warped moving mask: harm outside the structures of
  interest); folding = fraction of fixed brain voxels with Jacobian determinant <= 0 (non-linear methods).
  Layout cases also: |T_layout(x) - T_LPS(x)| (mm) over the fixed brain mask against the same method's LPS
  result of the same pair. Self-registration: |T(x) - x| (mm) over the image's brain mask, mean and max.

Methods (`--methods`, comma separated; default all)
---------------------------------------------------
affine:     identity, istn_onepass, istn_refined, sitk_affine, elastix_affine, ants_affine
non-linear: istn_bspline (from istn_refined), sitk_bspline (from sitk_affine), elastix_bspline (from
            elastix_affine), ants_syn (from ants_affine)

- SimpleITK affine: Mattes MI 50 bins, 10 % random sampling, RegularStepGradientDescent lr 2 / 200 its,
  scales from physical shift, shrink 4-2-1, smoothing 2-1-0 mm, centred initialiser (MOMENTS: centres of
  mass, as ANTs' initialiser). B-spline: 30 mm mesh, Mattes MI, 5 % sampling, GradientDescentLineSearch
  lr 5 / 30 its, shrink 2-1 (smoothing 1-0 mm), the affine as moving initial transform: y = A(B(x)).
  Sampling seeds follow the scanner seed (1000 + seed, 2000 + seed), the same in every layout.
- elastix (itk-elastix): default ``affine`` parameter map; then default ``bspline`` map with
  ``FinalGridSpacingInPhysicalUnits 30`` started from the affine's TransformParameters file; converted to
  ITK transforms and composed y = B(A(x)).
- ANTs (antspyx, own venv, `brain3d_ants.py`): ``Affine``; then ``SyNOnly`` with iterations 100x70x50x20
  (peers.md: the default 40x20x0 under-fits) from the ANTs affine; [1Warp, 0GenericAffine] composed
  y = A(x + u(x)). ANTs' metric sampling is seeded (``--random-seed 1``; runs before 2026-12-02 unseeded); it
  repeats exactly only with ``--threads 1`` (with two threads its affine still varies from run to run).
- ISTN: ``register(fixed, moving, affine_model, iterations=0)`` (one pass) / the model's own refinement
  (refined), then ``register(fixed, moving, bspline_model, initial_transform=refined affine)``: iterations,
  polish, bending weight, convergence tolerance and the rest are the engine's defaults (the models'
  ``refinement`` metadata). The JSON records
  per registration the iterations actually run, convergence and the engine's warnings.

Costs: cases run in groups (LPS pairs shared with the layouts, the other layouts, self-registration, the
remaining LPS pairs); in each group each method runs in its own worker subprocess over the group's cases
(one method at a time), then everything finished is scored and the tables are rewritten, so an interrupted
run still has tables. Per registration: wall seconds and CPU seconds (``time.process_time``: all threads of
the worker) of the registration call alone, and the worker's peak resident memory during it (VmHWM reset
just before the call). One-off costs outside the per-pair timing (lazy ITK loading, ``import ants``, ISTN
model loading + one short warm-up registration) are reported separately. Non-linear times are CUMULATIVE
(the method's own affine + its non-linear stage). All tools get the same thread count (``--threads``). The
1-minute load average is sampled every 10 s while the workers run (the machine may be shared).

Conversion check: for elastix and ANTs the world transform built from the tool's files is applied with
SimpleITK and compared with the tool's own warped image (first brain-variant pair of each layout; elastix:
cubic B-spline interpolation, ANTs: linear, as each tool resamples); normalised mean absolute difference.

Install (once)
--------------
    pip install -r benchmarks/requirements-brain3d.txt    # itk-elastix 0.25.4 into the project venv (1.6 GB)
    python -m venv /work/venv-ants                        # antspyx downgrades numpy/scipy: its own venv
    /work/venv-ants/bin/pip install -r benchmarks/requirements-ants.txt
    python -m istn.data.brain /work/braindata             # the evaluation volumes

Run
---
    python benchmarks/brain3d.py --threads 2              # 5 LPS pairs, 2 in RAS/sagittal, self -> benchmarks/results
    python benchmarks/brain3d.py --quick                  # 1 pair, 1 layout pair, fewer iterations -> runs/brain3d-quick
    python benchmarks/brain3d.py --resume                 # continue an interrupted run (finished cases kept)
    python benchmarks/brain3d.py --pairs 3 --layout-pairs 1 --methods identity,sitk_affine,sitk_bspline --out runs/b3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from procmem import reset_peak, status_kb  # benchmarks/procmem.py, beside this script

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))

from istn.transforms import compose, flatten_transform  # noqa: E402

AFFINE = ["identity", "istn_onepass", "istn_refined", "sitk_affine", "elastix_affine", "ants_affine"]
NONLINEAR = ["istn_bspline", "sitk_bspline", "elastix_bspline", "ants_syn"]
FROM_AFFINE = {"istn_bspline": "istn_refined", "sitk_bspline": "sitk_affine", "elastix_bspline": "elastix_affine",
               "ants_syn": "ants_affine"}
LABEL_VALUES = list(range(1, 9))
NAMES = {
    "identity": "identity (scanner position)",
    "istn_onepass": "ISTN affine, one pass",
    "istn_refined": "ISTN affine, refined",
    "sitk_affine": "SimpleITK affine",
    "elastix_affine": "elastix affine",
    "ants_affine": "ANTs Affine",
    "istn_bspline": "ISTN B-spline, refined",
    "sitk_bspline": "SimpleITK B-spline 30 mm",
    "elastix_bspline": "elastix B-spline 30 mm",
    "ants_syn": "ANTs SyN (SyNOnly 100x70x50x20)",
}
VARIANTS = {"brain": "colin27_t1_brain", "whole-head": "colin27_t1"}
VARIANT_TEXT = {"brain": "brain-extracted (`colin27_t1_brain`)", "whole-head": "whole head (`colin27_t1`)"}
LAYOUT_CODES = {"LPS": "LPS", "RAS": "RAS"}  # + "sagittal": --sagittal-code
SEED0 = 101
DEFAULT_MODELS = REPO / "ISTNRegistration" / "Resources" / "Models"


# --------------------------------------------------------------------------
# process helpers
# --------------------------------------------------------------------------


class Timed:
    """Wall seconds, CPU seconds (all threads of this process) and peak RSS (MB) of a block."""

    def __enter__(self) -> "Timed":
        reset_peak()
        self.rss_before_mb = status_kb("VmRSS") / 1024.0
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.w0
        self.cpu_seconds = time.process_time() - self.c0
        self.peak_mb = status_kb("VmHWM") / 1024.0

    def record(self, index: int, **extra) -> dict:
        return {"index": index, "seconds": self.seconds, "cpu_seconds": self.cpu_seconds, "peak_mb": self.peak_mb,
                "rss_before_mb": self.rss_before_mb, **extra}


def _pair_dir(work: Path, method: str) -> Path:
    d = work / method
    d.mkdir(parents=True, exist_ok=True)
    return d


class _Images:
    """Read each image file once per worker (the fixed image is shared by many cases)."""

    def __init__(self, reader) -> None:
        self.reader, self.cache = reader, {}

    def __call__(self, path: str):
        if path not in self.cache:
            self.cache[path] = self.reader(path)
        return self.cache[path]


# --------------------------------------------------------------------------
# workers (one process per method, all cases of a group)
# --------------------------------------------------------------------------


def worker_istn(spec: dict, method: str) -> dict:
    import torch

    from istn.export import load_model
    from istn.registration import register

    threads = spec["threads"]
    torch.set_num_threads(threads)
    engine_used = engine_state()  # the engine this worker imports (the checkout is shared and may move)
    t0 = time.perf_counter()
    models = {k: _model_info(spec[k]) for k in ("affine_model", "bspline_model")}  # what is loaded (files may change)
    affine_model = load_model(spec["affine_model"])
    bspline_model = load_model(spec["bspline_model"]) if method == "istn_bspline" else None
    load_s = time.perf_counter() - t0
    read = _Images(lambda p: sitk.ReadImage(p, sitk.sitkFloat32))
    its = spec["istn_iterations"]
    out = _pair_dir(Path(spec["work"]), method)
    # warm-up (untimed, reported): TorchScript optimises the graph during the first calls
    c0 = spec["pairs"][0]
    t0 = time.perf_counter()
    model = bspline_model if method == "istn_bspline" else affine_model
    register(read(c0["fixed"]), read(c0["moving"]), model, iterations=5, device="cpu", threads=threads)
    warm_s = time.perf_counter() - t0
    records = []
    for pair in spec["pairs"]:
        i = pair["index"]
        fixed, moving = read(pair["fixed"]), read(pair["moving"])
        if method == "istn_bspline":
            init = _read(Path(spec["work"]) / "istn_refined" / f"pair{i:02d}.tfm")
            with Timed() as t:
                res = register(fixed, moving, bspline_model, iterations=its, device="cpu", threads=threads,
                               initial_transform=init)
            sitk.WriteTransform(res.transform, str(out / f"pair{i:02d}.h5"))
        else:
            with Timed() as t:
                res = register(fixed, moving, affine_model, iterations=0 if method == "istn_onepass" else its,
                               device="cpu", threads=threads)
            sitk.WriteTransform(res.transform, str(out / f"pair{i:02d}.tfm"))
        records.append(t.record(i, timings=res.timings, loss_one_pass=res.loss_one_pass, loss_final=res.loss_final,
                                iterations=res.iterations, converged=res.converged,
                                best_iteration=res.best_iteration, warnings=list(res.warnings)))
        checkpoint(spec, method, records[-1])
        print(f"  {method} case {i} ({pair['key']}): {t.seconds:.1f} s wall, {t.cpu_seconds:.1f} s CPU, "
              f"{t.peak_mb:.0f} MB, {res.iterations} its{', WARNINGS: ' + '; '.join(res.warnings) if res.warnings else ''}",
              flush=True)
    refinement = {"affine": affine_model.meta.get("refinement")}
    if bspline_model is not None:
        refinement["bspline"] = bspline_model.meta.get("refinement")
    return {"records": records, "setup_seconds": {"load_models": load_s, "warmup_registration": warm_s},
            "models": models, "refinement_metadata": refinement,
            "engine_run": {"cases": [q["index"] for q in spec["pairs"]], **engine_used}}


def _model_info(path: str) -> dict:
    from istn.export import load_model

    p = Path(path)
    if not p.exists():
        return {"path": str(p), "missing": True}
    m = load_model(p)
    tr = m.meta.get("training", {})
    return {"path": str(p.relative_to(REPO) if p.is_relative_to(REPO) else p),
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest()[:16], "describe": m.describe(),
            "created": m.meta.get("created"), "step": tr.get("step"), "best_val": tr.get("best_val"),
            "refinement": m.meta.get("refinement")}


def _sitk_affine(fixed: sitk.Image, moving: sitk.Image, its: int, seed: int) -> sitk.Transform:
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(0.10, seed)
    r.SetInterpolator(sitk.sitkLinear)
    r.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4, numberOfIterations=its)
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetShrinkFactorsPerLevel([4, 2, 1])
    r.SetSmoothingSigmasPerLevel([2, 1, 0])
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    r.SetInitialTransform(init, inPlace=False)
    return _single(r.Execute(fixed, moving))


def _sitk_bspline(fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform, its: int, seed: int) -> sitk.Transform:
    extent = [sz * sp for sz, sp in zip(fixed.GetSize(), fixed.GetSpacing())]
    mesh = [max(1, int(round(e / 30.0))) for e in extent]
    bsp = sitk.BSplineTransformInitializer(fixed, mesh, 3)
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(0.05, seed)
    r.SetInterpolator(sitk.sitkLinear)
    # no SetOptimizerScalesFromPhysicalShift here: for ~2000 B-spline coefficients its estimation alone cost
    # more CPU than 3 iterations (measured), and peers.md's B-spline recipe does not use it
    r.SetOptimizerAsGradientDescentLineSearch(learningRate=5.0, numberOfIterations=its)
    r.SetShrinkFactorsPerLevel([2, 1])
    r.SetSmoothingSigmasPerLevel([1, 0])
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    r.SetMovingInitialTransform(affine)
    r.SetInitialTransform(bsp, inPlace=True)
    r.Execute(fixed, moving)
    return compose(bsp, affine)  # y = A(B(x)): the moving initial transform is applied after the optimised one




def worker_sitk(spec: dict, method: str) -> dict:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(spec["threads"])
    read = _Images(lambda p: sitk.ReadImage(p, sitk.sitkFloat32))
    out = _pair_dir(Path(spec["work"]), method)
    records = []
    for pair in spec["pairs"]:
        i = pair["index"]
        fixed, moving = read(pair["fixed"]), read(pair["moving"])
        if method == "sitk_affine":
            with Timed() as t:
                tx = _sitk_affine(fixed, moving, spec["sitk_affine_iterations"], 1000 + pair["sample_seed"])
            sitk.WriteTransform(tx, str(out / f"pair{i:02d}.tfm"))
        else:
            aff = _read(Path(spec["work"]) / "sitk_affine" / f"pair{i:02d}.tfm")
            with Timed() as t:
                tx = _sitk_bspline(fixed, moving, aff, spec["sitk_bspline_iterations"], 2000 + pair["sample_seed"])
            sitk.WriteTransform(tx, str(out / f"pair{i:02d}.h5"))
        records.append(t.record(i))
        checkpoint(spec, method, records[-1])
        print(f"  {method} case {i} ({pair['key']}): {t.seconds:.1f} s wall, {t.cpu_seconds:.1f} s CPU, "
              f"{t.peak_mb:.0f} MB", flush=True)
    return {"records": records, "setup_seconds": {}}


def worker_elastix(spec: dict, method: str) -> dict:
    t0 = time.perf_counter()
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(spec["threads"])
    image_type = itk.Image[itk.F, 3]
    method_cls = itk.ElastixRegistrationMethod[image_type, image_type]  # first access: lazy loading of ITK
    load_s = time.perf_counter() - t0
    read = _Images(lambda p: itk.imread(p, itk.F))
    work = Path(spec["work"])
    out = _pair_dir(work, method)
    po = itk.ParameterObject.New()
    if method == "elastix_affine":
        pm = po.GetDefaultParameterMap("affine")
    else:
        pm = po.GetDefaultParameterMap("bspline")
        pm["FinalGridSpacingInPhysicalUnits"] = ["30"]
    if spec.get("elastix_iterations"):
        pm["MaximumNumberOfIterations"] = [str(spec["elastix_iterations"])]
    pm["WriteResultImage"] = ["true"]
    po.AddParameterMap(pm)
    records = []
    for pair in spec["pairs"]:
        i = pair["index"]
        fixed, moving = read(pair["fixed"]), read(pair["moving"])
        reg = method_cls.New()
        reg.SetFixedImage(fixed)
        reg.SetMovingImage(moving)
        reg.SetParameterObject(po)
        reg.SetLogToConsole(False)
        # (threads: ITK global default, set above)
        if method == "elastix_bspline":
            reg.SetInitialTransformParameterFileName(str(work / "elastix_affine" / f"pair{i:02d}_TransformParameters.0.txt"))
        with Timed() as t:
            reg.Update()
        n = reg.GetNumberOfTransforms()
        # the whole chain (initial affine included) as one ITK transform, and this run's own transform alone
        # (transform 0 is the last of the chain)
        itk.transformwrite([reg.ConvertToItkTransform(reg.GetCombinationTransform())], str(out / f"pair{i:02d}_itk.h5"))
        itk.transformwrite([reg.ConvertToItkTransform(reg.GetNthTransform(0))], str(out / f"pair{i:02d}_own_itk.h5"))
        tpo = reg.GetTransformParameterObject()
        own = itk.ParameterObject.New()
        own.AddParameterMap(tpo.GetParameterMap(tpo.GetNumberOfParameterMaps() - 1))
        own.WriteParameterFile(str(out / f"pair{i:02d}_TransformParameters.0.txt"))
        itk.imwrite(reg.GetOutput(), str(out / f"pair{i:02d}_warped.nii.gz"))
        records.append(t.record(i, number_of_transforms=int(n)))
        checkpoint(spec, method, records[-1])
        print(f"  {method} case {i} ({pair['key']}): {t.seconds:.1f} s wall, {t.cpu_seconds:.1f} s CPU, "
              f"{t.peak_mb:.0f} MB", flush=True)
    return {"records": records, "setup_seconds": {"itk_lazy_loading": load_s},
            "itk_elastix_version": _dist_version("itk-elastix"), "itk_version": itk.Version.GetITKVersion()}


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def checkpoint(spec: dict, method: str, record: dict) -> None:
    """Save one finished case at once (an interrupted worker keeps its finished cases for --resume)."""
    path = Path(spec["work"]) / method / "records.json"
    old = json.loads(path.read_text()) if path.exists() else {"method": method, "records": []}
    old["records"] = sorted([r for r in old["records"] if r["index"] != record["index"]] + [record],
                            key=lambda r: r["index"])
    path.write_text(json.dumps(old, indent=1))


def merge_records(path: Path, res: dict) -> dict:
    """Add this worker run's records to the method's records.json (a method runs once per group of cases)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    new_idx = {r["index"] for r in res["records"]}
    records = [r for r in old.get("records", []) if r["index"] not in new_idx] + res["records"]
    merged = {**old, **res, "records": sorted(records, key=lambda r: r["index"])}
    merged["setup_seconds"] = old.get("setup_seconds") or res.get("setup_seconds", {})  # the first run's
    merged["setup_seconds_runs"] = old.get("setup_seconds_runs", []) + [res.get("setup_seconds", {})]
    if "engine_run" in res:
        merged["engine_runs"] = old.get("engine_runs", []) + [res["engine_run"]]
    path.write_text(json.dumps(merged, indent=1))
    return merged


def run_worker(spec_path: str, method: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if method.startswith("istn"):
        res = worker_istn(spec, method)
    elif method.startswith("sitk"):
        res = worker_sitk(spec, method)
    elif method.startswith("elastix"):
        res = worker_elastix(spec, method)
    else:
        raise SystemExit(f"brain3d.py: no worker for {method!r}")
    res["method"] = method
    merge_records(Path(spec["work"]) / method / "records.json", res)
    return 0


# --------------------------------------------------------------------------
# world transforms from each tool's files
# --------------------------------------------------------------------------




def _single(tx: sitk.Transform) -> sitk.Transform:
    """A composite holding one transform -> that transform, downcast (so it can be composed and written)."""
    tx = flatten_transform(tx)
    while isinstance(tx, sitk.CompositeTransform) and tx.GetNumberOfTransforms() == 1:
        tx = flatten_transform(tx.GetNthTransform(0))
    return tx


def _read(path: Path) -> sitk.Transform:
    return _single(sitk.ReadTransform(str(path)))


def world_transform(work: Path, method: str, i: int) -> sitk.Transform:
    """Method ``method``'s result of pair ``i`` as one ITK world transform (fixed -> moving points)."""
    p = f"pair{i:02d}"
    if method == "identity":
        return sitk.Transform(3, sitk.sitkIdentity)
    if method in ("istn_onepass", "istn_refined", "sitk_affine"):
        return _read(work / method / f"{p}.tfm")
    if method in ("istn_bspline", "sitk_bspline"):
        return sitk.ReadTransform(str(work / method / f"{p}.h5"))
    if method == "elastix_affine":
        return _read(work / method / f"{p}_itk.h5")
    if method == "elastix_bspline":  # elastix chain: y = B(A(x)), the initial (affine) transform applied first
        return compose(_read(work / "elastix_affine" / f"{p}_itk.h5"), _read(work / method / f"{p}_own_itk.h5"))
    if method == "ants_affine":
        return _read(work / method / f"{p}_0GenericAffine.mat")
    if method == "ants_syn":  # ANTs [warp, affine]: y = A(x + u(x)), the warp applied first
        field = sitk.Cast(sitk.ReadImage(str(work / method / f"{p}_1Warp.nii.gz")), sitk.sitkVectorFloat64)
        return compose(sitk.DisplacementFieldTransform(field), _read(work / method / f"{p}_0GenericAffine.mat"))
    raise ValueError(method)



def conversion_check(work: Path, method: str, i: int, fixed: sitk.Image, moving: sitk.Image,
                     tx: sitk.Transform, wrong_order: sitk.Transform | None = None) -> dict | None:
    """Compare the tool's own warped image with SimpleITK applying our converted world transform."""
    own = {"elastix_affine": f"pair{i:02d}_warped.nii.gz", "elastix_bspline": f"pair{i:02d}_warped.nii.gz",
           "ants_affine": f"pair{i:02d}_warped.nii.gz", "ants_syn": f"pair{i:02d}_warped.nii.gz"}.get(method)
    if own is None:
        return None
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(work / method / own), sitk.sitkFloat32))
    interp = sitk.sitkBSpline if method.startswith("elastix") else sitk.sitkLinear
    ours = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, interp, 0.0, sitk.sitkFloat32))
    scale = float(np.percentile(sitk.GetArrayViewFromImage(moving), 99))
    inside = (ours != 0) | (theirs != 0)
    diff = np.abs(ours - theirs)[inside] / scale
    out = {"mean_abs_diff": float(diff.mean()), "p99_abs_diff": float(np.percentile(diff, 99)),
           "corr": float(np.corrcoef(ours[inside], theirs[inside])[0, 1])}
    if wrong_order is not None:  # sensitivity: the same two transforms composed the other way round
        bad = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, wrong_order, interp, 0.0, sitk.sitkFloat32))
        out["wrong_order_mean_abs_diff"] = float((np.abs(bad - theirs)[inside] / scale).mean())
    return out


def wrong_order(work: Path, method: str, i: int) -> sitk.Transform | None:
    """The two parts of a chained non-linear result composed in the OTHER order (for the conversion check)."""
    p = f"pair{i:02d}"
    if method == "elastix_bspline":
        return compose(_read(work / method / f"{p}_own_itk.h5"), _read(work / "elastix_affine" / f"{p}_itk.h5"))
    if method == "ants_syn":
        field = sitk.Cast(sitk.ReadImage(str(work / method / f"{p}_1Warp.nii.gz")), sitk.sitkVectorFloat64)
        return compose(_read(work / method / f"{p}_0GenericAffine.mat"), sitk.DisplacementFieldTransform(field))
    return None


# --------------------------------------------------------------------------
# cases: moving variants x storage layouts, self-registration
# --------------------------------------------------------------------------


def _restore(img: sitk.Image, code: str) -> sitk.Image:
    """The same world content stored in another voxel order (``DICOMOrient``: a permutation/flip, no resampling)."""
    out = sitk.DICOMOrient(img, code)
    return out


def eval_volumes(data: Path) -> dict[str, sitk.Image]:
    """The evaluation volumes of ``python -m istn.braindata DATA``: the fixed ICBM 2009c T1, its labels and brain
    mask (``t1 > 0``), and the held-out moving subject Colin27 (``colin27_t1``, ``colin27_t1_brain``, labels,
    brain mask ``colin27_t1_brain > 0``)."""
    ev = data / "eval"
    vols = {"fixed": sitk.ReadImage(str(ev / "icbm2009c_t1.nii.gz"), sitk.sitkFloat32),
            "fixed_labels": sitk.ReadImage(str(ev / "icbm2009c_labels.nii.gz")),
            "brain": sitk.ReadImage(str(ev / "colin27_t1_brain.nii.gz"), sitk.sitkFloat32),
            "labels": sitk.ReadImage(str(ev / "colin27_labels.nii.gz"))}
    vols["fixed_mask"] = sitk.Cast(vols["fixed"] > 0, sitk.sitkUInt8)
    vols["brain_mask"] = sitk.Cast(vols["brain"] > 0, sitk.sitkUInt8)
    for var, name in VARIANTS.items():
        vols[var] = vols["brain"] if var == "brain" else sitk.ReadImage(str(ev / f"{name}.nii.gz"), sitk.sitkFloat32)
    return vols


def place_pair(vols: dict[str, sitk.Image], variant: str, seed: int) -> tuple[sitk.Image, sitk.Image, sitk.Image, dict]:
    """One evaluation pair's moving side: Colin27 (``variant`` brain | whole-head) in the scanner position of
    ``seed`` (`istn.demo.place_in_scanner`), with its labels and brain mask; the two variants of a seed share
    the position exactly. Returns (image, labels, brain mask, perturbation summary)."""
    from istn.demo import place_in_scanner

    moved, moved_labels, tx = place_in_scanner(vols[variant], vols["labels"], seed=seed)
    _, moved_mask, _ = place_in_scanner(vols["brain"], vols["brain_mask"], seed=seed)
    m = np.asarray(tx.GetMatrix()).reshape(3, 3)
    angle = float(np.degrees(np.arccos(np.clip((np.trace(m / np.cbrt(np.linalg.det(m))) - 1) / 2, -1, 1))))
    return moved, moved_labels, moved_mask, {"translation_mm": float(np.linalg.norm(tx.GetTranslation())),
                                             "approx_rotation_deg": angle}


def make_cases(data: Path, work: Path, n_pairs: int, n_layout_pairs: int, layouts: list[str], variants: list[str],
               self_reg: bool, codes: dict[str, str]) -> list[dict]:
    """Write every case's input files (fixed, moving, labels, brain masks in the case's layout) and list them.

    Groups, in the order they run: 0 = the LPS pairs that the other layouts share, 1 = those pairs in the
    other layouts, 2 = self-registration, 3, 4, ... = the remaining LPS pairs, one seed per group (so an
    interrupted run leaves every method with the same pairs but at most one).
    """
    d = work / "cases"
    d.mkdir(parents=True, exist_ok=True)
    vols = eval_volumes(data)
    fixed, fixed_labels, fixed_mask = vols["fixed"], vols["fixed_labels"], vols["fixed_mask"]
    layouts = ["LPS"] + [q for q in layouts if q != "LPS"]

    def write(img: sitk.Image, name: str, layout: str) -> str:
        p = d / f"{name}_{layout}.nii.gz"
        sitk.WriteImage(_restore(img, codes[layout]), str(p))
        return str(p)

    fx = {lay: {"fixed": write(fixed, "fixed", lay), "fixed_labels": write(fixed_labels, "fixed_labels", lay),
                "fixed_mask": write(fixed_mask, "fixed_mask", lay)} for lay in layouts}
    ref = {"ref_fixed": fx["LPS"]["fixed"], "ref_labels": fx["LPS"]["fixed_labels"], "ref_mask": fx["LPS"]["fixed_mask"]}
    cases: list[dict] = []
    n_lps = max(n_pairs, n_layout_pairs)
    placed: dict = {}
    for k in range(n_lps):
        seed = SEED0 + k
        for var in variants:
            moved, moved_labels, moved_mask, pert = place_pair(vols, var, seed)
            placed[(var, seed)] = (moved, moved_labels, moved_mask)
            for lay in layouts if k < n_layout_pairs else ["LPS"]:
                tag = f"{'brain' if var == 'brain' else 'head'}_s{seed}"
                cases.append({"kind": "pair", "variant": var, "layout": lay, "seed": seed, "sample_seed": seed,
                              "key": f"{var}/{lay}/seed {seed}", **fx[lay], **ref,
                              "moving": write(moved, tag, lay), "moving_labels": write(moved_labels, tag + "_labels", lay),
                              "moving_mask": write(moved_mask, tag + "_mask", lay), "perturbation": pert,
                              "group": 0 if (k < n_layout_pairs and lay == "LPS") else 1 if k < n_layout_pairs
                              else 3 + k - n_layout_pairs})
    if self_reg:
        cases.append({"kind": "self", "variant": "fixed", "layout": "LPS", "seed": None, "sample_seed": 900,
                      "key": "self/fixed (ICBM 2009c)", **fx["LPS"], **ref, "moving": fx["LPS"]["fixed"],
                      "moving_labels": fx["LPS"]["fixed_labels"], "moving_mask": fx["LPS"]["fixed_mask"], "group": 2})
        if "whole-head" in variants:
            moved, moved_labels, moved_mask = placed[("whole-head", SEED0)]
            p = {"fixed": write(moved, f"head_s{SEED0}", "LPS"), "fixed_labels": write(moved_labels, f"head_s{SEED0}_labels", "LPS"),
                 "fixed_mask": write(moved_mask, f"head_s{SEED0}_mask", "LPS")}
            cases.append({"kind": "self", "variant": "whole-head", "layout": "LPS", "seed": SEED0, "sample_seed": 901,
                          "key": f"self/whole head (Colin27, seed {SEED0})", **p, "ref_fixed": p["fixed"],
                          "ref_labels": p["fixed_labels"], "ref_mask": p["fixed_mask"], "moving": p["fixed"],
                          "moving_labels": p["fixed_labels"], "moving_mask": p["fixed_mask"], "group": 2})
    cases.sort(key=lambda c: c["group"])  # stable: within a group, seed then variant then layout
    for i, c in enumerate(cases):
        c["index"] = i
    for c in cases:  # the LPS case of the same pair, for the layout agreement
        if c["kind"] == "pair" and c["layout"] != "LPS":
            c["lps_index"] = next(q["index"] for q in cases if q["kind"] == "pair" and q["layout"] == "LPS"
                                  and q["variant"] == c["variant"] and q["seed"] == c["seed"])
    return cases


def group_name(g: int) -> str:
    return {0: "LPS pairs shared with the layouts", 1: "the same pairs in the other layouts",
            2: "self-registration"}.get(g, "one more LPS pair")


# --------------------------------------------------------------------------
# orchestration
# --------------------------------------------------------------------------


def _committed(path: Path) -> bool:
    """Tracked by git and identical to HEAD (so not half-written or uncommitted)."""
    try:
        cwd = str(path.parent)
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", path.name], cwd=cwd, capture_output=True)
        clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", path.name], cwd=cwd, capture_output=True)
        return tracked.returncode == 0 and clean.returncode == 0
    except OSError:
        return False


def wait_for_models(paths: list[Path], until: str | None) -> dict:
    """Wait (until ``HH:MM`` UTC today) for the model files to exist and be committed; report what was found."""
    t0 = time.perf_counter()
    deadline = None
    if until:
        now = _dt.datetime.now(_dt.timezone.utc)
        hh, mm = (int(x) for x in until.split(":"))
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    while True:
        ready = all(p.exists() and _committed(p) and time.time() - p.stat().st_mtime > 30 for p in paths)
        if ready or deadline is None or _dt.datetime.now(_dt.timezone.utc) >= deadline:
            break
        print(f"[{_dt.datetime.now():%H:%M:%S}] waiting for committed ISTN models (until {until} UTC)", flush=True)
        time.sleep(30)
    state = {str(p): ("committed" if p.exists() and _committed(p) else "present, NOT committed" if p.exists()
                      else "MISSING") for p in paths}
    return {"waited_seconds": time.perf_counter() - t0, "state": state}




LOADS: dict = {"samples": [], "workers": []}


def launch(method: str, spec_path: Path, ants_python: str, env: dict, group: int) -> float:
    if method.startswith("ants"):
        cmd = [ants_python, str(Path(__file__).with_name("brain3d_ants.py")), str(spec_path), method]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--spec", str(spec_path)]
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    print(f"[{_dt.datetime.now(_dt.timezone.utc):%H:%M:%S}] {method}, group {group} (load average {load0:.1f})", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    samples = [load0]
    while True:
        try:
            rc = proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            samples.append(os.getloadavg()[0])
            LOADS["samples"].append([_dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S"), samples[-1]])
    if rc != 0:
        raise subprocess.CalledProcessError(rc, cmd)
    samples.append(os.getloadavg()[0])
    LOADS["workers"].append({"method": method, "group": group, "seconds": time.perf_counter() - t0,
                             "end_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                             "load_before": load0, "load_after": samples[-1], "load_mean": float(np.mean(samples)),
                             "load_max": float(np.max(samples)), "nice": os.nice(0)})
    return time.perf_counter() - t0


def _done_indices(work: Path, method: str) -> set[int]:
    rp = work / method / "records.json"
    return {r["index"] for r in json.loads(rp.read_text())["records"]} if rp.exists() else set()


# --------------------------------------------------------------------------
# scoring (world space, whatever the layout)
# --------------------------------------------------------------------------


def _point_map(tx: sitk.Transform, ref: sitk.Image) -> np.ndarray:
    """T(x) - x (mm, LPS) at every voxel of ``ref``, array (z, y, x, 3)."""
    f = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                                          ref.GetSpacing(), ref.GetDirection())
    return sitk.GetArrayFromImage(f)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else float("nan")


def sampled_transform(tx: sitk.Transform, ref: sitk.Image, nonlinear: bool) -> tuple[sitk.Transform, np.ndarray]:
    """``(transform to resample with, T(x) - x at the voxels of ref)``. A non-linear transform is evaluated once
    at the fixed voxels and replaced by that displacement field (sampled at its own grid points: the exact
    values), so warping and the Jacobian do not evaluate the slow transform again."""
    disp = _point_map(tx, ref)
    if not nonlinear:
        return tx, disp
    f = sitk.GetImageFromArray(disp, isVector=True)
    f.CopyInformation(ref)
    return sitk.DisplacementFieldTransform(f), disp


def overlap_scores(tx: sitk.Transform, ref_labels: sitk.Image, ref_mask: sitk.Image, moving_labels: sitk.Image,
                   moving_mask: sitk.Image) -> dict:
    """Moving labels and brain mask warped nearest-neighbour through ``tx`` (fixed -> moving points) onto the
    fixed grid: mean Dice, ASD, HD95 over labels 1..8 (`istn.metrics`), Dice per label, brain-mask Dice."""
    from istn.metrics import label_metrics, mean_metrics

    warped = sitk.Resample(moving_labels, ref_labels, tx, sitk.sitkNearestNeighbor, 0, moving_labels.GetPixelID())
    per_label = label_metrics(ref_labels, warped, LABEL_VALUES)
    wm = sitk.Resample(moving_mask, ref_mask, tx, sitk.sitkNearestNeighbor, 0, moving_mask.GetPixelID())
    return {**mean_metrics(per_label), "dice_per_label": [per_label[v]["dice"] for v in LABEL_VALUES],
            "mask_dice": _dice(sitk.GetArrayViewFromImage(ref_mask) > 0, sitk.GetArrayViewFromImage(wm) > 0)}


def _record_key(work: Path, method: str, i: int) -> list:
    """What a cached score depends on: the records of this method (and its affine) for case i."""
    keys = []
    for m in [method] + ([FROM_AFFINE[method]] if method in FROM_AFFINE else []):
        rp = work / m / "records.json"
        r = {x["index"]: x for x in json.loads(rp.read_text())["records"]}.get(i) if rp.exists() else None
        keys.append(None if r is None else [r["seconds"], r["cpu_seconds"]])
    return keys


def score_case(work: Path, method: str, case: dict, cases: list[dict], rec: dict, read, check: bool) -> dict:
    from istn.metrics import folding_fraction

    i = case["index"]
    ref = read(case["ref_fixed"], sitk.sitkFloat32)
    ref_mask = read(case["ref_mask"], sitk.sitkUInt8)
    mask = sitk.GetArrayViewFromImage(ref_mask) > 0
    tx = world_transform(work, method, i)
    sample_tx, disp = sampled_transform(tx, ref, method in NONLINEAR)
    row = {"index": i, "key": case["key"], "kind": case["kind"], "variant": case["variant"], "layout": case["layout"],
           "seed": case["seed"]}
    if case["kind"] == "self":
        d = np.linalg.norm(disp[mask], axis=1)
        row.update(self_mean_mm=float(d.mean()), self_max_mm=float(d.max()))
    else:
        row.update(overlap_scores(sample_tx, read(case["ref_labels"], sitk.sitkUInt8), ref_mask,
                                  read(case["moving_labels"], sitk.sitkUInt8), read(case["moving_mask"], sitk.sitkUInt8)))
        if case.get("lps_index") is not None and (work / method / "records.json").exists() and \
                case["lps_index"] in _done_indices(work, method):
            other = _point_map(world_transform(work, method, case["lps_index"]), ref)
            dd = np.linalg.norm((disp - other)[mask], axis=1)
            row.update(vs_lps_mean_mm=float(dd.mean()), vs_lps_max_mm=float(dd.max()))
    r = rec.get(i, {"seconds": 0.0, "cpu_seconds": 0.0, "peak_mb": float("nan")})
    row.update(seconds=r["seconds"], cpu_seconds=r["cpu_seconds"], peak_mb=r["peak_mb"])
    for k in ("iterations", "converged", "best_iteration", "warnings"):
        if k in r:
            row[k] = r[k]
    if method in NONLINEAR:
        row["folding"] = folding_fraction(sample_tx, ref, ref_mask)
        a = json.loads((work / FROM_AFFINE[method] / "records.json").read_text())
        ar = {x["index"]: x for x in a["records"]}[i]
        row["stage_seconds"], row["stage_cpu_seconds"] = row["seconds"], row["cpu_seconds"]
        row["seconds"] += ar["seconds"]
        row["cpu_seconds"] += ar["cpu_seconds"]
        row["peak_mb"] = max(row["peak_mb"], ar["peak_mb"])
        if "iterations" in ar:
            row["affine_iterations"] = ar["iterations"]
    if check:
        fixed = read(case["fixed"], sitk.sitkFloat32)
        moving = read(case["moving"], sitk.sitkFloat32)
        chk = conversion_check(work, method, i, fixed, moving, tx, wrong_order(work, method, i))
        if chk is not None:
            row["conversion_check"] = chk
    return row


def score(work: Path, cases: list[dict], methods: list[str]) -> dict:
    """Score every finished (method, case); cached in <work>/<method>/scores.json. Returns {method: [rows]}."""
    cache_imgs: dict = {}

    def read(path: str, pixel):
        if (path, pixel) not in cache_imgs:
            cache_imgs[(path, pixel)] = sitk.ReadImage(path, pixel)
        return cache_imgs[(path, pixel)]

    checked = {}  # the first brain pair of each layout gets the conversion check
    for c in cases:
        if c["kind"] == "pair" and c["variant"] in ("brain", cases[0]["variant"]) and c["layout"] not in checked:
            checked[c["layout"]] = c["index"]
    per = {}
    for method in methods:
        cache_path = work / method / "scores.json"
        cache = {int(k): v for k, v in json.loads(cache_path.read_text()).items()} if cache_path.exists() else {}
        rec = {}
        if method != "identity":
            rp = work / method / "records.json"
            if not rp.exists():
                continue
            rec = {r["index"]: r for r in json.loads(rp.read_text())["records"]}
        rows, new = [], 0
        for c in cases:
            i = c["index"]
            if method != "identity" and (i not in rec or (method in FROM_AFFINE and
                                                          i not in _done_indices(work, FROM_AFFINE[method]))):
                continue
            key = _record_key(work, method, i)
            need_lps = method != "identity" and c.get("lps_index") is not None and c["lps_index"] in rec
            hit = cache.get(i)
            if hit is not None and hit.get("_key") == key and (not need_lps or "vs_lps_mean_mm" in hit["row"]):
                rows.append(hit["row"])
                continue
            row = score_case(work, method, c, cases, rec, read, check=checked.get(c["layout"]) == i)
            cache[i] = {"_key": key, "row": row}
            rows.append(row)
            new += 1
        work.joinpath(method).mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps({str(k): v for k, v in cache.items()}))
        if rows:
            per[method] = rows
            print(f"  scored {method}: {len(rows)} cases ({new} new)", flush=True)
    return per


# --------------------------------------------------------------------------
# summaries and tables
# --------------------------------------------------------------------------


def _stats(rows: list[dict], keys) -> dict:
    s = {}
    for k in keys:
        v = [r[k] for r in rows if r.get(k) is not None and np.isfinite(r[k])]
        if v:
            s[k] = float(np.mean(v))
            s[k + "_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return s


def summarise(per: dict, cases: list[dict], n_layout_pairs: int) -> dict:
    variants = list(dict.fromkeys(c["variant"] for c in cases if c["kind"] == "pair"))
    layouts = list(dict.fromkeys(c["layout"] for c in cases if c["kind"] == "pair"))
    main, lay_s, self_s = {v: {} for v in variants}, {v: {} for v in variants}, {}
    common = {}  # the LPS seeds every method has finished (a partial run compares methods on the same pairs)
    for var in variants:
        sets = [{r["seed"] for r in rows if r["kind"] == "pair" and r["variant"] == var and r["layout"] == "LPS"}
                for m, rows in per.items() if m != "identity"]
        common[var] = set.intersection(*sets) if sets else None
    for method, rows in per.items():
        for var in variants:
            rr = [r for r in rows if r["kind"] == "pair" and r["variant"] == var and r["layout"] == "LPS"
                  and (common[var] is None or r["seed"] in common[var])]
            if rr:
                s = _stats(rr, ("dice", "asd", "hd95", "mask_dice", "seconds", "cpu_seconds", "folding",
                                "stage_seconds", "iterations", "affine_iterations"))
                s["peak_mb"] = float(np.nanmax([r["peak_mb"] for r in rr])) if method != "identity" else None
                s["dice_min"] = float(np.min([r["dice"] for r in rr]))
                s["mask_dice_min"] = float(np.min([r["mask_dice"] for r in rr]))
                s["pairs"] = len(rr)
                s["seeds"] = [r["seed"] for r in rr]
                s["name"] = NAMES[method]
                its = [r["iterations"] for r in rr if "iterations" in r]
                if its:
                    s["iterations_min"], s["iterations_max"] = int(min(its)), int(max(its))
                    s["converged"] = int(sum(bool(r.get("converged")) for r in rr))
                warns = sorted({w for r in rr for w in r.get("warnings", [])})
                s["warnings"] = warns
                s["pairs_with_warnings"] = int(sum(bool(r.get("warnings")) for r in rr))
                if method in FROM_AFFINE:
                    s["from_affine"] = FROM_AFFINE[method]
                main[var][method] = s
            # layouts: the seeds present in every layout for this method
            by = {}
            for r in rows:
                if r["kind"] == "pair" and r["variant"] == var:
                    by.setdefault(r["seed"], {})[r["layout"]] = r
            shared = sorted(sd for sd, d in by.items() if len(d) == len(layouts)) if len(layouts) > 1 else []
            if shared:
                t = {"seeds": shared, "layouts": {}}
                for lay in layouts:
                    t["layouts"][lay] = {"dice": float(np.mean([by[sd][lay]["dice"] for sd in shared])),
                                         "mask_dice": float(np.mean([by[sd][lay]["mask_dice"] for sd in shared]))}
                    vs = [by[sd][lay]["vs_lps_max_mm"] for sd in shared if "vs_lps_max_mm" in by[sd][lay]]
                    if vs:
                        t["layouts"][lay]["vs_lps_mean_mm"] = float(np.mean([by[sd][lay]["vs_lps_mean_mm"] for sd in shared]))
                        t["layouts"][lay]["vs_lps_max_mm"] = float(np.max(vs))
                for k in ("dice", "mask_dice"):  # the largest per-pair spread between layouts
                    t[f"max_diff_{k}"] = float(max(max(by[sd][q][k] for q in layouts) - min(by[sd][q][k] for q in layouts)
                                                   for sd in shared))
                vs = [v["vs_lps_max_mm"] for v in t["layouts"].values() if "vs_lps_max_mm" in v]
                if vs:
                    t["max_vs_lps_mm"] = float(max(vs))
                lay_s[var][method] = t
        for r in rows:
            if r["kind"] == "self":
                self_s.setdefault(method, {})[r["variant"]] = {
                    "mean_mm": r["self_mean_mm"], "max_mm": r["self_max_mm"], "folding": r.get("folding"),
                    "seconds": r["seconds"], "iterations": r.get("iterations"), "warnings": r.get("warnings", [])}
        checks = [r["conversion_check"] | {"layout": r["layout"], "index": r["index"]} for r in rows if "conversion_check" in r]
        if checks:
            for var in main:
                if method in main[var]:
                    main[var][method]["conversion_checks"] = checks
                    break
    return {"main": main, "layouts": lay_s, "self": self_s, "layout_names": layouts}


def _fmt(s: dict, k: str, nd: int, scale: float = 1.0) -> str:
    if k not in s or s[k] is None:
        return "-"
    return f"{s[k] * scale:.{nd}f} ± {s.get(k + '_std', 0.0) * scale:.{nd}f}"


def _main_table(cat: dict) -> str:
    head = "| method | Dice | ASD mm | HD95 mm | brain-mask Dice | folding % | wall s | CPU s | peak MB | ISTN its |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for m in AFFINE + NONLINEAR:
        if m not in cat:
            continue
        s = cat[m]
        its = "-"
        if "iterations_min" in s:
            its = f"{s['iterations_min']}-{s['iterations_max']}" if s["iterations_min"] != s["iterations_max"] else str(s["iterations_min"])
            if s.get("pairs_with_warnings"):
                its += f" ({s['pairs_with_warnings']} warned)"
        cols = [s["name"], _fmt(s, "dice", 3), _fmt(s, "asd", 2), _fmt(s, "hd95", 2), _fmt(s, "mask_dice", 3),
                _fmt(s, "folding", 3, 100.0) if m in NONLINEAR else "-",
                "-" if m == "identity" else _fmt(s, "seconds", 1), "-" if m == "identity" else _fmt(s, "cpu_seconds", 1),
                "-" if s["peak_mb"] is None else f"{s['peak_mb']:.0f}", its]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def _layout_table(cat: dict, layouts: list[str]) -> str:
    head = ("| method | " + " | ".join(f"Dice {q}" for q in layouts) + " | max ΔDice | "
            + " | ".join(f"mask Dice {q}" for q in layouts) + " | max Δmask | max \\|T − T_LPS\\| mm |")
    lines = [head, "|" + " --- |" * (head.count(" | ") + 1)]
    for m in AFFINE + NONLINEAR:
        if m not in cat:
            continue
        t = cat[m]
        cols = [NAMES[m]] + [f"{t['layouts'][q]['dice']:.3f}" for q in layouts] + [f"{t['max_diff_dice']:.3f}"]
        cols += [f"{t['layouts'][q]['mask_dice']:.3f}" for q in layouts] + [f"{t['max_diff_mask_dice']:.3f}"]
        cols.append(_mm(t["max_vs_lps_mm"]) if "max_vs_lps_mm" in t else "-")
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def _mm(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}" if abs(x) < 1e-3 else f"{x:.3f}"


def _short(w: str, n: int = 110) -> str:
    w = w.replace("|", "/")
    return w if len(w) <= n else w[: n - 3] + "..."


def _self_table(self_s: dict) -> str:
    cols = [("fixed", "fixed ICBM 2009c → itself"), ("whole-head", "whole-head Colin27 → itself")]
    present = [c for c in cols if any(c[0] in v for v in self_s.values())]
    head = "| method | " + " | ".join(f"{t}: mean mm | max mm" for _, t in present) + " | notes |"
    lines = [head, "|" + " --- |" * (1 + 2 * len(present) + 1)]
    for m in AFFINE + NONLINEAR:
        if m not in self_s:
            continue
        v = self_s[m]
        row = [NAMES[m]]
        notes = []
        for k, _ in present:
            if k in v:
                row += [_mm(v[k]["mean_mm"]), _mm(v[k]["max_mm"])]
                note = []
                if v[k].get("iterations") is not None:
                    note.append(f"{v[k]['iterations']} its")
                if v[k].get("warnings"):
                    note.append("engine warning: " + "; ".join(_short(w.split(" (")[0], 60) for w in v[k]["warnings"]))
                if v[k].get("folding"):
                    note.append(f"folding {100 * v[k]['folding']:.3f} %")
                if note:
                    notes.append(f"{k}: " + ", ".join(note))
            else:
                row += ["-", "-"]
        lines.append("| " + " | ".join(row + ["; ".join(notes) or "-"]) + " |")
    return "\n".join(lines)


STRUCTURES = ("L caudate", "R caudate", "L putamen", "R putamen", "L pallidum", "R pallidum", "L thalamus",
              "R thalamus")


def _structure_table(per: dict, variant: str, seeds: list) -> str:
    lines = ["| method | " + " | ".join(STRUCTURES) + " |", "|" + " --- |" * (len(STRUCTURES) + 1)]
    for m in AFFINE + NONLINEAR:
        rows = [r for r in per.get(m, []) if r["kind"] == "pair" and r["variant"] == variant and r["layout"] == "LPS"
                and r["seed"] in seeds]
        if rows:
            d = np.mean([r["dice_per_label"] for r in rows], axis=0)
            lines.append(f"| {NAMES[m]} | " + " | ".join(f"{v:.3f}" for v in d) + " |")
    return "\n".join(lines)


def verdict(c: dict) -> list[str]:
    out = []
    for cat, istn, label in ((AFFINE, "istn_refined", "affine"), (NONLINEAR, "istn_bspline", "non-linear")):
        classical = {m: c[m] for m in cat if m in c and not m.startswith("istn") and m != "identity"}
        if istn not in c or not classical:
            out.append(f"- {label}: not comparable in this run (methods missing).")
            continue
        best = max(classical, key=lambda m: c[m]["dice"])
        b, s = c[best], c[istn]
        fastest = min(classical, key=lambda m: c[m]["seconds"])
        ok_dice = s["dice"] >= b["dice"] - 1e-9
        ok_time = s["seconds"] < b["seconds"]
        word = "MEETS" if ok_dice and ok_time else "does NOT meet"
        out.append(
            f"- {label}: ISTN {word} the bar. Dice {s['dice']:.3f} ± {s['dice_std']:.3f} vs the best classical "
            f"method ({b['name']}) {b['dice']:.3f} ± {b['dice_std']:.3f} (difference {s['dice'] - b['dice']:+.3f}); "
            f"brain-mask Dice {s['mask_dice']:.3f} vs {b['mask_dice']:.3f}; "
            f"wall time {s['seconds']:.1f} s vs {b['seconds']:.1f} s ({'faster' if ok_time else 'slower'}); "
            f"CPU {s['cpu_seconds']:.1f} s vs {b['cpu_seconds']:.1f} s. Fastest classical: {c[fastest]['name']} "
            f"{c[fastest]['seconds']:.1f} s, Dice {c[fastest]['dice']:.3f}.")
    return out


def _load_text(m: dict) -> str:
    loads = m.get("load_average_1min", {})
    s = [v for _, v in loads.get("samples", [])] + [w[k] for w in loads.get("workers", []) for k in ("load_before", "load_after")]
    if not s:
        return "load not recorded"
    txt = (f"1-minute load average while the workers ran (sampled every 10 s, {len(s)} samples): mean {np.mean(s):.1f}, "
           f"median {np.median(s):.1f}, max {np.max(s):.1f} (the benchmark's own {m['threads']} threads account for ~{m['threads']})")
    if np.median(s) > m["threads"] + 1.0:
        txt += "; SHARED with other jobs: wall times are inflated and noisy, CPU seconds are the steadier cost"
    return txt


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def engine_state() -> dict:
    """The commit of the engine and models, and which of their files differ from it (the checkout is shared)."""
    dirty = _git("status", "--porcelain", "--", "ISTNRegistration/istn", "ISTNRegistration/Resources/Models").splitlines()
    return {"head": _git("rev-parse", "HEAD"), "head_subject": _git("log", "-1", "--format=%s"),
            "engine_or_models_modified": [l.strip() for l in dirty],
            "models_last_commit": _git("log", "-1", "--format=%h %cI %s", "--", "ISTNRegistration/Resources/Models"),
            "engine_last_commit": _git("log", "-1", "--format=%h %cI %s", "--", "ISTNRegistration/istn")}


def write_report(path_md: Path, path_json: Path, summary: dict, meta: dict, per: dict, cases: list[dict]) -> None:
    data = {**summary, "meta": meta, "cases": cases, "per_case": per}
    path_json.write_text(json.dumps(data, indent=1))
    m = meta
    main, lay = summary["main"], summary["layouts"]
    layouts = summary["layout_names"]
    setup = "; ".join(f"{k}: " + ", ".join(f"{kk} {vv:.1f} s" for kk, vv in v.items()) for k, v in m["setup_seconds"].items() if v)
    checks = []
    for var in main:
        for k, s in main[var].items():
            for c in s.get("conversion_checks", []):
                checks.append(f"{NAMES[k]} ({c['layout']}) {c['mean_abs_diff']:.1e} (corr {c['corr']:.6f}"
                              + (f"; other composition order {c['wrong_order_mean_abs_diff']:.3f}" if "wrong_order_mean_abs_diff" in c else "")
                              + ")")
    models = m.get("istn_models") or {}
    model_lines = [f"  - `{v.get('path')}`: {v.get('describe', 'MISSING')} (created {v.get('created')}, training step "
                   f"{v.get('step')}, sha256 {v.get('sha256')}, refinement metadata {json.dumps(v.get('refinement'))})"
                   for v in models.values()]
    es = m["engine"]
    todo = m.get("incomplete") or []
    runs = m.get("istn_engine_runs") or []
    used = sorted({(r["head"], tuple(r["engine_or_models_modified"])) for r in runs})
    if not runs:
        istn_engine = "ISTN not run"
    elif len(used) == 1:
        h, dirty = used[0]
        istn_engine = (f"every ISTN registration ran at commit `{h}`"
                       + (f" with working-tree changes to {', '.join('`' + x + '`' for x in dirty)}" if dirty
                          else " (engine and model files as committed)"))
    else:
        istn_engine = ("ISTN registrations ran at SEVERAL engine states: "
                       + "; ".join(f"`{h[:10]}`{' + ' + str(len(d)) + ' modified files' if d else ''}" for h, d in used))
    sections = []
    for var in main:
        n = max((s["pairs"] for s in main[var].values()), default=0)
        seeds = max((s["seeds"] for s in main[var].values()), key=len, default=[])
        sections.append(f"### Moving: {VARIANT_TEXT[var]} ({n} pairs, LPS storage, seeds {', '.join(map(str, seeds))})\n\n"
                        f"{_main_table(main[var])}\n\nVerdict (bar: ISTN matches or beats the best classical Dice "
                        f"in its category while taking less wall time):\n\n" + "\n".join(verdict(main[var])))
    lay_sections = []
    for var in lay:
        if lay[var]:
            seeds = next(iter(lay[var].values()))["seeds"]
            lay_sections.append(f"### Moving: {VARIANT_TEXT[var]} (seeds {', '.join(map(str, seeds))}; means over these pairs)\n\n"
                                + _layout_table(lay[var], layouts))
    struct = "\n\n".join(f"### {VARIANT_TEXT[var]}\n\n"
                         f"{_structure_table(per, var, max((s['seeds'] for s in main[var].values()), key=len, default=[]))}"
                         for var in main)
    ists = []
    for var in main:
        for k in ("istn_onepass", "istn_refined", "istn_bspline"):
            s = main[var].get(k)
            if s and "iterations" in s:
                ists.append(f"- {VARIANT_TEXT[var]}, {NAMES[k]}: iterations run {s['iterations']:.1f} on average "
                            f"({s['iterations_min']}-{s['iterations_max']}), {s.get('converged', 0)}/{s['pairs']} stopped by the "
                            f"tolerance; warnings: {'; '.join(s['warnings']) if s['warnings'] else 'none'}.")
    for k in ("istn_onepass", "istn_refined", "istn_bspline"):
        rows = per.get(k, [])
        if rows and any("iterations" in r for r in rows):
            warned = [r for r in rows if r.get("warnings")]
            kinds = sorted({_short(w.split(" (")[0], 60) for r in warned for w in r["warnings"]})
            ists.append(f"- {NAMES[k]}, all {len(rows)} cases (every variant, layout and self-registration): iterations "
                        f"{min(r['iterations'] for r in rows)}-{max(r['iterations'] for r in rows)}, "
                        f"{sum(bool(r.get('converged')) for r in rows)} stopped by the tolerance; engine warnings on "
                        f"{len(warned)} ({', '.join(sorted({r['key'] for r in warned})) or '-'})"
                        + (f": {'; '.join(kinds)}" if kinds else "") + ".")
    txt = f"""# ISTN vs classical registration on the files users bring: real 3D brain MRI (held-out Colin27 -> ICBM 2009c)

Generated by `benchmarks/brain3d.py` on {m['date']}{' -- PARTIAL RUN, missing: ' + '; '.join(todo) if todo else ''}.
Engine and models: {istn_engine}; HEAD when this report was written `{es['head']}` ({es['head_subject']}){'' if m['engine_start']['head'] == es['head'] else '; HEAD when the run started `' + m['engine_start']['head'] + '`'}.
Machine: {m['cpus']} CPU cores, shared; {_load_text(m)}.

Every method gets the same input files. Moving: Colin27 (held out) placed in scanner positions by seeded random
affines (10-20 deg, 10-20 mm, ±10 %; `istn.demo.place_in_scanner`), as **brain-extracted** and **whole-head**
images (same positions), registered to ICBM 2009c (skull-stripped), 2 mm grids. Storage layouts: LPS (as
prepared), RAS (`sitk.DICOMOrient(img, "RAS")`) and sagittal (`DICOMOrient` "{m['sagittal_code']}"): fixed, moving, labels and
masks re-stored alike. Scores in world space: the moving labels / brain mask as stored are warped
nearest-neighbour through each method's world transform (fixed -> moving) onto the LPS fixed grid. Dice, ASD
(average symmetric surface distance, mm) and HD95 (mm): mean over labels 1..8 (L/R caudate, putamen,
pallidum, thalamus; Colin27 AAL vs ICBM 2009c HCPex labels, two atlases, so the Dice ceiling is well below 1);
brain-mask Dice: `icbm2009c_t1 > 0` vs Colin27's `colin27_t1_brain > 0` warped (harm outside the structures).
Folding: % of fixed brain voxels with Jacobian determinant <= 0. Mean ± std over pairs. Wall and CPU seconds:
the registration call alone; non-linear rows cumulative (own affine + non-linear stage). Peak MB: worker's
peak resident memory during the registration (libraries included). ISTN its: refinement iterations run.

## 1. Main results, per moving variant

{(chr(10) * 2).join(sections)}

## 2. Storage layouts: the same pairs stored {" / ".join(layouts)}

Mean over the shared pairs of the per-pair Dice (labels 1..8) and brain-mask Dice in each layout; max Δ: the
largest per-pair difference between layouts; max |T − T_LPS|: the largest distance (mm) over the fixed brain
mask between the method's world transform from a re-stored pair and from the LPS pair (0 = identical result).

{(chr(10) * 2).join(lay_sections) if lay_sections else '(no layout pairs finished)'}

## 3. Self-registration: an image registered to itself (distance from identity)

|T(x) − x| in mm over the image's brain mask (fixed: `icbm2009c_t1 > 0`; whole head: Colin27's brain mask
in its scanner position, seed {SEED0}), LPS storage.

{_self_table(summary['self']) if summary['self'] else '(not run)'}

## ISTN refinement (engine defaults from the models' metadata)

{chr(10).join(ists) if ists else '-'}

## Dice per structure (LPS pairs, mean over pairs)

{struct}

## Setup

- Machine: {m['machine']}; {m['cpus']} CPU cores. Every tool ran with {m['threads']} threads (torch threads,
  SimpleITK/ITK global default threads, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS for ANTs), one method at a time,
  each method in its own worker subprocess per group of cases.
- Command: `{m['command']}`; total runtime {m['total_seconds'] / 60:.1f} min (started {m.get('started_utc')}, scoring included).
- Engine/models: HEAD `{es['head']}`; last commit touching the models: {es['models_last_commit']}; the engine: {es['engine_last_commit']}.
- Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.
- ISTN models:
{chr(10).join(model_lines) if model_lines else '  - (not run)'}
- One-off costs outside the per-pair timing (first worker of each method): {setup or '-'}.
- Worker runs (method/group: minutes, 1-min load mean/max): {', '.join(f"{w['method']}/{w['group']} {w['seconds'] / 60:.1f} ({w['load_mean']:.1f}/{w['load_max']:.1f})" for w in m['load_average_1min'].get('workers', []))}.
- Data: `{m['data']}` (md5 of the eval volumes in brain3d.json).
- Settings: SimpleITK affine Mattes MI 50 bins, 10 % random sampling, RegularStepGradientDescent lr 2 /
  {m['settings']['sitk_affine_iterations']} its, scales from physical shift, shrink 4-2-1, smoothing 2-1-0 mm, MOMENTS centred
  initialiser; SimpleITK B-spline 30 mm mesh, MI, 5 % sampling, GradientDescentLineSearch lr 5 /
  {m['settings']['sitk_bspline_iterations']} its, shrink 2-1, smoothing 1-0 mm (sampling seeds 1000/2000 + scanner seed, the same in every
  layout); elastix default affine map, then default B-spline map with FinalGridSpacingInPhysicalUnits 30 from the
  affine's parameter file{'' if not m['settings'].get('elastix_iterations') else ' (MaximumNumberOfIterations ' + str(m['settings']['elastix_iterations']) + ')'};
  ANTs `Affine` (defaults, {'sampling seed ' + str(m['settings']['ants_seed']) if m['settings'].get('ants_seed') is not None else 'unseeded sampling'}), then `SyNOnly` from it with iterations {'x'.join(map(str, m['settings']['syn_iterations']))};
  ISTN {('up to ' + str(m['settings']['istn_iterations']) + ' refinement iterations, everything else') if m['settings'].get('istn_iterations') else 'refinement iterations, polish, lr, bending weight, tolerance and the rest'} from the models' metadata, CPU.
- Transform conversion check (tool's own warped image vs SimpleITK applying our converted world transform,
  first brain pair of each layout, mean |difference| / 99th-percentile intensity): {'; '.join(checks) if checks else '-'}.
"""
    path_md.write_text(txt)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=None, help="scanner seeds in LPS storage (default 5; 1 with --quick)")
    p.add_argument("--layout-pairs", type=int, default=None,
                   help="of those, how many also in every other layout (default 2; 1 with --quick)")
    p.add_argument("--layouts", default="LPS,RAS,sagittal", help="storage layouts (LPS always runs)")
    p.add_argument("--sagittal-code", default="ASL", help="DICOMOrient code of the sagittal layout (default ASL)")
    p.add_argument("--variants", default="brain,whole-head", help="moving variants: brain, whole-head")
    p.add_argument("--no-self", action="store_true", help="leave out the self-registration cases")
    p.add_argument("--quick", action="store_true", help="1 pair, fewer iterations, results into runs/brain3d-quick")
    p.add_argument("--methods", default=",".join(AFFINE + NONLINEAR))
    p.add_argument("--data", default=os.environ.get("ISTN_BRAINDATA", "/work/braindata"))
    p.add_argument("--affine-model", default=str(DEFAULT_MODELS / "brain-t1-affine.pt"))
    p.add_argument("--bspline-model", default=str(DEFAULT_MODELS / "brain-t1-bspline.pt"))
    p.add_argument("--ants-python", default="/work/venv-ants/bin/python")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=None, help="folder of brain3d.{md,json} (default benchmarks/results)")
    p.add_argument("--work", default=None, help="folder of the transforms and images (default runs/brain3d[-quick])")
    p.add_argument("--score-only", action="store_true", help="re-score an existing work folder (report only)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in its work folder: same cases, finished (method, case) kept")
    p.add_argument("--wait-models", default=None, metavar="HH:MM",
                   help="before the first ISTN worker, wait until then (UTC) for the model files to be committed")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return run_worker(a.spec, a.worker)

    t_start = time.perf_counter()
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in AFFINE + NONLINEAR]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {AFFINE + NONLINEAR}")
    methods = [m for m in AFFINE + NONLINEAR if m in methods]
    layouts = [q.strip() for q in a.layouts.split(",") if q.strip()]
    variants = [q.strip() for q in a.variants.split(",") if q.strip()]
    if set(layouts) - {"LPS", "RAS", "sagittal"} or set(variants) - set(VARIANTS) or not variants:
        p.error("layouts: LPS, RAS, sagittal; variants: brain, whole-head")
    codes = {**LAYOUT_CODES, "sagittal": a.sagittal_code}
    work = Path(a.work or REPO / "runs" / ("brain3d" + ("-quick" if a.quick else "")))
    for m in methods:
        if m in FROM_AFFINE and FROM_AFFINE[m] not in methods and not (work / FROM_AFFINE[m] / "records.json").exists():
            p.error(f"{m} starts from {FROM_AFFINE[m]}: list it too")
    out = Path(a.out or (REPO / "runs" / "brain3d-quick" if a.quick else REPO / "benchmarks" / "results"))
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(a.data)
    spec = {
        "data": str(data), "work": str(work), "threads": a.threads,
        "affine_model": str(Path(a.affine_model).resolve()), "bspline_model": str(Path(a.bspline_model).resolve()),
        "istn_iterations": 10 if a.quick else None,  # None: each model's own settings (refinement metadata)
        "sitk_affine_iterations": 50 if a.quick else 200,
        "sitk_bspline_iterations": 10 if a.quick else 30,
        "elastix_iterations": 64 if a.quick else None,
        "syn_iterations": [20, 10, 0] if a.quick else [100, 70, 50, 20],
        "ants_seed": 1,  # ANTs' metric sampling (brain3d_ants.py); a resumed older run keeps its own (none)
        "sagittal_code": a.sagittal_code,
    }
    spec_path = work / "spec.json"
    command = "python benchmarks/brain3d.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.score_only or a.resume:
        old_spec = json.loads(spec_path.read_text())
        if not a.score_only:
            # the models and how ISTN runs them follow this command (delete the istn_* folders to re-run those rows)
            old_spec.update({k: spec[k] for k in ("affine_model", "bspline_model", "threads", "istn_iterations")})
        spec = old_spec
        data = Path(spec["data"])
    else:
        n_pairs = a.pairs or (1 if a.quick else 5)
        n_lay = a.layout_pairs if a.layout_pairs is not None else (1 if a.quick else 2)
        spec["cases"] = make_cases(data, work, n_pairs, min(n_lay, n_pairs), layouts, variants, not a.no_self, codes)
        spec["n_layout_pairs"] = min(n_lay, n_pairs)
        spec["started_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        spec["engine_start"] = engine_state()
        for f in ("records.json", "scores.json"):  # a fresh run into an old work folder starts clean
            for q in work.glob(f"*/{f}"):
                q.unlink()
        for f in ("loads.json",):
            (work / f).unlink(missing_ok=True)
    spec.setdefault("commands", []).append(command + (" (report only)" if a.score_only else ""))
    spec_path.write_text(json.dumps(spec, indent=1))
    cases = spec["cases"]
    LOADS.update(json.loads((work / "loads.json").read_text()) if (work / "loads.json").exists() else {})

    def report() -> Path:
        per = score(work, cases, methods)
        summary = summarise(per, cases, spec["n_layout_pairs"])
        path = write_all(out, work, spec, methods, per, summary, cases, a, t_start)
        return path

    if not a.score_only:
        env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(spec["threads"]),
                   OMP_NUM_THREADS=str(spec["threads"]), PYTHONUNBUFFERED="1")
        order = [m for m in methods if m != "identity" and not m.startswith("istn")]
        order += [m for m in methods if m.startswith("istn")]
        for g in sorted({c["group"] for c in cases}):
            gcases = [c for c in cases if c["group"] == g]
            print(f"== group {g}: {group_name(g)} ({len(gcases)} cases)", flush=True)
            for m in order:
                todo = [c for c in gcases if c["index"] not in _done_indices(work, m)]
                if not todo:
                    print(f"{m}: group {g} complete, kept", flush=True)
                    continue
                if m.startswith("istn") and "model_wait" not in spec:
                    spec["model_wait"] = wait_for_models([Path(spec["affine_model"]), Path(spec["bspline_model"])],
                                                         a.wait_models)
                    spec_path.write_text(json.dumps(spec, indent=1))
                gspec = {k: v for k, v in spec.items() if k != "cases"} | {"pairs": todo}
                gpath = work / f"spec_group{g}_{m}.json"
                gpath.write_text(json.dumps(gspec, indent=1))
                try:
                    launch(m, gpath, a.ants_python, env, g)
                except subprocess.CalledProcessError as e:  # one tool failing must not stop the others
                    print(f"{m}: worker FAILED ({e}); its remaining cases are missing from the tables", flush=True)
                    spec.setdefault("failures", []).append(f"{m} group {g}: exit {e.returncode}")
                    spec_path.write_text(json.dumps(spec, indent=1))
                (work / "loads.json").write_text(json.dumps(LOADS))
            print(f"scoring after group {g}", flush=True)
            path = report()
            print(f"wrote {path} ({(time.perf_counter() - t_start) / 60:.1f} min)", flush=True)
    else:
        path = report()
        print(f"wrote {path}")
    return 0


def write_all(out: Path, work: Path, spec: dict, methods: list[str], per: dict, summary: dict, cases: list[dict],
              a, t_start: float) -> Path:
    setup, models, versions = {}, None, {"python": platform.python_version(), "SimpleITK": sitk.Version_VersionString()}
    import torch

    versions["torch"] = torch.__version__
    for m in methods:
        rp = work / m / "records.json"
        if m == "identity" or not rp.exists():
            continue
        info = json.loads(rp.read_text())
        if info.get("setup_seconds"):
            setup[m] = info["setup_seconds"]
        if "models" in info:
            models = info["models"]
        if "itk_elastix_version" in info:
            versions["itk-elastix"] = info["itk_elastix_version"]
            versions["ITK"] = info["itk_version"]
        if "ants_version" in info:
            versions["antspyx"] = info["ants_version"]
    istn_runs = []
    for m in methods:
        rp = work / m / "records.json"
        if m.startswith("istn") and rp.exists():
            istn_runs += [r | {"method": m} for r in json.loads(rp.read_text()).get("engine_runs", [])]
    incomplete = []
    for m in methods:
        if m == "identity":
            continue
        missing = [c["key"] for c in cases if c["index"] not in _done_indices(work, m)]
        if missing:
            incomplete.append(f"{m}: {len(missing)} of {len(cases)} cases")
    cpu_model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                      if l.startswith("model name")), platform.processor())
    data = Path(spec["data"])
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_model}, {platform.system()} {platform.release()}",
        "cpus": os.cpu_count(), "threads": spec["threads"],
        "command": " ; then ".join(spec["commands"]),
        "started_utc": spec.get("started_utc"),
        "total_seconds": ((_dt.datetime.now(_dt.timezone.utc) - _dt.datetime.fromisoformat(spec["started_utc"]))
                          .total_seconds() if spec.get("started_utc") else time.perf_counter() - t_start),
        "setup_seconds": setup, "istn_models": models, "versions": versions,
        "model_wait": spec.get("model_wait"), "failures": spec.get("failures", []),
        "engine": engine_state(), "engine_start": spec.get("engine_start") or engine_state(),
        "sagittal_code": spec.get("sagittal_code", "ASL"),
        "settings": {k: spec.get(k) for k in ("istn_iterations", "sitk_affine_iterations", "sitk_bspline_iterations",
                                          "elastix_iterations", "syn_iterations", "ants_seed")},
        "data": str(data),
        "data_md5": {n: hashlib.md5((data / "eval" / f"{n}.nii.gz").read_bytes()).hexdigest()
                     for n in ("icbm2009c_t1", "icbm2009c_labels", "colin27_t1_brain", "colin27_t1", "colin27_labels")
                     if (data / "eval" / f"{n}.nii.gz").exists()},
        "load_average_1min": LOADS, "load_now": list(os.getloadavg()), "istn_engine_runs": istn_runs,
        "incomplete": incomplete,
    }
    write_report(out / "brain3d.md", out / "brain3d.json", summary, meta, per, cases)
    return out / "brain3d.md"


if __name__ == "__main__":
    sys.exit(main())
