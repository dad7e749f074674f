"""Checks shared by the in-Slicer self test and the headless test suite.

Each ``check*`` function raises ``AssertionError`` with a readable message.
They need a scene, torch and the engine, nothing of the application, so the
same code runs inside Slicer (``ISTNRegistrationTest``) and on ``slicer-core``
in CI (``Testing/test_slicer_logic.py``).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import slicer

from . import nodes as nodeio


def rotationMatrix(degrees: tuple[float, float, float]) -> np.ndarray:
    """``Rz @ Ry @ Rx`` from angles (degrees) about x, y, z."""
    ax, ay, az = (math.radians(d) for d in degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def blobImage(size, spacing, origin, direction, centre=(0.0, 0.0, 0.0)) -> sitk.Image:
    """A smooth, asymmetric 3D test image (Gaussian blobs placed in WORLD coordinates, LPS)."""
    image = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    k, j, i = np.meshgrid(*[np.arange(s) for s in reversed(size)], indexing="ij")
    voxels = np.stack([i, j, k], axis=-1).astype(float)
    points = voxels @ (np.asarray(direction).reshape(3, 3) @ np.diag(spacing)).T + np.asarray(origin)
    c = np.asarray(centre, dtype=float)
    array = np.exp(-(((points - c) / np.array([14.0, 9.0, 11.0])) ** 2).sum(-1))
    array += 0.6 * np.exp(-(((points - c - np.array([12.0, -4.0, 6.0])) / 5.0) ** 2).sum(-1))
    out = sitk.GetImageFromArray(array.astype(np.float32))
    out.CopyInformation(image)
    return out


def obliquePair() -> tuple[sitk.Image, sitk.Image]:
    """Fixed/moving images: oblique, anisotropic, of different sizes, origins and spacings."""
    fixed = blobImage((40, 34, 28), (2.0, 2.5, 3.0), (-40.0, -45.0, -38.0), rotationMatrix((10, -20, 15)))
    moving = blobImage((44, 38, 30), (1.8, 2.2, 3.2), (-38.0, -40.0, -50.0), rotationMatrix((-15, 5, 25)),
                       centre=(3.0, -4.0, 5.0))
    return fixed, moving


def addObliquePair(scene):
    """The oblique pair as volume nodes: ``(fixedNode, movingNode, fixedImage, movingImage)``."""
    fixed, moving = obliquePair()
    fixedNode = nodeio.addVolumeNodeFromImage(scene, fixed, "ISTN test fixed")
    movingNode = nodeio.addVolumeNodeFromImage(scene, moving, "ISTN test moving")
    return fixedNode, movingNode, fixed, moving


def makeTinyModels(folder: str | Path | None = None, seed: int = 0) -> dict[str, Path]:
    """Tiny 3D affine and B-spline models whose STN heads are perturbed (non-identity output)."""
    import torch

    from istn.config import ModelConfig, TrainConfig
    from istn.export import build_metadata, export_model
    from istn.networks import ISTN

    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="istn-selftest-"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, scale in (("affine", 0.5), ("bspline", 2.0)):
        cfg = ModelConfig(ndim=3, grid_size=(16, 16, 16), grid_spacing=8, itn_channels=(4, 8), stn_channels=(4, 4),
                          stn_hidden=8, transform=kind, cp_spacing_mm=40)
        torch.manual_seed(seed)
        model = ISTN(cfg)
        with torch.no_grad():
            for name, p in model.stn.named_parameters():
                if name.startswith(("translation", "rotation", "scaling", "shearing", "head")):
                    p.normal_(0.0, scale)
        paths[kind] = export_model(model.eval(), build_metadata(TrainConfig(model=cfg)), folder / f"tiny_{kind}.pt")
    return paths


def insideMask(moving: sitk.Image, fixed: sitk.Image, transform: sitk.Transform, margin: int = 2) -> np.ndarray:
    """Fixed voxels whose mapped point lies inside the moving image, ``margin`` voxels from its border."""
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    eroded = sitk.BinaryErode(ones, [margin] * 3)
    warped = sitk.Resample(eroded, fixed, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(warped) > 0


def checkSlicerResamplingMatchesEngine(scene, result, fixedNode, movingNode, fixed: sitk.Image,
                                       moving: sitk.Image, tolerance: float = 1e-3) -> float:
    """Slicer's own resampling of the moving volume through its parent transform = the engine's warp.

    Returns the largest difference (inside the field of view), relative to the
    image range.
    """
    from istn.registration import warp_image

    resampled = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(movingNode, fixedNode)
    try:
        slicerArray = np.array(slicer.util.arrayFromVolume(resampled), dtype=float)
    finally:
        scene.RemoveNode(resampled)
    engineArray = sitk.GetArrayFromImage(warp_image(moving, fixed, result.transform)).astype(float)
    inside = insideMask(moving, fixed, result.transform)
    assert inside.mean() > 0.2, f"too little overlap to compare ({inside.mean():.2f} of the fixed grid)"
    scale = float(np.ptp(engineArray[inside])) or 1.0
    worst = float(np.abs(slicerArray - engineArray)[inside].max()) / scale
    assert worst < tolerance, f"Slicer's resampling differs from the engine's by {worst:.2e} of the range"
    return worst


def nodeIds(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def checkAffineAndBSpline(logic, scene, models: dict[str, Path], iterations: int = 3) -> dict:
    """Register the oblique pair with both models; check node kinds, hierarchy and geometry."""
    fixedNode, movingNode, fixed, moving = addObliquePair(scene)
    report = {}
    for kind in ("affine", "bspline"):
        result = logic.register(fixedNode, movingNode, modelPath=models[kind], affineModelPath=models["affine"],
                                iterations=iterations, threads=1)
        assert not result.cancelled
        linear = result.transformNode
        assert linear.IsA("vtkMRMLLinearTransformNode") and linear.IsLinear(), "the affine part must be a linear node"
        if kind == "affine":
            assert result.bsplineTransformNode is None
            assert movingNode.GetParentTransformNode() is linear
        else:
            bspline = result.bsplineTransformNode
            assert bspline.IsA("vtkMRMLBSplineTransformNode"), "the B-spline must be a B-spline transform node"
            assert bspline.GetParentTransformNode() is linear, "the B-spline node must be under the affine node"
            assert movingNode.GetParentTransformNode() is bspline
            assert result.metrics["folding_fraction"] is not None
        report[kind] = checkSlicerResamplingMatchesEngine(scene, result, fixedNode, movingNode, fixed, moving)
        for mapNode in (result.fixedMapNode, result.movingMapNode):
            assert mapNode is not None and mapNode.GetImageData() is not None, "ITN map volumes missing"
    return report


def checkCancelLeavesSceneUnchanged(logic, scene, models: dict[str, Path]) -> None:
    """Cancel during refinement: no node left behind, the moving volume back where it was."""
    fixedNode, movingNode, _, _ = addObliquePair(scene)
    before = nodeIds(scene)
    seen = []

    def progress(p) -> None:
        if p.stage == "bspline":
            seen.append(p.iteration)
        if p.stage == "bspline" and p.iteration >= 2:
            logic.requestCancel()

    result = logic.register(fixedNode, movingNode, modelPath=models["bspline"], affineModelPath=models["affine"],
                            iterations=20, threads=1, progressCallback=progress)
    assert result.cancelled, "the run was not cancelled"
    assert seen and max(seen) < 20, "refinement did not stop when cancelled"
    assert nodeIds(scene) == before, f"nodes left behind: {sorted(nodeIds(scene) - before)}"
    assert movingNode.GetParentTransformNode() is None, "the moving volume was not put back"


def checkQualityVolumes(logic, scene, models: dict[str, Path]) -> None:
    """A B-spline run's optional quality volumes: the checkerboard in [0, 1] and the Jacobian determinant, both on
    the fixed volume's grid, the Jacobian the engine's map of the result, its window centred on 1."""
    from istn.registration import OUTPUT_FIELD_SPACING_MM, jacobian_image

    fixedNode, movingNode, fixed, _ = addObliquePair(scene)
    board = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ISTN checkerboard")
    jacobian = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ISTN Jacobian")
    result = logic.register(fixedNode, movingNode, modelPath=models["bspline"], affineModelPath=models["affine"],
                            iterations=2, threads=1, checkerboardVolumeNode=board, jacobianVolumeNode=jacobian)
    assert not result.cancelled and result.jacobianVolumeNode is jacobian and result.checkerboardVolumeNode is board
    for node in (board, jacobian):
        assert node.GetImageData() is not None, f"{node.GetName()} is empty"
        assert np.allclose(nodeio.ijkToRasMatrix(node), nodeio.ijkToRasMatrix(fixedNode), atol=1e-6), \
            f"{node.GetName()} is not on the fixed volume's grid"
    values = sitk.GetArrayFromImage(nodeio.volumeNodeToImage(board))
    assert values.min() >= 0.0 and values.max() <= 1.0 and values.std() > 0, "checkerboard values outside [0, 1]"
    expected = sitk.GetArrayFromImage(jacobian_image(result.transform, fixed, OUTPUT_FIELD_SPACING_MM))
    got = sitk.GetArrayFromImage(nodeio.volumeNodeToImage(jacobian))
    assert np.allclose(got, expected, atol=1e-5), "the Jacobian volume is not the engine's map of the result"
    assert jacobian.GetDisplayNode().GetLevel() == 1.0, "the Jacobian's window is not centred on 1"
