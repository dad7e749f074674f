"""`istn register --atlas`: a label map of the fixed space (an atlas drawn on the template) brought onto each
moving image's own grid through the result's inverse, with each label's volume there."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from istn import demo
from istn.cli import main

needs_models = pytest.mark.skipif(not (demo.MODELS_DIR / demo.AFFINE_MODEL).exists(), reason="bundled models absent")


def _scaled(image: sitk.Image, factor: float, interpolator: int) -> sitk.Image:
    """``image``'s content ``factor`` times larger about its centre, on its own grid (a head 10 % larger)."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    shrink = sitk.ScaleTransform(3, (1 / factor,) * 3)
    shrink.SetCenter(centre)
    return sitk.Resample(image, image, shrink, interpolator, 0, image.GetPixelID())


@needs_models
def test_atlas_volumes_on_a_head_ten_percent_larger_are_a_third_larger(tmp_path, capsys):
    """The sample template registered from a copy of itself 10 % larger in every direction: its labels brought onto
    that head's grid overlap the labels scaled exactly (Dice), and their volume there is 1.1^3 = 1.331 times the
    template's (the known answer) within 5 %; each label's volume is that of the exactly scaled label within 20 %."""
    pair = demo.sample_pair()
    fixed, labels = pair["fixed"], pair["fixed_labels"]
    sitk.WriteImage(fixed, str(tmp_path / "template.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "template_labels.nii.gz"))
    sitk.WriteImage(_scaled(fixed, 1.1, sitk.sitkLinear), str(tmp_path / "larger.nii.gz"))
    truth = _scaled(labels, 1.1, sitk.sitkNearestNeighbor)
    assert main(["register", "--fixed", str(tmp_path / "template.nii.gz"), "--moving", str(tmp_path / "larger.nii.gz"),
                 "--atlas", str(tmp_path / "template_labels.nii.gz"), "--out", str(tmp_path / "r"), "--no-figure",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "atlas labels on the moving grid: atlas_labels.nii.gz (8 labels" in printed
    got = sitk.ReadImage(str(tmp_path / "r" / "atlas_labels.nii.gz"))
    assert got.GetPixelID() == labels.GetPixelID() and got.GetSize() == fixed.GetSize()
    a, t, l0 = (sitk.GetArrayFromImage(x) for x in (got, truth, labels))
    dice = [2 * ((a == v) & (t == v)).sum() / ((a == v).sum() + (t == v).sum()) for v in range(1, 9)]
    assert np.mean(dice) > 0.85, dice
    atlas = json.loads((tmp_path / "r" / "result.json").read_text())["atlas"]
    voxel_ml = float(np.prod(fixed.GetSpacing())) / 1000
    for v in range(1, 9):
        assert atlas["volumes_ml"][str(v)] == pytest.approx((a == v).sum() * voxel_ml)
        # against the labels scaled exactly: the registration's local error on the smallest structures (pallidum,
        # ~250 voxels) shows here as up to a fifth of the volume; the larger ones are within a few percent
        assert atlas["volumes_ml"][str(v)] == pytest.approx((t == v).sum() * voxel_ml, rel=0.2)
    total = sum(atlas["volumes_ml"].values()) / ((l0 > 0).sum() * voxel_ml)
    print(f"total volume ratio {total:.3f} (1.331 expected), mean Dice {np.mean(dice):.3f}")
    assert total == pytest.approx(1.331, rel=0.05), total
    assert atlas["inverse"]["round_trip_mm"]["max"] < 0.1 and atlas["labels_outside_the_moving_image"] == []
    assert "ml per label: " + ", ".join(f"{v}: {atlas['volumes_ml'][str(v)]:.2f}" for v in range(1, 9)) in printed


def test_a_cohort_gets_each_images_atlas_volumes_in_its_row(files2d, tmp_path):
    out = tmp_path / "cohort"
    assert main(["register", "--fixed", str(files2d["fixed"]), "--moving", str(files2d["moving"]),
                 str(files2d["moving2"]), "--model", str(files2d["model"]), "--atlas", str(files2d["atlas"]),
                 "--out", str(out), "--refine", "2", "--quiet", "--no-figure"]) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["folder"] for r in rows] == ["moving", "moving2"]
    for r in rows:  # a 2D image: each label's area (mm^2)
        image = sitk.ReadImage(str(out / r["folder"] / "atlas_labels.nii.gz"))
        on_moving, mm2 = sitk.GetArrayFromImage(image), float(np.prod(image.GetSpacing()))
        for v in (1, 2):
            assert float(r[f"atlas_mm2_{v}"]) == pytest.approx((on_moving == v).sum() * mm2)
        assert (on_moving == 2).sum() > 20
    assert list(rows[0])[9:11] == ["atlas_mm2_1", "atlas_mm2_2"]  # after the numbers, before warnings and errors


@pytest.mark.parametrize("case", ["intensities", "empty", "elsewhere", "3d"])
def test_a_bad_atlas_is_refused_before_anything(files2d, tmp_path, capsys, case):
    atlas = sitk.ReadImage(str(files2d["atlas"]))
    bad = tmp_path / f"bad_{case}.nii.gz"
    if case == "intensities":
        sitk.WriteImage(sitk.ReadImage(str(files2d["fixed"])), str(bad))
        expected = "is not a label map"
    elif case == "empty":
        sitk.WriteImage(atlas * 0, str(bad))
        expected = "holds no label"
    elif case == "elsewhere":
        moved = sitk.Image(atlas)
        moved.SetOrigin((5000.0, 5000.0))
        sitk.WriteImage(moved, str(bad))
        expected = "does not overlap the fixed image"
    else:
        sitk.WriteImage(sitk.JoinSeries([atlas, atlas]), str(bad))
        expected = "is 3D but the fixed image is 2D"
    for moving in ([files2d["moving"]], [files2d["moving"], files2d["moving2"]]):
        out = tmp_path / f"out{len(moving)}"
        rc = main(["register", "--fixed", str(files2d["fixed"]), "--moving", *map(str, moving), "--model",
                   str(files2d["model"]), "--atlas", str(bad), "--out", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and expected in err, err  # one pair or a batch: refused once, up front
        assert not out.exists()


@pytest.fixture
def files2d(tmp_path, make_model, pair2d):
    fixed, moving = pair2d
    d = tmp_path / "in"
    d.mkdir()
    arr = sitk.GetArrayFromImage(fixed)
    atlas = sitk.GetImageFromArray((arr > 0.2).astype(np.uint8) + (arr > 0.6).astype(np.uint8))
    atlas.CopyInformation(fixed)
    paths = {"fixed": d / "fixed.nii.gz", "moving": d / "moving.nii.gz", "moving2": d / "moving2.nii.gz",
             "atlas": d / "atlas.nrrd", "model": make_model(2, "affine")}
    sitk.WriteImage(fixed, str(paths["fixed"]))
    sitk.WriteImage(moving, str(paths["moving"]))
    sitk.WriteImage(sitk.Flip(moving, [True, False]), str(paths["moving2"]))
    sitk.WriteImage(atlas, str(paths["atlas"]))
    return paths


def test_a_slicer_segmentation_atlas_keeps_its_segments_and_gives_volumes_by_name(make_model, oblique_pair, tmp_path,
                                                                                  capsys):
    """A Slicer atlas with two overlapping segments on top of a label map's two: each moving image of a cohort gets
    atlas_labels.seg.nrrd, whose segments (read by slicer-core) are what `istn apply --inverse` gives the plain label
    map through the same transform, and the volumes by segment name in result.json and summary.csv."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML core) is not installed")
    from conftest import read_slicer_segments, slicer_segmentation

    fixed, moving = oblique_pair
    arr = sitk.GetArrayFromImage(fixed)
    labels = sitk.GetImageFromArray((arr > 0.1).astype(np.uint8) + (arr > 0.5).astype(np.uint8))  # 1 outside 2
    labels.CopyInformation(fixed)
    d = tmp_path / "in"
    d.mkdir()
    for name, image in (("fixed", fixed), ("moving", moving), ("moving2", sitk.Flip(moving, [True, False, False])),
                        ("labels", labels)):
        sitk.WriteImage(image, str(d / f"{name}.nii.gz"))
    scene = slicer.vtkMRMLScene()
    atlas = slicer_segmentation(scene, labels, d / "atlas.seg.nrrd", overlapping=True)
    out = tmp_path / "cohort"
    assert main(["register", "--fixed", str(d / "fixed.nii.gz"), "--moving", str(d / "moving.nii.gz"),
                 str(d / "moving2.nii.gz"), "--model", str(make_model(3, "affine")), "--atlas", str(atlas),
                 "--out", str(out), "--refine", "2", "--quiet", "--no-figure"]) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert list(rows[0])[9:12] == ["atlas_ml_outer", "atlas_ml_inner", "atlas_ml_both"]  # the file's order
    for row, moving_file in zip(rows, ("moving", "moving2")):
        folder = out / row["folder"]
        assert not (folder / "atlas_labels.nii.gz").exists()
        plain = folder / "plain.nii.gz"
        assert main(["apply", "--inverse", "--transform", str(folder / "transform.h5"), "--reference",
                     str(d / f"{moving_file}.nii.gz"), "--input", str(d / "labels.nii.gz"), "--out", str(plain)]) == 0
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(plain)))
        got, _ = read_slicer_segments(scene, folder / "atlas_labels.seg.nrrd")
        assert list(got) == ["outer", "inner", "both"] and got["both"][1] != got["outer"][1]  # two layers
        result = json.loads((folder / "result.json").read_text())["atlas"]
        voxel_ml = float(np.prod(sitk.ReadImage(str(plain)).GetSpacing())) / 1000
        for name, mask in (("outer", expected == 1), ("inner", expected == 2), ("both", expected > 0)):
            np.testing.assert_array_equal(got[name][2], mask)
            assert mask.sum() > 50
            assert result["volumes_ml"][name] == pytest.approx(mask.sum() * voxel_ml)
            assert float(row[f"atlas_ml_{name}"]) == pytest.approx(mask.sum() * voxel_ml)
        assert result["written"] == "atlas_labels.seg.nrrd" and result["labels_outside_the_moving_image"] == []
