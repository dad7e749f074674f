"""FreeSurfer's volume files (``.mgz``, ``.mgh``: ``T1.mgz``, ``norm.mgz``, ``aseg.mgz``), which SimpleITK has no
reader for (Slicer reads them with an ITK module SimpleITK's wheels leave out).

The format (FreeSurfer wiki, "MghFormat"): a 284-byte big-endian header, then the voxels, x fastest, then optional
scan parameters and tags (not read). Header fields in order: version (1), width, height, depth, frames (int32 each),
data type, degrees of freedom (int32), a flag saying the geometry fields are valid (int16), voxel sizes (3 float32),
the direction cosines of the x, y and z voxel axes in RAS (9 float32, one axis after the other) and the RAS point at
the voxel ``(width, height, depth) / 2`` (3 float32). ``.mgz`` is the same gzip-compressed.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

MGH_SUFFIXES = (".mgz", ".mgh")
_HEADER_BYTES = 284
_FIELDS = struct.Struct(">7ih3f9f3f")  # version, dims x4, type, dof, good-RAS flag, delta, axes, centre
#: data type code -> big-endian dtype (FreeSurfer's MRI_UCHAR, MRI_INT, MRI_FLOAT, MRI_SHORT, MRI_USHRT)
_DTYPES = {0: ">u1", 1: ">i4", 3: ">f4", 4: ">i2", 10: ">u2"}


def is_mgh(path: Path) -> bool:
    return path.name.lower().endswith(MGH_SUFFIXES)


def read_mgh(path: str | Path, what: str = "image") -> sitk.Image:
    """A FreeSurfer ``.mgz`` / ``.mgh`` volume as a SimpleITK image in ITK's LPS world, voxels as stored.

    Its voxel -> RAS matrix is FreeSurfer's (``M = axes * diag(sizes)``, ``M @ dims / 2 + p0 = centre``); LPS flips
    the first two world axes. Several frames give a 4D image (refused later, as any 4D file).
    Raises `InputError` for a file that is not MGH, cut short, of an unknown data type, with sheared axes or
    without a valid geometry.
    """
    p = Path(path)
    opener = gzip.open if p.name.lower().endswith(".mgz") else open
    try:
        with opener(p, "rb") as f:
            head = f.read(_HEADER_BYTES)
            version, width, height, depth, frames, code, _dof, good, *rest = _FIELDS.unpack_from(head)
            if version != 1 or min(width, height, depth, frames) < 1:
                raise InputError(f"{what} '{p}' is not a FreeSurfer MGH volume (its header reads version {version}, "
                                 f"size {width} x {height} x {depth} x {frames})")
            if code not in _DTYPES:
                raise InputError(f"{what} '{p}' holds FreeSurfer data type {code}, which is not read here (uchar, "
                                 "int, float, short, ushort are): convert it, e.g. mri_convert IN OUT.nii.gz")
            dtype = np.dtype(_DTYPES[code])
            count = width * height * depth * frames
            if count * dtype.itemsize > 1 << 36:  # 64 GiB: a header of another format read as MGH
                raise InputError(f"{what} '{p}' is not a FreeSurfer MGH volume (its header reads a size of "
                                 f"{width} x {height} x {depth} x {frames})")
            data = f.read(count * dtype.itemsize)
    except (OSError, EOFError, struct.error) as exc:
        raise InputError(f"{what} '{p}' could not be read as a FreeSurfer MGH volume ({exc})") from None
    if len(data) < count * dtype.itemsize:
        raise InputError(f"{what} '{p}' is cut short (an interrupted copy or download?): its header promises "
                         f"{count * dtype.itemsize:,} bytes of voxels, the file holds {len(data):,}")
    sizes = np.asarray(rest[:3], dtype=float)
    axes = np.asarray(rest[3:12], dtype=float).reshape(3, 3).T  # columns: the x, y, z voxel axes in RAS
    centre = np.asarray(rest[12:15], dtype=float)
    if not good:  # readers differ on the geometry to assume then (FreeSurfer's and nibabel's are not the same)
        raise InputError(f"{what} '{p}' says in its header that its voxel sizes and orientation are not valid "
                         "(FreeSurfer's good-RAS flag is 0), so where its voxels lie is not known: write it with its "
                         "geometry (e.g. mri_convert IN OUT.nii.gz and check the orientation in a viewer)")
    if np.any(sizes <= 0) or not np.all(np.isfinite(axes)):
        raise InputError(f"{what} '{p}' has voxel sizes {', '.join(f'{s:g}' for s in sizes)} or axes that are not "
                         "a geometry")
    u, s, vt = np.linalg.svd(axes)
    if np.any(np.abs(s - 1.0) > 1e-3) or abs(abs(np.linalg.det(axes)) - 1.0) > 1e-3 or \
            not np.allclose(axes.T @ axes, np.eye(3), atol=1e-3):
        raise InputError(f"{what} '{p}' has voxel axes that are not unit vectors at right angles, which ITK cannot "
                         "represent: resample it with mri_convert first")
    axes = u @ vt  # float32's rounding taken out: ITK wants orthonormal directions
    first = centre - (axes * sizes) @ (np.array([width, height, depth]) / 2.0)  # RAS of voxel (0, 0, 0)
    to_lps = np.diag([-1.0, -1.0, 1.0])
    array = np.frombuffer(data, dtype=dtype, count=count).astype(dtype.newbyteorder("="))
    array = array.reshape((frames, depth, height, width) if frames > 1 else (depth, height, width))
    image = sitk.GetImageFromArray(array, isVector=False)
    d = image.GetDimension()  # 4 with several frames: the fourth axis one frame apart
    direction = np.eye(d)
    direction[:3, :3] = to_lps @ axes
    image.SetSpacing([*sizes.tolist(), 1.0][:d])
    image.SetOrigin([*(to_lps @ first).tolist(), 0.0][:d])
    image.SetDirection(direction.ravel().tolist())
    return image
