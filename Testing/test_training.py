"""Training: all four variants, seeded reproducibility, resume, checkpoints loadable with weights_only."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import blob_image, tiny_config
from istn.config import TrainConfig
from istn.data import load_pair, read_pairs_csv, split_rows
from istn.networks import ISTN
from istn.training import (batch_indices, build_datasets, learning_rate, load_checkpoint, model_from_checkpoint,
                           train, validate)


def _cfg(root, out, variant="istn-i", transform="affine", steps=6):
    return TrainConfig(model=tiny_config(2, transform, variant, grid_size=(32, 32), grid_spacing=1.0),
                       train_csv=str(root / "pairs.csv"), soi_csv=str(root / "soi.csv"), soi_kind="soft",
                       steps=steps, batch_size=2, val_every=3, val_fraction=0.34, out_dir=str(out), lr=1e-2)


def test_csv_pairs_resolve_relative_to_the_csv(toy_csv):
    pairs = read_pairs_csv(toy_csv / "pairs.csv")
    assert len(pairs) == 6 and pairs[0][0] == toy_csv / "src0.nii.gz"


def test_split_is_seeded_and_disjoint():
    tr, va = split_rows(100, 0.2, 0)
    assert len(va) == 20 and not set(tr) & set(va) and split_rows(100, 0.2, 0) == (tr, va)


def test_batches_are_a_deterministic_function_of_the_step():
    assert batch_indices(10, 3, 42, 5) == batch_indices(10, 3, 42, 5)
    epoch0 = [i for s in range(3) for i in batch_indices(10, 3, 42, s)]
    assert len(set(epoch0)) == 9  # no repeats within an epoch


@pytest.mark.parametrize("variant", ["stn-u", "stn-s", "istn-e", "istn-i"])
@pytest.mark.parametrize("transform", ["affine", "bspline"])
def test_every_variant_trains_and_lowers_its_validation_error(toy_csv, tmp_path, variant, transform):
    cfg = _cfg(toy_csv, tmp_path, variant, transform, steps=12)
    train_set, val_set = build_datasets(cfg)
    untrained = validate(ISTN(cfg.model), val_set, torch.device("cpu"))["soi_mse"]  # the identity transform
    res = train(cfg, train_set, val_set, progress=False)
    vals = [h["soi_mse"] for h in res.history]
    assert len(vals) == 4 and all(np.isfinite(vals))
    assert res.best_val == min(vals) < untrained
    ck = load_checkpoint(res.best_checkpoint)  # weights_only=True
    assert ck["config"]["model"]["variant"] == variant


def test_training_is_reproducible_and_resume_matches_an_uninterrupted_run(toy_csv, tmp_path):
    a = train(_cfg(toy_csv, tmp_path / "a", steps=6), progress=False)
    b = train(_cfg(toy_csv, tmp_path / "b", steps=6), progress=False)
    wa, wb = load_checkpoint(a.last_checkpoint)["model"], load_checkpoint(b.last_checkpoint)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # interrupted: 3 steps, then resumed to 6
    train(_cfg(toy_csv, tmp_path / "c", steps=3), progress=False)
    c = train(_cfg(toy_csv, tmp_path / "c", steps=6), progress=False)
    wc = load_checkpoint(c.last_checkpoint)["model"]
    assert c.step == 6
    secs = [h["seconds"] for h in load_checkpoint(c.last_checkpoint)["history"]]
    assert secs == sorted(secs)  # training time continues across the resume
    assert all(torch.allclose(wa[k], wc[k], atol=1e-6) for k in wa)


def test_resuming_a_run_with_another_network_is_refused_and_its_checkpoint_kept(toy_csv, tmp_path):
    import dataclasses

    train(_cfg(toy_csv, tmp_path, transform="bspline", steps=3), progress=False)
    before = (tmp_path / "last.pt").read_bytes()
    cfg = _cfg(toy_csv, tmp_path, transform="bspline", steps=6)
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, cp_spacing_mm=cfg.model.cp_spacing_mm / 2))
    with pytest.raises(ValueError, match="another network"):
        train(other, progress=False)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert train(cfg, progress=False).step == 6  # its own settings still resume it


def test_learning_rate_anneals_from_the_decay_step_to_the_final_fraction():
    constant = TrainConfig(lr=1e-3, steps=100)
    assert {learning_rate(constant, s) for s in (0, 50, 99)} == {1e-3}
    cfg = TrainConfig(lr=1e-3, steps=100, lr_decay_start=60, lr_final=0.1)
    rates = [learning_rate(cfg, s) for s in range(100)]
    assert rates[:60] == [1e-3] * 60 and rates[60] < 1e-3  # constant for the first 60 updates
    assert rates[79] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way down the half cosine
    assert rates[99] == pytest.approx(1e-4)  # the final fraction at the last update
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    with pytest.raises(ValueError, match="lr_final"):
        TrainConfig(lr_final=1.5)


def test_annealed_training_records_its_rates_and_resumes_on_the_same_schedule(toy_csv, tmp_path):
    def cfg(out, steps):
        return TrainConfig(**{**_cfg(toy_csv, out, steps=steps).__dict__, "lr_decay_start": 3, "lr_final": 0.0})

    a = train(cfg(tmp_path / "a", 9), progress=False)
    assert [h["lr"] for h in a.history] == pytest.approx([1e-2, 1e-2 * 0.5, 0.0])  # the updates to steps 3, 6, 9
    train(cfg(tmp_path / "b", 6), progress=False)  # interrupted at step 6 (its schedule then ended at 6) ...
    b = train(cfg(tmp_path / "b", 9), progress=False)  # ... and resumed with the longer run's schedule
    assert b.step == 9 and b.history[-1]["lr"] == pytest.approx(0.0)


def test_init_from_starts_a_new_run_from_another_variants_weights(toy_csv, tmp_path):
    a = train(_cfg(toy_csv, tmp_path / "i", "istn-i", steps=3), progress=False)
    start = load_checkpoint(a.last_checkpoint)["model"]
    cfg = _cfg(toy_csv, tmp_path / "e", "istn-e", steps=1)
    cfg.lr = 0.0  # one step that changes nothing: the weights must be exactly the ones loaded
    e = train(cfg, progress=False, init_from=a.last_checkpoint)
    ck = load_checkpoint(e.last_checkpoint)
    assert ck["step"] == 1 and ck["config"]["model"]["variant"] == "istn-e"
    assert all(torch.equal(start[k], ck["model"][k]) for k in start)
    # another network (B-spline head) is refused with a clear message, before anything is written
    with pytest.raises(ValueError, match=r"a checkpoint of another network \(transform: 'affine' -> 'bspline'"):
        train(_cfg(toy_csv, tmp_path / "b", "istn-e", "bspline", steps=1), progress=False, init_from=a.last_checkpoint)
    assert not (tmp_path / "b" / "last.pt").exists()


def test_model_and_config_rebuild_from_checkpoint(toy_csv, tmp_path):
    res = train(_cfg(toy_csv, tmp_path, steps=3), progress=False)
    model, cfg = model_from_checkpoint(res.best_checkpoint)
    assert cfg.model.grid_size == (32, 32) and cfg.steps == 3
    x = torch.rand(1, 1, 32, 32)
    assert torch.allclose(model(x, x)[2], res.model(x, x)[2])


def test_label_soi_encoding_gives_one_channel_per_label(tmp_path):
    img = blob_image((16, 16), (1.0, 1.0), (0.0, 0.0), np.eye(2))
    labels = sitk.GetImageFromArray(np.repeat(np.arange(4), 64).reshape(16, 16).astype(np.uint8))
    sitk.WriteImage(img, str(tmp_path / "i.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "l.nii.gz"))
    cfg = tiny_config(2, grid_size=(16, 16), grid_spacing=1.0, soi_channels=2)
    p = load_pair(tmp_path / "i.nii.gz", tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", tmp_path / "l.nii.gz", cfg,
                  "labels", (1, 3))
    assert p.source_soi.shape == (1, 2, 16, 16)
    assert p.source_soi[0, 0].sum() == 64 and p.source_soi[0, 1].sum() == 64


def test_training_feeds_the_network_what_registration_feeds_it_however_the_files_are_stored(tmp_path):
    """A 1 mm volume (odd sizes) for a 4 mm grid: training resampled the raw image (aliased; statistics from every
    n-th stored voxel) while registration block-averages it (helper audit, session 31: inputs 0.045 apart, and
    RAS- vs LPS-stored training sets gave other weights). Now a training pair's image tensor is exactly the
    registration's network input, and the same for the file stored LPS, RAS or sagittal."""
    from istn.data import image_to_tensor, network_grid
    from istn.inputs import clear_cache, prepare_image

    head = blob_image((61, 53, 67), (1.0, 1.0, 1.0), (-18.0, -38.0, -22.0), np.eye(3), centre=(4.0, -6.0, 8.0))
    arr = sitk.GetArrayFromImage(head) + np.random.default_rng(5).normal(0, 0.05, head.GetSize()[::-1])
    image = sitk.GetImageFromArray(arr.astype(np.float32))
    image.CopyInformation(head)
    labels = sitk.Cast(head > 0.5, sitk.sitkUInt8)
    cfg = tiny_config(3, grid_size=(24, 24, 24), grid_spacing=4.0, soi_channels=1)
    clear_cache()
    prepared = prepare_image(image, 4.0, (0.5, 99.5), True, cfg.centre_on_foreground)
    assert prepared.shrink == (2, 2, 2)
    expected = image_to_tensor(prepared.image, network_grid(prepared.image, cfg, prepared.centre), prepared.window)
    tensors = {}
    for code in ("LPS", "RAS", "ASL"):
        sitk.WriteImage(sitk.DICOMOrient(image, code), str(tmp_path / f"i_{code}.nii.gz"))
        sitk.WriteImage(sitk.DICOMOrient(labels, code), str(tmp_path / f"l_{code}.nii.gz"))
        clear_cache()
        p = load_pair(tmp_path / f"i_{code}.nii.gz", tmp_path / f"i_{code}.nii.gz", tmp_path / f"l_{code}.nii.gz",
                      tmp_path / f"l_{code}.nii.gz", cfg, "labels", (1,))
        tensors[code] = p
        assert torch.allclose(p.source, expected, atol=1e-6), code
    for code in ("RAS", "ASL"):
        assert torch.equal(tensors[code].source_soi, tensors["LPS"].source_soi), code


def test_normalised_soi_loss_does_not_reward_warping_structures_out_of_view():
    """With sparse SoI, plain MSE prefers an empty warped map to a misaligned one; nmse does not."""
    import torch.nn.functional as F

    from istn.losses import normalised_mse

    target = torch.zeros(1, 1, 32, 32)
    target[0, 0, 10:14, 10:14] = 1.0
    misaligned = torch.roll(target, 8, dims=3)  # no overlap
    empty = torch.zeros_like(target)  # everything warped out of view
    assert F.mse_loss(empty, target) < F.mse_loss(misaligned, target)
    assert normalised_mse(empty, target) == pytest.approx(1.0, abs=1e-4)
    assert normalised_mse(misaligned, target) == pytest.approx(1.0, abs=1e-4)
    half = torch.roll(target, 2, dims=3)  # half overlap: better than both
    assert normalised_mse(half, target) < normalised_mse(empty, target)
    assert normalised_mse(target, target) == 0.0


def test_training_with_the_normalised_soi_loss(toy_csv, tmp_path):
    cfg = _cfg(toy_csv, tmp_path, "istn-i", steps=6)
    cfg.soi_loss = "nmse"
    res = train(cfg, progress=False)
    assert np.isfinite(res.best_val)
    assert load_checkpoint(res.best_checkpoint)["config"]["soi_loss"] == "nmse"


def test_image_weight_adds_the_dense_intensity_term():
    from istn.losses import variant_loss
    from istn.transforms import identity_grid

    s, t = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
    soi = torch.zeros(1, 1, 8, 8)
    g = identity_grid([8, 8])
    base = variant_loss("istn-e", s, t, soi, soi, soi, soi, g, "nmse")
    with_image = variant_loss("istn-e", s, t, soi, soi, soi, soi, g, "nmse", image_weight=2.0)
    assert float(with_image - base) == pytest.approx(2.0 * float(((s - t) ** 2).mean()), rel=1e-5)


def test_istn_e_itn_terms_follow_the_soi_loss():
    from istn.losses import variant_loss
    from istn.transforms import identity_grid

    s, t = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
    soi = torch.zeros(1, 1, 8, 8)
    soi[..., 2:5, 3:6] = 1.0
    g = identity_grid([8, 8])
    half = 0.5 * soi  # ITN output at half strength; warped SoI (identity) is exact
    # nmse: |0.5 S - S|^2 / (|0.5 S|^2 + |S|^2) = 0.25 / 1.25 per ITN term, whatever the structure's size
    assert float(variant_loss("istn-e", s, t, soi, soi, half, half, g, "nmse")) == pytest.approx(0.4, rel=1e-5)
    # mse: the same error averaged over all pixels (9 of 64 in the structure)
    assert float(variant_loss("istn-e", s, t, soi, soi, half, half, g, "mse")) == pytest.approx(
        2 * 0.25 * 9 / 64, rel=1e-5)


def test_soft_maps_and_landmarks_are_scaled_to_unit_maximum():
    from istn.data import encode_soi

    soft = np.zeros((6, 6), np.uint8)
    soft[2, 3], soft[4, 4] = 208, 104  # synth2d-like blurred map, 0..208
    enc = encode_soi(soft, "soft")
    assert enc.shape == (1, 6, 6) and enc.max() == 1.0 and enc[0, 4, 4] == 0.5
    assert np.array_equal(encode_soi(soft, "landmarks"), enc)
    binary = encode_soi(soft, "labels")  # no label list: any non-zero label is the structure
    assert binary.sum() == 2 and binary.max() == 1.0


def test_soi_to_tensor_through_a_transform():
    from istn.data import soi_to_tensor
    from istn.geometry import Grid

    labels = np.zeros((8, 8, 8), np.uint8)
    labels[4, 4, 4] = 3
    img = sitk.GetImageFromArray(labels)
    img.SetSpacing((2.0, 2.0, 2.0))
    grid = Grid.from_image(img)
    plain = soi_to_tensor(img, grid, "labels", (3,))
    assert plain.shape == (1, 1, 8, 8, 8) and plain[0, 0, 4, 4, 4] == 1.0
    # grid point x samples the labels at x + 2 mm (one voxel along x): the structure appears one voxel lower
    moved = soi_to_tensor(img, grid, "labels", (3,), sitk.TranslationTransform(3, (2.0, 0.0, 0.0)))
    assert moved[0, 0, 4, 4, 3] == 1.0 and float(moved.sum()) == 1.0


def test_a_structure_map_saved_as_grey_rgb_is_read_as_its_grey_map(tmp_path):
    """A viewer's PNG export of a structure map (RGB(A), equal channels) is the map, as for the images (helper
    audit: it was refused with '3 components per pixel'); a true-colour picture is still refused."""
    from istn.data.pairs import read_soi
    from istn.errors import InputError

    blob = (sitk.GetArrayFromImage(blob_image((24, 20), (1.0, 1.0), (0.0, 0.0), np.eye(2))) * 200).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(blob), str(tmp_path / "grey.png"))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([blob] * 3, -1), isVector=True), str(tmp_path / "rgb.png"))
    grey, rgb = read_soi(tmp_path / "grey.png", 2, "soft"), read_soi(tmp_path / "rgb.png", 2, "soft")
    assert np.array_equal(sitk.GetArrayFromImage(rgb), sitk.GetArrayFromImage(grey)) and blob.max() > 100
    colour = np.stack([blob, blob // 2, blob], -1)
    sitk.WriteImage(sitk.GetImageFromArray(colour, isVector=True), str(tmp_path / "colour.png"))
    with pytest.raises(InputError, match="3 components per pixel"):
        read_soi(tmp_path / "colour.png", 2, "soft")
