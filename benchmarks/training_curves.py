#!/usr/bin/env python3
"""Training curves of brain runs: validation loss against step, one line per run, affine and B-spline side by side.

Reads what every ``benchmarks/train_brain.py`` run records in ``<run>/<stage>/last.pt`` (the validation
history: step, training loss of that step, validation ``soi_mse`` = MSE(T(S_s), S_t) on the run's fixed
validation pairs, learning rate) and draws it, so a reader sees at a glance whether a run had converged, how
variants compare at equal budgets, and what annealing or more steps did. No network is run: it takes seconds.

The validation MSE is computed on the run's own internal grid: it compares runs on the SAME grid only (the
48^3 x 4 mm and 64^3 x 3 mm grids see the structures with different numbers of voxels). The registration Dice
of ``brain_validation.py`` compares across grids.

    python benchmarks/training_curves.py STN-u=benchmarks/checkpoints/table1/stn-u \\
        ISTN-e=benchmarks/checkpoints/table1/istn-e --out benchmarks/results/training_curves_table1

Writes ``<out>.png`` (log-scale validation MSE per stage) and ``<out>.md`` (per run and stage: steps, best
step and value, last value, seconds per step, learning-rate schedule).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))
sys.path.insert(0, str(REPO / "benchmarks"))

from istn.config import train_config_from_dict  # noqa: E402
from istn.training import load_checkpoint  # noqa: E402
from train_brain import seconds_per_step  # noqa: E402

STAGES = ("affine", "bspline")
STAGE_TITLE = {"affine": "Affine", "bspline": "B-spline"}


def read_curve(stage_dir: Path) -> dict | None:
    """``<run>/<stage>/last.pt`` as a curve: steps, validation MSE, lr, and the run's settings; None if absent."""
    path = stage_dir / "last.pt"
    if not path.exists():
        return None
    ck = load_checkpoint(path)
    cfg = ck["config"]
    cfg = train_config_from_dict(cfg) if isinstance(cfg, dict) else cfg
    hist = [h for h in ck["history"] if "soi_mse" in h]
    if not hist:
        return None
    best = min(hist, key=lambda h: h["soi_mse"])
    grid = cfg.model.grid_size
    return {"steps": [int(h["step"]) for h in hist], "val": [float(h["soi_mse"]) for h in hist],
            "lr": [float(h.get("lr", cfg.lr)) for h in hist], "trained": int(ck["step"]),
            "best_step": int(best["step"]), "best_val": float(best["soi_mse"]), "last_val": float(hist[-1]["soi_mse"]),
            "seconds_per_step": seconds_per_step(ck["history"]),
            "grid": f"{grid[0]}^{len(grid)} x {cfg.model.grid_spacing:g} mm", "variant": cfg.model.variant,
            "lr0": cfg.lr, "decay_from": cfg.lr_decay_start if cfg.lr_decay_start >= 0 else None,
            "lr_final": cfg.lr_final}


def schedule_text(c: dict) -> str:
    if c["decay_from"] is None:
        return f"{c['lr0']:g} constant"
    return f"{c['lr0']:g}, half cosine from step {c['decay_from']} to x{c['lr_final']:g}"


def table(curves: dict[str, dict[str, dict | None]]) -> list[str]:
    rows = ["| run | stage | variant | grid | steps trained | best step | best val MSE | last val MSE | s/step | lr |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, per_stage in curves.items():
        for stage in STAGES:
            c = per_stage.get(stage)
            if c is None:
                continue
            sps = f"{c['seconds_per_step']:.2f}" if c["seconds_per_step"] else "-"
            rows.append(f"| {name} | {STAGE_TITLE[stage]} | {c['variant']} | {c['grid']} | {c['trained']} | "
                        f"{c['best_step']} | {c['best_val']:.6f} | {c['last_val']:.6f} | {sps} | {schedule_text(c)} |")
    return rows


def plot(curves: dict[str, dict[str, dict | None]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, stage in zip(axes, STAGES):
        for i, (name, per_stage) in enumerate(curves.items()):
            c = per_stage.get(stage)
            if c is None:
                continue
            colour = f"C{i % 10}"
            ax.plot(c["steps"], c["val"], color=colour, lw=1.2, label=f"{name} ({c['grid']})")
            ax.plot([c["best_step"]], [c["best_val"]], "o", color=colour, ms=4)
            if c["decay_from"] is not None:  # where the learning rate starts to fall
                ax.axvline(c["decay_from"], color=colour, ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("validation MSE(T(S_s), S_t)")
        ax.set_title(f"{STAGE_TITLE[stage]} stage")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    annealed = any(c and c["decay_from"] is not None for per_stage in curves.values() for c in per_stage.values())
    fig.suptitle(title + ("  (dot: best step; dotted line: annealing starts)" if annealed else "  (dot: best step)"),
                 fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="NAME=DIR", help="run folders (each holds affine/ and/or bspline/)")
    p.add_argument("--out", required=True, help="output stem: <out>.png and <out>.md")
    p.add_argument("--title", default="Validation loss during training")
    args = p.parse_args(argv)

    curves: dict[str, dict[str, dict | None]] = {}
    for item in args.runs:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            p.error(f"expected NAME=DIR, got {item!r}")
        d = Path(folder)
        if not d.is_dir():
            p.error(f"{d}: not a folder")
        curves[name] = {s: read_curve(d / s) for s in STAGES}
        if not any(curves[name].values()):
            p.error(f"{d}: no <stage>/last.pt with a validation history")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, out.with_name(out.name + ".png"), args.title)
    command = ["python", "benchmarks/training_curves.py", *args.runs, "--out", args.out]
    if args.title != p.get_default("title"):
        command += ["--title", args.title]
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# {args.title}", "",
             f"Generated by `{shlex.join(command)}` on {now}.",
             "Validation MSE: MSE(T(S_s), S_t) on each run's fixed validation pairs (spm_avg305, never trained on), on "
             "the run's own internal grid: comparable between runs on the same grid only. s/step: median over the "
             "validation records (validation included).", "",
             f"![curves]({out.name}.png)", "", *table(curves), ""]
    out.with_name(out.name + ".md").write_text("\n".join(lines))
    print("\n".join(table(curves)))
    print(f"wrote {out}.png and {out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
