"""Python dependencies inside Slicer: what is missing, and installing it with the user's consent.

- torch comes from the PyTorch extension (``PyTorchUtils``), which picks the
  CUDA or CPU wheel that suits the machine;
- the engine's other packages are listed in ``Resources/requirements.txt``
  and go through Slicer's installer;
- Slicer's own numpy, SimpleITK and vtk are never reinstalled.

Only the ``install*`` functions need the Slicer application; the checks work anywhere.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

from .models import MODULE_DIR

REQUIREMENTS_FILE = MODULE_DIR / "Resources" / "requirements.txt"
#: Packages Slicer ships and that an install must never replace.
SLICER_OWN_PACKAGES = ("numpy", "SimpleITK", "vtk")
#: Import name of a distribution when it differs from the distribution name.
_IMPORT_NAMES = {"scikit-image": "skimage", "pillow": "PIL"}


def requirementLines(path: str | Path = REQUIREMENTS_FILE) -> list[str]:
    """Requirement specifiers of ``requirements.txt`` (comments and blank lines dropped)."""
    p = Path(path)
    if not p.is_file():
        return []
    lines = []
    for raw in p.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _distributionName(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]


def isImportable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def torchAvailable() -> bool:
    return isImportable("torch")


def missingRequirements(path: str | Path = REQUIREMENTS_FILE) -> list[str]:
    """Lines of ``requirements.txt`` whose package cannot be imported (versions are left to pip)."""
    missing = []
    for line in requirementLines(path):
        name = _distributionName(line)
        if not isImportable(_IMPORT_NAMES.get(name.lower(), name.replace("-", "_"))):
            missing.append(line)
    return missing


def missingPackages() -> list[str]:
    """Everything that must be installed before a registration can run (``torch`` first)."""
    return (["torch"] if not torchAvailable() else []) + [_distributionName(r) for r in missingRequirements()]


def dependencyMessage(missing: list[str] | None = None) -> str:
    """The sentence the panel shows when something is missing ('' when nothing is)."""
    missing = missingPackages() if missing is None else missing
    if not missing:
        return ""
    text = "ISTN Registration needs Python packages that are not installed yet: " + ", ".join(missing) + "."
    if "torch" in missing:
        text += (" PyTorch is installed through the PyTorch extension (Extensions Manager), which chooses a "
                 "GPU or CPU build for this computer; it is a download of several hundred MB.")
    return text + " Click 'Install' to install them (Slicer may ask to restart)."


# --------------------------------------------------------------------------
# Installation (Slicer application only)
# --------------------------------------------------------------------------


def installTorch(askConfirmation: bool = True) -> bool:
    """Install torch through the PyTorch extension; False if the user declined or it is unavailable."""
    if torchAvailable():
        return True
    try:
        import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS PyTorch)
    except ModuleNotFoundError:
        raise RuntimeError(
            "ISTN Registration needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
            "restart Slicer, then come back to this module"
        ) from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation)
    return torch is not None


def installRequirements(askConfirmation: bool = True) -> bool:
    """Install the lines of ``requirements.txt`` that are missing, through Slicer's installer."""
    import slicer

    missing = missingRequirements()
    if not missing:
        return True
    packaging = getattr(slicer, "packaging", None)
    ensure = getattr(packaging, "pip_ensure", None) or getattr(slicer.util, "pip_ensure", None)
    load = getattr(packaging, "load_requirements", None) or getattr(slicer.util, "load_requirements", None)
    if ensure is not None and load is not None:  # Slicer >= 5.12
        requirements = load(str(REQUIREMENTS_FILE))
        try:
            ensure(requirements, prompt_install=askConfirmation, requester="ISTN Registration",
                   skip_packages=list(SLICER_OWN_PACKAGES))
        except TypeError:  # an installer without skip_packages
            ensure(requirements, prompt_install=askConfirmation, requester="ISTN Registration")
    else:
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "ISTN Registration will install these Python packages: " + ", ".join(missing) + ". Continue?"
        ):
            return False
        # plain requirement strings, one call: pip resolves them against the numpy/SimpleITK/vtk Slicer has
        slicer.util.pip_install(missing)
    still = missingRequirements()
    if still:
        logging.error("ISTN Registration: still missing after installation: %s", ", ".join(still))
    return not still


def installDependencies(askConfirmation: bool = True) -> bool:
    """torch (PyTorch extension), then ``requirements.txt``; True when everything is importable."""
    if not installTorch(askConfirmation):
        return False
    return installRequirements(askConfirmation) and not missingPackages()
