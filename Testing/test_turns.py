"""The turn search after a failed self-check (`istn.chain`): the turns, their names, and when a turn is taken."""
from __future__ import annotations

import types

import numpy as np
import pytest
import SimpleITK as sitk

import istn.chain as chain
from istn.chain import axis_turns, describe_turn, turned_chain, turned_start


@pytest.mark.parametrize("dim, count", [(2, 4), (3, 24)])
def test_the_turns_are_every_whole_right_angle_rotation_and_no_mirror(dim, count):
    turns = axis_turns(dim)
    assert len(turns) == count and np.array_equal(turns[0], np.eye(dim))
    assert len({t.tobytes() for t in turns}) == count
    for t in turns:
        assert np.allclose(t @ t.T, np.eye(dim)) and np.linalg.det(t) == pytest.approx(1.0)
        assert set(np.unique(t)) <= {-1.0, 0.0, 1.0}
    mirror = np.diag([-1.0] + [1.0] * (dim - 1))  # a left-right flip: the images cannot tell it
    assert not any(np.array_equal(t, mirror) for t in turns)


def test_a_turn_is_named_by_its_angle_and_world_axis():
    assert describe_turn(np.diag([-1.0, -1.0, 1.0])) == "180 degrees about the up-down (z) axis"
    quarter = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # y -> z: a right-hand quarter turn about +x
    assert describe_turn(quarter) == "90 degrees about the left-right axis (+x, right-handed)"
    assert describe_turn(quarter.T) == "90 degrees about the left-right axis (-x, right-handed)"
    assert describe_turn(np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]])) == (
        "120 degrees about the diagonal axis (+0.58, +0.58, +0.58, right-handed)")
    assert describe_turn(np.array([[0.0, -1.0], [1.0, 0.0]])) == "90 degrees in the image plane"


def test_the_start_takes_the_fixed_centre_onto_the_moving_one_turned_about_it():
    turn = np.diag([-1.0, -1.0, 1.0])
    start = turned_start(turn, np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0]))
    assert np.allclose(start.TransformPoint((1.0, 2.0, 3.0)), (10.0, 20.0, 30.0))
    assert np.allclose(start.TransformPoint((2.0, 2.0, 4.0)), (9.0, 20.0, 31.0))


def _stage(failed=(), cancelled=False, transform=None, suspect=False):
    return types.SimpleNamespace(self_checks_failed=list(failed), cancelled=cancelled, spacing_suspect=suspect,
                                 transform=transform or sitk.AffineTransform(3), warnings=[], turned={},
                                 initial_transform=None)


@pytest.fixture
def scripted(monkeypatch):
    """`turned_chain` with the search, the chain and the images' information scripted: ``calls`` records them."""
    calls = {"search": 0, "chain": 0}
    state = {"best": 5, "turned_failed": (), "mi": (0.1, 0.4)}

    def search(fixed, moving, model, **options):
        calls["search"] += 1
        return [(0.9 if i == state["best"] else 0.1, t, turned_start(t, np.zeros(3), np.zeros(3)))
                for i, t in enumerate(axis_turns(3))]

    def run_chain(fixed, moving, models, **options):
        calls["chain"] += 1
        calls["options"] = options
        stage = _stage(state["turned_failed"])
        stage.initial_transform = options["initial_transform"]
        return [stage]

    monkeypatch.setattr(chain, "search_turns", search)
    monkeypatch.setattr(chain, "register_chain", run_chain)
    monkeypatch.setattr(chain, "images_information", lambda f, m, model, transforms: list(state["mi"]))
    model = types.SimpleNamespace(transform_type="affine", ndim=3)
    return calls, state, model


def test_a_failed_chain_is_run_again_from_the_best_turn_and_says_so(scripted):
    calls, state, model = scripted
    turned = turned_chain(None, None, [model], [_stage(["information"])])
    assert calls["search"] == 1 and calls["chain"] == 1
    assert calls["options"]["given_transform"] is None  # the images as given stay the user's, not the turn
    head = turned[0]
    assert np.array_equal(head.turned["turn_lps"], axis_turns(3)[5]) and head.turned["turns_tried"] == 24
    assert head.turned["information"] == {"as_stored": 0.1, "turned": 0.4}
    assert "failed a self-check (information)" in head.warnings[0] and "turned by" in head.warnings[0]


@pytest.mark.parametrize("case", ["identity best", "turned chain fails a check", "turned chain less alike"])
def test_a_turn_is_not_taken_unless_it_wins(scripted, case):
    calls, state, model = scripted
    if case == "identity best":
        state["best"] = 0
    elif case == "turned chain fails a check":
        state["turned_failed"] = ("loss",)
    else:
        state["mi"] = (0.4, 0.39)
    assert turned_chain(None, None, [model], [_stage(["loss"])]) is None
    assert calls["chain"] == (0 if case == "identity best" else 1)


@pytest.mark.parametrize("case", ["passed", "user's start", "cancelled", "spacing", "no affine"])
def test_no_search_where_a_turn_is_not_the_question(scripted, case):
    calls, state, model = scripted
    first, options = [_stage(["information"])], {}
    if case == "passed":
        first = [_stage()]
    elif case == "user's start":
        options["initial_transform"] = sitk.AffineTransform(3)
    elif case == "cancelled":
        first = [_stage(["information"], cancelled=True)]
    elif case == "spacing":
        first = [_stage(["information"], suspect=True)]
    else:
        model.transform_type = "bspline"
    assert turned_chain(None, None, [model], first, **options) is None
    assert calls["search"] == 0 and calls["chain"] == 0


class _Counting:
    """The frozen network, counting how often its ITN runs."""

    def __init__(self, inner):
        self.inner, self.runs = inner, 0

    def representation(self, x):
        self.runs += 1
        return self.inner.representation(x)

    def stn_pooled(self, s, t):
        return self.inner.stn_pooled(s, t)


def test_remembered_maps_are_the_same_maps_without_running_the_itn_again(make_model):
    import torch

    from istn.export import load_model

    model = load_model(make_model(ndim=3))
    counting = _Counting(model._fast_cpu())
    model._fast_cpu = lambda: counting
    x, y, z = (torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(k)) for k in range(3))
    plain = model.representation(x)
    with model.remembering_maps():
        first = model.representation(x)
        again = model.representation(x.clone())  # equal values, another tensor
        model.representation(y), model.representation(x), model.representation(z)  # x used last: kept over y
        kept = model.representation(x)
        assert counting.runs == 1 + 3  # plain, then x, y and z once each
        assert torch.equal(first, plain) and torch.equal(again, plain) and torch.equal(kept, plain)
        again.add_(1.0)  # a caller's change stays its own
        assert torch.equal(model.representation(x), plain)
        model.representation(y)
        assert counting.runs == 5  # y had been let go for z
    assert model._maps == [] and not model._remembering
    model.representation(x)
    assert counting.runs == 6  # outside, every call runs the ITN


def test_the_turn_search_runs_the_itn_on_the_fixed_image_once():
    """24 one passes: 24 moving looks and ONE fixed map (it was 24), with the same scores as without remembering."""
    import contextlib

    from conftest import header_turned
    from istn import demo
    from istn.export import LoadedModel, load_model

    path = demo.bundled_model(demo.AFFINE_MODEL)
    if not path.exists():
        pytest.skip("bundled models absent")
    model = load_model(path)
    counting = _Counting(model._fast_cpu())
    model._fast_cpu = lambda: counting
    pair = demo.sample_pair()
    moving = header_turned(pair["moving"], np.diag([-1.0, -1.0, 1.0]))
    scored = chain.search_turns(pair["fixed"], moving, model, threads=2)
    assert len(scored) == 24 and counting.runs == 24 + 1
    counting.runs = 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LoadedModel, "remembering_maps", lambda self: contextlib.nullcontext(self))
        plain = chain.search_turns(pair["fixed"], moving, model, threads=2)
    assert counting.runs == 48 and [s for s, _, _ in plain] == [s for s, _, _ in scored]
