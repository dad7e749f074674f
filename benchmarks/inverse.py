"""The inverse of a registration (what `istn apply --inverse`, `istn invert` and `istn register --atlas` go through)
against ITK's own field inversion, on the bundled sample pair: needs only the repository.

    python benchmarks/inverse.py [--seeds 101,102,103] [--out benchmarks/results/inverse]

For each seed the sample moving head is placed in a scanner position (`istn.demo.place_in_scanner`: 10-20 deg,
10-20 mm, +-10 %) and registered to the sample template with the bundled models (affine + B-spline, their own
settings). Its transform (fixed -> moving world points) is then inverted over the moving image's grid

- by `istn.inverse.inverse_transform` (a fixed-point solve on a 4 mm lattice, then the linear part's exact inverse);
- by ITK's `InvertDisplacementFieldImageFilter` (SimpleITK) of the transform sampled as a displacement field on
  the same 4 mm lattice (20 and 50 iterations), the usual way to invert a deformation with ITK.

Scored: the round trip |T(inverse(y)) - y| (mm) at 2000 random points of the moving image's field of view (exact
ITK transforms), the share of them beyond 0.5 mm, seconds, and the Dice of the template's labels brought onto the
moving grid through each inverse against the moving head's own labels (mean of the 8 structures; the forward
direction, moving labels onto the template through T, beside it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))
sys.path.insert(0, str(REPO / "benchmarks"))
from report import write_report  # noqa: E402

from istn import demo  # noqa: E402
from istn.export import load_model  # noqa: E402
from istn.geometry import Grid, field_lattice  # noqa: E402
from istn.inverse import inverse_transform, round_trip  # noqa: E402
from istn.metrics import dice  # noqa: E402
from istn.registration import OUTPUT_FIELD_SPACING_MM, register, warp_image  # noqa: E402


def itk_inverse(transform: sitk.Transform, moving: sitk.Image, iterations: int) -> sitk.Transform:
    """ITK's inversion of ``transform`` sampled as a displacement field on the 4 mm lattice over ``moving``."""
    lattice = field_lattice(Grid.from_image(moving), OUTPUT_FIELD_SPACING_MM)
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, list(lattice.size), lattice.origin,
                                              lattice.spacing, lattice.direction)
    f = sitk.InvertDisplacementFieldImageFilter()
    f.SetMaximumNumberOfIterations(iterations)
    f.SetMeanErrorToleranceThreshold(1e-4)
    f.SetMaxErrorToleranceThreshold(0.01)
    f.SetEnforceBoundaryCondition(False)
    return sitk.DisplacementFieldTransform(sitk.Cast(f.Execute(field), sitk.sitkVectorFloat64))


def mean_dice(a: sitk.Image, b: sitk.Image) -> float:
    x, y = sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)
    return float(np.mean([dice(x == v, y == v) for v in range(1, 9)]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="101,102,103")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "inverse"))
    args = p.parse_args(argv)
    pair = demo.sample_pair()
    fixed, fixed_labels = pair["fixed"], pair["fixed_labels"]
    models = [load_model(demo.MODELS_DIR / name) for name in (demo.AFFINE_MODEL, demo.BSPLINE_MODEL)]
    rng = np.random.default_rng(0)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        moving, moving_labels, _ = demo.place_in_scanner(pair["moving"], pair["moving_labels"], seed=seed)
        a = register(fixed, moving, models[0], device="cpu")
        b = register(fixed, moving, models[1], device="cpu", initial_transform=a.transform)
        tx = b.transform
        grid = Grid.from_image(moving)
        probe = grid.voxel_to_world(rng.uniform(0, 1, (2000, 3)) * (np.asarray(grid.size) - 1))
        forward = mean_dice(fixed_labels, warp_image(moving_labels, fixed_labels, tx, sitk.sitkNearestNeighbor))
        methods = {"istn.inverse (fixed-point on the lattice)": lambda: inverse_transform(tx, moving).transform,
                   "ITK InvertDisplacementField, 20 its": lambda: itk_inverse(tx, moving, 20),
                   "ITK InvertDisplacementField, 50 its": lambda: itk_inverse(tx, moving, 50)}
        for name, make in methods.items():
            t = time.perf_counter()
            inv = make()
            seconds = time.perf_counter() - t
            trip = round_trip(tx, inv, probe)
            atlas = warp_image(fixed_labels, moving_labels, inv, sitk.sitkNearestNeighbor)
            rows.append({"seed": seed, "method": name, "seconds": seconds, **trip,
                         "dice_inverse": mean_dice(atlas, moving_labels), "dice_forward": forward})
            print(seed, name, f"{seconds:.2f} s", {k: round(v, 4) for k, v in trip.items()},
                  f"Dice {rows[-1]['dice_inverse']:.3f} (forward {forward:.3f})", flush=True)
    names = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["# The inverse of a registration: istn.inverse vs ITK's field inversion (sample pair)", "",
             f"Generated by `python benchmarks/inverse.py --seeds {args.seeds}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
             "The sample moving head placed in scanner positions (seeds above), registered with the bundled models; "
             "its transform inverted over the moving grid on a 4 mm lattice. Round trip |T(T^-1(y)) - y| at 2000 "
             "random points of the moving field of view (mm); Dice: the template's labels through the inverse onto "
             "the moving grid against the moving labels (the forward direction beside it). Means over the seeds.", "",
             "| inverse | s | round trip median mm | p99 mm | max mm | points > 0.5 mm | Dice (inverse) | Dice (forward) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        r = [x for x in rows if x["method"] == name]
        m = {k: float(np.mean([x[k] for x in r])) for k in ("seconds", "median", "p99", "max", "over_warn",
                                                             "dice_inverse", "dice_forward")}
        lines.append(f"| {name} | {m['seconds']:.2f} | {m['median']:.4f} | {m['p99']:.3f} | {m['max']:.3f} | "
                     f"{100 * m['over_warn']:.2f} % | {m['dice_inverse']:.3f} | {m['dice_forward']:.3f} |")
    write_report(args.out, {"rows": rows, "seeds": args.seeds}, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
