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


def test_nan_voxels_are_counted_and_the_way_out_said(volume, tmp_path):
    """NaN outside a mask (SPM, FSL): refused from NRRD/MHA with how many and what to do; a NIfTI file's NaN are
    read as 0 by ITK (so by Slicer too), said in the same message."""
    values = sitk.GetArrayFromImage(volume).astype(np.float32)
    values[:5] = np.nan
    values[-1, 0, 0] = np.inf
    image = sitk.GetImageFromArray(values)
    for name in ("masked.nrrd", "masked.mha"):
        sitk.WriteImage(image, str(tmp_path / name))
        with pytest.raises(InputError, match=r"contains 3,360 NaN and 1 infinite voxel values \(often .*numpy\.nan_to_num"):
            read_image(tmp_path / name, "moving")
    sitk.WriteImage(image, str(tmp_path / "masked.nii.gz"))
    read = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "masked.nii.gz")))
    assert np.count_nonzero(np.isnan(read)) == 0 and np.all(read[:5] == 0)  # ITK's NIfTI reader, as the message says


def test_apply_says_what_a_4d_input_is(volume, tmp_path, capsys):
    from istn.cli import main

    series = sitk.JoinSeries([sitk.Cast(volume, sitk.sitkFloat32)] * 3)
    sitk.WriteImage(series, str(tmp_path / "bold.nii.gz"))
    sitk.WriteImage(volume, str(tmp_path / "ref.nii.gz"))
    sitk.WriteTransform(sitk.AffineTransform(3), str(tmp_path / "t.tfm"))
    assert main(["apply", "--transform", str(tmp_path / "t.tfm"), "--reference", str(tmp_path / "ref.nii.gz"),
                 "--input", str(tmp_path / "bold.nii.gz"), "--out", str(tmp_path / "o.nii.gz")]) == 2
    assert not (tmp_path / "o.nii.gz").exists()
    err = capsys.readouterr().err
    assert "bold.nii.gz' is 4D (28 x 24 x 20 x 3: 3 volumes of 28 x 24 x 20)" in err, err


def test_a_complete_nifti_with_a_small_vox_offset_or_a_stray_img_gz_is_read(volume, tmp_path):
    """Review: a vox_offset below 352 (older writers; an Analyze pair joined into one file) is taken from the
    header's end, as nifti1_io takes it; a partial pair.img.gz beside a complete pair.img is not what ITK reads."""
    import struct

    plain = tmp_path / "v.nii"
    sitk.WriteImage(volume, str(plain))
    raw = bytearray(plain.read_bytes())
    short = tmp_path / "short.nii"
    header = raw[:348]
    struct.pack_into("<f", header, 108, 348.0)
    short.write_bytes(bytes(header) + bytes(raw[352:]))  # no extension flag: the voxels start at 348
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(short))), sitk.GetArrayFromImage(volume))
    assert nifti_shortfall(short) is None
    pair = tmp_path / "pair.hdr"
    sitk.WriteImage(volume, str(pair))
    whole = (tmp_path / "pair.img").read_bytes()
    (tmp_path / "pair.img.gz").write_bytes(gzip.compress(whole)[:200])  # an interrupted gzip -k
    assert nifti_shortfall(pair) is None and read_image(pair).GetSize() == volume.GetSize()
