"""Test-time refinement: known answers, callback, cancel, weights restored, exported models."""

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import blob_image
from istn.export import load_model
from istn.networks import ISTN
from istn.registration import register
from istn.transforms import sitk_affine_to_matrix


def _shifted_pair(shift_mm=(5.0, -3.0)):
    eye = np.eye(2)
    fixed = blob_image((48, 48), (1.0, 1.0), (-23.5, -23.5), eye, extra=False)
    moving = blob_image((48, 48), (1.0, 1.0), (-23.5, -23.5), eye, centre=shift_mm, extra=False)
    return fixed, moving


def test_refinement_recovers_a_known_translation(make_model):
    """STN-u on raw images: refining an untrained (identity) STN finds the blob's shift."""
    fixed, moving = _shifted_pair((5.0, -3.0))
    model = load_model(make_model(2, "affine", "stn-u", perturb=False, grid_size=(48, 48), grid_spacing=1.0))
    res = register(fixed, moving, model, iterations=150, lr=3e-3)
    m = sitk_affine_to_matrix(res.transform)
    # fixed point x maps to moving point x + shift
    assert np.allclose(m[:2, 2], (5.0, -3.0), atol=0.5), m
    assert np.allclose(m[:2, :2], np.eye(2), atol=0.05)
    assert res.loss_final < 0.2 * res.loss_one_pass
    assert np.allclose(sitk_affine_to_matrix(res.one_pass_transform), np.eye(3), atol=1e-6)  # untrained = identity


def test_weights_restored_so_a_second_run_is_identical(make_model, pair2d):
    fixed, moving = pair2d
    model = load_model(make_model(2, "affine"))
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    r1 = register(fixed, moving, model, iterations=5, lr=1e-2)
    r2 = register(fixed, moving, model, iterations=5, lr=1e-2)
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert np.allclose(sitk_affine_to_matrix(r1.transform), sitk_affine_to_matrix(r2.transform))
    assert not np.allclose(sitk_affine_to_matrix(r1.transform), sitk_affine_to_matrix(r1.one_pass_transform))


def test_callback_every_iteration_with_current_transform(make_model, pair2d):
    fixed, moving = pair2d
    model = load_model(make_model(2, "bspline"))
    seen = []
    res = register(fixed, moving, model, iterations=4, lr=1e-2,
                   callback=lambda info: seen.append((info.iteration, info.loss, info.transform())))
    assert [s[0] for s in seen] == [1, 2, 3, 4]
    assert [s[1] for s in seen] == pytest.approx(res.losses)
    assert all(isinstance(s[2], sitk.CompositeTransform) for s in seen)


def _cancelled_at(iteration: int, kind: str, fixed, moving, model, **kw):
    """register(**kw) with a cancel (an Event, a multiprocessing one, or its is_set) set by the callback at
    ``iteration``."""
    import multiprocessing

    event = multiprocessing.Event() if kind == "process event" else threading.Event()

    def on_iteration(info):
        if info.iteration == iteration:
            event.set()

    return register(fixed, moving, model, callback=on_iteration, cancel=event.is_set if kind == "callable" else event,
                    **kw)


@pytest.mark.parametrize("kind", ["event", "callable", "process event"])
def test_cancel_stops_within_one_iteration_and_leaves_a_valid_result(make_model, pair2d, kind):
    fixed, moving = pair2d
    model = load_model(make_model(2, "affine"))
    res = _cancelled_at(3, kind, fixed, moving, model, iterations=100)
    assert res.cancelled and res.iterations == 3
    m = sitk_affine_to_matrix(res.transform)
    assert np.all(np.isfinite(m)) and abs(np.linalg.det(m)) > 0.1
    # weights restored after a cancel too
    fresh = register(fixed, moving, model, iterations=0)
    assert np.allclose(sitk_affine_to_matrix(fresh.one_pass_transform), sitk_affine_to_matrix(res.one_pass_transform))


def test_refinement_lowers_the_loss_on_a_loaded_3d_bspline_model(make_model, oblique_pair):
    fixed, moving = oblique_pair
    model = load_model(make_model(3, "bspline", scale=0.2))
    res = register(fixed, moving, model, iterations=10, lr=1e-2)
    assert res.loss_final < res.loss_one_pass
    assert len(res.losses) == 10 and res.device == "cpu"


@pytest.mark.parametrize("transform", ["affine", "bspline"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_the_stn_split_in_two_predicts_what_the_whole_stn_predicts(make_model, ndim, transform):
    """stn_pooled then predict_from_pooled == predict, in the scripted file (what FC-only refinement relies on)."""
    model = load_model(make_model(ndim, transform))
    torch.manual_seed(1)
    shape = [1, 1] + list(reversed(model.config.grid_size))
    s, t = model.module.representation(torch.rand(shape)), model.module.representation(torch.rand(shape))
    with torch.no_grad():
        whole = model.module.predict(s, t)
        split = model.module.predict_from_pooled(model.module.stn_pooled(s, t))
    assert whole.abs().max() > 1e-4  # a perturbed model: not the trivial identity
    assert torch.allclose(whole, split, atol=1e-6)


def test_fc_refinement_recovers_the_known_translation_and_never_moves_the_convolutions(make_model):
    """layers="fc": the same shift as the whole STN finds, with every convolution weight as trained throughout."""
    fixed, moving = _shifted_pair((5.0, -3.0))
    model = load_model(make_model(2, "affine", "stn-u", perturb=False, grid_size=(48, 48), grid_spacing=1.0))
    convs = {n: p.detach().clone() for n, p in model.module.stn.named_parameters() if n.startswith("features.convs.")}
    fcs = {n: p.detach().clone() for n, p in model.module.stn.named_parameters() if n not in convs}
    moved = []

    def watch(info):
        params = dict(model.module.stn.named_parameters())
        assert all(torch.equal(params[n], v) for n, v in convs.items())
        moved.append(any(not torch.equal(params[n], v) for n, v in fcs.items()))

    res = register(fixed, moving, model, iterations=150, lr=3e-3, refine_layers="fc", callback=watch)
    m = sitk_affine_to_matrix(res.transform)
    assert np.allclose(m[:2, 2], (5.0, -3.0), atol=0.5), m
    assert np.allclose(m[:2, :2], np.eye(2), atol=0.05)
    assert all(moved) and res.refine_layers == "fc" and res.summary()["refine_layers"] == "fc"
    after = dict(model.module.stn.named_parameters())  # restored: the next pair starts from the trained weights
    assert all(torch.equal(after[n], v) for n, v in {**convs, **fcs}.items())


def test_fc_refinement_lowers_the_loss_of_a_3d_bspline_model(make_model, oblique_pair):
    fixed, moving = oblique_pair
    model = load_model(make_model(3, "bspline"))
    res = register(fixed, moving, model, iterations=15, lr=1e-2, refine_layers="fc")
    assert res.loss_final < res.loss_one_pass and res.iterations == 15


class _OldISTN(ISTN):
    """The network of istn < 0.3: no split STN methods in the scripted file."""

    def stn_pooled(self, source_map, target_map):  # not exported: absent from the TorchScript
        raise AssertionError("not scripted")

    def predict_from_pooled(self, z):
        raise AssertionError("not scripted")


def test_an_older_model_file_refuses_fc_refinement_clearly_and_rescripts_to_the_same_results(tmp_path, pair2d):
    from istn.config import TrainConfig
    from istn.errors import InputError
    from istn.export import build_metadata, export_model, rescript_model
    from conftest import tiny_config

    cfg = tiny_config(2, "affine", "istn-i")
    old = tmp_path / "old.pt"
    net = _OldISTN(cfg).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    export_model(net, build_metadata(TrainConfig(model=cfg)), old)
    model = load_model(old)
    assert not hasattr(model.module, "predict_from_pooled")
    fixed, moving = pair2d
    with pytest.raises(InputError, match="predates FC-only refinement"):
        register(fixed, moving, model, iterations=3, refine_layers="fc")
    before = register(fixed, moving, model, iterations=3, lr=1e-2)  # "all" (the default) still works
    new = rescript_model(old, tmp_path / "new.pt")
    with pytest.raises(ValueError, match="must differ"):
        rescript_model(new, new)
    again = load_model(new)
    assert again.meta["rescripted_by"] and {k: v for k, v in again.meta.items() if k != "rescripted_by"} == model.meta
    after = register(fixed, moving, again, iterations=3, lr=1e-2)
    assert np.allclose(sitk_affine_to_matrix(before.transform), sitk_affine_to_matrix(after.transform), atol=1e-6)
    assert register(fixed, moving, again, iterations=3, lr=1e-2, refine_layers="fc").iterations == 3


def test_refine_layers_default_is_the_models_metadata(make_model, pair2d):
    from istn.export import rewrite_metadata

    path = make_model(2, "affine")
    fixed, moving = pair2d
    assert register(fixed, moving, load_model(path), iterations=2).refine_layers == "all"  # no metadata: the paper
    meta = load_model(path).meta
    rewrite_metadata(path, {**meta, "refinement": {"layers": "fc"}})
    assert register(fixed, moving, load_model(path), iterations=2).refine_layers == "fc"
    assert register(fixed, moving, load_model(path), iterations=2, refine_layers="all").refine_layers == "all"
    from istn.errors import InputError
    with pytest.raises(InputError, match="refined layers"):
        register(fixed, moving, load_model(path), iterations=2, refine_layers="convs")


def test_structure_box_is_the_bounding_box_of_the_structures_grown_and_clipped():
    from istn.refinement import MAP_DISPLAY_THRESHOLD, crop, structure_box

    maps = torch.full((1, 2, 10, 12, 14), 0.02)  # a bounded map's floor everywhere
    maps[0, 0, 3:5, 4:6, 6:9] = 0.9
    maps[0, 1, 4, 7, 12] = MAP_DISPLAY_THRESHOLD  # a second structure reaching the threshold widens the box
    assert structure_box(maps, 0) == (slice(3, 5), slice(4, 8), slice(6, 13))
    assert structure_box(maps, 2) == (slice(1, 7), slice(2, 10), slice(4, 14))  # clipped at the grid's end
    assert structure_box(torch.full((1, 2, 4, 4, 4), 0.02), 3) is None  # no structure: the whole grid
    box = structure_box(maps, 1)
    assert crop(maps, box).shape == (1, 2, 4, 6, 9)
    assert crop(torch.zeros(1, 10, 12, 14, 3), box, grid=True).shape == (1, 4, 6, 9, 3)
    assert crop(maps, None) is maps


def test_a_region_margin_covering_the_grid_gives_the_whole_grid_result(make_model, oblique_pair):
    """Margin >= the grid: the box is the whole grid, the same refinement; a small margin still refines."""
    fixed, moving = oblique_pair
    model = load_model(make_model(3, "affine", itn_output="sigmoid"))
    whole = register(fixed, moving, model, iterations=6, lr=1e-2, region_margin_mm=float("inf"))
    big = register(fixed, moving, model, iterations=6, lr=1e-2, region_margin_mm=1000.0)
    assert whole.region_margin_mm is None and big.region_margin_mm == 1000.0
    assert whole.losses == pytest.approx(big.losses, rel=1e-6)
    assert np.allclose(sitk_affine_to_matrix(whole.transform), sitk_affine_to_matrix(big.transform), atol=1e-6)
    near = register(fixed, moving, model, iterations=6, lr=1e-2, region_margin_mm=0.0)
    assert near.summary()["region_margin_mm"] == 0.0 and near.loss_final <= near.loss_one_pass


def test_a_region_needs_bounded_maps_and_a_sane_margin(make_model, pair2d):
    from istn.errors import InputError

    fixed, moving = pair2d
    linear = load_model(make_model(2, "affine"))  # unbounded (linear) ITN maps: no "structure" threshold
    with pytest.raises(InputError, match="unbounded maps"):
        register(fixed, moving, linear, iterations=2, region_margin_mm=20.0)
    assert register(fixed, moving, linear, iterations=2, region_margin_mm=float("inf")).region_margin_mm is None
    bounded = load_model(make_model(2, "affine", itn_output="sigmoid"))
    for bad in (-1.0, float("nan"), "20", True):
        with pytest.raises(InputError, match="margin"):
            register(fixed, moving, bounded, iterations=2, region_margin_mm=bad)


def test_the_models_region_margin_is_the_default(make_model, pair2d):
    from istn.export import rewrite_metadata

    path = make_model(2, "affine", itn_output="sigmoid")
    fixed, moving = pair2d
    assert register(fixed, moving, load_model(path), iterations=2).region_margin_mm is None  # no metadata
    rewrite_metadata(path, {**load_model(path).meta, "refinement": {"region_margin_mm": 8.0}})
    assert register(fixed, moving, load_model(path), iterations=2).region_margin_mm == 8.0
    assert register(fixed, moving, load_model(path), iterations=2,
                    region_margin_mm=float("inf")).region_margin_mm is None


def test_the_half_resolution_region_grid_is_the_cropped_average_of_the_full_grid():
    """Cropping the full grid to the half box's blocks before averaging == averaging, then cropping."""
    from istn.refinement import crop, half_resolution, structure_box

    torch.manual_seed(0)
    maps = torch.full((1, 2, 16, 12, 10), 0.02)
    maps[0, 1, 5:9, 3:6, 4:7] = 0.8
    grid = torch.rand(1, 16, 12, 10, 3) * 2 - 1
    _, target_half, grid_half = half_resolution(maps, maps)
    box = structure_box(target_half, 1)
    assert box is not None and any(b.stop - b.start < n for b, n in zip(box, target_half.shape[2:]))
    blocks = tuple(slice(2 * b.start, 2 * b.stop) for b in box)
    assert torch.allclose(grid_half(crop(grid, blocks, grid=True)), crop(grid_half(grid), box, grid=True), atol=1e-6)


@pytest.mark.parametrize("bad", [dict(coarse_iterations=-1), dict(region_margin=-1), dict(layers="convs")])
def test_refine_refuses_bad_arguments_before_touching_the_weights_flags(make_model, bad):
    """A refused call leaves every weight's requires_grad as it was (the next registration starts clean)."""
    from istn.refinement import refine

    model = load_model(make_model(2, "affine"))
    flags = [p.requires_grad for p in model.module.parameters()]
    shape = [1, 1] + list(reversed(model.config.grid_size))
    maps = model.module.representation(torch.rand(shape)).detach()
    with pytest.raises(ValueError):
        refine(model.module, maps, maps, 3, **bad)
    assert [p.requires_grad for p in model.module.parameters()] == flags


def test_the_lbfgs_polish_finds_the_minimum_of_a_known_quadratic():
    """istn.refinement._lbfgs_polish (our L-BFGS): a 12-parameter least squares with a known minimiser."""
    from istn.refinement import _lbfgs_polish

    torch.manual_seed(0)
    a = torch.randn(40, 12) * torch.logspace(0, 0.5, 12)  # column scales 1..3
    truth = 0.08 * torch.tanh(torch.randn(1, 12))  # within the trust region (0.1) of the start, 0
    b = truth @ a.T

    def objective(x):
        loss = ((x @ a.T - b) ** 2).mean()
        return loss, loss

    start = torch.zeros(1, 12)
    best0 = (float(objective(start)[0]), float(objective(start)[1]), start, 1)
    losses, seen = [], []
    best, cancelled, used = _lbfgs_polish(objective, best0, 60, losses, lambda info: seen.append(info.loss), None,
                                          None, 99)
    assert not cancelled and used <= 60 and len(losses) == len(seen) == used
    assert torch.allclose(best[2], truth, atol=1e-4), (best[2] - truth).abs().max()
    assert all(b <= a for a, b in zip(losses, losses[1:]))  # the current iterate's objective never rises
    assert best[0] == pytest.approx(losses[-1]) and best[0] < 1e-6 * best0[0]


def test_the_gauss_newton_polish_solves_a_known_least_squares_in_a_few_iterations():
    """istn.refinement._gauss_newton_polish: residuals linear in 12 parameters -> the minimiser, ~exactly."""
    from istn.refinement import _gauss_newton_polish

    torch.manual_seed(0)
    a = torch.randn(200, 12, dtype=torch.float64) * torch.logspace(0, 2, 12, dtype=torch.float64)  # ill-conditioned
    truth = 0.08 * torch.tanh(torch.randn(1, 3, 4, dtype=torch.float64))
    b = truth.flatten() @ a.T + 0.01 * torch.randn(200, dtype=torch.float64)  # a residual left at the minimum
    best_x = torch.linalg.lstsq(a, b).solution.reshape(1, 3, 4)

    def residuals(x):
        return x.flatten(1) @ a.T - b

    start = torch.zeros(1, 3, 4, dtype=torch.float64)
    v0 = float((residuals(start) ** 2).mean())
    losses = []
    best, cancelled, run = _gauss_newton_polish(residuals, (v0, v0, start, 1), 10, losses, None, None, None, 99,
                                                step=1e-6)
    assert not cancelled and 1 <= run <= 5 and len(losses) == run
    assert torch.allclose(best[2], best_x, atol=1e-6)


def _well_posed_pair(shift_mm=(2.0, -1.5)):
    """Two blobs (so rotation and shear are pinned), well inside a 64 mm field of view (so the border does not
    pull): the minimum is the known translation."""
    eye = np.eye(2)
    fixed = blob_image((64, 64), (1.0, 1.0), (-31.5, -31.5), eye, extra=True)
    moving = blob_image((64, 64), (1.0, 1.0), (-31.5, -31.5), eye, centre=shift_mm, extra=True)
    return fixed, moving


def test_the_polish_alone_recovers_a_known_translation(make_model):
    """No Adam step at all, Gauss-Newton on the affine's parameters: the blobs' shift."""
    fixed, moving = _well_posed_pair((2.0, -1.5))  # within the trust region (0.1 x the 31.5 mm half-width)
    model = load_model(make_model(2, "affine", "stn-u", perturb=False, grid_size=(64, 64), grid_spacing=1.0))
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    res = register(fixed, moving, model, iterations=0, polish=10, tolerance=0.0)
    m = sitk_affine_to_matrix(res.transform)
    assert np.allclose(m[:2, 2], (2.0, -1.5), atol=0.1), m
    assert np.allclose(m[:2, :2], np.eye(2), atol=0.01)
    assert 0 < res.polish_iterations <= 10 and res.iterations == res.polish_iterations
    assert res.summary()["polish_iterations"] == res.polish_iterations
    assert all(b <= a for a, b in zip(res.losses, res.losses[1:])) and res.loss_final < 0.05 * res.loss_one_pass
    assert all(torch.equal(v, before[k]) for k, v in model.module.state_dict().items())  # weights untouched


def test_the_polish_stays_in_its_trust_region(make_model):
    """An 8 mm shift is beyond the polish's reach from the identity: it moves towards it, no further than its radius."""
    from istn.refinement import POLISH_RADIUS

    fixed, moving = _shifted_pair((8.0, 0.0))
    model = load_model(make_model(2, "affine", "stn-u", perturb=False, grid_size=(48, 48), grid_spacing=1.0))
    res = register(fixed, moving, model, iterations=0, polish=20, tolerance=0.0)
    shift = sitk_affine_to_matrix(res.transform)[0, 2]
    half_width = 23.5  # mm: the grid's centre to its outer voxel centres
    assert 0.5 * POLISH_RADIUS * half_width < shift <= POLISH_RADIUS * half_width + 1e-3, shift


def test_the_polish_makes_the_result_independent_of_where_adam_stopped(make_model):
    """Two Adam budgets stop at different points; the same polish after each lands at the same, known, transform."""
    fixed, moving = _well_posed_pair((2.0, -1.5))
    model = load_model(make_model(2, "affine", "stn-u", perturb=False, grid_size=(64, 64), grid_spacing=1.0))
    kw = dict(lr=2e-3, tolerance=0.0)
    a4, a12 = (sitk_affine_to_matrix(register(fixed, moving, model, iterations=n, **kw).transform) for n in (4, 12))
    p4, p12 = (sitk_affine_to_matrix(register(fixed, moving, model, iterations=n, polish=8, **kw).transform)
               for n in (4, 12))
    apart, polished = np.abs(a4 - a12).max(), np.abs(p4 - p12).max()
    assert apart > 0.5 and polished < 0.01 * apart, (polished, apart)
    assert np.allclose(p4[:2, 2], (2.0, -1.5), atol=0.1) and np.allclose(p12[:2, 2], (2.0, -1.5), atol=0.1)
    again = register(fixed, moving, model, iterations=12, polish=8, **kw)  # and the polish is deterministic
    assert np.array_equal(sitk_affine_to_matrix(again.transform), p12)


def test_the_lbfgs_polish_of_a_bspline_lowers_the_loss_further(make_model, pair2d):
    fixed, moving = pair2d
    model = load_model(make_model(2, "bspline"))
    adam = register(fixed, moving, model, iterations=5, lr=1e-2, tolerance=0.0)
    polished = register(fixed, moving, model, iterations=5, lr=1e-2, tolerance=0.0, polish=10)
    assert polished.losses[:5] == pytest.approx(adam.losses)  # the same Adam phase first
    assert polished.iterations == 5 + polished.polish_iterations and 0 < polished.polish_iterations <= 10
    assert polished.loss_final < adam.loss_final


def test_a_cancel_during_the_polish_stops_within_one_iteration(make_model, pair2d):
    fixed, moving = pair2d
    model = load_model(make_model(2, "affine"))
    event = threading.Event()

    def on_iteration(info):
        assert info.iterations == 15  # Adam's 5 + the polish's 10
        if info.iteration == 7:  # the polish's 2nd iteration
            event.set()

    res = register(fixed, moving, model, iterations=5, polish=10, tolerance=0.0, callback=on_iteration, cancel=event)
    assert res.cancelled and res.iterations == 7 and res.polish_iterations == 2
    m = sitk_affine_to_matrix(res.transform)
    assert np.all(np.isfinite(m)) and abs(np.linalg.det(m)) > 0.1


def test_the_models_polish_is_the_default_and_bad_values_are_refused(make_model, pair2d):
    from istn.errors import InputError
    from istn.export import rewrite_metadata

    path = make_model(2, "affine")
    fixed, moving = pair2d
    assert register(fixed, moving, load_model(path), iterations=4).polish_iterations == 0  # no metadata: Adam only
    rewrite_metadata(path, {**load_model(path).meta, "refinement": {"polish": 3}})
    res = register(fixed, moving, load_model(path), iterations=4, tolerance=0.0)
    assert 0 < res.polish_iterations <= 3 and res.iterations == 4 + res.polish_iterations
    assert register(fixed, moving, load_model(path), iterations=4, polish=0).polish_iterations == 0
    one_pass = register(fixed, moving, load_model(path), iterations=0)  # a one pass stays one: no polish
    assert one_pass.iterations == one_pass.polish_iterations == 0 and one_pass.loss_final == one_pass.loss_one_pass
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(InputError, match="polish"):
            register(fixed, moving, load_model(path), iterations=4, polish=bad)


def test_the_models_iteration_count_is_the_default(make_model, pair2d):
    """register(iterations=None): the model's refinement.iterations, else 50 (the paper's)."""
    from istn.export import rewrite_metadata

    path = make_model(2, "affine")
    fixed, moving = pair2d
    plain = register(fixed, moving, load_model(path), tolerance=0.0)
    assert plain.iterations == plain.iterations_allowed == 50
    rewrite_metadata(path, {**load_model(path).meta, "refinement": {"iterations": 7, "polish": 2}})
    res = register(fixed, moving, load_model(path), tolerance=0.0)
    assert res.iterations_allowed == 9 and res.iterations == 7 + res.polish_iterations
    assert register(fixed, moving, load_model(path), iterations=3, polish=0, tolerance=0.0).iterations == 3


def test_a_gpu_out_of_memory_falls_back_to_the_cpu_with_a_warning(make_model, pair2d, monkeypatch):
    """Simulated (no GPU here): the first attempt on "cuda" runs out of memory; the same registration then runs on
    the CPU and says so. A real GPU run of this path needs the device machine (issue #12 item 7)."""
    import istn.registration as reg

    fixed, moving = pair2d
    model = load_model(make_model(2, "affine"))
    expected = register(fixed, moving, model, iterations=3, polish=2, tolerance=0.0)
    real, tried = reg._register, []

    def flaky(fixed_in, moving_in, model_, iterations, lr, dev, *args, **kwargs):
        tried.append(dev.type)
        if dev.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(fixed_in, moving_in, model_, iterations, lr, dev, *args, **kwargs)

    monkeypatch.setattr(reg, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(reg, "_register", flaky)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    res = register(fixed, moving, model, iterations=3, polish=2, tolerance=0.0)
    assert tried == ["cuda", "cpu"] and res.device == "cpu"
    assert any("GPU out of memory" in w for w in res.warnings)
    assert np.allclose(sitk_affine_to_matrix(res.transform), sitk_affine_to_matrix(expected.transform))


@pytest.mark.parametrize("layers,margin", [("all", None), ("fc", 2)])
def test_channel_weights_weigh_the_compared_maps_not_what_the_stn_sees(layers, margin):
    """Weights of 1 change nothing; 4 on every channel scales the objective by 4 and (Adam being scale-free)
    takes the same steps; a 0 drops that channel from the objective, not from the STN's input."""
    import torch.nn.functional as F

    from conftest import perturbed_model, tiny_config
    from istn.refinement import refine

    model = perturbed_model(tiny_config(2, "affine", "istn-e", soi_channels=2, itn_output="sigmoid"), seed=5, scale=0.1)
    torch.manual_seed(1)
    s_map, t_map = torch.rand(1, 2, 32, 32), torch.rand(1, 2, 32, 32)
    kw = dict(iterations=4, lr=1e-3, layers=layers, region_margin=margin, coarse_iterations=2)
    plain = refine(model, s_map, t_map, **kw)
    ones = refine(model, s_map, t_map, channel_weights=[1.0, 1.0], **kw)
    assert ones.losses == plain.losses and torch.equal(ones.params, plain.params)
    four = refine(model, s_map, t_map, channel_weights=[4.0, 4.0], **kw)
    assert np.allclose(four.losses, 4 * np.asarray(plain.losses), rtol=1e-4)
    assert torch.allclose(four.params, plain.params, atol=1e-5)
    only0 = refine(model, s_map, t_map, iterations=0, channel_weights=[1.0, 0.0])
    with torch.no_grad():
        params = model.predict(s_map, t_map)  # the STN saw both channels
        warped = model.warp(s_map, model.sampling_grid(params))
    assert only0.start_loss == pytest.approx(0.5 * float(F.mse_loss(warped[:, :1], t_map[:, :1])), rel=1e-5)
    with pytest.raises(ValueError, match="channel_weights"):
        refine(model, s_map, t_map, iterations=1, channel_weights=[1.0])
    with pytest.raises(ValueError, match="channel_weights"):
        refine(model, s_map, t_map, iterations=1, channel_weights=[1.0, -1.0])


def test_a_second_bspline_pass_goes_on_from_the_first_and_counts_on(make_model):
    """passes=2 on raw images (STN-u): the second look starts where the first pass ended and lowers the loss there;
    the iterations, the callback and the summary count both passes."""
    fixed, moving = _shifted_pair((4.0, -3.0))
    model = load_model(make_model(2, "bspline", "stn-u", perturb=False, grid_size=(48, 48), grid_spacing=1.0))
    one = register(fixed, moving, model, iterations=8, lr=3e-3, tolerance=0.0)
    seen = []
    two = register(fixed, moving, model, iterations=8, lr=3e-3, tolerance=0.0, passes=2,
                   callback=lambda info: seen.append((info.iteration, info.iterations, info.pass_number, info.label())))
    assert two.losses[:8] == pytest.approx(one.losses)  # the same first pass
    assert [s[:2] for s in seen] == [(i, 16) for i in range(1, 17)] and two.iterations == two.iterations_allowed == 16
    assert [s[2] for s in seen] == [1] * 8 + [2] * 8  # which look each loss is on
    assert seen[8][3] == "9/16 (pass 2/2)"
    one_seen = []
    register(fixed, moving, model, iterations=2, lr=3e-3, tolerance=0.0, callback=one_seen.append)
    assert [i.label() for i in one_seen] == ["1/2", "2/2"]  # one pass: no pass in the label
    assert two.passes == 2 and two.summary()["passes"] == 2
    assert two.pass_iterations == [(8, 0, 0), (8, 0, 0)] and one.pass_iterations == [(8, 0, 0)]
    # the second pass's start is the first pass's result (a zero residual on raw images) and it only goes down
    assert two.losses[8] == pytest.approx(one.loss_final, rel=0.05) and two.loss_final < one.loss_final

    def error(res):  # the displacement at the blob's centre against the known shift (mm)
        return np.linalg.norm(np.asarray(res.transform.TransformPoint((0.0, 0.0))) - (4.0, -3.0))

    assert error(two) < error(one)


def test_passes_default_to_the_models_metadata_and_are_checked(make_model, pair2d):
    from istn.errors import InputError
    from istn.export import rewrite_metadata

    fixed, moving = pair2d
    path = make_model(2, "bspline")
    assert register(fixed, moving, load_model(path), iterations=3, tolerance=0.0).passes == 1  # the paper's
    rewrite_metadata(path, {**load_model(path).meta, "refinement": {"passes": 2}})
    res = register(fixed, moving, load_model(path), iterations=3, tolerance=0.0)
    assert res.passes == 2 and res.iterations == 6
    assert register(fixed, moving, load_model(path), iterations=3, passes=1).iterations == 3
    assert register(fixed, moving, load_model(path), iterations=0).passes == 1  # a one pass stays one
    affine = load_model(make_model(2, "affine"))  # an affine too (since session 37): each look composed
    assert register(fixed, moving, affine, iterations=3, tolerance=0.0).passes == 1
    three = register(fixed, moving, affine, iterations=3, tolerance=0.0, passes=3)
    assert three.passes == 3 and three.iterations == 9 and [p[0] for p in three.pass_iterations] == [3, 3, 3]
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InputError, match="passes"):
            register(fixed, moving, load_model(path), iterations=3, passes=bad)


def test_a_cancel_stops_the_passes_where_it_comes(make_model, pair2d):
    fixed, moving = pair2d
    res = _cancelled_at(2, "event", fixed, moving, load_model(make_model(2, "bspline")), iterations=5, tolerance=0.0,
                        passes=2)
    assert res.cancelled and res.iterations == 2
    res = _cancelled_at(7, "event", fixed, moving, load_model(make_model(2, "bspline")), iterations=5, tolerance=0.0,
                        passes=2)  # in the second pass: it stops there, with a valid B-spline
    assert res.cancelled and res.iterations == 7
    assert np.all(np.isfinite(res.transform.GetNthTransform(1).GetParameters()))
