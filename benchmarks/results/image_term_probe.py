"""Image term probe (benchmarks/results/image_term.md): B-spline refinement objective = map MSE + w * (1 - LNCC^2 of
the images), on VALIDATION pairs (avg305, brain-extracted and whole head, seeded positions). Needs
image_term_probe.patch applied. Usage: image_term_probe.py N FAMILY SETTINGS_JSON [DATA]."""
import sys, json, time
from pathlib import Path
import numpy as np, torch
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ISTNRegistration")); sys.path.insert(0, str(REPO / "benchmarks"))
from brain_validation import mean_dice, validation_inputs
from refinement_validation import validation_pairs
from istn.demo import MODELS_DIR
from istn.export import load_model
from istn import registration as R
torch.set_num_threads(2)
data = Path(sys.argv[4] if len(sys.argv) > 4 else "braindata")
n = int(sys.argv[1]); fam = sys.argv[2]
settings = json.loads(sys.argv[3])  # [[weight, window, ratio], ...]
a, b = load_model(MODELS_DIR / f"{fam}-affine.pt"), load_model(MODELS_DIR / f"{fam}-bspline.pt")
fixed, fixed_labels, _, _ = validation_inputs(data, "spm_avg305")
pairs, _, _ = validation_pairs(data, "spm_avg305", n)
out = []
for label, moving, labels, mask in pairs:
    R.PROBE_IMAGE_TERM.clear()
    ra = R.register(fixed, moving, a, device="cpu", threads=2)
    row = {"pair": label, "affine": mean_dice(fixed_labels, labels, ra.transform)}
    for w, win, ratio in settings:
        R.PROBE_IMAGE_TERM.clear(); R.PROBE_IMAGE_TERM.update(bspline=w, window=win, ratio=ratio)
        t = time.perf_counter()
        rb = R.register(fixed, moving, b, device="cpu", threads=2, initial_transform=ra.transform)
        row[f"{w:g}/{win}/{ratio}"] = mean_dice(fixed_labels, labels, rb.transform)
        row[f"{w:g}/{win}/{ratio} s"] = time.perf_counter() - t
    out.append(row)
    print(label, " ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "pair" and not k.endswith(" s")), flush=True)
keys = [k for k in out[0] if k != "pair"]
for part in ("", "brain", "whole"):
    rows = [o for o in out if part in o["pair"]]
    print(part or "all", " ".join(f"{k} {np.mean([r[k] for r in rows]):.4f}" for k in keys), flush=True)
json.dump(out, open(f"image_probe_{fam}_{n}_{abs(hash(sys.argv[3]))%10000}.json", "w"), indent=1)
