#!/usr/bin/env python3
"""Does a 1 mm input give the same registration as the same images at 2 mm? With and without anti-aliasing.

`istn.inputs` block-averages an image much finer than the model's 4 mm grid to about 2 mm before resampling it
onto the grid (``istn.inputs.ANTIALIAS``). The same anatomy at 1 mm and at 2 mm should then give (nearly) the
same result. Pair: the 1 mm 256^3 pair of `benchmarks/speed_vs_classical.py` (ICBM 2009c fixed; Colin27 whole
head in scanner position seed 101; real 1 mm sources, so their detail above the 2 mm band is real: a 1 mm copy
upsampled from the 2 mm sample pair would have none to alias) and its 2 mm version made the way the training
images were made from their 1 mm sources (`istn.braindata.resample_image`: Gaussian sigma 0.5 mm, linear; labels
`resample_labels`), on a 2 mm grid over the same box.

Per setting: affine, then B-spline (model defaults) on the 1 mm pair; the 2 mm pair's result does not depend on
the setting (2 mm inputs are used as they are). Reported: distance between the 1 mm and the 2 mm results'
transforms over the fixed brain (mean, 95th percentile, max, mm), structure Dice of each (8 labels, mean), and
the seconds of the 1 mm call.

    python benchmarks/antialias_check.py --threads 1
"""

from __future__ import annotations

import argparse
import json
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

from istn import inputs  # noqa: E402
from istn.braindata import resample_image, resample_labels  # noqa: E402
from istn.demo import MODELS_DIR, structure_dice  # noqa: E402
from istn.export import load_model  # noqa: E402
from istn.geometry import Grid  # noqa: E402
from istn.registration import register  # noqa: E402

RUNS = REPO / "runs"


def two_mm(image: sitk.Image, labels: bool = False) -> sitk.Image:
    g = Grid.from_image(image)
    size = tuple(int(n) // 2 for n in g.size)
    ref = Grid(size, (2.0,) * 3, tuple(g.voxel_to_world(np.full(3, 0.5)).tolist()), g.direction).reference_image()
    return resample_labels(image, ref) if labels else resample_image(image, ref)


def pipeline(fixed, moving, aff, bsp, threads):
    t0 = time.perf_counter()
    a = register(fixed, moving, aff, device="cpu", threads=threads)
    b = register(fixed, moving, bsp, device="cpu", threads=threads, initial_transform=a.transform)
    return a, b, time.perf_counter() - t0


def distance(t1: sitk.Transform, t2: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.array([np.linalg.norm(np.subtract(t1.TransformPoint(p), t2.TransformPoint(p))) for p in points])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(RUNS / "speed_vs_classical-data"), help="the 1 mm 256^3 volumes")
    p.add_argument("--cases", default=str(RUNS / "speed_vs_classical" / "cases"), help="the placed moving images")
    p.add_argument("--seed", type=int, default=101)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--points", type=int, default=20000, help="fixed brain points where the transforms are compared")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "antialias"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    data, cases = Path(args.data), Path(args.cases)
    f1 = sitk.ReadImage(str(data / "icbm2009c_t1.nii.gz"), sitk.sitkFloat32)
    fl1 = sitk.ReadImage(str(data / "icbm2009c_labels.nii.gz"))
    m1 = sitk.ReadImage(str(cases / f"1mm_s{args.seed}_moving.nii.gz"), sitk.sitkFloat32)
    ml1 = sitk.ReadImage(str(cases / f"1mm_s{args.seed}_moving_labels.nii.gz"))
    f2, m2 = two_mm(f1), two_mm(m1)
    fl2, ml2 = two_mm(fl1, labels=True), two_mm(ml1, labels=True)
    aff, bsp = load_model(MODELS_DIR / "brain-t1-affine.pt"), load_model(MODELS_DIR / "brain-t1-bspline.pt")
    brain = np.argwhere(sitk.GetArrayViewFromImage(f2) > 0)[:, ::-1]  # (i, j, k) of the 2 mm fixed brain
    pick = np.random.default_rng(0).choice(len(brain), min(args.points, len(brain)), replace=False)
    points = [f2.TransformContinuousIndexToPhysicalPoint(v.astype(float).tolist()) for v in brain[pick]]

    def dice(fl, ml, tx) -> float:
        return float(np.mean(list(structure_dice(fl, ml, tx).values())))

    a2, b2, s2 = pipeline(f2, m2, aff, bsp, args.threads)
    rows = []
    for setting in (False, True):
        inputs.ANTIALIAS = setting
        inputs.clear_cache()
        pipeline(f1, m1, aff, bsp, args.threads)  # warm-up of this setting (TorchScript, caches)
        inputs.clear_cache()
        a1, b1, s1 = pipeline(f1, m1, aff, bsp, args.threads)
        row = {"antialias": setting, "seconds_1mm": s1, "prepare_s_1mm": a1.timings["prepare"] + b1.timings["prepare"]}
        for stage, r1, r2, fl, ml in (("affine", a1, a2, fl1, ml1), ("bspline", b1, b2, fl1, ml1)):
            d = distance(r1.transform, r2.transform, points)
            row[stage] = {"mean_mm": float(d.mean()), "p95_mm": float(np.percentile(d, 95)), "max_mm": float(d.max()),
                          "dice_1mm": dice(fl1, ml1, r1.transform), "dice_2mm": dice(fl2, ml2, r2.transform),
                          "iterations_1mm": r1.iterations, "iterations_2mm": r2.iterations}
        rows.append(row)
        print(json.dumps(row), flush=True)
    inputs.ANTIALIAS = True
    summary = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seed": args.seed,
               "threads": args.threads, "seconds_2mm": s2, "rows": rows}
    md = [f"# 1 mm vs 2 mm input: anti-aliasing ({summary['created']})", "",
          f"Command: `python benchmarks/antialias_check.py --threads {args.threads} --seed {args.seed}`. Colin27 whole "
          f"head (scanner position seed {args.seed}) -> ICBM 2009c, 1 mm 256^3 and the same at 2 mm (training-data "
          "resampling). Distance between the 1 mm and the 2 mm results' transforms at "
          f"{len(points)} fixed brain points; Dice: 8 structures, mean. Seconds: whole affine + B-spline register "
          f"calls at 1 mm (2 mm: {s2:.1f} s), {args.threads} thread(s), shared machine.", "",
          "| 1 mm input | stage | mean mm | p95 mm | max mm | Dice 1 mm | Dice 2 mm | its 1 mm / 2 mm | s (1 mm) | "
          "prepare s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for stage in ("affine", "bspline"):
            x = r[stage]
            md.append(f"| {'block-averaged to 2 mm' if r['antialias'] else 'as it is'} | {stage} | {x['mean_mm']:.3f} | "
                      f"{x['p95_mm']:.3f} | {x['max_mm']:.3f} | {x['dice_1mm']:.3f} | {x['dice_2mm']:.3f} | "
                      f"{x['iterations_1mm']}/{x['iterations_2mm']} | {r['seconds_1mm']:.1f} | {r['prepare_s_1mm']:.2f} |")
    write_report(args.out, summary, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
