"""`istn apply`: another image of the moving space (labels, a contrast, a mask) through a written transform onto the
fixed grid, with the interpolation a label map needs, and nothing of the user's overwritten."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from istn.cli import main, run_apply
from istn.registration import warp_image


@pytest.fixture
def scene3d(oblique_pair, tmp_path):
    """Files of a registered 3D pair: fixed (reference), moving-space labels and intensities, an affine transform and
    an affine + B-spline one (fixed -> moving, as `istn register` writes them)."""
    fixed, moving = oblique_pair
    arr = sitk.GetArrayFromImage(moving)
    labels = sitk.GetImageFromArray((arr > 0.1).astype(np.uint8) + (arr > 0.5).astype(np.uint8))  # 1 outside 2
    labels.CopyInformation(moving)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(sitk.Euler3DTransform((0, 0, 0), 0.05, -0.08, 0.1).GetMatrix())
    affine.SetTranslation((3.0, -2.0, 4.0))
    affine.SetCenter((2.0, -3.0, 1.0))
    mesh = sitk.BSplineTransformInitializer(fixed, (4, 4, 4))
    rng = np.random.default_rng(3)
    mesh.SetParameters(tuple(rng.normal(0, 2.0, len(mesh.GetParameters()))))
    both = sitk.CompositeTransform([affine, mesh])
    paths = {"fixed": tmp_path / "fixed.nii.gz", "labels": tmp_path / "labels.nrrd",
             "intensities": tmp_path / "moving.nii.gz", "int16": tmp_path / "moving_int16.nii.gz",
             "affine": tmp_path / "affine.tfm", "bspline": tmp_path / "transform.h5"}
    sitk.WriteImage(fixed, str(paths["fixed"]))
    sitk.WriteImage(labels, str(paths["labels"]))
    sitk.WriteImage(moving, str(paths["intensities"]))
    sitk.WriteImage(sitk.Cast(moving * 3000.0, sitk.sitkInt16), str(paths["int16"]))
    sitk.WriteTransform(affine, str(paths["affine"]))
    sitk.WriteTransform(both, str(paths["bspline"]))
    return paths, fixed, moving, labels, affine, both


def test_a_label_map_goes_through_by_nearest_neighbour_and_stays_labels(scene3d, tmp_path, capsys):
    paths, fixed, _, labels, affine, _ = scene3d
    out = tmp_path / "out" / "labels_in_fixed.nii.gz"  # its folder made as needed
    assert main(["apply", "--transform", str(paths["affine"]), "--reference", str(paths["fixed"]), "--input",
                 str(paths["labels"]), "--out", str(out)]) == 0
    assert "nearest (auto: a label map: 2 labels)" in capsys.readouterr().out
    got = sitk.ReadImage(str(out))
    assert got.GetPixelID() == sitk.sitkUInt8
    expected = sitk.Resample(labels, fixed, affine, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(expected))
    np.testing.assert_allclose(got.GetDirection(), fixed.GetDirection(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayFromImage(got))) == {0, 1, 2}


def test_through_a_bspline_labels_agree_with_the_exact_warp(scene3d, tmp_path):
    paths, fixed, _, labels, _, both = scene3d
    s = run_apply(paths["bspline"], paths["fixed"], paths["labels"], tmp_path / "l.nii.gz")
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "l.nii.gz")))
    exact = sitk.GetArrayFromImage(sitk.Resample(labels, fixed, both, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    assert (got != exact).mean() < 1e-3 and (exact > 0).mean() > 0.01
    assert s["labels_outside_the_reference"] == []


@pytest.mark.parametrize("kind", ["intensities", "int16"])
def test_intensities_go_through_linearly_as_register_warps_them(scene3d, tmp_path, kind):
    paths, fixed, moving, _, _, both = scene3d
    s = run_apply(paths["bspline"], paths["fixed"], paths[kind], tmp_path / "m.nii.gz")
    assert s["interpolation"].startswith("linear (auto: ")
    got = sitk.ReadImage(str(tmp_path / "m.nii.gz"))
    assert got.GetPixelID() == sitk.sitkFloat32  # an integer image is not truncated
    source = sitk.Cast(sitk.ReadImage(str(paths[kind])), sitk.sitkFloat32)
    lowest = float(sitk.GetArrayViewFromImage(source).min())
    expected = warp_image(source, fixed, both, sitk.sitkLinear, None, field_spacing=None)
    scale = float(sitk.GetArrayViewFromImage(source).max()) - lowest
    np.testing.assert_allclose(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(expected), atol=2e-3 * scale)
    assert s["background"] == pytest.approx(lowest)


def test_labels_moved_out_of_the_reference_are_named(scene3d, tmp_path, capsys):
    paths, *_ = scene3d
    far = sitk.TranslationTransform(3, (500.0, 0.0, 0.0))
    sitk.WriteTransform(far, str(tmp_path / "far.tfm"))
    assert main(["apply", "--transform", str(tmp_path / "far.tfm"), "--reference", str(paths["fixed"]), "--input",
                 str(paths["labels"]), "--out", str(tmp_path / "x.nii.gz")]) == 0
    assert "label(s) 1, 2 fall outside the reference grid" in capsys.readouterr().err


def test_nothing_of_the_users_is_overwritten(scene3d, tmp_path, capsys):
    paths, *_ = scene3d
    theirs = tmp_path / "theirs.nii.gz"
    theirs.write_bytes(b"keep me")
    base = ["apply", "--transform", str(paths["affine"]), "--reference", str(paths["fixed"]), "--input",
            str(paths["labels"])]
    assert main(base + ["--out", str(theirs)]) == 2
    assert "exists; choose another file name, or --overwrite" in capsys.readouterr().err
    assert theirs.read_bytes() == b"keep me"
    for inp in ("labels", "fixed"):  # an input, even with --overwrite
        before = paths[inp].read_bytes()
        assert main(base + ["--out", str(paths[inp]), "--overwrite"]) == 2
        assert "is one of the inputs" in capsys.readouterr().err
        assert paths[inp].read_bytes() == before
    assert main(base + ["--out", str(theirs), "--overwrite"]) == 0
    assert sitk.ReadImage(str(theirs)).GetPixelID() == sitk.sitkUInt8


@pytest.mark.parametrize("case", ["2d-input", "vector", "out-is-folder", "bad-transform", "no-extension",
                                  "volume-as-png"])
def test_bad_input_is_refused_in_one_line_and_nothing_written(scene3d, tmp_path, capsys, case):
    paths, *_ = scene3d
    args = {"--transform": paths["affine"], "--reference": paths["fixed"], "--input": paths["labels"],
            "--out": tmp_path / "new" / "o.nii.gz"}
    if case == "2d-input":
        sitk.WriteImage(sitk.Image(10, 12, sitk.sitkUInt8) + 1, str(tmp_path / "flat.png"))
        args["--input"], message = tmp_path / "flat.png", "is 2D but --transform"
    elif case == "vector":
        sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3), str(tmp_path / "v.nrrd"))
        args["--input"], message = tmp_path / "v.nrrd", "components per pixel"
    elif case == "out-is-folder":
        args["--out"], message = tmp_path, "is a folder: give the output image's file name"
    elif case == "bad-transform":
        (tmp_path / "t.h5").write_bytes(b"nope")
        args["--transform"], message = tmp_path / "t.h5", "could not be read as an ITK transform file"
    elif case == "no-extension":
        args["--out"], message = tmp_path / "new" / "labels", "cannot be written whole to files without an extension"
    else:  # SimpleITK would write one slice of the volume to a PNG without a word
        args["--out"], message = tmp_path / "new" / "labels.png", "3D 8-bit unsigned integer image cannot be written"
    argv = ["apply"] + [str(x) for kv in args.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()
