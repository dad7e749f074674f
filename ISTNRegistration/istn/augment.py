"""Moved to `istn.data.augment`; this name stays for the bundled models' metadata that cites it."""

from .data.augment import Anatomy, AugmentConfig, AugmentedPairDataset, sample_view

__all__ = ["Anatomy", "AugmentConfig", "AugmentedPairDataset", "sample_view"]
