"""Test-time refinement: the STN optimised on one pair of frozen ITN maps, with its optimisers.

Refinement (the point of ISTNs): the STN is optimised on this pair alone to
minimise ``MSE(T(s'), t')`` with the ITN frozen; no annotations are needed.
`refine` works on the network's internal grid in normalised coordinates
(the STN's parameters); `istn.registration.register` wraps it with the
geometry (internal grids, world transforms). Besides Adam, a short
second-order polish (Gauss-Newton for an affine's 12 parameters, L-BFGS for a
B-spline's) and a coarse-to-fine start on half-resolution maps.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .export import LoadedModel
from .losses import refinement_loss

CancelFlag = Union[threading.Event, Callable[[], bool], None]


@dataclass
class IterationInfo:
    """What the per-iteration callback receives."""

    iteration: int  # 1-based
    iterations: int
    loss: float  # MSE(T(s'), t') of the parameters used in this iteration
    params: torch.Tensor  # those parameters (normalised units, detached)
    _to_world: Callable[[torch.Tensor], sitk.Transform] | None = None
    # refinement passes (register(passes=)): each pass compares a new look of
    # the network, so ``loss`` is on that pass's maps and may rise from one pass to the next
    pass_number: int = 1
    passes: int = 1

    def label(self) -> str:
        """``"12/30 (pass 2/2)"``: the iteration counted over all passes, and the pass when there are several."""
        text = f"{self.iteration}/{self.iterations}"
        return text + (f" (pass {self.pass_number}/{self.passes})" if self.passes > 1 else "")

    def transform(self) -> sitk.Transform:
        """The current world transform (fixed -> moving points); built on demand."""
        if self._to_world is None:
            raise RuntimeError("IterationInfo.transform() is only available from register()")
        return self._to_world(self.params)


@dataclass
class RefineOutput:
    params: torch.Tensor  # the best iterate's parameters (lowest objective), detached
    losses: list[float]  # objective of each iteration's parameters (iteration 1: the one pass)
    final_loss: float  # objective of ``params``
    cancelled: bool
    best_iteration: int = 0  # 1-based iteration whose parameters are returned; iterations + 1: after the last step
    converged: bool = False  # stopped by the tolerance before the iteration cap
    similarity: float = float("nan")  # MSE(T(s'), t') of ``params`` (the objective without the bending term)
    start_loss: float = float("nan")  # objective of the starting parameters (the one pass)
    start_similarity: float = float("nan")  # and its MSE part
    coarse_iterations: int = 0  # iterations run on the half-resolution copy of the maps (coarse to fine)
    polish_iterations: int = 0  # iterations of the final polish of the transform's parameters (`refine`'s ``polish``)


def is_cancelled(cancel: CancelFlag) -> bool:
    """True when ``cancel`` (an Event, a callable or None) asks to stop. An Event: anything with ``is_set``, as
    `istn.registration.register` accepts it (a ``multiprocessing.Event`` too, not only a ``threading.Event``)."""
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


# Bounded (sigmoid) maps are shown from this value up: their floor (~0.02 away from every structure) is hidden;
# the same value marks a structure for the refinement's comparison region (`structure_box`).
MAP_DISPLAY_THRESHOLD = 0.1

REFINE_LAYERS = ("all", "fc")


def supports_fc_refinement(module: torch.nn.Module) -> bool:
    """Whether ``module`` (scripted or not) splits its STN for FC-only refinement (files of istn >= 0.3)."""
    return hasattr(module, "predict_from_pooled") and hasattr(module, "stn_pooled")


def structure_box(maps: torch.Tensor, margin: int) -> tuple[slice, ...] | None:
    """Array-order slices of the box around the voxels where any of ``maps (1, K, *S)`` reaches
    `MAP_DISPLAY_THRESHOLD` (a structure, for bounded maps), grown by ``margin`` voxels and clipped to the
    grid; None when no voxel does (then the whole grid is compared)."""
    inside = maps.detach().amax(1)[0] >= MAP_DISPLAY_THRESHOLD
    if not bool(inside.any()):
        return None
    box = []
    for axis, n in enumerate(inside.shape):
        hits = torch.nonzero(inside.any(dim=tuple(j for j in range(inside.dim()) if j != axis))).flatten()
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, n)))
    return tuple(box)


def crop(x: torch.Tensor, box: tuple[slice, ...] | None, grid: bool = False) -> torch.Tensor:
    """``x`` inside ``box`` (`structure_box`): maps ``(N, C, *S)``, or with ``grid`` sampling grids ``(N, *S, D)``."""
    if box is None:
        return x
    return x[(slice(None),) + box] if grid else x[(slice(None), slice(None)) + box]


def model_region_margin(model: LoadedModel) -> float:
    """A model's comparison-region margin (mm): its ``refinement.region_margin_mm``, else inf (the whole grid)."""
    value = model.meta.get("refinement", {}).get("region_margin_mm")
    return float("inf") if value is None else float(value)


def refinement_layers(model: LoadedModel) -> str:
    """The STN layers a model refines by default: its ``refinement.layers`` metadata, else "all" (the paper)."""
    return str(model.meta.get("refinement", {}).get("layers", "all"))


# Refinement iterations when neither the caller nor the model's ``refinement.iterations`` says (the paper's 50)
DEFAULT_ITERATIONS = 50

# Refinement stops when the best objective improved by less than `tolerance` (relative) over this many iterations.
CONVERGENCE_WINDOW = 10


def refine(
    module: torch.nn.Module,
    source_map: torch.Tensor,
    target_map: torch.Tensor,
    iterations: int = 50,
    lr: float = 1e-3,
    callback: Callable[[IterationInfo], None] | None = None,
    cancel: CancelFlag = None,
    to_world: Callable[[torch.Tensor], sitk.Transform] | None = None,
    *,
    adjust: Callable[[torch.Tensor], torch.Tensor] | None = None,
    regulariser: Callable[[torch.Tensor], torch.Tensor] | None = None,
    tolerance: float = 0.0,
    coarse_iterations: int = 0,
    layers: str = "all",
    region_margin: int | None = None,
    polish: int = 0,
    pooled: torch.Tensor | None = None,
    channel_weights: Sequence[float] | None = None,
) -> RefineOutput:
    """Test-time refinement of the STN of ``module`` on one pair.

    ``source_map``/``target_map`` ``(1, K, *S)``: the frozen ITN outputs (computed
    once by the caller). Fresh Adam on the STN weights minimises
    ``MSE(T(s'), t') + regulariser(params)``. ``adjust(params)`` maps the STN's
    output to the parameters actually used (a fixed offset that starts the
    refinement from the inverse-consistent estimate, see `_register`).

    Keeps the BEST iterate, not the last: a too-high learning rate can make
    Adam climb, and the returned parameters never have a higher objective
    than the one pass. ``tolerance > 0`` stops once the best objective gained
    less than ``tolerance`` (relative) over `CONVERGENCE_WINDOW` iterations;
    ``iterations`` is the cap. ``cancel`` is checked before every iteration,
    so a cancel stops within one iteration with a valid result. The STN's
    weights are restored before returning.

    Coarse to fine: the first ``coarse_iterations`` iterations (fewer when the
    tolerance stops them: refinement then goes on to the full grid) compare
    the maps at half resolution (`half_resolution`): the STN still sees the
    full maps, but the warp and the loss, about a third of an iteration, run
    on an eighth of the voxels (feeding the STN the half maps too was twice as
    fast per iteration but lost 0.02-0.05 B-spline Dice on validation pairs:
    benchmarks/results/coarse_to_fine_notes.md). Their objective values (``losses``, the
    callback's) are those of the half-resolution maps; the returned iterate is
    the best on the FULL grid, the one pass included (evaluated first). Grids
    with an odd size are refined on the full grid only.

    ``layers``: "all" refines every STN weight (the paper); "fc" only its fully
    connected layers (`ISTN.predict_from_pooled`): the maps are frozen, so the
    convolutions' output is the same at every iteration and runs once, and an
    iteration costs the warp and the loss alone. The FC layers end in the
    parameter heads, so "fc" can still reach any transform the heads can
    express (their biases alone are the transform's parameters).

    ``region_margin`` (voxels of the internal grid; bounded maps only): compare
    the maps only inside the box around the fixed map's structures
    (`structure_box`) grown by this margin, not over the whole grid: outside
    it both maps are background, and the warp and the loss cost in proportion
    to the voxels compared (half the margin on the half-resolution maps).
    The objective values are then means over the box. None: the whole grid.

    ``channel_weights`` ``(K,)``: the weight of each map channel in the
    objective (None: 1 each), i.e. the maps COMPARED are scaled by their
    square roots, while the STN still sees them as they are. A context channel
    that covers far more voxels than the structures (e.g. the rest of the
    brain) would otherwise outweigh them. The objective values are then of
    the weighted maps.

    ``pooled``: the STN's convolutional features of (source, target)
    (`ISTN.stn_pooled`) when the caller has them already (`_register`'s one
    pass); used by ``layers="fc"`` instead of running the convolutions again.

    ``polish``: after the (up to) ``iterations`` Adam steps, up to this many
    iterations that polish the transform's parameters themselves (the heads'
    output; the weights are no longer involved), from the best iterate, on
    the full grid (or box). Adam on an over-parameterised network stops
    circling somewhere along the loss's flat directions, so where it stopped
    depended on its start (the same head acquired obliquely vs.
    axis-aligned: ~1 mm apart over the brain); the polish goes down that
    valley to its floor, which depends on the maps alone. Few parameters
    (an affine: 6 or 12, no regulariser): Levenberg-Marquardt with the
    Jacobian of the warped maps by finite differences (`_gauss_newton_polish`:
    one iteration costs about as much as ~6 Adam iterations and converges in
    a few); many (a B-spline): L-BFGS (`_lbfgs_polish`: one iteration is one
    objective evaluation, about one Adam iteration). ``losses`` gains the
    objective of the polish's current iterate after each of its iterations
    (never rising), and the callback is called after each; the callback's
    ``iterations`` is then ``iterations + polish``. The polish stays within
    `POLISH_RADIUS` of its start.
    """
    if iterations < 0:
        raise ValueError(f"refine() 'iterations' must be >= 0, got {iterations}")
    if not (lr > 0 and np.isfinite(lr)):
        raise ValueError(f"refine() 'lr' must be a positive number, got {lr}")
    if layers not in REFINE_LAYERS:
        raise ValueError(f"refine() 'layers' must be one of {', '.join(REFINE_LAYERS)}, got {layers!r}")
    if layers == "fc" and not supports_fc_refinement(module):
        raise ValueError("refine() layers='fc' needs a model file exported by istn >= 0.3 (older files: "
                         "istn.export.rescript_model)")
    if coarse_iterations < 0:
        raise ValueError(f"refine() 'coarse_iterations' must be >= 0, got {coarse_iterations}")
    if region_margin is not None and region_margin < 0:
        raise ValueError(f"refine() 'region_margin' must be None or >= 0, got {region_margin}")
    if polish < 0:
        raise ValueError(f"refine() 'polish' must be >= 0, got {polish}")
    adam_iterations, iterations = iterations, iterations + polish  # ``iterations`` from here on: the whole budget
    source_map, target_map = source_map.detach(), target_map.detach()
    scale = None  # per-channel factor of the COMPARED maps (the STN sees the maps as they are)
    if channel_weights is not None:
        w = torch.as_tensor(channel_weights, dtype=source_map.dtype, device=source_map.device)
        if w.shape != (source_map.shape[1],) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"refine() 'channel_weights' must be {source_map.shape[1]} numbers >= 0, got "
                             f"{list(channel_weights)}")
        # warping and block averaging are linear in the values: scaling before or after them is the same
        scale = w.sqrt().view(1, -1, *([1] * (source_map.dim() - 2)))
    compared_source, compared_target = (source_map, target_map) if scale is None else (source_map * scale,
                                                                                      target_map * scale)
    if layers != "fc":
        pooled = None
    elif pooled is None:  # before the weights' flags change below: a failure here (e.g. GPU memory) leaves them alone
        with torch.no_grad():
            pooled = module.stn_pooled(source_map, target_map)
    else:
        pooled = pooled.detach()
    # parameter names under the STN: features.convs.* (convolutions), features.fc.* and the heads (FC layers)
    stn_params = [p for name, p in module.stn.named_parameters()
                  if layers == "all" or not name.startswith("features.convs.")]
    saved = [p.detach().clone() for p in stn_params]
    grad_flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in grad_flags:
        p.requires_grad_(False)
    for p in stn_params:
        p.requires_grad_(True)

    box = structure_box(target_map, region_margin) if region_margin is not None else None
    target_box = crop(compared_target, box)

    def warped(params: torch.Tensor) -> torch.Tensor:
        """The source map through each of ``params (B, *P)`` on the compared grid (or box): ``(B, K, *box)``."""
        grid = crop(module.sampling_grid(params), box, grid=True)
        return module.warp(compared_source.expand(params.shape[0], *compared_source.shape[1:]), grid)

    def objective(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sim = refinement_loss(warped(params), target_box)
        return (sim + regulariser(params) if regulariser is not None else sim), sim

    if any(n % 2 for n in source_map.shape[2:]):
        coarse_iterations = 0
    if coarse_iterations:
        source_half, target_half, grid_half = half_resolution(source_map, target_map)
        # the box from the maps as they are (weights would move its threshold), then the weights
        box_half = structure_box(target_half, region_margin // 2) if region_margin is not None else None
        if scale is not None:
            source_half, target_half = source_half * scale, target_half * scale
        target_half = crop(target_half, box_half)
        # the full-resolution grid cropped to the 2x2(x2) blocks that average into the half box, then averaged:
        # the same values as averaging the whole grid and cropping, on a fraction of it
        box_blocks = None if box_half is None else tuple(slice(2 * b.start, 2 * b.stop) for b in box_half)

        def coarse_objective(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            grid = grid_half(crop(module.sampling_grid(params), box_blocks, grid=True))
            sim = refinement_loss(module.warp(source_half, grid), target_half)
            return (sim + regulariser(params) if regulariser is not None else sim), sim

    def current() -> torch.Tensor:
        params = module.predict(source_map, target_map) if pooled is None else module.predict_from_pooled(pooled)
        return adjust(params) if adjust is not None else params

    losses: list[torch.Tensor] = []
    cancelled = converged = False
    best: tuple[float, float, torch.Tensor, int] | None = None  # (objective, similarity, params, iteration)
    history: list[float] = []  # best objective (of the current resolution) after each iteration
    coarse_best = float("inf")
    coarse_run = polished = 0
    try:
        optimizer = Adam(stn_params, lr)
        if coarse_iterations and adam_iterations:  # the one pass on the full grid: the start, and a candidate
            with torch.no_grad():
                params = current()
                loss, sim = objective(params)
            start = (float(loss), float(sim))
            best = (*start, params.detach().clone(), 1)
        for it in range(adam_iterations):
            if is_cancelled(cancel):
                cancelled = True
                break
            coarse = it < coarse_iterations
            params = current()
            loss, sim = (coarse_objective if coarse else objective)(params)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            losses.append(loss.detach())
            if coarse:
                coarse_run += 1
                coarse_best = min(coarse_best, value)
                history.append(coarse_best)
            else:
                if it == coarse_iterations and it:  # the switch to the full grid: its losses are on another scale
                    history = []
                if best is None:
                    start = (value, float(sim.detach()))
                if best is None or value < best[0]:
                    best = (value, float(sim.detach()), params.detach().clone(), it + 1)
                history.append(best[0])
            if callback is not None:
                callback(IterationInfo(it + 1, iterations, value, params.detach(), to_world))
            if tolerance > 0 and len(history) > CONVERGENCE_WINDOW:
                before = history[-1 - CONVERGENCE_WINDOW]
                if before - history[-1] <= tolerance * abs(before):
                    if coarse:  # converged at half resolution: go on to the full grid
                        coarse_iterations, history = coarse_run, []
                        continue
                    converged = it + 1 < adam_iterations
                    break
        with torch.no_grad():  # the parameters after the last step
            params = current()
            loss, sim = objective(params)
            if best is None:  # no iteration ran: the starting parameters are the result
                start = (float(loss), float(sim))
            if best is None or float(loss) < best[0]:
                best = (float(loss), float(sim), params.detach().clone(), len(losses) + 1)
        if polish and not cancelled:
            for p in stn_params:  # the polish moves the parameters alone: no gradient for the weights
                p.requires_grad_(False)
            if regulariser is None and best[2].numel() <= GAUSS_NEWTON_MAX_PARAMETERS:
                def residuals(params: torch.Tensor) -> torch.Tensor:  # (B, *P) -> (B, M): the objective's residuals
                    return (warped(params) - target_box).flatten(1)

                best, cancelled, polished = _gauss_newton_polish(residuals, best, polish, losses, callback, cancel,
                                                                 to_world, iterations)
            else:
                best, cancelled, polished = _lbfgs_polish(objective, best, polish, losses, callback, cancel,
                                                          to_world, iterations)
    finally:
        with torch.no_grad():
            for p, s in zip(stn_params, saved):
                p.copy_(s)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
    value, sim_value, params, best_it = best
    return RefineOutput(params, [float(v) for v in losses], value, cancelled, best_it, converged, sim_value, *start,
                        coarse_iterations=coarse_run, polish_iterations=polished)


# Transforms with at most this many parameters (affine: 6 in 2D, 12 in 3D) are polished by Gauss-Newton
GAUSS_NEWTON_MAX_PARAMETERS = 16
# The polish's trust region, in the transform's normalised parameters (each within this of the polish's start):
# 0.1 of the grid's half-width in translation (~10 mm on the 48^3 x 4 mm brain grids), 0.1 in the matrix's entries
# (~6 degrees, 10 % scale) or in each B-spline control point's displacement
POLISH_RADIUS = 0.1


def _cubic_minimum(t: float, f0: float, d0: float, ft: float, dt: float) -> float:
    """The minimiser on [0, t] of the cubic through (0, f0) and (t, ft) with slopes d0 and dt (t / 2 if none)."""
    d1 = d0 + dt - 3.0 * (f0 - ft) / (0.0 - t)
    disc = d1 * d1 - d0 * dt
    if disc < 0 or not np.isfinite(disc):
        return 0.5 * t
    d2 = float(np.sqrt(disc))
    m = t - t * (dt + d2 - d1) / (dt - d0 + 2.0 * d2) if (dt - d0 + 2.0 * d2) != 0 else 0.5 * t
    return m if np.isfinite(m) else 0.5 * t


def _lbfgs_polish(objective: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                  best: tuple[float, float, torch.Tensor, int], evaluations: int, losses: list,
                  callback: Callable[[IterationInfo], None] | None, cancel: CancelFlag,
                  to_world: Callable[[torch.Tensor], sitk.Transform] | None,
                  iterations: int, history: int = 10) -> tuple[tuple[float, float, torch.Tensor, int], bool, int]:
    """L-BFGS on the transform's parameters from ``best`` for at most ``evaluations`` objective evaluations
    (the polish's iterations, `refine`).

    A small L-BFGS of our own (two-loop recursion, backtracking Armijo line
    search): torch.optim.LBFGS imports torch._dynamo on construction, 1.6 s
    of a cold command-line call. ``best`` = (objective, similarity, params,
    iteration) is returned updated (only accepted, lower points replace it);
    the objective of the current iterate after each evaluation is appended
    to ``losses`` (it never rises). Every point tried stays within
    `POLISH_RADIUS` of the start in every parameter (a trust region: the
    polish finishes Adam's work, it does not search anew, and it stays close
    to what the STN's bounded heads could express). Returns
    ``(best, cancelled, evaluations run)``.
    """
    count = 0

    def evaluate(x: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        nonlocal count
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss, sim = objective(x)
            (grad,) = torch.autograd.grad(loss, x)
        count += 1
        return float(loss.detach()), float(sim.detach()), grad.detach().double().flatten()

    reported = 0

    def report() -> None:  # one entry (and callback) per evaluation not reported yet: the current best
        nonlocal reported
        for _ in range(count - reported):
            losses.append(best[0])
            if callback is not None:
                callback(IterationInfo(len(losses), iterations, best[0], best[2], to_world))
        reported = count

    if is_cancelled(cancel):
        return best, True, count
    x = best[2].detach().clone()
    origin = x.clone()
    value, _, g = evaluate(x)  # the start's gradient (its value is best[0])
    report()
    steps: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / y.s), oldest first
    while count < evaluations:
        # direction -H g by the two-loop recursion; H0 = (s.y / y.y) I
        q = -g.clone()
        alphas = []
        for s_, y_, rho in reversed(steps):
            a = rho * float(s_ @ q)
            alphas.append(a)
            q -= a * y_
        if steps:
            s_, y_, _ = steps[-1]
            q *= float(s_ @ y_) / float(y_ @ y_)
        else:  # first step: Polyak's length f / |g|^2 (exact if the minimum were 0), at most 0.05 per parameter
            q *= min(value / max(float(g @ g), 1e-30), 0.05 / max(float(q.abs().max()), 1e-30))
        for (s_, y_, rho), a in zip(steps, reversed(alphas)):
            q += (a - rho * float(y_ @ q)) * s_
        slope = float(g @ q)
        if not slope < 0:  # not a descent direction (rounding): start the memory afresh along -g
            steps.clear()
            continue
        # line search: t = 1 first (the quasi-Newton step); too little decrease -> cubic interpolation back
        # towards 0; enough decrease but still steeply downhill (weak Wolfe curvature unmet) -> twice as far,
        # keeping the last point that decreased enough. Reported once the line search ends.
        t, bracketed, accepted = 1.0, False, None
        while count < evaluations:
            if is_cancelled(cancel):
                report()
                return best, True, count
            trial = x + (t * q).to(x).view_as(x)
            if float((trial - origin).abs().max()) > POLISH_RADIUS:  # outside the trust region (costs nothing)
                if accepted is not None:  # extrapolating: keep the last good point
                    break
                t *= 0.5
                if t < 1e-8:
                    break
                continue
            v, sim, g_new = evaluate(trial)
            slope_t = float(g_new @ q)
            if v <= value + 1e-4 * t * slope:  # Armijo: enough decrease
                accepted = (trial, v, sim, g_new)
                if slope_t >= 0.9 * slope or bracketed:  # curvature met, or already bracketed
                    break
                t *= 2.0
                continue
            bracketed = True
            if accepted is not None:  # the doubled step overshot: keep the last good one
                break
            t = min(max(_cubic_minimum(t, value, slope, v, slope_t), 0.1 * t), 0.5 * t)
        if accepted is None:
            report()
            break
        trial, v, sim, g_new = accepted
        s_vec, y_vec = (trial - x).double().flatten(), g_new - g
        if float(s_vec @ y_vec) > 1e-12 * float(s_vec @ s_vec):  # curvature positive: keep the pair
            steps.append((s_vec, y_vec, 1.0 / float(s_vec @ y_vec)))
            del steps[:-history]
        gain = value - v
        x, value, g = trial, v, g_new
        if v < best[0]:
            # its place (1-based) in ``losses``: that of the line search's last evaluation, reported next
            best = (v, sim, trial.detach().clone(), len(losses) + count - reported)
        report()
        if gain <= 1e-7 * abs(value):  # converged to the floor of the valley
            break
    return best, False, count


def _gauss_newton_polish(residuals: Callable[[torch.Tensor], torch.Tensor],
                         best: tuple[float, float, torch.Tensor, int], iterations: int, losses: list,
                         callback: Callable[[IterationInfo], None] | None, cancel: CancelFlag,
                         to_world: Callable[[torch.Tensor], sitk.Transform] | None,
                         total: int, step: float = 1e-3) -> tuple[tuple[float, float, torch.Tensor, int], bool, int]:
    """Levenberg-Marquardt on the transform's few parameters from ``best`` for at most ``iterations`` iterations.

    ``residuals(params (B, *P)) -> (B, M)``: the warped source map minus the
    target map, flattened, for a batch of parameter sets; the objective is
    their mean square (`refinement_loss`). Each iteration: the Jacobian by
    forward differences of ``step`` (all P perturbations warped as one batch:
    no backward pass), then damped Gauss-Newton steps until one lowers the
    objective within `POLISH_RADIUS` of the start (the damping grows tenfold
    per refused step and shrinks tenfold per accepted one). Stops early when
    no step lowers the objective or the gain is below 1e-7 (relative).
    Returns ``(best, cancelled, iterations run)``; ``losses`` gains the
    current objective after each iteration.
    """
    with torch.no_grad():
        x = best[2].detach().clone()
        origin, n = x.clone(), x.numel()
        r = residuals(x)[0]
        value = float((r * r).mean())
        damping, run = 1e-3, 0
        basis = torch.eye(n, dtype=x.dtype, device=x.device).reshape(n, *x.shape[1:]) * step
        for _ in range(iterations):
            if is_cancelled(cancel):
                return best, True, run
            jac = ((residuals(x + basis) - r) / step).double()  # (P, M); all P perturbations as one batch
            jtj, grad = jac @ jac.T, jac @ r.double()
            diag = torch.diag(torch.diag(jtj)) + 1e-12 * torch.eye(n, dtype=jtj.dtype, device=jtj.device)
            accepted = None
            while damping <= 1e6:
                delta = -torch.linalg.solve(jtj + damping * diag, grad)
                trial = x + delta.to(x).reshape(x.shape)
                if float((trial - origin).abs().max()) > POLISH_RADIUS:  # outside the trust region: damp more
                    damping *= 10.0
                    continue
                rt = residuals(trial)[0]
                vt = float((rt * rt).mean())
                if vt < value:
                    accepted = (trial, rt, vt)
                    damping = max(damping / 10.0, 1e-9)
                    break
                damping *= 10.0
            run += 1
            gain = 0.0
            if accepted is not None:
                gain = value - accepted[2]
                x, r, value = accepted
                if value < best[0]:
                    best = (value, value, x.clone(), len(losses) + 1)
            losses.append(best[0])
            if callback is not None:
                callback(IterationInfo(len(losses), total, best[0], best[2], to_world))
            if accepted is None or gain <= 1e-7 * value:
                break
    return best, False, run


def loss_rise(losses: Sequence[float], best_iteration: int, coarse_iterations: int, best_loss: float,
              factor: float = 2.0) -> tuple[float, float, int] | None:
    """``(best_loss, highest later loss, best_iteration)`` when refinement climbed above ``factor`` x its best.

    Only full-grid losses after the best iterate (``best_iteration``, 1-based)
    are compared with the best: the first ``coarse_iterations`` losses (coarse
    to fine) are of half-resolution maps, on another scale, and a climb there
    that the full grid recovered from is harmless (seen on the sample pair with
    the first-generation affine model: 0.001 -> 0.017 at half resolution, then
    0.0005 on the full grid, below the one pass). One the full grid never
    recovered from (the one pass kept, ``best_iteration`` 1) is not: the
    half-resolution losses are then compared among themselves (with the
    bundled models every Adam iteration is at half resolution, so a learning
    rate far too high showed no rise anywhere else).
    """
    after = list(losses[max(best_iteration - 1, coarse_iterations):])
    if after and max(after) > factor * best_loss + 1e-6:
        return best_loss, max(after), best_iteration
    coarse = list(losses[:coarse_iterations])
    if best_iteration == 1 and coarse:
        top = int(np.argmax(coarse))
        low = min(coarse[:top + 1])
        if coarse[top] > factor * low + 1e-6:
            return low, coarse[top], 1 + coarse.index(low)
    return None


class Adam:
    """Adam (Kingma and Ba; ``torch.optim.Adam``'s defaults and arithmetic) on a list of tensors, foreach kernels.

    Not ``torch.optim.Adam``: the first optimizer a process builds imports
    ``torch._dynamo`` (``torch._compile._disable_dynamo``), ~1 s, as long as
    20 refinement iterations of the 3D brain models on one CPU thread, paid by
    every `istn register` run. The refinement needs only the plain update.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps = float(lr), betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        self.steps += 1
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        torch._foreach_lerp_(self.exp_avg, grads, 1.0 - b1)
        torch._foreach_mul_(self.exp_avg_sq, b2)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1.0 - b2)
        denom = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_div_(denom, math.sqrt(1.0 - b2 ** self.steps))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(self.params, self.exp_avg, denom, -self.lr / (1.0 - b1 ** self.steps))


def half_resolution(source_map: torch.Tensor, target_map: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The maps ``(1, K, *S)`` averaged over 2^D blocks ``(1, K, *S/2)``, and the matching sampling grid.

    ``grid_half(grid)``: a full-resolution sampling grid ``(1, *S, D)`` averaged
    the same way ``(1, *S/2, D)``, in the half-resolution maps' normalised
    coordinates. A block average sits at the centre of its block: voxel ``u``
    of an axis of ``N`` voxels at full-resolution voxel ``2u + 1/2``; so with
    ``align_corners=True`` coordinates, full-resolution ``n`` is half-resolution
    ``n (N - 1) / (N - 2)`` (exact for an affine grid, whose average is its
    value at the block centre). ``*S`` must be even.
    """
    d = source_map.dim() - 2
    pool = F.avg_pool2d if d == 2 else F.avg_pool3d
    scale = torch.tensor([(n - 1) / (n - 2) for n in reversed(source_map.shape[2:])], dtype=source_map.dtype,
                         device=source_map.device)  # (x, y[, z]) order, as the grid's last dimension

    def grid_half(grid: torch.Tensor) -> torch.Tensor:
        return pool(grid.movedim(-1, 1), 2).movedim(1, -1) * scale

    return pool(source_map, 2), pool(target_map, 2), grid_half
