"""The bounded ITN head: maps in [0, 1] per structure, kept through TorchScript export, old models unchanged."""

from __future__ import annotations

import pytest
import torch

from istn.config import ModelConfig, TrainConfig
from istn.export import build_metadata, export_model, load_model
from istn.networks import ISTN


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(ndim=2, grid_size=(16, 16), variant="istn-e", soi_channels=3, itn_channels=(4, 8), stn_channels=(4, 8), stn_hidden=8, **kw)


def test_sigmoid_head_bounds_every_channel_and_linear_does_not():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16) * 50  # large inputs: a linear head leaves [0, 1] for sure
    net = ISTN(_cfg(itn_output="sigmoid")).eval()
    bounded = net.representation(x)
    assert bounded.shape == (2, 3, 16, 16)
    assert float(bounded.min()) >= 0.0 and float(bounded.max()) <= 1.0
    plain = ISTN(_cfg()).eval()
    plain.load_state_dict(net.state_dict())
    linear = plain.representation(x)
    assert float(linear.min()) < 0.0 or float(linear.max()) > 1.0
    # same weights: the sigmoid is the only difference
    assert torch.allclose(torch.sigmoid(linear), bounded, atol=1e-6)


def test_itn_output_is_checked():
    with pytest.raises(ValueError, match="itn_output"):
        _cfg(itn_output="softmax")


def test_exported_model_keeps_the_bounded_head(tmp_path):
    cfg = _cfg(itn_output="sigmoid")
    net = ISTN(cfg).eval()
    meta = build_metadata(TrainConfig(model=cfg, soi_kind="labels", soi_labels=(1, 2, 3)))
    path = export_model(net, meta, tmp_path / "m.pt")
    loaded = load_model(path)
    assert loaded.config.itn_output == "sigmoid"
    x = torch.randn(1, 1, 16, 16) * 50
    out = loaded.module.representation(x)
    assert torch.allclose(out, net.representation(x), atol=1e-6)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
