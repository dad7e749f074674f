"""`istn train`: a variant from CSV pair lists or a config file, exported with its metadata."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import InputError, OutputError

#: What a run folder holds (`istn.training.train` and the export)
RUN_FILES = ("last.pt", "best.pt", "model.pt")
#: `istn train` options a --config file sets (the command line may override only --out and --steps)
CONFIG_OPTIONS = ("train_csv", "soi_csv", "val_csv", "val_soi_csv", "soi_kind", "soi_labels", "variant", "transform",
                  "ndim", "grid_size", "spacing", "cp_spacing", "itn_output", "batch_size", "lr", "lr_decay_from",
                  "lr_final", "val_every", "seed", "device", "threads")
#: The defaults of those options that have one (the parser leaves them None: given or not, --config can tell)
TRAIN_DEFAULTS = {"soi_kind": "soft", "variant": "istn-i", "transform": "affine", "ndim": 2, "spacing": 1.0,
                  "cp_spacing": 10.0, "itn_output": "linear", "batch_size": 10, "lr": 1e-3, "lr_decay_from": -1,
                  "lr_final": 0.01, "val_every": 100, "seed": 42, "device": "auto", "threads": 1}
#: Training settings a resumed run must share with the run it continues (what it learns from, and how):
#: the rest (steps, the schedule's end, device, threads, validation cadence, out) may change between commands
RESUME_MUST_MATCH = ("train_csv", "soi_csv", "data_root", "soi_kind", "soi_labels", "val_csv", "val_soi_csv",
                     "val_fraction", "split_seed", "batch_size", "lr", "seed", "soi_loss", "image_weight",
                     "intensity_low", "intensity_high", "intensity_foreground")


def run_train(args: argparse.Namespace) -> Path:
    from .. import distributed
    from ..export import build_metadata, export_model
    from .apply import make_out_folder
    from ..registration import check_device
    from ..training import build_datasets, check_trainable, train

    cfg = _config(args)
    check_device(cfg.device)
    try:  # a network that cannot train: said before any image is read
        check_trainable(cfg.model)
    except ValueError as exc:
        raise InputError(str(exc).replace("'grid_size'", "--grid-size").replace("'cp_spacing_mm'", "--cp-spacing")) \
            from None
    out = Path(cfg.out_dir)
    export_path = Path(args.export) if args.export else out / "model.pt"
    inputs = [p for p in (cfg.train_csv, cfg.soi_csv, cfg.val_csv, cfg.val_soi_csv, args.config, args.init_from) if p]
    if args.init_from:
        _check_checkpoint(args.init_from)
    if args.export:  # the default, OUT/model.pt, is the run's own (its folder checked with the run's)
        _check_export(args.export, out, inputs + [out / "last.pt", out / "best.pt"] + _listed(cfg), args.overwrite)
    # Under torchrun every process runs this; train() shards the batches and only rank 0 writes and exports: the
    # run folder (which only rank 0 needs) is checked and made by rank 0 alone
    main_process = distributed.env_rank() == 0
    created = _first_missing(out) if main_process else None  # the folders this run makes: removed if it is refused
    try:
        resumed = _check_run_folder(out, cfg, resume=not args.no_resume) if main_process else None
        try:
            # every image read and checked before the first step; a large cohort takes a while: say so
            reading = _ReadingProgress(quiet=args.quiet or not main_process)
            train_set, val_set = build_datasets(cfg, progress=reading)
            reading.done(train_set, val_set, cfg)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        _check_structures(train_set, val_set, cfg.soi_labels if cfg.soi_kind == "labels" else ())
        if main_process:
            _say_overlap(train_set, val_set)
            _say_label_images(train_set, val_set)
        if cfg.soi_kind == "soft" and not _soi_kind_stated(args):  # the default kind on maps that hold labels
            _refuse_labels_as_default_soft(train_set, val_set)
        if resumed is not None and resumed >= cfg.steps:
            print(f"istn train: note: the run in {out} is at step {resumed} already (--steps {cfg.steps}): nothing "
                  "to train; exporting its best checkpoint (a larger --steps continues it)", file=sys.stderr)
        try:
            result = train(cfg, train_set, val_set, resume=not args.no_resume, progress=not args.quiet,
                           init_from=args.init_from)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    except BaseException:
        _remove_empty(out, created)  # refused or stopped before a checkpoint: no empty folders left behind
        raise
    if result.rank != 0:
        return export_path
    validated = [h for h in result.history if "soi_mse" in h]
    # the exported weights are best.pt's: their step (without validation the "best" is the last step)
    best_step = min(validated, key=lambda h: h["soi_mse"])["step"] if validated else result.step
    meta = build_metadata(cfg, soi_description=args.soi_description or f"{cfg.soi_kind} from {Path(cfg.soi_csv).name}",
                          step=best_step, best_val=result.best_val if validated else None)
    make_out_folder(export_path)
    export_model(result.model, meta, export_path)
    _store_validation_losses(export_path, val_set, args.loss_check_pairs, cfg, quiet=args.quiet)
    if validated:
        print(f"best validation soi_mse {result.best_val:.6f} (step {best_step} of {result.step}); model written to "
              f"{export_path}")
    else:
        print(f"no validation pairs: the model is the last step's (step {result.step}); written to {export_path}")
    return export_path


def _store_validation_losses(model_path: Path, val_set, n_pairs: int, cfg, quiet: bool) -> None:
    """Register the first ``n_pairs`` validation pairs with the exported model, as `istn register` does, and store
    their loss range in its metadata (``validation.refinement_loss``): the loss self-check's reference. Without
    validation pairs, or with ``n_pairs`` 0, the model stays without it (its description says the check is off)."""
    from ..errors import ISTNError, ResultError
    from ..export import load_model, rewrite_metadata
    from ..io import read_image
    from ..registration import validation_losses

    pairs = [] if val_set is None else [p.paths for p in val_set.pairs if p.paths is not None][:n_pairs]
    if not pairs:
        _say_why_no_losses(model_path, "it was trained with --loss-check-pairs 0" if n_pairs == 0
                           else "it was trained without validation pairs")
        return
    if not quiet:
        print(f"registering {len(pairs)} validation pair(s) with the model for its loss self-check ...", flush=True)
    model = load_model(model_path, "cpu")
    t0 = time.perf_counter()

    def said(done: int, total: int) -> None:
        if not quiet:
            print(f"  validation pair {done}/{total} registered ({time.perf_counter() - t0:.0f} s)", flush=True)

    try:
        images = [(read_image(m, "validation moving"), read_image(f, "validation fixed")) for m, f in pairs]
        losses = validation_losses(model, images, progress=said, device=cfg.device, threads=cfg.threads)
    except (ISTNError, ResultError, ValueError, RuntimeError) as exc:  # the model is written and sound: say what is missing
        print(f"istn train: note: registering the validation pairs failed ({exc}): no loss self-check stored in the "
              "model", file=sys.stderr)
        _say_why_no_losses(model_path, f"registering its validation pairs after training failed ({exc})")
        return
    if not losses:
        print("istn train: note: the validation pairs' losses are not all positive and finite: no loss self-check "
              "stored in the model", file=sys.stderr)
        _say_why_no_losses(model_path, "its validation pairs' losses were not all positive and finite")
        return
    meta = dict(model.meta)
    validation = {k: v for k, v in meta.get("validation", {}).items() if k != "refinement_loss_missing"}
    meta["validation"] = {**validation, "refinement_loss": losses, "refinement_loss_pairs": len(pairs),
                          "refinement_loss_by": "istn train"}
    rewrite_metadata(model_path, meta)


def _say_why_no_losses(model_path: Path, reason: str) -> None:
    """Write into the model why it has no validation losses (``validation.refinement_loss_missing``), so that its
    description gives the reason, not a guess."""
    from ..export import load_model, rewrite_metadata

    meta = dict(load_model(model_path, "cpu").meta)
    meta["validation"] = {**meta.get("validation", {}), "refinement_loss_missing": reason}
    rewrite_metadata(model_path, meta)


class _ReadingProgress:
    """Lines while the pairs are read (at most one every ``every`` seconds), then one saying what was read."""

    def __init__(self, quiet: bool, every: float = 5.0) -> None:
        self.quiet, self.every = quiet, every
        self.start = self.last = time.monotonic()

    def __call__(self, which: str, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.quiet and now - self.last >= self.every and done < total:
            print(f"reading the {which} pairs: {done}/{total} ({now - self.start:.0f} s)", flush=True)
            self.last = now

    def done(self, train_set, val_set, cfg) -> None:
        if self.quiet:
            return
        grid = "x".join(map(str, cfg.model.grid_size))
        val = f" and {len(val_set)} validation" if val_set is not None else ""
        print(f"read {len(train_set)} training{val} pair(s) onto the {grid} network grid at "
              f"{cfg.model.grid_spacing:g} mm in {time.monotonic() - self.start:.1f} s", flush=True)


def _soi_kind_stated(args: argparse.Namespace) -> bool:
    """Whether the user chose the structure maps' kind (``--soi-kind``, or "soi_kind" in the ``--config`` file)."""
    if not args.config:
        return args.soi_kind is not None
    return "soi_kind" in json.loads(Path(args.config).read_text())  # read once already by `_config`


def _refuse_labels_as_default_soft(train_set, val_set) -> None:
    """Refuse the default soft kind for label maps (`istn.data.pairs.labels_in_soft_map`, every pair's): as one soft
    channel scaled by its maximum, label 8 would be 1.0 and label 1 0.125, a ramp, not structures. A kind the
    user chose is taken as meant (a probability atlas of a few raters has a few whole-number levels too)."""
    found = train_set.label_like + (val_set.label_like if val_set is not None else [])
    if found:
        path, values = found[0]
        more = f" (and {len(found) - 1} more map(s))" if len(found) > 1 else ""
        raise InputError(f"structure map '{path}' holds labels ({values}){more}, but --soi-kind is soft by default "
                         "(one channel, scaled by its maximum: not one structure each): train with --soi-kind "
                         "labels --soi-labels VALUE ... (one channel per structure), or say --soi-kind soft to "
                         "train the values as one soft map")


def _absolute(path: str | None) -> str:
    """A data file as the run records it: where it is (a resume from another folder compares the same files)."""
    return str(Path(path).absolute()) if path else ""


def _config_paths(cfg, config: Path) -> None:
    """Make ``cfg``'s relative data paths (the CSVs, ``data_root``) relative to the config file's folder, as a
    CSV's paths are to the CSV's: the run then does not depend on where it is started. ``out_dir`` stays relative
    to the working folder, as --out is."""
    base = config.absolute().parent
    for key in ("train_csv", "soi_csv", "val_csv", "val_soi_csv", "data_root"):
        value = getattr(cfg, key)
        if not value or Path(value).is_absolute():
            continue
        there = base / value
        if not there.exists() and Path(value).exists():  # a config written for the working folder: say which
            raise InputError(f"config '{config}': {key} '{value}' is read from the config's folder ('{there}' "
                             f"does not exist); it exists from the working folder: write it as "
                             f"'{Path(value).absolute()}'")
        setattr(cfg, key, str(there))


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (None: it exists)."""
    missing = None
    for f in [folder.absolute(), *folder.absolute().parents]:
        if f.exists():
            break
        missing = f
    return missing


def _remove_empty(folder: Path, created: Path | None) -> None:
    """Remove ``folder`` and its parents up to ``created`` (made by this run) while they are empty."""
    if created is None:
        return
    f = folder.absolute()
    while f.is_dir() and not any(f.iterdir()):
        f.rmdir()
        if f == created:
            break
        f = f.parent


def _check_structures(train_set, val_set, labels=()) -> None:
    """Say what the structure maps lack (each problem once, with the maps that have it; `soi_notes`), and refuse
    training pairs with no structure at all on their network grids (nothing to learn from), or a label of
    ``labels`` (``--soi-labels``) that no training pair holds there."""
    maps: dict[str, list[str]] = {}
    for problem, path in train_set.notes + (val_set.notes if val_set is not None else []):
        if path not in maps.setdefault(problem, []):  # a map in several pairs counts once
            maps[problem].append(path)
    for problem, paths in maps.items():
        which = f"'{paths[0]}'" + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
        print(f"istn train: warning: {len(paths)} structure map(s) {problem}: {which}", file=sys.stderr)
    def empty(dataset) -> bool:
        return not any(float(dataset[i][k].max()) > 0 for i in range(len(dataset)) for k in ("source_soi", "target_soi"))

    if empty(train_set):
        raise InputError("no training pair has any structure on the network grid (every structure map is empty "
                         "there: see the warnings): nothing to learn from")
    if val_set is not None and len(val_set) and empty(val_set):  # every score 0: the first checkpoint "best"
        raise InputError("no validation pair has any structure on the network grid (every structure map is empty "
                         "there: see the warnings): the best model would be chosen on nothing; check the "
                         "validation maps' labels (--soi-labels)")
    if labels:  # a channel no training pair fills: the model would claim a structure it never saw
        seen = sum((train_set[i][k].flatten(1).amax(1) > 0 for i in range(len(train_set))
                    for k in ("source_soi", "target_soi")))
        never = [v for v, n in zip(labels, seen.tolist()) if n == 0]
        if never:
            raise InputError(f"--soi-labels {', '.join(map(str, never))}: no training pair has "
                             f"{'this label' if len(never) == 1 else 'these labels'} on its network grid (see the "
                             "warnings): drop it from --soi-labels, or check the label values of the maps")


def _say_overlap(train_set, val_set) -> None:
    """Warn of pairs listed twice and of validation pairs that share an image with a training pair: the
    validation score, and the model chosen by it, are then optimistic (rows split at random put a copy, or the
    same subject, on both sides)."""
    def files(pair) -> tuple[Path, ...]:
        return tuple(Path(f).resolve() for f in pair.paths) if pair.paths else ()

    rows = [files(p) for p in train_set.pairs + (val_set.pairs if val_set is not None else [])]
    repeated = len(rows) - len(set(rows))
    if repeated:
        print(f"istn train: warning: {repeated} pair(s) listed more than once (the same moving and fixed image): they "
              "weigh more in training, and a copy among the validation pairs scores a pair the model was trained on",
              file=sys.stderr)
    if val_set is None:
        return
    seen = {f for p in train_set.pairs for f in files(p)}
    shared = [p for p in val_set.pairs if seen.intersection(files(p))]
    if shared:
        print(f"istn train: warning: {len(shared)} of {len(val_set)} validation pair(s) share an image with training "
              f"pairs (e.g. '{shared[0].paths[0]}'): the validation score, and the model chosen by it, are "
              "optimistic; validate on pairs of other subjects (--val-csv)", file=sys.stderr)


def _say_label_images(train_set, val_set) -> None:
    """Warn of images (the pairs CSVs' files) that hold a handful of whole-number values: label maps or masks where
    images were meant, as when --train-csv and --soi-csv are swapped; the network would learn structures from
    labels it never gets at test time."""
    found = list(dict.fromkeys(train_set.label_images + (val_set.label_images if val_set is not None else [])))
    if found:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        print(f"istn train: warning: {len(found)} image(s) hold only a handful of whole-number values, as label maps "
              f"and masks do ('{found[0]}'{more}): --train-csv lists the images (intensities), --soi-csv their "
              "structure maps; are the two swapped?", file=sys.stderr)


def _config(args: argparse.Namespace):
    """The run's TrainConfig from ``--config`` (only --out and --steps may override it) or the options."""
    from ..config import ModelConfig, TrainConfig, train_config_from_dict

    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps must be at least 1, got {args.steps}")
    if getattr(args, "loss_check_pairs", 0) < 0:
        raise InputError(f"--loss-check-pairs must be 0 (none) or more, got {args.loss_check_pairs}")
    if args.config:
        given = [f"--{k.replace('_', '-')}" for k in CONFIG_OPTIONS if getattr(args, k, None) is not None]
        if given:
            raise InputError(f"{', '.join(given)} cannot be combined with --config: set them in the config file "
                             "(of its settings only --out and --steps may be given; --no-resume, --export and "
                             "the other options about the run are taken as usual)")
        try:
            cfg = train_config_from_dict(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError, ValueError, TypeError) as exc:
            raise InputError(f"config '{args.config}' is not a valid training config: {exc}") from None
        _config_paths(cfg, Path(args.config))
        if args.out:
            cfg.out_dir = args.out
        if args.steps is not None:
            cfg.steps = args.steps
        return cfg
    if not args.train_csv or not args.soi_csv:
        raise InputError("istn train needs --config, or --train-csv and --soi-csv (every variant, STN-u too, is "
                         "validated, and its best step chosen, on how well it aligns the structure maps)")
    args = argparse.Namespace(**{**vars(args), **{k: v for k, v in TRAIN_DEFAULTS.items()
                                                    if getattr(args, k, None) is None}})
    if args.val_csv and not args.val_soi_csv:
        raise InputError("--val-csv needs --val-soi-csv: the validation pairs' structure maps (without both, a "
                         "share of --train-csv's pairs validates)")
    if args.soi_labels and args.soi_kind != "labels":
        raise InputError(f"--soi-labels picks values of label maps (--soi-kind labels); a {args.soi_kind} map is one "
                         "channel")
    grid = tuple(args.grid_size) if args.grid_size else (128,) * args.ndim
    try:
        model = ModelConfig(ndim=args.ndim, grid_size=grid, grid_spacing=args.spacing, transform=args.transform,
                            variant=args.variant, soi_channels=len(args.soi_labels) if args.soi_labels else 1,
                            cp_spacing_mm=args.cp_spacing, itn_output=args.itn_output)
        return TrainConfig(model=model, train_csv=_absolute(args.train_csv), soi_csv=_absolute(args.soi_csv),
                           soi_kind=args.soi_kind, soi_labels=tuple(args.soi_labels or ()),
                           val_csv=_absolute(args.val_csv), val_soi_csv=_absolute(args.val_soi_csv),
                           steps=1000 if args.steps is None else args.steps,
                           batch_size=args.batch_size, lr=args.lr, lr_decay_start=args.lr_decay_from,
                           lr_final=args.lr_final, val_every=args.val_every, seed=args.seed, device=args.device,
                           threads=args.threads, out_dir=args.out or "runs/istn")
    except ValueError as exc:
        raise InputError(str(exc).replace("ModelConfig() ", "").replace("TrainConfig() ", "")) from None


def _check_run_folder(out: Path, cfg, resume: bool) -> int | None:
    """Before any work: ``out`` can be written, holds no files of the user's named like a run's, and a run it
    holds (its ``last.pt``) is one this command may continue (the same data and training settings; the network
    is checked by `train`). Returns the step of the run resumed (None: a new run)."""
    from ..io import probe_writable
    from ..training import data_digest, load_checkpoint

    if out.exists() and not out.is_dir():
        raise OutputError(f"--out '{out}' is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_writable(out)
    except OSError as exc:
        raise OutputError(f"--out '{out}' cannot be written ({exc.strerror})") from None
    present = [n for n in RUN_FILES if (out / n).exists()]
    if not present:
        return None
    last = _checkpoint_or_none(out / "last.pt", load_checkpoint)
    if last is None:
        raise OutputError(f"--out '{out}' holds {', '.join(present)}, not an istn training run's (no readable "
                          "last.pt of one there): they would be replaced; choose a new or empty folder")
    if not resume:
        return None  # --no-resume: the user asked for this run to start afresh over its own files
    from ..config import to_dict

    before, now = last["config"], to_dict(cfg)
    changed = [k for k in RESUME_MUST_MATCH if _setting(k, before.get(k)) != _setting(k, now.get(k))]
    if before.get("model", {}).get("variant") != cfg.model.variant:
        changed.insert(0, "variant")
    if not changed and last.get("data") and last["data"] != data_digest(cfg):  # the same CSVs, rewritten
        raise InputError(f"--out '{out}' holds a run (step {last['step']}) trained on other pairs: its CSV files list "
                         "other images or structure maps now; resuming would mix two datasets (and choose the best "
                         "model across two validation sets): train into another --out, or --no-resume to start "
                         "it again")
    if changed:
        what = "; ".join(f"{k}: {before.get(k, before.get('model', {}).get(k))!r} -> "
                         f"{now.get(k, now['model'].get(k))!r}" for k in changed)
        raise InputError(f"--out '{out}' holds a run (step {last['step']}) trained with other settings ({what}): "
                         "resuming would mix them; give the run's own settings, train into another --out, or "
                         "--no-resume to start it again")
    return int(last["step"])


def _setting(key: str, value):
    """A setting as compared on resume: data files by where they are (a relative and an absolute path to the same
    file are the same; runs record absolute paths, an older run's relative one is taken from the current folder),
    sequences as tuples."""
    if key in ("train_csv", "soi_csv", "val_csv", "val_soi_csv", "data_root") and value:
        return str(Path(value).resolve())
    return tuple(value) if isinstance(value, list) else value


def _checkpoint_or_none(path: Path, load) -> dict | None:
    import warnings

    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():  # torch's advice on a TorchScript archive: not for this user
            warnings.simplefilter("ignore")
            ck = load(path)
    except Exception:
        return None
    return ck if isinstance(ck, dict) and ck.get("format") == "istn-checkpoint" else None


def _listed(cfg) -> list[Path]:
    """Every file the run's CSVs list (images and structure maps)."""
    from ..data import read_pairs_csv

    return [p for csv_path in (cfg.train_csv, cfg.soi_csv, cfg.val_csv, cfg.val_soi_csv) if csv_path
            for pair in read_pairs_csv(csv_path, cfg.data_root or None) for p in pair]


def _check_export(export: str, out: Path, inputs: list, overwrite: bool) -> None:
    """``--export`` before any work: never an input, an existing file only the run's own model.pt or with
    ``--overwrite`` (never a training run's checkpoint), a ``.pt`` file in a folder that can be written."""
    from ..training import load_checkpoint
    from .apply import check_out_file

    export_path = Path(export)
    for name in ("last.pt", "best.pt"):  # the run's checkpoints, made (or continued) by this very command
        if export_path.absolute().resolve() == (out / name).absolute().resolve() or (  # best.PT: the same file
                export_path.name.lower() == name and export_path.absolute().parent.resolve() == out.absolute().resolve()):
            raise OutputError(f"--export '{export_path}' is the run's own checkpoint {name} (in --out '{out}'): "
                              "export the model under another name (without --export: "
                              f"{out / 'model.pt'})")
    if export_path.exists() and export_path.resolve() == (out / "model.pt").resolve() and \
            not any(export_path.resolve() == Path(p).resolve() for p in inputs):
        overwrite = True  # the run's own export, made again
    try:
        check_out_file(export, inputs, overwrite, "model.pt")
    except OutputError as exc:
        raise OutputError(str(exc).replace("--out", "--export", 1)) from None
    if export_path.suffix.lower() not in (".pt", ".pth"):  # x.nii.gz would hold a model under an image's name
        raise InputError(f"--export '{export}': a model file is named .pt (e.g. "
                         f"{export_path.name.split('.')[0] or 'model'}.pt)")
    if _checkpoint_or_none(export_path, load_checkpoint) is not None:  # another run's last.pt or best.pt
        raise OutputError(f"--export '{export}' is a training run's checkpoint: replacing it with a model would end "
                          "that run (it could not be continued); export under another name")


def _check_checkpoint(path: str) -> None:
    from ..training import load_checkpoint

    if not Path(path).is_file():
        raise InputError(f"--init-from '{path}' is not a checkpoint file (it does not exist): a run's best.pt or "
                         "last.pt")
    if _checkpoint_or_none(Path(path), load_checkpoint) is None:
        raise InputError(f"--init-from '{path}' is not a checkpoint file (a run's best.pt or last.pt; an exported "
                         "model.pt holds no training state)")
