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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import SimpleITK as sitk

from .config import varied_models_beside
from .data import network_grid
from .export import LoadedModel
from .inputs import prepare_image
from .refinement import IterationInfo
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
    **options,
) -> tuple[list[RegistrationResult], Retry | None]:
    """`register_chain` with ``models``; then, if ``retry`` and a stage's self-check failed and the models'
    folder holds a varied-view family (`retry_models`), the chain again with that family (``on_retry(paths)``
    first, e.g. to say so) and the result whose images end the more alike (`compare_chains`).

    Returns (the results kept, the `Retry` or None when there was no second try). ``read_meta`` / ``load``: how
    a model file's metadata / the model is read (default `load_model`); ``options``: `register_chain`'s. A
    cancelled first chain is returned as it is."""
    from .export import load_model

    first = register_chain(fixed, moving, models, **options)
    if not retry or first[-1].cancelled:
        return first, None
    loaded: dict[Path, LoadedModel] = {}

    def load_once(path: Path) -> LoadedModel:  # without read_meta the metadata came from loading the file
        if path not in loaded:
            loaded[path] = (load or load_model)(path)
        return loaded[path]

    others = retry_models(first, read_meta or (lambda p: load_once(p).meta))
    if not others:
        return first, None
    if on_retry is not None:
        on_retry(others)
    second = register_chain(fixed, moving, [load_once(p) for p in others], **options)
    outcome = compare_chains(fixed, moving, models[-1], first, second)
    return outcome.kept, outcome


def retry_models(stages: Sequence[RegistrationResult], read_meta: Callable[[Path], dict]) -> list[Path]:
    """The model files to register the pair with again: after a failed self-check of any stage, the varied-view
    models beside the chain's (one per stage, same transforms; `varied_models_beside`), else ``[]``; none when the
    voxel spacing looks not to be in mm (a header to fix: no model registers a head 17 mm across).
    ``read_meta(path)``: a model file's metadata (the command line loads it; the panel reads it without torch)."""
    if not any(s.self_checks_failed for s in stages) or any(s.spacing_suspect for s in stages):
        return []
    return varied_models_beside([(Path(s.model_path), s.model_meta) for s in stages], read_meta)


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
    chain's last model's grid) and which is kept."""

    first: list[RegistrationResult]
    second: list[RegistrationResult]
    information_first: float
    information_second: float
    kept_second: bool

    @property
    def kept(self) -> list[RegistrationResult]:
        return self.second if self.kept_second else self.first

    def note(self) -> str:
        """One sentence for the warnings: what failed, what was tried, what is returned."""
        first = ", ".join(Path(s.model_path).name for s in self.first)
        second = ", ".join(Path(s.model_path).name for s in self.second)
        checks = sorted({c for s in self.first for c in s.self_checks_failed})
        mi = f"images' mutual information {self.information_second:.3f} vs {self.information_first:.3f}"
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
        }


def compare_chains(fixed: sitk.Image, moving: sitk.Image, model: LoadedModel, first: list[RegistrationResult],
                   second: list[RegistrationResult]) -> Retry:
    """Keep the chain whose final transform leaves the images more alike (`images_information` on ``model``'s
    grid, the first chain's last model); a tie keeps ``first``, the models asked for. A cancelled second chain
    is never kept."""
    mi_first, mi_second = images_information(fixed, moving, model, [first[-1].transform, second[-1].transform])
    keep = (not second[-1].cancelled and len(second) == len(first)) and mi_second > mi_first
    return Retry(first, second, mi_first, mi_second, keep)
