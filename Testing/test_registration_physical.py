"""Acceptance: results live in physical space and other tools apply them identically."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import tiny_config
from istn.data import image_to_tensor, intensity_window, network_grid
from istn.export import load_model
from istn.registration import aligned_grid, register, warp_image
from istn.transforms import matrix_to_sitk_affine, sitk_affine_to_matrix


def _network_points(model, fixed, moving, result):
    """World points the network's own sampling grid pulls from, and the fixed-side world points."""
    cfg = model.config
    gf, gm = network_grid(fixed, cfg), network_grid(moving, cfg)
    fg = model.intensity_foreground
    wf = intensity_window(sitk.GetArrayViewFromImage(fixed), *model.intensity, foreground=fg)
    wm = intensity_window(sitk.GetArrayViewFromImage(moving), *model.intensity, foreground=fg)
    mod = model.module
    with torch.no_grad():
        if model.transform_type == "affine":
            src_grid = gm
            s = image_to_tensor(moving, gm, wm)
            t, out_grid, a = image_to_tensor(fixed, gf, wf), gf, np.eye(4)
        else:
            a = sitk_affine_to_matrix(result.initial_transform) if result.initial_transform else np.eye(4)
            src_grid = out_grid = aligned_grid(gf, a)  # the B-spline's grid in moving space
            s = image_to_tensor(moving, src_grid, wm)
            t = image_to_tensor(fixed, src_grid, wf, matrix_to_sitk_affine(np.linalg.inv(a)))
        grid = mod.sampling_grid(mod.predict(mod.representation(s), mod.representation(t)))[0].double().numpy()
    n2w = src_grid.normalised_to_world_matrix()
    sampled = grid.reshape(-1, 3) @ n2w[:3, :3].T + n2w[:3, 3]
    out_pts = out_grid.world_points().reshape(-1, 3)
    a_inv = np.linalg.inv(a)
    fixed_pts = out_pts @ a_inv[:3, :3].T + a_inv[:3, 3]  # B-spline grid lives in moving space: x = A^-1(y)
    return fixed_pts, sampled


def test_aligned_grid_is_the_fixed_grid_carried_by_the_rigid_part(oblique_pair):
    from scipy.spatial.transform import Rotation

    fixed, _ = oblique_pair
    gf = network_grid(fixed, tiny_config(3))
    rigid = np.eye(4)
    rigid[:3, :3] = Rotation.from_euler("xyz", [15, -10, 20], degrees=True).as_matrix()
    rigid[:3, 3] = [12.0, -7.0, 3.0]
    ga = aligned_grid(gf, rigid)
    pts = gf.world_points().reshape(-1, 3)
    assert np.allclose(ga.world_points().reshape(-1, 3), pts @ rigid[:3, :3].T + rigid[:3, 3], atol=1e-6)
    # with scale and shear: still orthonormal, same size/spacing, centred on A(centre)
    affine = rigid.copy()
    affine[:3, :3] = rigid[:3, :3] @ np.array([[1.1, 0.05, 0], [0, 0.9, 0], [0, 0, 1.05]])
    gb = aligned_grid(gf, affine)
    d = gb.direction_matrix
    assert np.allclose(d @ d.T, np.eye(3), atol=1e-9) and gb.size == gf.size and gb.spacing == gf.spacing
    assert np.allclose(gb.centre, affine[:3, :3] @ gf.centre + affine[:3, 3])


@pytest.mark.parametrize("transform", ["affine", "bspline"])
def test_written_transform_reproduces_the_network_sampling(make_model, oblique_pair, tmp_path, transform):
    fixed, moving = oblique_pair
    model = load_model(make_model(3, transform))
    initial = None
    if transform == "bspline":
        initial = sitk.AffineTransform(3)
        initial.SetMatrix(np.array([[1.0, 0.05, 0], [-0.05, 1.0, 0.02], [0, -0.02, 1.0]]).ravel().tolist())
        initial.SetTranslation((2.0, -1.0, 3.0))
    res = register(fixed, moving, model, iterations=0, initial_transform=initial, symmetric=False)  # raw network
    path = tmp_path / "t.h5"
    sitk.WriteTransform(res.transform, str(path))
    back = sitk.ReadTransform(str(path))
    fixed_pts, sampled = _network_points(model, fixed, moving, res)
    itk = np.array([back.TransformPoint(p.tolist()) for p in fixed_pts])
    assert np.abs(itk - sampled).max() < 1e-3  # mm
    assert np.abs(sampled - fixed_pts).mean() > 1.0  # a real, non-identity transform


@pytest.mark.parametrize("transform", ["affine", "bspline"])
def test_resampling_original_moving_with_written_file_equals_engine_output(make_model, oblique_pair, tmp_path, transform):
    from istn.cli import run_register

    fixed, moving = oblique_pair
    fp, mp = tmp_path / "fixed.nrrd", tmp_path / "moving.mha"
    sitk.WriteImage(fixed, str(fp))
    sitk.WriteImage(moving, str(mp))
    models = [make_model(3, "affine", seed=1, scale=0.3)]
    if transform == "bspline":
        models.append(make_model(3, "bspline", seed=2))
    out = tmp_path / "out"
    run_register(fp, mp, models, out, iterations=2, quiet=True)
    engine = sitk.ReadImage(str(out / "warped.nii.gz"))
    for name in ["transform.h5"] + (["transform.tfm"] if transform == "affine" else []):
        tx = sitk.ReadTransform(str(out / name))
        ref = sitk.Resample(sitk.ReadImage(str(mp)), sitk.ReadImage(str(fp)), tx, sitk.sitkLinear, 0.0)
        a, b = sitk.GetArrayFromImage(ref), sitk.GetArrayFromImage(engine)
        assert a.shape == b.shape
        assert np.abs(a - b).max() < 1e-5
        assert engine.GetSpacing() == fixed.GetSpacing() and np.allclose(engine.GetDirection(), fixed.GetDirection())
    # the warped image overlaps the fixed one better than the unregistered moving does... or at least differs
    unreg = sitk.GetArrayFromImage(sitk.Resample(moving, fixed))
    assert np.abs(unreg - sitk.GetArrayFromImage(engine)).max() > 1e-3


def test_engine_warp_matches_sitk_resampling_on_internal_grid(make_model, pair2d):
    """The torch warp the network optimises and SimpleITK's resampling agree (to interpolation error)."""
    fixed, moving = pair2d
    model = load_model(make_model(2, "affine", scale=0.3))
    res = register(fixed, moving, model, iterations=0, symmetric=False)  # the raw network's prediction
    cfg = model.config
    gf, gm = network_grid(fixed, cfg), network_grid(moving, cfg)
    with torch.no_grad():
        s = image_to_tensor(moving, gm, None)
        mod = model.module
        fg = model.intensity_foreground
        params = mod.predict(
            mod.representation(image_to_tensor(moving, gm, intensity_window(sitk.GetArrayViewFromImage(moving), foreground=fg))),
            mod.representation(image_to_tensor(fixed, gf, intensity_window(sitk.GetArrayViewFromImage(fixed), foreground=fg))))
        torch_warp = mod.warp(s, mod.sampling_grid(params))[0, 0].numpy()
    sitk_warp = sitk.GetArrayFromImage(warp_image(moving, gf, res.one_pass_transform))
    inside = torch_warp > 0.05
    assert inside.mean() > 0.05
    assert np.abs(torch_warp - sitk_warp)[inside].max() < 0.05  # two linear interpolations vs one


def test_itn_maps_carry_geometry(make_model, oblique_pair):
    fixed, moving = oblique_pair
    model = load_model(make_model(3, "affine"))
    res = register(fixed, moving, model, iterations=0)
    gf = network_grid(fixed, model.config)
    # the network grid is in the patient frame (world axes), whatever the image's direction
    assert res.fixed_map.GetSize() == gf.size and np.allclose(res.fixed_map.GetDirection(), np.eye(3).ravel())
    assert np.allclose(res.fixed_map.GetOrigin(), gf.origin)
    warped = res.warped_moving_map()
    assert warped.GetSize() == res.fixed_map.GetSize()
    # the moving map: the fixed head's grid carried into moving space by the result's rotation (an orthonormal
    # direction, the fixed grid's size), whatever the moving image's own direction
    d = np.asarray(res.moving_map.GetDirection()).reshape(3, 3)
    assert res.moving_map.GetSize() == gf.size and np.allclose(d @ d.T, np.eye(3), atol=1e-9)


@pytest.mark.parametrize("transform", ["affine", "bspline"])
def test_moving_map_grid_is_where_register_shows_the_moving_map(make_model, oblique_pair, transform):
    """`moving_map_grid` + the prepared image reproduce `RegistrationResult.moving_map` (what the panel overlays and
    `benchmarks/map_dice.py` scores): the fixed grid carried into moving space, for a B-spline by the rotation it
    starts from, for an affine by its result's."""
    from scipy.spatial.transform import Rotation

    from istn.inputs import prepare_image
    from istn.registration import moving_map_grid

    fixed, moving = oblique_pair
    model = load_model(make_model(3, transform))
    rigid = np.eye(4)
    rigid[:3, :3] = Rotation.from_euler("xyz", [12, -8, 15], degrees=True).as_matrix()
    rigid[:3, 3] = [4.0, -3.0, 2.0]
    initial = matrix_to_sitk_affine(rigid)
    res = register(fixed, moving, model, iterations=0, initial_transform=initial)
    cfg = model.config
    f_in, m_in = (prepare_image(im, cfg.grid_spacing, model.intensity, model.intensity_foreground,
                                cfg.centre_on_foreground) for im in (fixed, moving))
    grid = moving_map_grid(f_in, m_in, model, initial, result=res.transform)
    shown = res.moving_map
    assert shown.GetSize() == grid.size
    assert np.allclose(shown.GetOrigin(), grid.origin) and np.allclose(shown.GetDirection(), grid.direction)
    own = network_grid(m_in.image, cfg, m_in.centre)
    fixed_grid = network_grid(f_in.image, cfg, f_in.centre)
    if transform == "bspline":  # carried by the rotation it starts from: not the moving image's own grid
        assert np.allclose(grid.direction_matrix, rigid[:3, :3] @ own.direction_matrix, atol=1e-9)
        assert np.allclose(grid.centre, rigid[:3, :3] @ fixed_grid.centre + rigid[:3, 3])
    else:  # an affine stage: carried by its result (here the one pass on top of the rotation)
        a = sitk_affine_to_matrix(res.transform)
        u, _, vt = np.linalg.svd(a[:3, :3])
        assert np.allclose(grid.direction_matrix, u @ vt @ fixed_grid.direction_matrix, atol=1e-9)
        assert np.allclose(grid.centre, a[:3, :3] @ fixed_grid.centre + a[:3, 3])
        assert not np.allclose(grid.direction, own.direction)  # not where its refinement compared the maps
        # without a result (or before there is one): the moving image's own grid
        assert np.allclose(moving_map_grid(f_in, m_in, model, initial).origin, own.origin)
    with torch.no_grad():
        maps = model.module.representation(image_to_tensor(m_in.image, grid, m_in.window))[0].amax(0).numpy()
    assert np.allclose(sitk.GetArrayFromImage(shown), maps, atol=1e-5)


def test_an_image_registered_to_itself_shows_the_same_map_on_both_sides(make_model, oblique_pair):
    """Affine: the moving map is the ITN's look at the moving head in the result's pose; for an image and itself
    the result is the identity, so the moving map is the fixed map, voxel for voxel, on the same grid."""
    fixed, _ = oblique_pair
    model = load_model(make_model(3, "affine"))
    res = register(fixed, fixed, model, iterations=0)
    assert np.allclose(sitk_affine_to_matrix(res.transform), np.eye(4), atol=1e-5)  # float32 rounding
    assert res.moving_map.GetSize() == res.fixed_map.GetSize()
    assert np.allclose(res.moving_map.GetOrigin(), res.fixed_map.GetOrigin(), atol=1e-6)
    assert np.allclose(res.moving_map.GetDirection(), res.fixed_map.GetDirection(), atol=1e-6)
    assert np.allclose(sitk.GetArrayFromImage(res.moving_map), sitk.GetArrayFromImage(res.fixed_map), atol=1e-5)
