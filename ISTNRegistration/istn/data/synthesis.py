"""Label-driven synthesis: training images drawn from label maps (SynthSeg / SynthMorph style).

A handful of real anatomies teach a network their intensities as much as their
structures. To make the ITN learn the structures instead, a view can be drawn
from the anatomy's LABELS alone: every label gets a random mean intensity
(uniform in [0, 1]) and a random within-label standard deviation, a small
Gaussian stands for the partial-volume effect, and the usual bias, gamma,
noise (and optional blur) of `istn.data.augment` follow. No two synthetic
views share a contrast, so only the shapes carry over from one to the next.

The label map of an anatomy (`synthesis_labels`) joins two things:

- its SoI labels (the protocol's structures, one per SoI channel), on top;
- its TISSUE classes (`TISSUE_CLASSES`: background, CSF, grey matter, white
  matter, and non-brain head split into a dark and a bright class for whole
  heads), one integer map per anatomy made once at load time from what exists
  for it (tissue probability maps: `tissue_from_probabilities`; a k-means
  classification: `tissue_from_classes`; nothing: `tissue_from_intensity`).

The synthetic image is made on the anatomy's own grid (a lookup table applied
to the label map) and resampled by the SAME sampling grid and interpolation as
the anatomy's image and SoI in `istn.data.augment.sample_view`, so it follows
exactly the geometric transform of the SoI. Everything random comes from the
view's ``numpy.random.Generator``: a view is reproducible from its seed.

Also here: `gaussian_blur` (separable, per-axis sigma in voxels) and
`crop_field_of_view` (a cropped scan: a slab of the field of view kept, zero
elsewhere).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .images import intensity_window, otsu_threshold

#: Tissue class codes of an anatomy's ``tissue`` map (integers, 0 = background).
TISSUE_CLASSES = ("background", "csf", "gm", "wm", "head_dark", "head_bright")
BACKGROUND, CSF, GM, WM, HEAD_DARK, HEAD_BRIGHT = range(len(TISSUE_CLASSES))


# --------------------------------------------------------------------------
# Tissue maps (numpy, on the anatomy's grid, array order (Z, Y, X))
# --------------------------------------------------------------------------


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice along the first axis (a head open at the neck has no closed 3D hole)."""
    from scipy import ndimage

    if mask.ndim == 2:
        return ndimage.binary_fill_holes(mask)
    return np.stack([ndimage.binary_fill_holes(s) for s in mask])


def head_mask(image: np.ndarray) -> np.ndarray:
    """Whole head of an image ``(*S)``: Otsu foreground, closed, holes filled per slice (so the dark skull
    between scalp and brain belongs to the head). ``(*S)`` bool."""
    from scipy import ndimage

    fg = image > otsu_threshold(image)
    fg = ndimage.binary_closing(fg, iterations=2)
    return _fill_slices(fg)


def _with_head(brain_classes: np.ndarray, image: np.ndarray | None) -> np.ndarray:
    """Add the non-brain head of a whole-head ``image`` to a map of brain classes (0 outside the brain):
    head voxels outside the brain become `HEAD_DARK` or `HEAD_BRIGHT` by Otsu's threshold of their intensities."""
    out = brain_classes.astype(np.uint8)
    if image is None:
        return out
    rest = head_mask(image) & (out == BACKGROUND)
    if rest.sum() >= 16:
        t = otsu_threshold(image[rest])
        out[rest & (image <= t)] = HEAD_DARK
        out[rest & (image > t)] = HEAD_BRIGHT
    return out


def tissue_from_probabilities(gm: np.ndarray, wm: np.ndarray, csf: np.ndarray | None = None,
                              image: np.ndarray | None = None) -> np.ndarray:
    """Tissue classes from probability maps ``(*S)`` in [0, 1] (one grid): ``(*S)`` uint8 (`TISSUE_CLASSES`).

    Brain = GM + WM (+ CSF) > 0.5 (without a CSF map: GM + WM > 0.5, closed and filled per slice, so
    ventricles and sulci join it); inside it, the most probable of CSF, GM, WM (a missing CSF map counts
    as 1 - GM - WM). ``image``: the whole-head image on the same grid, whose non-brain head becomes
    `HEAD_DARK` / `HEAD_BRIGHT` (`head_mask`); None for a brain-only map.
    """
    from scipy import ndimage

    if csf is None:
        brain = _fill_slices(ndimage.binary_closing(gm + wm > 0.5, iterations=2))
        csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    else:
        brain = gm + wm + csf > 0.5
    classes = np.argmax(np.stack([csf, gm, wm]), axis=0).astype(np.uint8) + CSF
    return _with_head(np.where(brain, classes, BACKGROUND), image)


def majority_filter(labels: np.ndarray, radius: int = 1) -> np.ndarray:
    """Each voxel of an integer map ``(*S)`` takes the most frequent value of its ``(2 radius + 1)^D`` box
    (ties: the smaller value): speckle of a voxel-wise classification removed, shapes kept."""
    from scipy import ndimage

    values = np.unique(labels)
    votes = np.stack([ndimage.uniform_filter((labels == v).astype(np.float32), 2 * radius + 1, mode="nearest")
                      for v in values])
    return values[np.argmax(votes, axis=0)].astype(labels.dtype)


def tissue_from_classes(classes: np.ndarray, mapping: dict[int, int], image: np.ndarray | None = None,
                        smooth: int = 1) -> np.ndarray:
    """Tissue classes from another classification ``(*S)`` (e.g. k-means) through ``mapping`` (its value ->
    `CSF` / `GM` / `WM`; unmapped values are not brain), speckle removed by a `majority_filter` of radius
    ``smooth`` (0: none); the non-brain head of ``image`` as in `tissue_from_probabilities`. ``(*S)`` uint8."""
    out = np.zeros(classes.shape, np.uint8)
    for value, code in mapping.items():
        out[classes == value] = code
    if smooth > 0:
        out = majority_filter(out, smooth)
    return _with_head(out, image)


def tissue_from_intensity(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Rough tissue classes of a brain-only T1 ``(*S)``: inside ``mask`` (default: the voxels above 5 % of the
    maximum, holes filled per slice: a skull-stripped image's brain, dark CSF included), three intensity
    classes by two Otsu thresholds (dark CSF, GM, bright WM). ``(*S)`` uint8.

    For anatomies with no tissue map; on a T1 only (T2 and PD invert the order).
    """
    import SimpleITK as sitk

    img = np.asarray(image, np.float32)
    mask = _fill_slices(img > 0.05 * float(img.max())) if mask is None else mask.astype(bool)
    out = np.zeros(img.shape, np.uint8)
    if mask.sum() < 16:
        return out
    f = sitk.OtsuMultipleThresholdsImageFilter()
    f.SetNumberOfThresholds(2)
    f.SetNumberOfHistogramBins(128)
    f.Execute(sitk.GetImageFromArray(img[mask][None]))
    t1, t2 = sorted(f.GetThresholds())
    out[mask] = np.where(img[mask] <= t1, CSF, np.where(img[mask] <= t2, GM, WM))
    return out


def synthesis_labels(soi: torch.Tensor, tissue: torch.Tensor | None) -> torch.Tensor:
    """The label map synthesis draws from: ``(*S)`` int64 from SoI ``(K, *S)`` and tissue ``(*S)``.

    0 = background, 1..K = the SoI channels (> 0.5, the largest where they overlap), K + c = tissue class
    ``c`` (`TISSUE_CLASSES`, c >= 1) elsewhere. Without ``tissue``, only the structures and background.
    """
    k = soi.shape[0]
    out = torch.zeros(soi.shape[1:], dtype=torch.int64) if tissue is None else \
        torch.where(tissue > 0, tissue.long() + k, torch.zeros((), dtype=torch.int64))
    if k:
        value, index = soi.max(0)
        out = torch.where(value > 0.5, index + 1, out)
    return out


def n_synthesis_labels(k: int) -> int:
    """Number of labels of `synthesis_labels` with ``k`` SoI channels (background included)."""
    return 1 + k + len(TISSUE_CLASSES) - 1


# --------------------------------------------------------------------------
# Drawing an image (torch, on the network grid)
# --------------------------------------------------------------------------


def gaussian_blur(image: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(C, *S)`` with ``sigma`` voxels per array axis (``len(S)`` values; 0 = none).

    Edges are replicated (a blurred border does not darken).
    """
    d = image.dim() - 1
    if len(sigma) != d:
        raise ValueError(f"gaussian_blur() 'sigma' must have {d} values, got {len(sigma)}")
    out = image[None]
    for axis, s in enumerate(sigma):
        if s <= 0:
            continue
        r = max(1, int(np.ceil(3.0 * s)))
        x = torch.arange(-r, r + 1, dtype=image.dtype)
        k = torch.exp(-0.5 * (x / s) ** 2)
        k = k / k.sum()
        c = out.shape[1]
        shape = [1] * d
        shape[axis] = k.numel()
        weight = k.reshape(1, 1, *shape).repeat(c, 1, *([1] * d))
        pad = [0, 0] * d
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = r  # F.pad lists the last axis first
        conv = F.conv2d if d == 2 else F.conv3d
        out = conv(F.pad(out, pad, mode="replicate"), weight, groups=c)
    return out[0]


def draw_label_intensities(rng: np.random.Generator, n_labels: int, std_max: float,
                           background_max: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Random ``(means, stds)``, each ``(n_labels,)``: means uniform in [0, 1], stds uniform in [0, std_max];
    label 0 (background) gets a mean uniform in [0, background_max] and no spread when that is 0."""
    means = rng.uniform(0.0, 1.0, n_labels)
    stds = rng.uniform(0.0, std_max, n_labels)
    means[0] *= background_max
    if background_max <= 0:
        stds[0] = 0.0
    return means, stds


def render_labels(labels: torch.Tensor, means: np.ndarray, stds: np.ndarray, sampling: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """An image ``(1, *S')`` from a label map ``(*S)`` (int64, values < ``len(means)``).

    The means (and stds) are looked up on the label map's own grid, then resampled at ``sampling``
    ``(1, *S', D)`` (normalised [-1, 1] coordinates of the label map, ``grid_sample`` order, bilinear, zero
    outside, ``align_corners=True``, exactly as `istn.data.augment.sample_view` resamples an anatomy):
    inside a label the image is that label's mean, at a boundary the mix of its neighbours (partial volume
    at the network's resolution). Within-label spread: ``std * N(0, 1)`` per output voxel from
    ``generator`` (none when all stds are 0).
    """
    lut = torch.from_numpy(np.stack([means, stds]).astype(np.float32))  # (2, L)
    maps = lut[:, labels]  # (2, *S)
    out = F.grid_sample(maps[None], sampling, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    image, spread = out[:1], out[1:]
    if float(np.max(stds)) > 0:
        image = image + spread * torch.randn(image.shape, generator=generator)
    return image


def synthesize(labels: torch.Tensor, sampling: torch.Tensor, spacing: Sequence[float], rng: np.random.Generator,
               std_max: float = 0.05, smooth_mm: float = 1.0, background_max: float = 0.0) -> torch.Tensor:
    """A synthetic view ``(1, *S')`` of a label map ``(*S)`` (`synthesis_labels`) at ``sampling`` ``(1, *S', D)``.

    Draws one mean and std per label (`draw_label_intensities`), renders them (`render_labels`), smooths
    by a Gaussian of ``smooth_mm`` (partial volume; ``spacing``: the output grid's mm per ARRAY axis), and
    maps the engine's intensity window (0.5 percentile, 99.5 percentile of the foreground,
    `istn.data.images.intensity_window`) to [0, 1], so a synthetic view is as bright as a real one.
    """
    n = int(labels.max()) + 1
    means, stds = draw_label_intensities(rng, max(n, 1), std_max, background_max)
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    image = render_labels(labels, means, stds, sampling, g)
    if smooth_mm > 0:
        image = gaussian_blur(image, [smooth_mm / s for s in spacing])
    arr = image.numpy()
    if float(arr.max()) > float(arr.min()):
        a, b = intensity_window(arr, 0.5, 99.5, foreground=True)
        image = ((image - a) / (b - a)).clamp(0.0, 1.0)
    return image


def crop_field_of_view(image: torch.Tensor, coordinate: torch.Tensor, keep_from: float) -> torch.Tensor:
    """A cropped scan: ``image`` ``(C, *S)`` set to 0 (the intensity window's low end) where
    ``coordinate`` ``(*S)`` (mm along the crop axis, signed so that the kept end is positive) is below
    ``keep_from``; unchanged elsewhere."""
    return torch.where((coordinate >= keep_from)[None], image, torch.zeros((), dtype=image.dtype))
