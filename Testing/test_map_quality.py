"""`benchmarks/brain_table1.map_quality`: how the structure maps are scored (Dice at 0.5, where they lie)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from istn.data import network_grid
from istn.data.brain import LABELS
from istn.demo import AFFINE_MODEL, MODELS_DIR, sample_pair
from istn.export import load_model
from istn.geometry import resample_to_grid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.parametrize("layout", ["LPS", "RAS"])
def test_map_quality_scores_maps_against_the_labels_and_says_where_they_lie_in_world_mm(layout):
    """Maps that ARE the labels score Dice 1 at offset 0; the same maps moved 2 voxels along the grid's first
    axis (the network grid is in the patient frame: +x = left) lie 2 x spacing mm to the left, whatever the
    file's voxel order."""
    from brain_table1 import map_quality

    model = load_model(MODELS_DIR / AFFINE_MODEL)
    p = sample_pair()
    image = sitk.DICOMOrient(sitk.Cast(p["moving"], sitk.sitkFloat32), layout)
    labels = sitk.DICOMOrient(p["moving_labels"], layout)
    grid = network_grid(image, model.config)  # the grid map_quality scores on (no fixed image given)
    ref = sitk.GetArrayFromImage(resample_to_grid(labels, grid, interpolator=sitk.sitkNearestNeighbor))
    onehot = np.stack([ref == v for v in LABELS.values()]).astype(np.float32)  # (K, D, H, W), array order

    def maps(shift: int):
        return lambda source: torch.from_numpy(np.roll(onehot, shift, axis=-1))[None]  # (1, K, D, H, W)

    exact = map_quality(model, image, labels, 4.0, representation=maps(0))
    assert exact["dice"] == pytest.approx(1.0)
    for q in exact["per_structure"].values():
        assert q["volume_ratio"] == pytest.approx(1.0)
        np.testing.assert_allclose(q["offset_mm"], 0.0, atol=1e-9)
    moved = map_quality(model, image, labels, 4.0, representation=maps(2))
    assert moved["dice"] < 0.9
    for q in moved["per_structure"].values():
        np.testing.assert_allclose(q["offset_mm"], [2 * grid.spacing[0], 0.0, 0.0], atol=1e-6)
