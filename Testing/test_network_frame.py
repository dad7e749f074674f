"""The network frame: results do not depend on how the voxels are stored, and the grid sits on the anatomy."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import blob_image, rotation
from istn.data import foreground_centre, network_grid
from istn.export import load_model
from istn.geometry import Grid
from istn.losses import anchor_energy, anchored_control_points, bending_energy
from istn.refinement import CONVERGENCE_WINDOW, loss_rise
from istn.registration import register

# The 48 axis layouts of a 3D image: every axis order, every sign (DICOM orientation codes).
LAYOUTS = ["".join(p) for axes in itertools.permutations(("LR", "PA", "SI"))
           for p in itertools.product(*axes)]


def _head(centre=(4.0, -6.0, 8.0)) -> sitk.Image:
    """A small asymmetric 'head' (blobs in world mm) on an identity-direction grid with a padded, off-centre FOV."""
    return blob_image((30, 26, 34), (2.0, 2.0, 2.0), (-18.0, -38.0, -22.0), np.eye(3), centre=centre)


def _max_distance(a: sitk.Transform, b: sitk.Transform, ref: sitk.Image) -> float:
    """Largest |a(x) - b(x)| (mm) over the voxel centres of ``ref``."""
    def field(t):
        f = sitk.TransformToDisplacementField(t, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                                              ref.GetSpacing(), ref.GetDirection())
        return sitk.GetArrayFromImage(f)
    return float(np.linalg.norm(field(a) - field(b), axis=-1).max())


def _oblique_copy(image: sitk.Image, degrees=(20.0, -15.0, 25.0)) -> sitk.Image:
    """The same world content resampled on an oblique grid covering it (a tilted acquisition)."""
    rot = rotation(3, degrees)
    size = [int(s * 1.4) for s in image.GetSize()]
    spacing = [1.8, 1.8, 1.8]
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    origin = centre - rot @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2)
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetOrigin(origin.tolist())
    ref.SetDirection(rot.ravel().tolist())
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32)


def test_there_are_48_distinct_layouts():
    img = _head()
    directions = {tuple(np.round(sitk.DICOMOrient(img, code).GetDirection(), 6)) for code in LAYOUTS}
    assert len(LAYOUTS) == 48 and len(directions) == 48


def test_foreground_centre_is_the_same_point_for_every_layout():
    img = _head()
    ref = foreground_centre(img)
    for code in LAYOUTS:
        assert np.allclose(foreground_centre(sitk.DICOMOrient(img, code)), ref, atol=1e-6), code
    # and it is the blob's centre, not the (off-centre, padded) field of view's
    grid_centre = np.asarray(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))
    assert np.linalg.norm(ref - np.array([4.0, -6.0, 8.0])) < 4.0 < np.linalg.norm(grid_centre - np.array([4.0, -6.0, 8.0]))


def _head_and_neck(turn=(0.0, 0.0, 0.0), neck=True) -> sitk.Image:
    """An ellipsoid head (semi-axes 75, 95, 87 mm) centred at (5, -10, 20) mm, turned by ``turn`` degrees, on a 4 mm
    grid; with ``neck``, a neck (cylinder, 80 mm) and shoulders (400 x 140 x 60 mm) below it, as a head-and-neck
    field of view holds them."""
    g = Grid((100, 70, 110), (4.0,) * 3, (-198.0, -150.0, -300.0), tuple(np.eye(3).ravel()))
    p = g.world_points() - np.array([5.0, -10.0, 20.0])  # (z, y, x, 3) about the head's centre
    local = p @ rotation(3, turn)  # the head's own axes
    head = ((local / np.array([75.0, 95.0, 87.0])) ** 2).sum(-1) <= 1.0
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    cylinder = (z < -70.0) & (z >= -167.0) & ((x / 55.0) ** 2 + (y / 60.0) ** 2 <= 1.0)
    shoulders = (z < -157.0) & (z >= -217.0) & (np.abs(x) <= 200.0) & (np.abs(y) <= 70.0)
    body = head | (neck & (cylinder | shoulders))
    return g.image_from_array(np.where(body, 100.0, 0.0).astype(np.float32))


@pytest.mark.parametrize("turn", [(0.0, 0.0, 0.0), (25.0, -15.0, 20.0)])
def test_the_network_grid_is_centred_on_the_head_when_a_neck_and_shoulders_are_in_view(turn):
    """A head-and-neck field of view with the shoulders in it: the foreground's centroid lay 83 mm below the head's
    (pose audit), the network's 192 mm grid held the neck and half the head, and registration ended at Dice 0. A
    head alone, however turned, is centred on its centroid as before."""
    head = np.array([5.0, -10.0, 20.0])
    alone = foreground_centre(_head_and_neck(turn, neck=False))
    assert np.linalg.norm(alone - head) < 1.0
    with_neck = _head_and_neck(turn)
    centroid = np.argwhere(sitk.GetArrayViewFromImage(with_neck) > 0)[:, ::-1] * 4.0 + np.array([-198.0, -150.0, -300.0])
    assert np.linalg.norm(centroid.mean(0) - head) > 60.0  # where the centroid of all the foreground lies
    # on the head, a few mm low: the 180 mm below its top hold the neck's first 23 mm (a real head's, 1 mm: pose audit)
    assert np.linalg.norm(foreground_centre(with_neck) - head) < 8.0


def test_a_head_and_neck_stored_upside_down_is_centred_on_the_head_given_where_its_top_lies():
    """The turn search (`istn.chain.search_turns`) tells the centring where the head's top lies under each turn: a
    head and neck stored upside down (its header turned 180 degrees about left-right) was centred 180 mm above the
    shoulders, the world's top, and the turned chain registered nothing (Dice 0.000; now 0.848)."""
    from conftest import header_turned

    turn = np.diag([1.0, -1.0, -1.0])
    image = _head_and_neck()
    centre = Grid.from_image(image).centre
    stored = header_turned(image, turn)
    head = centre + turn @ (np.array([5.0, -10.0, 20.0]) - centre)  # where the header puts the head's centre
    assert np.linalg.norm(foreground_centre(stored) - head) > 60.0  # its top taken for the world's
    assert np.linalg.norm(foreground_centre(stored, up=turn @ [0.0, 0.0, 1.0]) - head) < 8.0
    assert np.array_equal(foreground_centre(image, up=(0.0, 0.0, 1.0)), foreground_centre(image))


def test_network_grid_is_in_the_patient_frame_on_the_anatomy(tiny3d):
    img = _head()
    for code in ("LPS", "RAS", "ASL", "SAR"):
        g = network_grid(sitk.DICOMOrient(img, code), tiny3d)
        assert np.allclose(g.direction_matrix, np.eye(3))
        assert np.allclose(g.centre, foreground_centre(img), atol=1e-6)
    # padding the image with background moves the grid by a hair (Otsu's threshold sees more background), not
    # by the shift of the field of view's centre (10-12 voxels of 2 mm)
    padded = sitk.ConstantPad(img, [10, 0, 6], [0, 12, 0], 0.0)
    assert np.linalg.norm(network_grid(padded, tiny3d).centre - network_grid(img, tiny3d).centre) < 0.1


@pytest.fixture
def tiny3d():
    from conftest import tiny_config

    return tiny_config(3)


def test_every_axis_layout_gives_the_same_world_transform(make_model):
    """All 48 storage layouts of the moving image (and some of the fixed) give one world transform."""
    model = load_model(make_model(3, "affine", scale=0.3))
    fixed = _head()
    moving = _head(centre=(8.0, -2.0, 4.0))
    ref = register(fixed, moving, model, iterations=3).transform
    worst = 0.0
    for k, code in enumerate(LAYOUTS):
        f = sitk.DICOMOrient(fixed, LAYOUTS[(7 * k) % 48]) if k % 6 == 0 else fixed
        res = register(f, sitk.DICOMOrient(moving, code), model, iterations=3)
        worst = max(worst, _max_distance(res.transform, ref, fixed))
    assert worst < 0.5  # mm; in practice float rounding only


def test_an_odd_sized_image_finer_than_the_grid_gives_the_same_network_input_however_stored(make_model, tiny3d):
    """A 1 mm image with odd sizes is block-averaged for the 4 mm grid (2 x 2 x 2 blocks) and one voxel per axis
    is left over: the blocks were laid from the first STORED voxel, so a RAS- or sagittal-stored file was averaged
    over other voxels than the LPS-stored one (helper audit, session 31: 0.7 mm between the transforms of a
    193 x 229 x 193 pair). Now every layout feeds the network the same input and gets the same transform."""
    from istn.data import image_to_tensor
    from istn.inputs import clear_cache, prepare_image

    head = blob_image((61, 53, 67), (1.0, 1.0, 1.0), (-18.0, -38.0, -22.0), np.eye(3), centre=(4.0, -6.0, 8.0))
    noise = np.random.default_rng(3).normal(0.0, 0.05, sitk.GetArrayViewFromImage(head).shape)
    textured = sitk.GetImageFromArray(sitk.GetArrayFromImage(head) + noise.astype(np.float32))
    textured.CopyInformation(head)  # voxel-to-voxel texture: block averages over other voxels differ

    def network_input(image):
        clear_cache()
        p = prepare_image(image, tiny3d.grid_spacing, (0.5, 99.5), True, True)
        assert max(p.shrink) == 2
        return p.centre, image_to_tensor(p.image, network_grid(p.image, tiny3d, p.centre), p.window)

    centre, ref = network_input(textured)
    for code in ("RAS", "ASL", "PIR", "LPI"):
        c, t = network_input(sitk.DICOMOrient(textured, code))
        assert np.allclose(c, centre, atol=1e-6) and torch.allclose(t, ref, atol=1e-6), code
    model = load_model(make_model(3, "affine", scale=0.3))
    moving = blob_image((59, 55, 63), (1.0, 1.0, 1.0), (-20.0, -36.0, -24.0), np.eye(3), centre=(9.0, -4.0, 6.0))
    first = register(textured, moving, model, iterations=3).transform
    for code in ("RAS", "SAL"):
        res = register(sitk.DICOMOrient(textured, code), sitk.DICOMOrient(moving, code[::-1]), model, iterations=3)
        assert _max_distance(res.transform, first, textured) < 1e-3, code


def test_an_oblique_acquisition_gives_the_same_world_transform(make_model):
    model = load_model(make_model(3, "affine", scale=0.3))
    fixed, moving = _head(), _head(centre=(8.0, -2.0, 4.0))
    ref = register(fixed, moving, model, iterations=3).transform
    res = register(fixed, _oblique_copy(moving), model, iterations=3)
    assert _max_distance(res.transform, ref, fixed) < 0.5


def test_bspline_stage_is_layout_invariant(make_model):
    model = load_model(make_model(3, "bspline", scale=0.3))
    fixed, moving = _head(), _head(centre=(8.0, -2.0, 4.0))
    initial = sitk.AffineTransform(3)
    initial.SetTranslation((3.0, -2.0, 1.0))
    ref = register(fixed, moving, model, iterations=2, initial_transform=initial).transform
    for code in ("RAS", "SAL", "IRP"):
        res = register(sitk.DICOMOrient(fixed, code), sitk.DICOMOrient(moving, code[::-1]), model, iterations=2,
                       initial_transform=initial)
        assert _max_distance(res.transform, ref, fixed) < 0.5, code


@pytest.mark.parametrize("transform", ["affine", "bspline"])
def test_an_image_registered_to_itself_stays_at_the_identity(make_model, transform):
    """The inverse-consistent start: a biased network still returns the identity for identical inputs."""
    model = load_model(make_model(3, transform, scale=0.5))
    img = _head()
    raw = register(img, img, model, iterations=0, symmetric=False).transform
    assert _max_distance(raw, sitk.Transform(3, sitk.sitkIdentity), img) > 1.0  # the network alone is biased
    res = register(img, img, model, iterations=10)
    assert _max_distance(res.transform, sitk.Transform(3, sitk.sitkIdentity), img) < 1e-3
    # and a second look at the image through the identity finds nothing left (an affine's too, since session 37)
    res = register(img, img, model, iterations=10, passes=2)
    assert res.iterations > 10 and _max_distance(res.transform, sitk.Transform(3, sitk.sitkIdentity), img) < 1e-3


def test_refinement_keeps_the_best_iterate_and_warns_when_the_loss_rose(make_model):
    model = load_model(make_model(3, "affine", scale=0.3))
    fixed, moving = _head(), _head(centre=(8.0, -2.0, 4.0))
    res = register(fixed, moving, model, iterations=15, lr=5.0)  # absurd learning rate: Adam climbs
    assert max(res.losses) > 2 * res.loss_final
    assert res.loss_final <= res.loss_one_pass + 1e-9
    assert res.loss_final == pytest.approx(min(res.losses), rel=1e-6) or res.best_iteration == len(res.losses) + 1
    assert any("raised the loss" in w for w in res.warnings)
    calm = register(fixed, moving, model, iterations=15, lr=1e-5)
    assert not any("raised the loss" in w for w in calm.warnings)


def test_loss_rise_compares_full_grid_losses_after_the_best_iterate():
    # full grid only: the best iterate is the 3rd (loss 1.0); 2.5 after it is a climb, 1.9 is not
    assert loss_rise([3.0, 2.0, 1.0, 2.5, 1.2], 3, 0, 1.0) == (1.0, 2.5, 3)
    assert loss_rise([3.0, 2.0, 1.0, 1.9, 1.2], 3, 0, 1.0) is None
    assert loss_rise([3.0, 2.0, 1.0], 4, 0, 0.9) is None  # the best is the parameters after the last step
    # coarse to fine (2 half-resolution losses first): on another scale, not compared with the full grid's...
    assert loss_rise([0.1, 0.9, 0.25, 0.2], 4, 2, 0.2) is None  # 0.9 > 2 x 0.2, at half resolution, recovered from
    # ...but among themselves when the full grid never recovered (the one pass kept): a learning rate too high
    assert loss_rise([0.1, 0.9, 0.35, 0.4], 1, 2, 0.3) == (0.1, 0.9, 1)
    assert loss_rise([0.1, 0.15, 0.35, 0.4], 1, 2, 0.3) is None  # a climb within 2 x
    # ...while a full-grid climb after the one pass (iteration 1, the best) is one
    assert loss_rise([0.1, 0.1, 0.5, 0.9], 1, 2, 0.3) == (0.3, 0.9, 1)


def test_the_rise_warning_with_coarse_to_fine(make_model):
    model = load_model(make_model(3, "affine", scale=0.3))
    fixed, moving = _head(), _head(centre=(8.0, -2.0, 4.0))
    wild = register(fixed, moving, model, iterations=15, lr=5.0, coarse_iterations=5)
    assert wild.coarse_iterations == 5
    assert any("raised the loss" in w for w in wild.warnings)
    calm = register(fixed, moving, model, iterations=15, lr=1e-5, coarse_iterations=5)
    assert not any("raised the loss" in w for w in calm.warnings)


def test_the_full_grid_gets_its_own_convergence_window_after_coarse_to_fine(make_model):
    """After the coarse iterations the tolerance compares full-grid losses only: never a coarse one (lower, on
    half-resolution maps) with a full-grid one, which read as 'converged' right after the switch."""
    model = load_model(make_model(3, "affine", scale=0.3))
    fixed, moving = _head(), _head(centre=(8.0, -2.0, 4.0))
    res = register(fixed, moving, model, iterations=30, coarse_iterations=5, tolerance=1e-12)
    assert res.coarse_iterations == 5  # fewer than a window: the coarse phase cannot converge, it ends by count
    assert res.iterations - res.coarse_iterations > CONVERGENCE_WINDOW  # a whole window on the full grid first


def test_convergence_tolerance_stops_early_and_reports_it(make_model):
    model = load_model(make_model(3, "affine", scale=0.3))
    img = _head()
    full = register(img, _head(centre=(6.0, -4.0, 6.0)), model, iterations=60, tolerance=0.0)
    assert full.iterations == 60 and not full.converged
    early = register(img, _head(centre=(6.0, -4.0, 6.0)), model, iterations=60, tolerance=0.5)
    assert early.converged and early.iterations < 60
    assert early.summary()["iterations"] == early.iterations and early.summary()["converged"] is True


def test_bending_energy_known_values():
    h = 10.0  # mm between control points
    half = torch.tensor([50.0, 40.0, 30.0])
    idx = torch.arange(7, dtype=torch.float64) * h
    x = idx.view(1, 1, 7)  # array order (Z, Y, X): X is the last axis
    a = 0.002
    u = torch.zeros(1, 3, 7, 7, 7, dtype=torch.float64)
    u[:, 0] = a * x ** 2 / half[0]  # x-component (normalised) = a x^2 mm
    assert float(bending_energy(u, h, half)) == pytest.approx(4 * a * a, rel=1e-9)
    # any affine displacement has zero bending energy
    z, y, xx = torch.meshgrid(idx, idx, idx, indexing="ij")
    lin = torch.stack([0.01 * xx - 0.02 * y + 3, 0.03 * z + 0.01 * xx, -0.02 * y + 1.0])[None]
    assert float(bending_energy(lin / half.view(1, 3, 1, 1, 1).double(), h, half)) == pytest.approx(0.0, abs=1e-20)
    # mixed derivative: u_y = b x z -> d2/dxdz = b, counted twice
    b = 0.001
    mixed = torch.zeros_like(u)
    mixed[:, 1] = b * xx * z / half[1]
    assert float(bending_energy(mixed, h, half)) == pytest.approx(2 * b * b, rel=1e-9)


def test_anchored_control_points_are_those_whose_cells_hold_no_structure():
    maps = torch.zeros(1, 2, 20, 20)
    maps[0, 1, 7, 13] = 0.5  # nearest control points: row round(7 / 5) + 1 = 2, column round(13 / 5) + 1 = 4
    maps[0, 0, 2, 2] = 0.05  # below the threshold: not a structure
    held = anchored_control_points(maps, 5.0, 0.1)
    assert held.shape == (7, 7)  # floor(19 / 5) + 4 points per axis, point k at voxel (k - 1) * 5
    free = torch.nonzero(held == 0).tolist()
    assert free == [[2, 4]] and float(held.sum()) == 48
    assert bool((anchored_control_points(torch.zeros(1, 2, 20, 20), 5.0, 0.1) == 1).all())  # no structure: all held


def test_anchor_energy_known_values():
    half = torch.tensor([50.0, 40.0], dtype=torch.float64)
    u = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    u[:, 0] = 3.0 / half[0]  # x-component 3 mm everywhere
    u[:, 1, 0, 0] = 4.0 / half[1]  # plus 4 mm of y at one point: 5 mm there
    held = torch.zeros(4, 4, dtype=torch.float64)
    held[0, :2] = 1.0  # two points held: 25 + 9 mm^2, averaged over 16 points
    assert float(anchor_energy(u, held, half)) == pytest.approx(34.0 / 16, rel=1e-12)
    assert float(anchor_energy(u, torch.zeros_like(held), half)) == 0.0


def test_bending_weight_smooths_the_bspline(make_model):
    model = load_model(make_model(3, "bspline", scale=0.4))
    fixed, moving = _head(), _head(centre=(8.0, -2.0, 4.0))
    free = register(fixed, moving, model, iterations=15, bending=0.0)
    stiff = register(fixed, moving, model, iterations=15, bending=1e6)
    ident = sitk.Transform(3, sitk.sitkIdentity)
    # a huge weight keeps the B-spline near its (inverse-consistent) start; fewer wiggles than the free one
    assert _max_distance(stiff.transform, ident, fixed) < _max_distance(free.transform, ident, fixed)
    with pytest.raises(Exception, match="bending"):
        register(fixed, moving, model, iterations=1, bending=-1.0)
    with pytest.raises(Exception, match="unbounded maps: anchoring"):  # no structures to anchor away from
        register(fixed, moving, model, iterations=1, anchor=1.0)


def test_self_check_warns_when_the_pair_is_unlike_validation(make_model):
    model = load_model(make_model(3, "affine", scale=0.3))
    fixed, moving = _head(), _head(centre=(8.0, -2.0, 4.0))
    model.meta["validation"] = {"refinement_loss": {"refined": {"min": 0.0, "median": 1e-9, "max": 1e-9}}}
    res = register(fixed, moving, model, iterations=2)
    assert any("unlike what the model was trained on" in w for w in res.warnings)
    model.meta["validation"]["refinement_loss"]["refined"]["max"] = 10.0
    assert not any("unlike" in w for w in register(fixed, moving, model, iterations=2).warnings)
    # a one pass (no refinement) is held to the validation pairs' one-pass losses, not to the refined ones
    model.meta["validation"]["refinement_loss"] = {"refined": {"max": 1e-9}, "one_pass": {"max": 10.0}}
    assert not any("unlike" in w for w in register(fixed, moving, model, iterations=0).warnings)
    model.meta["validation"]["refinement_loss"]["one_pass"]["max"] = 1e-9
    assert any("one-pass loss" in w for w in register(fixed, moving, model, iterations=0).warnings)


def test_odd_intensity_ranges_give_the_same_world_transform(make_model):
    """CT-like offsets, 16-bit scales, tiny floats: the percentile window maps them all to the same input. And 256
    grey levels far from 0 (a float32 image at 1e7: numpy's histogram refused Otsu's bins there, an internal
    error): registered, within half a 2 mm voxel (float32's steps at 1e7 are 1 grey level, to which the 4 mm
    working copy's block averages are rounded: 0.53 mm here, 0.04 mm on the 1 mm sample pair)."""
    model = load_model(make_model(3, "affine", scale=0.3))
    fixed, moving = _head(), _head(centre=(8.0, -2.0, 4.0))
    ref = register(fixed, moving, model, iterations=3).transform
    for scale, offset, within in ((4000.0, -1000.0, 0.05), (1e-3, 0.0, 0.05), (65535.0, 0.0, 0.05),
                                  (255.0, 1e7, 1.0)):
        odd = sitk.ShiftScale(moving, shift=offset / scale, scale=scale)  # (x + shift) * scale
        res = register(fixed, odd, model, iterations=3)
        assert _max_distance(res.transform, ref, fixed) < within, (scale, offset)


def test_fill_floor_finds_a_fill_value_beneath_the_image_and_nothing_else():
    from istn.data import fill_floor

    rng = np.random.default_rng(0)
    head = np.zeros((30, 40, 50), np.float32)
    head[5:25, 10:30, 10:40] = rng.normal(600.0, 60.0, (20, 20, 30)).clip(1.0)  # a head ~600 on a background of 0
    corner = np.add.reduce(np.indices(head.shape), axis=0) < 12  # an oblique reslice's corner: ~0.5 % of the box
    assert corner.any() and not (head[corner] > 0).any()
    for fill in (-1024.0, -32768.0, -1.0):  # CT's air, int16's minimum, "no data": all raised to the image's 0
        filled = head.copy()
        filled[corner] = fill
        assert fill_floor(filled) == 0.0
    zscored = (head - 300.0) / 100.0  # intensities with negative values: a fill far below them
    zscored[corner] = -32768.0
    assert fill_floor(zscored) == -3.0
    ct = head - 1000.0 + rng.normal(0.0, 5.0, head.shape).astype(np.float32)  # air ~ -1000 with noise
    ct[corner] = -3024.0  # CT's own fill outside the scanned circle: raised to the air's lowest value
    assert fill_floor(ct) == ct[~corner].min()
    stripped = head.copy()
    stripped[head > 0] += 300.0  # a skull-stripped head: its darkest voxel ~660 above a 0 background
    offset = head + 10000.0  # a 0 or positive minimum is the background, never a fill
    offset[corner] = 0.0
    for clean in (head, (head > 0).astype(np.uint8), stripped, offset, -head, np.full(head.shape, 7.0)):
        assert fill_floor(clean) is None


def test_hot_voxels_are_found_and_replaced_by_their_neighbourhood_median():
    from istn.data import despike, hot_voxel_bound

    rng = np.random.default_rng(1)
    head = np.zeros((30, 40, 50), np.float32)
    head[5:25, 10:30, 10:40] = 600.0  # a head of 600 on a background of 0: a neighbourhood's median is exact
    head[12:18, 15:25, 20:30] = 900.0
    assert hot_voxel_bound(head) is None and hot_voxel_bound(head + rng.normal(0, 30, head.shape)) is None
    from scipy import ndimage

    uniform = np.flatnonzero(ndimage.maximum_filter(head, 3) == ndimage.minimum_filter(head, 3))
    spoiled = head.copy()
    spoiled.flat[rng.choice(uniform, 40, replace=False)] = 9000.0  # 40 voxels (0.07 %) at 10x the maximum
    bound, width = hot_voxel_bound(spoiled)
    assert 900.0 < bound < 9000.0 and width == 900.0
    np.testing.assert_array_equal(despike(spoiled, bound, width), head)  # each amid one value: that value
    assert spoiled.max() == 9000.0  # a copy: the input is not changed
    cluster = head.copy()
    cluster[2:5, 2:5, 2:5] = 9000.0  # a bright 3^3 cluster is not a hot pixel: its core stays
    assert despike(cluster, *hot_voxel_bound(cluster))[3, 3, 3] == 9000.0
    r2 = ((np.indices(head.shape) - np.array([15, 20, 25])[:, None, None, None]) ** 2).sum(0)
    peak = head + 2100.0 * np.exp(-r2 / 4.5)  # a smooth bright peak (3000): above the bound, not above its
    assert (peak > hot_voxel_bound(peak)[0]).sum() > 1  # neighbours by a width: not a hot pixel
    np.testing.assert_array_equal(despike(peak, *hot_voxel_bound(peak)), peak)
    flat2d = head[15]
    flat2d_spoiled = flat2d.copy()
    flat2d_spoiled[3, 3], flat2d_spoiled[20, 20] = 9000.0, 9000.0  # 2D: a 3 x 3 neighbourhood
    np.testing.assert_array_equal(despike(flat2d_spoiled, *hot_voxel_bound(flat2d_spoiled)), flat2d)


def test_hot_voxels_do_not_move_the_result(make_model):
    """0.3 % of the voxels at 10x the image's maximum (hot pixels): without despiking they set the window's top (the
    head read dim) and each became a bright spot on the network's grid: 53 mm from the clean image's result (20 mm
    the one pass); replaced by their neighbourhood's median, 0.11 mm."""
    model = load_model(make_model(3, "affine", scale=0.3))
    fixed, moving = _head(), _head(centre=(8.0, -2.0, 4.0))
    ref = register(fixed, moving, model, iterations=3).transform
    array = sitk.GetArrayFromImage(moving)
    rng = np.random.default_rng(2)
    array.flat[rng.choice(array.size, int(0.003 * array.size), replace=False)] = 10.0 * array.max()
    spoiled = sitk.GetImageFromArray(array)
    spoiled.CopyInformation(moving)
    res = register(fixed, spoiled, model, iterations=3)
    assert _max_distance(res.transform, ref, fixed) < 0.2


def _tubes(array: np.ndarray, inside: np.ndarray, fraction: float, value: float, seed: int = 3) -> np.ndarray:
    """``array`` with straight tubes one voxel wide, along random axes through random voxels of ``inside``, set to
    ``value`` until they cover ``fraction`` of ``inside`` (contrast-filled vessels): a copy."""
    rng = np.random.default_rng(seed)
    out, tube = array.copy(), np.zeros(array.shape, bool)
    points = np.argwhere(inside)
    while (tube & inside).sum() < fraction * inside.sum():
        p, axis = points[rng.integers(len(points))], rng.integers(array.ndim)
        index = list(p)
        index[axis] = slice(None)
        tube[tuple(index)] = True
    out[tube & inside] = value
    return out


def test_thin_bright_structures_are_found_and_nothing_else():
    from istn.data import thin_bright_bound

    rng = np.random.default_rng(4)
    head = np.zeros((30, 40, 50), np.float32)
    head[5:25, 10:30, 10:40] = 600.0  # a head of 600 (900 inside) on a background of 0
    head[12:18, 15:25, 20:30] = 900.0
    noisy = head + rng.normal(0.0, 20.0, head.shape).astype(np.float32)
    for clean in (head, noisy, head[15]):
        assert thin_bright_bound(clean) is None
    for fraction in (0.01, 0.03):  # vessels at 2.5x the brightest tissue: the tissue's top
        for image in (head, noisy):
            bound = thin_bright_bound(_tubes(image, head > 0, fraction, 2250.0))
            assert bound is not None and 850.0 < bound < 960.0, (fraction, bound)
    flat = head[15]  # 2D: the same
    assert 850.0 < thin_bright_bound(_tubes(flat, flat > 0, 0.03, 2250.0)) < 960.0
    cluster = head.copy()
    cluster[2:7, 2:7, 2:7] = 3000.0  # a marker 5 voxels across keeps its median: not thin
    assert thin_bright_bound(cluster) is None
    fat = head.copy()  # a bright shell three voxels thick about the head (scalp fat): not thin
    fat[2:28, 7:33, 7:43][head[2:28, 7:33, 7:43] == 0] = 1500.0
    fat[head > 0] = head[head > 0]
    assert thin_bright_bound(fat) is None
    sparse = np.zeros_like(head)  # a few hundred voxels of a head: no tissue to saturate to
    sparse.flat[rng.choice(head.size, 300, replace=False)] = 900.0
    assert thin_bright_bound(sparse) is None


def test_thin_bright_structures_are_filled_before_the_network_sees_them(make_model):
    """Vessels: tubes a voxel wide through 5 % of the head at 1.45x its maximum (not hot pixels: below
    `hot_voxel_bound`) set the window's top and, interpolated onto the network's grid, became bright streaks among
    the structures: 3.8 mm from the clean image's result. Filled from their neighbourhood first, capped at the
    tissue's top: about the clean image's window, and 0.4 mm. The caller's image is not changed; a clean one is not
    touched."""
    from istn.inputs import prepare_image

    model = load_model(make_model(3, "affine", scale=0.3))
    fixed, moving = _head(), _head(centre=(8.0, -2.0, 4.0))
    ref = register(fixed, moving, model, iterations=3).transform
    array = sitk.GetArrayFromImage(moving)
    spoiled = sitk.GetImageFromArray(_tubes(array, array > 0.2 * array.max(), 0.05, 1.45 * float(array.max())))
    spoiled.CopyInformation(moving)
    before = sitk.GetArrayFromImage(spoiled)
    clean_in, spoiled_in = prepare_image(moving, 4.0, foreground=True), prepare_image(spoiled, 4.0, foreground=True)
    assert abs(spoiled_in.window[1] - clean_in.window[1]) < 0.1 * clean_in.window[1]  # was 1.45x
    assert float(sitk.GetArrayViewFromImage(spoiled_in.image).max()) < 1.1 * float(array.max())
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(clean_in.image), array)  # clean: the input itself
    res = register(fixed, spoiled, model, iterations=3)
    assert _max_distance(res.transform, ref, fixed) < 1.0
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(spoiled), before)


def test_detached_objects_are_the_large_ones_apart_from_the_head():
    from istn.data import detached_objects

    z, y, x = np.indices((60, 70, 100))
    head = ((z - 30) / 25.0) ** 2 + ((y - 35) / 30.0) ** 2 + ((x - 35) / 28.0) ** 2 <= 1.0  # 2 mm voxels
    shell = head & ~(((z - 30) / 21.0) ** 2 + ((y - 35) / 26.0) ** 2 + ((x - 35) / 24.0) ** 2 <= 1.0)
    brain = ((z - 30) / 18.0) ** 2 + ((y - 35) / 23.0) ** 2 + ((x - 35) / 21.0) ** 2 <= 1.0
    skull_gap = shell | brain  # scalp and brain apart by a 6 mm dark skull: still one head
    assert detached_objects(skull_gap, (2.0, 2.0, 2.0)) is None
    phantom = skull_gap.copy()
    phantom[25:35, 30:40, 80:90] = True  # a 20 mm cube 22 mm beside the head
    found = detached_objects(phantom, (2.0, 2.0, 2.0))
    assert found[25:35, 30:40, 80:90].all() and not (found & skull_gap).any()
    specks = skull_gap.copy()
    specks[5, 5, 90], specks[55, 60, 95] = True, True  # noise above the threshold: too small to matter
    assert detached_objects(specks, (2.0, 2.0, 2.0)) is None
    touching = skull_gap.copy()
    touching[25:35, 30:40, 64:74] = True  # within a block of the head: part of it
    assert detached_objects(touching, (2.0, 2.0, 2.0)) is None


def test_a_fill_value_outside_the_field_of_view_gives_the_same_world_transform(make_model):
    """-1024, int16's -32768 or -1 where a reslice found no voxels: the window's low end was the fill (the
    background read mid-grey) and Otsu's foreground the whole acquired box. Raised to the image's own 0, the
    network sees the image as it would with a 0 fill: the same transform."""
    model = load_model(make_model(3, "affine", scale=0.3))
    fixed, moving = _head(), _head(centre=(8.0, -2.0, 4.0))
    array = sitk.GetArrayFromImage(moving)
    array[array < 1e-3] = 0.0  # a background of exact 0, as a reslice's 0 fill would leave
    clean = sitk.GetImageFromArray(array)
    clean.CopyInformation(moving)
    corner = np.add.reduce(np.indices(array.shape), axis=0) < 14
    assert not (array[corner] > 0).any()
    ref = register(fixed, clean, model, iterations=3).transform
    for fill, pixel in ((-1024.0, sitk.sitkFloat32), (-32768.0, sitk.sitkInt16), (-1.0, sitk.sitkInt16)):
        source = array * 1000.0 if pixel == sitk.sitkInt16 else array
        filled = source.copy()
        filled[corner] = fill
        image = sitk.Cast(sitk.GetImageFromArray(filled), pixel)
        image.CopyInformation(moving)
        plain = sitk.Cast(sitk.GetImageFromArray(source), pixel)
        plain.CopyInformation(moving)
        expected = ref if pixel == sitk.sitkFloat32 else register(fixed, plain, model, iterations=3).transform
        res = register(fixed, image, model, iterations=3)
        assert _max_distance(res.transform, expected, fixed) < 1e-6, fill
        assert res.transform_type == "affine" and sitk.GetArrayViewFromImage(image).min() == fill  # theirs untouched


@pytest.mark.skipif(not (Path(__file__).parents[1] / "ISTNRegistration" / "Resources" / "Models" /
                         "brain-t1-bspline.pt").exists(), reason="bundled models absent")
def test_a_learning_rate_far_too_high_is_said_with_the_bundled_models(tmp_path):
    """With the bundled models every Adam iteration is at half resolution and the B-spline runs two passes: a
    learning rate of 1 left the one pass unrefined (the result 1.6 mm from the default's) without a word. Now
    the warning says so; the default learning rate, and an image registered to itself, stay quiet."""
    from istn import demo

    pair = demo.sample_pair()
    fixed, moving = pair["fixed"], pair["moving"]
    affine, bspline = (load_model(demo.bundled_model(n)) for n in (demo.AFFINE_MODEL, demo.BSPLINE_MODEL))
    wild = register(fixed, moving, affine, lr=1.0, polish=0, iterations=20, passes=1)
    assert wild.best_iteration == 1 and any("raised the loss" in w for w in wild.warnings)
    wild = register(fixed, moving, affine, lr=1.0, polish=0, iterations=20)  # the model's 2 passes: said too
    assert wild.passes == 2 and any("raised the loss" in w for w in wild.warnings)
    calm = register(fixed, moving, affine)
    assert calm.warnings == []
    wild_b = register(fixed, moving, bspline, initial_transform=calm.transform, lr=1.0, polish=0)
    assert any("raised the loss" in w for w in wild_b.warnings)
    assert register(fixed, moving, bspline, initial_transform=calm.transform).warnings == []
    itself = register(fixed, sitk.DICOMOrient(fixed, "ASL"), affine)
    assert itself.warnings == [] and register(fixed, fixed, bspline, initial_transform=itself.transform).warnings == []


@pytest.mark.skipif(not (Path(__file__).parents[1] / "ISTNRegistration" / "Resources" / "Models" /
                         "brain-t1-affine.pt").exists(), reason="bundled models absent")
def test_a_slab_against_a_whole_head_is_warned_of_once_however_it_lies():
    """A 40 mm axial slab of the sample head registered to the whole fixed head: its affine ends 3.7 mm (median)
    from the whole head's inside the slab, and no self-check said so. Now a warning names the slab, on the stage
    that estimates the linear part only (the B-spline after it is quiet about it); an 80 mm slab, the whole head
    and an oblique slab's thickness are judged alike whatever the grid's direction."""
    from istn import demo
    from istn.registration import slab_warning

    pair = demo.sample_pair()
    fixed, moving = pair["fixed"], pair["moving"]
    affine, bspline = (load_model(demo.bundled_model(n)) for n in (demo.AFFINE_MODEL, demo.BSPLINE_MODEL))
    n = moving.GetSize()[2]
    slab = moving[:, :, n // 2 - 10: n // 2 + 10]  # 20 slices of 2 mm
    first = register(fixed, slab, affine)
    said = [w for w in first.warnings if "a slab against a volume" in w]
    assert len(said) == 1 and "moving image covers 40 mm along its superior-inferior axis" in said[0]
    second = register(fixed, slab, bspline, initial_transform=first.transform)
    assert not any("a slab against a volume" in w for w in second.warnings)
    assert slab_warning(fixed, moving) is None and slab_warning(fixed, moving[:, :, n // 2 - 20: n // 2 + 20]) is None
    assert slab_warning(slab, fixed).startswith("the fixed image covers 40 mm")  # either image may be the slab
    tilted = sitk.Image(slab)  # the slab's grid turned 30 degrees about left-right: still 40 mm thick
    tilted.SetDirection(rotation(3, (30.0, 0.0, 0.0)).ravel().tolist())
    assert "covers 40 mm along its superior-inferior axis" in slab_warning(fixed, tilted)
    # a whole brain against a field of view 432 mm wide (a neck and shoulders in it, or a padded box): by the ratio
    # alone the fixed brain (154 mm) was a slab, and the pose audit's neck case said so; not thinner than the
    # structures that set the scale
    wide = sitk.ConstantPad(moving, [70, 0, 0], [70, 0, 0], 0.0)
    assert "the fixed image covers 154 mm along its left-right axis" in slab_warning(fixed, wide)
    assert slab_warning(fixed, wide, thin_mm=0.6 * 192) is None
    assert not any("a slab against a volume" in w for w in register(fixed, wide, affine, iterations=0).warnings)


@pytest.mark.skipif(not (Path(__file__).parents[1] / "ISTNRegistration" / "Resources" / "Models" /
                         "brain-t1-affine.pt").exists(), reason="bundled models absent")
@pytest.mark.parametrize("factor", [0.1, 10.0])
def test_a_head_whose_spacing_is_not_in_mm_is_said(factor):
    """A header in cm (a 150 mm head spans 15) or in tenths of a mm: the pose audit's cases were warned of only as
    unlike the training pairs (and a slab). The warning names the spacing; the same head in mm has none."""
    from istn import demo

    pair = demo.sample_pair()
    fixed, moving = pair["fixed"], pair["moving"]
    affine = load_model(demo.bundled_model(demo.AFFINE_MODEL))
    odd = sitk.Image(moving)
    odd.SetSpacing([s * factor for s in moving.GetSpacing()])
    said = [w for w in register(fixed, odd, affine, iterations=0).warnings if "is its voxel spacing" in w]
    assert len(said) == 1 and said[0].startswith("the moving image spans")
    refined = register(fixed, odd, affine)  # no further looks for it, nor their warning: the header is the news
    assert refined.passes == affine.meta["refinement"]["passes"]
    assert not any("still moved the head" in w for w in refined.warnings)
    assert f"({0.2 if factor < 1 else 20:g}, " in said[0]
    assert not any("a slab against a volume" in w for w in register(fixed, odd, affine, iterations=0).warnings)
    assert not any("is its voxel spacing" in w for w in register(fixed, moving, affine, iterations=0).warnings)
    # no second try: another model cannot register a header in the wrong units (it ran, and failed as well)
    from istn.chain import register_with_second_try

    kept, retry = register_with_second_try(fixed, odd, [affine], iterations=2, threads=1)
    assert retry is None and kept[-1].spacing_suspect and kept[-1].self_checks_failed


@pytest.mark.skipif(not (Path(__file__).parents[1] / "ISTNRegistration" / "Resources" / "Models" /
                         "brain-t1-affine.pt").exists(), reason="bundled models absent")
def test_a_label_map_given_as_the_moving_image_is_said_once():
    """moving_labels.nii.gz given for moving_t1.nii.gz (names alike) registered with loss self-check warnings only
    ("looks unlike what the model was trained on: check orientation, contrast and field of view"). Now the first
    stage says the image holds a handful of whole-number values, a label map or a mask; the images themselves,
    the same labels as float, a 1000-level T1 and a CT-like offset range stay quiet."""
    from istn import demo
    from istn.registration import label_map_warning

    pair = demo.sample_pair()
    fixed, moving, labels = pair["fixed"], pair["moving"], pair["moving_labels"]
    affine, bspline = (load_model(demo.bundled_model(n)) for n in (demo.AFFINE_MODEL, demo.BSPLINE_MODEL))
    first = register(fixed, labels, affine, iterations=2, polish=0)
    said = [w for w in first.warnings if "whole-number values" in w]
    assert len(said) == 1 and said[0].startswith("the moving image holds only 9 whole-number values (0 to 8): a "
                                                 "label map (8 labels?)")
    second = register(fixed, labels, bspline, initial_transform=first.transform, iterations=2, polish=0)
    assert not any("whole-number values" in w for w in second.warnings)
    # at 1 mm, stored RAS: judged on the input, not on the working copy averaged from it (which holds many values:
    # the warning was missed there)
    fine = sitk.Resample(labels, [2 * n for n in labels.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                         labels.GetOrigin(), [1.0] * 3, labels.GetDirection(), 0, labels.GetPixelID())
    fine_ras = register(fixed, sitk.DICOMOrient(fine, "RAS"), affine, iterations=2, polish=0)
    assert [w for w in fine_ras.warnings if "whole-number values" in w] == said
    assert "the fixed image holds only 2 whole-number values (0 to 1): a mask" in label_map_warning(
        sitk.Cast(labels > 0, sitk.sitkFloat32), moving)
    assert label_map_warning(fixed, moving) is None and label_map_warning(fixed, fixed) is None
    quantised = sitk.Cast(sitk.RescaleIntensity(moving, 0, 999), sitk.sitkInt16)
    assert label_map_warning(sitk.ShiftScale(quantised, shift=-1024), fixed) is None


def _restored_2d(image: sitk.Image, swap: bool, flips: tuple[bool, bool]) -> sitk.Image:
    """The same 2D pixels stored with the axes swapped and/or flipped (world content unchanged; ITK has no
    DICOMOrient for 2D)."""
    array = sitk.GetArrayFromImage(image)  # (y, x)
    d = np.reshape(image.GetDirection(), (2, 2))
    size, spacing = np.array(image.GetSize()), np.array(image.GetSpacing())
    order = [1, 0] if swap else [0, 1]  # new axis j is stored axis order[j]
    if swap:
        array = array.T
    first = np.zeros(2)
    for j, flip in enumerate(flips):
        if flip:
            array = np.flip(array, axis=1 - j)
            first[order[j]] = size[order[j]] - 1
    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    out.SetSpacing(tuple(float(s) for s in spacing[order]))
    out.SetDirection(tuple((d[:, order] * np.where(flips, -1.0, 1.0)).ravel()))
    out.SetOrigin(image.TransformContinuousIndexToPhysicalPoint(first.tolist()))
    return out


@pytest.mark.parametrize("swap, flips", [(False, (True, True)), (False, (True, False)), (True, (False, False)),
                                         (True, (False, True))])
def test_a_2d_image_stored_flipped_or_transposed_gives_the_same_transform(make_model, swap, flips):
    """2D images had none of the 3D layouts' handling: a 127 x 125 image is block-averaged for the grid from its
    first STORED pixel (a 2D NIfTI flipped in its header moved the result by 2.3 mm, helper audit, session 37), and
    its display, field lattices and ties were as stored. Now it is re-stored along x, y first (istn.geometry.
    stored_lps), which is exact."""
    from istn.geometry import Grid, lps_grid, stored_lps

    fixed = blob_image((127, 125), (0.5, 0.5), (-31.0, -30.0), np.eye(2), centre=(1.0, -2.0))
    noise = np.random.default_rng(5).normal(0.0, 0.05, sitk.GetArrayViewFromImage(fixed).shape)
    textured = sitk.GetImageFromArray(sitk.GetArrayFromImage(fixed) + noise.astype(np.float32))
    textured.CopyInformation(fixed)
    moving = blob_image((121, 129), (0.5, 0.5), (-30.0, -33.0), np.eye(2), centre=(4.0, 1.0))
    stored = _restored_2d(textured, swap, flips)
    assert stored.GetDirection() != textured.GetDirection()
    for a, b in ((0, 0), (126, 3), (40, 124)):  # the same pixel at the same world point
        p = textured.TransformIndexToPhysicalPoint((a, b))
        assert stored[stored.TransformPhysicalPointToIndex(p)] == textured[a, b]
    back = stored_lps(stored)
    assert Grid.from_image(back) == lps_grid(Grid.from_image(stored)) == Grid.from_image(textured)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(textured))
    model = load_model(make_model(2, "affine", scale=0.3))
    first = register(textured, moving, model, iterations=3).transform
    as_fixed = register(stored, moving, model, iterations=3).transform
    as_moving = register(moving, stored, model, iterations=3).transform
    reference = register(moving, textured, model, iterations=3).transform
    assert _max_distance(as_fixed, first, textured) < 1e-4
    assert _max_distance(as_moving, reference, moving) < 1e-4
