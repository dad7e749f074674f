"""Slicer's segmentation files (``.seg.nrrd``): the header that names a label map's segments, and what a resampled
copy must change in it to open in Slicer as the same segments on its new grid.

A ``.seg.nrrd`` is an ordinary NRRD label map (one component per *layer*: segments that overlap sit in layers of
their own) whose key/value header carries, per segment ``i``, ``Segment{i}_ID / _Name / _Color / _LabelValue /
_Layer / _Extent / _Tags ...`` and, for the whole, ``Segmentation_*`` keys. SimpleITK reads the keys as the image's
metadata; everything here is plain strings on `SimpleITK.Image`s (no Slicer).

Geometry in the header: ``_Extent`` (voxel index bounds of the segment's layer) and
``Segmentation_ReferenceImageExtentOffset`` are voxel indices of the grid the file was written on, and the
``Reference image geometry`` conversion parameter is that grid as an IJK -> RAS matrix and extent (the grid
Slicer's Segment Editor paints on). A copy on another grid gets all three anew: the whole new extent, no offset,
the new grid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import SimpleITK as sitk

_SEGMENT_KEY = re.compile(r"^Segment(\d+)_(\w+)$")
_SEGMENTATION_PREFIX = "Segmentation_"
REFERENCE_GEOMETRY = "Reference image geometry"  # a conversion parameter's name
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Segment:
    """One segment of a ``.seg.nrrd``: its voxels are those of ``layer`` (component) equal to ``label``."""

    index: int
    name: str
    layer: int
    label: int


def header(image: sitk.Image) -> dict[str, str]:
    """The segmentation keys of ``image``'s metadata (``Segment{i}_*``, ``Segmentation_*``); ``{}`` for any image
    that is not a Slicer segmentation."""
    keys = [k for k in image.GetMetaDataKeys() if _SEGMENT_KEY.match(k) or k.startswith(_SEGMENTATION_PREFIX)]
    found = {k: image.GetMetaData(k) for k in keys}
    return found if any(_SEGMENT_KEY.match(k) for k in found) else {}


def segments(head: dict[str, str]) -> list[Segment]:
    """The segments a `header` describes, in file order. A segment without a layer is in layer 0, one without a
    label value has value 1 (Slicer's defaults for a single-layer file)."""
    indices = sorted({int(m.group(1)) for k in head if (m := _SEGMENT_KEY.match(k))})

    def value(i: int, field: str, default: str) -> str:
        return head.get(f"Segment{i}_{field}", default).strip() or default

    return [Segment(i, value(i, "Name", value(i, "ID", f"Segment_{i}")), int(value(i, "Layer", "0")),
                    int(value(i, "LabelValue", "1"))) for i in indices]


def with_header(image: sitk.Image, head: dict[str, str]) -> sitk.Image:
    """``image`` (a resampled copy of a segmentation, its layers as components) with ``head`` put on it, the grid's
    entries made ``image``'s own: every segment's extent the whole image, no extent offset, the reference geometry
    ``image``'s grid (3D). Returns ``image`` (its metadata set in place)."""
    whole = " ".join(f"0 {n - 1}" for n in image.GetSize())
    for key, val in head.items():
        m = _SEGMENT_KEY.match(key)
        if m and m.group(2) == "Extent":
            val = whole
        elif key == _SEGMENTATION_PREFIX + "ReferenceImageExtentOffset":
            val = " ".join("0" for _ in image.GetSize())
        elif key == _SEGMENTATION_PREFIX + "ConversionParameters" and image.GetDimension() == 3:
            val = _with_reference_geometry(val, reference_geometry(image))
        image.SetMetaData(key, val)
    return image


def reference_geometry(image: sitk.Image) -> str:
    """``image``'s grid as Slicer serialises a segmentation's reference geometry: the 16 entries of its IJK -> RAS
    matrix (row by row), then its extent (6 voxel indices), each followed by ``;``."""
    d = np.asarray(image.GetDirection(), float).reshape(3, 3) * np.asarray(image.GetSpacing(), float)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = _LPS_TO_RAS @ d
    ijk_to_ras[:3, 3] = _LPS_TO_RAS @ np.asarray(image.GetOrigin(), float)
    extent = [v for n in image.GetSize() for v in (0, n - 1)]
    return "".join(f"{v:.17g};" for v in ijk_to_ras.ravel()) + "".join(f"{v};" for v in extent)


def _with_reference_geometry(parameters: str, geometry: str) -> str:
    """Slicer's serialised conversion parameters (``name|value|description&`` each) with the reference image
    geometry's value replaced (the others, e.g. smoothing factors, kept as they were)."""
    out = []
    for entry in parameters.split("&"):
        parts = entry.split("|", 2)
        if parts[0] == REFERENCE_GEOMETRY and len(parts) >= 2:
            parts[1] = geometry
        out.append("|".join(parts))
    return "&".join(out)


def warp_layers(image: sitk.Image, warp: Callable[[sitk.Image], sitk.Image]) -> sitk.Image:
    """``warp`` (one scalar image -> its resampled copy) applied to each layer (component) of ``image`` apart, the
    layers put together again: overlapping segments stay whole. A scalar image is warped as it is."""
    if image.GetNumberOfComponentsPerPixel() == 1:
        return warp(image)
    return sitk.Compose([warp(sitk.VectorIndexSelectionCast(image, i))
                         for i in range(image.GetNumberOfComponentsPerPixel())])


def unique_names(segs: list[Segment]) -> list[str]:
    """The segments' names, a repeated one told apart by its label value and layer (Slicer allows repeats)."""
    names = [s.name for s in segs]
    return [n if names.count(n) == 1 else f"{n} (label {s.label}, layer {s.layer})" for n, s in zip(names, segs)]


def sizes(image: sitk.Image, segs: list[Segment]) -> dict[str, int]:
    """Voxels of each segment in ``image`` (its layers as components), by `unique_names`, in file order."""
    arr = sitk.GetArrayViewFromImage(image)
    if image.GetNumberOfComponentsPerPixel() == 1:
        arr = arr[..., None]
    return {name: int(np.count_nonzero(arr[..., s.layer] == s.label)) if s.layer < arr.shape[-1] else 0
            for name, s in zip(unique_names(segs), segs)}
