"""Label-driven synthesis, blur and field-of-view crops (istn.data.synthesis, AugmentConfig's new options).

Known answers: a label map renders to one intensity per label; a synthetic view of a structure is its
warped SoI up to scale, whatever the geometry; a crop zeroes exactly the voxels outside the kept slab;
the default configuration draws what it drew before these options existed (a frozen copy of the
sample_view of that time)."""

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from conftest import blob_image, tiny_config
from istn.data import augment
from istn.data.augment import Anatomy, AugmentConfig, AugmentedPairDataset, sample_view
from istn.data.synthesis import (CSF, GM, HEAD_BRIGHT, HEAD_DARK, WM, gaussian_blur, majority_filter,
                                 n_synthesis_labels, render_labels, synthesis_labels, tissue_from_classes,
                                 tissue_from_intensity, tissue_from_probabilities)

STILL = dict(rotation_deg=0, translation_mm=0, scale=0, shear=0, deform_mm=0, bias=0, gamma=0, noise=0)


def _anatomy(d: int = 2, tissue: bool = True) -> Anatomy:
    """A blob 'head' with one structure (label 1 where the blob > 0.7) and two tissue classes."""
    size = (40,) * d if d == 2 else (24,) * 3
    img = blob_image(size, (2.0,) * d, (-(size[0] - 1.0),) * d, np.eye(d), extra=False)
    arr = sitk.GetArrayFromImage(img)
    lab = sitk.GetImageFromArray((arr > 0.7).astype(np.uint8))
    lab.CopyInformation(img)
    tis = None
    if tissue:
        tis = sitk.GetImageFromArray(np.where(arr > 0.4, WM, np.where(arr > 0.1, GM, 0)).astype(np.uint8))
        tis.CopyInformation(img)
    return Anatomy.from_images(img, lab, [1], tissue=tis, name="blob")


# --------------------------------------------------------------------------
# Tissue maps and the label map of synthesis
# --------------------------------------------------------------------------


def test_tissue_from_probabilities_takes_the_most_probable_class_inside_the_brain():
    gm = np.array([[0.7, 0.2, 0.1, 0.0]])
    wm = np.array([[0.2, 0.7, 0.1, 0.0]])
    csf = np.array([[0.0, 0.0, 0.6, 0.1]])
    assert tissue_from_probabilities(gm, wm, csf).tolist() == [[GM, WM, CSF, 0]]


def test_the_non_brain_head_splits_into_dark_and_bright():
    image = np.zeros((20, 20), np.float32)
    image[2:18, 2:18] = 1.0  # bright scalp
    image[4:16, 4:16] = 0.05  # dark skull (inside the head: filled)
    image[6:14, 6:14] = 0.6  # brain
    gm = np.zeros_like(image)
    gm[6:14, 6:14] = 1.0
    t = tissue_from_probabilities(gm, np.zeros_like(image), np.zeros_like(image), image)
    assert t[10, 10] == GM and t[3, 10] == HEAD_BRIGHT and t[5, 10] == HEAD_DARK and t[0, 0] == 0


def test_classes_map_and_lose_their_speckle():
    km = np.full((9, 9), 5, np.uint8)
    km[4, 4] = 6  # one voxel of 'WM' in GM: speckle
    km[:, :2] = 4
    t = tissue_from_classes(km, {4: CSF, 5: GM, 6: WM})
    assert t[4, 4] == GM and t[4, 0] == CSF and (majority_filter(km)[:, 3:] == 5).all()


def test_intensity_classes_order_dark_to_bright():
    img = np.zeros((30, 30), np.float32)
    img[5:25, 5:25] = 0.3
    img[10:20, 10:20] = 0.6
    img[13:17, 13:17] = 1.0
    t = tissue_from_intensity(img, img > 0.1)
    assert t[6, 6] == CSF and t[11, 11] == GM and t[15, 15] == WM and t[0, 0] == 0


def test_structures_go_on_top_of_the_tissue():
    soi = torch.zeros(2, 1, 4)
    soi[0, 0, 1], soi[1, 0, 2] = 1.0, 0.8
    tissue = torch.tensor([[0, GM, GM, WM]])
    assert synthesis_labels(soi, tissue).tolist() == [[0, 1, 2, 2 + WM]]
    assert n_synthesis_labels(2) == 8


# --------------------------------------------------------------------------
# Rendering and synthetic views
# --------------------------------------------------------------------------


def _identity_sampling(shape):
    axes = [torch.linspace(-1, 1, s) for s in shape]
    mesh = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], -1)  # grid_sample wants (x, y[, z])
    return mesh[None]


def test_each_label_renders_to_its_mean():
    labels = torch.randint(0, 5, (12, 14), generator=torch.Generator().manual_seed(0))
    means = np.array([0.0, 0.2, 0.4, 0.6, 0.8])
    out = render_labels(labels, means, np.zeros(5), _identity_sampling(labels.shape))
    assert torch.allclose(out[0], torch.from_numpy(means).float()[labels], atol=1e-6)


def test_rendering_follows_a_known_translation():
    labels = torch.zeros(16, 16, dtype=torch.int64)
    labels[5:9, 4:7] = 1
    sampling = _identity_sampling(labels.shape)
    sampling[..., 0] += 2 * 2.0 / 15  # sample 2 voxels further along x: the content moves 2 voxels to -x
    out = render_labels(labels, np.array([0.0, 1.0]), np.zeros(2), sampling)[0]
    expected = torch.zeros(16, 16)
    expected[5:9, 2:5] = 1.0
    assert torch.allclose(out, expected, atol=1e-5)


def test_synthetic_view_has_one_intensity_per_label():
    an = _anatomy()
    cfg = tiny_config(2, grid_size=(40, 40), grid_spacing=2.0)
    aug = AugmentConfig(**STILL, synth_prob=1.0, synth_std=0.0, synth_smooth_mm=0.0)
    img, _ = sample_view(an, cfg, np.random.default_rng(3), aug)
    labels = an.labels
    values = [img[0][labels == v] for v in labels.unique()]
    assert len(values) == 4  # background, the structure, GM, WM
    assert all(float(v.max() - v.min()) < 1e-4 for v in values)
    assert len({round(float(v[0]), 3) for v in values}) == 4


def test_synthetic_image_follows_the_soi_under_any_geometry():
    # a structure on background only: the synthetic view is the warped SoI up to the intensity window
    an = _anatomy(3, tissue=False)
    an.tissue = torch.zeros(an.image.shape[1:], dtype=torch.int64)
    cfg = tiny_config(3, grid_size=(20, 20, 20), grid_spacing=2.0)
    aug = AugmentConfig(rotation_deg=25, translation_mm=6, scale=0.1, shear=0.05, deform_mm=3.0, bias=0, gamma=0,
                        noise=0, synth_prob=1.0, synth_std=0.0, synth_smooth_mm=0.0)
    img, soi = sample_view(an, cfg, np.random.default_rng(5), aug)
    assert soi.sum() > 20
    scale = float(img.max() / soi.max())
    assert scale > 0.5 and torch.allclose(img, (soi * scale).clamp(max=1.0), atol=1e-4)


def test_synthesis_and_variation_are_seeded():
    an = _anatomy()
    cfg = tiny_config(2, grid_size=(32, 32), grid_spacing=2.0)
    aug = AugmentConfig(synth_prob=0.5, crop_prob=0.5, blur_sigma_mm=(0.5, 2.0))
    ds = AugmentedPairDataset([an, an], cfg, 20, seed=1, moving=aug, fixed=aug)
    assert all(torch.equal(ds[7][k], ds[7][k]) for k in ds[7])
    views = [sample_view(an, cfg, np.random.default_rng(s), dataclasses.replace(aug, synth_prob=1.0))[0]
             for s in (0, 0, 1)]
    assert torch.equal(views[0], views[1]) and not torch.allclose(views[0], views[2])


def test_gaussian_blur_keeps_the_mean_and_smooths():
    x = torch.zeros(1, 21, 21)
    x[0, 10, 10] = 1.0
    y = gaussian_blur(x, [2.0, 0.0])
    assert abs(float(y.sum()) - 1.0) < 1e-5 and float(y[0, 10, 10]) < 0.25 and float(y[0, 10, 9]) == 0.0
    assert abs(float(y[0, 8, 10] / y[0, 10, 10]) - np.exp(-0.5)) < 1e-3


# --------------------------------------------------------------------------
# Cropped fields of view
# --------------------------------------------------------------------------


@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_crop_zeroes_exactly_the_outside_of_the_kept_slab(noise):
    an = _anatomy(3)
    cfg = tiny_config(3, grid_size=(24, 24, 24), grid_spacing=2.0)
    geometry = dict(rotation_deg=10, translation_mm=4, bias=0, gamma=0, noise=0)
    whole, soi = sample_view(an, cfg, np.random.default_rng(2), AugmentConfig(**geometry))
    crop = AugmentConfig(**{**geometry, "noise": noise}, crop_prob=1.0, crop_keep=(0.6, 0.6), crop_recentre=False)
    cropped, soi_c = sample_view(an, cfg, np.random.default_rng(2), crop)
    # the slab: the superior 60 % of the anatomy's extent along z (array axis 0; identity direction)
    rows = np.nonzero((whole[0] > 0.05).any(2).any(1).numpy())[0]
    keep_from = rows.max() - 0.6 * (rows.max() - rows.min())
    kept = torch.from_numpy(np.arange(24) >= keep_from - 1e-4)[:, None, None].expand(24, 24, 24)
    assert torch.equal(soi_c, soi)  # the structures are still there, unseen
    assert (cropped[0][~kept] == 0).all() and (whole[0][~kept] > 0.05).any()
    if noise == 0:
        assert torch.equal(cropped[0][kept], whole[0][kept])
    else:
        assert (cropped[0][kept] - whole[0][kept]).abs().max() < 0.2


def test_crop_recentres_the_view_on_what_is_left():
    an = _anatomy(3)
    cfg = tiny_config(3, grid_size=(24, 24, 24), grid_spacing=2.0)
    keep = AugmentConfig(**STILL, crop_prob=1.0, crop_keep=(0.5, 0.5))
    whole, _ = sample_view(an, cfg, np.random.default_rng(0), AugmentConfig(**STILL))
    cropped, soi = sample_view(an, cfg, np.random.default_rng(0), keep)
    centroid = lambda m: np.array(np.nonzero(m.numpy())).mean(1)  # noqa: E731
    # the kept half sits where the whole anatomy sat (inference centres on the cropped foreground) ...
    assert np.abs(centroid(cropped[0] > 0.05) - centroid(whole[0] > 0.05)).max() < 1.0
    # ... so the anatomy moved down (to -z) by about a quarter of its extent, SoI with it
    assert centroid(soi[0] > 0.5)[0] < centroid(whole[0] > 0.05)[0] - 2.0


def test_options_are_checked():
    with pytest.raises(ValueError, match="crop_keep"):
        AugmentConfig(crop_keep=(0.9, 0.5))
    with pytest.raises(ValueError, match="synth_prob"):
        AugmentConfig(synth_prob=1.5)


# --------------------------------------------------------------------------
# Old configurations replay exactly
# --------------------------------------------------------------------------


def _sample_view_before_synthesis(anatomy, cfg, rng, aug):
    """sample_view as it was before synthesis, crops and blur (main at 85a665f), frozen."""
    net = augment.network_grid(anatomy.grid, cfg, anatomy.centre if cfg.centre_on_foreground else None)
    d = net.ndim
    shape = net.shape
    pts = torch.from_numpy(net.world_points()).float()
    centre = torch.from_numpy(net.centre).float()
    lin, trans = augment._random_affine(rng, d, aug)
    pts = (pts - centre) @ torch.from_numpy(lin.T).float() + centre + torch.from_numpy(trans).float()
    if aug.deform_mm > 0:
        field = augment._smooth_field(rng, d, shape, aug.deform_points, aug.deform_mm)
        pts = pts + torch.movedim(field, 0, -1)
    w2n = torch.from_numpy(anatomy.grid.world_to_normalised_matrix()).float()
    norm = pts @ w2n[:d, :d].T + w2n[:d, d]
    grid = norm[None]
    image = F.grid_sample(anatomy.image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    soi = F.grid_sample(anatomy.soi[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    if aug.bias > 0:
        image = image * torch.exp(augment._smooth_field(rng, 1, shape, 3, aug.bias))
    if aug.gamma > 0:
        image = image.clamp(min=0) ** float(np.exp(rng.uniform(-aug.gamma, aug.gamma)))
    if aug.noise > 0:
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        image = image + aug.noise * torch.randn(image.shape, generator=g)
    return image.clamp(0.0, 1.5).float(), soi.float()


def _main_anatomy(d):
    size = (40,) * d if d == 2 else (24,) * 3
    img = blob_image(size, (2.0,) * d, (-(size[0] - 1.0),) * d, np.eye(d), extra=True)
    lab = sitk.GetImageFromArray((sitk.GetArrayFromImage(img) > 0.5).astype(np.uint8))
    lab.CopyInformation(img)
    return Anatomy.from_images(img, lab, [1])


@pytest.mark.parametrize("d", [2, 3])
def test_default_config_draws_what_it_drew_before(d):
    an = _main_anatomy(d)
    cfg = tiny_config(d, grid_size=(32,) * d if d == 2 else (16,) * 3, grid_spacing=2.0)
    old_configs = [AugmentConfig(), AugmentConfig(rotation_deg=3.0, translation_mm=3.0, scale=0.03, shear=0.0)]
    for aug in old_configs:
        for seed in range(3):
            new = sample_view(an, cfg, np.random.default_rng(seed), aug)
            old = _sample_view_before_synthesis(an, cfg, np.random.default_rng(seed), aug)
            assert all(torch.equal(a, b) for a, b in zip(new, old))
    # and the helpers the frozen copy calls still draw what they drew (sums recorded on main at 85a665f)
    img, soi = sample_view(an, cfg, np.random.default_rng(7), AugmentConfig())
    expected = {2: (84.18030067009386, 83.92425640765578), 3: (414.0842854759976, 281.537618321868)}[d]
    assert np.allclose([float(img.double().sum()), float(soi.double().sum())], expected, rtol=1e-5)
