"""The brain training data's options (benchmarks/train_brain.py) and tissue maps (istn.data.brain.tissue)."""

import json
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import train_brain  # noqa: E402
from istn.data.brain.tissue import tissue_map, tissue_source  # noqa: E402
from istn.data.synthesis import CSF, GM, HEAD_BRIGHT, HEAD_DARK, WM  # noqa: E402


def test_default_options_give_the_stages_variation_unchanged():
    for stage in ("affine", "bspline"):
        assert train_brain.augment_configs(stage, train_brain.DATA_DEFAULTS) == train_brain.AUGMENT[stage]
    assert train_brain.data_flags(train_brain.DATA_DEFAULTS) == ""


def test_options_reach_the_sides_they_are_meant_for():
    options = {"contrasts": ["t1", "t2"], "synth_prob": 0.3, "crop_prob": 0.2, "blur_mm": 1.5}
    moving, fixed = train_brain.augment_configs("affine", options)
    assert (moving.synth_prob, moving.crop_prob, moving.blur_sigma_mm) == (0.3, 0.2, (0.0, 1.5))
    assert (fixed.synth_prob, fixed.crop_prob, fixed.blur_sigma_mm) == (0.3, 0.0, (0.0, 0.0))
    assert train_brain.data_flags(options) == "--contrasts t1,t2 --synth-prob 0.3 --crop-prob 0.2 --blur-mm 1.5"


def test_mirroring_reaches_both_sides_with_left_and_right_channels_swapped():
    moving, fixed = train_brain.augment_configs("bspline", dict(train_brain.DATA_DEFAULTS, mirror_prob=0.5))
    names = train_brain.soi_names({})
    for side in (moving, fixed):
        assert side.mirror_prob == 0.5
        assert [names[k] for k in side.mirror_channels] == [
            n.replace("left", "#").replace("right", "left").replace("#", "right") for n in names]
    with_brain = train_brain.mirror_channels({"brain_channel": True})
    assert with_brain[-1] == len(with_brain) - 1  # the rest of the brain has no side
    assert train_brain.data_flags({"mirror_prob": 0.5}) == "--mirror-prob 0.5"


def test_the_command_line_refuses_bad_options():
    for argv in (["--contrasts", "t2"], ["--contrasts", "t1,flair"], ["--synth-prob", "1.5"], ["--crop-prob", "-1"],
                 ["--blur-mm", "-1"], ["--mirror-prob", "2"]):
        with pytest.raises(SystemExit) as e:
            train_brain.main(argv)
        assert e.value.code == 2  # argparse's usage error, before any data is read


def test_names_say_subject_and_contrast():
    assert train_brain.subject("spm_avg152_t2_brain") == "spm_avg152" == train_brain.subject("spm_avg152")
    assert train_brain.subject("itk_subject_brain") == "itk_subject"
    assert [train_brain.contrast(n) for n in ("spm_avg152", "spm_avg152_pd", "spm_avg152_t2_brain")] == ["t1", "pd", "t2"]


def test_a_run_folder_refuses_other_data_options(tmp_path):
    opts = dict(train_brain.DATA_DEFAULTS, synth_prob=0.5)
    train_brain.check_data_options(tmp_path, opts, write=True)
    assert json.loads((tmp_path / "data.json").read_text())["synth_prob"] == 0.5
    assert train_brain.check_data_options(tmp_path, opts, write=False)["synth_prob"] == 0.5
    with pytest.raises(SystemExit, match="--synth-prob 0.5"):
        train_brain.check_data_options(tmp_path, train_brain.DATA_DEFAULTS, write=True)
    old = tmp_path / "old"
    old.mkdir()
    (old / "last.pt").write_bytes(b"")  # trained before the options existed: the defaults
    with pytest.raises(SystemExit, match="default data"):
        train_brain.check_data_options(old, opts, write=True)


def _write(path, array):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(img, str(path))
    return img


def test_tissue_maps_from_what_the_anatomy_has(tmp_path):
    (tmp_path / "train").mkdir()
    t1 = np.zeros((12, 24, 24), np.float32)
    t1[:, 2:22, 2:22] = 1.0  # scalp
    t1[:, 4:20, 4:20] = 0.05  # skull
    t1[:, 6:18, 6:18] = 0.5  # GM
    t1[:, 8:16, 8:16] = 0.8  # WM
    t1[:, 10:14, 10:14] = 0.2  # CSF
    image = _write(tmp_path / "train" / "a_t1.nii.gz", t1)
    gm = ((t1 == 0.5) * 0.9).astype(np.float32)
    wm = ((t1 == 0.8) * 0.9).astype(np.float32)
    csf = ((t1 == 0.2) * 0.9).astype(np.float32)
    for n, a in (("gm", gm), ("wm", wm), ("csf", csf)):
        _write(tmp_path / "train" / f"a_{n}.nii.gz", a)
    t = sitk.GetArrayFromImage(tissue_map(tmp_path, "a", image))
    assert [t[6, 7, 7], t[6, 9, 9], t[6, 12, 12], t[6, 5, 12], t[6, 3, 12], t[6, 0, 0]] == \
        [GM, WM, CSF, HEAD_DARK, HEAD_BRIGHT, 0]
    assert "probability maps" in tissue_source(tmp_path, "a")
    km = np.select([t1 == 0.5, t1 == 0.8, t1 == 0.2], [5, 6, 4], 1).astype(np.uint8)
    _write(tmp_path / "train" / "itk_subject_kmeans.nii.gz", km)
    t = sitk.GetArrayFromImage(tissue_map(tmp_path, "itk_subject", image))
    assert [t[6, 7, 7], t[6, 9, 9], t[6, 12, 12], t[6, 3, 12]] == [GM, WM, CSF, HEAD_BRIGHT]
    mask = sitk.GetImageFromArray(((t1 >= 0.2) & (t1 <= 0.8)).astype(np.uint8))
    mask.CopyInformation(image)
    stripped = sitk.GetArrayFromImage(tissue_map(tmp_path, "a", image, mask))
    assert stripped[6, 7, 7] == GM and stripped[6, 3, 12] == 0
    # nothing for this anatomy: three intensity classes of the (brain-only) T1
    assert "intensity" in tissue_source(tmp_path, "b")
    brain = np.where((t1 >= 0.2) & (t1 <= 0.8), t1, 0).astype(np.float32)
    t = sitk.GetArrayFromImage(tissue_map(tmp_path, "b", _write(tmp_path / "train" / "b_t1.nii.gz", brain)))
    assert [t[6, 7, 7], t[6, 9, 9], t[6, 12, 12], t[6, 0, 0]] == [GM, WM, CSF, 0]


@pytest.mark.parametrize("transform", ["affine", "bspline"])
def test_a_brain_channel_added_to_a_trained_model_keeps_its_prediction(transform):
    import dataclasses

    import torch

    from conftest import perturbed_model, tiny_config
    from istn.config import TrainConfig, to_dict
    from istn.networks import ISTN

    cfg8 = tiny_config(3, transform, "istn-e", soi_channels=2, itn_output="sigmoid")
    old = perturbed_model(cfg8, seed=3)
    checkpoint = {"model": old.state_dict(), "config": to_dict(TrainConfig(model=cfg8)), "step": 700}
    tcfg = TrainConfig(model=dataclasses.replace(cfg8, soi_channels=3))
    start = train_brain.expand_soi_channels(checkpoint, tcfg)
    new = ISTN(tcfg.model)
    new.load_state_dict(start["model"])  # strict: every tensor has the new shape
    new.eval()
    assert start["step"] == 0 and start["config"]["model"]["soi_channels"] == 3
    torch.manual_seed(0)
    x, y = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        s_old, t_old, s_new, t_new = old.itn(x), old.itn(y), new.itn(x), new.itn(y)
        assert s_new.shape[1] == 3 and torch.allclose(s_new[:, :2], s_old)
        assert torch.allclose(new.predict(s_new, t_new), old.predict(s_old, t_old), atol=1e-6)
        # the new channel is a fresh output, not a copy, and reaches the STN once training moves its weights
        assert not torch.allclose(s_new[:, 2], s_new[:, 0])


def test_a_bspline_run_on_a_finer_control_grid_starts_from_a_trained_one_at_the_identity():
    import dataclasses

    import torch

    from conftest import perturbed_model, tiny_config
    from istn.config import TrainConfig, to_dict
    from istn.networks import ISTN

    coarse = tiny_config(3, "bspline", "istn-e", soi_channels=2, itn_output="sigmoid", cp_spacing_mm=24.0)
    old = perturbed_model(coarse, seed=3)
    checkpoint = {"model": old.state_dict(), "config": to_dict(TrainConfig(model=coarse)), "step": 700}
    tcfg = TrainConfig(model=dataclasses.replace(coarse, cp_spacing_mm=12.0))
    start = train_brain.regrid_bspline_head(checkpoint, tcfg)
    new = ISTN(tcfg.model)
    new.load_state_dict(start["model"])  # strict: every tensor has the run's shape
    new.eval()
    assert start["step"] == 0 and start["config"]["model"]["cp_spacing_mm"] == 12.0
    assert start["model"]["stn.head.weight"].shape[0] > old.state_dict()["stn.head.weight"].shape[0]
    for name, w in old.state_dict().items():
        if not name.startswith(("stn.head.", "basis")):  # basis*: the B-spline's sampling of its own grid
            assert torch.equal(start["model"][name], w), name  # the ITN and STN features carried over
    torch.manual_seed(0)
    x, y = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        s, t = new.itn(x), new.itn(y)
        assert torch.equal(s, old.itn(x))  # the same maps
        coeffs = new.predict(s, t)
        assert torch.count_nonzero(coeffs) == 0  # the identity deformation to start from
        assert torch.count_nonzero(old.predict(old.itn(x), old.itn(y))) > 0  # (the trained head was not)
    with pytest.raises(ValueError, match="only the control-point spacing"):
        train_brain.regrid_bspline_head(checkpoint, TrainConfig(model=dataclasses.replace(tcfg.model, soi_channels=3)))


def test_a_run_on_a_finer_network_grid_of_the_same_field_of_view_starts_from_every_trained_weight():
    """`regrid_network`: 16^3 x 4 mm -> 32^3 x 2 mm: every learned weight carried over, the grid's buffers (the
    B-spline bases, the base grid) the new grid's, as many control points; another field of view is refused."""
    import dataclasses

    import torch

    from conftest import perturbed_model, tiny_config
    from istn.config import TrainConfig, to_dict
    from istn.networks import ISTN

    coarse = tiny_config(3, "bspline", "istn-e", soi_channels=2, itn_output="sigmoid")
    old = perturbed_model(coarse, seed=3)
    checkpoint = {"model": old.state_dict(), "config": to_dict(TrainConfig(model=coarse)), "step": 700}
    tcfg = TrainConfig(model=dataclasses.replace(coarse, grid_size=(32, 32, 32), grid_spacing=2.0))
    start = train_brain.regrid_network(checkpoint, tcfg)
    new = ISTN(tcfg.model)
    new.load_state_dict(start["model"])  # strict: every tensor has the run's shape
    new.eval()
    assert start["step"] == 0 and start["config"]["model"]["grid_spacing"] == 2.0
    buffers = {name for name, _ in new.named_buffers()}
    fresh = ISTN(tcfg.model).state_dict()
    assert buffers and all(torch.equal(start["model"][b], fresh[b]) for b in buffers)  # the new grid's
    assert any(start["model"][b].shape != old.state_dict()[b].shape for b in buffers)  # (not the old ones)
    for name, w in old.state_dict().items():
        if name not in buffers:
            assert torch.equal(start["model"][name], w), name
    torch.manual_seed(0)
    x, y = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        coeffs = new.predict(new.itn(x), new.itn(y))
        assert coeffs.shape == old.predict(old.itn(x[..., ::2, ::2, ::2]), old.itn(y[..., ::2, ::2, ::2])).shape
        assert torch.count_nonzero(coeffs) > 0  # the trained head, not a fresh one
    with pytest.raises(ValueError, match="same field of view"):
        train_brain.regrid_network(checkpoint, TrainConfig(model=dataclasses.replace(coarse, grid_size=(32,) * 3)))


def test_the_brain_label_fills_the_brain_outside_the_structures():
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 2, 3] = 4
    brain = np.zeros_like(labels)
    brain[1:3, 1:4, 1:5] = 1
    lab_img, brain_img = sitk.GetImageFromArray(labels), sitk.GetImageFromArray(brain)
    lab_img.SetSpacing((2.0, 2.0, 2.0))
    brain_img.CopyInformation(lab_img)
    out = train_brain.with_brain_label(lab_img, brain_img)
    arr = sitk.GetArrayFromImage(out)
    assert out.GetSpacing() == (2.0, 2.0, 2.0)
    assert arr[1, 2, 3] == 4  # a structure keeps its label
    assert (arr == train_brain.BRAIN_LABEL).sum() == brain.sum() - 1
    assert (arr[brain == 0] == 0).all()
    assert train_brain.soi_labels({"brain_channel": True}) == train_brain.LABELS + (train_brain.BRAIN_LABEL,)
    assert train_brain.soi_labels({}) == train_brain.LABELS
    assert train_brain.data_flags({"brain_channel": True}) == "--brain-channel"


def test_an_excluded_anatomy_is_left_out_in_every_contrast(tmp_path):
    (tmp_path / "train").mkdir()
    head = np.zeros((10, 12, 12), np.float32)
    head[2:8, 2:10, 2:10] = 1.0
    labels = (head > 0).astype(np.uint8)
    rows = ["image,labels,contrast,name,labels_from"]
    for name, contrasts in (("a", ("t1", "t2", "pd")), ("b", ("t1",)), ("v", ("t1",))):
        _write(tmp_path / "train" / f"{name}_labels.nii.gz", labels)
        for c in contrasts:
            _write(tmp_path / "train" / f"{name}_{c}.nii.gz", head * (1 + contrasts.index(c)))
            rows.append(f"train/{name}_{c}.nii.gz,train/{name}_labels.nii.gz,{c},{name},test")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    quiet = dict(log=lambda *a, **k: None, contrasts=("t1", "t2", "pd"))
    train, val, _ = train_brain.load_anatomies(tmp_path, "v", **quiet)
    assert sorted(a.name for a in train) == ["a", "a_pd", "a_t2", "b"] and [a.name for a in val] == ["v"]
    train, val, described = train_brain.load_anatomies(tmp_path, "v", exclude=("a",), **quiet)
    assert [a.name for a in train] == ["b"] and [a.name for a in val] == ["v"]
    assert not any(d.startswith("a") for d in described)
    with pytest.raises(SystemExit, match="not in"):
        train_brain.load_anatomies(tmp_path, "v", exclude=("c",), **quiet)
    with pytest.raises(SystemExit, match="validation anatomy"):
        train_brain.load_anatomies(tmp_path, "v", exclude=("v",), **quiet)
    options = dict(train_brain.DATA_DEFAULTS, exclude=["a"])
    assert train_brain.data_flags(options) == "--exclude a"
    train_brain.check_data_options(tmp_path / "run", options, write=True)
    with pytest.raises(SystemExit, match="--exclude a"):  # a resume without the exclusion would mix data
        train_brain.check_data_options(tmp_path / "run", train_brain.DATA_DEFAULTS, write=True)


def test_soi_names_follow_the_protocol_labels_of_each_channel():
    """Exported brain models name their channels (metadata soi.names), so the engine's warnings can say which."""
    names = train_brain.soi_names(train_brain.DATA_DEFAULTS)
    assert names[0] == "left_caudate" and names[5] == "right_pallidum" and len(names) == 8
    with_brain = train_brain.soi_names(dict(train_brain.DATA_DEFAULTS, brain_channel=True))
    assert with_brain[:8] == names and with_brain[8] == "rest of the brain"


def test_a_card_written_again_keeps_what_other_scripts_and_hands_wrote_into_it():
    """Docs audit: rerunning a bundled card's own command rewrote the card without its measured input notes and the
    sections other benchmarks wrote; both are kept now, the notes at the end of "Input expectations"."""
    from conftest import REPO

    earlier = (REPO / "ISTNRegistration" / "Resources" / "Models" / "brain-t1-affine.md").read_text()
    begin, end = train_brain.KEPT_INPUTS
    assert begin in earlier and "<!-- refinement settings: written by" in earlier
    fresh = ("# card\n\n## Input expectations\n- generated bullet\n\n## Training data\ngenerated data\n\n"
             "## Licences of the training data\nlicences\n")
    card = train_brain.with_kept_sections(fresh, earlier)
    notes = earlier[earlier.index(begin):earlier.index(end) + len(end)]
    assert card.index("- generated bullet") < card.index(notes) < card.index("## Training data")
    for name in ("refinement settings", "speed settings", "structure maps", "affine passes"):
        section = earlier[earlier.index(f"<!-- {name}: written by"):earlier.index(f"<!-- end of {name} -->")]
        assert section in card and card.index(section) > card.index("licences")
    assert train_brain.with_kept_sections(fresh, "") == fresh  # a first card: as written
    assert train_brain.with_kept_sections(fresh, card) == card  # a second rerun: the same card

    # new weights: the kept sections say they describe the earlier ones, once however often it is rerun
    stale = train_brain.with_kept_sections(fresh, earlier, "measured on step 1")
    assert stale.count(train_brain.STALE_MARK + "measured on step 1") == 4
    again = train_brain.with_kept_sections(fresh, stale, "measured on step 2")  # still measured on step 1
    assert again.count(train_brain.STALE_MARK) == 4 and "step 2" not in again
    assert notes in again
    # the same weights exported again: the sections stand as they were
    assert train_brain.STALE_MARK not in card


def test_a_rerun_for_the_same_weights_keeps_what_other_scripts_wrote_into_the_model():
    """Review: a card's command rerun exported metadata without the refinement settings and the validation loss
    range that other scripts had written (the card kept describing them). For the same weights they are carried
    over; what the new export says itself wins."""
    earlier = {"format": 1, "refinement": {"iterations": 10}, "training": {"step": 5},
               "validation": {"mean_dice_one_pass": 0.4, "refinement_loss": {"refined": {"max": 1e-3}}}}
    fresh = {"format": 1, "training": {"step": 5, "best_val": 0.1}, "validation": {"mean_dice_one_pass": 0.5}}
    carried = train_brain.with_measurements_of(fresh, earlier)
    assert carried["refinement"] == {"iterations": 10}
    assert carried["validation"] == {"mean_dice_one_pass": 0.5, "refinement_loss": {"refined": {"max": 1e-3}}}
    assert carried["training"] == fresh["training"]
    a = {"w": torch.ones(2), "b": torch.zeros(1)}
    assert train_brain.same_state(a, {"w": torch.ones(2), "b": torch.zeros(1)})
    assert not train_brain.same_state(a, {"w": torch.ones(2), "b": torch.ones(1)})
    assert not train_brain.same_state(a, {"w": torch.ones(2)})
