"""A clinical thick-slice series registered to the volume of the same head: aligned as given (one session, no
motion) or after a small head motion. The default pipeline with and without the rule that gives an aligned pair
back as given (`istn.registration.NO_GAIN`, `RegistrationResult.start_kept`).

    python benchmarks/aligned_series.py [--data /work/braindata] [--out benchmarks/results/aligned_series]

Heads: the sample fixed and moving heads (bundled; brain-extracted, 2 mm) and, with ``--data`` (`istn data
prepare`), Colin27's whole head (held out, 2 mm). Each is acquired again as thick slices (`acquisition.acquire`:
axial, sagittal, coronal, oblique; the slice's point spread), as it is or after a motion of 3 / 2 / 2.5 degrees and
2 / 3 / 1.5 mm about its centre, and registered to itself with the bundled default chain, the second try and the
turn search allowed (`istn.chain.register_with_second_try`, as `istn register`). "Rule off": ``NO_GAIN`` set to
-inf for the run (the engine before it: never gives the start back). Distances: mean / max (mm) over the head's
foreground from the known transform (the identity when aligned).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))
sys.path.insert(0, str(REPO / "benchmarks"))
from acquisition import acquire  # noqa: E402
from files_users_bring import head_arguments, heads  # noqa: E402
from report import write_report  # noqa: E402

from istn import demo, registration  # noqa: E402
from istn.chain import register_with_second_try  # noqa: E402
from istn.export import load_model  # noqa: E402

# (name, spacing (ITK order, along the head's stored axes), angles (degrees) of the slices' grid)
ACQUISITIONS = [
    ("axial 2 x 2 x 6 mm", (2.0, 2.0, 6.0), (0.0, 0.0, 0.0)),
    ("axial 2 x 2 x 8 mm", (2.0, 2.0, 8.0), (0.0, 0.0, 0.0)),
    ("sagittal 6 x 2 x 2 mm", (6.0, 2.0, 2.0), (0.0, 0.0, 0.0)),
    ("coronal 2 x 6 x 2 mm", (2.0, 6.0, 2.0), (0.0, 0.0, 0.0)),
    ("oblique axial (20 degrees), 2 x 2 x 6 mm", (2.0, 2.0, 6.0), (20.0, 0.0, 0.0)),
]
MOTION_DEGREES, MOTION_MM = (3.0, -2.0, 2.5), (2.0, -3.0, 1.5)


def motion(image: sitk.Image) -> sitk.Euler3DTransform:
    """The head's motion between the scans, about its grid's centre (a resampling through it moves the head by its
    inverse)."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in image.GetSize()])
    return sitk.Euler3DTransform(centre, *np.radians(MOTION_DEGREES).tolist(), MOTION_MM)


@contextmanager
def rule(on: bool):
    """The engine with the rule (the default) or without it (``NO_GAIN`` -inf: a start is never given back)."""
    kept = registration.NO_GAIN
    registration.NO_GAIN = kept if on else float("-inf")
    try:
        yield
    finally:
        registration.NO_GAIN = kept


def series_heads(data: str | None) -> list[tuple[str, sitk.Image]]:
    """(name, image): the sample template (the fixed head) and `files_users_bring.heads`' (the sample moving head;
    Colin27's whole head with ``data``)."""
    pair = demo.sample_pair()
    found = [("sample template (fixed head)", pair["fixed"])] + [(name, image) for name, image, _ in heads(pair, data)]
    return [(name, sitk.Cast(image, sitk.sitkFloat32)) for name, image in found]


def main(argv=None) -> int:
    args = head_arguments(__doc__.splitlines()[0], "aligned_series").parse_args(argv)
    models = [load_model(demo.bundled_model(n)) for n in (demo.AFFINE_MODEL, demo.BSPLINE_MODEL)]
    rows = []
    for head, image in series_heads(args.data):
        mask = sitk.GetArrayViewFromImage(sitk.OtsuThreshold(image, 0, 1)) > 0
        points = np.array([image.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]])
                           for i in np.argwhere(mask)[::50]])
        move = motion(image)
        moved = sitk.Resample(image, image, move, sitk.sitkLinear, 0.0)
        for when, source, truth in (("aligned", image, sitk.Transform(3, sitk.sitkIdentity)),
                                    ("after a motion", moved, move.GetInverse())):
            known = np.array([truth.TransformPoint(p.tolist()) for p in points])
            for name, spacing, angles in ACQUISITIONS:
                series = acquire(source, spacing, angles_deg=angles)
                row = {"head": head, "when": when, "series": name,
                       "start_mean_mm": float(np.linalg.norm(known - points, axis=1).mean())}
                for on in (False, True):
                    with rule(on):
                        t0 = time.perf_counter()
                        kept, retry = register_with_second_try(image, series, models, threads=args.threads)
                        seconds = time.perf_counter() - t0
                    error = np.linalg.norm(np.array([kept[-1].transform.TransformPoint(p.tolist()) for p in points])
                                           - known, axis=1)
                    row["on" if on else "off"] = {
                        "mean_mm": float(error.mean()), "max_mm": float(error.max()), "seconds": seconds,
                        "start_kept": [s.start_kept for s in kept], "second_try": retry is not None,
                        "turned": bool(kept[0].turned),
                        "checks_failed": sorted({c for s in kept for c in s.self_checks_failed}),
                        "warnings": sum(len(s.warnings) for s in kept)}
                rows.append(row)
                a, b = row["off"], row["on"]
                print(f"{head} | {when} | {name}: {a['mean_mm']:.2f}/{a['max_mm']:.2f} -> {b['mean_mm']:.2f}/"
                      f"{b['max_mm']:.2f} mm, checks {a['checks_failed']} -> {b['checks_failed']}, kept "
                      f"{b['start_kept']}, {a['seconds']:.1f} -> {b['seconds']:.1f} s", flush=True)
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/aligned_series.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def said(r: dict) -> str:
        parts = [", ".join(r["checks_failed"]) or "none"]
        if r["second_try"]:
            parts.append("second try")
        if r["turned"]:
            parts.append("turned")
        return "; ".join(parts)

    md = ["# A thick-slice series registered to the volume of the same head", "",
          f"Generated by `{cmd}` on {created}. The bundled default chain (brain-t1 affine + B-spline, the second try "
          "and the turn search allowed, as `istn register`), each series registered to the head it was acquired "
          "from, without and with the rule that gives an aligned pair back as given (`NO_GAIN`). Distance: mean / "
          "max (mm) over the head's foreground from the known transform (the identity when aligned); start: the "
          "same for the images as given. Given back: the stages that returned their start (affine, B-spline). "
          f"Checks: the self-checks the result kept fails, and what ran after. Seconds: {args.threads} threads.", "",
          "| head | when | series | start, mm | off: mm | on: mm | given back | checks, off -> on | s (off / on) |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        a, b = r["off"], r["on"]
        md.append(f"| {r['head']} | {r['when']} | {r['series']} | {r['start_mean_mm']:.1f} | "
                  f"{a['mean_mm']:.2f} / {a['max_mm']:.2f} | {b['mean_mm']:.2f} / {b['max_mm']:.2f} | "
                  f"{' / '.join('yes' if k else 'no' for k in b['start_kept'])} | {said(a)} -> {said(b)} | "
                  f"{a['seconds']:.1f} / {b['seconds']:.1f} |")
    off = [r["off"] for r in rows if r["when"] == "aligned"]
    on = [r["on"] for r in rows if r["when"] == "aligned"]
    moved_off = [r["off"] for r in rows if r["when"] != "aligned"]
    moved_on = [r["on"] for r in rows if r["when"] != "aligned"]
    md += ["", f"Aligned ({len(on)} series): mean distance {np.mean([r['mean_mm'] for r in off]):.2f} -> "
           f"{np.mean([r['mean_mm'] for r in on]):.2f} mm; a self-check failed on "
           f"{sum(bool(r['checks_failed']) for r in off)} -> {sum(bool(r['checks_failed']) for r in on)}; second try "
           f"{sum(r['second_try'] for r in off)} -> {sum(r['second_try'] for r in on)}; "
           f"{np.mean([r['seconds'] for r in off]):.1f} -> {np.mean([r['seconds'] for r in on]):.1f} s. After a "
           f"motion ({len(moved_on)}): {np.mean([r['mean_mm'] for r in moved_off]):.2f} -> "
           f"{np.mean([r['mean_mm'] for r in moved_on]):.2f} mm, given back "
           f"{sum(any(r['start_kept']) for r in moved_on)}."]
    write_report(args.out, {"created": created, "command": cmd, "rows": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
