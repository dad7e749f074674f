"""`istn apply`: another image of the moving space (labels, a contrast, a mask) through a written transform onto the
fixed grid, with the interpolation a label map needs, and nothing of the user's overwritten."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import read_slicer_segments, slicer_segmentation
from istn import demo
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
             "ct": tmp_path / "moving_ct.nii.gz",
             "affine": tmp_path / "affine.tfm", "bspline": tmp_path / "transform.h5"}
    sitk.WriteImage(fixed, str(paths["fixed"]))
    sitk.WriteImage(labels, str(paths["labels"]))
    sitk.WriteImage(moving, str(paths["intensities"]))
    sitk.WriteImage(sitk.Cast(moving * 3000.0, sitk.sitkInt16), str(paths["int16"]))
    # as CT stores it: integers, the air at -1000 (a constant background that is not 0)
    ct = sitk.GetImageFromArray((np.round(sitk.GetArrayFromImage(moving) * 3000.0) - 1000.0).astype(np.int16))
    ct.CopyInformation(moving)
    sitk.WriteImage(ct, str(paths["ct"]))
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


@pytest.mark.parametrize("kind", ["intensities", "int16", "ct"])
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
        vector = np.random.default_rng(0).random((8, 8, 8, 3)).astype(np.float32)  # components that differ
        sitk.WriteImage(sitk.GetImageFromArray(vector, isVector=True), str(tmp_path / "v.nrrd"))
        args["--input"], message = tmp_path / "v.nrrd", "components per pixel"
    elif case == "out-is-folder":
        args["--out"], message = tmp_path, "is a folder: give the output file's name"
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


# --------------------------------------------------------------------------
# Slicer segmentations (.seg.nrrd): segment names, colours and overlapping layers kept
# --------------------------------------------------------------------------
def test_a_slicer_segmentation_keeps_its_names_colours_and_overlaps_on_the_fixed_grid(scene3d, tmp_path, capsys):
    slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML core) is not installed")
    paths, fixed, _, labels, _, both = scene3d
    scene = slicer.vtkMRMLScene()
    seg = slicer_segmentation(scene, labels, tmp_path / "moving.seg.nrrd", overlapping=True)
    assert sitk.ReadImage(str(seg)).GetNumberOfComponentsPerPixel() == 2  # Slicer wrote two layers
    out = tmp_path / "in_fixed.seg.nrrd"
    assert main(["apply", "--transform", str(paths["bspline"]), "--reference", str(paths["fixed"]), "--input",
                 str(seg), "--out", str(out)]) == 0
    assert "nearest (auto: a segmentation: 3 segments)" in capsys.readouterr().out
    given, _ = read_slicer_segments(scene, seg)
    got, content = read_slicer_segments(scene, out)
    assert list(got) == ["outer", "inner", "both"]
    assert {n: v[:2] for n, v in got.items()} == {n: v[:2] for n, v in given.items()}  # colours, layers
    # every segment whole on the fixed grid: what the plain label map gives through the same transform
    run_apply(paths["bspline"], paths["fixed"], paths["labels"], tmp_path / "plain.nii.gz")
    plain = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain.nii.gz")))
    size = fixed.GetSize()
    for name, expected in (("outer", plain == 1), ("inner", plain == 2), ("both", plain > 0)):
        assert got[name][3] == (0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1)
        np.testing.assert_array_equal(got[name][2], expected)
        assert expected.sum() > 50
    # Slicer's Segment Editor paints on the fixed grid now: IJK -> RAS of the fixed image
    geometry = [float(v) for v in content.GetConversionParameter("Reference image geometry").split(";") if v]
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.reshape(fixed.GetDirection(), (3, 3)) * fixed.GetSpacing()
    ijk_to_lps[:3, 3] = fixed.GetOrigin()
    np.testing.assert_allclose(np.reshape(geometry[:16], (4, 4)), np.diag([-1, -1, 1, 1]) @ ijk_to_lps, atol=1e-9)
    assert geometry[16:] == [0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1]
    # overlapping segments fit no plain label map: refused before any work, nothing written
    assert main(["apply", "--transform", str(paths["bspline"]), "--reference", str(paths["fixed"]), "--input",
                 str(seg), "--out", str(tmp_path / "flat.nii.gz")]) == 2
    assert "segments overlap (2 layers), which only a Slicer segmentation file keeps" in capsys.readouterr().err
    assert not (tmp_path / "flat.nii.gz").exists()
    # ... nor can evaluate score them as one
    assert main(["evaluate", "--fixed-labels", str(tmp_path / "plain.nii.gz"), "--moving-labels", str(seg)]) == 2
    assert "a Slicer segmentation whose segments overlap (2 layers)" in capsys.readouterr().err


def test_a_single_layer_segmentation_to_nifti_says_what_is_lost_and_names_segments_left_out(scene3d, tmp_path,
                                                                                            capsys):
    slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML core) is not installed")
    paths, fixed, _, labels, affine, _ = scene3d
    seg = slicer_segmentation(slicer.vtkMRMLScene(), labels, tmp_path / "moving.seg.nrrd", overlapping=False)
    assert main(["apply", "--transform", str(paths["affine"]), "--reference", str(paths["fixed"]), "--input",
                 str(seg), "--out", str(tmp_path / "l.nii.gz")]) == 0
    assert "names and colours of the input are kept only in a .seg.nrrd" in capsys.readouterr().err
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "l.nii.gz")))
    expected = sitk.Resample(labels, fixed, affine, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    np.testing.assert_array_equal(got, sitk.GetArrayFromImage(expected))  # the label values as in the file
    far = sitk.TranslationTransform(3, (500.0, 0.0, 0.0))
    sitk.WriteTransform(far, str(tmp_path / "far.tfm"))
    assert main(["apply", "--transform", str(tmp_path / "far.tfm"), "--reference", str(paths["fixed"]), "--input",
                 str(seg), "--out", str(tmp_path / "x.seg.nrrd")]) == 0
    assert "segment(s) outer, inner fall outside the reference grid" in capsys.readouterr().err


# --------------------------------------------------------------------------
# --inverse: an image of the fixed space onto the moving grid
# --------------------------------------------------------------------------
def _moving_points(moving: sitk.Image, n: int = 500, seed: int = 1) -> np.ndarray:
    """Random world points inside ``moving``'s field of view, off its voxel centres."""
    rng = np.random.default_rng(seed)
    index = rng.uniform(0, 1, (n, 3)) * (np.asarray(moving.GetSize()) - 1)
    return np.array([moving.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in index])


def _smooth_deformation(around: sitk.Image, seed: int = 3, sd_mm: float = 2.5) -> sitk.BSplineTransform:
    """A B-spline (2D or 3D) whose domain covers ``around`` with 40 mm to spare and whose displacement fades to
    zero before the domain's edge (ITK's B-spline stops there; a registration's lies over the fixed image the same
    way)."""
    d = around.GetDimension()
    margin = [int(40 / s) for s in around.GetSpacing()]
    mesh = sitk.BSplineTransformInitializer(sitk.ConstantPad(around, margin, margin), (8,) * d)
    shape = (d,) + (11,) * d  # d components x (mesh + 3) control points per axis
    inner = np.zeros(shape[1:], bool)
    inner[(slice(3, -3),) * d] = True
    values = np.random.default_rng(seed).normal(0, sd_mm, shape) * inner
    mesh.SetParameters(tuple(values.ravel()))
    return mesh


def test_the_inverse_of_an_affine_is_its_exact_inverse(scene3d):
    from istn.inverse import inverse_transform

    _, _, moving, _, affine, _ = scene3d
    inv = inverse_transform(affine, moving)
    assert inv.exact and inv.round_trip_mm["max"] < 1e-9
    for y in _moving_points(moving, 20):
        np.testing.assert_allclose(affine.TransformPoint(inv.transform.TransformPoint(y.tolist())), y, atol=1e-9)


def test_the_inverse_of_affine_plus_bspline_round_trips_both_ways(scene3d):
    """forward(inverse(y)) = y at points of the moving image's field of view off the 4 mm lattice, and
    inverse(forward(x)) = x, to 0.1 mm (5 % of a voxel); the deformation is large enough that the linear part's
    inverse alone misses by millimetres; beyond the lattice the inverse is the linear part's, not the identity."""
    from istn.inverse import inverse_transform

    _, fixed, moving, _, affine, _ = scene3d
    both = sitk.CompositeTransform([affine, _smooth_deformation(fixed)])  # the B-spline first, in fixed space
    inv = inverse_transform(both, moving, 4.0)
    assert not inv.exact and inv.round_trip_mm["max"] < 0.1 and inv.round_trip_mm["over_warn"] == 0
    ys = _moving_points(moving)
    back = np.array([inv.transform.TransformPoint(y.tolist()) for y in ys])
    there = np.array([both.TransformPoint(x.tolist()) for x in back])
    assert np.abs(there - ys).max() < 0.1
    again = np.array([inv.transform.TransformPoint(both.TransformPoint(x.tolist())) for x in back])
    assert np.abs(again - back).max() < 0.1
    affine_only = np.array([affine.GetInverse().TransformPoint(y.tolist()) for y in ys])
    assert np.linalg.norm(affine_only - back, axis=1).max() > 2.0
    far = (500.0, -400.0, 300.0)
    np.testing.assert_allclose(inv.transform.TransformPoint(far), affine.GetInverse().TransformPoint(far), atol=1e-6)


def test_apply_inverse_brings_an_image_of_the_fixed_space_onto_the_moving_grid(scene3d, tmp_path, capsys):
    """The moving image taken into the fixed space (exactly) and brought back with --inverse onto the moving grid
    is the moving image again where the fixed grid saw it; labels come back as labels; an affine is exact."""
    paths, fixed, moving, labels, affine, _ = scene3d
    both = sitk.CompositeTransform([affine, _smooth_deformation(fixed)])
    sitk.WriteTransform(both, str(tmp_path / "smooth.h5"))
    in_fixed = sitk.Resample(moving, fixed, both, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    sitk.WriteImage(in_fixed, str(tmp_path / "in_fixed.nii.gz"))
    out = tmp_path / "back.nii.gz"
    assert main(["apply", "--inverse", "--transform", str(tmp_path / "smooth.h5"), "--reference", str(paths["intensities"]),
                 "--input", str(tmp_path / "in_fixed.nii.gz"), "--out", str(out), "--background", "-1"]) == 0
    printed = capsys.readouterr().out
    # every moving voxel (1.8 x 2.2 x 3.2 mm) on the lattice: the mesh / 8 = 2.5 mm is finer than 2 of its spacings
    assert "inverse: solved on a 1.8 x 2.2 x 3.2 mm lattice" in printed and "round trip within" in printed
    back = sitk.ReadImage(str(out))
    assert back.GetSize() == moving.GetSize() and np.allclose(back.GetDirection(), moving.GetDirection())
    got, want = sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(moving)
    seen = got > -1  # inside the fixed grid's field of view
    assert seen.mean() > 0.2  # (the fixed grid is oblique and smaller)
    assert np.abs(got - want)[seen].mean() < 0.02 * np.ptp(want)  # two linear resamplings apart, no more
    # without --inverse the same command resamples the other way: not the moving image
    assert main(["apply", "--transform", str(tmp_path / "smooth.h5"), "--reference", str(paths["intensities"]),
                 "--input", str(tmp_path / "in_fixed.nii.gz"), "--out", str(tmp_path / "wrong.nii.gz")]) == 0
    wrong = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "wrong.nii.gz")))
    assert np.abs(wrong - want)[seen].mean() > 3 * np.abs(got - want)[seen].mean()
    labels_in_fixed = sitk.Resample(labels, fixed, both, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    sitk.WriteImage(labels_in_fixed, str(tmp_path / "labels_in_fixed.nrrd"))
    s = run_apply(paths["affine"], paths["labels"], tmp_path / "labels_in_fixed.nrrd", tmp_path / "lb.nrrd",
                  inverse=True)
    assert s["inverse"]["exact"] and s["interpolation"].startswith("nearest")
    assert sitk.ReadImage(str(tmp_path / "lb.nrrd")).GetPixelID() == sitk.sitkUInt8


def test_an_inverse_that_misses_is_reported(scene3d, tmp_path, capsys):
    """scene3d's B-spline ends abruptly where its domain does (ITK's B-spline displaces nothing beyond it), inside
    the moving image's field of view: no transform's inverse can follow a jump, and the user is told where."""
    paths = scene3d[0]
    assert main(["apply", "--inverse", "--transform", str(paths["bspline"]), "--reference", str(paths["intensities"]),
                 "--input", str(paths["fixed"]), "--out", str(tmp_path / "back.nii.gz")]) == 0
    err = capsys.readouterr().err
    assert "istn apply: warning: the inverse misses by more than 0.5 mm at" in err and "check those regions" in err
    assert (tmp_path / "back.nii.gz").is_file()


@pytest.mark.skipif(not (demo.MODELS_DIR / demo.AFFINE_MODEL).exists(), reason="bundled models absent")
def test_atlas_labels_reach_a_scanner_placed_head_through_the_inverse(tmp_path):
    """The sample pair, the moving head placed in a scanner position (demo), registered with the bundled models:
    the FIXED image's labels brought onto the moving head's own grid with --inverse score against the moving
    head's labels as the forward direction scores (moving labels onto the fixed grid), far above where they lie."""
    from istn.cli import run_evaluate

    pair = demo.sample_pair()
    moving, moving_labels, _ = demo.place_in_scanner(pair["moving"], pair["moving_labels"])
    files = {"fixed": pair["fixed"], "moving": moving, "fixed_labels": pair["fixed_labels"],
             "moving_labels": moving_labels}
    for name, image in files.items():
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    assert main(["register", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz"),
                 "--out", str(tmp_path / "result"), "--no-figure", "--quiet"]) == 0
    transform = tmp_path / "result" / "transform.h5"
    s = run_apply(transform, tmp_path / "moving.nii.gz", tmp_path / "fixed_labels.nii.gz",
                  tmp_path / "atlas_on_moving.nii.gz", inverse=True)
    assert s["inverse"]["round_trip_mm"]["max"] < 0.1
    inverse = run_evaluate(tmp_path / "atlas_on_moving.nii.gz", tmp_path / "moving_labels.nii.gz", None)["mean"]["dice"]
    forward = run_evaluate(tmp_path / "fixed_labels.nii.gz", tmp_path / "moving_labels.nii.gz", transform)["mean"]["dice"]
    where_they_lie = run_evaluate(tmp_path / "fixed_labels.nii.gz", tmp_path / "moving_labels.nii.gz",
                                  None)["mean"]["dice"]
    print(f"Dice: inverse {inverse:.3f}, forward {forward:.3f}, where they lie {where_they_lie:.3f}")
    assert forward > 0.75 and abs(inverse - forward) < 0.03 and where_they_lie < 0.2, (inverse, forward, where_they_lie)


def test_the_inverse_of_a_2d_affine_plus_bspline_round_trips(pair2d):
    from istn.inverse import inverse_transform

    fixed, moving = pair2d
    mesh = _smooth_deformation(fixed, seed=1, sd_mm=2.0)
    affine = sitk.AffineTransform(2)
    affine.SetMatrix((0.95, 0.1, -0.1, 1.02))
    affine.SetTranslation((3.0, -2.0))
    both = sitk.CompositeTransform([affine, mesh])
    inv = inverse_transform(both, moving, 4.0)
    assert not inv.exact and inv.round_trip_mm["max"] < 0.1
    rng = np.random.default_rng(2)
    for index in rng.uniform(0, 1, (50, 2)) * (np.asarray(moving.GetSize()) - 1):
        y = moving.TransformContinuousIndexToPhysicalPoint(index.tolist())
        np.testing.assert_allclose(both.TransformPoint(inv.transform.TransformPoint(y)), y, atol=0.1)


def test_invert_writes_the_inverse_any_itk_reader_takes_back(scene3d, tmp_path, capsys):
    """`istn invert` writes what `istn apply --inverse` goes through: read back by SimpleITK, it maps the forward
    transform's images back (within 0.1 mm); an affine's is exact and may be a .tfm; a non-linear one must be .h5,
    an existing --out is kept, and nothing is written on a refusal."""
    paths, fixed, moving, _, affine, _ = scene3d
    both = sitk.CompositeTransform([affine, _smooth_deformation(fixed)])
    sitk.WriteTransform(both, str(tmp_path / "smooth.h5"))
    out = tmp_path / "inv" / "inverse.h5"
    assert main(["invert", "--transform", str(tmp_path / "smooth.h5"), "--reference", str(paths["intensities"]),
                 "--out", str(out)]) == 0
    assert "round trip within" in capsys.readouterr().out
    back = sitk.ReadTransform(str(out))
    for y in _moving_points(moving, 100):
        np.testing.assert_allclose(both.TransformPoint(back.TransformPoint(y.tolist())), y, atol=0.1)
    assert main(["invert", "--transform", str(paths["affine"]), "--reference", str(paths["intensities"]),
                 "--out", str(tmp_path / "affine_inverse.tfm")]) == 0
    exact = sitk.ReadTransform(str(tmp_path / "affine_inverse.tfm"))
    for y in _moving_points(moving, 10):
        np.testing.assert_allclose(affine.TransformPoint(exact.TransformPoint(y.tolist())), y, atol=1e-6)
    capsys.readouterr()
    before = out.read_bytes()
    for bad, message in ((["--out", str(out)], "exists; choose another file name, or --overwrite"),
                         (["--out", str(tmp_path / "inverse.tfm")], "only HDF5 transform files keep: name it inverse.h5"),
                         (["--out", str(tmp_path / "inverse.nii.gz")], "a transform file is named .h5")):
        assert main(["invert", "--transform", str(tmp_path / "smooth.h5"), "--reference", str(paths["intensities"])]
                    + bad) == 2
        assert message in capsys.readouterr().err
    assert out.read_bytes() == before
    assert not (tmp_path / "inverse.tfm").exists() and not (tmp_path / "inverse.nii.gz").exists()


def test_a_2d_result_goes_only_to_a_format_that_keeps_where_it_lies(tmp_path, capsys):
    """PNG, TIFF and JPEG keep no origin or direction (JPEG no spacing either, and changes values): a result on
    a rotated, offset 2D reference written there lay elsewhere in every other tool, silently (2D audit, session
    31). Refused in one line, nothing written; a reference those formats do keep (1 mm, no rotation, origin 0)
    still goes to PNG, the labels as they are."""
    arr = np.zeros((40, 48), np.uint8)
    arr[10:20, 12:30] = 1
    arr[22:30, 8:16] = 2
    labels = sitk.GetImageFromArray(arr)
    plain = tmp_path / "plain.png"
    sitk.WriteImage(labels, str(plain))
    rotated = sitk.Image(labels)
    rotated.SetOrigin((40.0, -25.0))
    rotated.SetSpacing((0.7, 0.9))
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    rotated.SetDirection((c, -s, s, c))
    sitk.WriteImage(rotated, str(tmp_path / "rotated.nii.gz"))
    sitk.WriteTransform(sitk.AffineTransform(2), str(tmp_path / "identity.tfm"))

    def apply(reference, out):
        return main(["apply", "--transform", str(tmp_path / "identity.tfm"), "--reference", str(reference),
                     "--input", str(reference), "--out", str(out)])

    for suffix, lost in ((".png", "origin, direction"), (".tif", "origin, direction"),
                         (".jpg", "spacing, origin, direction, voxel values (lossy compression)")):
        assert apply(tmp_path / "rotated.nii.gz", tmp_path / f"out{suffix}") == 2
        err = capsys.readouterr().err
        assert f"'{suffix}' files do not keep the reference's {lost}" in err and len(err.strip().splitlines()) == 1
        assert err.strip().endswith("name it .nii.gz, .nrrd or .mha")
        assert not (tmp_path / f"out{suffix}").exists()
    # a sheared reference (NRRD keeps it): NIfTI cannot, and is not offered (clinical audit: "'.nii.gz' files do not
    # keep ...; name it .nii.gz, .nrrd or .mha")
    sheared = sitk.Image(rotated)
    sheared.SetDirection((1.0, 0.3, 0.0, 1.0))
    sitk.WriteImage(sheared, str(tmp_path / "sheared.nrrd"))
    assert apply(tmp_path / "sheared.nrrd", tmp_path / "out_sheared.nii.gz") == 2
    err = capsys.readouterr().err
    assert "do not keep the reference's direction (a sheared grid: NIfTI stores rotations only)" in err
    assert err.strip().endswith("name it .nrrd or .mha"), err
    assert apply(tmp_path / "sheared.nrrd", tmp_path / "out_sheared.png") == 2  # PNG: not NIfTI's fault
    err = capsys.readouterr().err
    assert "NIfTI" not in err and err.strip().endswith("name it .nrrd or .mha"), err
    assert apply(tmp_path / "sheared.nrrd", tmp_path / "out_sheared.nrrd") == 0
    written = sitk.ReadImage(str(tmp_path / "out_sheared.nrrd"))  # the same voxels at the same places
    for index in ((0, 0), (7, 0), (0, 9), (47, 39)):
        assert np.allclose(written.TransformIndexToPhysicalPoint(index), sheared.TransformIndexToPhysicalPoint(index))
    assert apply(tmp_path / "rotated.nii.gz", tmp_path / "out.nii.gz") == 0
    assert apply(plain, tmp_path / "out.png") == 0
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.png"))), arr)


def test_a_flat_synthetic_image_goes_through_linearly_and_a_fine_parcellation_by_nearest(tmp_path, capsys):
    """Auto interpolation on images that look alike by their values: a flat synthetic 8-bit image (shapes of a few
    greys drawn anti-aliased, as synth2d's; 2D audit: taken for "192 labels") is intensities, its edges' in-between
    values equal to none of their neighbours; a 2D parcellation of 80 labels, rotated through nearest neighbour,
    is labels."""
    from scipy.spatial import cKDTree

    fine = np.zeros((512, 512))  # drawn at 4x, then block-averaged: in-between values along the shapes' edges
    yy, xx = np.mgrid[:512, :512]
    for (cy, cx, r, grey) in ((200, 180, 120, 255), (330, 340, 90, 125), (150, 360, 60, 216), (380, 150, 50, 161)):
        fine[(yy - cy) ** 2 + ((xx - cx) * 1.3) ** 2 < r * r] = grey
    fine[60:140, 60:140] = 244
    flat = np.round(fine.reshape(128, 4, 128, 4).mean(axis=(1, 3))).astype(np.uint8)
    rng = np.random.default_rng(0)
    _, nearest = cKDTree(rng.uniform(0, 128, (80, 2))).query(np.stack(np.mgrid[:128, :128], -1).reshape(-1, 2))
    parcels = sitk.GetImageFromArray((nearest.reshape(128, 128) + 1).astype(np.uint8))
    parcels = sitk.Resample(parcels, parcels, sitk.Euler2DTransform((64.0, 64.0), 0.3), sitk.sitkNearestNeighbor, 0)
    assert len(np.unique(flat)) > 60 and len(np.unique(sitk.GetArrayViewFromImage(parcels))) > 60  # many values
    shift = sitk.TranslationTransform(2, (2.0, -3.0))
    sitk.WriteTransform(shift, str(tmp_path / "shift.tfm"))
    sitk.WriteImage(sitk.GetImageFromArray(flat), str(tmp_path / "flat.png"))
    sitk.WriteImage(parcels, str(tmp_path / "parcels.nii.gz"))
    for name, expected in (("flat.png", "linear (auto: integer intensities"), ("parcels.nii.gz", "nearest (auto: a label map: ")):
        s = run_apply(tmp_path / "shift.tfm", tmp_path / "parcels.nii.gz", tmp_path / name, tmp_path / f"out_{name}.nrrd")
        assert s["interpolation"].startswith(expected), s["interpolation"]


def test_a_label_map_without_0_is_filled_with_its_background_and_an_unclear_image_says_so(tmp_path):
    """Label audit: a label map whose background is -1 (or 65535) was filled with 0, a value it did not hold,
    and its background counted as a label; an image whose kind is not clear-cut (its share of in-between edges
    near the limit) was resampled without a word on the choice."""
    from scipy.spatial import cKDTree

    _, nearest = cKDTree(np.random.default_rng(0).uniform(0, 64, (80, 2))).query(
        np.stack(np.mgrid[:64, :64], -1).reshape(-1, 2))
    parcels = (nearest.reshape(64, 64) + 1).astype(np.int16)
    parcels[:, :8] = -1  # the background
    sitk.WriteImage(sitk.GetImageFromArray(parcels), str(tmp_path / "parcels.nii.gz"))
    shift = sitk.TranslationTransform(2, (-12.0, 0.0))  # fixed -> moving: brings in 12 columns from outside
    sitk.WriteTransform(shift, str(tmp_path / "shift.tfm"))
    s = run_apply(tmp_path / "shift.tfm", tmp_path / "parcels.nii.gz", tmp_path / "parcels.nii.gz",
                  tmp_path / "out.nii.gz")
    count = len(set(np.unique(parcels).tolist()) - {-1})
    assert count > 60 and s["interpolation"] == f"nearest (auto: a label map: {count} labels)"
    assert s["background"] == -1
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nii.gz")))
    assert set(np.unique(out).tolist()) <= set(np.unique(parcels).tolist()) and (out[:, :12] == -1).all()

    # a map labelled everywhere (no 0, its most common value neither its lowest nor its type's highest): filled
    # with 0 as before, no class invented outside the data (review)
    classes = np.where(parcels < 0, 2, parcels % 3 + 1).astype(np.int16)
    classes[:20] = 2
    sitk.WriteImage(sitk.GetImageFromArray(classes), str(tmp_path / "classes.nii.gz"))
    s = run_apply(tmp_path / "shift.tfm", tmp_path / "parcels.nii.gz", tmp_path / "classes.nii.gz",
                  tmp_path / "out3.nii.gz", interpolation="nearest")
    assert s["background"] == 0

    # an image between the kinds (parcels beside a strip of noise, 7 % of its edges in-between): the choice is
    # made and said to be unclear, with the other choice named
    unclear = parcels.copy()
    unclear[:, -3:] = np.random.default_rng(1).integers(100, 400, (64, 3))
    sitk.WriteImage(sitk.GetImageFromArray(unclear), str(tmp_path / "unclear.nii.gz"))
    s = run_apply(tmp_path / "shift.tfm", tmp_path / "parcels.nii.gz", tmp_path / "unclear.nii.gz",
                  tmp_path / "out2.nii.gz")
    assert s["interpolation"].startswith("nearest (auto: a label map: ")
    assert "not clear-cut: 7% of its edges" in s["interpolation"]
    assert "give --interpolation linear if it holds intensities" in s["interpolation"]


# --------------------------------------------------------------------------
# Two-file formats and extensions in capitals (session 35: the clinical audit's apply findings)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name, second", [("x.nhdr", "x.raw.gz"), ("x.mhd", "x.zraw"), ("x.hdr", "x.img"),
                                          ("x.img", "x.hdr"), ("x.img.gz", "x.hdr.gz"), ("X.NII.GZ", None),
                                          ("X.MHA", None)])
def test_every_format_apply_accepts_is_written_whole_under_the_names_asked_for(scene3d, tmp_path, name, second):
    """A header and its voxel file both land under the names asked for (the voxel file once kept a temporary
    name, so .nhdr/.mhd/.hdr results could not be read); an extension in capitals is written, not refused."""
    paths, fixed, _, labels, affine, _ = scene3d
    out = tmp_path / "o" / name
    assert main(["apply", "--transform", str(paths["affine"]), "--reference", str(paths["fixed"]), "--input",
                 str(paths["labels"]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([name] + ([second] if second else []))
    reader = sitk.ImageFileReader()  # as written, read by the format's own reader (ITK has none for .MHA)
    reader.SetFileName(str(out))
    if name == "X.MHA":
        reader.SetImageIO("MetaImageIO")
    got = reader.Execute()
    expected = sitk.Resample(labels, fixed, affine, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(expected))
    np.testing.assert_allclose(got.GetOrigin(), fixed.GetOrigin(), atol=1e-4)


def test_an_input_in_capitals_is_read(scene3d, tmp_path):
    paths, fixed, _, labels, affine, _ = scene3d
    upper = tmp_path / "LABELS.MHA"
    sitk.WriteImage(labels, str(tmp_path / "l.mha"))
    (tmp_path / "l.mha").rename(upper)
    run_apply(paths["affine"], paths["fixed"], upper, tmp_path / "out.nii.gz")
    expected = sitk.Resample(labels, fixed, affine, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nii.gz"))),
                                  sitk.GetArrayFromImage(expected))


def test_the_second_file_of_a_two_file_output_is_never_an_inputs_and_not_replaced_unasked(scene3d, tmp_path,
                                                                                       capsys):
    """An Analyze/NIfTI pair given as input (scan.hdr + scan.img): --out scan.img is a file of that input, even
    with --overwrite; --out y.nhdr where a y.raw.gz exists is refused without --overwrite, the file kept."""
    paths, fixed, _, labels, affine, _ = scene3d
    sitk.WriteImage(labels, str(tmp_path / "scan.hdr"))
    pair = {p: p.read_bytes() for p in (tmp_path / "scan.hdr", tmp_path / "scan.img")}

    def apply(out, *extra):
        return main(["apply", "--transform", str(paths["affine"]), "--reference", str(paths["fixed"]), "--input",
                     str(tmp_path / "scan.hdr"), "--out", str(out), *extra])

    for extra in ((), ("--overwrite",)):
        assert apply(tmp_path / "scan.img", *extra) == 2
        assert "is a file of the input" in capsys.readouterr().err
    other = tmp_path / "other.hdr"  # another input whose voxels a new output's name would take
    sitk.WriteImage(labels, str(other))
    assert main(["apply", "--transform", str(paths["affine"]), "--reference", str(other), "--input",
                 str(tmp_path / "scan.hdr"), "--out", str(tmp_path / "other.img.gz"), "--overwrite"]) == 0  # own name
    assert all(p.read_bytes() == b for p, b in pair.items())
    theirs = tmp_path / "y.raw.gz"
    theirs.write_bytes(b"mine")
    assert apply(tmp_path / "y.nhdr") == 2
    assert "would also write" in capsys.readouterr().err and theirs.read_bytes() == b"mine"
    assert not (tmp_path / "y.nhdr").exists()
    assert apply(tmp_path / "y.nhdr", "--overwrite") == 0
    expected = sitk.Resample(labels, fixed, affine, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "y.nhdr"))),
                                  sitk.GetArrayFromImage(expected))
    assert all(p.read_bytes() == b for p, b in pair.items())


def test_an_out_that_names_a_folder_or_another_file_type_is_refused(scene3d, tmp_path, capsys):
    paths, *_ = scene3d
    assert main(["apply", "--transform", str(paths["affine"]), "--reference", str(paths["fixed"]), "--input",
                 str(paths["labels"]), "--out", str(tmp_path / "new") + "/"]) == 2
    assert "names a folder: give the output file's name" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(["evaluate", "--fixed-labels", str(paths["labels"]), "--moving-labels", str(paths["labels"]),
                 "--out", str(tmp_path / "metrics.nii.gz")]) == 2
    assert "evaluate writes its metrics as JSON; name it metrics.json" in capsys.readouterr().err
    assert not (tmp_path / "metrics.nii.gz").exists()
