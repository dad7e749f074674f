"""Reading and checking inputs; writing outputs atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError
from .mgh import is_mgh, read_mgh


class CapturedText:
    """What a library wrote to file descriptor 2 while `quiet_stderr` was active."""

    text: str = ""


@contextlib.contextmanager
def quiet_stderr() -> Iterator[CapturedText]:
    """Send what C libraries write to fd 2 (HDF5's error stack, ITK warnings) to a buffer instead of the terminal.

    The HDF5 library prints ~20 lines of diagnostics for a file it cannot open
    before ITK raises; callers summarise the error in one line and keep the
    captured text as the ``--verbose`` detail.
    """
    captured = CapturedText()
    fd = 2  # the C libraries write to fd 2 whatever Python's sys.stderr is
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except (AttributeError, OSError, ValueError):  # no fd 2 (some GUI processes): nothing to silence
        yield captured
        return
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), fd)
        try:
            yield captured
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            buf.seek(0)
            captured.text = buf.read().decode("utf-8", "replace")


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path, or `InputError` naming ``what`` if it is missing or a folder."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} '{p}' does not exist")
    if p.is_dir():
        raise InputError(f"{what} '{p}' is a folder, not a file")
    return p


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _read_quietly(read: Callable[[str], object], path: str | os.PathLike, what: str, failure: str):
    """``read(path)`` with the library's diagnostics kept out of the terminal; a failure is one `InputError` line."""
    p = check_input_file(path, what)
    try:
        with quiet_stderr() as err:
            return read(str(p))
    except RuntimeError as exc:
        raise InputError(f"{what} '{p}' {failure}".replace("{reason}", _last_line(exc)),
                         detail=f"{err.text}{exc}") from None


def read_raw_image(path: str | os.PathLike, what: str = "image") -> sitk.Image:
    """Read any image SimpleITK understands, as stored (no checks on its content).

    DICOM as scanners and PACS export it: a folder is read as the one DICOM
    series it holds, and one DICOM file of a series whose other files lie
    beside it as that whole series (`read_dicom_series`); a DICOM file alone
    in its series (a 2D radiograph, a multi-frame volume) as it is.
    """
    p = Path(path)
    if p.is_dir():
        return read_dicom_series(p, what)
    p = check_input_file(p, what)
    if is_dicom_file(p):
        uid = _dicom_tag(p, SERIES_UID)
        files = _series_files(p.parent, uid) if uid else ()
        if len(files) > 1:
            return read_dicom_series(p.parent, what, uid, given=p, files=files)
    if is_mgh(p):  # FreeSurfer's: no reader in SimpleITK
        image = read_mgh(p, what)
    else:
        image = _read_sitk(p, what)
    if image.GetPixelID() in _COMPLEX_PIXELS:  # raw MR reconstructions: every later step would fail in ITK
        raise InputError(f"{what} '{p}' holds complex values ({image.GetPixelIDTypeAsString()}): save its magnitude "
                         "as an image of its own (e.g. sitk.ComplexToModulus, or fslcomplex -realabs)")
    short = nifti_shortfall(p)
    if short is not None:
        expected, found = short
        raise InputError(f"{what} '{p}' is cut short (an interrupted copy or download?): its header promises "
                         f"{expected:,} bytes of voxels, the file holds {max(found, 0):,} "
                         f"({100.0 * max(found, 0) / expected:.0f} %); ITK reads the missing voxels as 0")
    return image


def _read_sitk(p: Path, what: str) -> sitk.Image:
    """``p`` read by SimpleITK (any case of extension), its failures said in one line."""
    try:
        return _read_quietly(_read_any_case, p, what, "could not be read as an image ({reason})")
    except InputError as exc:
        if "No such file or directory" in str(exc):  # the file is there (checked): ITK could not read its voxels
            raise InputError(f"{what} '{p}' could not be read: its voxel data is cut short or missing (an "
                             "interrupted copy or download, or the data file its header names is not beside it)",
                             detail=exc.detail) from None
        if "orthonormal direction cosines" not in str(exc):
            raise
        # a NIfTI sform/qform with shear (or a bad header): ITK, Slicer and ANTs store directions as rotations
        raise InputError(f"{what} '{p}' has a sheared or invalid orientation in its header (its voxel axes are not "
                         "perpendicular), which ITK, and so this tool, Slicer and ANTs, cannot represent: resample it "
                         "onto a grid with perpendicular axes (e.g. nibabel's resample_from_to), or fix the header if "
                         "the shear is an error", detail=exc.detail) from None


#: The reader of each lower-case extension, for a file whose extension is in capitals (SCAN.MHA from a Windows
#: share): ITK picks most readers by the extension as written, and finds none for .MHA or .NRRD
_IO_OF_SUFFIX = {".mha": "MetaImageIO", ".mhd": "MetaImageIO", ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO",
                 ".seg.nrrd": "NrrdImageIO", ".vtk": "VTKImageIO", ".gipl": "GiplImageIO", ".gipl.gz": "GiplImageIO",
                 ".mnc": "MINCImageIO", ".png": "PNGImageIO", ".jpg": "JPEGImageIO", ".jpeg": "JPEGImageIO",
                 ".tif": "TIFFImageIO", ".tiff": "TIFFImageIO", ".bmp": "BMPImageIO", ".mrc": "MRCImageIO"}


def _read_any_case(name: str) -> sitk.Image:
    """``sitk.ReadImage(name)``; where ITK finds no reader for an extension in capitals, the reader of the same
    extension in lower case."""
    try:
        return sitk.ReadImage(name)
    except RuntimeError as exc:
        io = _IO_OF_SUFFIX.get(image_suffix(Path(name)).lower())
        if io is None or "Unable to determine ImageIO reader" not in str(exc):
            raise
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.SetImageIO(io)
        return reader.Execute()


_COMPLEX_PIXELS = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)
#: NIfTI / Analyze datatype code -> bits per voxel
_NIFTI_BITS = {2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32, 1024: 64, 1280: 64,
               1536: 128, 1792: 128, 2048: 256, 2304: 32}


def _gunzipped_size(path: Path) -> int:
    """The bytes a gzip file decompresses to, every member (bgzip writes many), as far as a cut-short one goes."""
    import zlib

    total = 0
    unzip = zlib.decompressobj(wbits=31)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):  # at most ~66 MB out of 64 kB (zlib's ratio is at most ~1032)
            while chunk:
                try:
                    total += len(unzip.decompress(chunk))
                except zlib.error:  # garbage after the last member, or a damaged stream: what came so far
                    return total
                chunk = b""
                if unzip.eof:  # a member ended: the next one starts in what is left
                    chunk, unzip = unzip.unused_data, zlib.decompressobj(wbits=31)
    return total


def nifti_shortfall(path: Path) -> tuple[int, int] | None:
    """(voxel bytes the header promises, voxel bytes the file holds) of a NIfTI file (.nii, .nii.gz, .hdr/.img)
    that holds fewer than its header says, else None (complete, or not NIfTI): ITK reads a truncated NIfTI
    without a word, the missing voxels as 0.

    A .nii.gz is checked by its gzip trailer (the uncompressed size, modulo 2^32) and only where that differs by
    decompressing it, so a complete file costs one read of its last 8 bytes."""
    import gzip
    import struct

    name = path.name.lower()
    gz = name.endswith(".gz")
    stem = name[:-3] if gz else name
    if not stem.endswith((".nii", ".hdr")):
        return None
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as f:
            head = f.read(540)
    except (OSError, EOFError):
        return None  # ITK read it: whatever this is, it is not for this check to judge
    if len(head) < 348:
        return None
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0]
        if size == 348:  # NIfTI-1 (and Analyze 7.5)
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype = struct.unpack(endian + "h", head[70:72])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if size == 540 and len(head) >= 540:  # NIfTI-2
            datatype = struct.unpack(endian + "h", head[12:14])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
            break
    else:
        return None
    n = int(dims[0])
    # the voxel size as readers take it, from the datatype (a wrong bitpix must not refuse a whole file); 1-bit
    # Analyze images and unknown types: not judged
    bitpix = _NIFTI_BITS.get(datatype, 0)
    if not 1 <= n <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1:n + 1]):
        return None
    expected = int(np.prod([int(d) for d in dims[1:n + 1]], dtype=np.int64)) * bitpix // 8
    data = path
    if stem.endswith(".hdr"):  # the voxels lie in the .img beside it, looked for in nifti1_io's order
        offset = max(offset, 0)
        data = next((c for c in (path.with_name(path.name[: -len(".hdr.gz" if gz else ".hdr")] + ext)
                                 for ext in (".img", ".img.gz", ".IMG", ".IMG.GZ")) if c.is_file()), None)
        if data is None:
            return None
        gz = data.name.lower().endswith(".gz")
    else:
        offset = max(offset, size)  # what nifti1_io takes of a smaller vox_offset: the header's end
    try:
        if not gz:
            found = data.stat().st_size - offset
        else:
            with open(data, "rb") as f:
                f.seek(-4, os.SEEK_END)
                if struct.unpack("<I", f.read(4))[0] == (offset + expected) % 2**32:
                    return None
            found = -offset + _gunzipped_size(data)
    except OSError:
        return None
    return (expected, found) if found < expected else None


def analyze_without_orientation(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an Analyze 7.5 image (a ``.hdr``/``.img`` pair whose header lacks NIfTI's magic), which
    records no orientation: readers place its axes by convention, and SPM, FSL and ITK disagree on left-right."""
    p = Path(path)
    if image_suffix(p).lower() not in (".hdr", ".hdr.gz", ".img", ".img.gz"):
        return False
    p = next((f for f in image_files(p) if image_suffix(f).lower() in (".hdr", ".hdr.gz")), None)  # .img: its .hdr
    if p is None:
        return False
    try:
        import gzip

        with (gzip.open if p.name.lower().endswith(".gz") else open)(p, "rb") as f:
            head = f.read(348)
    except (OSError, EOFError):
        return False
    return len(head) == 348 and 348 in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")) \
        and head[344:348] not in (b"ni1\0", b"n+1\0")


def analyze_warning(path: str | os.PathLike, what: str) -> str:
    """The warning for an `analyze_without_orientation` input."""
    return (f"{what} '{path}' is an Analyze 7.5 file, which records no orientation: ITK (and so this tool and "
            "Slicer) reads it with its first voxel at 0 mm and its axes as stored, and SPM and FSL may place it "
            "otherwise (left and right swapped); check the result against the anatomy, or convert the file to NIfTI "
            "where its orientation is known")


# DICOM tags read here (SimpleITK's "gggg|eeee" keys)
SERIES_UID = "0020|000e"  # Series Instance UID
SERIES_DESCRIPTION = "0008|103e"
IMAGE_POSITION = "0020|0032"  # Image Position (Patient): the first voxel's centre, mm
# Slices of a series may deviate from even spacing along their normal, or step sideways, by this fraction of the
# median spacing (rounding in the headers)
SLICE_SPACING_TOLERANCE = 0.01


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` is a DICOM Part 10 file (the "DICM" mark after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _dicom_tag(path: str | Path, tag: str) -> str:
    """One tag of a DICOM file's header (the pixels are not read), "" if it lacks it or cannot be read."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with quiet_stderr():
            reader.ReadImageInformation()
    except RuntimeError:
        return ""
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def _series_files(folder: Path, uid: str) -> tuple[str, ...]:
    """The files of DICOM series ``uid`` in ``folder``, in GDCM's slice order (along the slice normal)."""
    with quiet_stderr():
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))


def read_dicom_series(folder: str | os.PathLike, what: str = "image", uid: str | None = None,
                      given: Path | None = None, files: Sequence[str] | None = None) -> sitk.Image:
    """Read DICOM series ``uid`` of ``folder`` (None: the folder's only series) as one volume.

    Refused with an `InputError` saying what to do: a folder without a
    series, a folder with several series (each listed with its description
    and file count: the user names one file of the series they mean), and a
    series whose slices do not stack evenly along their normal (missing
    slices, two stacks in one series) or step sideways from one to the next
    (a gantry tilt): one volume with one spacing and perpendicular axes would
    put those slices in the wrong place. ``given``: the file the user named,
    for the messages; ``files``: the series' files when the caller has them.
    """
    p = Path(folder)
    name = f"{what} '{given if given is not None else p}'"
    if uid is None:
        with quiet_stderr():
            uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p)))
        if not uids:
            below = _dicom_folders_below(p)
            if below:  # a CD or PACS export's top folder (DICOMDIR beside DICOM/...): the series lie deeper
                listing = "; ".join(f"'{f}' ({n} file{'s' if n != 1 else ''})" for f, n in below[:5])
                more = f", and {len(below) - 5} more" if len(below) > 5 else ""
                raise InputError(f"{name} holds no DICOM series itself, but its subfolders do: {listing}{more}; give "
                                 "the folder of the series to register (or one file of it)")
            raise InputError(f"{name} is a folder with no DICOM series in it: give an image file (NIfTI, NRRD, MHA, "
                             "...) or a folder of DICOM files")
        if len(uids) > 1:
            listing = "; ".join(_series_summary(p, u) for u in uids)
            raise InputError(f"{name} holds {len(uids)} DICOM series ({listing}): give one file of the series to "
                             "register (its whole series is read), or a folder holding that series alone")
        uid = uids[0]
    files = tuple(files) if files is not None else _series_files(p, uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with quiet_stderr() as err:
            image = reader.Execute()
    except RuntimeError as exc:
        odd = _odd_slices(files)
        if odd:
            raise InputError(f"{name}: DICOM series {uid} mixes slices of another size or orientation ({len(odd)} of "
                             f"{len(files)} files, e.g. '{Path(odd[0]).name}': a localizer or a reformat saved into "
                             "the series?); move them out of the folder and give it again",
                             detail=f"{err.text}{exc}") from None
        raise InputError(f"{name}: DICOM series {uid} could not be read ({_last_line(exc)})",
                         detail=f"{err.text}{exc}") from None
    steps = _slice_steps(reader, len(files), image) if len(files) > 2 and image.GetDimension() == 3 else None
    if steps is not None:
        along, sideways = steps
        median = float(np.median(along))
        if median <= 0 or float(np.max(np.abs(along - median))) > SLICE_SPACING_TOLERANCE * median:
            raise InputError(
                f"{name}: the {len(files)} slices of DICOM series {uid} are unevenly spaced (gaps "
                f"{float(np.min(along)):.3g} to {float(np.max(along)):.3g} mm: missing slices, or two stacks in one "
                "series); one volume would misplace them. Convert the series with a tool that resamples it (e.g. "
                "dcm2niix, or Slicer's DICOM module) and register that file")
        if float(np.max(sideways)) > SLICE_SPACING_TOLERANCE * median:
            raise InputError(
                f"{name}: each slice of DICOM series {uid} lies {float(np.median(sideways)):.3g} mm sideways of the "
                f"one before (a gantry tilt of about {np.degrees(np.arctan2(np.median(sideways), median)):.0f} "
                "degrees): a volume with perpendicular axes would shear the anatomy. Convert the series with a "
                "tool that corrects the tilt (e.g. dcm2niix, or Slicer's DICOM module) and register that file")
    return image


def _odd_slices(files: Sequence[str]) -> list[str]:
    """The files of a series whose slice size or orientation differs from most of its files' (headers only)."""
    kinds = []
    for path in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            with quiet_stderr():
                reader.ReadImageInformation()
            kinds.append((reader.GetSize()[:2], tuple(np.round(reader.GetDirection(), 3))))
        except RuntimeError:
            kinds.append(None)
    if None in kinds:  # a damaged file is not a localizer: said by the series' own read error
        return []
    common = max(kinds, key=kinds.count)  # ties: the kind of the first file in slice order
    return [f for f, kind in zip(files, kinds) if kind != common]


def _slice_steps(reader: sitk.ImageSeriesReader, n: int, image: sitk.Image) -> tuple[np.ndarray, np.ndarray] | None:
    """From one slice's Image Position (Patient) to the next, in the reader's order: the step along the volume's
    slice normal and the length of its sideways part (mm, ``(n - 1,)`` each); None if a slice lacks the tag."""
    normal = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    positions = []
    for i in range(n):
        if not reader.HasMetaDataKey(i, IMAGE_POSITION):
            return None
        try:
            positions.append([float(v) for v in reader.GetMetaData(i, IMAGE_POSITION).split("\\")])
        except ValueError:
            return None
    steps = np.diff(np.asarray(positions), axis=0)
    along = steps @ normal
    return along, np.linalg.norm(steps - along[:, None] * normal, axis=1)


def dicom_series_description(path: str | os.PathLike) -> str:
    """The Series Description of a DICOM input: ``path`` one file of the series, or its folder (the first DICOM
    file in it); "" when there is none or nothing can be read."""
    p = Path(path)
    if p.is_dir():
        p = next((f for f in sorted(p.iterdir()) if f.is_file() and is_dicom_file(f)), None)
        if p is None:
            return ""
    return _dicom_tag(p, SERIES_DESCRIPTION)


def _dicom_folders_below(top: Path, most: int = 2000) -> list[tuple[Path, int]]:
    """The subfolders of ``top`` that hold DICOM files (a DICOMDIR's layout: DICOM/S01/...), each with its number of
    files, judged by its first few, in no more than ``most`` folders; the DICOMDIR index file itself is no series."""
    found = []
    for i, (folder, dirs, names) in enumerate(os.walk(top)):
        dirs.sort()
        if i >= most:
            break
        if Path(folder) == top:
            continue
        names = [n for n in names if n.upper() != "DICOMDIR"]
        if any(is_dicom_file(Path(folder) / n) for n in sorted(names)[:3]):  # a few files tell; not every slice read
            found.append((Path(folder), len(names)))
    return found


def _series_summary(folder: Path, uid: str) -> str:
    """One series in a listing: its description and file count, e.g. "T1 MPRAGE: 176 files, e.g. IM0001.dcm"."""
    files = _series_files(folder, uid)
    description = _dicom_tag(files[0], SERIES_DESCRIPTION) or "no description"
    return f"{description}: {len(files)} file{'s' if len(files) != 1 else ''}, e.g. {Path(files[0]).name}"


def read_image(path: str | os.PathLike, role: str = "image") -> sitk.Image:
    """Read an image SimpleITK understands (NIfTI, NRRD, MHA, PNG, ...) and check it.

    ``role`` names the input in error messages ("fixed", "moving", ...).
    Raises `InputError` for a missing, unreadable or unusable file.
    """
    image = read_raw_image(path, f"{role} image")
    return check_image(image, f"{role} image '{Path(path)}'")


def read_transform(path: str | os.PathLike, what: str = "transform") -> sitk.Transform:
    """Read an ITK transform file (.h5, .tfm, .txt, .mat) as its simplest equivalent (`flatten_transform`).

    Raises `InputError` in one line for a missing or unreadable file; the
    library's own diagnostics go to the error's ``detail``.
    """
    from .transforms import flatten_transform  # lazy: transforms imports torch

    tx = flatten_transform(_read_quietly(sitk.ReadTransform, path, what,
                                         "could not be read as an ITK transform file (.h5, .tfm, .txt, .mat)"))
    problem = transform_problem(tx)
    if problem:
        raise InputError(f"{what} '{path}' {problem}")
    return tx


def transform_problem(transform: sitk.Transform) -> str | None:
    """Why no image can be resampled through ``transform`` ("holds numbers that are not finite ...", "is not
    invertible ..."), or None."""
    from .transforms import flat_parts, flatten_transform, linear_matrix  # lazy: transforms imports torch

    for part in flat_parts(flatten_transform(transform)):
        if not _parameters_finite(part):
            return "holds numbers that are not finite (NaN or infinite)"
        if part.IsLinear():
            d = part.GetDimension()
            det = float(np.linalg.det(linear_matrix(part)[:d, :d]))
            if not abs(det) > 1e-9:  # every point onto a plane (or a line): no image can be resampled through it
                return f"is not invertible: its matrix is singular (determinant {det:g})"
    return None


def _parameters_finite(part: sitk.Transform) -> bool:
    """Whether every parameter of one transform is finite. A displacement field's (or a B-spline's) are read as
    its images: ``GetParameters`` would make a Python tuple of every value (a 192^3 field read in 11 s, not 0.35 s)."""
    if isinstance(part, sitk.DisplacementFieldTransform):
        arrays = [sitk.GetArrayViewFromImage(part.GetDisplacementField())]
    elif isinstance(part, sitk.BSplineTransform):
        arrays = [sitk.GetArrayViewFromImage(c) for c in part.GetCoefficientImages()]
    else:
        arrays = [np.asarray(part.GetParameters())]
    return all(bool(np.isfinite(a).all()) for a in arrays)


def probe_writable(folder: str | os.PathLike) -> None:
    """Create and remove a file in ``folder``: raises the `OSError` of a folder that cannot be written (``access``
    lies on some mounts, and root passes it on a read-only one)."""
    fd, probe = tempfile.mkstemp(prefix=".istn-write-test.", dir=folder)
    os.close(fd)
    os.remove(probe)


def grey_of_colour(array: np.ndarray) -> np.ndarray | None:
    """The grey-level image a colour image holds when its red, green and blue are equal everywhere and its alpha,
    if it has one, is constant (a grey image saved as RGB or RGBA, as viewers and screenshots export them):
    ``array`` of shape ``(..., 3 or 4)`` -> its first channel ``(...)``; None for anything else."""
    if array.ndim < 2 or array.shape[-1] not in (3, 4):
        return None
    red = array[..., 0]
    if not (np.array_equal(red, array[..., 1]) and np.array_equal(red, array[..., 2])):
        return None
    if array.shape[-1] == 4 and not np.all(array[..., 3] == array.flat[3]):
        return None
    return np.ascontiguousarray(red)


def grey_image(image: sitk.Image) -> sitk.Image | None:
    """`grey_of_colour` of a vector image, as an image of its grid; None when it holds no grey image."""
    grey = grey_of_colour(sitk.GetArrayViewFromImage(image))
    if grey is None:
        return None
    scalar = sitk.GetImageFromArray(grey)
    scalar.CopyInformation(image)
    return scalar


def sheared(direction: Sequence[float] | np.ndarray) -> bool:
    """Whether a direction matrix (flat, ITK's, or square) is not orthonormal: its axes not unit vectors at right
    angles (a shear can have determinant 1)."""
    m = np.asarray(direction, dtype=float)
    m = m.reshape(int(round(np.sqrt(m.size))), -1)
    return not np.allclose(m.T @ m, np.eye(m.shape[0]), atol=1e-3)


def four_d_problem(image: sitk.Image) -> str:
    """What to say of a 4D image (a time series or several volumes in one file: fMRI, DWI, multi-echo)."""
    size = image.GetSize()
    return (f"is 4D ({' x '.join(map(str, size))}: {size[3]} volumes of {' x '.join(map(str, size[:3]))}); only 2D "
            "and 3D images are supported: save the volume to use as a file of its own (e.g. fslroi IN OUT T 1, or "
            "one volume of a Slicer sequence)")


#: the largest value a float32 image holds: the engine's working type (a larger one becomes infinite in it)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def beyond_float32(lo: float, hi: float) -> str:
    """What to say of a (float64) image whose values lie beyond float32's range."""
    return (f"holds values from {lo:.3g} to {hi:.3g}, beyond what 32-bit floats (the working type, at most "
            f"{FLOAT32_MAX:.3g} in size) hold: rescale it first (e.g. sitk.RescaleIntensity)")


def nonfinite_counts(values: np.ndarray) -> tuple[int, int, str]:
    """``(nan, inf, "3,360 NaN and 1 infinite")``: the voxel values of ``values`` that are not finite, counted."""
    nan = int(np.count_nonzero(np.isnan(values)))
    inf = int(values.size - nan - np.count_nonzero(np.isfinite(values)))
    return nan, inf, " and ".join(f"{n:,} {kind}" for n, kind in ((nan, "NaN"), (inf, "infinite")) if n)


def nonfinite_problem(values: np.ndarray) -> str:
    """What to say of voxel values that are not all finite: how many, and what to do."""
    nan, inf, counts = nonfinite_counts(values)
    why = " (often the outside of a masked image, as SPM and FSL write it)" if nan else ""
    way = "e.g. fslmaths IN -nan OUT, or numpy.nan_to_num" if not inf else "e.g. numpy.nan_to_num"
    return (f"contains {counts} voxel value{'s' if nan + inf > 1 else ''}{why}: set them to the background first "
            f"({way}); a NIfTI file's are read as 0 already (ITK's reader, and so Slicer's)")


def check_image(image: sitk.Image, what: str = "image") -> sitk.Image:
    """Check an in-memory image is a usable 2D/3D scalar image; return it as float32 (itself where it is).

    A grey image stored as colour (RGB or RGBA with equal channels, `grey_of_colour`) is taken as the grey image it
    is; a colour image whose channels differ, or any other vector image, is refused."""
    d = image.GetDimension()
    if d == 4:  # a time series or several volumes in one file (fMRI, DWI, multi-echo)
        raise InputError(f"{what} {four_d_problem(image)}")
    if d not in (2, 3):
        raise InputError(f"{what} is {d}D; only 2D and 3D images are supported")
    if image.GetNumberOfComponentsPerPixel() != 1:
        components = image.GetNumberOfComponentsPerPixel()
        grey = grey_image(image)
        if grey is None:
            kind = ("a colour or vector image whose components differ: convert a colour image to grey levels first"
                    if components in (3, 4) else "a vector image")
            raise InputError(f"{what} has {components} components per pixel ({kind}); a scalar (grey-level) image "
                             "is expected")
        image = grey
    if min(image.GetSize()) < 2 and d == 3 and image.GetSize()[2] == 1:
        raise InputError(f"{what} is a single slice stored as 3D; save it as a 2D image")
    if min(image.GetSize()) < 4:
        raise InputError(f"{what} is too small ({image.GetSize()}): at least 4 voxels per axis are needed")
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):  # integers are finite: no mask of a 512^3 image
        raise InputError(f"{what} {nonfinite_problem(arr)}")
    lo, hi = float(arr.min()), float(arr.max())
    if max(-lo, hi) > FLOAT32_MAX:
        raise InputError(f"{what} {beyond_float32(lo, hi)}")
    if hi <= lo:
        raise InputError(f"{what} is constant (all voxels {lo:g}): nothing to register")
    if sheared(image.GetDirection()):
        raise InputError(f"{what} has a direction matrix that is not orthonormal (its voxel axes are not unit vectors "
                         "at right angles: a sheared grid, e.g. a gantry-tilted CT); resample it onto a regular grid "
                         "first (e.g. Slicer's Resample Scalar/Vector/DWI Volume, or sitk.Resample)")
    # a float32 image is returned as it is, not copied (0.5 GB at 0.5 mm 512^3): the engine makes new images from
    # it and never changes one in place
    return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)


# --------------------------------------------------------------------------
# Atomic output
# --------------------------------------------------------------------------


def image_suffix(path: Path) -> str:
    """An image file's extension, the two-part ones whole (``.nii.gz``, ``.seg.nrrd``, ``.hdr.gz``, ``.img.gz``,
    ``.gipl.gz``; in the name's own case), else ``path.suffix``."""
    name = path.name
    for ext in TWO_PART_SUFFIXES:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[-len(ext):]
    return path.suffix


TWO_PART_SUFFIXES = (".nii.gz", ".seg.nrrd", ".hdr.gz", ".img.gz", ".gipl.gz")


def image_files(path: Path) -> list[Path]:
    """The files an image on disk is made of: ``path``, and the voxel file of a two-file format beside it (the
    ``.img`` of an Analyze/NIfTI ``.hdr``, or the reverse; the ``data file`` of a detached NRRD header, the
    ``ElementDataFile`` of a MetaImage ``.mhd``), where it exists. A list of data files (one per slice) is not
    followed."""
    files = [path]
    suffix = image_suffix(path).lower()
    pairs = {".hdr": ".img", ".img": ".hdr", ".hdr.gz": ".img.gz", ".img.gz": ".hdr.gz"}
    if suffix in pairs:
        stem = path.name[: -len(suffix)]
        files += [path.with_name(stem + ext) for ext in (pairs[suffix], pairs[suffix].upper())]
    elif suffix in (".nhdr", ".mhd") and path.is_file():
        key = "data file:" if suffix == ".nhdr" else "elementdatafile"
        with open(path, "rb") as f:
            head = f.read(65536).decode("latin-1")
        for line in head.splitlines():
            name = line.split("=", 1)[-1] if suffix == ".mhd" else line[len(key):]
            if line.lower().replace(" ", "").startswith(key.replace(" ", "")) and name.strip():
                name = name.strip()
                if name.upper() != "LOCAL" and not name.upper().startswith("LIST") and "%" not in name:
                    files.append(path.parent / name)
                break
    return [f for i, f in enumerate(files) if i == 0 or f.exists()]


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` on ``path``'s own name in a temporary folder beside it, then rename what it wrote
    into place: the files a two-file format writes beside it first (an ``.nhdr``'s ``.raw.gz``, an ``.mhd``'s
    ``.zraw``, a ``.hdr``'s ``.img``), ``path`` last.

    The name is kept whole (its extension in lower case), so SimpleITK picks the right writer and a header names
    its voxel file as it will be called. On failure the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    suffix = image_suffix(path)
    # the extension in lower case: ITK picks its writer by it, and has none for OUT.NII.GZ or OUT.MHA
    tmp = folder / (path.name[: len(path.name) - len(suffix)] + suffix.lower())
    try:
        writer(str(tmp))
        mode = 0o666 & ~_umask()  # mkstemp/mkdtemp make private files; outputs get the usual permissions
        for written in sorted(folder.iterdir(), key=lambda f: f == tmp):
            os.chmod(written, mode)
            os.replace(written, path if written == tmp else path.parent / written.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_image(image: sitk.Image, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, useCompression=True))


def write_transform(transform: sitk.Transform, path: str | os.PathLike) -> Path:
    """Write ``transform`` flattened (`flatten_transform`), so every ITK reader, ANTs and Slicer can read it back."""
    from .transforms import flatten_transform  # lazy: transforms imports torch

    flat = flatten_transform(transform)
    return atomic_write(path, lambda tmp: sitk.WriteTransform(flat, tmp))


def write_json(data: dict, path: str | os.PathLike) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.write("\n")

    return atomic_write(path, _write)


def _json_default(o: object) -> object:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def prepare_output_dir(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike], names: Iterable[str]) -> Path:
    """Create ``out_dir`` if needed and check it is writable and that no output would overwrite an input.

    Call before any computation, so a bad output location fails fast and writes nothing.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output '{out}' exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"output folder '{out}' cannot be created: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"output folder '{out}' is not writable")
    try:
        probe_writable(out)
    except OSError as exc:
        raise OutputError(f"output folder '{out}' is not writable: {exc.strerror}") from None
    resolved_inputs = {Path(p).resolve() for p in inputs}
    for name in names:
        if (out / name).resolve() in resolved_inputs:
            raise OutputError(f"output '{out / name}' would overwrite an input; choose another output folder")
    return out


def check_earlier_outputs(out: Path, names: Sequence[str], record: str = "result.json",
                          keys: tuple[str, ...] = ("transform_maps", "stages"), what: str = "istn register run") -> None:
    """Before any computation: files in ``out`` named like this run's outputs are replaced (optional ones removed)
    only when they are an earlier run's (``istn register``'s by default; a batch's: ``record="summary.json"``;
    `istn demo`'s), as its ``record`` says (a JSON object with ``keys``, whose ``outputs``, where it has them,
    lists the files it wrote); anything else there is the user's, and the run is refused (`OutputError`) rather
    than overwrite it."""
    present = [n for n in names if (out / n).exists()]
    if not present:
        return
    why = f"no {record} of one there"
    try:
        data = json.loads((out / record).read_text())
    except OSError:
        data = None
    except ValueError:  # cut short (a full disk, a copy stopped part way) or edited: whose files they are is unknown
        data, why = None, f"its {record} cannot be read"
    if isinstance(data, dict) and all(k in data for k in keys):
        listed = data.get("outputs")
        if not isinstance(listed, list):  # a record that does not list its files: all of them the run's
            return
        # files named like outputs that the earlier run did not write are the user's (an atlas brought there with
        # istn apply, a picture saved as overview.png): a re-run removed or replaced them
        foreign = [n for n in present if n != record and n not in listed]
        if not foreign:
            return
        raise OutputError(f"output folder '{out}' holds {', '.join(foreign)}, which the earlier {what} there did "
                          f"not write (its {record} lists its outputs): they would be replaced or removed; move "
                          "them, or choose a new or empty folder")
    raise OutputError(f"output folder '{out}' holds {', '.join(present)}, not the outputs of an earlier {what} "
                      f"({why}): they would be replaced; choose a new or empty folder")
