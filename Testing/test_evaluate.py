"""`istn evaluate` reports what is there: absent labels, one-sided labels, implausible inputs, no numpy noise."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import blob_image
from istn.cli import main


def _write(tmp_path, name, arr, origin=(0.0, 0.0)):
    img = sitk.GetImageFromArray(np.asarray(arr))
    img.SetSpacing((1.0, 1.0))
    img.SetOrigin(origin)
    p = tmp_path / name
    sitk.WriteImage(img, str(p))
    return p


def _pair(tmp_path):
    """Label 3 identical (Dice 1); label 4 shifted by half its width (Dice 0.5); label 5 only in the fixed image."""
    f = np.zeros((24, 24), np.uint8)
    m = np.zeros_like(f)
    f[2:8, 2:8] = m[2:8, 2:8] = 3
    f[10:14, 2:6] = 4
    m[10:14, 4:8] = 4
    f[16:20, 16:20] = 5
    return _write(tmp_path, "f.nii.gz", f), _write(tmp_path, "m.nii.gz", m)


def _evaluate(tmp_path, fixed, moving, *extra):
    out = tmp_path / "metrics.json"
    code = main(["evaluate", "--fixed-labels", str(fixed), "--moving-labels", str(moving), "--out", str(out), *extra])
    assert code == 0
    # strict JSON: a bare NaN / Infinity (Python's default) is refused by other readers
    return json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))


def _notes(err: str) -> list[str]:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert all(ln.startswith("note: ") for ln in lines), err  # no numpy warning or library text
    return lines


def test_label_in_neither_image_is_absent_and_left_out_of_the_mean(tmp_path, capfd):
    """Row 9: `--labels 3 4 99`: 99 was scored Dice 1.0, lifting the mean."""
    f, m = _pair(tmp_path)
    res = _evaluate(tmp_path, f, m, "--labels", "3", "4", "99")
    assert res["per_label"]["3"]["dice"] == 1.0 and res["per_label"]["4"]["dice"] == 0.5
    assert res["per_label"]["99"]["present"] == "neither" and res["per_label"]["99"]["dice"] is None  # JSON null, not NaN
    assert res["mean"]["dice"] == 0.75
    out, err = capfd.readouterr()
    assert any(ln.split()[:2] == ["99", "absent"] for ln in out.splitlines())
    assert any("99 in neither image" in n for n in _notes(err))


def test_label_in_one_image_scores_zero_and_is_flagged(tmp_path, capfd):
    f, m = _pair(tmp_path)
    res = _evaluate(tmp_path, f, m, "--transform", str(_identity(tmp_path)))
    five = res["per_label"]["5"]
    assert five["present"] == "fixed" and five["dice"] == 0.0
    assert res["mean"]["dice"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
    out, err = capfd.readouterr()
    assert "only in fixed" in [ln for ln in out.splitlines() if ln.split()[0] == "5"][0]
    assert _notes(err) == ["note: label(s) 5 only in the fixed image (moving: after the transform): scored Dice 0"]


def _identity(tmp_path):
    p = tmp_path / "identity.tfm"
    sitk.WriteTransform(sitk.AffineTransform(2), str(p))
    return p


def test_label_sets_that_do_not_overlap(tmp_path, capfd):
    """Row 10a: labels 1..8 vs 11..18: a note, Dice 0 everywhere, no "Mean of empty slice"."""
    f = np.zeros((40, 40), np.uint8)
    for k in range(8):
        f[4 * k:4 * k + 3, 2:10] = k + 1
    m = np.where(f > 0, f + 10, 0).astype(np.uint8)
    res = _evaluate(tmp_path, _write(tmp_path, "f.nii.gz", f), _write(tmp_path, "m.nii.gz", m),
                    "--transform", str(_identity(tmp_path)))
    assert len(res["per_label"]) == 16 and res["mean"]["dice"] == 0.0 and res["mean"]["asd"] is None
    notes = _notes(capfd.readouterr().err)
    assert notes == ["note: the label sets do not overlap (fixed 1..8, moving 11..18): no label can match; are both "
                     "maps of the same protocol?"]


def test_labels_500_mm_apart(tmp_path, capfd):
    """Row 10b: the same labels, but the moving map lies 500 mm away: a note, no numpy warning."""
    f, _ = _pair(tmp_path)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
    m = _write(tmp_path, "far.nii.gz", arr, origin=(500.0, 0.0))
    res = _evaluate(tmp_path, f, m, "--transform", str(_identity(tmp_path)))
    assert all(v["dice"] == 0.0 and v["present"] == "fixed" for v in res["per_label"].values())
    assert _notes(capfd.readouterr().err) == [
        "note: no moving label lands inside the fixed image: the images do not overlap in world space (check their "
        "origins and the transform)"]


def test_an_intensity_image_given_as_labels(tmp_path, capfd):
    """Row 11: a T1-like image (many values that rarely repeat between neighbours): a note."""
    g = blob_image((48, 48), (1.0, 1.0), (-24.0, -24.0), np.eye(2))
    noise = np.random.default_rng(0).normal(0, 3, (48, 48))
    t1 = np.clip(np.round(sitk.GetArrayFromImage(g) * 120 + noise), 0, None).astype(np.uint8)
    lab = (sitk.GetArrayFromImage(g) > 0.5).astype(np.uint8)
    t1p, labp = _write(tmp_path, "t1.nii.gz", t1), _write(tmp_path, "lab.nii.gz", lab)
    _evaluate(tmp_path, labp, t1p, "--transform", str(_identity(tmp_path)))
    notes = _notes(capfd.readouterr().err)
    assert [n for n in notes if "looks like an intensity image" in n and "moving label image" in n
            and "--soft scores it as one map" in n]  # the way to score a soft map (2D audit)


def test_many_coherent_labels_are_not_taken_for_an_intensity_image(tmp_path, capfd):
    """60 labels in blocks (a fine parcellation): no intensity-image note."""
    f = np.zeros((60, 60), np.uint8)
    for k in range(60):
        f[(k // 10) * 10:(k // 10) * 10 + 8, (k % 10) * 6:(k % 10) * 6 + 5] = k + 1
    p = _write(tmp_path, "parc.nii.gz", f)
    res = _evaluate(tmp_path, p, p, "--transform", str(_identity(tmp_path)))
    assert len(res["per_label"]) == 60 and res["mean"]["dice"] == 1.0
    assert _notes(capfd.readouterr().err) == []


def test_missing_transform_is_noted(tmp_path, capfd):
    """Row 12: no --transform: the identity is used and the output says so."""
    f, m = _pair(tmp_path)
    res = _evaluate(tmp_path, f, m, "--labels", "3", "4")
    assert res["transform"] is None and res["mean"]["dice"] == 0.75
    assert _notes(capfd.readouterr().err) == [
        "note: no --transform given: the identity was used (the moving labels are scored where they lie)"]


def test_label_png_saved_as_grey_rgb_is_scored_as_its_labels(tmp_path, capfd):
    """A label PNG that a viewer saved as RGB(A) with equal channels holds the labels: the same scores as the
    scalar file; a true-colour label picture is refused in one line (colours are not label values)."""
    f = np.zeros((24, 24), np.uint8)
    m = np.zeros_like(f)
    f[2:8, 2:8] = m[2:8, 2:8] = 3
    f[10:14, 2:6] = 4
    m[10:14, 4:8] = 4
    scalar_f, scalar_m = _write(tmp_path, "f.png", f), _write(tmp_path, "m.png", m)
    rgb_m = tmp_path / "m_rgb.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([m, m, m, np.full_like(m, 255)], -1), isVector=True), str(rgb_m))
    assert sitk.ReadImage(str(rgb_m)).GetNumberOfComponentsPerPixel() == 4
    res = _evaluate(tmp_path, scalar_f, rgb_m)
    assert res["per_label"]["3"]["dice"] == 1.0 and res["per_label"]["4"]["dice"] == 0.5
    same = _evaluate(tmp_path, scalar_f, scalar_m, "--overwrite")
    assert (res["per_label"], res["mean"]) == (same["per_label"], same["mean"])
    colour = np.stack([m, m * 0, m * 0], -1)
    colour_p = tmp_path / "m_colour.png"
    sitk.WriteImage(sitk.GetImageFromArray(colour, isVector=True), str(colour_p))
    capfd.readouterr()
    code = main(["evaluate", "--fixed-labels", str(scalar_f), "--moving-labels", str(colour_p)])
    err = capfd.readouterr().err
    assert code == 2 and "colours, not label values" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("layout", ["RAS", "ASL", "PIR"])
def test_labels_on_a_lattice_half_a_voxel_off_score_the_same_however_stored(tmp_path, layout):
    """A 2 mm fixed grid at whole millimetres samples a 1 mm label map whose voxel centres lie at half millimetres
    (MNI-space files at two resolutions): every point is a nearest-neighbour tie on every axis. The labels it
    picks, and so Dice, must not depend on how the moving file orders its voxels (before: ITK broke the tie towards
    the higher STORED index, and the RAS-stored map scored other voxels: 1,633 of 6,697 at 1 mm head size)."""
    from istn.registration import warp_image

    rng = np.random.default_rng(3)
    labels = np.zeros((30, 28, 26), np.uint8)  # z, y, x: small random blocks, so a one-voxel shift changes voxels
    for value in (1, 2, 3):
        z, y, x = rng.integers(3, 18, 3)
        labels[z:z + 7, y:y + 6, x:x + 5] = value
    moving = sitk.GetImageFromArray(labels)
    moving.SetOrigin((-12.5, -13.5, -14.5))  # voxel centres at half millimetres
    fixed = sitk.Image((12, 13, 14), sitk.sitkUInt8)
    fixed.SetSpacing((2.0, 2.0, 2.0))
    fixed.SetOrigin((-10.0, -10.0, -10.0))  # points at whole millimetres
    # the fixed labels: the same blocks sampled 0.3 mm off the ties (partly overlapping the moving ones)
    fixed = sitk.Resample(moving, fixed, sitk.TranslationTransform(3, (0.8, 0.3, -0.7)), sitk.sitkNearestNeighbor)
    fixed_path = tmp_path / "fixed.nii.gz"
    sitk.WriteImage(fixed, str(fixed_path))
    results, sampled = {}, {}
    for stored_as in ("LPS", layout):
        stored = sitk.DICOMOrient(moving, stored_as)
        path = tmp_path / f"moving_{stored_as}.nii.gz"
        sitk.WriteImage(stored, str(path))
        results[stored_as] = _evaluate(tmp_path, fixed_path, path, "--overwrite")
        sampled[stored_as] = sitk.GetArrayFromImage(warp_image(stored, fixed, sitk.Transform(3, sitk.sitkIdentity),
                                                               sitk.sitkNearestNeighbor))
    assert (sampled["LPS"] > 0).sum() > 50
    np.testing.assert_array_equal(sampled[layout], sampled["LPS"])
    assert results[layout]["per_label"] == results["LPS"]["per_label"]
    assert results[layout]["mean"]["dice"] > 0
