"""Test-time refinement: known answers, callback, cancel, weights restored, exported models."""

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import blob_image
from istn.export import load_model
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


@pytest.mark.parametrize("kind", ["event", "callable"])
def test_cancel_stops_within_one_iteration_and_leaves_a_valid_result(make_model, pair2d, kind):
    fixed, moving = pair2d
    model = load_model(make_model(2, "affine"))
    event = threading.Event()

    def on_iteration(info):
        if info.iteration == 3:
            event.set()

    cancel = event if kind == "event" else event.is_set
    res = register(fixed, moving, model, iterations=100, callback=on_iteration, cancel=cancel)
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
