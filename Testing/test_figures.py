"""The overview picture `istn register` writes: what it shows does not depend on how the files store their voxels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from istn import demo
from istn.cli import main
from istn.figures import display_image, registration_overview

pytestmark = pytest.mark.skipif(not (demo.MODELS_DIR / demo.AFFINE_MODEL).exists(), reason="bundled models absent")


def _png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_display_image_is_the_same_voxels_stored_lps():
    pair = demo.sample_pair()
    fixed = sitk.Cast(pair["fixed"], sitk.sitkFloat32)
    for layout in ("RAS", "ASL", "PIR"):
        shown = display_image(sitk.DICOMOrient(fixed, layout))
        assert shown.GetDirection() == pytest.approx(fixed.GetDirection(), abs=1e-12)  # the sample is stored LPS
        assert shown.GetOrigin() == pytest.approx(fixed.GetOrigin(), abs=1e-9)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(shown), sitk.GetArrayViewFromImage(fixed))


def test_a_2d_image_stored_flipped_is_displayed_as_stored_along_x_and_y():
    """A 2D NIfTI whose header flips its axes was drawn as stored: upside down and mirrored (helper audit)."""
    image = sitk.GetImageFromArray(np.arange(35, dtype=np.float32).reshape(5, 7))
    image.SetSpacing((0.5, 2.0))
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(np.arange(35, dtype=np.float32).reshape(5, 7)[::-1, ::-1]))
    flipped.SetSpacing((0.5, 2.0))
    flipped.SetDirection((-1.0, 0.0, 0.0, -1.0))
    flipped.SetOrigin((3.0, 8.0))  # its first pixel is the other's last: the same pixels in the world
    shown = display_image(flipped)
    assert shown.GetDirection() == (1.0, 0.0, 0.0, 1.0) and shown.GetOrigin() == pytest.approx((0.0, 0.0))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(shown), sitk.GetArrayViewFromImage(image))


def test_overview_is_the_same_picture_whatever_the_storage(tmp_path):
    """The sample pair registered as stored (LPS) and re-stored RAS (fixed) / sagittal ASL (moving): the same
    transform, so the overview (images, maps, loss curves; no text that names the files) must be the same
    picture, and it must differ from one drawn without the registration (the warped panels show the result)."""
    from istn.export import load_model
    from istn.registration import jacobian_image, register, warp_image

    pair = demo.sample_pair()
    models = [load_model(demo.MODELS_DIR / name) for name in (demo.AFFINE_MODEL, demo.BSPLINE_MODEL)]
    moving_placed, _, _ = demo.place_in_scanner(pair["moving"], pair["moving_labels"])
    pictures = {}
    for name, fixed, moving in (("lps", pair["fixed"], moving_placed),
                                ("restored", sitk.DICOMOrient(pair["fixed"], "RAS"),
                                 sitk.DICOMOrient(moving_placed, "ASL"))):
        aff = register(fixed, moving, models[0], iterations=3, device="cpu", threads=1)
        bsp = register(fixed, moving, models[1], iterations=3, device="cpu", threads=1,
                       initial_transform=aff.transform)
        warped = warp_image(moving, fixed, bsp.transform)
        lattice = jacobian_image(bsp.transform, fixed, 4.0, resample=False)  # in the fixed image's own storage
        path = registration_overview(tmp_path / f"{name}.png", fixed, moving, warped,
                                     {"affine": aff, "B-spline": bsp}, fixed_map=bsp.fixed_map,
                                     warped_moving_map=bsp.warped_moving_map(), jacobian=lattice)
        pictures[name] = _png(path)
        if name == "lps":
            unregistered = _png(registration_overview(
                tmp_path / "unregistered.png", fixed, moving, warp_image(moving, fixed, sitk.Transform(3, sitk.sitkIdentity)),
                {"affine": aff, "B-spline": bsp}, fixed_map=bsp.fixed_map, warped_moving_map=bsp.warped_moving_map(),
                jacobian=lattice))
    a, b = pictures["lps"], pictures["restored"]
    assert a.shape == b.shape
    differs = np.abs(a - b).max(axis=-1) > 8
    assert differs.mean() < 1e-3, f"{differs.mean():.4%} of the pixels differ"
    assert (np.abs(a - unregistered).max(axis=-1) > 8).mean() > 0.01


def test_the_jacobian_column_shows_expansion_red_and_shrinkage_blue(tmp_path):
    """A Jacobian determinant of 1.1 everywhere (the moving anatomy 10 % larger) draws the fifth column's map and
    histogram red, 0.9 blue; without one the picture has four columns (the same height, 4/5 of the width)."""
    from istn.export import load_model
    from istn.registration import register, warp_image

    pair = demo.sample_pair()
    fixed, moving = pair["fixed"], pair["moving"]
    model = load_model(demo.MODELS_DIR / demo.AFFINE_MODEL)
    aff = register(fixed, moving, model, iterations=0, device="cpu", threads=1)
    warped = warp_image(moving, fixed, aff.transform)

    def draw(name, value):
        jacobian = None
        if value is not None:
            jacobian = sitk.Image(fixed.GetSize(), sitk.sitkFloat32) + value
            jacobian.CopyInformation(fixed)
        return _png(registration_overview(tmp_path / f"{name}.png", fixed, moving, warped, {"affine": aff},
                                          fixed_map=aff.fixed_map, warped_moving_map=aff.warped_moving_map(),
                                          jacobian=jacobian))

    def colours(picture):  # strongly red and strongly blue pixels of the last fifth (the Jacobian column)
        r, g, b = np.moveaxis(picture[:, -picture.shape[1] // 5:], -1, 0)
        return int(((r > b + 100) & (r > g + 100)).sum()), int(((b > r + 100) & (b > g + 100)).sum())

    larger, smaller, without = draw("larger", 1.1), draw("smaller", 0.9), draw("without", None)
    red, blue = colours(larger)
    assert red > 20000 and blue == 0, (red, blue)
    red, blue = colours(smaller)
    assert blue > 20000 and red == 0, (red, blue)
    assert without.shape[0] == larger.shape[0] and abs(without.shape[1] / larger.shape[1] - 0.8) < 0.01


def test_register_writes_the_overview_unless_told_not_to(tmp_path):
    pair = demo.sample_pair()
    for key in ("fixed", "moving"):
        sitk.WriteImage(pair[key], str(tmp_path / f"{key}.nii.gz"))
    args = ["register", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz"),
            "--refine", "2", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "with")]) == 0
    picture = _png(tmp_path / "with" / "overview.png")
    assert picture.shape[0] > 500 and picture.shape[1] > 1000 and picture.std() > 20  # a drawn figure, not blank
    assert json.loads((tmp_path / "with" / "result.json").read_text())["figure"] == "overview.png"
    assert main(args + ["--out", str(tmp_path / "without"), "--no-figure"]) == 0
    assert not (tmp_path / "without" / "overview.png").exists()
    assert "figure" not in json.loads((tmp_path / "without" / "result.json").read_text())


def test_a_figure_that_fails_costs_a_warning_not_the_registration(tmp_path, monkeypatch, capsys):
    import istn.figures

    def broken(*a, **k):
        raise RuntimeError("no display backend")

    monkeypatch.setattr(istn.figures, "registration_overview", broken)
    pair = demo.sample_pair()
    for key in ("fixed", "moving"):
        sitk.WriteImage(pair[key], str(tmp_path / f"{key}.nii.gz"))
    assert main(["register", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz"),
                 "--refine", "2", "--quiet", "--out", str(tmp_path / "out")]) == 0
    assert "overview.png was not drawn (RuntimeError: no display backend)" in capsys.readouterr().err
    assert (tmp_path / "out" / "transform.h5").is_file() and not (tmp_path / "out" / "overview.png").exists()


def test_lps_grid_is_the_grid_dicomorient_gives_without_its_voxels():
    """`lps_grid` (what a large image's display grid is built on, no re-stored copy made) equals the geometry of
    ``sitk.DICOMOrient(image, "LPS")`` for images stored in any order, axis-aligned or oblique."""
    from conftest import blob_image, rotation

    from istn.geometry import Grid, lps_grid

    for angles in ((0, 0, 0), (20, -10, 15), (44, 30, -50)):
        image = blob_image((20, 24, 12), (1.0, 1.2, 1.5), (-10.0, -12.0, -9.0), rotation(3, angles).ravel())
        for layout in ("LPS", "RAS", "ASL", "PIR", "SLA"):
            stored = sitk.DICOMOrient(image, layout)
            want, got = Grid.from_image(sitk.DICOMOrient(stored, "LPS")), lps_grid(Grid.from_image(stored))
            assert got.size == want.size
            np.testing.assert_allclose(got.spacing, want.spacing)
            np.testing.assert_allclose(got.origin, want.origin, atol=1e-9)
            np.testing.assert_allclose(got.direction, want.direction, atol=1e-12)


def test_display_image_of_a_large_image_keeps_its_field_of_view_whatever_the_storage():
    """A 1 mm 200 x 240 x 120 head (anisotropic 1 x 1 x 1.5 mm): on at most 96 voxels per axis, the same extent
    (corner to corner) and the same grid and values whether stored LPS, RAS or sagittal."""
    from conftest import blob_image

    image = blob_image((200, 240, 120), (1.0, 1.0, 1.5), (-100.0, -120.0, -90.0), np.eye(3).ravel())
    ref = display_image(image, 96)
    assert ref.GetSize() == (80, 96, 48) and ref.GetSpacing() == pytest.approx((2.5, 2.5, 3.75))  # all scaled by 2.5
    for im in (image, ref):  # the same corners: the field of view is kept
        lo = im.TransformContinuousIndexToPhysicalPoint([-0.5] * 3)
        hi = im.TransformContinuousIndexToPhysicalPoint([n - 0.5 for n in im.GetSize()])
        assert lo == pytest.approx((-100.5, -120.5, -90.75), abs=1e-9)
        assert hi == pytest.approx((99.5, 119.5, 89.25), abs=1e-9)
    for layout in ("RAS", "ASL"):
        other = display_image(sitk.DICOMOrient(image, layout), 96)
        assert other.GetSize() == ref.GetSize()
        assert other.GetOrigin() == pytest.approx(ref.GetOrigin(), abs=1e-9)
        np.testing.assert_allclose(sitk.GetArrayViewFromImage(other), sitk.GetArrayViewFromImage(ref), atol=1e-4)


def test_checkerboard_image_alternates_world_cubes_whatever_the_storage():
    """Each voxel shows the fixed image when the 20 mm world cube it lies in (one corner at the image centre) is
    even, else the warped image (each windowed to [0, 1]); the same cubes stored LPS, RAS or sagittal, and on an
    oblique grid the cubes stay world-aligned."""
    from conftest import rotation

    from istn.figures import checkerboard_image

    rng = np.random.default_rng(0)
    for direction in (np.eye(3), rotation(3, (20.0, -10.0, 15.0))):
        fixed = sitk.GetImageFromArray(rng.uniform(1.0, 2.0, (30, 40, 50)).astype(np.float32))
        fixed.SetSpacing((2.0, 1.5, 3.0))
        fixed.SetOrigin((-40.0, -30.0, -45.0))
        fixed.SetDirection(np.ravel(direction).tolist())
        warped = sitk.GetImageFromArray(rng.uniform(5.0, 9.0, (30, 40, 50)).astype(np.float32))
        warped.CopyInformation(fixed)
        board = sitk.GetArrayFromImage(checkerboard_image(fixed, warped))
        f, w = sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(warped)
        centre = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
        for _ in range(300):
            ijk = [int(rng.integers(n)) for n in fixed.GetSize()]
            world = np.asarray(fixed.TransformIndexToPhysicalPoint(ijk)) - centre
            even = int(np.floor(world / 20.0).sum()) % 2 == 0
            source = f if even else w
            lo, hi = np.percentile(source[source > 0], [1, 99.5])
            expected = np.clip((source[ijk[2], ijk[1], ijk[0]] - lo) / (hi - lo), 0, 1)
            assert board[ijk[2], ijk[1], ijk[0]] == pytest.approx(expected, abs=1e-5)
        for layout in ("RAS", "ASL"):
            other = checkerboard_image(sitk.DICOMOrient(fixed, layout), sitk.DICOMOrient(warped, layout))
            back = sitk.Resample(other, fixed, sitk.Transform(), sitk.sitkNearestNeighbor)
            np.testing.assert_allclose(sitk.GetArrayFromImage(back), board, atol=1e-6)


def test_a_chain_of_models_of_one_file_name_draws_a_curve_for_each(tmp_path, monkeypatch, make_model):
    """istn train exports OUT/model.pt, so a chain of a user's affine and B-spline is often two 'model.pt': the
    overview's stages were keyed by file name and the affine's curve was lost (2D audit, session 31)."""
    import istn.figures

    from conftest import blob_image

    drawn = {}

    def spy(path, fixed, moving, warped, stages, **kw):
        drawn.update(stages)
        raise RuntimeError("not drawn here")

    monkeypatch.setattr(istn.figures, "registration_overview", spy)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    affine, bspline = tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt"
    make_model(2, "affine").rename(affine)
    make_model(2, "bspline").rename(bspline)
    fixed = blob_image((40, 36), (1.5, 1.5), (-30.0, -27.0), np.eye(2))
    moving = blob_image((40, 36), (1.5, 1.5), (-30.0, -27.0), np.eye(2), centre=(3.0, -2.0))
    sitk.WriteImage(fixed, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "m.nii.gz"))
    assert main(["register", "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "m.nii.gz"),
                 "--model", str(affine), "--model", str(bspline), "--refine", "2", "--quiet",
                 "--out", str(tmp_path / "out")]) == 0
    assert list(drawn) == ["model (1: affine)", "model (2: bspline)"]
