"""benchmarks/hard_inputs.py: the cropped field of view keeps the head's superior part, whatever the storage."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from hard_inputs import crop_superior, held_out, markdown  # noqa: E402


def _head() -> tuple[sitk.Image, sitk.Image]:
    """A 'head' filling world z in [-40, 40) mm (1 mm voxels, 20..99 of 120 slices), labels = the slice's decade."""
    arr = np.zeros((120, 12, 10), np.float32)
    arr[20:100] = 1.0
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin((0.0, 0.0, -60.0))
    labels = sitk.GetImageFromArray((np.arange(120) // 10).astype(np.uint8)[:, None, None] * np.ones((1, 12, 10), np.uint8))
    labels.CopyInformation(img)
    return img, labels


def _world_z_range(img: sitk.Image) -> tuple[float, float]:
    corners = [img.TransformIndexToPhysicalPoint((i, j, k)) for i in (0, img.GetWidth() - 1)
               for j in (0, img.GetHeight() - 1) for k in (0, img.GetDepth() - 1)]
    z = [c[2] for c in corners]
    return min(z), max(z)


@pytest.mark.parametrize("code", ["LPS", "LPI", "SAL", "IRP", "RAS"])
def test_crop_keeps_the_superior_part_of_the_head_in_any_layout(code):
    img, labels = _head()
    stored, stored_labels = sitk.DICOMOrient(img, code), sitk.DICOMOrient(labels, code)
    cropped, cropped_labels = crop_superior(stored, stored_labels, 0.25)
    # the head spans z -40..39 (80 slices): the top quarter is z 20..39, whatever the voxel order
    assert _world_z_range(cropped) == pytest.approx((20.0, 39.0))
    assert _world_z_range(cropped_labels) == pytest.approx((20.0, 39.0))
    assert sorted(np.unique(sitk.GetArrayViewFromImage(cropped_labels))) == [8, 9]


def test_the_table_says_when_a_model_set_cannot_raise_the_self_check():
    row = {"unregistered": 0.2, "affine": 0.8, "B-spline": 0.1, "warnings": []}
    warned = {**row, "warnings": ["this pair looks unlike ..."]}
    res = {"date": "today", "sets": {"a": "A", "b": "B"}, "self_check": {"a": True, "b": False},
           "cases": {"contrast t2": {"a": [warned, row], "b": [row, row]}}}
    text = markdown(res, "cmd")
    assert "| contrast t2 | 2 | 0.200 | 0.800 | 0.100 (2 below unregistered) | 0.800 |" in text
    assert "a 1, b 0 (its models carry no validation loss ranges: the self-check cannot warn)." in text


class _Model:
    def __init__(self, meta: dict):
        self.meta = meta


def test_a_set_holds_avg152_out_only_when_every_model_was_trained_without_it():
    without = _Model({"data_options": {"exclude": ["spm_avg152"]}})
    assert held_out((without, without))
    assert not held_out((without, _Model({"data_options": {"exclude": []}})))
    assert not held_out((without, _Model({})))  # older models record nothing: they trained on every anatomy


def test_the_contrast_gap_is_t1_minus_each_other_contrast_per_set_and_stage():
    def rows(aff: float, bsp: float) -> list[dict]:  # two pairs around the given means
        return [{"unregistered": 0.2, "affine": aff - 0.01, "B-spline": bsp + 0.02, "warnings": []},
                {"unregistered": 0.2, "affine": aff + 0.01, "B-spline": bsp - 0.02, "warnings": []}]
    res = {"date": "today", "sets": {"old": "A", "new": "B"}, "avg152_held_out": {"old": False, "new": True},
           "cases": {"contrast t1": {"old": rows(0.80, 0.82), "new": rows(0.78, 0.80)},
                     "contrast t2": {"old": rows(0.20, 0.10), "new": rows(0.75, 0.79)},
                     "contrast pd": {"old": rows(0.30, 0.20), "new": rows(0.70, 0.78)}}}
    text = markdown(res, "cmd")
    assert "old: a training anatomy; new: held out (never trained on, any contrast)" in text
    assert "- old (avg152 a training anatomy): affine +0.600 / +0.500; B-spline +0.720 / +0.620." in text
    assert "- new (avg152 held out): affine +0.030 / +0.080; B-spline +0.010 / +0.020 (within 0.05)." in text
