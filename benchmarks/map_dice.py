#!/usr/bin/env python3
"""How readable a brain model's structure maps are: the ITN maps thresholded at 0.5 against the reference labels.

For each model (``<family>-affine.pt``, ``<family>-bspline.pt`` in ``--models``; ``--family`` brain-t1 by
default) the ITN is run on the HELD-OUT subject (Colin27, never trained on or validated with) in brain3d's
scanner positions (seeds 101..), brain-extracted and whole head, on the validation anatomy (spm_avg305, never
trained on, ``--val-pairs`` positions of the validation pairs, seeds 500..) and on the fixed image ICBM 2009c, as
`register` computes and shows the moving map (`RegistrationResult.moving_map`: the panel's overlay, the
command line's ``itn_moving``), on the fixed grid carried into the head's space, the head in the fixed head's
pose (`istn.registration.moving_map_grid`): the affine model's after its own result, the B-spline model's after
the family's affine model has registered the head (the pose that stage is trained on and runs in). The head
left in its scanner position is also scored (``*-scanner`` rows: for the affine model the maps its refinement
compares, the overlay before 2026-12-04 (session 24); for the B-spline model a pose it never sees). Per structure: Dice of (map > 0.5) with the structure's
reference label on that grid (`brain_table1.map_quality`); the share of the maps' mass outside the structures
dilated by ``--dilation-mm`` (what an overlay shows away from them: mostly the sigmoid's floor of ~0.02
summed over a head).

``--write-models`` puts the table in each model's card (a marked section, replaced on a re-run).

    python benchmarks/map_dice.py --write-models
    python benchmarks/map_dice.py --family brain-synth --write-models --out benchmarks/results/map_dice_synth

Writes ``benchmarks/results/map_dice.{md,json}``.
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

from brain3d import SEED0, eval_volumes, place_pair  # noqa: E402
from brain_table1 import map_quality  # noqa: E402
from istn.data.brain import LABELS, scanner_perturbation  # noqa: E402
from istn.demo import MODELS_DIR  # noqa: E402
from istn.export import load_model  # noqa: E402
from istn.registration import register  # noqa: E402
from refinement_validation import validation_pairs, write_card_section  # noqa: E402
from report import write_report  # noqa: E402

CARD_BEGIN = "<!-- structure maps: written by benchmarks/map_dice.py -->"
CARD_END = "<!-- end of structure maps -->"
HEADS = {"brain": "held-out head, brain-extracted", "whole-head": "held-out head, whole head",
         "fixed": "fixed ICBM 2009c (a training anatomy)",
         "brain-scanner": "held-out head, brain-extracted, left in the scanner position",
         "whole-head-scanner": "held-out head, whole head, left in the scanner position",
         "validation-brain": "validation anatomy (spm_avg305), brain-extracted",
         "validation-brain-scanner": "validation anatomy, brain-extracted, left in the scanner position",
         "validation-whole-head": "validation anatomy, whole head",
         "validation-whole-head-scanner": "validation anatomy, whole head, left in the scanner position"}


def measure(model, vols: dict, pairs: int, dilation_mm: float, affine=None, validation: dict | None = None,
            registered: dict | None = None) -> dict:
    """Per head kind: mean over the pairs of each structure's map Dice and of the mass outside.

    Heads: the held-out subject (``pairs`` positions, brain-extracted and whole head) and ``validation``
    (``{kind: [(seed, image, labels)]}``, `validation_heads`). ``registered``: ``(kind, seed)`` -> the affine
    model's result, filled by the affine model's call and reused by the B-spline model's (the same registration).

    As `register` shows the moving maps (``fixed=``), on the fixed grid carried into the head's space, the
    head in the fixed head's pose: an affine model's after its own result (its refinement compared them on
    the head as it lies); a B-spline model's after ``affine`` (the family's affine model, registered with its
    own settings), the pose the B-spline stage is trained on and runs in. Also ``<kind>-scanner``: the maps of
    the head left in its scanner position, for an affine model as its refinement compared them (what the
    overlay showed before 2026-12-04, session 24), for a B-spline model on the head's own grid from the raw
    image (what this script measured before 2026-12-04, session 23; a pose that stage never sees).
    """
    out = {}
    registered = {} if registered is None else registered

    def affine_result(kind: str, seed: int, image) -> sitk.Transform:
        if (kind, seed) not in registered:
            registered[kind, seed] = register(vols["fixed"], image, affine).transform
        return registered[kind, seed]

    def mean_rows(rows: list[dict]) -> dict:
        def offsets(n: str) -> list:
            return [r["per_structure"][n]["offset_mm"] for r in rows if r["per_structure"][n]["offset_mm"]]

        return {"per_structure": {n: float(np.mean([r["per_structure"][n]["dice"] for r in rows])) for n in LABELS},
                # map centroid - label centroid in the head's own frame: the mean vector (a bias the positions
                # share) and the mean distance
                "offset_mm": {n: np.mean(offsets(n), axis=0).tolist() for n in LABELS if offsets(n)},
                "offset_distance_mm": {n: float(np.mean(np.linalg.norm(offsets(n), axis=1))) for n in LABELS
                                       if offsets(n)},
                "dice": float(np.mean([r["dice"] for r in rows])),
                "mass_outside_all": float(np.mean([r["mass_outside_all"] for r in rows])), "pairs": len(rows)}

    def in_head_frame(q: dict, seed: int) -> dict:
        """The offsets of a head placed by ``seed`` turned back into the head's own (MNI, LPS) axes: the
        placement's linear part maps the placed grid's vectors onto the head's (`place_in_scanner`)."""
        a = np.asarray(scanner_perturbation(seed).GetMatrix()).reshape(3, 3)
        for p in q["per_structure"].values():
            if p["offset_mm"]:
                p["offset_mm"] = (a @ np.asarray(p["offset_mm"])).tolist()
        return q

    heads = {kind: [(SEED0 + i, *place_pair(vols, kind, SEED0 + i)[:2]) for i in range(pairs)]
             for kind in ("brain", "whole-head")}
    heads.update(validation or {})
    for kind, items in heads.items():
        shown, scanner = [], []
        for seed, image, labels in items:
            initial = result = None
            if model.transform_type == "bspline":
                initial = affine_result(kind, seed, image)
                scanner.append(in_head_frame(map_quality(model, image, labels, dilation_mm), seed))
            else:  # ``affine`` is this model
                result = affine_result(kind, seed, image)
                scanner.append(in_head_frame(map_quality(model, image, labels, dilation_mm, fixed=vols["fixed"]),
                                             seed))
            shown.append(in_head_frame(map_quality(model, image, labels, dilation_mm, fixed=vols["fixed"],
                                                   initial_transform=initial, result=result), seed))
        out[kind] = mean_rows(shown)
        if scanner:
            out[f"{kind}-scanner"] = mean_rows(scanner)
    out["fixed"] = mean_rows([map_quality(model, vols["fixed"], vols["fixed_labels"], dilation_mm, fixed=vols["fixed"])])
    return out


def validation_heads(data: Path, pairs: int) -> dict:
    """The validation pairs of `refinement_validation.validation_pairs` (spm_avg305, never trained on, seeds
    500..) as `measure`'s ``validation``: ``{"validation-whole-head": [(seed, image, labels)], "validation-brain":
    ...}``."""
    out: dict[str, list] = {"validation-brain": [], "validation-whole-head": []}
    for label, image, labels, _ in validation_pairs(data, "spm_avg305", pairs)[0]:
        kind, seed = label.rsplit(" seed ", 1)
        out["validation-brain" if kind == "brain" else "validation-whole-head"].append((int(seed), image, labels))
    return out


def table(res: dict) -> list[str]:
    lines = ["| head | " + " | ".join(n.replace("left_", "L ").replace("right_", "R ") for n in LABELS) + " | mean | mass outside |",
             "| --- | " + " | ".join("---" for _ in LABELS) + " | --- | --- |"]
    for kind, r in res.items():
        lines.append(f"| {HEADS[kind]} ({r['pairs']}) | " + " | ".join(f"{r['per_structure'][n]:.2f}" for n in LABELS)
                     + f" | **{r['dice']:.3f}** | {100 * r['mass_outside_all']:.0f} % |")
    return lines


def offset_table(res: dict) -> list[str]:
    """Per structure and head: the mean distance from the label's centroid to the thresholded map's, and the mean
    offset vector in the head's own LPS axes (+x left, +y posterior, +z superior)."""
    kinds = [k for k in res if not k.endswith("-scanner")]
    lines = ["| structure | " + " | ".join(HEADS[k] for k in kinds) + " |", "| --- |" + " --- |" * len(kinds)]
    for n in LABELS:
        cells = []
        for k in kinds:
            v, d = res[k]["offset_mm"].get(n), res[k]["offset_distance_mm"].get(n)
            cells.append("-" if v is None else f"{d:.1f} ({v[0]:+.1f}, {v[1]:+.1f}, {v[2]:+.1f})")
        lines.append(f"| {n.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return lines


def card_section(res: dict, date: str, dilation_mm: float) -> str:
    return "\n".join([CARD_BEGIN, "## Structure maps (what the overlay shows)", "",
                      f"The ITN's maps thresholded at 0.5 against the reference labels, Dice per structure, on the "
                      f"held-out test subject (Colin27, never trained on or validated with) in scanner positions, on "
                      f"the validation anatomy (spm_avg305, never trained on) in the validation pairs' positions and "
                      f"on the fixed template, as `register` shows the moving map (`benchmarks/map_dice.py`, {date}): "
                      "the moving head in the fixed head's pose, an affine model's after its own result, a B-spline "
                      "model's after its family's affine (rows 'left in the scanner position': the head "
                      "unregistered, where an affine model's refinement compares the maps and a B-spline model never "
                      "runs); 'mass "
                      f"outside': the share of the maps' summed values outside every structure dilated by "
                      f"{dilation_mm:g} mm (mostly the sigmoid's floor, about 0.02, summed over a head; an overlay "
                      "window starting at 0.1 hides it).", "", *table(res), CARD_END]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/work/braindata", help="output of `istn data prepare`")
    p.add_argument("--models", default=str(MODELS_DIR))
    p.add_argument("--family", default="brain-t1", help="<family>-{affine,bspline}.pt in --models")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--val-pairs", type=int, default=6, help="validation positions (each whole head and brain); 0: none")
    p.add_argument("--dilation-mm", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write-models", action="store_true", help="put the table in the models' cards")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "map_dice"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    vols = eval_volumes(Path(args.data))
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/map_dice.py " + " ".join(sys.argv[1:])
    md = ["# Structure maps of the bundled brain models: Dice of the thresholded maps", "",
          f"Generated by `{command}` on {date}; models in `{args.models}`.", ""]
    results = {}
    affine = None
    validation = validation_heads(Path(args.data), args.val_pairs) if args.val_pairs else None
    registered: dict = {}  # the affine model's results, for the B-spline model's maps
    for stage in ("affine", "bspline"):
        path = Path(args.models) / f"{args.family}-{stage}.pt"
        model = load_model(path)
        affine = affine or model
        if model.config.itn_output != "sigmoid":
            print(f"note: {path.name} has an unbounded ITN head: its maps are not probabilities")
        res = measure(model, vols, args.pairs, args.dilation_mm, affine, validation, registered)
        results[stage] = res
        start = len(md)
        md += [f"## {path.name}", "", *table(res), "",
               "Where the thresholded maps lie against the labels: centroid of (map > 0.5) minus the label's, mm, "
               "in the head's own axes (LPS: +x left, +y posterior, +z superior); the mean distance, then the mean "
               "vector over the positions (a shift they share):", "", *offset_table(res), ""]
        print("\n".join(md[start:]), flush=True)
        if args.write_models:
            write_card_section(path.with_suffix(".md"), card_section(res, date, args.dilation_mm), CARD_BEGIN, CARD_END)
    write_report(args.out, {"date": date, "command": command, "models": args.models, "dilation_mm": args.dilation_mm,
                            "results": results}, md, echo=False)


if __name__ == "__main__":
    main()
