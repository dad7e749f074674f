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


def test_a_thick_slice_acquisition_has_its_spacing_per_axis_and_the_same_world_content():
    """Thick slices (files_users_bring.py): the spacing asked for per axis, the same centre, and the same smooth
    content at the same world points as a fine acquisition, within the slice's own blur."""
    src = blob_image((60, 60, 60), (1.0, 1.0, 1.0), (-29.5, -29.5, -29.5), np.eye(3))
    fine, thick = acquire(src), acquire(src, (2.0, 2.0, 6.0))
    assert thick.GetSpacing() == (2.0, 2.0, 6.0) and fine.GetSpacing() == (2.0, 2.0, 2.0)
    assert np.allclose(fine.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in fine.GetSize()]),
                       thick.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in thick.GetSize()]))
    for p in ([0.0, 0.0, 0.0], [6.0, -4.0, 0.0], [-8.0, 5.0, 0.0]):
        a = sitk.Resample(fine, [1, 1, 1], sitk.Transform(), sitk.sitkLinear, p, [1, 1, 1], [1, 0, 0, 0, 1, 0, 0, 0, 1])
        b = sitk.Resample(thick, [1, 1, 1], sitk.Transform(), sitk.sitkLinear, p, [1, 1, 1], [1, 0, 0, 0, 1, 0, 0, 0, 1])
        assert abs(float(a[0, 0, 0]) - float(b[0, 0, 0])) < 0.1, p


def test_thick_slices_of_a_head_register_where_the_head_as_stored_does():
    """A clinical 2D series (6 or 8 mm slices, axial / sagittal / coronal) of the placed sample head, through the
    bundled affine: within 1 mm on average (2.5 mm at most) of the head as stored over the fixed brain (measured
    0.36-0.84 / 0.92-2.37 mm, session 40), with no self-check failing."""
    import pytest

    from istn import demo
    from istn.export import load_model
    from istn.registration import register

    if not demo.bundled_model(demo.AFFINE_MODEL).exists():
        pytest.skip("bundled models absent")
    affine = load_model(demo.bundled_model(demo.AFFINE_MODEL))
    pair = demo.sample_pair()
    placed, _, _ = demo.place_in_scanner(sitk.Cast(pair["moving"], sitk.sitkFloat32), pair["moving_labels"])
    points = mask_points(sitk.OtsuThreshold(pair["fixed"], 0, 1), step=20)
    as_stored = register(pair["fixed"], placed, affine, threads=2).transform
    for spacing in ((2.0, 2.0, 6.0), (6.0, 2.0, 2.0), (2.0, 6.0, 2.0), (2.0, 2.0, 8.0)):
        result = register(pair["fixed"], acquire(placed, spacing), affine, threads=2)
        mean, largest = distance_mm(as_stored, result.transform, points)
        assert mean < 1.0 and largest < 2.5 and not result.self_checks_failed, spacing
