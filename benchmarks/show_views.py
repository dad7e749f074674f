#!/usr/bin/env python3
"""Look at what the brain models are trained on: a PNG grid of training views with the SoI outline.

Rows: real T1 (whole head, skull-stripped), the other real contrasts (T2, PD), label-driven synthetic views
(`istn.data.synthesis`) of several anatomies, and cropped fields of view; columns: axial, coronal, sagittal
slices through the structures' centre, on the network grid (64^3 at 3 mm by default), as `sample_view` makes
them with the affine stage's moving-side variation (`train_brain.AUGMENT`). Red: the outline of the 8
sub-cortical structures (SoI > 0.5), which must sit on the structures in every row.

    python benchmarks/show_views.py                       # -> benchmarks/results/training_views.png
    python benchmarks/show_views.py --seed 3 --out /tmp/views.png
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_brain import AUGMENT, CROP_KEEP, REPO, load_anatomies, model_config  # noqa: E402

from istn.data.augment import sample_view  # noqa: E402

#: (row title, anatomy name, options of the view)
ROWS = (
    ("T1, whole head (avg152)", "spm_avg152", {}),
    ("T1, skull-stripped (avg152)", "spm_avg152_brain", {}),
    ("T2 (avg152)", "spm_avg152_t2", {}),
    ("PD (avg152)", "spm_avg152_pd", {}),
    ("synthetic (avg152, whole head)", "spm_avg152", {"synth_prob": 1.0}),
    ("synthetic (ITK subject)", "itk_subject", {"synth_prob": 1.0}),
    ("synthetic (ICBM 2009a, stripped)", "icbm2009a_brain", {"synth_prob": 1.0}),
    ("synthetic (ICBM 2009c)", "icbm2009c", {"synth_prob": 1.0}),
    ("cropped T1 (ITK subject)", "itk_subject", {"crop_prob": 1.0, "crop_keep": CROP_KEEP}),
    ("cropped synthetic (avg152)", "spm_avg152", {"crop_prob": 1.0, "crop_keep": CROP_KEEP, "synth_prob": 1.0}),
)


def slices(volume: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices of a ``(Z, Y, X)`` volume (LPS axes) through ``centre``, shown with
    the patient's right on the left (radiological) and superior up."""
    z, y, x = centre
    return [volume[z][::-1, ::-1], volume[:, y][::-1, ::-1], volume[:, :, x][::-1, :]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", default="/work/braindata", help="output of istn.data.brain.prepare")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "training_views.png"))
    p.add_argument("--grid", type=int, default=64)
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val, _ = load_anatomies(Path(args.data), "", log=lambda m: None, contrasts=("t1", "t2", "pd"))
    anatomies = {a.name: a for a in train + val}
    cfg = model_config("affine", "istn-i", args.grid, args.spacing, [8], [8])
    base = AUGMENT["affine"][0]
    fig, axes = plt.subplots(len(ROWS), 3, figsize=(5.4, 1.9 * len(ROWS)))
    for r, (title, name, options) in enumerate(ROWS):
        rng = np.random.default_rng([args.seed, r])
        image, soi = sample_view(anatomies[name], cfg, rng, dataclasses.replace(base, **options))
        img, mask = image[0].numpy(), (soi > 0.5).any(0).numpy()
        zz, yy, xx = np.nonzero(mask)
        centre = (int(np.median(zz)), int(np.median(yy)), int(np.median(xx))) if zz.size else \
            tuple(s // 2 for s in img.shape)
        for c, (im, m) in enumerate(zip(slices(img, centre), slices(mask.astype(float), centre))):
            ax = axes[r, c]
            ax.imshow(im, cmap="gray", vmin=0.0, vmax=1.0, origin="upper", interpolation="nearest")
            if m.any():
                ax.contour(m, levels=[0.5], colors="red", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(title, fontsize=6.5)
    for c, t in enumerate(("axial", "coronal", "sagittal")):
        axes[0, c].set_title(t, fontsize=8)
    fig.suptitle(f"training views ({args.grid}^3 at {args.spacing:g} mm, affine-stage moving variation, seed "
                 f"{args.seed}); red: SoI", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.985), h_pad=0.2, w_pad=0.2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
