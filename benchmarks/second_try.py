"""The default pipeline's second try: what a user gets from the bundled brain-t1 models on the files they bring.

When a stage's self-check fails, `istn register` and the Slicer panel register the pair again with the
varied-view models beside (brain-synth beside brain-t1) and keep the result whose images end the more alike
(`istn.chain.register_with_second_try`). This runs that exact call on `self_checks.py`'s cases (validation pairs,
an image and itself, the sample pair whole and cropped, held-out heads cropped, T1 / T2 / PD, pairs aligned
already) and reports, per case, the Dice (8 structures) of:

- **brain-t1**: the chain asked for (the default models) alone;
- **brain-synth**: the varied-view chain alone;
- **default**: what the user gets (brain-t1, then the second try where a check failed);

with how many pairs were tried again and kept the second chain, the pairs that end below no registration, and the
default pipeline's wall time. The choice uses no label: only the images' mutual information.

    python benchmarks/second_try.py --data /work/braindata2 --pairs 3 --val-pairs 6

Writes ``benchmarks/results/second_try.{md,json}``; ``--figure docs/second_try.png`` draws the cropped sample
pair (the bundled pair, no data needed: ``--figure-only`` draws just that).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))
sys.path.insert(0, str(REPO / "benchmarks"))

from hard_inputs import mean_dice  # noqa: E402
from report import write_report  # noqa: E402
from self_checks import all_cases  # noqa: E402

from istn.chain import register_chain, register_with_second_try  # noqa: E402
from istn.demo import MODELS_DIR  # noqa: E402
from istn.export import load_model  # noqa: E402


def run(first_models, second_models, fixed, fixed_labels, moving, moving_labels, threads: int) -> dict:
    t0 = time.perf_counter()
    kept, retry = register_with_second_try(fixed, moving, first_models, threads=threads)
    seconds = time.perf_counter() - t0
    first = retry.first if retry else kept
    second = retry.second if retry else register_chain(fixed, moving, second_models, threads=threads)
    return {"unregistered": mean_dice(fixed_labels, moving_labels, None),
            "first": mean_dice(fixed_labels, moving_labels, first[-1].transform),
            "second": mean_dice(fixed_labels, moving_labels, second[-1].transform),
            "default": mean_dice(fixed_labels, moving_labels, kept[-1].transform),
            "tried": retry is not None, "kept_second": bool(retry and retry.kept_second),
            "information": ({"first": retry.information_first, "second": retry.information_second} if retry
                            else None),
            "seconds": seconds}


def figure(path: Path, first_models: list, threads: int) -> Path:
    """The sample pair with the moving head cropped to its top 60 %: unregistered, the default models' result,
    the second try's (kept), coronal through the structures, label contours (fixed yellow, moving red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk
    from hard_inputs import crop_superior

    from istn.demo import sample_pair
    from istn.figures import _centroid_index, _slice, _window
    from istn.registration import warp_image

    p = sample_pair()
    fixed, fixed_labels = p["fixed"], p["fixed_labels"]
    moving, labels = crop_superior(sitk.Cast(p["moving"], sitk.sitkFloat32), p["moving_labels"], 0.6)
    kept, retry = register_with_second_try(fixed, moving, first_models, threads=threads)
    assert retry is not None, "the default models' self-checks passed on the cropped sample pair"
    panels = [("unregistered", None, None)]
    for chain, what in ((retry.first, "default models"), (retry.second, "second try")):
        info = retry.information_first if chain is retry.first else retry.information_second
        chosen = " (kept)" if chain is kept else ""
        panels.append((f"{what}{chosen}: {', '.join(Path(s.model_path).stem for s in chain)}", chain[-1].transform,
                       info))
    axis = 1  # coronal: the crop's edge runs across it
    k = _centroid_index(fixed_labels, fixed, axis)
    f = _slice(fixed, axis, k)[::-1]
    lo, hi = _window(f[f > 0])
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4.2 * (1 + len(panels)), 4.6))
    fig.patch.set_facecolor("white")

    def contours(ax, lab, colour):
        s = _slice(lab, axis, k)[::-1]
        for v in np.unique(s[s > 0]):
            ax.contour((s == v).astype(float), levels=[0.5], colors=[colour], linewidths=1.0)

    axes[0].imshow(np.clip((f - lo) / (hi - lo), 0, 1), cmap="gray")
    contours(axes[0], fixed_labels, "#ffd400")
    axes[0].set_title("Fixed (coronal)\nits labels in yellow", fontsize=10)
    for ax, (name, tx, info) in zip(axes[1:], panels):
        w = warp_image(moving, fixed, tx if tx is not None else sitk.Transform(3, sitk.sitkIdentity), default_value=0.0)
        wl = sitk.Resample(labels, fixed, tx if tx is not None else sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        a = _slice(w, axis, k)[::-1]
        mlo, mhi = _window(a[a > 0]) if (a > 0).any() else (0.0, 1.0)
        ax.imshow(np.clip((a - mlo) / (mhi - mlo), 0, 1), cmap="gray")
        contours(ax, fixed_labels, "#ffd400")
        contours(ax, wl, "#ff3b30")
        d = mean_dice(fixed_labels, labels, tx)
        extra = f", images' MI {info:.3f}" if info is not None else ""
        ax.set_title(f"{name}\nDice {d:.3f}{extra}", fontsize=10)
    for ax in axes:
        ax.axis("off")
    fig.suptitle("A moving head cropped to its top 60 %: the default T1 models' self-check fails, the second try "
                 "is kept", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def markdown(res: dict) -> str:
    lines = ["# The default pipeline's second try after a failed self-check", "",
             f"Generated by `{res['command']}` on {res['date']}. Models: {res['first']} (asked for), beside them "
             f"{res['second']} (trained on varied views). Dice of 8 structures, mean over the case's pairs; "
             "'default': what `istn register` and the panel return (the second try where a self-check failed, the "
             "result whose images end the more alike kept); 'below': pairs that end below no registration; "
             "seconds: the default pipeline's wall time, mean (2 threads).", "",
             "| case | pairs | unregistered | brain-t1 alone | brain-synth alone | default | tried / kept second | "
             "below: brain-t1 / brain-synth / default | s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    total: dict[str, list] = {"first": [], "second": [], "default": []}
    for case, rows in res["results"].items():
        def mean(k: str) -> float:
            return float(np.mean([r[k] for r in rows]))

        below = " / ".join(str(sum(r[k] < r["unregistered"] for r in rows)) for k in ("first", "second", "default"))
        lines.append(f"| {case} | {len(rows)} | {mean('unregistered'):.3f} | {mean('first'):.3f} | "
                     f"{mean('second'):.3f} | **{mean('default'):.3f}** | {sum(r['tried'] for r in rows)} / "
                     f"{sum(r['kept_second'] for r in rows)} | {below} | {mean('seconds'):.1f} |")
        for k in total:
            total[k] += [r[k] for r in rows]
    every = [r for rows in res["results"].values() for r in rows]
    lines += ["", f"All {len(every)} pairs: brain-t1 alone {np.mean(total['first']):.3f}, brain-synth alone "
              f"{np.mean(total['second']):.3f}, default {np.mean(total['default']):.3f}; tried again "
              f"{sum(r['tried'] for r in every)}, kept the second {sum(r['kept_second'] for r in every)}; "
              "below no registration: " + " / ".join(
                  str(sum(r[k] < r["unregistered"] for r in every)) for k in ("first", "second", "default"))
              + " (brain-t1 / brain-synth / default).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/work/braindata", help="output of `istn data prepare`")
    p.add_argument("--models", default=str(MODELS_DIR))
    p.add_argument("--first", default="brain-t1", help="the family asked for (its models' folder is searched)")
    p.add_argument("--second", default="brain-synth", help="the varied-view family (reported alone too)")
    p.add_argument("--pairs", type=int, default=3, help="scanner positions of each hard-input case")
    p.add_argument("--val-pairs", type=int, default=6, help="validation scanner positions (each whole and brain)")
    p.add_argument("--val-anatomy", default="spm_avg305")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "second_try"))
    p.add_argument("--figure", default=None, help="also draw the cropped sample pair here (PNG)")
    p.add_argument("--figure-only", action="store_true", help="draw the figure only (needs no --data)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.models)
    first = [load_model(folder / f"{args.first}-{t}.pt") for t in ("affine", "bspline")]
    if args.figure:
        print(f"figure: {figure(Path(args.figure), first, args.threads)}")
    if args.figure_only:
        return 0
    second = [load_model(folder / f"{args.second}-{t}.pt") for t in ("affine", "bspline")]
    res = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python benchmarks/second_try.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "first": args.first, "second": args.second, "results": {}}
    for case, fixed, fixed_labels, moving, moving_labels in all_cases(Path(args.data), args.pairs, args.val_pairs,
                                                                        args.val_anatomy):
        r = run(first, second, fixed, fixed_labels, moving, moving_labels, args.threads)
        res["results"].setdefault(case, []).append(r)
        print(f"{case}: Dice {r['unregistered']:.3f} -> {args.first} {r['first']:.3f}, {args.second} "
              f"{r['second']:.3f}, default {r['default']:.3f} (tried {r['tried']}, kept second {r['kept_second']}, "
              f"{r['seconds']:.1f} s)", flush=True)
    write_report(args.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
