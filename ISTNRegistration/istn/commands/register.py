"""`istn register`: a pair, or several moving images to one fixed image, from files to an output folder."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Sequence

from ..errors import InputError, ISTNError, OutputError, ResultError, first_line

REGISTER_OUTPUTS = ("transform.h5", "warped.nii.gz", "itn_fixed.nii.gz", "itn_moving.nii.gz", "result.json")
# written by some runs only (a linear result, a B-spline's linear part, the picture): a later run into the same
# folder that does not write one removes the earlier run's, which would otherwise pass for this run's result
REGISTER_OPTIONAL_OUTPUTS = ("transform.tfm", "affine.tfm", "jacobian.nii.gz", "atlas_labels.nii.gz",
                             "atlas_labels.seg.nrrd", "overview.png")
#: ``--atlas``'s output in each result folder: the fixed space's label map on the moving image's own grid
ATLAS_OUTPUT = "atlas_labels.nii.gz"
#: ... when the atlas is a Slicer segmentation: its segment names, colours and layers kept
ATLAS_SEGMENTATION_OUTPUT = "atlas_labels.seg.nrrd"


def _finite(x: float) -> bool:
    return math.isfinite(x)


def check_background(background: float | None) -> None:
    """``--background`` (register's and apply's): a finite number a float32 image (the warped image) can hold."""
    from ..io import FLOAT32_MAX

    if background is not None and not _finite(background):
        raise InputError(f"--background must be a finite number, got {background:g}")
    if background is not None and abs(background) > FLOAT32_MAX:
        raise InputError(f"--background {background:g} is beyond what the warped image (32-bit float, at most "
                         f"{FLOAT32_MAX:.3g} in size) can hold")


def check_register_options(iterations: int | None, lr: float | None, device: str, background: float | None = None,
                           bending: float | None = None, tolerance: float | None = None,
                           threads: int | None = None, coarse_iterations: int | None = None,
                           region_margin_mm: float | None = None, polish: int | None = None,
                           anchor: float | None = None, passes: int | None = None) -> None:
    """The numeric and device options, checked before any file is read (messages name the flags)."""
    from ..registration import check_device

    if iterations is not None and iterations < 0:
        raise InputError(f"--refine must be a whole number >= 0 (refinement iterations), got {iterations}")
    if lr is not None and (not _finite(lr) or lr <= 0):
        raise InputError(f"--lr must be a finite number > 0 (refinement learning rate), got {lr:g}")
    check_background(background)
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be a whole number >= 1, got {threads}")
    if bending is not None and (not _finite(bending) or bending < 0):
        raise InputError(f"--bending must be a finite number >= 0 (B-spline bending energy weight), got {bending:g}")
    if anchor is not None and (not _finite(anchor) or anchor < 0):
        raise InputError(f"--anchor must be a finite number >= 0 (B-spline anchor weight, mm^-2), got {anchor:g}")
    if tolerance is not None and (not _finite(tolerance) or tolerance < 0):
        raise InputError(f"--tolerance must be a finite number >= 0 (0 runs every iteration), got {tolerance:g}")
    if coarse_iterations is not None and coarse_iterations < 0:
        raise InputError(f"--coarse-iterations must be a whole number >= 0 (0: every iteration on the full grid), "
                         f"got {coarse_iterations}")
    if region_margin_mm is not None and not region_margin_mm >= 0:
        raise InputError(f"--region-margin must be a number of mm >= 0 (inf: the whole grid), got {region_margin_mm:g}")
    if polish is not None and polish < 0:
        raise InputError(f"--polish must be a whole number >= 0 (polish iterations; 0: Adam only), got {polish}")
    if passes is not None and passes < 1:
        raise InputError(f"--passes must be a whole number >= 1 (refinement passes; 1: the paper), got {passes}")
    check_device(device)


def varied_hint(stages: list[dict]) -> str | None:
    """After a failed self-check of models trained on plain T1 heads only: the models beside them trained on
    other contrasts and cropped fields of view (`istn.config.varied_models_beside`), as a command to try."""
    if not any(s.get("self_checks_failed") for s in stages):
        return None
    from ..config import varied_models_beside
    from ..export import load_model

    used = [Path(s["model_file"]) for s in stages]
    picks = varied_models_beside([(p, s["model"]) for p, s in zip(used, stages)], lambda p: load_model(p).meta)
    if not picks:
        return None
    return (f"{', '.join(p.name for p in picks)} (beside {', '.join(p.name for p in used)}) trained on other "
            "contrasts and cropped fields of view; for a T2 or PD image or a partial head try "
            + " ".join(f"--model {p}" for p in picks))


def default_models(quiet: bool = False) -> list[Path]:
    """The bundled default chain (brain-t1 affine, then its B-spline), as `istn demo` and the panel's first
    entries; said on stderr unless ``quiet``. `InputError` if they are missing."""
    from ..demo import AFFINE_MODEL, BSPLINE_MODEL, MODELS_DIR

    paths = [MODELS_DIR / AFFINE_MODEL, MODELS_DIR / BSPLINE_MODEL]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise InputError(f"no --model given and the bundled default models are missing ({', '.join(missing)}): "
                         "name a model file with --model")
    if not quiet:
        print(f"  models: the bundled {', '.join(p.name for p in paths)} (--model to choose)", file=sys.stderr)
    return paths


def run_register(
    fixed_path: str | Path,
    moving_path: str | Path,
    model_paths: Sequence[str | Path] | None,
    out_dir: str | Path,
    iterations: int | None = None,
    lr: float | None = None,
    device: str = "auto",
    initial_path: str | Path | None = None,
    quiet: bool = False,
    background: float | None = None,
    bending: float | None = None,
    tolerance: float | None = None,
    threads: int | None = None,
    coarse_iterations: int | None = None,
    refine_layers: str | None = None,
    region_margin_mm: float | None = None,
    polish: int | None = None,
    anchor: float | None = None,
    passes: int | None = None,
    bias_correct: bool = False,
    retry: bool = True,
    figure: bool = True,
    write_jacobian: bool = False,
    atlas_path: str | Path | None = None,
    on_images: Callable[[object, object, object], None] | None = None,
    skip_done: bool = False,
) -> dict:
    """Register a pair with one model or a chain (affine models, then at most one B-spline) and write the outputs;
    no ``model_paths``: the bundled default chain (brain-t1 affine, then its B-spline).

    Everything is checked (`check_register_inputs`) before any computation and
    every result before anything is written; each file is written atomically.
    ``background`` fills ``warped.nii.gz`` outside the moving image (default:
    the moving image's minimum). ``bending`` and ``anchor`` (B-spline stage) and ``tolerance``
    (every stage) and ``coarse_iterations`` (every stage: how many of the first
    iterations run on half-resolution maps), ``refine_layers`` (every stage:
    "all" STN weights or its fully connected layers, "fc") and
    ``region_margin_mm`` (every stage: the maps compared around the fixed
    structures, inf: the whole grid) and ``polish`` (every stage: iterations
    polishing the transform's parameters after the refinement) and ``passes``
    (every stage: refinement passes, each a new look of the network at the
    moving image through the result so far) override the models' refinement settings (`register`). ``iterations`` None: each
    model's ``refinement.iterations``, else 50. ``bias_correct``: every stage sees both images divided by their
    intensity bias (N4; `register`).
    ``retry``: when a stage's self-check fails and the models' folder holds models trained on varied views
    (brain-synth beside brain-t1), register again with those and keep the result whose images end the more
    alike (`istn.chain`); ``result.json`` ``retry`` says what was tried and kept.
    ``figure``: also write ``overview.png`` (`istn.figures.registration_overview`), the result at a glance; a
    figure that cannot be drawn is a warning, the registration's files stay. ``write_jacobian``: a non-linear
    result's Jacobian determinant on the fixed grid as ``jacobian.nii.gz`` (`istn.registration.jacobian_image`;
    result.json's "jacobian" sums it up from a 4 mm lattice either way). ``atlas_path``: a label map of the FIXED
    space (an atlas drawn on the template) brought onto the moving image's own grid through the result's inverse
    (`istn.inverse.inverse_transform`), written as ``atlas_labels.nii.gz``; result.json's "atlas" gives each
    label's volume there (ml) and the inverse's round trip (`read_atlas` checks it first).
    ``on_images(fixed, warped, fixed_map)``: the images as written, once they are (a cohort's montage uses them
    instead of reading the files back).
    ``skip_done``: when ``out_dir`` holds a finished run that was asked the same (`finished_run`: the same input
    files, unchanged since, the same models and options), return its ``result.json`` (with ``reused`` true)
    instead of registering again: a batch stopped part way, or a script run again, goes on where it was.
    Returns the content of ``result.json``; its ``warnings`` gather every
    stage's (the CLI prints them).
    """
    import SimpleITK as sitk

    from ..export import load_model, resolve_model_path
    from ..io import (analyze_warning, analyze_without_orientation, check_earlier_outputs, prepare_output_dir,
                      read_image, read_transform, write_image, write_json, write_transform)
    from ..chain import register_with_second_try
    from ..registration import (OUTPUT_FIELD_SPACING_MM, check_register_inputs, jacobian_image, jacobian_on_grid,
                                warp_image)

    if not str(out_dir).strip():
        raise OutputError("--out is empty: name the output folder")
    # a bundled model may be named by its file name from any folder
    model_paths = [resolve_model_path(p) for p in model_paths] if model_paths else default_models(quiet)
    check_register_options(iterations, lr, device, background, bending, tolerance, threads, coarse_iterations,
                           region_margin_mm, polish, anchor, passes)
    names = list(REGISTER_OUTPUTS) + list(REGISTER_OPTIONAL_OUTPUTS)
    inputs = [fixed_path, moving_path, *model_paths] + [p for p in (initial_path, atlas_path) if p]
    request = run_request(fixed_path, moving_path, model_paths, initial_path, atlas_path,
                          {k: v for k, v in locals().items() if k in REQUEST_OPTIONS})
    earlier = finished_run(Path(out_dir), request) if skip_done else None
    if earlier is not None:
        if on_images is not None:
            on_images(read_image(fixed_path, "fixed"), read_image(Path(out_dir) / "warped.nii.gz", "earlier warped"),
                      read_image(Path(out_dir) / "itn_fixed.nii.gz", "earlier fixed map"))
        return {**earlier, "reused": True}
    fixed = read_image(fixed_path, "fixed")
    moving = read_image(moving_path, "moving")
    if fixed.GetDimension() != moving.GetDimension():
        raise InputError(f"fixed image is {fixed.GetDimension()}D but moving image is {moving.GetDimension()}D")
    atlas = read_atlas(atlas_path, fixed) if atlas_path else None
    models = [load_model(p) for p in model_paths]
    initial = read_transform(initial_path, "--initial transform") if initial_path else None
    check_register_inputs(fixed, moving, models, iterations=iterations, lr=lr, device=device,
                          initial_transform=initial, initial_name=f"--initial transform '{initial_path}'",
                          refine_layers=refine_layers, region_margin_mm=region_margin_mm, polish=polish,
                          anchor=anchor, passes=passes)
    bg = float(sitk.GetArrayViewFromImage(moving).min()) if background is None else float(background)
    # Inputs are good: check the output location before the (long) computation.
    created = not Path(out_dir).exists()
    out = prepare_output_dir(out_dir, inputs, names)
    try:
        check_earlier_outputs(out, names)
        t0 = time.perf_counter()

        def callback_for(index, model):
            def progress(info, _name=model.path.name):
                if not quiet and (info.iteration % 10 == 0 or info.iteration == info.iterations):
                    print(f"  {_name}: refinement {info.label()} loss {info.loss:.6f}", file=sys.stderr)
            return progress

        options = dict(iterations=iterations, lr=lr, device=device, bending=bending, tolerance=tolerance,
                       threads=threads, coarse_iterations=coarse_iterations, refine_layers=refine_layers,
                       region_margin_mm=region_margin_mm, polish=polish, anchor=anchor, passes=passes,
                       bias_correct=bool(bias_correct))

        def say_retry(paths):
            if not quiet:
                print(f"  a self-check failed: registering again with {', '.join(p.name for p in paths)}",
                      file=sys.stderr)

        def say_turns(count):
            if not quiet:
                print(f"  a self-check failed: looking for how the moving head lies ({count} turns)", file=sys.stderr)

        results, second_try = register_with_second_try(fixed, moving, models, retry=retry, on_retry=say_retry,
                                                       turns=retry, on_turns=say_turns, initial_transform=initial,
                                                       callback_for=callback_for, **options)
        stages = [{**r.summary(), "model_file": r.model_path} for r in results]  # summary's "model": the metadata
        result = results[-1]
        # the output image through a dense field (fast at 1 mm); the transform written is the exact one
        warped = warp_image(moving, fixed, result.transform, default_value=bg, field_spacing=OUTPUT_FIELD_SPACING_MM)
        itn_moving = result.warped_moving_map()
        linear_part = jacobian = jacobian_sample = None
        checked = {"warped image": warped, "fixed ITN map": result.fixed_map, "moving ITN map": itn_moving}
        if result.transform_type == "bspline":  # its linear part: a valid --initial for a B-spline model
            linear_part = result.initial_transform or sitk.AffineTransform(fixed.GetDimension())
        atlas_on_moving = atlas_summary = None
        if atlas is not None:  # the fixed space's labels on the moving grid: through the inverse
            atlas_on_moving, atlas_summary = _atlas_on_moving(atlas, moving, result.transform)
            checked["atlas labels"] = atlas_on_moving
        if not result.transform.IsLinear():  # the local volume change, where a linear result has one value:
            # summed up from the field's lattice (a uniform sample, cheap); the image on the fixed grid if asked for
            jacobian_sample = checked["Jacobian determinant"] = jacobian_image(
                result.transform, fixed, OUTPUT_FIELD_SPACING_MM, resample=False)
            if write_jacobian:  # the same lattice, interpolated onto the fixed grid
                jacobian = checked["Jacobian image"] = jacobian_on_grid(jacobian_sample, fixed)
        _check_result(result.transform, checked)
        summary = {
            "fixed": str(fixed_path),
            "moving": str(moving_path),
            "request": request,
            "initial": str(initial_path) if initial_path else None,
            "transform_maps": "fixed world points (mm, LPS) -> moving world points",
            "background": bg,
            "stages": stages,
            "warnings": [analyze_warning(p, f"{role} image") for role, p in (("fixed", fixed_path), ("moving",
                                                                                            moving_path))
                         if analyze_without_orientation(p)]
            + ([second_try.note()] if second_try else [])
            + [f"{Path(s['model_file']).name}: {w}" for s in stages for w in s["warnings"]],
            "retry": second_try.summary() if second_try else None,
            "seconds_total": time.perf_counter() - t0,
        }
        if jacobian_sample is not None:
            summary["jacobian"] = _jacobian_summary(jacobian_sample)
        if atlas_summary is not None:
            summary["atlas"] = {"input": str(atlas_path), **atlas_summary}
            if atlas_summary["inverse"].get("warning"):
                summary["warnings"].append(f"--atlas: {atlas_summary['inverse']['warning']}")
        # Everything computed and checked: now write, into a staging folder inside ``out`` first, then moved into
        # place together: an interrupt (Ctrl-C, SIGTERM) or a full disk leaves the folder as it was, never one run's
        # transform beside another's result.json
        with _staging(out) as stage:
            written = ["transform.h5"]
            write_transform(result.transform, stage / "transform.h5")
            if result.transform_type == "affine" and result.transform.IsLinear():
                write_transform(result.transform, stage / "transform.tfm")
                written.append("transform.tfm")
            if linear_part is not None:
                write_transform(linear_part, stage / "affine.tfm")
                written.append("affine.tfm")
            write_image(warped, stage / "warped.nii.gz")
            write_image(result.fixed_map, stage / "itn_fixed.nii.gz")
            write_image(itn_moving, stage / "itn_moving.nii.gz")
            written += ["warped.nii.gz", "itn_fixed.nii.gz", "itn_moving.nii.gz"]
            if jacobian is not None:
                write_image(jacobian, stage / "jacobian.nii.gz")
                written.append("jacobian.nii.gz")
            if atlas_on_moving is not None:
                write_image(atlas_on_moving, stage / atlas_summary["written"])
                written.append(atlas_summary["written"])
            if figure:
                try:
                    _overview(stage / "overview.png", fixed, moving, warped, result, itn_moving, results, summary,
                              jacobian_sample)
                    summary["figure"] = "overview.png"
                    written.append("overview.png")
                except Exception as exc:  # a picture never costs the user the registration's files
                    summary["warnings"].append(f"overview.png was not drawn ({type(exc).__name__}: "
                                               f"{first_line(exc)})")
            # an earlier run's optional output (its result.json said it was one, `check_earlier_outputs`) must not
            # pass for this one's
            removed = [n for n in REGISTER_OPTIONAL_OUTPUTS if n not in written and (out / n).is_file()]
            summary["outputs"] = written + ["result.json"]
            summary["output_bytes"] = {name: (stage / name).stat().st_size for name in written}
            if removed:
                summary["removed_from_an_earlier_run"] = removed
            write_json(summary, stage / "result.json")
            # into place: the earlier result.json first, so a folder is never described by another run's
            (out / "result.json").unlink(missing_ok=True)
            for name in written:
                os.replace(stage / name, out / name)
            for name in removed:
                (out / name).unlink()
            os.replace(stage / "result.json", out / "result.json")
    except BaseException:
        _remove_if_empty(out, created)
        raise
    if on_images is not None:
        on_images(fixed, warped, result.fixed_map)
    return summary


def _file_stamp(path: Path) -> list | None:
    """What tells a later run that an input file (or a DICOM folder's files) changed: sizes and modification
    times; None for a path that is not there (the input checks that follow say so)."""
    try:
        if path.is_dir():
            entries = [f.stat() for f in path.iterdir() if f.is_file()]
            return [len(entries), sum(e.st_size for e in entries), max((e.st_mtime_ns for e in entries), default=0)]
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


# `run_register`'s options that shape a result (result.json's ``request``): not threads, verbosity or callbacks
REQUEST_OPTIONS = ("iterations", "lr", "device", "background", "bending", "tolerance", "coarse_iterations",
                   "refine_layers", "region_margin_mm", "polish", "anchor", "passes", "bias_correct", "retry",
                   "figure", "write_jacobian")


def run_request(fixed_path, moving_path, model_paths, initial_path, atlas_path, options: dict) -> dict:
    """What a run was asked (result.json's ``request``): its inputs (absolute paths, with sizes and modification
    times) and the options that shape its result (not threads or verbosity). A batch's ``skip_done`` keeps an
    earlier run only when it was asked the same."""
    from .. import __version__
    from ..io import is_dicom_file

    def entry(p) -> dict | None:
        if not p:
            return None
        q = Path(p).resolve()
        # a DICOM file stands for its whole series: the folder's files are what can change
        return {"path": str(q), "stamp": _file_stamp(q.parent if q.is_file() and is_dicom_file(q) else q)}

    if options.get("device") == "auto":  # the device it ran on: "auto" and "cpu" are one request on a CPU machine
        import torch

        options = {**options, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    return {"istn": __version__, "engine": engine_fingerprint(),
            "fixed": entry(fixed_path), "moving": entry(moving_path), "models": [entry(m) for m in model_paths],
            "initial": entry(initial_path), "atlas": entry(atlas_path),
            # as JSON keeps them (inf, a region margin, as a string): an earlier run's record compares equal
            "options": {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                        for k, v in sorted(options.items())}}


@functools.lru_cache(maxsize=1)
def engine_fingerprint() -> str:
    """A digest of the engine's own source files (``istn/**/*.py``): an earlier run of other engine code (an
    update, a fix) is not the run a user would get now, so ``skip_done`` does not keep it."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _result_record(folder: Path) -> dict | None:
    """The ``result.json`` of ``folder`` as a dict; None when there is none or it cannot be read as one."""
    try:
        record = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def finished_run(folder: Path, request: dict) -> dict | None:
    """The ``result.json`` of a finished run in ``folder`` that was asked ``request`` (`run_request`) and whose
    outputs are all there as written (their sizes); None otherwise (no run, another request or engine, a file
    missing or cut short, an unreadable record, a record of a version that kept no sizes)."""
    earlier = _result_record(folder)
    if earlier is None or earlier.get("request") != request:
        return None
    sizes = earlier.get("output_bytes")  # each output as it was written: one cut short or replaced since is not
    if not isinstance(sizes, dict) or not sizes:
        return None
    for name, size in sizes.items():
        try:
            if (folder / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return earlier


# --------------------------------------------------------------------------
# register, several moving images
# --------------------------------------------------------------------------

BATCH_SUMMARY = ("summary.json", "summary.csv", "summary.png")


def subject_name(path: str | Path) -> str:
    """The output folder of one moving image of a batch: its file name without the image extension(s)
    (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``); a DICOM series' folder, or a file of it, by the folder's name."""
    from ..io import image_suffix, is_dicom_file

    p = Path(path)
    if p.is_dir() or is_dicom_file(p):  # the folder as given ("." is where one stands), links not followed
        folder = Path(os.path.normpath(p.absolute() if p.is_dir() else p.absolute().parent))
        return folder.name
    suffix = image_suffix(p)
    return p.name[: -len(suffix)] if suffix and p.name != suffix else p.name


def subject_names(paths: Sequence[str | Path]) -> list[str]:
    """The output folders of a batch's moving images: `subject_name`, and where several images share it (a layout
    of one folder per subject: ``sub-01/anat/T1w.nii.gz``, ``sub-02/anat/T1w.nii.gz``), each of those preceded by
    as many of its folders as it takes to tell them apart, joined by ``_`` (``sub-01_anat_T1w``,
    ``sub-02_anat_T1w``). Raises `InputError` for an image (or DICOM series) given twice, and for images that
    their folders cannot tell apart (``T1.nii.gz`` and ``T1.nrrd`` side by side)."""
    from ..io import is_dicom_file

    # what the name is of: the file, a DICOM series' folder, or the folder of a DICOM file given for its series;
    # named by the folders as given (a DataLad / git-annex file is a link into the annex: not the annex's folders),
    # told apart from each other by where they really are
    anchors = []
    for p in map(Path, paths):
        q = p.absolute()
        anchors.append(q.parent if not q.is_dir() and is_dicom_file(q) else q)
    real = [q.resolve() for q in anchors]
    for i, q in enumerate(real):
        if q in real[:i]:
            j = real.index(q)
            raise InputError(f"moving images '{paths[j]}' and '{paths[i]}' are the same "
                             f"{'DICOM series' if q.is_dir() else 'image'}: give each image once")
    base = [subject_name(p) for p in paths]
    folders = [[f.name for f in Path(os.path.normpath(q)).parents if f.name] for q in anchors]  # nearest first

    def named(i: int, depth: int) -> str:
        return "_".join([*reversed(folders[i][:depth]), base[i]])

    depth = [0] * len(paths)
    while True:
        names = [named(i, d) for i, d in enumerate(depth)]
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        clashes = [g for g in groups.values() if len(g) > 1]
        if not clashes:
            return names
        for group in clashes:
            same = [i for i in group if any(folders[j] == folders[i] for j in group if j != i)]
            if not same and all(depth[i] == len(folders[i]) for i in group):  # /a_b/T1 and /a/b/T1: no more to add
                same = group
            if same:  # side by side (or in folders named alike all the way up): no folder tells them apart
                raise InputError(f"moving images {' and '.join(repr(str(paths[i])) for i in same)} would both write "
                                 f"into a folder named {base[same[0]]!r}: give them distinct file (or DICOM folder) "
                                 "names")
            # each grows to at least the folders below the group's common folder, so that a name holds the folder
            # that tells it apart (sub-01/anat/T1w beside sub-02/T1w: sub-01_anat_T1w, not anat_T1w); one whose
            # folders are all named already keeps its name
            parents = [Path(os.path.normpath(anchors[i])).parent for i in group]
            try:
                common = len(Path(os.path.commonpath(parents)).parts)
            except ValueError:  # on Windows, folders on different drives: none in common
                common = 0
            mixed = len({len(parent.parts) for parent in parents}) > 1  # folders of several depths only
            for i, parent in zip(group, parents):
                needed = len(parent.parts) - common if mixed else 0
                depth[i] = min(max(depth[i] + 1, needed), len(folders[i]))


def shown_name(path: str | Path) -> str:
    """An input as a picture names it: its file name, or for a DICOM series (its folder, or one file of it) its
    Series Description and folder, so that a slice's file name (or a scanner's folder number) does not stand for
    the volume."""
    from ..io import dicom_series_description, is_dicom_file

    p = Path(path)
    if p.is_dir() or is_dicom_file(p):
        description = " ".join(dicom_series_description(p).split())  # one line, however the header spaces it
        folder = subject_name(p)
        return f"{description} (DICOM series, {folder})" if description else f"{folder} (DICOM series)"
    return p.name


def run_register_many(fixed_path: str | Path, moving_paths: Sequence[str | Path],
                      model_paths: Sequence[str | Path] | None, out_dir: str | Path, quiet: bool = False,
                      on_done: Callable[[dict], None] | None = None, skip_done: bool = False, **options) -> dict:
    """Register several moving images to one fixed image in one process (torch and the models load once): each
    as `run_register` registers a pair, into ``out_dir/<subject_name>/``, then ``summary.json`` and
    ``summary.csv`` in ``out_dir``, one row per moving image, and with ``figure`` (the default) ``summary.png``:
    every image's checkerboard with the fixed image, axial through the structures (`istn.figures.cohort_montage`),
    to find the misregistrations of a cohort at a glance (a montage that cannot be drawn is a warning).

    Checked up front: every moving image exists, no two would share a folder. A moving image that fails (bad
    input, a registration that could not be written) is reported, its row says why, and the others go on;
    ``failed`` counts them. ``on_done(row)`` after each image (the command line prints it then).
    ``skip_done``: an image whose folder holds a finished run that was asked the same (`finished_run`: the same
    inputs, unchanged since, models and options) is not registered again; its row is that run's (``reused``).
    An image keeps the folder its earlier run wrote there even where images added since lengthen the names
    (`_earlier_folders`).
    An interrupt (Ctrl-C, SIGTERM) between or during images still writes ``summary.json`` and ``summary.csv``,
    the images not finished marked "not run", then goes on as the interrupt (so a second command with
    ``skip_done`` resumes the batch).
    ``options``: `run_register`'s keyword arguments.
    """
    from ..io import check_earlier_outputs, check_input_file, prepare_output_dir

    if options.get("initial_path"):
        raise InputError("--initial belongs to one pair: with several --moving images, register them without it (or "
                         "one at a time)")
    # a bad option fails the batch, not each image: the options check_register_options takes, from ``options``
    checked = [k for k in inspect.signature(check_register_options).parameters if k != "device"]
    check_register_options(device=options.get("device", "auto"), **{k: options.get(k) for k in checked})
    moving = [Path(p) for p in moving_paths]
    for p in moving:
        if not p.is_dir():
            check_input_file(p, "moving image")
    names = subject_names(moving)
    if skip_done:  # an image registered before into this folder keeps its folder, however the batch has grown
        names = _earlier_folders(Path(out_dir), moving, names)
    for p, name in zip(moving, names):
        if name in BATCH_SUMMARY:
            raise InputError(f"moving image '{p}' would write into {Path(out_dir) / name}, the batch's summary: "
                             "rename it")
    if options.get("atlas_path"):  # a bad atlas fails the batch up front, not each image
        from ..io import read_image

        read_atlas(options["atlas_path"], read_image(fixed_path, "fixed"))
    from ..export import resolve_model_path

    # said once, not per image; a bundled model may be named by its file name from any folder
    model_paths = [resolve_model_path(p) for p in model_paths] if model_paths else default_models(quiet)
    if not str(out_dir).strip():
        raise OutputError("--out is empty: name the output folder")
    out = prepare_output_dir(out_dir, [fixed_path, *moving, *model_paths], [*names, *BATCH_SUMMARY])
    check_earlier_outputs(out, BATCH_SUMMARY, "summary.json", ("moved", "rows"), "istn register batch")
    rows: list[dict] = []
    tiles: list[tuple[str, object, str]] = []  # the montage's: (name, tile or None, note), made as each image ends
    montage: dict = {}  # the fixed image's display grid and slice, from the first image registered
    warnings: list[str] = []
    t0 = time.perf_counter()
    written = ["summary.json", "summary.csv"]
    try:
        _batch_loop(fixed_path, moving, names, model_paths, out, quiet, on_done, skip_done, options, rows, tiles,
                    montage, warnings)
        if options.get("figure", True) and not warnings:
            try:
                from ..figures import cohort_montage

                cohort_montage(out / "summary.png", tiles, title=f"istn register: {len(rows)} images -> "
                                                                 f"{shown_name(fixed_path)} (checkerboards)")
                written.append("summary.png")
            except Exception as exc:
                warnings.append(f"summary.png was not drawn ({type(exc).__name__}: {first_line(exc)})")
    except KeyboardInterrupt:  # what was done stays findable: the summary of the images finished, then the interrupt
        done = {r["moving"] for r in rows}
        rows += [{"moving": str(p), "folder": name, "status": "not run", "error": "the batch was interrupted"}
                 for p, name in zip(moving, names) if str(p) not in done]
        _write_batch_summary(out, fixed_path, rows, ["summary.json", "summary.csv"], ["the batch was interrupted"],
                             names, t0, interrupted=True)
        raise
    return _write_batch_summary(out, fixed_path, rows, written, warnings, names, t0)


def _earlier_folders(out: Path, moving: list[Path], names: list[str]) -> list[str]:
    """``names`` (`subject_names`), each replaced by the folder of ``out`` whose ``result.json`` is of that moving
    image (its ``request``), where there is one and no other image of the batch is named so. Images added to a
    batch can lengthen the names of those before them (a second ``sub-01/anat/T1w.nii.gz`` from another site):
    with ``skip_done`` those keep the folders of their finished runs instead of being registered again beside
    them."""
    earlier: dict[str, list[str]] = {}  # the moving image's resolved path -> the folders its earlier runs wrote
    if not out.is_dir():
        return names
    for folder in sorted(d for d in out.iterdir() if d.is_dir()):
        try:
            path = (_result_record(folder) or {})["request"]["moving"]["path"]
        except (KeyError, TypeError):
            continue
        if isinstance(path, str):
            earlier.setdefault(path, []).append(folder.name)
    taken = set(names)
    kept = list(names)
    for i, p in enumerate(moving):
        folders = earlier.get(str(p.resolve()), [])
        if names[i] in folders:  # its folder as named now holds a run of it already: that one
            continue
        folder = folders[0] if folders else None
        if folder is not None and folder not in taken and folder not in BATCH_SUMMARY:
            taken.add(folder)
            kept[i] = folder
    return kept


def _batch_loop(fixed_path, moving: list[Path], names: list[str], model_paths, out: Path, quiet: bool,
                on_done, skip_done: bool, options: dict, rows: list, tiles: list, montage: dict,
                warnings: list) -> None:
    """`run_register_many`'s images, one by one: ``rows``, ``tiles`` and ``warnings`` grow as each ends."""
    for k, (p, name) in enumerate(zip(moving, names)):
        row: dict = {"moving": str(p), "folder": name}
        images: dict = {}  # this image's fixed, warped and fixed map, as its run wrote them

        def keep(fixed, warped, fixed_map, images=images) -> None:
            images.update(fixed=fixed, warped=warped, fixed_map=fixed_map)

        if not quiet:
            print(f"[{k + 1}/{len(moving)}] {p} -> {out / name}", file=sys.stderr)
        try:
            s = run_register(fixed_path, p, model_paths, out / name, quiet=quiet, on_images=keep, skip_done=skip_done,
                             **options)
            row["reused"] = bool(s.get("reused"))
        except ISTNError as exc:  # bad input: this image only
            row.update(status="bad input", error=str(exc))
        except ResultError as exc:
            row.update(status="failed", error=str(exc))
        except Exception as exc:  # a fault of the tool on this image: the others still run
            row.update(status="failed", error=f"internal error: {type(exc).__name__}: {first_line(exc)}")
        else:
            last = s["stages"][-1]
            info = last.get("mutual_information") or {}
            row.update(status="ok", seconds=s["seconds_total"], loss_one_pass=s["stages"][0]["loss_one_pass"],
                       loss_final=last["loss_final"], mutual_information_as_given=info.get("as_given"),
                       mutual_information_result=info.get("result"), warnings=s["warnings"],
                       lines=[stage_line(st) for st in s["stages"]])
            if s.get("jacobian"):
                row["folding_fraction"] = s["jacobian"]["folding_fraction"]
            if s.get("atlas"):  # the atlas' structures measured on this image's own grid
                key, unit = _atlas_sizes(s["atlas"])
                row.update({f"atlas_{unit}_{label}": v for label, v in s["atlas"][key].items()})
        rows.append(row)
        if options.get("figure", True) and not warnings:
            try:
                tiles.append(_montage_tile(montage, images, row))
            except Exception as exc:  # a picture never costs the user the registrations
                warnings.append(f"summary.png was not drawn ({type(exc).__name__}: {first_line(exc)})")
        if on_done is not None:
            on_done(row)


def _write_batch_summary(out: Path, fixed_path, rows: list[dict], written: list[str], warnings: list[str],
                         names: list[str], t0: float, interrupted: bool = False) -> dict:
    """``summary.json`` and ``summary.csv`` of a batch (`run_register_many`) into ``out``; returns the summary."""
    import csv
    import io as text_io

    from ..io import atomic_write, write_json

    if "summary.png" not in written and (out / "summary.png").is_file():  # an earlier batch's: not this one's
        (out / "summary.png").unlink()
    summary = {"fixed": str(fixed_path), "moved": len(rows), "failed": sum(r["status"] != "ok" for r in rows),
               "reused": sum(bool(r.get("reused")) for r in rows), "interrupted": interrupted,
               "seconds_total": time.perf_counter() - t0, "outputs": written, "warnings": warnings, "rows": rows}
    # results of an earlier batch into this folder stay (they are the user's), but are not this batch's: say so
    earlier = sorted(d.name for d in out.iterdir() if d.is_dir() and d.name not in names and (d / "result.json").is_file())
    if earlier:
        summary["earlier_results_not_in_this_batch"] = earlier
    write_json(summary, out / "summary.json")
    columns = ["moving", "folder", "status", "seconds", "loss_one_pass", "loss_final", "mutual_information_as_given",
               "mutual_information_result", "folding_fraction", "warnings", "error"]
    # --atlas: one column per label, in order (label values by value; a segmentation's names as in its file)
    size_columns = list(dict.fromkeys(k for r in rows for k in r if k.startswith("atlas_")))
    suffixes = [k.split("_", 2)[2] for k in size_columns]
    if all(s.isdigit() for s in suffixes):
        size_columns = [k for _, k in sorted(zip(map(int, suffixes), size_columns))]
    columns[-2:-2] = size_columns
    columns.append("reused")  # last: the columns of earlier batches keep their places

    def write_csv(tmp: str) -> None:
        buffer = text_io.StringIO()
        writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "warnings": "; ".join(r.get("warnings", []))})
        Path(tmp).write_text(buffer.getvalue())

    atomic_write(out / "summary.csv", write_csv)
    return summary


def _montage_tile(montage: dict, images: dict, row: dict) -> tuple[str, object, str]:
    """One image's tile of ``summary.png`` from the images its run wrote (``images``: fixed, warped, fixed_map):
    its checkerboard with the fixed image and its numbers, or, for a failed image, why. ``montage`` keeps the fixed
    image's display grid and slice (`istn.figures.cohort_slice`), made from the first image registered."""
    from ..figures import checkerboard_tile, cohort_slice

    if row["status"] != "ok":
        return row["folder"], None, f"{row['status']}: {row['error']}"
    if not montage:
        montage["grid"], montage["index"] = cohort_slice(images["fixed"], images["fixed_map"])
    tile = checkerboard_tile(montage["grid"], montage["index"], images["warped"])
    given, result = row.get("mutual_information_as_given"), row.get("mutual_information_result")
    note = f"MI {given:.2f} -> {result:.2f}" if given is not None and result is not None else ""
    if row.get("folding_fraction"):
        note += f", folding {100 * row['folding_fraction']:.2f} %"
    if row["warnings"]:
        note += f", {len(row['warnings'])} warning{'s' if len(row['warnings']) > 1 else ''}"
    return row["folder"], tile, note.lstrip(", ")


def read_atlas(path: str | Path, fixed=None):
    """``--atlas``: a label map of the fixed space (integer values that form regions, as `istn evaluate` tells them
    from intensities), read with its pixel type; refused in one line otherwise, or when it is not of ``fixed``'s
    dimension or does not overlap ``fixed`` in the world."""
    import numpy as np
    import SimpleITK as sitk

    from .. import segfile
    from ..geometry import Grid
    from ..io import read_raw_image
    from ..metrics import looks_like_intensities

    atlas = read_raw_image(path, "--atlas label map")
    what = f"--atlas '{path}'"
    segmentation = bool(segfile.header(atlas))  # a Slicer segmentation: its layers may overlap, its values are labels
    if atlas.GetNumberOfComponentsPerPixel() != 1 and not segmentation:
        raise InputError(f"{what} has {atlas.GetNumberOfComponentsPerPixel()} components per pixel; a label map or "
                         "a Slicer segmentation (.seg.nrrd) is expected")
    values = sitk.GetArrayViewFromImage(atlas)
    if (not np.issubdtype(values.dtype, np.integer) and not np.array_equal(values, np.round(values))) \
            or (not segmentation and looks_like_intensities(atlas)):
        raise InputError(f"{what} is not a label map (whole-number labels whose edges are steps, not the in-between "
                         "values of an image's); to bring another image of "
                         "the fixed space onto the moving grid use `istn apply --inverse`")
    if not values.any():
        raise InputError(f"{what} holds no label (every voxel is 0)")
    if fixed is not None:
        if atlas.GetDimension() != fixed.GetDimension():
            raise InputError(f"{what} is {atlas.GetDimension()}D but the fixed image is {fixed.GetDimension()}D")
        boxes = []
        for image in (atlas, fixed):
            corners = Grid.from_image(image).voxel_to_world(
                np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in image.GetSize()], indexing="ij")).reshape(
                    image.GetDimension(), -1).T)
            boxes.append((corners.min(0), corners.max(0)))
        if np.any(boxes[0][1] < boxes[1][0]) or np.any(boxes[1][1] < boxes[0][0]):
            raise InputError(f"{what} does not overlap the fixed image in world coordinates: it must be a label map "
                             "of the fixed image's space (drawn on it, or on its template)")
    return atlas


def _atlas_on_moving(atlas, moving, transform) -> tuple[object, dict]:
    """``atlas`` (labels of the fixed space) on ``moving``'s grid through ``transform``'s inverse, by nearest
    neighbour, its pixel type kept; and what to say of it: each label's volume there (ml; a 2D image's: area,
    mm^2), the labels that fall outside, the inverse's round trip. A Slicer segmentation's segments are named by
    their names (`istn.segfile.unique_names`), its layers warped apart, its header kept for a ``.seg.nrrd``."""
    import numpy as np
    import SimpleITK as sitk

    from .. import segfile
    from ..inverse import labels_onto_moving
    from .apply import warn_if_it_misses
    from .evaluate import label_values

    inverted, onto_moving = labels_onto_moving(transform, moving)
    on_moving = segfile.warp_layers(atlas, onto_moving)
    volume_3d = on_moving.GetDimension() == 3
    voxel = float(np.prod(on_moving.GetSpacing())) / (1000.0 if volume_3d else 1.0)  # ml, or mm^2 of a 2D image
    inverse = inverted.summary()
    warn_if_it_misses(inverse, inverted.round_trip_mm)
    head = segfile.header(atlas)
    if head:
        segments = segfile.segments(head)
        given, counts = segfile.sizes(atlas, segments), segfile.sizes(on_moving, segments)
        sizes = {name: c * voxel for name, c in counts.items() if c}
        outside = [name for name, c in counts.items() if given[name] and not c]
        segfile.with_header(on_moving, head)
        written = ATLAS_SEGMENTATION_OUTPUT
    else:
        values = sitk.GetArrayViewFromImage(on_moving)
        labels, n = np.unique(values[values != 0], return_counts=True)
        sizes = {str(int(v)): float(c) * voxel for v, c in zip(labels.tolist(), n.tolist())}
        outside = sorted(label_values(atlas) - set(labels.tolist()))
        written = ATLAS_OUTPUT
    return on_moving, {"written": written, ("volumes_ml" if volume_3d else "areas_mm2"): sizes,
                       "labels_outside_the_moving_image": outside, "inverse": inverse}


def atlas_line(atlas: dict) -> str:
    """``result.json``'s "atlas" as `istn register` prints it (two lines: the file, each label's size)."""
    trip = atlas["inverse"]["round_trip_mm"]
    exact = "exact inverse" if atlas["inverse"]["exact"] else f"inverse's round trip within {trip['max']:.3f} mm"
    key, unit = _atlas_sizes(atlas)
    sizes = ", ".join(f"{label}: {size:.2f}" for label, size in list(atlas[key].items())[:40])
    more = f", ... ({len(atlas[key]) - 40} more in result.json)" if len(atlas[key]) > 40 else ""
    kind = "segments" if atlas["written"].endswith(".seg.nrrd") else "labels"
    return (f"atlas labels on the moving grid: {atlas['written']} ({len(atlas[key])} {kind}, "
            f"{sum(atlas[key].values()):.1f} {unit} in all; {exact})\n  {unit} per {kind[:-1]}: {sizes}{more}")


def _atlas_sizes(atlas: dict) -> tuple[str, str]:
    """Where an "atlas" summary keeps its labels' sizes, and their unit: volumes (ml) in 3D, areas (mm2) in 2D."""
    return ("volumes_ml", "ml") if "volumes_ml" in atlas else ("areas_mm2", "mm2")


def _jacobian_summary(jacobian) -> dict:
    """The Jacobian determinant of a result in numbers: its range and percentiles, and the fraction of points that
    fold, over ``jacobian`` (`istn.registration.jacobian_image`: the fixed grid, or a uniform lattice over it)."""
    import SimpleITK as sitk

    from ..metrics import jacobian_statistics

    return {"what": "Jacobian determinant of the fixed -> moving map over the fixed image's field of view (>1: the "
                    "moving anatomy is larger there; --jacobian writes it as jacobian.nii.gz)",
            "sampled_every_mm": [float(v) for v in jacobian.GetSpacing()],
            **jacobian_statistics(sitk.GetArrayViewFromImage(jacobian))}


def jacobian_line(jacobian: dict) -> str:
    """``result.json``'s "jacobian" as `istn register` prints it (and `overview.png` shows it)."""
    return (f"Jacobian determinant (local volume change): {jacobian['p1']:.3f} to {jacobian['p99']:.3f} (1st to 99th "
            f"percentile), folding {100 * jacobian['folding_fraction']:.3f} %")


def stage_line(st: dict) -> str:
    """One stage of ``result.json`` as `istn register` prints it (and `overview.png` shows it)."""
    stop = " (converged)" if st["converged"] else ""
    polished = f", {st['polish_iterations']} of them polish" if st.get("polish_iterations") else ""
    info = st.get("mutual_information") or {}
    alike = f"; images' mutual information {info['as_given']:.3f} as given -> {info['result']:.3f}" if info else ""
    return (f"{Path(st['model_file']).name}: loss {st['loss_one_pass']:.6f} -> {st['loss_final']:.6f} after "
            f"{st['iterations']} iterations{polished}{stop}{alike}")


def _overview(path: Path, fixed, moving, warped, result, itn_moving, results, summary: dict, jacobian=None) -> None:
    """``overview.png``: the images, the ITN maps and each stage's refinement, with what the terminal printed
    (and a non-linear result's Jacobian determinant: ``jacobian``, its lattice)."""
    from ..config import has_itn
    from ..figures import registration_overview

    notes = [f"fixed:  {shown_name(summary['fixed'])}", f"moving: {shown_name(summary['moving'])}", ""]
    notes += [stage_line(st) for st in summary["stages"]]
    if summary.get("jacobian"):
        notes.append(jacobian_line(summary["jacobian"]))
    if summary.get("atlas"):
        notes.append(atlas_line(summary["atlas"]).splitlines()[0])
    notes.append(f"{summary['seconds_total']:.1f} s")
    notes += [f"warning: {w}" for w in summary["warnings"]]
    names = [Path(st["model_file"]).stem for st in summary["stages"]]
    if len(set(names)) < len(names):  # models of one name (istn train exports OUT/model.pt): one curve each
        names = [f"{n} ({k + 1}: {r.transform_type})" for k, (n, r) in enumerate(zip(names, results))]
    stages = dict(zip(names, results))
    registration_overview(path, fixed, moving, warped, stages, fixed_map=result.fixed_map,
                          warped_moving_map=itn_moving, notes=[textwrap.fill(n, 48, subsequent_indent="  ")
                                                               for n in notes],
                          title=f"istn register: {shown_name(summary['moving'])} -> {shown_name(summary['fixed'])}",
                          background=summary["background"], jacobian=jacobian,
                          learned_maps=has_itn(result.model_meta))


def _check_result(transform, images: dict) -> None:
    """Refuse to write a non-finite transform or image (a diverged refinement)."""
    import numpy as np
    import SimpleITK as sitk

    from ..transforms import flat_parts

    for part in flat_parts(transform):
        if not np.all(np.isfinite(part.GetParameters())):
            raise ResultError("the registration produced a non-finite transform (refinement diverged; try a smaller "
                              "--lr or fewer --refine iterations); nothing was written")
    for name, img in images.items():
        if not np.all(np.isfinite(sitk.GetArrayViewFromImage(img))):
            raise ResultError(f"the {name} has non-finite values; nothing was written")


@contextlib.contextmanager
def _staging(out: Path):
    """A hidden folder inside ``out`` for a run's files before they move into place (same file system: the moves
    are renames); removed on the way out, whatever happened."""
    import shutil
    import tempfile

    stage = Path(tempfile.mkdtemp(prefix=".istn-partial-", dir=out))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _remove_if_empty(out: Path, created: bool) -> None:
    """A failed run leaves no empty output folder it created itself."""
    try:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    except OSError:
        pass
