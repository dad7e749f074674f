"""Probes of the B-spline stage that were tried and not adopted, on VALIDATION pairs (avg305, seeded scanner
positions, whole head and brain-extracted, to ICBM 2009c; the held-out subject is not touched):

    python bspline_probes.py image-term N FAMILY '[[weight, window, ratio], ...]' [DATA]   (image_term.md)
    python bspline_probes.py tta N FAMILY none,gamma,flip,both [DATA]                  (test_time_augmentation.md)
    python bspline_probes.py ensemble N FAMILY none,cont,varied,all [DATA]             (map_ensemble.md)

image-term needs image_term_probe.patch (beside this file) applied to the engine (PROBE_SIGNED=1: signed LNCC);
tta replaces the B-spline model's `representation` in this process only; ensemble replaces it with the mean
of its own maps and those of other committed B-spline checkpoints of the same network (cont: istn-e-cont,
varied: istn-e-varied, all: both). Prints the sub-cortical Dice after the
B-spline per pair and the means (all, brain-extracted, whole head); writes the rows as JSON here.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ISTNRegistration"))
sys.path.insert(0, str(REPO / "benchmarks"))
from brain_validation import mean_dice, validation_inputs  # noqa: E402
from refinement_validation import validation_pairs  # noqa: E402

from istn import registration as R  # noqa: E402
from istn.demo import MODELS_DIR  # noqa: E402
from istn.export import load_model  # noqa: E402

SWAP = [1, 0, 3, 2, 5, 4, 7, 6]  # left <-> right of the 8 protocol structures


def tta(plain, mode: str):
    """The maps as the mean over the variants of ``mode`` (intensity gammas, the mirrored look mapped back)."""
    gammas = {"none": [], "gamma": [0.8, 1.25], "flip": [], "both": [0.8, 1.25], "gamma2": [0.67, 1.5]}[mode]
    flip = mode in ("flip", "both")

    def representation(x):
        maps = [plain(x)] + [plain(x.clamp_min(0) ** g) for g in gammas]
        if flip:
            maps.append(torch.flip(plain(torch.flip(x, dims=[-1])), dims=[-1])[:, SWAP])
        return torch.stack(maps).mean(0)

    return representation


ENSEMBLE = {"none": [], "cont": ["istn-e-cont"], "varied": ["istn-e-varied"], "all": ["istn-e-cont", "istn-e-varied"]}


def checkpoint_itn(name: str):
    """The ITN of ``benchmarks/checkpoints/bundled/<name>/bspline/best.pt``, in evaluation mode."""
    from istn.config import ModelConfig
    from istn.networks import ISTN
    ck = torch.load(REPO / "benchmarks/checkpoints/bundled" / name / "bspline/best.pt", map_location="cpu",
                    weights_only=True)
    net = ISTN(ModelConfig(**ck["config"]["model"]))
    net.load_state_dict(ck["model"])
    return net.eval()


def ensemble(plain, mode: str):
    """The maps as the mean of the bundled network's and those of the checkpoints ``ENSEMBLE[mode]``."""
    others = [checkpoint_itn(name) for name in ENSEMBLE[mode]]

    def representation(x):
        with torch.no_grad():
            return torch.stack([plain(x)] + [o.representation(x) for o in others]).mean(0)

    return representation


def main() -> None:
    kind, n, fam, spec = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    data = Path(sys.argv[5] if len(sys.argv) > 5 else "braindata")
    torch.set_num_threads(2)
    a, b = load_model(MODELS_DIR / f"{fam}-affine.pt"), load_model(MODELS_DIR / f"{fam}-bspline.pt")
    plain = b.representation
    if kind == "image-term":
        variants = {f"{w:g}/{win}/{ratio}": dict(bspline=w, window=win, ratio=ratio) for w, win, ratio in json.loads(spec)}
    else:
        variants = {mode: mode for mode in spec.split(",")}

    def use(setting) -> None:
        if kind == "image-term":
            R.PROBE_IMAGE_TERM.clear()
            R.PROBE_IMAGE_TERM.update(setting or {})
        else:
            wrap = ensemble if kind == "ensemble" else tta
            b.representation = wrap(plain, setting) if setting else plain

    fixed, fixed_labels, _, _ = validation_inputs(data, "spm_avg305")
    pairs, _, _ = validation_pairs(data, "spm_avg305", n)
    out = []
    for label, moving, labels, _ in pairs:
        use(None)
        ra = R.register(fixed, moving, a, device="cpu", threads=2)
        row = {"pair": label, "affine": mean_dice(fixed_labels, labels, ra.transform)}
        for name, setting in variants.items():
            use(setting)
            t = time.perf_counter()
            rb = R.register(fixed, moving, b, device="cpu", threads=2, initial_transform=ra.transform)
            row[name] = mean_dice(fixed_labels, labels, rb.transform)
            row[f"{name} s"] = time.perf_counter() - t
        out.append(row)
        print(label, " ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "pair" and not k.endswith(" s")),
              flush=True)
    keys = [k for k in out[0] if k != "pair"]
    for part in ("", "brain", "whole"):
        rows = [o for o in out if part in o["pair"]]
        print(part or "all", " ".join(f"{k} {np.mean([r[k] for r in rows]):.4f}" for k in keys), flush=True)
    Path(f"bspline_probe_{kind}_{fam}_{n}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
