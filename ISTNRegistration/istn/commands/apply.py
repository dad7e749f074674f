"""`istn apply`: other images of the moving space through a written transform onto the fixed grid (and, with
``--inverse``, images of the fixed space onto the moving grid); `istn invert`: that inverse as a transform file."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import InputError, ResultError
from .evaluate import label_values

APPLY_INTERPOLATIONS = ("auto", "linear", "nearest")
#: Transform files ITK, SimpleITK, ANTs and Slicer read; a displacement field (a non-linear inverse) needs HDF5
TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt", ".mat")
FIELD_SUFFIXES = (".h5", ".hdf5")
#: Image files that keep a Slicer segmentation's header (segment names, colours, layers)
SEGMENTATION_SUFFIXES = (".seg.nrrd", ".nrrd")


def run_apply(transform_path: str | Path, reference_path: str | Path, input_path: str | Path, out_path: str | Path,
              interpolation: str = "auto", background: float | None = None, overwrite: bool = False,
              inverse: bool = False) -> dict:
    """Resample ``input`` (a label map, another contrast, a mask) onto ``reference``'s grid through a transform
    that `istn register` wrote (fixed -> moving: ``reference`` is the fixed image, ``input`` lies in the moving
    image's space), and write it to ``out``.

    ``inverse``: the other way, through the transform's inverse (`istn.inverse.inverse_transform`, over
    ``reference``): ``reference`` is the MOVING image, ``input`` lies in the fixed image's space (an atlas' labels
    brought onto a subject's own grid). The summary's "inverse" says how exact it is (its round trip, mm).

    ``interpolation="auto"``: nearest neighbour for a label map (integer values that form regions, as
    `run_evaluate` tells them from intensities; its pixel type kept, so the labels stay labels), else linear
    (float32). ``background`` fills what falls outside ``input`` (default: 0 for nearest neighbour, or a label
    map's -1 or 65535 background where it has no 0; the input's minimum for linear, as `istn register`'s warped
    image). Everything is checked before anything is computed; an
    existing ``out`` is refused unless ``overwrite``, and an input is never overwritten.
    Returns what was done (for the printed line).
    """
    import numpy as np
    import SimpleITK as sitk

    from .. import segfile
    from ..io import (FLOAT32_MAX, beyond_float32, four_d_problem, grey_image, image_suffix, nonfinite_problem,
                      read_raw_image, read_transform, write_image)
    from ..metrics import MAX_IN_BETWEEN_EDGES, UNCLEAR_IN_BETWEEN_EDGES, intensity_score
    from ..registration import OUTPUT_FIELD_SPACING_MM, warp_image
    from .register import check_background

    t0 = time.perf_counter()
    if interpolation not in APPLY_INTERPOLATIONS:
        raise InputError(f"--interpolation must be one of {', '.join(APPLY_INTERPOLATIONS)}, got {interpolation!r}")
    check_background(background)
    out = Path(out_path)
    check_out_file(out_path, (transform_path, reference_path, input_path), overwrite, "out.nii.gz")
    tx = read_transform(transform_path, "--transform")
    reference = read_raw_image(reference_path, "--reference image")
    image = read_raw_image(input_path, "--input image")
    head = segfile.header(image)  # a Slicer segmentation's segment names, colours, layers
    segments = segfile.segments(head)
    layers = image.GetNumberOfComponentsPerPixel()
    grey = grey_image(image) if layers != 1 and not head else None
    if grey is not None:  # a grey image saved as colour (as register takes it)
        image, layers = grey, 1
    if layers != 1 and not head:
        raise InputError(f"--input image '{input_path}' has {layers} components per pixel; a scalar image "
                         "(intensities, labels or a mask) or a Slicer segmentation (.seg.nrrd) is expected")
    if layers != 1 and image_suffix(out) not in SEGMENTATION_SUFFIXES:
        raise InputError(f"--out '{out}': '{input_path}' is a segmentation whose segments overlap ({layers} layers), "
                         f"which only a Slicer segmentation file keeps: name it {out.name.split('.')[0]}.seg.nrrd")
    for what, img, p in (("--reference image", reference, reference_path), ("--input image", image, input_path)):
        if img.GetDimension() == 4:
            raise InputError(f"{what} '{p}' {four_d_problem(img)}")
        if img.GetDimension() != tx.GetDimension():
            raise InputError(f"{what} '{p}' is {img.GetDimension()}D but --transform '{transform_path}' is "
                             f"{tx.GetDimension()}D")
    values = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(values)):
        raise InputError(f"--input image '{input_path}' {nonfinite_problem(values)}")
    if values.dtype == np.float64:  # the warped image is float32
        lo, hi = float(values.min()), float(values.max())
        if max(-lo, hi) > FLOAT32_MAX:
            raise InputError(f"--input image '{input_path}' {beyond_float32(lo, hi)}")
    integral = bool(np.array_equal(values, np.round(values)))
    # the values and their counts, once (a sort of every voxel): the kind of image, its background, its labels
    found, counts = np.unique(values, return_counts=True) if integral and not head else (None, None)
    score = intensity_score(image, (found, counts)) if found is not None else None
    label_map = integral and (bool(head) or score is None or score <= MAX_IN_BETWEEN_EDGES)  # segments are labels
    # a label map's background: 0, or where it has no 0 its most common value when that is its lowest (-1) or
    # its type's highest (65535): no label, and the fill; else 0 as before (tissue classes 1-3 everywhere: no
    # class is invented outside the data)
    outside = 0.0
    if found is not None and not (found == 0).any():
        common = float(found[np.argmax(counts)])
        top = np.iinfo(values.dtype).max if np.issubdtype(values.dtype, np.integer) else None
        outside = common if common == float(found[0]) or common == top else 0.0
    labels = set(found.tolist()) - {0, outside} if label_map and not head else set()
    if interpolation == "auto":
        interpolation = "nearest" if label_map else "linear"
        why = (f"a segmentation: {len(segments)} segments" if label_map and head else
               f"a label map: {len(labels)} labels" if label_map else
               "intensities" if not integral else "integer intensities (many values, changing gradually)")
        if score is not None and UNCLEAR_IN_BETWEEN_EDGES[0] <= score <= UNCLEAR_IN_BETWEEN_EDGES[1]:
            other = "linear if it holds intensities" if label_map else "nearest if it is a label map"
            why += (f"; not clear-cut: {score:.0%} of its edges have in-between values (labels: few, intensities: "
                    f"many), so give --interpolation {other}")
        chosen = f"{interpolation} (auto: {why})"
    else:
        chosen = interpolation
    if interpolation == "nearest" and background is not None and np.issubdtype(values.dtype, np.integer):
        # the pixel type is kept: a fill it cannot hold would wrap (-5 -> 251 in uint8) or truncate (2.5 -> 2, a label)
        kind = np.iinfo(values.dtype)
        if background != round(background) or not kind.min <= background <= kind.max:
            raise InputError(f"--background {background:g} cannot be stored in the input's pixel type "
                             f"({values.dtype}, whole numbers {kind.min}..{kind.max}), which a label map keeps")
    # labels keep their pixel type, intensities become float32: can the file hold that, as a whole image?
    beside = _check_writable_format(out, reference, image.GetPixelID() if interpolation == "nearest" else
                                    sitk.sitkVectorFloat32 if layers > 1 else sitk.sitkFloat32)
    check_companions(out, beside, (transform_path, reference_path, input_path), overwrite)
    inverted = None
    if inverse:  # moving -> fixed points, solved over the grid resampled onto (where its points are needed)
        from ..inverse import inverse_transform

        inverted = inverse_transform(tx, reference, OUTPUT_FIELD_SPACING_MM)
        tx = inverted.transform
    if interpolation == "nearest":
        fill = outside if background is None else background
        source, kind = image, sitk.sitkNearestNeighbor
    else:
        source, kind = sitk.Cast(image, sitk.sitkVectorFloat32 if layers > 1 else sitk.sitkFloat32), sitk.sitkLinear
        fill = float(values.min()) if background is None else background
    # a segmentation's layers one by one: the same warp, each kept apart (they overlap)
    warped = segfile.warp_layers(source, lambda layer: warp_image(layer, reference, tx, kind, fill,
                                                                  field_spacing=OUTPUT_FIELD_SPACING_MM))
    arr = sitk.GetArrayViewFromImage(warped)
    if not np.all(np.isfinite(arr)):
        raise ResultError("the resampled image is not finite; nothing was written")
    names_kept = bool(head) and interpolation == "nearest" and image_suffix(out) in SEGMENTATION_SUFFIXES
    if names_kept:
        segfile.with_header(warped, head)
    make_out_folder(out)
    write_image(warped, out)
    summary = {"input": str(input_path), "reference": str(reference_path), "transform": str(transform_path),
               "out": str(out), "interpolation": chosen, "background": fill,
               "size": list(warped.GetSize()), "spacing": list(warped.GetSpacing()),
               "seconds": time.perf_counter() - t0}
    if inverted is not None:
        summary["inverse"] = inverted.summary()
        warn_if_it_misses(summary["inverse"], inverted.round_trip_mm)
    if interpolation == "nearest" and label_map and head:
        summary["segments_outside_the_reference"] = [n for n, v in segfile.sizes(warped, segments).items() if not v]
    elif interpolation == "nearest" and label_map:
        summary["labels_outside_the_reference"] = sorted(labels - label_values(warped))
    if head and not names_kept:
        summary["note"] = ("the segment names and colours of the input are kept only in a .seg.nrrd (or .nrrd) output"
                           if interpolation == "nearest" else
                           "a segmentation resampled linearly holds fractions, not segments: its names and colours "
                           "were not kept")
    return summary


def run_invert(transform_path: str | Path, reference_path: str | Path, out_path: str | Path,
               overwrite: bool = False) -> dict:
    """Write the inverse of a transform `istn register` wrote (fixed -> moving) as a transform file (moving ->
    fixed world points), for ITK, ANTs or Slicer: `istn.inverse.inverse_transform` over ``reference``, the MOVING
    image's grid (where its points are needed). A linear transform's is exact (any transform file type); a
    non-linear one holds a displacement field and is written as HDF5 (.h5). ``out`` is checked before any work; an
    existing one is refused unless ``overwrite``, an input never. Returns the summary (its "inverse" as
    `run_apply`'s)."""
    from ..inverse import inverse_transform
    from ..io import read_raw_image, read_transform, write_transform
    from ..registration import OUTPUT_FIELD_SPACING_MM

    t0 = time.perf_counter()
    out = Path(out_path)
    check_out_file(out_path, (transform_path, reference_path), overwrite, "inverse.h5")
    suffix = out.suffix.lower()
    if suffix not in TRANSFORM_SUFFIXES:
        raise InputError(f"--out '{out}': a transform file is named {', '.join(TRANSFORM_SUFFIXES)} (.h5 for a "
                         "non-linear inverse)")
    tx = read_transform(transform_path, "--transform")
    reference = read_raw_image(reference_path, "--reference image")
    if reference.GetDimension() != tx.GetDimension():
        raise InputError(f"--reference image '{reference_path}' is {reference.GetDimension()}D but --transform "
                         f"'{transform_path}' is {tx.GetDimension()}D")
    if not tx.IsLinear() and suffix not in FIELD_SUFFIXES:
        raise InputError(f"--out '{out}': the inverse of a non-linear transform holds a displacement field, which "
                         f"only HDF5 transform files keep: name it {out.with_suffix('.h5').name}")
    inverted = inverse_transform(tx, reference, OUTPUT_FIELD_SPACING_MM)
    make_out_folder(out)
    write_transform(inverted.transform, out)
    summary = {"transform": str(transform_path), "reference": str(reference_path), "out": str(out),
               "maps": (f"the points {Path(transform_path).name} maps to -> the points they came from (world mm, "
                        "LPS; for a transform istn register wrote: moving -> fixed)"),
               "inverse": inverted.summary(),
               "seconds": time.perf_counter() - t0}
    warn_if_it_misses(summary["inverse"], inverted.round_trip_mm)
    return summary


def check_out_file(out: str | Path, inputs, overwrite: bool, example: str) -> None:
    """``--out`` of apply / invert / evaluate, before any work: a file name (not a folder, not under a file),
    never one of ``inputs``, an existing one only with ``overwrite``, in a folder that can be written (or
    created: the nearest existing folder above it is tried for real, as root ignores permissions but not a
    read-only mount)."""
    from ..errors import OutputError
    from ..io import image_files, probe_writable

    if not str(out).strip():
        raise OutputError("--out is empty: name the output file")
    meant_a_folder = str(out).endswith(("/", os.sep))  # Path() drops the slash of 'results/'
    out = Path(out)
    if out.is_dir() or meant_a_folder:
        raise OutputError(f"--out '{out}{os.sep if meant_a_folder else ''}' {'is' if out.is_dir() else 'names'} a "
                          f"folder: give the output file's name (e.g. {out / example})")
    if out.exists():
        for p in (Path(p) for p in inputs if Path(p).exists()):
            if out.resolve() == p.resolve():
                raise OutputError(f"--out '{out}' is one of the inputs; choose another file name")
            if any(out.resolve() == f.resolve() for f in image_files(p)[1:]):  # scan.img of an input scan.hdr
                raise OutputError(f"--out '{out}' is a file of the input '{p}'; choose another file name")
    if out.exists() and not overwrite:
        raise OutputError(f"--out '{out}' exists; choose another file name, or --overwrite to replace it")
    folder = out.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"--out '{out}': '{folder}' is not a folder")
    try:
        probe_writable(folder)
    except OSError as exc:
        raise OutputError(f"--out '{out}': the folder '{folder}' cannot be written ({exc.strerror})") from None


def make_out_folder(out: Path) -> None:
    from ..errors import OutputError

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out '{out}': its folder cannot be created: {exc.strerror}") from None


def warn_if_it_misses(summary: dict, round_trip: dict) -> None:
    """A warning in an inverse's summary when its round trip misses by more than `ROUND_TRIP_WARN_MM` anywhere."""
    from ..inverse import round_trip_warning

    warning = round_trip_warning(round_trip)
    if warning:
        summary["warning"] = warning


def inverse_line(inverse: dict) -> str:
    """The summary's "inverse" as `istn apply --inverse` prints it."""
    if inverse["exact"]:
        return "inverse: exact (a linear transform)"
    trip = inverse["round_trip_mm"]
    lattice = " x ".join(f"{v:g}" for v in inverse["lattice_mm"])
    return (f"inverse: solved on a {lattice} mm lattice over the reference in {inverse['iterations']} "
            f"iterations; round trip within {trip['median']:.3f} mm (median), {trip['max']:.3f} mm (max) of the "
            "points checked")


def _check_writable_format(out: Path, reference, pixel_id: int) -> list[Path]:
    """Refuse, before any computation, an ``out`` whose file type cannot hold the result whole: an image of
    ``reference``'s dimension, spacing, origin and direction, of ``pixel_id``. An unknown extension or none; a 2D
    format such as PNG, to which SimpleITK writes one slice of a volume without a word, and which keeps no
    origin or direction (a 2D result in the wrong place in every other tool); a format without that pixel type;
    a lossy one (JPEG: labels would change). A tiny such image is written (as `write_image` writes) under that
    name's extension in a temporary folder and read back.

    Returns the files that format writes beside ``out`` (a header's voxel file: ``x.nhdr`` -> ``x.raw.gz``),
    named for ``out``."""
    import tempfile

    import numpy as np
    import SimpleITK as sitk

    from ..io import image_suffix, quiet_stderr, sheared

    ndim = reference.GetDimension()
    suffix = image_suffix(out)
    probe = sitk.Image([3] * ndim, pixel_id)
    if probe.GetNumberOfComponentsPerPixel() == 1:  # distinct values: a format that cannot hold them changes some
        values = (np.arange(3 ** ndim) % 3).reshape([3] * ndim)
        probe = sitk.Cast(sitk.GetImageFromArray(values.astype(np.uint8)), pixel_id)
    probe.SetSpacing(reference.GetSpacing())
    probe.SetOrigin(reference.GetOrigin())
    probe.SetDirection(reference.GetDirection())
    lost, beside = [], []
    stem = out.name[: -len(suffix)] if suffix else out.name
    with tempfile.TemporaryDirectory() as folder:
        name = str(Path(folder) / f"probe{suffix.lower()}")  # as `atomic_write` writes it
        try:
            with quiet_stderr():
                sitk.WriteImage(probe, name, useCompression=True)
                back = sitk.ReadImage(name)
            whole = back.GetSize() == probe.GetSize() and back.GetPixelID() == probe.GetPixelID()
        except RuntimeError:
            whole = False
        beside = [out.with_name(stem + f.name[len("probe"):]) for f in sorted(Path(folder).iterdir())
                  if f.name != f"probe{suffix.lower()}" and f.name.startswith("probe")]
        if whole:
            tol = 1e-4 * max(reference.GetSpacing())
            for what, got, given in (("spacing", back.GetSpacing(), probe.GetSpacing()),
                                     ("origin", back.GetOrigin(), probe.GetOrigin()),
                                     ("direction", back.GetDirection(), probe.GetDirection())):
                if not np.allclose(got, given, atol=tol if what != "direction" else 1e-5):
                    lost.append(what)
            # JPEG compresses with loss (a tiny probe may come back whole: its extension says it)
            if suffix.lower() in (".jpg", ".jpeg") or not np.array_equal(sitk.GetArrayViewFromImage(back),
                                                                         sitk.GetArrayViewFromImage(probe)):
                lost.append("voxel values (lossy compression)")
    what = f"'{suffix}' files" if suffix else "files without an extension"
    if not whole:
        if suffix.lower() in (".mgz", ".mgh"):
            raise InputError(f"--out '{out}': FreeSurfer {suffix} files are read here, not written; name it .nii.gz "
                             "(FreeSurfer reads it, and mri_convert makes an .mgz of it)")
        kind = sitk.GetPixelIDValueAsString(pixel_id)
        raise InputError(f"--out '{out}': a {ndim}D {kind} image cannot be written whole to {what}; name it .nii.gz, "
                         ".nrrd or .mha")
    if lost:
        shear = sheared(reference.GetDirection())
        nifti = suffix.lower() in (".nii", ".nii.gz", ".hdr", ".img")
        why = " (a sheared grid: NIfTI stores rotations only)" if shear and nifti and "direction" in lost else ""
        others = [s for s in (".nii.gz", ".nrrd", ".mha") if s != suffix.lower() and not (shear and s == ".nii.gz")]
        names = others[-1] if len(others) == 1 else f"{', '.join(others[:-1])} or {others[-1]}"
        raise InputError(f"--out '{out}': {what} do not keep the reference's {', '.join(lost)}{why}: the result "
                         f"would lie elsewhere (or hold other values) in every other tool; name it {names}")
    return beside


def check_companions(out: Path, beside: list[Path], inputs, overwrite: bool) -> None:
    """The files a two-file format writes beside ``out`` (`_check_writable_format`), as `check_out_file` treats
    ``out``: never a file of an input (an Analyze ``scan.hdr`` given as input keeps its voxels in ``scan.img``,
    which ``--out scan.img`` would replace), an existing one only with ``overwrite``."""
    from ..errors import OutputError
    from ..io import image_files

    theirs = {f.resolve() for p in inputs if Path(p).exists() for f in image_files(Path(p))}
    for f in beside:
        if f.exists() and f.resolve() in theirs:
            raise OutputError(f"--out '{out}' would also write '{f}' (that format's second file), a file of an "
                              "input; choose another file name")
        if f.exists() and not overwrite:
            raise OutputError(f"--out '{out}' would also write '{f}' (that format's second file), which exists; "
                              "choose another file name, or --overwrite to replace both")
