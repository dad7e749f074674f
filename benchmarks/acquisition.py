"""Simulated acquisitions of one head on differently oriented grids (issue #8: "an oblique acquisition must give
the same world transform").

Re-storing a file (any of the 48 axis layouts) keeps every voxel value; acquiring the same head on an oblique
grid does not: each voxel samples the head at other points. To compare like with like, every acquisition here is
made the same way from one source: smoothed by a Gaussian of about a voxel's point spread, then sampled (linear)
at the centres of a grid of ``spacing`` mm whose axes are the source's turned by ``angles_deg`` (Euler, degrees)
and whose centre is the source's shifted by ``shift_mm``. The axis-aligned reference is itself such an acquisition
(angles 0), never the source as it was, so both sides of a comparison went through one resampling.

`with_turned_header` makes the other kind of file: the voxels as they are, under a header that misstates the
head's pose (a prone patient taken for supine, a sagittal acquisition written as axial).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

# (angles in degrees, shift in mm) of the acquisitions compared with the axis-aligned one
OBLIQUE_ACQUISITIONS = (((15.0, -10.0, 20.0), 0.0), ((-8.0, 12.0, 5.0), 0.0), ((25.0, 0.0, -15.0), 0.0))
SHIFTED_ACQUISITION = ((0.0, 0.0, 0.0), 1.0)  # the same axes, every voxel centre moved by 1 mm per axis


def acquire(image: sitk.Image, spacing: float | tuple[float, float, float] = 2.0, angles_deg=(0.0, 0.0, 0.0),
            shift_mm: float = 0.0, interpolator: int = sitk.sitkLinear, smooth: bool = True) -> sitk.Image:
    """``image`` (3D) acquired on a grid of ``spacing`` mm (one per axis, ITK order, for thick slices) turned by
    ``angles_deg`` about the image's centre (direction = rotation @ the image's direction), covering the image's
    extent. ``smooth``: a Gaussian of sigma 0.425 x spacing first (a voxel's point spread, along the image's own
    axes; off for label maps, use nearest neighbour for those)."""
    rot = sitk.Euler3DTransform()
    rot.SetRotation(*np.radians(np.asarray(angles_deg, float)))
    direction = np.asarray(rot.GetMatrix()).reshape(3, 3) @ np.asarray(image.GetDirection()).reshape(3, 3)
    extent = np.asarray(image.GetSpacing()) * np.asarray(image.GetSize())
    spacing = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    size = [int(np.ceil(e / s)) for e, s in zip(extent, spacing)]
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in image.GetSize()]))
    ref = sitk.Image(size, image.GetPixelID())
    ref.SetSpacing(spacing.tolist())
    ref.SetDirection(tuple(direction.ravel()))
    ref.SetOrigin(tuple(centre - direction @ (spacing * (np.asarray(size) - 1) / 2.0) + shift_mm))
    src = (sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), (0.425 * spacing).tolist()) if smooth
           else image)
    return sitk.Resample(src, ref, sitk.Transform(), interpolator, 0.0, image.GetPixelID() if not smooth else
                         sitk.sitkFloat32)


def with_turned_header(image: sitk.Image, turn: np.ndarray, centre=None) -> sitk.Image:
    """``image``'s voxels as they are under a header turned by ``turn`` ``(3, 3)`` about ``centre`` (mm, LPS;
    default the centre of ``image``'s grid): a world point ``x`` of ``image`` is the new image's
    ``centre + turn (x - centre)``. A label map on the same grid takes the image's centre."""
    if centre is None:
        centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()])
    centre, turn = np.asarray(centre, dtype=float), np.asarray(turn, dtype=float)
    out = sitk.Image(image)
    out.SetDirection((turn @ np.reshape(image.GetDirection(), (3, 3))).ravel().tolist())
    out.SetOrigin((centre + turn @ (np.asarray(image.GetOrigin()) - centre)).tolist())
    return out


def distance_mm(t1: sitk.Transform, t2: sitk.Transform, points: np.ndarray) -> tuple[float, float]:
    """Mean and max of |t1(x) - t2(x)| (mm) over ``points (N, 3)`` (world)."""
    d = [np.linalg.norm(np.subtract(t1.TransformPoint(p), t2.TransformPoint(p))) for p in points.tolist()]
    return float(np.mean(d)), float(np.max(d))


def mask_points(mask: sitk.Image, step: int = 50) -> np.ndarray:
    """World points of every ``step``-th voxel of ``mask`` > 0 (array order), ``(N, 3)``."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[::step]
    return np.array([mask.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in idx])
