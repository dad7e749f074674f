"""A registration's input images, prepared once per image and reused by every stage.

Each stage of a registration (affine, then B-spline) needs, per image, the
intensity window and the foreground centre (both from Otsu's threshold, see
`istn.data`) and a copy to resample onto the model's internal grid. They
depend on the image and on the model's grid spacing and intensity settings
only, so `prepare_image` computes them once and keeps the last few in a small
cache keyed on the image object: the B-spline stage, and a second Apply on the
same images, reuse the affine stage's.

Anti-aliasing. A 1 mm image sampled linearly at the 4 mm internal grid's
points keeps 1 mm detail at random phases (aliasing), which the network never
saw: it was trained on 2 mm images resampled to the grid. An image much finer
than the grid is therefore first block-averaged (`shrink_factors`) to about
half the grid's spacing: 2x2x2 1 mm voxels -> 2 mm, a box filter whose variance
(0.25 mm^2 per axis) equals that of the Gaussian (sigma 0.5 mm) with which the
training images were made from their 1 mm sources (`istn.braindata`). One pass
over the voxels (~25 ms at 256^3), and every later step works on 8x fewer.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk

from .data import (THIN_FILL_RADIUS, bias_corrected, despike, detached_objects, fill_floor, foreground_centre,
                   hot_voxel_bound, intensity_window, otsu_threshold, statistics_sample, thin_bright_bound)
from .errors import InputError
from .geometry import Grid, stored_lps
from .io import check_image
from .metrics import few_whole_values

# False: resample the input as it is, however fine (the engine before anti-aliasing; for comparisons).
ANTIALIAS = True
CACHE_SIZE = 4  # images kept: a pair, and the pair of the previous call


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """An input image ready for the network grid: what every stage of a registration needs of it."""

    image: sitk.Image  # float32 working copy: the input, or its block average when much finer than the grid, a fill
    # value outside the field of view raised to the image's lowest (`istn.data.fill_floor`), hot pixels replaced by
    # their neighbourhood's median (`istn.data.despike`), thin bright structures filled from their neighbourhood,
    # capped at the tissue's top (`istn.data.thin_bright_bound`), objects apart from the head erased
    # (`istn.data.detached_objects`), divided by its bias when asked (`istn.data.bias_corrected`) (None only in the
    # cache, for the input itself)
    window: tuple[float, float]  # intensity window (`istn.data.intensity_window`) of the working copy
    centre: np.ndarray  # (D,) world mm: foreground centre (`istn.data.foreground_centre`) of the working copy
    shrink: tuple[int, ...]  # voxels averaged per axis, ITK order (1: the input itself)
    # the input's values where it holds a handful of whole numbers (`istn.metrics.few_whole_values`: a label map or
    # a mask given for an image), else None; found on the input, as a working copy averaged from it holds many
    values: np.ndarray | None = None
    # the fraction of the foreground erased as objects apart from the head (`istn.data.detached_objects`): 0 for none
    detached: float = 0.0


def shrink_factors(spacing: tuple[float, ...], grid_spacing: float) -> tuple[int, ...]:
    """Per axis, the whole number of voxels to average so that the copy's spacing is about half ``grid_spacing``.

    ``round(grid_spacing / (2 * spacing))``, at least 1: 1 mm -> 2 (a 2 mm
    copy) for the 4 mm brain models; 2 mm inputs, the training resolution, are
    used as they are.
    """
    if not ANTIALIAS:
        return (1,) * len(spacing)
    return tuple(max(1, int(round(grid_spacing / (2.0 * s)))) for s in spacing)


def prepare_image(image: sitk.Image, grid_spacing: float, intensity: tuple[float, float] = (0.5, 99.5),
                  foreground: bool = False, centre_on_foreground: bool = True, what: str = "image",
                  bias_correct: bool = False) -> PreparedImage:
    """The working copy, window and centre of ``image`` for a model of ``grid_spacing`` mm (cached).

    ``image`` is checked first (`istn.io.check_image`, whose `InputError`
    names it ``what``), once: a cached image was checked when it was prepared.

    ``intensity``/``foreground``: the model's percentiles and whether the upper
    one is over the foreground (`istn.data.intensity_window`);
    ``centre_on_foreground``: whether the centre is the foreground's
    (`istn.data.foreground_centre`) or the image's. Otsu's threshold is
    computed once for both. ``bias_correct``: divide the working copy by its
    intensity bias (`istn.data.bias_corrected`, N4) first.

    The cache holds the last `CACHE_SIZE` images by object identity (a weak
    reference: a freed image's entry, working copy included, is dropped with
    it; an image is never kept alive by the cache) and is checked against
    the geometry and a sparse sample of the voxels, so an image changed in
    place since is prepared again. Thread-safe.
    """
    if not isinstance(image, sitk.Image):
        raise InputError(f"the {what} must be a SimpleITK image (sitk.ReadImage(path), or istn.io.read_image(path) "
                         f"for DICOM folders too), got {type(image).__name__}")
    key = (float(grid_spacing), tuple(float(v) for v in intensity), bool(foreground), bool(centre_on_foreground),
           bool(bias_correct))
    stamp = _fingerprint(image)
    with _LOCK:
        for i, entry in enumerate(_CACHE):
            if entry[0]() is image and entry[1] == key and entry[2] == stamp:
                _CACHE.append(_CACHE.pop(i))  # most recently used last (by position: sitk images compare voxelwise)
                kept = entry[3]
                return kept if kept.image is not None else replace(kept, image=image)
    prepared = _prepare(check_image(image, what), grid_spacing, intensity, foreground, centre_on_foreground, what,
                        bias_correct)
    # a working copy that is the input itself is not held: the entry must not keep the image it is keyed on alive
    kept = replace(prepared, image=None) if prepared.image is image else prepared
    with _LOCK:
        _CACHE.append((weakref.ref(image, _forget_freed), key, stamp, kept))
        del _CACHE[:-CACHE_SIZE]
    return prepared


def clear_cache() -> None:
    """Forget every prepared image."""
    with _LOCK:
        _CACHE.clear()


def _forget_freed(_ref: weakref.ref) -> None:
    """Drop the entries of images freed since: their working copies go with them, not at the next call."""
    with _LOCK:
        _CACHE[:] = [e for e in _CACHE if e[0]() is not None]


_CACHE: list[tuple[weakref.ref, tuple, tuple, PreparedImage]] = []
_LOCK = threading.RLock()  # re-entrant: an image freed while the cache is edited calls _forget_freed there


def _prepare(image: sitk.Image, grid_spacing: float, intensity: tuple[float, float], foreground: bool,
             centre_on_foreground: bool, what: str = "image", bias_correct: bool = False) -> PreparedImage:
    extent = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    if min(extent) < 2 * grid_spacing:  # a head of 4 mm: spacing in metres, or a header gone wrong
        raise InputError(f"the {what}'s field of view is {' x '.join(f'{e:.3g}' for e in extent)} mm, less than two "
                         f"of the model's {grid_spacing:g} mm grid voxels across: is its voxel spacing "
                         f"({', '.join(f'{s:g}' for s in image.GetSpacing())}) in mm?")
    # Block averages start at the first stored voxel and drop the leftover ones, the statistics of a large image
    # sample every n-th voxel from the first, and resampling counts one edge face as inside: on the image as stored
    # LPS (2D: x, y) all fall on the same voxels however its file orders them (193 voxels stored R->L or L->R: the
    # same 96 blocks; a 2D image of 127 x 125 pixels stored flipped moved the result by 2.3 mm)
    image = stored_lps(image)
    floor = fill_floor(sitk.GetArrayViewFromImage(image))
    if floor is not None:  # a fill outside the acquired field of view, raised before a block average blurs its edge
        image = sitk.Clamp(image, lowerBound=floor)
    hot = hot_voxel_bound(sitk.GetArrayViewFromImage(image))
    # judged before the hot pixels go: despiking takes the thinnest stretches of a vessel, and what it leaves is too
    # little to tell from the tissue's own top, yet bright enough to set the window (Colin27 with vessels, 0.808)
    bright = thin_bright_bound(sitk.GetArrayViewFromImage(image))
    if hot is not None:  # hot pixels, replaced before a block average spreads each over a grid voxel's worth
        spotless = despike(sitk.GetArrayViewFromImage(image), *hot)
        image = Grid.from_image(image).image_from_array(spotless)
        if bright is not None and not float(spotless.max()) > hot[0]:
            bright = None  # the despiking took them all (scattered hot pixels): the tissue's top keeps its voxels
    if bright is not None:  # thin bright structures (vessels): filled from their neighbourhood, capped at the tissue's
        # top, before the block average (the cap: where the neighbourhood's median is itself a vessel)
        filled = despike(sitk.GetArrayViewFromImage(image), bright, 0.0, THIN_FILL_RADIUS)
        image = sitk.Clamp(Grid.from_image(image).image_from_array(filled), upperBound=bright)
    shrink = shrink_factors(image.GetSpacing(), grid_spacing)
    # on the input as stored LPS: the same values however its file orders the voxels
    values = few_whole_values(image)
    work = sitk.BinShrink(image, list(shrink)) if max(shrink) > 1 else image
    array = sitk.GetArrayViewFromImage(work)
    threshold = otsu_threshold(statistics_sample(array)[0])
    mask = array > threshold
    apart = detached_objects(mask, work.GetSpacing()[::-1]) if work.GetDimension() == 3 else None
    detached = 0.0
    if apart is not None:  # a phantom or marker block beside the head: erased to the background, on a copy
        detached = float((mask & apart).sum()) / max(1, int(mask.sum()))
        erased = sitk.GetArrayFromImage(work)
        erased[apart] = np.percentile(statistics_sample(array)[0], intensity[0])
        work = Grid.from_image(work).image_from_array(erased)
    if bias_correct:  # on the copy the network reads, objects apart from the head already erased
        work = bias_corrected(work)
    if apart is not None or bias_correct:  # the statistics of the copy as it now is
        array = sitk.GetArrayViewFromImage(work)
        threshold = otsu_threshold(statistics_sample(array)[0])
    window = intensity_window(array, *intensity, foreground=foreground, threshold=threshold)
    centre = foreground_centre(work, threshold=threshold) if centre_on_foreground else Grid.from_image(image).centre
    return PreparedImage(work, window, np.asarray(centre, dtype=float), shrink, values, detached)


def _fingerprint(image: sitk.Image) -> tuple:
    """Geometry, pixel type and a sparse sample of the voxels (~4k values): cheap, and changes with the content."""
    flat = sitk.GetArrayViewFromImage(image).reshape(-1)
    sample = flat[:: max(1, flat.size // 4096)]
    return (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection(), image.GetPixelID(),
            hash(sample.tobytes()))
