#!/usr/bin/env python3
"""The final resampling of a 1 mm 256^3 moving image through the affine + B-spline result: exact vs dense field.

`istn.registration.warp_image(..., field_spacing=s)` samples the composite (affine + B-spline) transform as a
displacement field every ``s`` mm and resamples through that field's trilinear interpolation
(`istn.registration._resample_through_field`); the transform WRITTEN to disk stays the exact composite. This
script measures, on the 1 mm pair of `benchmarks/speed_vs_classical.py` (ICBM 2009c fixed, Colin27 whole head in
scanner position seed 101, both 256^3 at 1 mm):

- seconds of the exact warp (``sitk.Resample`` through the composite) and of the field path per spacing (median
  of ``--repeats``);
- the transform's difference over the fixed brain (voxels > 0): |T_field(x) - T(x)| in mm, max and mean;
- the warped images' difference over the fixed brain, max and mean, against the image range there.

The transform comes from `register` (affine, then B-spline from it; model defaults, ``--threads``) and is cached
in ``--work``. ``--time-only exact|fast`` only times one warp (for an external, whole-process timer).

    python benchmarks/final_warp.py --threads 1 [--spacings 2,3,4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))

from report import write_report  # noqa: E402
import torch  # noqa: E402

from istn.demo import MODELS_DIR  # noqa: E402
from istn.export import load_model  # noqa: E402
from istn.geometry import Grid  # noqa: E402
from istn.registration import displacement_field, register, warp_image  # noqa: E402

RUNS = REPO / "runs"


def load_pair(data: Path, cases: Path) -> tuple[sitk.Image, sitk.Image]:
    fixed = sitk.ReadImage(str(data / "icbm2009c_t1.nii.gz"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(cases / "1mm_s101_moving.nii.gz"), sitk.sitkFloat32)
    return fixed, moving


def the_transform(fixed: sitk.Image, moving: sitk.Image, work: Path, threads: int) -> sitk.Transform:
    path = work / "final_warp_s101.h5"
    if path.exists():
        return sitk.ReadTransform(str(path)).Downcast()
    aff, bsp = load_model(MODELS_DIR / "brain-t1-affine.pt"), load_model(MODELS_DIR / "brain-t1-bspline.pt")
    a = register(fixed, moving, aff, device="cpu", threads=threads)
    b = register(fixed, moving, bsp, device="cpu", threads=threads, initial_transform=a.transform)
    work.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(b.transform, str(path))
    return b.transform


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(RUNS / "speed_vs_classical-data"), help="the 1 mm 256^3 volumes")
    p.add_argument("--cases", default=str(RUNS / "speed_vs_classical" / "cases"), help="the placed moving images")
    p.add_argument("--work", default=str(RUNS / "final_warp"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--spacings", default="2,3,4", help="field spacings (mm) to compare")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-only", choices=("exact", "fast"), default=None)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "final_warp"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    fixed, moving = load_pair(Path(args.data), Path(args.cases))
    tx = the_transform(fixed, moving, Path(args.work), args.threads)
    spacings = [float(s) for s in args.spacings.split(",")]
    if args.time_only:
        warp_image(moving, fixed, tx, field_spacing=spacings[0] if args.time_only == "fast" else None)
        return 0

    brain = sitk.GetArrayFromImage(fixed) > 0
    ref = Grid.from_image(fixed)
    exact_s, exact = timed(lambda: warp_image(moving, fixed, tx), args.repeats)
    exact_a = sitk.GetArrayFromImage(exact)
    span = float(np.ptp(exact_a[brain]))
    exact_u = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        tx, sitk.sitkVectorFloat64, ref.size, ref.origin, ref.spacing, ref.direction))[brain]
    rows = [{"method": "exact (sitk.Resample through the composite)", "spacing_mm": None, "seconds": exact_s}]
    for s in spacings:
        fast_s, fast = timed(lambda: warp_image(moving, fixed, tx, field_spacing=s), args.repeats)
        diff = np.abs(sitk.GetArrayFromImage(fast) - exact_a)[brain]
        field = displacement_field(tx, ref, s)
        approx = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
            sitk.DisplacementFieldTransform(field), sitk.sitkVectorFloat64, ref.size, ref.origin, ref.spacing,
            ref.direction))[brain]
        err = np.linalg.norm(approx - exact_u, axis=-1)
        rows.append({"method": f"dense field every {s:g} mm + grid_sample", "spacing_mm": s, "seconds": fast_s,
                     "transform_max_mm": float(err.max()), "transform_mean_mm": float(err.mean()),
                     "image_max": float(diff.max()), "image_mean": float(diff.mean()), "image_range": span})
        print(rows[-1], flush=True)
    summary = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
               "fixed_size": list(fixed.GetSize()), "moving_size": list(moving.GetSize()), "rows": rows,
               "brain_voxels": int(brain.sum())}
    md = [f"# Final warp of a 1 mm 256^3 moving image: exact vs dense field ({summary['created']})", "",
          f"Command: `python benchmarks/final_warp.py --threads {args.threads} --spacings {args.spacings} "
          f"--repeats {args.repeats}`. Affine + B-spline result of the bundled models (model defaults) for the 1 mm "
          "pair of speed_vs_classical.py (Colin27 whole head, seed 101 -> ICBM 2009c). Differences over the fixed "
          f"brain ({summary['brain_voxels']} voxels); image range there {span:.1f}. Seconds: median of "
          f"{args.repeats}, {args.threads} thread(s), shared machine.", "",
          "| method | s | transform max mm | transform mean mm | image max diff | image mean diff |",
          "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["spacing_mm"] is None:
            md.append(f"| {r['method']} | {r['seconds']:.2f} | 0 | 0 | 0 | 0 |")
        else:
            md.append(f"| {r['method']} | {r['seconds']:.2f} | {r['transform_max_mm']:.4f} | "
                      f"{r['transform_mean_mm']:.5f} | {r['image_max']:.3f} | {r['image_mean']:.4f} |")
    write_report(args.out, summary, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
