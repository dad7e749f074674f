"""Fast paths of issue #12: the output warp through a dense field, inputs prepared once, coarse-to-fine refinement."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from istn import inputs
from istn.data import foreground_centre, intensity_window, otsu_threshold
from istn.geometry import Grid
from istn.registration import displacement_field, warp_image


def _blob(size=(48, 44, 40), spacing=(1.0, 1.0, 1.0), pixel=sitk.sitkFloat32, seed=0) -> sitk.Image:
    """A smooth random 3D image: a few Gaussian blobs on a dark background."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=float) for n in reversed(size)], indexing="ij")
    arr = np.zeros(z.shape)
    for _ in range(6):
        c = rng.uniform(0.25, 0.75, 3) * np.array(z.shape)
        arr += rng.uniform(50, 100) * np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / 40.0)
    img = sitk.Cast(sitk.GetImageFromArray(arr.astype(np.float32)), pixel)
    img.SetSpacing(spacing)
    img.SetOrigin((-10.0, 5.0, 2.0))
    return img


def _composite(image: sitk.Image) -> sitk.Transform:
    """Affine (rotation, shift) then a smooth B-spline (30 mm mesh, ~1.5 mm displacements)."""
    affine = sitk.AffineTransform(3)
    affine.SetCenter(Grid.from_image(image).centre.tolist())
    affine.Rotate(0, 1, 0.1)
    affine.SetTranslation((1.5, -2.0, 0.7))
    mesh = sitk.BSplineTransformInitializer(image, [2, 2, 2])
    rng = np.random.default_rng(1)
    mesh.SetParameters(rng.normal(0.0, 1.5, len(mesh.GetParameters())).tolist())
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(mesh)
    composite.AddTransform(affine)  # applied first
    return composite


def test_field_warp_is_itk_resampling_through_the_same_field():
    """The torch resampler gives what ITK gives through a DisplacementFieldTransform of the field."""
    moving, fixed = _blob(seed=0), _blob(seed=2)
    tx = _composite(fixed)
    field = displacement_field(tx, Grid.from_image(fixed), 4.0)
    assert field is not None and field.GetSpacing() == (3.0, 3.0, 3.0)  # capped: 1/8 of the 24 mm mesh
    itk = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field),
                                               sitk.sitkLinear, -5.0))
    fast = sitk.GetArrayFromImage(warp_image(moving, fixed, tx, default_value=-5.0, field_spacing=4.0))
    outside = (fast == -5.0) != (itk == -5.0)
    assert outside.mean() < 1e-3  # float32 rounding at the image's edge only
    np.testing.assert_allclose(fast[~outside], itk[~outside], atol=1e-4 * float(itk.max()))


def test_field_warp_is_close_to_the_exact_warp():
    moving, fixed = _blob(seed=0), _blob(seed=2)
    tx = _composite(fixed)
    exact = sitk.GetArrayFromImage(warp_image(moving, fixed, tx))
    fast = sitk.GetArrayFromImage(warp_image(moving, fixed, tx, field_spacing=4.0))
    assert np.abs(fast - exact).mean() < 1e-3 * float(exact.max())


def test_field_of_a_linear_transform_is_exact():
    """Trilinear interpolation reproduces an affine field exactly: the warp through it equals ITK's."""
    moving, fixed = _blob(seed=0), _blob(seed=3)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.02, 0.05, 0.0, -0.04, 0.98, 0.01, 0.0, 0.02, 1.0))
    affine.SetTranslation((2.3, -1.1, 0.4))
    zero_mesh = sitk.BSplineTransformInitializer(fixed, [2, 2, 2])  # non-linear class, zero displacement
    tx = sitk.CompositeTransform(3)
    tx.AddTransform(zero_mesh)
    tx.AddTransform(affine)
    exact = sitk.GetArrayFromImage(warp_image(moving, fixed, affine, default_value=-5.0))
    fast = sitk.GetArrayFromImage(warp_image(moving, fixed, tx, default_value=-5.0, field_spacing=4.0))
    edge = (fast == -5.0) != (exact == -5.0)  # points on the half-voxel limit: float32 rounding decides
    assert edge.mean() < 1e-3
    np.testing.assert_allclose(fast[~edge], exact[~edge], atol=1e-4 * float(exact.max()))


def test_field_warp_keeps_integer_pixel_types():
    moving = _blob(pixel=sitk.sitkUInt8)
    fixed = _blob(seed=2)
    tx = _composite(fixed)
    fast = warp_image(moving, fixed, tx, field_spacing=4.0)
    exact = warp_image(moving, fixed, tx)
    assert fast.GetPixelID() == sitk.sitkUInt8
    assert np.abs(sitk.GetArrayFromImage(fast).astype(int) - sitk.GetArrayFromImage(exact).astype(int)).max() <= 1


def test_displacement_field_lattice():
    ref = Grid((256, 256, 180), (1.0, 1.0, 1.2), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    tx = sitk.CompositeTransform(3)
    tx.AddTransform(sitk.BSplineTransform(3, 3))  # mesh spacing 1 mm: caps the field at 1/8 mm -> none
    assert displacement_field(tx, ref, 4.0) is None
    mesh = sitk.BSplineTransform(3, 3)
    mesh.SetFixedParameters([4, 4, 4, 0, 0, 0, 40, 40, 40, 1, 0, 0, 0, 1, 0, 0, 0, 1])
    field = displacement_field(mesh, ref, 4.0)  # 40 mm mesh: 4 mm allowed -> k = 4, 4, 3
    assert field.GetSpacing() == pytest.approx((4.0, 4.0, 3.6))
    assert field.GetSize() == (65, 65, 61)  # (255 / 4 -> 64 spans + 1), (179 / 3 -> 60 spans (ceil) + 1)
    assert field.GetOrigin() == ref.origin


# --------------------------------------------------------------------------
# inputs prepared once
# --------------------------------------------------------------------------


def test_shrink_factors():
    assert inputs.shrink_factors((1.0, 1.0, 1.0), 4.0) == (2, 2, 2)
    assert inputs.shrink_factors((2.0, 2.0, 2.0), 4.0) == (1, 1, 1)  # the training resolution: as it is
    assert inputs.shrink_factors((0.5, 0.5, 3.0), 4.0) == (4, 4, 1)
    assert inputs.shrink_factors((1.0, 1.0), 1.0) == (1, 1)


def test_prepared_image_is_the_block_average():
    img = _blob(size=(40, 36, 32), spacing=(1.0, 1.0, 1.0))
    p = inputs.prepare_image(img, 4.0, foreground=True)
    assert p.shrink == (2, 2, 2)
    assert p.image.GetSize() == (20, 18, 16) and p.image.GetSpacing() == (2.0, 2.0, 2.0)
    # block centres: the first block of 1 mm voxels 0 and 1 is centred half a millimetre further
    np.testing.assert_allclose(p.image.GetOrigin(), np.asarray(img.GetOrigin()) + 0.5)
    a = sitk.GetArrayFromImage(img)
    blocks = a.reshape(16, 2, 18, 2, 20, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(sitk.GetArrayFromImage(p.image), blocks, rtol=1e-5)
    work = sitk.GetArrayViewFromImage(p.image)
    assert p.window == intensity_window(work, foreground=True)
    np.testing.assert_allclose(p.centre, foreground_centre(p.image))


def test_prepare_image_is_cached_per_image_and_redone_when_it_changes(monkeypatch):
    inputs.clear_cache()
    img = _blob(spacing=(2.0, 2.0, 2.0))
    first = inputs.prepare_image(img, 4.0)
    other = inputs.prepare_image(img, 2.0)
    prepare = inputs._prepare
    monkeypatch.setattr(inputs, "_prepare", lambda *a, **k: pytest.fail("prepared again"))
    again = inputs.prepare_image(img, 4.0)  # the B-spline stage reuses the affine stage's
    assert again.image is img and again.window == first.window and np.array_equal(again.centre, first.centre)
    assert inputs.prepare_image(img, 2.0).window == other.window  # another model's grid: its own entry
    monkeypatch.setattr(inputs, "_prepare", prepare)
    copy = sitk.Image(img)
    assert inputs.prepare_image(copy, 4.0).image is copy  # another object: prepared for itself
    view = sitk.GetArrayViewFromImage(img)
    img[0, 0, 0] = float(view.max()) + 100.0  # changed in place (the first sampled voxel)
    changed = inputs.prepare_image(img, 4.0)
    assert changed.window != first.window


def test_the_cache_keeps_no_image_alive():
    """An image used as its own working copy (float32, near the grid's spacing) was held by its entry until four
    newer images pushed it out (2 GB for four 512^3 images); a freed image's block average goes with it."""
    import gc
    import weakref

    inputs.clear_cache()
    for spacing in ((2.0, 2.0, 2.0), (1.0, 1.0, 1.0)):  # the input itself; a block average
        img = _blob(spacing=spacing)
        inputs.prepare_image(img, 4.0)
        alive = weakref.ref(img)
        del img
        gc.collect()
        assert alive() is None
        assert inputs._CACHE == []


def test_prepare_image_checks_its_input():
    from istn.errors import InputError

    inputs.clear_cache()
    flat = sitk.Image(8, 8, 8, sitk.sitkFloat32)
    with pytest.raises(InputError, match="moving image is constant"):
        inputs.prepare_image(flat, 4.0, what="moving image")


def test_statistics_with_a_known_threshold_are_the_same():
    arr = sitk.GetArrayFromImage(_blob())
    t = otsu_threshold(arr)
    assert intensity_window(arr, foreground=True, threshold=t) == intensity_window(arr, foreground=True)
    img = _blob()
    np.testing.assert_allclose(foreground_centre(img, threshold=t), foreground_centre(img))


# --------------------------------------------------------------------------
# coarse to fine
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 20), (12, 16, 20)])
def test_half_resolution_commutes_with_a_two_voxel_shift(shape):
    """Shifting by 2 voxels then averaging 2^D blocks = averaging then shifting by 1 half-resolution voxel."""
    import torch
    import torch.nn.functional as F

    from istn.refinement import half_resolution
    from istn.transforms import identity_grid, warp

    torch.manual_seed(0)
    maps = torch.rand(1, 3, *shape)
    d = len(shape)
    theta = torch.eye(d, d + 1)[None]
    theta[0, 0, d] = 2 * 2.0 / (shape[-1] - 1)  # x: 2 voxels, normalised
    grid = F.affine_grid(theta, [1, 1, *shape], align_corners=True)
    half, _, grid_half = half_resolution(maps, maps)
    pool = F.avg_pool2d if d == 2 else F.avg_pool3d
    expected = pool(warp(maps, grid), 2)
    got = warp(half, grid_half(grid))
    inside = (slice(None), slice(None)) + (slice(None),) * (d - 1) + (slice(0, shape[-1] // 2 - 1),)
    torch.testing.assert_close(got[inside], expected[inside], atol=1e-5, rtol=1e-5)
    # the identity grid averaged is the half-resolution identity grid
    torch.testing.assert_close(grid_half(identity_grid(list(shape))), identity_grid([n // 2 for n in shape]),
                               atol=1e-6, rtol=1e-6)


def test_coarse_to_fine_refinement(make_model, pair2d):
    from istn.export import load_model
    from istn.registration import register

    fixed, moving = pair2d
    model = load_model(make_model(2, "affine"))
    base = register(fixed, moving, model, iterations=6, lr=1e-2, tolerance=0.0)
    res = register(fixed, moving, model, iterations=6, lr=1e-2, tolerance=0.0, coarse_iterations=4)
    assert res.coarse_iterations == 4 and res.iterations == 6 and res.summary()["coarse_iterations"] == 4
    assert res.loss_one_pass == pytest.approx(base.loss_one_pass)  # the one pass, on the full grid
    assert res.loss_final <= res.loss_one_pass  # the best full-grid iterate: never worse than the one pass
    assert res.best_iteration == 1 or res.best_iteration > 4  # a coarse iterate is never the one returned ...
    # ... unless after the last step (iteration 7 here), where it is evaluated on the full grid
    every = register(fixed, moving, model, iterations=3, lr=1e-2, tolerance=0.0, coarse_iterations=10)
    assert every.coarse_iterations == 3 and every.loss_final <= every.loss_one_pass
    model.meta["refinement"] = {"coarse_iterations": 2}  # the model's stored default
    assert register(fixed, moving, model, iterations=3, lr=1e-2, tolerance=0.0).coarse_iterations == 2
    assert register(fixed, moving, model, iterations=3, lr=1e-2, coarse_iterations=0).coarse_iterations == 0
    from istn.errors import InputError

    for bad in (-1, 2.5, True):  # checked with the other numbers, before any computation
        with pytest.raises(InputError, match="'coarse_iterations' must be a whole number >= 0"):
            register(fixed, moving, model, iterations=3, coarse_iterations=bad)


def test_coarse_to_fine_needs_even_grids():
    import torch

    from istn.refinement import refine

    class Odd(torch.nn.Module):  # a 1-parameter "STN": a shift along x on a 9 x 10 grid
        def __init__(self):
            super().__init__()
            self.stn = torch.nn.Linear(1, 1)

        def predict(self, s, t):
            theta = torch.eye(2, 3)[None].clone()
            return theta + torch.nn.functional.pad(self.stn.weight.view(1, 1, 1), (2, 0, 0, 1))

        def sampling_grid(self, params):
            return torch.nn.functional.affine_grid(params, [1, 1, 9, 10], align_corners=True)

        def warp(self, x, grid):
            return torch.nn.functional.grid_sample(x, grid, align_corners=True)

    maps = torch.rand(1, 1, 9, 10)
    out = refine(Odd(), maps, maps.roll(1, -1), iterations=3, lr=1e-2, coarse_iterations=2)
    assert out.coarse_iterations == 0 and len(out.losses) == 3


# --------------------------------------------------------------------------
# ITN for inference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_inference_itn_gives_the_same_maps(make_model, ndim):
    import torch

    from istn.export import load_model

    model = load_model(make_model(ndim, "affine"))
    shape = (1, 1) + tuple(reversed(model.config.grid_size))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.module.representation(x)
    got = model.representation(x)
    assert not got.requires_grad and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert model.representation(x) is not None and len(model._inference) == 1  # built once, kept


def test_adam_is_torch_adam():
    """The refinement's Adam takes torch.optim.Adam's steps (which it replaces to spare the torch._dynamo import)."""
    import torch

    from istn.refinement import Adam

    torch.manual_seed(0)
    target = torch.rand(5, 3)
    a = [torch.rand(5, 3, requires_grad=True), torch.rand(4, requires_grad=True)]
    b = [t.detach().clone().requires_grad_(True) for t in a]
    ours, theirs = Adam(a, 1e-2), torch.optim.Adam(b, lr=1e-2)
    for _ in range(20):
        for params, opt in ((a, ours), (b, theirs)):
            opt.zero_grad()
            ((params[0] - target) ** 2).sum().backward()  # params[1] gets no gradient: it must stay put
            opt.step()
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1])
