"""On-the-fly variation of a few real anatomies into endless training pairs.

Only a handful of real brains can be had here, so every training pair is made
on the fly (in torch, on the network grid) from one of them: a random affine
("scanner position"), a smooth random deformation, a bias field, a gamma
change and noise. Each side of a pair is sampled independently; the SoI
channels follow the same geometric transform as their image.

Optional, off by default (`AugmentConfig`): a view drawn from the anatomy's
labels instead of its intensities (`istn.data.synthesis`), a random blur, a
cropped field of view, a left-right mirror, a tighter skull strip. A config that leaves them off draws exactly the
random numbers it drew before they existed, so old training runs replay.

Everything is seeded by ``(seed, index)``: item ``i`` is the same pair in every
run, so training stays reproducible and resumable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..geometry import Grid
from .images import encode_soi, foreground_centre, intensity_window, network_grid, normalise_intensity
from .synthesis import crop_field_of_view, gaussian_blur, synthesis_labels, synthesize, tissue_from_intensity


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
    # Off by default; each draws random numbers only when on (old configs replay exactly).
    synth_prob: float = 0.0  # probability that a view is drawn from the labels (`istn.data.synthesis`)
    synth_std: float = 0.05  # within-label std of a synthetic view: uniform in [0, synth_std] per label
    synth_smooth_mm: float = 1.0  # partial-volume smoothing of a synthetic view (Gaussian sigma, mm)
    synth_background: float = 0.0  # background mean of a synthetic view: uniform in [0, synth_background]
    blur_sigma_mm: tuple[float, float] = (0.0, 0.0)  # Gaussian blur, sigma uniform in this range per axis (mm)
    crop_prob: float = 0.0  # probability of a cropped field of view
    crop_keep: tuple[float, float] = (0.5, 0.9)  # fraction of the head's extent kept along the crop axis
    crop_axes: tuple[int, ...] = (2,)  # world axes (0 x L-R, 1 y A-P, 2 z I-S) a crop may cut along
    crop_recentre: bool = True  # move the view as inference centres a cropped image (on its foreground)
    # probability of a left-right mirrored anatomy (about the head's centre, world x): a new, plausible anatomy
    # from each real one; ``mirror_channels[k]`` is the SoI channel that becomes channel k (left <-> right swapped)
    mirror_prob: float = 0.0
    mirror_channels: tuple[int, ...] = ()
    # probability that a SKULL-STRIPPED anatomy (`Anatomy.stripped`) is stripped tighter than its file: its brain
    # eroded by uniform ``strip_erode_mm`` mm, half the time with a one-voxel partial-volume ramp at the new edge
    # (`tighter_strip`; users' extraction tools cut at different depths)
    strip_prob: float = 0.0
    strip_erode_mm: tuple[float, float] = (0.0, 4.0)

    def __post_init__(self) -> None:
        for name in ("synth_prob", "crop_prob", "mirror_prob", "strip_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentConfig() '{name}' must be in [0, 1], got {getattr(self, name)}")
        self.blur_sigma_mm = tuple(float(v) for v in self.blur_sigma_mm)
        self.crop_keep = tuple(float(v) for v in self.crop_keep)
        self.crop_axes = tuple(int(v) for v in self.crop_axes)
        self.mirror_channels = tuple(int(v) for v in self.mirror_channels)
        if sorted(self.mirror_channels) != list(range(len(self.mirror_channels))):
            raise ValueError(f"AugmentConfig() 'mirror_channels' must be a permutation of 0..K-1, got {self.mirror_channels}")
        if len(self.crop_keep) != 2 or not 0.0 < self.crop_keep[0] <= self.crop_keep[1] <= 1.0:
            raise ValueError(f"AugmentConfig() 'crop_keep' must be (low, high) with 0 < low <= high <= 1, got {self.crop_keep}")
        if len(self.blur_sigma_mm) != 2 or not 0.0 <= self.blur_sigma_mm[0] <= self.blur_sigma_mm[1]:
            raise ValueError(f"AugmentConfig() 'blur_sigma_mm' must be (low, high) with 0 <= low <= high, got {self.blur_sigma_mm}")
        self.strip_erode_mm = tuple(float(v) for v in self.strip_erode_mm)
        if len(self.strip_erode_mm) != 2 or not 0.0 <= self.strip_erode_mm[0] <= self.strip_erode_mm[1]:
            raise ValueError(f"AugmentConfig() 'strip_erode_mm' must be (low, high) with 0 <= low <= high, got {self.strip_erode_mm}")
        if not self.crop_axes or any(a not in (0, 1, 2) for a in self.crop_axes):
            raise ValueError(f"AugmentConfig() 'crop_axes' must be world axes 0, 1, 2, got {self.crop_axes}")


@dataclass
class Anatomy:
    """One real volume ready for sampling: intensities in [0, 1] and SoI channels, on its own grid.

    ``tissue``: optional tissue classes (`istn.data.synthesis.TISSUE_CLASSES`), which label-driven
    synthesis draws from with the SoI (`synthesis_labels`, made once, on first use); without it,
    synthesis falls back on three intensity classes of the image (`tissue_from_intensity`, a T1 guess).
    """

    name: str
    image: torch.Tensor  # (1, Z, Y, X)
    soi: torch.Tensor  # (K, Z, Y, X)
    grid: Grid
    centre: np.ndarray | None = None  # world (D,): where the network grid is centred (`istn.data.foreground_centre`)
    tissue: torch.Tensor | None = None  # (Z, Y, X) integer tissue classes, 0 = background
    stripped: bool = False  # a skull-stripped image: its support (> 0) is the brain (`AugmentConfig.strip_prob`)
    _labels: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def labels(self) -> torch.Tensor:
        """Label map ``(Z, Y, X)`` int64 of label-driven synthesis (`istn.data.synthesis.synthesis_labels`)."""
        if self._labels is None:
            tissue = self.tissue
            if tissue is None:
                tissue = torch.from_numpy(tissue_from_intensity(self.image[0].numpy()))
            self._labels = synthesis_labels(self.soi, tissue)
        return self._labels

    @classmethod
    def from_files(cls, image: str | Path, labels: str | Path, label_values: Sequence[int],
                   intensity: tuple[float, float] = (0.5, 99.5), name: str = "", foreground: bool = True,
                   tissue: str | Path | None = None) -> "Anatomy":
        """An anatomy from an image file and its label file (any format SimpleITK reads); ``tissue``: an
        optional file of tissue classes (`istn.data.synthesis.TISSUE_CLASSES`)."""
        return cls.from_images(sitk.ReadImage(str(image)), sitk.ReadImage(str(labels)), label_values, intensity,
                               name or Path(image).name, foreground,
                               None if tissue is None else sitk.ReadImage(str(tissue)))

    @classmethod
    def from_images(cls, image: sitk.Image, labels: sitk.Image, label_values: Sequence[int],
                    intensity: tuple[float, float] = (0.5, 99.5), name: str = "", foreground: bool = True,
                    tissue: sitk.Image | None = None) -> "Anatomy":
        """As `from_files`, from images in memory (labels and tissue are resampled onto the image's grid)."""
        img = sitk.Cast(image, sitk.sitkFloat32)
        lab = labels
        arr = sitk.GetArrayFromImage(img)
        norm = normalise_intensity(arr, intensity_window(arr, *intensity, foreground=foreground))
        lab = sitk.Resample(lab, img, sitk.Transform(), sitk.sitkNearestNeighbor)  # same grid as the image
        soi = encode_soi(sitk.GetArrayFromImage(lab), "labels", label_values)
        classes = None
        if tissue is not None:
            tissue = sitk.Resample(tissue, img, sitk.Transform(), sitk.sitkNearestNeighbor)
            classes = torch.from_numpy(sitk.GetArrayFromImage(tissue).astype(np.int64))
        return cls(name, torch.from_numpy(norm)[None], torch.from_numpy(soi), Grid.from_image(img),
                   foreground_centre(img), classes)


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


def tighter_strip(image: torch.Tensor, spacing: Sequence[float], erode_mm: float, ramp: bool) -> torch.Tensor:
    """A skull-stripped ``(1, *S)`` image (0 outside the brain) stripped ``erode_mm`` deeper: its support eroded
    by ``round(erode_mm / spacing)`` voxels per axis (``spacing``: mm per world axis x, y, ...), and with ``ramp``
    the new edge darkened by a one-voxel box average of the mask (the partial volume a resampled extraction has)."""
    d = image.dim() - 1
    radius = [int(round(erode_mm / s)) for s in reversed(list(spacing))]  # array order (z, y, x)
    outside = (image <= 0).float()[None]  # (1, 1, *S)
    if any(radius):
        pad = [p for r in reversed(radius) for p in (r, r)]  # F.pad wants the last axis first
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[d - 1]
        outside = pool(F.pad(outside, pad, value=1.0), [2 * r + 1 for r in radius], stride=1)
    mask = 1.0 - outside
    if ramp:
        avg = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[d - 1]
        mask = mask * avg(F.pad(mask, [1, 1] * d, value=0.0), 3, stride=1)
    return image * mask[0]


def _draw_crop(rng: np.random.Generator, aug: AugmentConfig, net: Grid, head: torch.Tensor):
    """A random crop of the field of view of a view on ``net`` whose anatomy covers ``head`` ``(*S)`` bool.

    Returns ``((D,) direction, keep_from)``, the kept part being ``world . direction >= keep_from`` (mm), and
    the world shift ``(D,)`` that centres the network grid on the kept part of the anatomy as inference
    would centre it (`istn.data.images.foreground_centre` of the cropped image); no crop without ``head``.
    Along z the superior end is kept (scans lose the neck and the cerebellum first), along x or y a random end.
    """
    d = net.ndim
    axes = [a for a in aug.crop_axes if a < d] or [d - 1]
    axis = axes[int(rng.integers(len(axes)))]
    keep = rng.uniform(*aug.crop_keep)
    sign = 1.0 if (axis == 2 or rng.random() < 0.5) else -1.0
    direction = torch.zeros(d)
    direction[axis] = sign
    world = torch.from_numpy(net.world_points()).float()  # (*S, D)
    if not bool(head.any()):
        return (direction, -float("inf")), torch.zeros(d)
    coord = world @ direction
    lo, hi = float(coord[head].min()), float(coord[head].max())
    keep_from = hi - keep * (hi - lo)
    kept = head & (coord >= keep_from)
    shift = world[kept].mean(0) - world[head].mean(0) if bool(kept.any()) else torch.zeros(d)
    return (direction, keep_from), shift


def sample_view(anatomy: Anatomy, cfg: ModelConfig, rng: np.random.Generator, aug: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One randomly varied view of ``anatomy`` on its network grid: ``(1, *S)`` image and ``(K, *S)`` SoI.

    In this order: geometry (with ``mirror_prob`` a left-right mirror of the anatomy, its SoI channels
    permuted by ``mirror_channels``; with ``strip_prob`` a skull-stripped anatomy stripped tighter,
    `tighter_strip`; affine, deformation; then with ``crop_prob`` a crop of the field of view, which
    moves the view as inference would centre the cropped image, ``crop_recentre``; the image, the SoI and
    a synthetic image are resampled through the same sampling grid), intensities (real, or with
    ``synth_prob`` drawn from the labels, `istn.data.synthesis`), bias field, gamma, blur, noise, and last
    the crop's zeroing (0 is the intensity window's low end). The SoI is never cropped: the structures are
    still where they were, unseen.
    """
    # the frame of inference: world axes, centred as `network_grid` centres the model's inputs
    net = network_grid(anatomy.grid, cfg, anatomy.centre if cfg.centre_on_foreground else None)
    d = net.ndim
    shape = net.shape
    pts = torch.from_numpy(net.world_points()).float()  # (*S, D) world
    centre = torch.from_numpy(net.centre).float()
    lin, trans = _random_affine(rng, d, aug)
    mirrored = aug.mirror_prob > 0 and rng.random() < aug.mirror_prob  # no draw when off: old runs replay
    if mirrored:  # a reflection of world x about the centre, folded into the linear part (a crop's shift follows it)
        lin = lin @ np.diag([-1.0] + [1.0] * (d - 1))
    source = anatomy.image
    if aug.strip_prob > 0 and anatomy.stripped and rng.random() < aug.strip_prob:  # no draw when off
        source = tighter_strip(source, anatomy.grid.spacing, rng.uniform(*aug.strip_erode_mm), rng.random() < 0.5)
    pts = (pts - centre) @ torch.from_numpy(lin.T).float() + centre + torch.from_numpy(trans).float()
    if aug.deform_mm > 0:
        field = _smooth_field(rng, d, shape, aug.deform_points, aug.deform_mm)  # (D, *S) mm
        pts = pts + torch.movedim(field, 0, -1)
    w2n = torch.from_numpy(anatomy.grid.world_to_normalised_matrix()).float()
    norm = pts @ w2n[:d, :d].T + w2n[:d, d]
    grid = norm[None]
    image = F.grid_sample(source[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    soi = F.grid_sample(anatomy.soi[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    crop = None
    if aug.crop_prob > 0 and rng.random() < aug.crop_prob:
        crop, shift = _draw_crop(rng, aug, net, image[0] > 0.05)
        if aug.crop_recentre and bool(torch.any(shift != 0)):
            # the engine centres its grid on the CROPPED image's foreground: the view moves with it
            pts = pts + shift @ torch.from_numpy(lin.T).float()
            grid = (pts @ w2n[:d, :d].T + w2n[:d, d])[None]
            image = F.grid_sample(source[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
            soi = F.grid_sample(anatomy.soi[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
            crop = crop[0], crop[1] - float((crop[0] * shift).sum())
    spacing = tuple(reversed(net.spacing))  # mm per array axis
    if aug.synth_prob > 0 and rng.random() < aug.synth_prob:
        image = synthesize(anatomy.labels, grid, spacing, rng, aug.synth_std, aug.synth_smooth_mm,
                           aug.synth_background)
    if aug.bias > 0:
        image = image * torch.exp(_smooth_field(rng, 1, shape, 3, aug.bias))
    if aug.gamma > 0:
        image = image.clamp(min=0) ** float(np.exp(rng.uniform(-aug.gamma, aug.gamma)))
    if aug.blur_sigma_mm[1] > 0:
        sigma_mm = rng.uniform(aug.blur_sigma_mm[0], aug.blur_sigma_mm[1], d)[::-1]  # world x, y, z -> array
        image = gaussian_blur(image, [s / sp for s, sp in zip(sigma_mm, spacing)])
    if aug.noise > 0:
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        image = image + aug.noise * torch.randn(image.shape, generator=g)
    if crop is not None:  # last: nothing (noise included) outside the field of view
        coord = torch.from_numpy(net.world_points()).float() @ crop[0]  # (*S) mm along the crop direction
        image = crop_field_of_view(image, coord, crop[1])
    if mirrored and aug.mirror_channels:
        if len(aug.mirror_channels) != soi.shape[0]:
            raise ValueError(f"AugmentConfig 'mirror_channels' has {len(aug.mirror_channels)} entries for "
                             f"{soi.shape[0]} SoI channels")
        soi = soi[list(aug.mirror_channels)]
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
