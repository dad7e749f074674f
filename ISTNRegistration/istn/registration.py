"""Registration of one pair: one pass of the network, then test-time refinement.

Refinement (the point of ISTNs, `istn.refinement.refine`): the STN is
optimised on this pair alone to minimise ``MSE(T(s'), t')`` with the ITN
frozen; no annotations are needed. `refine` restores the model's trained
weights afterwards, so every pair (and every second Apply in Slicer) starts
from the same trained network.

Geometry. The network runs on internal grids (`istn.data.network_grid`): the
model's size and spacing, on the world (patient LPS) axes and centred on each
image's foreground, whatever the file's voxel order or obliquity.
Results are WORLD transforms mapping fixed points to moving points (ITK/Slicer
"from parent" convention):

- affine model: ``x -> A(x)``, a ``sitk.AffineTransform``; with an initial
  transform ``I`` the moving image is first pulled into the fixed grid through
  it and the result is ``x -> I(A(x))``;
- B-spline model, optionally after an affine ``A`` (identity if none): the
  B-spline ``B`` lives in MOVING space, on the fixed internal grid carried there
  by the rotation and translation of ``A`` (`aligned_grid`; the fixed image is
  pulled onto it through ``A^-1``), and the result is ``x -> B(A(x))``, the
  order of elastix and of Slicer's "B-spline node under the affine node"
  hierarchy. Carrying the fixed grid (rather than using the moving image's own
  grid) shows the network both heads upright, as in training, whatever the
  scanner position of the moving head.
"""

from __future__ import annotations

import copy

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .data import image_to_tensor, network_grid
from .errors import InputError
from .export import LoadedModel
from .geometry import Grid, field_lattice, lps_grid, stored_as, stored_lps
from .inputs import PreparedImage, prepare_image
from .losses import anchor_energy, anchored_control_points, bending_energy
from .metrics import field_jacobian_determinant, few_whole_values, jacobian_determinant, mutual_information
from .refinement import (DEFAULT_ITERATIONS, MAP_DISPLAY_THRESHOLD, REFINE_LAYERS, CancelFlag, IterationInfo, loss_rise,
                         RefineOutput, model_region_margin, refine, refinement_layers, supports_fc_refinement)
from .threads import default_threads
from .training import check_device, resolve_device
from .transforms import (bspline_to_world, compose, field_spacing_cap, flatten_transform, linear_matrix,
                         matrix_to_sitk_affine, sitk_affine_to_matrix, theta_to_world)

@dataclass
class RegistrationResult:
    """Everything one registration produced. Transforms map fixed world points to moving world points."""

    transform: sitk.Transform  # final (after refinement)
    one_pass_transform: sitk.Transform  # network prediction before refinement
    initial_transform: sitk.Transform | None
    transform_type: str
    fixed_map: sitk.Image  # ITN(fixed) on the fixed image's internal grid
    loss_one_pass: float  # refinement objective of the one pass
    loss_final: float  # ... of the result (with ``passes`` > 1: on the last pass's maps, of its moving image warped)
    losses: list[float]  # objective after each iteration, every pass's in turn
    iterations: int  # iterations actually run (all passes)
    cancelled: bool
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    model_meta: dict = field(default_factory=dict, repr=False)  # a copy of the model's (the model's stays its own)
    model_path: str = ""  # the model file that made it
    converged: bool = False  # refinement stopped by its tolerance before the iteration cap
    # the refinement iterate returned (the lowest loss), 1-based: 1 = the one pass, len(losses) + 1 = the
    # parameters after the last step (their loss is loss_final; `losses` holds each step's loss before it);
    # 0: none, the start was returned (``start_kept``)
    best_iteration: int = 0
    similarity_final: float = float("nan")  # MSE(T(s'), t') of the result, without the bending term
    coarse_iterations: int = 0  # of ``iterations``, those run on the half-resolution maps (coarse to fine)
    refine_layers: str = "all"  # the STN layers refined: "all" or "fc" (its fully connected layers)
    region_margin_mm: float | None = None  # maps compared in the structures' box grown by this; None: whole grid
    polish_iterations: int = 0  # of ``iterations``, the last ones of each pass: the polish of the transform's parameters
    iterations_allowed: int = 0  # the cap: passes x (refinement + polish iterations) (``iterations`` may stop short)
    bending: float = 0.0  # the B-spline's bending energy weight (mm^2) used
    anchor: float = 0.0  # the B-spline's anchor weight (mm^-2) used
    passes: int = 1  # refinement passes allowed (`register`'s ``passes``, and the affine's further looks)
    pass_moves: list[float] = field(default_factory=list)  # mm each later pass moved the fixed foreground (0: dropped)
    # (iterations, of them on half-resolution maps, of them polish) of each pass run, in order: ``losses`` in pieces
    pass_iterations: list[tuple[int, int, int]] = field(default_factory=list)
    # (K,) bounded maps only: each structure's map volume in the moving image over that in the fixed one, as the
    # network compared them in the first pass (`map_volume_ratios`); empty for unbounded maps
    map_volume_ratio: list[float] = field(default_factory=list)
    # mutual information of the IMAGES on the fixed image's network grid: as given (identity) and through the result
    # (`image_information`); the self-check warns when the result shares less than the images as given
    information: dict[str, float] = field(default_factory=dict)
    # the self-checks whose warning is in ``warnings``, of `SELF_CHECKS`: the pair looks unlike the model's training
    self_checks_failed: list[str] = field(default_factory=list)
    # the voxel spacing looks not to be in mm (`scale_warning`): a header to fix, which no other model registers
    spacing_suspect: bool = False
    bias_corrected: bool = False  # the working copies were divided by their intensity bias (N4; `register`)
    # on a chain's first stage: the chain started from the moving head turned by a whole number of right angles,
    # found by the turn search after the chain from the images as stored failed a self-check
    # (`istn.chain.turned_chain`): the turn, what it is, and the images' mutual information that chose it; empty
    # otherwise (a chain from the images as stored or from the user's start, and every later stage)
    turned: dict = field(default_factory=dict)
    # the stage returned its start, the images as given: its result left them less alike and its maps matched no
    # closer than as given (`NO_GAIN`): a pair aligned already (``transform`` is then the start, ``best_iteration`` 0)
    start_kept: bool = False

    # the moving map, or what makes it on first use: an affine stage's extra ITN look (~0.15 s on 2 CPU cores)
    # is needed only when the map is shown, never for a stage a B-spline follows
    _moving_map: sitk.Image | None = field(default=None, repr=False, compare=False)
    _moving_map_fn: Callable[[], sitk.Image] | None = field(default=None, repr=False, compare=False)

    @property
    def moving_map(self) -> sitk.Image:
        """ITN(moving) in moving space, on a grid in the fixed head's pose (`moving_map_grid`)."""
        if self._moving_map is None and self._moving_map_fn is not None:
            self._moving_map, self._moving_map_fn = self._moving_map_fn(), None
        return self._moving_map

    def warped_moving_map(self) -> sitk.Image:
        """The moving ITN map resampled into the fixed map's grid through the final transform."""
        return warp_image(self.moving_map, self.fixed_map, self.transform)

    def summary(self) -> dict:
        """JSON-able summary (what `istn register` writes to result.json)."""
        return {
            "transform_type": self.transform_type,
            "loss_one_pass": self.loss_one_pass,
            "loss_final": self.loss_final,
            "loss_per_iteration": self.losses,
            "iterations": self.iterations,
            "converged": self.converged,
            "best_iteration": self.best_iteration,
            "similarity_final": self.similarity_final,
            "coarse_iterations": self.coarse_iterations,
            "refine_layers": self.refine_layers,
            "region_margin_mm": self.region_margin_mm,
            "polish_iterations": self.polish_iterations,
            "iterations_allowed": self.iterations_allowed,
            "bending": self.bending,
            "anchor": self.anchor,
            "passes": self.passes,
            "pass_moves_mm": self.pass_moves,
            "bias_corrected": self.bias_corrected,
            "turned": self.turned or None,
            "start_kept": self.start_kept,
            "pass_iterations": [list(p) for p in self.pass_iterations],
            "map_volume_ratio": [None if not np.isfinite(r) else r for r in self.map_volume_ratio],
            "mutual_information": self.information,
            "self_checks_failed": self.self_checks_failed,
            "cancelled": self.cancelled,
            "device": self.device,
            "timings_s": self.timings,
            "warnings": self.warnings,
            "model": copy.deepcopy(self.model_meta),  # the caller may trim it: never the result's or the model's
        }


# Spacing (mm) of the dense field through which `warp_image` resamples through a non-linear transform when asked to
# (``field_spacing``): the output image of `istn register` and of the Slicer module. At most an eighth of the
# B-spline's control point spacing (`displacement_field`): with the bundled 30 mm mesh the field moves points by
# 0.005 mm at most over the brain, 12x faster than the exact warp at 1 mm 256^3 (benchmarks/results/final_warp.md).
OUTPUT_FIELD_SPACING_MM = 4.0


def warp_image(
    moving: sitk.Image, reference: sitk.Image | Grid, transform: sitk.Transform, interpolator: int = sitk.sitkLinear,
    default_value: float | None = 0.0, field_spacing: float | None = None,
) -> sitk.Image:
    """Resample ``moving`` onto ``reference``'s grid; ``transform`` maps reference points to moving points.

    ``default_value`` fills the points that fall outside ``moving``; ``None``
    uses ``moving``'s minimum, its background (-1000 for CT, not 0).
    Both images are taken as stored LPS (`istn.geometry.stored_lps`, `lps_grid`), so that what
    ITK samples at a tie (nearest neighbour half-way between voxels, a point on an edge face)
    does not depend on how either file orders its voxels.
    ``field_spacing`` (mm): a non-linear ``transform`` is first sampled as a
    displacement field at this spacing over the reference (`displacement_field`)
    and the image resampled through that field, linearly interpolated: much
    faster for a fine reference (a 1 mm 256^3 grid), approximate (see
    `OUTPUT_FIELD_SPACING_MM`). Linear transforms, and references not at least
    4x larger than the field, are resampled exactly. ``None``: exact.
    """
    ref = reference.reference_image() if isinstance(reference, Grid) else reference
    if default_value is None:
        default_value = float(sitk.GetArrayViewFromImage(moving).min())
    if field_spacing is not None and not transform.IsLinear():
        field = displacement_field(transform, Grid.from_image(ref), field_spacing)
        if field is not None:
            if interpolator == sitk.sitkLinear and moving.GetNumberOfComponentsPerPixel() == 1:
                return _resample_through_lps_field(moving, ref, field, float(default_value))
            transform = sitk.DisplacementFieldTransform(field)  # takes the field's buffer: no copy
    # both grids as stored LPS: ITK's ties (nearest neighbour; a point on the face half a voxel past the edge;
    # exact half indices computed along the reference's first stored axis, which land a rounding error to
    # either side) then fall the same way however either file orders its voxels
    moving = stored_lps(moving)
    grid = Grid.from_image(ref)
    lps = lps_grid(grid)
    if lps == grid:
        return sitk.Resample(moving, ref, transform, interpolator, float(default_value), moving.GetPixelID())
    on_lps = sitk.Resample(moving, lps.reference_image(), transform, interpolator, float(default_value),
                           moving.GetPixelID())
    return stored_as(on_lps, ref)


def _resample_through_lps_field(moving: sitk.Image, reference: sitk.Image, field: sitk.Image,
                                default_value: float) -> sitk.Image:
    """`_resample_through_field` onto ``reference`` when ``field`` lies on the reference as stored LPS
    (`istn.geometry.field_lattice`): resampled onto that grid, then its voxels stored as the reference's are (a
    permutation and flips of the axes: exact), so the values do not depend on how the reference is stored."""
    grid = Grid.from_image(reference)
    lps = lps_grid(grid)
    if lps == grid:
        return _resample_through_field(moving, grid, field, default_value)
    return stored_as(_resample_through_field(moving, lps, field, default_value), reference)


def _resample_through_field(moving: sitk.Image, reference: Grid, field: sitk.Image, default_value: float,
                            slab: int = 16) -> sitk.Image:
    """Linear resampling of scalar ``moving`` onto ``reference`` through a coarser displacement ``field`` (mm).

    ``field`` is `displacement_field`'s over ``reference`` stored LPS (`_resample_through_lps_field` handles
    another storage): the reference's origin and direction, an integer multiple ``k`` of its spacing per axis.
    What ITK does through a ``DisplacementFieldTransform``, several times faster (ITK's per-point
    transform calls dominate): the moving image's normalised coordinates of
    ``x + u(x)`` are computed at the field's points and upsampled trilinearly
    (exactly the field's linear interpolation, since the coordinate map is
    affine), then the image sampled there with ``grid_sample``. Points more
    than half a voxel outside the moving image get ``default_value``, as in
    ITK's linear resampling; integer pixel types are clamped and truncated, as
    ``sitk.Resample`` casts. Slabs of ``slab`` reference slices bound the memory.
    """
    d = reference.ndim
    f_grid = Grid.from_image(field)
    k = [int(round(fs / rs)) for fs, rs in zip(f_grid.spacing, reference.spacing)]
    m_grid = Grid.from_image(moving)
    w2n = m_grid.world_to_normalised_matrix()
    # moving normalised coordinates of x + u(x) at the field's points, (1, D, *S_f)
    pts = (f_grid.world_points() + sitk.GetArrayViewFromImage(field)) @ w2n[:d, :d].T + w2n[:d, d]
    coarse = torch.from_numpy(pts.astype(np.float32)).movedim(-1, 0)[None]
    view = sitk.GetArrayViewFromImage(moving)
    if view.dtype == np.float32:  # read in place (a copy is 0.5 GB at 512^3); grid_sample never writes its input
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            src = torch.from_numpy(view)[None, None]
    else:
        src = torch.from_numpy(view.astype(np.float32))[None, None]
    # ITK's linear interpolator takes points up to half a voxel beyond the edge voxel centres (edge value)
    limit = torch.tensor([1.0 + 1.0 / max(1, n - 1) for n in m_grid.size], dtype=torch.float32)
    shape, k_arr = reference.shape, k[::-1]  # array order (Z, Y, X)
    step = k_arr[0] * max(1, slab // k_arr[0])  # slabs start on field planes
    mode = "trilinear" if d == 3 else "bilinear"
    dtype = sitk.GetArrayViewFromImage(moving).dtype
    # an integer image: clamped and truncated slab by slab (a whole-volume np.clip cost 2 s of 11 at 512^3)
    bounds = None if np.issubdtype(dtype, np.floating) else (float(np.iinfo(dtype).min), float(np.iinfo(dtype).max))
    out = np.empty(shape, dtype=dtype)
    with torch.inference_mode():
        for z0 in range(0, shape[0], step):
            n = min(step, shape[0] - z0)
            planes = coarse[:, :, z0 // k_arr[0]: z0 // k_arr[0] + (n - 1) // k_arr[0] + 2]
            size = [(planes.shape[2] - 1) * k_arr[0] + 1] + [(m - 1) * kk + 1 for m, kk in
                                                              zip(planes.shape[3:], k_arr[1:])]
            grid = F.interpolate(planes, size=size, mode=mode, align_corners=True)
            grid = grid[(slice(None), slice(None), slice(0, n)) + tuple(slice(0, m) for m in shape[1:])]
            grid = grid[0].movedim(0, -1)  # (n, *shape[1:], D)
            val = F.grid_sample(src, grid[None], mode="bilinear", padding_mode="border", align_corners=True)[0, 0]
            val = val.masked_fill_((grid.abs() > limit).any(-1), default_value)
            if bounds is not None:
                val = val.clamp_(*bounds).trunc_()
            out[z0:z0 + n] = val.numpy()  # cast to the image's type on assignment
    return reference.image_from_array(out)


def displacement_field(transform: sitk.Transform, reference: Grid, spacing: float) -> sitk.Image | None:
    """``transform`` sampled as a float64 displacement field (mm) covering ``reference`` about every ``spacing`` mm.

    ``spacing`` is first capped (`istn.transforms.field_spacing_cap`) at an eighth of the finest control
    point spacing of the B-splines (and at the spacing of the displacement
    fields) inside ``transform``. The field lies on `field_lattice`: over the
    reference as stored LPS (its origin and direction; the same lattice however
    the reference's voxels are stored), per axis a whole multiple ``k =
    round(spacing / reference spacing)`` (at least 1) of the reference's spacing, so that every reference
    voxel lies on the field's lattice lines, and enough points to cover the
    reference's last voxel. None when it would not have at least 4x fewer
    points than the reference.
    """
    lattice = field_lattice(reference, field_spacing_cap(transform, spacing))
    if 4 * int(np.prod(lattice.size)) > int(np.prod(reference.size)):
        return None
    return sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, list(lattice.size), lattice.origin,
                                             lattice.spacing, lattice.direction)


def jacobian_image(transform: sitk.Transform, reference: sitk.Image | Grid,
                   field_spacing: float | None = None, resample: bool = True) -> sitk.Image:
    """The Jacobian determinant of ``x -> transform(x)`` (fixed -> moving) on ``reference``'s grid, float32.

    The local volume change between the images: above 1 where a region of the
    fixed image corresponds to a larger region of the moving image, below 1
    where to a smaller one, <= 0 where the map folds. ``field_spacing`` (mm): a
    non-linear ``transform`` is differentiated on `displacement_field`'s coarser
    lattice and the determinant interpolated linearly onto the reference (a
    B-spline's determinant is smooth on the scale of its mesh; seconds saved at
    1 mm 256^3); None: central differences at every reference voxel
    (`istn.metrics.jacobian_determinant`). ``resample=False``: the determinant
    on that lattice, not interpolated (a uniform sample of the reference's
    field of view, for numbers that sum it up).
    """
    grid = reference if isinstance(reference, Grid) else Grid.from_image(reference)
    if transform.IsLinear():  # one value everywhere: differentiate on a 4-voxel-wide grid of the same geometry
        small = dataclasses.replace(grid, size=(4,) * grid.ndim)
        value = float(np.median(jacobian_determinant(transform, small)))
        return grid.image_from_array(np.full(tuple(reversed(grid.size)), value, np.float32))
    field = displacement_field(transform, grid, field_spacing) if field_spacing is not None else None
    if field is None:
        return grid.image_from_array(jacobian_determinant(transform, grid).astype(np.float32))
    # the field is the transform already sampled on the lattice: differentiate it, do not sample it again
    coarse = Grid.from_image(field).image_from_array(field_jacobian_determinant(field).astype(np.float32))
    return jacobian_on_grid(coarse, grid) if resample else coarse


def jacobian_on_grid(jacobian: sitk.Image, reference: sitk.Image | Grid) -> sitk.Image:
    """A `jacobian_image` on ``reference``'s grid: as it is when it is on that grid already, else (the lattice of
    ``resample=False``) interpolated linearly onto it, 1 (no change) outside the lattice."""
    grid = reference if isinstance(reference, Grid) else Grid.from_image(reference)
    if Grid.from_image(jacobian) == grid:
        return jacobian
    return sitk.Resample(jacobian, grid.reference_image(), sitk.Transform(), sitk.sitkLinear, 1.0, sitk.sitkFloat32)


def bounded_map(image: sitk.Image) -> bool:
    """Whether a map image holds probabilities (values in [0, 1], a sigmoid ITN head) rather than free values."""
    a = sitk.GetArrayViewFromImage(image)
    return bool(a.size) and float(a.min()) >= 0.0 and float(a.max()) <= 1.0 + 1e-6


def _map_image(maps: torch.Tensor, grid: Grid) -> sitk.Image:
    """``(1, K, *S)`` ITN output -> scalar image on ``grid``: the maximum over the K structures (their union).

    The maximum, not the sum: a bounded map stays a probability in [0, 1], and
    the sigmoid's floor (~0.02 per structure) does not add up to a glow over
    the whole head (8 structures: 0.15 summed).
    """
    return grid.image_from_array(maps[0].amax(0).detach().cpu().numpy().astype(np.float32))


def moving_map_grid(fixed: PreparedImage, moving: PreparedImage, model: LoadedModel,
                    initial_transform: sitk.Transform | None = None, *,
                    result: sitk.Transform | None = None) -> Grid:
    """The grid, in the moving image's space, of a stage's moving map (`RegistrationResult.moving_map`): the
    fixed image's network grid carried into moving space by the rigid part (`aligned_grid`) of the transform
    (world, fixed -> moving) that puts the moving head in the fixed head's pose, so that the network sees, and
    the panel shows, the moving head as it saw heads in the stage's training:

    - a B-spline stage: its linear ``initial_transform`` (the affine it starts from; none: the identity; one
      that is not linear: `InputError`), where it compares the maps;
    - an affine stage: its ``result`` (the maps it compared lie on the moving image's own grid, in the scanner
      position, where its ITN reads the structures less well: on the validation pairs the thresholded maps
      score Dice 0.727 there against 0.755 in the result's pose); without ``result``, or one that is not
      linear, the moving image's own network grid.
    """
    cfg = model.config
    if model.transform_type != "bspline":
        try:
            a_mat = None if result is None else _linear_matrix(flatten_transform(result), model.ndim)
        except InputError:
            a_mat = None
        if a_mat is None:
            return network_grid(moving.image, cfg, moving.centre)
    else:
        a_mat = (np.eye(model.ndim + 1) if initial_transform is None
                 else _linear_matrix(flatten_transform(initial_transform), model.ndim))
    return aligned_grid(network_grid(fixed.image, cfg, fixed.centre), a_mat)


def aligned_grid(grid: Grid, matrix: np.ndarray) -> Grid:
    """``grid`` carried by the rigid part of the affine ``matrix`` ``(D+1, D+1)`` (world -> world).

    Same size and spacing; centre ``A(c)``; direction ``R @ D`` with ``R`` the
    rotation of the polar decomposition of ``A``'s linear part (scale and shear
    are left out, so the grid stays orthonormal, as ITK and Slicer images are).
    """
    d = grid.ndim
    u, _, vt = np.linalg.svd(matrix[:d, :d])
    if np.linalg.det(u @ vt) < 0:  # a reflection: keep the proper rotation nearest to it
        u[:, -1] *= -1
    direction = (u @ vt) @ grid.direction_matrix
    centre = matrix[:d, :d] @ grid.centre + matrix[:d, d]
    half = direction @ (np.asarray(grid.spacing) * (np.asarray(grid.size) - 1) / 2.0)
    return Grid(grid.size, grid.spacing, tuple((centre - half).tolist()), tuple(direction.ravel().tolist()))


def _linear_matrix(transform: sitk.Transform, ndim: int) -> np.ndarray:
    try:
        return sitk_affine_to_matrix(transform)
    except (RuntimeError, TypeError):
        raise InputError("the initial transform of a B-spline registration must be linear (affine, rigid, ...)") from None


def _starts_as_given(initial: sitk.Transform | None, given: sitk.Transform | None, d: int) -> bool:
    """Whether a stage starting from ``initial`` starts from the images as given (``given``; None: as stored):
    the same linear map (None: the identity); False for a non-linear one."""
    if any(t is not None and not t.IsLinear() for t in (initial, given)):
        return False
    a, b = (np.eye(d + 1) if t is None else linear_matrix(t) for t in (initial, given))
    return bool(np.allclose(a, b, rtol=0.0, atol=1e-9))


def _inverse_consistent_theta(theta_st: np.ndarray, theta_ts: np.ndarray) -> np.ndarray:
    """Homogeneous ``(D+1, D+1)`` midpoint ``(T_st @ T_ts^-1)^(1/2)`` of the forward and backward predictions.

    ``theta_st`` maps fixed-grid to moving-grid normalised points, ``theta_ts`` (the
    network on the swapped pair) the reverse. A consistent network gives
    ``T_ts = T_st^-1`` and the midpoint is ``T_st``; for an image and itself
    (same grid) it is exactly the identity, whatever the network's bias.
    """
    from scipy.linalg import sqrtm

    d = theta_st.shape[0]
    hom = [np.vstack([t, np.eye(d + 1)[d:]]) for t in (theta_st, theta_ts)]
    with np.errstate(all="ignore"):
        mid = np.real(sqrtm(hom[0] @ np.linalg.inv(hom[1])))
    if not np.all(np.isfinite(mid)):  # no real square root (never for the STN's bounded outputs): forward only
        return hom[0]
    mid[d, :] = np.eye(d + 1)[d]
    return mid


def _self_check(model: LoadedModel, similarity: float, refined: bool) -> str | None:
    """A warning when the loss lies far outside what the model's validation pairs reached at the same stage.

    ``refined``: compare with the validation pairs' refined losses, else (no
    refinement ran) with their one-pass losses.
    """
    stage = "refined" if refined else "one_pass"
    ref = model.meta.get("validation", {}).get("refinement_loss", {}).get(stage)
    if not ref or not np.isfinite(similarity):
        return None
    high = float(ref["max"])
    if similarity <= SELF_CHECK_FACTOR * high:
        return None
    what = "refined loss" if refined else "one-pass loss"
    return (f"this pair looks unlike what the model was trained on: the {what} {similarity:.4g} is "
            f"{similarity / high:.1f}x the highest of its validation pairs ({high:.4g}); check orientation, "
            "contrast and field of view")


def loss_spread(values: Sequence[float]) -> dict:
    """``{"min", "median", "max", "n"}`` of losses: what the model metadata's ``validation.refinement_loss`` holds
    per stage, and what `_self_check` compares a registration's loss with."""
    return {"min": float(np.min(values)), "median": float(np.median(values)), "max": float(np.max(values)),
            "n": len(values)}


def validation_losses(model: LoadedModel, pairs: Sequence[tuple[sitk.Image, sitk.Image]], *,
                      progress: Callable[[int, int], None] | None = None, **options) -> dict:
    """The loss self-check's reference: ``{"one_pass": spread, "refined": spread}`` (`loss_spread`) of ``model``
    registering each ``(moving, fixed)`` of ``pairs`` as `register` does with ``options`` (the model's own
    refinement settings unless given). ``progress(done, total)`` after each pair.

    Pairs are validation pairs (never the training pairs: the check asks how far a new pair lies from what the
    model reaches on pairs it did not learn). A stage whose losses are not all finite and positive is left out:
    a zero maximum would flag every later pair."""
    stages: dict[str, list[float]] = {"one_pass": [], "refined": []}
    for k, (moving, fixed) in enumerate(pairs):
        with warnings.catch_warnings():  # a validation pair's own self-check (against older losses) is moot here
            warnings.simplefilter("ignore")
            result = register(fixed, moving, model, **options)
        stages["one_pass"].append(result.loss_one_pass)
        stages["refined"].append(result.similarity_final)
        if progress is not None:
            progress(k + 1, len(pairs))
    return {stage: loss_spread(v) for stage, v in stages.items()
            if v and all(np.isfinite(x) and x > 0 for x in v)}


#: The self-checks of a result (`RegistrationResult.self_checks_failed`): its loss far above the model's validation
#: pairs', a structure seen at a very different volume, the images less alike than as given.
SELF_CHECKS = ("loss", "map_volume", "information")

# A refined loss above this multiple of the worst validation pair's triggers the self-check warning.
SELF_CHECK_FACTOR = 3.0

# A structure the network sees with less than this fraction of its volume in the other image (or more than its
# inverse) triggers the map-volume self-check. On the validation pairs the bundled models' ratios lie within
# 0.55-1.05 (brain-t1) and 0.74-1.01 (brain-synth): the bound is their lowest less 0.1, so that an anatomy unlike
# the fixed one stays quiet; T2 and PD through the T1-only model reach 0.00-0.37 and a head cropped to its top
# 60 % 0.38-0.64 (benchmarks/results/self_checks.md).
MAP_VOLUME_RATIO_BOUND = 0.45


def map_volume_ratios(source_map: torch.Tensor, target_map: torch.Tensor,
                      threshold: float = MAP_DISPLAY_THRESHOLD) -> np.ndarray:
    """``(K,)``: each structure map's volume in ``source_map`` over that in ``target_map``.

    ``source_map``, ``target_map`` ``(1, K, *S)``: bounded ITN maps on grids of
    the same spacing (the network's), so that voxel sums compare volumes. A
    map's volume: the sum of its values from ``threshold`` up (below it the
    sigmoid's floor, ~0.02 over a whole grid, would outweigh a small
    structure). ``inf`` where only the target has none; ``nan`` where neither has any.
    """
    def volumes(maps: torch.Tensor) -> np.ndarray:
        m = maps[0].detach().float()
        return (m * (m >= threshold)).flatten(1).sum(1).cpu().double().numpy()

    s, t = volumes(source_map), volumes(target_map)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(t > 0, s / np.where(t > 0, t, 1.0), np.where(s > 0, np.inf, np.nan))


# A result whose images share less than this fraction of the mutual information of the images as given warns:
# it may be worse than no registration. On validation pairs registration raises it ~4x (0.08 -> 0.33 nats); the
# cropped sample pair that the T1-only model ends below no registration goes 0.294 -> 0.283, T2 / PD through it
# 0.06-0.11 -> 0.05-0.06 (benchmarks/results/self_checks.md). Below 1 so that an image registered to itself, or
# a pair already aligned, is not flagged for the interpolation's smoothing.
INFORMATION_KEPT = 0.98
# A result within this fraction of the fixed image's (working copy's) finest voxel of where it started, everywhere
# over the foreground, is not warned of by the information check: that far it can only resample, not misalign
NEGLIGIBLE_MOVE = 0.5
FOREGROUND = 0.05  # fixed voxels compared: above this in the network's window (the head, not the air around it)
#: A stage started from the images as given returns them as given (`RegistrationResult.start_kept`) when its result
#: leaves the images less alike (the information check) and its maps match no closer than as given: their loss fell
#: by less than this fraction of the validation pairs' lowest refined loss. Heads registered to their own volume
#: from thick slices (4-8 mm; axial, coronal, sagittal, oblique), aligned exactly, whose result the information
#: check flagged 0.4-1.3 mm (mean) from the exact start: the affine's loss fell by 0-4.4e-5 (the sample heads at
#: 2 mm, Colin27 at 1 mm; validation floor 5.6e-4: up to 8 %), the B-spline's by up to 3.6e-5 (floor 3.5e-4: 10 %).
#: Colin27 registered to the template it nearly sits on (Dice 0.835 -> 0.865; the check fired on 4 of 8): by
#: 3.3-4.0e-4 (60-72 %); after a 3 degree / 3 mm motion: 8e-4 to 2.9e-3 (session 41's probes). The bound lies
#: between, a factor ~2.5 from either (benchmarks/aligned_series.py: what it changes, rule off and on).
NO_GAIN = 0.2


def image_information(fixed: sitk.Image, moving: sitk.Image, grid: Grid, windows: tuple,
                      transforms: Sequence[sitk.Transform | None]) -> list[float]:
    """Mutual information of the images (nats) through each of ``transforms`` (None: as given, the world
    positions as stored) on ``grid`` (the fixed image's network grid), each image in its network window, over
    the fixed image's foreground: a measure of the images themselves, independent of the model, of whether a
    result leaves them less alike than they were, and one that compares the results of different models."""
    target = image_to_tensor(fixed, grid, windows[0])[0, 0].cpu().numpy()
    mask = target > FOREGROUND
    return [mutual_information(target, image_to_tensor(moving, grid, windows[1], t)[0, 0].cpu().numpy(), mask)
            for t in transforms]


def foreground_points(fixed: sitk.Image, grid: Grid, window: tuple[float, float], points: int = 500) -> np.ndarray:
    """Up to ``points`` of the fixed image's network grid points in its foreground (evenly picked): ``(n, D)`` mm."""
    target = image_to_tensor(fixed, grid, window)[0, 0].cpu().numpy()
    where = grid.world_points()[target > FOREGROUND]
    return where[:: max(1, len(where) // points)]


def largest_move(fixed: sitk.Image, grid: Grid, window: tuple[float, float], first: sitk.Transform | None,
                 second: sitk.Transform, points: int = 500) -> float:
    """The largest distance (mm) between where ``first`` (None: the identity) and ``second`` take the fixed
    image's foreground, over up to ``points`` of its network grid's points (`foreground_points`)."""
    return largest_distance(foreground_points(fixed, grid, window, points), first, second)


def largest_distance(where: np.ndarray, first: sitk.Transform | None, second: sitk.Transform) -> float:
    """The largest distance (mm) between where ``first`` (None: the identity) and ``second`` take the points
    ``where`` ``(n, D)`` mm; 0 for none."""
    if not len(where):
        return 0.0
    a = where if first is None else np.array([first.TransformPoint(p.tolist()) for p in where])
    b = np.array([second.TransformPoint(p.tolist()) for p in where])
    return float(np.linalg.norm(a - b, axis=1).max())


#: An affine look (refinement pass) that moved the fixed image's foreground by more than this (mm, its largest
#: move) left the pose unsettled: another look follows, up to `MAX_AFFINE_PASSES` in all (`register`'s
#: ``more_passes``). Validation pairs (spm_avg305 in 10-20 degree scanner positions, 12): the second look moved
#: it 1.4-3.5 mm, so none gets a third and every result is as before. Turned 25-40 degrees (12): 3.7-37 mm. The
#: pose audit's Colin27 registered to itself turned 35 / 40 / 45 degrees about its vertical axis: 34 / 32 / 30 mm,
#: and a third look took its error from 6.5 / 9.3 / 15.7 mm (mean) to 1.5 / 1.5 / 2.7 (session 38).
UNSETTLED_MM = 10.0
MAX_AFFINE_PASSES = 4


def _information_check(given: float, result: float, moved_mm: Callable[[], float] = lambda: np.inf,
                       negligible_mm: float = 0.0) -> str | None:
    """The warning when the result's images share less information than the images as given; none when the
    result lies within ``negligible_mm`` of the start everywhere (``moved_mm()``, asked only then): an aligned pair
    left where it was loses information to the interpolation only (clinical audit: a 2 mm head against its own
    1 mm copy, moved by 0.43 mm at most, was flagged and registered again by other models)."""
    if not result < INFORMATION_KEPT * given or moved_mm() <= negligible_mm:
        return None
    return (f"the registered images are less alike than the images as given (mutual information {result:.3f} vs "
            f"{given:.3f}): if they were aligned already, registration did not improve them; otherwise the result "
            "may be worse than no registration: check orientation, contrast and field of view, or try another model")


#: An image whose extent along one of its axes is below this fraction of the other image's extent that way is a
#: slab against a volume, across which a linear transform's scale is poorly determined. On the sample pair
#: (the bundled affine model), axial slabs of the moving head ended this far from the whole head's affine inside
#: the slab (median / max, benchmarks/results/slab.md): 80 mm (0.49 of the fixed extent) 1.1 / 2.9 mm; 60 mm
#: (0.37) 1.9 / 4.4 mm; 40 mm (0.24) 3.7 / 8.8 mm; 20 mm (0.12) 7.1 / 13.3 mm (the self-checks fire for the last)
SLAB_FRACTION = 0.4
#: ... and is thinner than this fraction of the model's grid (192 mm for the brain models: 115 mm). A whole brain
#: (150 mm) against a field of view that holds a neck and shoulders (400 mm wide), or one padded to twice its size,
#: is not a slab: the structures that set the scale are all in it.
SLAB_GRID_FRACTION = 0.6


def slab_warning(fixed: sitk.Image, moving: sitk.Image, thin_mm: float = float("inf")) -> str | None:
    """A warning when one image covers a thin slab of what the other covers (`SLAB_FRACTION`), along one of its own
    axes (the other image's extent projected onto that axis, so an oblique slab is judged by its thickness), and
    that slab is thinner than ``thin_mm`` (`register` passes `SLAB_GRID_FRACTION` of the model's grid extent)."""
    def axes(image: sitk.Image) -> list[tuple[np.ndarray, float]]:
        d = image.GetDimension()
        cols = np.asarray(image.GetDirection(), float).reshape(d, d)
        return [(cols[:, j], image.GetSize()[j] * image.GetSpacing()[j]) for j in range(d)]

    images = (("fixed", fixed), ("moving", moving))
    for (role, image), (other_role, other) in (images, images[::-1]):
        for u, extent in axes(image):
            across = sum(abs(float(u @ v)) * e for v, e in axes(other))
            if extent < SLAB_FRACTION * across and extent < thin_mm:
                lps = int(np.argmax(np.abs(u)))
                name = (("left-right", "anterior-posterior", "superior-inferior")[lps] if image.GetDimension() == 3
                        else ("x", "y")[lps])
                return (f"the {role} image covers {extent:.0f} mm along its {name} axis, the {other_role} image "
                        f"{across:.0f} mm: a slab against a volume, across which the scaling of a linear transform is "
                        "poorly determined (an axial slab of 40 mm of the sample head ended 3.7 mm from the whole "
                        "head's result, median inside the slab); check the result, or register images that cover "
                        "the same region")
    return None


#: An image whose largest extent is below this fraction of the model's grid extent, or above `SCALE_HIGH` times
#: it, is at a scale the model was not made for: a header in cm (a 170 mm head spans 17) or in tenths of mm. The
#: brain models' grid spans 192 mm: under 48 mm or over 1.5 m. The pose audit's heads with their spacing in cm
#: and x10 were warned of only as unlike the training pairs.
SCALE_LOW, SCALE_HIGH = 0.25, 8.0


def scale_warning(fixed: PreparedImage, moving: PreparedImage, grid_mm: float) -> str | None:
    """A warning when an image's field of view is far smaller or larger than the model's grid (``grid_mm``)."""
    for role, prepared in (("fixed", fixed), ("moving", moving)):
        image = prepared.image
        extent = max(n * s for n, s in zip(image.GetSize(), image.GetSpacing()))
        if SCALE_LOW * grid_mm <= extent <= SCALE_HIGH * grid_mm:
            continue
        spacing = ", ".join(f"{s / k:.4g}" for s, k in zip(image.GetSpacing(), prepared.shrink))  # as given
        return (f"the {role} image spans {extent:.3g} mm at most, the model's grid {grid_mm:.0f} mm: is its voxel "
                f"spacing ({spacing}) in mm? A header in cm makes a 170 mm head 17 mm across, one in tenths of a mm "
                "1.7 m; fix the header (e.g. Slicer's Volumes module, or sitk SetSpacing) and register again")
    return None


def label_map_warning(fixed: sitk.Image | PreparedImage, moving: sitk.Image | PreparedImage) -> str | None:
    """A warning when the fixed or moving image holds few whole-number values (`few_whole_values`): a label map or
    a mask given where an image was meant (``moving_labels.nii.gz`` for ``moving_t1.nii.gz``). The models map
    intensities to structures; a label map registers to something, and the self-checks may not say why. A
    `PreparedImage` is judged by the values found on its input (its working copy, averaged from a 1 mm label
    map, holds many)."""
    for role, image in (("fixed", fixed), ("moving", moving)):
        values = image.values if isinstance(image, PreparedImage) else few_whole_values(image)
        if values is None:
            continue
        kind = "a mask" if len(values) == 2 else f"a label map ({len(values) - 1} labels?)"
        return (f"the {role} image holds only {len(values)} whole-number values ({values[0]:g} to {values[-1]:g}): "
                f"{kind}, not an image of intensities? The models register images (the structures are found from "
                "their intensities); register the images themselves, then take labels through the result "
                "(istn apply; in Slicer: under the output transform)")
    return None


def _map_volume_check(model: LoadedModel, ratios: np.ndarray) -> str | None:
    """A warning naming the structures whose volume the network sees very differently in the two images: a
    contrast, field of view or anatomy it was not trained for, which the loss alone does not show (the maps of
    both images may match each other well and still miss the structure)."""
    bound = MAP_VOLUME_RATIO_BOUND
    off = [k for k, r in enumerate(ratios) if r == np.inf or (np.isfinite(r) and not bound <= r <= 1.0 / bound)]
    if not off:
        return None
    soi = model.meta.get("soi", {})
    names, labels = soi.get("names") or [], soi.get("labels") or []

    def name(k: int) -> str:
        if k < len(names):
            return str(names[k])
        return f"structure {k + 1}" + (f" (label {labels[k]})" if k < len(labels) else "")

    parts = [f"{name(k)} x{ratios[k]:.2f}" if np.isfinite(ratios[k]) else f"{name(k)}: none in the fixed image"
             for k in off]
    return ("the network sees the structures at very different volumes in the moving and the fixed image (moving / "
            f"fixed: {'; '.join(parts)}; validation pairs stay inside {bound:g}-{1 / bound:.2f}): a contrast, "
            "field of view or anatomy it was not trained for; check the result before using it")


#: A one pass whose loss is below this fraction of the validation pairs' lowest refined loss is an exact start (an
#: image and itself, stored alike or not): a climb of refinement from there is Adam's first step, not a warning
EXACT_START = 0.05
#: ... and any one pass at a loss this small (maps that match to rounding), whatever the model's metadata says
EXACT_LOSS = 1e-10


def check_register_inputs(
    fixed: sitk.Image,
    moving: sitk.Image,
    models: Sequence[LoadedModel],
    *,
    iterations: int = 50,
    lr: float | None = None,
    device: str = "auto",
    initial_transform: sitk.Transform | None = None,
    initial_name: str = "the initial transform",
    bending: float | None = None,
    tolerance: float | None = None,
    coarse_iterations: int | None = None,
    refine_layers: str | None = None,
    region_margin_mm: float | None = None,
    polish: int | None = None,
    anchor: float | None = None,
    passes: int | None = None,
    bias_correct: bool | None = None,
) -> None:
    """Check everything about a registration that can be checked before any computation.

    ``models`` is the chain run in order, each stage starting from the previous
    stage's result (`register` checks its one model; the CLI checks its
    ``--model`` list). Valid chains: any number of affine models, then at most
    one B-spline model (a B-spline stage needs a linear initial transform, so
    nothing can follow it and it cannot follow another). A non-linear
    ``initial_transform`` (e.g. an earlier affine + B-spline result) can start
    affine models only. ``initial_name`` names it in messages (the CLI passes
    "--initial 'path'"). Raises `InputError` with a one-line message.
    """
    d = fixed.GetDimension()
    if moving.GetDimension() != d:
        raise InputError(f"fixed image is {d}D but moving image is {moving.GetDimension()}D")
    if not models:
        raise InputError("at least one model is needed")
    for m in models:
        if m.ndim != d:
            raise InputError(f"the images are {d}D but the model '{m.path.name}' is {m.ndim}D")
    kinds = [m.transform_type for m in models]
    if any(k not in ("affine", "bspline") for k in kinds):
        raise InputError(f"unknown model transform type in {kinds}; expected 'affine' or 'bspline'")
    first_bspline = kinds.index("bspline") if "bspline" in kinds else len(kinds)
    if first_bspline < len(kinds) - 1:
        chain = ", ".join(f"{m.path.name} ({m.transform_type})" for m in models)
        raise InputError(f"models cannot be chained in this order: {chain}; valid chains are affine models, "
                         "then at most one B-spline model, last")
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer))
                                   or iterations < 0):
        raise InputError(f"register() 'iterations' must be a whole number >= 0, got {iterations!r}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float, np.number))
                           or not np.isfinite(lr) or lr <= 0):
        raise InputError(f"register() 'lr' must be a finite number > 0, got {lr!r}")
    for value, what in ((bending, "the bending weight"), (anchor, "the anchor weight"),
                        (tolerance, "the convergence tolerance")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                                  or not (value >= 0 and np.isfinite(value))):
            raise InputError(f"{what} must be a number >= 0, got {value!r}")
    if coarse_iterations is not None and (isinstance(coarse_iterations, bool)
                                          or not isinstance(coarse_iterations, (int, np.integer))
                                          or coarse_iterations < 0):
        raise InputError(f"register() 'coarse_iterations' must be a whole number >= 0, got {coarse_iterations!r}")
    if polish is not None and (isinstance(polish, bool) or not isinstance(polish, (int, np.integer)) or polish < 0):
        raise InputError(f"register() 'polish' must be a whole number >= 0 (polish iterations), got {polish!r}")
    if passes is not None and (isinstance(passes, bool) or not isinstance(passes, (int, np.integer)) or passes < 1):
        raise InputError(f"register() 'passes' must be a whole number >= 1 (refinement passes), got {passes!r}")
    check_api_types(bias_correct=bias_correct)
    if refine_layers is not None and refine_layers not in REFINE_LAYERS:
        raise InputError(f"the refined layers must be one of {', '.join(REFINE_LAYERS)}, got {refine_layers!r}")
    if region_margin_mm is not None and (isinstance(region_margin_mm, bool) or not isinstance(
            region_margin_mm, (int, float, np.number)) or not region_margin_mm >= 0):
        raise InputError(f"the comparison region's margin must be a number of mm >= 0 (inf: the whole grid), "
                         f"got {region_margin_mm!r}")
    for m in models:
        margin = region_margin_mm if region_margin_mm is not None else model_region_margin(m)
        if np.isfinite(margin) and m.config.itn_output != "sigmoid":
            raise InputError(f"the model '{m.path.name}' has unbounded maps: a comparison region around its "
                             "structures needs bounded (sigmoid) structure maps; use the whole grid (margin inf)")
        held = anchor if anchor is not None else float(m.meta.get("refinement", {}).get("anchor", 0.0))
        if m.transform_type == "bspline" and held > 0 and m.config.itn_output != "sigmoid":
            raise InputError(f"the model '{m.path.name}' has unbounded maps: anchoring the B-spline away from its "
                             "structures needs bounded (sigmoid) structure maps; use anchor 0")
        if (refine_layers or refinement_layers(m)) == "fc" and not supports_fc_refinement(m.module):
            raise InputError(f"the model '{m.path.name}' predates FC-only refinement (istn < 0.3): refine all STN "
                             "layers ('all') or re-script the file (istn.export.rescript_model)")
    check_device(device)
    if initial_transform is not None:
        if initial_transform.GetDimension() != d:
            raise InputError(f"{initial_name} is {initial_transform.GetDimension()}D but the images are {d}D")
        check_transform_usable(initial_transform, initial_name)
        if not flatten_transform(initial_transform).IsLinear() and "bspline" in kinds:
            raise InputError(f"{initial_name} is non-linear (e.g. an affine + B-spline result); a B-spline model "
                             "needs a linear one: start from its affine part (`istn register` writes it as affine.tfm beside "
                             "transform.h5) or use affine models only")


def check_api_types(model: object = None, initial_transform: object = None, threads: object = None,
                    models: object = None, given_transform: object = None, bias_correct: object = None) -> None:
    """`InputError` for an argument of the Python API of the wrong kind (what a script may pass by mistake: a
    path for a model, a matrix for a transform), before it fails deep inside."""
    for m in ([model] if model is not None else []) + list(models or []):
        if not isinstance(m, LoadedModel):
            raise InputError(f"a model must be loaded first (istn.export.load_model(path)), got {type(m).__name__}")
    for what, value in (("the initial transform", initial_transform),
                        ("given_transform (where the moving image was placed)", given_transform)):
        if value is not None and not isinstance(value, sitk.Transform):
            raise InputError(f"{what} must be a SimpleITK transform (e.g. sitk.ReadTransform(path)), got "
                             f"{type(value).__name__}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or threads < 1):
        raise InputError(f"register() 'threads' must be a whole number >= 1 (None: the cores there are), "
                         f"got {threads!r}")
    if bias_correct is not None and not isinstance(bias_correct, (bool, np.bool_)):
        raise InputError(f"register() 'bias_correct' must be True or False, got {bias_correct!r}")


def check_transform_usable(transform: sitk.Transform, what: str) -> None:
    """`InputError` for a transform no image can be resampled through: values that are not finite, or a linear
    part that is singular (every point onto a plane)."""
    from .io import transform_problem

    problem = transform_problem(transform)
    if problem:
        raise InputError(f"{what} {problem}")


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    model: LoadedModel,
    *,
    iterations: int | None = None,
    lr: float | None = None,
    device: str = "auto",
    initial_transform: sitk.Transform | None = None,
    callback: Callable[[IterationInfo], None] | None = None,
    cancel: CancelFlag = None,
    threads: int | None = None,
    bending: float | None = None,
    tolerance: float | None = None,
    symmetric: bool = True,
    coarse_iterations: int | None = None,
    refine_layers: str | None = None,
    region_margin_mm: float | None = None,
    polish: int | None = None,
    anchor: float | None = None,
    passes: int | None = None,
    given_transform: sitk.Transform | None = None,
    more_passes: bool = True,
    bias_correct: bool = False,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with ``model``: one pass, then up to ``iterations`` of refinement
    (default: the model's ``refinement.iterations``, else `DEFAULT_ITERATIONS`), then up to ``polish``.

    ``lr`` defaults to the model's training learning rate. ``device``: auto |
    cpu | cuda; a GPU out-of-memory falls back to the CPU with a warning.
    ``callback(IterationInfo)`` is called after every refinement iteration;
    ``cancel`` (an Event or a callable) stops refinement within one iteration
    and still returns a valid result (``cancelled=True``).

    ``bending`` (B-spline models): weight of the bending energy (mm^2, see
    `istn.losses.bending_energy`) added to the refinement loss; default: the
    model's ``refinement.bending`` metadata (chosen on validation pairs), else 0.
    ``tolerance``: stop refinement once the loss improves by less than this
    (relative) over `CONVERGENCE_WINDOW` iterations; default: the model's
    ``refinement.tolerance``, else 0 (run all ``iterations``).
    ``symmetric``: start refinement from the inverse-consistent one pass (the
    network run on both orders of the pair), so that an image registered to
    itself starts, and stays, at the identity.
    ``coarse_iterations``: refine first on a half-resolution copy of the ITN
    maps for up to this many of the ``iterations`` (`refine`); default: the
    model's ``refinement.coarse_iterations``, else 0.
    ``refine_layers``: "all" STN weights (the paper) or only its fully connected
    layers, "fc" (`refine`: same transforms reachable, a cheaper iteration);
    default: the model's ``refinement.layers``, else "all".
    ``anchor`` (B-spline models): weight (mm^-2) of the anchoring term
    (`istn.losses.anchor_energy`): the mean squared displacement of the
    control points whose cells hold no structure of the fixed map, so that
    away from the structures the B-spline keeps the affine's result; default:
    the model's ``refinement.anchor``, else 0.
    ``region_margin_mm``: compare the maps only in the box around the fixed
    image's structures grown by this margin (`refine`; bounded maps only);
    ``inf``: the whole grid; default: the model's
    ``refinement.region_margin_mm``, else the whole grid.
    ``polish``: after the ``iterations``, up to this many iterations polishing
    the transform's parameters themselves (Gauss-Newton for an affine, L-BFGS
    for a B-spline; `refine`), so that the result no longer depends on where
    Adam stopped; default: the model's ``refinement.polish`` (none with
    ``iterations=0``: a one pass stays a one pass), else 0 (Adam only, the
    paper).
    ``passes``: run the network again on the moving image through the refined
    result and refine again from its (inverse-consistent) one pass, this many
    passes in all, each kept only where it lowers the loss on its own look's
    maps. An affine: the moving image pulled into the fixed grid through the
    affine so far, the residual affine composed with it (exact; a head turned
    beyond the training range is seen nearer it). A B-spline: the residual
    added to the refined parameters, still ONE B-spline on the same grid,
    refined on the unwarped maps (so the sum's approximation of the
    composition is refined away). Default: the model's
    ``refinement.passes``, else 1 (the paper). Ignored with ``iterations=0``.
    ``more_passes`` (affine models): after the ``passes``, look again while the
    last look moved the fixed image's foreground by more than `UNSETTLED_MM`,
    up to `MAX_AFFINE_PASSES` in all (a head turned well beyond the training
    range); False: exactly ``passes``. A last look that still moved it that
    far is warned of.
    ``bias_correct``: divide both images' working copies by their smooth
    intensity bias (N4, `istn.data.bias_corrected`) before the network sees
    them: raw scans with coil shading (1-4 s more per image; the outputs are
    resampled from your images as they are).
    ``given_transform``: where the user placed the moving image (fixed world -> moving world), the baseline of
    ``information["as_given"]`` and of the information self-check; default None: the images as stored. A chain
    (`istn.chain.register_chain`) passes the user's start to every stage, not the previous stage's result. A stage
    that starts there returns it (``start_kept``) when its result fails only the information check and its maps
    gained almost nothing over it (`NO_GAIN`): a pair aligned already.
    """
    t_start = time.perf_counter()
    check_api_types(model=model, initial_transform=initial_transform, threads=threads, bias_correct=bias_correct)
    if given_transform is not None:
        check_api_types(given_transform=given_transform)
        given_transform = flatten_transform(given_transform)
    if cancel is not None and not (hasattr(cancel, "is_set") or callable(cancel)):
        raise InputError(f"register() 'cancel' must be a threading.Event, a callable returning True to stop, or None; "
                         f"got {cancel!r}")
    device = str(device)  # a torch.device too
    # checked and prepared once per image object (istn.inputs): a later stage on the same images reuses it
    cfg = model.config
    fixed, moving = (prepare_image(image, cfg.grid_spacing, model.intensity, model.intensity_foreground,
                                   cfg.centre_on_foreground, what, bool(bias_correct)) for image, what in
                     ((fixed, "fixed image"), (moving, "moving image")))
    check_register_inputs(fixed.image, moving.image, [model], iterations=iterations, lr=lr, device=device,
                          initial_transform=initial_transform, bending=bending, tolerance=tolerance,
                          coarse_iterations=coarse_iterations, refine_layers=refine_layers,
                          region_margin_mm=region_margin_mm, polish=polish, anchor=anchor, passes=passes)
    if initial_transform is not None:  # any linear class -> AffineTransform; composites flat (istn.transforms)
        initial_transform = flatten_transform(initial_transform)
    defaults = model.meta.get("refinement", {})
    if lr is None:
        lr = float(model.meta.get("training", {}).get("config", {}).get("lr", 1e-3))
    if bending is None:
        bending = float(defaults.get("bending", 0.0)) if model.transform_type == "bspline" else 0.0
    if anchor is None:
        anchor = float(defaults.get("anchor", 0.0)) if model.transform_type == "bspline" else 0.0
    if model.transform_type != "bspline":  # B-spline terms: an affine stage has neither (recorded as 0)
        bending = anchor = 0.0
    if tolerance is None:
        tolerance = float(defaults.get("tolerance", 0.0))
    if coarse_iterations is None:
        coarse_iterations = int(defaults.get("coarse_iterations", 0))
    if refine_layers is None:
        refine_layers = refinement_layers(model)
    if region_margin_mm is None:
        region_margin_mm = model_region_margin(model)
    if iterations is None:
        iterations = int(defaults.get("iterations", DEFAULT_ITERATIONS))
    if polish is None:  # the model's polish finishes its refinement: none after a one pass (iterations 0)
        polish = int(defaults.get("polish", 0)) if iterations > 0 else 0
    if passes is None:
        passes = int(defaults.get("passes", 1))
    if iterations == 0:  # a second look starts from a refined result
        passes = 1
    dev = resolve_device(device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads(model.ndim))  # the cores this process really has (istn.threads)
    opts = dict(bending=bending, anchor=anchor, tolerance=tolerance, symmetric=symmetric, t_start=t_start,
                given_transform=given_transform,
                coarse_iterations=int(coarse_iterations), refine_layers=refine_layers,
                region_margin_mm=float(region_margin_mm), polish=int(polish), passes=int(passes),
                more_passes=bool(more_passes))
    try:
        # refinement changes the network's weights in place (and restores them): one registration per model at a
        # time, so that threads sharing a loaded model wait for each other instead of mixing their weights
        with model.lock:
            try:
                result = _register(fixed, moving, model, iterations, lr, dev, initial_transform, callback, cancel,
                                   **opts)
            except torch.cuda.OutOfMemoryError:
                if dev.type != "cuda":
                    raise
                torch.cuda.empty_cache()
                result = _register(fixed, moving, model, iterations, lr, torch.device("cpu"), initial_transform,
                                   callback, cancel, **opts)
                result.warnings.append("GPU out of memory: the registration ran on the CPU instead")
            result.bias_corrected = bool(bias_correct)
            return result
    finally:
        torch.set_num_threads(threads_before)


def _affine_midpoint(forward: torch.Tensor, backward: torch.Tensor, d: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The inverse-consistent start of an affine pass: ``theta -> theta @ K``, the fixed correction that makes the
    network's prediction ``forward`` (fixed -> moving maps) the midpoint of it and the inverse of ``backward``
    (the swapped pair): ``(1, d, d + 1)`` parameters."""
    th = forward[0].cpu().double().numpy()
    mid = _inverse_consistent_theta(th, backward[0].cpu().double().numpy())
    k = torch.from_numpy(np.linalg.inv(np.vstack([th, np.eye(d + 1)[d:]])) @ mid).to(forward)

    def to_midpoint(params: torch.Tensor) -> torch.Tensor:
        return params @ k

    return to_midpoint


def _identity_theta(params: torch.Tensor) -> torch.Tensor:
    """The identity affine in the shape of ``params`` ``(1, d, d + 1)``: no residual."""
    d = params.shape[-2]
    return torch.eye(d, d + 1, dtype=params.dtype, device=params.device).expand_as(params).clone()


def _register(fixed_in: PreparedImage, moving_in: PreparedImage, model, iterations, lr, dev, initial_transform,
              callback, cancel, *, bending: float, anchor: float, tolerance: float, symmetric: bool,
              t_start: float, coarse_iterations: int, refine_layers: str,
              region_margin_mm: float, polish: int, passes: int = 1,
              given_transform: sitk.Transform | None = None, more_passes: bool = False) -> RegistrationResult:
    timings: dict[str, float] = {}
    cfg = model.config
    module = model.to(dev).module
    fixed, moving = fixed_in.image, moving_in.image  # the working copies (anti-aliased when much finer than the grid)
    win_f, win_m = fixed_in.window, moving_in.window
    grid_f, grid_m = network_grid(fixed, cfg, fixed_in.centre), network_grid(moving, cfg, moving_in.centre)
    d = model.ndim
    regulariser = None

    if model.transform_type == "affine":
        def affine_look(start: sitk.Transform | None):
            """The network's input for an affine from ``start`` (None: the moving image on its own grid; else pulled
            into the fixed grid through ``start``), and the world transform of its parameters."""
            src_grid = grid_m if start is None else grid_f
            look = image_to_tensor(moving, src_grid, win_m, start)

            def world(params: torch.Tensor) -> sitk.Transform:
                a = theta_to_world(params[0].detach().cpu().double().numpy(), grid_f, src_grid)
                if start is None:
                    return matrix_to_sitk_affine(a)
                try:
                    return matrix_to_sitk_affine(sitk_affine_to_matrix(start) @ a)
                except (RuntimeError, TypeError):
                    return compose(matrix_to_sitk_affine(a), start)
            return look, world

        source, to_world = affine_look(initial_transform)
        target = image_to_tensor(fixed, grid_f, win_f)
        work_grid = grid_f

    else:
        a_mat = np.eye(d + 1) if initial_transform is None else _linear_matrix(initial_transform, d)
        a_tx = matrix_to_sitk_affine(a_mat)
        work_grid = moving_map_grid(fixed_in, moving_in, model, initial_transform)
        source = image_to_tensor(moving, work_grid, win_m)
        target = image_to_tensor(fixed, work_grid, win_f, matrix_to_sitk_affine(np.linalg.inv(a_mat)))
        spacing_vox = cfg.cp_spacing_voxels

        def to_world(params: torch.Tensor) -> sitk.Transform:
            b = bspline_to_world(params[0].detach().cpu().double().numpy(), work_grid, spacing_vox)
            return compose(a_tx, b)

    timings["prepare"] = time.perf_counter() - t_start
    t0 = time.perf_counter()
    adjust = None
    with torch.no_grad():
        source, target = source.to(dev), target.to(dev)
        s_map = model.representation(source)  # a frozen, inference-optimised copy of the ITN on the CPU
        t_map = model.representation(target)
        split = refine_layers == "fc"
        pooled = None
        if split:  # the one pass through the split STN, its convolutions inference-optimised (no gradient needed);
            # FC-only refinement reuses their output (refining every weight starts from the module's own pass)
            pooled = model.stn_pooled(s_map, t_map)
            forward = module.predict_from_pooled(pooled)
        else:
            forward = module.predict(s_map, t_map)
        if symmetric:
            backward = (module.predict_from_pooled(model.stn_pooled(t_map, s_map)) if split
                        else module.predict(t_map, s_map))
            if model.transform_type == "affine":
                to_midpoint = _affine_midpoint(forward, backward, d)
            else:
                offset = -(forward + backward) / 2.0

                def to_midpoint(params: torch.Tensor) -> torch.Tensor:
                    return params + offset
            adjust = to_midpoint
        params0 = adjust(forward) if adjust is not None else forward
    if model.transform_type == "bspline" and (bending > 0 or anchor > 0):
        half = torch.tensor([s * (n - 1) / 2.0 for s, n in zip(work_grid.spacing, work_grid.size)],
                            dtype=torch.float32, device=dev)
        anchored = anchored_control_points(t_map, spacing_vox, MAP_DISPLAY_THRESHOLD) if anchor > 0 else None

        def penalty(params: torch.Tensor) -> torch.Tensor:
            total = params.new_zeros(())
            if bending > 0:
                total = total + bending * bending_energy(params, cfg.cp_spacing_mm, half)
            if anchored is not None:
                total = total + anchor * anchor_energy(params, anchored, half)
            return total
        regulariser = penalty
    timings["one_pass"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    budget = iterations + polish  # per pass: the callback counts on across passes
    margin = math.ceil(region_margin_mm / cfg.grid_spacing - 1e-9) if np.isfinite(region_margin_mm) else None
    compared = dict(layers=refine_layers, region_margin=margin,  # what every pass compares, and how
                    channel_weights=model.meta.get("refinement", {}).get("channel_weights"))

    def run_pass(k: int, s_map_k, pooled_k, adjust_k, regulariser_k, to_world_k) -> RefineOutput:
        def pass_callback(info: IterationInfo) -> None:
            callback(IterationInfo(k * budget + info.iteration, passes * budget, info.loss, info.params,
                                   info._to_world, pass_number=k + 1, passes=passes))

        return refine(module, s_map_k, t_map, iterations, lr, pass_callback if callback is not None else None, cancel,
                      to_world_k, adjust=adjust_k, regulariser=regulariser_k, tolerance=tolerance,
                      coarse_iterations=coarse_iterations, polish=polish,
                      pooled=pooled_k if refine_layers == "fc" else None, **compared)

    out = run_pass(0, s_map, pooled, adjust, regulariser, to_world)
    ran = [out]  # every pass's own refinement (a later pass may be dropped for the one before: its climb still counts)
    params, losses = out.params, list(out.losses)  # the B-spline so far; objectives over all passes
    final = to_world(params)
    best_iteration, coarse_run, polished = out.best_iteration, out.coarse_iterations, out.polish_iterations
    pass_iterations = [(len(out.losses), out.coarse_iterations, out.polish_iterations)]
    affine = model.transform_type == "affine"
    grid_mm = min(cfg.grid_size) * cfg.grid_spacing
    scale = scale_warning(fixed_in, moving_in, grid_mm)  # a header not in mm: no look settles a head 17 mm across
    more_passes = more_passes and scale is None
    pass_moves: list[float] = []  # how far each later look moved the result
    where_f = foreground_points(fixed, grid_f, win_f) if affine and passes > 1 else None
    k = 0
    while k + 1 < passes:
        k += 1
        if out.cancelled:
            break
        # The network's next look. Affine: the moving image pulled into the fixed grid through the result so far,
        # and an affine for what is left, composed with it (exact): a head posed beyond the training range is seen
        # nearer it. B-spline: the moving image through the B-spline so far, and a B-spline for what is left; the
        # result is the SUM of the two on the same control grid (the composition to first order: the difference
        # is the product of the first's gradient and the second, small).
        with torch.no_grad():
            if affine:
                look, to_world_k = affine_look(final)
                s_map_k = model.representation(look.to(dev))
            else:
                s_map_k = model.representation(module.warp(source, module.sampling_grid(params)))
            pooled_k = model.stn_pooled(s_map_k, t_map) if split else None
            f_k = module.predict_from_pooled(pooled_k) if split else module.predict(s_map_k, t_map)
            adjust_k = None
            if symmetric:  # inverse-consistent, as the first pass: the identity for maps that already match
                b_k = module.predict_from_pooled(model.stn_pooled(t_map, s_map_k)) if split else module.predict(
                    t_map, s_map_k)
                if affine:
                    adjust_k = _affine_midpoint(f_k, b_k, d)
                else:
                    def adjust_k(p: torch.Tensor, offset_k=-(f_k + b_k) / 2.0) -> torch.Tensor:
                        return p + offset_k
        prev = params
        if not affine:
            def to_world_k(r: torch.Tensor, prev=prev) -> sitk.Transform:
                return to_world(prev + r)

        def regulariser_k(r: torch.Tensor, prev=prev) -> torch.Tensor:
            return regulariser(prev + r)

        reg_k = regulariser_k if regulariser is not None else None
        out_k = run_pass(k, s_map_k, pooled_k, adjust_k, reg_k, to_world_k)
        ran.append(out_k)
        coarse_run, polished = coarse_run + out_k.coarse_iterations, polished + out_k.polish_iterations
        pass_iterations.append((len(out_k.losses), out_k.coarse_iterations, out_k.polish_iterations))
        # never worse than the result so far (no residual: an identity affine, a zero B-spline), on this look's maps
        none_left = _identity_theta if affine else torch.zeros_like
        stay = refine(module, s_map_k, t_map, 0, lr, None, None, to_world_k, adjust=none_left, regulariser=reg_k,
                      pooled=pooled_k if refine_layers == "fc" else None, **compared)
        before = final
        if out_k.final_loss <= stay.final_loss:
            best_iteration = len(losses) + out_k.best_iteration
            if not affine:  # the B-spline's parameters so far: its next look warps through them
                params = prev + out_k.params
            final = to_world_k(out_k.params)
            out = out_k
        else:
            out = dataclasses.replace(stay, cancelled=out_k.cancelled, converged=out_k.converged)
        losses += list(out_k.losses)
        if affine:
            pass_moves.append(largest_distance(where_f, before, final) if final is not before else 0.0)
            if more_passes and k + 1 == passes < MAX_AFFINE_PASSES and pass_moves[-1] > UNSETTLED_MM:
                passes += 1  # the pose is not settled yet: another look
    timings["refine"] = time.perf_counter() - t0

    # The information self-check: the images through the result against the images as given. A stage started from
    # the images as given whose result leaves them less alike, while its maps match no closer than as given, returns
    # them as given (`NO_GAIN`): a pair aligned already, which registration could only move by its own imprecision.
    # Only where the maps are to be trusted (the other self-checks pass): else the failure stands, as it is
    t_info = time.perf_counter()
    volume_ratio = map_volume_ratios(s_map, t_map) if model.config.itn_output == "sigmoid" else np.zeros(0)
    given, kept = image_information(fixed, moving, grid_f, (win_f, win_m), [given_transform, final])
    information = _information_check(given, kept, lambda: largest_move(fixed, grid_f, win_f, given_transform, final),
                                     NEGLIGIBLE_MOVE * min(fixed.GetSpacing()))
    # the validation pairs' lowest refined loss: the scale of what the model's maps can tell apart
    best_low = model.meta.get("validation", {}).get("refinement_loss", {}).get("refined", {}).get("min")
    start_kept = False
    if (information and not out.cancelled and best_low is not None
            and _starts_as_given(initial_transform, given_transform, d)
            and _self_check(model, out.similarity, refined=bool(out.losses)) is None
            and _map_volume_check(model, volume_ratio) is None):
        if affine:
            def looked(t: sitk.Transform) -> RefineOutput:  # the maps through t, compared with no residual
                look, to_world_t = affine_look(t)
                with torch.no_grad():
                    s = model.representation(look.to(dev))
                return refine(module, s, t_map, 0, lr, None, None, to_world_t, adjust=_identity_theta,
                              pooled=model.stn_pooled(s, t_map) if split else None, **compared)

            # a copy of the user's start (the result is the caller's to keep), else the identity
            start = matrix_to_sitk_affine(linear_matrix(given_transform) if given_transform is not None
                                          else np.eye(d + 1))
            at_start, at_result = looked(start), looked(final).similarity
        else:  # the zero B-spline is the start (its affine part is the images as given), on the first look's maps
            def at(q: torch.Tensor) -> RefineOutput:
                return refine(module, s_map, t_map, 0, lr, None, None, to_world, adjust=lambda _: q,
                              regulariser=regulariser, pooled=pooled if split else None, **compared)

            zero = torch.zeros_like(params)
            start, at_start, at_result = to_world(zero), at(zero), at(params).similarity
        if at_start.similarity - at_result < NO_GAIN * float(best_low):
            final, start_kept, best_iteration, information, left = start, True, 0, None, kept
            out = dataclasses.replace(at_start, cancelled=out.cancelled, converged=out.converged)
            kept = image_information(fixed, moving, grid_f, (win_f, win_m), [final])[0]
    information_seconds = time.perf_counter() - t_info

    # Maps for display, each on a grid of its own image's space: the moving head's in the fixed head's pose
    # (`moving_map_grid`), for an affine stage one more look of the ITN after its result, made when first asked for.
    with torch.no_grad():
        if model.transform_type == "affine":
            fixed_map = _map_image(t_map, grid_f)
            pose = moving_map_grid(fixed_in, moving_in, model, initial_transform, result=final)

            def moving_map_fn(pose=pose) -> sitk.Image:
                with torch.no_grad():
                    return _map_image(model.representation(image_to_tensor(moving, pose, win_m).to(dev)), pose)

            moving_map = None
        else:  # s_map lies on work_grid in moving space; t_map is the fixed map pulled there through A^-1
            moving_map, moving_map_fn = _map_image(s_map, work_grid), None
            fixed_map = warp_image(_map_image(t_map, work_grid), grid_f, a_tx)
    warnings_: list[str] = []
    # Adam's first step moves every weight by ~lr: from an exact start (an image and itself) any step climbs,
    # harmlessly (the best iterate is kept), so a start far below every validation pair's refined loss is quiet (a
    # merely good start is not: a learning rate too high there leaves the one pass unrefined, and should be said)

    def climbed(o: RefineOutput):
        low = EXACT_START * float(best_low) if best_low is not None else EXACT_LOSS  # a model without validation
        at_optimum = o.best_iteration == 1 and o.final_loss <= max(low, EXACT_LOSS)
        return None if at_optimum else loss_rise(o.losses, o.best_iteration, o.coarse_iterations, o.final_loss)

    rise = next((r for r in map(climbed, ran) if r is not None), None)
    if rise is not None:  # Adam climbed away: learning rate too high
        low, high, at = rise
        warnings_.append(
            f"refinement raised the loss (from {low:.4g} at iteration {at} to {high:.4g}); the best iterate was "
            f"kept: a lower learning rate may help (now {lr:g})")
    if pass_moves and pass_moves[-1] > UNSETTLED_MM and not out.cancelled and scale is None:
        warnings_.append(
            f"the affine's last look (pass {passes} of {passes}) still moved the head by {pass_moves[-1]:.0f} mm: its "
            f"pose may lie beyond what the model was trained for (heads turned more than ~40 degrees); check the "
            f"result" + ("" if more_passes else ", or allow more passes"))
    spacing_suspect = False
    if model.transform_type == "affine" or initial_transform is None:  # the stage that estimates the linear part
        # not self-checks: another model would not do better (no second try for them)
        # a head in cm is a slab too: the scale is the news
        slab = None if scale else slab_warning(fixed, moving, SLAB_GRID_FRACTION * grid_mm)
        spacing_suspect = scale is not None
        warnings_ += [w for w in (scale, slab, label_map_warning(fixed_in, moving_in)) if w]
        warnings_ += [f"the {role} image holds an object apart from the head ({100 * p.detached:.0f} % of its "
                      "foreground, more than 8 mm from it: a phantom, a marker block, a second head?); it was left "
                      "out, and the largest object registered: check that this was the anatomy"
                      for role, p in (("fixed", fixed_in), ("moving", moving_in)) if p.detached > 0]
    if start_kept:
        warnings_.append(
            f"the images were aligned as given, as far as the model can tell: its result left them less alike "
            f"(mutual information {left:.3f} vs {given:.3f}) and its maps matched no closer than as given, so the "
            "images are returned as given" + (" (the identity transform)" if given_transform is None else
                                              " (your start)"))
    t_info = time.perf_counter()
    failed = []  # the self-checks that say the pair is unlike what the model was made for (`SELF_CHECKS`)
    for name, check in (("loss", _self_check(model, out.similarity, refined=bool(out.losses))),
                        ("map_volume", _map_volume_check(model, volume_ratio)),
                        ("information", information)):
        if check:
            warnings_.append(check)
            failed.append(name)
    timings["self_check"] = information_seconds + time.perf_counter() - t_info
    timings["total"] = time.perf_counter() - t_start
    return RegistrationResult(
        transform=final,
        one_pass_transform=to_world(params0),
        initial_transform=initial_transform,
        transform_type=model.transform_type,
        fixed_map=fixed_map,
        _moving_map=moving_map,
        _moving_map_fn=moving_map_fn,
        loss_one_pass=out.start_loss,
        loss_final=out.final_loss,
        losses=losses,
        iterations=len(losses),
        cancelled=out.cancelled,
        device=str(dev),
        timings=timings,
        warnings=warnings_,
        model_meta=copy.deepcopy(model.meta),
        model_path=str(model.path),
        converged=out.converged,
        best_iteration=best_iteration,
        similarity_final=out.similarity,
        coarse_iterations=coarse_run,
        refine_layers=refine_layers,
        region_margin_mm=region_margin_mm if np.isfinite(region_margin_mm) else None,
        polish_iterations=polished,
        iterations_allowed=passes * (iterations + polish),
        map_volume_ratio=[float(r) for r in volume_ratio],
        information={"as_given": given, "result": kept},
        self_checks_failed=failed,
        passes=passes,
        pass_moves=pass_moves,
        spacing_suspect=spacing_suspect,
        pass_iterations=pass_iterations,
        bending=bending,
        anchor=anchor,
        start_kept=start_kept,
    )
