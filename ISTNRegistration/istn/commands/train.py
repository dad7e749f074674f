"""`istn train`: a variant from CSV pair lists or a config file, exported with its metadata."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ISTNError

def run_train(args: argparse.Namespace) -> Path:
    from ..config import ModelConfig, TrainConfig, train_config_from_dict
    from ..export import build_metadata, export_model
    from ..training import train

    if args.config:
        try:
            cfg = train_config_from_dict(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError, ValueError, TypeError) as exc:
            raise ISTNError(f"config '{args.config}' is not a valid training config: {exc}") from None
        if args.out:
            cfg.out_dir = args.out
        if args.steps:
            cfg.steps = args.steps
    else:
        if not args.train_csv or not args.soi_csv:
            raise ISTNError("istn train needs --config, or --train-csv and --soi-csv")
        grid = tuple(args.grid_size) if args.grid_size else (128,) * args.ndim
        model = ModelConfig(ndim=args.ndim, grid_size=grid, grid_spacing=args.spacing, transform=args.transform,
                            variant=args.variant, soi_channels=len(args.soi_labels) if args.soi_labels else 1,
                            cp_spacing_mm=args.cp_spacing, itn_output=args.itn_output)
        try:
            cfg = TrainConfig(model=model, train_csv=args.train_csv, soi_csv=args.soi_csv, soi_kind=args.soi_kind,
                              soi_labels=tuple(args.soi_labels or ()), val_csv=args.val_csv or "",
                              val_soi_csv=args.val_soi_csv or "", steps=args.steps or 1000,
                              batch_size=args.batch_size, lr=args.lr, lr_decay_start=args.lr_decay_from,
                              lr_final=args.lr_final, val_every=args.val_every, seed=args.seed, device=args.device,
                              threads=args.threads, out_dir=args.out or "runs/istn")
        except ValueError as exc:
            raise ISTNError(f"istn train: {exc}") from None
    from ..registration import check_device

    check_device(cfg.device)
    # Under torchrun every process runs this; train() shards the batches and only rank 0 writes and exports.
    if args.init_from and not Path(args.init_from).is_file():
        raise ISTNError(f"--init-from '{args.init_from}' is not a checkpoint file (a run's best.pt or last.pt)")
    try:
        result = train(cfg, resume=not args.no_resume, progress=not args.quiet, init_from=args.init_from)
    except ValueError as exc:
        raise ISTNError(str(exc)) from None
    export_path = Path(args.export) if args.export else Path(cfg.out_dir) / "model.pt"
    if result.rank != 0:
        return export_path
    meta = build_metadata(cfg, soi_description=args.soi_description or f"{cfg.soi_kind} from {cfg.soi_csv}",
                          step=result.step, best_val=result.best_val)
    export_model(result.model, meta, export_path)
    print(f"best validation soi_mse {result.best_val:.6f}; model written to {export_path}")
    return export_path
