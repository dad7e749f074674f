"""Transforms: affine parameterisation, cubic B-splines, warping, world conversion.

Functional layer, two halves:

- torch (TorchScript-compatible), in NORMALISED coordinates of a network grid
  (see `istn.geometry`): an affine is a ``(N, D, D+1)`` matrix ``theta`` mapping
  output (fixed-side) normalised points to input (moving-side) normalised
  points, exactly what ``F.affine_grid(..., align_corners=True)`` expects; a
  B-spline is a ``(N, D, *cp_shape)`` tensor of control point displacements in
  normalised units whose components are in ``(x, y[, z])`` order.
- numpy/SimpleITK: conversion of those to WORLD transforms that map fixed
  points (mm, LPS) to moving points, the convention of ITK, ANTs and Slicer's
  "transform from parent".
"""

from __future__ import annotations

import math
from typing import List

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .geometry import Grid

# --------------------------------------------------------------------------
# Affine parameterisation (torch)
# --------------------------------------------------------------------------


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from angles in radians.

    ``angles``: ``(N, 1)`` in 2D, ``(N, 3)`` in 3D (rotations about x, y, z,
    applied in that order: ``R = Rz @ Ry @ Rx``). Returns ``(N, D, D)``.
    """
    n = angles.shape[0]
    if angles.shape[1] == 1:
        c, s = torch.cos(angles[:, 0]), torch.sin(angles[:, 0])
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], 1)
    one = torch.ones(n, dtype=angles.dtype, device=angles.device)
    zero = torch.zeros(n, dtype=angles.dtype, device=angles.device)
    cx, sx = torch.cos(angles[:, 0]), torch.sin(angles[:, 0])
    cy, sy = torch.cos(angles[:, 1]), torch.sin(angles[:, 1])
    cz, sz = torch.cos(angles[:, 2]), torch.sin(angles[:, 2])
    rx = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, cx, -sx], -1), torch.stack([zero, sx, cx], -1)], 1)
    ry = torch.stack([torch.stack([cy, zero, sy], -1), torch.stack([zero, one, zero], -1), torch.stack([-sy, zero, cy], -1)], 1)
    rz = torch.stack([torch.stack([cz, -sz, zero], -1), torch.stack([sz, cz, zero], -1), torch.stack([zero, zero, one], -1)], 1)
    return rz @ ry @ rx


def shear_matrix(shear: torch.Tensor, ndim: int) -> torch.Tensor:
    """Upper-triangular unit shear ``(N, D, D)`` from ``(N, 1)`` (2D) or ``(N, 3)`` (3D)."""
    n = shear.shape[0]
    m = torch.eye(ndim, dtype=shear.dtype, device=shear.device).unsqueeze(0).repeat(n, 1, 1)
    if ndim == 2:
        m[:, 0, 1] = shear[:, 0]
    else:
        m[:, 0, 1] = shear[:, 0]
        m[:, 0, 2] = shear[:, 1]
        m[:, 1, 2] = shear[:, 2]
    return m


def affine_theta(
    translation: torch.Tensor,
    angles: torch.Tensor,
    log_scale: torch.Tensor,
    shear: torch.Tensor,
    half_extent: torch.Tensor,
) -> torch.Tensor:
    """Affine ``theta (N, D, D+1)`` in normalised coordinates from interpretable parameters.

    The linear part ``R @ Sh @ S`` is defined in a centred, isotropic physical
    frame (mm about the grid centre) so a rotation stays a rotation whatever
    the grid's aspect ratio; ``half_extent (D,)`` in mm converts it to
    normalised units. ``translation (N, D)`` is in normalised units (fractions
    of the half-extent).
    """
    ndim = translation.shape[1]
    linear = rotation_matrix(angles) @ shear_matrix(shear, ndim) @ torch.diag_embed(torch.exp(log_scale))
    d = half_extent.to(linear.dtype)
    linear = linear * d.view(1, 1, ndim) / d.view(1, ndim, 1)  # D^-1 @ L @ D
    return torch.cat([linear, translation.unsqueeze(-1)], dim=2)


# --------------------------------------------------------------------------
# Cubic B-splines (torch)
# --------------------------------------------------------------------------


def cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    """Uniform cubic B-spline kernel beta3(t), support ``|t| < 2``."""
    a = t.abs()
    inner = 2.0 / 3.0 - a * a + 0.5 * a * a * a
    outer = (2.0 - a) ** 3 / 6.0
    return torch.where(a < 1.0, inner, torch.where(a < 2.0, outer, torch.zeros_like(a)))


def control_point_count(n_voxels: int, spacing_voxels: float) -> int:
    """Control points along one axis: control point ``k`` sits at voxel ``(k - 1) * spacing``.

    Enough spans cover voxel 0 .. n-1 strictly inside ITK's valid region.
    """
    return int(math.floor((n_voxels - 1) / spacing_voxels)) + 4


def bspline_basis(n_voxels: int, spacing_voxels: float) -> torch.Tensor:
    """Basis matrix ``(n_voxels, n_control_points)``: ``beta3((i - (k-1)s) / s)``."""
    n_cp = control_point_count(n_voxels, spacing_voxels)
    i = torch.arange(n_voxels, dtype=torch.float64).unsqueeze(1)
    p = (torch.arange(n_cp, dtype=torch.float64) - 1.0) * spacing_voxels
    return cubic_bspline((i - p.unsqueeze(0)) / spacing_voxels).float()


def bspline_displacement(coeffs: torch.Tensor, bases: List[torch.Tensor]) -> torch.Tensor:
    """Dense displacement ``(N, *S, D)`` from control points ``(N, D, *cp)``.

    ``bases`` are the per-axis basis matrices in ARRAY order (``Z, Y, X``).
    The result's last dimension is in ``(x, y[, z])`` order, ready to add to a
    ``grid_sample`` grid.
    """
    if len(bases) == 2:
        return torch.einsum("ncab,ya,xb->nyxc", coeffs, bases[0], bases[1])
    return torch.einsum("ncabe,za,yb,xe->nzyxc", coeffs, bases[0], bases[1], bases[2])


# --------------------------------------------------------------------------
# Warping (torch)
# --------------------------------------------------------------------------


def identity_grid(shape: List[int], dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Identity sampling grid ``(1, *shape, D)`` in normalised coordinates."""
    ndim = len(shape)
    theta = torch.eye(ndim, ndim + 1, dtype=dtype, device=device).unsqueeze(0)
    return F.affine_grid(theta, [1, 1] + shape, align_corners=True)


def warp(image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", slabs: int = 8) -> torch.Tensor:
    """Pull ``image (N, C, *S_in)`` back through ``grid (N, *S_out, D)``; zeros outside.

    A single 3D volume on the CPU is sampled as ``slabs`` slabs of the output's
    depth: torch's CPU ``grid_sample`` for 3D parallelises over the batch only,
    so a batch of one ran on one thread (2 cores, 8 maps at 48^3, forward +
    backward: 35 -> 22 ms). A depth that ``slabs`` does not divide is padded
    with copies of the grid's last plane, whose samples are dropped. The values
    are the same: each slab is the same sampling of the same input.
    """
    if image.dim() == 5 and image.shape[0] == 1 and grid.shape[0] == 1 and image.device.type == "cpu":
        depth = grid.shape[1]
        slabs = min(slabs, depth)
        if slabs > 1:  # the output's depth cut into slabs that form a batch, the input shared (a view, no copy)
            c, h, w = image.shape[1], grid.shape[2], grid.shape[3]
            pad = (slabs - depth % slabs) % slabs
            if pad > 0:
                grid = torch.cat([grid, grid[:, -1:].expand(1, pad, h, w, grid.shape[4])], dim=1)
            out = F.grid_sample(image.expand(slabs, -1, -1, -1, -1),
                                grid.reshape(slabs, (depth + pad) // slabs, h, w, grid.shape[4]),
                                mode=mode, padding_mode="zeros", align_corners=True)
            return out.transpose(0, 1).reshape(1, c, depth + pad, h, w)[:, :, :depth]
    return F.grid_sample(image, grid, mode=mode, padding_mode="zeros", align_corners=True)


# --------------------------------------------------------------------------
# World transforms (numpy / SimpleITK)
# --------------------------------------------------------------------------


def matrix_to_sitk_affine(matrix: np.ndarray) -> sitk.AffineTransform:
    """Homogeneous ``(D+1, D+1)`` world matrix -> ``sitk.AffineTransform`` (centre 0)."""
    d = matrix.shape[0] - 1
    tx = sitk.AffineTransform(d)
    tx.SetMatrix(matrix[:d, :d].ravel().tolist())
    tx.SetTranslation(matrix[:d, d].tolist())
    return tx


def sitk_affine_to_matrix(transform: sitk.Transform) -> np.ndarray:
    """A linear SimpleITK transform (any centre) -> homogeneous world matrix."""
    tx = sitk.AffineTransform(transform) if not isinstance(transform, sitk.AffineTransform) else transform
    d = tx.GetDimension()
    a = np.asarray(tx.GetMatrix(), dtype=float).reshape(d, d)
    c = np.asarray(tx.GetCenter(), dtype=float)
    t = np.asarray(tx.GetTranslation(), dtype=float)
    m = np.eye(d + 1)
    m[:d, :d] = a
    m[:d, d] = t + c - a @ c
    return m


def theta_to_world(theta: np.ndarray, fixed_grid: Grid, moving_grid: Grid) -> np.ndarray:
    """Normalised ``theta (D, D+1)`` (fixed-grid -> moving-grid) -> world matrix ``(D+1, D+1)``."""
    d = fixed_grid.ndim
    th = np.eye(d + 1)
    th[:d, :] = theta
    return moving_grid.normalised_to_world_matrix() @ th @ fixed_grid.world_to_normalised_matrix()


def world_to_theta(matrix: np.ndarray, fixed_grid: Grid, moving_grid: Grid) -> np.ndarray:
    """Inverse of `theta_to_world`: world matrix -> normalised ``theta (D, D+1)``."""
    d = fixed_grid.ndim
    th = moving_grid.world_to_normalised_matrix() @ matrix @ fixed_grid.normalised_to_world_matrix()
    return th[:d, :]


def bspline_to_world(coeffs: np.ndarray, grid: Grid, spacing_voxels: float) -> sitk.BSplineTransform:
    """Normalised control points ``(D, *cp)`` on ``grid`` -> ITK cubic ``BSplineTransform``.

    The result maps world points ``y`` to ``y + u(y)`` with ``u`` in mm; its
    coefficient grid has ``grid``'s direction, control point ``k`` at voxel
    ``(k-1) * spacing_voxels`` of ``grid`` (see `control_point_count`), plus a
    ring of zeros.
    """
    d = grid.ndim
    # One ring of zero coefficients: same displacement everywhere, but ITK's valid
    # region (which rounding at voxel 0 of an oblique grid would fall out of) grows.
    coeffs = np.pad(coeffs.astype(float), [(0, 0)] + [(1, 1)] * d)
    cp_shape = coeffs.shape[1:]  # array order
    # normalised displacement -> world displacement: linear part of normalised->world
    lin = grid.normalised_to_world_matrix()[:d, :d]
    world = np.einsum("ij,j...->i...", lin, coeffs)
    origin = grid.voxel_to_world(np.full(d, -2.0 * float(spacing_voxels)))
    spacing = [float(spacing_voxels) * s for s in grid.spacing]
    tx = sitk.BSplineTransform(d, 3)
    tx.SetFixedParameters(
        [float(s) for s in reversed(cp_shape)] + origin.tolist() + spacing + list(grid.direction)
    )
    tx.SetParameters(world.ravel().tolist())  # component-major, x fastest: ITK's layout
    return tx


def compose(first: sitk.Transform, second: sitk.Transform) -> sitk.Transform:
    """World transform ``x -> second(first(x))`` (``first`` applied to the point first).

    The result is flat (see `flatten_transform`): composing a composite (e.g. an
    earlier affine + B-spline result) never nests it, since ITK's transform files
    cannot hold a composite inside a composite.
    """
    composite = sitk.CompositeTransform(first.GetDimension())
    # ITK applies the transform added LAST first.
    composite.AddTransform(second)
    composite.AddTransform(first)
    return flatten_transform(composite)


def linear_matrix(transform: sitk.Transform) -> np.ndarray:
    """Homogeneous world matrix ``(D+1, D+1)`` of ANY linear transform (Euler, similarity, composites of them ...).

    Read off the images of the origin and the unit vectors, since SimpleITK
    converts only some linear classes to ``AffineTransform``.
    """
    d = transform.GetDimension()
    o = np.asarray(transform.TransformPoint((0.0,) * d), dtype=float)
    m = np.eye(d + 1)
    m[:d, d] = o
    for i in range(d):
        e = [0.0] * d
        e[i] = 1.0
        m[:d, i] = np.asarray(transform.TransformPoint(e), dtype=float) - o
    return m


def flatten_transform(transform: sitk.Transform) -> sitk.Transform:
    """The simplest equivalent of ``transform``, writable and readable by ITK, SimpleITK, ANTs and Slicer.

    - a generic transform read from disk is downcast to its concrete class;
    - a linear transform of any class, or a composite of linear ones, becomes
      one ``AffineTransform`` (so it can start a B-spline stage);
    - a composite holding a non-linear part becomes ONE flat composite (nested
      composites cannot be written: "Composite Transform can only be 1st
      transform in a file"); a composite of one transform becomes that transform.
    """
    tx = transform.Downcast() if hasattr(transform, "Downcast") else transform
    if tx.IsLinear():
        if isinstance(tx, sitk.AffineTransform):
            return tx
        return matrix_to_sitk_affine(linear_matrix(tx))
    if isinstance(tx, sitk.CompositeTransform):
        flat = sitk.CompositeTransform(tx.GetDimension())
        for i in range(tx.GetNumberOfTransforms()):  # same order: the last one is applied first
            part = flatten_transform(tx.GetNthTransform(i))
            if isinstance(part, sitk.CompositeTransform):
                for j in range(part.GetNumberOfTransforms()):
                    flat.AddTransform(part.GetNthTransform(j))
            else:
                flat.AddTransform(part)
        if flat.GetNumberOfTransforms() == 1:
            return flatten_transform(flat.GetNthTransform(0))
        return flat
    return tx


# A displacement field sampling a B-spline is at most this fraction of its control point spacing: linear
# interpolation's error grows as (spacing / mesh)^2.
FIELD_PER_MESH = 1.0 / 8.0


def flat_parts(transform: sitk.Transform) -> list[sitk.Transform]:
    """The transforms ``transform`` is made of (`flatten_transform`), in the order they are APPLIED to a point
    (ITK's composite applies the last one added first); a single transform alone."""
    flat = flatten_transform(transform)
    if not isinstance(flat, sitk.CompositeTransform):
        return [flat]
    return [flat.GetNthTransform(i) for i in reversed(range(flat.GetNumberOfTransforms()))]


def field_spacing_cap(transform: sitk.Transform, spacing: float) -> float:
    """``spacing`` (mm) of a displacement field that samples ``transform``, capped at `FIELD_PER_MESH` times the
    finest control point spacing of the B-splines in it and at the spacing of the displacement fields in it."""
    for part in flat_parts(transform):
        part = part.Downcast() if hasattr(part, "Downcast") else part
        if isinstance(part, (sitk.BSplineTransform, sitk.DisplacementFieldTransform)):
            n = part.GetDimension()  # both keep size, origin, spacing, ... in their fixed parameters
            lattice = min(part.GetFixedParameters()[2 * n:3 * n])
            spacing = min(spacing, FIELD_PER_MESH * lattice if isinstance(part, sitk.BSplineTransform) else lattice)
    return spacing
