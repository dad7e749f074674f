"""The Python API refuses bad input up front (`check_register_inputs`), and model files load honestly."""

import shutil
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from istn.errors import InputError, ModelFileError
from istn.export import load_model
from istn.registration import check_register_inputs, register, warp_image
from istn.transforms import compose, flatten_transform


@pytest.fixture
def models(make_model):
    return {"affine": load_model(make_model(2, "affine")), "bspline": load_model(make_model(2, "bspline"))}


def _bspline_composite(fixed):
    b = sitk.BSplineTransformInitializer(fixed, [3, 3])
    b.SetParameters(list(np.random.default_rng(0).normal(0, 0.5, len(b.GetParameters()))))
    return compose(sitk.Euler2DTransform((0.0, 0.0), 0.1, (2.0, -1.0)), b)


@pytest.mark.parametrize("chain", [["affine"], ["bspline"], ["affine", "bspline"], ["affine", "affine", "bspline"]])
def test_valid_chains(models, pair2d, chain):
    check_register_inputs(*pair2d, [models[k] for k in chain])


@pytest.mark.parametrize("chain", [["bspline", "affine"], ["affine", "bspline", "bspline"], ["bspline", "bspline"]])
def test_invalid_chains(models, pair2d, chain):
    with pytest.raises(InputError, match="cannot be chained"):
        check_register_inputs(*pair2d, [models[k] for k in chain])


@pytest.mark.parametrize("kwargs, message", [
    ({"iterations": -5}, "'iterations' must be a whole number >= 0"),
    ({"lr": 0.0}, "'lr' must be a finite number > 0"),
    ({"lr": float("nan")}, "'lr' must be a finite number > 0"),
    ({"device": "tpu"}, "device 'tpu' is not one of"),
])
def test_register_refuses_bad_arguments_before_computing(models, pair2d, monkeypatch, kwargs, message):
    import istn.registration

    monkeypatch.setattr(istn.registration, "_register", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(InputError, match=message):
        register(*pair2d, models["affine"], **kwargs)
    with pytest.raises(ValueError):  # InputError is a ValueError, as refine()'s was
        register(*pair2d, models["affine"], **kwargs)


def test_cuda_without_gpu_is_an_input_error(models, pair2d):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(InputError, match="no CUDA GPU"):
        register(*pair2d, models["affine"], device="cuda")


@pytest.mark.parametrize("shear", [0.3, 1e-2])
def test_a_sheared_grid_is_refused_even_when_its_determinant_is_one(shear):
    """[[1, s], [0, 1]] has determinant 1: only the determinant was checked, so a sheared grid passed."""
    from istn.io import check_image

    image = sitk.GetImageFromArray(np.random.default_rng(0).random((16, 16)).astype(np.float32))
    image.SetDirection((1.0, shear, 0.0, 1.0))
    with pytest.raises(InputError, match="not orthonormal .*sheared grid"):
        check_image(image, "fixed image")
    image.SetDirection((0.0, 1.0, -1.0, 0.0))  # a rotation: fine
    assert check_image(image, "fixed image").GetSize() == (16, 16)


def test_training_checks_its_device_as_registration_does():
    from istn.training import resolve_device

    with pytest.raises(InputError, match="'gpu' is not one of auto, cpu, cuda, cuda:N"):
        resolve_device("gpu")  # torch's own message lists twenty device types
    assert resolve_device("cpu") == torch.device("cpu")


def test_initial_transform_checks(models, pair2d):
    fixed, moving = pair2d
    with pytest.raises(InputError, match="the initial transform is 3D but the images are 2D"):
        register(fixed, moving, models["affine"], initial_transform=sitk.AffineTransform(3))
    with pytest.raises(InputError, match="is non-linear"):
        register(fixed, moving, models["bspline"], initial_transform=_bspline_composite(fixed))


def test_a_rigid_initial_of_any_linear_class_starts_a_bspline_model(models, pair2d):
    """SimpleITK cannot turn an Euler transform into an AffineTransform; the engine reads its matrix instead."""
    fixed, moving = pair2d
    euler = sitk.Euler2DTransform((1.0, 2.0), 0.05, (1.5, -0.5))
    res = register(fixed, moving, models["bspline"], iterations=1, initial_transform=euler)
    x = (4.0, -3.0)
    assert np.allclose(res.initial_transform.TransformPoint(x), euler.TransformPoint(x), atol=1e-9)


def test_nested_composites_are_flattened_and_written(tmp_path, pair2d):
    fixed = pair2d[0]
    inner = _bspline_composite(fixed)
    nested = sitk.CompositeTransform(2)
    nested.AddTransform(inner)
    nested.AddTransform(sitk.TranslationTransform(2, (3.0, 1.0)))
    flat = flatten_transform(nested)
    assert [type(flat.GetNthTransform(i).Downcast()).__name__ for i in range(flat.GetNumberOfTransforms())] == \
        ["BSplineTransform", "AffineTransform", "AffineTransform"]
    from istn.io import write_transform

    write_transform(nested, tmp_path / "t.h5")
    back = sitk.ReadTransform(str(tmp_path / "t.h5"))
    for x in [(0.0, 0.0), (5.0, -7.0), (-12.0, 9.0)]:
        assert np.allclose(back.TransformPoint(x), nested.TransformPoint(x), atol=1e-9)
    linear = flatten_transform(compose(sitk.Euler2DTransform((0, 0), 0.2), sitk.ScaleTransform(2, (1.1, 0.9))))
    assert isinstance(linear, sitk.AffineTransform)


def test_warp_image_background(pair2d):
    fixed, moving = pair2d
    shifted = sitk.TranslationTransform(2, (500.0, 0.0))  # everything outside the moving image
    ct = moving * 1000.0 - 1000.0
    lo = float(sitk.GetArrayViewFromImage(ct).min())
    assert np.all(sitk.GetArrayFromImage(warp_image(ct, fixed, shifted)) == 0.0)  # the default stays 0
    assert np.all(sitk.GetArrayFromImage(warp_image(ct, fixed, shifted, default_value=None)) == np.float32(lo))
    assert np.all(sitk.GetArrayFromImage(warp_image(ct, fixed, shifted, default_value=-7.0)) == -7.0)


def test_model_under_a_non_ascii_folder(make_model, tmp_path, monkeypatch):
    """Loaded from an open file: torch.jit.load(str) fails for non-ASCII paths on Windows (simulated here)."""
    folder = tmp_path / "Modèles" / "ñ"
    folder.mkdir(parents=True)
    p = folder / "modèle.pt"
    shutil.copy(make_model(2, "affine"), p)
    real = torch.jit.load

    def windows_like(f, *a, **k):
        if isinstance(f, str) and not f.isascii():
            raise RuntimeError("open file failed because of errno 2 on fopen: No such file or directory")
        return real(f, *a, **k)

    monkeypatch.setattr(torch.jit, "load", windows_like)
    m = load_model(p)
    assert m.transform_type == "affine" and m.path == p


def test_a_torchscript_archive_that_fails_to_load_is_not_called_foreign(make_model, tmp_path):
    src = make_model(2, "affine")
    broken = tmp_path / "broken.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(broken, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if "/code/" in item.filename and item.filename.endswith(".py"):
                data = b"def this is not python(\n"
            zout.writestr(item, data)
    with pytest.raises(ModelFileError, match="is a TorchScript archive but torch .* could not load it") as e:
        load_model(broken)
    assert "not an ISTN model file" not in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------
# Scripting the API as users do (helper audit, session 29)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("case, message", [
    ("array", "the fixed image must be a SimpleITK image (sitk.ReadImage(path)"),
    ("path", "the moving image must be a SimpleITK image"),
    ("model-path", "a model must be loaded first (istn.export.load_model(path)), got str"),
    ("matrix", "the initial transform must be a SimpleITK transform"),
    ("given-matrix", "given_transform (where the moving image was placed) must be a SimpleITK transform"),
    ("singular", "is not invertible: its matrix is singular"),
    ("nan", "holds numbers that are not finite"),
    ("threads", "'threads' must be a whole number >= 1"),
    ("metres", "less than two of the model's"),
    ("cancel", "'cancel' must be a threading.Event"),
    ("tolerance", "the convergence tolerance must be a number >= 0, got '0.1'"),
])
def test_arguments_of_the_wrong_kind_are_refused_in_one_line(models, pair2d, case, message):
    fixed, moving = pair2d
    args, kwargs = [fixed, moving, models["affine"]], {}
    if case == "array":
        args[0] = sitk.GetArrayFromImage(fixed)
    elif case == "path":
        args[1] = "moving.nii.gz"
    elif case == "model-path":
        args[2] = "model.pt"
    elif case == "matrix":
        kwargs["initial_transform"] = np.eye(3)
    elif case == "given-matrix":
        kwargs["given_transform"] = np.eye(3)
    elif case == "singular":
        kwargs["initial_transform"] = sitk.AffineTransform([1, 0, 0, 0], [0, 0], [0, 0])
    elif case == "nan":
        kwargs["initial_transform"] = sitk.TranslationTransform(2, (float("nan"), 0.0))
    elif case == "threads":
        kwargs["threads"] = -1
    elif case == "cancel":
        kwargs["cancel"] = False
    elif case == "tolerance":
        kwargs["tolerance"] = "0.1"
    else:  # spacing in metres: a 0.05 x 0.06 m "head"
        args[1] = sitk.Image(moving)
        args[1].SetSpacing([s / 1000 for s in moving.GetSpacing()])
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        register(*args, iterations=1, **kwargs)


def test_a_torch_device_is_taken_and_a_missing_gpu_is_not_blamed_on_the_file(models, pair2d, make_model):
    r = register(*pair2d, models["affine"], iterations=1, device=torch.device("cpu"))
    assert r.device == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU is available"):
            load_model(make_model(2, "affine"), device="cuda")


def test_a_summary_is_the_callers_to_change_and_the_model_keeps_its_settings(models, pair2d):
    model = models["affine"]
    model.meta.setdefault("refinement", {})["iterations"] = 3
    first = register(*pair2d, model)
    summary = first.summary()
    summary["model"].pop("refinement")  # trimming what one writes down
    assert model.meta["refinement"]["iterations"] == 3 and "refinement" in first.summary()["model"]
    assert register(*pair2d, model).iterations == first.iterations
    assert len(repr(first)) < 3000  # a notebook cell, not the model's metadata


def test_threads_sharing_one_model_get_what_each_would_alone_and_leave_it_as_trained(models, pair2d):
    import threading

    model = models["bspline"]
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    alone = register(*pair2d, model, iterations=8)
    results, errors = [None] * 4, []

    def run(i):
        try:
            results[i] = register(*pair2d, model, iterations=8)
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in results:
        assert r.transform.GetParameters() == pytest.approx(alone.transform.GetParameters(), abs=1e-9)
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_chain_is_checked_whole_before_any_stage_runs(models, pair2d, monkeypatch):
    import istn.registration
    from istn.chain import register_chain, register_with_second_try

    ran = []
    monkeypatch.setattr(istn.registration, "register", lambda *a, **k: ran.append(1))
    for chain, message in ((["bspline", "affine"], "cannot be chained"), ([], "at least one model is needed")):
        with pytest.raises(InputError, match=message):
            register_chain(*pair2d, [models[k] for k in chain])
    with pytest.raises(InputError, match="at least one model"):
        register_with_second_try(*pair2d, [])
    with pytest.raises(InputError, match="takes callback_for"):
        register_chain(*pair2d, [models["affine"]], callback=print)
    assert ran == []


def test_an_image_and_itself_is_quiet_with_a_model_without_validation_metadata(make_model, pair2d):
    """Models trained without validation pairs carry no validation refinement losses: an exact start (an image and itself) must not
    read as a learning rate too high (6 of 6 such registrations warned)."""
    import copy

    model = load_model(make_model(2, "affine"))
    assert "refinement_loss" not in model.meta.get("validation", {})
    fixed = pair2d[0]
    r = register(fixed, fixed, model, iterations=10, lr=0.05)
    assert r.loss_one_pass < 1e-10 and not any("raised the loss" in w for w in r.warnings), r.warnings
    with pytest.raises(TypeError, match="load the file again"):
        copy.deepcopy(model)


def test_checking_a_float_image_does_not_copy_it_and_still_refuses_what_is_not_finite():
    """A float32 image is checked and used as it is (a copy of a 0.5 mm 512^3 head is 0.5 GB: the CLI's peak went
    from 2.48 to 1.95 GB with the same result); other types are cast; NaN is refused in either float type."""
    from istn.io import check_image

    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float32))
    assert check_image(image) is image
    as_int = sitk.Cast(image * 100, sitk.sitkInt16)
    checked = check_image(as_int)
    assert checked.GetPixelID() == sitk.sitkFloat32 and np.array_equal(
        sitk.GetArrayViewFromImage(checked), sitk.GetArrayViewFromImage(as_int).astype(np.float32))
    for pixel in (sitk.sitkFloat32, sitk.sitkFloat64):
        a = sitk.GetArrayFromImage(image).astype(np.float64)
        a[3, 4, 5] = np.nan
        with pytest.raises(InputError, match="contains 1 NaN voxel value \\(often the outside of a masked image"):
            check_image(sitk.Cast(sitk.GetImageFromArray(a), pixel))
