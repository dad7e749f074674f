#!/usr/bin/env python3
"""The ISTN paper's Table 1 (Lee et al., MICCAI 2019) on real 3D brains: STN-u, STN-s, ISTN-e, ISTN-i, affine
and B-spline, one pass and after test-time refinement, on the held-out test subject Colin27 -> ICBM 2009c.

Models: the checkpoints of ``benchmarks/train_brain.py`` runs, one folder per variant
(``<runs>/<variant>/<stage>/{best,last}.pt``; every variant trained from scratch with the same steps). Each
available checkpoint (``--checkpoint best``: lowest validation MSE(T(S_s), S_t), the default; or ``last``) is
exported to TorchScript (`istn.export.build_metadata` + `export_model`, as train_brain.py exports) and loaded
like any user's model (`istn.export.load_model`).

Pairs: exactly those of ``benchmarks/brain3d.py`` (`brain3d.place_pair`): Colin27 (never in training or
validation) placed in a scanner position by the seeded affine of seed 101, 102, ... (`istn.demo.place_in_scanner`),
as the BRAIN-EXTRACTED (``colin27_t1_brain``) and the WHOLE-HEAD (``colin27_t1``) moving image (same position),
registered to ICBM 2009c (``icbm2009c_t1``, skull-stripped), 2 mm grids (``python -m istn.braindata DATA``).

Registration: the engine's public `istn.registration.register(fixed, moving, model, iterations=N)` with the
model's stored refinement defaults (learning rate = training lr; bending and tolerance from the model's
``refinement`` metadata, which train_brain checkpoints do not have: 0 and 0 unless ``--bending/--tolerance``).
'before' = its ``one_pass_transform``, which is exactly ``register(..., iterations=0).transform`` (one pass;
checked by Testing/test_brain_table1.py); 'after' = its ``transform``. The B-spline model of variant V starts
from the refined affine result of the same variant V (``initial_transform=``), as the bundled pipeline does.

Scores (`brain3d.overlap_scores`, world space): the moving labels and brain mask warped nearest-neighbour through
the transform onto the fixed grid; Dice, ASD (average symmetric SURFACE distance, mm) and HD95, each the mean
over the 8 structures (labels 1..8: L/R caudate, putamen, pallidum, thalamus); brain-mask Dice; B-spline folding.

SoI best case: the STN refined on the pair's TRUE label maps instead of the ITN maps (`istn.refinement.refine`,
MSE(T(S_s), S_t), the network grids of `register`), from the trained ISTN-e network of the stage (its STN was
trained on maps regressed onto the SoI); affine, then B-spline from that affine: the upper bound the maps allow.

ITN maps (ISTN-e, ISTN-i): each model's ITN run on the held-out heads (moving Colin27 of every pair, fixed ICBM
2009c) on their internal grids (as `register` does), thresholded at 0.5; Dice per structure against the
reference labels resampled (nearest neighbour) onto the grid, and the fraction of each map's mass outside its
structure dilated by ``--dilation-mm`` (spots beside the structures).

Writes ``<out>/brain_table1.{md,json}`` (default benchmarks/results) and prints the table. Work (exported
models, a per-case cache that makes an interrupted run resume) goes to ``--work`` (default runs/brain_table1).

    python benchmarks/brain_table1.py --runs /work/table1                  # the report: 8 pairs, ~16-20 min
    python benchmarks/brain_table1.py --runs /work/table1 --pairs 1 --stages affine --checkpoint last
    python benchmarks/brain_table1.py --quick --runs R --data D --out O    # tiny smoke run (the test)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "ISTNRegistration"))  # the engine without installing it
sys.path.insert(0, str(HERE))  # brain3d, table1, train_brain beside this script

from brain3d import SEED0, VARIANT_TEXT, eval_volumes, overlap_scores, place_pair, sampled_transform  # noqa: E402
from istn import __version__ as ENGINE_VERSION  # noqa: E402
from istn.braindata import LABELS  # noqa: E402
from istn.data import image_to_tensor, intensity_window, network_grid, soi_to_tensor  # noqa: E402
from istn.export import LoadedModel, build_metadata, export_model, load_model  # noqa: E402
from istn.geometry import resample_to_grid  # noqa: E402
from istn.metrics import dice, folding_fraction  # noqa: E402
from istn.refinement import refine  # noqa: E402
from istn.inputs import prepare_image  # noqa: E402
from istn.registration import aligned_grid, moving_map_grid, register  # noqa: E402
from istn.transforms import (bspline_to_world, compose, matrix_to_sitk_affine, sitk_affine_to_matrix,  # noqa: E402
                             theta_to_world)
from table1 import (ISTNS, NAMES, TRANSFORM_NAMES, VARIANTS, claims, claims_markdown, console_table,  # noqa: E402
                    fmt, markdown_table)
from train_brain import SOI_DESCRIPTION, read_run  # noqa: E402

STAGES = ("affine", "bspline")
MOVING = ("brain", "whole-head")
LABEL_NAMES = {name: name.replace("left_", "L ").replace("right_", "R ") for name in LABELS}
SCORE_KEYS = ("dice", "asd", "hd95", "mask_dice")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# --------------------------------------------------------------------------
# models: the runs' checkpoints, exported
# --------------------------------------------------------------------------


def export_runs(runs: Path, variants, stages, checkpoint: str, models_dir: Path) -> tuple[dict, dict]:
    """Export ``<runs>/<variant>/<stage>/<checkpoint>.pt`` of every variant and stage that has one.

    Returns ``({(variant, stage): LoadedModel}, {variant: {stage: training info | {"missing": why}}})``.
    """
    models, info = {}, {}
    models_dir.mkdir(parents=True, exist_ok=True)
    for v in variants:
        info[v] = {}
        for s in stages:
            d = runs / v / s
            if not (d / f"{checkpoint}.pt").exists() or not (d / "last.pt").exists():
                info[v][s] = {"missing": f"no {d / (checkpoint + '.pt')}"}
                continue
            run = read_run(d, checkpoint)
            meta = build_metadata(run["config"], soi_description=SOI_DESCRIPTION,
                                  training_data=f"benchmarks/train_brain.py run {d} (T1 anatomies of train.csv; "
                                                "Colin27 held out)",
                                  step=run["exported_step"], best_val=run["exported_val"],
                                  extra={"steps_trained": run["steps"], "checkpoint": checkpoint,
                                         "script": "benchmarks/brain_table1.py (export of a train_brain.py checkpoint)"})
            path = models_dir / f"{v}-{s}.pt"
            export_model(run["model"], meta, path)
            models[(v, s)] = load_model(path)
            m = run["config"].model
            info[v][s] = {"checkpoint": str(d / f"{checkpoint}.pt"), "which": checkpoint, "model": str(path),
                          "weights_sha256": _weights_sha(run["model"]), "steps": run["steps"],
                          "exported_step": run["exported_step"], "best_step": run["best_step"],
                          "best_val_soi_mse": run["best_val"], "exported_val_soi_mse": run["exported_val"],
                          "seconds_per_step": run["seconds_per_step"], "lr": run["config"].lr,
                          "batch_size": run["config"].batch_size, "grid": f"{m.grid_size[0]}^3 x {m.grid_spacing:g} mm",
                          "itn_output": m.itn_output, "refinement_metadata": models[(v, s)].meta.get("refinement")}
            log(f"{v} {s}: {checkpoint} checkpoint step {run['exported_step']} of {run['steps']} "
                f"(best step {run['best_step']}) -> {path}")
    return models, info


def _weights_sha(model: torch.nn.Module) -> str:
    """A hash of the weights alone (the exported file also holds a creation date)."""
    h = hashlib.sha256()
    for k, t in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------
# one case: a seed's scanner position, one moving variant
# --------------------------------------------------------------------------


class Case:
    def __init__(self, vols: dict, moving: str, seed: int) -> None:
        self.moving_kind, self.seed = moving, seed
        self.key = f"{moving}/seed {seed}"
        self.fixed, self.fixed_labels, self.fixed_mask = vols["fixed"], vols["fixed_labels"], vols["fixed_mask"]
        self.moving, self.moving_labels, self.moving_mask, self.perturbation = place_pair(vols, moving, seed)

    def score(self, tx: sitk.Transform | None) -> dict:
        tx = tx if tx is not None else sitk.Transform(3, sitk.sitkIdentity)
        nonlinear = not tx.IsLinear()
        sample_tx, _ = sampled_transform(tx, self.fixed, nonlinear)
        out = overlap_scores(sample_tx, self.fixed_labels, self.fixed_mask, self.moving_labels, self.moving_mask)
        if nonlinear:
            out["folding"] = folding_fraction(sample_tx, self.fixed, self.fixed_mask)
        return out


def _affine_params(tx: sitk.Transform) -> list[float]:
    return sitk_affine_to_matrix(tx).ravel().tolist()


def _affine_from(params: list[float]) -> sitk.Transform:
    m = np.asarray(params, float)
    d = int(round(np.sqrt(m.size))) - 1
    return matrix_to_sitk_affine(m.reshape(d + 1, d + 1))


def register_scored(case: Case, model: LoadedModel, args, initial: sitk.Transform | None = None) -> dict:
    """One `register` call; the one-pass and the refined transform scored."""
    r = register(case.fixed, case.moving, model, iterations=args.iterations, device="cpu", threads=args.threads,
                 initial_transform=initial, bending=args.bending, tolerance=args.tolerance)
    out = {"before": case.score(r.one_pass_transform), "after": case.score(r.transform),
           "iterations": r.iterations, "best_iteration": r.best_iteration, "converged": r.converged,
           "loss_one_pass": r.loss_one_pass, "loss_final": r.loss_final, "seconds": r.timings["total"],
           "one_pass_seconds": r.timings["one_pass"], "refine_seconds": r.timings["refine"],
           "warnings": list(r.warnings)}
    if model.transform_type == "affine":
        out["transform_after"] = _affine_params(r.transform)
    return out


def soi_best_case(case: Case, affine: LoadedModel | None, bspline: LoadedModel | None, iterations: int) -> dict:
    """The transform refined on the pair's true label maps: affine (``affine``'s network), then B-spline
    (``bspline``'s network) from that affine, each on the grids `register` uses, scored like the models."""
    labels = list(LABELS.values())
    out: dict = {}
    a_tx = None
    if affine is not None:
        cfg = affine.config
        grid_f, grid_m = network_grid(case.fixed, cfg), network_grid(case.moving, cfg)
        s = soi_to_tensor(case.moving_labels, grid_m, "labels", labels)
        t = soi_to_tensor(case.fixed_labels, grid_f, "labels", labels)
        t0 = time.perf_counter()
        r = refine(affine.module, s, t, iterations, _lr(affine))
        a_tx = matrix_to_sitk_affine(theta_to_world(r.params[0].double().numpy(), grid_f, grid_m))
        out["affine"] = {**case.score(a_tx), "loss_final": r.final_loss, "seconds": time.perf_counter() - t0}
    if bspline is not None and a_tx is not None:
        cfg = bspline.config
        a_mat = sitk_affine_to_matrix(a_tx)
        work = aligned_grid(network_grid(case.fixed, cfg), a_mat)  # the fixed grid carried into moving space
        s = soi_to_tensor(case.moving_labels, work, "labels", labels)
        t = soi_to_tensor(case.fixed_labels, work, "labels", labels, matrix_to_sitk_affine(np.linalg.inv(a_mat)))
        t0 = time.perf_counter()
        r = refine(bspline.module, s, t, iterations, _lr(bspline))
        tx = compose(a_tx, bspline_to_world(r.params[0].double().numpy(), work, cfg.cp_spacing_voxels))
        out["bspline"] = {**case.score(tx), "loss_final": r.final_loss, "seconds": time.perf_counter() - t0}
    return out


def _lr(model: LoadedModel) -> float:
    return float(model.meta.get("training", {}).get("config", {}).get("lr", 1e-3))


def map_quality(model: LoadedModel, image: sitk.Image, labels: sitk.Image, dilation_mm: float,
                representation: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                fixed: sitk.Image | None = None, initial_transform: sitk.Transform | None = None,
                result: sitk.Transform | None = None) -> dict:
    """The model's ITN maps of ``image`` on its internal grid against ``labels``.

    ``representation``: what makes the maps from the normalised image ``(1, 1, *S) -> (1, K, *S)`` (default the
    model's ITN; `refinement_maps.py` probes others).
    ``fixed``: measure the maps as `register(fixed, image, model, initial_transform=...)` shows them (its
    ``moving_map``, per structure): the image's working copy and window (`prepare_image`) on the stage's grid
    (`moving_map_grid`: the fixed grid carried into the moving image's space, the moving head in the fixed
    head's pose: for a B-spline stage by the affine it starts from, for an affine stage by its ``result``;
    an affine stage without ``result``: the image's own grid, where its refinement compares the maps);
    without ``fixed``, the image's own internal grid from the raw image (Table 1's measure).

    Per structure k: Dice of (map_k > 0.5) with the reference structure resampled nearest-neighbour onto the
    grid; ``mass_outside``: the fraction of map_k's mass outside the structure dilated by ``dilation_mm``;
    ``volume_ratio``: thresholded map volume / structure volume; ``offset_mm``: where the thresholded map lies
    against the structure, the centroid of (map_k > 0.5) minus the structure's, world mm (None if either is
    empty). ``mass_outside_all``: the fraction of all maps' mass outside every dilated structure (spots away
    from any structure, not just the wrong one). ``grid``: where the maps were made (size, spacing, origin,
    direction, ITK order).
    Mass = the map's values clipped at 0 (sigmoid maps are in [0, 1] anyway).
    """
    cfg = model.config
    if fixed is None:
        grid = network_grid(image, cfg)
        window = intensity_window(sitk.GetArrayViewFromImage(image), *model.intensity,
                                  foreground=model.intensity_foreground)
        source = image_to_tensor(image, grid, window)
    else:
        f_in, m_in = (prepare_image(im, cfg.grid_spacing, model.intensity, model.intensity_foreground,
                                    cfg.centre_on_foreground) for im in (fixed, image))
        grid = moving_map_grid(f_in, m_in, model, initial_transform, result=result)
        source = image_to_tensor(m_in.image, grid, m_in.window)
    with torch.no_grad():
        maps = (representation or model.module.representation)(source)[0].numpy()
    mass_maps = np.clip(maps, 0.0, None)  # a linear ITN head can go negative: no mass there
    ref = sitk.GetArrayFromImage(resample_to_grid(labels, grid, interpolator=sitk.sitkNearestNeighbor))
    radius = int(round(dilation_mm / cfg.grid_spacing))
    per, union = {}, np.zeros(ref.shape, bool)
    for k, (name, value) in enumerate(LABELS.items()):
        m, s = mass_maps[k], ref == value
        near = ndimage.binary_dilation(s, iterations=radius) if radius > 0 else s
        union |= near
        mass = float(m.sum())
        on = maps[k] > 0.5
        # argwhere gives array order (z, y, x); the grid takes voxel indices (x, y, z)
        offset = (grid.voxel_to_world(np.argwhere(on)[:, ::-1].mean(0)) - grid.voxel_to_world(
            np.argwhere(s)[:, ::-1].mean(0))).tolist() if on.any() and s.any() else None
        per[name] = {"dice": dice(on, s),
                     "mass_outside": float(m[~near].sum()) / mass if mass > 0 else float("nan"),
                     "volume_ratio": float(on.sum()) / max(int(s.sum()), 1), "offset_mm": offset}
    total = float(mass_maps.sum())
    return {"per_structure": per, "dice": float(np.mean([p["dice"] for p in per.values()])),
            "mass_outside": float(np.nanmean([p["mass_outside"] for p in per.values()])),
            "mass_outside_all": float(mass_maps[:, ~union].sum()) / total if total > 0 else float("nan"),
            "dilation_voxels": radius, "grid": {"size": list(grid.size), "spacing": list(grid.spacing),
                                                "origin": list(grid.origin), "direction": list(grid.direction)}}


def evaluate_case(case: Case, models: dict, args, cache: dict) -> dict:
    """Every model on one case (cached by model weights and settings: an interrupted run resumes)."""
    def cached(key: str, fn):
        if key not in cache:
            cache[key] = fn()
        return cache[key]

    tag = f"its{args.iterations}-b{args.bending}-t{args.tolerance}"
    out: dict = {"key": case.key, "seed": case.seed, "moving": case.moving_kind, "perturbation": case.perturbation,
                 "identity": cached("identity", lambda: case.score(None)), "affine": {}, "bspline": {}, "maps": {},
                 "overlay_maps": {}}
    for v in args.variants:
        aff, bsp = models.get((v, "affine")), models.get((v, "bspline"))
        a_key = f"{v}-affine-{aff.meta['_weights']}-{tag}" if aff is not None else None
        if aff is not None and "affine" in args.stages:
            out["affine"][v] = cached(a_key, lambda: register_scored(case, aff, args))
        if bsp is not None and aff is not None and "bspline" in args.stages:
            init = _affine_from(cached(a_key, lambda: register_scored(case, aff, args))["transform_after"])
            out["bspline"][v] = cached(f"{v}-bspline-{bsp.meta['_weights']}-from-{a_key}",
                                       lambda: register_scored(case, bsp, args, init))
        if v in ISTNS:
            for s in args.stages:
                m = models.get((v, s))
                if m is not None:
                    out["maps"][f"{v}-{s}"] = cached(f"{v}-{s}-maps-{m.meta['_weights']}-d{args.dilation_mm}",
                                                     lambda: map_quality(m, case.moving, case.moving_labels, args.dilation_mm))
                    if a_key is not None and a_key in cache:
                        # what `register` shows as the moving map: an affine stage's in its result's pose, a
                        # B-spline stage's on the grid its starting affine carries (`moving_map_grid`)
                        a_tx = _affine_from(cache[a_key]["transform_after"])
                        pose = {"result": a_tx} if s == "affine" else {"initial_transform": a_tx}
                        out["overlay_maps"][f"{v}-{s}"] = cached(
                            f"{v}-{s}-overlay-maps-{m.meta['_weights']}-from-{a_key}-d{args.dilation_mm}",
                            lambda: map_quality(m, case.moving, case.moving_labels, args.dilation_mm,
                                                fixed=case.fixed, **pose))
    if not args.skip_soi:
        start = {s: next((models[(v, s)] for v in ("istn-e", "istn-i") if (v, s) in models), None) for s in STAGES}
        if "bspline" not in args.stages:
            start["bspline"] = None
        if start["affine"] is not None:
            key = "soi-" + "-".join(m.meta["_weights"] if m else "none" for m in start.values()) + f"-its{args.soi_iterations}"
            out["soi"] = cached(key, lambda: soi_best_case(case, start["affine"], start["bspline"], args.soi_iterations))
            out["soi_start"] = {s: (m.meta["variant"] if m else None) for s, m in start.items()}
    return out


# --------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------


def _mean_std(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _stats(rows: list[dict], keys=SCORE_KEYS + ("folding",)) -> dict:
    out = {}
    for k in keys:
        if any(k in r for r in rows):
            out[k], out[k + "_std"] = _mean_std([r.get(k) for r in rows])
    return out


def _map_summary(per_case: list[dict]) -> dict:
    """Mean ± std over the cases of each model's `map_quality` (one dict of model key -> quality per case)."""
    maps = {}
    for key in sorted({k for c in per_case for k in c}):
        rows = [c[key] for c in per_case if key in c]
        maps[key] = {"dice": _mean_std([r["dice"] for r in rows]),
                     "mass_outside": _mean_std([r["mass_outside"] for r in rows]),
                     "mass_outside_all": _mean_std([r["mass_outside_all"] for r in rows]),
                     "per_structure_dice": {n: float(np.mean([r["per_structure"][n]["dice"] for r in rows]))
                                            for n in LABELS},
                     "per_structure_mass_outside": {n: float(np.nanmean([r["per_structure"][n]["mass_outside"]
                                                                         for r in rows])) for n in LABELS}}
    return maps


def summarise(cases: list[dict], stages) -> dict:
    """Per moving variant: Table 1 results (`table1` layout), Id and SoI columns, map quality."""
    out = {}
    for mv in MOVING:
        cs = [c for c in cases if c["moving"] == mv]
        if not cs:
            continue
        res: dict = {t: {} for t in stages}
        for t in stages:
            for v in VARIANTS:
                rows = [c for c in cs if v in c[t]]
                if not rows:
                    continue
                b, a = _stats([c[t][v]["before"] for c in rows]), _stats([c[t][v]["after"] for c in rows])
                r = {f"{k}_{stage}{sfx}": st[k + sfx] for stage, st in (("before", b), ("after", a))
                     for k in SCORE_KEYS + ("folding",) if k in st for sfx in ("", "_std")}
                r["dice_per_label_after"] = np.mean([c[t][v]["after"]["dice_per_label"] for c in rows], 0).tolist()
                r["iterations"] = float(np.mean([c[t][v]["iterations"] for c in rows]))
                r["median_seconds"] = float(np.median([c[t][v]["seconds"] for c in rows]))
                r["warnings"] = sorted({w for c in rows for w in c[t][v]["warnings"]})
                r["per_pair"] = {c["key"]: {"before": c[t][v]["before"], "after": c[t][v]["after"]} for c in rows}
                r["pairs"] = len(rows)
                res[t][v] = r
        identity = _stats([c["identity"] for c in cs])
        soi = {t: _stats([c["soi"][t] for c in cs if t in c.get("soi", {})]) for t in stages}
        soi = {t: s for t, s in soi.items() if s}
        maps = {field: _map_summary([c.get(field, {}) for c in cs]) for field in ("maps", "overlay_maps")}
        out[mv] = {"results": res, "identity": identity, "soi": soi, "moving_maps": maps["maps"],
                   "overlay_maps": maps["overlay_maps"],
                   "seeds": sorted({c["seed"] for c in cs}), "claims": claims(res, stages, soi or None),
                   "soi_start": next((c["soi_start"] for c in cs if "soi_start" in c), None)}
    return out


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------


def _git(*a: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _map_table(rows: list[tuple[str, dict | None]]) -> list[str]:
    head = ["model", "image"] + list(LABEL_NAMES.values()) + ["mean Dice", "mass outside (own structure)",
                                                             "mass outside (all structures)"]
    lines = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for label, m in rows:
        if m is None:
            continue
        per = m["per_structure_dice"]
        lines.append(f"| {label} | " + " | ".join(f"{per[n]:.2f}" for n in LABELS)
                     + f" | {fmt(*m['dice'])} | {100 * m['mass_outside'][0]:.1f} % | {100 * m['mass_outside_all'][0]:.1f} % |")
    return lines


def _fixed_map_summary(q: dict) -> dict:
    return {"dice": (q["dice"], None), "mass_outside": (q["mass_outside"], None),
            "mass_outside_all": (q["mass_outside_all"], None),
            "per_structure_dice": {n: q["per_structure"][n]["dice"] for n in LABELS}}


def build_markdown(res: dict) -> str:
    s, L = res["settings"], []
    stages = s["stages"]
    L.append("# brain_table1: the ISTN paper's Table 1 on real 3D brains (held-out Colin27 -> ICBM 2009c)\n")
    L.append(f"Generated by `benchmarks/brain_table1.py` on {res['date']} (engine {ENGINE_VERSION} at commit "
             f"`{res['commit'][:12]}`, torch {res['versions']['torch']}, CPU, {s['threads']} thread(s)). "
             f"Mean ± std (sample std; 0 for one pair) over {s['pairs']} scanner position(s) (seeds {', '.join(map(str, s['seeds']))}).\n")
    L.append("Moving: Colin27 (the held-out test subject: never in training or validation) placed in scanner "
             "positions by seeded random affines (10-20 deg, 10-20 mm, ±10 %; `istn.demo.place_in_scanner`, the "
             "pairs of `benchmarks/brain3d.py`), brain-extracted and whole-head (same positions); fixed: ICBM 2009c "
             "(skull-stripped); 2 mm grids. Dice, ASD (average symmetric SURFACE distance, mm): mean over the 8 "
             "sub-cortical structures (L/R caudate, putamen, pallidum, thalamus; Colin27 AAL vs ICBM 2009c HCPex "
             "labels, two atlases, so even a perfect registration stays well below Dice 1). 'before refinement' = "
             f"one pass of the network; 'after' = {s['iterations']} iterations of test-time refinement "
             "(`istn.registration.register`). B-spline: the model of each variant starts from the refined affine "
             "result of the SAME variant, so its 'before' row is the B-spline one pass on top of that. Id: no "
             "registration (the scanner position). SoI best case: see Settings; shown in the 'before' rows as in "
             "the paper.\n")
    refs = lambda d: ([("Id", {t: d["identity"] for t in stages})], [("SoI best case", d["soi"])])  # noqa: E731
    for mv, d in res["moving"].items():
        before, after = refs(d)
        L.append(f"## Moving: {VARIANT_TEXT[mv]} ({len(d['seeds'])} pair{'s' if len(d['seeds']) != 1 else ''})\n")
        L += markdown_table(d["results"], stages, before=before, after=after)
        L.append("")
        L.append("Brain-mask Dice (`icbm2009c_t1 > 0` vs the warped `colin27_t1_brain > 0`: harm outside the "
                 "structures):\n")
        L += markdown_table(d["results"], stages, before=[("Id", {t: d["identity"] for t in stages})],
                            after=[("SoI best case", d["soi"])], metrics=(("mask_dice", "brain-mask Dice", 3),))
        L.append("")
        if "bspline" in d["results"] and d["results"]["bspline"]:
            L.append("B-spline folding (% of fixed brain voxels with Jacobian determinant <= 0, one pass / after): "
                     + "; ".join(f"{NAMES[v]} {100 * r.get('folding_before', float('nan')):.3f} / "
                                 f"{100 * r.get('folding_after', float('nan')):.3f}" for v, r in d["results"]["bspline"].items())
                     + ".\n")
        its = "; ".join(f"{TRANSFORM_NAMES[t]} {NAMES[v]} {r['iterations']:.0f} its, {r['median_seconds']:.1f} s"
                        for t in stages for v, r in d["results"].get(t, {}).items())
        if its:
            L.append(f"Refinement iterations run (mean) and wall time per registration (median, {s['threads']} thread): {its}.\n")
        warn = sorted({w for t in stages for r in d["results"].get(t, {}).values() for w in r["warnings"]})
        if warn:
            L.append("Engine warnings: " + " | ".join(warn) + "\n")

    # ITN maps
    L.append("## ITN maps on the held-out heads (ISTN-e, ISTN-i)\n")
    L.append(f"Each model's ITN run on the image's own internal grid, each of the 8 channels "
             f"thresholded at 0.5, the moving head left in its scanner position (Table 1's measure of the networks "
             f"alone; an affine stage's refinement compares these maps): Dice per structure against the reference "
             f"labels resampled nearest-neighbour onto that grid. Mass outside: the fraction of a map's total value "
             f"lying outside its own structure dilated by {s['dilation_mm']:g} mm (mean over the 8 maps), and "
             f"outside every dilated structure (spots away from all of them). Moving rows: mean ± std over the "
             f"pairs' scanner positions. The next table scores the maps as `register` shows them.\n")
    rows = []
    for key in (f"{v}-{t}" for v in ISTNS for t in stages):
        if key in res["fixed_maps"]:
            v, t = key.rsplit("-", 1)
            name = f"{NAMES[v]} {TRANSFORM_NAMES[t]}"
            rows.append((f"{name} | fixed ICBM 2009c", _fixed_map_summary(res["fixed_maps"][key])))
            for mv, d in res["moving"].items():
                if key in d["moving_maps"]:
                    rows.append((f"{name} | moving Colin27 {mv}", d["moving_maps"][key]))
    L += _map_table(rows) if rows else ["No ISTN model was evaluated."]
    overlay = [(f"{NAMES[v]} {TRANSFORM_NAMES[t]} | moving Colin27 {mv}", d["overlay_maps"][f"{v}-{t}"])
               for v in ISTNS for t in stages for mv, d in res["moving"].items()
               if f"{v}-{t}" in d.get("overlay_maps", {})]
    if overlay:
        L.append("\nThe moving maps as `register` shows them (the overlay in Slicer, `itn_moving` of `istn register`; "
                 "`RegistrationResult.moving_map`): the moving head on the fixed network grid carried into its "
                 "space, in the fixed head's pose: an affine stage's by its own refined result, a B-spline "
                 "stage's by the refined affine it starts from (`moving_map_grid`). Same thresholds and measures.\n")
        L += _map_table(overlay)
    L.append("")

    # claims
    L.append("## The paper's claims on these numbers\n")
    L.append("Decided by the script from the tables above (mean Dice higher, mean ASD lower; each comparison also "
             "counts the pairs on which it holds). 'holds': every comparison; 'partly': some; 'does not hold': none. "
             "With few pairs and one test subject, differences of a few hundredths of Dice are within noise.\n")
    for mv, d in res["moving"].items():
        L.append(f"### Moving: {VARIANT_TEXT[mv]}\n")
        L += claims_markdown(d["claims"])
        L.append("")

    # models and settings
    L.append("## Models\n")
    L.append("| variant | stage | checkpoint | exported step | steps trained | best validation step | best val MSE(T(S_s), S_t) | s/step | lr | grid | ITN output |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for v, per in res["models"].items():
        for t, m in per.items():
            if "missing" in m:
                L.append(f"| {NAMES[v]} | {t} | missing ({m['missing']}) | | | | | | | | |")
                continue
            sps = f"{m['seconds_per_step']:.2f}" if m.get("seconds_per_step") else "?"
            itn = m["itn_output"] if v in ISTNS else "- (no ITN)"
            L.append(f"| {NAMES[v]} | {t} | {m['which']} | {m['exported_step']} | {m['steps']} | {m['best_step']} | "
                     f"{m['best_val_soi_mse']:.6f} | {sps} | {m['lr']:g} | {m['grid']} | {itn} |")
    L.append("")
    for t in stages:
        steps = {NAMES[v]: per[t]["steps"] for v, per in res["models"].items() if "steps" in per.get(t, {})}
        if len(set(steps.values())) > 1:
            L.append(f"**{TRANSFORM_NAMES[t]} models were trained for different numbers of steps** ("
                     + ", ".join(f"{n} {k}" for n, k in steps.items()) + "): the comparison is not at equal training.\n")
    L.append("## Settings\n")
    L.append(f"- Command: `{s['command']}`")
    L.append(f"- Runs: `{s['runs']}` (`<variant>/<stage>/{s['checkpoint']}.pt`, exported to TorchScript in "
             f"`{s['work']}/models`); data: `{s['data']}`.")
    L.append(f"- Registration: `register(fixed, moving, model, iterations={s['iterations']}, threads={s['threads']}, "
             f"bending={s['bending']}, tolerance={s['tolerance']})` (None: the model's `refinement` metadata, else 0; "
             "the exported checkpoints carry none, so every refinement runs all iterations without bending); lr = "
             "the model's training lr; fresh Adam on the STN weights per pair, ITN frozen; the inverse-consistent "
             "one pass (`symmetric=True`, the engine's default) starts refinement. 'before' = `one_pass_transform` "
             "of that call (= `register(..., iterations=0).transform`).")
    soi_start = next((d["soi_start"] for d in res["moving"].values() if d.get("soi_start")), None)
    if s["skip_soi"] or not soi_start:
        L.append("- SoI best case: not computed (" + ("`--skip-soi`" if s["skip_soi"] else "no ISTN model to start from")
                 + ").")
    else:
        L.append(f"- SoI best case: the trained {', '.join(f'{TRANSFORM_NAMES[t]} {NAMES.get(v, v)}' for t, v in (soi_start or {}).items() if v)} "
                 f"network(s), fed the pair's TRUE label maps (one channel per structure, resampled linearly onto the "
                 f"grids `register` uses) instead of ITN maps, refined with `istn.refinement.refine` for "
                 f"{s['soi_iterations']} iterations (Adam, the model's training lr) minimising MSE(T(S_s), S_t); "
                 "the B-spline starts from the SoI affine result"
                 + ("" if (soi_start or {}).get("bspline") or "bspline" not in stages else
                    " (B-spline: not computed, no ISTN B-spline model)") + ". Its transforms are scored like the models'. It is "
                 "the best these maps allow the STN, not the best registration possible (the labels of the two "
                 "atlases differ).")
    L.append(f"- ITN map threshold 0.5; dilation {s['dilation_mm']:g} mm (= {res['dilation_voxels']} voxel(s) of the "
             "internal grid, 6-connected steps).")
    L.append(f"- Time: {res['timing']['evaluation_s'] / 60:.1f} min of evaluation in this invocation "
             f"({res['timing']['cached_cases']} case(s) partly from the cache in `{s['work']}`); machine "
             f"{res['machine']}, {os.cpu_count()} CPUs, load average at the end {res['load_end']}.")
    L.append("")
    return "\n".join(L)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--runs", type=Path, default=Path("/work/table1"), help="variant folders of train_brain.py runs")
    p.add_argument("--data", type=Path, default=Path("/work/braindata"), help="output of python -m istn.braindata")
    p.add_argument("--out", type=Path, help="where brain_table1.{md,json} go (default benchmarks/results; --quick: WORK/results)")
    p.add_argument("--work", type=Path, help="exported models and the evaluation cache (default runs/brain_table1)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--moving", nargs="+", choices=MOVING, default=list(MOVING), help="moving image variants")
    p.add_argument("--pairs", type=int, default=8,
                   help="scanner positions (seeds 101, 102, ...); each costs ~2 min on one thread (4 variants x "
                        "affine + B-spline x brain-extracted + whole-head, SoI best case): 8 ~ 16-20 min")
    p.add_argument("--iterations", type=int, default=50, help="refinement iterations ('after' rows)")
    p.add_argument("--bending", type=float, default=None, help="B-spline bending weight (default: model metadata, else 0)")
    p.add_argument("--tolerance", type=float, default=None, help="refinement tolerance (default: model metadata, else 0)")
    p.add_argument("--soi-iterations", type=int, default=100, help="refinement iterations of the SoI best case")
    p.add_argument("--skip-soi", action="store_true")
    p.add_argument("--dilation-mm", type=float, default=4.0, help="dilation of the structures for 'mass outside'")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fresh", action="store_true", help="ignore the evaluation cache")
    p.add_argument("--quick", action="store_true", help="tiny run: 1 pair, 2 iterations, 3 SoI iterations")
    a = p.parse_args(argv)
    if a.quick:
        a.pairs, a.iterations, a.soi_iterations = 1, 2, 3
    a.work = a.work or REPO / "runs" / ("brain_table1-quick" if a.quick else "brain_table1")
    a.out = a.out or (a.work / "results" if a.quick else HERE / "results")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    command = "python benchmarks/brain_table1.py " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(a.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(a.threads)
    t_start = time.perf_counter()
    models, info = export_runs(a.runs, a.variants, a.stages, a.checkpoint, a.work / "models")
    if not models:
        raise SystemExit(f"no checkpoint found under {a.runs} (<variant>/<stage>/{a.checkpoint}.pt)")
    for (v, s), m in models.items():
        m.meta["_weights"] = info[v][s]["weights_sha256"]
    vols = eval_volumes(a.data)
    fixed_maps = {f"{v}-{s}": map_quality(m, vols["fixed"], vols["fixed_labels"], a.dilation_mm)
                  for (v, s), m in models.items() if v in ISTNS}
    cache_dir = a.work / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    cases, cached_cases = [], 0
    seeds = [SEED0 + k for k in range(a.pairs)]
    for seed in seeds:  # seed outermost: an interrupted run has whole pairs
        for mv in a.moving:
            case = Case(vols, mv, seed)
            path = cache_dir / f"{mv}_s{seed}.json"
            cache = json.loads(path.read_text()) if path.exists() and not a.fresh else {}
            cached_cases += bool(cache)
            t0 = time.perf_counter()
            res = evaluate_case(case, models, a, cache)
            path.write_text(json.dumps(cache))
            cases.append(res)
            log(f"{case.key}: {time.perf_counter() - t0:.0f} s; Dice after: " + ", ".join(
                f"{t} {NAMES[v]} {r['after']['dice']:.3f}" for t in a.stages for v, r in res[t].items()))
    moving = summarise(cases, a.stages)
    radius = next(iter(fixed_maps.values()))["dilation_voxels"] if fixed_maps else round(a.dilation_mm / 4.0)
    res = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": _git("rev-parse", "HEAD"),
           "versions": {"engine": ENGINE_VERSION, "torch": torch.__version__, "SimpleITK": sitk.Version_VersionString(),
                        "python": platform.python_version()},
           "machine": platform.platform(), "load_end": [round(x, 2) for x in os.getloadavg()],
           "settings": {"command": command, "runs": str(a.runs), "data": str(a.data), "work": str(a.work),
                        "checkpoint": a.checkpoint, "variants": a.variants, "stages": a.stages, "moving": a.moving,
                        "pairs": a.pairs, "seeds": seeds, "iterations": a.iterations, "bending": a.bending,
                        "tolerance": a.tolerance, "soi_iterations": a.soi_iterations, "skip_soi": a.skip_soi,
                        "dilation_mm": a.dilation_mm, "threads": a.threads, "quick": a.quick},
           "dilation_voxels": radius, "models": info, "moving": moving, "fixed_maps": fixed_maps, "cases": cases,
           "timing": {"evaluation_s": time.perf_counter() - t_start, "cached_cases": cached_cases}}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "brain_table1.json").write_text(json.dumps(res, indent=1) + "\n")
    (a.out / "brain_table1.md").write_text(build_markdown(res))
    log(f"wrote {a.out}/brain_table1.{{md,json}} ({(time.perf_counter() - t_start) / 60:.1f} min)")
    for mv, d in moving.items():
        print(f"\nMoving: {mv} ({len(d['seeds'])} pairs)")
        print(console_table(d["results"], a.stages, before=[("Id", {t: d["identity"] for t in a.stages})],
                            after=[("SoI", d["soi"])]))
        for k, c in d["claims"].items():
            print(f"({k}) {c['claim']}: {c['verdict']} ({c['held']} of {c['comparisons']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
