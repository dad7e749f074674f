#!/usr/bin/env python3
"""Would other maps make a better B-spline refinement? Probes of the maps the B-spline stage sees, on VALIDATION pairs.

brain3d's non-linear row trails ANTs SyN by 0.004 Dice and every refinement knob has been chosen on validation,
so the question left is the maps themselves. Each probe changes only what the bundled B-spline stage's ITN
output is (the STN's input and the refinement objective) or what the objective compares besides it; the
affine stage is the bundled affine as it is, shared by every probe. Probes:

- ``own``: the B-spline model's own maps (what `register` does);
- ``shift-tta``: its maps averaged over the 2^D grid shifts by 0 / half the U-Net's period (zero-padded, so no
  wrap-around; the U-Net's downsampling makes it shift-variant);
- ``flip-tta``: its maps averaged with those of the left-right mirrored image (mirrored back, left and right
  structure channels swapped; the internal grid's last axis is the patient's left-right axis);
- ``affine-itn``: the affine model's ITN instead (its maps of the head in its scanner position threshold better
  than the B-spline model's there; in the pose the B-spline stage sees they do not, `map_dice.py`);
- ``+affine-itn`` / ``+synth-itn``: the objective compares the affine model's / the brain-synth B-spline's
  maps too (an ensemble of two ITNs, 8 more channels of weight 1; the STN still sees its own maps);
- ``mean-synth-itn``: the mean of its maps and the brain-synth B-spline's (an ensemble of two ITNs: the STN sees
  and the objective compares the mean);
- ``+image:W``: the objective compares the normalised images too (one more channel of weight W).

Per probe: Dice of the maps thresholded at 0.5 on the validation anatomy (mean over the pairs' moving
images as the B-spline stage sees them: after the affine, on the fixed grid carried into moving space;
`brain_table1.map_quality`; before 2026-12-04 on the head left in its scanner position), and the 8-structure
Dice after the B-spline one pass and refined (labels warped through the written world transform), the models' own refinement settings.
Validation pairs as `brain_validation.py` (spm_avg305 brain-extracted in scanner positions, seeds 500..).
Benchmark-only: the probes reach into `istn.registration` (its ``refine`` and the model's ``representation``),
which the engine offers no hook for, on purpose.

    python benchmarks/refinement_maps.py --pairs 6

Writes ``benchmarks/results/refinement_maps.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))
sys.path.insert(0, str(REPO / "benchmarks"))

import istn.registration as registration  # noqa: E402
from brain_table1 import map_quality  # noqa: E402
from brain_validation import SEED0, mean_dice, validation_inputs  # noqa: E402
from report import write_report  # noqa: E402
from istn.data.brain import LABELS, mirror_permutation  # noqa: E402
from istn.demo import MODELS_DIR, place_in_scanner  # noqa: E402
from istn.export import LoadedModel, load_model  # noqa: E402

Maps = Callable[[torch.Tensor], torch.Tensor]  # (1, 1, *S) image -> (1, K, *S) maps


def shift_tta(rep: Maps, period: int) -> Maps:
    """``rep`` averaged over the shifts 0 and period/2 along each axis (zero padding to a multiple of the period)."""
    def maps(x: torch.Tensor) -> torch.Tensor:
        d, total = x.dim() - 2, 0.0
        shifts = list(itertools.product((0, period // 2), repeat=d))
        for s in shifts:
            pad = [p for a in reversed(s) for p in (a, period - a)]  # F.pad lists the last axis first
            y = rep(F.pad(x, pad))
            total = total + y[(slice(None), slice(None)) + tuple(slice(a, a + n) for a, n in zip(s, x.shape[2:]))]
        return total / len(shifts)
    return maps


def flip_tta(rep: Maps) -> Maps:
    """``rep`` averaged with its maps of the image mirrored along the last (left-right) axis, left/right swapped."""
    swap = list(mirror_permutation(LABELS))

    def maps(x: torch.Tensor) -> torch.Tensor:
        return (rep(x) + rep(x.flip(-1)).flip(-1)[:, swap]) / 2
    return maps


@contextlib.contextmanager
def probe(model: LoadedModel, maps: Maps | None = None, extra: Maps | None = None,
          extra_weight: float = 1.0, with_image: bool = False):
    """A copy of ``model`` whose ITN output is ``maps``, and (while inside) a refinement objective that also
    compares ``extra(image)`` (weight ``extra_weight`` per channel) or the images themselves."""
    probed = copy.copy(model)  # shares the module; only the instance's representation differs
    seen: list[torch.Tensor] = []  # the images `register` asks maps of: source, then target

    def representation(x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        with torch.no_grad():
            return (maps or model.representation)(x)
    probed.representation = representation
    original = registration.refine

    def refine(module, source_map, target_map, *args, **kwargs):
        if extra is not None or with_image:
            src, tgt = seen[-2], seen[-1]
            with torch.no_grad():
                add_s, add_t = (extra(src), extra(tgt)) if extra is not None else (src, tgt)
            source_map, target_map = torch.cat([source_map, add_s], 1), torch.cat([target_map, add_t], 1)
            own = kwargs.get("channel_weights") or [1.0] * (source_map.shape[1] - add_s.shape[1])
            kwargs["channel_weights"] = list(own) + [extra_weight] * add_s.shape[1]
        return original(module, source_map, target_map, *args, **kwargs)
    registration.refine = refine
    try:
        yield probed
    finally:
        registration.refine = original


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=str(MODELS_DIR), help="folder with brain-t1-* and brain-synth-bspline.pt")
    p.add_argument("--data", default="/work/braindata", help="output of `istn data prepare`")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--image-weights", default="0.03,0.1,0.3")
    p.add_argument("--probes", default="", help="comma-separated probe names to run (default: all)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "refinement_maps"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    folder = Path(args.models)
    affine, bspline = load_model(folder / "brain-t1-affine.pt"), load_model(folder / "brain-t1-bspline.pt")
    synth = load_model(folder / "brain-synth-bspline.pt")
    period = 2 ** (len(bspline.config.itn_channels) - 1)
    probes: dict[str, dict] = {
        "own": {},
        "shift-tta": {"maps": shift_tta(bspline.representation, period)},
        "flip-tta": {"maps": flip_tta(bspline.representation)},
        "affine-itn": {"maps": affine.representation},
        "+affine-itn": {"extra": affine.representation},
        "+synth-itn": {"extra": synth.representation},
        "mean-synth-itn": {"maps": lambda x: (bspline.representation(x) + synth.representation(x)) / 2},
        **{f"+image:{w:g}": {"with_image": True, "extra_weight": w}
           for w in (float(v) for v in args.image_weights.split(","))},
    }
    if args.probes:
        probes = {n: probes[n] for n in args.probes.split(",")}
    fixed, fixed_labels, image, labels = validation_inputs(Path(args.data), "spm_avg305")
    pairs = [place_in_scanner(image, labels, seed=SEED0 + i)[:2] for i in range(args.pairs)]
    rows: dict[str, list[list[float]]] = {name: [] for name in probes}
    affines = [registration.register(fixed, m, affine, device="cpu", threads=1) for m, _ in pairs]
    map_dice: dict[str, float] = {}
    for name, spec in probes.items():  # the maps the B-spline stage compares: the head in the pose after the affine
        rep = spec.get("maps") or bspline.representation
        map_dice[name] = float(np.mean([map_quality(bspline, m, lab, 4.0, representation=rep, fixed=fixed,
                                                    initial_transform=ra.transform)["dice"]
                                        for (m, lab), ra in zip(pairs, affines)]))
    for i, ((moving, moving_labels), ra) in enumerate(zip(pairs, affines)):
        for name, spec in probes.items():
            with probe(bspline, **spec) as model:
                t0 = time.perf_counter()
                rb = registration.register(fixed, moving, model, device="cpu", threads=1,
                                           initial_transform=ra.transform)
                seconds = time.perf_counter() - t0
            rows[name].append([mean_dice(fixed_labels, moving_labels, t) for t in
                               (ra.transform, rb.one_pass_transform, rb.transform)] + [seconds])
        print(f"pair {i}: " + ", ".join(f"{n} {r[-1][2]:.3f}" for n, r in rows.items()), flush=True)
    stats = {n: {"mean": np.mean(r, 0).tolist(), "std": np.std(r, 0).tolist(), "per_pair": r,
                 "map_dice": map_dice[n]} for n, r in rows.items()}
    lines = [f"| {n} | {s['map_dice']:.3f} | {s['mean'][1]:.3f} ± {s['std'][1]:.3f} | "
             f"**{s['mean'][2]:.3f}** ± {s['std'][2]:.3f} | {s['mean'][2] - stats['own']['mean'][2]:+.3f} | "
             f"{s['mean'][3]:.2f} |" for n, s in stats.items()]
    md = f"""# What the B-spline refinement compares: probes of other maps on validation pairs

Generated by `benchmarks/refinement_maps.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC:
`python benchmarks/refinement_maps.py --pairs {args.pairs}` (models: `{args.models}`).
{args.pairs} validation pairs: spm_avg305 brain-extracted in scanner positions (seeds {SEED0}..{SEED0 + args.pairs - 1}) ->
ICBM 2009c; after the bundled affine (refined: {np.mean([r[0] for r in rows['own']]):.3f}), the bundled B-spline stage
with the maps of each probe (the script's docstring says what each is). Map Dice: the probe's maps of the moving
images after the affine, as the B-spline stage sees them, thresholded at 0.5 against their labels (network grid,
mean of the 8 structures); registration Dice: the
8 structures after the B-spline, mean ± std over pairs; seconds: the B-spline `register` call, 1 thread.

| probe | map Dice | B-spline one pass | B-spline refined | vs own | seconds |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(lines)}
"""
    write_report(args.out, {"pairs": args.pairs, "models": args.models, "probes": stats}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
