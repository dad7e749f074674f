"""Training losses of the four variants (mean squared error, unit weights, as in the paper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .transforms import warp


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
