#!/usr/bin/env python3
"""Inputs the brain models were not made for: a cropped field of view and other contrasts (T2, PD).

Each case runs the pipeline a user gets (`istn demo`'s: affine with the model's refinement defaults, then the
B-spline model from that affine) and scores the Dice of the 8 protocol structures, labels warped nearest-
neighbour through the written world transform, against the unregistered Dice. Model sets are compared side by
side (``NAME=DIR``, each holding ``brain-t1-affine.pt`` and ``brain-t1-bspline.pt``).

Cases:

- ``crop F``: the held-out subject (Colin27 whole head, never trained on) in brain3d's scanner positions
  (seeds 101..), its field of view cropped along the image axis closest to the head's superior direction to
  the superior fraction F of the head (as a scan that misses the lower head), -> ICBM 2009c. The labels are
  cropped with it, so the unregistered and registered Dice count the same structures. The issue's bar: never
  end below the unregistered Dice.
- ``sample crop 0.6``: the bundled sample pair as stored (not in `istn demo`'s scanner position) with the moving
  head cropped to its top 60 %, the case the issue measured (0.658 against 0.823 unregistered).
- ``contrast C``: SPM's avg152 in contrast C (T1, T2, PD; one anatomy, the same labels) in the same scanner
  positions -> ICBM 2009c T1. For the bundled models avg152 is a TRAINING anatomy (the only one with T2 and PD
  here), so their rows show the contrast gap on an anatomy the model knows; for a set whose models were trained
  with ``train_brain.py --exclude spm_avg152`` (read from their metadata, ``data_options.exclude``) they are
  held-out pairs. The report gives each set's gap, T1's Dice minus T2's and PD's (the issue's goal: within 0.05).

    python benchmarks/hard_inputs.py bundled=ISTNRegistration/Resources/Models --pairs 3

Writes ``benchmarks/results/hard_inputs.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))
sys.path.insert(0, str(REPO / "benchmarks"))

from brain3d import SEED0, eval_volumes  # noqa: E402
from report import write_report  # noqa: E402
from istn.demo import place_in_scanner, sample_pair, structure_dice  # noqa: E402
from istn.export import load_model  # noqa: E402
from istn.registration import register  # noqa: E402

STAGES = ("unregistered", "affine", "B-spline")


def crop_superior(image: sitk.Image, labels: sitk.Image, keep: float) -> tuple[sitk.Image, sitk.Image]:
    """Keep the superior ``keep`` fraction of the head (foreground > 5 % of the 99th percentile) along the image
    axis whose direction is closest to world superior (+z in LPS): a field of view that misses the lower head."""
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    axis = int(np.argmax(np.abs(d[2])))  # image axis (x, y, z order) most aligned with world S
    up = d[2, axis] > 0
    arr = sitk.GetArrayViewFromImage(image)
    fg = arr > 0.05 * np.percentile(arr, 99)
    np_axis = 2 - axis
    occupied = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != np_axis)))
    lo, hi = int(occupied[0]), int(occupied[-1])
    n = int(round(keep * (hi - lo + 1)))
    start = hi + 1 - n if up else lo
    index, size = [0, 0, 0], list(image.GetSize())
    index[axis], size[axis] = start, n
    return sitk.RegionOfInterest(image, size, index), sitk.RegionOfInterest(labels, size, index)


def mean_dice(fixed_labels: sitk.Image, moving_labels: sitk.Image, tx: sitk.Transform | None) -> float:
    return float(np.nanmean(list(structure_dice(fixed_labels, moving_labels, tx).values())))


def run_case(fixed: sitk.Image, fixed_labels: sitk.Image, moving: sitk.Image, moving_labels: sitk.Image,
             models: tuple, threads: int, unregistered: float) -> dict:
    """One model set on one case: affine with the model's defaults, then the B-spline from it, each scored."""
    affine_model, bspline_model = models
    t0 = time.perf_counter()
    a = register(fixed, moving, affine_model, threads=threads)
    b = register(fixed, moving, bspline_model, initial_transform=a.transform, threads=threads)
    seconds = time.perf_counter() - t0
    return {"unregistered": unregistered, "affine": mean_dice(fixed_labels, moving_labels, a.transform),
            "B-spline": mean_dice(fixed_labels, moving_labels, b.transform), "seconds": seconds,
            "warnings": a.warnings + b.warnings}


def cases(data: Path, pairs: int, crops: list[float], contrasts: list[str]):
    """Yields (case name, pair index, fixed, fixed labels, moving, moving labels)."""
    vols = eval_volumes(data)
    for keep in crops:
        for i in range(pairs):
            moved, moved_labels, _ = place_in_scanner(vols["whole-head"], vols["labels"], seed=SEED0 + i)
            yield (f"crop {keep:g}", i, vols["fixed"], vols["fixed_labels"], *crop_superior(moved, moved_labels, keep))
    if crops:
        s = sample_pair()  # as stored (no scanner position): the measurement
        yield ("sample crop 0.6", 0, sitk.Cast(s["fixed"], sitk.sitkFloat32), s["fixed_labels"],
               *crop_superior(sitk.Cast(s["moving"], sitk.sitkFloat32), s["moving_labels"], 0.6))
    labels = sitk.ReadImage(str(data / "train" / "spm_avg152_labels.nii.gz"))
    for c in contrasts:
        img = sitk.ReadImage(str(data / "train" / f"spm_avg152_{c}.nii.gz"), sitk.sitkFloat32)
        for i in range(pairs):
            moved, moved_labels, _ = place_in_scanner(img, labels, seed=SEED0 + i)
            yield f"contrast {c}", i, vols["fixed"], vols["fixed_labels"], moved, moved_labels


AVG152 = "spm_avg152"


def held_out(models: tuple, name: str = AVG152) -> bool:
    """Whether every model of a set was trained with ``name`` left out (``train_brain.py --exclude``; models
    without the record, e.g. older ones, trained on every anatomy of train.csv)."""
    return all(name in m.meta.get("data_options", {}).get("exclude", []) for m in models)


def contrast_gaps(res: dict) -> list[str]:
    """Markdown lines: per set and stage, avg152 T1's mean Dice minus T2's and PD's (positive: T1 better)."""
    per = {c.split()[1]: v for c, v in res["cases"].items() if c.startswith("contrast ")}
    if "t1" not in per or len(per) < 2:
        return []
    others = [c for c in per if c != "t1"]
    lines = ["", "Contrast gap (avg152: T1 Dice minus " + " / ".join(c.upper() for c in others) + " Dice, mean over "
             "pairs; the issue's goal: within 0.05):", ""]
    for n in res["sets"]:
        status = "held out" if res.get("avg152_held_out", {}).get(n) else "a training anatomy"
        cells = []
        for stage in STAGES[1:]:
            t1 = np.mean([r[stage] for r in per["t1"][n]])
            gaps = [t1 - np.mean([r[stage] for r in per[c][n]]) for c in others]
            cells.append(f"{stage} " + " / ".join(f"{g:+.3f}" for g in gaps)
                         + (" (within 0.05)" if max(gaps) <= 0.05 else ""))
        lines.append(f"- {n} (avg152 {status}): " + "; ".join(cells) + ".")
    return lines


def markdown(res: dict, command: str) -> str:
    names = list(res["sets"])
    held = res.get("avg152_held_out", {})
    avg152 = "; ".join(f"{n}: {'held out (never trained on, any contrast)' if held.get(n) else 'a training anatomy'}"
                       for n in names)
    lines = ["# Inputs the brain models were not made for: cropped field of view, other contrasts", "",
             f"Generated by `benchmarks/hard_inputs.py` on {res['date']}: `{command}`.",
             "Mean Dice of the 8 structures (labels warped through the written world transform), mean over pairs; "
             "the model sets' own refinement defaults (affine, then B-spline from it). Cases: see the script's "
             f"docstring (avg152 T1/T2/PD, per set: {avg152}).", "",
             "| case | pairs | unregistered | " + " | ".join(f"{n} affine | {n} B-spline" for n in names) + " |",
             "| --- | --- | --- | " + " | ".join("--- | ---" for _ in names) + " |"]
    for case, per_set in res["cases"].items():
        first = per_set[names[0]]
        cells = [f"{np.mean([r['unregistered'] for r in first]):.3f}"]
        for n in names:
            rows = per_set[n]
            for stage in STAGES[1:]:
                v = np.mean([r[stage] for r in rows])
                worse = sum(r[stage] < r["unregistered"] for r in rows)
                cells.append(f"{v:.3f}" + (f" ({worse} below unregistered)" if worse else ""))
        lines.append(f"| {case} | {len(first)} | " + " | ".join(cells) + " |")
    warned = {n: sum(bool(r["warnings"]) for per in res["cases"].values() for r in per[n]) for n in names}
    lines += contrast_gaps(res)
    checks = res.get("self_check", {})  # whether a set's models carry validation loss ranges (older runs: unknown)
    lines += ["", "Pairs with a self-check warning (the user is told): "
              + ", ".join(f"{n} {w}" + ("" if checks.get(n, True) else " (its models carry no validation loss "
                                         "ranges: the self-check cannot warn)") for n, w in warned.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sets", nargs="+", metavar="NAME=DIR", help="model folders to compare")
    p.add_argument("--data", default="/work/braindata", help="output of `istn data prepare`")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--crops", default="0.6,0.8", help="superior fractions of the head kept ('' = none)")
    p.add_argument("--contrasts", default="t1,t2,pd", help="avg152 contrasts ('' = none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "hard_inputs"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sets = dict(s.split("=", 1) for s in args.sets)
    models = {n: (load_model(Path(d) / "brain-t1-affine.pt"), load_model(Path(d) / "brain-t1-bspline.pt"))
              for n, d in sets.items()}
    res = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "sets": sets, "cases": {},
           "self_check": {n: all(bool(m.meta.get("validation", {}).get("refinement_loss")) for m in pair)
                          for n, pair in models.items()},
           "avg152_held_out": {n: held_out(pair) for n, pair in models.items()}}
    crops = [float(c) for c in args.crops.split(",") if c]
    contrasts = [c for c in args.contrasts.split(",") if c]
    for case, i, fixed, fixed_labels, moving, moving_labels in cases(Path(args.data), args.pairs, crops, contrasts):
        unregistered = mean_dice(fixed_labels, moving_labels, None)  # the same for every model set
        for n, m in models.items():
            r = run_case(fixed, fixed_labels, moving, moving_labels, m, args.threads, unregistered)
            res["cases"].setdefault(case, {}).setdefault(n, []).append(r)
            print(f"{case} pair {i} {n}: {r['unregistered']:.3f} -> {r['affine']:.3f} -> {r['B-spline']:.3f} "
                  f"({r['seconds']:.1f} s){' [warned]' if r['warnings'] else ''}", flush=True)
    command = "python benchmarks/hard_inputs.py " + " ".join(sys.argv[1:])
    write_report(args.out, {**res, "command": command}, markdown(res, command))


if __name__ == "__main__":
    main()
