"""On-the-fly variation of a few real anatomies into endless training pairs.

Only a handful of real brains can be had here, so every training pair is made
on the fly (in torch, on the network grid) from one of them: a random affine
("scanner position"), a smooth random deformation, a bias field, a gamma
change and noise. Each side of a pair is sampled independently; the SoI
channels follow the same geometric transform as their image.

Everything is seeded by ``(seed, index)``: item ``i`` is the same pair in every
run, so training stays reproducible and resumable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..geometry import Grid
from .images import encode_soi, foreground_centre, intensity_window, network_grid, normalise_intensity


@dataclass
class AugmentConfig:
    """Ranges of the random variation (uniform in +-range unless stated)."""

    rotation_deg: float = 15.0
    translation_mm: float = 15.0
    scale: float = 0.1  # per-axis scale in [1 - s, 1 + s]
    shear: float = 0.03
    deform_mm: float = 3.0  # amplitude of the smooth deformation
    deform_points: int = 5  # coarse control grid per axis of the deformation
    bias: float = 0.3  # multiplicative bias field exp(+-bias)
    gamma: float = 0.3  # intensity ** exp(+-gamma)
    noise: float = 0.02  # Gaussian noise sigma (intensities in [0, 1])


@dataclass
class Anatomy:
    """One real volume ready for sampling: intensities in [0, 1] and SoI channels, on its own grid."""

    name: str
    image: torch.Tensor  # (1, Z, Y, X)
    soi: torch.Tensor  # (K, Z, Y, X)
    grid: Grid
    centre: np.ndarray | None = None  # world (D,): where the network grid is centred (`istn.data.foreground_centre`)

    @classmethod
    def from_files(cls, image: str | Path, labels: str | Path, label_values: Sequence[int],
                   intensity: tuple[float, float] = (0.5, 99.5), name: str = "", foreground: bool = True) -> "Anatomy":
        """An anatomy from an image file and its label file (any format SimpleITK reads)."""
        return cls.from_images(sitk.ReadImage(str(image)), sitk.ReadImage(str(labels)), label_values, intensity,
                               name or Path(image).name, foreground)

    @classmethod
    def from_images(cls, image: sitk.Image, labels: sitk.Image, label_values: Sequence[int],
                    intensity: tuple[float, float] = (0.5, 99.5), name: str = "", foreground: bool = True) -> "Anatomy":
        """As `from_files`, from images in memory (labels are resampled onto the image's grid)."""
        img = sitk.Cast(image, sitk.sitkFloat32)
        lab = labels
        arr = sitk.GetArrayFromImage(img)
        norm = normalise_intensity(arr, intensity_window(arr, *intensity, foreground=foreground))
        lab = sitk.Resample(lab, img, sitk.Transform(), sitk.sitkNearestNeighbor)  # same grid as the image
        soi = encode_soi(sitk.GetArrayFromImage(lab), "labels", label_values)
        return cls(name, torch.from_numpy(norm)[None], torch.from_numpy(soi), Grid.from_image(img),
                   foreground_centre(img))


def _random_affine(rng: np.random.Generator, ndim: int, a: AugmentConfig) -> np.ndarray:
    """Random ``(D, D)`` linear part and ``(D,)`` translation (mm), about the grid centre."""
    from scipy.spatial.transform import Rotation

    if ndim == 3:
        rot = Rotation.from_euler("xyz", rng.uniform(-a.rotation_deg, a.rotation_deg, 3), degrees=True).as_matrix()
    else:
        t = np.radians(rng.uniform(-a.rotation_deg, a.rotation_deg))
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    shear = np.eye(ndim) + np.triu(rng.uniform(-a.shear, a.shear, (ndim, ndim)), 1)
    scale = np.diag(rng.uniform(1 - a.scale, 1 + a.scale, ndim))
    return rot @ shear @ scale, rng.uniform(-a.translation_mm, a.translation_mm, ndim)


def _smooth_field(rng: np.random.Generator, channels: int, shape: Sequence[int], points: int, amplitude: float) -> torch.Tensor:
    """Smooth random field ``(channels, *shape)``: coarse uniform noise upsampled (cubic-like, via two linear passes)."""
    ndim = len(shape)
    coarse = torch.from_numpy(rng.uniform(-amplitude, amplitude, (1, channels) + (points,) * ndim).astype(np.float32))
    mode = "bilinear" if ndim == 2 else "trilinear"
    mid = F.interpolate(coarse, size=[max(points, s // 4) for s in shape], mode=mode, align_corners=True)
    return F.interpolate(mid, size=list(shape), mode=mode, align_corners=True)[0]


def sample_view(anatomy: Anatomy, cfg: ModelConfig, rng: np.random.Generator, aug: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One randomly varied view of ``anatomy`` on its network grid: ``(1, *S)`` image and ``(K, *S)`` SoI."""
    # the frame of inference: world axes, centred as `network_grid` centres the model's inputs
    net = network_grid(anatomy.grid, cfg, anatomy.centre if cfg.centre_on_foreground else None)
    d = net.ndim
    shape = net.shape
    pts = torch.from_numpy(net.world_points()).float()  # (*S, D) world
    centre = torch.from_numpy(net.centre).float()
    lin, trans = _random_affine(rng, d, aug)
    pts = (pts - centre) @ torch.from_numpy(lin.T).float() + centre + torch.from_numpy(trans).float()
    if aug.deform_mm > 0:
        field = _smooth_field(rng, d, shape, aug.deform_points, aug.deform_mm)  # (D, *S) mm
        pts = pts + torch.movedim(field, 0, -1)
    w2n = torch.from_numpy(anatomy.grid.world_to_normalised_matrix()).float()
    norm = pts @ w2n[:d, :d].T + w2n[:d, d]
    grid = norm[None]
    image = F.grid_sample(anatomy.image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    soi = F.grid_sample(anatomy.soi[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    if aug.bias > 0:
        image = image * torch.exp(_smooth_field(rng, 1, shape, 3, aug.bias))
    if aug.gamma > 0:
        image = image.clamp(min=0) ** float(np.exp(rng.uniform(-aug.gamma, aug.gamma)))
    if aug.noise > 0:
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        image = image + aug.noise * torch.randn(image.shape, generator=g)
    return image.clamp(0.0, 1.5).float(), soi.float()


class AugmentedPairDataset(torch.utils.data.Dataset):
    """Endless pairs from a few anatomies: item ``i`` is seeded by ``(seed, i)``.

    ``moving``/``fixed`` set the variation of each side (the moving side
    usually gets the large "scanner position" affine). ``cross_only`` pairs
    two different anatomies whenever there are at least two.
    """

    def __init__(self, anatomies: Sequence[Anatomy], cfg: ModelConfig, length: int, seed: int = 0,
                 moving: AugmentConfig | None = None, fixed: AugmentConfig | None = None, cross_only: bool = False) -> None:
        if not anatomies:
            raise ValueError("AugmentedPairDataset() 'anatomies' must not be empty")
        self.anatomies = list(anatomies)
        self.cfg = cfg
        self.length = length
        self.seed = seed
        self.moving = moving or AugmentConfig()
        self.fixed = fixed or AugmentConfig(rotation_deg=3.0, translation_mm=3.0, scale=0.03, shear=0.0)
        self.cross_only = cross_only and len(self.anatomies) > 1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(i)])
        n = len(self.anatomies)
        a = int(rng.integers(n))
        b = int(rng.integers(n - 1)) if self.cross_only else int(rng.integers(n))
        if self.cross_only and b >= a:
            b += 1
        source, source_soi = sample_view(self.anatomies[a], self.cfg, rng, self.moving)
        target, target_soi = sample_view(self.anatomies[b], self.cfg, rng, self.fixed)
        return {"source": source, "target": target, "source_soi": source_soi, "target_soi": target_soi}
