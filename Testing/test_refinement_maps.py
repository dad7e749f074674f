"""benchmarks/refinement_maps.py: the map probes average what they say they average, and leave the engine as it was."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import istn.registration as registration  # noqa: E402
from refinement_maps import flip_tta, probe, shift_tta  # noqa: E402

LEFT = [0, 2, 4, 6]  # protocol channels: left/right caudate, putamen, pallidum, thalamus
RIGHT = [1, 3, 5, 7]


def _image() -> torch.Tensor:
    return torch.rand(1, 1, 4, 8, 12, generator=torch.Generator().manual_seed(0))


def test_shift_tta_of_a_shift_equivariant_map_is_that_map():
    x = _image()
    rep = lambda t: 3.0 * t - 1.0  # noqa: E731 (pointwise: the padding it sees is cropped away)
    assert torch.allclose(shift_tta(rep, 4)(x), rep(x))


def test_shift_tta_averages_over_the_half_period_shifts():
    x = _image()
    # a map that depends on where on the padded grid a voxel lies: 1 on every 4th voxel of the last axis
    rep = lambda t: t + (torch.arange(t.shape[-1]) % 4 == 0).to(t)  # noqa: E731
    i = torch.arange(x.shape[-1])
    # voxel i sits at i (shift 0) or i + 2 (shift 2) of the padded grid: hit once in two for even i, never for odd
    expected = x + 0.5 * (i % 2 == 0).to(x)
    assert torch.allclose(shift_tta(rep, 4)(x), expected)


def _hemispheres(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patient left = larger x = the high half of the internal grid's last axis (LPS)."""
    n = t.shape[-1]
    left = (torch.arange(n) >= n // 2).to(t)
    return t * left, t * (1 - left)


def test_flip_tta_of_a_mirror_consistent_map_is_that_map():
    x = _image()

    def rep(t: torch.Tensor) -> torch.Tensor:
        left, right = _hemispheres(t)
        out = torch.zeros(1, 8, *t.shape[2:])
        out[:, LEFT], out[:, RIGHT] = left, right
        return out
    assert torch.allclose(flip_tta(rep)(x), rep(x))


def test_flip_tta_mirrors_back_and_swaps_left_and_right():
    x = _image()
    rep = lambda t: _hemispheres(t)[0].expand(1, 8, *t.shape[2:])  # noqa: E731 (every channel: the left half)
    # the mirrored image's left half is the image's right half: the average is half of each, i.e. x / 2
    assert torch.allclose(flip_tta(rep)(x), (x / 2).expand(1, 8, *x.shape[2:]))


def test_probe_adds_the_extra_channels_with_their_weight_and_restores_refine(monkeypatch):
    calls = []

    def fake_refine(module, source_map, target_map, *args, **kwargs):
        calls.append((source_map, target_map, kwargs.get("channel_weights")))
        return "result"
    monkeypatch.setattr(registration, "refine", fake_refine)
    model = SimpleNamespace(representation=lambda t: torch.cat([t, 2 * t], 1))
    src, tgt = torch.full((1, 1, 2, 2, 2), 1.0), torch.full((1, 1, 2, 2, 2), 5.0)
    with probe(model, extra=lambda t: -t, extra_weight=0.25) as probed:
        s_map, t_map = probed.representation(src), probed.representation(tgt)  # as `register` asks: source first
        assert registration.refine(None, s_map, t_map, channel_weights=None) == "result"
    assert registration.refine is fake_refine
    source_map, target_map, weights = calls[0]
    assert weights == [1.0, 1.0, 0.25]
    assert torch.equal(source_map[:, 2], -src[:, 0]) and torch.equal(target_map[:, 2], -tgt[:, 0])
    assert torch.equal(target_map[:, 1], 2 * tgt[:, 0])


def test_probe_restores_refine_when_the_registration_fails(monkeypatch):
    sentinel = lambda *a, **k: None  # noqa: E731
    monkeypatch.setattr(registration, "refine", sentinel)
    with pytest.raises(RuntimeError):
        with probe(SimpleNamespace(representation=lambda t: t), with_image=True):
            raise RuntimeError("boom")
    assert registration.refine is sentinel
