"""FreeSurfer's .mgz / .mgh volumes (T1.mgz, aseg.mgz), which SimpleITK cannot read: read with their geometry, as
nibabel (an independent reader and writer of the format) places their voxels, and registered, applied and scored as
the same volume saved as NIfTI."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import rotation
from istn.cli import main
from istn.errors import InputError
from istn.io import read_image, read_raw_image

nib = pytest.importorskip("nibabel")

SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "SampleData"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _ras_affine(image: sitk.Image) -> np.ndarray:
    """The voxel -> RAS matrix of a SimpleITK image (what nibabel calls its affine)."""
    direction = np.reshape(image.GetDirection(), (3, 3))
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin())
    return affine


def _save_mgh(image: sitk.Image, path: Path) -> Path:
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # nibabel's axes are x, y, z
    nib.save(nib.MGHImage(np.ascontiguousarray(array), _ras_affine(image)), str(path))
    return path


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.uint16])
@pytest.mark.parametrize("suffix", [".mgz", ".mgh"])
def test_voxels_and_world_positions_are_nibabels(tmp_path, dtype, suffix):
    rng = np.random.default_rng(int(np.dtype(dtype).itemsize) * 7 + len(suffix))
    shape = (13, 17, 11)  # x, y, z
    array = (rng.random(shape) * 200).astype(dtype)
    affine = np.eye(4)
    # oblique, permuted and flipped axes, anisotropic voxels
    axes = rotation(3, (25, -15, 40)) @ np.eye(3)[[2, 0, 1]] @ np.diag([-1.0, 1.0, -1.0])
    affine[:3, :3] = axes @ np.diag([0.9, 1.7, 2.4])
    affine[:3, 3] = (-31.0, 12.5, 47.0)
    path = tmp_path / f"vol{suffix}"
    nib.save(nib.MGHImage(array, affine), str(path))
    theirs = nib.load(str(path))
    image = read_raw_image(path)
    assert image.GetSize() == shape
    assert sitk.GetArrayViewFromImage(image).dtype == np.dtype(dtype)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), np.asarray(theirs.dataobj))
    for index in ((0, 0, 0), (12, 0, 5), (3, 16, 10), (12, 16, 10)):
        ras = theirs.affine @ [*index, 1.0]
        lps = image.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(LPS_TO_RAS @ lps, ras[:3], atol=1e-4)


def test_a_head_saved_as_mgz_registers_applies_and_scores_as_its_nifti(tmp_path):
    """The sample moving head and its labels stored RAS-first (as FreeSurfer's conformed volumes are stored LIA)
    and saved as .mgz: the same world transform as from the NIfTI, the same labels resampled, the same Dice."""
    fixed, fixed_labels = SAMPLE / "fixed_t1.nii.gz", SAMPLE / "fixed_labels.nii.gz"
    head = sitk.DICOMOrient(sitk.ReadImage(str(SAMPLE / "moving_t1.nii.gz")), "LIA")
    labels = sitk.DICOMOrient(sitk.ReadImage(str(SAMPLE / "moving_labels.nii.gz")), "LIA")
    nifti, mgz = tmp_path / "T1.nii.gz", _save_mgh(head, tmp_path / "T1.mgz")
    sitk.WriteImage(head, str(nifti))
    aseg_nifti, aseg_mgz = tmp_path / "aseg.nii.gz", _save_mgh(labels, tmp_path / "aseg.mgz")
    sitk.WriteImage(labels, str(aseg_nifti))
    results = {}
    for name, moving, moving_labels in (("nifti", nifti, aseg_nifti), ("mgz", mgz, aseg_mgz)):
        out = tmp_path / f"out_{name}"
        args = ["--fixed", str(fixed), "--moving", str(moving), "--out", str(out), "--quiet", "--no-figure",
                "--threads", "1"]
        assert main(["register", *args, "--model", "brain-t1-affine.pt"]) == 0
        transform = out / "transform.h5" if (out / "transform.h5").exists() else out / "affine.tfm"
        assert main(["apply", "--transform", str(transform), "--reference", str(fixed), "--input",
                     str(moving_labels), "--out", str(tmp_path / f"labels_{name}.nii.gz")]) == 0
        assert main(["evaluate", "--fixed-labels", str(fixed_labels), "--moving-labels", str(moving_labels),
                     "--transform", str(transform), "--out", str(tmp_path / f"{name}.json")]) == 0
        tx = sitk.ReadTransform(str(transform))
        points = [sitk.ReadImage(str(fixed)).TransformIndexToPhysicalPoint(i) for i in ((20, 30, 25), (50, 60, 40))]
        results[name] = ([tx.TransformPoint(p) for p in points],
                         sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"labels_{name}.nii.gz"))),
                         json.loads((tmp_path / f"{name}.json").read_text())["mean"]["dice"])
    (points_n, labels_n, dice_n), (points_m, labels_m, dice_m) = results["nifti"], results["mgz"]
    assert np.abs(np.subtract(points_n, points_m)).max() < 1e-3  # the header's float32 geometry: ~1e-5 mm
    assert (labels_n != labels_m).sum() <= 5 and (labels_n > 0).sum() > 1000
    assert dice_m == pytest.approx(dice_n, abs=2e-3) and dice_n > 0.7


def _mgh_bytes(size=(4, 5, 6, 1), code=0, good=1, axes=np.eye(3), voxels: bytes | None = None) -> bytes:
    header = struct.pack(">7ih3f9f3f", 1, *size, code, 0, good, 1.0, 1.0, 1.0, *np.asarray(axes).T.ravel(), 0, 0, 0)
    count = int(np.prod(size))
    return header.ljust(284, b"\0") + (voxels if voxels is not None else bytes(count))


@pytest.mark.parametrize("case, match", [
    ("short", r"is cut short .* promises 120 bytes of voxels, the file holds 60"),
    ("no geometry", r"not valid \(FreeSurfer's good-RAS flag is 0\)"),
    ("type", r"holds FreeSurfer data type 2, which is not read here"),
    ("sheared", r"voxel axes that are not unit vectors at right angles"),
    ("not mgh", r"is not a FreeSurfer MGH volume"),
])
def test_damaged_or_unusable_mgh_files_are_refused_in_one_line(tmp_path, case, match):
    data = {"short": _mgh_bytes(voxels=bytes(60)), "no geometry": _mgh_bytes(good=0), "type": _mgh_bytes(code=2),
            "sheared": _mgh_bytes(axes=[[1, 0.3, 0], [0, 1, 0], [0, 0, 1]]),
            "not mgh": b"\x00\x00\x01\x5c" + bytes(400)}[case]
    path = tmp_path / "bad.mgz"
    path.write_bytes(gzip.compress(data))
    with pytest.raises(InputError, match=match):
        read_image(path, "moving")


def test_a_several_frame_mgz_is_refused_as_4d(tmp_path):
    path = tmp_path / "dwi.mgz"
    nib.save(nib.MGHImage(np.zeros((6, 7, 8, 3), np.float32), np.eye(4)), str(path))
    with pytest.raises(InputError, match=r"is 4D \(6 x 7 x 8 x 3: 3 volumes of 6 x 7 x 8\)"):
        read_image(path, "moving")


def test_apply_says_mgz_is_read_not_written(tmp_path, capsys):
    out = tmp_path / "labels.mgz"
    identity = tmp_path / "identity.tfm"
    sitk.WriteTransform(sitk.Transform(3, sitk.sitkIdentity), str(identity))
    code = main(["apply", "--transform", str(identity), "--reference", str(SAMPLE / "fixed_t1.nii.gz"),
                 "--input", str(SAMPLE / "moving_labels.nii.gz"), "--out", str(out)])
    assert code == 2 and not out.exists()
    assert "FreeSurfer .mgz files are read here, not written; name it .nii.gz" in capsys.readouterr().err
