"""Coordinate systems and transform conventions, with known answers."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import rotation
from istn.geometry import Grid
from istn.transforms import (
    affine_theta, bspline_basis, bspline_displacement, bspline_to_world, compose, identity_grid,
    matrix_to_sitk_affine, sitk_affine_to_matrix, theta_to_world, warp, world_to_theta,
)


def oblique_grid():
    return Grid((20, 16, 12), (2.0, 2.5, 3.0), (1.0, 2.0, 3.0), tuple(rotation(3, (10, 20, 30)).ravel()))


def test_voxel_world_normalised_round_trip():
    g = oblique_grid()
    v = np.array([[0, 0, 0], [19, 15, 11], [3.5, 7.25, 1.0]])
    w = g.voxel_to_world(v)
    assert np.allclose(g.world_to_voxel(w), v)
    # normalised corners are the first and last voxel centres (align_corners=True)
    n2v = g.normalised_to_voxel_matrix()
    assert np.allclose(n2v[:3, :3] @ [-1, -1, -1] + n2v[:3, 3], [0, 0, 0])
    assert np.allclose(n2v[:3, :3] @ [1, 1, 1] + n2v[:3, 3], [19, 15, 11])
    # the world matrix is what SimpleITK computes
    img = g.reference_image()
    assert np.allclose(w[2], img.TransformContinuousIndexToPhysicalPoint(v[2].tolist()))


def test_centred_grid_keeps_centre_and_direction():
    g = oblique_grid()
    net = Grid.centred_on(g, (8, 8, 8), 5.0)
    assert np.allclose(net.centre, g.centre)
    assert net.direction == g.direction and net.spacing == (5.0, 5.0, 5.0)


def test_half_unit_translation_is_16_pixels_on_a_65_pixel_grid():
    img = torch.zeros(1, 1, 65, 65)
    img[0, 0, 30, 20] = 1.0
    theta = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]])  # x_in = x_out + 0.5
    grid = torch.nn.functional.affine_grid(theta, [1, 1, 65, 65], align_corners=True)
    out = warp(img, grid)
    assert out[0, 0, 30, 4] == 1.0 and out.sum() == 1.0  # 20 - 16 = 4


def test_rotation_is_rigid_in_world_on_a_non_cubic_grid():
    """Rotations are composed in a physical frame: a non-square grid must not shear them."""
    half = torch.tensor([40.0, 10.0])  # 4:1 aspect ratio in mm
    theta = affine_theta(torch.zeros(1, 2), torch.tensor([[0.5]]), torch.zeros(1, 2), torch.zeros(1, 1), half)
    g = Grid((81, 21), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    world = theta_to_world(theta[0].double().numpy(), g, g)
    lin = world[:2, :2]
    assert np.allclose(lin @ lin.T, np.eye(2), atol=1e-6)
    assert np.isclose(np.arctan2(lin[1, 0], lin[0, 0]), 0.5, atol=1e-6)


def test_affine_parameters_known_answer_3d():
    half = torch.tensor([10.0, 10.0, 10.0])
    theta = affine_theta(torch.tensor([[0.1, 0.0, 0.0]]), torch.zeros(1, 3), torch.log(torch.tensor([[2.0, 1.0, 1.0]])),
                         torch.tensor([[0.5, 0.0, 0.0]]), half)
    expected = torch.tensor([[2.0, 0.5, 0.0, 0.1], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])  # Sh @ S, true shear
    assert torch.allclose(theta[0], expected, atol=1e-6)


def test_theta_world_round_trip_between_different_grids():
    gf = oblique_grid()
    gm = Grid((10, 12, 14), (3.0, 2.0, 1.5), (-5.0, 4.0, 0.0), tuple(rotation(3, (-5, 15, 0)).ravel()))
    theta = np.array([[1.1, 0.1, 0.0, 0.05], [-0.1, 0.9, 0.05, -0.1], [0.0, 0.02, 1.0, 0.2]])
    w = theta_to_world(theta, gf, gm)
    assert np.allclose(world_to_theta(w, gf, gm), theta)
    # a fixed voxel mapped through theta lands where the world matrix sends its world point
    v = np.array([4.0, 5.0, 6.0])
    n = gf.world_to_normalised_matrix() @ np.append(gf.voxel_to_world(v), 1)
    m_world = gm.normalised_to_world_matrix() @ np.append(theta @ n, 1)
    assert np.allclose((w @ np.append(gf.voxel_to_world(v), 1))[:3], m_world[:3])


def test_sitk_affine_matrix_round_trip_with_centre():
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(rotation(3, (5, 10, 15)).ravel().tolist())
    tx.SetCenter((10.0, -5.0, 3.0))
    tx.SetTranslation((1.0, 2.0, 3.0))
    m = sitk_affine_to_matrix(tx)
    p = np.array([7.0, 8.0, 9.0])
    assert np.allclose(m[:3, :3] @ p + m[:3, 3], tx.TransformPoint(p.tolist()))
    back = matrix_to_sitk_affine(m)
    assert np.allclose(back.TransformPoint(p.tolist()), tx.TransformPoint(p.tolist()))


def test_compose_applies_first_then_second():
    first = matrix_to_sitk_affine(np.array([[1, 0, 10.0], [0, 1, 0], [0, 0, 1]]))
    second = sitk.ScaleTransform(2, (2.0, 2.0))
    assert np.allclose(compose(first, second).TransformPoint((1.0, 0.0)), (22.0, 0.0))


def test_bspline_basis_partition_of_unity_and_cubic_reproduction():
    b = bspline_basis(50, 7.0)
    assert np.allclose(b.sum(1).numpy(), 1.0, atol=1e-6)
    # control points on a line reproduce the line exactly (cubic B-splines reproduce linear functions)
    p = (torch.arange(b.shape[1], dtype=torch.float32) - 1.0) * 7.0
    assert torch.allclose(b @ p, torch.arange(50, dtype=torch.float32), atol=1e-4)


def test_bspline_matches_itk_on_an_oblique_anisotropic_grid():
    g = oblique_grid()
    s = 5.0
    bases = [bspline_basis(n, s) for n in g.shape]
    torch.manual_seed(0)
    coeffs = torch.randn(1, 3, *[b.shape[1] for b in bases]) * 0.1
    disp = bspline_displacement(coeffs, bases)[0].double().numpy() @ g.normalised_to_world_matrix()[:3, :3].T
    tx = bspline_to_world(coeffs[0].double().numpy(), g, s)
    pts = g.world_points().reshape(-1, 3)
    itk = np.array([tx.TransformPoint(p.tolist()) for p in pts]) - pts
    assert np.abs(itk - disp.reshape(-1, 3)).max() < 1e-5
    assert np.abs(disp).max() > 0.5  # the test is not vacuous


def test_identity_grid_is_the_identity_warp():
    img = torch.rand(1, 2, 9, 7, 5)
    assert torch.allclose(warp(img, identity_grid([9, 7, 5])), img, atol=1e-6)


@pytest.mark.parametrize("depth", [48, 20, 19, 7, 1])
def test_warp_in_slabs_gives_grid_samples_values_and_gradients(depth):
    """`warp` cuts a single CPU volume into slabs (torch's 3D grid_sample is parallel over the batch only)."""
    import torch.nn.functional as F
    from istn.transforms import warp

    torch.manual_seed(0)
    image = torch.rand(1, 3, 12, 10, 9)
    theta = (torch.eye(3, 4) + 0.1 * torch.randn(3, 4))[None]
    results = []
    for fn in (lambda g: F.grid_sample(image, g, padding_mode="zeros", align_corners=True), lambda g: warp(image, g)):
        th = theta.clone().requires_grad_(True)
        out = fn(F.affine_grid(th, [1, 1, depth, 11, 8], align_corners=True))
        (out * torch.linspace(0, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), th.grad))
    (a, ga), (b, gb) = results
    assert b.shape == (1, 3, depth, 11, 8) and a.abs().sum() > 0
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("angles", [(0, 0, 0), (20, -10, 15)])
def test_what_is_sampled_on_a_field_lattice_does_not_depend_on_how_the_voxels_are_stored(angles):
    """The same voxels stored LPS, RAS, sagittal (ASL) or permuted (PIR) give one field lattice, so a B-spline's
    inverse over the moving image (atlas labels onto it) and its round-trip check are the same numbers, and its
    labels the same voxels. (The lattice was laid from the stored first voxel: a RAS-stored image moved it by a
    voxel where the lattice takes every other one, and 5 of ~6,100 atlas voxels flipped at nearest-neighbour ties.)"""
    from conftest import blob_image

    from istn.geometry import field_lattice, lps_grid
    from istn.inverse import inverse_transform
    from istn.registration import warp_image

    image = blob_image((41, 36, 29), (2.0, 2.0, 2.0), (-40.0, -35.0, -28.0), rotation(3, angles).ravel())
    mesh = sitk.BSplineTransformInitializer(image, (4, 4, 4))
    mesh.SetParameters(tuple(np.random.default_rng(1).normal(0, 2.5, len(mesh.GetParameters()))))
    labels = sitk.Cast(image > 0.4, sitk.sitkUInt8) + sitk.Cast(image > 0.7, sitk.sitkUInt8)
    results = {}
    for layout in ("LPS", "RAS", "ASL", "PIR"):
        stored = sitk.DICOMOrient(image, layout)
        grid = Grid.from_image(stored)
        lattice = field_lattice(grid, 4.0)
        inverse = inverse_transform(mesh, stored, 4.0)
        on_lps = sitk.DICOMOrient(warp_image(sitk.DICOMOrient(labels, layout), stored, inverse.transform,
                                             sitk.sitkNearestNeighbor, 0.0, field_spacing=4.0), "LPS")
        results[layout] = (lattice, inverse.round_trip_mm, sitk.GetArrayFromImage(on_lps))
        assert lps_grid(grid).size == Grid.from_image(sitk.DICOMOrient(stored, "LPS")).size
    lattice, trip, voxels = results["LPS"]
    assert (voxels == 1).sum() > 100 and (voxels == 2).sum() > 100
    for layout, (other_lattice, other_trip, other_voxels) in results.items():
        assert other_lattice.size == lattice.size, layout
        np.testing.assert_allclose(other_lattice.origin, lattice.origin, atol=1e-9)
        np.testing.assert_allclose(other_lattice.direction, lattice.direction, atol=1e-12)
        assert other_trip == pytest.approx(trip, abs=1e-9), layout
        assert np.array_equal(other_voxels, voxels), layout


@pytest.mark.parametrize("angles", [(0, 0, 0), (20, -10, 15), (44, 30, -50)])
def test_a_bspline_warp_onto_a_reference_stored_any_way_is_the_same_image(angles):
    """The fast warp through a displacement field (what register's warped.nii.gz, the Slicer output volume and
    istn apply use) onto a FIXED grid stored LPS, RAS, ASL or PIR: the same values at the same voxels (re-stored
    LPS), each within the field's approximation of the exact warp. (With the field laid on the reference as
    stored LPS, a RAS-stored reference was resampled with the axes crossed, and an ASL one crashed.)"""
    from conftest import blob_image

    from istn.registration import warp_image

    reference = blob_image((50, 44, 36), (2.0, 2.0, 2.0), (-50.0, -44.0, -36.0), rotation(3, angles).ravel())
    moving = blob_image((46, 52, 40), (2.2, 1.9, 2.0), (-48.0, -50.0, -40.0), rotation(3, (5, 10, -5)).ravel())
    mesh = sitk.BSplineTransformInitializer(reference, (2, 2, 2))  # ~36 mm control points: a 4 mm field is used
    mesh.SetParameters(tuple(np.random.default_rng(2).normal(0, 3.0, len(mesh.GetParameters()))))
    from istn.geometry import Grid
    from istn.registration import displacement_field

    assert displacement_field(mesh, Grid.from_image(reference), 4.0) is not None
    warped = {}
    for layout in ("LPS", "RAS", "ASL", "PIR"):
        stored = sitk.DICOMOrient(reference, layout)
        fast = warp_image(moving, stored, mesh, field_spacing=4.0)
        exact = warp_image(moving, stored, mesh)
        assert fast.GetSize() == stored.GetSize() and fast.GetDirection() == stored.GetDirection()
        difference = np.abs(sitk.GetArrayFromImage(fast) - sitk.GetArrayFromImage(exact))
        assert difference.max() < 0.02, (layout, difference.max())  # blob values in [0, 1.6]
        warped[layout] = sitk.GetArrayFromImage(sitk.DICOMOrient(fast, "LPS"))
    for layout, values in warped.items():
        np.testing.assert_allclose(values, warped["LPS"], atol=1e-6, err_msg=layout)


def _half_mm_pair() -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """A 1 mm label map and image with voxel centres at half millimetres, and a 2 mm grid at whole millimetres
    reaching past them by a millimetre (MNI-space files at two resolutions): its points are nearest-neighbour ties
    on every axis, and its edge points lie exactly on the 1 mm image's boundary faces."""
    rng = np.random.default_rng(1)
    labels = np.zeros((80, 90, 70), np.uint8)
    for value in range(1, 30):
        z, y, x = rng.integers(0, 60, 3)
        labels[z:z + rng.integers(4, 15), y:y + rng.integers(4, 15), x:x + rng.integers(4, 15)] = value
    label_map = sitk.GetImageFromArray(labels)
    image = sitk.GetImageFromArray(rng.random(labels.shape).astype(np.float32) + 1.0)
    for im in (label_map, image):
        im.SetOrigin((-35.5, -45.5, -40.5))
    grid = sitk.Image((40, 48, 38), sitk.sitkUInt8)
    grid.SetSpacing((2.0, 2.0, 2.0))
    grid.SetOrigin((-36.0, -46.0, -41.0))
    return label_map, image, grid


@pytest.mark.parametrize("layout", ["RAS", "ASL", "PIR"])
def test_a_warp_at_ties_and_edge_faces_is_the_same_however_either_image_is_stored(layout):
    """ITK's resampling at exact ties: nearest neighbour half-way between voxels picks by stored index (moving
    side), and for a linear transform computes the half indices along the REFERENCE's first stored axis, where
    some land a rounding error below .5 (15 of 2,774 labelled voxels here with the reference stored ASL; 94-144 of
    6,466 for Colin27's labels, helper audit, session 37); linear interpolation counts the face half a voxel past
    the last voxel as inside, past the first one not (2,660-6,004 voxels of this image's edge). warp_image takes
    both grids as stored LPS, so either file's storage changes nothing."""
    from istn.registration import warp_image

    label_map, image, grid = _half_mm_pair()
    identity = sitk.Transform(3, sitk.sitkIdentity)
    for moving, interpolator in ((label_map, sitk.sitkNearestNeighbor), (image, sitk.sitkLinear)):
        plain = sitk.GetArrayFromImage(warp_image(moving, grid, identity, interpolator))
        assert (plain > 0).sum() > 1000
        for moving_layout, grid_layout in (("LPS", layout), (layout, "LPS"), (layout, layout)):
            stored_grid = sitk.DICOMOrient(grid, grid_layout)
            warped = warp_image(sitk.DICOMOrient(moving, moving_layout), stored_grid, identity, interpolator)
            assert warped.GetDirection() == stored_grid.GetDirection() and warped.GetOrigin() == stored_grid.GetOrigin()
            np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.DICOMOrient(warped, "LPS")), plain,
                                          err_msg=f"{moving_layout} onto {grid_layout}")
