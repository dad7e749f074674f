"""The bundled sample pair in Slicer's Sample Data module (one click for a new user and the self test).

The pair is a 2 mm brain T1 pair with sub-cortical label maps:
``fixed_t1.nii.gz``, ``moving_t1.nii.gz``, ``fixed_labels.nii.gz``,
``moving_labels.nii.gz``. In an installed extension they sit in the module's
``Resources/SampleData``; in a source checkout, in the repository's top-level
``Resources/SampleData``. They are loaded from the local disk (``file://``
URIs), so nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from .models import MODULE_DIR

CATEGORY = "ISTN Registration"
SAMPLE_NAME = "ISTNBrainPair"
SAMPLE_DESCRIPTION = "ISTN brain pair\n(T1 + labels, 2 mm)"
#: (file name, node name, Slicer file type): the images as volumes, the label maps as segmentations.
FILES = (
    ("fixed_t1.nii.gz", "ISTN fixed T1", "VolumeFile"),
    ("moving_t1.nii.gz", "ISTN moving T1", "VolumeFile"),
    ("fixed_labels.nii.gz", "ISTN fixed labels", "SegmentationFile"),
    ("moving_labels.nii.gz", "ISTN moving labels", "SegmentationFile"),
)


def sampleDataDirectory() -> Path | None:
    """The folder holding the sample pair (installed module first, then the source checkout); None if absent."""
    for folder in (MODULE_DIR / "Resources" / "SampleData", MODULE_DIR.parent / "Resources" / "SampleData"):
        if all((folder / name).is_file() for name, _, _ in FILES):
            return folder
    return None


def sampleDataSourceArguments(folder: str | os.PathLike | None = None) -> dict | None:
    """Keyword arguments of ``SampleDataLogic.registerCustomSampleDataSource`` for the pair; None if it is missing."""
    folder = Path(folder) if folder is not None else sampleDataDirectory()
    if folder is None:
        return None
    icon = MODULE_DIR / "Resources" / "Icons" / "ISTNRegistration.png"
    return dict(
        category=CATEGORY,
        sampleName=SAMPLE_NAME,
        uris=[(folder / name).resolve().as_uri() for name, _, _ in FILES],
        fileNames=[name for name, _, _ in FILES],
        nodeNames=[node for _, node, _ in FILES],
        loadFileType=[kind for _, _, kind in FILES],
        thumbnailFileName=str(icon) if icon.is_file() else None,
        checksums=[None] * len(FILES),  # local files: nothing to verify
    )


def registerSampleData() -> bool:
    """Add the pair to Slicer's Sample Data module (application only); False if the files are missing."""
    import SampleData  # Slicer's Sample Data module (not in slicer-core)

    arguments = sampleDataSourceArguments()
    if arguments is None:
        return False
    SampleData.SampleDataLogic.registerCustomSampleDataSource(**arguments)
    return True


def loadSampleData() -> dict:
    """Load the pair into the scene (application only): ``{"fixed": node, "moving": node, "fixedLabels": ..., ...}``."""
    import SampleData

    if sampleDataDirectory() is None:
        raise RuntimeError("the ISTN sample pair is not installed with this module (Resources/SampleData)")
    registerSampleData()
    loaded = SampleData.SampleDataLogic().downloadSamples(SAMPLE_NAME)
    if len(loaded) != len(FILES):
        raise RuntimeError(f"the ISTN sample pair did not load ({len(loaded)} of {len(FILES)} files)")
    return dict(zip(("fixed", "moving", "fixedLabels", "movingLabels"), loaded))
