"""A chain of models run on one pair, and its second try with the varied-view models beside it.

A chain: affine models, then at most one B-spline, each starting from the
previous result (`register`). When a stage's self-check fails
(`RegistrationResult.self_checks_failed`: the pair looks unlike what the
models were made for: another contrast, a cropped field of view) and the
models' folder holds a family trained on varied views
(`istn.config.varied_models_beside`: brain-synth beside brain-t1), the pair
is registered again with that family and the result whose images end the
more alike is kept (`compare_chains`). The one flow the command line and the
Slicer module share; neither decides anything of it.

Why the images' mutual information decides: it is a measure of the images
themselves, not of either model's maps (each family's loss is on its own
maps, so the losses do not compare), and it is the measure whose drop below
the images as given the information self-check reports.

When the chain kept (from the images as stored) still failed a self-check,
its models run again from the moving head turned by whole right angles
(`search_turns`: a header that puts the head where it did not lie, a
sagittal acquisition stored as axial, a prone patient taken for supine):
from the turn whose one pass leaves the images most alike, kept when that
chain passes every self-check and ends the images more alike
(`turned_chain`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from .config import varied_models_beside
from .data import foreground_centre, network_grid
from .export import LoadedModel
from .inputs import prepare_image
from .refinement import IterationInfo, is_cancelled
from . import registration
from .registration import RegistrationResult, image_information


def register_chain(
    fixed: sitk.Image,
    moving: sitk.Image,
    models: Sequence[LoadedModel],
    *,
    initial_transform: sitk.Transform | None = None,
    callback_for: Callable[[int, LoadedModel], Callable[[IterationInfo], None] | None] | None = None,
    **options,
) -> list[RegistrationResult]:
    """Run ``models`` in order on the pair, each from the previous result (the first from ``initial_transform``);
    ``callback_for(index, model)`` (index from 0) gives the stage's iteration callback. ``options``: those of
    `register` (iterations, cancel, ...). Stops after a cancelled stage (the last result says so)."""
    from .errors import InputError

    if "callback" in options:
        raise InputError("register_chain() takes callback_for(index, model) -> the stage's callback, not 'callback'")
    registration.check_api_types(models=models, initial_transform=initial_transform)
    if isinstance(fixed, sitk.Image) and isinstance(moving, sitk.Image):  # else register() says what they must be
        # the whole chain's order and the start, before any stage runs (each stage checks its own options)
        registration.check_register_inputs(fixed, moving, list(models), initial_transform=initial_transform)
    results: list[RegistrationResult] = []  # (registration.register looked up per call: one engine entry point)
    initial = initial_transform
    # every stage's images "as given" are where the user placed them (their start), not the previous stage's result
    options.setdefault("given_transform", initial_transform)
    for index, model in enumerate(models):
        callback = callback_for(index, model) if callback_for is not None else None
        result = registration.register(fixed, moving, model, initial_transform=initial, callback=callback, **options)
        results.append(result)
        if result.cancelled:
            break
        initial = result.transform
    return results


def register_with_second_try(
    fixed: sitk.Image,
    moving: sitk.Image,
    models: Sequence[LoadedModel],
    *,
    retry: bool = True,
    read_meta: Callable[[Path], dict] | None = None,
    load: Callable[[Path], LoadedModel] | None = None,
    on_retry: Callable[[list[Path]], None] | None = None,
    turns: bool = True,
    on_turns: Callable[[int], None] | None = None,
    **options,
) -> tuple[list[RegistrationResult], Retry | None]:
    """`register_chain` with ``models``; then, if ``retry`` and a stage's self-check failed and the models'
    folder holds a varied-view family (`retry_models`), the chain again with that family (``on_retry(paths)``
    first, e.g. to say so) and the result whose images end the more alike (`compare_chains`).

    Then, with ``turns``, when the chain kept (from the images as stored: no ``initial_transform``) still
    failed a self-check, its models run again from the moving head turned as `search_turns` finds it
    (``on_turns(count)`` first, ``count`` the turns tried); that chain is kept when it passes every self-check
    and its images end the more alike (`turned_chain`).

    Returns (the results kept, the `Retry` or None when there was no second try). ``read_meta`` / ``load``: how
    a model file's metadata / the model is read (default `load_model`); ``options``: `register_chain`'s. A
    cancelled first chain is returned as it is."""
    first = register_chain(fixed, moving, models, **options)
    kept, outcome, kept_models = _second_try(fixed, moving, models, first, retry, read_meta, load, on_retry,
                                             **options)
    if turns:
        # after the second try: a T2 through the T1 models fails a self-check too, and the varied models, not a
        # turn, are what it needs; a head stored turned fails with both families
        turned = turned_chain(fixed, moving, kept_models, kept, on_turns=on_turns, **options)
        if turned is not None:
            kept = turned
            if outcome is not None:
                outcome.turned_after = True
    return kept, outcome


def _second_try(fixed: sitk.Image, moving: sitk.Image, models: Sequence[LoadedModel], first: list[RegistrationResult],
                retry: bool, read_meta: Callable[[Path], dict] | None, load: Callable[[Path], LoadedModel] | None,
                on_retry: Callable[[list[Path]], None] | None, **options
                ) -> tuple[list[RegistrationResult], Retry | None, list[LoadedModel]]:
    """`register_with_second_try`'s second try of ``first`` (the chain of ``models``): (the chain kept, the
    `Retry` or None, the models of the chain kept)."""
    from .export import load_model

    if not retry or first[-1].cancelled:
        return first, None, list(models)
    loaded: dict[Path, LoadedModel] = {}

    def load_once(path: Path) -> LoadedModel:  # without read_meta the metadata came from loading the file
        if path not in loaded:
            loaded[path] = (load or load_model)(path)
        return loaded[path]

    others = retry_models(first, read_meta or (lambda p: load_once(p).meta))
    if not others:
        return first, None, list(models)
    if on_retry is not None:
        on_retry(others)
    varied = [load_once(p) for p in others]
    second = register_chain(fixed, moving, varied, **options)
    outcome = compare_chains(fixed, moving, models[-1], first, second)
    return outcome.kept, outcome, (varied if outcome.kept_second else list(models))


def retry_models(stages: Sequence[RegistrationResult], read_meta: Callable[[Path], dict]) -> list[Path]:
    """The model files to register the pair with again: after a failed self-check of any stage, the varied-view
    models beside the chain's (one per stage, same transforms; `varied_models_beside`), else ``[]``; none when the
    voxel spacing looks not to be in mm (a header to fix: no model registers a head 17 mm across).
    ``read_meta(path)``: a model file's metadata (the command line loads it; the panel reads it without torch)."""
    if not any(s.self_checks_failed for s in stages) or any(s.spacing_suspect for s in stages):
        return []
    return varied_models_beside([(Path(s.model_path), s.model_meta) for s in stages], read_meta)


def axis_turns(dim: int) -> list[np.ndarray]:
    """Every rotation that takes the world axes onto themselves (whole right angles, no mirror: a left-right
    flip cannot be told from the images), the identity first: 24 in 3D, 4 in 2D, each ``(dim, dim)``."""
    found = []
    for order in itertools.permutations(range(dim)):
        for signs in itertools.product((1.0, -1.0), repeat=dim):
            turn = np.zeros((dim, dim))
            turn[np.arange(dim), order] = signs
            if np.linalg.det(turn) > 0:
                found.append(turn)
    return sorted(found, key=lambda t: -np.trace(t))  # the identity (trace dim) first; otherwise as made


def turned_start(turn: np.ndarray, fixed_centre: np.ndarray, moving_centre: np.ndarray) -> sitk.AffineTransform:
    """Fixed world -> moving world: ``x -> moving_centre + turn (x - fixed_centre)`` (mm, LPS): the fixed head's
    centre onto the moving one's, turned by ``turn`` about it."""
    start = sitk.AffineTransform(len(fixed_centre))
    start.SetCenter([float(v) for v in fixed_centre])
    start.SetMatrix([float(v) for v in np.asarray(turn).ravel()])
    start.SetTranslation([float(v) for v in np.subtract(moving_centre, fixed_centre)])
    return start


_AXES = ("left-right", "front-back", "up-down")


def describe_turn(turn: np.ndarray) -> str:
    """A whole-right-angle turn in words, about the LPS world axes: "180 degrees about the up-down (z) axis";
    "90 degrees about the left-right axis (-x, right-handed)" where the sense matters."""
    turn = np.asarray(turn, dtype=float)
    if turn.shape == (2, 2):
        return f"{round(np.degrees(np.arctan2(turn[1, 0], turn[0, 0]))) % 360} degrees in the image plane"
    angle = round(np.degrees(np.arccos(np.clip((np.trace(turn) - 1) / 2, -1.0, 1.0))))
    values, vectors = np.linalg.eig(turn)
    axis = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    axis = axis / np.linalg.norm(axis)
    if angle not in (0, 180):  # the sense of the turn about the axis, by the right-hand rule
        axis = axis * np.sign(np.dot(axis, [turn[2, 1] - turn[1, 2], turn[0, 2] - turn[2, 0],
                                           turn[1, 0] - turn[0, 1]]))
    along = np.flatnonzero(np.abs(axis) > 0.99)
    if len(along) and angle == 180:
        return f"{angle} degrees about the {_AXES[along[0]]} ({'xyz'[along[0]]}) axis"
    if len(along):
        return (f"{angle} degrees about the {_AXES[along[0]]} axis ({'+' if axis[along[0]] > 0 else '-'}"
                f"{'xyz'[along[0]]}, right-handed)")
    return f"{angle} degrees about the diagonal axis ({', '.join(f'{v:+.2f}' for v in axis)}, right-handed)"


def search_turns(fixed: sitk.Image, moving: sitk.Image, model: LoadedModel,
                 cancel=None, **options) -> list[tuple[float, np.ndarray, sitk.AffineTransform]]:
    """The affine ``model``'s one pass from the moving head turned by each of `axis_turns` (`turned_start`, about
    the images' foreground centres), scored by the images' mutual information through it (the stage's
    ``information["result"]``: one grid and window for every turn). Returns (score, turn, start) per turn tried,
    the identity first; fewer when ``cancel`` stops it. ``options``: `register`'s ``threads``, ``device``,
    ``bias_correct``. About 0.09 s a turn on 2 CPU cores (a brain model; the fixed image's map computed once).

    Why turns of whole right angles: a head stored as it did not lie (a sagittal acquisition written as axial,
    a prone patient taken for supine) is turned by one of them from where its header puts it, well beyond the
    ~40 degrees that the network and its further looks bring back; of a turn about one world axis, one of them lies
    within 45 degrees.
    """
    keep = {k: options[k] for k in ("threads", "device", "bias_correct") if k in options}
    cfg = model.config
    f, m = (prepare_image(image, cfg.grid_spacing, model.intensity, model.intensity_foreground,
                          cfg.centre_on_foreground, what, bool(keep.get("bias_correct", False)))
            for image, what in ((fixed, "fixed image"), (moving, "moving image")))
    centres: dict[tuple, np.ndarray] = {}  # the moving head's centre with its top where the turn puts the fixed's

    def moving_centre(turn: np.ndarray) -> np.ndarray:
        if model.ndim != 3 or not cfg.centre_on_foreground or np.array_equal(turn, np.eye(3)):
            return m.centre  # (a head with a neck and shoulders is centred below its top: `foreground_centre`)
        up = tuple(turn @ np.array([0.0, 0.0, 1.0]))
        if up not in centres:
            centres[up] = foreground_centre(m.image, up=up)
        return centres[up]

    scored = []
    with model.remembering_maps():  # the fixed image's map once, not once a turn
        for turn in axis_turns(model.ndim):
            if is_cancelled(cancel):
                break
            start = turned_start(turn, f.centre, moving_centre(turn))
            one_pass = registration.register(fixed, moving, model, initial_transform=start, iterations=0,
                                             more_passes=False, **keep)
            scored.append((float(one_pass.information["result"]), turn, start))
    return scored


def turned_chain(fixed: sitk.Image, moving: sitk.Image, models: Sequence[LoadedModel],
                 first: list[RegistrationResult], on_turns: Callable[[int], None] | None = None,
                 **options) -> list[RegistrationResult] | None:
    """The chain ``models`` run from the best turn of `search_turns` (``on_turns(count)`` first), when ``first``
    (their chain from the images as stored) failed a self-check, the best turn is not the identity, and the turned
    chain passes every self-check and ends the images more alike than ``first`` (`images_information` on the last
    model's grid); else None.

    Not searched: a chain from the user's own start (``initial_transform``), a cancelled one, one whose spacing
    looks not to be in mm (a header to fix: no turn helps), and a chain that does not start with an affine.
    The kept chain's first stage says so (its ``warnings`` and ``turned``)."""
    if (options.get("initial_transform") is not None or first[-1].cancelled
            or not any(s.self_checks_failed for s in first) or any(s.spacing_suspect for s in first)
            or models[0].transform_type != "affine"):
        return None
    turns = axis_turns(models[0].ndim)
    if on_turns is not None:
        on_turns(len(turns))
    scored = search_turns(fixed, moving, models[0], **options)
    if len(scored) < len(turns):  # cancelled
        return None
    best = max(range(len(scored)), key=lambda i: scored[i][0])
    if best == 0:  # the images as stored are the best start: the chain from them stands
        return None
    score, turn, start = scored[best]
    turned = register_chain(fixed, moving, models, **{**options, "initial_transform": start,
                                                      "given_transform": options.get("given_transform")})
    if turned[-1].cancelled or any(s.self_checks_failed for s in turned):
        return None
    mi_first, mi_turned = images_information(fixed, moving, models[-1], [first[-1].transform, turned[-1].transform])
    if not mi_turned > mi_first:
        return None
    what = describe_turn(turn)
    head = turned[0]
    head.turned = {"turn_lps": np.asarray(turn).tolist(), "turn": what, "turns_tried": len(scored),
                   "one_pass_information": {"as_stored": scored[0][0], "turned": score},
                   "information": {"as_stored": mi_first, "turned": mi_turned},
                   "self_checks_failed_as_stored": sorted({c for s in first for c in s.self_checks_failed})}
    head.warnings.insert(0, (
        f"the chain from the images as stored failed a self-check "
        f"({', '.join(head.turned['self_checks_failed_as_stored'])}); the moving head lies turned by {what} from "
        f"where its header puts it, as far as the images tell: registered from that turn (images' mutual "
        f"information {mi_turned:.3f} vs {mi_first:.3f} as stored). Check how the moving image was stored (a "
        f"sagittal or coronal acquisition written as axial, a prone patient taken for supine?)"))
    return turned


def images_information(fixed: sitk.Image, moving: sitk.Image, model: LoadedModel,
                       transforms: Sequence[sitk.Transform | None]) -> list[float]:
    """Mutual information of the images (nats) through each of ``transforms`` (fixed world -> moving world;
    None: as given), all on ONE grid and in one intensity window, ``model``'s (its fixed network grid, over the
    fixed image's foreground), so that results of different models compare."""
    cfg = model.config
    f, m = (prepare_image(image, cfg.grid_spacing, model.intensity, model.intensity_foreground,
                          cfg.centre_on_foreground, what) for image, what in
            ((fixed, "fixed image"), (moving, "moving image")))
    return image_information(f.image, m.image, network_grid(f.image, cfg, f.centre), (f.window, m.window), transforms)


@dataclass
class Retry:
    """A chain's second try: ``first`` (the models asked for, a self-check failed), ``second`` (the varied-view
    models beside them), the images' mutual information through each result (`images_information`, on the first
    chain's last model's grid) and which is kept. With ``turned_after``, the chain `register_with_second_try`
    returns is neither: the models of the one kept here, run from the moving head turned (`turned_chain`)."""

    first: list[RegistrationResult]
    second: list[RegistrationResult]
    information_first: float
    information_second: float
    kept_second: bool
    # the chain kept here failed a self-check too, and its models' chain from a turn of the moving head replaced it
    # (`turned_chain`; that chain's first stage says which turn)
    turned_after: bool = False

    @property
    def kept(self) -> list[RegistrationResult]:
        return self.second if self.kept_second else self.first

    def note(self) -> str:
        """One sentence for the warnings: what failed, what was tried, what is returned."""
        first = ", ".join(Path(s.model_path).name for s in self.first)
        second = ", ".join(Path(s.model_path).name for s in self.second)
        checks = sorted({c for s in self.first for c in s.self_checks_failed})
        mi = f"images' mutual information {self.information_second:.3f} vs {self.information_first:.3f}"
        if self.turned_after:
            kept = second if self.kept_second else first
            return (f"{first} failed a self-check ({', '.join(checks)}); {second} (trained on other contrasts and "
                    f"cropped fields of view) was tried too ({mi}); then {kept} registered the pair again from the "
                    "moving head turned (below), whose result is returned")
        if self.kept_second:
            failed = sorted({c for s in self.second for c in s.self_checks_failed})
            also = (f"; it failed a self-check too ({', '.join(failed)}): the pair may be beyond both (a field of "
                    "view, pose or contrast neither was trained for), check the result" if failed else "")
            return (f"{first} failed a self-check ({', '.join(checks)}): registered again with {second} (trained on "
                    f"other contrasts and cropped fields of view), whose result is returned ({mi}){also}")
        return (f"{first} failed a self-check ({', '.join(checks)}); {second} (trained on other contrasts and cropped "
                f"fields of view) did no better ({mi}): the result of {first} is returned")

    def summary(self) -> dict:
        """JSON-able (``result.json`` ``retry``): both chains' models and self-checks, the measure, the choice."""
        return {
            "first_models": [s.model_path for s in self.first],
            "first_self_checks_failed": sorted({c for s in self.first for c in s.self_checks_failed}),
            "first_warnings": [w for s in self.first for w in s.warnings],
            "second_models": [s.model_path for s in self.second],
            "second_self_checks_failed": sorted({c for s in self.second for c in s.self_checks_failed}),
            "mutual_information": {"first": self.information_first, "second": self.information_second},
            "kept": "second" if self.kept_second else "first",
            "turned_after": self.turned_after,
        }


def compare_chains(fixed: sitk.Image, moving: sitk.Image, model: LoadedModel, first: list[RegistrationResult],
                   second: list[RegistrationResult]) -> Retry:
    """Keep the chain whose final transform leaves the images more alike (`images_information` on ``model``'s
    grid, the first chain's last model); a tie keeps ``first``, the models asked for. A cancelled second chain
    is never kept."""
    mi_first, mi_second = images_information(fixed, moving, model, [first[-1].transform, second[-1].transform])
    keep = (not second[-1].cancelled and len(second) == len(first)) and mi_second > mi_first
    return Retry(first, second, mi_first, mi_second, keep)
