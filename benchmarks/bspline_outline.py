#!/usr/bin/env python3
"""Does the B-spline stage move the brain's outline? Brain-mask Dice before and after it, per anatomy and bending weight.

Issue #8 asks the B-spline stage to do no harm outside the structures of interest: after it, the brain-mask Dice
(fixed brain mask vs the warped moving one) must be at least the affine's while the sub-cortical Dice rises.
`refinement_validation.py` chooses the bending weight on the validation anatomy with that rule; this script asks
whether that rule can see the harm at all, by running the same measurement on three kinds of moving head, each
in seeded scanner positions, whole head and brain-extracted, registered to ICBM 2009c:

- ``validation``: ``spm_avg305`` (never trained on; brain mask from SPM's avg152 priors, as in training), the
  anatomy every refinement setting is chosen on (seeds 500.., as `refinement_validation.py`);
- ``validation, deformed``: the same anatomy first deformed by a real inter-subject field (nitransforms'
  OASIS template -> subject displacement, ``extra/oasis_warp_warp.nii.gz`` of `istn data prepare`; its voxel
  array laid on an LPS grid centred on the head: a realistic individual deformation, not that subject's
  anatomy), so that the pair differs by more than two population averages do;
- ``training``: ``itk_subject``, the one single-subject training anatomy (brain mask from its k-means tissue
  classes); a single subject like the held-out one, but the ITN has seen it;
- ``held-out`` (``--held-out``, only to REPORT: never to choose): Colin27, brain3d's test subject and seeds
  (101..), brain mask ``colin27_t1_brain > 0``.

Per pair: the affine model with its own settings, then the B-spline model from that affine with each bending
weight (and its one pass, no refinement); rows give the change from the affine of the sub-cortical Dice (8
protocol labels) and of the brain-mask Dice (mean and worst pair), labels and masks warped nearest-neighbour
through the written world transform.

    python benchmarks/bspline_outline.py --pairs 3 --bending 0,10,30,100 --held-out
    python benchmarks/bspline_outline.py --pairs 5 --bending '' --refinement own,fc:50,all:50 --held-out

``--refinement`` adds rows that push the refinement further than the model's settings (more Adam iterations,
the whole grid compared): does the outline move with the refinement itself, and does its Dice gain carry over
from the validation anatomy to the held-out one?

Writes ``benchmarks/results/bspline_outline.{md,json}``.
"""

from __future__ import annotations

import argparse
import shlex
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

from brain3d import SEED0 as TEST_SEED0, eval_volumes, place_pair  # noqa: E402
from brain_validation import mean_dice, t1_row  # noqa: E402
from refinement_validation import mask_dice, placed_pairs, validation_pairs  # noqa: E402
from report import write_report  # noqa: E402
from train_brain import _brain_mask, anatomy_images  # noqa: E402

from istn.demo import MODELS_DIR  # noqa: E402
from istn.data.synthesis import CSF, GM, WM  # noqa: E402
from istn.export import load_model  # noqa: E402
from istn.registration import register  # noqa: E402

Pair = tuple[str, sitk.Image, sitk.Image, sitk.Image]  # (label, moving image, its labels, its brain mask)


def training_pairs(data: Path, name: str, n: int) -> list[Pair]:
    """``n`` scanner positions (seeds 500..) x (whole head, brain-extracted) of a training anatomy with
    tissue classes; its brain mask: CSF, GM and WM classes, closed and hole-filled."""
    _, head, labels, classes = anatomy_images(data, t1_row(data, name), tissue=True)[0]
    cl = sitk.GetArrayFromImage(classes)
    mask = sitk.GetImageFromArray(np.isin(cl, (CSF, GM, WM)).astype(np.uint8))
    mask.CopyInformation(classes)
    mask = sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(mask, [2, 2, 2]))
    head = sitk.Cast(head, sitk.sitkFloat32)
    return placed_pairs(head, sitk.Mask(head, mask), labels, mask, n)


def deformed_validation_pairs(data: Path, name: str, n: int) -> list[Pair]:
    """``validation_pairs`` of ``name`` after warping its image, labels and brain mask by the OASIS field."""
    versions = {v: (img, lab) for v, img, lab, _ in anatomy_images(data, t1_row(data, name), tissue=False)}
    (head, labels), brain = versions[name], versions[f"{name}_brain"][0]
    mask = _brain_mask(data, name, head)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "extra" / "oasis_warp_warp.nii.gz")))  # (3, Z, Y, X)
    vec = np.moveaxis(arr, 0, -1).astype(np.float64)[:, ::-1, ::-1]  # stored RAS-style: x, y flipped to LPS
    vec[..., :2] *= -1
    field = sitk.GetImageFromArray(np.ascontiguousarray(vec), isVector=True)
    field.SetSpacing((2.0, 2.0, 2.0))
    centre = np.array(head.TransformContinuousIndexToPhysicalPoint([(k - 1) / 2 for k in head.GetSize()]))
    field.SetOrigin(tuple(centre - (np.array(field.GetSize()) - 1) * 2.0 / 2))
    tx = sitk.DisplacementFieldTransform(field)

    def warp(img: sitk.Image, interpolator: int) -> sitk.Image:
        return sitk.Resample(img, img, tx, interpolator, 0.0, img.GetPixelID())

    head, brain = (warp(sitk.Cast(img, sitk.sitkFloat32), sitk.sitkLinear) for img in (head, brain))  # once each
    labels, mask = warp(labels, sitk.sitkNearestNeighbor), warp(sitk.Cast(mask, sitk.sitkUInt8), sitk.sitkNearestNeighbor)
    return placed_pairs(head, brain, labels, mask, n)


def held_out_pairs(data: Path, n: int) -> list[Pair]:
    """brain3d's test pairs: Colin27 whole head and brain-extracted in seeds 101.."""
    vols = eval_volumes(data)
    pairs = []
    for k in range(n):
        for kind, variant in (("whole head", "whole-head"), ("brain", "brain")):
            moved, moved_labels, moved_mask, _ = place_pair(vols, variant, TEST_SEED0 + k)
            pairs.append((f"{kind} seed {TEST_SEED0 + k}", moved, moved_labels, moved_mask))
    return pairs


def refinement_settings(weights: list[float], refinements: list[str]) -> list[tuple[str, dict]]:
    """The B-spline settings of a run, as (row name, `register` keywords): its one pass, each bending weight with
    the model's other settings, then each of ``refinements``: ``own`` (the model's own settings, bending
    included) or ``LAYERS:N`` (N Adam iterations on ``fc`` or ``all`` layers, the whole grid compared, no
    coarse-to-fine, no polish, no early stop: refinement pushed further than any model's settings)."""
    settings = [("one pass", {"iterations": 0})] + [(f"bending {w:g} mm^2", {"bending": w}) for w in weights]
    for r in refinements:
        if r == "own":
            settings.append(("the model's own settings", {}))
            continue
        layers, _, n = r.partition(":")
        if layers == "anchor":
            settings.append((f"anchor {float(n):g} mm^-2", {"anchor": float(n)}))
            continue
        if layers not in ("fc", "all") or not n.isdigit():
            raise SystemExit(f"--refinement: 'own' or LAYERS:N with LAYERS fc or all, got {r!r}")
        settings.append((f"Adam on {layers} layers, {n} its, whole grid, no polish",
                         {"iterations": int(n), "refine_layers": layers, "coarse_iterations": 0, "polish": 0,
                          "region_margin_mm": float("inf"), "tolerance": 0.0}))
    return settings


def run(pairs: list[Pair], fixed, fixed_labels, fixed_mask, affine, bspline, settings: list[tuple[str, dict]],
        threads: int, log=print) -> list[dict]:
    rows = []
    for label, moving, labels, mask in pairs:
        t0 = time.perf_counter()
        ra = register(fixed, moving, affine, device="cpu", threads=threads)
        row = {"pair": label, "affine_dice": mean_dice(fixed_labels, labels, ra.transform),
               "affine_mask_dice": mask_dice(fixed_mask, mask, ra.transform), "bspline": {}}
        for name, kw in settings:
            rb = register(fixed, moving, bspline, device="cpu", threads=threads, initial_transform=ra.transform, **kw)
            row["bspline"][name] = {"dice": mean_dice(fixed_labels, labels, rb.transform),
                                    "mask_dice": mask_dice(fixed_mask, mask, rb.transform)}
        rows.append(row)
        log(f"  {label}: affine {row['affine_dice']:.3f} / {row['affine_mask_dice']:.4f}; " + ", ".join(
            f"{k} {v['dice'] - row['affine_dice']:+.3f} / {v['mask_dice'] - row['affine_mask_dice']:+.4f}"
            for k, v in row["bspline"].items()) + f" ({time.perf_counter() - t0:.1f} s)", flush=True)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per (variant, setting): mean change of Dice and brain-mask Dice from the affine, worst mask change."""
    out = {}
    for variant in ("whole head", "brain"):
        sel = [r for r in rows if r["pair"].startswith(variant)]
        if not sel:
            continue
        for name in sel[0]["bspline"]:
            dd = [r["bspline"][name]["dice"] - r["affine_dice"] for r in sel]
            dm = [r["bspline"][name]["mask_dice"] - r["affine_mask_dice"] for r in sel]
            out[f"{variant}|{name}"] = {"pairs": len(sel), "d_dice": float(np.mean(dd)), "d_mask": float(np.mean(dm)),
                                        "worst_d_mask": float(np.min(dm)), "affine_dice": float(np.mean(
                                            [r["affine_dice"] for r in sel])),
                                        "affine_mask_dice": float(np.mean([r["affine_mask_dice"] for r in sel]))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/work/braindata", help="output of `istn data prepare`")
    p.add_argument("--models", default=str(MODELS_DIR))
    p.add_argument("--pairs", type=int, default=3, help="scanner positions per anatomy (each whole head and brain)")
    p.add_argument("--bending", default="0,10,30,100", help="bending weights (mm^2)")
    p.add_argument("--refinement", default="", help="more B-spline settings: 'own' (the model's own settings) "
                   "and/or LAYERS:N (N Adam iterations on fc or all layers, whole grid, no polish), comma-separated")
    p.add_argument("--held-out", action="store_true", help="also the test subject (reported, never used to choose)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bspline_outline"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    data, models = Path(a.data), Path(a.models)
    weights = [float(w) for w in a.bending.split(",") if w.strip()]
    settings = refinement_settings(weights, [r.strip() for r in a.refinement.split(",") if r.strip()])
    affine, bspline = load_model(models / "brain-t1-affine.pt"), load_model(models / "brain-t1-bspline.pt")
    fixed = sitk.ReadImage(str(data / "eval" / "icbm2009c_t1.nii.gz"), sitk.sitkFloat32)
    fixed_labels = sitk.ReadImage(str(data / "eval" / "icbm2009c_labels.nii.gz"))
    fixed_mask = sitk.Cast(fixed > 0, sitk.sitkUInt8)
    sets = {"validation (spm_avg305)": lambda: validation_pairs(data, "spm_avg305", a.pairs)[0],
            "validation, deformed by a real inter-subject field": lambda: deformed_validation_pairs(
                data, "spm_avg305", a.pairs),
            "training (itk_subject)": lambda: training_pairs(data, "itk_subject", a.pairs)}
    if a.held_out:
        sets["held-out (Colin27, brain3d's test subject)"] = lambda: held_out_pairs(data, a.pairs)
    t0 = time.perf_counter()
    results = {}
    for name, make in sets.items():
        print(name, flush=True)
        rows = run(make(), fixed, fixed_labels, fixed_mask, affine, bspline, settings, a.threads)
        results[name] = {"rows": rows, "summary": summarise(rows)}
    command = "python benchmarks/bspline_outline.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = {"created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command.strip(),
              "models": {k: bspline.meta.get("refinement") if k == "bspline" else affine.meta.get("refinement")
                         for k in ("affine", "bspline")},
              "bending": weights,
              "settings": [[n, {k: v if v != float("inf") else "inf" for k, v in kw.items()}] for n, kw in settings],
              "seconds": time.perf_counter() - t0, "results": results}
    write_report(a.out, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = ["# The B-spline stage and the brain's outline", "",
             f"Generated by `{report['command']}` on {report['created']} ({report['seconds']:.0f} s). "
             "Moving heads in seeded scanner positions, whole head and brain-extracted, -> ICBM 2009c (skull-stripped; "
             "its brain mask is its support). Per setting: the change from the affine result (the affine model with "
             "its own settings) of the sub-cortical Dice (8 protocol structures) and of the brain-mask Dice, mean "
             "over pairs, and the worst pair's brain-mask change. 'one pass': the B-spline network without "
             "refinement. The held-out rows are reported only: no setting is chosen on them.", ""]
    for name, res in report["results"].items():
        lines += [f"## {name}", "", "| moving | B-spline setting | d Dice | d brain-mask Dice (mean) | worst pair |",
                  "| --- | --- | --- | --- | --- |"]
        for key, s in res["summary"].items():
            variant, setting = key.split("|")
            lines.append(f"| {variant} ({s['pairs']} pairs; affine {s['affine_dice']:.3f}, mask "
                         f"{s['affine_mask_dice']:.4f}) | {setting} | {s['d_dice']:+.4f} | {s['d_mask']:+.4f} | "
                         f"{s['worst_d_mask']:+.4f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
