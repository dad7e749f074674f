"""Tissue classes of the prepared brain anatomies, for label-driven synthesis (`istn.data.synthesis`).

One integer map per anatomy (`istn.data.synthesis.TISSUE_CLASSES`: 0 background, 1 CSF, 2 GM, 3 WM,
4/5 non-brain head, dark/bright), on the grid of its T1, from what `prepare` wrote next to it
(``train/<name>_<tissue>.nii.gz``). How each anatomy gets its map (`tissue_source`):

- ``icbm2009a``: its own GM and WM probability maps (nilearn's ICBM 2009a); no CSF map, so the brain is
  GM + WM > 0.5 closed and filled per slice, and inside it CSF = 1 - GM - WM competes with GM and WM.
- ``spm_avg152``: SPM's GM, WM and CSF priors (avg152 space), the most probable of the three where
  they sum above 0.5. Its T2 and PD share this map (same subjects, same space).
- ``spm_avg305``: the avg152 priors (the same MNI space; as its brain mask in training), an
  approximation.
- ``itk_subject``: ITK's preliminary k-means classes: 4 CSF, 5 GM, 6 WM (0-3: background, scalp,
  face and other non-brain), voxel-wise and speckled, so a 3x3x3 majority filter smooths them.
- ``icbm2009c`` (skull-stripped, no map): three intensity classes of its T1 inside its foreground (two
  Otsu thresholds), a T1-only guess.

For every anatomy but the last, the non-brain head of the whole-head T1 (its Otsu foreground, closed
and filled per slice, minus the brain) is split by Otsu's threshold into a dark class (skull, fluid,
muscle) and a bright one (scalp fat, marrow). A skull-stripped version of an anatomy keeps its map
inside the brain mask and background outside (``mask``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..synthesis import CSF, GM, WM, tissue_from_classes, tissue_from_intensity, tissue_from_probabilities

#: Whose probability maps an anatomy uses when it has none of its own.
PROBABILITY_MAPS_OF = {"spm_avg305": "spm_avg152"}
#: k-means class -> tissue class, per anatomy with a ``<name>_kmeans`` map.
KMEANS_CLASSES = {"itk_subject": {4: CSF, 5: GM, 6: WM}}


def _read(path: Path, reference: sitk.Image, interpolator: int) -> np.ndarray:
    img = sitk.ReadImage(str(path))
    img = sitk.Resample(img, reference, sitk.Transform(), interpolator, 0.0, img.GetPixelID())
    return sitk.GetArrayFromImage(img)


def tissue_source(data: Path, name: str) -> str:
    """How ``name``'s tissue map is made from the files in ``data`` (one line, for logs and model cards)."""
    train = Path(data) / "train"
    owner = PROBABILITY_MAPS_OF.get(name, name)
    if (train / f"{owner}_gm.nii.gz").exists() and (train / f"{owner}_wm.nii.gz").exists():
        maps = "GM, WM, CSF" if (train / f"{owner}_csf.nii.gz").exists() else "GM, WM"
        return f"{owner}'s {maps} probability maps, non-brain head split by Otsu"
    if (train / f"{name}_kmeans.nii.gz").exists() and name in KMEANS_CLASSES:
        return "k-means tissue classes (3x3x3 majority filter), non-brain head split by Otsu"
    return "three intensity classes of the T1 inside its foreground (Otsu)"


def tissue_map(data: Path, name: str, t1: sitk.Image, mask: sitk.Image | None = None) -> sitk.Image:
    """The tissue classes (uint8, `istn.data.synthesis.TISSUE_CLASSES`) of anatomy ``name`` on the grid of
    its T1 image ``t1``; ``mask``: a brain mask on that grid, for a skull-stripped version (0 outside)."""
    train = Path(data) / "train"
    image = sitk.GetArrayFromImage(sitk.Cast(t1, sitk.sitkFloat32))
    owner = PROBABILITY_MAPS_OF.get(name, name)
    gm, wm, csf = (train / f"{owner}_{t}.nii.gz" for t in ("gm", "wm", "csf"))
    kmeans = train / f"{name}_kmeans.nii.gz"
    if gm.exists() and wm.exists():
        prob = [_read(p, t1, sitk.sitkLinear).astype(np.float32) for p in (gm, wm)]
        prob.append(_read(csf, t1, sitk.sitkLinear).astype(np.float32) if csf.exists() else None)
        prob = [None if p is None else p / (255.0 if p.max() > 1.5 else 1.0) for p in prob]
        classes = tissue_from_probabilities(prob[0], prob[1], prob[2], image)
    elif kmeans.exists() and name in KMEANS_CLASSES:
        classes = tissue_from_classes(_read(kmeans, t1, sitk.sitkNearestNeighbor), KMEANS_CLASSES[name], image)
    else:
        classes = tissue_from_intensity(image)
    if mask is not None:
        classes = np.where(sitk.GetArrayFromImage(mask) > 0, classes, 0).astype(np.uint8)
    out = sitk.GetImageFromArray(classes.astype(np.uint8))
    out.CopyInformation(t1)
    return out
