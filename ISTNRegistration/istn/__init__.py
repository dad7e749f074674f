"""ISTN: Image-and-Spatial Transformer Networks for structure-guided registration.

The engine of the ISTN Registration project (Lee et al., MICCAI 2019). It knows
nothing of Slicer: the command line (`istn.cli`) and the Slicer module are thin
adapters over the same calls.

Vocabulary used throughout:
- SoI: structures of interest, given as segmentations or landmark maps at
  training time only.
- ITN: Image Transformer Network, maps an image to a learned SoI representation.
- STN: Spatial Transformer Network, predicts an affine or B-spline transform
  from the pair of ITN outputs.
- refine: test-time optimisation of the STN on one pair, ITN frozen.
"""

__version__ = "0.3.0"
