"""Shared fixtures: tiny models and synthetic images with known geometry."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))  # the engine without installing it
sys.path.insert(0, str(REPO / "benchmarks"))  # simulated acquisitions and files (`acquisition`)

from istn.config import ModelConfig, TrainConfig  # noqa: E402
from istn.export import build_metadata, export_model  # noqa: E402
from istn.geometry import Grid  # noqa: E402
from istn.networks import ISTN  # noqa: E402
from acquisition import with_turned_header  # noqa: E402

# the voxels under a header turned by right angles (a prone patient taken for supine, a sagittal acquisition
# written as axial), as the benchmarks make them
header_turned = with_turned_header

torch.set_num_threads(1)


def rotation(ndim: int, degrees: tuple[float, ...]) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    if ndim == 2:
        a = np.radians(degrees[0])
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()


def blob_image(size, spacing, origin, direction, centre=None, extra=True) -> sitk.Image:
    """A smooth, asymmetric test image (Gaussian blobs in WORLD coordinates)."""
    g = Grid(tuple(size), tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
             tuple(np.ravel(direction).tolist()))
    d = len(size)
    c = np.zeros(d) if centre is None else np.asarray(centre, float)
    pts = g.world_points()
    radii = np.array([14.0, 9.0, 11.0])[:d]
    arr = np.exp(-(((pts - c) / radii) ** 2).sum(-1))
    if extra:
        off = np.array([12.0, -4.0, 6.0])[:d]
        arr = arr + 0.6 * np.exp(-(((pts - c - off) / 5.0) ** 2).sum(-1))
    return g.image_from_array(arr.astype(np.float32))


def tiny_config(ndim: int = 2, transform: str = "affine", variant: str = "istn-i", **kw) -> ModelConfig:
    size = (32,) * ndim if ndim == 2 else (16,) * 3
    base = dict(ndim=ndim, grid_size=size, grid_spacing=2.0 if ndim == 2 else 4.0, transform=transform,
                variant=variant, itn_channels=(4, 8), stn_channels=(4, 4), stn_hidden=8,
                cp_spacing_mm=16.0 if ndim == 2 else 24.0)
    base.update(kw)
    return ModelConfig(**base)


def perturbed_model(cfg: ModelConfig, seed: int = 0, scale: float = 0.5) -> ISTN:
    """A model whose STN heads are non-zero, so its transform is not the identity."""
    torch.manual_seed(seed)
    m = ISTN(cfg)
    with torch.no_grad():
        for name, p in m.stn.named_parameters():
            if name.startswith(("translation", "rotation", "scaling", "shearing", "head")):
                p.normal_(0.0, scale)
    return m.eval()


def varied_copy(path: Path, dst: Path) -> Path:
    """A copy of model file ``path`` at ``dst`` whose metadata says it trained with label-driven synthesis and
    crops (as the bundled brain-synth pair): what the self-checks' hint looks for beside a plain model."""
    from istn.export import load_model, rewrite_metadata

    dst.write_bytes(Path(path).read_bytes())
    meta = dict(load_model(dst).meta, data_options={"contrasts": ["t1"], "synth_prob": 0.3, "crop_prob": 0.3})
    rewrite_metadata(dst, meta)
    return dst


@pytest.fixture
def make_model(tmp_path):
    """Factory: ``make_model(ndim, transform, variant, perturb=True) -> path`` of an exported tiny model."""
    counter = [0]

    def _make(ndim=2, transform="affine", variant="istn-i", perturb=True, seed=0, scale=0.5, **kw) -> Path:
        cfg = tiny_config(ndim, transform, variant, **kw)
        m = perturbed_model(cfg, seed, scale) if perturb else ISTN(cfg).eval()
        counter[0] += 1
        path = tmp_path / f"model{counter[0]}-{ndim}d-{transform}.pt"
        export_model(m, build_metadata(TrainConfig(model=cfg)), path)
        return path

    return _make


@pytest.fixture
def oblique_pair():
    """3D fixed/moving: anisotropic spacing, oblique directions, different sizes and origins."""
    fixed = blob_image((40, 34, 28), (2.0, 2.5, 3.0), (-40.0, -45.0, -38.0), rotation(3, (10, -20, 15)))
    moving = blob_image((44, 38, 30), (1.8, 2.2, 3.2), (-38.0, -40.0, -50.0), rotation(3, (-15, 5, 25)),
                        centre=(3.0, -4.0, 5.0))
    return fixed, moving


@pytest.fixture
def pair2d():
    fixed = blob_image((48, 40), (1.5, 2.0), (-35.0, -38.0), rotation(2, (12,)))
    moving = blob_image((44, 44), (1.8, 1.6), (-40.0, -36.0), rotation(2, (-8,)), centre=(4.0, -3.0))
    return fixed, moving


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory):
    """Six 2D pairs: a blob (the SoI) plus a distracting square, each moved differently (training, distributed)."""
    root = tmp_path_factory.mktemp("toy")
    rows_img, rows_soi = ["src,trg"], ["src,trg"]
    rng = np.random.default_rng(0)
    for k in range(6):
        for role in ("src", "trg"):
            c = rng.uniform(-4, 4, 2)
            soi = blob_image((32, 32), (1.0, 1.0), (-15.5, -15.5), np.eye(2), centre=c, extra=False)
            arr = sitk.GetArrayFromImage(soi)
            sq = np.zeros_like(arr)
            a, b = rng.integers(2, 20, 2)
            sq[a:a + 10, b:b + 10] = 0.7
            img = sitk.GetImageFromArray(arr + sq)
            img.CopyInformation(soi)
            sitk.WriteImage(img, str(root / f"{role}{k}.nii.gz"))
            sitk.WriteImage(soi, str(root / f"{role}{k}_soi.nii.gz"))
        rows_img.append(f"src{k}.nii.gz,trg{k}.nii.gz")
        rows_soi.append(f"src{k}_soi.nii.gz,trg{k}_soi.nii.gz")
    (root / "pairs.csv").write_text("\n".join(rows_img) + "\n")
    (root / "soi.csv").write_text("\n".join(rows_soi) + "\n")
    return root


# Slicer segmentations (.seg.nrrd) written and read by slicer-core's own storage node (tests that use these
# import slicer first, skipping without it)
def slicer_segmentation(scene, labels: sitk.Image, path, overlapping: bool):
    """Write ``labels`` as Slicer writes a segmentation (slicer-core's storage node; names set by hand), with a
    segment "both" over every labelled voxel (overlapping the others: a second layer) if ``overlapping``."""
    import slicer
    from ISTNRegistrationLib import nodes as nodeio  # conftest puts the module's folder on the path

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    sources = [("labels", labels)]
    if overlapping:
        sources.append(("both", sitk.Cast(labels > 0, sitk.sitkUInt8)))
    for name, image in sources:
        labelmap = nodeio.addVolumeNodeFromImage(scene, image, name, "vtkMRMLLabelMapVolumeNode")
        if name == "labels":
            node.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node)
    content = node.GetSegmentation()
    for i, name in enumerate(["outer", "inner", "both"][:content.GetNumberOfSegments()]):
        content.GetNthSegment(i).SetName(name)
        content.GetNthSegment(i).SetColor(0.1 * (i + 1), 0.5, 1.0 - 0.2 * i)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    return path


def read_slicer_segments(scene, path) -> tuple[dict, object]:
    """{name: (colour, layer, voxel mask as a (z, y, x) array on the file's grid)}, and the segmentation, as
    Slicer reads the file."""
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    content = node.GetSegmentation()
    found = {}
    for i in range(content.GetNumberOfSegments()):
        sid, segment = content.GetNthSegmentID(i), content.GetNthSegment(i)
        image = segment.GetRepresentation("Binary labelmap")
        ext = image.GetExtent()
        shape = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
        voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)
        found[segment.GetName()] = (tuple(round(c, 3) for c in segment.GetColor()), content.GetLayerIndex(sid),
                                    voxels == segment.GetLabelValue(), ext)
    return found, content
