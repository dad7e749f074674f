"""Training losses of the four variants (mean squared error, unit weights, as in the paper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .transforms import control_point_count, warp


def normalised_mse(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``|a - b|^2 / (|a|^2 + |b|^2)`` per sample and channel, averaged: ``(N, K, *S) -> ()``.

    Equals ``1 - soft Dice`` for non-negative maps. Unlike plain MSE it does not
    reward warping sparse structures out of view: with small SoI (sub-cortical
    labels) and large initial misalignment, MSE is lower for an empty warped
    map (``mean(b^2)``) than for a misaligned one (``mean(a^2) + mean(b^2)``),
    and an affine STN trained on it drifted to its bounds and saturated.
    """
    dims = tuple(range(2, a.dim()))
    num = ((a - b) ** 2).sum(dims)
    den = (a * a).sum(dims) + (b * b).sum(dims) + eps
    return (num / den).mean()


def variant_loss(
    variant: str,
    source: torch.Tensor,
    target: torch.Tensor,
    source_soi: torch.Tensor,
    target_soi: torch.Tensor,
    source_map: torch.Tensor,
    target_map: torch.Tensor,
    grid: torch.Tensor,
    soi_loss: str = "mse",
    image_weight: float = 0.0,
) -> torch.Tensor:
    """Loss of one batch.

    ``source``/``target`` ``(N, 1, *S)`` normalised images; ``*_soi`` ``(N, K, *S)``
    SoI encodings; ``*_map`` the ITN outputs (the images themselves for STN-u/s);
    ``grid (N, *S, D)`` the predicted pull-back grid (T(.) = warp through it).

    | variant | loss |
    | stn-u   | MSE(T(s), t) |
    | stn-s   | MSE(T(S_s), S_t) |
    | istn-e  | MSE(s', S_s) + MSE(t', S_t) + MSE(T(S_s), S_t) |
    | istn-i  | MSE(T(s'), S_t) + MSE(T(S_s), t') + MSE(T(S_s), S_t) |

    ``soi_loss="nmse"`` replaces MSE by `normalised_mse` in every SoI term,
    including ISTN-e's ITN terms, where it is 1 - soft Dice: a segmentation loss
    that sparse structures (1-2 % of a brain volume) do not drown in, unlike MSE.
    ``image_weight > 0`` adds ``image_weight * MSE(T(s), t)`` (the STN-u term) to
    the SoI variants: a dense signal while sparse structures do not overlap yet
    (large initial misalignment), when every SoI term has a zero gradient.
    """
    extra = image_weight * F.mse_loss(warp(source, grid), target) if image_weight > 0 and variant != "stn-u" else 0.0
    if soi_loss not in ("mse", "nmse"):
        raise ValueError(f"variant_loss() 'soi_loss' must be mse or nmse, got {soi_loss!r}")
    term = F.mse_loss if soi_loss == "mse" else normalised_mse
    if variant == "stn-u":
        return F.mse_loss(warp(source, grid), target)
    warped_soi = warp(source_soi, grid)
    soi_term = term(warped_soi, target_soi)
    if variant == "stn-s":
        return soi_term + extra
    if variant == "istn-e":
        return term(source_map, source_soi) + term(target_map, target_soi) + soi_term + extra
    if variant == "istn-i":
        return term(warp(source_map, grid), target_soi) + term(warped_soi, target_map) + soi_term + extra
    raise ValueError(f"variant_loss() 'variant' must be one of stn-u, stn-s, istn-e, istn-i, got {variant!r}")


def refinement_loss(warped_source_map: torch.Tensor, target_map: torch.Tensor) -> torch.Tensor:
    """Test-time objective MSE(T(s'), t') (no annotations)."""
    return F.mse_loss(warped_source_map, target_map)


def bending_energy(coeffs: torch.Tensor, cp_spacing_mm: float, half_extent_mm: torch.Tensor) -> torch.Tensor:
    """Bending energy of a cubic B-spline from its control points, in physical units (mm^-2).

    ``coeffs (N, D, *cp)``: control point displacements in normalised units of
    a grid with world-aligned axes whose half-extent is ``half_extent_mm (D,)``
    (component ``c`` is scaled by ``half_extent_mm[c]`` to get mm). Second
    derivatives ``d2u_i / dx_j dx_k`` are the control lattice's central second
    differences divided by the spacing squared (the B-spline's own second
    derivative up to its smoothing); the energy is their square summed over
    components and derivative pairs (mixed pairs twice, as in the thin-plate
    bending energy), averaged over the lattice: ``u_x = a x^2`` gives ``4 a^2``. Zero for any
    affine displacement (a translation, a rotation to first order), so it
    penalises only the wiggles the affine stage cannot explain.
    """
    d = coeffs.shape[1]
    u = coeffs * half_extent_mm.to(coeffs).view([1, d] + [1] * d)
    # spatial dims of u: 2.. in array order (Z, Y, X); the lattice spacing is the same in mm along every axis
    dims = list(range(2, 2 + d))
    h2 = float(cp_spacing_mm) ** 2
    total = u.new_zeros(())
    for a in dims:
        for b in dims:
            if b < a:
                continue
            if a == b:
                n = u.shape[a]
                second = u.narrow(a, 2, n - 2) - 2 * u.narrow(a, 1, n - 2) + u.narrow(a, 0, n - 2)
                w = 1.0
            else:
                da = u.narrow(a, 1, u.shape[a] - 1) - u.narrow(a, 0, u.shape[a] - 1)
                second = da.narrow(b, 1, da.shape[b] - 1) - da.narrow(b, 0, da.shape[b] - 1)
                w = 2.0
            total = total + w * (second / h2).pow(2).sum(1).mean()
    return total


def anchored_control_points(maps: torch.Tensor, spacing_voxels: float, threshold: float) -> torch.Tensor:
    """Which control points of a B-spline on the grid of ``maps (1, K, *S)`` lie away from the structures: ``(*cp)``,
    1 where the control point's cell (the voxels nearer to it than to any other control point; point ``k`` at voxel
    ``(k - 1) * spacing_voxels``, `istn.transforms.control_point_count`) holds no voxel where any channel reaches
    ``threshold``, else 0. All ones when no voxel does."""
    shape = maps.shape[2:]
    cp = [control_point_count(n, spacing_voxels) for n in shape]
    anchored = torch.ones(cp, dtype=maps.dtype, device=maps.device)
    inside = torch.nonzero(maps.detach().amax(1)[0] >= threshold)  # (M, D) voxel indices, array order
    if inside.numel():
        k = torch.round(inside.to(torch.float64) / float(spacing_voxels)).long() + 1
        anchored[tuple(k.t())] = 0.0
    return anchored


def anchor_energy(coeffs: torch.Tensor, anchored: torch.Tensor, half_extent_mm: torch.Tensor) -> torch.Tensor:
    """Mean squared displacement (mm^2) of the anchored control points, averaged over all control points.

    ``coeffs (N, D, *cp)`` as in `bending_energy`; ``anchored (*cp)``: 1 for the points held
    (`anchored_control_points`). Unlike the bending energy it is not zero for a smooth offset: it holds the
    B-spline at the affine's result away from the structures, where the maps carry nothing to register.
    """
    d = coeffs.shape[1]
    u = coeffs * half_extent_mm.to(coeffs).view([1, d] + [1] * d)
    return (u.pow(2).sum(1) * anchored.to(coeffs)).mean()
