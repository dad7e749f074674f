"""Dataclass configurations, saved inside every checkpoint and exported model."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

VARIANTS = ("stn-u", "stn-s", "istn-e", "istn-i")
ITN_VARIANTS = ("istn-e", "istn-i")  # the variants with an Image Transformer Network (the STNs take the images)
TRANSFORMS = ("affine", "bspline")
SOI_KINDS = ("labels", "soft", "landmarks")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a network (and to interpret its output).

    ``grid_size`` is the internal grid in ITK order ``(X, Y[, Z])``;
    ``grid_spacing`` its isotropic spacing in mm. Translation and B-spline
    bounds are in normalised units (fractions of the grid's half-extent).
    """

    ndim: int = 2
    grid_size: tuple[int, ...] = (128, 128)
    grid_spacing: float = 1.0
    transform: str = "affine"
    variant: str = "istn-i"
    soi_channels: int = 1
    itn_channels: tuple[int, ...] = (8, 16, 32)
    stn_channels: tuple[int, ...] = (8, 16, 32, 32)
    stn_hidden: int = 64
    cp_spacing_mm: float = 10.0
    max_translation: float = 0.3
    max_rotation_deg: float = 45.0
    max_log_scale: float = 0.25
    max_shear: float = 0.25
    max_displacement: float = 0.3
    # where the internal grid is centred (`istn.data.network_grid`): "foreground" (the anatomy's centre),
    # "image" (the image's centre) or "auto" (foreground in 3D, where heads come with necks and padded fields
    # of view; image in 2D, where the toy data's frame is the natural one)
    grid_centre: str = "auto"
    # ITN output: "linear" (unbounded, the paper's and engine 0.1's) or "sigmoid" (each channel in [0, 1], one map
    # per structure: what a clinician reads as the structure's overlay; thresholded at 0.5 it is a segmentation)
    itn_output: str = "linear"

    def __post_init__(self) -> None:
        self.grid_size = tuple(int(s) for s in self.grid_size)
        self.itn_channels = tuple(int(c) for c in self.itn_channels)
        self.stn_channels = tuple(int(c) for c in self.stn_channels)
        if self.ndim not in (2, 3):
            raise ValueError(f"ModelConfig() 'ndim' must be 2 or 3, got {self.ndim}")
        if len(self.grid_size) != self.ndim:
            raise ValueError(f"ModelConfig() 'grid_size' must have {self.ndim} entries, got {self.grid_size}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"ModelConfig() 'transform' must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"ModelConfig() 'variant' must be one of {VARIANTS}, got {self.variant!r}")
        if self.grid_centre not in ("auto", "foreground", "image"):
            raise ValueError(f"ModelConfig() 'grid_centre' must be auto, foreground or image, got {self.grid_centre!r}")
        if self.itn_output not in ("linear", "sigmoid"):
            raise ValueError(f"ModelConfig() 'itn_output' must be linear or sigmoid, got {self.itn_output!r}")
        if not (self.grid_spacing > 0 and self.cp_spacing_mm > 0):
            raise ValueError(f"ModelConfig() 'grid_spacing' and 'cp_spacing_mm' must be > 0 mm, got "
                             f"{self.grid_spacing}, {self.cp_spacing_mm}")
        levels = len(self.itn_channels) - 1
        if any(s % (2**levels) for s in self.grid_size):
            raise ValueError(f"ModelConfig() 'grid_size' must be divisible by {2**levels} (ITN depth), got {self.grid_size}")

    @property
    def uses_itn(self) -> bool:
        return self.variant in ITN_VARIANTS

    @property
    def centre_on_foreground(self) -> bool:
        return self.grid_centre == "foreground" or (self.grid_centre == "auto" and self.ndim == 3)

    @property
    def cp_spacing_voxels(self) -> float:
        return self.cp_spacing_mm / self.grid_spacing


@dataclass
class TrainConfig:
    """How a model is trained (saved in the checkpoint and in the exported model)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train_csv: str = ""  # image pairs, header ``src,trg`` (src = moving, trg = fixed)
    soi_csv: str = ""  # SoI pairs, same rows as ``train_csv``
    data_root: str = ""  # paths in the CSVs are relative to this (default: the CSV's folder)
    soi_kind: str = "soft"  # labels | soft | landmarks
    soi_labels: tuple[int, ...] = ()  # for soi_kind="labels": label values, one channel each
    val_csv: str = ""  # optional explicit validation pairs (with val_soi_csv)
    val_soi_csv: str = ""
    val_fraction: float = 0.2  # otherwise this fraction of train_csv rows, split by split_seed
    split_seed: int = 0
    steps: int = 1000
    batch_size: int = 10
    lr: float = 1e-3
    # from this step on, the learning rate falls along a half cosine from ``lr`` to ``lr * lr_final`` at ``steps``
    # (an annealing phase that ends a long constant-rate run); -1: constant throughout (the paper's release)
    lr_decay_start: int = -1
    lr_final: float = 0.01
    val_every: int = 100
    seed: int = 42
    device: str = "auto"
    threads: int = 1
    out_dir: str = "runs/istn"
    soi_loss: str = "mse"  # mse (the paper's) | nmse (normalised: for sparse SoI, see losses.normalised_mse)
    image_weight: float = 0.0  # > 0 adds image_weight * MSE(T(s), t) to SoI variants (losses.variant_loss)
    intensity_low: float = 0.5  # percentiles mapped to 0 and 1
    intensity_high: float = 99.5
    # upper percentile over the foreground only (`istn.data.intensity_window`); False: over all voxels (engine 0.1 models)
    intensity_foreground: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        self.soi_labels = tuple(int(v) for v in self.soi_labels)
        if self.soi_kind not in SOI_KINDS:
            raise ValueError(f"TrainConfig() 'soi_kind' must be one of {SOI_KINDS}, got {self.soi_kind!r}")
        if self.soi_loss not in ("mse", "nmse"):
            raise ValueError(f"TrainConfig() 'soi_loss' must be mse or nmse, got {self.soi_loss!r}")
        if self.val_csv and not self.val_soi_csv:  # the images are no structure maps to validate against
            raise ValueError("TrainConfig() 'val_csv' needs 'val_soi_csv' (the validation pairs' structure maps)")
        if self.soi_labels and self.soi_kind != "labels":
            raise ValueError(f"TrainConfig() 'soi_labels' are label values of label maps (soi_kind 'labels'); "
                             f"a {self.soi_kind} map is one channel")
        if self.steps < 1 or self.batch_size < 1 or self.val_every < 1:
            raise ValueError("TrainConfig() 'steps', 'batch_size' and 'val_every' must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):  # 0 trains nothing; torch's own message names no option
            raise ValueError(f"TrainConfig() 'lr' (--lr) must be a finite number > 0, got {self.lr}")
        if self.threads < 1:
            raise ValueError(f"TrainConfig() 'threads' (--threads) must be a whole number >= 1, got {self.threads}")
        if not 0 <= self.seed < 2**63:  # torch.manual_seed's range
            raise ValueError(f"TrainConfig() 'seed' (--seed) must be a whole number from 0 to 2^63 - 1, got {self.seed}")
        repeated = sorted({v for v in self.soi_labels if self.soi_labels.count(v) > 1})
        if repeated or 0 in self.soi_labels:  # two channels alike; 0 is the background of a label map
            raise ValueError(f"TrainConfig() 'soi_labels' (--soi-labels) must be distinct structure labels, not 0 "
                             f"(the background); got {' '.join(map(str, self.soi_labels))}")
        if self.lr_decay_start < -1 or not 0.0 <= self.lr_final <= 1.0:
            raise ValueError("TrainConfig() 'lr_decay_start' must be -1 (no decay) or a step >= 0, and 'lr_final' "
                             f"a fraction in [0, 1]; got {self.lr_decay_start}, {self.lr_final}")


def to_dict(config: Any) -> dict:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    return dataclasses.asdict(config)


def train_config_from_dict(d: dict) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"TrainConfig has no field(s) {sorted(unknown)}")
    return TrainConfig(**d)


#: The bundled model family used when none is named (``istn demo``, the Slicer panel's first entries) and its
#: models' file stems by transform (``<family>-<transform>.pt``, the names ``benchmarks/train_brain.py`` exports).
DEFAULT_MODEL_FAMILY = "brain-t1"
DEFAULT_MODEL_STEMS = {t: f"{DEFAULT_MODEL_FAMILY}-{t}" for t in ("affine", "bspline")}


def has_itn(meta: dict) -> bool:
    """Whether the model of this metadata has an ITN (ISTN-e/i): its maps are learned, not the images."""
    return meta.get("variant") in ITN_VARIANTS


def companion_stem(stem: str, transform: str) -> str | None:
    """The stem of the model of ``transform`` in the same family as model ``stem`` (``brain-t1-bspline`` ->
    ``brain-t1-affine``): the stem with its last ``-affine``/``-bspline`` replaced; None without one."""
    for kind in ("affine", "bspline"):
        if stem.endswith("-" + kind):
            return stem[: -len(kind)] + transform
    return None


def trained_on_varied_views(meta: dict) -> bool:
    """Whether a brain-recipe model trained on views beyond plain T1 heads: other contrasts (real or by
    label-driven synthesis) or cropped fields of view (its metadata's ``data_options``). Such a model is the one
    to try when a T1-only model's self-checks fail on a pair (``brain-synth`` beside ``brain-t1``)."""
    options = meta.get("data_options") if isinstance(meta, dict) else None
    if not isinstance(options, dict):
        return False
    contrasts = {str(c).lower() for c in options.get("contrasts", ["t1"])}
    return (float(options.get("synth_prob", 0) or 0) > 0 or float(options.get("crop_prob", 0) or 0) > 0
            or bool(contrasts - {"t1"}))


def varied_alternatives(used: list[dict], candidates: list[tuple[object, dict]]) -> list:
    """For a chain of models (``used``: their metadata, in order) none of which `trained_on_varied_views`, one
    candidate per used model that did, of the same transform and dimension: ``[key, ...]`` from ``candidates``
    (``(key, metadata)``, e.g. the model files beside them), or ``[]`` when a used model already did or some
    transform has no such candidate. What the command line and the panel suggest when a self-check fails."""
    if any(trained_on_varied_views(m) for m in used):
        return []
    picks = []
    for m in used:
        match = next((k for k, c in candidates if trained_on_varied_views(c) and c.get("transform") == m.get("transform")
                      and c.get("ndim") == m.get("ndim")), None)
        if match is None:
            return []
        picks.append(match)
    return picks


def varied_models_beside(used: list[tuple[Path, dict]], read_meta: Callable[[Path], dict]) -> list[Path]:
    """`varied_alternatives` among the model files (``*.pt``) in the folder of the last of ``used`` (``(path,
    metadata)`` of each model of a chain, in order), other than those: what the command line and the panel
    suggest after a failed self-check. ``read_meta(path)``: a file's metadata (the command line loads the model,
    the panel reads the archive without torch); a file it cannot read is no candidate. Nothing is read when a
    used model was made for varied views already."""
    if not used or any(trained_on_varied_views(m) for _, m in used):
        return []
    paths = [Path(p) for p, _ in used]
    candidates = []
    for path in sorted(paths[-1].parent.glob("*.pt")):
        if path in paths:
            continue
        try:
            candidates.append((path, read_meta(path)))
        except Exception:  # noqa: BLE001 - whatever makes a file unreadable, it is simply not a candidate
            continue
    return varied_alternatives([m for _, m in used], candidates)


#: The contrasts a brain-recipe model can be asked about; its validation pairs are T1 whatever it trained on.
BRAIN_CONTRASTS = ("T1", "T2", "PD")


def unvalidated_contrasts(meta: dict) -> list[str] | None:
    """The contrasts of `BRAIN_CONTRASTS` a model was neither trained nor validated on, from its metadata's
    ``data_options`` (the brain recipe, ``benchmarks/train_brain.py``, writes them); None when the model does
    not say (it was not made by that recipe). The one rule behind the panel's and ``describe``'s wording."""
    options = meta.get("data_options") if isinstance(meta, dict) else None
    if not isinstance(options, dict):
        return None
    trained = {str(c).upper() for c in options.get("contrasts", ["t1"])}
    return [c for c in BRAIN_CONTRASTS[1:] if c not in trained]
