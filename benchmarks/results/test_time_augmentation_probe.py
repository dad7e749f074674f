"""Test-time augmentation of the ITN maps (benchmarks/results/test_time_augmentation.md), B-spline stage only: the
maps of the source/target as the mean of the ITN on intensity (gamma) and mirror (x flip, left/right channels swapped
back) variants. VALIDATION pairs. Usage: test_time_augmentation_probe.py N FAMILY MODES [DATA]
(MODES: comma-separated of none, gamma, gamma2, flip, both)."""
import sys, json, time
from pathlib import Path
import numpy as np, torch
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ISTNRegistration")); sys.path.insert(0, str(REPO / "benchmarks"))
from brain_validation import mean_dice, validation_inputs
from refinement_validation import validation_pairs
from istn.demo import MODELS_DIR
from istn.export import load_model
from istn.registration import register
torch.set_num_threads(2)
data = Path(sys.argv[4] if len(sys.argv) > 4 else "braindata")
n = int(sys.argv[1]); fam = sys.argv[2]; modes = sys.argv[3].split(",")
a, b = load_model(MODELS_DIR / f"{fam}-affine.pt"), load_model(MODELS_DIR / f"{fam}-bspline.pt")
plain = b.representation
SWAP = [1, 0, 3, 2, 5, 4, 7, 6]

def tta(mode):
    gammas = {"none": [], "gamma": [0.8, 1.25], "flip": [], "both": [0.8, 1.25], "gamma2": [0.67, 1.5]}[mode]
    flip = mode in ("flip", "both")
    def rep(x):
        maps = [plain(x)]
        for g in gammas:
            maps.append(plain(x.clamp_min(0) ** g))
        if flip:
            m = plain(torch.flip(x, dims=[-1]))
            maps.append(torch.flip(m, dims=[-1])[:, SWAP])
        return torch.stack(maps).mean(0)
    return rep

fixed, fixed_labels, _, _ = validation_inputs(data, "spm_avg305")
pairs, _, _ = validation_pairs(data, "spm_avg305", n)
out = []
for label, moving, labels, mask in pairs:
    ra = register(fixed, moving, a, device="cpu", threads=2)
    row = {"pair": label, "affine": mean_dice(fixed_labels, labels, ra.transform)}
    for mode in modes:
        b.representation = tta(mode)
        t = time.perf_counter()
        rb = register(fixed, moving, b, device="cpu", threads=2, initial_transform=ra.transform)
        row[mode] = mean_dice(fixed_labels, labels, rb.transform); row[mode + " s"] = time.perf_counter() - t
    out.append(row)
    print(label, " ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "pair" and not k.endswith(" s")), flush=True)
keys = [k for k in out[0] if k != "pair"]
for part in ("", "brain", "whole"):
    rows = [o for o in out if part in o["pair"]]
    print(part or "all", " ".join(f"{k} {np.mean([r[k] for r in rows]):.4f}" for k in keys), flush=True)
json.dump(out, open(f"tta_{fam}_{n}_{'_'.join(modes)}.json", "w"), indent=1)
