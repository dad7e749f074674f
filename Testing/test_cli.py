"""The command line: outputs, and a clear error with nothing written for every kind of bad input."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import blob_image
from istn.cli import REGISTER_OUTPUTS, main


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
    for name in REGISTER_OUTPUTS + ("transform.tfm",):
        assert (out / name).is_file(), name
    res = json.loads((out / "result.json").read_text())
    stage = res["stages"][0]
    assert len(stage["loss_per_iteration"]) == 3 and "one_pass" in stage["timings_s"]
    assert stage["model"]["variant"] == "istn-i"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert "outputs in" in capsys.readouterr().out


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


def _constant_image(p):
    sitk.WriteImage(sitk.GetImageFromArray(np.full((20, 20), 7, np.float32)), str(p))


def _rgb_image(p):
    a = (np.random.default_rng(0).random((20, 20, 3)) * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(a, isVector=True), str(p))


BAD_MOVING = {
    "nan": ("nan.mha", _nan_image, "NaN or infinite"),
    "inf": ("inf.nrrd", _inf_image, "NaN or infinite"),
    "constant": ("const.nii.gz", _constant_image, "constant"),
    "vector": ("rgb.png", _rgb_image, "components per pixel"),
    "not-an-image": ("notes.txt", lambda p: p.write_text("hello"), "could not be read"),
    "corrupt": ("broken.nii.gz", lambda p: p.write_bytes(b"\x1f\x8b\x08garbage"), "could not be read"),
    "empty-file": ("empty.nrrd", lambda p: p.write_bytes(b""), "could not be read"),
}


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
    assert _register(files, tmp_path / "out", **{"--device": "cuda"}) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


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
