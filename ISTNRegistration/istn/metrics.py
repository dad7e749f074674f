"""Evaluation metrics in physical units: Dice, surface distances (mm), folding.

ASD here is the average symmetric SURFACE distance: the mean, over the
boundary voxels of both masks, of the distance (mm) to the other mask's
boundary. (The 2019 release reported ITK's average Hausdorff distance over all
foreground voxels under that name; it is not the same quantity.) HD95 is the
larger of the two directed 95th-percentile surface distances.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .geometry import Grid

# A label map has few values; one of many values (more than MANY_LABELS) is told from an intensity image by its
# edges: of the foreground voxels that differ from a face neighbour, how many are in-between voxels (equal to
# none of their neighbours and between the lowest and highest of them), as an image's anti-aliased edges, gradients
# and noise are. Measured (benchmarks/label_or_intensity.py): intensity images 0.24 (a noise-free Gaussian blob of
# 200 levels) to 0.96 (T1s as float, int16 or 8-bit; a noisy CT phantom 0.61; synth2d's flat 8-bit shapes
# 0.27-0.63); label maps at most 0.05: a 2-3 mm thick 100-label cortical ribbon through nearest neighbour at 2-6 mm
# voxels, where it breaks up into lone voxels (lying in background, not between their neighbours' values), labels
# in order or shuffled; 0.001 for the brain label maps and 0 for a 136-label parcellation at 1 mm, rotated or at
# 2.5 mm. (Session 32's coherence and lone-voxel fractions took such a ribbon for intensities: its lone voxels are
# 45 % of it at 6 mm, more than a flat image's.)
MANY_LABELS = 50
MAX_IN_BETWEEN_EDGES = 0.1  # about halfway (by ratio) between the two kinds
# Where both kinds were seen (a label audit, synthetic images): a 1000-parcel cortical ribbon at 4 mm 0.12, a
# 60-level T1 taken to 1 mm 0.126, noise-free CT 0.13: a caller choosing for the user says the choice is unclear
UNCLEAR_IN_BETWEEN_EDGES = (0.05, 0.2)


def few_whole_values(image: sitk.Image) -> np.ndarray | None:
    """The sorted values of an image that holds at most `MANY_LABELS` whole-number values besides its background
    (a label map or a mask), else None (an image of intensities). A real image has hundreds of values even in a
    sample of a few thousand voxels: a 65k-voxel sample clears it (1 ms at 256^3); only a few-valued one is
    looked at further (a sample of 2^21 voxels, 8 ms)."""
    array = sitk.GetArrayViewFromImage(image)
    values = np.zeros(0)
    for voxels in (2**16, 2**21):
        step = max(1, int(np.ceil((array.size / voxels) ** (1.0 / array.ndim))))
        values = np.unique(array[(slice(None, None, step),) * array.ndim])
        if len(values) > MANY_LABELS + 1:
            return None
    return values if len(values) and np.all(values == np.round(values)) else None


def looks_like_intensities(image: sitk.Image) -> bool:
    """Many distinct values, and edges of in-between values (`in_between_edge_fraction`): an image of
    intensities, not a label map."""
    score = intensity_score(image)
    return score is not None and score > MAX_IN_BETWEEN_EDGES


def intensity_score(image: sitk.Image, unique: tuple[np.ndarray, np.ndarray] | None = None) -> float | None:
    """`in_between_edge_fraction` of an image of more than `MANY_LABELS` values (None: fewer, a label map).
    ``unique``: ``np.unique(voxels, return_counts=True)`` where the caller has it already (a sort of every voxel).

    The background is the most common value, 0 or not (CT's air at -1000 is no region of labels)."""
    a = sitk.GetArrayViewFromImage(image)
    values, counts = unique if unique is not None else np.unique(a, return_counts=True)
    if len(values) - 1 <= MANY_LABELS:
        return None
    return in_between_edge_fraction(a, values[np.argmax(counts)])


def in_between_edge_fraction(a: np.ndarray, background, slab: int = 32) -> float:
    """Of the voxels of ``a`` other than ``background`` that differ from a face neighbour (its edges), the fraction
    that equal none of their (up to ``2 a.ndim``) face neighbours and lie strictly between the lowest and the
    highest of them: an image's anti-aliased edges, gradients and noise; rare in a label map, whose edges are
    steps. Computed ``slab`` slices (first axis) at a time, so that a 512^3 image needs a few slabs' memory, not a
    few copies of itself. 0 without edges."""
    if a.size == 0:
        return 0.0
    a = _without_repeated_slices(a)
    between = edges = 0
    for start in range(0, max(a.shape[0], 1), slab):
        lo_pad, stop = min(start, 1), min(start + slab, a.shape[0])
        block = a[start - lo_pad:min(stop + 1, a.shape[0])]  # the slab and the slices beside it
        inner = slice(lo_pad, lo_pad + stop - start)
        edge, in_between = (m[inner] for m in _edges(block))
        fg = block[inner] != background
        between += np.count_nonzero(in_between & fg)
        edges += np.count_nonzero(edge & fg)
    return float(between / max(edges, 1))


def _without_repeated_slices(a: np.ndarray) -> np.ndarray:
    """``a`` without each slice (along every axis) that equals the one before it: an image upsampled by nearest
    neighbour (a thick-slice series resliced, 2 mm taken to 1 mm) has no voxel unequal to all its neighbours, yet
    it is the image it was (a label audit: a T1 with 3958 values, slices doubled, read as labels). ``a`` itself
    when no slice repeats (a label map's rarely do, and dropping them would not change what it is)."""
    keep = []
    for axis in range(a.ndim):
        moved = np.moveaxis(a, axis, 0)
        same = np.array([np.array_equal(moved[k], moved[k - 1]) for k in range(1, moved.shape[0])], dtype=bool)
        kept = np.concatenate([[True], ~same])
        # an upsampling (a thick-slice series resliced, 5x and more included) leaves an image of its own: fewer
        # than 16 slices left are a label map of blocks (a small grid parcellation), each of which would become
        # one "lone" voxel (review: 216 blocks read as intensities). A larger grid of blocks is still read as
        # intensities (the price of reading resliced T1s right)
        if kept.sum() < 16:
            kept[:] = True
        keep.append(kept)
    if all(k.all() for k in keep):
        return a
    return a[np.ix_(*keep)]


def _edges(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where a voxel of ``a`` differs from one of its face neighbours, and where it equals none of them and lies
    strictly between their lowest and highest (voxels at the array's faces: among the neighbours there are)."""
    lone, edge = np.ones(a.shape, dtype=bool), np.zeros(a.shape, dtype=bool)
    low, high = a.copy(), a.copy()  # the neighbours' lowest and highest so far (the voxel itself before any)
    for axis in range(a.ndim):
        n = a.shape[axis]
        lo, hi = [slice(None)] * a.ndim, [slice(None)] * a.ndim
        lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
        for here, there in ((tuple(lo), tuple(hi)), (tuple(hi), tuple(lo))):  # each voxel against k + 1, k - 1
            differs = a[here] != a[there]
            lone[here] &= differs
            edge[here] |= differs
            np.minimum(low[here], a[there], out=low[here])
            np.maximum(high[here], a[there], out=high[here])
    return edge, lone & (low < a) & (a < high)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    a = a if a.dtype == bool else a.astype(bool)  # no copy of a boolean mask (a 512^3 one is 128 MB)
    b = b if b.dtype == bool else b.astype(bool)
    s = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if s == 0 else float(2.0 * np.count_nonzero(a & b) / s)


def mutual_information(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, bins: int = 32) -> float:
    """Mutual information (nats) of two intensity arrays of one shape, over ``mask`` (None: everywhere).

    Intensities are expected in [0, 1] (the network's window, `istn.data.image_to_tensor`); values outside are
    clipped into the first / last of ``bins`` equal bins. 0 for an empty mask.
    """
    if mask is not None:
        a, b = a[mask], b[mask]
    if a.size == 0:
        return 0.0
    h, _, _ = np.histogram2d(np.clip(a.ravel(), 0.0, 1.0), np.clip(b.ravel(), 0.0, 1.0), bins=bins,
                             range=[[0.0, 1.0], [0.0, 1.0]])
    p = h / h.sum()
    outer = p.sum(1, keepdims=True) @ p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / outer[nz])).sum())


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from a's surface voxels to b's surface, and from b's to a's.

    ``spacing`` in ARRAY order (``Z, Y, X``). Empty masks give empty arrays.
    """
    a, b = a.astype(bool), b.astype(bool)
    sa, sb = _surface(a), _surface(b)
    if not sa.any() or not sb.any():
        return np.empty(0), np.empty(0)
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    dist_to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return dist_to_b[sa], dist_to_a[sb]


def _distance_scores(ab: np.ndarray, ba: np.ndarray) -> dict[str, float]:
    """ASD and HD95 (mm) from the two directed surface distance sets; NaN when a mask is empty."""
    if ab.size == 0:
        return {"asd": float("nan"), "hd95": float("nan")}
    return {"asd": float((ab.sum() + ba.sum()) / (ab.size + ba.size)),
            "hd95": float(max(np.percentile(ab, 95), np.percentile(ba, 95)))}


def asd(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance (mm); NaN if a mask is empty."""
    return _distance_scores(*surface_distances(a, b, spacing))["asd"]


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance (mm); NaN if a mask is empty."""
    return _distance_scores(*surface_distances(a, b, spacing))["hd95"]


def label_metrics(fixed_labels: sitk.Image, warped_labels: sitk.Image,
                  labels: Sequence[int] | None = None) -> dict[int, dict[str, float | str]]:
    """Per-label Dice, ASD (mm) and HD95 (mm) of two label maps on the same grid, and where the label is.

    ``labels`` defaults to every non-zero value present in either image. Each
    label is scored inside the bounding box of both masks, padded with
    background (so the values equal a whole-volume computation, at a fraction
    of the cost), and its surface distances are computed once for ASD and HD95.

    ``present`` says where the label was found: ``"both"``, ``"fixed"``,
    ``"moving"`` (only in one: Dice 0, distances NaN) or ``"neither"`` (all
    metrics NaN, left out of `mean_metrics`: a label that is nowhere did not
    register perfectly).
    """
    fa = sitk.GetArrayViewFromImage(fixed_labels)
    wa = sitk.GetArrayViewFromImage(warped_labels)
    if fa.shape != wa.shape:
        raise ValueError("label_metrics() images must share one grid")
    if labels is None:
        labels = sorted((set(np.unique(fa).tolist()) | set(np.unique(wa).tolist())) - {0})
    spacing = tuple(reversed(fixed_labels.GetSpacing()))
    out: dict[int, dict[str, float | str]] = {}
    for v in labels:
        a, b = fa == v, wa == v
        in_a, in_b = bool(a.any()), bool(b.any())
        if not (in_a or in_b):
            out[int(v)] = {"dice": float("nan"), "asd": float("nan"), "hd95": float("nan"), "present": "neither"}
            continue
        both = a | b
        box = tuple(slice(max(0, int(k.min()) - 1), int(k.max()) + 2) for k in np.nonzero(both))
        a, b = np.pad(a[box], 1), np.pad(b[box], 1)  # background all round, as at the volume's edge
        present = "both" if in_a and in_b else ("fixed" if in_a else "moving")
        out[int(v)] = {"dice": dice(a, b), **_distance_scores(*surface_distances(a, b, spacing)), "present": present}
    return out


def mean_metrics(per_label: dict[int, dict[str, float | str]]) -> dict[str, float]:
    """Mean over the labels present in at least one image of each metric (NaNs ignored; NaN if none is left)."""
    scored = [m for m in per_label.values() if m.get("present", "both") != "neither"]
    out = {}
    for k in ("dice", "asd", "hd95"):
        values = np.asarray([m[k] for m in scored], dtype=float)
        values = values[np.isfinite(values)]  # filtered here, so numpy never warns about an empty mean
        out[k] = float(values.mean()) if values.size else float("nan")
    return out


def jacobian_determinant(transform: sitk.Transform, reference: sitk.Image | Grid) -> np.ndarray:
    """Jacobian determinant of ``x -> transform(x)`` at the voxels of ``reference``: array ``(*shape)``.

    Derivatives by central differences in world units, honouring spacing AND
    direction (``d/dx_world = d/d_index @ inv(direction @ diag(spacing))``).
    """
    grid = reference if isinstance(reference, Grid) else Grid.from_image(reference)
    return field_jacobian_determinant(sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, grid.size, grid.origin, grid.spacing, grid.direction))


def field_jacobian_determinant(field: sitk.Image) -> np.ndarray:
    """`jacobian_determinant` of ``x -> x + u(x)`` for a displacement field ``u`` (mm, world components) already
    sampled, at its own points: array ``(*shape)``."""
    grid = Grid.from_image(field)
    u = sitk.GetArrayFromImage(field)  # (*shape, D), components in world (x, y, z) order
    d = grid.ndim
    # gradient along array axes (z, y, x) -> reorder to index axes (i, j, k)
    grads = np.stack(np.gradient(u, axis=tuple(range(d))), axis=-1)[..., ::-1]  # (*shape, D comp, D index)
    to_world = np.linalg.inv(grid.direction_matrix @ np.diag(grid.spacing))  # d index / d world
    jac = np.eye(d) + grads @ to_world
    return np.linalg.det(jac)


def jacobian_statistics(jacobian: np.ndarray) -> dict[str, float]:
    """A Jacobian determinant map in numbers: ``min``, ``p1``, ``median``, ``p99``, ``max`` and the
    ``folding_fraction`` (values <= 0) over its voxels."""
    p1, median, p99 = (float(v) for v in np.percentile(jacobian, [1, 50, 99]))
    return {"min": float(np.min(jacobian)), "p1": p1, "median": median, "p99": p99, "max": float(np.max(jacobian)),
            "folding_fraction": float(np.mean(jacobian <= 0))}


#: A Jacobian map's display window never narrower than 1 -/+ this: a near-identity result stays near white.
JACOBIAN_MIN_HALF_WIDTH = 0.05


def jacobian_half_width(p1: float, p99: float) -> float:
    """Half a Jacobian map's display window, centred on 1 (no change): the farther of its 1st and 99th
    percentiles from 1, at least `JACOBIAN_MIN_HALF_WIDTH` (the Slicer volume and `overview.png` alike)."""
    return max(abs(p1 - 1.0), abs(p99 - 1.0), JACOBIAN_MIN_HALF_WIDTH)


def folding_fraction(transform: sitk.Transform, reference: sitk.Image | Grid, mask: sitk.Image | None = None) -> float:
    """Fraction of voxels (inside ``mask`` if given) where the Jacobian determinant is <= 0."""
    jac = jacobian_determinant(transform, reference)
    if mask is not None:
        sel = sitk.GetArrayViewFromImage(mask) > 0
        jac = jac[sel]
    return float((jac <= 0).mean()) if jac.size else 0.0
