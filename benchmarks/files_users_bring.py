"""The files users bring: a fill value outside the field of view, hot pixels, contrast-filled vessels, coil shading,
thick slices, a neck and shoulders, a second object, a head turned far, a header turned by right angles, a spacing
in cm. Each is made from a real head and
registered with the bundled default chain (`istn.chain.register_with_second_try`, the command line's default) to the
sample template; the table gives the Dice of the 8 sub-cortical structures beside the same head as stored, and what
the result said.

    python benchmarks/files_users_bring.py [--data /work/braindata] [--out benchmarks/results/files_users_bring]

Heads: the sample moving head (bundled; brain-extracted, 2 mm) and, with ``--data`` (`istn data prepare`),
Colin27's whole head (held out, 2 mm). "placed": moved into a seeded scanner position first
(`istn.demo.place_in_scanner`, 10-20 degrees); the neck and second-head cases keep the head where it is, as the pose
audit made them (session 37). Each variant changes only what a converter, a scanner or a header would.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))
sys.path.insert(0, str(REPO / "benchmarks"))
from report import write_report  # noqa: E402

from istn import demo  # noqa: E402
from istn.chain import register_with_second_try  # noqa: E402
from istn.data import foreground_centre  # noqa: E402
from istn.data.synthesis import head_mask  # noqa: E402
from istn.export import load_model  # noqa: E402
from istn.geometry import Grid  # noqa: E402


def _like(array: np.ndarray, ref: sitk.Image, pixel=sitk.sitkFloat32) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ref)
    return sitk.Cast(image, pixel)


def corner_fill(fraction: float, value: float, pixel=sitk.sitkFloat32, scale: float = 1.0):
    """The box's corner (voxel index sum below a bound) holding ``fraction`` of the voxels set to ``value``."""
    def make(image: sitk.Image, labels: sitk.Image):
        a = sitk.GetArrayFromImage(image).astype(np.float64) * scale
        s = np.add.reduce(np.indices(a.shape), axis=0)
        a[s <= np.quantile(s, fraction)] = value
        return _like(a, image, pixel), labels, {}
    return make


def hot_pixels(fraction: float, times: float):
    def make(image, labels):
        a = sitk.GetArrayFromImage(image).astype(np.float32)
        a[np.random.default_rng(0).random(a.shape) < fraction] = times * a.max()
        return _like(a, image), labels, {}
    return make


def vessels(fraction: float, times: float):
    """Contrast-filled vessels: random smooth tubes (random walks of 1 mm steps, a voxel wide at 2 mm) through the
    head (`istn.data.synthesis.head_mask`), at ``times`` its 99th percentile, added until they cover ``fraction`` of
    it (the intensity audit's, sessions 37 and 39)."""
    def make(image, labels):
        from scipy import ndimage

        a = sitk.GetArrayFromImage(image).astype(np.float32)
        head = head_mask(a)
        p99 = float(np.percentile(a[head], 99))
        step = 1.0 / np.asarray(image.GetSpacing()[::-1])  # 1 mm in voxels, array order
        rng, tubes = np.random.default_rng(0), np.zeros(a.shape, bool)
        starts = np.argwhere(ndimage.binary_erosion(head, iterations=2))
        while tubes.sum() < fraction * head.sum():
            p = starts[rng.integers(len(starts))].astype(float)
            v = rng.normal(size=3)
            for _ in range(300):
                v = v / np.linalg.norm(v) + 0.3 * rng.normal(size=3)
                p = p + step * v / np.linalg.norm(v)
                q = tuple(np.round(p).astype(int))
                if min(q) < 0 or any(i >= n for i, n in zip(q, a.shape)) or not head[q]:
                    break
                tubes[q] = True
        a[tubes] = times * p99
        return _like(a, image), labels, {}
    return make


def shaded(low: float, high: float, axis: int, **options):
    """Multiplied by a factor from ``low`` to ``high`` along the world axis ``axis`` (0: left-right, 2: vertical)."""
    def make(image, labels):
        world = Grid.from_image(image).world_points()[..., axis]
        t = (world - world.min()) / max(np.ptp(world), 1e-9)
        factor = low * (high / low) ** t
        return _like(sitk.GetArrayFromImage(image) * factor, image), labels, dict(options)
    return make


def neck_and_shoulders(image, labels):
    """130 mm more below the head, and 400 mm wide: a neck (cylinder) and shoulders (slab) of soft tissue with a
    bright rim, as in a head-and-neck field of view."""
    sp = image.GetSpacing()
    grid = Grid.from_image(image)  # identity direction (the heads as prepared): voxel axes are world axes
    top = grid.voxel_to_world(np.array(image.GetSize()) - 1.0)
    bottom = grid.voxel_to_world(np.zeros(3))
    lower = [int(np.ceil(max(0.0, 200.0 - abs(bottom[0])) / sp[0])), 0, int(np.ceil(130.0 / sp[2]))]
    upper = [int(np.ceil(max(0.0, 200.0 - abs(top[0])) / sp[0])), 0, 0]
    padded = sitk.ConstantPad(sitk.Cast(image, sitk.sitkFloat32), lower, upper, 0.0)
    labels = sitk.ConstantPad(labels, lower, upper, 0)
    p = Grid.from_image(padded).world_points()
    centre = foreground_centre(image)
    x, y, z = p[..., 0] - centre[0], p[..., 1] - centre[1], p[..., 2]
    zb = bottom[2]
    neck = (z < zb + 4) & (z >= zb - 80) & ((x / 55.0) ** 2 + ((y - 20) / 60.0) ** 2 <= 1)
    shoulders = (z < zb - 70) & ((x / 190.0) ** 2 + ((y - 20) / 70.0) ** 2 <= 1)
    a = sitk.GetArrayFromImage(padded)
    top_value = float(np.percentile(a[a > 0], 99))
    tissue = (neck | shoulders) & (a <= 1)
    a[tissue] = 0.55 * top_value + 0.06 * top_value * np.random.default_rng(0).standard_normal(int(tissue.sum()))
    return _like(a, padded), labels, {}


def second_head(image, labels):
    """The same head again, 20 mm to its left in a field of view widened for it (two heads side by side)."""
    width = image.GetSize()[0]
    gap = int(np.ceil(20.0 / image.GetSpacing()[0]))
    wide = sitk.ConstantPad(sitk.Cast(image, sitk.sitkFloat32), [0, 0, 0], [width + gap, 0, 0], 0.0)
    a = sitk.GetArrayFromImage(wide)
    a[:, :, width + gap:] = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    return _like(a, wide), sitk.ConstantPad(labels, [0, 0, 0], [width + gap, 0, 0], 0), {}


def head_turn(image: sitk.Image, degrees: float, axis: int) -> sitk.AffineTransform:
    """``degrees`` about ``image``'s foreground centre and the world axis ``axis``: the head as it was (world) -> the
    head `turned` makes."""
    from scipy.spatial.transform import Rotation

    turn = sitk.AffineTransform(3)
    turn.SetCenter(foreground_centre(image).tolist())
    turn.SetMatrix(Rotation.from_rotvec(np.deg2rad(degrees) * np.eye(3)[axis]).as_matrix().ravel().tolist())
    return turn


def turned(degrees: float, axis: int):
    """Turned about its foreground centre and the world axis ``axis`` (`head_turn`), on a grid padded to hold it."""
    def make(image, labels):
        turn = head_turn(image, degrees, axis)
        grid = Grid.from_image(image)
        pad = 20
        ref = Grid(tuple(n + 2 * pad for n in grid.size), grid.spacing,
                   tuple(grid.voxel_to_world(np.full(3, -float(pad))).tolist()), grid.direction).reference_image()
        inverse = turn.GetInverse()
        return (sitk.Resample(image, ref, inverse, sitk.sitkLinear, 0.0, sitk.sitkFloat32),
                sitk.Resample(labels, ref, inverse, sitk.sitkNearestNeighbor, 0), {})
    return make


def header_turned(turn: np.ndarray):
    """The voxels as they are under a header turned by ``turn`` about the image's centre: a prone patient taken for
    supine, a sagittal acquisition written as axial (labels alike)."""
    from acquisition import with_turned_header

    def make(image, labels):
        centre = Grid.from_image(image).centre  # the labels' too
        return with_turned_header(image, turn, centre), with_turned_header(labels, turn, centre), {}
    return make


def thick_slices(spacing: tuple[float, float, float]):
    """A clinical 2D acquisition: slices ``spacing`` mm apart (ITK order, along the head's stored axes), each with
    the thickness's point spread (`acquisition.acquire`). The labels stay as they were: the same anatomy in the
    same world (labels resampled onto 6 mm slices would cost Dice by their own blockiness, not the registration)."""
    from acquisition import acquire

    def make(image, labels):
        return acquire(image, spacing), labels, {}
    return make


def spacing_times(factor: float):
    def make(image, labels):
        out, lab = sitk.Image(image), sitk.Image(labels)
        for im in (out, lab):
            im.SetSpacing([s * factor for s in image.GetSpacing()])
            im.SetOrigin([o * factor for o in image.GetOrigin()])
        return out, lab, {}
    return make


# (name, placed in a scanner position first, make(image, labels) -> (image, labels, register options))
VARIANTS: list[tuple[str, bool, Callable]] = [
    ("as stored", True, lambda image, labels: (image, labels, {})),
    ("1 % of the box at -1024 (a reslice's corner)", True, corner_fill(0.01, -1024.0)),
    ("3 % at -32768, int16", True, corner_fill(0.03, -32768.0, sitk.sitkInt16, 20.0)),
    ("0.1 % hot pixels at 10x the maximum", True, hot_pixels(0.001, 10.0)),
    ("contrast-filled vessels: 1 % of the head at 2.5x its 99th percentile", True, vessels(0.01, 2.5)),
    ("contrast-filled vessels: 3 % of the head at 2.5x its 99th percentile", True, vessels(0.03, 2.5)),
    ("shaded 0.5x-2x left to right", True, shaded(0.5, 2.0, 0)),
    ("shaded 0.5x-2x left to right, --bias-correct", True, shaded(0.5, 2.0, 0, bias_correct=True)),
    ("thick axial slices, 2 x 2 x 6 mm", True, thick_slices((2.0, 2.0, 6.0))),
    ("thick sagittal slices, 6 x 2 x 2 mm", True, thick_slices((6.0, 2.0, 2.0))),
    ("turned 40 degrees about the vertical", False, turned(40.0, 2)),
    ("stored prone: header turned 180 degrees about the vertical", True, header_turned(np.diag([-1.0, -1.0, 1.0]))),
    ("a sagittal acquisition stored as axial (axes relabelled)", True,
     header_turned(np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))),
    ("neck and shoulders below (400 mm wide)", False, neck_and_shoulders),
    ("neck and shoulders below, stored upside down: header turned 180 degrees about left-right", False,
     lambda image, labels: header_turned(np.diag([1.0, -1.0, -1.0]))(*neck_and_shoulders(image, labels)[:2])),
    ("a second head beside it", False, second_head),
    ("spacing in cm (x0.1)", True, spacing_times(0.1)),
]


def heads(pair: dict, data: str | None) -> list[tuple[str, sitk.Image, sitk.Image]]:
    """(name, image, labels): the sample moving head (``pair``: `istn.demo.sample_pair`) and, with ``data`` (`istn data
    prepare`'s folder), Colin27's whole head (held out)."""
    found = [("sample head (brain-extracted)", pair["moving"], pair["moving_labels"])]
    if data:
        ev = Path(data) / "eval"
        found.append(("Colin27 whole head", sitk.ReadImage(str(ev / "colin27_t1.nii.gz")),
                      sitk.ReadImage(str(ev / "colin27_labels.nii.gz"))))
    return found


def head_arguments(description: str, results: str) -> argparse.ArgumentParser:
    """The arguments of the benchmarks on these heads: ``--data`` (for `heads`), ``--threads``, ``--out``
    (default ``benchmarks/results/<results>``)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data", default=None, help="output of `istn data prepare` (Colin27's whole head); optional")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / results))
    return ap


def main(argv=None) -> int:
    ap = head_arguments(__doc__.splitlines()[0], "files_users_bring")
    ap.add_argument("--before", action="append", default=[],
                    help="an earlier run's .json (e.g. this script run in a checkout of an earlier commit): its Dice "
                         "shown beside, n/a for a file it did not make; repeat for several, oldest first")
    ap.add_argument("--before-label", action="append", default=[], help="each --before column's name, in order")
    args = ap.parse_args(argv)
    import json

    labels_ = args.before_label + [f"before {i + 1}" for i in range(len(args.before_label), len(args.before))]
    befores = [(label, {(r["head"], r["variant"]): r for r in json.loads(Path(path).read_text())["rows"]})
               for label, path in zip(labels_, args.before)]
    pair = demo.sample_pair()
    fixed, fixed_labels = pair["fixed"], pair["fixed_labels"]
    models = [load_model(demo.bundled_model(n)) for n in (demo.AFFINE_MODEL, demo.BSPLINE_MODEL)]
    rows = []
    for head, image, labels in heads(pair, args.data):
        placed, placed_labels, _ = demo.place_in_scanner(sitk.Cast(image, sitk.sitkFloat32), labels)
        for name, place, make in VARIANTS:
            if name.startswith("neck") and "whole" not in head:
                continue  # a neck under a brain-extracted head is no file anyone brings
            moving, moving_labels, options = make(placed if place else image, placed_labels if place else labels)
            t0 = time.perf_counter()
            try:
                kept, retry = register_with_second_try(fixed, moving, models, threads=args.threads, **options)
            except TypeError as error:  # an option an earlier engine lacks (run with --before's checkout)
                rows.append({"head": head, "variant": name, "placed": place, "error": str(error)})
                print(f"{head} | {name}: {error}", flush=True)
                continue
            seconds = time.perf_counter() - t0
            dice = float(np.mean(list(demo.structure_dice(fixed_labels, moving_labels, kept[-1].transform).values())))
            warnings = [w for s in kept for w in s.warnings]
            rows.append({"head": head, "variant": name, "placed": place, "dice": dice, "seconds": seconds,
                         "second_try": None if retry is None else ("kept" if retry.kept_second else "not kept"),
                         "affine_looks": kept[0].passes, "warnings": warnings, "options": options})
            print(f"{head} | {name}: Dice {dice:.3f}, {len(warnings)} warnings, {seconds:.1f} s", flush=True)
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/files_users_bring.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = ["# The files users bring", "",
          f"Generated by `{cmd}` on {created}. Fixed: the sample template (ICBM 2009a, brain-masked, 2 mm). Each "
          "moving head registered with the bundled default chain (brain-t1 affine + B-spline, the second try "
          "allowed, as `istn register`); Dice: mean of the 8 sub-cortical structures; warnings: those the result "
          "carries (self-checks, slab, scale, objects apart, the second try's note). Before session 38 (the "
          "audits' numbers, in its note): a 1 % corner at -1024 0.693 (sample head), 0.752 (Colin27 1 mm); hot "
          "pixels -0.005 to -0.04; a neck and shoulders 0.00; a second head 0.00; a head turned 35-45 degrees "
          "6.5-15.7 mm from the truth (to itself).", "",
          "| head | file | placed | " + "".join(f"Dice ({label}) | " for label, _ in befores) + "Dice | affine looks | "
          "second try | warnings | s |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(befores)]
    for r in rows:
        if "error" in r:
            continue
        said = "; ".join(w.split(":")[0][:70] for w in r["warnings"]) or "none"
        was = "".join(f"{old[(r['head'], r['variant'])]['dice']:.3f} | "
                      if "dice" in old.get((r["head"], r["variant"]), {}) else "n/a | " for _, old in befores)
        md.append(f"| {r['head']} | {r['variant']} | {'yes' if r['placed'] else 'no'} | {was}{r['dice']:.3f} | "
                  f"{r['affine_looks']} | {r['second_try'] or '-'} | {said} | {r['seconds']:.1f} |")
    write_report(args.out, {"created": created, "command": cmd, "rows": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
