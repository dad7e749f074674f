"""The Slicer module's logic on real MRML nodes (slicer-core, headless).

Geometry (Slicer's own resampling through the output transform = the engine's
warp, oblique anisotropic volumes, affine and B-spline), transform node kinds
and hierarchy, .h5 storage round trips, ITN map volumes, Dice per segment,
live update, cancel and failure roll-back, inputs unchanged, no leaked nodes.
The geometry and cancel checks are the very functions the in-Slicer self test
runs (`ISTNRegistrationLib.selftest`).
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML core) is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package here is not Slicer's (slicer-core)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))

from ISTNRegistrationLib import ISTNRegistrationLogic, models as modelfiles, nodes, sampledata, selftest  # noqa: E402
from ISTNRegistrationLib.logic import ROLE_BSPLINE, ROLE_FIXED_MAP, ROLE_MOVING_MAP  # noqa: E402
from istn.registration import warp_image  # noqa: E402
from istn.transforms import linear_matrix as _affine_matrix  # noqa: E402
from vtk.util import numpy_support  # noqa: E402


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return selftest.makeTinyModels(tmp_path_factory.mktemp("models"))


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    slicer.mrmlScene = s
    yield s
    s.Clear(1)


@pytest.fixture
def pair(scene):
    """(fixedNode, movingNode, fixedImage, movingImage): oblique, anisotropic, different grids."""
    return selftest.addObliquePair(scene)


def run(logic, pair, tiny_models, kind="affine", **kw):
    fixed_node, moving_node = pair[:2]
    kw.setdefault("iterations", 2)
    kw.setdefault("threads", 1)
    return logic.register(fixed_node, moving_node, modelPath=tiny_models[kind],
                          affineModelPath=tiny_models["affine"], **kw)


def node_state(node):
    """Everything about an input node that registration must not change (its parent aside)."""
    state = {}
    if node.IsA("vtkMRMLVolumeNode"):
        state["array"] = np.array(slicer.util.arrayFromVolume(node), copy=True)
        state["ijk"] = nodes.ijkToRasMatrix(node)
    if node.IsA("vtkMRMLSegmentationNode"):
        s = node.GetSegmentation()
        state["segments"] = [s.GetNthSegmentID(i) for i in range(s.GetNumberOfSegments())]
    state["name"] = node.GetName()
    return state


def same_state(a, b) -> bool:
    return all(np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)


# --------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------


def test_volume_node_image_round_trip_keeps_exact_geometry(scene, pair):
    fixed_node, _, fixed, _ = pair
    back = nodes.volumeNodeToImage(fixed_node)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(fixed))
    assert np.allclose(back.GetSpacing(), fixed.GetSpacing(), atol=1e-12)
    assert np.allclose(back.GetOrigin(), fixed.GetOrigin(), atol=1e-12)
    assert np.allclose(back.GetDirection(), fixed.GetDirection(), atol=1e-12)
    # the same voxel lands on the same physical point: LPS in ITK, RAS in Slicer
    index = (7, 3, 11)
    lps = np.array(fixed.TransformIndexToPhysicalPoint(index))
    ras = (nodes.ijkToRasMatrix(fixed_node) @ [*index, 1.0])[:3]
    assert np.allclose(ras, lps * [-1, -1, 1], atol=1e-9)


def test_world_geometry_includes_linear_parent_and_refuses_nonlinear(scene, pair):
    fixed_node = pair[0]
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = [5.0, -3.0, 2.0]
    parent.SetMatrixTransformToParent(nodes.vtkMatrixFromArray(shift))
    fixed_node.SetAndObserveTransformNodeID(parent.GetID())
    local, world = nodes.volumeNodeToImage(fixed_node), nodes.volumeNodeToImage(fixed_node, world=True)
    assert np.allclose(np.subtract(world.GetOrigin(), local.GetOrigin()), [-5.0, 3.0, 2.0])  # RAS shift in LPS
    grid = scene.AddNewNodeByClass("vtkMRMLBSplineTransformNode")
    fixed_node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(ValueError, match="non-linear transform"):
        nodes.volumeNodeToImage(fixed_node, world=True)


# --------------------------------------------------------------------------
# Geometry, node kinds, hierarchy (the in-Slicer self test's checks)
# --------------------------------------------------------------------------


def test_affine_and_bspline_match_slicer_resampling(scene, tiny_models):
    report = selftest.checkAffineAndBSpline(ISTNRegistrationLogic(), scene, tiny_models, iterations=2)
    assert report["affine"] < 1e-3 and report["bspline"] < 1e-3


def test_bspline_result_is_a_real_deformation_split_into_affine_parent_and_bspline_child(scene, pair, tiny_models):
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "bspline")
    linear, bspline = nodes.splitComposite(result.transform)
    assert bspline is not None
    fixed = pair[2]
    points = [fixed.TransformIndexToPhysicalPoint(ix) for ix in ((10, 10, 10), (20, 17, 14), (28, 20, 18))]
    # the B-spline moves points by millimetres on top of the affine: the geometry test is not trivial
    moved = [np.linalg.norm(np.subtract(bspline.TransformPoint((linear @ [*p, 1])[:3].tolist()), (linear @ [*p, 1])[:3]))
             for p in points]
    assert max(moved) > 0.5
    # the nodes hold exactly these parts: the affine in the linear node, the B-spline in its child
    matrix = nodes.arrayFromVtkMatrix(_matrix_from_parent(result.transformNode))
    assert np.allclose(matrix, nodes.lpsToRasMatrix(linear), atol=1e-9)
    assert result.bsplineTransformNode.GetTransformFromParent().IsA("vtkOrientedBSplineTransform")
    p_ras = np.array(points[1]) * [-1, -1, 1]
    through_nodes = result.bsplineTransformNode.GetTransformFromParent().TransformPoint(
        result.transformNode.GetTransformFromParent().TransformPoint(p_ras.tolist()))
    assert np.allclose(np.array(through_nodes) * [-1, -1, 1], result.transform.TransformPoint(points[1]), atol=1e-6)


def _matrix_from_parent(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetMatrixTransformFromParent(m)
    return m


def test_affine_result_is_a_plain_linear_node(scene, pair, tiny_models):
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "affine")
    node = result.transformNode
    assert node.GetClassName() == "vtkMRMLLinearTransformNode" and node.IsLinear()
    assert result.bsplineTransformNode is None
    assert pair[1].GetParentTransformNode() is node
    assert result.metrics["folding_fraction"] is None


# --------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------


def test_transform_nodes_round_trip_through_h5(scene, pair, tiny_models, tmp_path):
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "bspline")
    files = {}
    for node, name in ((result.transformNode, "affine.h5"), (result.bsplineTransformNode, "bspline.h5")):
        storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
        storage.SetFileName(str(tmp_path / name))
        assert storage.WriteData(node)
        files[name] = tmp_path / name
    # SimpleITK reads what Slicer wrote: the same LPS transform as the engine's, point for point
    affine = sitk.ReadTransform(str(files["affine.h5"]))
    bspline = sitk.ReadTransform(str(files["bspline.h5"])).Downcast()
    assert isinstance(bspline, sitk.BSplineTransform)
    fixed = pair[2]
    for index in ((5, 5, 5), (20, 17, 14), (33, 25, 20)):
        p = fixed.TransformIndexToPhysicalPoint(index)
        assert np.allclose(bspline.TransformPoint(affine.TransformPoint(p)), result.transform.TransformPoint(p), atol=1e-5)
    # and Slicer reads it back into nodes that transform points the same way
    for original, name, cls in ((result.transformNode, "affine.h5", "vtkMRMLLinearTransformNode"),
                                (result.bsplineTransformNode, "bspline.h5", "vtkMRMLBSplineTransformNode")):
        reader = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
        reader.SetFileName(str(files[name]))
        loaded = scene.AddNewNodeByClass(cls)
        assert reader.ReadData(loaded)
        p = [12.0, -7.0, 4.0]
        assert np.allclose(loaded.GetTransformFromParent().TransformPoint(p),
                           original.GetTransformFromParent().TransformPoint(p), atol=1e-5)


# --------------------------------------------------------------------------
# ITN maps, output volume, views
# --------------------------------------------------------------------------


def test_itn_maps_are_volumes_with_colour_shown_over_the_fixed_volume(scene, pair, tiny_models):
    color_logic = slicer.vtkSlicerColorLogic()
    color_logic.SetMRMLScene(scene)  # the built-in colour tables, as in the application
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")  # one slice view
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "bspline", showMaps=True)
    stage = result.stages[-1]
    for node, image in ((result.fixedMapNode, stage.fixed_map), (result.movingMapNode, stage.moving_map)):
        assert node.IsA("vtkMRMLScalarVolumeNode")
        as_image = nodes.volumeNodeToImage(node)
        assert np.allclose(sitk.GetArrayFromImage(as_image), sitk.GetArrayFromImage(image))
        assert np.allclose(as_image.GetOrigin(), image.GetOrigin()) and np.allclose(as_image.GetDirection(), image.GetDirection())
        assert node.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeIron"
    assert result.fixedMapNode.GetParentTransformNode() is None
    assert result.movingMapNode.GetParentTransformNode() is result.bsplineTransformNode  # displayed aligned
    assert composite.GetBackgroundVolumeID() == pair[0].GetID()
    assert composite.GetForegroundVolumeID() == result.movingMapNode.GetID()
    assert result.transformNode.GetNodeReference(ROLE_FIXED_MAP) is result.fixedMapNode
    assert result.transformNode.GetNodeReference(ROLE_MOVING_MAP) is result.movingMapNode


def test_bounded_maps_show_the_structures_only(scene, pair, tiny_models, make_model):
    """A sigmoid ITN's maps are probabilities: window 0..1, the floor below 0.1 transparent; free maps are not."""
    sigmoid = make_model(3, "affine", itn_output="sigmoid")
    result = run(ISTNRegistrationLogic(), pair, {"affine": sigmoid}, "affine", showMaps=True)
    for node in (result.fixedMapNode, result.movingMapNode):
        display = node.GetDisplayNode()
        assert display.GetApplyThreshold() == 1
        assert display.GetLowerThreshold() == pytest.approx(0.1) and display.GetUpperThreshold() == pytest.approx(1.0)
        assert (display.GetWindow(), display.GetLevel()) == pytest.approx((1.0, 0.5))
        image = nodes.volumeNodeToImage(node)
        a = sitk.GetArrayViewFromImage(image)
        assert 0.0 <= a.min() and a.max() <= 1.0
    free = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", showMaps=True)
    assert free.fixedMapNode.GetDisplayNode().GetApplyThreshold() == 0


def test_a_model_without_an_itn_names_its_maps_as_what_they_are(scene, pair, tiny_models, make_model):
    """STN-u and STN-s learn no map: what they compare is the images as the network takes them, named so (2D
    audit: titled "ITN map"), and the ISTNs' maps stay "ITN map"."""
    fixed_node, moving_node = pair[0], pair[1]
    stn = run(ISTNRegistrationLogic(), pair, {"affine": make_model(3, "affine", "stn-u")}, "affine", showMaps=True)
    fixed_for = f" (for {moving_node.GetName()})"  # the fixed map says for which moving volume (console audit)
    assert stn.fixedMapNode.GetName() == f"{fixed_node.GetName()} network input{fixed_for}"
    assert stn.movingMapNode.GetName() == f"{moving_node.GetName()} network input"
    istn = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", showMaps=True)
    assert istn.fixedMapNode.GetName() == f"{fixed_node.GetName()} ITN map{fixed_for}"
    # and the summary's loss names what was compared
    assert "Affine: image MSE" in stn.summary() and "ITN map MSE" not in stn.summary()
    assert "Affine: ITN map MSE" in istn.summary()

    # the same output transform, now with an ISTN: its map nodes are reused and named anew (review: they kept
    # "network input"); a name the user gave a map is kept
    again = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", showMaps=True,
                outputTransformNode=stn.transformNode)
    assert again.fixedMapNode is stn.fixedMapNode and again.movingMapNode is stn.movingMapNode
    assert again.fixedMapNode.GetName() == f"{fixed_node.GetName()} ITN map{fixed_for}"
    assert again.movingMapNode.GetName() == f"{moving_node.GetName()} ITN map"
    again.movingMapNode.SetName("caudate overlay")
    back = run(ISTNRegistrationLogic(), pair, {"affine": make_model(3, "affine", "stn-u")}, "affine",
               showMaps=True, outputTransformNode=stn.transformNode)
    assert back.fixedMapNode.GetName() == f"{fixed_node.GetName()} network input{fixed_for}"
    assert back.movingMapNode.GetName() == "caudate overlay"


def test_reused_maps_are_named_for_the_moving_volume_now_registered(scene, pair, tiny_models):
    """A second moving volume registered into the same output transform: its maps are named for it (they kept
    "(for <first moving>)" and "<first moving> ITN map"); a map the user renamed keeps its name."""
    fixed_node, moving_node = pair[0], pair[1]
    first = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", showMaps=True)
    second_moving = nodes.addVolumeNodeFromImage(scene, pair[3], "second moving")
    moving_node.SetAndObserveTransformNodeID(None)  # taken out, or the module refuses to move it with the new result
    second = run(ISTNRegistrationLogic(), (fixed_node, second_moving), tiny_models, "affine", showMaps=True,
                 outputTransformNode=first.transformNode)
    assert second.fixedMapNode is first.fixedMapNode and second.movingMapNode is first.movingMapNode
    assert second.fixedMapNode.GetName() == f"{fixed_node.GetName()} ITN map (for second moving)"
    assert second.movingMapNode.GetName() == "second moving ITN map"
    second.fixedMapNode.SetName("my fixed map")
    second_moving.SetAndObserveTransformNodeID(None)
    third = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", showMaps=True,
                outputTransformNode=first.transformNode)
    assert third.fixedMapNode.GetName() == "my fixed map"
    assert third.movingMapNode.GetName() == f"{moving_node.GetName()} ITN map"


def test_output_volume_is_the_resampled_moving_and_the_moving_stays_put(scene, pair, tiny_models):
    fixed_node, moving_node, fixed, moving = pair
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "resampled")
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", outputVolumeNode=output)
    assert moving_node.GetParentTransformNode() is None
    expected = warp_image(moving, fixed, result.transform)
    got = nodes.volumeNodeToImage(output)
    assert np.allclose(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(expected), atol=1e-6)
    assert np.allclose(nodes.ijkToRasMatrix(output), nodes.ijkToRasMatrix(fixed_node), atol=1e-9)


def test_checkerboard_volume_alternates_the_fixed_and_the_registered_moving(scene, pair, tiny_models):
    """The checkerboard node holds, on the fixed grid, the fixed image and the moving image through the result
    (each windowed to [0, 1]) in alternating world cubes; both kinds of cube are there, the inputs stay as they
    were, and it cannot be an input or the output volume."""
    from istn.figures import checkerboard_image
    from istn.registration import OUTPUT_FIELD_SPACING_MM

    fixed_node, moving_node, fixed, moving = pair
    board = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "checkerboard")
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "resampled")
    fixed_before = sitk.GetArrayFromImage(nodes.volumeNodeToImage(fixed_node))
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")  # one slice view
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", outputVolumeNode=output,
                 checkerboardVolumeNode=board)
    assert result.checkerboardVolumeNode is board
    # asked for, it is what the views show: the background, the moving map over it
    assert composite.GetBackgroundVolumeID() == board.GetID()
    assert composite.GetForegroundVolumeID() == result.movingMapNode.GetID()
    got = sitk.GetArrayFromImage(nodes.volumeNodeToImage(board))
    warped = warp_image(moving, fixed, result.transform, field_spacing=OUTPUT_FIELD_SPACING_MM)
    expected = sitk.GetArrayFromImage(checkerboard_image(fixed, warped))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    f = sitk.GetArrayFromImage(checkerboard_image(fixed, fixed))  # every cube the fixed image
    w = sitk.GetArrayFromImage(checkerboard_image(warped, warped))  # every cube the warped image, own window
    shows_fixed, shows_warped = np.isclose(got, f, atol=1e-6), np.isclose(got, w, atol=1e-6)
    assert shows_fixed.mean() > 0.2 and shows_warped.mean() > 0.2 and (shows_fixed | shows_warped).all()
    assert np.allclose(nodes.ijkToRasMatrix(board), nodes.ijkToRasMatrix(fixed_node), atol=1e-9)
    display = board.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((1.0, 0.5))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nodes.volumeNodeToImage(fixed_node)), fixed_before)
    for bad in (fixed_node, moving_node, output):
        with pytest.raises(ValueError, match="checkerboard volume must be a volume of its own"):
            ISTNRegistrationLogic().register(fixed_node, moving_node, modelPath=tiny_models["affine"], iterations=1,
                                             outputVolumeNode=output, checkerboardVolumeNode=bad)


# --------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------


def _labels(image: sitk.Image) -> sitk.Image:
    return sitk.Cast(image > 0.3, sitk.sitkUInt8) + sitk.Cast(image > 0.7, sitk.sitkUInt8)


def test_dice_per_segment_before_and_after(scene, pair, tiny_models):
    fixed_node, moving_node, fixed, moving = pair
    fixed_labels = nodes.addVolumeNodeFromImage(scene, _labels(fixed), "fixed labels", "vtkMRMLLabelMapVolumeNode")
    moving_labelmap = nodes.addVolumeNodeFromImage(scene, _labels(moving), "moving labels", "vtkMRMLLabelMapVolumeNode")
    moving_seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "moving segmentation")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(moving_labelmap, moving_seg)
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "affine",
                 fixedSegmentationNode=fixed_labels, movingSegmentationNode=moving_seg)
    dice = result.metrics["dice"]
    assert sorted(dice) == ["label 1", "label 2"]  # label map names; segments matched by label value
    # independent check: Dice of the label maps warped by the engine
    warped = sitk.GetArrayFromImage(warp_image(_labels(moving), fixed, result.transform, sitk.sitkNearestNeighbor))
    before = sitk.GetArrayFromImage(warp_image(_labels(moving), fixed, sitk.Transform(3, sitk.sitkIdentity),
                                               sitk.sitkNearestNeighbor))
    target = sitk.GetArrayFromImage(_labels(fixed))
    for value in (1, 2):
        t = target == value
        for key, arr in (("after", warped), ("before", before)):
            m = arr == value
            expected = 2.0 * (t & m).sum() / (t.sum() + m.sum())
            assert dice[f"label {value}"][key] == pytest.approx(expected, abs=1e-9)
    assert "Dice before → after" in result.summary()


def test_dice_of_a_label_map_at_nearest_neighbour_ties_does_not_depend_on_its_storage(scene, pair, tiny_models):
    """A moving label map on a lattice half a voxel off the fixed grid's (twice as fine, as a 1 mm map against a
    2 mm volume in MNI space): every fixed point is a tie. Stored LPS or RAS, its Dice before and after is the same
    (before: the scores resampled the map as stored, and ITK broke the ties by the stored index)."""
    _, moving_node, fixed, moving = pair
    # the fixed volume on whole millimetres (an MNI-space 2 mm file), the moving labels on half millimetres at 1 mm
    square = sitk.Image([int(n * sp / 2) for n, sp in zip(fixed.GetSize(), fixed.GetSpacing())], sitk.sitkUInt8)
    square.SetSpacing((2.0, 2.0, 2.0))
    square.SetOrigin(tuple(float(round(v)) for v in fixed.GetOrigin()))
    square = sitk.Resample(fixed, square, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32)
    fixed_node = nodes.addVolumeNodeFromImage(scene, square, "fixed on whole mm")
    fixed_labels = nodes.addVolumeNodeFromImage(scene, _labels(square), "fixed labels", "vtkMRMLLabelMapVolumeNode")
    fine = sitk.Image([2 * n for n in square.GetSize()], sitk.sitkUInt8)
    fine.SetOrigin(tuple(v - 0.5 for v in square.GetOrigin()))  # fixed voxel i at fine index 2 i + 0.5
    fine = _labels(sitk.Resample(moving, fine, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0))
    scores = {}
    for layout in ("LPS", "RAS"):
        labels = nodes.addVolumeNodeFromImage(scene, sitk.DICOMOrient(fine, layout), f"moving labels {layout}",
                                              "vtkMRMLLabelMapVolumeNode")
        result = run(ISTNRegistrationLogic(), (fixed_node, moving_node), tiny_models, "affine",
                     fixedSegmentationNode=fixed_labels, movingSegmentationNode=labels)
        scores[layout] = result.metrics["dice"]
    assert 0 < scores["LPS"]["label 1"]["before"] < 1
    assert scores["RAS"] == scores["LPS"]


def _user_transform(scene, degrees=12.0, shift=(6.0, -4.0, 3.0)):
    """A linear transform node of the user's (RAS): a rotation about the superior axis and a shift."""
    a = np.radians(degrees)
    m = np.eye(4)
    m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    m[:3, 3] = shift
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "my alignment")
    node.SetMatrixTransformToParent(nodes.vtkMatrixFromArray(m))
    return node, m


def _record_starts(monkeypatch) -> list:
    """The initial transform of every registration the logic runs from now on (None: the volume's own geometry)."""
    import istn.chain

    starts = []
    real = istn.chain.register_with_second_try

    def spy(*args, **kwargs):
        starts.append(kwargs.get("initial_transform"))
        return real(*args, **kwargs)

    monkeypatch.setattr(istn.chain, "register_with_second_try", spy)
    return starts


def test_a_moving_segmentation_under_a_transform_of_its_own_is_scored_where_it_is_shown(scene, pair, tiny_models):
    """The moving volume hardened, its label map still under the user's alignment (lined up with it on screen):
    Dice is that of the labels as shown, the same as with the labels hardened too (Slicer audit: 0.87 -> 0.00
    reported, the labels taken where their own voxels lie)."""
    fixed_node, moving_node, fixed, moving = pair
    user, _ = _user_transform(scene)
    moving_node.SetAndObserveTransformNodeID(user.GetID())
    slicer.vtkSlicerTransformLogic.hardenTransform(moving_node)
    fixed_labels = nodes.addVolumeNodeFromImage(scene, _labels(fixed), "fixed labels", "vtkMRMLLabelMapVolumeNode")
    under = nodes.addVolumeNodeFromImage(scene, _labels(moving), "moving labels", "vtkMRMLLabelMapVolumeNode")
    under.SetAndObserveTransformNodeID(user.GetID())
    hardened = nodes.addVolumeNodeFromImage(scene, _labels(moving), "hardened labels", "vtkMRMLLabelMapVolumeNode")
    hardened.SetAndObserveTransformNodeID(user.GetID())
    slicer.vtkSlicerTransformLogic.hardenTransform(hardened)
    scores = [run(ISTNRegistrationLogic(), pair, tiny_models, "affine", fixedSegmentationNode=fixed_labels,
                  movingSegmentationNode=labels).metrics["dice"] for labels in (under, hardened)]
    flat = [[d[k][when] for k in ("label 1", "label 2") for when in ("before", "after")] for d in scores]
    assert flat[0] == pytest.approx(flat[1], abs=1e-9)
    assert under.GetParentTransformNode() is user  # only read


def test_a_moving_volume_the_user_aligned_is_registered_from_where_it_is_shown(scene, pair, tiny_models, monkeypatch):
    """Under a linear transform of the user's (a manual alignment), the moving volume's shown position is the start:
    the engine gets the transform from fixed world points to the volume's own points (its parent's inverse), Dice
    "before" is that of the segmentation as shown (checked by hardening a copy), the result includes the start
    and replaces the user's transform above the volume (which is given back on cancel)."""
    fixed_node, moving_node, fixed, moving = pair
    user, m_ras = _user_transform(scene)
    moving_node.SetAndObserveTransformNodeID(user.GetID())
    fixed_labels = nodes.addVolumeNodeFromImage(scene, _labels(fixed), "fixed labels", "vtkMRMLLabelMapVolumeNode")
    moving_labels = nodes.addVolumeNodeFromImage(scene, _labels(moving), "moving labels", "vtkMRMLLabelMapVolumeNode")
    starts = _record_starts(monkeypatch)
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", fixedSegmentationNode=fixed_labels,
                 movingSegmentationNode=moving_labels)
    start = starts[0]
    assert start is not None and result.startedFrom == "my alignment"
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    for own in ([0.0, 0.0, 0.0], [20.0, -15.0, 30.0], [-40.0, 25.0, -10.0]):  # a point of the volume (LPS)
        shown = (lps @ m_ras @ lps @ np.append(own, 1.0))[:3]  # where the user sees it
        np.testing.assert_allclose(start.TransformPoint(shown.tolist()), own, atol=1e-6)
    # Dice before, independently: a copy of the moving labels under the same transform, hardened, on the fixed grid
    copy = nodes.addVolumeNodeFromImage(scene, _labels(moving), "copy", "vtkMRMLLabelMapVolumeNode")
    copy.SetAndObserveTransformNodeID(user.GetID())
    slicer.vtkSlicerTransformLogic.hardenTransform(copy)
    shown_labels = sitk.GetArrayFromImage(warp_image(nodes.volumeNodeToImage(copy), fixed,
                                                     sitk.Transform(3, sitk.sitkIdentity), sitk.sitkNearestNeighbor))
    target = sitk.GetArrayFromImage(_labels(fixed))
    for value in (1, 2):
        t, m = target == value, shown_labels == value
        assert result.metrics["dice"][f"label {value}"]["before"] == pytest.approx(
            2.0 * (t & m).sum() / (t.sum() + m.sum()), abs=1e-9)
    assert moving_node.GetParentTransformNode() is result.transformNode
    assert "Started from the moving volume's placement under 'my alignment'" in result.summary()
    # a second Apply (the volume now under the result, which includes the user's placement) starts where the first
    # did, not from the volume's own geometry: the same start, the same result
    starts.clear()
    again = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", outputTransformNode=result.transformNode,
                fixedSegmentationNode=fixed_labels, movingSegmentationNode=moving_labels)
    assert len(starts) == 1 and starts[0] is not None
    np.testing.assert_allclose(_affine_matrix(starts[0]), _affine_matrix(start), atol=1e-9)
    np.testing.assert_allclose(_affine_matrix(again.transform), _affine_matrix(result.transform), atol=1e-6)
    for name, values in result.metrics["dice"].items():  # "before" too: the start is where the volume was shown
        assert again.metrics["dice"][name] == pytest.approx(values)
    assert again.startedFrom == "my alignment"
    # a run from the volume's own geometry forgets the recorded start: the next Apply starts there too
    moving_node.SetAndObserveTransformNodeID(None)
    starts.clear()
    run(ISTNRegistrationLogic(), pair, tiny_models, "affine", outputTransformNode=result.transformNode)
    run(ISTNRegistrationLogic(), pair, tiny_models, "affine", outputTransformNode=result.transformNode)
    assert starts == [None, None]


def test_the_users_own_transform_as_output_keeps_its_start_for_a_second_apply(scene, pair, tiny_models, monkeypatch):
    """The output transform chosen is the user's alignment the moving volume is under: the first run starts from it
    and overwrites it with the result; a second Apply starts from the alignment as it was, not from the identity."""
    fixed_node, moving_node = pair[:2]
    user, _ = _user_transform(scene)
    moving_node.SetAndObserveTransformNodeID(user.GetID())
    starts = _record_starts(monkeypatch)
    first = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", outputTransformNode=user)
    second = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", outputTransformNode=user)
    assert first.transformNode is user and second.transformNode is user
    np.testing.assert_allclose(_affine_matrix(starts[1]), _affine_matrix(starts[0]), atol=1e-9)
    np.testing.assert_allclose(_affine_matrix(second.transform), _affine_matrix(first.transform), atol=1e-6)


def test_a_moving_volume_under_a_nonlinear_transform_of_the_users_is_refused_before_anything(scene, pair,
                                                                                             tiny_models):
    fixed_node, moving_node = pair[:2]
    warp = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "acquisition correction")
    moving_node.SetAndObserveTransformNodeID(warp.GetID())
    before = selftest.nodeIds(scene)
    with pytest.raises(ValueError, match="under the non-linear transform 'acquisition correction'; harden it"):
        run(ISTNRegistrationLogic(), pair, tiny_models, "affine")
    assert selftest.nodeIds(scene) == before and moving_node.GetParentTransformNode() is warp


def _structures(*spec):
    mask = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    return [nodes.Structure(name, value, mask) for name, value in spec]


def test_structures_pair_by_name_without_case_and_say_what_is_left_unscored():
    fixed = _structures(("Left Caudate", 1), ("left putamen", 2), ("thalamus", 3))
    moving = _structures(("left caudate ", 7), ("LEFT PUTAMEN", 1), ("pallidum", 2))
    pairs, notes = nodes.matchStructures(fixed, moving)
    assert [(f.name, m.name) for f, m in pairs] == [("Left Caudate", "left caudate "), ("left putamen", "LEFT PUTAMEN")]
    assert len(notes) == 1 and "fixed 'thalamus'" in notes[0] and "moving 'pallidum'" in notes[0]
    pairs, notes = nodes.matchStructures(fixed[:2], moving[:2])  # every name has its counterpart: nothing to say
    assert len(pairs) == 2 and notes == []


def test_structures_pair_by_label_value_only_when_each_value_is_one_structure():
    fixed = _structures(("Segment_1", 1), ("Segment_2", 2))
    pairs, notes = nodes.matchStructures(fixed, _structures(("a", 2), ("b", 1)))
    assert [(f.name, m.name) for f, m in pairs] == [("Segment_1", "b"), ("Segment_2", "a")]
    assert len(notes) == 1 and "by label value" in notes[0] and "'Segment_1' ~ 'b'" in notes[0]
    # segments each in a layer of their own all have the value 1: no pairing, rather than a wrong one
    assert nodes.matchStructures(fixed, _structures(("a", 1), ("b", 1))) == ([], [])
    assert nodes.matchStructures(fixed, _structures(("a", None), ("b", 2))) == ([], [])


def test_a_partial_name_match_is_scored_and_said(scene, pair, tiny_models):
    fixed, moving = pair[2], pair[3]
    a = nodes.addVolumeNodeFromImage(scene, _labels(fixed), "a", "vtkMRMLScalarVolumeNode")  # "label 1", "label 2"
    moving_labels = sitk.Cast(moving > 0.3, sitk.sitkUInt8) + 2 * sitk.Cast(moving > 0.7, sitk.sitkUInt8)
    b = nodes.addVolumeNodeFromImage(scene, moving_labels, "b", "vtkMRMLScalarVolumeNode")  # "label 1", "label 3"
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", fixedSegmentationNode=a,
                 movingSegmentationNode=b)
    assert sorted(result.metrics["dice"]) == ["label 1"]
    assert any("fixed 'label 2'" in w and "moving 'label 3'" in w for w in result.warnings)


def test_segmentations_without_common_structures_are_refused_before_anything_runs(scene, pair, tiny_models):
    fixed, moving = pair[2], pair[3]
    a = nodes.addVolumeNodeFromImage(scene, sitk.Cast(fixed > 0.5, sitk.sitkUInt8) * 3, "a", "vtkMRMLLabelMapVolumeNode")
    b = nodes.addVolumeNodeFromImage(scene, sitk.Cast(moving > 0.5, sitk.sitkUInt8) * 5, "b", "vtkMRMLLabelMapVolumeNode")
    before = selftest.nodeIds(scene)
    with pytest.raises(ValueError, match="no structure in common"):
        run(ISTNRegistrationLogic(), pair, tiny_models, fixedSegmentationNode=a, movingSegmentationNode=b)
    assert selftest.nodeIds(scene) == before


# --------------------------------------------------------------------------
# Live update, repeat runs
# --------------------------------------------------------------------------


def test_transform_nodes_follow_refinement_live_and_in_place(scene, pair, tiny_models):
    output = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "out")
    affine_events, bspline_states = [], []
    output.AddObserver(slicer.vtkMRMLTransformableNode.TransformModifiedEvent, lambda *a: affine_events.append(1))

    def progress(p):
        if p.stage == "bspline" and p.iteration > 0:
            transform = output.GetNodeReference(ROLE_BSPLINE).GetTransformFromParent()
            coefficients = numpy_support.vtk_to_numpy(transform.GetCoefficientData().GetPointData().GetScalars()).copy()
            bspline_states.append((transform.GetAddressAsString(""), coefficients))

    run(ISTNRegistrationLogic(), pair, tiny_models, "bspline", iterations=4, outputTransformNode=output,
        progressCallback=progress)
    assert len(affine_events) >= 4, "the affine node must change with every affine refinement iteration"
    assert len(bspline_states) == 4
    assert len({address for address, _ in bspline_states}) == 1, "the B-spline must be updated in place"
    assert not np.allclose(bspline_states[0][1], bspline_states[-1][1]), "the B-spline did not change while refining"


def test_second_apply_gives_the_same_result_and_reuses_its_nodes(scene, pair, tiny_models):
    logic = ISTNRegistrationLogic()
    first = run(logic, pair, tiny_models, "bspline", iterations=3)
    count = scene.GetNumberOfNodes()
    m1 = nodes.arrayFromVtkMatrix(_matrix_from_parent(first.transformNode))
    second = run(logic, pair, tiny_models, "bspline", iterations=3, outputTransformNode=first.transformNode)
    assert scene.GetNumberOfNodes() == count
    assert second.bsplineTransformNode is first.bsplineTransformNode
    assert second.fixedMapNode is first.fixedMapNode and second.movingMapNode is first.movingMapNode
    assert np.allclose(nodes.arrayFromVtkMatrix(_matrix_from_parent(second.transformNode)), m1, atol=1e-6)
    assert np.allclose(second.transform.GetNthTransform(0).GetParameters(), first.transform.GetNthTransform(0).GetParameters(), atol=1e-6)


# --------------------------------------------------------------------------
# Cancel, failure, inputs
# --------------------------------------------------------------------------


def test_cancel_mid_refinement_leaves_no_node_behind(scene, tiny_models):
    selftest.checkCancelLeavesSceneUnchanged(ISTNRegistrationLogic(), scene, tiny_models)


def test_selftest_quality_volumes_pass_on_slicer_core(scene, tiny_models):
    """The in-Slicer self test's check of the checkerboard and Jacobian volumes, run here on slicer-core."""
    selftest.checkQualityVolumes(ISTNRegistrationLogic(), scene, tiny_models)


def test_cancel_event_restores_a_user_output_transform(scene, pair, tiny_models):
    output = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "mine")
    mine = np.eye(4)
    mine[:3, 3] = [1.0, 2.0, 3.0]
    output.SetMatrixTransformFromParent(nodes.vtkMatrixFromArray(mine))
    moving_parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "previous parent")
    pair[1].SetAndObserveTransformNodeID(moving_parent.GetID())
    before = selftest.nodeIds(scene)
    stop = threading.Event()
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", iterations=10, outputTransformNode=output,
                 cancel=stop, progressCallback=lambda p: p.iteration >= 2 and stop.set())
    assert result.cancelled and result.transformNode is None
    assert selftest.nodeIds(scene) == before
    assert np.allclose(nodes.arrayFromVtkMatrix(_matrix_from_parent(output)), mine)
    assert pair[1].GetParentTransformNode() is moving_parent


def test_failed_run_leaves_the_scene_as_it_was(scene, pair, tiny_models):
    before = selftest.nodeIds(scene)

    def explode(p):
        if p.stage == "bspline" and p.iteration == 1:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(ISTNRegistrationLogic(), pair, tiny_models, "bspline", iterations=3, progressCallback=explode)
    assert selftest.nodeIds(scene) == before
    assert pair[1].GetParentTransformNode() is None


def test_jacobian_volume_is_the_results_volume_change_on_the_fixed_grid(scene, pair, tiny_models):
    """The Jacobian node holds `jacobian_image` of the final transform on the fixed grid (world geometry of the fixed
    volume), in a colour table with white at 1, a window centred on 1 that spans the 1st..99th percentiles, and
    the summary gives its range; an affine's is its determinant everywhere; it cannot be an input or output."""
    from istn.metrics import JACOBIAN_MIN_HALF_WIDTH
    from istn.registration import OUTPUT_FIELD_SPACING_MM, jacobian_image

    color_logic = slicer.vtkSlicerColorLogic()
    color_logic.SetMRMLScene(scene)  # the built-in colour tables (the application adds the file-based ones)
    fixed_node, moving_node, fixed, _ = pair
    jac = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "jacobian")
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "bspline", jacobianVolumeNode=jac)
    assert result.jacobianVolumeNode is jac
    got = sitk.GetArrayFromImage(nodes.volumeNodeToImage(jac))
    expected = sitk.GetArrayFromImage(jacobian_image(result.transform, fixed, OUTPUT_FIELD_SPACING_MM))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got.std() > 1e-4  # a B-spline result: not one value
    assert np.allclose(nodes.ijkToRasMatrix(jac), nodes.ijkToRasMatrix(fixed_node), atol=1e-9)
    display = jac.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeRainbow"  # the first of the candidates present here
    p1, p99 = np.percentile(got, [1, 99])
    half = max(abs(p1 - 1), abs(p99 - 1), JACOBIAN_MIN_HALF_WIDTH)
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((2 * half, 1.0), rel=1e-5)
    assert f"{result.metrics['jacobian']['p1']:.3f} to {result.metrics['jacobian']['p99']:.3f}" in result.summary()
    affine = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", jacobianVolumeNode=jac)
    values = sitk.GetArrayFromImage(nodes.volumeNodeToImage(jac))
    matrix = np.asarray(sitk.AffineTransform(affine.transform).GetMatrix()).reshape(3, 3)
    np.testing.assert_allclose(values, np.linalg.det(matrix), atol=1e-5)
    board = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "checkerboard")
    for bad in (fixed_node, moving_node, board):
        with pytest.raises(ValueError, match="Jacobian volume must be a volume of its own"):
            ISTNRegistrationLogic().register(fixed_node, moving_node, modelPath=tiny_models["affine"], iterations=1,
                                             checkerboardVolumeNode=board if bad is not board else None,
                                             outputVolumeNode=board if bad is board else None, jacobianVolumeNode=bad)


def test_a_run_failing_after_its_outputs_were_written_gives_the_user_back_their_output_volumes(
        scene, pair, tiny_models, monkeypatch):
    """The output and checkerboard volumes the user chose hold an earlier run's result (voxels, geometry, a parent
    transform, a window/level); a run that fails after writing them (here: showing them in the views) puts all of
    it back, and adds no node."""
    fixed_node, moving_node, fixed, _ = pair
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "theirs")
    earlier = {}
    for name in ("resampled", "checkerboard", "jacobian"):
        node = nodes.addVolumeNodeFromImage(scene, sitk.Cast(fixed[::2, ::2, ::2] * 3.0, sitk.sitkFloat32), name)
        node.SetAndObserveTransformNodeID(parent.GetID())
        node.GetDisplayNode().AutoWindowLevelOff()
        node.GetDisplayNode().SetWindowLevel(7.0, 3.0)
        earlier[name] = node, node_state(node)
    before = selftest.nodeIds(scene)
    logic = ISTNRegistrationLogic()
    written = []

    def fail(*args, **kwargs):
        written.append({name: not same_state(state, node_state(node)) for name, (node, state) in earlier.items()})
        raise RuntimeError("view update failed")

    monkeypatch.setattr(logic, "_showInSliceViews", fail)
    with pytest.raises(RuntimeError, match="view update failed"):
        run(logic, pair, tiny_models, "affine", outputVolumeNode=earlier["resampled"][0],
            checkerboardVolumeNode=earlier["checkerboard"][0], jacobianVolumeNode=earlier["jacobian"][0])
    assert written == [{"resampled": True, "checkerboard": True, "jacobian": True}]  # the failure came after all
    assert selftest.nodeIds(scene) == before
    for name, (node, state) in earlier.items():
        assert same_state(state, node_state(node)), name
        assert node.GetParentTransformNode() is parent
        display = node.GetDisplayNode()
        assert not display.GetAutoWindowLevel() and (display.GetWindow(), display.GetLevel()) == (7.0, 3.0)
    assert moving_node.GetParentTransformNode() is None


def test_a_failed_rerun_gives_back_the_earlier_runs_maps(scene, pair, tiny_models, monkeypatch):
    """The ITN map volumes of an earlier run are reused in place by a second Apply; one that fails after writing
    them puts their voxels and parent transform back, so the maps still match the restored transform."""
    logic = ISTNRegistrationLogic()
    first = run(logic, pair, tiny_models, "bspline", iterations=2)
    maps = {node: (node_state(node), node.GetParentTransformNode()) for node in (first.fixedMapNode,
                                                                                 first.movingMapNode)}
    moving_map = slicer.util.arrayFromVolume(first.movingMapNode).copy()

    shown = []

    def fail(*args, **kwargs):
        shown.append(args)
        if len(shown) == 2:  # the views at the end (the first call shows the moving volume as refinement runs)
            assert not np.array_equal(slicer.util.arrayFromVolume(first.movingMapNode), moving_map)  # written
            raise RuntimeError("view update failed")

    monkeypatch.setattr(logic, "_showInSliceViews", fail)
    with pytest.raises(RuntimeError, match="view update failed"):
        # other maps: the moving volume's voxels edited since (mirrored)
        voxels = slicer.util.arrayFromVolume(pair[1])
        voxels[:] = voxels[::-1].copy()
        slicer.util.arrayFromVolumeModified(pair[1])
        run(logic, pair, tiny_models, "bspline", iterations=2, outputTransformNode=first.transformNode,
            updateViews=True)
    for node, (state, parent) in maps.items():
        assert same_state(state, node_state(node)) and node.GetParentTransformNode() is parent


def test_an_affine_rerun_into_a_bspline_result_leaves_no_stale_bspline_behind(scene, pair, tiny_models):
    first = run(ISTNRegistrationLogic(), pair, tiny_models, "bspline", iterations=2)
    old = first.bsplineTransformNode
    second = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", outputTransformNode=first.transformNode)
    assert second.transformNode is first.transformNode and second.bsplineTransformNode is None
    assert not scene.IsNodePresent(old) and first.transformNode.GetNodeReference(ROLE_BSPLINE) is None
    assert pair[1].GetParentTransformNode() is first.transformNode
    assert first.movingMapNode.GetParentTransformNode() is first.transformNode
    # something of the user's under the old B-spline keeps its node, made the identity (the affine result alone)
    third = run(ISTNRegistrationLogic(), pair, tiny_models, "bspline", iterations=2,
                outputTransformNode=first.transformNode)
    theirs = nodes.addVolumeNodeFromImage(scene, pair[3], "theirs")
    theirs.SetAndObserveTransformNodeID(third.bsplineTransformNode.GetID())
    run(ISTNRegistrationLogic(), pair, tiny_models, "affine", outputTransformNode=first.transformNode)
    assert scene.IsNodePresent(third.bsplineTransformNode) and theirs.GetParentTransformNode() is \
        third.bsplineTransformNode
    assert third.bsplineTransformNode.IsLinear()


@pytest.mark.parametrize("what", ["moving", "output transform", "B-spline", "output volume"])
def test_a_node_removed_during_the_run_stops_it_with_a_clear_error_and_undoes_it(scene, pair, tiny_models, what):
    """The Data module stays usable while the panel processes events: a node of the run deleted meanwhile stops
    the run, which fails naming it, the rest of the scene as it was (no success reported over a missing node)."""
    fixed_node, moving_node = pair[:2]
    out = nodes.addVolumeNodeFromImage(scene, pair[2], "my output")
    before = selftest.nodeIds(scene)
    victim = {}

    def progress(p):
        if p.stage == "bspline" and p.iteration == 1 and not victim:
            if what == "moving":
                node = moving_node
            elif what == "output volume":
                node = out
            else:
                linear = scene.GetFirstNodeByName("M to F (ISTN)") or scene.GetNodesByClass(
                    "vtkMRMLLinearTransformNode").GetItemAsObject(0)
                node = linear if what == "output transform" else linear.GetNodeReference(ROLE_BSPLINE)
            victim["name"] = node.GetName()
            scene.RemoveNode(node)

    with pytest.raises(RuntimeError, match="was removed from the scene during the registration"):
        run(ISTNRegistrationLogic(), pair, tiny_models, "bspline", iterations=3, progressCallback=progress,
            outputVolumeNode=out if what == "output volume" else None)
    assert victim  # removed mid-run; every other node as before the run, none of the run's left
    assert selftest.nodeIds(scene) == {n for n in before if scene.GetNodeByID(n) is not None}
    if what != "moving":
        assert moving_node.GetParentTransformNode() is None


def test_a_single_slice_volume_is_refused_with_advice_that_works_in_slicer(scene, pair, tiny_models):
    flat = nodes.addVolumeNodeFromImage(scene, pair[2][:, :, 3:4], "one slice")
    before = selftest.nodeIds(scene)
    with pytest.raises(ValueError, match="'one slice' is a single slice: this module registers 3D volumes"):
        ISTNRegistrationLogic().register(pair[0], flat, modelPath=tiny_models["affine"], iterations=1)
    assert selftest.nodeIds(scene) == before
    # a point or a line is no slice either: it got the engine's command-line advice ("save it as a 2D image")
    for size, name in (((1, 1, 1), "one voxel"), ((1, 12, 1), "one line")):
        node = nodes.addVolumeNodeFromImage(scene, sitk.Image(size, sitk.sitkFloat32) + 1.0, name)
        before = selftest.nodeIds(scene)
        with pytest.raises(ValueError, match=f"the fixed volume '{name}' has {' x '.join(map(str, size))} voxels: a "
                                             "3D volume of at least 4 voxels per axis is needed"):
            ISTNRegistrationLogic().register(node, pair[1], modelPath=tiny_models["affine"], iterations=1)
        assert selftest.nodeIds(scene) == before


def test_inputs_are_never_modified(scene, pair, tiny_models):
    fixed_node, moving_node, fixed, moving = pair
    fixed_seg = nodes.addVolumeNodeFromImage(scene, _labels(fixed), "fl", "vtkMRMLLabelMapVolumeNode")
    moving_seg = nodes.addVolumeNodeFromImage(scene, _labels(moving), "ml", "vtkMRMLLabelMapVolumeNode")
    inputs = (fixed_node, moving_node, fixed_seg, moving_seg)
    states = [node_state(n) for n in inputs]
    run(ISTNRegistrationLogic(), pair, tiny_models, "bspline",
        fixedSegmentationNode=fixed_seg, movingSegmentationNode=moving_seg)
    assert all(same_state(s, node_state(n)) for s, n in zip(states, inputs))
    assert all(scene.IsNodePresent(n) for n in inputs)


@pytest.mark.parametrize("case", ["same", "labelmap", "output-is-input", "bad-device", "negative-iterations",
                                  "wrong-type"])
def test_bad_arguments_are_refused_before_the_scene_changes(scene, pair, tiny_models, case):
    fixed_node, moving_node = pair[:2]
    logic = ISTNRegistrationLogic()
    before = selftest.nodeIds(scene)
    kw = dict(modelPath=tiny_models["affine"], iterations=1)
    if case == "same":
        call = lambda: logic.register(fixed_node, fixed_node, **kw)  # noqa: E731
    elif case == "labelmap":
        lab = nodes.addVolumeNodeFromImage(scene, _labels(pair[2]), "lab", "vtkMRMLLabelMapVolumeNode")
        before = selftest.nodeIds(scene)
        call = lambda: logic.register(lab, moving_node, **kw)  # noqa: E731
    elif case == "output-is-input":
        call = lambda: logic.register(fixed_node, moving_node, outputVolumeNode=moving_node, **kw)  # noqa: E731
    elif case == "bad-device":
        call = lambda: logic.register(fixed_node, moving_node, device="tpu", **kw)  # noqa: E731
    elif case == "negative-iterations":
        call = lambda: logic.register(fixed_node, moving_node, modelPath=tiny_models["affine"], iterations=-1)  # noqa: E731
    else:
        call = lambda: logic.register(fixed_node, moving_node, transformType="bspline", **kw)  # noqa: E731
    with pytest.raises(ValueError):
        call()
    assert selftest.nodeIds(scene) == before
    assert moving_node.GetParentTransformNode() is None


def test_engine_warnings_reach_the_result(scene, pair, tiny_models, monkeypatch):
    import istn.registration as engine

    real = engine.register

    def on_gpu_that_ran_out(*args, **kwargs):
        result = real(*args, **kwargs)
        result.warnings.append("GPU out of memory: the registration ran on the CPU instead")
        return result

    monkeypatch.setattr(engine, "register", on_gpu_that_ran_out)
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "affine")
    assert any("GPU out of memory" in w for w in result.warnings)
    assert "GPU out of memory" in result.summary()


# --------------------------------------------------------------------------
# Models, dependencies, sample data
# --------------------------------------------------------------------------


def test_bundled_models_are_listed_and_used_by_default(scene, pair, tiny_models, tmp_path, monkeypatch):
    folder = tmp_path / "Models"
    folder.mkdir()
    monkeypatch.setattr(modelfiles, "MODELS_DIR", folder)
    with pytest.raises(ValueError, match="no bundled affine model"):
        ISTNRegistrationLogic().register(pair[0], pair[1], iterations=1)
    for kind in ("bspline", "affine"):
        (folder / f"brain_{kind}.pt").write_bytes(Path(tiny_models[kind]).read_bytes())
    (folder / "brain_affine.md").write_text("# Affine brain model\n")
    (folder / "broken.pt").write_text("not a model")
    listed = ISTNRegistrationLogic.availableModels()
    assert [m.name for m in listed] == ["brain_affine", "brain_bspline"]
    assert listed[0].card.startswith("# Affine")
    assert "affine 3D model" in listed[0].describe()
    result = ISTNRegistrationLogic().register(pair[0], pair[1], transformType="bspline", iterations=1, threads=1)
    assert [s.transform_type for s in result.stages] == ["affine", "bspline"]


def test_the_default_family_comes_first_and_a_bspline_is_prealigned_by_its_own_familys_affine(tiny_models, tmp_path,
                                                                                               monkeypatch):
    folder = tmp_path / "Models"
    folder.mkdir()
    monkeypatch.setattr(modelfiles, "MODELS_DIR", folder)
    for family in ("brain-any", "brain-t1"):  # "brain-any" sorts first by name; the default family still leads
        for kind in ("affine", "bspline"):
            (folder / f"{family}-{kind}.pt").write_bytes(Path(tiny_models[kind]).read_bytes())
    assert [m.name for m in ISTNRegistrationLogic.availableModels()] == [
        "brain-t1-affine", "brain-any-affine", "brain-t1-bspline", "brain-any-bspline"]
    assert modelfiles.defaultModel("bspline").name == "brain-t1-bspline"
    resolve = ISTNRegistrationLogic._resolveModels
    assert resolve("bspline", None, True, None) == [("affine", folder / "brain-t1-affine.pt"),
                                                    ("bspline", folder / "brain-t1-bspline.pt")]
    other = folder / "brain-any-bspline.pt"
    assert resolve(None, other, True, None) == [("affine", folder / "brain-any-affine.pt"), ("bspline", other)]
    # a chosen pre-alignment model wins; without a companion the default affine is used
    assert resolve(None, other, True, folder / "brain-t1-affine.pt")[0] == ("affine", folder / "brain-t1-affine.pt")
    (folder / "brain-any-affine.pt").write_text("not a model")
    assert resolve(None, other, True, None)[0] == ("affine", folder / "brain-t1-affine.pt")
    assert resolve(None, other, False, None) == [("bspline", other)]


def test_the_panel_says_which_contrasts_a_bundled_model_is_validated_on():
    listed = ISTNRegistrationLogic.availableModels()
    assert listed and all("validated on T1 images (T2, PD: not validated" in m.describe() for m in listed)
    t2 = modelfiles.ModelInfo(listed[0].path, {**listed[0].meta, "data_options": {"contrasts": ["t1", "t2"]}})
    assert "(PD: not validated" in t2.describe()
    assert modelfiles.ModelInfo(listed[0].path, {"transform": "affine"}).contrasts() == ""  # no recipe, no claim


def test_a_foreign_file_is_not_taken_for_a_model(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(modelfiles.ModelInfoError):
        modelfiles.readModelInfo(bad)


def test_module_library_imports_and_explains_without_torch(tmp_path):
    """Importing must not fail when torch is missing; the registration then says what to install."""
    code = r"""
import sys, importlib.abc
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'")
sys.meta_path.insert(0, NoTorch())
import importlib.util
importlib.util.find_spec = (lambda f: (lambda name, *a: None if name.split('.')[0] == 'torch' else f(name, *a)))(importlib.util.find_spec)
sys.path.insert(0, sys.argv[1])
import slicer
slicer.mrmlScene = slicer.vtkMRMLScene()
import ISTNRegistrationLib as lib
assert "torch" in lib.missingPackages(), lib.missingPackages()
assert "PyTorch extension" in lib.dependencyMessage()
v = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
w = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
try:
    lib.ISTNRegistrationLogic().register(v, w)
except RuntimeError as e:
    assert "torch" in str(e)
    print("OK")
assert "torch" not in sys.modules
"""
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "ISTNRegistration")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def test_sample_data_registration(tmp_path, monkeypatch):
    import hashlib
    import types

    for name, _, _ in sampledata.FILES:
        (tmp_path / name).write_bytes(name.encode())
    args = sampledata.sampleDataSourceArguments(tmp_path)
    assert args["category"] == "ISTN Registration" and args["sampleName"] == "ISTN brain pair"  # the button text
    # cache names cannot collide with other modules' sample data in Slicer's shared cache
    assert args["fileNames"] == ["ISTNRegistration_fixed_t1.nii.gz", "ISTNRegistration_moving_t1.nii.gz",
                                 "ISTNRegistration_fixed_labels.seg.nrrd", "ISTNRegistration_moving_labels.seg.nrrd"]
    assert all(u.startswith("file://") and Path(u[len("file://"):]).exists() for u in args["uris"])
    assert args["loadFileTypes"] == ["VolumeFile", "VolumeFile", "SegmentationFile", "SegmentationFile"]
    assert "loadFileType" not in args  # the singular form is deprecated
    assert args["checksums"][0] == "SHA256:" + hashlib.sha256(b"fixed_t1.nii.gz").hexdigest()
    assert len(args["nodeNames"]) == len(set(args["checksums"])) == 4
    # registered through Slicer's Sample Data module (a stand-in here: SampleData exists only in the application)
    calls = []

    def current(**kw):  # Slicer >= 5.8
        calls.append(kw)

    def before_5_8(category=None, sampleName=None, uris=None, fileNames=None, nodeNames=None,
                   customDownloader=None, thumbnailFileName=None, loadFileType="VolumeFile", loadFiles=None,
                   loadFileProperties={}, checksums=None):  # noqa: B006  (Slicer 5.6's signature)
        calls.append(dict(loadFileType=loadFileType, sampleName=sampleName))

    monkeypatch.setattr(sampledata, "sampleDataDirectory", lambda: tmp_path)
    for register in (current, before_5_8):
        fake = types.SimpleNamespace(SampleDataLogic=types.SimpleNamespace(registerCustomSampleDataSource=register))
        monkeypatch.setitem(sys.modules, "SampleData", fake)
        assert sampledata.registerSampleData()
    assert calls[0]["loadFileTypes"] == args["loadFileTypes"] and calls[0]["sampleName"] == sampledata.SAMPLE_NAME
    assert calls[1]["loadFileType"] == args["loadFileTypes"]  # the same list under the old keyword
    monkeypatch.setattr(sampledata, "sampleDataDirectory", lambda: None)
    assert sampledata.registerSampleData() is False


def _read_segmentation(scene, path):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", Path(path).name)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def test_shipped_sample_segmentations_carry_structure_names_and_the_label_maps_voxels(scene):
    folder = REPO / "Resources" / "SampleData"
    assert sampledata.sampleDataDirectory() == folder
    for role in ("fixed", "moving"):
        segmentation = _read_segmentation(scene, folder / f"{role}_labels.seg.nrrd")
        structures = nodes.structuresFromNode(segmentation)
        assert [s.name for s in structures] == list(sampledata.STRUCTURES.values())
        assert [s.value for s in structures] == list(sampledata.STRUCTURES)
        labels = sitk.ReadImage(str(folder / f"{role}_labels.nii.gz"))
        for structure in structures:  # every segment is exactly its label's voxels, at the same place
            expected = sitk.Cast(labels == structure.value, sitk.sitkUInt8)
            on_label_grid = sitk.Resample(structure.mask, expected, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            assert np.array_equal(sitk.GetArrayFromImage(on_label_grid), sitk.GetArrayFromImage(expected))


def test_sample_segment_names_are_the_engine_protocol_labels():
    from istn.data.brain import LABELS

    assert sampledata.STRUCTURES == {value: name.replace("_", " ") for name, value in LABELS.items()}


def test_dice_of_the_sample_pair_is_reported_by_structure_name(scene, tiny_models):
    folder = REPO / "Resources" / "SampleData"
    fixed_node = nodes.addVolumeNodeFromImage(scene, sitk.ReadImage(str(folder / "fixed_t1.nii.gz")), "ISTN fixed T1")
    moving_node = nodes.addVolumeNodeFromImage(scene, sitk.ReadImage(str(folder / "moving_t1.nii.gz")),
                                               "ISTN moving T1")
    result = ISTNRegistrationLogic().register(
        fixed_node, moving_node, modelPath=tiny_models["affine"], iterations=0, threads=1,
        fixedSegmentationNode=_read_segmentation(scene, folder / "fixed_labels.seg.nrrd"),
        movingSegmentationNode=_read_segmentation(scene, folder / "moving_labels.seg.nrrd"))
    assert list(result.metrics["dice"]) == list(sampledata.STRUCTURES.values())
    assert "left caudate" in result.summary()


# --------------------------------------------------------------------------
# Scene closed mid-run, output transform placement, views, RNG
# --------------------------------------------------------------------------


def test_closing_the_scene_mid_run_cancels_and_touches_nothing_of_the_next_scene(scene, pair, tiny_models):
    """File > Close Scene while the panel's progress callback processes events (same thread, nested)."""
    logic = ISTNRegistrationLogic()
    after_close = {}

    def progress(p):
        if p.stage == "affine" and p.iteration == 2 and not after_close:
            scene.Clear(0)  # what closing the scene does, from inside the run
            # the next scene already has nodes when the run resumes, possibly with the IDs the run remembered
            after_close["volume"] = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "next scene volume")
            after_close["transform"] = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "next scene transform")
            after_close["ids"] = selftest.nodeIds(scene)

    result = run(logic, pair, tiny_models, "affine", iterations=20, progressCallback=progress)
    assert result.cancelled and result.transformNode is None
    assert selftest.nodeIds(scene) == after_close["ids"], "the run wrote into the next scene"
    assert after_close["volume"].GetParentTransformNode() is None
    assert nodes.arrayFromVtkMatrix(_matrix_from_parent(after_close["transform"])).tolist() == np.eye(4).tolist()
    assert not logic.running
    # the logic is usable again on the new scene
    fixed_node, moving_node = selftest.addObliquePair(scene)[:2]
    again = logic.register(fixed_node, moving_node, modelPath=tiny_models["affine"], iterations=1, threads=1)
    assert not again.cancelled and moving_node.GetParentTransformNode() is again.transformNode


def test_output_transform_under_another_transform_is_refused(scene, pair, tiny_models):
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "parent")
    output = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "output")
    output.SetAndObserveTransformNodeID(parent.GetID())
    before = selftest.nodeIds(scene)
    with pytest.raises(ValueError, match="is itself under the transform 'parent'"):
        run(ISTNRegistrationLogic(), pair, tiny_models, "affine", outputTransformNode=output)
    assert selftest.nodeIds(scene) == before and pair[1].GetParentTransformNode() is None


@pytest.mark.parametrize("case", ["labelmap-output", "labelmap-checkerboard", "map-as-output", "map-as-checkerboard",
                                  "segmentation-as-output", "fixed-labels-under-output"])
def test_outputs_that_cannot_hold_the_result_are_refused_before_the_scene_changes(scene, pair, tiny_models, case):
    """Slicer audit: a label map as output / checkerboard / Jacobian volume failed deep inside (an AttributeError);
    an earlier run's structure map given as an output volume of the same output transform took the warped image;
    the fixed labels under a transform of the user's chosen as output moved 22 mm off the fixed volume."""
    fixed_node, moving_node, fixed, moving = pair
    first = run(ISTNRegistrationLogic(), pair, tiny_models, "affine")
    moving_node.SetAndObserveTransformNodeID(None)
    kw = {"outputTransformNode": first.transformNode}
    if case.startswith("labelmap"):
        lab = nodes.addVolumeNodeFromImage(scene, _labels(fixed), "lab", "vtkMRMLLabelMapVolumeNode")
        role = "outputVolumeNode" if case == "labelmap-output" else "checkerboardVolumeNode"
        kw, match = {role: lab}, "is a vtkMRMLLabelMapVolumeNode, which holds labels"
    elif case.startswith("map"):
        role = "outputVolumeNode" if case == "map-as-output" else "checkerboardVolumeNode"
        kw[role] = first.fixedMapNode if case == "map-as-output" else first.movingMapNode
        match = "is a structure map of the output transform"
    elif case == "segmentation-as-output":
        lab = nodes.addVolumeNodeFromImage(scene, _labels(moving), "ml", "vtkMRMLLabelMapVolumeNode")
        fixed_lab = nodes.addVolumeNodeFromImage(scene, _labels(fixed), "fl", "vtkMRMLLabelMapVolumeNode")
        kw = {"jacobianVolumeNode": lab, "movingSegmentationNode": lab, "fixedSegmentationNode": fixed_lab}
        match = "must be a volume of its own, not an input"
    else:
        mine = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "mine")
        fixed_lab = nodes.addVolumeNodeFromImage(scene, _labels(fixed), "fl", "vtkMRMLLabelMapVolumeNode")
        moving_lab = nodes.addVolumeNodeFromImage(scene, _labels(moving), "ml", "vtkMRMLLabelMapVolumeNode")
        fixed_lab.SetAndObserveTransformNodeID(mine.GetID())
        kw = {"outputTransformNode": mine, "fixedSegmentationNode": fixed_lab, "movingSegmentationNode": moving_lab}
        match = "the fixed segmentation 'fl' is under the output transform 'mine'"
    before = selftest.nodeIds(scene)
    with pytest.raises(ValueError, match=match):
        run(ISTNRegistrationLogic(), pair, tiny_models, "affine", **kw)
    assert selftest.nodeIds(scene) == before and moving_node.GetParentTransformNode() is None


def test_nodes_that_move_with_a_result_or_are_left_behind_are_named(scene, pair, tiny_models):
    """A transform of the user's chosen as output: what else lies under it moves with the result, and the summary
    says so. A moving segmentation under the user's alignment with the moving volume stays there when the volume
    goes under the result: said, with how to see it registered."""
    fixed_node, moving_node, fixed, moving = pair
    mine = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "mine")
    other = nodes.addVolumeNodeFromImage(scene, _labels(fixed), "other", "vtkMRMLLabelMapVolumeNode")
    other.SetAndObserveTransformNodeID(mine.GetID())
    # output volumes under it are taken out of every transform by the run: not "moved with the result" (review)
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "resampled")
    board = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "board")
    for node in (output, board):
        node.SetAndObserveTransformNodeID(mine.GetID())
    moved = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", outputTransformNode=mine,
                outputVolumeNode=output, checkerboardVolumeNode=board)
    assert "'other' under the output transform 'mine' moved with the result" in moved.summary()
    assert "'resampled'" not in moved.summary() and "'board'" not in moved.summary()
    assert output.GetParentTransformNode() is None and board.GetParentTransformNode() is None
    again = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", outputTransformNode=mine)  # now a result
    assert not any("moved with the result" in w for w in again.warnings)

    moving_node.SetAndObserveTransformNodeID(None)
    user, _ = _user_transform(scene)
    moving_node.SetAndObserveTransformNodeID(user.GetID())
    fixed_lab = nodes.addVolumeNodeFromImage(scene, _labels(fixed), "fl", "vtkMRMLLabelMapVolumeNode")
    moving_lab = nodes.addVolumeNodeFromImage(scene, _labels(moving), "ml", "vtkMRMLLabelMapVolumeNode")
    moving_lab.SetAndObserveTransformNodeID(user.GetID())
    left = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", fixedSegmentationNode=fixed_lab,
               movingSegmentationNode=moving_lab)
    assert moving_lab.GetParentTransformNode() is user  # an input: only said, not moved
    assert (f"the moving segmentation 'ml' stays under 'my alignment', so it no longer lies on "
            f"'{moving_node.GetName()}' (now under the result '{left.transformNode.GetName()}')") in left.summary()


@pytest.mark.parametrize("kind", ["affine", "bspline"])
def test_reusing_an_output_transform_for_another_moving_volume_is_refused(scene, pair, tiny_models, kind):
    """The first moving volume is still under the transform: a second registration would silently move it."""
    fixed_node, first_moving, _, moving = pair
    logic = ISTNRegistrationLogic()
    first = run(logic, pair, tiny_models, kind, iterations=1)
    second_moving = nodes.addVolumeNodeFromImage(scene, moving, "second moving")
    matrix = nodes.arrayFromVtkMatrix(_matrix_from_parent(first.transformNode))
    with pytest.raises(ValueError, match="holds the registration of 'ISTN test moving'"):
        logic.register(fixed_node, second_moving, modelPath=tiny_models[kind], affineModelPath=tiny_models["affine"],
                       iterations=1, outputTransformNode=first.transformNode)
    assert np.array_equal(nodes.arrayFromVtkMatrix(_matrix_from_parent(first.transformNode)), matrix)
    assert second_moving.GetParentTransformNode() is None
    # the same moving volume again is fine (a second Apply), and so is the other one once the first is moved out
    run(logic, pair, tiny_models, kind, iterations=1, outputTransformNode=first.transformNode)
    first_moving.SetAndObserveTransformNodeID(None)
    again = logic.register(fixed_node, second_moving, modelPath=tiny_models[kind],
                           affineModelPath=tiny_models["affine"], iterations=1, outputTransformNode=first.transformNode)
    assert second_moving.GetParentTransformNode() is (again.bsplineTransformNode or again.transformNode)


def test_cancel_puts_the_slice_views_back(scene, pair, tiny_models):
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "shown before")
    composite.SetBackgroundVolumeID(other.GetID())
    composite.SetForegroundVolumeID(None)
    composite.SetForegroundOpacity(0.2)
    logic = ISTNRegistrationLogic()
    seen = []

    def progress(p):
        if p.iteration == 1:
            seen.append((composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID()))
            logic.requestCancel()

    result = run(logic, pair, tiny_models, "affine", iterations=5, progressCallback=progress)
    assert result.cancelled
    assert seen == [(pair[0].GetID(), pair[1].GetID())]  # the run did show the pair
    assert composite.GetBackgroundVolumeID() == other.GetID() and composite.GetForegroundVolumeID() is None
    assert composite.GetForegroundOpacity() == pytest.approx(0.2)


def test_seed_leaves_the_global_torch_rng_alone(scene, pair, tiny_models):
    import torch

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    run(ISTNRegistrationLogic(), pair, tiny_models, "affine", iterations=1, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_summary_reports_iterations_run_and_warnings(scene, pair, tiny_models, monkeypatch):
    import istn.registration as engine

    real = engine.register

    def converged_early(*args, **kwargs):
        result = real(*args, **kwargs)
        result.iterations = 3  # as if refinement had converged after 3 of the 5 allowed iterations
        result.warnings.append("refinement converged after 3 iterations")
        return result

    monkeypatch.setattr(engine, "register", converged_early)
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", iterations=5)
    assert result.metrics["stages"][0]["iterations"] == 3
    assert result.metrics["stages"][0]["iterations_requested"] == 5
    text = result.summary()
    assert "after 3 refinement iterations (stopped early at convergence; 5 allowed)" in text
    # said with the stage and model it is from (Python-console audit: a B-spline chain's two stages gave two
    # alike warnings that did not say which was which)
    assert "Warning: Affine (tiny_affine.pt): refinement converged after 3 iterations" in text
    info = result.metrics["stages"][0]["mutual_information"]  # the images' own measure, shown beside the loss
    assert set(info) == {"as_given", "result"} and info["as_given"] > 0
    assert f"Images' mutual information {info['as_given']:.3f} as given, {info['result']:.3f} registered." in text


def test_a_failed_self_check_registers_again_with_the_varied_models_beside(scene, pair, tiny_models, tmp_path,
                                                                           monkeypatch):
    """After a failed self-check of models trained on plain T1 only, the pair is registered again with the models
    beside them trained on other contrasts and cropped fields of view (as brain-synth beside brain-t1), and the
    result whose images end the more alike is the one in the scene; asked not to, the panel names them."""
    import istn.chain
    import istn.registration as engine
    from conftest import varied_copy

    folder = tmp_path / "models"
    folder.mkdir()
    for kind in ("affine", "bspline"):
        plain = folder / f"plain-{kind}.pt"
        plain.write_bytes(Path(tiny_models[kind]).read_bytes())
        varied_copy(plain, folder / f"varied-{kind}.pt")
    models = {k: str(folder / f"plain-{k}.pt") for k in ("affine", "bspline")}
    before = selftest.nodeIds(scene)
    quiet = run(ISTNRegistrationLogic(), pair, models, "bspline")
    assert quiet.hint == "" and quiet.retry is None and "Hint" not in quiet.summary()
    added = len(selftest.nodeIds(scene) - before)
    monkeypatch.setattr(engine, "_information_check", lambda given, result, *moved: "forced for the test")
    before = selftest.nodeIds(scene)
    messages, shown = [], []

    def progress(p) -> None:
        messages.append(str(p))
        if str(p) == "Running the Affine model (varied-affine.pt)...":  # the second try starts: no stale B-spline
            n = scene.GetNumberOfNodesByClass("vtkMRMLBSplineTransformNode")
            node = scene.GetNthNodeByClass(n - 1, "vtkMRMLBSplineTransformNode")
            shown.append(node.GetTransformFromParent().GetClassName())

    tie = run(ISTNRegistrationLogic(), pair, models, "bspline", progressCallback=progress)
    assert shown == ["vtkTransform"]  # identity while the second try's affine runs (live views)
    assert tie.bsplineTransformNode.GetTransformFromParent().GetClassName() != "vtkTransform"  # its result after
    # the same networks under other names: a tie keeps the models asked for
    assert tie.retry is not None and not tie.retry.kept_second
    assert [Path(s.model_path).name for s in tie.stages] == ["plain-affine.pt", "plain-bspline.pt"]
    assert [Path(s.model_path).name for s in tie.retry.second] == ["varied-affine.pt", "varied-bspline.pt"]
    assert "A self-check failed: registering again with varied-affine.pt, varied-bspline.pt..." in messages
    assert tie.metrics["retry"]["kept"] == "first" and tie.hint == ""  # tried already: no hint
    assert any("did no better" in w for w in tie.warnings) and "did no better" in tie.summary()
    assert len(selftest.nodeIds(scene) - before) == added  # the second try adds no node

    monkeypatch.setattr(istn.chain, "images_information", lambda fixed, moving, model, transforms: [0.1, 0.2])
    better = run(ISTNRegistrationLogic(), pair, models, "bspline")
    assert better.retry.kept_second and better.metrics["retry"]["kept"] == "second"
    assert [Path(s.model_path).name for s in better.stages] == ["varied-affine.pt", "varied-bspline.pt"]
    assert better.transform is better.retry.second[-1].transform
    assert any("registered again with varied-affine.pt, varied-bspline.pt" in w for w in better.warnings)

    asked_not_to = run(ISTNRegistrationLogic(), pair, models, "bspline", retryVaried=False)
    assert asked_not_to.retry is None
    assert [s.self_checks_failed for s in asked_not_to.stages] == [["information"], ["information"]]
    assert "varied-affine.pt, varied-bspline.pt" in asked_not_to.hint and "B-spline: varied-bspline" in asked_not_to.hint
    assert f"Hint: {asked_not_to.hint}" in asked_not_to.summary()


# --------------------------------------------------------------------------
# Volumes are passed as loaded: any IJK-to-RAS
# --------------------------------------------------------------------------


def _restored_volume(scene, node, permutation, flips, name):
    """The same image content (same world position of every voxel) stored with permuted/flipped voxel axes."""
    array = np.array(slicer.util.arrayFromVolume(node))  # (k, j, i)
    ijk_to_ras = nodes.ijkToRasMatrix(node)
    size_ijk = np.array(array.shape[::-1])
    # new voxel axis a is old axis permutation[a], reversed if flips[a]
    new_to_old = np.zeros((4, 4))
    new_to_old[3, 3] = 1.0
    for new_axis, old_axis in enumerate(permutation):
        if flips[new_axis]:
            new_to_old[old_axis, new_axis] = -1.0
            new_to_old[old_axis, 3] = size_ijk[old_axis] - 1
        else:
            new_to_old[old_axis, new_axis] = 1.0
    data = np.transpose(array, [2 - p for p in reversed(permutation)])  # array axes are (k, j, i)
    for new_axis, flip in enumerate(flips):
        if flip:
            data = np.flip(data, axis=2 - new_axis)
    return slicer.util.addVolumeFromArray(np.ascontiguousarray(data), ijkToRAS=ijk_to_ras @ new_to_old, name=name)


@pytest.mark.parametrize("layout", ["lps-flip", "sagittal-permuted", "ras-oblique"])
def test_moving_volume_stored_with_another_ijk_to_ras_gives_the_same_transform(scene, pair, tiny_models, layout):
    fixed_node, moving_node, fixed, _ = pair
    permutation, flips = {"lps-flip": ((0, 1, 2), (True, True, False)),
                          "sagittal-permuted": ((2, 0, 1), (False, True, False)),
                          "ras-oblique": ((1, 0, 2), (False, False, True))}[layout]
    other = _restored_volume(scene, moving_node, permutation, flips, "moving restored")
    # the restored volume really is the same content at the same world points
    probe = (5, 9, 13)
    old_ras = nodes.ijkToRasMatrix(moving_node) @ [*probe, 1.0]
    new_ijk = np.linalg.solve(nodes.ijkToRasMatrix(other), old_ras)[:3].round().astype(int)
    assert slicer.util.arrayFromVolume(other)[tuple(new_ijk[::-1])] == slicer.util.arrayFromVolume(moving_node)[probe[::-1]]
    logic = ISTNRegistrationLogic()
    plain = logic.register(fixed_node, moving_node, modelPath=tiny_models["affine"], iterations=2, threads=1,
                           updateViews=False)
    restored = logic.register(fixed_node, other, modelPath=tiny_models["affine"], iterations=2, threads=1,
                              updateViews=False)
    points = [fixed.TransformIndexToPhysicalPoint(ix) for ix in ((5, 5, 5), (20, 17, 14), (35, 30, 24))]
    gap = max(np.linalg.norm(np.subtract(plain.transform.TransformPoint(p), restored.transform.TransformPoint(p)))
              for p in points)
    assert gap < 0.5, f"the output transforms differ by {gap:.2f} mm"


# --------------------------------------------------------------------------
# Dependencies: torch version, installers
# --------------------------------------------------------------------------


from ISTNRegistrationLib import dependencies  # noqa: E402


@pytest.mark.parametrize("version, too_old", [("2.8.0+cu126", True), ("2.11.1", True), ("2.12.0", False),
                                              ("2.13.0+cpu", False), ("3.0.0a0", False)])
def test_torch_older_than_the_bundled_models_need_is_reported(monkeypatch, version, too_old):
    assert dependencies.torchTooOld(version) is too_old
    monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: version)
    monkeypatch.setattr(dependencies, "missingRequirements", lambda *a: [])
    missing = dependencies.missingPackages()
    assert missing == (["torch>=2.12"] if too_old else [])
    message = dependencies.dependencyMessage()
    if too_old:
        assert f"PyTorch {version} is installed" in message and "2.12 or newer" in message
        assert "restart Slicer" in message and "Slicer 5.10 or newer" in message
    else:
        assert message == ""


def test_install_torch_passes_the_minimum_version_to_pytorchutils(monkeypatch):
    import types

    calls = []

    class Logic:
        def installTorch(self, **kwargs):
            calls.append(kwargs)
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=Logic))
    monkeypatch.setattr(dependencies, "torchAvailable", lambda: False)
    monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: None)
    assert dependencies.installTorch(askConfirmation=False)
    assert calls == [{"askConfirmation": False, "torchVersionRequirement": ">=2.12"}]
    # an outdated torch: updated, then the user is told to restart (the old one stays loaded in this session)
    monkeypatch.setattr(dependencies, "torchAvailable", lambda: True)
    monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: "2.8.0")
    with pytest.raises(RuntimeError, match="updated from 2.8.0; restart Slicer"):
        dependencies.installTorch(askConfirmation=True)
    assert calls[-1]["torchVersionRequirement"] == ">=2.12"


@pytest.mark.parametrize("slicer_version", ["5.12", "5.10"])
def test_requirements_install_with_constraints_holding_slicer_packages(monkeypatch, slicer_version):
    import importlib.metadata
    import types

    seen = {}
    state = {"missing": ["scipy>=1.10"]}
    monkeypatch.setattr(dependencies, "missingRequirements", lambda *a: list(state["missing"]))

    def record(requirements, **kwargs):
        constraints = kwargs.get("constraints") or requirements[requirements.index("-c") + 1]
        seen["constraints"] = Path(constraints).read_text().split()
        seen["kwargs"], seen["requirements"] = kwargs, requirements
        state["missing"] = []

    if slicer_version == "5.12":
        packaging = types.ModuleType("slicer.packaging")
        packaging.load_requirements = lambda path: ["<requirements of %s>" % Path(path).name]
        packaging.pip_ensure = record
        monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    else:
        monkeypatch.delitem(sys.modules, "slicer.packaging", raising=False)
        monkeypatch.setattr(slicer.util, "pip_install", record)
    assert dependencies.installRequirements(askConfirmation=False)
    assert f"numpy=={importlib.metadata.version('numpy')}" in seen["constraints"]
    assert f"SimpleITK=={importlib.metadata.version('SimpleITK')}" in seen["constraints"]
    assert "skip_packages" not in seen["kwargs"]
    if slicer_version == "5.12":
        assert seen["requirements"] == ["<requirements of requirements.txt>"]
        assert seen["kwargs"]["prompt_install"] is False and seen["kwargs"]["requester"] == "ISTN Registration"
    else:
        assert seen["requirements"][0] == "scipy>=1.10" and seen["requirements"][1] == "-c"
    assert not Path(seen["kwargs"].get("constraints") or seen["requirements"][2]).exists()  # temporary file removed


def test_bending_and_tolerance_reach_the_engine_and_bad_values_are_refused_before_running(scene, pair, tiny_models):
    fixed_node, moving_node = pair[:2]
    logic = ISTNRegistrationLogic()
    early = logic.register(fixed_node, moving_node, modelPath=tiny_models["affine"], iterations=40, threads=1,
                           tolerance=0.5, updateViews=False)
    assert early.stages[-1].converged and early.stages[-1].iterations < 40
    free = logic.register(fixed_node, moving_node, modelPath=tiny_models["bspline"], preAlign=False, iterations=4,
                          threads=1, bending=0.0, updateViews=False)
    stiff = logic.register(fixed_node, moving_node, modelPath=tiny_models["bspline"], preAlign=False, iterations=4,
                           threads=1, bending=1e6, updateViews=False)
    assert stiff.stages[-1].loss_final != free.stages[-1].loss_final  # the bending term is in the objective
    assert (free.stages[-1].bending, stiff.stages[-1].bending, free.stages[-1].anchor) == (0.0, 1e6, 0.0)
    before = scene.GetNumberOfNodes()
    with pytest.raises(Exception, match="anchoring"):  # these tiny models' maps are unbounded: nothing to anchor to
        logic.register(fixed_node, moving_node, modelPath=tiny_models["bspline"], preAlign=False, iterations=2,
                       threads=1, anchor=1.0, updateViews=False)
    assert scene.GetNumberOfNodes() == before
    for k in (0, 3):  # coarse to fine: the panel's "Coarse iterations" reaches every stage
        res = logic.register(fixed_node, moving_node, modelPath=tiny_models["bspline"], affineModelPath=tiny_models["affine"],
                             iterations=6, threads=1, coarseIterations=k, updateViews=False)
        assert [st.coarse_iterations for st in res.stages] == [k, k]
    for layers in ("fc", "all", None):  # the panel's "Refined layers" reaches every stage (None: the model's)
        res = logic.register(fixed_node, moving_node, modelPath=tiny_models["bspline"], affineModelPath=tiny_models["affine"],
                             iterations=3, threads=1, refineLayers=layers, updateViews=False)
        assert [st.refine_layers for st in res.stages] == [layers or "all"] * 2
    before = scene.GetNumberOfNodes()
    with pytest.raises(Exception, match="refined layers"):
        logic.register(fixed_node, moving_node, modelPath=tiny_models["affine"], iterations=3, threads=1,
                       refineLayers="convolutions", updateViews=False)
    assert scene.GetNumberOfNodes() == before
    res = logic.register(fixed_node, moving_node, modelPath=tiny_models["affine"], iterations=3, threads=1,
                         regionMargin=float("inf"), updateViews=False)
    assert res.stages[-1].region_margin_mm is None  # the whole grid
    before = scene.GetNumberOfNodes()
    with pytest.raises(Exception, match="unbounded maps"):  # these tiny models have linear maps
        logic.register(fixed_node, moving_node, modelPath=tiny_models["affine"], iterations=3, threads=1,
                       regionMargin=20.0, updateViews=False)
    assert scene.GetNumberOfNodes() == before
    for polish in (0, 4, None):  # the panel's "Polish evaluations" reaches every stage (None: the model's, here 0)
        res = logic.register(fixed_node, moving_node, modelPath=tiny_models["bspline"], affineModelPath=tiny_models["affine"],
                             iterations=6, threads=1, polish=polish, updateViews=False)
        assert [0 < st.polish_iterations <= 4 if polish else st.polish_iterations == 0 for st in res.stages] == [True] * 2
    for passes in (2, None):  # the panel's "Passes" reaches every stage (None: the model's, here 1)
        reports = []
        res = logic.register(fixed_node, moving_node, modelPath=tiny_models["bspline"], affineModelPath=tiny_models["affine"],
                             iterations=6, threads=1, polish=0, tolerance=0.0, passes=passes, updateViews=False,
                             progressCallback=reports.append)
        assert [(st.passes, st.iterations) for st in res.stages] == [(passes or 1, 6 * (passes or 1))] * 2
        last = [str(r) for r in reports if r.stage == "bspline" and r.iteration][-1]
        assert ("(pass 2/2)" in last) == (passes == 2) and f"iteration {6 * (passes or 1)}/" in last
    before = scene.GetNumberOfNodes()
    with pytest.raises(Exception, match="polish"):
        logic.register(fixed_node, moving_node, modelPath=tiny_models["affine"], iterations=6, threads=1,
                       polish=2.5, updateViews=False)
    assert scene.GetNumberOfNodes() == before
    for bad in (2.5, True):
        with pytest.raises(Exception, match="'coarseIterations' must be a whole number"):
            logic.register(fixed_node, moving_node, modelPath=tiny_models["affine"], iterations=6, threads=1,
                           coarseIterations=bad, updateViews=False)
    # what a script gets wrong (Python-console audit): 2.7 iterations was cut to 2, "3" taken, a NaN learning rate
    # replaced by the model's own, all without a word
    for name, bad, message in (("iterations", 2.7, "'iterations' must be a whole number, got 2.7"),
                               ("iterations", "3", "'iterations' must be a whole number, got '3'"),
                               ("learningRate", float("nan"), "'learningRate' must be a finite number"),
                               ("bending", float("inf"), "'bending' must be a finite number"),
                               ("tolerance", "0.1", "'tolerance' must be a finite number")):
        with pytest.raises(ValueError, match=message):
            logic.register(fixed_node, moving_node, modelPath=tiny_models["affine"], threads=1, updateViews=False,
                           **{name: bad})
    assert scene.GetNumberOfNodes() == before
    if not torch.cuda.is_available():  # the engine's checks run before anything is touched
        before = scene.GetNumberOfNodes()
        with pytest.raises(Exception, match="GPU"):
            logic.register(fixed_node, moving_node, modelPath=tiny_models["affine"], iterations=2, device="cuda",
                           updateViews=False)
        assert scene.GetNumberOfNodes() == before


# --------------------------------------------------------------------------
# An atlas of the fixed space brought onto the moving volume
# --------------------------------------------------------------------------


def _atlas_on_moving_expected(atlas: sitk.Image, moving: sitk.Image, transform) -> np.ndarray:
    """The engine's answer: the atlas through the result's inverse onto the moving grid, nearest neighbour."""
    from istn.inverse import inverse_transform
    from istn.registration import OUTPUT_FIELD_SPACING_MM

    inverted = inverse_transform(transform, moving, OUTPUT_FIELD_SPACING_MM)
    return sitk.GetArrayFromImage(warp_image(atlas, moving, inverted.transform, sitk.sitkNearestNeighbor, 0.0,
                                             field_spacing=OUTPUT_FIELD_SPACING_MM))


def _segments_on(node, grid: sitk.Image) -> dict:
    """{name: (colour, voxel mask on ``grid``)} of a segmentation node's segments."""
    return {s.name: (s.color, sitk.GetArrayFromImage(sitk.Resample(s.mask, grid, sitk.Transform(),
                                                                   sitk.sitkNearestNeighbor, 0)) != 0)
            for s in nodes.structuresFromNode(node)}


def _segmentation_of(scene, name: str, masks: dict):
    """A segmentation node with one segment per ``masks`` entry (sitk images), each imported as Slicer does."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    for segment, mask in masks.items():
        labelmap = nodes.addVolumeNodeFromImage(scene, sitk.Cast(mask, sitk.sitkUInt8), segment,
                                                "vtkMRMLLabelMapVolumeNode")
        node.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node)
        content = node.GetSegmentation()
        content.GetNthSegment(content.GetNumberOfSegments() - 1).SetName(segment)
    return node


@pytest.mark.parametrize("kind", ["affine", "bspline"])
def test_an_atlas_label_map_comes_onto_the_moving_grid_through_the_inverse_and_follows_the_moving_volume(
        scene, pair, tiny_models, kind):
    fixed_node, moving_node, fixed, moving = pair
    atlas = _labels(fixed)
    atlas_node = nodes.addVolumeNodeFromImage(scene, atlas, "atlas", "vtkMRMLLabelMapVolumeNode")
    atlas_state = node_state(atlas_node)
    logic = ISTNRegistrationLogic()
    result = run(logic, pair, tiny_models, kind, atlasSegmentationNode=atlas_node)
    out = result.atlasSegmentationNode
    assert out.IsA("vtkMRMLSegmentationNode") and out.GetName() == "atlas on ISTN test moving"
    # in the moving volume's own coordinates, under the same transform: shown where the moving volume is
    assert out.GetTransformNodeID() == moving_node.GetTransformNodeID() is not None
    geometry = out.GetSegmentation().GetConversionParameter("Reference image geometry").strip(";").split(";")
    assert np.allclose(np.array(geometry[:16], float).reshape(4, 4), nodes.ijkToRasMatrix(moving_node))
    assert [int(v) for v in geometry[16:]] == [0, 43, 0, 37, 0, 29]  # the moving volume's extent
    expected = _atlas_on_moving_expected(atlas, moving, result.transform)
    found = _segments_on(out, moving)
    assert list(found) == ["label 1", "label 2"]
    voxel_ml = np.prod(moving.GetSpacing()) / 1000.0
    for value in (1, 2):
        assert (expected == value).sum() > 20
        assert np.array_equal(found[f"label {value}"][1], expected == value)
        assert result.metrics["atlas"]["volumes_ml"][f"label {value}"] == pytest.approx(
            (expected == value).sum() * voxel_ml)
    assert "Atlas on the moving volume: 'atlas on ISTN test moving', 2 segments" in result.summary()
    assert same_state(atlas_state, node_state(atlas_node))  # only read
    # a second Apply of the same atlas into the same output transform reuses the node
    count = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    again = run(logic, pair, tiny_models, kind, atlasSegmentationNode=atlas_node,
                outputTransformNode=result.transformNode)
    assert again.atlasSegmentationNode is out
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count
    assert not any("not made again" in w for w in again.warnings)
    # a run into the same output without the atlas leaves it as the earlier result made it: said (audit: silent)
    without = run(logic, pair, tiny_models, "affine", outputTransformNode=result.transformNode)
    assert any("'atlas on ISTN test moving' was made by an earlier run" in w and "not made again" in w
               for w in without.warnings), without.warnings


def test_what_a_script_gets_wrong_is_refused_in_its_own_words_before_the_scene_changes(scene, pair, tiny_models,
                                                                                        tmp_path):
    """Python-console audit: node names for nodes (an AttributeError), a model folder ("does not exist"), a T1
    given as a segmentation (Dice over 127 "labels"; as an atlas it was refused), a fixed volume under a shearing
    transform ("fixed image has a direction matrix that is not orthonormal"), a model of the other kind ("is a
    affine model")."""
    fixed_node, moving_node, fixed, moving = pair
    logic = ISTNRegistrationLogic()
    shear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "my shear")
    matrix = np.eye(4)
    matrix[0, 1] = 0.3
    shear.SetMatrixTransformToParent(nodes.vtkMatrixFromArray(matrix))
    t1 = nodes.addVolumeNodeFromImage(scene, sitk.Cast(fixed * 1000, sitk.sitkInt16), "T1 as labels")
    cases = [
        ({"fixedVolumeNode": "ISTN test fixed"}, "nodes are given as MRML nodes .* got str 'ISTN test fixed'"),
        ({"modelPath": tmp_path}, "is a folder; choose a model file"),
        ({"fixedSegmentationNode": t1, "movingSegmentationNode": t1},
         "'T1 as labels' looks like an image of intensities"),
        ({"fixed_under": shear}, "'ISTN test fixed' is shown through the transform 'my shear', which shears it"),
        ({"transformType": "bspline"}, "gives affine transforms, but 'transformType' asks for bspline"),
    ]
    before = selftest.nodeIds(scene)
    for kwargs, message in cases:
        kwargs = dict(kwargs)
        fixed_under = kwargs.pop("fixed_under", None)
        fixed_node.SetAndObserveTransformNodeID(fixed_under.GetID() if fixed_under else None)
        args = {"fixedVolumeNode": fixed_node, "movingVolumeNode": moving_node,
                "modelPath": tiny_models["affine"], "threads": 1, "iterations": 1, **kwargs}
        with pytest.raises(ValueError, match=message):
            logic.register(args.pop("fixedVolumeNode"), args.pop("movingVolumeNode"), **args)
        fixed_node.SetAndObserveTransformNodeID(None)
        assert selftest.nodeIds(scene) == before


def test_a_sheared_grid_of_its_own_is_not_blamed_on_a_parent_that_does_not_shear(scene, pair, tiny_models):
    fixed_node, moving_node = pair[:2]
    matrix = nodes.ijkToRasMatrix(fixed_node)
    matrix[:3, :3] = matrix[:3, :3] @ np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    fixed_node.SetIJKToRASMatrix(nodes.vtkMatrixFromArray(matrix))
    identity = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "identity")
    fixed_node.SetAndObserveTransformNodeID(identity.GetID())
    with pytest.raises(ValueError, match="direction matrix that is not orthonormal") as caught:
        run(ISTNRegistrationLogic(), pair, tiny_models, "affine")
    assert "identity" not in str(caught.value)


def test_an_atlas_segmentation_keeps_its_names_colours_and_overlapping_segments(scene, pair, tiny_models):
    """Two segments that overlap (two layers in Slicer), with an output volume asked for: the moving volume stays
    where it is, and so does the atlas on its grid; every segment is its own warp, whole."""
    fixed_node, moving_node, fixed, moving = pair
    sources = {"outer": sitk.Cast(fixed > 0.3, sitk.sitkUInt8), "inner": sitk.Cast(fixed > 0.7, sitk.sitkUInt8)}
    atlas_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "regions")
    for name, image in sources.items():
        labelmap = nodes.addVolumeNodeFromImage(scene, image, name, "vtkMRMLLabelMapVolumeNode")
        atlas_node.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, atlas_node)
    content = atlas_node.GetSegmentation()
    assert content.GetNumberOfLayers() == 2  # they overlap
    colours = {"outer": (0.9, 0.1, 0.2), "inner": (0.1, 0.3, 0.8)}
    for i, name in enumerate(sources):
        content.GetNthSegment(i).SetName(name)
        content.GetNthSegment(i).SetColor(*colours[name])
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "resampled")
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "bspline", atlasSegmentationNode=atlas_node,
                 outputVolumeNode=output)
    out = result.atlasSegmentationNode
    assert moving_node.GetTransformNodeID() is None and out.GetTransformNodeID() is None
    found = _segments_on(out, moving)
    assert list(found) == ["outer", "inner"]
    for name, image in sources.items():
        colour, mask = found[name]
        assert colour == pytest.approx(colours[name])
        assert np.array_equal(mask, _atlas_on_moving_expected(image, moving, result.transform) == 1), name
    assert (found["outer"][1] & found["inner"][1]).sum() == found["inner"][1].sum() > 0  # the overlap kept


def test_a_failed_rerun_gives_back_the_earlier_atlas_and_a_first_run_leaves_none(scene, pair, tiny_models,
                                                                                 monkeypatch):
    fixed_node, moving_node, fixed, moving = pair
    atlas_node = nodes.addVolumeNodeFromImage(scene, _labels(fixed), "atlas", "vtkMRMLLabelMapVolumeNode")
    logic = ISTNRegistrationLogic()
    before = selftest.nodeIds(scene)
    shown = []

    def fail(*args, **kwargs):
        shown.append(args)
        if len(shown) == 2:  # the views at the end: after every output is written
            raise RuntimeError("view update failed")

    with monkeypatch.context() as patch:
        patch.setattr(logic, "_showInSliceViews", fail)
        with pytest.raises(RuntimeError, match="view update failed"):
            run(logic, pair, tiny_models, "affine", atlasSegmentationNode=atlas_node)
    assert selftest.nodeIds(scene) == before  # the new atlas node removed with the rest
    first = run(logic, pair, tiny_models, "affine", atlasSegmentationNode=atlas_node)
    out = first.atlasSegmentationNode
    earlier = _segments_on(out, moving)
    geometry = out.GetSegmentation().GetConversionParameter("Reference image geometry")
    written = []

    def fail_after_writing(*args, **kwargs):
        shown.append(args)
        if len(shown) == 2:
            now = _segments_on(out, moving)
            written.append(any(not np.array_equal(now[k][1], earlier[k][1]) for k in earlier))
            raise RuntimeError("view update failed")

    shown.clear()
    voxels = slicer.util.arrayFromVolume(atlas_node)  # another atlas content for the re-run: mirrored
    voxels[:] = voxels[:, :, ::-1].copy()
    slicer.util.arrayFromVolumeModified(atlas_node)
    nodes_before = selftest.nodeIds(scene)
    monkeypatch.setattr(logic, "_showInSliceViews", fail_after_writing)
    with pytest.raises(RuntimeError, match="view update failed"):
        run(logic, pair, tiny_models, "affine", atlasSegmentationNode=atlas_node,
            outputTransformNode=first.transformNode)
    assert written == [True]  # the re-run had replaced the segments when it failed
    restored = _segments_on(out, moving)
    assert list(restored) == list(earlier)
    assert all(np.array_equal(restored[k][1], earlier[k][1]) for k in earlier)
    assert out.GetSegmentation().GetConversionParameter("Reference image geometry") == geometry
    assert out.GetTransformNodeID() == moving_node.GetTransformNodeID()
    assert selftest.nodeIds(scene) == nodes_before


@pytest.mark.parametrize("case", ["intensities", "integer-intensities", "empty", "is-the-output-volume",
                                  "empty-segmentation", "only-erased-segments"])
def test_an_unusable_atlas_is_refused_before_the_scene_changes(scene, pair, tiny_models, case):
    fixed_node, moving_node, fixed, _ = pair
    if case == "intensities":
        atlas = nodes.addVolumeNodeFromImage(scene, fixed, "t1")
        match, extra = "not a label map", {}
    elif case == "integer-intensities":  # a T1 stored as integers, given as a plain volume: not labels
        atlas = nodes.addVolumeNodeFromImage(scene, sitk.Cast(sitk.RescaleIntensity(fixed, 0, 255), sitk.sitkUInt8),
                                             "t1 uint8")
        match, extra = "looks like an image of intensities", {}
    elif case == "only-erased-segments":  # painted, then erased: the extent may stay, no voxel is set
        atlas = _segmentation_of(scene, "erased", {"a": _labels(fixed) == 1, "b": _labels(fixed) == 2})
        atlas.GetSegmentation().CollapseBinaryLabelmaps(False)  # one shared layer, as Slicer keeps them
        for i in range(2):
            atlas.GetSegmentation().ClearSegment(atlas.GetSegmentation().GetNthSegmentID(i))
        match, extra = "has only empty segments", {}
    elif case == "empty":
        atlas = nodes.addVolumeNodeFromImage(scene, _labels(fixed) * 0, "nothing", "vtkMRMLLabelMapVolumeNode")
        match, extra = "holds no label", {}
    elif case == "is-the-output-volume":
        atlas = nodes.addVolumeNodeFromImage(scene, _labels(fixed), "lab", "vtkMRMLLabelMapVolumeNode")
        match, extra = "must not be one of the inputs", {"outputVolumeNode": atlas}
    else:
        atlas = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "no segments")
        match, extra = "has no segments", {}
    before = selftest.nodeIds(scene)
    states = [node_state(n) for n in (fixed_node, moving_node)]
    with pytest.raises(ValueError, match=match):
        run(ISTNRegistrationLogic(), pair, tiny_models, "affine", atlasSegmentationNode=atlas, **extra)
    assert selftest.nodeIds(scene) == before
    assert moving_node.GetParentTransformNode() is None
    assert all(same_state(s, node_state(n)) for s, n in zip(states, (fixed_node, moving_node)))


def test_empty_atlas_segments_stay_empty_without_a_warning_and_keep_their_place(scene, pair, tiny_models):
    """One segment never painted (Segment Editor "Add"), one painted over the others (a second layer) and then
    erased: both come out empty, in the atlas' order, with 0 ml and no "outside" warning."""
    fixed_node, moving_node, fixed, moving = pair
    labels = _labels(fixed)
    atlas = _segmentation_of(scene, "atlas", {"one": labels == 1, "both": labels > 0, "two": labels == 2})
    content = atlas.GetSegmentation()
    content.ClearSegment(content.GetNthSegmentID(1))  # "both" erased
    content.AddEmptySegment("", "to be drawn")
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", atlasSegmentationNode=atlas)
    out = result.atlasSegmentationNode.GetSegmentation()
    assert [out.GetNthSegment(i).GetName() for i in range(out.GetNumberOfSegments())] == [
        "one", "both", "two", "to be drawn"]
    volumes = result.metrics["atlas"]["volumes_ml"]
    assert volumes["both"] == volumes["to be drawn"] == 0 < volumes["one"]
    assert not any("atlas" in w for w in result.warnings), result.warnings
    expected = _atlas_on_moving_expected(labels, moving, result.transform)
    found = _segments_on(result.atlasSegmentationNode, moving)
    assert np.array_equal(found["one"][1], expected == 1) and np.array_equal(found["two"][1], expected == 2)


def test_atlas_segments_on_other_voxel_grids_are_each_warped_from_their_own(scene, pair, tiny_models):
    """A segmentation whose segments lie on different lattices (one on the fixed grid, one on a finer oblique
    grid): each segment equals its own mask warped alone, in either order (no resampling onto the other's grid)."""
    fixed_node, moving_node, fixed, moving = pair
    fine = sitk.Image([40, 36, 30], sitk.sitkUInt8)
    fine.SetSpacing([0.7, 0.7, 0.7])
    c, s_ = np.cos(0.3), np.sin(0.3)
    fine.SetDirection([c, -s_, 0, s_, c, 0, 0, 0, 1])
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()])
    fine.SetOrigin(np.array(centre) - fine.TransformContinuousIndexToPhysicalPoint([20, 18, 15])
                   + np.array(fine.GetOrigin()))
    index = np.indices([30, 36, 40]).astype(float)
    r = np.sqrt(((index[0] - 15) * 0.7) ** 2 + ((index[1] - 18) * 0.7) ** 2 + ((index[2] - 20) * 0.7) ** 2)
    ball = sitk.GetImageFromArray((r < 9.0).astype(np.uint8))
    ball.CopyInformation(fine)
    coarse = sitk.Cast(_labels(fixed) == 2, sitk.sitkUInt8)
    for order in (("coarse", "ball"), ("ball", "coarse")):
        sources = {"coarse": coarse, "ball": ball}
        atlas = _segmentation_of(scene, "mixed", {k: sources[k] for k in order})
        result = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", atlasSegmentationNode=atlas)
        found = _segments_on(result.atlasSegmentationNode, moving)
        assert list(found) == list(order)
        for name, image in sources.items():
            expected = _atlas_on_moving_expected(image, moving, result.transform) == 1
            assert expected.sum() > 20, name
            assert np.array_equal(found[name][1], expected), (order, name)


def test_a_rerun_keeps_the_atlas_segments_ids_and_display_and_each_atlas_keeps_its_node(scene, pair, tiny_models,
                                                                                         monkeypatch):
    fixed_node, moving_node, fixed, moving = pair
    labels = _labels(fixed)
    atlas_a = nodes.addVolumeNodeFromImage(scene, labels, "A", "vtkMRMLLabelMapVolumeNode")
    atlas_b = _segmentation_of(scene, "B", {"inner": labels == 2})
    logic = ISTNRegistrationLogic()
    first = run(logic, pair, tiny_models, "affine", atlasSegmentationNode=atlas_a)
    out = first.atlasSegmentationNode
    content = out.GetSegmentation()
    ids = [content.GetNthSegmentID(i) for i in range(content.GetNumberOfSegments())]
    display = out.GetDisplayNode()
    display.SetSegmentVisibility(ids[0], False)
    display.SetSegmentOpacity2DFill(ids[1], 0.2)
    earlier = _segments_on(out, moving)

    def kept() -> bool:
        now = [content.GetNthSegmentID(i) for i in range(content.GetNumberOfSegments())]
        return (now == ids and not display.GetSegmentVisibility(ids[0])
                and display.GetSegmentOpacity2DFill(ids[1]) == pytest.approx(0.2))

    again = run(logic, pair, tiny_models, "affine", atlasSegmentationNode=atlas_a,
                outputTransformNode=first.transformNode)
    assert again.atlasSegmentationNode is out and kept()
    # another atlas into the same transform gets its own node; the first atlas again finds its own
    other = run(logic, pair, tiny_models, "affine", atlasSegmentationNode=atlas_b,
                outputTransformNode=first.transformNode)
    assert other.atlasSegmentationNode is not out and scene.IsNodePresent(out)
    count = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    third = run(logic, pair, tiny_models, "affine", atlasSegmentationNode=atlas_a,
                outputTransformNode=first.transformNode)
    assert third.atlasSegmentationNode is out and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count
    # a re-run that fails after writing it (another atlas content: mirrored) gives it back, IDs and display too
    voxels = slicer.util.arrayFromVolume(atlas_a)
    voxels[:] = voxels[:, :, ::-1].copy()
    slicer.util.arrayFromVolumeModified(atlas_a)
    shown = []

    def fail(*args, **kwargs):
        shown.append(args)
        if len(shown) == 2:
            raise RuntimeError("view update failed")

    monkeypatch.setattr(logic, "_showInSliceViews", fail)
    with pytest.raises(RuntimeError, match="view update failed"):
        run(logic, pair, tiny_models, "affine", atlasSegmentationNode=atlas_a, outputTransformNode=first.transformNode)
    assert kept()
    restored = _segments_on(out, moving)
    assert all(np.array_equal(restored[k][1], earlier[k][1]) for k in earlier)


def test_a_label_map_atlas_with_negative_and_large_values_keeps_them_apart(scene, pair, tiny_models):
    fixed_node, moving_node, fixed, moving = pair
    labels = sitk.Cast(_labels(fixed), sitk.sitkInt32)
    values = sitk.GetArrayFromImage(labels)
    recoded = np.select([values == 1, values == 2], [-1, 70000], 0).astype(np.int32)
    atlas_image = sitk.GetImageFromArray(recoded)
    atlas_image.CopyInformation(labels)
    atlas = nodes.addVolumeNodeFromImage(scene, atlas_image, "odd values", "vtkMRMLLabelMapVolumeNode")
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", atlasSegmentationNode=atlas)
    found = _segments_on(result.atlasSegmentationNode, moving)
    assert list(found) == ["label -1", "label 70000"]
    assert found["label -1"][0] != found["label 70000"][0]  # colours told apart where the table has none
    expected = _atlas_on_moving_expected(_labels(fixed), moving, result.transform)
    assert np.array_equal(found["label -1"][1], expected == 1)
    assert np.array_equal(found["label 70000"][1], expected == 2)


def test_a_grey_volume_loaded_as_colour_registers_as_the_grey_volume_and_true_colour_is_refused(scene, pair,
                                                                                                 tiny_models):
    """A grey PNG or JPEG loads into Slicer as a colour (vector) volume with equal channels: registered as the grey
    volume it is (the same transform); one whose channels differ is refused before the scene changes."""
    fixed_node, moving_node, fixed, moving = pair
    voxels = slicer.util.arrayFromVolume(moving_node).copy()
    grey_result = run(ISTNRegistrationLogic(), pair, tiny_models, "affine", updateViews=False)
    for channels, differ in ((3, False), (3, True)):
        colour = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour moving")
        stack = np.stack([voxels, voxels * (0.5 if differ else 1.0), voxels], -1)
        colour.SetIJKToRASMatrix(nodes.vtkMatrixFromArray(nodes.ijkToRasMatrix(moving_node)))
        slicer.util.updateVolumeFromArray(colour, stack.astype(voxels.dtype))
        assert colour.GetImageData().GetNumberOfScalarComponents() == channels
        if differ:
            before = selftest.nodeIds(scene)
            with pytest.raises(ValueError, match="3 components per voxel"):
                run(ISTNRegistrationLogic(), (fixed_node, colour), tiny_models, "affine")
            assert selftest.nodeIds(scene) == before
        else:
            result = run(ISTNRegistrationLogic(), (fixed_node, colour), tiny_models, "affine", updateViews=False)
            np.testing.assert_array_equal(_affine_matrix(result.transform), _affine_matrix(grey_result.transform))


# --------------------------------------------------------------------------
# The command line and the module: one engine
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["affine", "bspline"])
def test_the_module_and_istn_register_give_the_same_world_transform(scene, pair, tiny_models, tmp_path, kind):
    """The same pair, model and settings through the Slicer logic (volume nodes, RAS) and through `istn register`
    (files, LPS .h5): the same fixed -> moving mapping of world points, so a result does not depend on which door
    it came through. The oblique anisotropic pair on other grids; the B-spline after its affine in both."""
    from istn.cli import main

    fixed_node, moving_node, fixed, moving = pair
    for name, image in (("fixed.nrrd", fixed), ("moving.nii.gz", moving)):
        sitk.WriteImage(image, str(tmp_path / name))
    models = [tiny_models["affine"]] + ([tiny_models["bspline"]] if kind == "bspline" else [])
    argv = ["register", "--fixed", str(tmp_path / "fixed.nrrd"), "--moving", str(tmp_path / "moving.nii.gz"),
            "--refine", "3", "--threads", "1", "--no-figure", "--quiet", "--out", str(tmp_path / "out")]
    for m in models:
        argv += ["--model", str(m)]
    assert main(argv) == 0
    from_files = sitk.ReadTransform(str(tmp_path / "out" / "transform.h5"))
    result = ISTNRegistrationLogic().register(fixed_node, moving_node, modelPath=tiny_models[kind],
                                              affineModelPath=tiny_models["affine"], iterations=3, threads=1,
                                              updateViews=False)
    points = [fixed.TransformIndexToPhysicalPoint(ix) for ix in ((5, 5, 5), (20, 17, 14), (35, 30, 24), (12, 25, 8))]
    moved = [np.subtract(from_files.TransformPoint(p), p) for p in points]
    assert max(np.linalg.norm(d) for d in moved) > 1.0  # a real transform: the comparison is not of identities
    gap = max(np.linalg.norm(np.subtract(from_files.TransformPoint(p), result.transform.TransformPoint(p)))
              for p in points)
    assert gap < 0.05, f"istn register and the module differ by {gap:.3f} mm"
    # and what the scene shows: the moving volume's parent transform(s) take its RAS points where the file does
    assert moving_node.GetParentTransformNode() is (result.bsplineTransformNode or result.transformNode)
    ras = np.array(points[1]) * [-1, -1, 1]
    world_to_moving = result.transformNode.GetTransformFromParent().TransformPoint(ras.tolist())
    if result.bsplineTransformNode is not None:
        world_to_moving = result.bsplineTransformNode.GetTransformFromParent().TransformPoint(world_to_moving)
    assert np.allclose(np.array(world_to_moving) * [-1, -1, 1], from_files.TransformPoint(points[1]), atol=0.05)


@pytest.mark.parametrize("role", ["fixed", "moving"])
def test_a_volume_with_nan_voxels_is_named_and_the_advice_given_works_in_slicer(scene, pair, tiny_models, role):
    """A NaN-masked float volume (a NRRD of a masking pipeline: Slicer keeps NaN there) was refused in the engine's
    words, "moving image contains ... NaN ... (e.g. fslmaths IN -nan OUT ...)", naming no node; now the node is
    named, and the console line the message gives, run as given, makes the volume register."""
    fixed_node, moving_node, fixed, moving = pair
    image = fixed if role == "fixed" else moving
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    values[:2] = np.nan
    values[-1, 0, 0] = np.inf
    masked = sitk.GetImageFromArray(values)
    masked.CopyInformation(image)
    node = nodes.addVolumeNodeFromImage(scene, masked, "masked scan")
    pair_nodes = (node, moving_node) if role == "fixed" else (fixed_node, node)
    logic = ISTNRegistrationLogic()
    before = selftest.nodeIds(scene)
    with pytest.raises(ValueError) as e:
        logic.register(*pair_nodes, modelPath=tiny_models["affine"], iterations=1, threads=1, updateViews=False)
    message = str(e.value)
    count = int(np.count_nonzero(np.isnan(values)))
    assert f"the {role} volume 'masked scan' has {count:,} NaN and 1 infinite voxel values" in message
    assert selftest.nodeIds(scene) == before
    exec(message.split("in the Python console: ", 1)[1], {"slicer": slicer})
    assert np.all(np.isfinite(slicer.util.arrayFromVolume(node)))
    logic.register(*pair_nodes, modelPath=tiny_models["affine"], iterations=1, threads=1, updateViews=False)


@pytest.mark.parametrize("role, case", [("fixed", "constant"), ("moving", "too-small")])
def test_the_engines_refusal_of_an_image_names_the_volume_chosen(scene, pair, tiny_models, role, case):
    """The engine refuses an image as "moving image is constant ..."; in Slicer the user chose a volume by name,
    so the message says which ("the moving volume 'baseline' ..."), and the scene is as it was."""
    fixed_node, moving_node, fixed, moving = pair
    image = fixed if role == "fixed" else moving
    if case == "constant":
        bad = sitk.Image(image.GetSize(), sitk.sitkFloat32) + 3.0
        bad.CopyInformation(image)
        expected = "is constant (all voxels 3): nothing to register"
    else:
        bad = sitk.Image([3, 40, 40], sitk.sitkFloat32)
        bad[1, 1, 1] = 5.0
        expected = "is too small ((3, 40, 40)): at least 4 voxels per axis are needed"
    node = nodes.addVolumeNodeFromImage(scene, bad, "baseline")
    pair_nodes = (node, moving_node) if role == "fixed" else (fixed_node, node)
    before = selftest.nodeIds(scene)
    with pytest.raises(ValueError) as e:
        ISTNRegistrationLogic().register(*pair_nodes, modelPath=tiny_models["affine"], iterations=1, threads=1,
                                         updateViews=False)
    assert str(e.value) == f"the {role} volume 'baseline' {expected}"
    assert selftest.nodeIds(scene) == before and pair_nodes[1].GetParentTransformNode() is None


@pytest.mark.parametrize("case", ["empty-image-data", "zero-spacing"])
def test_a_volume_without_voxels_or_with_a_zero_spacing_is_refused_by_name(scene, pair, tiny_models, case):
    """A volume node holding an empty vtkImageData crashed in the NaN check (AttributeError, 'NoneType' object has
    no attribute 'GetDataType'); a zero spacing was refused as 'the volume has a zero voxel spacing', no name."""
    import vtk

    fixed_node, moving_node = pair[:2]
    if case == "empty-image-data":
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
        node.SetAndObserveImageData(vtk.vtkImageData())
        expected = "volume 'scan' has no voxels"
    else:
        node = nodes.addVolumeNodeFromImage(scene, pair[3], "scan")
        node.SetSpacing(1.0, 0.0, 1.0)
        expected = "volume 'scan' has a zero voxel spacing (1, 0, 1): set its spacing in the Volumes module"
    before = selftest.nodeIds(scene)
    with pytest.raises(ValueError, match=re.escape(expected)):
        ISTNRegistrationLogic().register(fixed_node, node, modelPath=tiny_models["affine"], iterations=1, threads=1,
                                         updateViews=False)
    assert selftest.nodeIds(scene) == before


def test_a_volume_placed_under_another_volumes_result_is_registered_from_there(scene, pair, tiny_models):
    """The same subject's other scan put under the result of registering the first (shown aligned with it): the
    run ignored that placement (the volume's own geometry as start, Dice 'before' of a placement not shown; a
    Slicer audit: 0.092 reported, 0.635 seen, 0.726 vs 0.726 after from a plain copy of the matrix). Now it starts
    there, exactly as from the same matrix in a transform of the user's; under the other result's B-spline it is
    refused, as under any non-linear transform."""
    import vtk

    fixed_node, moving_node, fixed, moving = pair
    logic = ISTNRegistrationLogic()
    first = run(logic, pair, tiny_models, "affine")
    other = nodes.addVolumeNodeFromImage(scene, moving, "second scan")
    other.SetAndObserveTransformNodeID(first.transformNode.GetID())
    under_result = logic.register(fixed_node, other, modelPath=tiny_models["affine"], iterations=2, threads=1,
                                  updateViews=False)
    assert under_result.startedFrom == first.transformNode.GetName()
    copy = nodes.addVolumeNodeFromImage(scene, moving, "second scan, placed by hand")
    matrix = vtk.vtkMatrix4x4()
    first.transformNode.GetMatrixTransformToParent(matrix)
    mine = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "my placement")
    mine.SetMatrixTransformToParent(matrix)
    copy.SetAndObserveTransformNodeID(mine.GetID())
    by_hand = logic.register(fixed_node, copy, modelPath=tiny_models["affine"], iterations=2, threads=1,
                             updateViews=False)
    points = [fixed.TransformIndexToPhysicalPoint(ix) for ix in ((5, 5, 5), (20, 17, 14), (35, 30, 24))]
    gap = max(np.linalg.norm(np.subtract(under_result.transform.TransformPoint(p), by_hand.transform.TransformPoint(p)))
              for p in points)
    assert gap < 1e-3, f"{gap:.4f} mm"
    # under another result's B-spline: a non-linear placement, refused before the scene changes
    second = run(logic, pair, tiny_models, "bspline", outputTransformNode=None)
    third = nodes.addVolumeNodeFromImage(scene, moving, "third scan")
    third.SetAndObserveTransformNodeID(second.bsplineTransformNode.GetID())
    before = selftest.nodeIds(scene)
    with pytest.raises(ValueError, match="'third scan' is under the non-linear transform .*; harden it"):
        logic.register(fixed_node, third, modelPath=tiny_models["affine"], iterations=1, threads=1, updateViews=False)
    assert selftest.nodeIds(scene) == before


def test_bias_correction_reaches_every_stage_and_leaves_the_volumes_as_they_were(pair, tiny_models):
    """The panel's Advanced "Intensity bias" check box: N4 on the engine's working copies of both volumes, every
    stage; the volumes (and what the outputs are resampled from) unchanged."""
    before = [node_state(n) for n in pair[:2]]
    result = run(ISTNRegistrationLogic(), pair, tiny_models, "bspline", biasCorrect=True)
    assert [s.bias_corrected for s in result.stages] == [True, True]
    assert all(same_state(a, node_state(n)) for a, n in zip(before, pair[:2]))
    plain = run(ISTNRegistrationLogic(), pair, tiny_models, "bspline")
    assert [s.bias_corrected for s in plain.stages] == [False, False]


def test_a_moving_head_stored_prone_is_registered_from_its_turn_and_the_summary_says_so(scene):
    """The panel's flow with the bundled affine: the sample head against itself, stored under a header turned 180
    degrees about the vertical (a prone patient taken for supine). Both model families fail their checks; the turn
    search finds the turn, the result is the known answer, and the progress, the summary and the metrics say so;
    with Second try cleared the panel runs the model once and searches nothing."""
    from conftest import header_turned
    from istn.geometry import Grid

    folder = REPO / "Resources" / "SampleData"
    fixed = sitk.ReadImage(str(folder / "fixed_t1.nii.gz"))
    turn = np.diag([-1.0, -1.0, 1.0])
    fixed_node = nodes.addVolumeNodeFromImage(scene, fixed, "fixed T1")
    moving_node = nodes.addVolumeNodeFromImage(scene, header_turned(fixed, turn), "prone T1")
    messages = []
    affine = str(modelfiles.MODELS_DIR / "brain-t1-affine.pt")
    result = ISTNRegistrationLogic().register(fixed_node, moving_node, modelPath=affine, threads=2,
                                              progressCallback=lambda p: messages.append(str(p)))
    assert "A self-check failed: looking for how the moving head lies (24 turns)..." in messages
    assert result.metrics["stages"][0]["turned"]["turn"] == "180 degrees about the up-down (z) axis"
    assert "turned by 180 degrees about the up-down (z) axis" in result.summary()
    assert result.retry is not None and result.retry.turned_after and result.metrics["retry"]["turned_after"]
    centre = Grid.from_image(fixed).centre
    for offset in ([40.0, 0.0, 0.0], [0.0, -50.0, 20.0], [-30.0, 30.0, -30.0]):
        x = centre + offset
        assert np.allclose(result.stages[-1].transform.TransformPoint(x.tolist()), centre + turn @ offset, atol=1.5)
    messages.clear()
    once = ISTNRegistrationLogic().register(fixed_node, moving_node, modelPath=affine, threads=2, retryVaried=False,
                                            progressCallback=lambda p: messages.append(str(p)))
    assert not any("looking for how" in m for m in messages)
    assert once.metrics["stages"][0]["turned"] is None and once.stages[0].self_checks_failed


def test_a_series_aligned_with_the_fixed_volume_comes_back_as_given_and_the_panel_says_so(scene):
    """The panel's flow with the bundled affine: 6 mm sagittal slices of the sample head against the head itself
    (one session, no motion). The stage gives the identity back, says why, and the metrics record it; no second try
    and no turn search (before: the information check failed, both ran, and the result ended 0.6 mm off)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from acquisition import acquire

    fixed = sitk.Cast(sitk.ReadImage(str(REPO / "Resources" / "SampleData" / "fixed_t1.nii.gz")), sitk.sitkFloat32)
    fixed_node = nodes.addVolumeNodeFromImage(scene, fixed, "fixed T1")
    moving_node = nodes.addVolumeNodeFromImage(scene, acquire(fixed, (6.0, 2.0, 2.0)), "sagittal series")
    messages = []
    result = ISTNRegistrationLogic().register(fixed_node, moving_node, threads=2,
                                              modelPath=str(modelfiles.MODELS_DIR / "brain-t1-affine.pt"),
                                              progressCallback=lambda p: messages.append(str(p)))
    assert result.metrics["stages"][0]["start_kept"] is True and result.retry is None
    assert not any("looking for how" in m or "registering again" in m.lower() for m in messages)
    assert "aligned as given" in result.summary()
    assert np.array_equal(_affine_matrix(result.stages[0].transform), np.eye(4))
    node_matrix = nodes.arrayFromVtkMatrix(_matrix_from_parent(result.transformNode))
    assert np.allclose(node_matrix, np.eye(4), atol=1e-9)
