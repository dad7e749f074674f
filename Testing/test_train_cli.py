"""`istn train` on a user's own data: spreadsheet-made CSVs read, every bad row, file or structure map refused in one
line before any step, nothing of the user's overwritten, and a run continued only with the settings it began with."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from istn.cli import main
from istn.training import load_checkpoint


@pytest.fixture
def data(toy_csv, tmp_path):
    """A private copy of the toy pairs (tests here edit files) and the base command line."""
    d = tmp_path / "data"
    shutil.copytree(toy_csv, d)
    base = ["train", "--train-csv", str(d / "pairs.csv"), "--soi-csv", str(d / "soi.csv"), "--grid-size", "32", "32",
            "--steps", "2", "--val-every", "2", "--quiet"]
    return d, base


def _error(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("istn train: error: "), lines
    return lines[0]


def test_a_spreadsheet_export_bom_crlf_and_spaces_trains_as_the_plain_csv(data, tmp_path):
    d, base = data
    rows = (d / "pairs.csv").read_text().splitlines()
    (d / "excel.csv").write_bytes(("\ufeff" + "\r\n".join(r.replace(",", ", ") for r in rows) + "\r\n\r\n")
                                  .encode("utf-8"))
    argv = [a if a != str(d / "pairs.csv") else str(d / "excel.csv") for a in base]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--out", str(tmp_path / "b")]) == 0
    a, b = (load_checkpoint(tmp_path / r / "last.pt") for r in "ab")
    for k in a["model"]:
        assert np.array_equal(a["model"][k].numpy(), b["model"][k].numpy()), k


@pytest.mark.parametrize("case", ["missing-file", "empty-cell", "nan-soi", "3d-soi", "float-labels", "val-no-soi",
                                  "soft-labels", "steps-0", "grid", "config-and-options", "export-is-input",
                                  "header-only", "cp-spacing", "no-structure", "export-is-a-listed-image",
                                  "loss-check-pairs", "lr-0", "grid-too-small", "cp-in-voxels", "cp-too-many",
                                  "soi-labels-0", "soi-labels-twice", "latin-1-csv", "csv-is-a-folder",
                                  "export-a-folder", "export-an-image-name", "validation-without-structures",
                                  "single-slice", "spacing-in-metres"])
def test_bad_training_input_is_refused_in_one_line_before_anything_is_written(data, tmp_path, capsys, case):
    d, base = data
    out = tmp_path / "run"
    extra = []
    soi = sitk.ReadImage(str(d / "src0_soi.nii.gz"))
    if case == "missing-file":
        (d / "src1.nii.gz").unlink()
        expected = "line 3: src 'src1.nii.gz' does not exist (relative paths are read from"
    elif case == "empty-cell":
        (d / "pairs.csv").write_text("src,trg\nsrc0.nii.gz,\n")
        expected = "line 2: the trg cell is empty"
    elif case == "nan-soi":
        arr = sitk.GetArrayFromImage(soi)
        arr[3, 3] = np.nan
        bad = sitk.GetImageFromArray(arr)
        bad.CopyInformation(soi)
        sitk.WriteImage(bad, str(d / "src0_soi.mha"))  # NIfTI's writer would keep the NaN too; MHA surely does
        (d / "soi.csv").write_text((d / "soi.csv").read_text().replace("src0_soi.nii.gz", "src0_soi.mha"))
        extra, expected = ["--soi-kind", "soft"], "contains NaN or infinite values"
    elif case == "3d-soi":
        sitk.WriteImage(sitk.JoinSeries([soi, soi]), str(d / "src0_soi.nii.gz"))
        expected = "is 3D but the model is 2D"
    elif case == "float-labels":
        sitk.WriteImage(sitk.Cast(soi, sitk.sitkFloat32) * 1.0001 + 0.5, str(d / "src0_soi.nii.gz"))
        extra, expected = ["--soi-kind", "labels", "--soi-labels", "1"], "non-integer values, not labels"
    elif case == "val-no-soi":
        extra, expected = ["--val-csv", str(d / "pairs.csv")], "--val-csv needs --val-soi-csv"
    elif case == "soft-labels":
        extra, expected = ["--soi-kind", "soft", "--soi-labels", "1", "2"], "--soi-labels picks values of label maps"
    elif case == "steps-0":
        extra, expected = ["--steps", "0"], "--steps must be at least 1"
    elif case == "loss-check-pairs":
        extra, expected = ["--loss-check-pairs", "-1"], "--loss-check-pairs must be 0 (none) or more, got -1"
    elif case == "grid":
        extra, expected = ["--grid-size", "32", "32", "32"], "'grid_size' must have 2 entries"
    elif case == "config-and-options":  # values equal to the defaults are given options too
        (d / "cfg.json").write_text("{}")
        base = ["train", "--config", str(d / "cfg.json"), "--variant", "istn-i", "--lr", "0.001"]
        expected = "--variant, --lr cannot be combined with --config"
    elif case == "export-is-a-listed-image":
        before = (d / "src1.nii.gz").read_bytes()
        extra, expected = ["--export", str(d / "src1.nii.gz"), "--overwrite"], "is one of the inputs"
    elif case == "header-only":
        (d / "pairs.csv").write_text("src,trg\n")
        expected = "has no rows (only its header)"
    elif case == "cp-spacing":
        extra, expected = ["--transform", "bspline", "--cp-spacing", "0"], "'cp_spacing_mm' must be > 0 mm"
    elif case == "no-structure":  # every map's label 1 far from its image: nothing on any network grid
        for f in d.glob("*_soi.nii.gz"):
            m = sitk.Cast(sitk.ReadImage(str(f)) > 0.5, sitk.sitkUInt8)
            m.SetOrigin((900.0, 900.0))
            sitk.WriteImage(m, str(f))
        extra, expected = ["--soi-kind", "labels"], "no training pair has any structure on the network grid"
        capsys.readouterr()
    elif case == "lr-0":  # trained nothing and exported a "best" model
        extra, expected = ["--lr", "0"], "'lr' (--lr) must be a finite number > 0, got 0"
    elif case == "grid-too-small":  # torch's "Expected more than 1 spatial element" after every image was read
        extra, expected = ["--grid-size", "16", "16"], "--grid-size 16 x 16 is too small to train"
    elif case == "cp-in-voxels":  # a spacing in voxels given as mm: killed by the OS for memory
        extra, expected = ["--transform", "bspline", "--cp-spacing", "0.01"], "puts control points closer than"
    elif case == "cp-too-many":
        extra = ["--transform", "bspline", "--grid-size", "1024", "1024", "--cp-spacing", "1"]
        expected = "B-spline parameters, an output layer of"
    elif case == "soi-labels-0":
        extra, expected = ["--soi-kind", "labels", "--soi-labels", "0", "1"], "distinct structure labels, not 0"
    elif case == "soi-labels-twice":
        extra, expected = ["--soi-kind", "labels", "--soi-labels", "1", "1"], "distinct structure labels, not 0"
    elif case == "latin-1-csv":  # an older Excel's CSV: the codec's message named no file
        (d / "pairs.csv").write_bytes((d / "pairs.csv").read_text().replace("src,trg", "src,trg,\u00e9").encode("cp1252"))
        extra, expected = ["--export", str(tmp_path / "m.pt")], f"pairs file '{d / 'pairs.csv'}' is not UTF-8 text"
    elif case == "csv-is-a-folder":
        base = [a if a != str(d / "pairs.csv") else str(d) for a in base]
        expected = f"pairs file '{d}' is a folder"
    elif case == "export-a-folder":  # 'runs/new/': a file named runs/new was written
        extra, expected = ["--export", str(tmp_path / "new") + "/"], "names a folder"
    elif case == "export-an-image-name":
        extra, expected = ["--export", str(tmp_path / "model.nii.gz")], "a model file is named .pt"
    elif case == "validation-without-structures":  # every score 0: the first checkpoint became the model
        for f in d.glob("*_soi.nii.gz"):
            sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(f)) > 0.5, sitk.sitkUInt8), str(f))
        for k in (3, 4):  # the validation pairs (--val-csv): their maps hold label 7 only
            for role in ("src", "trg"):
                f = d / f"{role}{k}_soi.nii.gz"
                sitk.WriteImage(sitk.ReadImage(str(f)) * 7, str(f))
        (d / "val.csv").write_text("src,trg\nsrc3.nii.gz,trg3.nii.gz\nsrc4.nii.gz,trg4.nii.gz\n")
        (d / "val_soi.csv").write_text("src,trg\nsrc3_soi.nii.gz,trg3_soi.nii.gz\nsrc4_soi.nii.gz,trg4_soi.nii.gz\n")
        extra = ["--soi-kind", "labels", "--soi-labels", "1", "--val-csv", str(d / "val.csv"), "--val-soi-csv",
                 str(d / "val_soi.csv")]
        expected = "no validation pair has any structure on the network grid"
    elif case == "single-slice":
        img = sitk.ReadImage(str(d / "src0.nii.gz"))
        sitk.WriteImage(sitk.JoinSeries([img]), str(d / "src0.nii.gz"))
        expected = "is a single slice stored as 3D; save it as a 2D image"
    elif case == "spacing-in-metres":  # trained on a 3e-5 mm crop of each image's centre
        extra, expected = ["--spacing", "1e-6"], "is 3.2e-05 mm across, less than two of image"
    else:
        before = (d / "pairs.csv").read_bytes()
        extra, expected = ["--export", str(d / "pairs.csv"), "--overwrite"], "is one of the inputs"
    assert main(base + extra + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    if case in ("no-structure", "validation-without-structures"):  # the warnings on the maps, then the error
        assert ("12 structure map(s) lies outside its image" if case == "no-structure" else
                "4 structure map(s) has no label 1") in err
        err = err.splitlines()[-1] + "\n"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("istn train: error: ") and expected in lines[0], lines
    if case in ("nan-soi", "3d-soi"):  # which row: a file may be listed in several
        assert f"pair 1 of '{d / 'pairs.csv'}' (and '{d / 'soi.csv'}'): structure map" in lines[0]
    assert not out.exists()
    if case == "export-is-input":
        assert (d / "pairs.csv").read_bytes() == before
    if case == "export-is-a-listed-image":
        assert (d / "src1.nii.gz").read_bytes() == before


def test_structures_missing_from_a_map_are_named_and_a_non_finite_loss_stops_the_run(data, tmp_path, capsys):
    d, base = data
    for f in d.glob("*_soi.nii.gz"):  # the blobs as label maps (value 1); no label 7 anywhere
        sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(f)) > 0.5, sitk.sitkUInt8), str(f))
    labels = ["--soi-kind", "labels", "--soi-labels", "1", "7"]
    # label 7 in no map at all: the model would claim a structure it never saw (it trained on, with a warning)
    assert main(base + labels + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "warning: 12 structure map(s) has no label 7: '" in err and "' and 11 more" in err  # 6 pairs, once
    assert "error: --soi-labels 7: no training pair has this label on its network grid" in err
    assert not (tmp_path / "a").exists()
    every = sorted(d.glob("*_soi.nii.gz"))  # label 7 in every map but one: trained, the one map named
    for f in every[1:]:
        m = sitk.ReadImage(str(f))
        arr = sitk.GetArrayFromImage(m)
        arr[2:5, 2:5] = 7
        seven = sitk.GetImageFromArray(arr)
        seven.CopyInformation(m)
        sitk.WriteImage(seven, str(f))
    assert main(base + labels + ["--out", str(tmp_path / "a")]) == 0
    assert f"warning: 1 structure map(s) has no label 7: '{every[0]}'" in capsys.readouterr().err
    # a map of another grid: present in its file, nothing of it on the image's network grid
    soi = sitk.ReadImage(str(d / "trg2_soi.nii.gz"))
    soi.SetOrigin((900.0, 900.0))
    sitk.WriteImage(soi, str(d / "trg2_soi.nii.gz"))
    assert main(base + ["--out", str(tmp_path / "b"), "--soi-kind", "soft"]) == 0
    assert ("1 structure map(s) lies outside its image (nothing of it on the network grid: another grid's map?): "
            f"'{d / 'trg2_soi.nii.gz'}'") in capsys.readouterr().err
    # a learning rate that blows up: stopped with what to do, not trained on to the end
    assert main(base + ["--out", str(tmp_path / "c"), "--lr", "1e30", "--steps", "6", "--soi-kind", "soft"]) == 1
    err = capsys.readouterr().err
    assert "became non-finite at step 2" in err and "stopped; no checkpoint was written" in err
    assert not (tmp_path / "c").exists()  # nothing of it left (no NaN checkpoint, no empty folder)


def test_the_users_files_and_runs_are_never_mixed_or_overwritten(data, tmp_path, capsys):
    d, base = data
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.pt").write_bytes(b"my model")
    assert main(base + ["--out", str(theirs)]) == 2
    assert "holds model.pt, not an istn training run's" in _error(capsys)
    assert (theirs / "model.pt").read_bytes() == b"my model"

    run = tmp_path / "run"
    assert main(base + ["--out", str(run)]) == 0
    capsys.readouterr()
    # the same folder with other data, or another variant: refused, the run as it was
    before = (run / "last.pt").read_bytes()
    shutil.copy(d / "pairs.csv", d / "other.csv")
    other = [a if a != str(d / "pairs.csv") else str(d / "other.csv") for a in base]
    assert main(other + ["--out", str(run), "--steps", "4"]) == 2
    assert "trained with other settings (train_csv: " in _error(capsys)
    assert main(base + ["--out", str(run), "--steps", "4", "--variant", "istn-e"]) == 2
    assert "(variant: 'istn-i' -> 'istn-e')" in _error(capsys)
    assert (run / "last.pt").read_bytes() == before
    # the same CSV named from another folder is the same run; another folder's file of that name is not
    import os

    here = os.getcwd()
    try:
        os.chdir(d)
        rel = ["train", "--train-csv", "pairs.csv", "--soi-csv", "soi.csv"] + base[5:]
        assert main(rel + ["--out", str(run), "--steps", "3"]) == 0
        (tmp_path / "elsewhere").mkdir()
        for name in ("pairs.csv", "soi.csv"):
            (tmp_path / "elsewhere" / name).write_text((d / name).read_text().replace("src0", "src1"))
        for f in d.glob("*.nii.gz"):
            (tmp_path / "elsewhere" / f.name).symlink_to(f)
        os.chdir(tmp_path / "elsewhere")
        assert main(rel + ["--out", str(run), "--steps", "4"]) == 2
        assert "trained with other settings (train_csv: " in _error(capsys)
    finally:
        os.chdir(here)
    capsys.readouterr()
    before = (run / "last.pt").read_bytes()
    # --export onto the run's own checkpoint: refused
    assert main(base + ["--out", str(run), "--steps", "3", "--export", str(run / "last.pt"), "--overwrite"]) == 2
    assert "is the run's own checkpoint last.pt" in _error(capsys) and (run / "last.pt").read_bytes() == before
    # ... also before it exists: a fresh run exporting onto its best.pt (or last.pt) would destroy itself
    for name in ("best.pt", "last.pt"):
        fresh = tmp_path / f"fresh-{name}"
        assert main(base + ["--out", str(fresh), "--export", str(fresh / name)]) == 2
        assert f"is the run's own checkpoint {name}" in _error(capsys) and not fresh.exists()
    # its own settings continue it; a --steps it has reached already says so
    assert main(base + ["--out", str(run), "--steps", "4"]) == 0
    assert load_checkpoint(run / "last.pt")["step"] == 4
    assert main(base + ["--out", str(run)]) == 0
    assert "is at step 4 already (--steps 2): nothing to train" in capsys.readouterr().err
    # files of the user's beside a run, named like a checkpoint's temporary file: left alone
    beside = tmp_path / "beside"
    beside.mkdir()
    for name in ("last.tmp", "best.tmp"):
        (beside / name).write_bytes(b"mine")
    assert main(base + ["--out", str(beside)]) == 0
    assert [(beside / n).read_bytes() for n in ("last.tmp", "best.tmp")] == [b"mine", b"mine"]
    assert sorted(p.name for p in beside.iterdir()) == ["best.pt", "best.tmp", "last.pt", "last.tmp", "model.pt"]
    # --export: an existing file of the user's needs --overwrite
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"keep")
    assert main(base + ["--out", str(run), "--export", str(mine)]) == 2
    assert "exists; choose another file name, or --overwrite" in _error(capsys)
    assert mine.read_bytes() == b"keep"


def test_without_validation_pairs_the_end_says_so(data, tmp_path, capsys):
    d, base = data
    (d / "one.csv").write_text("src,trg\nsrc0.nii.gz,trg0.nii.gz\n")
    (d / "one_soi.csv").write_text("src,trg\nsrc0_soi.nii.gz,trg0_soi.nii.gz\n")
    argv = ["train", "--train-csv", str(d / "one.csv"), "--soi-csv", str(d / "one_soi.csv"), "--grid-size", "32",
            "32", "--steps", "2", "--quiet", "--out", str(tmp_path / "r")]
    assert main(argv) == 0  # one pair: it trains (no pair left to validate), not "an empty training set"
    assert "no validation pairs: the model is the last step's (step 2)" in capsys.readouterr().out
    from istn.export import load_model
    assert "(it was trained without validation pairs)" in load_model(tmp_path / "r" / "model.pt").describe()


def test_the_model_stores_its_validation_pairs_losses_and_its_self_check_uses_them(data, tmp_path, capsys,
                                                                                  monkeypatch):
    """The loss self-check of a user's model: `istn train` registers the validation pairs with the exported model
    and stores their loss range, the same losses `register` gives on those pairs; without it the check is off."""
    from istn.data import read_pairs_csv, split_rows
    from istn.export import load_model
    from istn.io import read_image
    from istn.registration import register

    d, base = data
    argv = base[:base.index("--steps")] + ["--steps", "20", "--val-every", "5", "--lr", "0.01", "--quiet"]
    assert main(argv + ["--out", str(tmp_path / "r")]) == 0
    model = load_model(tmp_path / "r" / "model.pt")
    stored = model.meta["validation"]["refinement_loss"]
    assert model.meta["validation"]["refinement_loss_by"] == "istn train"
    _, val_rows = split_rows(6, 0.2, 0)  # the run's split (TrainConfig's val_fraction, split_seed)
    pairs = read_pairs_csv(d / "pairs.csv")
    again = [register(read_image(pairs[i][1]), read_image(pairs[i][0]), model, device="cpu", threads=1)
             for i in val_rows]
    assert stored["refined"]["n"] == stored["one_pass"]["n"] == len(val_rows) == 1
    assert stored["one_pass"]["max"] == pytest.approx(max(r.loss_one_pass for r in again), rel=1e-6)
    assert stored["refined"]["max"] == pytest.approx(max(r.similarity_final for r in again), rel=1e-6)
    assert "is not checked against them" not in model.describe()
    assert "validation pair(s) with the model for its loss self-check" not in capsys.readouterr().out  # --quiet

    # a pair unlike the validation pairs (noise for a moving image): its loss far above theirs is said, and the
    # same pair is quiet without them
    fixed = read_image(pairs[val_rows[0]][1])
    noise = np.random.default_rng(0).uniform(0, 1, sitk.GetArrayViewFromImage(fixed).shape).astype(np.float32)
    moving = sitk.GetImageFromArray(noise)
    moving.CopyInformation(fixed)
    flagged = register(fixed, moving, model, device="cpu", threads=1)
    assert "loss" in flagged.self_checks_failed, (flagged.similarity_final, stored)
    model.meta["validation"] = {}
    assert "loss" not in register(fixed, moving, model, device="cpu", threads=1).self_checks_failed

    # a validation pair that cannot be registered: the model is written all the same, without the range, said so
    import istn.registration

    def fails(*args, **kwargs):
        raise istn.registration.InputError("the pair cannot be registered")

    with monkeypatch.context() as patched:
        patched.setattr(istn.registration, "register", fails)
        assert main(base + ["--out", str(tmp_path / "failed")]) == 0
    assert "registering the validation pairs failed (the pair cannot be registered)" in capsys.readouterr().err
    failed = load_model(tmp_path / "failed" / "model.pt")
    assert "refinement_loss" not in failed.meta.get("validation", {})
    assert ("registering its validation pairs after training failed (the pair cannot be registered)"
            in failed.describe())

    assert main(base + ["--out", str(tmp_path / "none"), "--loss-check-pairs", "0"]) == 0  # 2 steps: a model
    unchecked = load_model(tmp_path / "none" / "model.pt")
    assert "refinement_loss" not in unchecked.meta.get("validation", {})
    assert "is not checked against them" in unchecked.describe()
    assert "(it was trained with --loss-check-pairs 0)" in unchecked.describe()
    unchecked.meta["validation"].pop("refinement_loss_missing")  # a model of an engine before the check
    assert "(the engine that made it did not store them" in unchecked.describe()


def test_the_export_carries_the_step_of_its_weights_into_a_new_folder(data, tmp_path, capsys):
    from istn.export import load_model

    d, base = data
    argv = base[:base.index("--steps")] + ["--quiet"]
    export = tmp_path / "models" / "new" / "mine.pt"  # folders made as needed
    assert main(argv + ["--steps", "6", "--val-every", "2", "--lr", "0.05", "--out", str(tmp_path / "r"),
                        "--export", str(export)]) == 0
    history = load_checkpoint(tmp_path / "r" / "last.pt")["history"]
    best = min(history, key=lambda h: h["soi_mse"])
    meta = load_model(export).meta["training"]
    assert meta["step"] == best["step"] == load_checkpoint(tmp_path / "r" / "best.pt")["step"]
    assert meta["best_val"] == pytest.approx(best["soi_mse"])
    # a model file is shared: where its data lay is not (a folder named after a patient); the checkpoint, which
    # continuing the run needs, keeps the full paths
    import json

    assert str(tmp_path) not in json.dumps(load_model(export).meta)
    assert meta["data"] == "pairs.csv" and meta["config"]["soi_csv"] == "soi.csv" and meta["config"]["out_dir"] == "r"
    assert load_checkpoint(tmp_path / "r" / "last.pt")["config"]["train_csv"] == str(d / "pairs.csv")
    assert f"(step {best['step']} of 6)" in capsys.readouterr().out


def test_ctrl_c_says_where_the_run_is_kept_and_the_same_command_continues_it(data, tmp_path, capsys, monkeypatch):
    import istn.training

    d, base = data
    argv = base[:base.index("--steps")] + ["--steps", "6", "--val-every", "2", "--quiet", "--out", str(tmp_path / "r")]
    real, calls = istn.training.variant_loss, []

    def interrupted_at_the_fourth_step(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(istn.training, "variant_loss", interrupted_at_the_fourth_step)
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert "stopped at step 3: the run is kept at step 2" in captured.out + captured.err
    monkeypatch.setattr(istn.training, "variant_loss", real)
    assert main(argv) == 0
    assert "resumed from" in capsys.readouterr().out and load_checkpoint(tmp_path / "r" / "last.pt")["step"] == 6
    # --no-resume, stopped before its first checkpoint: the folder's last.pt is the earlier run's, not this one's
    calls.clear()
    monkeypatch.setattr(istn.training, "variant_loss", interrupted_at_the_fourth_step)
    assert main(argv[:-2] + ["--val-every", "5", "--no-resume", "--out", str(tmp_path / "r")]) == 130
    captured = capsys.readouterr()
    assert ("stopped at step 3: no checkpoint was written yet (the folder's last.pt is the earlier run's)"
            in captured.out + captured.err)


def test_reading_the_pairs_is_reported_and_quiet_says_nothing(data, tmp_path, capsys, monkeypatch):
    """A large cohort is read before the first step: lines while it reads (throttled; every pair here, with the
    interval at 0), then what was read; --quiet prints none of it."""
    from istn.commands import train as train_command

    d, base = data
    assert main(base + ["--out", str(tmp_path / "q")]) == 0
    quiet = capsys.readouterr().out
    assert "pair(s)" not in quiet and "reading the" not in quiet

    class EveryPair(train_command._ReadingProgress):
        def __init__(self, quiet: bool) -> None:
            super().__init__(quiet, every=0.0)

    monkeypatch.setattr(train_command, "_ReadingProgress", EveryPair)
    loud = [a for a in base if a != "--quiet"]
    assert main(loud + ["--out", str(tmp_path / "l")]) == 0
    out = capsys.readouterr().out.splitlines()
    n = len((d / "pairs.csv").read_text().strip().splitlines()) - 1
    n_val = max(1, round(n * 0.2))  # the default validation fraction
    reading = [ln for ln in out if ln.startswith("reading the ")]
    # every pair but each set's last one (the summary line follows it)
    assert [ln.split(" (")[0] for ln in reading] == (
        [f"reading the training pairs: {k}/{n - n_val}" for k in range(1, n - n_val)]
        + [f"reading the validation pairs: {k}/{n_val}" for k in range(1, n_val)])
    summary = [ln for ln in out if ln.startswith("read ")]
    assert len(summary) == 1 and summary[0].startswith(
        f"read {n - n_val} training and {n_val} validation pair(s) onto the 32x32 network grid at ")


def test_label_maps_are_not_trained_as_one_soft_map_by_default(data, tmp_path, capsys):
    """--soi-kind is soft by default: label maps (values 0..3) were trained, without a word, as ONE channel
    scaled by its maximum (label 3 -> 1.0, label 1 -> 0.33; helper audit). Refused with what to say instead;
    an explicit --soi-kind soft is taken as meant, and binary masks stay fine as the default's soft map."""
    d, base = data
    for k, f in enumerate(sorted(d.glob("*_soi.nii.gz"))):
        blob = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        labels = sitk.GetImageFromArray(((blob > 0.2).astype(np.uint8) + (blob > 0.5) + (blob > 0.8)))
        labels.CopyInformation(sitk.ReadImage(str(f)))
        sitk.WriteImage(labels, str(f))
    assert main(base + ["--out", str(tmp_path / "a")]) == 2
    err = _error(capsys)
    assert "holds labels (1, 2, 3) (and 11 more map(s)), but --soi-kind is soft by default" in err
    assert "--soi-kind labels" in err
    assert not (tmp_path / "a").exists()
    assert main(base + ["--out", str(tmp_path / "b"), "--soi-kind", "soft"]) == 0
    assert main(base + ["--out", str(tmp_path / "c"), "--soi-kind", "labels", "--soi-labels", "1", "2", "3"]) == 0
    for f in d.glob("*_soi.nii.gz"):  # a mask (0/1): one structure, fine as the default soft map
        sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(f)) > 0, sitk.sitkUInt8), str(f))
    assert main(base + ["--out", str(tmp_path / "d")]) == 0
    # every pair is looked at, not the first alone (verifying helper): one label map among masks, in the last row
    last = sorted(d.glob("trg5_soi.nii.gz"))[0]
    mask = sitk.ReadImage(str(last))
    arr = sitk.GetArrayFromImage(mask)
    arr[:3, :3] = 5
    more = sitk.GetImageFromArray(arr)
    more.CopyInformation(mask)
    sitk.WriteImage(more, str(last))
    assert main(base + ["--out", str(tmp_path / "e")]) == 2
    assert f"structure map '{last}' holds labels (1, 5), but" in _error(capsys)
    # ... and a --config that does not say soi_kind gets the default, refused alike
    import json

    (d / "cfg.json").write_text(json.dumps({"model": {"ndim": 2, "grid_size": [32, 32]}, "steps": 2,
                                            "train_csv": str(d / "pairs.csv"), "soi_csv": str(d / "soi.csv")}))
    assert main(["train", "--config", str(d / "cfg.json"), "--out", str(tmp_path / "f"), "--quiet"]) == 2
    assert "holds labels (1, 5), but --soi-kind is soft by default" in _error(capsys)


def test_a_config_whose_itn_channels_do_not_match_its_structure_maps_is_refused(data, tmp_path, capsys):
    """A --config with soi_channels 4 and one-channel soft maps trained through a broadcasting shape mismatch
    (torch warned, the run 'succeeded'; verifying helper, session 31): refused before anything is written."""
    import json

    d, _ = data
    config = {"model": {"ndim": 2, "grid_size": [32, 32], "grid_spacing": 1.0, "soi_channels": 4},
              "train_csv": str(d / "pairs.csv"), "soi_csv": str(d / "soi.csv"), "soi_kind": "soft", "steps": 2}
    (d / "cfg.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert main(["train", "--config", str(d / "cfg.json"), "--out", str(out), "--quiet"]) == 2
    err = _error(capsys)
    assert "the structure maps give 1 channel(s) (soft) but the model's ITN has soi_channels 4" in err
    assert not out.exists()
    config["model"]["soi_channels"] = 1
    (d / "cfg.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(d / "cfg.json"), "--out", str(out), "--quiet"]) == 0


def test_under_torchrun_each_process_names_itself_in_its_error(data, capsys, monkeypatch):
    """torchrun starts one process per GPU and each says the error: which is which (docs audit: twice the same
    line), and the one line a plain run gives."""
    _, base = data
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(base + ["--steps", "0"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == ["istn train (process 1 of 2): error: --steps must be at least 1, got 0"], lines


# --------------------------------------------------------------------------
# Training data as researchers bring it (session 35 audit of istn train)
# --------------------------------------------------------------------------


def _label_maps(d):
    for f in d.glob("*_soi.nii.gz"):  # the blobs as label maps (value 1)
        sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(f)) > 0.5, sitk.sitkUInt8), str(f))


def test_maps_that_lost_their_images_header_are_named_in_a_warning(data, tmp_path, capsys):
    """A label map saved from an array (origin 0, spacing 1) beside an image at origin -15.5: its structure lies
    15.5 mm off, and training went on without a word (the README promised a warning)."""
    d, base = data
    _label_maps(d)
    for k in (0, 1):
        f = d / f"src{k}_soi.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.ReadImage(str(f)))), str(f))
    assert main(base + ["--soi-kind", "labels", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "warning: 2 structure map(s) have their image's voxel grid but another origin: a header lost" in err
    assert str(d / "src0_soi.nii.gz") in err
    (d / "soi2.csv").write_text((d / "soi.csv").read_text().replace("src0_soi", "trg0_soi").replace("src1_soi", "trg1_soi"))
    capsys.readouterr()
    assert main([a if a != str(d / "soi.csv") else str(d / "soi2.csv") for a in base] +
                ["--soi-kind", "labels", "--out", str(tmp_path / "other")]) == 0
    assert "voxel grid but another" not in capsys.readouterr().err


def test_pairs_listed_twice_or_sharing_images_with_validation_are_warned_of(data, tmp_path, capsys):
    d, base = data
    rows = (d / "pairs.csv").read_text().splitlines()
    maps = (d / "soi.csv").read_text().splitlines()
    (d / "twice.csv").write_text("\n".join(rows + rows[1:]) + "\n")  # 12 rows: the 6 pairs twice
    (d / "twice_soi.csv").write_text("\n".join(maps + maps[1:]) + "\n")
    argv = [{str(d / "pairs.csv"): str(d / "twice.csv"), str(d / "soi.csv"): str(d / "twice_soi.csv")}.get(a, a)
            for a in base]
    assert main(argv + ["--out", str(tmp_path / "twice")]) == 0
    err = capsys.readouterr().err
    assert "warning: 6 pair(s) listed more than once" in err
    assert "validation pair(s) share an image with training pairs" in err
    assert main(base + ["--out", str(tmp_path / "plain")]) == 0  # six distinct pairs of distinct images: quiet
    assert "warning" not in capsys.readouterr().err


def test_a_run_is_not_continued_on_csvs_rewritten_with_other_pairs(data, tmp_path, capsys):
    """The same CSV files, rewritten with the pairs swapped (and one dropped): resuming mixed two datasets and chose
    the best model across two validation sets. The same pairs, listed by another CSV file, still continue."""
    d, base = data
    run = tmp_path / "run"
    assert main(base + ["--out", str(run)]) == 0
    step = load_checkpoint(run / "last.pt")["step"]
    original = (d / "pairs.csv").read_text(), (d / "soi.csv").read_text()
    for name, text in zip(("pairs.csv", "soi.csv"), original):
        lines = text.splitlines()
        (d / name).write_text("\n".join([lines[0]] + [",".join(r.split(",")[::-1]) for r in lines[1:-1]]) + "\n")
    capsys.readouterr()
    assert main(base + ["--out", str(run), "--steps", "4"]) == 2
    assert "trained on other pairs: its CSV files list other images or structure maps now" in _error(capsys)
    assert load_checkpoint(run / "last.pt")["step"] == step
    for name, text in zip(("pairs.csv", "soi.csv"), original):
        (d / name).write_text(text.replace("\n", "\r\n"))  # the same pairs, written by a spreadsheet
    assert main(base + ["--out", str(run), "--steps", "4"]) == 0
    assert load_checkpoint(run / "last.pt")["step"] == 4


def test_segmentations_that_number_their_segments_differently_are_refused(data, tmp_path, capsys):
    """Slicer .seg.nrrd maps are read by their label values: one whose 'blob' is 2 where the others' is 1 would put
    different structures in one channel. Refused, naming the segment and both files."""
    d, base = data
    _label_maps(d)
    for k in range(6):
        for role in ("src", "trg"):
            f = d / f"{role}{k}_soi.nii.gz"
            m = sitk.ReadImage(str(f))
            value = 2 if (role, k) == ("trg", 2) else 1
            m = sitk.Cast(m * value, sitk.sitkUInt8)
            for key, v in (("Segment0_ID", "blob"), ("Segment0_Name", "blob"), ("Segment0_LabelValue", str(value)),
                           ("Segment0_Layer", "0")):
                m.SetMetaData(key, v)
            sitk.WriteImage(m, str(d / f"{role}{k}.seg.nrrd"))
    (d / "seg.csv").write_text((d / "soi.csv").read_text().replace("_soi.nii.gz", ".seg.nrrd"))
    argv = [a if a != str(d / "soi.csv") else str(d / "seg.csv") for a in base]
    assert main(argv + ["--soi-kind", "labels", "--out", str(tmp_path / "run")]) == 2
    line = _error(capsys)
    assert f"segment 'blob' is label 1 in '{d / 'src0.seg.nrrd'}' but 2 in '{d / 'trg2.seg.nrrd'}'" in line
    assert not (tmp_path / "run").exists()


def test_an_export_never_replaces_another_runs_checkpoint(data, tmp_path, capsys):
    d, base = data
    other = tmp_path / "other"
    assert main(base + ["--out", str(other)]) == 0
    before = (other / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "run"), "--export", str(other / "last.pt"), "--overwrite"]) == 2
    assert "is a training run's checkpoint: replacing it with a model would end that run" in _error(capsys)
    assert (other / "last.pt").read_bytes() == before
    assert main(base + ["--out", str(tmp_path / "run"), "--export", str(tmp_path / "run" / "BEST.PT")]) == 2
    assert "is the run's own checkpoint best.pt" in _error(capsys)


def test_a_configs_relative_csv_paths_are_read_from_its_folder(data, tmp_path, capsys, monkeypatch):
    """A config beside its CSVs trains from any working folder (they were read from the working folder: the run
    failed, 'pairs file does not exist', unless started beside them); one written for the working folder is
    refused naming the path to write."""
    import json

    d, _ = data
    config = {"model": {"ndim": 2, "grid_size": [32, 32], "grid_spacing": 1.0}, "train_csv": "pairs.csv",
              "soi_csv": "soi.csv", "soi_kind": "soft", "steps": 2, "val_every": 2}
    (d / "cfg.json").write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--config", str(d / "cfg.json"), "--out", "run", "--quiet"]) == 0
    saved = load_checkpoint(elsewhere / "run" / "last.pt")["config"]  # the run's folder: from the working folder
    assert saved["train_csv"] == str(d / "pairs.csv") and saved["soi_csv"] == str(d / "soi.csv")
    # written for the working folder (data/pairs.csv from tmp_path), kept in a folder of its own: said which
    monkeypatch.chdir(tmp_path)
    (elsewhere / "cfg.json").write_text(json.dumps({**config, "train_csv": "data/pairs.csv",
                                                    "soi_csv": "data/soi.csv"}))
    assert main(["train", "--config", str(elsewhere / "cfg.json"), "--out", "run2", "--quiet"]) == 2
    err = _error(capsys)
    assert "train_csv 'data/pairs.csv' is read from the config's folder" in err and str(d / "pairs.csv") in err
    assert not (tmp_path / "run2").exists()


def test_soi_labels_without_values_is_refused(data, tmp_path, capsys):
    """``--soi-labels`` with no value after it was read as none given: every non-zero voxel one structure."""
    d, base = data
    with pytest.raises(SystemExit) as e:
        main(base + ["--soi-kind", "labels", "--out", str(tmp_path / "run"), "--soi-labels"])
    assert e.value.code == 2 and "--soi-labels: expected at least one argument" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_label_maps_listed_as_images_are_warned_of(data, tmp_path, capsys):
    """--train-csv and --soi-csv swapped (masks as the images, the images as soft maps) trained without a word: the
    network learns structures from labels it never gets at test time. Now the images of a handful of whole-number
    values are counted in a warning; the CSVs as meant stay quiet."""
    d, base = data
    for f in d.glob("*_soi.nii.gz"):
        sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(f)) > 0.5, sitk.sitkUInt8), str(f))
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert "whole-number values" not in capsys.readouterr().err
    swapped = [str(d / "soi.csv") if a == str(d / "pairs.csv") else str(d / "pairs.csv") if a == str(d / "soi.csv")
               else a for a in base]
    assert main(swapped + ["--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "warning: 12 image(s) hold only a handful of whole-number values, as label maps and masks do" in err
    assert "are the two swapped?" in err
