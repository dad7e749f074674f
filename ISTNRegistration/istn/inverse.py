"""The inverse of a fixed -> moving transform: moving world points -> fixed world points.

A registration's transform maps fixed points to moving points, which is what
resampling the MOVING image onto the fixed grid needs. Bringing what lies in
the FIXED space (an atlas' labels, a template's region) onto the moving image's
own grid, the subject's native space, needs the inverse. A linear transform's
is exact; a non-linear one (affine + B-spline) has none in closed form, so it is
solved for numerically on a lattice over the moving image and written as ITK
transforms: a displacement field on that lattice, then the inverse of the
transform's linear part (so that outside the lattice it is still the linear
part's inverse, not the identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .geometry import Grid, apply_homogeneous, field_lattice, lps_grid
from .transforms import field_spacing_cap, flat_parts, linear_matrix, matrix_to_sitk_affine

#: Points whose round trip misses by more than this (mm) make the inverse unreliable there (folding, or a
#: transform that maps a region onto itself twice): reported, so that a caller can warn.
ROUND_TRIP_WARN_MM = 0.5


@dataclass
class InverseTransform:
    """`inverse_transform`'s result: ``transform`` maps moving world points to fixed world points (LPS, mm)."""

    transform: sitk.Transform
    exact: bool  # a linear transform's inverse; otherwise solved on ``lattice_mm``
    lattice_mm: tuple[float, ...] | None  # the lattice's spacing per axis (ITK order)
    iterations: int  # of the fixed-point solve (0 when exact)
    round_trip_mm: dict[str, float]  # |forward(inverse(y)) - y| at points of the moving grid off the lattice

    def summary(self) -> dict:
        return {"exact": self.exact, "lattice_mm": None if self.lattice_mm is None else list(self.lattice_mm),
                "iterations": self.iterations, "round_trip_mm": self.round_trip_mm}


def round_trip_warning(round_trip: dict[str, float]) -> str:
    """What to tell a user of an inverse whose round trip (`InverseTransform.round_trip_mm`) misses by more than
    `ROUND_TRIP_WARN_MM` anywhere; "" when it does not."""
    if round_trip.get("over_warn", 0) <= 0:
        return ""
    return (f"the inverse misses by more than {ROUND_TRIP_WARN_MM:g} mm at {100 * round_trip['over_warn']:.1f} % "
            "of the points checked (the transform folds there, or leaves the reference's field of view): check "
            "those regions")


def labels_onto_moving(transform: sitk.Transform, moving: sitk.Image
                       ) -> tuple[InverseTransform, Callable[[sitk.Image], sitk.Image]]:
    """What brings labels of the fixed space onto ``moving``'s grid (an atlas onto a subject; `istn register
    --atlas` and the Slicer module's atlas): the inverse of ``transform`` (fixed -> moving points) over that grid,
    at the outputs' field spacing, and the warp of one label image (a layer) through it: nearest neighbour, 0
    outside, the label image's pixel type."""
    from .registration import OUTPUT_FIELD_SPACING_MM, warp_image  # registration imports torch

    inverted = inverse_transform(transform, moving, OUTPUT_FIELD_SPACING_MM)

    def onto_moving(labels: sitk.Image) -> sitk.Image:
        return warp_image(labels, moving, inverted.transform, sitk.sitkNearestNeighbor, 0.0,
                          field_spacing=OUTPUT_FIELD_SPACING_MM)

    return inverted, onto_moving


def _linear_part(parts: list[sitk.Transform], d: int) -> np.ndarray:
    """The homogeneous matrix of the linear members of ``parts`` composed in their order (non-linear ones skipped:
    a registration's deformation is a near-identity on top of its affine)."""
    matrix = np.eye(d + 1)
    for part in parts:
        if part.IsLinear():
            matrix = linear_matrix(part) @ matrix
    return matrix


def inverse_transform(transform: sitk.Transform, reference: sitk.Image | Grid, spacing: float = 4.0,
                      tolerance_mm: float = 1e-3, max_iterations: int = 100, check_points: int = 2000,
                      seed: int = 0) -> InverseTransform:
    """The inverse of ``transform`` (fixed -> moving world points) over ``reference``, the MOVING image's grid.

    Linear: its exact inverse. Non-linear: for each point ``y`` of `field_lattice` (``spacing`` mm, capped by
    `field_spacing_cap` as `istn.registration.displacement_field` caps it) the fixed point ``x`` with
    ``transform(x) = y``, found by the iteration ``x <- x + A^-1 (y - transform(x))`` from the linear part's
    inverse (``A`` its matrix; it converges where the deformation on top of the linear part does not fold),
    ``transform`` evaluated through its displacement field sampled every ``spacing`` over the region those points
    span. Written as the displacement field ``d(y) = L(x) - y`` on the lattice followed by ``L^-1`` (``L`` the
    linear part).
    ``round_trip_mm``: median, 99th percentile and maximum of ``|transform(inverse(y)) - y|`` at ``check_points``
    random points of the reference's field of view (exact ITK transforms, off the lattice); ``over_warn``: the
    fraction of them beyond `ROUND_TRIP_WARN_MM`.
    """
    grid = reference if isinstance(reference, Grid) else Grid.from_image(reference)
    d = grid.ndim
    if transform.GetDimension() != d:
        raise ValueError(f"inverse_transform(): the transform is {transform.GetDimension()}D, the reference {d}D")
    parts = flat_parts(transform)
    rng = np.random.default_rng(seed)
    # the check's points drawn on the grid as stored LPS: the same points however the reference's voxels are stored
    checked = lps_grid(grid)
    probe = checked.voxel_to_world(rng.uniform(0, 1, (check_points, d)) * (np.asarray(checked.size) - 1))
    if all(p.IsLinear() for p in parts):
        inverse = matrix_to_sitk_affine(np.linalg.inv(_linear_part(parts, d)))
        return InverseTransform(inverse, True, None, 0, round_trip(transform, inverse, probe))
    spacing = field_spacing_cap(transform, spacing)
    L = _linear_part(parts, d)
    L_inv = np.linalg.inv(L)
    A_inv = L_inv[:d, :d]  # the inverse of L's matrix part
    lattice = field_lattice(grid, spacing)
    y = lattice.world_points().reshape(-1, d)
    x = apply_homogeneous(L_inv, y)
    forward = _ForwardField(transform, x, spacing)
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        r = y - forward(x)
        x = x + r @ A_inv.T
        if float(np.max(np.abs(r))) < tolerance_mm:
            break
    offsets = (apply_homogeneous(L, x) - y).reshape(tuple(reversed(lattice.size)) + (d,))
    field = sitk.GetImageFromArray(offsets.astype(np.float64), isVector=True)
    field.SetOrigin(lattice.origin)
    field.SetSpacing(lattice.spacing)
    field.SetDirection(lattice.direction)
    inverse = sitk.CompositeTransform(d)
    inverse.AddTransform(matrix_to_sitk_affine(L_inv))  # applied second
    inverse.AddTransform(sitk.DisplacementFieldTransform(field))  # applied first (ITK: the last added)
    return InverseTransform(inverse, False, tuple(float(v) for v in lattice.spacing), iterations,
                            round_trip(transform, inverse, probe))


class _ForwardField:
    """``transform`` at arbitrary points through its displacement field sampled on an axis-aligned grid (world
    axes, ``step`` mm) over the points it is built for, grown by a margin; linear interpolation, edge values
    beyond it."""

    def __init__(self, transform: sitk.Transform, points: np.ndarray, step: float, margin_mm: float = 16.0):
        d = points.shape[1]
        self.low = points.min(0) - margin_mm
        size = np.ceil((points.max(0) + margin_mm - self.low) / step).astype(int) + 1
        self.step = step
        field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, [int(n) for n in size],
                                                  self.low.tolist(), [step] * d, np.eye(d).ravel().tolist())
        self.u = sitk.GetArrayFromImage(field)  # (*reversed(size), d)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        index = ((points - self.low) / self.step)[:, ::-1].T  # array order
        shift = [ndimage.map_coordinates(self.u[..., c], index, order=1, mode="nearest")
                 for c in range(self.u.shape[-1])]
        return points + np.stack(shift, axis=1)


def round_trip(forward: sitk.Transform, inverse: sitk.Transform, points: np.ndarray) -> dict[str, float]:
    """``|forward(inverse(y)) - y|`` (mm) at ``points``: median, 99th percentile, maximum and the fraction over
    `ROUND_TRIP_WARN_MM`."""
    miss = np.array([np.linalg.norm(np.subtract(forward.TransformPoint(inverse.TransformPoint(p)), p))
                     for p in points.tolist()])
    return {"median": float(np.median(miss)), "p99": float(np.percentile(miss, 99)), "max": float(miss.max()),
            "over_warn": float(np.mean(miss > ROUND_TRIP_WARN_MM))}
