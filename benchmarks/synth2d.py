#!/usr/bin/env python3
"""The ISTN paper's 2D toy experiment (Lee et al., MICCAI 2019, Table 1 layout) on ../shared/data/synth2d.

What it does, in order (every stage is resumable; rerun the same command after an interruption):

1. Split the 100 pairs with a seeded permutation: 70 train / 10 validation (checkpoint
   selection only) / 20 evaluation (held out, reported). The split and the CSVs it uses are
   written into the run folder (``--out``), never into ../shared.
2. Train the four variants (STN-u, STN-s, ISTN-e, ISTN-i), affine then B-spline, with the
   soft vessel-tree segmentations as SoI. The best-on-validation checkpoint (validation
   MSE(T(S_s), S_t)) is exported to ``<models>/synth2d-<variant>-<transform>.pt``; a model
   that is already exported is not retrained, an interrupted training resumes from
   ``<out>/runs/<variant>-<transform>/last.pt``.
3. Evaluate on the 20 evaluation pairs with `istn.registration.register` (source = moving,
   target = fixed): one pass and after ``--refine`` refinement iterations. Metrics of the
   vessel tree: the target's soft segmentation and the source's soft segmentation warped
   linearly into the target grid, each thresholded at half its maximum (exactly what
   ``istn evaluate --soft`` does); Dice and the average symmetric SURFACE distance (mm = px
   here) from `istn.metrics`. Reference columns: identity, the ground-truth transform
   (``inv(S_src) @ S_trg`` from the ``_transform.txt`` files) and "SoI best case" (see
   `soi_best_case`).
4. Write ``<results>/synth2d.{json,md,png}``.

    python benchmarks/synth2d.py                    # the full benchmark (~40 min on one CPU thread)
    python benchmarks/synth2d.py --quick            # smoke run into runs/synth2d-quick
    python benchmarks/synth2d.py --variants istn-i --transforms bspline --steps 700
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))  # the engine without installing it

from istn import __version__ as ENGINE_VERSION  # noqa: E402
from istn.config import TRANSFORMS, VARIANTS, ModelConfig, TrainConfig, to_dict  # noqa: E402
from istn.data import network_grid, soi_to_tensor  # noqa: E402
from istn.export import build_metadata, export_model, load_model  # noqa: E402
from istn.geometry import Grid  # noqa: E402
from istn.metrics import asd, dice, folding_fraction, hd95  # noqa: E402
from istn.refinement import refine  # noqa: E402
from istn.registration import register, warp_image  # noqa: E402
from istn.training import train  # noqa: E402
from istn.transforms import bspline_to_world, matrix_to_sitk_affine, theta_to_world  # noqa: E402
from table1 import NAMES, TRANSFORM_NAMES, console_table, fmt, markdown_table  # noqa: E402  (beside this script)

DATA = REPO.parent / "shared" / "data" / "synth2d"
METRIC_KEYS = ("dice", "asd", "hd95", "dice_release")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------


def make_split(data: Path, out: Path, seed: int, n_train: int, n_val: int, n_eval: int) -> dict:
    """Seeded permutation of the rows of train.csv; writes the CSVs and split.json into ``out``."""
    images = _read_rows(data / "train.csv")
    segs = _read_rows(data / "train.seg.csv")
    if len(images) != len(segs):
        raise SystemExit("train.csv and train.seg.csv differ in length")
    if n_train + n_val + n_eval > len(images):
        raise SystemExit(f"split {n_train}/{n_val}/{n_eval} needs more than the {len(images)} pairs")
    perm = np.random.default_rng(seed).permutation(len(images)).tolist()
    parts = {"train": perm[:n_train], "val": perm[n_train:n_train + n_val],
             "eval": perm[n_train + n_val:n_train + n_val + n_eval]}
    split = {"seed": seed, "rule": "numpy.random.default_rng(seed).permutation(100): first 70 train, next 10 val, next 20 eval",
             "rows": {k: sorted(v) for k, v in parts.items()}, "pairs": {}}
    for name, rows in split["rows"].items():
        for kind, table in (("", images), (".seg", segs)):
            with open(out / f"{name}{kind}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["src", "trg"])
                w.writerows(table[r] for r in rows)
        split["pairs"][name] = [_pair_id(images[r][0]) for r in rows]
    existing = out / "split.json"
    if existing.exists():
        old = json.loads(existing.read_text())
        if old.get("rows") != split["rows"]:
            raise SystemExit(f"{existing} records a different split; use another --out or delete the run folder")
    existing.write_text(json.dumps(split, indent=1) + "\n")
    return split


def _read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return [[row["src"], row["trg"]] for row in r]


def _pair_id(src_path: str) -> str:
    return Path(src_path).stem.replace("V_square_source", "")


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------


def model_config(variant: str, transform: str, args: argparse.Namespace) -> ModelConfig:
    kw = {}
    if transform == "bspline":
        kw["max_displacement"] = args.max_displacement
    return ModelConfig(ndim=2, grid_size=(128, 128), grid_spacing=1.0, transform=transform, variant=variant,
                       cp_spacing_mm=args.cp_spacing, **kw)


def config_tag(transform: str, args: argparse.Namespace) -> str:
    """Suffix of run folders and evaluation caches for non-default settings (so they never mix)."""
    return f"-md{args.max_displacement:g}" if transform == "bspline" else ""


def train_one(variant: str, transform: str, args: argparse.Namespace, data: Path, out: Path, models: Path) -> dict:
    path = models / f"synth2d-{variant}-{transform}.pt"
    run_dir = out / "runs" / f"{variant}-{transform}{config_tag(transform, args)}"
    info_path = run_dir / "train_info.json"
    if path.exists():
        wanted = to_dict(model_config(variant, transform, args))
        # fields a file predates read as their defaults (as `LoadedModel.config` reads them)
        have = json.loads(json.dumps(to_dict(load_model(path).config)))
        if have != json.loads(json.dumps(wanted)):
            diff = {k: (have.get(k), v) for k, v in json.loads(json.dumps(wanted)).items() if have.get(k) != v}
            raise SystemExit(f"{path} exists but was trained with other settings {diff} (file, wanted); "
                             "delete it or use another --models folder")
        log(f"{path.name} exists: not retrained")
        return json.loads(info_path.read_text()) if info_path.exists() else {"model": str(path)}
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(
        model=model_config(variant, transform, args),
        train_csv=str(out / "train.csv"), soi_csv=str(out / "train.seg.csv"), data_root=str(data),
        soi_kind="soft", val_csv=str(out / "val.csv"), val_soi_csv=str(out / "val.seg.csv"),
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, val_every=args.val_every, seed=args.seed,
        device="cpu", threads=1, out_dir=str(run_dir),
    )
    # Wall time accumulates over interrupted segments.
    seconds = json.loads(info_path.read_text()).get("seconds", 0.0) if info_path.exists() else 0.0
    log(f"training {variant} {transform}: {args.steps} steps, batch {args.batch_size}, lr {args.lr}")
    t0 = time.perf_counter()
    result = train(cfg, resume=True, progress=not args.no_progress)
    seconds += time.perf_counter() - t0
    meta = build_metadata(cfg, soi_description="vessel tree (soft segmentation, synth2d toy data)",
                          training_data="synth2d: 70 training pairs of ../shared/data/synth2d (split in split.json)",
                          step=result.step, best_val=result.best_val)
    best_step = min((h for h in result.history if "soi_mse" in h), key=lambda h: h["soi_mse"])["step"]
    info = {"model": str(path), "steps": result.step, "best_step": best_step, "best_val_soi_mse": result.best_val,
            "seconds": seconds, "history": result.history}
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    models.mkdir(parents=True, exist_ok=True)
    export_model(result.model, meta, path)
    log(f"{path.name}: best validation MSE {result.best_val:.6f} at step {best_step}; {seconds:.0f} s")
    return info


# --------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------


class Pair:
    """One evaluation pair: images, soft segmentations, ground-truth world transform (fixed -> moving)."""

    def __init__(self, data: Path, img_row: list[str], seg_row: list[str]) -> None:
        self.id = _pair_id(img_row[0])
        self.moving = sitk.ReadImage(str(data / img_row[0]), sitk.sitkFloat32)
        self.fixed = sitk.ReadImage(str(data / img_row[1]), sitk.sitkFloat32)
        self.moving_seg = sitk.ReadImage(str(data / seg_row[0]), sitk.sitkFloat32)
        self.fixed_seg = sitk.ReadImage(str(data / seg_row[1]), sitk.sitkFloat32)
        s_src = np.loadtxt(data / img_row[0].replace(".png", "_transform.txt"))
        s_trg = np.loadtxt(data / img_row[1].replace(".png", "_transform.txt"))
        m = np.linalg.inv(s_src) @ s_trg  # target pixel (x, y) -> source pixel (x, y), 2D affine in a 4x4
        pix = np.eye(3)
        pix[:2, :2], pix[:2, 2] = m[:2, :2], m[:2, 3]
        vf = Grid.from_image(self.fixed).voxel_to_world_matrix()
        vm = Grid.from_image(self.moving).voxel_to_world_matrix()
        self.ground_truth = matrix_to_sitk_affine(vm @ pix @ np.linalg.inv(vf))


def _half_max_mask(img: sitk.Image) -> np.ndarray:
    a = sitk.GetArrayFromImage(img)
    return a > 0.5 * a.max()


def tree_metrics(pair: Pair, transform: sitk.Transform | None) -> dict:
    """Dice, ASD, HD95 (mm) of the vessel tree: fixed mask vs warped moving mask (half-max thresholds, linear warp).

    Identical to ``istn evaluate --soft``. ``dice_release``: the 2019 release's own metric
    (raw 0..208 maps > 0.5, i.e. any non-zero pixel), for comparison with its numbers.
    """
    tx = transform if transform is not None else sitk.Transform(2, sitk.sitkIdentity)
    warped = warp_image(pair.moving_seg, pair.fixed_seg, tx, sitk.sitkLinear)
    a, b = _half_max_mask(pair.fixed_seg), _half_max_mask(warped)
    spacing = tuple(reversed(pair.fixed_seg.GetSpacing()))
    out = {"dice": dice(a, b), "asd": asd(a, b, spacing), "hd95": hd95(a, b, spacing),
           "dice_release": dice(sitk.GetArrayFromImage(pair.fixed_seg) > 0.5, sitk.GetArrayFromImage(warped) > 0.5)}
    if not tx.IsLinear():  # B-spline: fraction of fixed-image pixels where the Jacobian determinant is <= 0
        out["folding"] = folding_fraction(tx, pair.fixed_seg)
    return out


def evaluate_model(path: Path, pairs: list[Pair], iterations: int, lr: float | None = None) -> dict:
    model = load_model(path)
    per_pair, one_pass_s, refine_s = {}, [], []
    for p in pairs:
        r = register(p.fixed, p.moving, model, iterations=iterations, lr=lr, device="cpu", threads=1)
        per_pair[p.id] = {"before": tree_metrics(p, r.one_pass_transform), "after": tree_metrics(p, r.transform),
                          "loss_one_pass": r.loss_one_pass, "loss_final": r.loss_final}
        one_pass_s.append(r.timings["one_pass"])
        refine_s.append(r.timings["refine"])
    return {"model": path.name, "iterations": iterations, "lr": lr, "per_pair": per_pair,
            "median_one_pass_s": float(np.median(one_pass_s)), "median_refine_s": float(np.median(refine_s))}


def soi_best_case(pairs: list[Pair], transform: str, models: Path, iterations: int, lr: float) -> dict:
    """The paper's "SoI best case": the transform optimised directly on the pair's SoI maps.

    The network of the trained ISTN-e model of the same transform type (its STN was trained
    on ITN maps that are regressed onto the SoI, so the true SoI maps are in-distribution)
    is refined with `istn.refinement.refine` on the pair's SoI encodings (soft
    segmentations / max, on the network grids, exactly as in training): ``iterations``
    Adam steps at ``lr`` on all STN weights minimising MSE(T(S_s), S_t). Falls back to
    ISTN-i, then to an untrained (identity) network, when ISTN-e was not trained. The
    resulting transform is evaluated like every other column. Also reported: the same
    optimisation started from an untrained network (identity transform).
    """
    from istn.networks import ISTN

    start = next((models / f"synth2d-{v}-{transform}.pt" for v in ("istn-e", "istn-i")
                  if (models / f"synth2d-{v}-{transform}.pt").exists()), None)
    out: dict = {"iterations": iterations, "lr": lr, "per_pair": {}, "per_pair_from_identity": {}}
    trained = load_model(start).module if start is not None else None
    out["start_model"] = start.name if start is not None else "untrained"
    cfg = ModelConfig(ndim=2, grid_size=(128, 128), transform=transform, variant="stn-s", cp_spacing_mm=10.0)
    untrained = ISTN(cfg).eval()
    for p in pairs:
        grid_f, grid_m = network_grid(p.fixed, cfg), network_grid(p.moving, cfg)
        s_soi = soi_to_tensor(p.moving_seg, grid_m, "soft")
        # affine: source on the moving grid, target on the fixed grid (as `register`);
        # B-spline: both on one grid (`register` uses the fixed one; synth2d pairs share one geometry).
        t_soi = soi_to_tensor(p.fixed_seg, grid_f if transform == "affine" else grid_m, "soft")

        def world(params: torch.Tensor) -> sitk.Transform:
            arr = params[0].detach().double().numpy()
            if transform == "affine":
                return matrix_to_sitk_affine(theta_to_world(arr, grid_f, grid_m))
            return bspline_to_world(arr, grid_m, cfg.cp_spacing_voxels)

        for key, module in (("per_pair", trained if trained is not None else untrained), ("per_pair_from_identity", untrained)):
            r = refine(module, s_soi, t_soi, iterations=iterations, lr=lr)
            out[key][p.id] = tree_metrics(p, world(r.params))
            out[key][p.id]["loss_final"] = r.final_loss
            if trained is None:
                out["per_pair_from_identity"] = out["per_pair"]
                break
    return out


def _stats(per_pair: dict, stage: str | None = None) -> dict:
    rows = [v[stage] if stage else v for v in per_pair.values()]
    out = {}
    for k in METRIC_KEYS + ("folding",):
        if k not in rows[0]:
            continue
        vals = np.array([r[k] for r in rows], dtype=float)
        out[k], out[k + "_std"] = float(np.nanmean(vals)), float(np.nanstd(vals))
    if "folding" in rows[0]:
        out["folding_max"] = float(max(r["folding"] for r in rows))
    return out


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------


def build_json(ev: dict, split: dict, args: argparse.Namespace, train_info: dict, timing: dict) -> dict:
    res: dict = {}
    for t in args.transforms:
        res[t] = {}
        for v in args.variants:
            e = ev.get(f"{v}-{t}")
            if e is None:
                continue
            b, a = _stats(e["per_pair"], "before"), _stats(e["per_pair"], "after")
            res[t][v] = {"dice_before": b["dice"], "dice_after": a["dice"], "asd_before": b["asd"], "asd_after": a["asd"],
                         "dice_before_std": b["dice_std"], "dice_after_std": a["dice_std"],
                         "asd_before_std": b["asd_std"], "asd_after_std": a["asd_std"],
                         "hd95_before": b["hd95"], "hd95_after": a["hd95"],
                         "dice_release_metric_before": b["dice_release"], "dice_release_metric_after": a["dice_release"],
                         "median_one_pass_s": e["median_one_pass_s"], "median_refine_s": e["median_refine_s"],
                         **({"folding_before": b["folding"], "folding_after": a["folding"],
                             "folding_max_after": a["folding_max"]} if "folding" in a else {}),
                         "best_step": train_info.get(f"{v}-{t}", {}).get("best_step"),
                         "best_val_soi_mse": train_info.get(f"{v}-{t}", {}).get("best_val_soi_mse"),
                         "train_seconds": train_info.get(f"{v}-{t}", {}).get("seconds"),
                         "per_pair": e["per_pair"]}
    idn, gt = _stats(ev["identity"]), _stats(ev["ground_truth"])
    res["identity"] = {"dice": idn["dice"], "asd": idn["asd"], "dice_std": idn["dice_std"], "asd_std": idn["asd_std"],
                       "hd95": idn["hd95"], "dice_release_metric": idn["dice_release"], "per_pair": ev["identity"]}
    res["ground_truth"] = {"dice": gt["dice"], "asd": gt["asd"], "dice_std": gt["dice_std"], "asd_std": gt["asd_std"],
                           "hd95": gt["hd95"], "dice_release_metric": gt["dice_release"], "per_pair": ev["ground_truth"]}
    res["soi"] = {}
    for t in args.transforms:
        s = ev.get(f"soi-{t}")
        if s is None:
            continue
        st, si = _stats(s["per_pair"]), _stats(s["per_pair_from_identity"])
        res["soi"][t] = {"dice": st["dice"], "asd": st["asd"], "dice_std": st["dice_std"], "asd_std": st["asd_std"],
                         "hd95": st["hd95"], "dice_release_metric": st["dice_release"],
                         "start_model": s["start_model"], "iterations": s["iterations"], "lr": s["lr"],
                         "from_identity": {"dice": si["dice"], "asd": si["asd"], "dice_std": si["dice_std"],
                                           "asd_std": si["asd_std"]},
                         "per_pair": s["per_pair"], "per_pair_from_identity": s["per_pair_from_identity"]}
    res["split"] = split
    res["settings"] = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "val_every": args.val_every,
                       "seed": args.seed, "split_seed": args.split_seed, "refine_iterations": args.refine, "refine_lr": args.refine_lr, "eval_split": args.eval_split,
                       "soi_iterations": args.soi_iterations, "cp_spacing_px": args.cp_spacing,
                       "max_displacement": args.max_displacement, "soi_kind": "soft", "threads": 1,
                       "metric": "vessel tree, soft segmentations thresholded at half their maximum (moving one warped "
                                 "linearly); Dice; ASD = average symmetric surface distance in mm (= px)",
                       "engine_version": ENGINE_VERSION, "torch": torch.__version__, "python": platform.python_version(),
                       "command": timing.get("command")}
    res["timing"] = timing
    return res


def build_markdown(res: dict, args: argparse.Namespace, notes: str) -> str:
    L = []
    cols = ["Id"] + [NAMES[v] for v in VARIANTS] + ["SoI best case", "ground-truth transform"]
    L.append("# synth2d: the ISTN paper's 2D toy experiment (Table 1 layout)\n")
    L.append(f"Generated by `benchmarks/synth2d.py` (engine {ENGINE_VERSION}, torch {torch.__version__}, CPU, 1 thread). "
             + (f"Held-out evaluation pairs: {len(res['identity']['per_pair'])}" if args.eval_split == "eval" else
              f"VALIDATION pairs (an investigation, not the reported result): {len(res['identity']['per_pair'])}")
             + "; mean ± std over pairs. "
             "Dice and ASD (average symmetric SURFACE distance, mm = px) of the vessel tree.\n")
    idn, gt = res["identity"], res["ground_truth"]
    tnames = TRANSFORM_NAMES
    L += markdown_table(res, args.transforms, before=[(cols[0], {t: idn for t in args.transforms})],
                        after=[(cols[-2], res["soi"]), (cols[-1], {t: gt for t in args.transforms})])
    L.append("")
    L.append("Id: no registration. SoI best case: see below; shown in the 'before' rows as in the paper. "
             "Ground-truth transform: `inv(S_src) @ S_trg` from the `_transform.txt` files (a reference, not a method).\n")
    if "bspline" in res and any("folding_after" in r for r in res["bspline"].values()):
        L.append("B-spline folding (pixels of the fixed image with Jacobian determinant <= 0, mean over pairs; max pair "
                 "after refinement): " + "; ".join(
                     f"{NAMES[v]} {100 * r['folding_before']:.2f} % one pass, {100 * r['folding_after']:.2f} % after "
                     f"(max {100 * r['folding_max_after']:.2f} %)" for v, r in res["bspline"].items() if "folding_after" in r) + ".\n")

    # release-metric comparison
    L.append("## Comparison with the 2019 release (its own Dice metric)\n")
    L.append("The 2019 release's Dice counts any non-zero pixel of the raw 0..208 maps (`seg > 0.5`), pooled "
             "differently and on 10 other held-out pairs (method.md). Our models, same metric, our 20 evaluation pairs:\n")
    L.append("| | Id | STN-u | STN-s | ISTN-e | ISTN-i | ground-truth transform |")
    L.append("| --- | --- | --- | --- | --- | --- | --- |")
    L.append("| 2019 release, affine, one pass | 0.838 | 0.886 | 0.946 | 0.942 | 0.946 | 0.977 |")
    L.append("| 2019 release, affine, after 50 refinement steps | | 0.909 | 0.909 | 0.968 | 0.966 | |")
    for t in args.transforms:
        if t not in res:
            continue
        for stage in ("before", "after"):
            row = [fmt(idn["dice_release_metric"]) if stage == "before" else ""]
            row += [fmt(res[t][v][f"dice_release_metric_{stage}"]) if v in res[t] else "n/a" for v in VARIANTS]
            row.append(fmt(gt["dice_release_metric"]) if stage == "before" else "")
            what = "one pass" if stage == "before" else f"after {args.refine} refinement steps"
            L.append(f"| this engine, {tnames[t]}, {what} | " + " | ".join(row) + " |")
    L.append("")

    # settings
    s, sp, tm = res["settings"], res["split"], res["timing"]
    L.append("## Settings\n")
    L.append(f"- Split (seed {sp['seed']}): {sp['rule']}. Validation pairs are used only to pick the checkpoint "
             "(lowest validation MSE(T(S_s), S_t), every "
             f"{s['val_every']} steps); nothing is tuned on the evaluation pairs. Pair ids: train "
             f"{', '.join(sp['pairs']['train'])}; validation {', '.join(sp['pairs']['val'])}; "
             f"evaluation {', '.join(sp['pairs']['eval'])}. The CSVs are written to the run folder.")
    L.append(f"- Training: {s['steps']} steps of batch {s['batch_size']} (= {s['steps'] * s['batch_size'] / len(sp['rows']['train']):.0f} "
             f"epochs of 70 pairs), Adam lr {s['lr']}, seed {s['seed']}, SoI = soft segmentations (`train.seg.csv`, "
             f"soi_kind soft), default `ModelConfig` networks on a 128x128 grid at 1 mm; B-spline control points every "
             f"{s['cp_spacing_px']:g} px, B-spline bound `max_displacement` {s['max_displacement']:g} (normalised units; "
             "the engine's default is 0.3; see the B-spline investigation below). One CPU thread.")
    L.append(f"- Registration: `istn.registration.register(fixed=target, moving=source, model, iterations={s['refine_iterations']})` "
             + (f"(refinement lr {s['refine_lr']}" if s.get("refine_lr") else "(refinement lr = training lr")
             + ", fresh Adam on the STN weights per pair, ITN frozen); 'before' = "
             "`one_pass_transform`, 'after' = `transform`.")
    L.append("- Metrics: " + s["metric"] + "; identical to `istn evaluate --soft`.")
    soi = next(iter(res["soi"].values()), None)
    if soi:
        L.append(f"- SoI best case: the network of the trained ISTN-e model of the same transform type "
                 f"(`{soi['start_model']}` for the first), fed the pair's true SoI maps (soft segmentations / max on the "
                 f"network grids, as in training) instead of ITN maps, refined with `istn.refinement.refine` for "
                 f"{soi['iterations']} iterations (Adam, lr {soi['lr']}) minimising MSE(T(S_s), S_t); its final transform is "
                 "evaluated like the others. The same optimisation from an untrained (identity) network gives: "
                 + "; ".join(f"{tnames[t]} Dice {fmt(v['from_identity']['dice'], v['from_identity']['dice_std'])}, "
                             f"ASD {fmt(v['from_identity']['asd'], v['from_identity']['asd_std'], 2)}"
                             for t, v in res["soi"].items()) + ".")
    L.append(f"- Command: `{s['command']}`")
    L.append(f"- Time (2 shared CPU cores, one thread): training {tm['train_s'] / 60:.1f} min in all, evaluation "
             f"(registration of every pair with every model, SoI best case, metrics) {tm['evaluation_s'] / 60:.1f} min. "
             "Per model (training wall time, step of the best validation checkpoint):")
    for t in args.transforms:
        if t in res:
            L.append("  " + "; ".join(f"{NAMES[v]} {t} {res[t][v]['train_seconds'] / 60:.1f} min (best step {res[t][v]['best_step']})"
                                      for v in VARIANTS if v in res[t] and res[t][v].get("train_seconds")))
    L.append("- Registration speed in this run (median per pair, 1 thread): " + "; ".join(
        f"{NAMES[v]} {t} one pass {1000 * res[t][v]['median_one_pass_s']:.0f} ms, {s['refine_iterations']} iterations "
        f"{res[t][v]['median_refine_s']:.2f} s" for t in args.transforms if t in res for v in ("stn-u", "istn-i") if v in res[t]) + ".")
    L.append("- Figure: `synth2d.png` (ISTN-i affine on three evaluation pairs).")
    L.append("")
    if notes:
        L.append(notes.strip() + "\n")
    return "\n".join(L)


def render_figure(pairs: list[Pair], model_path: Path, iterations: int, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = load_model(model_path)
    titles = ["fixed (target)", "moving (source)", "ITN(fixed)", "ITN(moving)", "warped, one pass", f"warped, {iterations} refinement its"]
    fig, axes = plt.subplots(len(pairs), 6, figsize=(15, 2.6 * len(pairs) + 0.4), squeeze=False)
    for i, p in enumerate(pairs):
        r = register(p.fixed, p.moving, model, iterations=iterations, device="cpu", threads=1)
        fixed_mask = _half_max_mask(p.fixed_seg)
        panels = [sitk.GetArrayFromImage(p.fixed), sitk.GetArrayFromImage(p.moving),
                  sitk.GetArrayFromImage(r.fixed_map), sitk.GetArrayFromImage(r.moving_map)]
        warped = []
        for tx in (r.one_pass_transform, r.transform):
            warped.append((sitk.GetArrayFromImage(warp_image(p.moving, p.fixed, tx)),
                           _half_max_mask(warp_image(p.moving_seg, p.fixed_seg, tx)), tree_metrics(p, tx)))
        for j in range(6):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < 4:
                ax.imshow(panels[j], cmap="gray")
                if j == 0:
                    ax.contour(fixed_mask, levels=[0.5], colors="lime", linewidths=0.7)
                if j == 1:
                    ax.contour(_half_max_mask(p.moving_seg), levels=[0.5], colors="red", linewidths=0.7)
            else:
                img, mask, m = warped[j - 4]
                ax.imshow(img, cmap="gray")
                ax.contour(fixed_mask, levels=[0.5], colors="lime", linewidths=0.7)
                ax.contour(mask, levels=[0.5], colors="red", linewidths=0.7)
                ax.set_xlabel(f"Dice {m['dice']:.3f}, ASD {m['asd']:.2f} mm", fontsize=8)
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
        axes[i, 0].set_ylabel(f"pair {p.id}", fontsize=9)
    fig.suptitle("synth2d, ISTN-i affine, held-out pairs. Tree contours: green = fixed, red = moving / warped moving", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="synth2d folder (default ../shared/data/synth2d)")
    p.add_argument("--out", type=Path, help="run folder: split CSVs, checkpoints, evaluation caches (default runs/synth2d)")
    p.add_argument("--models", type=Path, help="where models are exported (default benchmarks/models; --quick: OUT/models)")
    p.add_argument("--results", type=Path, help="where synth2d.{md,json,png} go (default benchmarks/results; --quick: OUT/results)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--transforms", nargs="+", default=list(TRANSFORMS), choices=TRANSFORMS)
    p.add_argument("--steps", type=int, default=700, help="training steps (700 = 100 epochs of 70 pairs at batch 10)")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--split-seed", type=int, default=42)
    p.add_argument("--cp-spacing", type=float, default=10.0, help="B-spline control point spacing (px = mm)")
    p.add_argument("--max-displacement", type=float, default=0.3,
                   help="B-spline bound on control point displacements, normalised units (default 0.3, the engine's "
                        "default; 0.6 and 1.0 were tried on the validation pairs, see synth2d.md)")
    p.add_argument("--refine", type=int, default=50, help="refinement iterations at evaluation")
    p.add_argument("--soi-iterations", type=int, default=300, help="iterations of the SoI best case")
    p.add_argument("--refine-lr", type=float, default=None, help="refinement learning rate (default: the model's training lr)")
    p.add_argument("--eval-split", default="eval", choices=["eval", "val"],
                   help="pairs to evaluate on: eval (held out, reported) or val (for investigations; writes synth2d-val.*)")
    p.add_argument("--skip-soi", action="store_true", help="do not compute the SoI best case")
    p.add_argument("--quick", action="store_true", help="smoke run: few steps, 3 evaluation pairs, into runs/synth2d-quick")
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--re-eval", action="store_true", help="recompute the cached evaluations")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--notes", type=Path, default=Path(__file__).resolve().parent / "results" / "synth2d_notes.md",
                   help="hand-written discussion appended to the markdown (if it exists; not with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.val_every, args.refine, args.soi_iterations = min(args.steps, 6), 3, 3, 5
    args.out = args.out or REPO / "runs" / ("synth2d-quick" if args.quick else "synth2d")
    args.models = args.models or (args.out / "models" if args.quick else REPO / "benchmarks" / "models")
    args.results = args.results or (args.out / "results" if args.quick else REPO / "benchmarks" / "results")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/synth2d.py " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    for d in (args.out, args.models, args.results):
        d.mkdir(parents=True, exist_ok=True)
    split = make_split(args.data, args.out, args.split_seed, 70, 10, 20)
    log(f"split (seed {args.split_seed}) -> {args.out}/split.json; models -> {args.models}; results -> {args.results}")

    # 1. training
    t0 = time.perf_counter()
    train_info = {}
    for t in args.transforms:
        for v in args.variants:
            train_info[f"{v}-{t}"] = train_one(v, t, args, args.data, args.out, args.models)
    t_train = time.perf_counter() - t0
    if args.train_only:
        return 0

    # 2. evaluation (cached per model in OUT/eval)
    t0 = time.perf_counter()
    split_name = args.eval_split
    rows_i, rows_s = _read_rows(args.out / f"{split_name}.csv"), _read_rows(args.out / f"{split_name}.seg.csv")
    pairs = [Pair(args.data, a, b) for a, b in zip(rows_i, rows_s)]
    if args.quick:
        pairs = pairs[:3]
    cache = args.out / ("eval" if split_name == "eval" else f"eval-{split_name}")
    cache.mkdir(exist_ok=True)
    lr_tag = f"-lr{args.refine_lr:g}" if args.refine_lr is not None else ""
    it_tag = f"-it{args.refine}" if args.refine != 50 and not args.quick else ""

    def cached(name: str, fn):
        f = cache / f"{name}.json"
        if f.exists() and not args.re_eval:
            return json.loads(f.read_text())
        t1 = time.perf_counter()
        value = fn()
        value["seconds"] = time.perf_counter() - t1
        f.write_text(json.dumps(value, indent=1) + "\n")
        log(f"evaluated {name} in {value['seconds']:.0f} s")
        return value

    ev: dict = {"identity": cached("identity", lambda: {p.id: tree_metrics(p, None) for p in pairs}),
                "ground_truth": cached("ground_truth", lambda: {p.id: tree_metrics(p, p.ground_truth) for p in pairs})}
    ev["identity"].pop("seconds", None)
    ev["ground_truth"].pop("seconds", None)
    for t in args.transforms:
        for v in args.variants:
            path = args.models / f"synth2d-{v}-{t}.pt"
            ev[f"{v}-{t}"] = cached(f"{v}-{t}{config_tag(t, args)}{lr_tag}{it_tag}",
                                    lambda path=path: evaluate_model(path, pairs, args.refine, args.refine_lr))
        if not args.skip_soi:
            ev[f"soi-{t}"] = cached(f"soi-{t}{config_tag(t, args)}",
                                    lambda t=t: soi_best_case(pairs, t, args.models, args.soi_iterations, args.lr))
    t_eval = time.perf_counter() - t0

    # 3. report
    suffix = "" if split_name == "eval" else f"-{split_name}"
    fig_model = args.models / "synth2d-istn-i-affine.pt"
    if fig_model.exists() and split_name == "eval":
        render_figure(pairs[:3], fig_model, args.refine, args.results / "synth2d.png")
    timing = {"command": command, "train_s": sum(i.get("seconds", 0.0) for i in train_info.values()),
              "train_this_invocation_s": t_train, "evaluation_this_invocation_s": t_eval,
              "evaluation_s": sum(e.get("seconds", 0.0) for k, e in ev.items() if isinstance(e, dict) and "seconds" in e),
              "total_this_invocation_s": time.perf_counter() - t_all}
    res = build_json(ev, split, args, train_info, timing)
    (args.results / f"synth2d{suffix}.json").write_text(json.dumps(res, indent=1) + "\n")
    notes = args.notes.read_text() if (args.notes.exists() and not args.quick and split_name == "eval") else ""
    (args.results / f"synth2d{suffix}.md").write_text(build_markdown(res, args, notes))
    log(f"wrote {args.results}/synth2d{suffix}.{{json,md}}")
    print(summary_table(res, args))
    return 0


def summary_table(res: dict, args: argparse.Namespace) -> str:
    return console_table(res, args.transforms, before=[("Id", {t: res["identity"] for t in args.transforms})],
                         after=[("SoI", res["soi"]), ("GT", {t: res["ground_truth"] for t in args.transforms})])


if __name__ == "__main__":
    sys.exit(main())
