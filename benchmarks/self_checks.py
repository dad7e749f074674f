"""The engine's self-checks on the files users bring: where they stay quiet, where they warn.

Three warnings of `istn.registration.register` say that a result may not be what it seems:

- **loss**: the refined loss far above the model's validation pairs (`SELF_CHECK_FACTOR`);
- **map volume**: a structure's ITN map volume in the moving image over that in the fixed one, as the network
  compared them in the first pass (`RegistrationResult.map_volume_ratio`), outside `MAP_VOLUME_RATIO_BOUND`. On an
  image of a contrast, field of view or anatomy the model was not trained for, the ITN misses structures (T2 or
  PD through the T1-only model: the maps nearly vanish) and refinement then aligns wrong maps: the loss can stay
  low (both maps agree where they are);
- **information**: the mutual information of the images themselves (fixed network grid) through the result below
  `INFORMATION_KEPT` x that of the images as given (`RegistrationResult.information`): a result that leaves the
  images less alike than no registration (the cropped sample pair that the T1-only model ends below none).

Per model family (each runs the pipeline a user gets: the affine with its defaults, then the B-spline from it):

- ``validation``: the validation anatomy (`spm_avg305`, never trained on) in seeded scanner positions, whole head
  and brain-extracted, -> ICBM 2009c (what the bound is chosen on: it must stay quiet on all of them);
- ``self``: ICBM 2009c registered to itself (ratio 1 by construction);
- ``sample`` / ``sample crop 0.6``: the bundled sample pair as stored, whole and with the moving head cropped to
  its top 60 % (`hard_inputs.py`'s case);
- ``crop F``, ``contrast C``: `hard_inputs.py`'s cases (held-out Colin27 cropped; avg152 T1 / T2 / PD, a T1
  training anatomy of the bundled models);
- ``aligned``: pairs already aligned as given: avg152 T1 / T2 / PD -> avg152 T1 (one subject, three contrasts,
  one space) and ICBM 2009a -> avg152 T1 (two MNI templates). Any change can only lose here; the information
  check says so when the loss is more than its margin.

Reported per case: the smallest and largest map-volume ratio over the structures and pairs (affine stage: the
images as given; B-spline: the moving image through the affine), the mutual information as given -> after the
B-spline, how many pairs each check warned on (either stage), and the Dice unregistered -> after the B-spline (8
protocol structures), with the pairs that ended below no registration. The checks must stay quiet on the
validation pairs; the rest shows what they catch.

    python benchmarks/self_checks.py --data /work/braindata2 --pairs 3 --val-pairs 6

Writes ``benchmarks/results/self_checks.{md,json}``.
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

from hard_inputs import cases as hard_cases  # noqa: E402
from hard_inputs import crop_superior, mean_dice  # noqa: E402
from refinement_validation import validation_pairs  # noqa: E402
from report import write_report  # noqa: E402

from istn.demo import MODELS_DIR, sample_pair  # noqa: E402
from istn.export import load_model  # noqa: E402
from istn.registration import INFORMATION_KEPT, MAP_VOLUME_RATIO_BOUND, SELF_CHECK_FACTOR, register  # noqa: E402

# words of each warning (`_self_check`, `_map_volume_check`, `_information_check`)
CHECKS = {"loss": "looks unlike what the model was trained on", "map volume": "very different volumes",
          "information": "less alike than the images as given"}


def all_cases(data: Path, pairs: int, val_pairs: int, val_anatomy: str):
    """Yields (case, fixed, fixed labels, moving, moving labels)."""
    fixed = sitk.ReadImage(str(data / "eval" / "icbm2009c_t1.nii.gz"), sitk.sitkFloat32)
    fixed_labels = sitk.ReadImage(str(data / "eval" / "icbm2009c_labels.nii.gz"))
    for label, moving, labels, _ in validation_pairs(data, val_anatomy, val_pairs)[0]:
        yield f"validation ({label.split(' seed')[0]})", fixed, fixed_labels, moving, labels
    yield "self (ICBM 2009c -> itself)", fixed, fixed_labels, fixed, fixed_labels
    s = sample_pair()
    sf, sm = sitk.Cast(s["fixed"], sitk.sitkFloat32), sitk.Cast(s["moving"], sitk.sitkFloat32)
    yield "sample pair", sf, s["fixed_labels"], sm, s["moving_labels"]
    for case, _, f, fl, m, ml in hard_cases(data, pairs, [0.6, 0.8], ["t1", "t2", "pd"]):
        yield case, f, fl, m, ml
    if not pairs:  # hard_cases yields the cropped sample pair only with crops
        yield "sample crop 0.6", sf, s["fixed_labels"], *crop_superior(sm, s["moving_labels"], 0.6)
    # pairs already aligned as given (the same subject in three contrasts; two MNI templates): nothing to gain
    train = data / "train"
    t1 = sitk.ReadImage(str(train / "spm_avg152_t1.nii.gz"), sitk.sitkFloat32)
    t1_labels = sitk.ReadImage(str(train / "spm_avg152_labels.nii.gz"))
    for c in ("t1", "t2", "pd"):
        img = sitk.ReadImage(str(train / f"spm_avg152_{c}.nii.gz"), sitk.sitkFloat32)
        yield f"aligned: avg152 {c.upper()} -> avg152 T1", t1, t1_labels, img, t1_labels
    yield ("aligned: ICBM 2009a -> avg152 T1", t1, t1_labels,
           sitk.ReadImage(str(train / "icbm2009a_t1.nii.gz"), sitk.sitkFloat32),
           sitk.ReadImage(str(train / "icbm2009a_labels.nii.gz")))


def run(models: tuple, fixed, fixed_labels, moving, moving_labels, threads: int) -> dict:
    affine, bspline = models
    a = register(fixed, moving, affine, threads=threads)
    b = register(fixed, moving, bspline, initial_transform=a.transform, threads=threads)
    return {"unregistered": mean_dice(fixed_labels, moving_labels, None),
            "bspline_dice": mean_dice(fixed_labels, moving_labels, b.transform),
            "ratio": {"affine": a.map_volume_ratio, "bspline": b.map_volume_ratio},
            "information": {"as_given": a.information["as_given"], "affine": a.information["result"],
                            "bspline": b.information["result"]},
            "warned": {check: any(words in w for w in a.warnings + b.warnings) for check, words in CHECKS.items()},
            "warnings": a.warnings + b.warnings}


def markdown(res: dict) -> str:
    lines = ["# The engine's self-checks: where they stay quiet, where they warn", "",
             f"Generated by `{res['command']}` on {res['date']}. Warnings (either stage; pairs warned): **loss**: the "
             f"refined loss above {res['loss_factor']:g}x the model's worst validation pair; **volume**: a structure's "
             f"map volume, moving over fixed, outside {res['bound']:g}-{1 / res['bound']:.2f}; **information**: the "
             "mutual information of the images (fixed network grid) after the stage below "
             f"{res['information_kept']:g}x that of the images as given. Ratio: smallest / largest over the 8 "
             "structures and the case's pairs, per stage (affine: the images as given; B-spline: the moving image "
             "through the affine, so a good affine brings it near 1). MI: as given -> after the B-spline (nats, mean "
             "over pairs). Dice: 8 structures, unregistered -> after the B-spline, mean over pairs; 'below': pairs "
             "that ended below no registration.", "",
             "| family | case | pairs | affine ratio min / max | B-spline ratio min / max | MI as given -> B-spline | "
             "warned: loss / volume / information | Dice unregistered -> B-spline | below unregistered |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for fam, by_case in res["results"].items():
        for case, rows in by_case.items():
            def rng(stage: str) -> str:
                v = [r for row in rows for r in row["ratio"][stage] if r is not None and np.isfinite(r)]
                return f"{min(v):.2f} / {max(v):.2f}" if v else "-"
            warned = " / ".join(str(sum(r["warned"][c] for r in rows)) for c in CHECKS)
            below = sum(r["bspline_dice"] < r["unregistered"] for r in rows)
            mi = (f"{np.mean([r['information']['as_given'] for r in rows]):.3f} -> "
                  f"{np.mean([r['information']['bspline'] for r in rows]):.3f}")
            lines.append(f"| {fam} | {case} | {len(rows)} | {rng('affine')} | {rng('bspline')} | {mi} | {warned} | "
                         f"{np.mean([r['unregistered'] for r in rows]):.3f} -> "
                         f"{np.mean([r['bspline_dice'] for r in rows]):.3f} | {below} |")
    lines += ["", "Validation pairs (the bound's ground): " + "; ".join(
        f"{fam}: {v['min']:.2f}-{v['max']:.2f}" for fam, v in res["validation_range"].items()) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/work/braindata", help="output of `istn data prepare`")
    p.add_argument("--models", default=str(MODELS_DIR))
    p.add_argument("--families", default="brain-t1,brain-synth")
    p.add_argument("--pairs", type=int, default=3, help="scanner positions of each hard-input case")
    p.add_argument("--val-pairs", type=int, default=6, help="validation scanner positions (each whole and brain)")
    p.add_argument("--val-anatomy", default="spm_avg305")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "self_checks"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.models)
    families = {f: (load_model(folder / f"{f}-affine.pt"), load_model(folder / f"{f}-bspline.pt"))
                for f in args.families.split(",")}
    res = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python benchmarks/self_checks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "bound": MAP_VOLUME_RATIO_BOUND, "information_kept": INFORMATION_KEPT, "loss_factor": SELF_CHECK_FACTOR,
           "results": {f: {} for f in families}}
    for case, fixed, fixed_labels, moving, moving_labels in all_cases(Path(args.data), args.pairs, args.val_pairs,
                                                                        args.val_anatomy):
        for fam, models in families.items():
            r = run(models, fixed, fixed_labels, moving, moving_labels, args.threads)
            res["results"][fam].setdefault(case, []).append(r)
            lo = min(min(r["ratio"][s]) for s in ("affine", "bspline"))
            info = r["information"]
            print(f"{fam} {case}: ratio min {lo:.2f}, MI {info['as_given']:.3f} -> {info['affine']:.3f} -> "
                  f"{info['bspline']:.3f}, Dice {r['unregistered']:.3f} -> {r['bspline_dice']:.3f} "
                  f"warned: {[c for c, w in r['warned'].items() if w]}", flush=True)
    res["validation_range"] = {}
    for fam, by_case in res["results"].items():
        v = [x for case, rows in by_case.items() if case.startswith("validation") for row in rows
             for s in ("affine", "bspline") for x in row["ratio"][s] if x is not None and np.isfinite(x)]
        res["validation_range"][fam] = {"min": min(v), "max": max(v)} if v else {"min": float("nan"),
                                                                                 "max": float("nan")}
    write_report(args.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
