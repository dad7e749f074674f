"""Metrics with known answers, in millimetres."""

import numpy as np
import SimpleITK as sitk

from istn.geometry import Grid
from istn.metrics import asd, dice, folding_fraction, hd95, label_metrics
from istn.transforms import bspline_to_world, matrix_to_sitk_affine


def test_dice_known_answer():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :4] = True  # 40
    b[:, 2:6] = True  # 40, overlap 20
    assert dice(a, b) == 0.5
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_surface_distance_of_a_shifted_slab_in_mm():
    """Two slabs shifted by 3 voxels along an axis of 2 mm spacing: facing surfaces are 6 mm apart."""
    a = np.zeros((40, 10, 10), bool)
    b = np.zeros((40, 10, 10), bool)
    a[10:20] = True
    b[13:23] = True
    spacing = (2.0, 1.0, 1.0)
    # every surface voxel of one slab is 6 mm (3 voxels x 2 mm) from the other's surface, or on it
    assert 0 < asd(a, b, spacing) <= 6.0
    assert hd95(a, b, spacing) == 6.0
    assert asd(a, a, spacing) == 0.0 and hd95(a, a, spacing) == 0.0


def test_asd_is_a_surface_distance_not_a_volume_one():
    """A big ball vs the same ball grown by one voxel: surface distance ~1 voxel whatever the size."""
    z, y, x = np.mgrid[:41, :41, :41]
    r = np.sqrt((z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2)
    assert 0.5 < asd(r <= 15, r <= 16, (1.0, 1.0, 1.0)) < 1.5


def test_label_metrics_per_label_on_images():
    lab = np.zeros((12, 12), np.uint8)
    lab[2:6, 2:6] = 1
    lab[7:11, 7:11] = 3
    f = sitk.GetImageFromArray(lab)
    m = label_metrics(f, f)
    assert set(m) == {1, 3} and all(v["dice"] == 1.0 for v in m.values())


def test_folding_fraction_identity_vs_folding_bspline():
    g = Grid((20, 20), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    assert folding_fraction(matrix_to_sitk_affine(np.eye(3)), g) == 0.0
    coeffs = np.zeros((2, 7, 7))  # control points every 5 voxels
    coeffs[0, 3, 3], coeffs[0, 3, 4] = 0.8, -0.8  # neighbours pushed through each other: folds
    frac = folding_fraction(bspline_to_world(coeffs, g, 5.0), g)
    assert 0.0 < frac < 0.5


def test_jacobian_of_an_affine_on_an_oblique_grid_is_its_determinant():
    from conftest import rotation
    from istn.metrics import jacobian_determinant

    g = Grid((12, 10, 8), (1.0, 2.0, 3.0), (5.0, -3.0, 2.0), tuple(rotation(3, (20, -10, 35)).ravel()))
    m = np.eye(4)
    m[:3, :3] = np.diag([1.2, 0.9, 1.1]) @ rotation(3, (5, 10, 0))
    jac = jacobian_determinant(matrix_to_sitk_affine(m), g)
    assert np.allclose(jac, 1.2 * 0.9 * 1.1, atol=1e-6)


def test_jacobian_image_on_a_fine_oblique_grid_matches_central_differences():
    """`jacobian_image`: an affine is its determinant at every voxel; an affine + B-spline differentiated on the
    coarse displacement-field lattice and interpolated agrees with central differences at every voxel."""
    from conftest import rotation
    from istn.metrics import jacobian_determinant
    from istn.registration import displacement_field, jacobian_image

    from istn.transforms import control_point_count

    g = Grid((96, 80, 64), (1.0, 1.0, 1.0), (-30.0, -40.0, -35.0), tuple(rotation(3, (15, -5, 25)).ravel()))
    m = np.eye(4)
    m[:3, :3] = np.diag([1.1, 0.95, 1.05]) @ rotation(3, (3, -4, 6))
    m[:3, 3] = (2.0, -1.0, 3.0)
    affine = matrix_to_sitk_affine(m)
    const = sitk.GetArrayFromImage(jacobian_image(affine, g, 4.0))
    assert const.shape == (64, 80, 96) and np.allclose(const, 1.1 * 0.95 * 1.05, atol=1e-5)
    # a smooth deformation, control points every 32 mm: the lattice is every 4 mm (1/8 of the mesh)
    shape = tuple(control_point_count(n, 32.0) for n in reversed(g.size))
    coeffs = np.random.default_rng(1).normal(0.0, 0.08, (3, *shape))
    both = sitk.CompositeTransform([affine, bspline_to_world(coeffs, g, 32.0)])
    assert displacement_field(both, g, 4.0).GetSpacing() == (4.0, 4.0, 4.0)  # the lattice path is the one tested
    exact = jacobian_determinant(both, g)
    coarse = jacobian_image(both, g, 4.0)
    got = sitk.GetArrayFromImage(coarse)
    assert coarse.GetSize() == g.size and np.allclose(coarse.GetDirection(), g.direction)
    assert exact.std() > 0.02  # the B-spline does change volumes locally
    inner = (slice(4, -4),) * 3  # one-sided differences at the lattice's border (4 voxels) vs the grid's (1)
    np.testing.assert_allclose(got[inner], exact[inner], atol=0.02)
    assert np.abs(got[inner] - exact[inner]).mean() < 0.003
    np.testing.assert_allclose(sitk.GetArrayFromImage(jacobian_image(both, g)), exact, atol=1e-6)  # no lattice
    sample = jacobian_image(both, g, 4.0, resample=False)  # the lattice itself: a uniform sample of the grid
    assert sample.GetSpacing() == (4.0, 4.0, 4.0) and sample.GetOrigin() == g.origin
    points = exact[::4, ::4, ::4]  # the grid voxels on the lattice (which also covers the grid's last voxel)
    on_grid = sitk.GetArrayFromImage(sample)[tuple(slice(0, n) for n in points.shape)]
    np.testing.assert_allclose(on_grid[1:-1, 1:-1, 1:-1], points[1:-1, 1:-1, 1:-1], atol=0.01)
    np.testing.assert_allclose(np.percentile(on_grid, [1, 50, 99]), np.percentile(exact, [1, 50, 99]), atol=0.01)


def test_label_metrics_equal_the_whole_volume_computation():
    rng = np.random.default_rng(0)
    lab_f = np.zeros((30, 40, 35), np.uint8)
    lab_w = np.zeros_like(lab_f)
    lab_f[5:15, 10:25, 3:12] = 1
    lab_w[7:16, 12:24, 0:10] = 1  # touches the volume's edge
    lab_f[20:28, 2:9, 20:33] = 2
    lab_w[19:27, 3:10, 22:35] = 2
    lab_w[rng.random(lab_w.shape) > 0.999] = 2  # scattered voxels far from the box
    f, w = sitk.GetImageFromArray(lab_f), sitk.GetImageFromArray(lab_w)
    for img in (f, w):
        img.SetSpacing((1.5, 1.0, 2.0))
    spacing = (2.0, 1.0, 1.5)
    got = label_metrics(f, w)
    for v in (1, 2):
        a, b = lab_f == v, lab_w == v
        assert got[v]["dice"] == dice(a, b)
        assert np.isclose(got[v]["asd"], asd(a, b, spacing))
        assert np.isclose(got[v]["hd95"], hd95(a, b, spacing))


def _ribbon(thick_mm: float, spacing_mm: float, n: int = 160) -> sitk.Image:
    """A shell ``thick_mm`` thick of 100 parcels (a cortical ribbon's shape) at 1 mm, through nearest neighbour
    onto ``spacing_mm`` voxels."""
    z, y, x = np.mgrid[:n, :n, :n] - n / 2 + 0.5
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    parcel = (np.floor((np.arctan2(y, x) + np.pi) / (2 * np.pi) * 10) * 10
              + np.floor(np.arccos(np.clip(z / np.maximum(r, 1e-6), -1, 1)) / np.pi * 10)).astype(np.int16) + 1
    image = sitk.GetImageFromArray(np.where((r > 60) & (r < 60 + thick_mm), parcel, 0).astype(np.int16))
    grid = sitk.Image([int(n / spacing_mm)] * 3, sitk.sitkInt16)
    grid.SetSpacing((spacing_mm,) * 3)
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor)


def test_a_thin_parcellation_broken_into_lone_voxels_is_still_a_label_map():
    """Review: a 100-label cortical ribbon resampled to voxels coarser than it is thick (nearest neighbour) was
    taken for intensities (so `istn apply` would blend its labels linearly). Its lone voxels lie in background, not
    between their neighbours' values as an image's edges, gradients and noise do."""
    from istn.metrics import in_between_edge_fraction, looks_like_intensities

    for thick, spacing in ((2.5, 4.0), (2.0, 5.0), (3.0, 6.0)):
        ribbon = _ribbon(thick, spacing)
        a = sitk.GetArrayViewFromImage(ribbon)
        assert len(np.unique(a)) > 60
        lone_in_background = (a != 0) & (np.roll(a, 1, 0) == 0) & (np.roll(a, -1, 0) == 0)
        assert lone_in_background.sum() > 0.05 * (a != 0).sum()  # it did break up
        assert not looks_like_intensities(ribbon), (thick, spacing, in_between_edge_fraction(a, 0))
    # and intensity images of many values are intensities: noisy, smooth, or 8-bit
    z, y, x = np.mgrid[:48, :48, :48] - 24
    blob = (200 * np.exp(-(x ** 2 + y ** 2 + z ** 2) / (2 * 10.0 ** 2))).astype(np.int16)
    noisy = (blob + np.random.default_rng(0).normal(0, 5, blob.shape)).astype(np.int16)
    for a in (blob, noisy, (blob * 255 // 200).astype(np.uint8)):
        assert looks_like_intensities(sitk.GetImageFromArray(a))


def test_the_in_between_fraction_is_the_same_computed_in_slabs():
    from istn.metrics import in_between_edge_fraction

    rng = np.random.default_rng(0)
    for shape in ((70, 12, 9), (33, 20), (1, 5, 5)):
        a = rng.integers(0, 5, shape).astype(np.int16)
        whole = in_between_edge_fraction(a, 0, slab=10 ** 6)
        assert 0 < whole < 1
        for slab in (1, 2, 7, 32):
            assert in_between_edge_fraction(a, 0, slab=slab) == whole
    # known answers: 0 1 2 1 0: of the three edge voxels, the 1s lie between 0 and 2 (the 2 has none above it);
    # two rows of steps only, as a label map's
    assert in_between_edge_fraction(np.array([[0, 1, 2, 1, 0]]), 0) == 2 / 3
    assert in_between_edge_fraction(np.array([[0, 3, 3, 5, 5, 0], [0, 3, 5, 5, 0, 0]]), 0) == 0.0


def test_an_image_upsampled_by_nearest_neighbour_is_still_intensities():
    """Label audit: a T1 of 3958 values with each slice repeated (a thick-slice series resliced, 2 mm taken to
    1 mm by nearest neighbour) has no voxel unequal to all its neighbours and was taken for a label map. Repeated
    slices are left out first; a label map upsampled so stays a label map."""
    from istn.metrics import looks_like_intensities

    z, y, x = np.mgrid[:40, :40, :40] - 20
    rng = np.random.default_rng(0)
    image = (1000 * np.exp(-(x ** 2 + y ** 2 + z ** 2) / 300.0) + rng.normal(0, 20, x.shape)).astype(np.int16)
    labels = (np.digitize(np.hypot(x, y), [5, 9, 13, 17]) * 20 + np.digitize(z, np.arange(-18, 20, 3))).astype(np.int16)
    assert len(np.unique(labels)) > 50
    for a, intensities in ((image, True), (labels, False)):
        for upsampled in (a, np.repeat(a, 2, 0), a.repeat(2, 0).repeat(2, 1).repeat(2, 2), np.repeat(a, 3, 2),
                          np.repeat(a, 5, 0)):  # 5 mm slices resliced to 1 mm (review: read as labels)
            assert looks_like_intensities(sitk.GetImageFromArray(upsampled)) == intensities
    # a label map of blocks (a grid parcellation: every slice repeats within its block) is not collapsed into
    # lone voxels (review: 216 blocks of 4^3 voxels were read as intensities)
    blocks = np.arange(1, 6 ** 3 + 1).reshape(6, 6, 6).astype(np.int16).repeat(4, 0).repeat(4, 1).repeat(4, 2)
    assert not looks_like_intensities(sitk.GetImageFromArray(np.pad(blocks, 4)))
