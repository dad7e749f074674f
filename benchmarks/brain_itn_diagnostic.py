#!/usr/bin/env python3
"""Why a brain model's refined affine is where it is: ITN maps vs the true structures, on VALIDATION pairs.

For each validation pair (as `brain_validation.py`: the held-out validation anatomy in seeded scanner
positions -> ICBM 2009c) and an AFFINE model, prints:

- how well the ITN maps segment the 8 structures (Dice of map > 0.5 vs the labels, on the network grid) and
  their value range;
- the Dice after refining the STN (50 iterations) on the ITN maps (what `register` does) and on the TRUE
  one-hot label maps of the same pair (the best case the transform model and refinement allow).

    python benchmarks/brain_itn_diagnostic.py ISTNRegistration/Resources/Models/brain-t1-affine.pt --pairs 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))
sys.path.insert(0, str(REPO / "benchmarks"))

from brain_validation import SEED0, mean_dice, validation_inputs  # noqa: E402
from istn.data import image_to_tensor, intensity_window, network_grid  # noqa: E402
from istn.demo import place_in_scanner  # noqa: E402
from istn.export import load_model  # noqa: E402
from istn.geometry import resample_to_grid  # noqa: E402
from istn.refinement import refine  # noqa: E402
from istn.transforms import matrix_to_sitk_affine, theta_to_world  # noqa: E402


def one_hot(labels: sitk.Image, grid) -> torch.Tensor:
    a = sitk.GetArrayFromImage(resample_to_grid(labels, grid, interpolator=sitk.sitkNearestNeighbor))
    return torch.from_numpy(np.stack([a == v for v in range(1, 9)]).astype(np.float32))[None]


def map_dice(maps: torch.Tensor, soi: torch.Tensor) -> float:
    m, s = maps[0] > 0.5, soi[0] > 0.5
    return float(np.mean([(2 * (m[k] & s[k]).sum() / max(1, int(m[k].sum() + s[k].sum()))).item()
                          for k in range(m.shape[0])]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an affine brain model")
    p.add_argument("--data", default="/work/braindata")
    p.add_argument("--val-anatomy", default="spm_avg305")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--iterations", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = Path(args.data)
    fixed, fixed_labels, image, labels = validation_inputs(data, args.val_anatomy)
    model = load_model(args.model)
    if model.transform_type != "affine":
        raise SystemExit("an affine model, please (the B-spline stage needs an affine first)")
    module, cfg = model.module, model.config
    rows = []
    for i in range(args.pairs):
        moving, moving_labels, _ = place_in_scanner(image, labels, seed=SEED0 + i)
        gf, gm = network_grid(fixed, cfg), network_grid(moving, cfg)
        src = image_to_tensor(moving, gm, intensity_window(sitk.GetArrayViewFromImage(moving), *model.intensity))
        tgt = image_to_tensor(fixed, gf, intensity_window(sitk.GetArrayViewFromImage(fixed), *model.intensity))
        with torch.no_grad():
            s_map, t_map = module.representation(src), module.representation(tgt)
        s_true, t_true = one_hot(moving_labels, gm), one_hot(fixed_labels, gf)

        def world(params: torch.Tensor) -> sitk.Transform:
            return matrix_to_sitk_affine(theta_to_world(params[0].double().numpy(), gf, gm))

        row = {"map Dice (moving)": map_dice(s_map, s_true), "map Dice (fixed)": map_dice(t_map, t_true),
               "map min": float(min(s_map.min(), t_map.min())), "map max": float(max(s_map.max(), t_map.max()))}
        for name, a, b in (("ITN maps", s_map, t_map), ("true labels", s_true, t_true)):
            out = refine(module, a, b, args.iterations, float(model.meta["training"]["config"]["lr"]))
            row[f"refined on {name}"] = mean_dice(fixed_labels, moving_labels, world(out.params))
        rows.append(row)
        print(f"pair {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    print("mean: " + ", ".join(f"{k} {np.mean([r[k] for r in rows]):.3f}" for k in rows[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
