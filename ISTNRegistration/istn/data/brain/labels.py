"""The sub-cortical label protocol: the eight structures, how two atlases give them, and measures on them."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .sources import DataSourceError

#: The sub-cortical label protocol shared by every labelled volume (0 = background).
LABELS: dict[str, int] = {
    "left_caudate": 1,
    "right_caudate": 2,
    "left_putamen": 3,
    "right_putamen": 4,
    "left_pallidum": 5,
    "right_pallidum": 6,
    "left_thalamus": 7,
    "right_thalamus": 8,
}

#: AAL (MRIcron ``aal.nii.gz``) ids of each protocol structure; checked against ``aal.nii.txt`` at build time.
AAL_IDS: dict[str, tuple[int, ...]] = {
    "left_caudate": (71,),
    "right_caudate": (72,),
    "left_putamen": (73,),
    "right_putamen": (74,),
    "left_pallidum": (75,),
    "right_pallidum": (76,),
    "left_thalamus": (77,),
    "right_thalamus": (78,),
}

#: HCPex ids of each protocol structure (pallidum = GPe + GPi, thalamus = its 21 nuclei); checked against ``HCPEx.txt``.
HCPEX_IDS: dict[str, tuple[int, ...]] = {
    "left_caudate": (383,),
    "right_caudate": (416,),
    "left_putamen": (382,),
    "right_putamen": (415,),
    "left_pallidum": (385, 386),
    "right_pallidum": (418, 419),
    "left_thalamus": tuple(range(361, 382)),
    "right_thalamus": tuple(range(394, 415)),
}

# How each atlas names the structures: (side suffix, name prefixes). Used to re-derive the ids above from the
# label files shipped with the atlases, so a package that renumbered its labels fails loudly.
_AAL_NAMES = {
    "caudate": ("Caudate_",),
    "putamen": ("Putamen_",),
    "pallidum": ("Pallidum_",),
    "thalamus": ("Thalamus_",),
}
_HCPEX_NAMES = {
    "caudate": ("Caudate_",),
    "putamen": ("Putamen_",),
    "pallidum": ("Globus_pallidus_externalis_", "Globus_pallidus_internalis_"),
    "thalamus": ("Thal_",),
}


def mirror_permutation(names: Sequence[str]) -> tuple[int, ...]:
    """Where each structure's twin across the midline is in ``names``: ``names[perm[k]]`` is ``names[k]`` with
    left and right swapped (a name without a side is its own twin). Indexing per-structure channels with it
    relabels a left-right mirrored view."""
    names = list(names)
    return tuple(names.index(n.replace("left_", "#").replace("right_", "left_").replace("#", "right_")) for n in names)


def atlas_ids_from_names(names: Mapping[int, str], rules: Mapping[str, Sequence[str]]) -> dict[str, tuple[int, ...]]:
    """Protocol structure -> atlas ids, from an atlas's id -> name table.

    ``rules`` maps a structure ("caudate") to the name prefixes that make it; a
    name belongs to a side when it starts with one of the prefixes and ends in ``_L``/``_R``
    (``Caudate_L``, ``Thal_Pulvinar_medial_L``).
    """
    out: dict[str, tuple[int, ...]] = {}
    for structure, prefixes in rules.items():
        for side, suffix in (("left", "L"), ("right", "R")):
            ids = sorted(
                i
                for i, n in names.items()
                if any(n.startswith(p) for p in prefixes) and n.endswith("_" + suffix)
            )
            out[f"{side}_{structure}"] = tuple(ids)
    return {k: out[k] for k in LABELS}


def _read_aal_names(path: Path) -> dict[int, str]:
    # "71 Caudate_L 7001": index, name, original AAL code
    names = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


def _read_hcpex_names(path: Path) -> dict[int, str]:
    # "383 Caudate_L"
    return _read_aal_names(path)


def _checked_ids(names: Mapping[int, str], rules, expected: Mapping[str, tuple[int, ...]], what: str) -> dict:
    found = atlas_ids_from_names(names, rules)
    if found != dict(expected):
        diff = {k: (expected[k], found[k]) for k in expected if tuple(expected[k]) != tuple(found[k])}
        raise DataSourceError(f"{what}: label names do not give the expected ids (expected, found): {diff}")
    return found


def map_labels(array: np.ndarray, ids: Mapping[str, Iterable[int]]) -> np.ndarray:
    """Map an atlas label array to the protocol `LABELS` (uint8, same shape; other ids become 0).

    ``ids`` maps each protocol name to the atlas ids that make it (`AAL_IDS`,
    `HCPEX_IDS`). Atlas arrays stored as float are rounded first.
    """
    a = np.asarray(array)
    if a.dtype.kind == "f":
        a = np.rint(a).astype(np.int64)
    unknown = set(ids) - set(LABELS)
    if unknown:
        raise ValueError(f"map_labels() 'ids' has names outside LABELS: {sorted(unknown)}")
    table_keys = [int(i) for name in ids for i in ids[name]]
    if len(table_keys) != len(set(table_keys)):
        raise ValueError("map_labels() 'ids' gives one atlas id to two structures")
    out = np.zeros(a.shape, np.uint8)
    for name, atlas_ids in ids.items():
        out[np.isin(a, list(atlas_ids))] = LABELS[name]
    return out


def dice(a: np.ndarray | sitk.Image, b: np.ndarray | sitk.Image) -> dict[str, float]:
    """Dice of every protocol structure between two protocol label maps on the same grid, and their mean."""
    a = sitk.GetArrayViewFromImage(a) if isinstance(a, sitk.Image) else np.asarray(a)
    b = sitk.GetArrayViewFromImage(b) if isinstance(b, sitk.Image) else np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"dice() label maps differ in shape: {a.shape} vs {b.shape}")
    out = {}
    for name, v in LABELS.items():
        x, y = a == v, b == v
        s = int(x.sum()) + int(y.sum())
        out[name] = 2.0 * int(np.logical_and(x, y).sum()) / s if s else float("nan")
    out["mean"] = float(np.nanmean([out[n] for n in LABELS]))
    return out


def label_volumes_ml(labels: sitk.Image) -> dict[str, float]:
    """Volume of each protocol structure in mL."""
    arr = sitk.GetArrayViewFromImage(labels)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    return {name: round(int((arr == v).sum()) * voxel_ml, 3) for name, v in LABELS.items()}
