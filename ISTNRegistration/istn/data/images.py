"""Images on the network grid: intensity windows, SoI encodings, the internal grid, resampling to tensors."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..config import ModelConfig
from ..errors import InputError
from ..geometry import Grid, resample_to_grid


# --------------------------------------------------------------------------
# Intensities and SoI encodings (numpy)
# --------------------------------------------------------------------------


# Statistics of larger images (window, foreground centre) use a regular subsample of about this many voxels:
# a 256^3 volume then costs ~0.1 s instead of ~1 s per image, and its percentiles move by far less than noise.
STATS_VOXELS = 2**21


def statistics_sample(array: np.ndarray) -> tuple[np.ndarray, int]:
    """``(view, step)``: every ``step``-th voxel along each axis, ``step`` = 1 for images up to `STATS_VOXELS`."""
    step = max(1, int(np.ceil((array.size / STATS_VOXELS) ** (1.0 / array.ndim))))
    return (array if step == 1 else array[(slice(None, None, step),) * array.ndim]), step


def intensity_window(array: np.ndarray, low: float = 0.5, high: float = 99.5, foreground: bool = False,
                     threshold: float | None = None) -> tuple[float, float]:
    """Percentile window ``(a, b)`` of an image; the engine maps it to ``[0, 1]``.

    ``foreground=True`` takes the upper percentile over the foreground voxels
    only (above Otsu's threshold, `otsu_threshold`): the brightness the network
    sees then does not change when the field of view grows (padding, a neck,
    an oblique acquisition's larger box), which shifts percentiles of all voxels.
    ``threshold``: Otsu's threshold of the same image when already known.
    """
    arr, _ = statistics_sample(np.asarray(array))
    a, b = np.percentile(arr, [low, high])
    if foreground:
        fg = arr[arr > (otsu_threshold(arr) if threshold is None else threshold)]
        if fg.size >= 16:
            b = np.percentile(fg, high)
    if b <= a:  # very sparse images (landmarks): fall back to the full range
        a, b = float(np.min(array)), float(np.max(array))
    if b <= a:
        raise InputError("image is constant: nothing to register")
    return float(a), float(b)


#: `fill_floor`'s gap below the rest of an image with negative values, in widths of the rest's 0.5th-99.5th
#: percentile range: twice, well clear of a plateau that is the image's own background.
FILL_GAP = 2.0


def fill_floor(array: np.ndarray) -> float | None:
    """The image's own lowest value, where its minimum is a fill value beneath its intensities; else None.

    Resampling tools fill what lies outside the acquired field of view with a constant: -1024 (CT's air) in an
    oblique reslice's corners, int16's -32768, -1 for "no data". Left as it is, the fill is the window's low end
    (the head's background then reads mid-grey) and Otsu splits it from everything else (the "foreground" is the
    whole acquired box): 1 % of a sample head's voxels at -1024 took its registration from Dice 0.869 to 0.693,
    worse than none (0.835). The minimum is taken for a fill when it is negative and lies

    - beneath every other value while those are 0 or more (MR magnitudes are not negative: a negative plateau
      beneath them was put there), or
    - further below every other value than twice the width of their 0.5th-99.5th percentile range (`FILL_GAP`:
      far below anything an image with negative values holds, in its units: -32768 beneath a z-scored head; CT's
      -3024 outside the scanned circle, raised to the air's lowest value).

    A 0 or positive minimum is never a fill: it is the background (a skull-stripped head's, whose darkest brain
    voxel may lie well above it; a mask's). Judged on a
    regular subsample (`statistics_sample`); the caller raises the image to the returned floor (`sitk.Clamp`),
    as if the fill had been the image's lowest value.
    """
    arr = statistics_sample(np.asarray(array))[0]
    low = arr.min()
    if not low < 0:  # never a fill (below): the percentiles are not needed
        return None
    rest = arr[arr > low]
    if rest.size < 16:  # a constant image, or a mask: nothing to judge the rest by
        return None
    floor = float(rest.min())
    p_lo, p_hi = (float(v) for v in np.percentile(rest, (0.5, 99.5)))
    width, gap = p_hi - p_lo, floor - float(low)
    if width > 0 and (floor >= 0.0 or gap > FILL_GAP * width):  # (the minimum is negative: above)
        return floor
    return None


#: A voxel above an image's 99.5th percentile by more than this many widths of its 0.5th-99.5th percentile range is a
#: hot pixel (`hot_voxel_bound`). The brightest voxel of the brain data, the sample pair, Colin27 and the MRIcron
#: human templates lies at most 0.52 widths above (avg152 T2); MRIcron's inia19 macaque template has such voxels
#: (2.3 widths).
HOT_WIDTHS = 1.0


def hot_voxel_bound(array: np.ndarray) -> tuple[float, float] | None:
    """``(bound, width)``: voxels above ``bound`` may be hot (`HOT_WIDTHS`), where any is, and ``width`` is the
    image's 0.5th-99.5th percentile range; else None.

    Hot pixels, a few scattered voxels at many times the image's brightness (a reconstruction or conversion
    artefact, a quantitative map divided by almost nothing), each became a 2 mm block as bright as white matter or
    brighter once block-averaged onto the network's grid: 0.1 % of a 1 mm head's voxels at 10x its maximum cost
    0.011-0.029 Dice, with no warning (intensity audit, session 37). `despike` replaces them.
    """
    arr = statistics_sample(np.asarray(array))[0]
    lo, hi = (float(v) for v in np.percentile(arr, (0.5, 99.5)))
    bound = hi + HOT_WIDTHS * (hi - lo)
    return (bound, hi - lo) if hi > lo and float(np.max(array)) > bound else None


#: `despike`'s voxels per gather: 16k x 125 neighbours x 3 indices is ~50 MB.
DESPIKE_CHUNK = 16384


def despike(array: np.ndarray, bound: float, width: float, radius: int = 1) -> np.ndarray:
    """``array`` (2D or 3D) with each hot voxel replaced by the median of its neighbourhood ((2 ``radius`` + 1)^d
    voxels: itself and its neighbours, clipped at the edges): a copy. Hot: above ``bound``, and above that median by
    more than ``width`` (a spike, not the top of a smooth bright peak; other hot voxels count in the median, so a
    bright cluster keeps its core)."""
    out = np.array(array, copy=True)
    hot = np.argwhere(out > bound)  # (K, d)
    span = range(-radius, radius + 1)
    steps = np.stack(np.meshgrid(*[span] * out.ndim, indexing="ij"), axis=-1).reshape(-1, out.ndim)
    top = np.asarray(out.shape) - 1
    for start in range(0, len(hot), DESPIKE_CHUNK):  # (chunk, (2r+1)^d, d) indices at a time: bounded memory
        part = hot[start:start + DESPIKE_CHUNK]
        near = np.clip(part[:, None, :] + steps[None], 0, top)
        median = np.median(array[tuple(near.transpose(2, 0, 1))], axis=1)
        spike = out[tuple(part.T)] - median > width
        out[tuple(part[spike].T)] = median[spike]
    return out


#: The foreground's 99.5th percentile (the window's top) lying more than this many times as far above the image's
#: 0.5th percentile as that of the image's median (`thin_bright_bound`) is set by thin bright structures. The brain
#: data, the sample pair, Colin27 and the MRIcron templates lie at most 1.13 times as far (the ITK subject's whole
#: head; gamma 0.5-2, 2x shading and a bright scalp-fat shell at most 1.10); tubes of 1-3 % of a head at 2.5x its
#: 99th percentile (contrast-filled vessels), or 1 % of its voxels at 2x its maximum (salt), 2.08-2.87 times.
THIN_BRIGHT_RATIO = 1.5
#: ... and each voxel above the tissue's top is replaced by the median of its (2 r + 1)^d neighbourhood, r this.
THIN_FILL_RADIUS = 2


def thin_bright_bound(array: np.ndarray) -> float | None:
    """The top of an image's tissue, where thin bright structures rise far above it (`THIN_BRIGHT_RATIO`); else None.

    Contrast-filled vessels (tubes a voxel or two wide, 1-3 % of a head at 2.5x the brightest tissue) set the
    window's top: the brain read dim, and each tube, averaged and interpolated onto the network's grid, became a
    bright spot among the structures; at 3 % of a 1 mm head Otsu's foreground was the tubes alone. Colin27 1 mm
    placed in a scanner position registered at Dice 0.737 (1 %) and 0.666 (3 %) against 0.849 clean, with no warning
    (intensity audit, sessions 37 and 39). A median of 3 along each axis in turn (`_median3`) does not keep a
    structure under two voxels wide: the 99.5th percentile of that median over its own Otsu foreground is the
    tissue's top. Before the image is averaged, the caller replaces each voxel above it by the median of its
    neighbourhood (`despike` with `THIN_FILL_RADIUS`: 5^3 voxels, which a tube 3 voxels wide does not fill), capped
    at it: 0.850 and 0.850 (the tubes saturated at the top instead, as the window would have: 0.838 and 0.822; the
    tubes left as they were streaks as bright as white matter across the structures). A bright object thicker than
    that (a marker, the scalp's fat) keeps its median, and is left to `detached_objects` and the window. Judged on a
    regular subsample (`statistics_sample`, every 2nd-3rd voxel of a 1 mm head: tubes up to ~4 mm wide).
    """
    arr = statistics_sample(np.asarray(array))[0]
    smooth = _median3(arr)
    # the median's threshold (tubes that outnumber the rest's top do not set it), from every 2nd voxel of a large
    # sample: a histogram's statistic, and 8x cheaper
    coarse = smooth if smooth.size <= 2**18 else smooth[(slice(None, None, 2),) * smooth.ndim]
    fg = arr > otsu_threshold(coarse)
    if int(fg.sum()) < 16:
        return None
    low = float(np.percentile(arr, 0.5))
    top, level = float(np.percentile(arr[fg], 99.5)), float(np.percentile(smooth[fg], 99.5))
    # (a median at the image's low end: a sparse image, no tissue to saturate to)
    return level if level > low and top - low > THIN_BRIGHT_RATIO * (level - low) else None


def _median3(array: np.ndarray) -> np.ndarray:
    """The median of each voxel and its two neighbours along each axis in turn (edges repeated), float32: a separable
    stand-in for the 3^d median (~20x cheaper: ~15 ms for a 1 mm head's subsample), which a structure one or two
    voxels wide across any axis does not survive."""
    out = np.array(array, dtype=np.float32)
    before, after, low = np.empty_like(out), np.empty_like(out), np.empty_like(out)
    for axis, n in enumerate(out.shape):
        if n < 3:
            continue
        o, b, a = (np.moveaxis(x, axis, 0) for x in (out, before, after))  # views: the neighbours along the axis
        b[1:], b[0], a[:-1], a[-1] = o[:-1], o[0], o[1:], o[-1]
        np.minimum(before, after, out=low)
        np.maximum(before, after, out=before)
        np.minimum(before, out, out=before)
        np.maximum(low, before, out=out)  # median of three = max(min(b, a), min(max(b, a), o))
    return out


#: Foreground apart from the head by more than about this (mm, blocks of it that touch join) is another object.
DETACHED_BLOCK_MM = 8.0
#: ... erased from the working copy when it holds at least this fraction of the foreground: a phantom, a bottle, a
#: marker block beside the head, bright enough to pass Otsu's threshold, set the window's top (the head read
#: dim) and pulled the grid's centre off the head: a 70 ml object at 3x the head's maximum in a corner of the field
#: of view took a 1 mm head from Dice 0.862 to 0 (intensity audit, session 37). Specks of noise and a vitamin E
#: capsule stay, and the brain data's heads are one object at this scale.
DETACHED_FRACTION = 0.005


def detached_objects(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray | None:
    """Where ``mask`` (a 3D foreground, array order, ``spacing`` mm in that order) holds objects apart from the
    largest one (the head) by more than `DETACHED_BLOCK_MM`, each at least `DETACHED_FRACTION` of the foreground:
    the boolean mask of their blocks (foreground and its fringe), else None. On a grid of such blocks the head is
    one piece (skull and CSF are thinner than a block); 26-connected blocks join."""
    from scipy import ndimage

    f = [max(1, int(round(DETACHED_BLOCK_MM / s))) for s in spacing]
    n = [-(-size // k) for size, k in zip(mask.shape, f)]
    padded = np.zeros([a * k for a, k in zip(n, f)], bool)
    padded[tuple(slice(0, size) for size in mask.shape)] = mask
    blocks = padded.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).sum(axis=(1, 3, 5))  # foreground voxels per block
    labels, count = ndimage.label(blocks > 0, structure=np.ones((3, 3, 3), bool))
    if count < 2:
        return None
    held = np.bincount(labels.ravel(), weights=blocks.ravel())  # [0]: empty blocks
    head = 1 + int(np.argmax(held[1:]))
    others = [k for k in range(1, count + 1) if k != head and held[k] >= DETACHED_FRACTION * held[1:].sum()]
    if not others:
        return None
    out = np.isin(labels, others)
    for axis, k in enumerate(f):
        out = np.repeat(out, k, axis=axis)
    return out[tuple(slice(0, size) for size in mask.shape)]


def bias_corrected(image: sitk.Image) -> sitk.Image:
    """``image`` (float32) divided by its smooth intensity bias (N4, `sitk.N4BiasFieldCorrectionImageFilter`),
    fitted on a copy of half the resolution over Otsu's foreground, applied at the image's own.

    A raw scan's receive-coil shading (brighter near the coil, 2x across a head) is what the models saw only in
    part (training's bias fields are milder): the intensity audit's Colin27 1 mm placed in a scanner position,
    shaded 0.5x to 2x left to right, registered at Dice 0.799 (0.849 unshaded), with no warning; corrected, 0.840
    (session 38, `istn register --bias-correct`). Opt-in (`register`'s ``bias_correct``): it costs 1-4 s on a 2 mm copy.
    """
    image = sitk.Cast(image, sitk.sitkFloat32)
    half = sitk.Shrink(image, [2] * image.GetDimension()) if min(image.GetSize()) >= 32 else image
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([50, 50, 30])
    corrector.Execute(half, sitk.OtsuThreshold(half, 0, 1))
    return image / sitk.Exp(corrector.GetLogBiasFieldAsImage(image))


def normalise_intensity(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map ``window`` to ``[0, 1]`` and clip (float32)."""
    a, b = window
    return np.clip((array.astype(np.float32) - a) / (b - a), 0.0, 1.0)


def encode_soi(array: np.ndarray, kind: str, labels: Sequence[int] = ()) -> np.ndarray:
    """SoI image -> ``(K, *shape)`` float32 encoding in ``[0, 1]``.

    - ``labels``: label map -> one binary channel per value in ``labels``
      (default: one channel for "any non-zero label", i.e. a binary mask);
    - ``soft`` / ``landmarks``: soft maps and rendered landmarks, scaled by
      their maximum (one channel).
    """
    if kind == "labels":
        if not labels:
            return (array > 0).astype(np.float32)[None]
        return np.stack([(array == v).astype(np.float32) for v in labels])
    if kind in ("soft", "landmarks"):
        m = float(array.max())
        return (array.astype(np.float32) / m if m > 0 else array.astype(np.float32))[None]
    raise ValueError(f"encode_soi() 'kind' must be labels, soft or landmarks, got {kind!r}")


# --------------------------------------------------------------------------
# Network grid
# --------------------------------------------------------------------------


def foreground_centre(image: sitk.Image, threshold: float | None = None,
                      up: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """World centre ``(D,)`` (mm, LPS) of an image's foreground: the centroid of the voxels above Otsu's threshold.

    Independent of how the voxels are stored: the histogram and the centroid
    are sums over the voxels, so any axis order, flip or obliquity of the same
    content gives the same point (exactly up to `STATS_VOXELS` voxels; above,
    over a regular subsample, which a flip shifts by a voxel: the point moves by
    a fraction of a voxel). Binary (not intensity-weighted) so that a bias
    field or a bright fat layer does not pull it. Falls back to the grid centre
    when no foreground separates from the background. ``threshold``: Otsu's
    threshold of the image when already known. ``up`` (3D, unit, world): the
    head's top, for a foreground that holds more than a head (`_head_centre`);
    world superior unless the head is known to lie otherwise (a turn searched).
    """
    grid = Grid.from_image(image)
    arr, step = statistics_sample(sitk.GetArrayViewFromImage(image))
    if not float(arr.max()) > float(arr.min()):
        return grid.centre
    mask = arr > (otsu_threshold(arr) if threshold is None else threshold)
    total = int(mask.sum())
    if total == 0:
        return grid.centre
    voxel = []
    for axis in range(arr.ndim):  # per-axis marginals: cheaper than the coordinates of every voxel
        others = tuple(a for a in range(arr.ndim) if a != axis)
        counts = mask.sum(axis=others, dtype=np.int64)
        voxel.append(float((counts * np.arange(counts.size) * step).sum()) / total)
    centre = grid.voxel_to_world(np.asarray(voxel[::-1]))  # array (k, j, i) -> ITK index (i, j, k)
    return _head_centre(grid, mask, step, centre, up) if arr.ndim == 3 else centre


#: A head fits in a sphere of this radius about its foreground centre: the farthest foreground voxel of the brain
#: data's whole heads (Colin27, ICBM 2009a/c, avg152/305, the ITK subject) lies 95-131 mm from it, of Colin27 placed
#: in scanner positions (turned, scaled +-10 %) up to 142 mm. A radius is the same however the head is turned.
HEAD_RADIUS_MM = 160.0
#: Beyond `HEAD_RADIUS_MM` the foreground is more than a head (a neck and shoulders): the centre is then that of the
#: foreground within this far below its top, world superior (the training heads' foreground spans 150-174 mm down
#: from the vertex).
HEAD_SPAN_MM = 180.0


def _head_centre(grid: Grid, mask: np.ndarray, step: int, centre: np.ndarray,
                 up: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """The head's centre where the foreground holds more than a head, else ``centre`` (its centroid) unchanged.

    A head-and-neck field of view with the shoulders in it put the centroid 83 mm below the head's: the network's
    192 mm grid then held the neck and half the head, and registration ended at Dice 0 (pose audit, session 37).
    ``mask``: the foreground of a regular subsample (every ``step``-th voxel) of an image on ``grid``, array order;
    ``up``: the head's top (unit, world; LPS +z is superior, whatever the file's voxel order).
    """
    coarse = mask[::2, ::2, ::2]  # every 2nd voxel of the sample is enough to place a head (1/8 of the cost)
    world = grid.voxel_to_world(np.argwhere(coarse)[:, ::-1] * float(2 * step))  # (n, 3) mm, LPS
    if float(((world - centre) ** 2).sum(axis=1).max()) <= HEAD_RADIUS_MM ** 2:
        return centre
    height = world @ np.asarray(up, dtype=float)
    return world[height >= float(height.max()) - HEAD_SPAN_MM].mean(axis=0)


#: Otsu's histogram leaves out values beyond the 0.1st-99.9th percentile range by more than that range's width (a
#: few voxels at 1e6 in a T1 of 0-1000: a hot pixel, a marker, a converter's fill value), so they do not squeeze the
#: whole head into its first bin (the foreground was then those voxels alone, the head off the network's grid: Dice
#: 0.869 -> 0.688 on the sample pair for ONE such voxel). In an image without such voxels the range stays the full
#: one and the threshold is the same to the bit. A background that fills more than 0.1 % (CT's -3024 outside its
#: field of view) is the range's end, not an outlier.
OUTLIER_PERCENTILES = (0.1, 99.9)


def otsu_threshold(array: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximal between-class variance) of a 256-bin histogram; order-independent.

    The histogram spans the values' full range, except that values far outside the bulk of the image (by more
    than the width of its 0.1st-99.9th percentile range, `OUTLIER_PERCENTILES`) are counted in its end bins."""
    lo, hi = float(np.min(array)), float(np.max(array))
    if not hi > lo:
        return lo
    p_lo, p_hi = (float(v) for v in np.percentile(array, OUTLIER_PERCENTILES))
    width = p_hi - p_lo
    if width > 0 and (hi > p_hi + width or lo < p_lo - width):
        lo, hi = max(lo, p_lo - width), min(hi, p_hi + width)
        array = np.clip(array, lo, hi)
    try:
        hist, edges = np.histogram(array, bins=bins, range=(lo, hi))
    except ValueError:  # a narrow range far from 0 (128 grey levels at 1e7): bins finer than float32 near 1e7
        hist, edges = np.histogram(np.asarray(array, np.float64) - lo, bins=bins, range=(0.0, hi - lo))
        edges = edges + lo
    return float(edges[1:][_otsu_index(hist)])


def _otsu_index(hist: np.ndarray) -> int:
    """Index of the last histogram bin below Otsu's threshold."""
    p = hist.astype(float) / max(1, hist.sum())
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(p.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    between = np.nan_to_num(between[:-1], nan=-1.0, posinf=-1.0)
    return int(np.argmax(between))


def network_grid(image: sitk.Image | Grid, cfg: ModelConfig, centre: np.ndarray | None = None) -> Grid:
    """The model's internal grid for an image, in the PATIENT frame: world (LPS) axes, the model's size and spacing.

    The direction is the identity whatever the file's voxel order, flips or
    obliquity, so the network always sees a head as it saw heads in training
    (an image's direction matrix is used only to place its voxels in the world).
    The grid is centred on ``centre`` (world mm), by default (``cfg.grid_centre``)
    the image's foreground centre (`foreground_centre`), so a neck, padding or
    an off-centre field of view does not push the anatomy towards the grid's
    edge, or the image's centre; a bare `Grid` (no voxels) on its own centre.
    """
    if centre is not None:
        c = np.asarray(centre, dtype=float)
    elif isinstance(image, Grid) or not cfg.centre_on_foreground:
        c = (image if isinstance(image, Grid) else Grid.from_image(image)).centre
    else:
        c = foreground_centre(image)
    return Grid.centred_at(c, cfg.grid_size, cfg.grid_spacing)


def image_to_tensor(
    image: sitk.Image,
    grid: Grid,
    window: tuple[float, float] | None,
    transform: sitk.Transform | None = None,
) -> torch.Tensor:
    """Resample ``image`` onto ``grid`` (through ``transform``) and normalise: ``(1, 1, *S)`` float32.

    Outside the image the grid gets the window's low end (0 after normalisation,
    as training's zero padding): a raw 0 would be mid-grey for a CT-like -1000
    background or any offset intensity range.
    """
    default = float(window[0]) if window is not None else 0.0
    arr = sitk.GetArrayFromImage(resample_to_grid(image, grid, transform, default=default))
    if window is not None:
        arr = normalise_intensity(arr, window)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]


def soi_to_tensor(soi: sitk.Image, grid: Grid, kind: str, labels: Sequence[int] = (),
                  transform: sitk.Transform | None = None) -> torch.Tensor:
    """Encode an SoI image on its own grid, then resample each channel linearly onto ``grid`` (through
    ``transform``, grid points -> SoI points, as `image_to_tensor`): ``(1, K, *S)``."""
    enc = encode_soi(sitk.GetArrayFromImage(soi), kind, labels)
    channels = []
    for c in enc:
        img = sitk.GetImageFromArray(c)
        img.CopyInformation(soi)
        channels.append(sitk.GetArrayFromImage(resample_to_grid(img, grid, transform)))
    return torch.from_numpy(np.stack(channels).astype(np.float32))[None]
