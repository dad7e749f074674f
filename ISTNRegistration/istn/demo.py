"""`istn demo`: the bundled brain pair, registered with the bundled models, affine then B-spline.

The moving image (Colin27, never seen in training) is first put in a
realistic scanner position by a fixed seeded affine, as a real scan would
arrive; the ISTN then registers it to the fixed image (ICBM 2009a) without any
labels. The labels bundled with the sample pair only score the result.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .config import DEFAULT_MODEL_STEMS
from .errors import ISTNError

PACKAGE_DIR = Path(__file__).resolve().parent
MODELS_DIR = PACKAGE_DIR.parent / "Resources" / "Models"  # the Slicer module's resources
SAMPLE_DIR = PACKAGE_DIR.parents[1] / "Resources" / "SampleData"
AFFINE_MODEL = DEFAULT_MODEL_STEMS["affine"] + ".pt"
BSPLINE_MODEL = DEFAULT_MODEL_STEMS["bspline"] + ".pt"
PERTURBATION_SEED = 2019


def bundled_model(name: str) -> Path:
    p = MODELS_DIR / name
    if not p.exists():
        raise ISTNError(f"bundled model '{p}' is missing (the repository checkout is incomplete?)")
    return p


def sample_pair() -> dict[str, sitk.Image]:
    """The bundled sample pair: fixed/moving T1 and their sub-cortical labels."""
    names = {"fixed": "fixed_t1.nii.gz", "fixed_labels": "fixed_labels.nii.gz",
             "moving": "moving_t1.nii.gz", "moving_labels": "moving_labels.nii.gz"}
    out = {}
    for key, name in names.items():
        p = SAMPLE_DIR / name
        if not p.exists():
            raise ISTNError(f"sample data '{p}' is missing (the repository checkout is incomplete?)")
        out[key] = sitk.ReadImage(str(p))
    return out


def place_in_scanner(image: sitk.Image, labels: sitk.Image, seed: int = PERTURBATION_SEED,
                     pad_mm: float = 20.0, rot_deg: tuple[float, float] = (10.0, 20.0),
                     ) -> tuple[sitk.Image, sitk.Image, sitk.Transform]:
    """Move the head by a seeded scanner-like affine (10-20 degrees (``rot_deg``), 10-20 mm, +-10 %) on a padded
    grid."""
    from .data.brain import scanner_perturbation
    from .geometry import Grid

    g = Grid.from_image(image)
    tx = scanner_perturbation(seed, rot_deg=rot_deg, centre=g.centre.tolist())
    pad = [int(np.ceil(pad_mm / s)) for s in g.spacing]
    size = tuple(s + 2 * p for s, p in zip(g.size, pad))
    origin = g.voxel_to_world(-np.asarray(pad, float))
    ref = Grid(size, g.spacing, tuple(origin.tolist()), g.direction).reference_image()
    moved = sitk.Resample(image, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    moved_labels = sitk.Resample(labels, ref, tx, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    return moved, moved_labels, tx


def structure_dice(fixed_labels: sitk.Image, moving_labels: sitk.Image, transform: sitk.Transform | None) -> dict[str, float]:
    """Dice per protocol structure of the moving labels warped (nearest neighbour) into the fixed grid."""
    from .data.brain import LABELS
    from .metrics import dice
    from .registration import warp_image

    tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    # GetArrayFromImage (a copy): a view of the temporary warped image would outlive the image's memory
    w = sitk.GetArrayFromImage(warp_image(moving_labels, fixed_labels, tx, sitk.sitkNearestNeighbor))
    f = sitk.GetArrayFromImage(fixed_labels)
    return {name: dice(f == v, w == v) for name, v in LABELS.items()}


#: What `run_demo` writes (the transforms named as `istn register` names them)
DEMO_OUTPUTS = ("moving_in_scanner_position.nii.gz", "affine.tfm", "transform.h5", "warped.nii.gz",
                "warped_labels.nii.gz", "itn_fixed.nii.gz", "itn_moving.nii.gz", "demo.png", "result.json")
DEMO_RECORD_KEYS = ("mean_dice", "perturbation")  # in a demo's result.json: the folder holds an earlier demo


def run_demo(out_dir: str | Path = "istn-demo", iterations: int | None = None, device: str = "auto") -> dict:
    """Run the demo; writes transforms, images, ITN maps, ``demo.png`` and ``result.json`` to ``out_dir``."""
    from .export import load_model
    from .figures import registration_figure
    from .io import check_earlier_outputs, prepare_output_dir, write_image, write_json, write_transform
    from .registration import OUTPUT_FIELD_SPACING_MM, jacobian_image, register, warp_image

    t_start = time.perf_counter()
    model_paths = bundled_model(AFFINE_MODEL), bundled_model(BSPLINE_MODEL)  # a missing one: refused before the folder
    out = prepare_output_dir(out_dir, [SAMPLE_DIR / "moving_t1.nii.gz", SAMPLE_DIR / "fixed_t1.nii.gz"], [])
    # an earlier demo's files are replaced; files of the user's named like them are not (checked before any work)
    check_earlier_outputs(out, DEMO_OUTPUTS, keys=DEMO_RECORD_KEYS, what="istn demo")
    data = sample_pair()
    affine_model, bspline_model = (load_model(p) for p in model_paths)
    fixed, fixed_labels = data["fixed"], data["fixed_labels"]
    moving, moving_labels, perturbation = place_in_scanner(data["moving"], data["moving_labels"])
    print(f"fixed:  {Path(SAMPLE_DIR / 'fixed_t1.nii.gz')}\nmoving: {Path(SAMPLE_DIR / 'moving_t1.nii.gz')}, placed "
          f"in a scanner position by a seeded affine (seed {PERTURBATION_SEED})")
    print(f"models: {affine_model.describe()}\n        {bspline_model.describe()}")

    def progress(info, stage):
        if info.iteration % 10 == 0 or info.iteration == info.iterations:
            print(f"  {stage}: refinement {info.label()} loss {info.loss:.5f}", flush=True)

    t0 = time.perf_counter()
    aff = register(fixed, moving, affine_model, iterations=iterations, device=device,
                   callback=lambda i: progress(i, "affine"))
    t_aff = time.perf_counter() - t0
    t0 = time.perf_counter()
    bsp = register(fixed, moving, bspline_model, iterations=iterations, device=device, initial_transform=aff.transform,
                   callback=lambda i: progress(i, "B-spline"))
    t_bsp = time.perf_counter() - t0

    stages = {
        "unregistered": structure_dice(fixed_labels, moving_labels, None),
        "affine, one pass": structure_dice(fixed_labels, moving_labels, aff.one_pass_transform),
        "affine, refined": structure_dice(fixed_labels, moving_labels, aff.transform),
        "+ B-spline, refined": structure_dice(fixed_labels, moving_labels, bsp.transform),
    }
    names = list(next(iter(stages.values())))
    header = f"{'structure':<16}" + "".join(f"{s:>22}" for s in stages)
    print("\nDice per structure (moving labels warped into the fixed image)")
    print(header)
    for n in names:
        print(f"{n:<16}" + "".join(f"{stages[s][n]:22.3f}" for s in stages))
    means = {s: float(np.mean(list(v.values()))) for s, v in stages.items()}
    print(f"{'mean':<16}" + "".join(f"{means[s]:22.3f}" for s in stages))
    def ran(r) -> str:
        polish = f" + {r.polish_iterations} polish" if r.polish_iterations else ""
        return (f"{r.iterations - r.polish_iterations}{polish} refinement iterations of at most "
                f"{r.iterations_allowed}" + (", converged" if r.converged else ""))

    print(f"\ntime: affine {t_aff:.1f} s ({ran(aff)}), B-spline {t_bsp:.1f} s ({ran(bsp)}), device {aff.device}")
    for stage, r in (("affine", aff), ("B-spline", bsp)):
        for w in r.warnings:
            print(f"warning ({stage}): {w}")

    warped = warp_image(moving, fixed, bsp.transform)
    warped_labels = warp_image(moving_labels, fixed_labels, bsp.transform, sitk.sitkNearestNeighbor)
    write_image(moving, out / "moving_in_scanner_position.nii.gz")
    write_transform(aff.transform, out / "affine.tfm")
    write_transform(bsp.transform, out / "transform.h5")
    write_image(warped, out / "warped.nii.gz")
    write_image(warped_labels, out / "warped_labels.nii.gz")
    write_image(bsp.fixed_map, out / "itn_fixed.nii.gz")
    write_image(bsp.warped_moving_map(), out / "itn_moving.nii.gz")
    registration_figure(
        out / "demo.png", fixed, warp_image(moving, fixed, sitk.Transform(3, sitk.sitkIdentity)), warped,
        fixed_map=bsp.fixed_map, warped_moving_map=bsp.warped_moving_map(),
        fixed_labels=fixed_labels,
        moving_labels_in_fixed=warp_image(moving_labels, fixed_labels, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkNearestNeighbor),
        warped_labels=warped_labels,
        losses={"affine": aff.losses, "B-spline": bsp.losses},
        coarse={"affine": aff.coarse_iterations, "B-spline": bsp.coarse_iterations},
        polish={"affine": aff.polish_iterations, "B-spline": bsp.polish_iterations},
        passes={"affine": aff.pass_iterations, "B-spline": bsp.pass_iterations},
        dice_table={"unregistered": stages["unregistered"], "affine refined": stages["affine, refined"],
                    "+ B-spline refined": stages["+ B-spline, refined"]},
        jacobian=jacobian_image(bsp.transform, fixed, OUTPUT_FIELD_SPACING_MM),
        title=f"ISTN demo: Colin27 (scanner position) to ICBM 2009a; mean Dice {means['unregistered']:.2f} -> "
              f"{means['+ B-spline, refined']:.2f}",
    )
    result = {
        "dice": stages, "mean_dice": means,
        "seconds": {"affine": t_aff, "bspline": t_bsp, "total": time.perf_counter() - t_start},
        "perturbation": {"seed": PERTURBATION_SEED, "matrix": list(perturbation.GetMatrix()),
                         "translation": list(perturbation.GetTranslation()), "center": list(perturbation.GetCenter())},
        "affine": aff.summary(), "bspline": bsp.summary(),
    }
    write_json(result, out / "result.json")
    print(f"outputs (transforms, warped image, ITN maps, demo.png) in {out}/")
    return result
