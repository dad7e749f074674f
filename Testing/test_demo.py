"""`istn demo`: the bundled brain models register the bundled sample pair (few refinement iterations)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from istn import demo
from istn.registration import MAX_AFFINE_PASSES, UNSETTLED_MM


def _missing() -> list[str]:
    paths = [demo.MODELS_DIR / demo.AFFINE_MODEL, demo.MODELS_DIR / demo.BSPLINE_MODEL]
    paths += [demo.SAMPLE_DIR / f"{s}_{k}.nii.gz" for s in ("fixed", "moving") for k in ("t1", "labels")]
    return [str(p) for p in paths if not p.exists()]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    missing = _missing()
    if missing:
        pytest.skip(f"bundled models or sample data absent (train them with benchmarks/train_brain.py): {missing}")
    out = tmp_path_factory.mktemp("demo")
    return out, demo.run_demo(out, iterations=3, device="cpu")


def test_demo_writes_its_outputs(demo_run):
    out, result = demo_run
    assert sorted(p.name for p in out.iterdir()) == sorted(demo.DEMO_OUTPUTS)
    for name in demo.DEMO_OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("affine", "bspline"):  # 3 refinement iterations, then the model's polish, in each of its passes
        passes = result[stage]["passes"]
        polish = result[stage]["model"]["refinement"]["polish"]
        stored = result[stage]["model"]["refinement"].get("passes", 1)
        if stage == "affine":  # 3 iterations a look leave the pose unsettled: a look that moved it > 10 mm looks again
            moves = result[stage]["pass_moves_mm"]
            assert stored <= passes <= MAX_AFFINE_PASSES and len(moves) == passes - 1
            assert all(m > UNSETTLED_MM for m in moves[stored - 2:-1])
            assert passes == MAX_AFFINE_PASSES or moves[-1] <= UNSETTLED_MM
        else:
            assert passes == stored
        assert 0 < result[stage]["polish_iterations"] <= passes * polish
        assert result[stage]["iterations"] == 3 * passes + result[stage]["polish_iterations"]
        runs = result[stage]["pass_iterations"]  # the figure's curve segments: one per pass, 3 + its polish each
        assert len(runs) == passes and [n - p for n, _, p in runs] == [3] * passes


def test_demo_registration_improves_dice(demo_run):
    _, result = demo_run
    means = result["mean_dice"]
    # The moving image starts in a seeded "scanner position" (10-20 degrees, 10-20 mm): unregistered overlap is poor.
    assert means["unregistered"] < 0.4
    # Only 3 refinement iterations here (the demo's default is 50: 0.05 -> 0.83 with the bundled models).
    assert means["affine, refined"] > means["unregistered"] + 0.05
    assert means["+ B-spline, refined"] > means["unregistered"] + 0.1
    assert means["+ B-spline, refined"] >= means["affine, refined"] - 0.02
    from istn.data.brain import LABELS

    assert set(result["dice"]["+ B-spline, refined"]) == set(LABELS)


def test_demo_transforms_are_readable_by_simpleitk(demo_run):
    out, _ = demo_run
    fixed = sitk.ReadImage(str(demo.SAMPLE_DIR / "fixed_t1.nii.gz"))
    moving = sitk.ReadImage(str(out / "moving_in_scanner_position.nii.gz"))
    affine = sitk.ReadTransform(str(out / "affine.tfm"))
    full = sitk.ReadTransform(str(out / "transform.h5"))
    # Resampling through the files reproduces the demo's own warped image.
    warped = sitk.Resample(moving, fixed, full, sitk.sitkLinear, 0.0, moving.GetPixelID())
    written = sitk.ReadImage(str(out / "warped.nii.gz"))
    a, b = sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(written)
    assert a.shape == b.shape
    assert np.mean(np.abs(a - b)) < 1e-3 * max(float(np.abs(b).max()), 1.0)
    # The affine alone maps the centre of the fixed image into the moving image's field of view.
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in fixed.GetSize()])
    idx = moving.TransformPhysicalPointToContinuousIndex(affine.TransformPoint(centre))
    assert all(0 <= i < s for i, s in zip(idx, moving.GetSize()))


def test_demo_replaces_an_earlier_demo_but_never_files_of_the_users(demo_run, tmp_path, capsys):
    import shutil

    from istn.cli import main
    from istn.io import check_earlier_outputs

    out, _ = demo_run
    theirs = tmp_path / "mine"
    theirs.mkdir()
    (theirs / "warped.nii.gz").write_bytes(b"my own warp")
    (theirs / "result.json").write_text('{"mine": 1}')
    assert main(["demo", "--out", str(theirs)]) == 2  # refused before any work
    assert "holds warped.nii.gz, result.json, not the outputs of an earlier istn demo" in capsys.readouterr().err
    assert (theirs / "warped.nii.gz").read_bytes() == b"my own warp"
    again = tmp_path / "again"
    shutil.copytree(out, again)  # an earlier demo's folder: its result.json says so
    check_earlier_outputs(again, demo.DEMO_OUTPUTS, keys=demo.DEMO_RECORD_KEYS, what="istn demo")
