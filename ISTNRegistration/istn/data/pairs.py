"""Pairs of images and their SoI from CSV files, held in memory on the network grid; train/validation splits."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..config import ModelConfig
from ..errors import InputError
from ..io import check_image
from .images import image_to_tensor, intensity_window, network_grid, soi_to_tensor


def read_pairs_csv(path: str | Path, root: str | Path | None = None) -> list[tuple[Path, Path]]:
    """Rows ``src,trg`` (header required) -> ``[(source_path, target_path)]``.

    Relative paths are resolved against ``root`` (default: the CSV's folder).
    The ISTN convention: ``src`` is the moving image, ``trg`` the fixed one.
    """
    path = Path(path)
    base = Path(root) if root else path.parent
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"src", "trg"} <= set(reader.fieldnames):
            raise InputError(f"pairs file '{path}' must have a header with columns src,trg")
        return [(base / row["src"], base / row["trg"]) for row in reader]


@dataclass
class PairTensors:
    """One training pair on the network grid (batch dimension 1)."""

    source: torch.Tensor  # (1, 1, *S)
    target: torch.Tensor  # (1, 1, *S)
    source_soi: torch.Tensor  # (1, K, *S)
    target_soi: torch.Tensor  # (1, K, *S)


def load_pair(
    source: Path,
    target: Path,
    source_soi: Path,
    target_soi: Path,
    cfg: ModelConfig,
    soi_kind: str,
    soi_labels: Sequence[int] = (),
    intensity: tuple[float, float] = (0.5, 99.5),
    foreground: bool = True,
) -> PairTensors:
    """Read, check and resample one pair and its SoI encodings onto each image's network grid."""
    out = []
    for img_path, soi_path in ((source, source_soi), (target, target_soi)):
        img = check_image(sitk.ReadImage(str(img_path)), f"image '{img_path}'")
        if img.GetDimension() != cfg.ndim:
            raise InputError(f"image '{img_path}' is {img.GetDimension()}D but the model is {cfg.ndim}D")
        grid = network_grid(img, cfg)
        window = intensity_window(sitk.GetArrayViewFromImage(img), *intensity, foreground=foreground)
        soi = sitk.ReadImage(str(soi_path))
        out.append((image_to_tensor(img, grid, window), soi_to_tensor(soi, grid, soi_kind, soi_labels)))
    (s, ss), (t, ts) = out
    return PairTensors(s, t, ss, ts)


class PairDataset(torch.utils.data.Dataset):
    """Pairs held in memory on the network grid; items are dicts of ``(C, *S)`` tensors."""

    def __init__(self, pairs: list[PairTensors]) -> None:
        self.pairs = pairs

    @classmethod
    def from_csv(
        cls,
        images_csv: str | Path,
        soi_csv: str | Path,
        cfg: ModelConfig,
        soi_kind: str,
        soi_labels: Sequence[int] = (),
        root: str | Path | None = None,
        rows: Sequence[int] | None = None,
        intensity: tuple[float, float] = (0.5, 99.5),
        foreground: bool = True,
    ) -> "PairDataset":
        images = read_pairs_csv(images_csv, root)
        sois = read_pairs_csv(soi_csv, root)
        if len(images) != len(sois):
            raise InputError(f"'{images_csv}' has {len(images)} rows but '{soi_csv}' has {len(sois)}: row k must be the same pair")
        idx = range(len(images)) if rows is None else rows
        return cls([load_pair(*images[i], *sois[i], cfg, soi_kind, soi_labels, intensity, foreground) for i in idx])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        p = self.pairs[i]
        return {"source": p.source[0], "target": p.target[0], "source_soi": p.source_soi[0], "target_soi": p.target_soi[0]}


def split_rows(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/validation split of ``n`` rows: ``(train_rows, val_rows)``."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction))) if val_fraction > 0 else 0
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())
