"""Training losses of the four variants (mean squared error, unit weights, as in the paper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .transforms import warp


def variant_loss(
    variant: str,
    source: torch.Tensor,
    target: torch.Tensor,
    source_soi: torch.Tensor,
    target_soi: torch.Tensor,
    source_map: torch.Tensor,
    target_map: torch.Tensor,
    grid: torch.Tensor,
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
    """
    if variant == "stn-u":
        return F.mse_loss(warp(source, grid), target)
    warped_soi = warp(source_soi, grid)
    soi_term = F.mse_loss(warped_soi, target_soi)
    if variant == "stn-s":
        return soi_term
    if variant == "istn-e":
        return F.mse_loss(source_map, source_soi) + F.mse_loss(target_map, target_soi) + soi_term
    if variant == "istn-i":
        return F.mse_loss(warp(source_map, grid), target_soi) + F.mse_loss(warped_soi, target_map) + soi_term
    raise ValueError(f"variant_loss() 'variant' must be one of stn-u, stn-s, istn-e, istn-i, got {variant!r}")


def refinement_loss(warped_source_map: torch.Tensor, target_map: torch.Tensor) -> torch.Tensor:
    """Test-time objective MSE(T(s'), t') (no annotations)."""
    return F.mse_loss(warped_source_map, target_map)
