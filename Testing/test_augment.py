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
