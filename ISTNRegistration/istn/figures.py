"""Figures people would rather look at than read: a registration at a glance."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .geometry import Grid, lps_grid, stored_lps
from .metrics import jacobian_statistics
from .refinement import MAP_DISPLAY_THRESHOLD
from .registration import RegistrationResult, bounded_map, jacobian_on_grid


def _slice(image: sitk.Image, axis: int, index: int) -> np.ndarray:
    """2D slice of a 3D image along array axis ``axis`` (0 = axial for LPS-ish grids), or the 2D image."""
    return _slice_array(sitk.GetArrayFromImage(image), axis, index)


def _slice_array(a: np.ndarray, axis: int, index: int) -> np.ndarray:
    """`_slice` of an image's array."""
    return a if a.ndim == 2 else np.take(a, index, axis=axis)


def _window(a: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(a, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def _foreground_window(a: np.ndarray) -> tuple[float, float]:
    """`_window` over the voxels above 0 (the head, not the background around it); all voxels if none is."""
    return _window(a[a > 0] if (a > 0).any() else a)


def _centroid_index(labels: sitk.Image | None, reference: sitk.Image, axis: int) -> int:
    """The slice through the centroid of ``labels`` > 0 (on ``reference``'s grid) along array axis ``axis``."""
    if reference.GetDimension() == 2:
        return 0
    shape = sitk.GetArrayViewFromImage(reference).shape
    if labels is not None:
        lab = sitk.GetArrayViewFromImage(labels)
        idx = np.nonzero(lab > 0)
        if idx[0].size:
            return int(np.round(idx[axis].mean()))
    return shape[axis] // 2


# Edge length of the checkerboard volume's tiles (world mm): a few per structure-sized region of a head
CHECKERBOARD_TILE_MM = 20.0


def checkerboard_image(fixed: sitk.Image, warped: sitk.Image, tile_mm: float = CHECKERBOARD_TILE_MM) -> sitk.Image:
    """The fixed image and ``warped`` (the moving image through the result, on the fixed grid) in alternating
    cubes of ``tile_mm``, float32 in [0, 1] on the fixed grid, each image in its own intensity window (1st-99.5th
    percentile of its non-zero voxels): edges that run on across the cubes' faces show a registration that fits.

    The cubes lie in WORLD coordinates (LPS axes, one corner at the fixed image's centre), so the pattern does
    not depend on how the fixed image stores its voxels (RAS, sagittal, oblique).
    """
    even = checkerboard_mask(fixed, tile_mm)

    def normalised(image: sitk.Image) -> np.ndarray:
        a = sitk.GetArrayFromImage(image)  # a copy, scaled in place (a 512^3 volume is 0.5 GB per copy)
        a = a if a.dtype == np.float32 else a.astype(np.float32)
        lo, hi = _foreground_window(a)
        a -= lo
        a /= hi - lo
        return np.clip(a, 0, 1, out=a)

    board = normalised(warped)
    np.copyto(board, normalised(fixed), where=even)
    out = sitk.GetImageFromArray(board)
    out.CopyInformation(fixed)
    return out


def checkerboard_mask(fixed: sitk.Image, tile_mm: float = CHECKERBOARD_TILE_MM) -> np.ndarray:
    """`checkerboard_image`'s cubes: True on the voxels of ``fixed`` (array order) that show the fixed image."""
    if tile_mm <= 0:
        raise ValueError(f"checkerboard_image() 'tile_mm' must be > 0, got {tile_mm}")
    d = fixed.GetDimension()
    size = fixed.GetSize()
    centre = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size]))
    # world = origin + D diag(spacing) index (array order is the reverse of ITK's index order)
    step = np.reshape(fixed.GetDirection(), (d, d)) * np.asarray(fixed.GetSpacing())
    origin = np.asarray(fixed.GetOrigin()) - centre
    shape = tuple(reversed(size))
    axis_of = np.argmax(np.abs(step), axis=1)  # the index axis each world axis follows
    if np.count_nonzero(step) == d and len(set(axis_of.tolist())) == d:  # axis-aligned storage: separable
        odd = np.zeros(shape, bool)  # the parity of the cube indices summed: their odd bits XORed, one bool array
        for k, j in enumerate(axis_of):
            cube = np.floor((origin[k] + step[k, j] * np.arange(size[j])) / tile_mm).astype(np.int64)
            odd ^= (cube % 2 == 1).reshape([-1 if a == d - 1 - j else 1 for a in range(d)])
        even = ~odd
    else:  # oblique: one slice of the first array axis at a time (a 512^2 x 300 CT would need GBs at once)
        rest = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in reversed(size[:-1])], indexing="ij"), -1)
        in_plane = rest[..., ::-1] @ step[:, :-1].T  # world offsets of one slice, (.., d)
        even = np.empty(shape, bool)
        for i in range(size[-1]):
            world = origin + step[:, -1] * i + in_plane
            even[i] = np.floor(world / tile_mm).astype(np.int64).sum(-1) % 2 == 0
    return even


def registration_figure(
    path: str | Path,
    fixed: sitk.Image,
    moving_in_fixed: sitk.Image,
    warped: sitk.Image,
    fixed_map: sitk.Image | None = None,
    warped_moving_map: sitk.Image | None = None,
    fixed_labels: sitk.Image | None = None,
    moving_labels_in_fixed: sitk.Image | None = None,
    warped_labels: sitk.Image | None = None,
    losses: Mapping[str, Sequence[float]] | None = None,
    dice_table: Mapping[str, Mapping[str, float]] | None = None,
    title: str = "",
    axis: int = 0,
    coarse: Mapping[str, int] | None = None,
    polish: Mapping[str, int] | None = None,
    passes: Mapping[str, Sequence[tuple[int, int, int]]] | None = None,
    focus: sitk.Image | None = None,
    notes: Sequence[str] = (),
    jacobian: sitk.Image | None = None,
    jacobian_stats: Mapping[str, float] | None = None,
    learned_maps: bool = True,
) -> Path:
    """Write a PNG: images with label contours, checkerboard, ITN maps, Dice bars and refinement loss curves.

    All images must be on the fixed grid except the ITN maps (resampled to it here).
    ``dice_table``: ``{stage: {structure: dice}}``; ``losses``: ``{stage: [loss per iteration]}``;
    ``coarse``: ``{stage: iterations run on half-resolution maps}`` (drawn dotted: their loss is on the
    smoother maps, not comparable with the full grid's); ``polish``: ``{stage: last iterations that polished
    the transform itself}`` (drawn with markers); ``passes``: ``{stage: [(iterations, coarse, polish) per
    refinement pass]}`` (`RegistrationResult.pass_iterations`), which replaces that stage's ``coarse`` and
    ``polish``: each pass is drawn as its own segment (a later pass compares other maps: those of the moving
    image warped so far), a thin line where it starts.
    ``focus``: without ``fixed_labels``, the slices go through the centroid of ``focus`` > 0 (on the fixed grid).
    ``notes``: lines of text in the Dice panel's place when there is no ``dice_table`` (no labels at test time).
    ``learned_maps``: False for a model without an ITN (STN-u, STN-s): its "maps" are the images as the network
    takes them, and are titled so.
    ``jacobian``: the result's Jacobian determinant on the fixed grid (`istn.registration.jacobian_image`): a
    fifth column shows it over the fixed image in each view (blue-white-red, white at 1, the window of the
    Slicer volume: `istn.metrics.jacobian_half_width`) and its histogram over the fixed image's foreground.
    ``jacobian_stats``: its numbers (`istn.metrics.jacobian_statistics`) for that window and the histogram's text,
    when the caller has them from the grid it printed them from; default: those of ``jacobian``.
    The checkerboard alternates `checkerboard_image`'s world cubes (the Slicer volume's, the cohort montage's).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    is3d = fixed.GetDimension() == 3
    views = [axis] + ([1] if is3d and axis == 0 else [])  # axial, then coronal through the structures
    view_name = {0: "axial", 1: "coronal", 2: "sagittal"}
    lo, hi = _foreground_window(sitk.GetArrayViewFromImage(fixed))
    norm = lambda a: np.clip((a - lo) / (hi - lo), 0, 1)  # noqa: E731 - the fixed image's window
    mlo, mhi = _foreground_window(sitk.GetArrayViewFromImage(moving_in_fixed))
    mnorm = lambda a: np.clip((a - mlo) / (mhi - mlo), 0, 1)  # noqa: E731 - the moving image's window

    rows, cols = len(views) + 1, 4 if jacobian is None else 5
    fig, axes = plt.subplots(rows, cols, figsize=(4.25 * cols, 4.3 * rows), squeeze=False)
    fig.patch.set_facecolor("white")
    board = checkerboard_mask(fixed)  # each image in its panel's window (the volume's percentiles cost 0.4 s at 1 mm)
    if jacobian is not None:
        from matplotlib.colors import Normalize

        from .metrics import jacobian_half_width

        jac_stats = jacobian_stats or jacobian_statistics(sitk.GetArrayViewFromImage(jacobian))
        # the head (the fixed image above 5 % of its window), not the air around it: where the map and histogram look
        head = norm(sitk.GetArrayViewFromImage(fixed)) >= 0.05
        half = jacobian_half_width(jac_stats["p1"], jac_stats["p99"])
        jac_norm = Normalize(1.0 - half, 1.0 + half)

    def show(ax, img, name, ax_, k, contours=(), cmap="gray", overlay=None):
        flip = (lambda a: a[::-1]) if is3d and ax_ != 0 else (lambda a: a)  # superior up
        ax.imshow(flip(img), cmap=cmap, vmin=0, vmax=1, interpolation="bilinear")
        if overlay is not None:  # (masked array, colour map, norm) over the image
            ax.imshow(flip(overlay[0]), cmap=overlay[1], norm=overlay[2], interpolation="bilinear", alpha=0.85)
        for lab, colour, style in contours:
            if lab is None:
                continue
            s = flip(_slice(lab, ax_, k))
            for v in np.unique(s[s > 0]):
                ax.contour((s == v).astype(float), levels=[0.5], colors=[colour], linewidths=1.1, linestyles=style)
        ax.set_title(name, fontsize=11)
        ax.axis("off")

    fixed_c = (fixed_labels, "#ffd400", "solid")
    centre_of = fixed_labels if fixed_labels is not None else focus
    for r, ax_ in enumerate(views):
        k = _centroid_index(centre_of, fixed, ax_)
        f, mv, w = (_slice(im, ax_, k) for im in (fixed, moving_in_fixed, warped))
        tag = f" ({view_name[ax_]})" if is3d else ""
        show(axes[r, 0], norm(f), f"Fixed{tag}" + ("\nits labels in yellow" if fixed_labels is not None else ""), ax_, k,
             [fixed_c])
        show(axes[r, 1], mnorm(mv), f"Moving, unregistered{tag}" + (
            "\nits labels in red" if moving_labels_in_fixed is not None else "\nas it lies, world coordinates"),
             ax_, k, [fixed_c, (moving_labels_in_fixed, "#ff3b30", "solid")])
        show(axes[r, 2], mnorm(w), f"Warped moving{tag}" + ("\nwarped labels in red" if warped_labels is not None
                                                          else ""), ax_, k, [fixed_c, (warped_labels, "#ff3b30", "solid")])
        show(axes[r, 3], np.where(_slice_array(board, ax_, k), norm(f), mnorm(w)),
             f"Checkerboard{tag}\nfixed / warped moving, {CHECKERBOARD_TILE_MM:g} mm squares", ax_, k)
        if jacobian is not None:
            jac = np.ma.masked_where(~_slice_array(head, ax_, k), _slice(jacobian, ax_, k))
            show(axes[r, 4], norm(f), f"Jacobian determinant{tag}\nred: moving larger, blue: smaller", ax_, k,
                 overlay=(jac, "bwr", jac_norm))

    if fixed_map is not None and warped_moving_map is not None:
        k = _centroid_index(centre_of, fixed, axis)
        fm = sitk.Resample(fixed_map, fixed, sitk.Transform(), sitk.sitkLinear, 0.0)
        wm = sitk.Resample(warped_moving_map, fixed, sitk.Transform(), sitk.sitkLinear, 0.0)
        if bounded_map(fixed_map):  # probabilities: 0.1..1, as the Slicer overlay shows them
            low, top = MAP_DISPLAY_THRESHOLD, 1.0
        else:
            low, top = 0.0, max(float(np.percentile(sitk.GetArrayViewFromImage(fm), 99.9)), 1e-6)
        kind, how = ("ITN map", "(learned, no labels)") if learned_maps else ("Network input", "(no ITN: the image)")
        show(axes[-1, 0], np.clip((_slice(fm, axis, k) - low) / (top - low), 0, 1),
             f"{kind} of the fixed image\n{how}", axis, k, [fixed_c], cmap="magma")
        show(axes[-1, 1], np.clip((_slice(wm, axis, k) - low) / (top - low), 0, 1),
             f"{kind} of the moving image, warped", axis, k, [fixed_c], cmap="magma")
    else:
        axes[-1, 0].axis("off")
        axes[-1, 1].axis("off")

    ax = axes[-1, 2]
    if dice_table:
        stages = list(dice_table)
        names = list(next(iter(dice_table.values())))
        x = np.arange(len(names))
        width = 0.8 / len(stages)
        for i, st in enumerate(stages):
            vals = [dice_table[st][n] for n in names]
            ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=f"{st} (mean {np.mean(vals):.2f})")
        short = [n.replace("left_", "L ").replace("right_", "R ").replace("_", " ") for n in names]
        ax.set_xticks(x, short, fontsize=8, rotation=45, ha="right")
        ax.set_ylim(0, 1.18)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_ylabel("Dice")
        ax.legend(fontsize=7.5, loc="upper left", ncol=1, frameon=False)
        ax.set_title("Dice per structure", fontsize=11)
        ax.grid(axis="y", alpha=0.3)
    else:
        ax.axis("off")
        if notes:
            ax.text(0.0, 1.0, "\n".join(notes), transform=ax.transAxes, va="top", ha="left", fontsize=9,
                    family="monospace", wrap=True)

    ax = axes[-1, 3]
    if losses:
        for name, curve in losses.items():
            segments = list((passes or {}).get(name) or [(len(curve), (coarse or {}).get(name, 0),
                                                           (polish or {}).get(name, 0))])
            color, start, labelled = None, 0, set()

            def label(kind: str) -> str | None:  # each kind once in the legend
                text = name if kind == "" else f"{name}, {kind}"
                if text in labelled:
                    return None
                labelled.add(text)
                return text

            for n, k, p in segments:
                seg = np.asarray(curve[start:start + int(n)], float)
                if not len(seg):
                    break
                k = min(int(k), len(seg))
                p = min(int(p), len(seg) - k)
                it = np.arange(start + 1, start + len(seg) + 1)
                if start:  # a later pass: its own maps, so its own curve
                    ax.axvline(start + 0.5, color=color, lw=0.6, alpha=0.5)
                if k < len(seg):
                    color = ax.plot(it[k:], seg[k:], color=color, label=label(""))[0].get_color()
                if k:
                    color = ax.plot(it[:k], seg[:k], ":", color=color, label=label("half-resolution maps"))[0].get_color()
                if p:
                    ax.plot(it[len(seg) - p:], seg[len(seg) - p:], "o", markersize=4, color=color, label=label("polish"))
                start += len(seg)
        ax.set_xlabel("refinement iteration")
        ax.set_ylabel("MSE(T(s'), t')")
        ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:  # no curve when no stage refined
            ax.legend(fontsize=6.5, framealpha=0.75)  # semi-transparent: six entries over the curves
        ax.set_title("Test-time refinement", fontsize=11)
        ax.grid(alpha=0.3)
    else:
        ax.axis("off")
    if jacobian is not None:
        _jacobian_histogram(axes[-1, 4], sitk.GetArrayViewFromImage(jacobian)[head], jac_stats, jac_norm)
    return _save(fig, path, title, 13)


def _jacobian_histogram(ax, values: np.ndarray, stats: Mapping[str, float], norm) -> None:
    """The Jacobian determinant's histogram over the fixed image's foreground (the head), its bars in the colours of
    the map panels."""
    import matplotlib.pyplot as plt

    lo, hi = norm.vmin, norm.vmax
    span = hi - lo
    edges = np.linspace(lo - 0.25 * span, hi + 0.25 * span, 61)
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), edges)  # the tails in the end bins
    share = 100.0 * counts / max(1, values.size)
    centres = 0.5 * (edges[1:] + edges[:-1])
    ax.bar(centres, share, width=np.diff(edges), color=plt.get_cmap("bwr")(norm(centres)), edgecolor="0.4",
           linewidth=0.3)
    ax.axvline(1.0, color="0.3", lw=0.8, ls="--")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("Jacobian determinant")
    ax.set_ylabel("% of the foreground's voxels")
    ax.set_title("Local volume change, moving / fixed", fontsize=11)
    # the numbers `istn register` prints and the Slicer summary gives: over the whole grid
    ax.text(0.02, 0.98, f"whole grid: 1st-99th percentile\n{stats['p1']:.3f} to {stats['p99']:.3f}, "
            f"folding {100 * stats['folding_fraction']:.3f} %", transform=ax.transAxes, va="top", fontsize=7.5,
            bbox=dict(facecolor="white", alpha=0.75, edgecolor="none"))
    ax.grid(axis="y", alpha=0.3)


def display_image(image: sitk.Image, max_size: int | None = None) -> sitk.Image:
    """``image`` re-stored LPS for a figure: array axis 0 runs inferior -> superior (axial slices), rows anterior ->
    posterior, columns the patient's right -> left (radiological). The same voxels, only their storage order, when
    the image's axes are anatomical; an oblique one gets the nearest such order; a 2D image is stored along x, y.
    So that a picture does not depend on how the user's file stores its voxels (RAS, sagittal, ...).

    ``max_size``: an image with more voxels than this along an axis is resampled (linear) to a coarser grid over
    the same field of view, every spacing scaled alike: a figure shows two slices at ~400 pixels, and resampling
    the other volumes onto a 1 mm 256^3 grid would cost more than the registration's own outputs.
    """
    if image.GetDimension() != 3 or max_size is None or max(image.GetSize()) <= max_size:
        return stored_lps(image)
    # resampled from the image as stored (in world coordinates): re-storing all of a 512^3 volume first cost 0.5 GB
    shown = lps_grid(Grid.from_image(image))
    factor = max(shown.size) / max_size
    size = [max(1, int(np.ceil(n / factor))) for n in shown.size]
    spacing = [sp * n / m for sp, n, m in zip(shown.spacing, shown.size, size)]  # the same extent
    corner = shown.voxel_to_world(np.full(3, -0.5))
    origin = corner + shown.direction_matrix @ (0.5 * np.asarray(spacing))
    ref = Grid(tuple(size), tuple(spacing), tuple(origin.tolist()), shown.direction).reference_image()
    return sitk.Resample(image, ref, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


# A figure's panels are ~400 pixels wide: the overview's display grid needs no more voxels per axis than this
OVERVIEW_MAX_SIZE = 192


def registration_overview(
    path: str | Path,
    fixed: sitk.Image,
    moving: sitk.Image,
    warped: sitk.Image,
    stages: Mapping[str, RegistrationResult],
    fixed_map: sitk.Image | None = None,
    warped_moving_map: sitk.Image | None = None,
    notes: Sequence[str] = (),
    title: str = "",
    background: float = 0.0,
    jacobian: sitk.Image | None = None,
    learned_maps: bool = True,
) -> Path:
    """The picture `istn register` writes beside its outputs (``overview.png``): no labels at test time, so the
    fixed image, the moving image as it lies (unregistered, world coordinates), the warped moving image and a
    checkerboard, axial and coronal through the fixed image's structures as its ITN map shows them, the two ITN
    maps, ``notes`` and each stage's refinement loss.

    ``stages``: ``{name: RegistrationResult}`` in order; ``warped`` on ``fixed``'s grid; the maps on any grid.
    ``jacobian``: a non-linear result's `jacobian_image` on any grid over the fixed image (its 4 mm lattice will
    do), drawn in a fifth column. ``learned_maps``: as `registration_figure`'s.
    Every image is shown on ``fixed`` re-stored LPS (`display_image`, at most `OVERVIEW_MAX_SIZE` voxels per axis):
    the same picture whatever the storage.
    """
    shown, focus = _display_and_structures(fixed, fixed_map)

    def on_shown(image: sitk.Image, default: float = 0.0) -> sitk.Image:
        return _on_grid(image, shown, default)

    return registration_figure(
        path, shown, on_shown(moving, background), on_shown(warped, background),
        fixed_map=fixed_map, warped_moving_map=warped_moving_map, focus=focus, notes=notes, title=title,
        losses={n: x.losses for n, x in stages.items()},
        coarse={n: x.coarse_iterations for n, x in stages.items()},
        polish={n: x.polish_iterations for n, x in stages.items()},
        passes={n: x.pass_iterations for n, x in stages.items()},
        jacobian=None if jacobian is None else jacobian_on_grid(jacobian, shown),
        # the numbers of the grid given (what `istn register` prints), not of its interpolation onto the display
        jacobian_stats=None if jacobian is None else jacobian_statistics(sitk.GetArrayViewFromImage(jacobian)),
        learned_maps=learned_maps,
    )


def _on_grid(image: sitk.Image, grid: sitk.Image, default: float = 0.0) -> sitk.Image:
    """``image`` resampled (linear, world coordinates) onto ``grid``'s voxels, float32; ``image`` as stored LPS (the
    edge face half a voxel past its last voxel counts as inside, past its first one not: `stored_lps`)."""
    identity = sitk.Transform(grid.GetDimension(), sitk.sitkIdentity)
    return sitk.Resample(stored_lps(image), grid, identity, sitk.sitkLinear, default, sitk.sitkFloat32)


def _display_and_structures(fixed: sitk.Image, fixed_map: sitk.Image | None) -> tuple[sitk.Image, sitk.Image | None]:
    """The display grid of ``fixed`` (`display_image`, at most `OVERVIEW_MAX_SIZE` voxels per axis) and, on it,
    where ``fixed_map`` shows structures: a bounded map above the overlay's display threshold, an unbounded one in
    its brightest percent (uint8 mask; None without a map)."""
    shown = display_image(fixed, OVERVIEW_MAX_SIZE)
    if fixed_map is None:
        return shown, None
    m = _on_grid(fixed_map, shown)
    level = MAP_DISPLAY_THRESHOLD if bounded_map(fixed_map) else float(np.percentile(sitk.GetArrayViewFromImage(m), 99))
    return shown, sitk.Cast(m > level, sitk.sitkUInt8)


def cohort_slice(fixed: sitk.Image, fixed_map: sitk.Image | None = None) -> tuple[sitk.Image, int]:
    """The grid a cohort's montage is drawn on: ``fixed`` re-stored LPS (`display_image`, at most
    `OVERVIEW_MAX_SIZE` voxels per axis), and its axial slice through the structures ``fixed_map`` shows (the
    middle slice without a map; 0 for a 2D image)."""
    shown, focus = _display_and_structures(fixed, fixed_map)
    return shown, _centroid_index(focus, shown, 0)


def checkerboard_tile(shown: sitk.Image, index: int, warped: sitk.Image) -> np.ndarray:
    """One image of a cohort: the fixed image (``shown``, `cohort_slice`'s grid) and ``warped`` (the moving image
    through its result, on any grid of the fixed space) in alternating world cubes, axial slice ``index``,
    values in [0, 1] (`checkerboard_image`)."""
    return _slice(checkerboard_image(shown, _on_grid(warped, shown)), 0, index).astype(np.float32)


def cohort_montage(path: str | Path, tiles: Sequence[tuple[str, np.ndarray | None, str]], title: str = "",
                   columns: int = 6) -> Path:
    """``summary.png`` of `istn register` with several moving images: one tile per image, in order, each its
    `checkerboard_tile` (``None``: the image failed, drawn as an empty tile) titled with its name and a note
    (its line of numbers, or why it failed), so a cohort's misregistrations show at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(tiles))
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows + (0.5 if title else 0)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, tile, note) in zip(axes.ravel(), tiles):
        if tile is None:
            ax.text(0.5, 0.5, "\n".join(_wrap(note, 28)), ha="center", va="center", color="tab:red", fontsize=7,
                    transform=ax.transAxes)
            ax.set_title(name, fontsize=8, color="tab:red")
            continue
        ax.imshow(tile, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.text(0.5, -0.04, note, ha="center", va="top", fontsize=6.5, transform=ax.transAxes)
    return _save(fig, path, title, 10)


def _save(fig, path: str | Path, title: str, title_size: float) -> Path:
    """A figure finished: its title, its layout, written as a PNG atomically (90 dpi), closed."""
    import matplotlib.pyplot as plt

    from .io import atomic_write

    if title:
        fig.suptitle(title, fontsize=title_size)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(fig)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)[:6] or [""]
