"""The models the module offers: those bundled in ``Resources/Models`` and custom ``.pt`` files.

An exported ISTN model is a TorchScript archive, i.e. a zip file whose
``extra/meta.json`` says what the model is. It is read here with ``zipfile``
so the panel can list and describe models before torch is even installed.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .i18n import _

#: The module folder (holds ``Resources/`` and the engine package ``istn``).
MODULE_DIR = Path(__file__).resolve().parents[1]
#: Bundled models: ``*.pt`` files, each optionally with a ``.md`` model card of the same stem.
MODELS_DIR = MODULE_DIR / "Resources" / "Models"


class ModelInfoError(ValueError):
    """A file that is not a readable ISTN model."""


@dataclass
class ModelInfo:
    """What the panel shows about a model file (read without torch)."""

    path: Path
    meta: dict = field(repr=False)
    card: str = field(default="", repr=False)  # the model card (.md next to the file), if any

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def transformType(self) -> str:
        return str(self.meta.get("transform", "?"))

    @property
    def ndim(self) -> int:
        return int(self.meta.get("ndim", 0))

    @property
    def label(self) -> str:
        """Short text for a combo box: ``B-spline: brain_bspline``."""
        kind = {"affine": "Affine", "bspline": "B-spline"}.get(self.transformType, self.transformType)
        return _("{kind}: {name}").format(kind=kind, name=self.name)

    def describe(self) -> str:
        """One paragraph for people (the same facts as ``istn.export.LoadedModel.describe``)."""
        m = self.meta
        grid = m.get("grid", {})
        size = "x".join(str(s) for s in grid.get("size", [])) or "?"
        text = _("{variant} {kind} {ndim}D model, internal grid {size} at {spacing} mm").format(
            variant=str(m.get("variant", "?")).upper(), kind=self.transformType, ndim=self.ndim, size=size,
            spacing=grid.get("spacing_mm", "?"))
        if m.get("control_point_spacing_mm"):
            text += _(", control points every {spacing} mm").format(spacing=m["control_point_spacing_mm"])
        soi = m.get("soi") or {}
        if soi.get("description"):
            # the first clause only: a panel label, not the model card (training data lives there)
            text += _("; structures of interest: {soi}").format(soi=soi["description"].split(";")[0].strip())
        return text + self.contrasts() + _(" (engine {version}, file {name}).").format(
            version=m.get("engine_version", "?"), name=self.path.name)

    def contrasts(self) -> str:
        """Which image contrasts the model was trained and validated on, for the panel ('' when unknown).

        The brain recipe (``benchmarks/train_brain.py``) records its data options; its validation pairs are T1
        whatever the training views were, so other contrasts are never 'validated' by it.
        """
        from istn.config import unvalidated_contrasts  # torch-free: the panel reads models without torch

        others = unvalidated_contrasts(self.meta)
        if others is None:
            return ""
        text = _("; validated on T1 images")
        if others:
            text += _(" ({others}: not validated, see the model card)").format(others=", ".join(others))
        return text


def readModelInfo(path: str | os.PathLike) -> ModelInfo:
    """Read the metadata of an exported model without loading it (no torch needed)."""
    p = Path(path)
    if p.is_dir():
        raise ModelInfoError(_("'{path}' is a folder; choose a model file (.pt) in it").format(path=p))
    if not p.is_file():
        raise ModelInfoError(_("model file '{path}' does not exist").format(path=p))
    try:
        with zipfile.ZipFile(p) as archive:
            names = [n for n in archive.namelist() if n.endswith("extra/meta.json")]
            if not names:
                raise ModelInfoError(_("'{path}' is not an ISTN model (a TorchScript file without ISTN "
                                       "metadata)").format(path=p))
            meta = json.loads(archive.read(names[0]).decode("utf-8"))
    except (zipfile.BadZipFile, OSError):
        raise ModelInfoError(_("'{path}' is not an ISTN model file (not a TorchScript archive)").format(path=p)) \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelInfoError(_("'{path}' has unreadable ISTN metadata").format(path=p)) from None
    if not isinstance(meta, dict) or meta.get("format") != "istn-model":
        raise ModelInfoError(_("'{path}' is not an ISTN model (its metadata is of another format)").format(path=p))
    card_path = p.with_suffix(".md")
    card = card_path.read_text(encoding="utf-8", errors="replace") if card_path.is_file() else ""
    return ModelInfo(p, meta, card)


def bundledModels(directory: str | os.PathLike | None = None, ndim: int | None = 3) -> list[ModelInfo]:
    """The models shipped with the module (``*.pt`` in ``Resources/Models``), sorted affine first.

    Unreadable files are skipped (they would only confuse the model list);
    ``ndim`` keeps models of that dimension (Slicer volumes are 3D).
    """
    folder = Path(directory) if directory is not None else MODELS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.pt")):
        try:
            info = readModelInfo(path)
        except ModelInfoError:
            continue
        if ndim is None or info.ndim == ndim:
            found.append(info)
    from istn.config import DEFAULT_MODEL_STEMS  # torch-free

    order = {"affine": 0, "bspline": 1}
    defaults = set(DEFAULT_MODEL_STEMS.values())
    # affine first; within a type the default family (what `istn demo` runs) first, then by name
    return sorted(found, key=lambda m: (order.get(m.transformType, 2), m.name not in defaults, m.name))


def defaultModel(transformType: str, directory: str | os.PathLike | None = None) -> ModelInfo | None:
    """The bundled 3D model of ``transformType`` (``affine`` or ``bspline``) used when none is chosen: the
    default family's (``brain-t1-<type>``) when it is there, else the first by name; None without one."""
    for info in bundledModels(directory):
        if info.transformType == transformType:
            return info
    return None


def companionAffine(model: ModelInfo) -> ModelInfo | None:
    """The affine model of ``model``'s family next to it (``X-bspline.pt`` -> ``X-affine.pt``, a readable 3D
    affine model), the B-spline's pre-alignment; None when there is none."""
    from istn.config import companion_stem

    stem = companion_stem(model.name, "affine")
    path = model.path.with_name(f"{stem}.pt") if stem else None
    if path is None or path == model.path or not path.is_file():
        return None
    try:
        info = readModelInfo(path)
    except ModelInfoError:
        return None
    return info if info.transformType == "affine" and info.ndim == model.ndim else None
