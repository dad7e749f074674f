"""Data: what the networks see, and where training pairs come from.

- `images`: an image on the model's internal grid (intensity window, Otsu
  foreground and its centre, `network_grid`, resampling to tensors, SoI
  encodings). Inference uses only this.
- `pairs`: pairs of images and SoI listed in CSV files, held in memory on the
  network grid (`PairDataset`), seeded train/validation splits.
- `augment`: endless training pairs varied on the fly from a few real
  anatomies (`AugmentedPairDataset`).
- `synthesis`: label-driven synthesis, views drawn from an anatomy's labels
  (structures and tissue classes) with random intensities, which `augment`
  uses when asked (`AugmentConfig.synth_prob`); blur and field-of-view crops.
- `brain`: the brain MRI recipe, a set of real volumes and their sub-cortical
  labels built from pinned packages (`istn.data.brain.prepare`, ``istn data
  prepare``); imported on its own, not from here.
"""

from .images import (
    STATS_VOXELS,
    THIN_FILL_RADIUS,
    bias_corrected,
    despike,
    detached_objects,
    encode_soi,
    fill_floor,
    foreground_centre,
    hot_voxel_bound,
    image_to_tensor,
    intensity_window,
    network_grid,
    normalise_intensity,
    otsu_threshold,
    soi_to_tensor,
    statistics_sample,
    thin_bright_bound,
)
from .pairs import PairDataset, PairTensors, check_segment_values, load_pair, read_pairs_csv, split_rows

__all__ = [
    "STATS_VOXELS",
    "THIN_FILL_RADIUS",
    "PairDataset",
    "PairTensors",
    "bias_corrected",
    "despike",
    "detached_objects",
    "encode_soi",
    "fill_floor",
    "foreground_centre",
    "hot_voxel_bound",
    "image_to_tensor",
    "intensity_window",
    "load_pair",
    "network_grid",
    "normalise_intensity",
    "otsu_threshold",
    "read_pairs_csv",
    "soi_to_tensor",
    "split_rows",
    "check_segment_values",
    "statistics_sample",
    "thin_bright_bound",
]
