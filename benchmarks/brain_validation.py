#!/usr/bin/env python3
"""Choose the brain models' variant on VALIDATION data: the full `istn demo` pipeline per candidate model set.

The bundled models are chosen by what the user gets: affine one pass, affine refined, then B-spline refined
(each model's own refinement settings, or ``--iterations``), not by the training loss. Validation pairs: the validation anatomy of
``benchmarks/train_brain.py`` (``spm_avg305``, skull-stripped; never trained on) placed in seeded scanner
positions (seeds 500.., `istn.demo.place_in_scanner`; the test benchmark brain3d.py uses Colin27 and seeds
101..) registered to ICBM 2009c (the brain3d fixed image). Dice over the 8 protocol structures, labels warped
nearest-neighbour through the written world transform. Colin27 (the test subject) is not touched.

    python benchmarks/brain_validation.py istn-i=runs/models-i istn-e=runs/models-e --pairs 6

Each ``NAME=DIR`` holds ``brain-t1-affine.pt`` and ``brain-t1-bspline.pt``. Writes
``benchmarks/results/brain_validation.{md,json}``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))
sys.path.insert(0, str(REPO / "benchmarks"))

from istn.demo import place_in_scanner  # noqa: E402
from istn.export import load_model  # noqa: E402
from istn.metrics import label_metrics, mean_metrics  # noqa: E402
from istn.registration import register  # noqa: E402
from report import write_report  # noqa: E402
from train_brain import anatomy_images  # noqa: E402

SEED0 = 500
STAGES = ("affine one pass", "affine refined", "B-spline one pass", "B-spline refined")


def t1_row(data: Path, name: str) -> dict:
    """The ``train.csv`` row of anatomy ``name``'s T1 image (a clear stop when there is none)."""
    row = next((r for r in csv.DictReader(open(data / "train.csv")) if r["name"] == name and r["contrast"] == "t1"),
               None)
    if row is None:
        raise SystemExit(f"no T1 row named {name!r} in {data / 'train.csv'}")
    return row


def validation_moving(data: Path, name: str) -> tuple[sitk.Image, sitk.Image]:
    """The skull-stripped validation anatomy (image, labels), as train_brain.py builds it."""
    versions = {n: (img, lab) for n, img, lab, _ in anatomy_images(data, t1_row(data, name), tissue=False)}
    img, lab = versions.get(f"{name}_brain", versions[name])
    return sitk.Cast(img, sitk.sitkFloat32), lab


def validation_inputs(data: Path, name: str) -> tuple[sitk.Image, sitk.Image, sitk.Image, sitk.Image]:
    """(fixed ICBM 2009c image, its labels, validation anatomy image, its labels)."""
    fixed = sitk.ReadImage(str(data / "eval" / "icbm2009c_t1.nii.gz"), sitk.sitkFloat32)
    fixed_labels = sitk.ReadImage(str(data / "eval" / "icbm2009c_labels.nii.gz"))
    return (fixed, fixed_labels, *validation_moving(data, name))


def mean_dice(fixed_labels: sitk.Image, moving_labels: sitk.Image, tx: sitk.Transform) -> float:
    warped = sitk.Resample(moving_labels, fixed_labels, tx, sitk.sitkNearestNeighbor, 0, moving_labels.GetPixelID())
    return mean_metrics(label_metrics(fixed_labels, warped, range(1, 9)))["dice"]


def run_set(folder: Path, pairs, fixed, fixed_labels, iterations: int | None) -> list[list[float]]:
    affine, bspline = load_model(folder / "brain-t1-affine.pt"), load_model(folder / "brain-t1-bspline.pt")
    rows = []
    for i, (moving, labels) in enumerate(pairs):
        t0 = time.perf_counter()
        ra = register(fixed, moving, affine, iterations=iterations, device="cpu", threads=1)
        rb = register(fixed, moving, bspline, iterations=iterations, device="cpu", threads=1,
                      initial_transform=ra.transform)
        row = [mean_dice(fixed_labels, labels, t) for t in (ra.one_pass_transform, ra.transform,
                                                              rb.one_pass_transform, rb.transform)]
        rows.append(row)
        print(f"  {folder.name} pair {i}: " + ", ".join(f"{v:.3f}" for v in row) +
              f" ({time.perf_counter() - t0:.1f} s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sets", nargs="+", metavar="NAME=DIR", help="candidate model folders")
    p.add_argument("--data", default="/work/braindata", help="output of `istn data prepare`")
    p.add_argument("--val-anatomy", default="spm_avg305")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--iterations", type=int, default=None,
                   help="refinement iterations per stage (default: each model's own, refinement.iterations)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "brain_validation"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = Path(args.data)
    fixed, fixed_labels, image, labels = validation_inputs(data, args.val_anatomy)
    pairs = [place_in_scanner(image, labels, seed=SEED0 + i)[:2] for i in range(args.pairs)]
    identity = [mean_dice(fixed_labels, lab, sitk.Transform(3, sitk.sitkIdentity)) for _, lab in pairs]
    results = {}
    for spec in args.sets:
        name, _, folder = spec.partition("=")
        rows = np.asarray(run_set(Path(folder), pairs, fixed, fixed_labels, args.iterations))
        results[name] = {"folder": folder, "per_pair": rows.tolist(), "mean": rows.mean(0).tolist(),
                         "std": rows.std(0).tolist(),
                         "models": {k: load_model(Path(folder) / f"brain-t1-{k}.pt").meta.get("training", {}).get(
                             "step") for k in ("affine", "bspline")}}
    head = "| models | training steps (affine / B-spline) | " + " | ".join(STAGES) + " |\n| --- | --- |" + \
        " --- |" * len(STAGES)
    lines = [f"| {n} | {r['models']['affine']} / {r['models']['bspline']} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(r["mean"], r["std"])) + " |"
             for n, r in results.items()]
    best = max(results, key=lambda n: results[n]["mean"][3])
    md = f"""# Brain model variant chosen on validation

Generated by `benchmarks/brain_validation.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC:
`python benchmarks/brain_validation.py {' '.join(args.sets)} --pairs {args.pairs}`.
{args.pairs} validation pairs: `{args.val_anatomy}` (skull-stripped, held out of training) in seeded scanner positions
(seeds {SEED0}..{SEED0 + args.pairs - 1}) -> ICBM 2009c; mean Dice over the 8 structures, mean ± std over pairs;
{"the models' own" if args.iterations is None else args.iterations} refinement iterations per stage; unregistered {np.mean(identity):.3f}.

{head}
{chr(10).join(lines)}

Best after the B-spline refinement: **{best}**.
"""
    write_report(args.out, {"stages": STAGES, "identity": identity, "sets": results, "best": best,
                            "pairs": args.pairs}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
