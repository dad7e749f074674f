#!/usr/bin/env python3
"""Label map or intensities? The margin of `istn.metrics.looks_like_intensities` on images of both kinds.

`istn apply` (auto interpolation), `istn evaluate`, the atlas option and the Slicer module ask of an integer image
with more than ``MANY_LABELS`` values whether it holds labels (nearest neighbour, Dice) or intensities (linear).
The test: of its foreground voxels that differ from a face neighbour (its edges), the fraction that are in-between
voxels (equal to none of their face neighbours and between the lowest and highest of them), against
``MAX_IN_BETWEEN_EDGES``. Cases:

- label maps that are hard for it: a thin (2-3 mm) 100-label "cortical ribbon" (a spherical shell cut into
  parcels, labels in order or shuffled) through nearest neighbour onto 2-6 mm voxels, where it breaks up into lone
  voxels; a 136-label Voronoi parcellation at 1 mm, rotated, and at 2.5 mm; the brain label maps of DATA;
- intensity images: the T1/T2 images of DATA as float, int16 and 8-bit; noise-free Gaussian blobs of 200-4000
  levels; a noisy CT-like phantom; synth2d's flat 8-bit shapes (their only in-between values are at the edges).

    python benchmarks/label_or_intensity.py --data DATA --synth2d ../shared/data/synth2d
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.spatial import cKDTree

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))

from report import write_report  # noqa: E402

from istn.metrics import MANY_LABELS, MAX_IN_BETWEEN_EDGES, in_between_edge_fraction  # noqa: E402


def measured(name: str, kind: str, a: np.ndarray) -> dict:
    values, counts = np.unique(a, return_counts=True)
    fraction = in_between_edge_fraction(a, values[np.argmax(counts)])
    taken = "labels" if len(values) - 1 <= MANY_LABELS or fraction <= MAX_IN_BETWEEN_EDGES else "intensities"
    return {"image": name, "kind": kind, "values": int(len(values)), "in_between": fraction, "taken_as": taken}


def label_cases(data: Path | None) -> list[dict]:
    rows = []
    n = 200
    z, y, x = np.mgrid[:n, :n, :n] - n / 2 + 0.5
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    azimuth, elevation = np.arctan2(y, x), np.arccos(np.clip(z / np.maximum(r, 1e-6), -1, 1))
    parcel = (np.floor((azimuth + np.pi) / (2 * np.pi) * 10) * 10 + np.floor(elevation / np.pi * 10)).astype(np.int16) + 1
    shuffled = np.random.default_rng(0).permutation(101).astype(np.int16)
    shuffled[0] = 0
    for thick in (2.0, 2.5, 3.0):
        ribbon = np.where((r > 70) & (r < 70 + thick), parcel, 0).astype(np.int16)
        for order, labels in (("in order", ribbon), ("shuffled", shuffled[ribbon])):
            image = sitk.GetImageFromArray(labels)
            for spacing in (2, 3, 4, 5, 6):
                grid = sitk.Image([int(n / spacing)] * 3, sitk.sitkInt16)
                grid.SetSpacing((float(spacing),) * 3)
                out = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor)
                rows.append(measured(f"ribbon {thick:g} mm, 100 labels {order}, nearest to {spacing} mm", "labels",
                                     sitk.GetArrayFromImage(out)))
    rng = np.random.default_rng(1)
    _, nearest = cKDTree(rng.uniform(0, 160, (136, 3))).query(np.stack(np.mgrid[:160, :160, :160], -1).reshape(-1, 3))
    voronoi = sitk.GetImageFromArray((nearest.reshape(160, 160, 160) + 1).astype(np.int16))
    rotated = sitk.Resample(voronoi, voronoi, sitk.Euler3DTransform((80, 80, 80), 0.3, 0.2, 0.1), sitk.sitkNearestNeighbor)
    coarse = sitk.Image([64] * 3, sitk.sitkInt16)
    coarse.SetSpacing((2.5,) * 3)
    for name, image in (("Voronoi, 136 labels, 1 mm", voronoi), ("the same rotated (nearest)", rotated),
                        ("the same at 2.5 mm (nearest)", sitk.Resample(voronoi, coarse, sitk.Transform(),
                                                                       sitk.sitkNearestNeighbor))):
        rows.append(measured(name, "labels", sitk.GetArrayFromImage(image)))
    for path in sorted(data.glob("*/*_labels.nii.gz")) if data else []:
        rows.append(measured(f"{path.parent.name}/{path.name}", "labels", sitk.GetArrayFromImage(sitk.ReadImage(str(path)))))
    return rows


def intensity_cases(data: Path | None, synth2d: Path | None) -> list[dict]:
    rows = []
    paths = sorted({p.name: p for p in data.glob("*/*_t[12].nii.gz")}.values()) if data else []  # one of each name
    for path in paths:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
        scaled = a / max(float(a.max()), 1e-6)
        for stored, b in (("float", a), ("int16 0-4000", (scaled * 4000).astype(np.int16)),
                          ("8-bit", (scaled * 255).astype(np.uint8))):
            rows.append(measured(f"{path.name} ({stored})", "intensities", b))
    z, y, x = np.mgrid[:96, :96, :96] - 48
    for levels in (200, 1000, 4000):
        blob = (levels * np.exp(-(x ** 2 + y ** 2 + z ** 2) / (2 * 20.0 ** 2))).astype(np.int16)
        rows.append(measured(f"Gaussian blob, {levels} levels, no noise", "intensities", blob))
    ct = np.full(x.shape, -1000, np.int16)
    ct[(x ** 2 + y ** 2 + (z * 1.2) ** 2) < 40 ** 2] = 40
    ct = ct + np.random.default_rng(0).normal(0, 15, ct.shape).astype(np.int16)
    rows.append(measured("CT-like phantom, noise sd 15 HU", "intensities", ct))
    if synth2d:
        shapes = [measured(p.name, "intensities", sitk.GetArrayFromImage(sitk.ReadImage(str(p))))
                  for p in sorted((synth2d / "train").glob("*.png")) if "_seg" not in p.name and "_points" not in p.name]
        for which, pick in (("lowest", min), ("highest", max)):
            row = pick(shapes, key=lambda s: s["in_between"])
            rows.append(dict(row, image=f"synth2d image, the {which} of {len(shapes)} ({row['image']})"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, help="the folder `istn data prepare --out DATA` made (brain images)")
    ap.add_argument("--synth2d", type=Path, help="the synth2d folder (../shared/data/synth2d)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "label_or_intensity"))
    args = ap.parse_args()
    rows = label_cases(args.data) + intensity_cases(args.data, args.synth2d)
    wrong = [r for r in rows if r["taken_as"] != r["kind"]]
    labels = [r["in_between"] for r in rows if r["kind"] == "labels"]
    images = [r["in_between"] for r in rows if r["kind"] == "intensities" and r["values"] - 1 > MANY_LABELS]
    lines = ["# Label map or intensities (`istn.metrics.looks_like_intensities`)", "",
             f"An integer image with more than {MANY_LABELS} values is taken for intensities when more than "
             f"{MAX_IN_BETWEEN_EDGES:g} of its edges (foreground voxels that differ from a face neighbour) are "
             "in-between voxels (equal to none of their face neighbours, between the lowest and highest of them). "
             "`python benchmarks/label_or_intensity.py "
             "--data DATA --synth2d ../shared/data/synth2d`.", "",
             f"Label maps: at most **{max(labels):.4f}**; intensity images (of more than {MANY_LABELS} values): at "
             f"least **{min(images):.4f}**. Taken for the wrong kind: **{len(wrong)}** of {len(rows)}.", "",
             "| image | kind | values | in-between edges | taken as |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['image']} | {r['kind']} | {r['values']} | {r['in_between']:.4f} | {r['taken_as']} |" for r in rows]
    write_report(args.out, {"max_in_between_edges": MAX_IN_BETWEEN_EDGES, "many_labels": MANY_LABELS,
                            "rows": rows}, lines)


if __name__ == "__main__":
    main()
