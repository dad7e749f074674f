"""`istn evaluate`: Dice, surface distances and folding of a registration, from label files."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from ..errors import InputError


def label_values(image) -> set[int]:
    import numpy as np
    import SimpleITK as sitk

    return set(np.unique(sitk.GetArrayViewFromImage(image)).tolist()) - {0}


def value_list(values) -> str:
    v = sorted(values)
    if len(v) > 2 and v == list(range(v[0], v[-1] + 1)):
        return f"{v[0]}..{v[-1]}"
    return ", ".join(str(x) for x in v[:12]) + (", ..." if len(v) > 12 else "")


def run_evaluate(fixed_labels: str | Path, moving_labels: str | Path, transform_path: str | Path | None,
                 labels: Sequence[int] | None = None, out_path: str | Path | None = None, soft: bool = False,
                 overwrite: bool = False) -> dict:
    """Dice, ASD and HD95 per label of the moving labels warped into the fixed grid; folding for non-linear transforms.

    Soft maps (``soft=True``, or any non-integer value) are warped linearly and
    thresholded at half their maximum; label maps use nearest neighbour. A
    label in neither image is reported absent and left out of the mean; one in
    a single image scores 0 and is flagged. ``notes`` (one line each) say what
    the numbers alone would hide: no --transform, label sets that do not
    overlap, an image that does not look like a label map, non-integer values
    taken as soft maps. ``out_path`` (JSON; numbers that are not finite as
    null) is checked before any work: never an input, an existing file only
    with ``overwrite``.
    """
    import numpy as np
    import SimpleITK as sitk

    from .. import segfile
    from ..io import grey_image, read_raw_image, read_transform, write_json
    from ..metrics import folding_fraction, label_metrics, looks_like_intensities, mean_metrics
    from ..registration import warp_image

    from .apply import check_out_file, make_out_folder

    if labels is not None and not len(labels):
        raise InputError("--labels needs at least one label value (without --labels: every label)")
    if out_path:
        check_out_file(out_path, [p for p in (fixed_labels, moving_labels, transform_path) if p], overwrite,
                       "metrics.json")
        if Path(out_path).suffix.lower() != ".json":  # x.nii.gz would hold JSON under an image's name
            raise InputError(f"--out '{out_path}': evaluate writes its metrics as JSON; name it "
                             f"{Path(out_path).name.split('.')[0] or 'metrics'}.json")
    f = read_raw_image(fixed_labels, "fixed label image")
    m = read_raw_image(moving_labels, "moving label image")
    images = []
    for img, role, p in ((f, "fixed", fixed_labels), (m, "moving", moving_labels)):
        if img.GetNumberOfComponentsPerPixel() != 1 and segfile.header(img):
            raise InputError(f"{role} label image '{p}' is a Slicer segmentation whose segments overlap "
                             f"({img.GetNumberOfComponentsPerPixel()} layers); evaluate scores label maps, one value a "
                             "structure: export the segments to score as a label map (Slicer's Segmentations module)")
        if img.GetNumberOfComponentsPerPixel() != 1:
            grey = grey_image(img)  # a label PNG saved as grey-level RGB(A): its values are the labels
            if grey is None:
                raise InputError(f"{role} label image '{p}' has {img.GetNumberOfComponentsPerPixel()} components per "
                                 "pixel whose values differ (colours, not label values); a scalar label map is "
                                 "expected: save the labels as grey levels, one value a structure")
            img = grey
        images.append(img)
    f, m = images
    if f.GetDimension() != m.GetDimension():
        raise InputError(f"fixed label image is {f.GetDimension()}D but moving label image is {m.GetDimension()}D")
    notes: list[str] = []
    if transform_path:
        tx = read_transform(transform_path, "--transform")
        if tx.GetDimension() != f.GetDimension():
            raise InputError(f"--transform '{transform_path}' is {tx.GetDimension()}D but the label images are "
                             f"{f.GetDimension()}D")
    else:
        tx = sitk.Transform(f.GetDimension(), sitk.sitkIdentity)
        notes.append("no --transform given: the identity was used (the moving labels are scored where they lie)")
    arrays = (("fixed", sitk.GetArrayViewFromImage(f)), ("moving", sitk.GetArrayViewFromImage(m)))
    fractional = [role for role, a in arrays if not np.allclose(a, np.round(a))]
    if fractional and not soft:
        notes.append(f"the {' and '.join(fractional)} label image(s) hold values that are not whole numbers: scored "
                     "as soft maps, each thresholded at half its maximum into ONE structure; a label map resampled "
                     "with linear interpolation is no longer one: resample it with nearest neighbour (istn apply "
                     "keeps labels), or round it")
    soft = soft or bool(fractional)
    if soft:
        def binarise(img: sitk.Image) -> sitk.Image:
            a = sitk.GetArrayFromImage(img)
            out = sitk.GetImageFromArray((a > 0.5 * a.max()).astype(np.uint8))
            out.CopyInformation(img)
            return out

        warped = binarise(warp_image(sitk.Cast(m, sitk.sitkFloat32), f, tx, sitk.sitkLinear))
        f, m = binarise(f), binarise(m)
    else:
        for img, role, p in ((f, "fixed", fixed_labels), (m, "moving", moving_labels)):
            if looks_like_intensities(img):
                notes.append(f"{role} label image '{p}' has {len(label_values(img))} values and edges of in-between "
                             "values: it looks like an intensity image, not a label map (a soft map or "
                             "probabilities: --soft scores it as one map; a label map of many small parcels on "
                             "coarse voxels can look so too: its Dice per label is given as for labels)")
        warped = warp_image(m, f, tx, sitk.sitkNearestNeighbor)
    per_label = label_metrics(f, warped, labels)
    in_fixed, in_moving, in_warped = label_values(f), label_values(m), label_values(warped)
    if in_fixed and in_moving and not in_fixed & in_moving:
        notes.append(f"the label sets do not overlap (fixed {value_list(in_fixed)}, moving {value_list(in_moving)}): "
                     "no label can match; are both maps of the same protocol?")
    elif in_moving and not in_warped:
        notes.append("no moving label lands inside the fixed image: the images do not overlap in world space "
                     "(check their origins and the transform)")
    else:
        only = {k: [v for v, r in per_label.items() if r["present"] == k] for k in ("fixed", "moving")}
        if only["fixed"] or only["moving"]:
            parts = [f"{value_list(v)} only in the {k} image" for k, v in only.items() if v]
            notes.append(f"label(s) {'; '.join(parts)} (moving: after the transform): scored Dice 0")
        both = [r for r in per_label.values() if r["present"] == "both"]
        if both and all(r["dice"] == 0.0 for r in both):
            notes.append("no label overlaps its counterpart (every Dice is 0): check the transform and the images' "
                         "world positions")
    absent = [v for v, r in per_label.items() if r["present"] == "neither"]
    if absent:
        notes.append(f"label(s) {value_list(absent)} in neither image: reported as absent, left out of the mean")
    result: dict = {"per_label": {str(k): v for k, v in per_label.items()}, "mean": mean_metrics(per_label),
                    "soft_maps_thresholded_at_half_max": soft, "transform": str(transform_path) if transform_path else None,
                    "notes": notes}
    if not tx.IsLinear():
        result["folding_fraction"] = folding_fraction(tx, f)
    if out_path:
        make_out_folder(Path(out_path))
        write_json(_finite_or_null(result), out_path)
    return result


def _finite_or_null(value):
    """``value`` with every float that is not finite (NaN: ASD of a label in one image only) as None: JSON has no
    NaN, and strict readers refuse the bare ``NaN`` Python would write."""
    import math

    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def print_metrics(result: dict) -> None:
    print(f"{'label':>8} {'Dice':>7} {'ASD mm':>8} {'HD95 mm':>8}")
    for k, v in result["per_label"].items():
        if v["present"] == "neither":
            print(f"{k:>8} {'absent':>7}")
            continue
        flag = f"  only in {v['present']}" if v["present"] != "both" else ""
        print(f"{k:>8} {v['dice']:7.3f} {v['asd']:8.2f} {v['hd95']:8.2f}{flag}")
    m = result["mean"]
    print(f"{'mean':>8} {m['dice']:7.3f} {m['asd']:8.2f} {m['hd95']:8.2f}")
    if "folding_fraction" in result:
        print(f"folding voxels (Jacobian <= 0): {100 * result['folding_fraction']:.3f} %")
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
