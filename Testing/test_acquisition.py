"""benchmarks/acquisition.py: simulated acquisitions on turned grids, and the distance between two transforms."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from acquisition import acquire, distance_mm, mask_points  # noqa: E402
from conftest import blob_image  # noqa: E402


def test_an_oblique_acquisition_samples_the_same_world_content():
    """The same smooth head on an axis-aligned and on a turned 2 mm grid: equal values at equal world points."""
    src = blob_image((60, 60, 60), (1.0, 1.0, 1.0), (-29.5, -29.5, -29.5), np.eye(3))
    axis, turned = acquire(src), acquire(src, angles_deg=(15.0, -10.0, 20.0))
    d = np.asarray(turned.GetDirection()).reshape(3, 3)
    assert np.allclose(d @ d.T, np.eye(3), atol=1e-9) and not np.allclose(d, np.eye(3))
    assert axis.GetSpacing() == turned.GetSpacing() == (2.0, 2.0, 2.0)
    assert np.allclose(axis.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in axis.GetSize()]),
                       turned.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in turned.GetSize()]))
    for p in ([0.0, 0.0, 0.0], [6.0, -4.0, 3.0], [-8.0, 5.0, -2.0]):
        a = sitk.Resample(axis, [1, 1, 1], sitk.Transform(), sitk.sitkLinear, p, [1, 1, 1], [1, 0, 0, 0, 1, 0, 0, 0, 1])
        b = sitk.Resample(turned, [1, 1, 1], sitk.Transform(), sitk.sitkLinear, p, [1, 1, 1], [1, 0, 0, 0, 1, 0, 0, 0, 1])
        assert abs(float(a[0, 0, 0]) - float(b[0, 0, 0])) < 0.03, p
    shifted = acquire(src, shift_mm=1.0)
    assert np.allclose(np.subtract(shifted.GetOrigin(), axis.GetOrigin()), 1.0)


def test_distance_between_transforms_has_known_answers():
    mask = sitk.Image([10, 10, 10], sitk.sitkUInt8) + 1
    pts = mask_points(mask, step=7)
    assert pts.shape[1] == 3 and len(pts) == int(np.ceil(1000 / 7))
    shift = sitk.TranslationTransform(3, (3.0, 0.0, -4.0))
    assert np.allclose(distance_mm(shift, sitk.Transform(3, sitk.sitkIdentity), pts), (5.0, 5.0))
    scale = sitk.ScaleTransform(3, (2.0, 2.0, 2.0))  # |2x - x| = |x|: the farthest voxel centre of the mask
    mean, most = distance_mm(scale, sitk.Transform(3, sitk.sitkIdentity), pts)
    assert np.isclose(most, max(np.linalg.norm(pts, axis=1))) and 0 < mean < most
