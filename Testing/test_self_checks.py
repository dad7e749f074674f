"""The engine's self-checks: map volumes (moving over fixed) and the images' mutual information, and their warnings."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

import istn.registration as registration
from istn.export import load_model
from istn.metrics import mutual_information
from istn.registration import (INFORMATION_KEPT, MAP_VOLUME_RATIO_BOUND, _information_check, _map_volume_check,
                               map_volume_ratios, register)


def _cube(shape, lo, hi, value=1.0, floor=0.0):
    m = torch.full(shape, floor)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return m


def test_ratios_compare_volumes_above_the_display_floor():
    shape = (12, 12, 12)
    source = torch.stack([
        _cube(shape, (0, 0, 0), (4, 4, 4)),  # 64 voxels
        _cube(shape, (2, 2, 2), (5, 5, 5), 0.8, floor=0.05),  # 27 x 0.8; the 0.05 floor over the grid is not volume
        _cube(shape, (0, 0, 0), (2, 2, 2)),  # the fixed image has none of it
        torch.zeros(shape),  # neither has any
    ])[None]
    target = torch.stack([
        _cube(shape, (0, 0, 0), (4, 4, 2)),  # 32 voxels
        _cube(shape, (0, 0, 0), (3, 3, 3), 0.8),
        torch.full(shape, 0.09),  # below the floor everywhere
        torch.zeros(shape),
    ])[None]
    r = map_volume_ratios(source, target)
    assert r[0] == pytest.approx(2.0) and r[1] == pytest.approx(1.0)
    assert r[2] == np.inf and np.isnan(r[3])
    assert map_volume_ratios(target, source)[0] == pytest.approx(0.5)


def test_the_warning_names_the_structures_outside_the_bound():
    model = types.SimpleNamespace(meta={"soi": {"labels": [3, 5, 7, 9]}})
    low, high = MAP_VOLUME_RATIO_BOUND, 1.0 / MAP_VOLUME_RATIO_BOUND
    assert _map_volume_check(model, np.array([low, 1.0, high, np.nan])) is None  # the bound itself is quiet
    text = _map_volume_check(model, np.array([1.0, 0.3, high * 1.5, np.inf]))
    assert "structure 2 (label 5) x0.30" in text and f"structure 3 (label 7) x{high * 1.5:.2f}" in text
    assert "structure 4 (label 9): none in the fixed image" in text and "structure 1 " not in text
    named = types.SimpleNamespace(meta={"soi": {"labels": [1, 2], "names": ["L caudate", "R caudate"]}})
    assert "R caudate x0.10" in _map_volume_check(named, np.array([1.0, 0.1]))


def test_register_reports_the_ratios_and_warns_through_them(make_model, pair2d, monkeypatch):
    fixed, _ = pair2d
    model = load_model(make_model(2, "affine", "istn-e", itn_output="sigmoid"))
    same = register(fixed, fixed, model, iterations=2)  # an image and itself: every structure the same volume
    assert len(same.map_volume_ratio) == model.config.soi_channels
    assert all(r == pytest.approx(1.0) or np.isnan(r) for r in same.map_volume_ratio)
    assert not any("very different volumes" in w for w in same.warnings)
    summary = json.loads(json.dumps(same.summary()))
    assert len(summary["map_volume_ratio"]) == model.config.soi_channels
    linear = load_model(make_model(2, "affine", "istn-e"))  # unbounded maps: no volumes to compare
    assert register(fixed, fixed, linear, iterations=1).map_volume_ratio == []
    # the ratios the network's maps give are what the warning reads
    monkeypatch.setattr(registration, "map_volume_ratios", lambda s, t: np.full(s.shape[1], 0.2))
    off = register(fixed, fixed, model, iterations=1)
    assert any("very different volumes" in w and "x0.20" in w for w in off.warnings)
    assert off.map_volume_ratio == [pytest.approx(0.2)] * model.config.soi_channels


def test_mutual_information_has_its_known_values():
    a = np.array([0.0, 0.0, 1.0, 1.0] * 25)
    assert mutual_information(a, a) == pytest.approx(np.log(2))  # a copy: the entropy of two equal halves
    assert mutual_information(a, 1.0 - a) == pytest.approx(np.log(2))  # any one-to-one relabelling, as MI should
    b = np.array([0.0, 1.0, 0.0, 1.0] * 25)
    assert mutual_information(a, b) == pytest.approx(0.0, abs=1e-12)  # independent
    mask = np.arange(100) < 50
    assert mutual_information(a, b, mask) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(a, b, np.zeros(100, bool)) == 0.0


def test_the_information_warning_fires_only_below_the_kept_fraction():
    assert _information_check(0.3, 0.3) is None and _information_check(0.3, 0.3 * INFORMATION_KEPT) is None
    text = _information_check(0.294, 0.283)
    assert "less alike than the images as given" in text and "0.283 vs 0.294" in text
    assert _information_check(0.0, 0.0) is None


def test_register_measures_the_images_as_given_and_through_the_result(make_model, pair2d):
    fixed, moving = pair2d
    model = load_model(make_model(2, "affine", "istn-e"))
    same = register(fixed, fixed, model, iterations=0)  # inverse-consistent: an image and itself stays put
    assert same.information["result"] == pytest.approx(same.information["as_given"], rel=1e-6)
    assert not any("less alike" in w for w in same.warnings)
    # the raw one pass of an untrained network moves an image away from itself: less alike, and said so
    moved = register(fixed, fixed, model, iterations=0, symmetric=False)
    info = moved.information
    assert info["as_given"] == pytest.approx(same.information["as_given"])
    assert info["result"] < INFORMATION_KEPT * info["as_given"]
    assert any("less alike than the images as given" in w for w in moved.warnings)
    assert json.loads(json.dumps(moved.summary()))["mutual_information"] == info
    other = register(fixed, moving, model, iterations=0)
    assert set(other.information) == {"as_given", "result"} and other.information["as_given"] > 0


def test_varied_views_are_read_from_the_recipe_metadata():
    from istn.config import trained_on_varied_views, varied_alternatives

    plain = {"transform": "affine", "ndim": 3, "data_options": {"contrasts": ["t1"], "synth_prob": 0.0, "crop_prob": 0}}
    synth = {"transform": "affine", "ndim": 3, "data_options": {"contrasts": ["t1"], "synth_prob": 0.3}}
    assert not trained_on_varied_views(plain) and trained_on_varied_views(synth)
    assert trained_on_varied_views({"data_options": {"crop_prob": 0.3}})
    assert trained_on_varied_views({"data_options": {"contrasts": ["t1", "t2"]}})
    assert not trained_on_varied_views({}) and not trained_on_varied_views({"data_options": None})
    synth_b = dict(synth, transform="bspline")
    plain_b = dict(plain, transform="bspline")
    candidates = [("plain-b", plain_b), ("synth-b", synth_b), ("synth-a", synth), ("synth-2d", dict(synth, ndim=2))]
    assert varied_alternatives([plain, plain_b], candidates) == ["synth-a", "synth-b"]  # in the chain's order
    assert varied_alternatives([plain], candidates[:2]) == []  # no affine made for varied views
    assert varied_alternatives([synth, plain_b], candidates) == []  # the chain already has one


def test_the_varied_models_beside_are_read_from_the_used_models_folder(tmp_path):
    from istn.config import varied_models_beside

    plain = {"transform": "affine", "ndim": 3, "data_options": {"contrasts": ["t1"]}}
    synth = dict(plain, data_options={"synth_prob": 0.3})
    metas = {"a-plain.pt": plain, "b-broken.pt": None, "c-synth.pt": synth}
    for name in metas:
        (tmp_path / name).write_bytes(b"")
    read = []

    def read_meta(path):
        read.append(path.name)
        if metas[path.name] is None:
            raise ValueError("not a model")  # an unreadable file is no candidate
        return metas[path.name]

    assert varied_models_beside([(tmp_path / "a-plain.pt", plain)], read_meta) == [tmp_path / "c-synth.pt"]
    assert read == ["b-broken.pt", "c-synth.pt"]  # the used model itself is not read again
    read.clear()
    assert varied_models_beside([(tmp_path / "c-synth.pt", synth)], read_meta) == [] and read == []  # made for it


def test_the_command_line_names_the_varied_models_beside_after_a_failed_check(make_model, tmp_path, capsys,
                                                                           monkeypatch):
    import SimpleITK as sitk

    from conftest import blob_image, varied_copy
    from istn.cli import main

    folder = tmp_path / "models"
    folder.mkdir()
    plain = folder / "plain-affine.pt"
    plain.write_bytes(make_model(2, "affine", "istn-e", itn_output="sigmoid").read_bytes())
    varied = varied_copy(plain, folder / "varied-affine.pt")
    image = blob_image((40, 40), (1.5, 1.5), (-30.0, -30.0), np.eye(2))
    for name in ("f.nii.gz", "m.nii.gz"):
        sitk.WriteImage(image, str(tmp_path / name))
    args = ["register", "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "m.nii.gz"),
            "--refine", "1", "--quiet"]
    assert main(args + ["--model", str(plain), "--out", str(tmp_path / "quiet")]) == 0
    assert "hint" not in capsys.readouterr().err  # every check passed: nothing to suggest
    monkeypatch.setattr(registration, "_information_check", lambda given, result: "forced for the test")
    assert main(args + ["--model", str(plain), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "warning: plain-affine.pt: forced for the test" in err
    assert "hint: varied-affine.pt (beside plain-affine.pt)" in err and f"--model {varied}" in err
    stage = json.loads((tmp_path / "out" / "result.json").read_text())["stages"][0]
    assert stage["self_checks_failed"] == ["information"]
    assert main(args + ["--model", str(varied), "--out", str(tmp_path / "varied")]) == 0
    assert "hint" not in capsys.readouterr().err  # the varied model itself failed: nothing better beside it
