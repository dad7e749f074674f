"""The ISTN paper's Table 1 (Lee et al., MICCAI 2019): its layout and its claims, shared by the benchmarks that
reproduce it (`synth2d.py` on the 2D toy data, `brain_table1.py` on real 3D brains).

Results are plain dicts. ``results[transform][variant]`` (transform ``affine`` | ``bspline``, variant one of
`VARIANTS`) holds ``{metric}_{stage}`` and ``{metric}_{stage}_std`` for metric ``dice`` | ``asd`` and stage
``before`` (one pass of the network) | ``after`` (after test-time refinement), and optionally ``per_pair``:
``{pair: {"before": {metric: ..}, "after": {metric: ..}}}``. A reference column (Id = no registration, SoI best
case, ...) is ``{transform: {metric: .., metric_std: ..}}``; it is shown in the 'before' rows only, as in the paper.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

VARIANTS = ("stn-u", "stn-s", "istn-e", "istn-i")
NAMES = {"stn-u": "STN-u", "stn-s": "STN-s", "istn-e": "ISTN-e", "istn-i": "ISTN-i"}
STNS, ISTNS = ("stn-u", "stn-s"), ("istn-e", "istn-i")
TRANSFORM_NAMES = {"affine": "Affine", "bspline": "B-spline"}
METRICS = (("dice", "Dice", 3), ("asd", "ASD", 2))  # key, row name, digits
HIGHER_IS_BETTER = {"dice": True, "asd": False}

Column = tuple[str, dict]  # (header, {transform: {metric: .., metric_std: ..}})


def fmt(mean: float | None, std: float | None = None, digits: int = 3) -> str:
    """``mean ± std`` with ``digits`` decimals; empty for a missing or NaN mean."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _cell(stats: dict | None, metric: str, digits: int) -> str:
    return fmt(stats.get(metric), stats.get(metric + "_std"), digits) if stats else ""


def markdown_table(results: dict, transforms: Sequence[str], before: Sequence[Column] = (),
                   after: Sequence[Column] = (), variants: Sequence[str] = VARIANTS,
                   metrics: Sequence[tuple[str, str, int]] = METRICS) -> list[str]:
    """Table 1 as Markdown lines: rows '<Transform> <Metric> before refinement' / '... after' for each of
    ``metrics`` ``(key, name, digits)``; columns the reference columns ``before`` (e.g. Id), the variants ('n/a'
    where a variant was not evaluated), then the reference columns ``after`` (e.g. SoI best case)."""
    cols = [h for h, _ in before] + [NAMES[v] for v in variants] + [h for h, _ in after]
    lines = ["| | " + " | ".join(cols) + " |", "| --- " * (len(cols) + 1) + "|"]
    for t in transforms:
        if t not in results:
            continue
        for metric, name, digits in metrics:
            for stage in ("before", "after"):
                label = f"{TRANSFORM_NAMES[t]} {name} {stage}" + (" refinement" if stage == "before" else "")
                row = [_cell(c.get(t), metric, digits) if stage == "before" else "" for _, c in before]
                for v in variants:
                    r = results[t].get(v)
                    row.append(fmt(r[f"{metric}_{stage}"], r[f"{metric}_{stage}_std"], digits) if r else "n/a")
                row += [_cell(c.get(t), metric, digits) if stage == "before" else "" for _, c in after]
                lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines


def console_table(results: dict, transforms: Sequence[str], before: Sequence[Column] = (),
                  after: Sequence[Column] = (), variants: Sequence[str] = VARIANTS) -> str:
    """The same table as fixed-width text (means only), for the terminal."""
    head = f"{'':22s} " + " ".join(f"{h[:6]:>6s}" for h, _ in before) + (" " if before else "")
    lines = [head + " ".join(f"{NAMES[v]:>7s}" for v in variants) + "".join(f" {h[:6]:>6s}" for h, _ in after)]
    for t in transforms:
        if t not in results:
            continue
        for metric, _, _ in METRICS:
            for stage in ("before", "after"):
                def ref(c: dict) -> str:
                    s = c.get(t)
                    return f"{s[metric]:6.3f}" if stage == "before" and s and metric in s else " " * 6
                vals = " ".join(f"{results[t][v][f'{metric}_{stage}']:7.3f}" if v in results[t] else "    n/a"
                                for v in variants)
                first = " ".join(ref(c) for _, c in before) + (" " if before else "")
                lines.append(f"{t + ' ' + metric + ' ' + stage:22s} {first}{vals}" + "".join(f" {ref(c)}" for _, c in after))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# the paper's qualitative claims, decided from the numbers
# --------------------------------------------------------------------------


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if HIGHER_IS_BETTER[metric] else a < b


def _pair_wins(results: dict, t: str, a: str, stage_a: str, b: str, stage_b: str, metric: str) -> tuple[int, int]:
    """On how many pairs (both evaluated) ``a`` at ``stage_a`` beats ``b`` at ``stage_b``, and of how many."""
    pa, pb = results[t][a].get("per_pair", {}), results[t][b].get("per_pair", {})
    common = [k for k in pa if k in pb]
    wins = sum(_better(metric, pa[k][stage_a][metric], pb[k][stage_b][metric]) for k in common)
    return wins, len(common)


def _verdict(held: int, total: int) -> str:
    if total == 0:
        return "not measured"
    return "holds" if held == total else ("does not hold" if held == 0 else "partly")


def _comparisons(results: dict, transforms: Sequence[str], pairs: Callable[[str], list[tuple[str, str, str, str]]],
                 describe: Callable[[str, str, str, str, str], str]) -> dict:
    """Every (transform, metric, comparison) ``a@stage_a better than b@stage_b`` of ``pairs(t)``."""
    rows, held = [], 0
    for t in transforms:
        if t not in results:
            continue
        for metric, name, digits in METRICS:
            for a, sa, b, sb in pairs(t):
                if a not in results[t] or b not in results[t]:
                    continue
                va, vb = results[t][a][f"{metric}_{sa}"], results[t][b][f"{metric}_{sb}"]
                ok = _better(metric, va, vb)
                wins, n = _pair_wins(results, t, a, sa, b, sb, metric)
                held += ok
                rows.append({"transform": t, "metric": metric, "a": a, "stage_a": sa, "b": b, "stage_b": sb,
                             "value_a": va, "value_b": vb, "holds": ok, "pairs_won": wins, "pairs": n,
                             "text": f"{TRANSFORM_NAMES[t]} {name}: {describe(a, sa, b, sb, t)} "
                                     f"{va:.{digits}f} vs {vb:.{digits}f}"
                                     + (f" ({wins} of {n} pairs)" if n else "") + (" ✓" if ok else " ✗")})
    return {"verdict": _verdict(held, len(rows)), "held": held, "comparisons": len(rows), "rows": rows}


def claims(results: dict, transforms: Sequence[str], soi: dict | None = None) -> dict:
    """The paper's claims, each decided by comparing mean Dice (higher) and mean ASD (lower) over pairs:

    - ``a`` ISTN beats STN in one pass: every ISTN-e/i 'before' beats every STN-u/s 'before';
    - ``b`` refinement helps every model: each variant's 'after' beats its 'before';
    - ``c`` ISTNs stay ahead after refinement: every ISTN 'after' beats every STN 'after';
    - ``d`` (with ``soi``, ``{transform: {metric: ..}}``) the SoI best case is the ceiling: it beats every
      variant's 'after'.

    Verdict: 'holds' (every comparison), 'partly' (some), 'does not hold' (none), 'not measured'. Each
    comparison also counts the pairs on which it holds (from ``per_pair``).
    """
    def cross(stage: str):
        return lambda t: [(i, stage, s, stage) for i in ISTNS for s in STNS]

    out = {
        "a": {"claim": "ISTN-e/i beat STN-u/s in one pass",
              **_comparisons(results, transforms, cross("before"),
                             lambda a, sa, b, sb, t: f"{NAMES[a]} vs {NAMES[b]} one pass")},
        "b": {"claim": "test-time refinement helps every model",
              **_comparisons(results, transforms, lambda t: [(v, "after", v, "before") for v in VARIANTS],
                             lambda a, sa, b, sb, t: f"{NAMES[a]} after vs before")},
        "c": {"claim": "ISTN-e/i stay ahead of STN-u/s after refinement",
              **_comparisons(results, transforms, cross("after"),
                             lambda a, sa, b, sb, t: f"{NAMES[a]} vs {NAMES[b]} after refinement")},
    }
    if soi:
        rows, held = [], 0
        for t in transforms:
            if t not in results or t not in soi:
                continue
            for metric, name, digits in METRICS:
                for v in VARIANTS:
                    if v not in results[t] or metric not in soi[t]:
                        continue
                    va, vb = soi[t][metric], results[t][v][f"{metric}_after"]
                    ok = _better(metric, va, vb)
                    held += ok
                    rows.append({"transform": t, "metric": metric, "a": "soi", "b": v, "value_a": va, "value_b": vb,
                                 "holds": ok, "text": f"{TRANSFORM_NAMES[t]} {name}: SoI best case vs {NAMES[v]} "
                                                      f"after {va:.{digits}f} vs {vb:.{digits}f}" + (" ✓" if ok else " ✗")})
        out["d"] = {"claim": "the SoI best case is the ceiling", "verdict": _verdict(held, len(rows)), "held": held,
                    "comparisons": len(rows), "rows": rows}
    return out


def claims_markdown(found: dict) -> list[str]:
    """One bullet per claim: the verdict, then the comparisons that decided it."""
    lines = []
    for key, c in found.items():
        lines.append(f"- ({key}) *{c['claim']}*: **{c['verdict']}** ({c['held']} of {c['comparisons']} comparisons).")
        for r in c["rows"]:
            lines.append(f"  - {r['text']}")
    return lines
