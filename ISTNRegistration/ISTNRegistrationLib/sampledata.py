"""The bundled sample pair in Slicer's Sample Data module (one click for a new user and the self test).

The pair is a 2 mm brain T1 pair with sub-cortical labels: ``fixed_t1.nii.gz``,
``moving_t1.nii.gz`` and the labels as segmentations with named segments,
``fixed_labels.seg.nrrd``, ``moving_labels.seg.nrrd`` (made from the
``*_labels.nii.gz`` label maps by `writeNamedSegmentation`, so Dice is reported
per structure name). In an installed extension the files sit in the module's
``Resources/SampleData``; in a source checkout, in the repository's top-level
``Resources/SampleData``. They are loaded from the local disk (``file://``
URIs), so nothing is downloaded; Sample Data still copies them into Slicer's
shared cache, hence the prefixed cache names and the checksums.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from .i18n import _
from .models import MODULE_DIR

CATEGORY = "ISTN Registration"
#: The name on the Sample Data button (Slicer shows ``sampleName``) and the key of `loadSampleData`.
SAMPLE_NAME = "ISTN brain pair"
#: Prefix of the names in Slicer's shared download cache, which every module's sample data share.
CACHE_PREFIX = "ISTNRegistration_"
#: (file name, node name, Slicer file type): the images as volumes, the labels as segmentations.
FILES = (
    ("fixed_t1.nii.gz", "ISTN fixed T1", "VolumeFile"),
    ("moving_t1.nii.gz", "ISTN moving T1", "VolumeFile"),
    ("fixed_labels.seg.nrrd", "ISTN fixed labels", "SegmentationFile"),
    ("moving_labels.seg.nrrd", "ISTN moving labels", "SegmentationFile"),
)
#: Label value -> segment name (the protocol of `istn.braindata.LABELS`, written as people read it).
STRUCTURES = {1: "left caudate", 2: "right caudate", 3: "left putamen", 4: "right putamen",
              5: "left pallidum", 6: "right pallidum", 7: "left thalamus", 8: "right thalamus"}


def sampleDataDirectory() -> Path | None:
    """The folder holding the sample pair (installed module first, then the source checkout); None if absent."""
    for folder in (MODULE_DIR / "Resources" / "SampleData", MODULE_DIR.parent / "Resources" / "SampleData"):
        if all((folder / name).is_file() for name, _node, _kind in FILES):
            return folder
    return None


def sha256Checksum(path: str | os.PathLike) -> str:
    """``SHA256:<hex digest>``, the form Sample Data verifies cached files with."""
    return "SHA256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sampleDataSourceArguments(folder: str | os.PathLike | None = None) -> dict | None:
    """Keyword arguments of ``SampleDataLogic.registerCustomSampleDataSource`` for the pair; None if it is missing.

    Checksums are computed from the installed files (a few hundred kB), so they
    are always those of this version: a file cached by an older version no
    longer matches and is replaced.
    """
    folder = Path(folder) if folder is not None else sampleDataDirectory()
    if folder is None:
        return None
    icon = MODULE_DIR / "Resources" / "Icons" / "ISTNRegistration.png"
    return dict(
        category=CATEGORY,
        sampleName=SAMPLE_NAME,
        uris=[(folder / name).resolve().as_uri() for name, _node, _kind in FILES],
        fileNames=[CACHE_PREFIX + name for name, _node, _kind in FILES],
        nodeNames=[node for _name, node, _kind in FILES],
        loadFileTypes=[kind for _name, _node, kind in FILES],
        thumbnailFileName=str(icon) if icon.is_file() else None,
        checksums=[sha256Checksum(folder / name) for name, _node, _kind in FILES],
    )


def registerSampleData() -> bool:
    """Add the pair to Slicer's Sample Data module (application only); False if the files are missing."""
    import SampleData  # Slicer's Sample Data module (not in slicer-core)

    arguments = sampleDataSourceArguments()
    if arguments is None:
        return False
    try:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**arguments)
    except TypeError:  # Slicer < 5.8 knows only the singular, now deprecated, loadFileType
        logging.debug("ISTN Registration: Sample Data without loadFileTypes; using loadFileType")
        arguments["loadFileType"] = arguments.pop("loadFileTypes")
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**arguments)
    return True


def loadSampleData() -> dict:
    """Load the pair into the scene (application only): ``{"fixed": node, "moving": node, "fixedLabels": ..., ...}``."""
    import SampleData

    if sampleDataDirectory() is None:
        raise RuntimeError(_("the ISTN sample pair is not installed with this module (Resources/SampleData)"))
    registerSampleData()
    loaded = SampleData.SampleDataLogic().downloadSamples(SAMPLE_NAME)
    if len(loaded) != len(FILES):
        raise RuntimeError(_("the ISTN sample pair did not load ({loaded} of {total} files)").format(
            loaded=len(loaded), total=len(FILES)))
    return dict(zip(("fixed", "moving", "fixedLabels", "movingLabels"), loaded))


def writeNamedSegmentation(labelsPath: str | os.PathLike, outPath: str | os.PathLike, scene=None) -> Path:
    """A label map file -> a ``.seg.nrrd`` whose segments carry `STRUCTURES` names (needs only MRML: slicer-core).

    This is how the shipped ``*_labels.seg.nrrd`` are made from the
    ``*_labels.nii.gz`` (the engine and the command line read the latter)::

        python -c "from ISTNRegistrationLib.sampledata import writeNamedSegmentation as w; w('in.nii.gz', 'out.seg.nrrd')"
    """
    import SimpleITK as sitk

    import slicer

    from . import nodes as nodeio

    scene = scene if scene is not None else slicer.vtkMRMLScene()
    labels = sitk.ReadImage(str(labelsPath))
    labelmap = nodeio.addVolumeNodeFromImage(scene, labels, "labels", "vtkMRMLLabelMapVolumeNode")
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "ISTN structures")
    colors.SetTypeToUser()
    colors.SetNumberOfColors(max(STRUCTURES) + 1)
    colors.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    palette = ((0.9, 0.6, 0.2), (0.2, 0.6, 0.9), (0.9, 0.3, 0.5), (0.3, 0.8, 0.5))  # one hue per structure pair
    for value, name in STRUCTURES.items():
        r, g, b = palette[(value - 1) // 2]
        shade = 1.0 if value % 2 else 0.75  # left bright, right darker
        colors.SetColor(value, name, r * shade, g * shade, b * shade, 1.0)
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    # the label map's grid as the segmentation's reference geometry: written into the file (without it every
    # write logged "Conversion parameter 'Reference image geometry' is not found")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation):
        raise RuntimeError(_("could not import '{path}' as a segmentation").format(path=labelsPath))
    content = segmentation.GetSegmentation()
    for index in range(content.GetNumberOfSegments()):
        content.GetNthSegment(index).SetNameAutoGenerated(False)  # a structure name, not a placeholder
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(outPath))
    if not storage.WriteData(segmentation):
        raise RuntimeError(_("could not write '{path}'").format(path=outPath))
    return Path(outPath)
