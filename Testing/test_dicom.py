"""DICOM as scanners export it: a folder (or one file) of a series is read as the volume it stores, and a series that
cannot be one volume is refused with a message that says what to do."""

from __future__ import annotations

import json
import locale
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from istn.cli import main
from istn.errors import InputError
from istn.io import read_image, read_raw_image

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_series(volume: sitk.Image, folder: Path, description: str = "T1", prefix: str = "im",
                 skip: tuple[int, ...] = (), uid: str = "1.2.826.0.1.3680043.2.1125.7",
                 sideways_mm: float = 0.0) -> list[Path]:
    """``volume`` (3D, integer) as one DICOM file per slice, with the tags a scanner writes for the geometry
    (Image Position / Orientation (Patient), pixel spacing from the slice itself); slices in ``skip`` left out;
    ``sideways_mm``: each slice's position moved this much further along its columns than the one before (a gantry
    tilt as a CT scanner records it).

    GDCM's writer leaves the process in the C locale (Python then reads text files as ASCII): put it back.
    (Reading, what the tool does, leaves it alone.)"""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_series(volume, folder, description, prefix, skip, uid, sideways_mm)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_series(volume, folder, description, prefix, skip, uid, sideways_mm) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    d = volume.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(volume.GetDepth()):
        if k in skip:
            continue
        s = volume[:, :, k]
        first = np.asarray(volume.TransformIndexToPhysicalPoint((0, 0, k))) + k * sideways_mm * np.asarray(d[1::3])
        position = "\\".join(f"{v:.10f}" for v in first)
        for tag, value in (("0008|0016", MR_IMAGE_STORAGE), ("0008|0060", "MR"), ("0008|103e", description),
                           ("0020|000d", uid + ".1"), ("0020|000e", uid + ".2"), ("0020|0013", str(k + 1)),
                           ("0020|0032", position), ("0020|0037", orientation)):
            s.SetMetaData(tag, value)
        paths.append(folder / f"{prefix}{k:04d}.dcm")
        writer.SetFileName(str(paths[-1]))
        writer.Execute(s)
    return paths


@pytest.fixture
def volume(oblique_pair) -> sitk.Image:
    """The oblique test head as a scanner stores it: 16-bit integers, oblique direction, anisotropic voxels."""
    return sitk.Cast(sitk.Round(oblique_pair[0] * 1000.0), sitk.sitkInt16)


def _same_image(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def test_a_series_folder_and_one_of_its_files_read_as_the_stored_volume(volume, tmp_path):
    files = write_series(volume, tmp_path / "series")
    expected = sitk.Cast(volume, sitk.sitkFloat32)
    before = locale.setlocale(locale.LC_ALL)
    _same_image(read_image(tmp_path / "series", "fixed"), expected)
    assert locale.setlocale(locale.LC_ALL) == before  # reading leaves the process's locale alone
    _same_image(read_image(files[5], "fixed"), expected)  # one slice named: its whole series
    # a folder whose files are stored in the reverse slice order (names) still reads in the order of the positions
    flipped = sitk.DICOMOrient(volume, "RAI" if volume.GetDirection()[8] > 0 else "RAS")
    write_series(flipped, tmp_path / "flipped")
    got = read_image(tmp_path / "flipped", "fixed")
    for index in ((0, 0, 0), (7, 11, 13), (39, 33, 27)):
        p = volume.TransformIndexToPhysicalPoint(index)
        assert got.EvaluateAtPhysicalPoint(p) == pytest.approx(float(volume[index]), abs=1e-3)


def test_a_lone_dicom_file_reads_as_itself(volume, tmp_path):
    only = write_series(volume[:, :, 3:4], tmp_path / "one")
    assert len(only) == 1
    image = read_raw_image(only[0])
    assert image.GetSize()[:2] == volume.GetSize()[:2]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).reshape(volume.GetSize()[::-1][1:]),
                                  sitk.GetArrayFromImage(volume)[3])


def test_a_folder_of_two_series_lists_them_and_one_file_chooses(volume, tmp_path):
    folder = tmp_path / "study"
    write_series(volume, folder, "T1 MPRAGE", "t1_", uid="1.2.3.1")
    t2 = write_series(volume[:, :, :9], folder, "T2 axial", "t2_", uid="1.2.3.2")
    with pytest.raises(InputError) as err:
        read_image(folder, "moving")
    message = str(err.value)
    assert "holds 2 DICOM series" in message and "T1 MPRAGE: 28 files" in message and "T2 axial: 9 files" in message
    assert "give one file of the series" in message
    assert read_image(t2[4], "moving").GetSize() == volume.GetSize()[:2] + (9,)


def test_a_cd_exports_top_folder_names_the_series_folders_below_it(volume, tmp_path):
    """A CD / PACS export: DICOMDIR beside DICOM/S01, DICOM/S02; the top folder holds no series itself, and the
    message names the folders that do (it said "no DICOM series in it")."""
    top = tmp_path / "CD"
    write_series(volume, top / "DICOM" / "S01", "T1 MPRAGE", uid="1.2.3.1")
    write_series(volume[:, :, :9], top / "DICOM" / "S02", "T2 axial", uid="1.2.3.2")
    (top / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # the index: a DICOM file, not a series
    with pytest.raises(InputError) as err:
        read_image(top, "moving")
    message = str(err.value)
    assert "holds no DICOM series itself, but its subfolders do" in message
    assert f"'{top / 'DICOM' / 'S01'}' (28 files)" in message and f"'{top / 'DICOM' / 'S02'}' (9 files)" in message
    assert read_image(top / "DICOM" / "S02", "moving").GetSize() == volume.GetSize()[:2] + (9,)


@pytest.mark.parametrize("case", ["missing slice", "gantry tilt", "empty folder"])
def test_a_series_that_cannot_be_one_volume_is_refused(volume, tmp_path, case):
    if case == "missing slice":
        write_series(volume, tmp_path / "d", skip=(12,))
        expected = "unevenly spaced (gaps 3 to 6 mm"
    elif case == "gantry tilt":  # 0.8 mm sideways per 3 mm slice: atan(0.8 / 3) = 15 degrees
        write_series(volume, tmp_path / "d", sideways_mm=0.8)
        expected = "lies 0.8 mm sideways of the one before (a gantry tilt of about 15 degrees)"
    else:
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "notes.txt").write_text("not an image")
        expected = "is a folder with no DICOM series in it"
    with pytest.raises(InputError, match=re.escape(expected)):
        read_image(tmp_path / "d", "fixed")


def test_register_takes_a_dicom_folder_as_it_takes_the_same_volume_in_nrrd(volume, oblique_pair, make_model,
                                                                          tmp_path, capsys):
    write_series(volume, tmp_path / "dicom")
    sitk.WriteImage(volume, str(tmp_path / "fixed.nrrd"))
    sitk.WriteImage(oblique_pair[1], str(tmp_path / "moving.nii.gz"))
    model = make_model(3, "affine")
    results = {}
    for name, fixed in (("dicom", tmp_path / "dicom"), ("nrrd", tmp_path / "fixed.nrrd")):
        out = tmp_path / f"out-{name}"
        assert main(["register", "--refine", "2", "--quiet", "--no-figure", "--fixed", str(fixed), "--moving",
                     str(tmp_path / "moving.nii.gz"), "--model", str(model), "--out", str(out)]) == 0
        results[name] = (sitk.ReadTransform(str(out / "transform.tfm")), sitk.ReadImage(str(out / "warped.nii.gz")),
                         json.loads((out / "result.json").read_text()))
    (tx_d, warped_d, res_d), (tx_n, warped_n, _) = results["dicom"], results["nrrd"]
    np.testing.assert_allclose(tx_d.GetParameters(), tx_n.GetParameters(), atol=1e-4)
    assert warped_d.GetSize() == warped_n.GetSize()
    np.testing.assert_allclose(warped_d.GetOrigin(), warped_n.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(warped_d), sitk.GetArrayFromImage(warped_n), atol=1e-2)
    assert res_d["fixed"] == str(tmp_path / "dicom")


def test_register_refuses_a_broken_series_and_writes_nothing(volume, oblique_pair, make_model, tmp_path, capsys):
    write_series(volume, tmp_path / "dicom", skip=(3,))
    sitk.WriteImage(oblique_pair[1], str(tmp_path / "moving.nii.gz"))
    out = tmp_path / "out"
    rc = main(["register", "--quiet", "--fixed", str(tmp_path / "dicom"), "--moving", str(tmp_path / "moving.nii.gz"),
               "--model", str(make_model(3, "affine")), "--out", str(out)])
    assert rc != 0
    err = capsys.readouterr().err
    assert "fixed image" in err and "unevenly spaced" in err and "dcm2niix" in err
    assert not out.exists() or not list(out.iterdir())


def test_pictures_name_a_dicom_input_by_its_series_description_and_folder(volume, tmp_path):
    from istn.commands.register import shown_name

    files = write_series(volume, tmp_path / "S0003", description="T1 MPRAGE  sag")
    assert shown_name(tmp_path / "S0003") == "T1 MPRAGE sag (DICOM series, S0003)"
    assert shown_name(files[3]) == "T1 MPRAGE sag (DICOM series, S0003)"  # not the one slice's file name
    files = write_series(volume, tmp_path / "T1_MPRAGE", description="")  # a series without a description
    assert shown_name(files[3]) == "T1_MPRAGE (DICOM series)"
    assert shown_name(tmp_path / "sub-01.nii.gz") == "sub-01.nii.gz"


def test_a_series_with_a_localizer_in_it_names_the_odd_file(volume, tmp_path):
    """Clinical audit: a scout slice saved into the series (same Series UID, another size) gave "could not be read
    (Size: [93, 79, 1])"; the message now says what is wrong and which file."""
    folder = tmp_path / "series"
    write_series(volume, folder, uid="1.2.3.1")
    write_series(volume[:, :10, :1], folder, prefix="scout", uid="1.2.3.1")
    with pytest.raises(InputError, match=r"mixes slices of another size or orientation \(1 of 29 files, e\.g\. "
                                         r"'scout\w*\.dcm': a localizer"):
        read_image(folder, "moving")
