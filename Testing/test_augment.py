"""On-the-fly augmentation: seeded, geometry shared by image and SoI, ranges respected."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import blob_image, tiny_config
from istn.data.augment import Anatomy, AugmentConfig, AugmentedPairDataset, sample_view


def _anatomy(tmp_path):
    img = blob_image((40, 40), (2.0, 2.0), (-39.0, -39.0), np.eye(2), extra=False)
    lab = sitk.GetImageFromArray((sitk.GetArrayFromImage(img) > 0.5).astype(np.uint8))
    lab.CopyInformation(img)
    sitk.WriteImage(img, str(tmp_path / "i.nii.gz"))
    sitk.WriteImage(lab, str(tmp_path / "l.nii.gz"))
    return Anatomy.from_files(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", [1])


def test_items_are_seeded_by_index(tmp_path):
    an = _anatomy(tmp_path)
    ds = AugmentedPairDataset([an, an], tiny_config(2, grid_size=(32, 32), grid_spacing=2.0), 10, seed=3)
    a, b, c = ds[4], ds[4], ds[5]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["source"], c["source"])


def test_soi_follows_the_image_geometry(tmp_path):
    an = _anatomy(tmp_path)
    cfg = tiny_config(2, grid_size=(32, 32), grid_spacing=2.0)
    aug = AugmentConfig(rotation_deg=20, translation_mm=10, bias=0, gamma=0, noise=0)
    img, soi = sample_view(an, cfg, np.random.default_rng(0), aug)
    # the label was "image > 0.5" before warping: it still is, up to interpolation at the border
    agree = ((img[0] > 0.5) == (soi[0] > 0.5)).float().mean()
    assert agree > 0.97
    # and the view really moved: the blob centre is displaced from the grid centre
    ys, xs = np.nonzero(soi[0].numpy() > 0.5)
    assert abs(xs.mean() - 15.5) + abs(ys.mean() - 15.5) > 1.0


def test_no_variation_reproduces_the_anatomy(tmp_path):
    an = _anatomy(tmp_path)
    cfg = tiny_config(2, grid_size=(40, 40), grid_spacing=2.0)
    none = AugmentConfig(rotation_deg=0, translation_mm=0, scale=0, shear=0, deform_mm=0, bias=0, gamma=0, noise=0)
    img, soi = sample_view(an, cfg, np.random.default_rng(0), none)
    assert torch.allclose(img, an.image, atol=1e-5) and torch.allclose(soi, an.soi, atol=1e-5)


def test_mirror_is_the_left_right_flip_with_left_and_right_structures_swapped():
    # an asymmetric head: a large structure (label 1) left of centre, a small one (label 2) right of it
    yy, xx = np.mgrid[0:40, 0:40].astype(float)
    left, right = (xx - 12) ** 2 + (yy - 20) ** 2 < 36, (xx - 29) ** 2 + (yy - 17) ** 2 < 9
    lab_a = np.zeros((40, 40), np.uint8)
    lab_a[left], lab_a[right] = 1, 2
    img = sitk.GetImageFromArray((0.3 + 0.5 * left + 0.2 * right).astype(np.float32))
    lab = sitk.GetImageFromArray(lab_a)
    for im in (img, lab):
        im.SetSpacing((2.0, 2.0))
        im.SetOrigin((-39.0, -39.0))
    an = Anatomy.from_images(img, lab, [1, 2])
    cfg = tiny_config(2, grid_size=(32, 32), grid_spacing=2.0)
    none = dict(rotation_deg=0, translation_mm=0, scale=0, shear=0, deform_mm=0, bias=0, gamma=0, noise=0)
    plain_img, plain_soi = sample_view(an, cfg, np.random.default_rng(0), AugmentConfig(**none))
    img_m, soi_m = sample_view(an, cfg, np.random.default_rng(0),
                               AugmentConfig(**none, mirror_prob=1.0, mirror_channels=(1, 0)))
    assert not torch.allclose(plain_img, plain_img.flip(-1), atol=0.1)  # the view is not symmetric itself
    assert torch.allclose(img_m, plain_img.flip(-1), atol=1e-5)  # world x (the array's last axis) mirrored
    assert torch.allclose(soi_m, plain_soi.flip(-1)[[1, 0]], atol=1e-5)  # the right structure is channel 0 now
    # off (the default): the view is the plain one
    again, _ = sample_view(an, cfg, np.random.default_rng(0), AugmentConfig(**none, mirror_prob=0.0))
    assert torch.equal(again, plain_img)
    with pytest.raises(ValueError, match="mirror_channels"):
        AugmentConfig(mirror_channels=(0, 0))
    with pytest.raises(ValueError, match="mirror_prob"):
        AugmentConfig(mirror_prob=1.5)


def test_tighter_strip_erodes_the_brain_by_whole_voxels_per_axis_and_ramps_the_new_edge():
    from istn.data.augment import tighter_strip

    image = torch.zeros(1, 12, 20, 20)  # (1, Z, Y, X): a 6 x 10 x 10 voxel "brain" of intensity 0.8
    image[0, 3:9, 5:15, 5:15] = 0.8
    # spacing x, y = 1 mm, z = 3 mm: 2 mm erodes two voxels in x and y, one in z (round(2 / 3) = 1)
    out = tighter_strip(image, (1.0, 1.0, 3.0), 2.0, ramp=False)
    kept = (out[0] > 0).nonzero()
    assert kept[:, 0].min() == 4 and kept[:, 0].max() == 7  # z: one voxel (round(2 / 3) = 1) from each side
    assert kept[:, 1].min() == 7 and kept[:, 1].max() == 12 and kept[:, 2].min() == 7 and kept[:, 2].max() == 12
    assert torch.all(out[out > 0] == 0.8)  # intensities inside are the image's own
    assert torch.equal(tighter_strip(image, (1.0, 1.0, 3.0), 0.0, ramp=False), image)  # 0 mm: the image itself
    ramped = tighter_strip(image, (1.0, 1.0, 3.0), 2.0, ramp=True)
    assert torch.equal(ramped > 0, out > 0)  # the same support...
    assert ramped[0, 5, 9, 7] < 0.8 and ramped[0, 5, 9, 9] == pytest.approx(0.8)  # ...darker at its edge only


def test_strip_prob_strips_only_skull_stripped_anatomies_and_draws_nothing_when_off():
    img = blob_image((40, 40), (2.0, 2.0), (-39.0, -39.0), np.eye(2), extra=False)
    arr = sitk.GetArrayFromImage(img)
    brain = sitk.GetImageFromArray((arr * (arr > 0.1)).astype(np.float32))  # 0 outside: skull-stripped
    lab = sitk.GetImageFromArray((arr > 0.5).astype(np.uint8))
    for im in (brain, lab):
        im.CopyInformation(img)
    an = Anatomy.from_images(brain, lab, [1])
    cfg = tiny_config(2, grid_size=(40, 40), grid_spacing=2.0)
    none = dict(rotation_deg=0, translation_mm=0, scale=0, shear=0, deform_mm=0, bias=0, gamma=0, noise=0)
    plain, _ = sample_view(an, cfg, np.random.default_rng(0), AugmentConfig(**none))
    # an anatomy not marked skull-stripped: untouched, and no random number drawn (the next draw is the same)
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    same, _ = sample_view(an, cfg, rng_a, AugmentConfig(**none, strip_prob=1.0))
    sample_view(an, cfg, rng_b, AugmentConfig(**none))
    assert torch.equal(same, plain) and rng_a.random() == rng_b.random()
    an.stripped = True
    tight, soi = sample_view(an, cfg, np.random.default_rng(0), AugmentConfig(**none, strip_prob=1.0,
                                                                            strip_erode_mm=(4.0, 4.0)))
    assert (tight > 0.01).sum() < (plain > 0.01).sum()  # the brain is smaller
    assert torch.allclose(soi, an.soi, atol=1e-5)  # the structures are where they were
    with pytest.raises(ValueError, match="strip_erode_mm"):
        AugmentConfig(strip_erode_mm=(3.0, 1.0))
