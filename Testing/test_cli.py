"""The command line: outputs, and a clear error with nothing written for every kind of bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import blob_image
from istn.cli import REGISTER_OUTPUTS, main
from istn.errors import InputError


@pytest.fixture
def files(tmp_path, make_model, pair2d, oblique_pair):
    fixed, moving = pair2d
    d = tmp_path / "in"
    d.mkdir()
    paths = {
        "fixed": d / "fixed.nii.gz", "moving": d / "moving.png", "fixed3d": d / "fixed3d.nrrd",
        "model": make_model(2, "affine"), "model3d": make_model(3, "affine"),
    }
    sitk.WriteImage(fixed, str(paths["fixed"]))
    png = sitk.Cast(sitk.RescaleIntensity(moving, 0, 255), sitk.sitkUInt8)
    sitk.WriteImage(png, str(paths["moving"]))
    sitk.WriteImage(oblique_pair[0], str(paths["fixed3d"]))
    return paths


def _register(files, out, **over):
    args = {"--fixed": files["fixed"], "--moving": files["moving"], "--model": files["model"], "--out": out}
    args.update(over)
    argv = ["register", "--refine", "3", "--quiet"]
    for k, v in args.items():
        argv += [k, str(v)]
    return main(argv)


def test_register_writes_every_output(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert _register(files, out) == 0
    for name in REGISTER_OUTPUTS + ("transform.tfm", "overview.png"):  # a 2D pair: its overview too
        assert (out / name).is_file(), name
    res = json.loads((out / "result.json").read_text())
    assert res["figure"] == "overview.png" and not res["warnings"]
    stage = res["stages"][0]
    assert len(stage["loss_per_iteration"]) == 3 and "one_pass" in stage["timings_s"]
    assert stage["model"]["variant"] == "istn-i"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    printed = capsys.readouterr().out
    assert "outputs in" in printed
    info = stage["mutual_information"]
    assert f"images' mutual information {info['as_given']:.3f} as given -> {info['result']:.3f}" in printed


def test_the_overview_titles_an_stn_models_maps_as_the_network_input(files, make_model, tmp_path, monkeypatch):
    """STN-u learns no map: overview.png's map panels say what they show (2D audit: "ITN map" on STN models)."""
    import istn.figures

    drawn = []
    real = istn.figures.registration_figure
    monkeypatch.setattr(istn.figures, "registration_figure", lambda *a, **k: (drawn.append(k), real(*a, **k))[1])
    assert _register(files, tmp_path / "stn", **{"--model": make_model(2, "affine", "stn-u")}) == 0
    assert _register(files, tmp_path / "istn") == 0
    assert [k["learned_maps"] for k in drawn] == [False, True]
    assert (tmp_path / "stn" / "overview.png").is_file()


def test_coarse_iterations_flag_reaches_every_stage(files, tmp_path):
    """--coarse-iterations 2 of --refine 3: result.json says 2 ran on the half-resolution maps (0 by default here)."""
    out = tmp_path / "out"
    assert _register(files, out, **{"--coarse-iterations": "2", "--tolerance": "0"}) == 0
    assert json.loads((out / "result.json").read_text())["stages"][0]["coarse_iterations"] == 2
    plain = tmp_path / "plain"
    assert _register(files, plain) == 0
    assert json.loads((plain / "result.json").read_text())["stages"][0]["coarse_iterations"] == 0


def test_refine_layers_flag_reaches_result_json_and_a_wrong_value_is_refused(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert _register(files, out, **{"--refine-layers": "fc"}) == 0
    assert json.loads((out / "result.json").read_text())["stages"][0]["refine_layers"] == "fc"
    plain = tmp_path / "plain"
    assert _register(files, plain) == 0  # the test model has no refinement metadata: the paper's "all"
    assert json.loads((plain / "result.json").read_text())["stages"][0]["refine_layers"] == "all"
    with pytest.raises(SystemExit):
        _register(files, tmp_path / "bad", **{"--refine-layers": "convs"})
    assert "invalid choice" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_region_margin_flag_is_checked_and_reaches_result_json(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert _register(files, out, **{"--region-margin": "inf"}) == 0
    assert json.loads((out / "result.json").read_text())["stages"][0]["region_margin_mm"] is None
    assert _register(files, tmp_path / "neg", **{"--region-margin": "-1"}) == 2
    assert "--region-margin must be" in capsys.readouterr().err and not (tmp_path / "neg").exists()
    assert _register(files, tmp_path / "lin", **{"--region-margin": "20"}) == 2  # the test model's maps are linear
    assert "unbounded maps" in capsys.readouterr().err and not (tmp_path / "lin").exists()


def test_polish_flag_is_checked_and_reaches_result_json(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert _register(files, out, **{"--polish": "3", "--refine": "5"}) == 0
    stage = json.loads((out / "result.json").read_text())["stages"][0]
    assert 0 < stage["polish_iterations"] <= 3 and stage["iterations"] <= 8
    assert "of them polish" in capsys.readouterr().out
    assert _register(files, tmp_path / "neg", **{"--polish": "-1"}) == 2
    assert "--polish must be" in capsys.readouterr().err and not (tmp_path / "neg").exists()


def test_anchor_flag_is_checked_and_reaches_result_json(files, make_model, tmp_path, capsys):
    bspline = make_model(2, "bspline", itn_output="sigmoid")
    out = tmp_path / "out"
    assert _register(files, out, **{"--model": bspline, "--anchor": "0.5", "--bending": "2"}) == 0
    stage = json.loads((out / "result.json").read_text())["stages"][0]
    assert (stage["anchor"], stage["bending"]) == (0.5, 2.0)
    assert _register(files, tmp_path / "neg", **{"--model": bspline, "--anchor": "-1"}) == 2
    assert "--anchor must be" in capsys.readouterr().err and not (tmp_path / "neg").exists()
    assert _register(files, tmp_path / "lin", **{"--model": make_model(2, "bspline"), "--anchor": "1"}) == 2
    assert "unbounded maps: anchoring" in capsys.readouterr().err and not (tmp_path / "lin").exists()


def test_passes_flag_is_checked_and_reaches_result_json(files, make_model, tmp_path, capsys):
    bspline = make_model(2, "bspline")
    out = tmp_path / "out"
    assert _register(files, out, **{"--model": bspline, "--passes": "2", "--tolerance": "0"}) == 0
    stage = json.loads((out / "result.json").read_text())["stages"][0]
    assert stage["passes"] == 2 and stage["iterations"] == 6 and len(stage["loss_per_iteration"]) == 6
    capsys.readouterr()
    assert main(["register", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]), "--model", str(bspline),
                 "--out", str(tmp_path / "loud"), "--refine", "3", "--passes", "2", "--tolerance", "0"]) == 0
    assert "refinement 6/6 (pass 2/2) loss" in capsys.readouterr().err  # progress says which look the loss is on
    assert _register(files, tmp_path / "zero", **{"--model": bspline, "--passes": "0"}) == 2
    assert "--passes must be" in capsys.readouterr().err and not (tmp_path / "zero").exists()


def test_bias_correct_flag_reaches_every_stage_and_result_json(files, tmp_path):
    out = tmp_path / "out"
    assert main(["register", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]), "--model",
                 str(files["model"]), "--out", str(out), "--refine", "2", "--quiet", "--bias-correct"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert [s["bias_corrected"] for s in result["stages"]] == [True] and result["request"]["options"]["bias_correct"]
    assert _register(files, tmp_path / "plain") == 0
    assert not json.loads((tmp_path / "plain" / "result.json").read_text())["stages"][0]["bias_corrected"]


def test_a_head_stored_prone_is_found_turned_and_said_and_no_retry_turns_the_search_off(tmp_path, capsys):
    """The bundled pair's moving head under a header turned 180 degrees about the vertical (a prone patient taken
    for supine): the default models and the second try fail their checks; the turn search finds the turn, says
    so, and result.json records it. ``--no-retry`` runs the models asked for once and nothing else."""
    from conftest import header_turned
    from istn import demo

    pair = demo.sample_pair()
    for image, name in ((pair["moving"], "prone.nii.gz"), (pair["moving_labels"], "prone_labels.nii.gz")):
        sitk.WriteImage(header_turned(image, np.diag([-1.0, -1.0, 1.0])), str(tmp_path / name))
    fixed = str(demo.SAMPLE_DIR / "fixed_t1.nii.gz")
    base = ["register", "--fixed", fixed, "--moving", str(tmp_path / "prone.nii.gz"), "--no-figure", "--threads", "2"]
    assert main(base + ["--out", str(tmp_path / "turned")]) == 0
    err = capsys.readouterr().err
    assert "looking for how the moving head lies (24 turns)" in err
    assert "turned by 180 degrees about the up-down (z) axis" in err
    result = json.loads((tmp_path / "turned" / "result.json").read_text())
    assert result["stages"][0]["turned"]["turn"] == "180 degrees about the up-down (z) axis"
    assert not any(s["self_checks_failed"] for s in result["stages"])
    transform = sitk.ReadTransform(str(tmp_path / "turned" / "transform.h5"))
    dice = np.mean(list(demo.structure_dice(pair["fixed_labels"], sitk.ReadImage(str(tmp_path / "prone_labels.nii.gz")),
                                            transform).values()))
    assert dice > 0.8  # the head as stored in the bundled pair: 0.84
    assert main(base + ["--out", str(tmp_path / "once"), "--no-retry"]) == 0
    assert "looking for how" not in capsys.readouterr().err
    once = json.loads((tmp_path / "once" / "result.json").read_text())
    assert once["retry"] is None and all(s["turned"] is None for s in once["stages"])
    assert any(s["self_checks_failed"] for s in once["stages"])


def test_evaluate_identity_gives_perfect_scores(tmp_path, capsys):
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[5:12, 5:12, 5:12] = 1
    lab[13:18, 4:9, 10:16] = 2
    img = sitk.GetImageFromArray(lab)
    img.SetSpacing((1.0, 2.0, 1.5))
    p = tmp_path / "lab.nii.gz"
    sitk.WriteImage(img, str(p))
    out = tmp_path / "m.json"
    assert main(["evaluate", "--fixed-labels", str(p), "--moving-labels", str(p), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["per_label"]) == {"1", "2"}
    assert res["mean"]["dice"] == 1.0 and res["mean"]["asd"] == 0.0 and "folding_fraction" not in res


def _bad(tmp_path, name, writer):
    p = tmp_path / name
    writer(p)
    return p


def _nan_image(p):
    a = np.random.default_rng(0).random((20, 20)).astype(np.float32)
    a[3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(a), str(p))


def _inf_image(p):
    a = np.random.default_rng(0).random((20, 20)).astype(np.float32)
    a[3, 4] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(a), str(p))


def _huge_image(p):
    """float64 values beyond float32's range: once "infinite" (they became so in the float32 working copy)."""
    a = np.random.default_rng(0).random((20, 20)) * 1e300
    sitk.WriteImage(sitk.GetImageFromArray(a), str(p))


def _constant_image(p):
    sitk.WriteImage(sitk.GetImageFromArray(np.full((20, 20), 7, np.float32)), str(p))


def _rgb_image(p):
    a = (np.random.default_rng(0).random((20, 20, 3)) * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(a, isVector=True), str(p))


def _series_4d(p):
    a = np.random.default_rng(0).random((5, 6, 20, 20)).astype(np.float32)  # 5 volumes of 20 x 20 x 6
    sitk.WriteImage(sitk.GetImageFromArray(a, isVector=False), str(p))


def _sheared_nifti(p):
    """A NIfTI whose sform (the only orientation it declares) shears x into y: not a rotation."""
    import struct

    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((10, 12, 14)).astype(np.float32)), str(p))
    header = bytearray(p.read_bytes())
    struct.pack_into("<hh", header, 252, 0, 1)  # qform_code 0, sform_code 1
    for offset, row in ((280, (1.0, 0.3, 0.0, -5.0)), (296, (0.0, 1.0, 0.0, -6.0)), (312, (0.0, 0.0, 1.0, -7.0))):
        struct.pack_into("<4f", header, offset, *row)  # srow_x, srow_y, srow_z
    p.write_bytes(bytes(header))


BAD_MOVING = {
    "sheared": ("sheared.nii", _sheared_nifti, "has a sheared or invalid orientation in its header"),
    "4d": ("bold.nii.gz", _series_4d, "is 4D (20 x 20 x 6 x 5: 5 volumes of 20 x 20 x 6)"),
    "nan": ("nan.mha", _nan_image, "NaN voxel value (often the outside of a masked image"),
    "inf": ("inf.nrrd", _inf_image, "infinite voxel value"),
    "constant": ("const.nii.gz", _constant_image, "constant"),
    "huge": ("huge.nrrd", _huge_image, "beyond what 32-bit floats (the working type, at most 3.4e+38 in size) hold"),
    "vector": ("rgb.png", _rgb_image, "has 3 components per pixel (a colour or vector image whose components "
                                      "differ: convert a colour image to grey levels first)"),
    "not-an-image": ("notes.txt", lambda p: p.write_text("hello"), "could not be read"),
    "corrupt": ("broken.nii.gz", lambda p: p.write_bytes(b"\x1f\x8b\x08garbage"), "could not be read"),
    "empty-file": ("empty.nrrd", lambda p: p.write_bytes(b""), "could not be read"),
}


@pytest.mark.parametrize("channels", [3, 4])
def test_a_grey_image_saved_as_colour_registers_as_the_grey_image_it_is(files, tmp_path, channels):
    """A grey PNG exported as RGB or RGBA (equal channels, constant alpha; as viewers and screenshots save them)
    gives the grey image's result exactly."""
    grey = sitk.ReadImage(str(files["moving"]))
    a = sitk.GetArrayFromImage(grey)
    stack = [a, a, a] + ([np.full_like(a, 255)] if channels == 4 else [])
    colour = tmp_path / f"moving_{channels}.png"
    image = sitk.GetImageFromArray(np.stack(stack, -1), isVector=True)
    image.CopyInformation(grey)  # the PNG's pixel size too
    sitk.WriteImage(image, str(colour))
    written = sitk.ReadImage(str(colour))
    assert written.GetNumberOfComponentsPerPixel() == channels and written.GetSpacing() == grey.GetSpacing()
    results = {}
    for name, moving in (("grey", files["moving"]), ("colour", colour)):
        assert _register(files, tmp_path / name, **{"--moving": moving}) == 0
        results[name] = (json.loads((tmp_path / name / "result.json").read_text())["stages"][0],
                         sitk.ReadTransform(str(tmp_path / name / "transform.tfm")).GetParameters())
    assert results["colour"][1] == results["grey"][1]  # the same transform, to the bit
    assert results["colour"][0]["loss_per_iteration"] == results["grey"][0]["loss_per_iteration"]
    # istn apply takes it as register does: the same output as the grey file's
    for name, image in (("grey", files["moving"]), ("colour", colour)):
        assert main(["apply", "--transform", str(tmp_path / "grey" / "transform.tfm"), "--reference",
                     str(files["fixed"]), "--input", str(image), "--out", str(tmp_path / f"{name}_applied.nii.gz")]) == 0
    applied = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{n}_applied.nii.gz"))) for n in ("grey", "colour")]
    np.testing.assert_array_equal(applied[0], applied[1])


def test_an_analyze_image_registers_with_a_warning_that_its_orientation_is_not_recorded(files, tmp_path, capsys):
    """Analyze 7.5 (.hdr/.img without NIfTI's magic) records no orientation: SPM, FSL and ITK may place it
    differently (left-right), and ITK puts its first voxel at 0 (the NIfTI pair's origin lost). result.json warns
    for the Analyze pair (named by its .hdr or its .img), not for the NIfTI one."""
    image = sitk.ReadImage(str(files["fixed"]))
    sitk.WriteImage(image, str(tmp_path / "nifti.hdr"))  # a NIfTI pair: its orientation recorded
    header = bytearray((tmp_path / "nifti.hdr").read_bytes())
    assert header[344:348] == b"ni1\0"
    header[344:348] = b"\0\0\0\0"  # the same pair as Analyze 7.5
    (tmp_path / "analyze.hdr").write_bytes(bytes(header))
    (tmp_path / "analyze.img").write_bytes((tmp_path / "nifti.img").read_bytes())
    results = {}
    for name, given in (("nifti", "nifti.hdr"), ("analyze", "analyze.hdr"), ("by_img", "analyze.img")):
        assert _register(files, tmp_path / name, **{"--fixed": tmp_path / given}) == 0
        results[name] = json.loads((tmp_path / name / "result.json").read_text())
    assert not any("Analyze" in w for w in results["nifti"]["warnings"])
    for name in ("analyze", "by_img"):
        assert any(w.startswith("fixed image '") and "is an Analyze 7.5 file, which records no orientation" in w
                   for w in results[name]["warnings"])
    assert results["by_img"]["stages"][0]["loss_per_iteration"] == results["analyze"]["stages"][0]["loss_per_iteration"]


@pytest.mark.parametrize("case", sorted(BAD_MOVING))
def test_bad_moving_image_is_refused_and_nothing_written(files, tmp_path, capsys, case):
    name, writer, message = BAD_MOVING[case]
    bad = _bad(tmp_path, name, writer)
    out = tmp_path / "out"
    assert _register(files, out, **{"--moving": bad}) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_input_is_refused(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert _register(files, out, **{"--fixed": tmp_path / "nope.nii.gz"}) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()


def test_2d_3d_mismatch_between_images(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert _register(files, out, **{"--fixed": files["fixed3d"]}) == 2
    assert "3D but moving image is 2D" in capsys.readouterr().err and not out.exists()


def test_2d_images_with_a_3d_model(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert _register(files, out, **{"--model": files["model3d"]}) == 2
    assert "is 3D" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("content", [b"not a model", b"PK\x03\x04corrupt zip"])
def test_corrupt_or_foreign_model(files, tmp_path, capsys, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    out = tmp_path / "out"
    assert _register(files, out, **{"--model": bad}) == 2
    assert "not an ISTN model file" in capsys.readouterr().err and not out.exists()


def test_output_folder_that_is_a_file(files, tmp_path, capsys):
    out = tmp_path / "afile"
    out.write_text("x")
    assert _register(files, out) == 2
    assert "not a folder" in capsys.readouterr().err
    assert out.read_text() == "x"


def test_output_folder_that_cannot_be_created(files, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert _register(files, blocker / "sub") == 2
    assert "cannot be created" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_output_folder(files, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert _register(files, out) == 2
        assert "not writable" in capsys.readouterr().err and not list(out.iterdir())
    finally:
        out.chmod(0o700)


def test_never_overwrites_an_input(files, tmp_path, capsys):
    """An input named like an output, in the output folder: refused, input untouched."""
    d = files["fixed"].parent
    victim = d / "warped.nii.gz"
    sitk.WriteImage(blob_image((30, 30), (1.0, 1.0), (0.0, 0.0), np.eye(2)), str(victim))
    before = victim.read_bytes()
    assert _register(files, d, **{"--moving": victim}) == 2
    assert "would overwrite an input" in capsys.readouterr().err
    assert victim.read_bytes() == before
    assert not (d / "transform.h5").exists()


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from istn import io

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        io.atomic_write(tmp_path / "x.nii.gz", boom)
    assert list(tmp_path.iterdir()) == []


def test_cuda_without_gpu_is_a_clear_error(files, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    assert _register(files, out, **{"--device": "cuda"}) == 2  # a user error, as the README documents
    assert "no CUDA GPU" in capsys.readouterr().err and not out.exists()


def test_data_prepare_refuses_an_unknown_subset(tmp_path, capsys):
    assert main(["data", "prepare", "--out", str(tmp_path / "d"), "--subset", "nope"]) == 2
    assert "unknown names ['nope']" in capsys.readouterr().err


def test_train_init_from_a_missing_checkpoint_is_refused(toy_csv, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--train-csv", str(toy_csv / "pairs.csv"), "--soi-csv", str(toy_csv / "soi.csv"),
                 "--grid-size", "32", "32", "--steps", "1", "--out", str(out), "--quiet",
                 "--init-from", str(tmp_path / "nope.pt")])
    assert code == 2
    assert "is not a checkpoint file" in capsys.readouterr().err and not out.exists()


def test_train_anneals_the_learning_rate_when_asked_and_refuses_a_bad_schedule(toy_csv, tmp_path, capsys):
    from istn.training import load_checkpoint

    base = ["train", "--train-csv", str(toy_csv / "pairs.csv"), "--soi-csv", str(toy_csv / "soi.csv"),
            "--grid-size", "32", "32", "--steps", "4", "--val-every", "2", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "run"), "--lr", "0.01", "--lr-decay-from", "2",
                        "--lr-final", "0.1"]) == 0
    history = load_checkpoint(tmp_path / "run" / "last.pt")["history"]
    assert [h["lr"] for h in history] == pytest.approx([0.01, 0.001])  # constant, then annealed to 0.1 x lr
    bad = tmp_path / "bad"
    assert main(base + ["--out", str(bad), "--lr-final", "2"]) == 2
    assert "lr_final" in capsys.readouterr().err and not bad.exists()


# --------------------------------------------------------------------------
# Issue #9: every user error checked up front (exit 2, one line, nothing written); chaining; background
# --------------------------------------------------------------------------


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("istn ") and ": error: " in lines[0]
    return lines[0]


@pytest.fixture
def no_stage_runs(monkeypatch):
    """Fails the test if a registration stage starts (the checks must come first)."""
    import istn.registration

    calls = []
    monkeypatch.setattr(istn.registration, "register", lambda *a, **k: calls.append(1) or pytest.fail("a stage ran"))
    return calls


@pytest.fixture
def chain_run(files, tmp_path, make_model):
    """An affine + B-spline run of the tool; its output folder."""
    out = tmp_path / "chain"
    bspline = make_model(2, "bspline", seed=1, scale=0.2)
    argv = ["register", "--refine", "2", "--quiet", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]),
            "--model", str(files["model"]), "--model", str(bspline), "--out", str(out)]
    assert main(argv) == 0
    files["bspline"] = bspline
    return out


def _parts(tx):
    tx = tx.Downcast()
    return [tx.GetNthTransform(i).Downcast() for i in range(tx.GetNumberOfTransforms())]


def test_affine_bspline_result_is_a_valid_initial_for_an_affine_run(files, chain_run, tmp_path, capfd):
    """Row 1: the tool's own affine + B-spline transform.h5 as --initial: a flat composite, readable back."""
    first = sitk.ReadTransform(str(chain_run / "transform.h5"))
    out = tmp_path / "again"
    assert _register(files, out, **{"--initial": chain_run / "transform.h5"}) == 0
    assert "error" not in capfd.readouterr().err
    second = sitk.ReadTransform(str(out / "transform.h5"))  # readable: no nested composite
    p1, p2 = _parts(first), _parts(second)
    assert [type(p).__name__ for p in p2] == ["BSplineTransform", "AffineTransform", "AffineTransform"]
    for a, b in zip(p1, p2[:2]):  # the earlier result, unchanged, applied after the new affine
        assert np.allclose(a.GetParameters(), b.GetParameters())
    x = (3.0, -7.0)
    assert np.allclose(second.TransformPoint(x), first.TransformPoint(p2[2].TransformPoint(x)), atol=1e-9)
    assert (out / "warped.nii.gz").is_file() and not (out / "transform.tfm").exists()


def test_a_bspline_result_writes_its_jacobian_determinant_on_the_fixed_grid(files, chain_run, tmp_path):
    """--jacobian: jacobian.nii.gz, the local volume change of the written transform at every fixed voxel (central
    differences of the exact transform agree), and result.json sums it up (with or without the file)."""
    from istn.metrics import jacobian_determinant

    assert not (chain_run / "jacobian.nii.gz").exists()  # not asked for
    summed_up = json.loads((chain_run / "result.json").read_text())["jacobian"]
    out = tmp_path / "with-jacobian"
    assert main(["register", "--refine", "2", "--quiet", "--fixed", str(files["fixed"]), "--moving",
                 str(files["moving"]), "--model", str(files["model"]), "--model", str(files["bspline"]), "--jacobian",
                 "--out", str(out)]) == 0
    jac = sitk.ReadImage(str(out / "jacobian.nii.gz"))
    fixed = sitk.ReadImage(str(files["fixed"]))
    assert jac.GetSize() == fixed.GetSize() and np.allclose(jac.GetDirection(), fixed.GetDirection())
    exact = jacobian_determinant(sitk.ReadTransform(str(out / "transform.h5")), fixed)
    got = sitk.GetArrayFromImage(jac)
    np.testing.assert_allclose(got, exact, atol=1e-4)
    assert got.std() > 1e-3  # a B-spline: not one value everywhere
    res = json.loads((out / "result.json").read_text())["jacobian"]
    assert res == summed_up  # the same numbers whether the file is written or not (a 2D grid this small: all of it)
    assert res["min"] == pytest.approx(got.min()) and res["max"] == pytest.approx(got.max())
    assert res["median"] == pytest.approx(float(np.median(got)), rel=1e-5)
    assert res["folding_fraction"] == pytest.approx(float((got <= 0).mean()))


def test_bspline_result_cannot_start_a_bspline_model_but_its_affine_part_can(files, chain_run, tmp_path, capfd,
                                                                             monkeypatch):
    """A B-spline model needs a linear start: refused up front, pointing at the affine.tfm written beside it."""
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        import istn.registration

        m.setattr(istn.registration, "register", lambda *a, **k: pytest.fail("a stage ran"))
        assert _register(files, out, **{"--model": files["bspline"], "--initial": chain_run / "transform.h5"}) == 2
    line = _one_error_line(capfd.readouterr().err)
    assert "non-linear" in line and "affine.tfm" in line and not out.exists()
    assert sitk.ReadTransform(str(chain_run / "affine.tfm")).IsLinear()
    assert _register(files, out, **{"--model": files["bspline"], "--initial": chain_run / "affine.tfm"}) == 0
    assert sitk.ReadTransform(str(out / "transform.h5")).GetDimension() == 2


@pytest.mark.parametrize("order", [("bspline", "affine"), ("affine", "bspline", "bspline"), ("bspline", "bspline")])
def test_invalid_model_chain_is_refused_before_any_stage(files, tmp_path, make_model, capfd, no_stage_runs, order):
    """Rows 2-3: wrong order, or two B-splines: exit 2 before any stage runs, no output folder."""
    paths = {"affine": files["model"], "bspline": make_model(2, "bspline")}
    out = tmp_path / "out"
    argv = ["register", "--quiet", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]), "--out", str(out)]
    for kind in order:
        argv += ["--model", str(paths[kind])]
    assert main(argv) == 2
    line = _one_error_line(capfd.readouterr().err)
    assert "cannot be chained" in line and "at most one B-spline model, last" in line
    assert not out.exists() and not no_stage_runs


@pytest.mark.parametrize("flag", ["--initial", "--transform"])
def test_missing_transform_file_says_so_in_one_line(files, tmp_path, capfd, flag):
    """Row 4: a missing --initial / --transform: "does not exist", no HDF5 diagnostics."""
    nope = tmp_path / "nope.h5"
    out = tmp_path / "out"
    if flag == "--initial":
        code = _register(files, out, **{"--initial": nope})
    else:
        code = main(["evaluate", "--fixed-labels", str(files["fixed"]), "--moving-labels", str(files["fixed"]),
                     "--transform", str(nope)])
    assert code == 2
    line = _one_error_line(capfd.readouterr().err)
    assert f"{flag} transform '{nope}' does not exist" in line or f"{flag} '{nope}' does not exist" in line
    assert not out.exists()


def test_unreadable_transform_file_no_hdf5_dump_unless_verbose(files, tmp_path, capfd):
    bad = tmp_path / "garbage.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    out = tmp_path / "out"
    assert _register(files, out, **{"--initial": bad}) == 2
    line = _one_error_line(capfd.readouterr().err)
    assert "could not be read as an ITK transform file" in line and not out.exists()
    argv = ["register", "--quiet", "--verbose", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]),
            "--model", str(files["model"]), "--initial", str(bad), "--out", str(out)]
    assert main(argv) == 2
    assert "HDF5" in capfd.readouterr().err  # the detail is kept for --verbose


@pytest.mark.parametrize("image_dim", [3, 2])
def test_initial_transform_of_the_wrong_dimension(files, tmp_path, capfd, no_stage_runs, oblique_pair, image_dim):
    """Row 5: a 2D --initial for 3D images (was SimpleITK's "Possible miss matching dimensions!"), and 3D for 2D."""
    tdim = 5 - image_dim
    t = tmp_path / f"t{tdim}.tfm"
    sitk.WriteTransform(sitk.AffineTransform(tdim), str(t))
    over = {"--initial": t}
    if image_dim == 3:
        moving3d = tmp_path / "moving3d.nii.gz"
        sitk.WriteImage(oblique_pair[1], str(moving3d))
        over.update({"--fixed": files["fixed3d"], "--moving": moving3d, "--model": files["model3d"]})
    out = tmp_path / "out"
    assert _register(files, out, **over) == 2
    line = _one_error_line(capfd.readouterr().err)
    assert f"--initial transform '{t}' is {tdim}D but the images are {image_dim}D" in line and not out.exists()


@pytest.mark.parametrize("option, value, message", [
    ("--refine", "-5", "--refine must be a whole number >= 0"),
    ("--lr", "0", "--lr must be a finite number > 0"),
    ("--lr", "-0.001", "--lr must be a finite number > 0"),
    ("--lr", "nan", "--lr must be a finite number > 0"),
    ("--lr", "inf", "--lr must be a finite number > 0"),
    ("--coarse-iterations", "-1", "--coarse-iterations must be a whole number >= 0"),
    ("--background", "nan", "--background must be a finite number"),
    ("--background", "1e40", "--background 1e+40 is beyond what the warped image (32-bit float"),  # was internal
])
def test_bad_numeric_options(files, tmp_path, capfd, no_stage_runs, option, value, message):
    """Rows 6-7: --refine -5 (was a traceback) and --lr 0 (was accepted)."""
    out = tmp_path / "out"
    assert _register(files, out, **{option: value}) == 2
    assert message in _one_error_line(capfd.readouterr().err) and not out.exists()


def _ct_like(p):
    """A moving image with a -1000 background and a field of view smaller than the fixed image's."""
    img = blob_image((24, 24), (1.5, 1.5), (-18.0, -18.0), np.eye(2))
    a = sitk.GetArrayFromImage(img)
    a[a < 0.05] = 0.0  # air: exactly -1000 below
    ct = sitk.GetImageFromArray(a * 1000.0 - 1000.0)
    ct.CopyInformation(img)
    sitk.WriteImage(ct, str(p))


@pytest.mark.parametrize("background", [None, 5.0])
def test_warped_keeps_the_moving_background(files, tmp_path, background):
    """Row 14: outside the moving field of view warped.nii.gz holds its minimum (or --background), not 0."""
    moving = tmp_path / "ct.nii.gz"
    _ct_like(moving)
    out = tmp_path / "out"
    over = {"--moving": moving} if background is None else {"--moving": moving, "--background": background}
    assert _register(files, out, **over) == 0
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    tx = sitk.ReadTransform(str(out / "transform.h5"))
    ones = sitk.Image(sitk.ReadImage(str(moving)).GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(sitk.ReadImage(str(moving)))
    inside = sitk.GetArrayFromImage(sitk.Resample(ones, warped, tx, sitk.sitkLinear, 0.0)) > 0
    w = sitk.GetArrayFromImage(warped)
    expected = -1000.0 if background is None else background
    assert (~inside).sum() > 100 and np.all(w[~inside] == expected)
    assert json.loads((out / "result.json").read_text())["background"] == expected


@pytest.mark.parametrize("content, message", [
    (b"just some text\n", "this file is not a zip archive"),
    ("checkpoint", "is a PyTorch checkpoint (torch.save), not an ISTN model file"),
])
def test_info_on_a_foreign_file_is_one_honest_line(tmp_path, capfd, content, message):
    """Row 13: a text file or a torch.save checkpoint: no torch "miniz" text, nothing cut off."""
    import torch

    p = tmp_path / "thing.pt"
    if content == "checkpoint":
        torch.save({"weights": torch.zeros(3)}, p)
    else:
        p.write_bytes(content)
    assert main(["info", "--model", str(p)]) == 2
    err = capfd.readouterr().err
    line = _one_error_line(err)
    assert message in line and "miniz" not in err.lower() and line.endswith(")")


def test_nonfinite_result_is_not_written(files, tmp_path, capfd, monkeypatch):
    """Every result is checked before it is written: a NaN transform -> exit 1, no files, no output folder."""
    import istn.registration

    real = istn.registration.register

    def diverged(*a, **k):
        res = real(*a, **k)
        tx = sitk.AffineTransform(2)
        tx.SetTranslation((float("nan"), 0.0))
        res.transform = tx
        return res

    monkeypatch.setattr(istn.registration, "register", diverged)
    out = tmp_path / "out"
    assert _register(files, out) == 1
    assert "non-finite transform" in capfd.readouterr().err and not out.exists()


def test_without_a_model_the_bundled_default_chain_registers_the_pair(tmp_path, capsys, monkeypatch):
    """`istn register` with no --model: the bundled brain-t1 affine then B-spline (as `istn demo`), which
    brings the sample pair's structures closer; a checkout without them says so, writing nothing."""
    import istn.demo as demo

    if not (demo.MODELS_DIR / demo.AFFINE_MODEL).exists() or not (demo.MODELS_DIR / demo.BSPLINE_MODEL).exists():
        pytest.skip("bundled models absent")
    pair = demo.sample_pair()
    for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
        sitk.WriteImage(pair[key], str(tmp_path / f"{key}.nii.gz"))
    args = ["register", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz")]
    assert main(args + ["--out", str(tmp_path / "out")]) == 0
    assert "models: the bundled brain-t1-affine.pt, brain-t1-bspline.pt" in capsys.readouterr().err
    stages = json.loads((tmp_path / "out" / "result.json").read_text())["stages"]
    assert [os.path.basename(s["model_file"]) for s in stages] == ["brain-t1-affine.pt", "brain-t1-bspline.pt"]
    labels = ["--fixed-labels", str(tmp_path / "fixed_labels.nii.gz"),
              "--moving-labels", str(tmp_path / "moving_labels.nii.gz")]
    dice = {}
    for name, extra in (("before", []), ("after", ["--transform", str(tmp_path / "out" / "transform.h5")])):
        assert main(["evaluate", *labels, *extra, "--out", str(tmp_path / f"{name}.json")]) == 0
        dice[name] = json.loads((tmp_path / f"{name}.json").read_text())["mean"]["dice"]
    assert dice["after"] > dice["before"] + 0.02

    monkeypatch.setattr(demo, "MODELS_DIR", tmp_path / "no-models")
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "none")]) == 2
    assert "no --model given and the bundled default models are missing" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_a_bundled_model_is_named_by_its_file_name_from_any_folder(files, make_model, tmp_path, capsys,
                                                                     monkeypatch):
    """`--model brain-t1-affine.pt` (as the model cards write it) from a folder without that file: the bundled
    model of that name (".pt" optional); a file of that name where the user works is theirs and comes first; an
    unknown name is refused listing the bundled ones."""
    import shutil

    import istn.demo as demo
    from istn.errors import ModelFileError
    from istn.export import load_model

    bundled = tmp_path / "bundled"
    bundled.mkdir()
    shutil.copy(files["model"], bundled / "toy-affine.pt")
    monkeypatch.setattr(demo, "MODELS_DIR", bundled)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for name in ("toy-affine.pt", "toy-affine"):
        out = tmp_path / f"out-{name}"
        assert _register(files, out, **{"--model": name}) == 0
        stages = json.loads((out / "result.json").read_text())["stages"]
        assert [s["model_file"] for s in stages] == [str(bundled / "toy-affine.pt")]
    assert load_model("toy-affine.pt").path == bundled / "toy-affine.pt"
    shutil.copy(make_model(2, "affine", seed=5), work / "toy-affine.pt")
    assert load_model("toy-affine.pt").path == Path("toy-affine.pt")  # the user's own file
    assert load_model("toy-affine").path == Path("toy-affine.pt")  # ".pt" optional for theirs too
    (work / "toy-affine.pt").unlink()
    with pytest.raises(ModelFileError, match="does not exist"):  # a path with a folder part is what it says
        load_model("./toy-affine.pt")
    capsys.readouterr()
    assert _register(files, tmp_path / "none", **{"--model": "nosuch.pt"}) == 2
    assert ("model file 'nosuch.pt' does not exist (the bundled models, usable by name: toy-affine.pt)"
            in capsys.readouterr().err)
    assert not (tmp_path / "none").exists()


def test_a_later_run_removes_the_optional_outputs_it_does_not_write(files, make_model, tmp_path, capsys):
    """Into one folder: an affine run (transform.tfm), then affine + B-spline (affine.tfm, no transform.tfm), then
    affine again without the picture: each run's folder holds only its own result's files, and says what went."""
    out = tmp_path / "out"
    chain = {"--model": files["model"]}
    assert _register(files, out, **chain) == 0
    assert {"transform.tfm", "overview.png"} <= {p.name for p in out.iterdir()}
    argv = ["register", "--refine", "3", "--quiet", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]),
            "--model", str(files["model"]), "--model", str(make_model(2, "bspline")), "--jacobian", "--out", str(out)]
    capsys.readouterr()
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert "transform.tfm" not in names and {"affine.tfm", "jacobian.nii.gz", "overview.png"} <= names
    res = json.loads((out / "result.json").read_text())
    assert res["removed_from_an_earlier_run"] == ["transform.tfm"]
    assert set(res["outputs"]) == names
    printed = capsys.readouterr()
    assert "removed transform.tfm of an earlier run" in printed.err
    j = res["jacobian"]  # the B-spline result's volume change, one line beside its stages
    assert f"Jacobian determinant (local volume change): {j['p1']:.3f} to {j['p99']:.3f} (1st to 99th" in printed.out
    assert main(["register", "--refine", "3", "--quiet", "--no-figure", "--fixed", str(files["fixed"]), "--moving",
                 str(files["moving"]), "--model", str(files["model"]), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert "transform.tfm" in names and not names & {"affine.tfm", "jacobian.nii.gz", "overview.png"}
    res = json.loads((out / "result.json").read_text())
    assert res["removed_from_an_earlier_run"] == ["affine.tfm", "jacobian.nii.gz", "overview.png"]
    assert set(res["outputs"]) == names and "jacobian" not in res


def test_files_the_earlier_run_did_not_write_are_the_users_and_a_rerun_keeps_them(files, tmp_path, capsys):
    """CLI audit: an atlas brought into a result folder (istn apply --inverse --out res/atlas_labels.nii.gz) and a
    picture saved as overview.png were removed by the next run there as 'of an earlier run', which never wrote
    them (its result.json lists what it wrote)."""
    out = tmp_path / "out"
    argv = ["register", "--refine", "3", "--quiet", "--no-figure", "--fixed", str(files["fixed"]), "--moving",
            str(files["moving"]), "--model", str(files["model"]), "--out", str(out)]
    assert main(argv) == 0
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "atlas_labels.nii.gz").write_bytes(b"the user's atlas")
    (out / "overview.png").write_bytes(b"the user's picture")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds atlas_labels.nii.gz, overview.png, which the earlier istn register run there did not write" in err
    assert (out / "atlas_labels.nii.gz").read_bytes() == b"the user's atlas"
    assert (out / "overview.png").read_bytes() == b"the user's picture"
    assert all((out / n).read_bytes() == b for n, b in written.items())
    (out / "atlas_labels.nii.gz").unlink()
    (out / "overview.png").unlink()
    assert main(argv) == 0  # its own files only: replaced as before


def test_an_input_named_like_an_optional_output_is_refused_not_removed(files, tmp_path, capsys):
    """An --initial named affine.tfm in the output folder: refused before anything runs, and kept."""
    out = tmp_path / "out"
    out.mkdir()
    initial = out / "affine.tfm"
    sitk.WriteTransform(sitk.AffineTransform(2), str(initial))
    before = initial.read_bytes()
    assert _register(files, out, **{"--initial": initial}) == 2
    assert "would overwrite an input" in capsys.readouterr().err
    assert initial.read_bytes() == before and [p.name for p in out.iterdir()] == ["affine.tfm"]


def test_several_moving_images_register_one_by_one_into_their_own_folders(files, tmp_path, capsys):
    """--moving A B C: each pair's result in OUT/<name>/, the same as registering it alone; a bad image is reported
    in its row and the others still run; summary.csv one row per image; exit status 2 (a bad input)."""
    import csv

    batch = tmp_path / "batch"
    batch.mkdir()
    a = batch / "sub-01.png"
    a.write_bytes(files["moving"].read_bytes())
    b = batch / "sub-02.nii.gz"  # the same image, stored another way
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(files["moving"])), sitk.sitkFloat32), str(b))
    bad = batch / "sub-03.nii.gz"
    bad.write_text("not an image")
    out = tmp_path / "out"
    argv = ["register", "--refine", "3", "--quiet", "--fixed", str(files["fixed"]), "--model",
            str(files["model"]), "--out", str(out), "--moving", str(a), str(b), str(bad)]
    assert main(argv) == 2
    printed = capsys.readouterr()
    assert "2 of 3 registered" in printed.out and "sub-01: model1-2d-affine.pt: loss" in printed.out
    assert "istn register: error: sub-03: moving image" in printed.err and "could not be read" in printed.err
    assert _register(files, tmp_path / "alone", **{"--moving": a}) == 0
    alone = sitk.ReadTransform(str(tmp_path / "alone" / "transform.h5"))
    for name in ("sub-01", "sub-02"):
        assert {p.name for p in (out / name).iterdir()} >= set(REGISTER_OUTPUTS)
        tx = sitk.ReadTransform(str(out / name / "transform.h5"))
        np.testing.assert_allclose(tx.GetParameters(), alone.GetParameters(), atol=1e-5)
    assert not (out / "sub-03").exists()
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["folder"], r["status"]) for r in rows] == [("sub-01", "ok"), ("sub-02", "ok"), ("sub-03", "bad input")]
    assert "could not be read" in rows[2]["error"] and float(rows[0]["loss_final"]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["moved"] == 3 and summary["failed"] == 1
    assert summary["outputs"] == ["summary.json", "summary.csv", "summary.png"] and not summary["warnings"]
    assert (out / "summary.png").stat().st_size > 10_000
    assert main(argv + ["--no-figure"]) == 2  # again without pictures: the earlier batch's montage goes too
    assert not (out / "summary.png").exists() and not (out / "sub-01" / "overview.png").exists()
    capsys.readouterr()
    c = batch / "sub-04.nii.gz"
    c.write_bytes(b.read_bytes())
    assert main(argv[:-3] + [str(b), str(c), "--no-figure"]) == 0  # another batch: sub-01's result stays, named
    assert "also holds earlier results of images not in this batch (sub-01)" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["earlier_results_not_in_this_batch"] == ["sub-01"]
    assert (out / "sub-01" / "result.json").is_file()


def test_a_cohort_montage_tile_is_the_checkerboard_of_the_fixed_and_the_warped_image(oblique_pair):
    """Each tile of summary.png: the fixed image re-stored for display and the warped image in alternating world
    cubes, axial through the structures; the fixed image against itself shows it whole, and the same warped
    image stored another way gives the same tile."""
    from istn.figures import checkerboard_image, checkerboard_tile, cohort_slice, display_image

    fixed, moving = oblique_pair
    structures = sitk.Cast(fixed > 0.8, sitk.sitkFloat32)  # a bounded "map": where the blobs are brightest
    shown, index = cohort_slice(fixed, structures)
    assert shown.GetDirection() == display_image(fixed).GetDirection()
    lit = np.nonzero(sitk.GetArrayFromImage(sitk.Resample(structures, shown)) > 0.5)[0]
    assert lit.min() <= index <= lit.max()  # through the structures
    warped = sitk.Resample(moving, fixed)  # any image of the fixed space
    tile = checkerboard_tile(shown, index, warped)
    expected = sitk.GetArrayFromImage(checkerboard_image(shown, sitk.Resample(warped, shown, sitk.Transform(),
                                                                              sitk.sitkLinear, 0.0,
                                                                              sitk.sitkFloat32)))[index]
    np.testing.assert_allclose(tile, expected, atol=1e-6)
    same = checkerboard_tile(shown, index, fixed)
    whole = sitk.GetArrayFromImage(checkerboard_image(shown, shown))[index]
    np.testing.assert_allclose(same, whole, atol=1e-5)
    restored = checkerboard_tile(shown, index, sitk.DICOMOrient(warped, "RAS"))  # the same voxels, flipped:
    assert np.abs(restored - tile).max() < 0.03 and np.abs(restored - tile).mean() < 0.005  # edge voxels aside


@pytest.mark.parametrize("case", ["same image", "missing", "initial", "bad option"])
def test_a_batch_that_cannot_run_as_asked_is_refused_before_anything(files, tmp_path, capsys, case):
    other = tmp_path / "other"
    other.mkdir()
    twin = other / ".." / "in" / files["moving"].name  # the same file by another path
    extra, message = {
        "same image": ([], "are the same image"),
        "missing": ([str(tmp_path / "nope.nii.gz")], "does not exist"),
        "initial": (["--initial", str(files["fixed"])], "--initial belongs to one pair"),
        "bad option": (["--lr", "-1"], "--lr must be a finite number > 0"),
    }[case]
    movings = [str(files["moving"])] + ([str(twin)] if case == "same image" else [str(files["fixed"])])
    out = tmp_path / "out"
    argv = ["register", "--quiet", "--fixed", str(files["fixed"]), "--model", str(files["model"]), "--out", str(out),
            "--moving", *movings]
    argv += extra if case in ("initial", "bad option") else []
    if case == "missing":
        argv += extra
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_batch_names_each_images_folder_after_the_image(tmp_path):
    from istn.cli import subject_name

    assert subject_name(tmp_path / "sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert subject_name(tmp_path / "sub-02.nrrd") == "sub-02"
    series = tmp_path / "sub-03" / "T1_MPRAGE"
    series.mkdir(parents=True)
    assert subject_name(series) == "T1_MPRAGE"  # a DICOM series' folder: its name
    dicom_file = series / "IM0001"
    dicom_file.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    assert subject_name(dicom_file) == "T1_MPRAGE"  # one file of a series: the series' folder


def test_a_batch_of_images_of_the_same_name_names_their_folders_by_the_subject_folders(files, tmp_path):
    """One folder a subject (sub-01/anat/T1w.nii.gz, sub-02/anat/T1w.nii.gz, as BIDS-like and FreeSurfer-like
    layouts store them) was refused ("would both write into"): each now registers into a folder named by the
    folders that tell them apart, and summary.csv says which is which."""
    import csv

    from istn.cli import subject_names

    root = tmp_path / "study"
    paths = []
    for subject in ("sub-01", "sub-02"):
        (root / subject / "anat").mkdir(parents=True)
        paths.append(root / subject / "anat" / files["moving"].name)
        paths[-1].write_bytes(files["moving"].read_bytes())
    lone = root / "other.png"
    lone.write_bytes(files["moving"].read_bytes())
    out = tmp_path / "out"
    assert main(["register", "--quiet", "--no-figure", "--fixed", str(files["fixed"]), "--model", str(files["model"]),
                 "--out", str(out), "--moving", *map(str, paths), str(lone)]) == 0
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == ["other", "sub-01_anat_moving", "sub-02_anat_moving"]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["moving"], r["folder"], r["status"]) for r in rows] == [
        (str(paths[0]), "sub-01_anat_moving", "ok"), (str(paths[1]), "sub-02_anat_moving", "ok"),
        (str(lone), "other", "ok")]
    for r in rows:
        assert (out / r["folder"] / "result.json").is_file()

    # names only as long as it takes; DICOM series folders of the same name (one per patient) alike
    a, b = tmp_path / "p1" / "T1_MPRAGE", tmp_path / "p2" / "T1_MPRAGE"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    assert subject_names([a, b, tmp_path / "x.nii.gz"]) == ["p1_T1_MPRAGE", "p2_T1_MPRAGE", "x"]
    deep = [tmp_path / "s1" / "mri" / "T1.mgz", tmp_path / "s2" / "mri" / "T1.mgz", tmp_path / "mri_T1.mgz"]
    names = subject_names(deep)
    assert len(set(names)) == 3 and names[:2] == ["s1_mri_T1", "s2_mri_T1"]
    # folders of several depths: each name holds the folder that tells it apart (it was "anat_T1w")
    mixed = [tmp_path / "sub-01" / "anat" / "T1w.nii.gz", tmp_path / "sub-02" / "T1w.nii.gz"]
    assert subject_names(mixed) == ["sub-01_anat_T1w", "sub-02_T1w"]
    # two files of one DICOM series are one image; two files named alike in one folder cannot be told apart
    for n in ("IM1", "IM2"):
        (a / n).write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    with pytest.raises(InputError, match="are the same DICOM series"):
        subject_names([a / "IM1", a / "IM2"])
    with pytest.raises(InputError, match="would both write into a folder named 'T1'"):
        subject_names([tmp_path / "T1.nii.gz", tmp_path / "T1.nrrd"])
    # DataLad / git-annex: each file a link into the annex; named by the folders as given, not the annex's
    links = []
    for k, subject in enumerate(("sub-01", "sub-02")):
        obj = tmp_path / "annex" / f"MD5E-s{k}--x.nii.gz" / f"MD5E-s{k}--x.nii.gz"
        obj.parent.mkdir(parents=True)
        obj.write_bytes(b"x")
        (tmp_path / "ds" / subject / "anat").mkdir(parents=True)
        links.append(tmp_path / "ds" / subject / "anat" / "T1w.nii.gz")
        links[-1].symlink_to(obj)
    assert subject_names(links) == ["sub-01_anat_T1w", "sub-02_anat_T1w"]
    twin = tmp_path / "ds" / "again.nii.gz"
    twin.symlink_to(links[0])
    with pytest.raises(InputError, match="are the same image"):  # where they really are tells them apart
        subject_names([links[0], twin])


def _sites_batch(files, tmp_path, sites: tuple[str, str, str]):
    """Moving images <site>/sub-01/anat/T1w.png, <site>/sub-02/..., <site>/sub-01/... (of ``sites``), the output
    folder and `istn register`'s arguments up to its images."""
    paths = []
    for site, subject in zip(sites, ("sub-01", "sub-02", "sub-01")):
        (tmp_path / "data" / site / subject / "anat").mkdir(parents=True)
        paths.append(tmp_path / "data" / site / subject / "anat" / "T1w.png")
        paths[-1].write_bytes(files["moving"].read_bytes())
    out = tmp_path / "out"
    return paths, out, ["register", "--quiet", "--no-figure", "--refine", "2", "--fixed", str(files["fixed"]),
                        "--model", str(files["model"]), "--out", str(out)]


def test_skip_done_keeps_an_images_folder_when_added_images_lengthen_the_names(files, tmp_path, capsys):
    """A batch grown by an image of the same name from another site (siteB/sub-01/anat/...) lengthens the names of
    the images before it; with --skip-done those keep the folders of their finished runs (not registered again
    beside them) and the new image gets its own."""
    import csv

    paths, out, base = _sites_batch(files, tmp_path, ("siteA", "siteA", "siteB"))
    base += ["--skip-done", "--moving"]
    assert main(base + [str(p) for p in paths[:2]]) == 0
    first = {d.name: (d / "result.json").read_bytes() for d in out.iterdir() if d.is_dir()}
    assert sorted(first) == ["sub-01_anat_T1w", "sub-02_anat_T1w"]
    assert main(base + [str(p) for p in paths]) == 0  # alone, siteA's sub-01 would now be siteA_sub-01_anat_T1w
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["folder"], r["reused"]) for r in rows] == [
        ("sub-01_anat_T1w", "True"), ("sub-02_anat_T1w", "True"), ("siteB_sub-01_anat_T1w", "False")]
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == sorted([*first, "siteB_sub-01_anat_T1w"])
    assert all((out / n / "result.json").read_bytes() == b for n, b in first.items())  # kept as they were


def test_skip_done_keeps_an_image_in_its_folder_as_named_now_when_that_holds_its_run(files, tmp_path, capsys):
    """Review: a batch grown WITHOUT --skip-done registers an image again under its lengthened name; rerun with
    --skip-done, the image's run in its folder as named now is the one kept (it picked the older folder, the first
    in sorted order), and the older folder is left as it was."""
    import csv

    paths, out, base = _sites_batch(files, tmp_path, ("zsite", "zsite", "asite"))
    assert main(base + ["--moving"] + [str(p) for p in paths[:2]]) == 0  # sub-01_anat_T1w, sub-02_anat_T1w
    older = (out / "sub-01_anat_T1w" / "result.json").read_bytes()
    assert main(base + ["--moving"] + [str(p) for p in paths]) == 0  # grown, no --skip-done: zsite_sub-01_...
    current = (out / "zsite_sub-01_anat_T1w" / "result.json").read_bytes()
    assert main(base + ["--skip-done", "--moving"] + [str(p) for p in paths]) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["folder"], r["reused"]) for r in rows][0] == ("zsite_sub-01_anat_T1w", "True")
    assert (out / "zsite_sub-01_anat_T1w" / "result.json").read_bytes() == current
    assert (out / "sub-01_anat_T1w" / "result.json").read_bytes() == older


# --------------------------------------------------------------------------
# Nothing of the user's lost: foreign files, interrupts, evaluate's --out (session 28 audit)
# --------------------------------------------------------------------------


def test_files_of_the_users_named_like_outputs_are_refused_not_replaced(files, tmp_path, capsys):
    """A folder holding a jacobian.nii.gz and an overview.png of the user's (no result.json of an earlier istn
    run): refused before anything runs, both kept; an empty --out (an unset variable) is refused too."""
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "jacobian.nii.gz").write_bytes(b"mine")
    (out / "overview.png").write_bytes(b"also mine")
    assert _register(files, out) == 2
    err = capsys.readouterr().err
    assert "holds jacobian.nii.gz, overview.png, not the outputs of an earlier istn register run" in err
    assert sorted(p.name for p in out.iterdir()) == ["jacobian.nii.gz", "overview.png"]
    assert (out / "jacobian.nii.gz").read_bytes() == b"mine"
    assert _register(files, "") == 2 and "--out is empty" in capsys.readouterr().err
    (out / "result.json").write_text('{"transform_maps": "fixed wor')  # cut short: whose files is unknown
    assert _register(files, out) == 2
    assert "(its result.json cannot be read): they would be replaced" in capsys.readouterr().err


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupt_while_writing_leaves_the_earlier_run_whole(files, tmp_path, capsys, monkeypatch, signal_name):
    """Ctrl-C (or SIGTERM) after some of a run's files are written: the folder holds the earlier run's files as
    they were (no mix of two runs, no staging folder), the command says so in one line, exit 130 (143)."""
    import signal

    import istn.io

    out = tmp_path / "out"
    assert _register(files, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = istn.io.write_image
    calls = []

    def interrupted(image, path):
        calls.append(path)
        real(image, path)
        if len(calls) == 2:  # warped and the fixed map written
            if signal_name == "SIGINT":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)  # the handler main installed turns it into the same unwinding

    monkeypatch.setattr(istn.io, "write_image", interrupted)
    capsys.readouterr()
    assert _register(files, out, **{"--refine": "2"}) == (130 if signal_name == "SIGINT" else 143)
    assert len(calls) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["istn register: interrupted" if signal_name == "SIGINT" else "istn register: stopped (SIGTERM)"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a run into a new folder that is interrupted leaves no folder
    calls.clear()
    assert _register(files, tmp_path / "new") in (130, 143) and not (tmp_path / "new").exists()
    import istn.cli

    assert signal.getsignal(signal.SIGTERM) is not istn.cli._stop_on_sigterm  # main put the caller's handler back


def _labels2d(tmp_path, name, array):
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def test_evaluate_out_never_replaces_an_input_or_an_existing_file(files, tmp_path, capsys):
    a = np.zeros((16, 16), np.uint8)
    a[4:10, 4:10] = 1
    fixed, moving = _labels2d(tmp_path, "f.nii.gz", a), _labels2d(tmp_path, "m.nii.gz", np.roll(a, 1, 0))
    tx = tmp_path / "t.tfm"
    sitk.WriteTransform(sitk.AffineTransform(2), str(tx))
    before = tx.read_bytes()
    base = ["evaluate", "--fixed-labels", str(fixed), "--moving-labels", str(moving), "--transform", str(tx)]
    assert main(base + ["--out", str(tx)]) == 2 and tx.read_bytes() == before
    assert "is one of the inputs" in capsys.readouterr().err
    out = tmp_path / "deep" / "er" / "m.json"  # its folders are made, as apply and invert make theirs
    assert main(base + ["--out", str(out)]) == 0
    first = json.loads(out.read_text())
    assert first["per_label"]["1"]["dice"] == pytest.approx(2 * 30 / 72)  # 6x6 squares one row apart
    out.write_text("{}")
    assert main(base + ["--out", str(out)]) == 2 and out.read_text() == "{}"
    assert "exists; choose another file name, or --overwrite" in capsys.readouterr().err
    assert main(base + ["--out", str(out), "--overwrite"]) == 0 and json.loads(out.read_text()) == first


def test_evaluate_says_when_fractional_labels_are_scored_as_one_soft_map(tmp_path, capsys):
    """A label map resampled with linear interpolation (fractional values at the edges) is no longer a label map:
    scored as one soft structure, which the user is told (before: silently)."""
    a = np.zeros((16, 16), np.float32)
    a[2:7, 2:7], a[9:14, 9:14] = 1, 2
    b = a.copy()
    b[7, 2:7] = 0.5  # an edge of a linear resampling
    fixed, moving = _labels2d(tmp_path, "f.nii.gz", a), _labels2d(tmp_path, "m.nii.gz", b)
    assert main(["evaluate", "--fixed-labels", str(fixed), "--moving-labels", str(moving)]) == 0
    captured = capsys.readouterr()
    assert "moving label image(s) hold values that are not whole numbers" in captured.err
    assert [ln.split()[0] for ln in captured.out.splitlines()[1:-1]] == ["1"]  # one structure


def test_apply_refuses_a_background_the_label_maps_pixel_type_cannot_hold(files, tmp_path, capsys):
    labels = _labels2d(tmp_path, "l.nii.gz", (np.arange(400).reshape(20, 20) % 3).astype(np.uint8))
    tx = tmp_path / "t.tfm"
    sitk.WriteTransform(sitk.AffineTransform(2), str(tx))
    out = tmp_path / "o.nii.gz"
    for value in ("-5", "300", "2.5"):
        assert main(["apply", "--transform", str(tx), "--reference", str(labels), "--input", str(labels),
                     "--out", str(out), "--background", value]) == 2
        assert "cannot be stored in the input's pixel type (uint8" in capsys.readouterr().err
        assert not out.exists()
    assert main(["apply", "--transform", str(tx), "--reference", str(labels), "--input", str(labels),
                 "--out", str(out), "--background", "7"]) == 0


def test_a_singular_transform_is_refused_in_one_line(files, tmp_path, capsys):
    singular = tmp_path / "flat.tfm"
    t = sitk.AffineTransform(2)
    t.SetMatrix([1.0, 0.0, 0.0, 0.0])  # every point onto a line
    sitk.WriteTransform(t, str(singular))
    for argv in (["invert", "--transform", str(singular), "--reference", str(files["fixed"]), "--out",
                  str(tmp_path / "i.tfm")],
                 ["apply", "--inverse", "--transform", str(singular), "--reference", str(files["fixed"]), "--input",
                  str(files["fixed"]), "--out", str(tmp_path / "a.nii.gz")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "is not invertible: its matrix is singular" in err and "internal error" not in err
    assert _register(files, tmp_path / "r", **{"--initial": singular}) == 2
    assert "is not invertible" in capsys.readouterr().err


def test_a_displacement_field_with_a_nan_is_refused_in_one_line(files, tmp_path, capsys):
    """Read through the field's image (its parameters as a Python tuple took 11 s for a 192^3 field)."""
    field = np.zeros((20, 20, 2))
    field[3, 4, 1] = np.nan
    image = sitk.GetImageFromArray(field, isVector=True)
    path = tmp_path / "warp.h5"
    sitk.WriteTransform(sitk.DisplacementFieldTransform(image), str(path))
    assert main(["apply", "--transform", str(path), "--reference", str(files["fixed"]), "--input",
                 str(files["fixed"]), "--out", str(tmp_path / "a.nii.gz")]) == 2
    assert "holds numbers that are not finite" in capsys.readouterr().err


def test_skip_done_keeps_a_run_asked_the_same_and_redoes_one_asked_otherwise(files, tmp_path, capsys, monkeypatch):
    """--skip-done: a run whose inputs (unchanged since), models and options are the same is kept, not redone
    (its files untouched); another option, or a moving image written again, registers anew."""
    out = tmp_path / "r"
    argv = ["register", "--quiet", "--no-figure", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]),
            "--model", str(files["model"]), "--out", str(out)]
    assert main(argv) == 0
    record = (out / "result.json").read_bytes()
    stamp = (out / "transform.h5").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv + ["--skip-done"]) == 0
    assert "done in an earlier run asked the same (--skip-done): kept" in capsys.readouterr().out
    assert (out / "result.json").read_bytes() == record and (out / "transform.h5").stat().st_mtime_ns == stamp
    assert json.loads(record)["request"]["options"]["iterations"] is None
    assert main(argv + ["--skip-done", "--device", "cpu"]) == 0  # "auto" ran on the CPU here: the same request
    assert "kept" in capsys.readouterr().out and (out / "result.json").read_bytes() == record
    assert main(argv + ["--skip-done", "--refine", "3"]) == 0  # asked otherwise: registered again
    assert json.loads((out / "result.json").read_text())["request"]["options"]["iterations"] == 3
    assert "kept" not in capsys.readouterr().out
    record = (out / "result.json").read_bytes()
    assert main(argv + ["--skip-done", "--refine", "3"]) == 0 and (out / "result.json").read_bytes() == record
    os.utime(files["moving"], ns=(1, 1))  # the moving image changed since (as far as a file's stamp can tell)
    assert main(argv + ["--skip-done", "--refine", "3"]) == 0 and (out / "result.json").read_bytes() != record
    (out / "warped.nii.gz").unlink()  # an output gone: not a finished run
    capsys.readouterr()
    assert main(argv + ["--skip-done", "--refine", "3"]) == 0 and (out / "warped.nii.gz").is_file()
    assert "kept" not in capsys.readouterr().out
    data = (out / "warped.nii.gz").read_bytes()  # one cut short (a copy stopped part way): not finished either
    (out / "warped.nii.gz").write_bytes(data[: len(data) // 2])
    assert main(argv + ["--skip-done", "--refine", "3"]) == 0 and (out / "warped.nii.gz").read_bytes() != data[
        : len(data) // 2]
    assert "kept" not in capsys.readouterr().out
    # a run of other engine code (an update, a fix) is not the run one would get now
    import istn.commands.register as reg

    assert main(argv + ["--skip-done", "--refine", "3"]) == 0 and "kept" in capsys.readouterr().out
    other = reg.engine_fingerprint()[::-1]
    monkeypatch.setattr(reg, "engine_fingerprint", lambda: other)
    assert main(argv + ["--skip-done", "--refine", "3"]) == 0 and "kept" not in capsys.readouterr().out


def test_an_interrupted_batch_leaves_its_summary_and_skip_done_goes_on(files, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the second of three images: summary.csv lists the first as registered and the others as
    not run (it was written nowhere before); the same command with --skip-done keeps the first (untouched) and
    registers the other two."""
    import csv

    import istn.commands.register as reg

    movings = []
    for k in range(3):
        p = tmp_path / f"m{k}.png"
        p.write_bytes(files["moving"].read_bytes())
        movings.append(str(p))
    out = tmp_path / "batch"
    argv = ["register", "--quiet", "--no-figure", "--fixed", str(files["fixed"]), "--model", str(files["model"]),
            "--out", str(out), "--moving", *movings]
    real, calls = reg.run_register, []

    def stop_on_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(reg, "run_register", stop_on_second)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "summary.csv lists the images finished before the stop" in err and "interrupted" in err
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["folder"], r["status"]) for r in rows] == [("m0", "ok"), ("m1", "not run"), ("m2", "not run")]
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == ["m0"]
    first = (out / "m0" / "result.json").read_bytes()
    monkeypatch.setattr(reg, "run_register", real)
    assert main(argv + ["--skip-done"]) == 0
    assert "3 of 3 registered (1 kept from an earlier run)" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["folder"], r["status"], r["reused"]) for r in rows] == [("m0", "ok", "True"), ("m1", "ok", "False"),
                                                                       ("m2", "ok", "False")]
    assert (out / "m0" / "result.json").read_bytes() == first
    assert json.loads((out / "summary.json").read_text())["interrupted"] is False
