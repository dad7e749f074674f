"""Registration of one pair: one pass of the network, then test-time refinement.

Refinement (the point of ISTNs): the STN is optimised on this pair alone to
minimise ``MSE(T(s'), t')`` with the ITN frozen; no annotations are needed.
The model's trained weights are restored afterwards, so every pair (and every
second Apply in Slicer) starts from the same trained network.

Geometry. The network runs on internal grids (`istn.data.network_grid`): the
model's size and spacing, centred on each image, in the image's direction.
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

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from .data import image_to_tensor, intensity_window, network_grid
from .errors import InputError
from .export import LoadedModel
from .geometry import Grid
from .io import check_image
from .losses import refinement_loss
from .training import resolve_device
from .transforms import (bspline_to_world, compose, flatten_transform, matrix_to_sitk_affine, sitk_affine_to_matrix,
                         theta_to_world)

CancelFlag = Union[threading.Event, Callable[[], bool], None]


@dataclass
class IterationInfo:
    """What the per-iteration callback receives."""

    iteration: int  # 1-based
    iterations: int
    loss: float  # MSE(T(s'), t') of the parameters used in this iteration
    params: torch.Tensor  # those parameters (normalised units, detached)
    _to_world: Callable[[torch.Tensor], sitk.Transform] | None = None

    def transform(self) -> sitk.Transform:
        """The current world transform (fixed -> moving points); built on demand."""
        if self._to_world is None:
            raise RuntimeError("IterationInfo.transform() is only available from register()")
        return self._to_world(self.params)


@dataclass
class RefineOutput:
    params: torch.Tensor  # final parameters, detached
    losses: list[float]  # loss of each iteration
    final_loss: float
    cancelled: bool


def is_cancelled(cancel: CancelFlag) -> bool:
    """True when ``cancel`` (an Event, a callable or None) asks to stop."""
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def refine(
    module: torch.nn.Module,
    source_map: torch.Tensor,
    target_map: torch.Tensor,
    iterations: int = 50,
    lr: float = 1e-3,
    callback: Callable[[IterationInfo], None] | None = None,
    cancel: CancelFlag = None,
    to_world: Callable[[torch.Tensor], sitk.Transform] | None = None,
) -> RefineOutput:
    """Test-time refinement of the STN of ``module`` on one pair.

    ``source_map``/``target_map`` ``(1, K, *S)``: the frozen ITN outputs (computed
    once by the caller). Fresh Adam on the STN weights; ``cancel`` is checked
    before every iteration, so a cancel stops within one iteration and the
    result is the transform of the current weights. The STN's weights are
    restored before returning.
    """
    if iterations < 0:
        raise ValueError(f"refine() 'iterations' must be >= 0, got {iterations}")
    stn_params = list(module.stn.parameters())
    saved = [p.detach().clone() for p in stn_params]
    grad_flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in grad_flags:
        p.requires_grad_(False)
    for p in stn_params:
        p.requires_grad_(True)
    source_map, target_map = source_map.detach(), target_map.detach()
    losses: list[torch.Tensor] = []
    cancelled = False
    try:
        try:  # the fused kernel: ~15 % less time per refinement iteration on CPU (benchmarks/results/speed.md)
            optimizer = torch.optim.Adam(stn_params, lr=lr, fused=True)
        except (RuntimeError, TypeError):
            optimizer = torch.optim.Adam(stn_params, lr=lr)
        for it in range(iterations):
            if is_cancelled(cancel):
                cancelled = True
                break
            params = module.predict(source_map, target_map)
            loss = refinement_loss(module.warp(source_map, module.sampling_grid(params)), target_map)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            if callback is not None:
                callback(IterationInfo(it + 1, iterations, float(loss.detach()), params.detach(), to_world))
        with torch.no_grad():
            params = module.predict(source_map, target_map)
            final = float(refinement_loss(module.warp(source_map, module.sampling_grid(params)), target_map))
    finally:
        with torch.no_grad():
            for p, s in zip(stn_params, saved):
                p.copy_(s)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
    return RefineOutput(params.detach(), [float(v) for v in losses], final, cancelled)


@dataclass
class RegistrationResult:
    """Everything one registration produced. Transforms map fixed world points to moving world points."""

    transform: sitk.Transform  # final (after refinement)
    one_pass_transform: sitk.Transform  # network prediction before refinement
    initial_transform: sitk.Transform | None
    transform_type: str
    fixed_map: sitk.Image  # ITN(fixed) on the fixed image's internal grid
    moving_map: sitk.Image  # ITN(moving) on the moving image's internal grid (not warped)
    loss_one_pass: float
    loss_final: float
    losses: list[float]
    iterations: int  # iterations actually run
    cancelled: bool
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    model_meta: dict = field(default_factory=dict)

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
            "cancelled": self.cancelled,
            "device": self.device,
            "timings_s": self.timings,
            "warnings": self.warnings,
            "model": self.model_meta,
        }


def warp_image(
    moving: sitk.Image, reference: sitk.Image | Grid, transform: sitk.Transform, interpolator: int = sitk.sitkLinear,
    default_value: float | None = 0.0,
) -> sitk.Image:
    """Resample ``moving`` onto ``reference``'s grid; ``transform`` maps reference points to moving points.

    ``default_value`` fills the points that fall outside ``moving``; ``None``
    uses ``moving``'s minimum, its background (-1000 for CT, not 0).
    """
    ref = reference.reference_image() if isinstance(reference, Grid) else reference
    if default_value is None:
        default_value = float(sitk.GetArrayViewFromImage(moving).min())
    return sitk.Resample(moving, ref, transform, interpolator, float(default_value), moving.GetPixelID())


def _map_image(maps: torch.Tensor, grid: Grid) -> sitk.Image:
    """``(1, K, *S)`` ITN output -> scalar image on ``grid`` (channels summed: the union of the structures)."""
    return grid.image_from_array(maps[0].sum(0).detach().cpu().numpy().astype(np.float32))


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
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise InputError(f"register() 'iterations' must be a whole number >= 0, got {iterations!r}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float, np.number))
                           or not np.isfinite(lr) or lr <= 0):
        raise InputError(f"register() 'lr' must be a finite number > 0, got {lr!r}")
    check_device(device)
    if initial_transform is not None:
        if initial_transform.GetDimension() != d:
            raise InputError(f"{initial_name} is {initial_transform.GetDimension()}D but the images are {d}D")
        if not flatten_transform(initial_transform).IsLinear() and "bspline" in kinds:
            raise InputError(f"{initial_name} is non-linear (e.g. an affine + B-spline result); a B-spline model "
                             "needs a linear one: start from its affine part (`istn register` writes it as affine.tfm beside "
                             "transform.h5) or use affine models only")


def check_device(device: str) -> None:
    """`InputError` unless ``device`` is auto, cpu, cuda or cuda:N and that device exists here."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device '{device}' is not one of auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device '{device}' was asked for but no CUDA GPU is available (use auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise InputError(f"device '{device}' is not one of auto, cpu, cuda, cuda:N")


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    model: LoadedModel,
    *,
    iterations: int = 50,
    lr: float | None = None,
    device: str = "auto",
    initial_transform: sitk.Transform | None = None,
    callback: Callable[[IterationInfo], None] | None = None,
    cancel: CancelFlag = None,
    threads: int | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with ``model``: one pass, then ``iterations`` of refinement.

    ``lr`` defaults to the model's training learning rate. ``device``: auto |
    cpu | cuda; a GPU out-of-memory falls back to the CPU with a warning.
    ``callback(IterationInfo)`` is called after every refinement iteration;
    ``cancel`` (an Event or a callable) stops refinement within one iteration
    and still returns a valid result (``cancelled=True``).
    """
    fixed = check_image(fixed, "fixed image")
    moving = check_image(moving, "moving image")
    if fixed.GetDimension() != moving.GetDimension():
        raise InputError(f"fixed image is {fixed.GetDimension()}D but moving image is {moving.GetDimension()}D")
    if fixed.GetDimension() != model.ndim:
        raise InputError(f"the images are {fixed.GetDimension()}D but the model '{model.path.name}' is {model.ndim}D")
    check_register_inputs(fixed, moving, [model], iterations=iterations, lr=lr, device=device,
                          initial_transform=initial_transform)
    if initial_transform is not None:  # any linear class -> AffineTransform; composites flat (istn.transforms)
        initial_transform = flatten_transform(initial_transform)
    if lr is None:
        lr = float(model.meta.get("training", {}).get("config", {}).get("lr", 1e-3))
    dev = resolve_device(device)
    threads_before = torch.get_num_threads()
    # Tiny 2D networks run fastest on one thread; 3D ones use the cores they get.
    torch.set_num_threads(threads or (1 if model.ndim == 2 else max(1, min(8, os.cpu_count() or 1))))
    try:
        try:
            return _register(fixed, moving, model, iterations, lr, dev, initial_transform, callback, cancel)
        except torch.cuda.OutOfMemoryError:
            if dev.type != "cuda":
                raise
            torch.cuda.empty_cache()
            result = _register(fixed, moving, model, iterations, lr, torch.device("cpu"), initial_transform, callback, cancel)
            result.warnings.append("GPU out of memory: the registration ran on the CPU instead")
            return result
    finally:
        torch.set_num_threads(threads_before)


def _register(fixed, moving, model, iterations, lr, dev, initial_transform, callback, cancel) -> RegistrationResult:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    cfg = model.config
    module = model.to(dev).module
    win_f = intensity_window(sitk.GetArrayViewFromImage(fixed), *model.intensity)
    win_m = intensity_window(sitk.GetArrayViewFromImage(moving), *model.intensity)
    grid_f, grid_m = network_grid(fixed, cfg), network_grid(moving, cfg)
    d = model.ndim

    if model.transform_type == "affine":
        if initial_transform is None:
            src_grid = grid_m
            source = image_to_tensor(moving, grid_m, win_m)
        else:  # the moving image is pulled into the fixed grid through the initial transform
            src_grid = grid_f
            source = image_to_tensor(moving, grid_f, win_m, initial_transform)
        target = image_to_tensor(fixed, grid_f, win_f)
        work_grid = grid_f

        def to_world(params: torch.Tensor) -> sitk.Transform:
            a = theta_to_world(params[0].detach().cpu().double().numpy(), grid_f, src_grid)
            if initial_transform is None:
                return matrix_to_sitk_affine(a)
            try:
                return matrix_to_sitk_affine(sitk_affine_to_matrix(initial_transform) @ a)
            except (RuntimeError, TypeError):
                return compose(matrix_to_sitk_affine(a), initial_transform)

    else:
        a_mat = np.eye(d + 1) if initial_transform is None else _linear_matrix(initial_transform, d)
        a_tx = matrix_to_sitk_affine(a_mat)
        work_grid = aligned_grid(grid_f, a_mat)
        source = image_to_tensor(moving, work_grid, win_m)
        target = image_to_tensor(fixed, work_grid, win_f, matrix_to_sitk_affine(np.linalg.inv(a_mat)))
        spacing_vox = cfg.cp_spacing_voxels

        def to_world(params: torch.Tensor) -> sitk.Transform:
            b = bspline_to_world(params[0].detach().cpu().double().numpy(), work_grid, spacing_vox)
            return compose(a_tx, b)

    timings["prepare"] = time.perf_counter() - t_start
    t0 = time.perf_counter()
    with torch.no_grad():
        source, target = source.to(dev), target.to(dev)
        s_map = module.representation(source)
        t_map = module.representation(target)
        params0 = module.predict(s_map, t_map)
        loss0 = float(refinement_loss(module.warp(s_map, module.sampling_grid(params0)), t_map))
    timings["one_pass"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = refine(module, s_map, t_map, iterations, lr, callback, cancel, to_world)
    timings["refine"] = time.perf_counter() - t0

    # Maps for display: ITN(fixed) on the fixed grid, ITN(moving) on the moving grid.
    with torch.no_grad():
        fixed_map = _map_image(t_map, grid_f) if model.transform_type == "affine" else _map_image(
            module.representation(image_to_tensor(fixed, grid_f, win_f).to(dev)), grid_f)
        moving_map = _map_image(s_map, grid_m) if (model.transform_type == "affine" and initial_transform is None) \
            else _map_image(module.representation(image_to_tensor(moving, grid_m, win_m).to(dev)), grid_m)
    timings["total"] = time.perf_counter() - t_start
    return RegistrationResult(
        transform=to_world(out.params),
        one_pass_transform=to_world(params0),
        initial_transform=initial_transform,
        transform_type=model.transform_type,
        fixed_map=fixed_map,
        moving_map=moving_map,
        loss_one_pass=loss0,
        loss_final=out.final_loss,
        losses=out.losses,
        iterations=len(out.losses),
        cancelled=out.cancelled,
        device=str(dev),
        timings=timings,
        model_meta=model.meta,
    )
