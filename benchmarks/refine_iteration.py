#!/usr/bin/env python3
"""Cost of one refinement iteration of the bundled 3D brain models, per setting (issue #12 items 2-4).

Times `istn.refinement.refine` on the models' own ITN maps of the bundled sample pair (``Resources/SampleData``,
on the internal grid, 48^3 at 4 mm, as `register` builds them: captured from one `register` call): milliseconds per
iteration (median of ``--repeats`` runs of ``--iterations``, after a warm-up), for the refined layers (``all``:
every STN weight, the paper; ``fc``: the fully connected layers, convolutions once), full grid or half-resolution
maps (coarse to fine), the 3D warp as one batch or in depth slabs (`istn.transforms.warp`, ``slabs=1`` patched in
for the "one batch" rows), and the maps compared on the whole grid or in the comparison region (the box around the
fixed structures grown by 16 mm, `istn.refinement.structure_box`; fc and slabs only).

    python benchmarks/refine_iteration.py --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))

from report import write_report  # noqa: E402

import istn.registration as registration  # noqa: E402
import istn.transforms as transforms  # noqa: E402
from istn.demo import MODELS_DIR, sample_pair  # noqa: E402
from istn.export import load_model  # noqa: E402
from istn.refinement import refine  # noqa: E402


def sample_maps(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The ITN maps ``register`` refines on for the sample pair (captured from one call)."""
    pair, seen = sample_pair(), {}

    def capture(module, s, t, *args, **kwargs):
        seen.update(s=s, t=t)
        return refine(module, s, t, 0)

    registration.refine = capture
    try:
        registration.register(pair["fixed"], pair["moving"], model, iterations=1, threads=1)
    finally:
        registration.refine = refine
    return seen["s"], seen["t"]


def one_batch_warp(image, grid, mode: str = "bilinear", slabs: int = 8):
    return ORIGINAL_WARP(image, grid, mode, 1)


ORIGINAL_WARP = transforms.warp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "refine_iteration"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for kind in ("affine", "bspline"):
        model = load_model(MODELS_DIR / f"brain-t1-{kind}.pt")
        module = model.module
        s, t = sample_maps(model)
        margin = int(round(16.0 / model.config.grid_spacing))
        for layers, slabs_opts, region in (("all", (False, True), None), ("fc", (False, True), None),
                                           ("fc", (True,), margin)):
            for coarse in (False, True):
                for slabs in slabs_opts:
                    # the scripted module's warp is its own TorchScript: the one-batch rows go through an eager copy
                    # of the same call with slabs=1 (module.warp is replaced on the Python side only)
                    if not slabs:
                        module_warp = module.warp
                        object.__setattr__(module, "warp", one_batch_warp)
                    try:
                        c = args.iterations if coarse else 0
                        refine(module, s, t, 3, layers=layers, coarse_iterations=min(c, 3), region_margin=region)
                        runs = []
                        for _ in range(args.repeats):
                            t0 = time.perf_counter()
                            refine(module, s, t, args.iterations, layers=layers, coarse_iterations=c,
                                   region_margin=region)
                            runs.append((time.perf_counter() - t0) / args.iterations * 1000)
                    finally:
                        if not slabs:
                            object.__setattr__(module, "warp", module_warp)
                    rows.append({"model": kind, "layers": layers, "maps": "half" if coarse else "full",
                                 "warp": "slabs" if slabs else "one batch",
                                 "compared": "whole grid" if region is None else "region 16 mm",
                                 "ms": statistics.median(runs)})
                    print(rows[-1], flush=True)
    base = {(r["model"], r["maps"]): r["ms"] for r in rows if r["layers"] == "all" and r["warp"] == "one batch"}
    md = [f"# One refinement iteration, per setting ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
          f"Command: `python benchmarks/refine_iteration.py --threads {args.threads}`; {platform.machine()}, "
          f"{args.threads} torch threads, torch {torch.__version__}; the bundled brain models (48^3 grid, 8 maps) on "
          "the sample pair's maps; "
          f"median over {args.repeats} runs of {args.iterations} iterations; x: against all layers, one-batch warp "
          "(the engine before these changes), same maps.", "",
          "| model | refined layers | maps | 3D warp | maps compared | ms / iteration | x |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {r['model']} | {r['layers']} | {r['maps']} | {r['warp']} | {r['compared']} | {r['ms']:.1f} | "
                  f"{base[(r['model'], r['maps'])] / r['ms']:.2f}x |")
    write_report(args.out, {"threads": args.threads, "rows": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
