"""Files damaged or of a kind the tool cannot register, as users bring them: refused in one line, never read as
something else (clinical-files audit: ITK reads a NIfTI cut short without a word, its missing voxels as 0)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from istn.errors import InputError
from istn.io import nifti_shortfall, read_image


@pytest.fixture
def volume() -> sitk.Image:
    rng = np.random.default_rng(3)
    image = sitk.GetImageFromArray(rng.integers(0, 1000, (20, 24, 28)).astype(np.int16))  # noise: gzip cannot shrink it
    image.SetSpacing((1.5, 1.0, 2.0))
    return image


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz", "cut.hdr"])
def test_a_nifti_cut_short_is_refused_with_how_much_of_it_is_there(volume, tmp_path, name):
    path = tmp_path / name
    sitk.WriteImage(volume, str(path))
    data = path.with_suffix(".img") if name.endswith(".hdr") else path
    whole = data.read_bytes()
    assert nifti_shortfall(path) is None and read_image(path).GetSize() == volume.GetSize()
    data.write_bytes(whole[: len(whole) // 2])
    assert sitk.ReadImage(str(path)).GetSize() == volume.GetSize()  # what ITK does: no error
    with pytest.raises(InputError, match=r"is cut short .* promises 26,880 bytes of voxels, the file holds"):
        read_image(path, "moving")
    expected, found = nifti_shortfall(path)
    assert expected == 20 * 24 * 28 * 2 and 0 < found < expected


def test_a_complete_nifti_in_several_gzip_members_is_read(volume, tmp_path):
    """bgzip and concatenated streams: many gzip members, the trailer giving only the last one's size."""
    plain = tmp_path / "v.nii"
    sitk.WriteImage(volume, str(plain))
    raw = plain.read_bytes()
    members = tmp_path / "members.nii.gz"
    members.write_bytes(gzip.compress(raw[:10000]) + gzip.compress(raw[10000:]))
    assert nifti_shortfall(members) is None
    assert np.array_equal(sitk.GetArrayFromImage(read_image(members)), sitk.GetArrayFromImage(volume).astype(np.float32))
    members.write_bytes(gzip.compress(raw[:10000]) + gzip.compress(raw[10000:])[:3000])
    with pytest.raises(InputError, match="is cut short"):
        read_image(members)


@pytest.mark.parametrize("pixel", [sitk.sitkComplexFloat32, sitk.sitkComplexFloat64])
def test_a_complex_image_is_refused_with_what_to_do(volume, tmp_path, pixel):
    real = sitk.Cast(volume, sitk.sitkFloat32 if pixel == sitk.sitkComplexFloat32 else sitk.sitkFloat64)
    path = tmp_path / "recon.nii.gz"
    sitk.WriteImage(sitk.RealAndImaginaryToComplex(real, real), str(path))
    with pytest.raises(InputError, match="holds complex values .* save its magnitude"):
        read_image(path, "moving")
