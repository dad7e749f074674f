#!/usr/bin/env python3
"""How tight a brain extraction the default models register well: the same head, skull-stripped more or less
generously, and whole.

Users bring brain-extracted images from many tools (BET, SynthStrip, HD-BET, FreeSurfer, ...): some cut at the
brain's surface, some keep a rim of CSF. The training views' brain extractions are generous (SPM tissue
priors > 0.5, closed, dilated one voxel: a rim of CSF kept). Per head, the default chain (`brain-t1` affine, then
B-spline from it, each model's own settings) on:

- the whole head;
- the head masked by the head's brain mask ``extraction`` (below), eroded by 2 mm, as is, and dilated by 2, 4
  and 6 mm (each a binary mask: the image's own intensities inside, 0 outside);
- for the held-out subject also the brain-extracted file as distributed (MRIcron's ``ch2bet``, BET; brain3d's
  "brain-extracted" moving image).

Heads: the validation anatomy (``spm_avg305``, never trained on; mask: the training views' own, from SPM's
priors) in seeded scanner positions 500.., and the held-out test subject (Colin27; mask: ch2bet's brain, the
voxels above 1 % of its 99th percentile, which drops the near-zero rim its resampling to 2 mm left) in brain3d's
positions 101... Dice: the 8 sub-cortical structures, mean over the positions. Measured after every choice,
deciding nothing.

    python benchmarks/brain_extraction.py --data /work/braindata2 --pairs 5 --threads 2

Writes ``benchmarks/results/brain_extraction.{md,json}``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))
sys.path.insert(0, str(REPO / "benchmarks"))

from brain3d import SEED0 as HELD_OUT_SEED0, eval_volumes  # noqa: E402
from brain_validation import SEED0 as VALIDATION_SEED0, mean_dice, t1_row  # noqa: E402
from report import write_report  # noqa: E402
from train_brain import _brain_mask, anatomy_images  # noqa: E402

from istn.chain import register_chain  # noqa: E402
from istn.demo import AFFINE_MODEL, BSPLINE_MODEL, MODELS_DIR, place_in_scanner  # noqa: E402
from istn.export import load_model  # noqa: E402

MARGINS_MM = (-2.0, 0.0, 2.0, 4.0, 6.0)  # the extraction mask eroded (< 0) or dilated (> 0)


def masked_versions(head: sitk.Image, mask: sitk.Image) -> dict[str, sitk.Image]:
    """The whole head and the head masked by ``mask`` grown or shrunk by each of `MARGINS_MM` (whole voxels)."""
    head = sitk.Cast(head, sitk.sitkFloat32)
    mask = sitk.Cast(mask > 0, sitk.sitkUInt8)
    out = {"whole head": head}
    for mm in MARGINS_MM:
        r = [int(round(abs(mm) / s)) for s in head.GetSpacing()]
        m = mask if mm == 0 else (sitk.BinaryDilate(mask, r) if mm > 0 else sitk.BinaryErode(mask, r))
        name = "extraction mask" if mm == 0 else f"extraction mask {'dilated' if mm > 0 else 'eroded'} {abs(mm):g} mm"
        out[name] = sitk.Mask(head, m)
    return out


def heads(data: Path, which: set[str], vols: dict[str, sitk.Image]) -> dict[str, tuple[dict[str, sitk.Image], sitk.Image, int]]:
    """``{head: (versions, labels, first seed)}`` for the validation anatomy and the held-out subject
    (``vols``: `brain3d.eval_volumes`)."""
    out = {}
    if "validation" in which:
        versions = {v: (img, lab) for v, img, lab, _ in anatomy_images(data, t1_row(data, "spm_avg305"), tissue=False)}
        head, labels = versions["spm_avg305"]
        out["validation anatomy (spm_avg305; mask: the training views' own)"] = (
            masked_versions(head, _brain_mask(data, "spm_avg305", head)), labels, VALIDATION_SEED0)
    if "held-out" not in which:
        return out
    brain = vols["brain"]
    a = sitk.GetArrayViewFromImage(brain)
    bet = sitk.Cast(brain > 0.01 * float(np.percentile(a[a > 0], 99)), sitk.sitkUInt8)
    held = masked_versions(vols["whole-head"], bet)
    held["ch2bet as distributed (brain3d's brain-extracted)"] = sitk.Cast(brain, sitk.sitkFloat32)
    out["held-out Colin27 (mask: ch2bet's brain)"] = (held, vols["labels"], HELD_OUT_SEED0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/work/braindata", help="output of `istn data prepare`")
    p.add_argument("--models", default=str(MODELS_DIR))
    p.add_argument("--pairs", type=int, default=5, help="scanner positions per head")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--heads", default="validation,held-out",
                   help="which heads: validation (the validation anatomy), held-out (Colin27; never for choosing)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "brain_extraction"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data, models = Path(args.data), Path(args.models)
    chain = [load_model(models / AFFINE_MODEL), load_model(models / BSPLINE_MODEL)]
    vols = eval_volumes(data)
    fixed, fixed_labels = vols["fixed"], vols["fixed_labels"]
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/brain_extraction.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = ["# How tight a brain extraction the default models register well", "",
          f"Generated by `{cmd}` on {created}. The default chain (`{AFFINE_MODEL}`, then `{BSPLINE_MODEL}`, their own "
          "settings) registering each version of a head, placed in seeded scanner positions, to ICBM 2009c; Dice of "
          "the 8 sub-cortical structures, mean over the positions (per position in the JSON). Masks: binary, the "
          "head's own intensities inside; 'extraction mask' as the script's docstring defines it per head.", ""]
    summary = {"created": created, "command": cmd, "heads": {}}
    which = {h.strip() for h in args.heads.split(",") if h.strip()}
    if not which or which - {"validation", "held-out"}:
        p.error(f"--heads: validation and/or held-out, got {args.heads}")
    for head, (versions, labels, seed0) in heads(data, which, vols).items():
        rows = {}
        for name, image in versions.items():
            per = []
            for k in range(args.pairs):
                moved, moved_labels, _ = place_in_scanner(image, labels, seed0 + k)
                res = register_chain(fixed, moved, chain, device="cpu", threads=args.threads)
                per.append({"seed": seed0 + k, "affine": mean_dice(fixed_labels, moved_labels, res[0].transform),
                            "bspline": mean_dice(fixed_labels, moved_labels, res[-1].transform)})
            rows[name] = {"affine": float(np.mean([r["affine"] for r in per])),
                          "bspline": float(np.mean([r["bspline"] for r in per])), "pairs": per}
            print(f"{head} | {name}: affine {rows[name]['affine']:.4f}, B-spline {rows[name]['bspline']:.4f}",
                  flush=True)
        summary["heads"][head] = rows
        whole = rows["whole head"]["bspline"]
        md += [f"## {head}, {args.pairs} positions (seeds {seed0}..{seed0 + args.pairs - 1})", "",
               "| moving image | affine Dice | B-spline Dice | B-spline vs whole head |", "| --- | --- | --- | --- |"]
        md += [f"| {name} | {r['affine']:.4f} | {r['bspline']:.4f} | {r['bspline'] - whole:+.4f} |"
               for name, r in rows.items()]
        md.append("")
    write_report(args.out, summary, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
