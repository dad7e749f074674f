"""Heads turned beyond what the network brings back, or stored under a header turned by right angles: the default
pipeline with and without its turn search (`istn.chain.search_turns`, after a failed self-check).

    python benchmarks/turned_heads.py [--data /work/braindata] [--out benchmarks/results/turned_heads]

Heads: the sample moving head (bundled) and, with ``--data`` (`istn data prepare`), Colin27's whole head (held out).
Each is turned about its foreground centre (the voxels resampled, on a padded grid: a head that lay so in the
scanner; the control row resamples it so without turning it, as the Dice of resampled labels is the reference for
those rows) or stored under a turned header (the voxels as they are: a prone patient taken for supine, a sagittal
acquisition written as axial), then registered with the bundled default chain, the second try allowed
(`istn.chain.register_with_second_try`, as `istn register`), with ``turns=False`` (the engine before the search)
and ``turns=True`` (the default):

- **to the template**: fixed = the sample template; Dice of the 8 sub-cortical structures;
- **to itself**: fixed = the head as it was; mean / max distance (mm) over its foreground from the known transform.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))
sys.path.insert(0, str(REPO / "benchmarks"))
from files_users_bring import head_arguments, head_turn, header_turned, heads, turned  # noqa: E402
from report import write_report  # noqa: E402

from istn import demo  # noqa: E402
from istn.chain import register_with_second_try  # noqa: E402
from istn.export import load_model  # noqa: E402
from istn.geometry import Grid  # noqa: E402

RELABELLED = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # a sagittal acquisition as axial
# (name, "voxels" (degrees, world axis) | "header" (turn))
CASES = [
    ("not turned, resampled as the turned ones are (the control)", "voxels", (0.0, 2)),
    ("turned 60 degrees about left-right", "voxels", (60.0, 0)),
    ("turned 60 degrees about the vertical", "voxels", (60.0, 2)),
    ("turned 90 degrees about left-right", "voxels", (90.0, 0)),
    ("turned 90 degrees about front-back", "voxels", (90.0, 1)),
    ("turned 90 degrees about the vertical", "voxels", (90.0, 2)),
    ("upside down: 180 degrees about left-right", "voxels", (180.0, 0)),
    ("header: prone taken for supine (180 about the vertical)", "header", np.diag([-1.0, -1.0, 1.0])),
    ("header: sagittal acquisition written as axial", "header", RELABELLED),
]


def truth(image: sitk.Image, kind: str, how) -> sitk.Transform:
    """The known transform, the head as it was (fixed world) -> the turned head (moving world)."""
    if kind == "voxels":  # as `files_users_bring.turned` turns it
        return head_turn(image, *how)
    t = sitk.AffineTransform(3)  # as `files_users_bring.header_turned` stores it: about the grid's centre
    t.SetCenter(Grid.from_image(image).centre.tolist())
    t.SetMatrix(np.asarray(how, dtype=float).ravel().tolist())
    return t


def main(argv=None) -> int:
    args = head_arguments(__doc__.splitlines()[0], "turned_heads").parse_args(argv)
    pair = demo.sample_pair()
    template, template_labels = pair["fixed"], pair["fixed_labels"]
    models = [load_model(demo.bundled_model(n)) for n in (demo.AFFINE_MODEL, demo.BSPLINE_MODEL)]
    rows = []
    for head, image, labels in heads(pair, args.data):
        image = sitk.Cast(image, sitk.sitkFloat32)
        mask = sitk.GetArrayViewFromImage(sitk.OtsuThreshold(image, 0, 1)) > 0
        points = np.array([image.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]])
                           for i in np.argwhere(mask)[::50]])
        for name, kind, how in CASES:
            make = turned(*how) if kind == "voxels" else header_turned(how)
            moving, moving_labels, _ = make(image, labels)
            known = np.array([truth(image, kind, how).TransformPoint(p.tolist()) for p in points])
            row = {"head": head, "case": name}
            for search in (False, True):
                key = "search" if search else "no search"
                t0 = time.perf_counter()
                kept, _ = register_with_second_try(template, moving, models, threads=args.threads, turns=search)
                seconds = time.perf_counter() - t0
                dice = float(np.mean(list(demo.structure_dice(template_labels, moving_labels,
                                                              kept[-1].transform).values())))
                itself, _ = register_with_second_try(image, moving, models, threads=args.threads, turns=search)
                error = np.linalg.norm(np.array([itself[-1].transform.TransformPoint(p.tolist()) for p in points])
                                       - known, axis=1)
                row[key] = {"dice": dice, "seconds": seconds, "turn": kept[0].turned.get("turn"),
                            "checks_failed": sorted({c for s in kept for c in s.self_checks_failed}),
                            "itself_mean_mm": float(error.mean()), "itself_max_mm": float(error.max()),
                            "itself_turn": itself[0].turned.get("turn")}
            rows.append(row)
            a, b = row["no search"], row["search"]
            print(f"{head} | {name}: Dice {a['dice']:.3f} -> {b['dice']:.3f}, to itself {a['itself_mean_mm']:.1f} -> "
                  f"{b['itself_mean_mm']:.1f} mm, {b['turn']}, {a['seconds']:.1f} / {b['seconds']:.1f} s", flush=True)
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/turned_heads.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = ["# Heads turned by right angles, and the turn search", "",
          f"Generated by `{cmd}` on {created}. The bundled default chain (brain-t1 affine + B-spline, the second try "
          "allowed), without and with the turn search (`turns=False` / the default). To the template: Dice of the 8 "
          "sub-cortical structures against the sample template. To itself: the head registered to itself as it was, "
          "mean / max distance (mm) over its foreground from the known transform. Turn: what the search found "
          "(to the template / to itself); checks: the self-checks the result kept still fails. Seconds: the "
          f"registration to the template ({args.threads} threads).", "",
          "| head | case | Dice, no search -> search | to itself, mm: no search -> search | turn found | "
          "checks failed (no search / search) | s (no search / search) |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        a, b = r["no search"], r["search"]
        md.append(f"| {r['head']} | {r['case']} | {a['dice']:.3f} -> {b['dice']:.3f} | "
                  f"{a['itself_mean_mm']:.1f} / {a['itself_max_mm']:.1f} -> {b['itself_mean_mm']:.1f} / "
                  f"{b['itself_max_mm']:.1f} | {b['turn'] or '-'} / {b['itself_turn'] or '-'} | "
                  f"{', '.join(a['checks_failed']) or 'none'} / {', '.join(b['checks_failed']) or 'none'} | "
                  f"{a['seconds']:.1f} / {b['seconds']:.1f} |")
    write_report(args.out, {"created": created, "command": cmd, "rows": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
