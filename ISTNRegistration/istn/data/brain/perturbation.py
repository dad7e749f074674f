"""A seeded "scanner position": how a head in a scanner differs from atlas space (evaluation and demos)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk


def scanner_perturbation(
    seed: int,
    rot_deg: tuple[float, float] = (10.0, 20.0),
    trans_mm: tuple[float, float] = (10.0, 20.0),
    scale: float = 0.1,
    centre: Sequence[float] = (0.0, 0.0, 0.0),
) -> sitk.AffineTransform:
    """A seeded random "scanner-like" affine about ``centre`` (mm): how a head differs from atlas space.

    ``x -> R S (x - c) + c + t`` with a rotation ``R`` of angle uniform in
    ``rot_deg`` about a uniformly random axis, ``S`` = diag of scale factors
    uniform in ``[1 - scale, 1 + scale]`` along the world axes, and ``t`` of
    length uniform in ``trans_mm`` in a uniformly random direction. The same
    seed always gives the same transform. As an ITK transform it maps output
    points to input points: ``sitk.Resample(image, image, T)`` shows the
    anatomy moved by ``T``'s inverse.
    """
    if not (0 <= rot_deg[0] <= rot_deg[1] and 0 <= trans_mm[0] <= trans_mm[1] and 0 <= scale < 1):
        raise ValueError("scanner_perturbation() needs 0 <= low <= high ranges and 0 <= 'scale' < 1")
    rng = np.random.default_rng(int(seed))

    def unit() -> np.ndarray:
        v = rng.normal(size=3)
        return v / np.linalg.norm(v)

    axis = unit()
    angle = np.deg2rad(rng.uniform(*rot_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)
    scales = rng.uniform(1.0 - scale, 1.0 + scale, size=3)
    translation = unit() * rng.uniform(*trans_mm)
    t = sitk.AffineTransform(3)
    t.SetCenter([float(c) for c in centre])
    t.SetMatrix((rotation @ np.diag(scales)).ravel().tolist())
    t.SetTranslation(translation.tolist())
    return t
