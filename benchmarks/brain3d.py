#!/usr/bin/env python3
"""ISTN side by side with classical registration on real 3D brain MRI (held-out Colin27 -> ICBM 2009c).

Protocol
--------
- Fixed: ICBM 2009c T1 (skull-stripped) with its HCPex-derived labels, from ``python -m istn.braindata DIR``
  (``DIR/eval/icbm2009c_{t1,labels}.nii.gz``, 2 mm).
- Moving: Colin27 (never in any training set), BRAIN-EXTRACTED (``colin27_t1_brain``) by default, the same
  input for every method: the fixed image is skull-stripped and intensity-based affine registration of a
  whole head to a stripped brain degrades badly (peers.md). ``--moving whole-head`` runs the whole-head
  variant (``colin27_t1``) instead.
- Each pair: Colin27 placed in a scanner position by a seeded random affine
  (`istn.braindata.scanner_perturbation`, 10-20 deg, 10-20 mm, +-10 %; seeds 101, 102, ...), image
  resampled linearly and labels nearest-neighbour onto a 20 mm padded grid (`istn.demo.place_in_scanner`).
- Scored: labels 1..8 (L/R caudate, putamen, pallidum, thalamus). Every method's result is expressed as one
  ITK world transform (fixed -> moving points) and the moving labels are warped through it with the SAME
  nearest-neighbour resampling onto the fixed grid. Per pair: Dice, ASD (real average symmetric surface
  distance, mm) and HD95 (mm), each the mean over the 8 labels (`istn.metrics`); folding = fraction of fixed
  brain voxels (fixed > 0) with Jacobian determinant <= 0 of the composed world transform. Tables give mean
  and std over pairs.

Methods (`--methods`, comma separated; default all)
---------------------------------------------------
affine:     identity, istn_onepass, istn_refined (50 its), sitk_affine, elastix_affine, ants_affine
non-linear: istn_bspline (from istn_refined), sitk_bspline (from sitk_affine), elastix_bspline (from
            elastix_affine), ants_syn (from ants_affine)

- SimpleITK affine: Mattes MI 50 bins, 10 % random sampling, RegularStepGradientDescent lr 2 / 200 its,
  scales from physical shift, shrink 4-2-1, smoothing 2-1-0 mm, centred initialiser (MOMENTS: centres of
  mass, as ANTs' initialiser). B-spline: 30 mm mesh, Mattes MI, 5 % sampling, GradientDescentLineSearch
  lr 5 / 30 its, shrink 2-1 (smoothing 1-0 mm), the affine as moving initial transform: y = A(B(x)).
- elastix (itk-elastix): default ``affine`` parameter map; then default ``bspline`` map with
  ``FinalGridSpacingInPhysicalUnits 30`` started from the affine's TransformParameters file; converted to
  ITK transforms and composed y = B(A(x)).
- ANTs (antspyx, own venv, `brain3d_ants.py`): ``Affine``; then ``SyNOnly`` with iterations 100x70x50x20
  (peers.md: the default 40x20x0 under-fits) from the ANTs affine; [1Warp, 0GenericAffine] composed
  y = A(x + u(x)).
- ISTN: ``register(fixed, moving, affine_model, iterations=0)`` (one pass) / ``iterations=50`` (refined), then
  ``register(fixed, moving, bspline_model, iterations=50, initial_transform=refined affine)``.

Costs: each method runs in its own worker subprocess over all pairs (sequentially, one method at a time).
Per registration: wall seconds and CPU seconds (``time.process_time``: all threads of the worker) of the
registration call alone, and the worker's peak resident memory during it (VmHWM reset through
/proc/self/clear_refs just before the call, read just after: libraries loaded by the worker count, the
image reading before does not). One-off costs outside the per-pair timing are reported separately: the
lazy loading of ITK/elastix (first access of ``itk.ElastixRegistrationMethod``), ``import ants``, and for
ISTN loading the TorchScript models plus one short warm-up registration (TorchScript's profiling executor
optimises during the first calls). Non-linear times are CUMULATIVE (the method's own affine + its
non-linear stage); ``stage_seconds`` has the non-linear stage alone. All tools get the same thread count
(``--threads``, default: the machine's cores).

Conversion check: for elastix and ANTs the world transform built from the tool's files is applied with
SimpleITK and compared with the tool's own warped image of the first pair (elastix: cubic B-spline
interpolation, ANTs: linear, as each tool resamples); the normalised mean absolute difference is reported.

Install (once)
--------------
    pip install -r benchmarks/requirements-brain3d.txt    # itk-elastix 0.25.4 into the project venv (1.6 GB)
    python -m venv /work/venv-ants                        # antspyx downgrades numpy/scipy: its own venv
    /work/venv-ants/bin/pip install -r benchmarks/requirements-ants.txt
    python -m istn.braindata /work/braindata              # the evaluation volumes

Run
---
    python benchmarks/brain3d.py                          # 10 pairs -> benchmarks/results/brain3d.{md,json}
    python benchmarks/brain3d.py --quick                  # 2 pairs, fewer iterations -> runs/brain3d-quick
    python benchmarks/brain3d.py --pairs 3 --methods identity,sitk_affine,sitk_bspline --out runs/b3
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
    "istn_refined": "ISTN affine, refined (50 its)",
    "sitk_affine": "SimpleITK affine",
    "elastix_affine": "elastix affine",
    "ants_affine": "ANTs Affine",
    "istn_bspline": "ISTN B-spline, refined (50 its)",
    "sitk_bspline": "SimpleITK B-spline 30 mm",
    "elastix_bspline": "elastix B-spline 30 mm",
    "ants_syn": "ANTs SyN (SyNOnly 100x70x50x20)",
}
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


# --------------------------------------------------------------------------
# workers (one process per method, all pairs)
# --------------------------------------------------------------------------


def worker_istn(spec: dict, method: str) -> dict:
    import torch

    from istn.export import load_model
    from istn.registration import register

    threads = spec["threads"]
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    models = {k: _model_info(spec[k]) for k in ("affine_model", "bspline_model")}  # what is loaded (files may change)
    affine_model = load_model(spec["affine_model"])
    bspline_model = load_model(spec["bspline_model"]) if method == "istn_bspline" else None
    load_s = time.perf_counter() - t0
    fixed = sitk.ReadImage(spec["fixed"], sitk.sitkFloat32)
    its = spec["istn_iterations"]
    out = _pair_dir(Path(spec["work"]), method)
    # warm-up (untimed, reported): TorchScript optimises the graph during the first calls
    m0 = sitk.ReadImage(spec["pairs"][0]["moving"], sitk.sitkFloat32)
    t0 = time.perf_counter()
    model = bspline_model if method == "istn_bspline" else affine_model
    register(fixed, m0, model, iterations=2, device="cpu", threads=threads)
    warm_s = time.perf_counter() - t0
    records = []
    for pair in spec["pairs"]:
        i = pair["index"]
        moving = sitk.ReadImage(pair["moving"], sitk.sitkFloat32)
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
        records.append(t.record(i, timings=res.timings, loss_one_pass=res.loss_one_pass, loss_final=res.loss_final))
        print(f"  {method} pair {i}: {t.seconds:.1f} s wall, {t.cpu_seconds:.1f} s CPU, {t.peak_mb:.0f} MB", flush=True)
    return {"records": records, "setup_seconds": {"load_models": load_s, "warmup_registration": warm_s},
            "models": models}


def _model_info(path: str) -> dict:
    from istn.export import load_model

    p = Path(path)
    if not p.exists():
        return {"path": str(p), "missing": True}
    m = load_model(p)
    tr = m.meta.get("training", {})
    return {"path": str(p.relative_to(REPO) if p.is_relative_to(REPO) else p),
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest()[:16], "describe": m.describe(),
            "created": m.meta.get("created"), "step": tr.get("step"), "best_val": tr.get("best_val")}


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
    fixed = sitk.ReadImage(spec["fixed"], sitk.sitkFloat32)
    out = _pair_dir(Path(spec["work"]), method)
    records = []
    for pair in spec["pairs"]:
        i = pair["index"]
        moving = sitk.ReadImage(pair["moving"], sitk.sitkFloat32)
        if method == "sitk_affine":
            with Timed() as t:
                tx = _sitk_affine(fixed, moving, spec["sitk_affine_iterations"], 1000 + i)
            sitk.WriteTransform(tx, str(out / f"pair{i:02d}.tfm"))
        else:
            aff = _read(Path(spec["work"]) / "sitk_affine" / f"pair{i:02d}.tfm")
            with Timed() as t:
                tx = _sitk_bspline(fixed, moving, aff, spec["sitk_bspline_iterations"], 2000 + i)
            sitk.WriteTransform(tx, str(out / f"pair{i:02d}.h5"))
        records.append(t.record(i))
        print(f"  {method} pair {i}: {t.seconds:.1f} s wall, {t.cpu_seconds:.1f} s CPU, {t.peak_mb:.0f} MB", flush=True)
    return {"records": records, "setup_seconds": {}}


def worker_elastix(spec: dict, method: str) -> dict:
    t0 = time.perf_counter()
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(spec["threads"])
    image_type = itk.Image[itk.F, 3]
    method_cls = itk.ElastixRegistrationMethod[image_type, image_type]  # first access: lazy loading of ITK
    load_s = time.perf_counter() - t0
    fixed = itk.imread(spec["fixed"], itk.F)
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
        moving = itk.imread(pair["moving"], itk.F)
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
        print(f"  {method} pair {i}: {t.seconds:.1f} s wall, {t.cpu_seconds:.1f} s CPU, {t.peak_mb:.0f} MB", flush=True)
    return {"records": records, "setup_seconds": {"itk_lazy_loading": load_s},
            "itk_elastix_version": _dist_version("itk-elastix"), "itk_version": itk.Version.GetITKVersion()}


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


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
    (Path(spec["work"]) / method / "records.json").write_text(json.dumps(res, indent=1))
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
# orchestration
# --------------------------------------------------------------------------


def make_pairs(data: Path, work: Path, n: int, moving_kind: str) -> list[dict]:
    from istn.demo import place_in_scanner

    name = "colin27_t1_brain" if moving_kind == "brain" else "colin27_t1"
    image = sitk.ReadImage(str(data / "eval" / f"{name}.nii.gz"), sitk.sitkFloat32)
    labels = sitk.ReadImage(str(data / "eval" / "colin27_labels.nii.gz"))
    pairs = []
    (work / "pairs").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        seed = SEED0 + i
        moved, moved_labels, tx = place_in_scanner(image, labels, seed=seed)
        mp, lp = work / "pairs" / f"moving{i:02d}.nii.gz", work / "pairs" / f"moving_labels{i:02d}.nii.gz"
        sitk.WriteImage(moved, str(mp))
        sitk.WriteImage(moved_labels, str(lp))
        m = np.asarray(tx.GetMatrix()).reshape(3, 3)
        angle = float(np.degrees(np.arccos(np.clip((np.trace(m / np.cbrt(np.linalg.det(m))) - 1) / 2, -1, 1))))
        pairs.append({"index": i, "seed": seed, "moving": str(mp), "moving_labels": str(lp),
                      "perturbation": {"translation_mm": float(np.linalg.norm(tx.GetTranslation())),
                                       "approx_rotation_deg": angle}})
    return pairs


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


def launch(method: str, spec_path: Path, ants_python: str, env: dict) -> float:
    if method.startswith("ants"):
        cmd = [ants_python, str(Path(__file__).with_name("brain3d_ants.py")), str(spec_path), method]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--spec", str(spec_path)]
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    print(f"[{_dt.datetime.now():%H:%M:%S}] {method} (load average {load0:.1f})", flush=True)
    subprocess.run(cmd, check=True, env=env)
    LOADS[method] = {"end_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "load_before": load0, "load_after": os.getloadavg()[0], "nice": os.nice(0)}
    return time.perf_counter() - t0


LOADS: dict[str, dict] = {}


def score(work: Path, spec: dict, methods: list[str]) -> dict:
    from istn.metrics import folding_fraction, label_metrics, mean_metrics

    fixed = sitk.ReadImage(spec["fixed"], sitk.sitkFloat32)
    fixed_labels = sitk.ReadImage(spec["fixed_labels"])
    brain = sitk.Cast(fixed > 0, sitk.sitkUInt8)
    per = {}
    for method in methods:
        cache = work / method / "scores.json"
        records_path = work / method / "records.json"
        if cache.exists() and (method == "identity" or cache.stat().st_mtime >= records_path.stat().st_mtime):
            rows = json.loads(cache.read_text())
            if [r["index"] for r in rows] == [q["index"] for q in spec["pairs"]]:
                per[method] = rows
                print(f"  scored {method} (cached): Dice {np.mean([r['dice'] for r in rows]):.3f}", flush=True)
                continue
        rec = {}
        if method != "identity":
            info = json.loads((work / method / "records.json").read_text())
            rec = {r["index"]: r for r in info["records"]}
        rows = []
        for pair in spec["pairs"]:
            i = pair["index"]
            moving = sitk.ReadImage(pair["moving"], sitk.sitkFloat32)
            moving_labels = sitk.ReadImage(pair["moving_labels"])
            tx = world_transform(work, method, i)
            sample_tx = tx
            if method in NONLINEAR:
                # evaluate the (slow) non-linear transform once at the fixed voxels; warping the labels and the
                # Jacobian then use those exact values (a displacement field sampled at its own grid points)
                field = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                                          fixed.GetSpacing(), fixed.GetDirection())
                sample_tx = sitk.DisplacementFieldTransform(field)
            warped = sitk.Resample(moving_labels, fixed_labels, sample_tx, sitk.sitkNearestNeighbor, 0,
                                   moving_labels.GetPixelID())
            per_label = label_metrics(fixed_labels, warped, LABEL_VALUES)
            row = {"index": i, **mean_metrics(per_label), "dice_per_label": [per_label[v]["dice"] for v in LABEL_VALUES]}
            r = rec.get(i, {"seconds": 0.0, "cpu_seconds": 0.0, "peak_mb": float("nan")})
            row.update(seconds=r["seconds"], cpu_seconds=r["cpu_seconds"], peak_mb=r["peak_mb"])
            if method in NONLINEAR:
                row["folding"] = folding_fraction(sample_tx, fixed, brain)
                a = json.loads((work / FROM_AFFINE[method] / "records.json").read_text())
                ar = {x["index"]: x for x in a["records"]}[i]
                row["stage_seconds"], row["stage_cpu_seconds"] = row["seconds"], row["cpu_seconds"]
                row["seconds"] += ar["seconds"]
                row["cpu_seconds"] += ar["cpu_seconds"]
                row["peak_mb"] = max(row["peak_mb"], ar["peak_mb"])
            chk = conversion_check(work, method, i, fixed, moving, tx, wrong_order(work, method, i)) if i == 0 else None
            if chk is not None:
                row["conversion_check"] = chk
            rows.append(row)
        per[method] = rows
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(rows))
        print(f"  scored {method}: Dice {np.mean([r['dice'] for r in rows]):.3f}", flush=True)
    return per


def summarise(per: dict) -> dict:
    out = {"affine": {}, "nonlinear": {}}
    for method, rows in per.items():
        cat = "nonlinear" if method in NONLINEAR else "affine"
        s = {}
        for k in ("dice", "asd", "hd95", "seconds", "cpu_seconds", "folding", "stage_seconds"):
            v = [r[k] for r in rows if k in r]
            if v:
                s[k] = float(np.mean(v))
                s[k + "_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        s["peak_mb"] = float(np.nanmax([r["peak_mb"] for r in rows])) if method != "identity" else None
        s["dice_min"] = float(np.min([r["dice"] for r in rows]))
        s["pairs"] = len(rows)
        s["name"] = NAMES[method]
        if method in FROM_AFFINE:
            s["from_affine"] = FROM_AFFINE[method]
        checks = [r["conversion_check"] for r in rows if "conversion_check" in r]
        if checks:
            s["conversion_check_max_mean_abs_diff"] = float(max(c["mean_abs_diff"] for c in checks))
            s["conversion_check_min_corr"] = float(min(c["corr"] for c in checks))
            wrong = [c["wrong_order_mean_abs_diff"] for c in checks if "wrong_order_mean_abs_diff" in c]
            if wrong:
                s["conversion_check_wrong_order_mean_abs_diff"] = float(wrong[0])
        out[cat][method] = s
    return out


def _fmt(s: dict, k: str, nd: int, scale: float = 1.0) -> str:
    if k not in s or s[k] is None:
        return "-"
    return f"{s[k] * scale:.{nd}f} ± {s.get(k + '_std', 0.0) * scale:.{nd}f}"


def _table(cat: dict, nonlinear: bool) -> str:
    head = "| method | Dice | ASD mm | HD95 mm |" + (" folding % |" if nonlinear else "") + \
        " wall s | CPU s | peak MB |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for m, s in cat.items():
        cols = [s["name"], _fmt(s, "dice", 3), _fmt(s, "asd", 2), _fmt(s, "hd95", 2)]
        if nonlinear:
            cols.append(_fmt(s, "folding", 3, 100.0))
        wall = "-" if m == "identity" else _fmt(s, "seconds", 1)
        cpu = "-" if m == "identity" else _fmt(s, "cpu_seconds", 1)
        cols += [wall, cpu, "-" if s["peak_mb"] is None else f"{s['peak_mb']:.0f}"]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


STRUCTURES = ("L caudate", "R caudate", "L putamen", "R putamen", "L pallidum", "R pallidum", "L thalamus",
              "R thalamus")


def _structure_table(per: dict) -> str:
    lines = ["| method | " + " | ".join(STRUCTURES) + " |", "|" + " --- |" * (len(STRUCTURES) + 1)]
    for m, rows in per.items():
        d = np.mean([r["dice_per_label"] for r in rows], axis=0)
        lines.append(f"| {NAMES[m]} | " + " | ".join(f"{v:.3f}" for v in d) + " |")
    return "\n".join(lines)


def verdict(summary: dict) -> list[str]:
    out = []
    for cat, istn, label in (("affine", "istn_refined", "affine"), ("nonlinear", "istn_bspline", "non-linear")):
        c = summary[cat]
        classical = {m: s for m, s in c.items() if not m.startswith("istn") and m != "identity"}
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
            f"- {label}: ISTN refined {word} the bar. Dice {s['dice']:.3f} ± {s['dice_std']:.3f} vs the best classical "
            f"method ({b['name']}) {b['dice']:.3f} ± {b['dice_std']:.3f} (difference {s['dice'] - b['dice']:+.3f}); "
            f"wall time {s['seconds']:.1f} s vs {b['seconds']:.1f} s ({'faster' if ok_time else 'slower'}); "
            f"CPU {s['cpu_seconds']:.1f} s vs {b['cpu_seconds']:.1f} s. Fastest classical: {c[fastest]['name']} "
            f"{c[fastest]['seconds']:.1f} s, Dice {c[fastest]['dice']:.3f}.")
    return out


def _load_text(m: dict) -> str:
    """Whether other jobs shared the machine: the 1-min load beyond the benchmark's own threads."""
    loads = [v for w in m.get("load_average_1min", {}).values() for v in (w.get("load_before"), w.get("load_after"))
             if v is not None]
    if loads and max(loads) <= m["threads"] + 1.0:
        return (f"no other heavy job during the run (1-min load average at most {max(loads):.1f}: the benchmark's "
                f"own {m['threads']} threads)")
    return ("shared with other jobs during the run (wall times are inflated and noisy; CPU seconds are the "
            "steadier cost)")


def write_report(path_md: Path, path_json: Path, summary: dict, meta: dict, per: dict) -> None:
    data = {"affine": summary["affine"], "nonlinear": summary["nonlinear"], "meta": meta, "per_pair": per}
    path_json.write_text(json.dumps(data, indent=1))
    m = meta
    setup = "; ".join(f"{k}: " + ", ".join(f"{kk} {vv:.1f} s" for kk, vv in v.items()) for k, v in m["setup_seconds"].items() if v)
    checks = [f"{NAMES[k]} {s['conversion_check_max_mean_abs_diff']:.1e} (correlation >= {s['conversion_check_min_corr']:.6f}"
              + (f"; the other composition order: {s['conversion_check_wrong_order_mean_abs_diff']:.3f}"
                 if "conversion_check_wrong_order_mean_abs_diff" in s else "") + ")"
              for cat in ("affine", "nonlinear") for k, s in summary[cat].items() if "conversion_check_max_mean_abs_diff" in s]
    models = m.get("istn_models") or {}
    wait = m.get("model_wait") or {}
    model_state = ", ".join(f"`{Path(k).name}` {v}" for k, v in wait.get("state", {}).items()) or "-"
    if wait:
        model_state += f" (waited {wait['waited_seconds'] / 60:.1f} min)"
    model_lines = [f"  - `{v.get('path')}`: {v.get('describe', 'MISSING')} (created {v.get('created')}, training step "
                   f"{v.get('step')}, sha256 {v.get('sha256')})" for v in models.values()]
    txt = f"""# ISTN vs classical registration, real 3D brain MRI (held-out Colin27 -> ICBM 2009c)

Generated by `benchmarks/brain3d.py` on {m['date']}. {m['pairs']} pairs: Colin27 **brain-extracted**
(`colin27_t1_brain`, the same moving image for every method{'' if m['moving'] == 'brain' else ' -- NO: this run used the WHOLE-HEAD colin27_t1'})
placed in a scanner position by seeded random affines (seeds {m['seeds'][0]}..{m['seeds'][-1]}: 10-20 deg,
10-20 mm, ±10 %; `istn.demo.place_in_scanner`) registered to ICBM 2009c (skull-stripped), 2 mm grids.
Scores over labels 1..8 (L/R caudate, putamen, pallidum, thalamus; Colin27 AAL vs ICBM 2009c HCPex
labels -- two different atlases, so Dice has a ceiling well below 1), mean ± std over pairs of the per-pair
mean over the 8 labels. Moving labels warped nearest-neighbour through each method's own transform
expressed as one ITK world transform (fixed -> moving). ASD = average symmetric surface distance (mm),
HD95 = 95th-percentile Hausdorff (mm). Folding = % of fixed brain voxels with Jacobian determinant <= 0.
Wall and CPU seconds: the registration call alone; non-linear rows are cumulative (the method's own affine
+ its non-linear stage). Peak MB: the worker process's peak resident memory during the registration
(libraries included).

## Affine

{_table(summary['affine'], False)}

## Non-linear (each from its own method's affine)

{_table(summary['nonlinear'], True)}

## Dice per structure (mean over pairs)

{_structure_table(per)}

## Verdict against the bar "ISTN refined matches or beats the best classical method's Dice in each category while taking less wall time"

{chr(10).join(verdict(summary))}

## Setup

- Machine: {m['machine']}; {m['cpus']} CPU cores, {_load_text(m)}. Every tool ran with {m['threads']} threads
  (torch threads, SimpleITK/ITK global default threads, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS for ANTs),
  one method at a time, each method in its own worker subprocess over all pairs.
- Command: `{m['command']}`; total runtime {m['total_seconds'] / 60:.1f} min (started {m.get('started_utc')}, includes any wait for the ISTN models and the scoring).
- Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.
- ISTN models:
{chr(10).join(model_lines) if model_lines else '  - (not run)'}
- ISTN model files when the ISTN methods started (they ran last, after the classical tools): {model_state}.
- One-off costs outside the per-pair timing: {setup or '-'}.
- Worker run times (min, all pairs, incl. start-up) and the 1-minute load average before -> after each
  worker ({m['cpus']} cores): {', '.join(f"{k} {v / 60:.1f} ({m['load_average_1min'].get(k, {}).get('load_before', float('nan')):.1f} -> {m['load_average_1min'].get(k, {}).get('load_after', float('nan')):.1f})" for k, v in m['worker_seconds'].items())}.
- Data: `{m['data']}` (eval volumes' md5 in brain3d.json){m.get('data_note', '')}.
- Settings: SimpleITK affine Mattes MI 50 bins, 10 % random sampling, RegularStepGradientDescent lr 2 /
  {m['settings']['sitk_affine_iterations']} its, scales from physical shift, shrink 4-2-1, smoothing 2-1-0 mm, MOMENTS centred
  initialiser; SimpleITK B-spline 30 mm mesh, MI, 5 % sampling, GradientDescentLineSearch lr 5 /
  {m['settings']['sitk_bspline_iterations']} its, shrink 2-1, smoothing 1-0 mm; elastix default affine map, then default B-spline
  map with FinalGridSpacingInPhysicalUnits 30 from the affine's parameter file{'' if not m['settings'].get('elastix_iterations') else ' (MaximumNumberOfIterations ' + str(m['settings']['elastix_iterations']) + ')'};
  ANTs `Affine` (defaults), then `SyNOnly` from it with iterations {'x'.join(map(str, m['settings']['syn_iterations']))};
  ISTN {m['settings']['istn_iterations']} refinement iterations (lr from the model), CPU.
- Transform conversion check (tool's own warped image vs SimpleITK applying our converted transform,
  first pair, mean |difference| / 99th-percentile intensity): {'; '.join(checks) if checks else '-'}.
"""
    path_md.write_text(txt)


def _complete(work: Path, method: str, spec: dict) -> bool:
    rp = work / method / "records.json"
    if not rp.exists():
        return False
    done = {r["index"] for r in json.loads(rp.read_text())["records"]}
    return done >= {q["index"] for q in spec["pairs"]}


def _data_note(data: Path) -> str:
    """Whether the eval volumes used are byte-identical to those of the standard location /work/braindata."""
    std = Path("/work/braindata/eval")
    if data.resolve() == std.parent.resolve() or not std.exists():
        return ""
    names = ("icbm2009c_t1", "icbm2009c_labels", "colin27_t1_brain", "colin27_t1", "colin27_labels")
    same = all((std / f"{n}.nii.gz").exists() and hashlib.md5((std / f"{n}.nii.gz").read_bytes()).digest()
               == hashlib.md5((data / "eval" / f"{n}.nii.gz").read_bytes()).digest() for n in names)
    return (", byte-identical to the `istn.braindata.prepare` output in /work/braindata/eval" if same
            else ", which DIFFERS from /work/braindata/eval")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=None, help="number of pairs (default 10; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="2 pairs, fewer iterations, results into runs/brain3d-quick")
    p.add_argument("--methods", default=",".join(AFFINE + NONLINEAR))
    p.add_argument("--data", default=os.environ.get("ISTN_BRAINDATA", "/work/braindata"))
    p.add_argument("--moving", choices=("brain", "whole-head"), default="brain")
    p.add_argument("--affine-model", default=str(DEFAULT_MODELS / "brain-t1-affine.pt"))
    p.add_argument("--bspline-model", default=str(DEFAULT_MODELS / "brain-t1-bspline.pt"))
    p.add_argument("--ants-python", default="/work/venv-ants/bin/python")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=None, help="folder of brain3d.{md,json} (default benchmarks/results)")
    p.add_argument("--work", default=None, help="folder of the transforms and images (default runs/brain3d[-quick])")
    p.add_argument("--score-only", action="store_true", help="re-score an existing work folder (report only)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in its work folder: same pairs, complete methods kept")
    p.add_argument("--wait-models", default=None, metavar="HH:MM",
                   help="before the ISTN methods (run last), wait until then (UTC) for the model files to be committed")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return run_worker(a.spec, a.worker)

    t_start = time.perf_counter()
    n = a.pairs or (2 if a.quick else 10)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in AFFINE + NONLINEAR]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {AFFINE + NONLINEAR}")
    methods = [m for m in AFFINE + NONLINEAR if m in methods]
    tag = "brain3d" + ("" if a.moving == "brain" else "-wholehead")
    work = Path(a.work or REPO / "runs" / (tag + ("-quick" if a.quick else "")))
    for m in methods:
        if m in FROM_AFFINE and FROM_AFFINE[m] not in methods and not (work / FROM_AFFINE[m] / "records.json").exists():
            p.error(f"{m} starts from {FROM_AFFINE[m]}: list it too")
    out = Path(a.out or (REPO / "runs" / (tag + "-quick") if a.quick else REPO / "benchmarks" / "results"))
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(a.data)
    spec = {
        "fixed": str(data / "eval" / "icbm2009c_t1.nii.gz"),
        "fixed_labels": str(data / "eval" / "icbm2009c_labels.nii.gz"),
        "work": str(work), "threads": a.threads,
        "affine_model": str(Path(a.affine_model).resolve()), "bspline_model": str(Path(a.bspline_model).resolve()),
        "istn_iterations": 10 if a.quick else 50,
        "sitk_affine_iterations": 50 if a.quick else 200,
        "sitk_bspline_iterations": 10 if a.quick else 30,
        "elastix_iterations": 64 if a.quick else None,
        "syn_iterations": [20, 10, 0] if a.quick else [100, 70, 50, 20],
    }
    spec_path = work / "spec.json"
    command = "python benchmarks/brain3d.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.score_only or a.resume:
        old_spec = json.loads(spec_path.read_text())
        if not a.score_only:
            old_spec.update({k: spec[k] for k in ("affine_model", "bspline_model")})
        spec = old_spec
        # started_utc: when the first invocation wrote its spec (older specs lack the key)
        spec.setdefault("started_utc", _dt.datetime.fromtimestamp(spec_path.stat().st_mtime, _dt.timezone.utc)
                        .isoformat(timespec="seconds"))
        data = Path(spec["fixed"]).parents[1]
    else:
        spec["pairs"] = make_pairs(data, work, n, a.moving)
        spec["started_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    spec.setdefault("commands", []).append(command + (" (report only)" if a.score_only else ""))
    spec_path.write_text(json.dumps(spec, indent=1))
    runtimes = json.loads((work / "runtimes.json").read_text()) if (work / "runtimes.json").exists() else {}
    if not a.score_only:
        env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads),
                   PYTHONUNBUFFERED="1")
        # a partial or resumed run into an existing work folder keeps the other methods' records
        LOADS.update(json.loads((work / "loads.json").read_text()) if (work / "loads.json").exists() else {})
        order = [m for m in methods if m != "identity" and not m.startswith("istn")]
        order += [m for m in methods if m.startswith("istn")]  # last: their models may still be on their way
        for m in order:
            if a.resume and _complete(work, m, spec):
                print(f"{m}: complete in {work}, kept", flush=True)
                continue
            if m.startswith("istn") and "model_wait" not in spec:
                # the classical results are scored while waiting (the scores are cached)
                print("scoring the finished methods while the ISTN models are awaited", flush=True)
                score(work, spec, [q for q in methods if not q.startswith("istn") and (q == "identity" or _complete(work, q, spec))])
                spec["model_wait"] = wait_for_models([Path(spec["affine_model"]), Path(spec["bspline_model"])],
                                                     a.wait_models)
                spec_path.write_text(json.dumps(spec, indent=1))
            if m.startswith("istn") and not all(Path(spec[k]).exists() for k in ("affine_model", "bspline_model")):
                print(f"{m}: SKIPPED, model file missing: {spec['model_wait']['state']}", flush=True)
                methods = [q for q in methods if q != m]
                continue
            runtimes[m] = launch(m, spec_path, a.ants_python, env)
            (work / "runtimes.json").write_text(json.dumps(runtimes))
            (work / "loads.json").write_text(json.dumps(LOADS))
    print("scoring", flush=True)
    per = score(work, spec, methods)
    summary = summarise(per)
    setup = {}
    models = None
    versions = {"python": platform.python_version(), "SimpleITK": sitk.Version_VersionString()}
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
    cpu_model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                      if l.startswith("model name")), platform.processor())
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "pairs": len(spec["pairs"]), "seeds": [q["seed"] for q in spec["pairs"]],
        "perturbations": [q["perturbation"] for q in spec["pairs"]],
        "moving": a.moving, "machine": f"{cpu_model}, {platform.system()} {platform.release()}",
        "cpus": os.cpu_count(), "threads": spec["threads"],
        "command": " ; then ".join(spec["commands"]),
        "started_utc": spec.get("started_utc"),
        "total_seconds": ((_dt.datetime.now(_dt.timezone.utc) - _dt.datetime.fromisoformat(spec["started_utc"]))
                          .total_seconds() if spec.get("started_utc") else time.perf_counter() - t_start),
        "worker_seconds": runtimes, "setup_seconds": setup, "istn_models": models, "versions": versions,
        "model_wait": spec.get("model_wait"),
        "settings": {k: spec[k] for k in ("istn_iterations", "sitk_affine_iterations", "sitk_bspline_iterations",
                                          "elastix_iterations", "syn_iterations")},
        "data": str(data),
        "data_md5": {Path(q).name: hashlib.md5(Path(q).read_bytes()).hexdigest()
                     for q in (spec["fixed"], spec["fixed_labels"], str(data / "eval" / "colin27_t1_brain.nii.gz"),
                               str(data / "eval" / "colin27_t1.nii.gz"), str(data / "eval" / "colin27_labels.nii.gz"))
                     if Path(q).exists()},
        "data_note": _data_note(data),
        "load_average_1min": json.loads((work / "loads.json").read_text()) if (work / "loads.json").exists() else {},
    }
    write_report(out / f"{tag}.md", out / f"{tag}.json", summary, meta, per)
    print(f"wrote {out / (tag + '.md')} and {out / (tag + '.json')} ({meta['total_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
