"""Python dependencies inside Slicer: what is missing, and installing it with the user's consent.

- torch comes from the PyTorch extension (``PyTorchUtils``), which picks the
  CUDA or CPU wheel that suits the machine, at least `TORCH_MINIMUM`;
- the engine's other packages are listed in ``Resources/requirements.txt``
  and go through Slicer's installer (``slicer.packaging`` from Slicer 5.12,
  ``slicer.util.pip_install`` before), with a constraints file that holds
  Slicer's own numpy, SimpleITK and vtk at the versions installed.

Only the ``install*`` functions need the Slicer application; the checks work anywhere.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
import tempfile
from pathlib import Path

from .i18n import _
from .models import MODULE_DIR

REQUIREMENTS_FILE = MODULE_DIR / "Resources" / "requirements.txt"
#: Packages Slicer ships and that an install must never replace (held by a constraints file).
SLICER_OWN_PACKAGES = ("numpy", "SimpleITK", "vtk")
#: Import name of a distribution when it differs from the distribution name.
_IMPORT_NAMES = {"scikit-image": "skimage", "pillow": "PIL"}
#: The oldest torch that runs the engine AND loads the bundled models. The engine itself needs 2.1
#: (pyproject.toml), but the bundled TorchScript files were exported with torch 2.13 and their
#: serialized F.interpolate calls aten::_upsample_lanczos2d_aa, an operator that torch 2.12 added
#: (absent from 2.8, 2.9, 2.10 and 2.11): an older torch cannot load them. torch >= 2.12 has no
#: wheels for Python 3.9, so Slicer 5.6/5.8 cannot run the bundled models (docs/slicer.md).
TORCH_MINIMUM = (2, 12)
TORCH_REQUIREMENT = ">=" + ".".join(str(v) for v in TORCH_MINIMUM)

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


def parseVersion(text: str) -> tuple[int, ...]:
    """``"2.8.0+cu126"`` -> ``(2, 8, 0)`` (the release numbers; local and pre-release tags ignored)."""
    match = re.match(r"\s*(\d+(?:\.\d+)*)", text or "")
    return tuple(int(v) for v in match.group(1).split(".")) if match else ()


def installedTorchVersion() -> str | None:
    """The installed torch's version, read without importing torch (None if torch is not installed)."""
    if not torchAvailable():
        return None
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # e.g. a source build on sys.path: ask torch itself
        import torch

        return str(torch.__version__)


def torchTooOld(version: str | None = None) -> bool:
    """True when torch is installed but older than `TORCH_MINIMUM`."""
    version = installedTorchVersion() if version is None else version
    return version is not None and parseVersion(version)[:2] < TORCH_MINIMUM


def missingRequirements(path: str | Path = REQUIREMENTS_FILE) -> list[str]:
    """Lines of ``requirements.txt`` whose package cannot be imported (versions are left to pip)."""
    missing = []
    for line in requirementLines(path):
        name = _distributionName(line)
        if not isImportable(_IMPORT_NAMES.get(name.lower(), name.replace("-", "_"))):
            missing.append(line)
    return missing


def missingPackages() -> list[str]:
    """Everything that must be installed (or updated) before a registration can run, torch first."""
    if not torchAvailable():
        torch = ["torch"]
    elif torchTooOld():
        torch = ["torch" + TORCH_REQUIREMENT]
    else:
        torch = []
    return torch + [_distributionName(r) for r in missingRequirements()]


def dependencyMessage(missing: list[str] | None = None) -> str:
    """The sentence the panel shows when something is missing or too old ('' when nothing is)."""
    missing = missingPackages() if missing is None else missing
    if not missing:
        return ""
    text = _("ISTN Registration needs Python packages that are not installed yet: {packages}.").format(
        packages=", ".join(missing))
    if "torch" in missing:
        text += " " + _("PyTorch is installed through the PyTorch extension (Extensions Manager), which chooses a "
                        "GPU or CPU build for this computer; it is a download of several hundred MB.")
    elif any(m.startswith("torch") for m in missing):
        text = _("PyTorch {installed} is installed, but ISTN Registration and its bundled models need PyTorch "
                 "{minimum} or newer. Click 'Install' to update it (or use the PyTorch Utils module), then restart "
                 "Slicer. PyTorch {minimum} needs Python 3.10 or newer: on Slicer 5.6 and 5.8 (Python 3.9) "
                 "use Slicer 5.10 or newer instead.").format(installed=installedTorchVersion(),
                                                             minimum=TORCH_REQUIREMENT[2:])
        others = [m for m in missing if not m.startswith("torch")]
        if others:
            text += " " + _("Also missing: {packages}.").format(packages=", ".join(others))
        return text
    return text + " " + _("Click 'Install' to install them (Slicer may ask to restart).")


# --------------------------------------------------------------------------
# Installation (Slicer application only)
# --------------------------------------------------------------------------


def installTorch(askConfirmation: bool = True) -> bool:
    """Install (or update) torch through the PyTorch extension; False if declined, unavailable or still too old."""
    if torchAvailable() and not torchTooOld():
        return True
    try:
        import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS PyTorch)
    except ModuleNotFoundError:
        raise RuntimeError(_("ISTN Registration needs the PyTorch extension: install 'PyTorch' from the Extensions "
                             "Manager, restart Slicer, then come back to this module")) from None
    outdated = installedTorchVersion()
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                          torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        return False
    if outdated is not None:
        # the old torch stays loaded in this session: the new one is used after a restart
        raise RuntimeError(_("PyTorch was updated from {old}; restart Slicer to use the new version").format(
            old=outdated))
    return not torchTooOld()


def slicerConstraints() -> list[str]:
    """``name==version`` of Slicer's own packages as installed: pip may resolve around them, never replace them."""
    pins = []
    for name in SLICER_OWN_PACKAGES:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:  # e.g. Slicer's vtk is not a pip distribution
            continue
    return pins


def _writeConstraintsFile() -> Path:
    handle = tempfile.NamedTemporaryFile("w", suffix="-istn-constraints.txt", delete=False, encoding="utf-8")
    with handle:
        handle.write("\n".join(slicerConstraints()) + "\n")
    return Path(handle.name)


def installRequirements(askConfirmation: bool = True) -> bool:
    """Install the lines of ``requirements.txt`` that are missing, through Slicer's installer."""
    import slicer

    missing = missingRequirements()
    if not missing:
        return True
    try:
        import slicer.packaging as packaging  # Slicer >= 5.12; not an attribute of `slicer` until imported
    except ImportError:
        packaging = None
    constraints = _writeConstraintsFile()
    try:
        if packaging is not None:
            packaging.pip_ensure(packaging.load_requirements(str(REQUIREMENTS_FILE)), constraints=str(constraints),
                                 prompt_install=askConfirmation, requester="ISTN Registration")
        else:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("ISTN Registration will install these Python packages: {packages}. Continue?").format(
                    packages=", ".join(missing))
            ):
                return False
            # one pip call, constrained so that Slicer's numpy, SimpleITK and vtk stay as they are
            slicer.util.pip_install([*missing, "-c", str(constraints)])
    finally:
        constraints.unlink(missing_ok=True)
    still = missingRequirements()
    if still:
        logging.error("ISTN Registration: still missing after installation: %s", ", ".join(still))
    return not still


def installDependencies(askConfirmation: bool = True) -> bool:
    """torch (PyTorch extension), then ``requirements.txt``; True when everything is importable."""
    if not installTorch(askConfirmation):
        return False
    return installRequirements(askConfirmation) and not missingPackages()
