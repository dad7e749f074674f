"""benchmarks/brain_table1.py and benchmarks/table1.py: the paper's Table 1 layout, its claims, and the 3D brain
evaluation on tiny synthetic heads and untrained-but-perturbed tiny models (no /work/braindata, no trained runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import perturbed_model, tiny_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import table1  # noqa: E402
from istn.config import TrainConfig  # noqa: E402
from istn.training import save_checkpoint  # noqa: E402

LABELS = tuple(range(1, 9))


# --------------------------------------------------------------------------
# table1: layout and claims with known numbers
# --------------------------------------------------------------------------


def _variant(dice_before: float, dice_after: float, asd_before: float, asd_after: float, pairs: int = 2) -> dict:
    per = {f"p{k}": {"before": {"dice": dice_before + 0.01 * k, "asd": asd_before},
                     "after": {"dice": dice_after + 0.01 * k, "asd": asd_after}} for k in range(pairs)}
    return {"dice_before": dice_before + 0.005, "dice_before_std": 0.01, "dice_after": dice_after + 0.005,
            "dice_after_std": 0.01, "asd_before": asd_before, "asd_before_std": 0.1, "asd_after": asd_after,
            "asd_after_std": 0.1, "per_pair": per}


def _paper_like() -> dict:
    """The paper's Table 1 affine numbers: every claim holds."""
    return {"affine": {"stn-u": _variant(0.71, 0.79, 1.11, 0.69), "stn-s": _variant(0.70, 0.79, 1.10, 0.69),
                       "istn-e": _variant(0.75, 0.83, 0.93, 0.53), "istn-i": _variant(0.75, 0.82, 0.89, 0.58)}}


def test_markdown_table_layout():
    res = _paper_like()
    del res["affine"]["stn-s"]
    idn = {"affine": {"dice": 0.53, "dice_std": 0.02, "asd": 2.41, "asd_std": 0.3}}
    lines = table1.markdown_table(res, ["affine", "bspline"], before=[("Id", idn)], after=[("SoI best case", {})])
    assert lines[0] == "| | Id | STN-u | STN-s | ISTN-e | ISTN-i | SoI best case |"
    assert len(lines) == 2 + 4  # header, rule, Dice/ASD x before/after; no B-spline results, no B-spline rows
    assert lines[2].startswith("| Affine Dice before refinement | 0.530 ± 0.020 | 0.715 ± 0.010 | n/a |")
    assert lines[3].startswith("| Affine Dice after |  | 0.795 ± 0.010 | n/a |")  # Id only in the 'before' rows
    assert "| 2.41 ± 0.30 |" in lines[4]


def test_claims_hold_and_flip():
    found = table1.claims(_paper_like(), ["affine"], soi={"affine": {"dice": 0.9, "asd": 0.4}})
    assert [found[k]["verdict"] for k in "abcd"] == ["holds"] * 4
    assert found["a"]["comparisons"] == 2 * 2 * 2  # 2 ISTNs x 2 STNs x (Dice, ASD)
    assert all(r["pairs_won"] == r["pairs"] == 2 for r in found["a"]["rows"])

    swapped = _paper_like()["affine"]  # ISTNs and STNs exchange their numbers
    swapped = {"affine": {"stn-u": swapped["istn-e"], "stn-s": swapped["istn-i"],
                          "istn-e": swapped["stn-u"], "istn-i": swapped["stn-s"]}}
    found = table1.claims(swapped, ["affine"], soi={"affine": {"dice": 0.5, "asd": 3.0}})
    assert found["a"]["verdict"] == found["c"]["verdict"] == found["d"]["verdict"] == "does not hold"
    assert found["b"]["verdict"] == "holds"

    partly = _paper_like()
    partly["affine"]["stn-u"] = _variant(0.71, 0.70, 1.11, 1.20)  # refinement hurts STN-u only
    found = table1.claims(partly, ["affine"])
    assert found["b"]["verdict"] == "partly" and found["b"]["held"] == 6 and "d" not in found
    text = "\n".join(table1.claims_markdown(found))
    assert "**partly** (6 of 8 comparisons)" in text and "STN-u after vs before 0.705 vs 0.715 (0 of 2 pairs) ✗" in text

    assert table1.claims({"affine": {"stn-u": _variant(0.7, 0.8, 1, 0.5)}}, ["affine"])["a"]["verdict"] == "not measured"


# --------------------------------------------------------------------------
# brain_table1 end to end on synthetic heads
# --------------------------------------------------------------------------


CENTRES = [(-14, 8, 4), (14, 8, 4), (-22, 0, -4), (22, 0, -4), (-16, -6, -4), (16, -6, -4), (-8, -14, 6), (8, -14, 6)]


def _head(shift: tuple[float, float, float]) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """Whole head, brain-extracted head and labels 1..8 (32^3 at 4 mm); ``shift`` moves the structures (mm)."""
    n, sp = 32, 4.0
    ax = (np.arange(n) - (n - 1) / 2) * sp
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    head = (x / 58) ** 2 + (y / 62) ** 2 + (z / 52) ** 2 < 1
    brain = (x / 46) ** 2 + (y / 50) ** 2 + (z / 40) ** 2 < 1
    labels = np.zeros((n, n, n), np.uint8)
    for k, c in enumerate(CENTRES):
        cx, cy, cz = np.add(c, shift)
        labels[(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < 7.0 ** 2] = k + 1
    t1 = 0.3 * head + 0.4 * brain + 0.3 * (labels > 0) + 0.05 * np.sin(x / 7.0) * brain
    images = []
    for arr in (t1.astype(np.float32), (t1 * brain).astype(np.float32), labels):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((sp,) * 3)
        img.SetOrigin((float(ax[0]),) * 3)
        images.append(img)
    return images[0], images[1], images[2]


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("brain_table1")
    ev = root / "data" / "eval"
    ev.mkdir(parents=True)
    _, fixed_brain, fixed_labels = _head((0.0, 0.0, 0.0))
    head, brain, labels = _head((4.0, -4.0, 0.0))  # the "test subject": structures 5.7 mm away
    for img, name in ((fixed_brain, "icbm2009c_t1"), (fixed_labels, "icbm2009c_labels"), (head, "colin27_t1"),
                      (brain, "colin27_t1_brain"), (labels, "colin27_labels")):
        sitk.WriteImage(img, str(ev / f"{name}.nii.gz"))
    runs = root / "runs"
    for k, variant in enumerate(("stn-u", "istn-i")):
        for stage in ("affine", "bspline"):
            cfg = tiny_config(3, stage, variant, soi_channels=8, itn_output="sigmoid")
            model = perturbed_model(cfg, seed=k, scale=0.3)
            tcfg = TrainConfig(model=cfg, soi_kind="labels", soi_labels=LABELS, lr=1e-3, steps=20)
            history = [{"step": 10, "seconds": 4.0, "loss": 0.2, "soi_mse": 0.05},
                       {"step": 20, "seconds": 9.0, "loss": 0.1, "soi_mse": 0.07}]
            out = runs / variant / stage
            out.mkdir(parents=True)
            opt = torch.optim.Adam(model.parameters())
            save_checkpoint(out / "best.pt", model, opt, tcfg, 10, 0.05, history[:1])
            save_checkpoint(out / "last.pt", model, opt, tcfg, 20, 0.05, history)
    import brain_table1

    argv = ["--quick", "--runs", str(runs), "--data", str(root / "data"), "--out", str(root / "results"),
            "--work", str(root / "work"), "--variants", "stn-u", "istn-i"]
    assert brain_table1.main(argv) == 0
    res = json.loads((root / "results" / "brain_table1.json").read_text())
    md = (root / "results" / "brain_table1.md").read_text()
    return root, res, md, brain_table1


def test_identity_column_is_the_unregistered_dice(table_run):
    root, res, _, bt = table_run
    from istn.demo import place_in_scanner
    from istn.metrics import dice

    fixed_labels = sitk.ReadImage(str(root / "data" / "eval" / "icbm2009c_labels.nii.gz"))
    labels = sitk.ReadImage(str(root / "data" / "eval" / "colin27_labels.nii.gz"))
    brain = sitk.ReadImage(str(root / "data" / "eval" / "colin27_t1_brain.nii.gz"), sitk.sitkFloat32)
    _, moved_labels, _ = place_in_scanner(brain, labels, seed=101)
    warped = sitk.GetArrayFromImage(sitk.Resample(moved_labels, fixed_labels, sitk.Transform(3, sitk.sitkIdentity),
                                                  sitk.sitkNearestNeighbor, 0))
    f = sitk.GetArrayFromImage(fixed_labels)
    expected = np.mean([dice(f == v, warped == v) for v in LABELS])
    for moving in ("brain", "whole-head"):  # the two variants share the scanner position and the labels
        assert res["moving"][moving]["identity"]["dice"] == pytest.approx(expected, abs=1e-12)
    assert res["settings"]["seeds"] == [101]


def test_before_is_register_with_zero_iterations(table_run):
    root, res, _, bt = table_run
    from istn.export import load_model
    from istn.registration import register

    vols = bt.eval_volumes(root / "data")
    case = bt.Case(vols, "whole-head", 101)
    model = load_model(root / "work" / "models" / "istn-i-affine.pt")
    one = register(case.fixed, case.moving, model, iterations=0, device="cpu", threads=1)
    two = register(case.fixed, case.moving, model, iterations=2, device="cpu", threads=1)
    np.testing.assert_allclose(one.transform.GetParameters(), two.one_pass_transform.GetParameters(), atol=1e-10)
    row = next(c for c in res["cases"] if c["moving"] == "whole-head")
    assert row["affine"]["istn-i"]["before"]["dice"] == pytest.approx(case.score(one.transform)["dice"], abs=1e-12)
    assert row["affine"]["istn-i"]["iterations"] == 2
    # the B-spline of a variant starts from the same variant's refined affine
    bsp = load_model(root / "work" / "models" / "istn-i-bspline.pt")
    init = bt._affine_from(row["affine"]["istn-i"]["transform_after"])
    r = register(case.fixed, case.moving, bsp, iterations=0, device="cpu", threads=1, initial_transform=init)
    assert row["bspline"]["istn-i"]["before"]["dice"] == pytest.approx(case.score(r.transform)["dice"], abs=1e-12)


def test_report_contents(table_run):
    _, res, md, _ = table_run
    d = res["moving"]["brain"]
    assert set(d["results"]) == {"affine", "bspline"} and set(d["results"]["affine"]) == {"stn-u", "istn-i"}
    assert set(d["claims"]) == {"a", "b", "c", "d"}
    for c in d["claims"].values():
        assert c["verdict"] in ("holds", "partly", "does not hold", "not measured")
    assert set(d["soi"]) == {"affine", "bspline"} and d["soi_start"] == {"affine": "istn-i", "bspline": "istn-i"}
    m = res["models"]["stn-u"]["affine"]
    assert (m["steps"], m["exported_step"], m["best_step"], m["seconds_per_step"]) == (20, 10, 10, 0.5)
    assert set(res["fixed_maps"]) == {"istn-i-affine", "istn-i-bspline"}  # ISTNs only
    q = res["fixed_maps"]["istn-i-affine"]
    assert len(q["per_structure"]) == 8 and 0.0 <= q["mass_outside_all"] <= 1.0
    assert all(0.0 <= p["mass_outside"] <= 1.0 for p in q["per_structure"].values())
    assert "| | Id | STN-u | STN-s | ISTN-e | ISTN-i | SoI best case |" in md
    assert "| Affine Dice before refinement |" in md and "| B-spline ASD after |" in md
    assert "## Moving: whole head" in md and "## ITN maps on the held-out heads" in md
    assert "## The paper's claims on these numbers" in md and "| STN-s | affine | missing" not in md


# --------------------------------------------------------------------------
# training_curves: what the runs' last.pt records, drawn and tabulated
# --------------------------------------------------------------------------


def test_training_curves_reads_the_recorded_validation_history(tmp_path):
    import training_curves

    runs = tmp_path / "runs"
    vals = {"affine": [0.09, 0.04, 0.06], "bspline": [0.03, 0.05, 0.02]}
    for stage, decay in (("affine", 20), ("bspline", -1)):
        cfg = tiny_config(3, stage, "istn-e", soi_channels=8, itn_output="sigmoid")
        model = perturbed_model(cfg, seed=0, scale=0.3)
        tcfg = TrainConfig(model=cfg, soi_kind="labels", soi_labels=LABELS, lr=1e-3, steps=30, lr_decay_start=decay)
        history = [{"step": 10 * (i + 1), "seconds": 5.0 * (i + 1), "loss": 0.5, "soi_mse": v}
                   for i, v in enumerate(vals[stage])]
        out = runs / "istn-e" / stage
        out.mkdir(parents=True)
        save_checkpoint(out / "last.pt", model, torch.optim.Adam(model.parameters()), tcfg, 30, min(vals[stage]),
                        history)
    stem = tmp_path / "curves"
    assert training_curves.main([f"ISTN-e={runs / 'istn-e'}", "--out", str(stem)]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    md = (tmp_path / "curves.md").read_text()
    assert ("| ISTN-e | Affine | istn-e | 16^3 x 4 mm | 30 | 20 | 0.040000 | 0.060000 | 0.50 | "
            "0.001, half cosine from step 20 to x0.01 |") in md
    assert "| ISTN-e | B-spline | istn-e | 16^3 x 4 mm | 30 | 30 | 0.020000 | 0.020000 | 0.50 | 0.001 constant |" in md
    with pytest.raises(SystemExit):  # a folder without runs is refused, nothing written
        training_curves.main([f"none={tmp_path / 'empty'}", "--out", str(tmp_path / "nothing")])
    assert not (tmp_path / "nothing.md").exists()


def test_overlay_map_rows_score_the_maps_register_shows(table_run):
    """The second map table scores `RegistrationResult.moving_map` (what the overlay shows): the affine stage's
    in its refined result's pose, the B-spline stage's on the grid its starting affine carries."""
    root, res, md, bt = table_run
    from istn.export import load_model
    from istn.registration import register

    vols = bt.eval_volumes(root / "data")
    case = bt.Case(vols, "brain", 101)
    row = next(c for c in res["cases"] if c["moving"] == "brain")
    aff = load_model(root / "work" / "models" / "istn-i-affine.pt")
    bsp = load_model(root / "work" / "models" / "istn-i-bspline.pt")
    a = register(case.fixed, case.moving, aff, iterations=2, device="cpu", threads=1)
    init = bt._affine_from(row["affine"]["istn-i"]["transform_after"])
    np.testing.assert_allclose(bt._affine_params(a.transform), row["affine"]["istn-i"]["transform_after"], atol=1e-9)
    b = register(case.fixed, case.moving, bsp, iterations=2, device="cpu", threads=1, initial_transform=init)
    for stage, r in (("affine", a), ("bspline", b)):
        shown, q = r.moving_map, row["overlay_maps"][f"istn-i-{stage}"]
        for key, value in (("size", shown.GetSize()), ("spacing", shown.GetSpacing()),
                           ("origin", shown.GetOrigin()), ("direction", shown.GetDirection())):
            np.testing.assert_allclose(q["grid"][key], value, atol=1e-9)
        # the shown map is the union (maximum) of the structures' maps: below 0.5 everywhere for these untrained
        # models exactly when every scored structure's thresholded map is empty
        shown_on = bool((sitk.GetArrayViewFromImage(shown) > 0.5).any())
        assert shown_on == any(p["volume_ratio"] > 0 for p in q["per_structure"].values())
    # not the scanner-position measure: that grid is the moving image's own, axis-aligned to its voxels, while
    # the shown one is the fixed grid turned by the rotation of the refined affine (polar decomposition)
    own, shown = (np.reshape(row[k]["istn-i-affine"]["grid"]["direction"], (3, 3)) for k in ("maps", "overlay_maps"))
    np.testing.assert_allclose(own, np.reshape(case.moving.GetDirection(), (3, 3)), atol=1e-9)
    u, _, vt = np.linalg.svd(np.reshape(a.transform.GetMatrix(), (3, 3)))
    np.testing.assert_allclose(shown, (u @ vt) @ np.reshape(case.fixed.GetDirection(), (3, 3)), atol=1e-6)
    assert not np.allclose(own, shown, atol=1e-3)
    assert "The moving maps as `register` shows them" in md
    assert res["moving"]["brain"]["overlay_maps"]["istn-i-bspline"]["dice"][0] == pytest.approx(
        row["overlay_maps"]["istn-i-bspline"]["dice"], abs=1e-12)  # one pair: the mean is that pair's
