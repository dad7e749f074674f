"""Networks: the ITN, the affine and B-spline STNs, and the ISTN that holds both.

Same code for 2D and 3D. Changes from the 2019 release, and why:

- ITN: a U-Net with instance normalisation and LeakyReLU, two 3x3 convs per
  level, concatenation skips, channels (8, 16, 32) instead of (2, 4, 8, 16):
  normalisation makes training insensitive to the input scale (the release
  saturated on raw 0..255 inputs) and the wider channels give the learned SoI
  map room to suppress distractors. Linear output, one channel per SoI channel.
- STN feature extractor: stride-2 3x3 convs with instance normalisation,
  then adaptive average pooling to 4^D and a hidden FC layer; it does not
  depend on valid-convolution arithmetic for its FC size.
- Affine head: translation, rotation, per-axis log-scale and a TRUE shear
  (upper-triangular), each tanh-bounded, composed in a centred physical frame
  so rotations stay rigid; heads are zero-initialised so the untrained STN is
  the identity.
- B-spline head: zero-initialised too (the release's random init saturated
  tanh and never trained); control point spacing is given in mm.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .transforms import affine_theta, bspline_basis, bspline_displacement, identity_grid, warp


def _conv(ndim: int) -> type:
    return nn.Conv2d if ndim == 2 else nn.Conv3d


def _norm(ndim: int, channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=True) if ndim == 2 else nn.InstanceNorm3d(channels, affine=True)


class ConvBlock(nn.Module):
    """Two (3x3 conv, instance norm, LeakyReLU) layers; the first may stride 2."""

    def __init__(self, ndim: int, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        conv = _conv(ndim)
        self.body = nn.Sequential(
            conv(c_in, c_out, 3, stride=stride, padding=1),
            _norm(ndim, c_out),
            nn.LeakyReLU(0.2),
            conv(c_out, c_out, 3, padding=1),
            _norm(ndim, c_out),
            nn.LeakyReLU(0.2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


BOUNDED_PRIOR_LOGIT = -4.0  # sigmoid(-4) = 0.018: the initial value of a bounded ITN map


class ITN(nn.Module):
    """Image Transformer Network: ``(N, C_in, *S) -> (N, K, *S)`` SoI representation.

    ``*S`` must be divisible by ``2 ** (len(channels) - 1)``. ``bounded``: a sigmoid on the head, so each
    channel is a map in [0, 1] (a structure's probability-like overlay) instead of an unbounded feature.
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int, channels: Tuple[int, ...],
                 bounded: bool = False) -> None:
        super().__init__()
        self.ndim = ndim
        self.bounded = bounded
        self.mode = "bilinear" if ndim == 2 else "trilinear"
        self.down = nn.ModuleList()
        c_prev = in_channels
        for i, c in enumerate(channels):
            self.down.append(ConvBlock(ndim, c_prev, c, stride=1 if i == 0 else 2))
            c_prev = c
        self.up = nn.ModuleList()
        for c_skip in reversed(channels[:-1]):
            self.up.append(ConvBlock(ndim, c_prev + c_skip, c_skip))
            c_prev = c_skip
        self.head = _conv(ndim)(c_prev, out_channels, 1)
        if bounded:
            # start every map near 0 (structures fill ~1 % of a head): a 0.5-everywhere start spends its first
            # thousand steps erasing the background (measured: the soft-Dice ITN terms barely moved in 1000 steps)
            nn.init.constant_(self.head.bias, BOUNDED_PRIOR_LOGIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode=self.mode, align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        x = self.head(x)
        if self.bounded:
            x = torch.sigmoid(x)
        return x


class FeatureExtractor(nn.Module):
    """``(N, C, *S) -> (N, hidden)``: strided conv blocks, pooling to 4^D, FC."""

    def __init__(self, ndim: int, in_channels: int, channels: Tuple[int, ...], hidden: int) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        c_prev = in_channels
        for c in channels:
            layers.append(ConvBlock(ndim, c_prev, c, stride=2))
            c_prev = c
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4) if ndim == 2 else nn.AdaptiveAvgPool3d(4)
        self.fc = nn.Sequential(nn.Linear(c_prev * 4**ndim, hidden), nn.LeakyReLU(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, *S) -> (N, C' 4^D)``: the convolutional part, before the FC layer."""
        return torch.flatten(self.pool(self.convs(x)), 1)


def _zero_linear(c_in: int, c_out: int) -> nn.Linear:
    layer = nn.Linear(c_in, c_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class _STN(nn.Module):
    """What both STNs share: ``forward = from_pooled(pooled(source, target))``; subclasses set ``features``
    (a `FeatureExtractor` on the pair's channels) and define ``from_pooled``."""

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.from_pooled(self.pooled(source, target))

    def pooled(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The convolutional features of the pair ``(N, C' 4^D)``: what the fully connected layers see."""
        return self.features.pooled(torch.cat([source, target], dim=1))

    def from_pooled(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class AffineSTN(_STN):
    """Affine STN: ``(source, target) -> theta (N, D, D+1)`` normalised, identity when untrained."""

    def __init__(self, cfg: ModelConfig, in_channels: int) -> None:
        super().__init__()
        d = cfg.ndim
        n_rot = 1 if d == 2 else 3
        self.features = FeatureExtractor(d, 2 * in_channels, cfg.stn_channels, cfg.stn_hidden)
        self.translation = _zero_linear(cfg.stn_hidden, d)
        self.rotation = _zero_linear(cfg.stn_hidden, n_rot)
        self.scaling = _zero_linear(cfg.stn_hidden, d)
        self.shearing = _zero_linear(cfg.stn_hidden, n_rot)
        self.max_translation = float(cfg.max_translation)
        self.max_rotation = math.radians(cfg.max_rotation_deg)
        self.max_log_scale = float(cfg.max_log_scale)
        self.max_shear = float(cfg.max_shear)
        half = [(s - 1) * cfg.grid_spacing / 2.0 for s in cfg.grid_size]
        self.register_buffer("half_extent", torch.tensor(half, dtype=torch.float32))

    def from_pooled(self, z: torch.Tensor) -> torch.Tensor:
        """``theta`` from the convolutional features ``z`` (`pooled`): the fully connected layers and heads."""
        h = self.features.fc(z)
        return affine_theta(
            torch.tanh(self.translation(h)) * self.max_translation,
            torch.tanh(self.rotation(h)) * self.max_rotation,
            torch.tanh(self.scaling(h)) * self.max_log_scale,
            torch.tanh(self.shearing(h)) * self.max_shear,
            self.half_extent,
        )


class BSplineSTN(_STN):
    """B-spline STN: ``(source, target) -> control points (N, D, *cp)`` normalised, zero when untrained."""

    def __init__(self, cfg: ModelConfig, in_channels: int, cp_shape: List[int]) -> None:
        super().__init__()
        self.features = FeatureExtractor(cfg.ndim, 2 * in_channels, cfg.stn_channels, cfg.stn_hidden)
        self.cp_shape = cp_shape
        n_out = cfg.ndim
        for c in cp_shape:
            n_out *= c
        self.head = _zero_linear(cfg.stn_hidden, n_out)
        self.max_displacement = float(cfg.max_displacement)

    def from_pooled(self, z: torch.Tensor) -> torch.Tensor:
        """Control points from the convolutional features ``z`` (`pooled`): the fully connected layers."""
        c = torch.tanh(self.head(self.features.fc(z))) * self.max_displacement
        return c.view([c.shape[0], -1] + self.cp_shape)


class ISTN(nn.Module):
    """The whole model, scriptable as one TorchScript file.

    Exported methods (all tensors on the internal grid, shape ``(N, C, *S)``):

    - ``representation(x)``: ITN map ``(N, K, *S)`` (the input itself for STN-u/s);
    - ``predict(source_map, target_map)``: transform parameters (``theta`` or control points);
    - ``stn_pooled(source_map, target_map)`` ``(N, F)`` and ``predict_from_pooled(z)``: ``predict`` in two
      parts, the STN's convolutions and its fully connected layers (refinement of the FC layers alone runs
      the convolutions once per pair);
    - ``sampling_grid(params)``: ``(N, *S, D)`` normalised pull-back grid;
    - ``warp(x, grid)``: resample ``x`` through ``grid``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ndim = cfg.ndim
        self.uses_itn = cfg.uses_itn
        self.is_affine = cfg.transform == "affine"
        self.grid_shape: List[int] = list(reversed(cfg.grid_size))  # array order
        self.itn = (ITN(cfg.ndim, 1, cfg.soi_channels, cfg.itn_channels, cfg.itn_output == "sigmoid")
                    if cfg.uses_itn else nn.Identity())
        map_channels = cfg.soi_channels if cfg.uses_itn else 1
        bases: List[torch.Tensor] = []
        if self.is_affine:
            self.stn = AffineSTN(cfg, map_channels)
        else:
            bases = [bspline_basis(n, cfg.cp_spacing_voxels) for n in self.grid_shape]
            self.stn = BSplineSTN(cfg, map_channels, [b.shape[1] for b in bases])
        # Basis matrices are buffers so they follow .to(device) and travel in the file.
        for i in range(3):
            self.register_buffer(f"basis{i}", bases[i] if i < len(bases) else torch.zeros(0))
        self.register_buffer("base_grid", identity_grid(self.grid_shape))

    @torch.jit.export
    def representation(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_itn:
            return self.itn(x)
        return x

    @torch.jit.export
    def predict(self, source_map: torch.Tensor, target_map: torch.Tensor) -> torch.Tensor:
        return self.stn(source_map, target_map)

    @torch.jit.export
    def stn_pooled(self, source_map: torch.Tensor, target_map: torch.Tensor) -> torch.Tensor:
        """The STN's convolutional features ``(N, F)`` of a pair of maps (fixed while the maps are)."""
        return self.stn.pooled(source_map, target_map)

    @torch.jit.export
    def predict_from_pooled(self, z: torch.Tensor) -> torch.Tensor:
        """``predict`` from `stn_pooled`'s features: the STN's fully connected layers only."""
        return self.stn.from_pooled(z)

    @torch.jit.export
    def sampling_grid(self, params: torch.Tensor) -> torch.Tensor:
        if self.is_affine:
            return F.affine_grid(params, [params.shape[0], 1] + self.grid_shape, align_corners=True)
        bases = [self.basis0, self.basis1] if self.ndim == 2 else [self.basis0, self.basis1, self.basis2]
        return self.base_grid + bspline_displacement(params, bases)

    @torch.jit.export
    def warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return warp(x, grid)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(source, target) -> (source_map, target_map, params, grid)``."""
        s_map = self.representation(source)
        t_map = self.representation(target)
        params = self.predict(s_map, t_map)
        return s_map, t_map, params, self.sampling_grid(params)
