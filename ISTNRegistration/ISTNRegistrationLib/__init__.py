"""ISTN Registration for 3D Slicer: everything the module does, without Qt.

- `logic`: `ISTNRegistrationLogic`, the registration on MRML nodes (console API);
- `nodes`: MRML nodes <-> engine images and transforms (RAS <-> LPS);
- `models`: the bundled and custom model files, read without torch;
- `dependencies`: what is missing and installing it inside Slicer;
- `sampledata`: the bundled sample pair in Slicer's Sample Data module.

The engine (`istn`) sits next to this package in the module folder and is
imported only when a registration runs, so this package imports without torch.
"""

import os
import sys

_MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _MODULE_DIR not in sys.path:  # the engine package `istn` lives in the module folder
    sys.path.append(_MODULE_DIR)

from .dependencies import dependencyMessage, installDependencies, missingPackages  # noqa: E402
from .logic import (  # noqa: E402
    ISTNRegistrationLogic,
    ISTNRegistrationResult,
    RegistrationProgress,
)
from .models import ModelInfo, ModelInfoError, bundledModels, defaultModel, readModelInfo  # noqa: E402

__all__ = [
    "ISTNRegistrationLogic",
    "ISTNRegistrationResult",
    "RegistrationProgress",
    "ModelInfo",
    "ModelInfoError",
    "bundledModels",
    "defaultModel",
    "readModelInfo",
    "dependencyMessage",
    "installDependencies",
    "missingPackages",
]
