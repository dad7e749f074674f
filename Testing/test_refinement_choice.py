"""benchmarks/refinement_validation.py: the bending weight chosen from validation rows (known answers)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from refinement_validation import choose_bending  # noqa: E402


def _rows(dice: float, mask_changes: list[float]) -> list[dict]:
    """One weight's pairs: the B-spline's sub-cortical Dice and its brain-mask Dice change against the affine."""
    return [{"dice": dice, "affine_mask_dice": 0.95, "mask_dice": 0.95 + c} for c in mask_changes]


def test_the_best_dice_among_weights_that_keep_the_outline_ties_to_the_smaller():
    by_weight = {0.0: _rows(0.780, [0.001, -0.002]),  # harms the outline on one pair: out
                 100.0: _rows(0.770, [0.0, -0.0005]),
                 300.0: _rows(0.7695, [0.001, 0.0])}  # within the tie of 100's Dice
    assert choose_bending(by_weight) == (100.0, True)


def test_when_no_weight_keeps_the_outline_an_equally_harmful_heavier_one_is_not_taken():
    # a continued B-spline's validation (2026-12-04): every weight lost 0.0012-0.0024 brain-mask Dice on its
    # worst pair; the heaviest weight harmed as much as none and lost 0.028 Dice (the old fallback took it)
    by_weight = {0.0: _rows(0.7814, [-0.00138, 0.001]), 10.0: _rows(0.7788, [-0.00241, 0.0]),
                 1000.0: _rows(0.7553, [-0.00118, 0.0]), 3000.0: _rows(0.7532, [-0.00118, 0.0])}
    assert choose_bending(by_weight) == (0.0, False)
    # ... but one that harms clearly less (by more than 0.001) is chosen over a better Dice that harms more
    assert choose_bending({0.0: _rows(0.78, [-0.004]), 1000.0: _rows(0.7553, [-0.0011])}) == (1000.0, False)
