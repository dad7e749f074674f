"""MRML nodes <-> engine objects: volumes, label maps, segmentations and transforms.

Coordinates. Slicer works in RAS, ITK (and so the engine) in LPS; the two
differ by ``F = diag(-1, -1, 1)``. A point maps as ``x_lps = F x_ras``, so a
transform ``T_lps`` (fixed LPS point -> moving LPS point) is, in Slicer,
``T_ras = F T_lps F``. Both the engine's transforms and Slicer's "transform
from parent" map FIXED (world) points to MOVING points: the pull-back that
resampling uses, and what places the moving volume onto the fixed one when it
is put under the transform node.

Nothing here needs torch or Qt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

import slicer

from .i18n import _

#: LPS <-> RAS, homogeneous (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --------------------------------------------------------------------------
# Matrices
# --------------------------------------------------------------------------


def arrayFromVtkMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def vtkMatrixFromArray(array: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def lpsToRasMatrix(matrix_lps: np.ndarray) -> np.ndarray:
    """A homogeneous point transform in LPS -> the same transform in RAS (and back: it is an involution)."""
    return LPS_TO_RAS @ np.asarray(matrix_lps, dtype=float) @ LPS_TO_RAS


def ijkToRasMatrix(volumeNode) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return arrayFromVtkMatrix(m)


def parentToWorldMatrix(node) -> np.ndarray:
    """Matrix of the node's parent transforms (identity if none); raises if one of them is not linear."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise ValueError(_("'{name}' is under the non-linear transform '{parent}'; harden it (Data module, "
                           "right-click > Harden transform) or remove it from the transform first").format(
                               name=node.GetName(), parent=parent.GetName()))
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return arrayFromVtkMatrix(m)


# --------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------


def _geometryFromVoxelToRas(voxelToRas: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """IJK-to-RAS (any orientation, anisotropic) -> ITK spacing, origin, direction (LPS)."""
    m = LPS_TO_RAS @ voxelToRas  # IJK -> LPS
    axes = m[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(_("the volume has a zero voxel spacing"))
    direction = axes / spacing
    return spacing.tolist(), m[:3, 3].tolist(), direction.ravel().tolist()


def voxelToRasFromImage(image: sitk.Image) -> np.ndarray:
    """ITK image geometry (LPS) -> IJK-to-RAS matrix."""
    if image.GetDimension() != 3:
        raise ValueError(_("a {ndim}D image cannot be shown as a Slicer volume; 3D is expected").format(
            ndim=image.GetDimension()))
    m = np.eye(4)
    m[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ m


def imageFromArray(array_kji: np.ndarray, voxelToRas: np.ndarray) -> sitk.Image:
    """Array in ``(K, J, I)`` order (Slicer and SimpleITK agree) + IJK-to-RAS -> ITK image in LPS."""
    spacing, origin, direction = _geometryFromVoxelToRas(voxelToRas)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def volumeNodeToImage(volumeNode, world: bool = False, placement: np.ndarray | None = None) -> sitk.Image:
    """A scalar volume node -> ITK image with its exact geometry (oblique, anisotropic; LPS).

    ``world``: include the node's (linear) parent transforms, i.e. the geometry
    the volume is displayed with; otherwise the node's own IJK-to-RAS.
    ``placement``: a RAS matrix to apply to the node's own geometry instead.
    Voxels are copied: the node is never modified.
    """
    if volumeNode is None:
        raise ValueError(_("no volume node given"))
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetPointData().GetScalars() is None:
        raise ValueError(_("volume '{name}' has no voxels").format(name=volumeNode.GetName()))
    if min(abs(v) for v in volumeNode.GetSpacing()) == 0:  # a header gone wrong, or set so by hand
        raise ValueError(_("volume '{name}' has a zero voxel spacing ({spacing}): set its spacing in the Volumes "
                           "module (Volume Information)").format(
                               name=volumeNode.GetName(), spacing=", ".join(f"{v:g}" for v in volumeNode.GetSpacing())))
    array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
    if imageData.GetNumberOfScalarComponents() != 1:
        from istn.io import grey_of_colour

        grey = grey_of_colour(array)  # a grey image loaded as colour (an RGB PNG): the grey image it is
        if grey is None:
            raise ValueError(_("volume '{name}' has {components} components per voxel; a scalar (grey-level) "
                               "volume is expected").format(name=volumeNode.GetName(),
                                                            components=imageData.GetNumberOfScalarComponents()))
        array = grey
    voxelToRas = ijkToRasMatrix(volumeNode)
    if placement is not None:
        voxelToRas = placement @ voxelToRas
    elif world and volumeNode.GetParentTransformNode() is not None:
        own = voxelToRas
        voxelToRas = parentToWorldMatrix(volumeNode) @ voxelToRas
        if _sheared(voxelToRas) and not _sheared(own):
            # the grid as shown is not a grid of voxels (a sheared grid of its own is refused by the engine)
            raise ValueError(_("'{name}' is shown through the transform '{parent}', which shears it: a volume's grid "
                               "cannot hold a shear; harden the transform (Data module, right-click > Harden "
                               "transform: it resamples the volume) or take the volume out of it").format(
                                   name=volumeNode.GetName(), parent=volumeNode.GetParentTransformNode().GetName()))
    return imageFromArray(array, voxelToRas)


def _sheared(voxelToRas: np.ndarray) -> bool:
    """Whether a 4x4 voxel-to-RAS matrix's axes are not at right angles (its spacing divided out)."""
    from istn.io import sheared

    return sheared(voxelToRas[:3, :3] / np.linalg.norm(voxelToRas[:3, :3], axis=0))


def updateVolumeNodeFromImage(volumeNode, image: sitk.Image) -> None:
    """Write an ITK image (voxels and geometry) into an existing volume node."""
    volumeNode.SetIJKToRASMatrix(vtkMatrixFromArray(voxelToRasFromImage(image)))
    slicer.util.updateVolumeFromArray(volumeNode, sitk.GetArrayFromImage(image))


def addVolumeNodeFromImage(scene, image: sitk.Image, name: str, className: str = "vtkMRMLScalarVolumeNode"):
    """New volume node in ``scene`` holding ``image`` (with display nodes)."""
    node = scene.AddNewNodeByClass(className, scene.GenerateUniqueName(name))
    updateVolumeNodeFromImage(node, image)
    node.CreateDefaultDisplayNodes()
    return node


# --------------------------------------------------------------------------
# Label maps and segmentations (for Dice)
# --------------------------------------------------------------------------


@dataclass
class Structure:
    """One labelled structure: a name, a label value where known, and its binary mask (uint8, LPS)."""

    name: str
    value: int | None
    mask: sitk.Image
    color: tuple[float, float, float] | None = None  # RGB in [0, 1], where the node gives one


def _colorNodeOf(labelmapNode):
    display = labelmapNode.GetDisplayNode()
    return display.GetColorNode() if display is not None else None


def _labelColor(labelmapNode, value: int) -> tuple[float, float, float] | None:
    colorNode = _colorNodeOf(labelmapNode)
    if colorNode is None or not 0 <= value < colorNode.GetNumberOfColors():
        return None
    rgba = [0.0, 0.0, 0.0, 0.0]
    colorNode.GetColor(value, rgba)
    return tuple(float(c) for c in rgba[:3])


def _labelName(labelmapNode, value: int) -> str:
    colorNode = _colorNodeOf(labelmapNode)
    if colorNode is not None and 0 <= value < colorNode.GetNumberOfColors():
        name = colorNode.GetColorName(value)
        if name and name.lower() not in ("(none)", "invalid"):
            return name
    return f"label {value}"


def structuresFromNode(node, world: bool = False, placement: np.ndarray | None = None) -> list[Structure]:
    """Binary masks of every structure of a segmentation node or a label map volume node: in its own geometry,
    or with ``world`` where it is shown (its linear parents'), or placed by the RAS matrix ``placement``.

    Segmentations need a binary labelmap representation (the usual one); the
    node is only read; empty segments are left out. Label maps give one
    structure per non-zero value.
    """
    if node is None:
        return []
    if placement is None:
        placement = parentToWorldMatrix(node) if world else np.eye(4)
    if node.IsA("vtkMRMLSegmentationNode"):
        return _structuresFromSegmentation(node, placement)
    if node.IsA("vtkMRMLScalarVolumeNode"):
        labels = _labelMapImage(node, placement)
        array = sitk.GetArrayViewFromImage(labels)
        out = []
        for value in sorted(int(v) for v in np.unique(array) if v != 0):
            mask = sitk.Cast(labels == value, sitk.sitkUInt8)
            out.append(Structure(_labelName(node, value) if node.IsA("vtkMRMLLabelMapVolumeNode") else f"label {value}", value, mask))
        return out
    raise ValueError(_("'{name}' is neither a segmentation nor a label map volume").format(name=node.GetName()))


def _labelMapImage(volumeNode, placement: np.ndarray) -> sitk.Image:
    """A label map volume's voxels as an image placed by the RAS matrix ``placement``; refused when they are not
    whole numbers, and a scalar volume (not a label map node) also when it looks like intensities (as the Dice
    segmentations and the atlas both read it: a T1 given as a segmentation gave Dice over 127 "labels")."""
    labels = volumeNodeToImage(volumeNode, placement=placement)
    array = sitk.GetArrayViewFromImage(labels)
    if not np.issubdtype(array.dtype, np.integer) and not np.all(np.equal(np.mod(array, 1), 0)):
        raise ValueError(_("'{name}' is not a label map (its voxel values are not integers)").format(
            name=volumeNode.GetName()))
    if not volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        from istn.metrics import looks_like_intensities

        if looks_like_intensities(labels):
            raise ValueError(_("'{name}' looks like an image of intensities, not a label map (many values, and "
                               "edges of in-between values as an image has); load the labels as a label map").format(
                                   name=volumeNode.GetName()))
    return labels


def _structuresFromSegmentation(segmentationNode, placement: np.ndarray, keepEmpty: bool = False) -> list[Structure]:
    """Each segment's mask on its own extent, placed by the RAS matrix ``placement``; an empty segment (no voxel
    set, whatever its extent) left out, or with ``keepEmpty`` given with ``mask`` None."""
    segmentation = segmentationNode.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        raise ValueError(_("segmentation '{name}' has no segments").format(name=segmentationNode.GetName()))
    labelmapName = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if not segmentation.ContainsRepresentation(labelmapName):
        raise ValueError(_("segmentation '{name}' has no binary labelmap representation; create one in the "
                           "Segmentations module (Representations > Binary labelmap > Create)").format(
                               name=segmentationNode.GetName()))
    out = []
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segmentId)
        value = segment.GetLabelValue() if hasattr(segment, "GetLabelValue") else None
        value = int(value) if value is not None else None
        color = tuple(segment.GetColor())
        oriented = slicer.vtkOrientedImageData()
        if not segmentationNode.GetBinaryLabelmapRepresentation(segmentId, oriented):
            raise ValueError(_("segment '{segment}' of '{name}' could not be read").format(
                segment=segment.GetName(), name=segmentationNode.GetName()))
        extent = oriented.GetExtent()
        array = None
        if extent[1] >= extent[0] and extent[3] >= extent[2] and extent[5] >= extent[4]:
            dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
            scalars = numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars())
            array = (scalars.reshape(dims[2], dims[1], dims[0]) != 0).astype(np.uint8)
        if array is None or not array.any():  # empty: nothing painted, or erased (its extent may stay)
            if keepEmpty:
                out.append(Structure(segment.GetName(), value, None, color))
            continue
        imageToWorld = vtk.vtkMatrix4x4()
        oriented.GetImageToWorldMatrix(imageToWorld)
        voxelToRas = placement @ arrayFromVtkMatrix(imageToWorld)
        # the extent need not start at 0: shift the origin to voxel (extent[0], extent[2], extent[4])
        shift = np.eye(4)
        shift[:3, 3] = [extent[0], extent[2], extent[4]]
        out.append(Structure(segment.GetName(), value, imageFromArray(array, voxelToRas @ shift), color))
    return out


@dataclass
class LayerSegment:
    """One structure of a `LabelLayer`: its value there, name, colour (RGB in [0, 1]; None: none given) and place
    in the node's order."""

    value: int
    name: str
    color: tuple[float, float, float] | None
    order: int


@dataclass
class LabelLayer:
    """Structures that do not overlap, as label values 1..n on one grid (``labels``, LPS); a segment that is
    empty has a value no voxel holds."""

    labels: sitk.Image
    segments: list[LayerSegment]


def labelLayersFromNode(node, world: bool = False, allowEmpty: bool = False) -> list[LabelLayer]:
    """A segmentation or label map node as layers of label values, so that each layer can be resampled at once.

    A label map volume is one layer (its values renumbered 1..n in order; names and colours from its colour table).
    A segmentation's segments are put on grids spanning them (one per voxel lattice the segments use: Slicer
    usually keeps one) and into as few layers as their overlaps allow, so overlapping segments stay whole; empty
    segments are kept, empty. Refused: no segment with a voxel set (unless ``allowEmpty``); a scalar volume that
    looks like intensities.
    """
    placement = parentToWorldMatrix(node) if world else np.eye(4)
    if node.IsA("vtkMRMLSegmentationNode"):
        structures = _structuresFromSegmentation(node, placement, keepEmpty=True)
        if all(s.mask is None for s in structures) and not allowEmpty:
            raise ValueError(_("segmentation '{name}' has only empty segments").format(name=node.GetName()))
        return layersOfStructures(structures)
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise ValueError(_("'{name}' is neither a segmentation nor a label map volume").format(name=node.GetName()))
    labels = _labelMapImage(node, placement)
    array = sitk.GetArrayViewFromImage(labels)
    named = node.IsA("vtkMRMLLabelMapVolumeNode")
    values, index = np.unique(array, return_inverse=True)
    labelled = values != 0
    if not labelled.any():
        raise ValueError(_("'{name}' holds no label (every voxel is 0)").format(name=node.GetName()))
    lut = np.zeros(values.size, np.uint32)  # renumbered 1..n in value order (negative labels too); 0 stays 0
    lut[labelled] = np.arange(1, int(labelled.sum()) + 1)
    renumbered = sitk.GetImageFromArray(lut[index.reshape(array.shape)].astype(
        np.uint16 if labelled.sum() < 65536 else np.uint32))
    renumbered.CopyInformation(labels)
    segments = [LayerSegment(int(lut[i]), _labelName(node, int(v)) if named else f"label {int(v)}",
                             _labelColor(node, int(v)) if named else None, int(lut[i]) - 1)
                for i, v in enumerate(values.tolist()) if v != 0]
    return [LabelLayer(renumbered, segments)]


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _sameLattice(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether ``b``'s voxel centres lie on ``a``'s lattice (same spacing and axes, an origin a whole number of
    voxels away)."""
    if not (np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)):
        return False
    offset = np.array(a.TransformPhysicalPointToContinuousIndex(b.GetOrigin()))
    return bool(np.allclose(offset, np.round(offset), atol=1e-3))


def layersOfStructures(structures: list[Structure]) -> list[LabelLayer]:
    """Masks on their own extents -> label layers, one grid per lattice spanning its masks; empty structures
    (``mask`` None) join the first layer without voxels."""
    groups: list[list[tuple[int, Structure]]] = []
    for order, s in enumerate(structures):
        if s.mask is None:
            continue
        for group in groups:
            if _sameLattice(group[0][1].mask, s.mask):
                group.append((order, s))
                break
        else:
            groups.append([(order, s)])
    out: list[LabelLayer] = []
    for group in groups:
        first = group[0][1].mask
        lows, highs = [], []
        for _order, s in group:  # each mask's corners as indices of the first one's lattice
            corners = [s.mask.TransformIndexToPhysicalPoint([int(i * (n - 1)) for i, n in zip(c, s.mask.GetSize())])
                       for c in np.ndindex(2, 2, 2)]
            index = np.array([first.TransformPhysicalPointToContinuousIndex(p) for p in corners])
            lows.append(np.floor(index.min(0) + 0.5))
            highs.append(np.floor(index.max(0) + 0.5))
        low, high = np.min(lows, 0).astype(int), np.max(highs, 0).astype(int)
        grid = sitk.Image([int(n) for n in high - low + 1], sitk.sitkUInt8)
        grid.SetSpacing(first.GetSpacing())
        grid.SetDirection(first.GetDirection())
        grid.SetOrigin(first.TransformContinuousIndexToPhysicalPoint([float(v) for v in low]))
        arrays: list[np.ndarray] = []
        layers: list[list[LayerSegment]] = []
        spanned = _geometry(grid)
        for order, s in group:
            if _geometry(s.mask) == spanned:  # already on the layers' grid (a label map's masks)
                inside = sitk.GetArrayViewFromImage(s.mask) != 0
            else:  # a copy, not a view: the resampled image is a temporary
                inside = sitk.GetArrayFromImage(
                    sitk.Resample(s.mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) != 0
            for array, segments in zip(arrays, layers):
                if len(segments) < 65535 and not array[inside].any():
                    break
            else:
                arrays.append(np.zeros(inside.shape, np.uint16))
                layers.append([])
                array, segments = arrays[-1], layers[-1]
            segments.append(LayerSegment(len(segments) + 1, s.name, s.color, order))
            array[inside] = len(segments)
        for array, segments in zip(arrays, layers):
            labels = sitk.GetImageFromArray(array)
            labels.CopyInformation(grid)
            out.append(LabelLayer(labels, segments))
    if not out:  # every structure empty: one voxel holding none of them
        out.append(LabelLayer(sitk.Image([1, 1, 1], sitk.sitkUInt16), []))
    first = out[0]
    for order, s in enumerate(structures):
        if s.mask is None:
            first.segments.append(LayerSegment(len(first.segments) + 1, s.name, s.color, order))
    return out


def _defaultColor(order: int) -> tuple[float, float, float]:
    """A colour for a structure that came without one: hues spread by the golden ratio, so neighbours differ."""
    import colorsys

    return colorsys.hsv_to_rgb((0.61803398875 * order) % 1.0, 0.65, 0.95)


def setSegmentsFromLayers(segmentationNode, layers: list[LabelLayer], referenceVolumeNode=None) -> None:
    """Make ``segmentationNode``'s segments those of ``layers``, in their order (names and colours kept, an empty
    one kept empty; voxels in the segmentation's own coordinates), with ``referenceVolumeNode``'s grid as the
    Segment Editor's reference geometry.

    A segment already there under the same name is updated in place (its ID and display settings, e.g. hidden
    or its opacity, stay); the others are removed, new ones added.
    """
    from scipy import ndimage

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    content = segmentationNode.GetSegmentation()
    unused = [content.GetNthSegmentID(i) for i in range(content.GetNumberOfSegments())]
    byName: dict[str, list[str]] = {}  # the segments there, by name (Slicer allows repeats), in order
    for segmentId in unused:
        byName.setdefault(content.GetSegment(segmentId).GetName(), []).append(segmentId)
    wanted = []  # (order, layer index, segment)
    boxes = []
    for index, layer in enumerate(layers):
        array = sitk.GetArrayViewFromImage(layer.labels)
        # each value's box in one pass over the layer (values are 1..n)
        boxes.append((array, ndimage.find_objects(array), vtkMatrixFromArray(voxelToRasFromImage(layer.labels))))
        wanted.extend((segment.order, index, segment) for segment in layer.segments)
    ids = []
    for _order, index, segment in sorted(wanted, key=lambda w: w[0]):
        array, found, imageToWorld = boxes[index]
        box = found[segment.value - 1] if segment.value - 1 < len(found) else None
        if box is None:  # empty: one voxel, unset
            box = (slice(0, 1),) * 3
        inside = (array[box] == segment.value).astype(np.uint8)
        oriented = slicer.vtkOrientedImageData()
        oriented.SetExtent(box[2].start, box[2].stop - 1, box[1].start, box[1].stop - 1, box[0].start,
                           box[0].stop - 1)
        oriented.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
            np.ascontiguousarray(inside).ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
        oriented.SetImageToWorldMatrix(imageToWorld)
        color = segment.color if segment.color is not None else _defaultColor(segment.order)
        match = byName[segment.name].pop(0) if byName.get(segment.name) else None
        if match is not None:
            unused.remove(match)
            logic.SetBinaryLabelmapToSegment(oriented, segmentationNode, match, logic.MODE_REPLACE)
            content.GetSegment(match).SetColor(*color)
            ids.append(match)
        else:
            ids.append(segmentationNode.AddSegmentFromBinaryLabelmapRepresentation(oriented, segment.name,
                                                                                   list(color)))
    for segmentId in unused:
        content.RemoveSegment(segmentId)
    for index, segmentId in enumerate(ids):
        content.SetSegmentIndex(segmentId, index)
    content.CollapseBinaryLabelmaps(False)  # segments that do not overlap share a layer, as Slicer keeps them
    # last: adding segments of other extents makes the segmentation choose a reference geometry of its own; taken
    # relative to the segmentation's parent transform (the reference volume's, where they share one, is its own)
    if referenceVolumeNode is not None:
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)


def matchStructures(fixed: list[Structure], moving: list[Structure]
                    ) -> tuple[list[tuple[Structure, Structure]], list[str]]:
    """``(pairs of fixed/moving structures, notes for the user)``: by name, else by label value.

    Names are compared without case and surrounding spaces ("Left Caudate" is
    "left caudate"); when some names agree, those pairs are scored and a note
    names the structures left without a counterpart. With no name in common,
    by label value, but only when every value stands for one structure on each
    side: label values follow the order segments were created in, and segments
    each in a layer of their own all have the value 1, so a value shared by
    several is no pairing; a note says that values, not names, paired them.
    """
    def key(structure: Structure) -> str:
        return structure.name.strip().casefold()

    byName: dict[str, Structure] = {}
    for m in moving:
        byName.setdefault(key(m), m)
    pairs = [(f, byName[key(f)]) for f in fixed if key(f) in byName]
    if pairs:
        pairedFixed = {id(f) for f, _ in pairs}
        pairedMoving = {id(m) for _, m in pairs}
        alone = ([_("fixed '{name}'").format(name=f.name) for f in fixed if id(f) not in pairedFixed]
                 + [_("moving '{name}'").format(name=m.name) for m in moving if id(m) not in pairedMoving])
        notes = [_("Dice only for the {count} structures named alike in both segmentations; without a counterpart, "
                   "not scored: {names}").format(count=len(pairs), names=", ".join(alone))] if alone else []
        return pairs, notes
    fixedValues = [f.value for f in fixed]
    movingValues = [m.value for m in moving]
    for values in (fixedValues, movingValues):
        if None in values or len(set(values)) != len(values):
            return [], []
    byValue = {m.value: m for m in moving}
    pairs = [(f, byValue[f.value]) for f in fixed if f.value in byValue]
    if not pairs:
        return [], []
    notes = [_("no segment name in common: structures paired by label value ({pairs}); give the segments the same "
               "names to pair them by name").format(
                   pairs=", ".join(f"'{f.name}' ~ '{m.name}'" for f, m in pairs))]
    return pairs, notes


# --------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------


def setLinearTransformFromParent(transformNode, matrix_ras: np.ndarray) -> None:
    transformNode.SetMatrixTransformFromParent(vtkMatrixFromArray(matrix_ras))


def splitComposite(transform: sitk.Transform) -> tuple[np.ndarray, sitk.BSplineTransform | None]:
    """An engine result -> (linear part as a 4x4 LPS matrix, B-spline or None).

    The engine returns an ``AffineTransform`` or a composite ``x -> B(A(x))``
    (affine applied first). Anything else is refused.
    """
    from istn.transforms import sitk_affine_to_matrix  # lazy: the engine imports torch

    tx = transform.Downcast() if hasattr(transform, "Downcast") else transform
    if isinstance(tx, sitk.CompositeTransform):
        parts = [tx.GetNthTransform(i).Downcast() for i in range(tx.GetNumberOfTransforms())]
        # ITK applies the LAST transform of a composite first
        parts = parts[::-1]
        linear = np.eye(4)
        bspline = None
        for part in parts:
            if isinstance(part, sitk.BSplineTransform):
                if bspline is not None:
                    raise ValueError(_("a result with two B-splines cannot be shown as one transform node"))
                bspline = part
            else:
                if bspline is not None:
                    raise ValueError(_("a linear transform applied after the B-spline cannot be shown as a parent "
                                       "node"))
                linear = sitk_affine_to_matrix(part) @ linear
        return linear, bspline
    if isinstance(tx, sitk.BSplineTransform):
        return np.eye(4), tx
    return sitk_affine_to_matrix(tx), None


def _bsplineGeometryRas(bspline: sitk.BSplineTransform):
    fixed = bspline.GetFixedParameters()
    size = [int(round(v)) for v in fixed[0:3]]
    origin_lps = np.asarray(fixed[3:6])
    spacing = list(fixed[6:9])
    direction_lps = np.asarray(fixed[9:18]).reshape(3, 3)
    origin_ras = LPS_TO_RAS[:3, :3] @ origin_lps
    direction_ras = LPS_TO_RAS[:3, :3] @ direction_lps
    return size, origin_ras, spacing, direction_ras


def _bsplineCoefficientsRas(bspline: sitk.BSplineTransform, size: list[int]) -> np.ndarray:
    """ITK coefficients (component-major, x fastest) -> ``(K, J, I, 3)`` RAS displacements."""
    params = np.asarray(bspline.GetParameters(), dtype=float).reshape(3, size[2], size[1], size[0])
    return np.ascontiguousarray(np.moveaxis(params, 0, -1) * np.array([-1.0, -1.0, 1.0]))


def bsplineToVtk(bspline: sitk.BSplineTransform) -> "slicer.vtkOrientedBSplineTransform":
    """ITK cubic B-spline (LPS) -> ``vtkOrientedBSplineTransform`` (RAS), same displacement inside its grid."""
    if bspline.GetDimension() != 3 or bspline.GetOrder() != 3:
        raise ValueError(_("only 3D cubic B-splines can be shown in Slicer"))
    size, origin, spacing, direction = _bsplineGeometryRas(bspline)
    coefficients = vtk.vtkImageData()
    coefficients.SetDimensions(size)
    coefficients.SetOrigin(origin.tolist())
    coefficients.SetSpacing(spacing)
    coefficients.AllocateScalars(vtk.VTK_DOUBLE, 3)
    transform = slicer.vtkOrientedBSplineTransform()
    direction4 = np.eye(4)
    direction4[:3, :3] = direction
    transform.SetGridDirectionMatrix(vtkMatrixFromArray(direction4))
    transform.SetCoefficientData(coefficients)
    # Zero beyond the grid. ITK also drops the outermost span (its "valid region"); the engine pads a
    # ring of zero coefficients, so both agree up to one control point spacing beyond the network grid.
    transform.SetBorderModeToZero()
    updateBSplineCoefficients(transform, bspline)
    return transform


def _geometryKey(bspline: sitk.BSplineTransform) -> tuple:
    return tuple(round(v, 9) for v in bspline.GetFixedParameters())


def updateBSplineCoefficients(transform, bspline: sitk.BSplineTransform) -> None:
    """Write ``bspline``'s coefficients into ``transform`` (made by `bsplineToVtk` from the same grid) in place."""
    size = _bsplineGeometryRas(bspline)[0]
    coefficients = transform.GetCoefficientData()
    target = numpy_support.vtk_to_numpy(coefficients.GetPointData().GetScalars()).reshape(size[2], size[1], size[0], 3)
    target[...] = _bsplineCoefficientsRas(bspline, size)
    coefficients.GetPointData().GetScalars().Modified()
    coefficients.Modified()
    transform.Modified()


class BSplineNodeWriter:
    """Writes successive B-splines into one transform node, in place while the grid stays the same.

    In-place updates keep the VTK object, so views that follow the node only
    need the Modified event (the live display during refinement). The writer
    remembers the VTK transform it made: a B-spline node's default transform
    has no coefficient image, and asking it for one crashes VTK.
    """

    def __init__(self, transformNode) -> None:
        self.node = transformNode
        self._transform = None
        self._key: tuple | None = None

    def write(self, bspline: sitk.BSplineTransform) -> None:
        key = _geometryKey(bspline)
        current = self.node.GetTransformFromParent()
        ours = (self._transform is not None and current is not None
                and current.GetAddressAsString("") == self._transform.GetAddressAsString(""))
        if ours and key == self._key:
            updateBSplineCoefficients(self._transform, bspline)
            self.node.GetTransformFromParent().Modified()
            return
        self._transform = bsplineToVtk(bspline)
        self._key = key
        self.node.SetAndObserveTransformFromParent(self._transform)
