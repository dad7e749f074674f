"""Model export and loading: one TorchScript file with its metadata inside.

The file is a standard TorchScript archive (loads in any process with only
torch installed) with an extra file ``meta.json``:

    {"format": "istn-model", "format_version": 1, "engine_version": ..,
     "ndim": .., "transform": "affine"|"bspline", "variant": ..,
     "grid": {"size": [X, Y, (Z)], "spacing_mm": ..},
     "control_point_spacing_mm": .., "intensity": {"method": "percentile"|"foreground-percentile", "low": .., "high": ..},
     "soi": {"kind": .., "channels": .., "labels": [..], "description": ..},
     "model_config": {..}, "training": {"config": {..}, "data": .., "step": .., "best_val": ..},
     "created": ISO date}
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import __version__
from .config import ModelConfig, TrainConfig, to_dict, unvalidated_contrasts
from .errors import ModelFileError
from .io import atomic_write
from .networks import ISTN

FORMAT = "istn-model"
FORMAT_VERSION = 1
META_NAME = "meta.json"


def build_metadata(cfg: TrainConfig, *, soi_description: str = "", training_data: str = "", step: int = 0,
                   best_val: float | None = None, extra: dict | None = None) -> dict:
    """Metadata for an exported model, from its training config."""
    m = cfg.model
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "engine_version": __version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ndim": m.ndim,
        "transform": m.transform,
        "variant": m.variant,
        "grid": {"size": list(m.grid_size), "spacing_mm": m.grid_spacing},
        "control_point_spacing_mm": m.cp_spacing_mm if m.transform == "bspline" else None,
        "intensity": {"method": "foreground-percentile" if cfg.intensity_foreground else "percentile",
                      "low": cfg.intensity_low, "high": cfg.intensity_high},
        "soi": {
            "kind": cfg.soi_kind,
            "channels": m.soi_channels,
            "labels": list(cfg.soi_labels),
            "description": soi_description,
        },
        "model_config": to_dict(m),
        "training": {
            "data": training_data or Path(cfg.train_csv).name,
            "config": _shareable(to_dict(cfg)),
            "step": step,
            "best_val": best_val,
        },
    }
    if extra:
        meta.update(extra)
    return meta


#: TrainConfig fields that name files or folders of the machine it was trained on
_PATH_FIELDS = ("train_csv", "soi_csv", "val_csv", "val_soi_csv", "data_root", "out_dir")


def _shareable(config: dict) -> dict:
    """A training config as a model file carries it: paths by their last part only. A model is shared; where its
    data lay (a folder named after a patient, a user's home) is not (the run's checkpoints keep the full paths that
    continuing it needs)."""
    return {k: (Path(v).name if k in _PATH_FIELDS and v else v) for k, v in config.items()}


def export_model(model: ISTN, meta: dict, path: str | os.PathLike) -> Path:
    """Script ``model`` and write it with ``meta`` to ``path`` (atomically)."""
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError("export_model() 'meta' must come from build_metadata()")
    blob = json.dumps(meta, indent=2, default=str)
    with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; it is still the portable format
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(model.cpu().eval())
        return atomic_write(path, lambda tmp: torch.jit.save(scripted, tmp, _extra_files={META_NAME: blob}))


@dataclass
class LoadedModel:
    """A model read from an exported file: the scripted network and its metadata."""

    module: torch.jit.ScriptModule
    meta: dict[str, Any]
    path: Path
    _inference: dict = field(default_factory=dict, repr=False, compare=False)  # device -> frozen module
    #: held by `istn.registration.register` while it refines (it changes the weights in place and restores them)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    #: (input, map) of the last `representation` calls, kept only inside `remembering_maps`
    _maps: list = field(default_factory=list, repr=False, compare=False)
    _remembering: int = field(default=0, repr=False, compare=False)

    def __deepcopy__(self, memo: dict) -> "LoadedModel":
        raise TypeError("a loaded model is not copied (its scripted network does not survive a deep copy): load the "
                        "file again for an independent one (istn.export.load_model(path))")

    @property
    def config(self) -> ModelConfig:
        return ModelConfig(**self.meta["model_config"])

    @property
    def ndim(self) -> int:
        return int(self.meta["ndim"])

    @property
    def transform_type(self) -> str:
        return str(self.meta["transform"])

    @property
    def intensity(self) -> tuple[float, float]:
        return float(self.meta["intensity"]["low"]), float(self.meta["intensity"]["high"])

    @property
    def intensity_foreground(self) -> bool:
        """Whether the upper percentile is taken over the foreground (`istn.data.intensity_window`)."""
        return self.meta["intensity"].get("method", "percentile") == "foreground-percentile"

    def to(self, device: torch.device | str) -> "LoadedModel":
        self.module.to(device)
        return self

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """The ITN map ``(N, K, *S)`` of ``x`` ``(N, 1, *S)``, for inference (no gradient).

        On the CPU through a frozen copy of the network put through
        ``torch.jit.optimize_for_inference`` (weights folded into oneDNN
        convolutions): ~4x faster than ``module.representation`` for the 3D
        brain models, the same maps to ~1e-5 (benchmarks/results/cpu_fast_paths.md).
        Built on first use (~0.1 s) and kept; elsewhere ``module.representation``.
        """
        if self._remembering:
            for i, (seen, out) in enumerate(self._maps):
                if seen.shape == x.shape and seen.device == x.device and torch.equal(seen, x):
                    self._maps.insert(0, self._maps.pop(i))  # the last used first: the fixed map stays
                    return out.clone()
        with torch.no_grad():
            out = (self.module if x.device.type != "cpu" else self._fast_cpu()).representation(x)
        if self._remembering:
            self._maps[:] = [(x.clone(), out.clone())] + self._maps[: self.REMEMBERED - 1]
        return out

    #: the maps `remembering_maps` keeps: a fixed image's and one moving look between two of its uses
    REMEMBERED = 2

    @contextmanager
    def remembering_maps(self) -> Iterator["LoadedModel"]:
        """Within it, `representation` of an input equal to one of its last `REMEMBERED` inputs returns that map
        (a copy) instead of running the ITN again: a caller that registers one fixed image many times (the turn
        search: 24 one passes) computes the fixed map once. Exact (the same input gives the same map); the maps
        are let go on leaving. Nestable; one model shared by threads shares it too (equal inputs, equal maps)."""
        with self.lock:
            self._remembering += 1
        try:
            yield self
        finally:
            with self.lock:
                self._remembering -= 1
                if not self._remembering:
                    self._maps.clear()

    def stn_pooled(self, source_map: torch.Tensor, target_map: torch.Tensor) -> torch.Tensor:
        """The STN's convolutional features of a pair of maps (`ISTN.stn_pooled`), for inference (no gradient).

        The same frozen, oneDNN-optimised copy as `representation` on the CPU (files
        of istn >= 0.3, which have the method); elsewhere, or for older files, the module's own.
        """
        if source_map.device.type != "cpu" or not hasattr(self.module, "stn_pooled"):
            with torch.no_grad():
                return self.module.stn_pooled(source_map, target_map)
        with torch.no_grad():
            return self._fast_cpu().stn_pooled(source_map, target_map)

    def _fast_cpu(self) -> torch.jit.ScriptModule:
        """The frozen, inference-optimised copy of the network (built once)."""
        fast = self._inference.get("cpu")
        if fast is None:
            methods = ["representation"] + (["stn_pooled"] if hasattr(self.module, "stn_pooled") else [])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frozen = torch.jit.freeze(self.module.eval(), preserved_attrs=methods)
                fast = self._inference["cpu"] = torch.jit.optimize_for_inference(frozen, other_methods=methods)
        return fast

    def describe(self) -> str:
        """One paragraph for people: what this model is."""
        m = self.meta
        grid = "x".join(str(s) for s in m["grid"]["size"])
        text = (f"{m['variant'].upper()} {m['transform']} {m['ndim']}D model, internal grid {grid} at "
                f"{m['grid']['spacing_mm']} mm")
        if m.get("control_point_spacing_mm"):
            text += f", control points every {m['control_point_spacing_mm']} mm"
        soi = m.get("soi", {})
        if soi.get("description"):
            text += f"; SoI: {soi['description']}"
        others = unvalidated_contrasts(m)  # the brain recipe's models: its validation pairs are T1 (as the panel says)
        if others is not None:
            text += "; validated on T1 images" + (f" ({', '.join(others)}: not validated)" if others else "")
        validation = m.get("validation", {})
        if not validation.get("refinement_loss"):  # the loss self-check is off: say why where the maker wrote it
            why = validation.get("refinement_loss_missing") or ("the engine that made it did not store them, "
                                                                "or they were removed")
            text += (f"; no validation pairs' refinement losses stored ({why}), so a registration's loss is not "
                     "checked against them (a failed pair may pass without that warning)")
        return text + f" (engine {m.get('engine_version', '?')})."


def resolve_model_path(path: str | os.PathLike) -> Path:
    """``path`` itself where it exists; a bare file name that does not (``brain-t1-affine.pt``, with or without
    ``.pt``) names the user's file of that name with ``.pt``, else the bundled model of that name, from any
    folder. A path with a folder part is taken as it is."""
    p = Path(path)
    given = os.fspath(path)
    if p.exists() or os.sep in given or "/" in given:  # a path with a folder part ("./x.pt" too) is taken as it is
        return p
    if Path(given + ".pt").is_file():  # the user's own file first, ".pt" optional as for the bundled ones
        return Path(given + ".pt")
    from .demo import MODELS_DIR

    for name in (given, given + ".pt"):
        if (MODELS_DIR / name).is_file():
            return MODELS_DIR / name
    return p


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedModel:
    """Load an exported model, refusing foreign, corrupt or incompatible files with a clear message.

    ``path``: a model file, or a bundled model's file name (`resolve_model_path`)."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():  # not the file's fault: say so
        from .errors import InputError

        raise InputError(f"device '{device}' was asked for but no CUDA GPU is available (load on 'cpu'; register()'s "
                         "device moves it)")
    p = resolve_model_path(path)
    if not p.exists():
        from .demo import MODELS_DIR

        bundled = sorted(f.name for f in MODELS_DIR.glob("*.pt")) if p.parent == Path(".") else []
        raise ModelFileError(f"model file '{p}' does not exist" + (
            f" (the bundled models, usable by name: {', '.join(bundled)})" if bundled else ""))
    if p.is_dir():
        raise ModelFileError(f"model file '{p}' is a folder")
    extra = {META_NAME: ""}
    kind = _archive_kind(p)
    if kind == "not-zip":
        raise ModelFileError(f"'{p}' is not an ISTN model file (expected a TorchScript archive exported by `istn`; "
                             "this file is not a zip archive)")
    if kind == "checkpoint":
        raise ModelFileError(f"'{p}' is a PyTorch checkpoint (torch.save), not an ISTN model file; export it with "
                             "`istn train --export` (istn.export.export_model)")
    try:
        # An open file, not a str path: torch.jit.load(str) fails on non-ASCII paths on Windows.
        with open(p, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(f, map_location=device, _extra_files=extra)
    except OSError as exc:
        raise ModelFileError(f"model file '{p}' cannot be opened: {exc.strerror or exc}") from None
    except Exception as exc:  # torch raises RuntimeError/ValueError variants
        summary = _one_line(exc)
        if kind == "torchscript":  # be honest: the format is right, loading it failed
            raise ModelFileError(f"'{p}' is a TorchScript archive but torch {torch.__version__} could not load it: "
                                 f"{summary}", detail=str(exc)) from None
        raise ModelFileError(f"'{p}' is not an ISTN model file (expected a TorchScript archive exported by `istn`; "
                             f"this zip archive is corrupt or of another kind)", detail=str(exc)) from None
    if not extra[META_NAME]:
        raise ModelFileError(f"'{p}' is a TorchScript file without ISTN metadata ({META_NAME}); it was not exported by `istn`")
    try:
        meta = json.loads(extra[META_NAME])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelFileError(f"'{p}' has unreadable ISTN metadata ({META_NAME} is not valid JSON)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"'{p}' metadata is not of format '{FORMAT}'")
    version = meta.get("format_version")
    if version is None:
        raise ModelFileError(f"'{p}' metadata has no format_version; it cannot be interpreted safely")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"'{p}' has metadata format_version {version}, but this engine ({__version__}) reads version "
            f"{FORMAT_VERSION}; use a matching ISTN version or re-export the model"
        )
    for key in ("ndim", "transform", "variant", "grid", "intensity", "model_config"):
        if key not in meta:
            raise ModelFileError(f"'{p}' metadata lacks the required field '{key}'")
    return LoadedModel(module.eval(), meta, p)


def rewrite_metadata(path: str | os.PathLike, meta: dict) -> Path:
    """Replace the metadata of an exported model file (weights untouched), atomically. The training config's paths
    are kept by name only, as `export_model` writes them (metadata of an older engine is mended on the way)."""
    model = load_model(path)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError("rewrite_metadata() 'meta' must keep the format and format_version of build_metadata()")
    training = meta.get("training")
    if isinstance(training, dict) and isinstance(training.get("config"), dict):
        meta = {**meta, "training": {**training, "config": _shareable(training["config"])}}
    blob = json.dumps(meta, indent=2, default=str)
    return atomic_write(path, lambda tmp: torch.jit.save(model.module, tmp, _extra_files={META_NAME: blob}))


def rescript_model(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Script the weights of an exported model again with this engine's network code, metadata kept.

    For files of an older engine whose TorchScript lacks a method this one
    uses (e.g. ``predict_from_pooled``, istn 0.3): the weights and the
    metadata are the same, so every existing result is reproduced; the
    metadata records ``rescripted_by``. Refuses to overwrite ``path`` itself.
    """
    src, dst = Path(path), Path(out)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError("rescript_model() writes a new file: 'out' must differ from 'path'")
    model = load_model(src)
    net = ISTN(model.config)
    net.load_state_dict(model.module.state_dict())
    meta = dict(model.meta, rescripted_by=__version__)
    return export_model(net.eval(), meta, dst)


def _archive_kind(path: Path) -> str:
    """"torchscript", "checkpoint" (a torch.save zip), "zip" (another or a corrupt zip) or "not-zip"."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        with open(path, "rb") as f:
            return "zip" if f.read(4) == b"PK\x03\x04" else "not-zip"
    # torch archives hold one top folder: TorchScript adds code/ and constants.pkl to torch.save's data.pkl
    parts = {n.split("/", 1)[1] for n in names if "/" in n}
    if any(n.startswith("code/") for n in parts) and "constants.pkl" in parts:
        return "torchscript"
    if "data.pkl" in parts:
        return "checkpoint"
    return "zip"


def _one_line(exc: BaseException) -> str:
    """The first line of a library message, whole (never cut mid-word)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__
