"""The repository's small redistributable sample pair (Colin27 and ICBM 2009a, AAL labels; no HCPex)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .datasets import _Builder, _write
from .grids import mni_grid, resample_image, resample_labels
from .label_transfer import register
from .labels import dice, label_volumes_ml
from .sources import AAL_ATTRIBUTION, MNI_NOTICE, default_cache_dir


def _head_crop(t1: sitk.Image, *others: sitk.Image, margin: int = 2) -> list[sitk.Image]:
    """Crop ``t1`` and ``others`` (same grid) to the head's bounding box (+ ``margin`` voxels)."""
    arr = sitk.GetArrayViewFromImage(t1)
    thr = 0.1 * float(np.percentile(arr[arr > 0], 99))
    mask = sitk.BinaryMorphologicalOpening(sitk.Cast(t1 > thr, sitk.sitkUInt8), [1, 1, 1])
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(cc == 1, sitk.sitkUInt8))
    box = stats.GetBoundingBox(1)
    lo = [max(0, b - margin) for b in box[:3]]
    hi = [min(s, b + n + margin) for b, n, s in zip(box[:3], box[3:], t1.GetSize())]
    size = [h - l for l, h in zip(lo, hi)]
    return [sitk.RegionOfInterest(im, size, lo) for im in (t1, *others)]


def make_sample_pair(
    out_dir: Path,
    cache_dir: Path | None = None,
    spacing_mm: float = 2.0,
    progress: Callable[[str], None] = print,
) -> dict:
    """Build the repository's small redistributable sample pair (no HCPex anywhere in it).

    - moving: Colin27 brain (MRIcron ch2bet) with its AAL labels mapped to `LABELS`;
    - fixed: ICBM 2009a brain (nilearn ships it brain-masked) with labels
      propagated from Colin27/AAL by `register` (affine + 30 mm B-spline,
      metric on the fixed brain) and `resample_labels`.

    Both brain-only, so the pair is consistent. Both on `mni_grid`, then cropped
    to their own bounding box (2 voxels margin), T1 stored as uint8 (both
    sources are uint8 0..255, rounded after resampling), labels uint8.
    Writes ``{fixed,moving}_{t1,labels}.nii.gz`` and the licence/attribution
    files; returns label volumes and the Dice of the propagated labels against
    the identity mapping for the record.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    b = _Builder(out, Path(cache_dir) if cache_dir else default_cache_dir(), spacing_mm, progress)
    colin = b._build_colin27()
    ref = mni_grid(spacing_mm)
    t1a = resample_image(b.read("nilearn", "t1"), ref)
    progress("sample pair: registering Colin27 to ICBM 2009a (affine + B-spline)")
    tx = register(t1a, colin["t1_brain"])
    labels_a = resample_labels(colin["labels"], ref, tx)
    identity_dice = dice(labels_a, colin["labels"])

    def u8(img: sitk.Image) -> sitk.Image:
        return sitk.Cast(sitk.Clamp(sitk.Round(img), sitk.sitkFloat32, 0, 255), sitk.sitkUInt8)

    moving_t1, moving_labels = _head_crop(colin["t1_brain"], colin["labels"])
    fixed_t1, fixed_labels = _head_crop(t1a, labels_a)
    written = {}
    for name, img in (("moving_t1", u8(moving_t1)), ("moving_labels", moving_labels),
                      ("fixed_t1", u8(fixed_t1)), ("fixed_labels", fixed_labels)):
        p = out / f"{name}.nii.gz"
        _write(img, p)
        written[name] = {"bytes": p.stat().st_size, "size": list(img.GetSize())}
    (out / "LICENSE-MNI-templates.txt").write_text(
        "Colin27 (moving_t1) and the ICBM 2009a template (fixed_t1), Montreal Neurological Institute:\n\n"
        + MNI_NOTICE + "\n")
    (out / "ATTRIBUTION-AAL.txt").write_text(
        "moving_labels.nii.gz and fixed_labels.nii.gz derive from the AAL atlas (caudate, putamen, pallidum,\n"
        "thalamus; AAL ids 71-78 mapped to labels 1-8). fixed_labels were propagated from Colin27 to ICBM 2009a\n"
        "by image registration. They are distributed under the AAL authors' terms (GNU GPL, text in\n"
        "LICENSE-GPL-2.txt), with this attribution:\n\n" + AAL_ATTRIBUTION + "\n")
    return {"files": written, "moving_label_volumes_ml": label_volumes_ml(moving_labels),
            "fixed_label_volumes_ml": label_volumes_ml(fixed_labels),
            "dice_propagated_vs_identity": {k: round(v, 4) for k, v in identity_dice.items()}}
