"""Pairs of images and their SoI from CSV files, held in memory on the network grid; train/validation splits."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..config import ModelConfig
from ..errors import InputError
from ..io import grey_image, read_raw_image
from .images import image_to_tensor, network_grid, soi_to_tensor


def read_pairs_csv(path: str | Path, root: str | Path | None = None) -> list[tuple[Path, Path]]:
    """Rows ``src,trg`` (header required) -> ``[(source_path, target_path)]``.

    Relative paths are resolved against ``root`` (default: the CSV's folder).
    The ISTN convention: ``src`` is the moving image, ``trg`` the fixed one.
    Spreadsheet exports are read as written: a byte-order mark, CRLF line ends,
    spaces around a cell. An empty cell or a file that does not exist is refused
    (`InputError`) naming the row, before any image is read.
    """
    import io

    path = Path(path)
    if path.is_dir():
        raise InputError(f"pairs file '{path}' is a folder: give the CSV file that lists the pairs")
    if not path.is_file():
        raise InputError(f"pairs file '{path}' does not exist")
    base = Path(root) if root else path.parent
    raw = path.read_bytes()
    try:  # UTF-8 (with or without Excel's byte-order mark), or UTF-16 with its mark ("Unicode text")
        text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"pairs file '{path}' is not UTF-8 text (byte 0x{raw[exc.start]:02x} at position "
                         f"{exc.start}: an older spreadsheet encoding?): save it as CSV UTF-8") from None
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        fields = [n.strip() for n in reader.fieldnames or []]
        if not {"src", "trg"} <= set(fields):
            raise InputError(f"pairs file '{path}' must have a header with columns src,trg (got: "
                             f"{','.join(fields) or 'an empty file'})")
        reader.fieldnames = fields
        rows = []
        for line, row in enumerate(reader, start=2):
            cells = [(row.get(k) or "").strip() for k in ("src", "trg")]
            if not any(cells) and not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # a blank line
            for k, cell in zip(("src", "trg"), cells):
                if not cell:
                    raise InputError(f"pairs file '{path}', line {line}: the {k} cell is empty")
                if not (base / cell).exists():
                    where = "" if Path(cell).is_absolute() else f" (relative paths are read from '{base}')"
                    raise InputError(f"pairs file '{path}', line {line}: {k} '{cell}' does not exist{where}")
            rows.append((base / cells[0], base / cells[1]))
        if not rows:
            raise InputError(f"pairs file '{path}' has no rows (only its header)")
        return rows


@dataclass
class PairTensors:
    """One training pair on the network grid (batch dimension 1)."""

    source: torch.Tensor  # (1, 1, *S)
    target: torch.Tensor  # (1, 1, *S)
    source_soi: torch.Tensor  # (1, K, *S)
    target_soi: torch.Tensor  # (1, K, *S)
    notes: list[tuple[str, str]] = field(default_factory=list)  # structures missing from its maps (`soi_notes`)
    label_like: list[tuple[str, str]] = field(default_factory=list)  # soft maps that hold labels: (path, values)
    paths: tuple[Path, Path] | None = None  # the (source, target) image files it was read from
    # its Slicer segmentation maps' segment name -> label value tables: (path, table), to compare across maps
    segments: list[tuple[str, dict[str, int]]] = field(default_factory=list)
    # its images that hold a handful of whole-number values (`istn.metrics.few_whole_values`): label maps or masks
    # listed as images (the two CSVs swapped?)
    label_images: list[str] = field(default_factory=list)


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
    """Read, check and resample one pair and its SoI encodings onto each image's network grid.

    Each image is prepared as `istn.registration.register` prepares it (`istn.inputs.prepare_image`: the same
    anti-aliasing block average, intensity window and grid centre, on the image as stored LPS), so the network
    is trained on the inputs it is later given, whatever the images' resolution and storage."""
    from ..inputs import prepare_image  # inputs imports this package

    from .. import segfile

    out, notes, label_like, tables, label_images = [], [], [], [], []
    for img_path, soi_path in ((source, source_soi), (target, target_soi)):
        img = read_raw_image(img_path, "image")
        if cfg.ndim == 2 and img.GetDimension() == 3 and img.GetSize()[2] == 1:
            raise InputError(f"image '{img_path}' is a single slice stored as 3D; save it as a 2D image")
        if img.GetDimension() != cfg.ndim and img.GetDimension() in (2, 3):
            raise InputError(f"image '{img_path}' is {img.GetDimension()}D but the model is {cfg.ndim}D")
        reach = min(cfg.grid_size) * cfg.grid_spacing
        if reach < 2 * max(img.GetSpacing()):  # a grid that sees less than a voxel's worth: --spacing in metres?
            raise InputError(f"the model's grid ({' x '.join(map(str, cfg.grid_size))} voxels of "
                             f"{cfg.grid_spacing:g} mm) is {reach:.3g} mm across, less than two of image "
                             f"'{img_path}''s {max(img.GetSpacing()):g} mm voxels: is --spacing in mm?")
        prepared = prepare_image(img, cfg.grid_spacing, intensity, foreground, cfg.centre_on_foreground,
                                 f"image '{img_path}'")
        if prepared.values is not None:  # a label map or a mask listed as an image
            label_images.append(str(img_path))
        grid = network_grid(prepared.image, cfg, prepared.centre)
        soi = read_soi(soi_path, cfg.ndim, soi_kind)
        table = {seg.name: seg.label for seg in segfile.segments(segfile.header(soi)) if seg.layer == 0}
        if table:
            tables.append((str(soi_path), table))
        soi_tensor = soi_to_tensor(soi, grid, soi_kind, soi_labels)
        notes += soi_notes(soi, soi_tensor, soi_path, soi_kind, soi_labels) + geometry_notes(soi, img, soi_path)
        if soi_kind == "soft":
            values = labels_in_soft_map(soi)
            if values:
                label_like.append((str(soi_path), values))
        out.append((image_to_tensor(prepared.image, grid, prepared.window), soi_tensor))
    (s, ss), (t, ts) = out
    return PairTensors(s, t, ss, ts, notes, label_like, (Path(source), Path(target)), tables, label_images)


# A structure map of whole numbers with this many distinct values (the background included) or fewer, and more
# than two, reads as a label map: a soft map saved as integers (a uint8 probability map) has far more levels
LABEL_LIKE_VALUES = 64


def labels_in_soft_map(soi: sitk.Image) -> str:
    """``"1, 2, 3"`` (the non-zero values, the first 8) when a map given as soft holds labels: whole numbers, more
    than two values and at most `LABEL_LIKE_VALUES`; "" otherwise (a mask, a soft map)."""
    array = sitk.GetArrayViewFromImage(soi)
    # a real soft map is not whole numbers: one pass says so, before sorting its values (0.5 s for a float 256^3)
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        return ""
    values = np.unique(array)
    if not 2 < len(values) <= LABEL_LIKE_VALUES:
        return ""
    labels = values[values != 0]
    return ", ".join(f"{v:g}" for v in labels[:8]) + (", ..." if len(labels) > 8 else "")


def read_soi(path: Path, ndim: int, kind: str) -> sitk.Image:
    """A structure map of a training pair, refused in one line (`InputError`) when it cannot be one: unreadable,
    several components, another dimension than the model's, non-finite values, or (``kind="labels"``) values
    that are not whole numbers."""
    from .. import segfile

    soi = read_raw_image(path, "structure map")
    what = f"structure map '{path}'"
    if soi.GetNumberOfComponentsPerPixel() != 1:
        grey = grey_image(soi)  # a map saved as grey-level RGB(A) by a viewer: the map it is, as for the images
        if grey is None and segfile.header(soi):
            raise InputError(f"{what} is a Slicer segmentation whose segments overlap "
                             f"({soi.GetNumberOfComponentsPerPixel()} layers); a label map is expected: export the "
                             "segments to a label map (Slicer's Segmentations module), one value per structure")
        if grey is None:
            raise InputError(f"{what} has {soi.GetNumberOfComponentsPerPixel()} components per pixel; a label map "
                             "or one soft map is expected")
        soi = grey
    if soi.GetDimension() != ndim:
        raise InputError(f"{what} is {soi.GetDimension()}D but the model is {ndim}D")
    values = sitk.GetArrayViewFromImage(soi)
    if not np.all(np.isfinite(values)):
        raise InputError(f"{what} contains NaN or infinite values")
    if kind == "labels" and not np.issubdtype(values.dtype, np.integer) and not np.array_equal(values,
                                                                                              np.round(values)):
        raise InputError(f"{what} holds non-integer values, not labels: use --soi-kind soft for soft maps")
    return soi


def soi_notes(soi: sitk.Image, tensor: torch.Tensor, soi_path: Path, kind: str,
              labels: Sequence[int]) -> list[tuple[str, str]]:
    """What a training run should say of one structure map (``tensor``: its channels on its image's network grid),
    as ``(problem, path)``: a structure absent from the file, or present there but nowhere on the grid (another
    grid's label map, a field of view cut away)."""
    values = sitk.GetArrayViewFromImage(soi)
    on_grid = tensor.flatten(2).amax(-1)[0]  # (K,)
    outside = "lies outside its image (nothing of it on the network grid: another grid's map?)"
    if kind != "labels" or not labels:
        if not np.any(values):
            return [("holds no structure (every voxel is 0)", str(soi_path))]
        return [(outside, str(soi_path))] if float(on_grid.max()) == 0.0 else []
    present = set(np.unique(values).tolist())
    absent = [v for v in labels if v not in present]
    off_grid = [v for v, m in zip(labels, on_grid.tolist()) if v in present and m == 0.0]
    notes = []
    if absent:
        notes.append((f"has no label {', '.join(map(str, absent))}", str(soi_path)))
    if off_grid:
        notes.append((f"has label {', '.join(map(str, off_grid))}, but it {outside}", str(soi_path)))
    return notes


def geometry_notes(soi: sitk.Image, image: sitk.Image, soi_path: Path) -> list[tuple[str, str]]:
    """``(problem, path)`` when a structure map has its image's voxel grid (the same size) but not its place: another
    origin, spacing or direction, as when a header is lost on the way (a map saved from an array gets origin 0,
    spacing 1). It is used where its own header puts it, so its structures lie beside the image's."""
    if soi.GetSize() != image.GetSize():
        return []  # another grid (a finer map, a crop): placed by its header, which `soi_notes` checks for reach
    spacing = np.asarray(image.GetSpacing())
    off = [what for what, differs in (
        ("origin", float(np.linalg.norm(np.subtract(soi.GetOrigin(), image.GetOrigin()))) > 0.5 * float(spacing.min())),
        ("spacing", not np.allclose(soi.GetSpacing(), spacing, rtol=1e-3)),
        ("direction", not np.allclose(soi.GetDirection(), image.GetDirection(), atol=1e-3))) if differs]
    if not off:
        return []
    # no numbers in the problem: the maps of a cohort that share it are said in one warning
    return [(f"have their image's voxel grid but another {', '.join(off)}: a header lost on the way (a map saved "
             "from an array?); each is used where its own header puts it, beside the image's structures: copy the "
             "image's geometry onto it (SimpleITK's CopyInformation)", str(soi_path))]


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
        progress: Callable[[int, int], None] | None = None,
    ) -> "PairDataset":
        """The pairs of ``rows`` (all: None) read onto the network grid; ``progress(done, total)`` after each."""
        images = read_pairs_csv(images_csv, root)
        sois = read_pairs_csv(soi_csv, root)
        if len(images) != len(sois):
            raise InputError(f"'{images_csv}' has {len(images)} rows but '{soi_csv}' has {len(sois)}: row k must be the same pair")
        idx = list(range(len(images)) if rows is None else rows)
        pairs = []
        for i in idx:
            try:
                pairs.append(load_pair(*images[i], *sois[i], cfg, soi_kind, soi_labels, intensity, foreground))
            except InputError as exc:  # where in the CSVs: a file may be listed in several rows
                raise InputError(f"pair {i + 1} of '{images_csv}' (and '{soi_csv}'): {exc}", exc.detail) from None
            if progress is not None:
                progress(len(pairs), len(idx))
        return cls(pairs)

    @property
    def notes(self) -> list[tuple[str, str]]:
        """What its structure maps lack (`soi_notes`), every pair's."""
        return [n for p in self.pairs for n in p.notes]

    @property
    def label_like(self) -> list[tuple[str, str]]:
        """Its soft maps that hold labels (`labels_in_soft_map`), each map once."""
        return list(dict.fromkeys(m for p in self.pairs for m in p.label_like))

    @property
    def label_images(self) -> list[str]:
        """Its images that hold a handful of whole-number values (label maps or masks?), each once."""
        return list(dict.fromkeys(f for p in self.pairs for f in p.label_images))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        p = self.pairs[i]
        return {"source": p.source[0], "target": p.target[0], "source_soi": p.source_soi[0], "target_soi": p.target_soi[0]}


def check_segment_values(*datasets: "PairDataset | None") -> None:
    """Refuse Slicer segmentation maps whose segments are numbered differently (caudate 2 in one, 1 in another, as
    when segments were made in another order): maps are read by their label values, so one channel would hold
    different structures. Maps without segment names are not judged."""
    first: dict[str, tuple[int, str]] = {}
    for dataset in datasets:
        for pair in dataset.pairs if dataset is not None else ():
            for path, table in pair.segments:
                for name, value in table.items():
                    seen = first.setdefault(name, (value, path))
                    if seen[0] != value:
                        raise InputError(
                            f"segment '{name}' is label {seen[0]} in '{seen[1]}' but {value} in '{path}': the maps "
                            "are read by their label values, so one channel would hold different structures; "
                            "give every map the same value per segment (Slicer: export the segmentations to label "
                            "maps with one colour table)")


def split_rows(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/validation split of ``n`` rows: ``(train_rows, val_rows)``."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, int(round(n * val_fraction))), n - 1) if val_fraction > 0 else 0  # training keeps a pair
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())
