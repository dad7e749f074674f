"""Training of the four variants (STN-u, STN-s, ISTN-e, ISTN-i), with validation, checkpoints and resume."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import distributed
from .config import ModelConfig, TrainConfig, to_dict, train_config_from_dict
from .data import PairDataset, check_segment_values, split_rows
from .errors import InputError, ResultError
from .io import atomic_write
from .losses import variant_loss
from .networks import ISTN
from .transforms import warp


def check_device(device: str) -> None:
    """`InputError` unless ``device`` is auto, cpu, cuda or cuda:N and that device exists here."""
    device = str(device)  # a torch.device too
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device '{device}' is not one of auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device '{device}' was asked for but no CUDA GPU is available (use auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise InputError(f"device '{device}' is not one of auto, cpu, cuda, cuda:N")


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is checked by `check_device` first."""
    check_device(device)
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class TrainResult:
    model: ISTN  # the best-on-validation weights
    best_checkpoint: Path
    last_checkpoint: Path
    best_val: float
    step: int
    history: list[dict]
    rank: int = 0  # this process's rank in data-parallel training (0 otherwise)
    world_size: int = 1  # the number of data-parallel processes (1 otherwise)


def build_datasets(cfg: TrainConfig, progress: Callable[[str, int, int], None] | None = None
                   ) -> tuple[PairDataset, PairDataset | None]:
    """Train/validation datasets from the CSVs of ``cfg`` (split of ``train_csv`` unless ``val_csv`` is given).

    ``progress(which, done, total)`` after each pair read, ``which`` "training" or "validation".
    """
    kw = dict(soi_kind=cfg.soi_kind, soi_labels=cfg.soi_labels, root=cfg.data_root or None,
              intensity=(cfg.intensity_low, cfg.intensity_high), foreground=cfg.intensity_foreground)

    def reporter(which: str):
        return None if progress is None else (lambda done, total: progress(which, done, total))

    if cfg.val_csv:
        train = PairDataset.from_csv(cfg.train_csv, cfg.soi_csv, cfg.model, progress=reporter("training"), **kw)
        val = PairDataset.from_csv(cfg.val_csv, cfg.val_soi_csv, cfg.model, progress=reporter("validation"), **kw)
        check_segment_values(train, val)
        return train, val
    from .data import read_pairs_csv

    n = len(read_pairs_csv(cfg.train_csv, cfg.data_root or None))
    train_rows, val_rows = split_rows(n, cfg.val_fraction, cfg.split_seed)
    train = PairDataset.from_csv(cfg.train_csv, cfg.soi_csv, cfg.model, rows=train_rows,
                                 progress=reporter("training"), **kw)
    val = PairDataset.from_csv(cfg.train_csv, cfg.soi_csv, cfg.model, rows=val_rows,
                               progress=reporter("validation"), **kw) if val_rows else None
    check_segment_values(train, val)
    return train, val


def _batch(dataset: torch.utils.data.Dataset, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    items = [dataset[i] for i in indices]
    return {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Deterministic permutation per epoch: resuming at any step replays the same batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of training step ``step`` (0-based): consecutive slices of per-epoch permutations."""
    per_epoch = max(1, n // batch_size)  # drop the last incomplete batch
    epoch, k = divmod(step, per_epoch)
    order = _epoch_order(n, seed, epoch)
    return order[k * batch_size : (k + 1) * batch_size] if n >= batch_size else order


@torch.no_grad()
def validate(model: ISTN, dataset: torch.utils.data.Dataset, device: torch.device, batch_size: int = 10) -> dict[str, float]:
    """Validation metrics: ``soi_mse`` = MSE(T(S_s), S_t), comparable across variants (lower is better)."""
    model.eval()
    total, n = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        b = _batch(dataset, list(range(start, min(start + batch_size, len(dataset)))), device)
        _, _, _, grid = model(b["source"], b["target"])
        mse = F.mse_loss(warp(b["source_soi"], grid), b["target_soi"], reduction="none")
        total += float(mse.flatten(1).mean(1).sum())
        n += b["source"].shape[0]
    model.train()
    return {"soi_mse": total / max(n, 1)}


def data_digest(cfg: TrainConfig) -> str | None:
    """A digest of the pairs ``cfg``'s CSVs list (their files' resolved paths, in order; None without CSVs): a run
    is continued on the same pairs only, whatever the CSV files are called (rewritten in place, they may list
    others)."""
    import hashlib

    from .data import read_pairs_csv

    if not cfg.train_csv:
        return None
    h = hashlib.sha256()
    for csv_path in (cfg.train_csv, cfg.soi_csv, cfg.val_csv, cfg.val_soi_csv):
        for pair in read_pairs_csv(csv_path, cfg.data_root or None) if csv_path else ():
            h.update("\0".join(str(Path(f).resolve()) for f in pair).encode() + b"\n")
        h.update(b"--\n")
    return h.hexdigest()[:16]


def save_checkpoint(path: Path, model: ISTN, optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int,
                    best_val: float, history: list[dict], data: str | None = None) -> None:
    """A checkpoint of plain tensors and primitives: loads with ``torch.load(weights_only=True)``. ``data``: the
    `data_digest` of the pairs it is trained on."""
    state = {
        "format": "istn-checkpoint",
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": to_dict(cfg),
        "step": step,
        "best_val": best_val,
        "history": history,
        "torch_rng": torch.get_rng_state(),
        "data": data,
    }
    # a temporary file of its own (never a file of the user's named last.tmp), renamed into place: an interrupt or
    # a full disk mid-write leaves no half-written checkpoint
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _same_network(a: ModelConfig, b: ModelConfig) -> bool:
    """Same weights' shapes AND meaning (grid, bounds, transform); only the ISTN-e/-i loss may differ."""
    da, db = to_dict(a), to_dict(b)
    va, vb = da.pop("variant"), db.pop("variant")
    return da == db and va.startswith("istn") == vb.startswith("istn")


def _network_differences(a: ModelConfig, b: ModelConfig) -> str:
    """What makes ``a`` another network than ``b`` (`_same_network`), as ``field: a -> b; ...``; "" if none."""
    if _same_network(a, b):
        return ""
    da, db = to_dict(a), to_dict(b)
    keys = [k for k in da if da[k] != db.get(k) and k != "variant"] or ["variant"]
    return "; ".join(f"{k}: {da[k]!r} -> {db.get(k)!r}" for k in keys)


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of training step ``step`` (0-based: the update that makes ``step + 1`` steps).

    Constant ``cfg.lr`` unless ``cfg.lr_decay_start >= 0``: the updates after that many steps follow a half
    cosine from ``cfg.lr`` down to ``cfg.lr * cfg.lr_final``, reached by the last update (the one that makes
    ``cfg.steps``). A function of the step alone, so a resumed run (or a longer ``steps`` given later)
    follows the schedule of the command that runs it.
    """
    start = cfg.lr_decay_start
    if start < 0 or step < start or cfg.steps <= start:
        return cfg.lr
    t = min(1.0, (step + 1 - start) / (cfg.steps - start))
    return cfg.lr * (cfg.lr_final + (1.0 - cfg.lr_final) * 0.5 * (1.0 + math.cos(math.pi * t)))


#: The most weights a B-spline STN's output layer may have: with its gradient and Adam's two moments, 16 bytes
#: each (50 M: 0.8 GB). A control point spacing given in voxels for mm asks for far more, and ends killed by the OS
MAX_HEAD_WEIGHTS = 50_000_000


def check_trainable(model: ModelConfig) -> None:
    """Refuse (`ValueError`) a network that cannot be trained, before any image is read: a grid the STN's strided
    blocks reduce to one voxel (instance normalisation needs more), and B-spline control points closer than the
    grid's voxels or too many for memory."""
    from .transforms import control_point_count

    depth = len(model.stn_channels)
    bottom = [math.ceil(n / 2**depth) for n in model.grid_size]
    if math.prod(bottom) < 2:
        least = 2**depth + 4 - (2**depth) % 4  # above 2^depth, divisible by 4 (the ITN's depth)
        raise ValueError(f"'grid_size' {' x '.join(map(str, model.grid_size))} is too small to train: the STN halves "
                         f"it {depth} times, to {' x '.join(map(str, bottom))}, where instance normalisation needs "
                         f"more than one voxel; give at least {least} voxels along one axis")
    if model.transform != "bspline":
        return
    if model.cp_spacing_voxels < 1:
        raise ValueError(f"'cp_spacing_mm' {model.cp_spacing_mm:g} mm puts control points closer than the grid's "
                         f"{model.grid_spacing:g} mm voxels (a spacing in voxels given as mm?); give a spacing of "
                         "several voxels in mm (the paper's: 4-8 voxels)")
    outputs = math.prod(control_point_count(n, model.cp_spacing_voxels) for n in model.grid_size) * model.ndim
    if outputs * model.stn_hidden > MAX_HEAD_WEIGHTS:
        raise ValueError(f"'cp_spacing_mm' {model.cp_spacing_mm:g} mm gives {outputs:,} B-spline parameters, an output "
                         f"layer of {outputs * model.stn_hidden / 1e6:,.0f} M weights (about "
                         f"{16 * outputs * model.stn_hidden / 1e9:,.1f} GB to train; at most "
                         f"{MAX_HEAD_WEIGHTS / 1e6:.0f} M): give a larger control point spacing")


def train(
    cfg: TrainConfig,
    train_set: torch.utils.data.Dataset | None = None,
    val_set: torch.utils.data.Dataset | None = None,
    resume: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    init_from: str | Path | None = None,
) -> TrainResult:
    """Train ``cfg.model.variant`` for ``cfg.steps`` steps.

    ``init_from``: a checkpoint whose network weights start a NEW run (fine-tuning,
    e.g. ISTN-e from an ISTN-i model of the same architecture; the optimizer, step
    and history start afresh). Ignored when resuming from ``last.pt``.

    Datasets default to the CSVs of ``cfg``; items are dicts of ``(C, *S)``
    tensors ``source, target, source_soi, target_soi`` on the network grid.
    Writes ``last.pt`` (every validation) and ``best.pt`` (best validation
    ``soi_mse``; the last step when there is no validation set) in ``cfg.out_dir``
    and resumes from ``last.pt`` when ``resume``.

    Data-parallel under ``torchrun`` (``WORLD_SIZE`` > 1) or inside an
    initialised ``torch.distributed`` process group (see ``istn.distributed``
    and ``docs/distributed.md``): every step's global batch is the same
    ``batch_indices(...)`` list as in a single process, split into equal,
    disjoint slices, one per rank (``cfg.batch_size`` must be divisible by the
    world size), and DistributedDataParallel averages the gradients, so the
    updates equal single-process training on the whole batch. Rank 0 alone
    validates (the result is broadcast, so every rank makes the same best/last
    choice), writes the checkpoints, logs and shows the progress bar; on resume
    rank 0 reads ``last.pt`` and broadcasts it, so only rank 0 needs ``out_dir``.
    Every rank returns the same :class:`TrainResult` (``rank`` tells them apart).
    """
    check_trainable(cfg.model)
    if train_set is None:
        train_set, val_set = build_datasets(cfg)
    data = data_digest(cfg)
    n_train = len(train_set)
    if n_train == 0:
        raise ValueError("train() got an empty training set")
    channels = int(train_set[0]["source_soi"].shape[0])
    if cfg.model.uses_itn and channels != cfg.model.soi_channels:  # the ITN's maps are compared with these
        raise ValueError(f"the structure maps give {channels} channel(s) ({cfg.soi_kind}"
                         f"{' ' + ', '.join(map(str, cfg.soi_labels)) if cfg.soi_labels else ''}) but the model's "
                         f"ITN has soi_channels {cfg.model.soi_channels}: they must be equal (labels: one channel "
                         "per --soi-labels value; soft or landmarks: 1)")
    # batch_indices() gives the whole (shuffled) set when it is smaller than batch_size
    distributed.check_global_batch(min(n_train, cfg.batch_size), distributed.requested_world_size())
    device = resolve_device(cfg.device)
    # Joins (or creates: destroyed at exit, so that a script may call train() again) the process group.
    ctx, device = distributed.setup(device)
    if not ctx.is_main:
        log = _silent
    out = Path(cfg.out_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = ISTN(cfg.model).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    step, best_val, history = 0, math.inf, []
    last_path, best_path = out / "last.pt", out / "best.pt"
    if init_from is not None and not (resume and last_path.exists()):
        init = load_checkpoint(init_from)
        differ = _network_differences(train_config_from_dict(init["config"]).model, cfg.model)
        if differ:
            raise ValueError(f"--init-from '{init_from}' is a checkpoint of another network ({differ}): the grid, "
                             "channels, transform and structure channels must match")
        net.load_state_dict(init["model"])  # the same weights on every rank (DDP broadcasts rank 0's anyway)
        log(f"initialised from {init_from} (step {init['step']})")
    if resume:
        ck = load_checkpoint(last_path) if ctx.is_main and last_path.exists() else None
        ck = distributed.broadcast_object(ck, ctx)  # every rank resumes from rank 0's last.pt
        if ck is not None:
            differ = _network_differences(train_config_from_dict(ck["config"]).model, cfg.model)
            if differ:
                raise ValueError(f"{last_path} is a run of another network ({differ}): resume it with its own "
                                 "settings, or train into another folder")
            net.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            step, best_val, history = int(ck["step"]), float(ck["best_val"]), list(ck["history"])
            torch.set_rng_state(ck["torch_rng"])
            log(f"resumed from {last_path} at step {step}")
            del ck
    model: torch.nn.Module = net
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                        **distributed.no_buffer_sync_kwargs())
        log(f"data-parallel training on {ctx.world_size} processes ({ctx.backend}): "
            f"{min(n_train, cfg.batch_size) // ctx.world_size} pairs per process and step")

    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.model.variant} {cfg.model.transform}", unit="step")
    best_state: dict[str, torch.Tensor] | None = None  # DDP: each rank's own copy of the best weights
    model.train()
    elapsed0 = float(history[-1]["seconds"]) if history else 0.0  # training time so far: a resume continues it
    t0 = time.perf_counter()
    ours = resume and last_path.exists()  # whether last.pt holds this run (not an earlier run's, under --no-resume)
    try:
        while step < cfg.steps:
            indices = batch_indices(n_train, cfg.batch_size, cfg.seed, step)
            if ctx.enabled:
                indices = distributed.shard(indices, ctx.rank, ctx.world_size)
            b = _batch(train_set, indices, device)
            s_map, t_map, _, grid = model(b["source"], b["target"])
            loss = variant_loss(cfg.model.variant, b["source"], b["target"], b["source_soi"], b["target_soi"], s_map, t_map,
                                grid, cfg.soi_loss, cfg.image_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP: gradients averaged over the ranks = the gradient of the global-batch mean
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            optimizer.step()
            step += 1
            loss_value = float(distributed.mean_over_ranks(loss.detach(), ctx).item())  # the global-batch loss
            # NaN/inf data or a diverging run: stopped before anything is saved; the global loss (the same on every
            # rank: they stop together), read here anyway for the bar and history, costs no extra synchronisation
            if not math.isfinite(loss_value):
                raise ResultError(_diverged(step, "loss", last_path))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.5f}", best=f"{best_val:.5f}" if best_val < math.inf else "-")
            if step % cfg.val_every == 0 or step == cfg.steps:
                # an update that overflowed with a finite loss (its NaN shows in the next step's): never checkpointed;
                # checked here, not every step (a device synchronisation per weight tensor)
                if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
                    raise ResultError(_diverged(step, "weights", last_path))
                record = None
                if ctx.is_main:
                    record = {"step": step, "loss": loss_value, "seconds": elapsed0 + time.perf_counter() - t0,
                              "lr": learning_rate(cfg, step - 1)}
                    if val_set is not None and len(val_set) > 0:
                        record.update(validate(net, val_set, device))
                record = distributed.broadcast_object(record, ctx)  # the same history and choice on every rank
                current = record["soi_mse"] if "soi_mse" in record else -step  # no validation: the latest is the best
                history.append(record)
                if current < best_val:
                    best_val = current
                    if ctx.is_main:
                        save_checkpoint(best_path, net, optimizer, cfg, step, best_val, history, data)
                    if ctx.enabled:
                        best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
                if ctx.is_main:
                    save_checkpoint(last_path, net, optimizer, cfg, step, best_val, history, data)
                    ours = True
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
            bar = None
        if ctx.is_main:
            kept = load_checkpoint(last_path)["step"] if ours and last_path.exists() else None
            earlier = " (the folder's last.pt is the earlier run's)" if not ours and last_path.exists() else ""
            log(f"stopped at step {step}: " + (f"the run is kept at step {kept} ({last_path}, checkpoints every "
                                                f"{cfg.val_every} steps); the same command continues it"
                                                if kept is not None else f"no checkpoint was written yet{earlier}"))
        raise
    finally:
        if bar is not None:
            bar.close()
        torch.set_num_threads(threads_before)
    if ctx.enabled and best_state is None:  # the best is from before a resume: rank 0 has it in best.pt
        best_state = distributed.broadcast_object(load_checkpoint(best_path)["model"] if ctx.is_main else None, ctx)
    if best_state is None:
        best_state = load_checkpoint(best_path)["model"]
    best = ISTN(cfg.model)
    best.load_state_dict(best_state)
    return TrainResult(best.eval(), best_path, last_path, best_val, step, history, ctx.rank, ctx.world_size)


def _diverged(step: int, what: str, last_path: Path) -> str:
    kept = (f"{last_path} holds the run at step {load_checkpoint(last_path)['step']}, before it diverged"
            if last_path.exists() else "no checkpoint was written")
    return (f"the training {what} became non-finite at step {step} (NaN or infinite input values, or a learning "
            f"rate too high for this data): stopped; {kept}")


def _silent(_message: str) -> None:
    pass


def model_from_checkpoint(path: str | Path) -> tuple[ISTN, TrainConfig]:
    """Rebuild the network and its training config from a checkpoint."""
    ck = load_checkpoint(path)
    cfg = train_config_from_dict(ck["config"])
    model = ISTN(cfg.model)
    model.load_state_dict(ck["model"])
    return model.eval(), cfg
