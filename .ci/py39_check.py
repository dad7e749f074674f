#!/usr/bin/env python3
"""Does the shipped Slicer module still run on an older Slicer's Python? Seconds, stdlib only, no torch.

    /root/.pyenv/versions/3.9.18/bin/python .ci/py39_check.py

Slicer 5.6 and 5.8 ship Python 3.9 (5.10 and later: 3.12). The extension's
minimum is Slicer 5.10 because the bundled models need torch >= 2.12, which
has no Python 3.9 wheels (docs/slicer.md); but Slicer imports every scripted
module at start-up, so on 5.6/5.8 the module must still load and say what is
wrong instead of failing with a SyntaxError. This script, run by the Python
to check:

1. byte-compiles every shipped .py (the module, ISTNRegistrationLib, the engine
   `istn`, the in-Slicer tests): syntax such as ``match``, parenthesised
   context managers or ``except*`` fails here;
2. imports what needs only the standard library, the module file with small
   stand-ins for Slicer's application-only parts (qt, vtk, slicer), and runs
   a few calls: runtime-only problems (``X | Y`` outside annotations,
   ``dataclass(slots=..., kw_only=...)``, newer stdlib functions) fail here.
   The parameter node's annotations are evaluated the way Slicer's
   parameterNodeWrapper does (``typing.get_type_hints``).

Modules that import numpy, SimpleITK, scipy, vtk's numpy bridge or torch at
load time are byte-compiled only (`COMPILED_ONLY`): this Python has none of
them, and inside Slicer they are imported only when a registration runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "ISTNRegistration"
#: Importable with the standard library alone (plus the stand-ins below).
IMPORTED = ("istn", "istn.errors", "istn.config", "istn.cli", "istn.commands", "istn.commands.apply",
            "istn.commands.evaluate", "istn.commands.register", "istn.commands.train", "istn.threads",
            "ISTNRegistrationLib", "ISTNRegistrationLib.i18n",
            "ISTNRegistrationLib.models", "ISTNRegistrationLib.dependencies", "ISTNRegistrationLib.sampledata",
            "ISTNRegistrationLib.logic")
#: Byte-compiled only, with what they import at load time that this Python lacks.
COMPILED_ONLY = {
    "ISTNRegistrationLib.nodes": "numpy, SimpleITK, vtk.util.numpy_support",
    "ISTNRegistrationLib.selftest": "numpy, SimpleITK",
    "istn.augment": "numpy, SimpleITK, torch", "istn.braindata": "numpy, SimpleITK, torch",
    "istn.data": "numpy, SimpleITK, torch", "istn.data.images": "numpy, SimpleITK, torch",
    "istn.data.pairs": "numpy, SimpleITK, torch", "istn.data.augment": "numpy, SimpleITK, torch",
    "istn.data.synthesis": "numpy, torch",
    # the brain recipe needs numpy and SimpleITK; its parent `istn.data` imports torch
    **{f"istn.data.brain{m}": "numpy, SimpleITK, torch" for m in (
        "", ".build", ".datasets", ".grids", ".label_transfer", ".labels", ".perturbation", ".sample", ".sources",
        ".tissue")},
    "istn.data.brain.__main__": "runs the command line",
    "istn.demo": "numpy, SimpleITK",
    "istn.distributed": "torch", "istn.export": "torch", "istn.figures": "numpy, SimpleITK",
    "istn.geometry": "numpy, SimpleITK", "istn.inputs": "numpy, SimpleITK", "istn.io": "numpy, SimpleITK",
    "istn.segfile": "numpy, SimpleITK", "istn.mgh": "numpy, SimpleITK",
    "istn.losses": "torch", "istn.inverse": "numpy, SimpleITK, scipy, torch",
    "istn.metrics": "numpy, SimpleITK, scipy", "istn.networks": "torch", "istn.registration": "numpy, SimpleITK, torch",
    "istn.refinement": "numpy, SimpleITK, torch", "istn.chain": "numpy, SimpleITK, torch",
    "istn.training": "torch", "istn.transforms": "numpy, SimpleITK, torch",
    "istn.__main__": "runs the command line",
}


def shipped_files() -> list[Path]:
    files = [MODULE_DIR / "ISTNRegistration.py"]
    for folder in ("ISTNRegistrationLib", "Testing/Python"):
        files += sorted((MODULE_DIR / folder).glob("*.py"))
    return files + sorted((MODULE_DIR / "istn").rglob("*.py"))  # the engine and its subpackages


def byte_compile(files: list[Path]) -> list[str]:
    errors = []
    for path in files:
        try:
            compile(path.read_text(encoding="utf-8"), str(path), "exec", dont_inherit=True)
        except SyntaxError as error:
            errors.append(f"{path.relative_to(REPO)}:{error.lineno}: {error.msg}")
    return errors


class _Anything(types.ModuleType):
    """A stand-in module: any attribute is a new class (vtkMRML* node types, qt.Qt, ...)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__getattr__": lambda self, n: None,
                                "__init__": lambda self, parent=None, *args: setattr(self, "parent", parent)})
        setattr(self, name, value)
        return value


def install_stand_ins() -> None:
    """Slicer's application-only modules (as much of them as importing the module file uses)."""
    for name in ("vtk", "qt", "slicer", "slicer.util", "slicer.ScriptedLoadableModule", "slicer.i18n",
                 "slicer.parameterNodeWrapper"):
        sys.modules[name] = _Anything(name)
    slicer = sys.modules["slicer"]
    slicer.util, slicer.i18n = sys.modules["slicer.util"], sys.modules["slicer.i18n"]
    slicer.app = types.SimpleNamespace(connect=lambda *args: None)
    sys.modules["slicer.i18n"].tr = lambda text: text
    sys.modules["slicer.i18n"].translate = lambda context, text: text
    wrapper = sys.modules["slicer.parameterNodeWrapper"]
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = lambda choices: ("Choice", tuple(choices))
    wrapper.WithinRange = lambda low, high: ("WithinRange", low, high)


def import_and_run() -> list[str]:
    errors = []
    sys.path.insert(0, str(MODULE_DIR))
    install_stand_ins()
    for name in IMPORTED:
        try:
            importlib.import_module(name)
        except Exception as error:  # report every module, not just the first
            errors.append(f"import {name}: {type(error).__name__}: {error}")
    if errors:
        return errors
    try:
        spec = importlib.util.spec_from_file_location("ISTNRegistration", MODULE_DIR / "ISTNRegistration.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["ISTNRegistration"] = module  # as Slicer imports it (get_type_hints looks it up)
        spec.loader.exec_module(module)
        # what Slicer's parameterNodeWrapper does with the annotations
        typing.get_type_hints(module.ISTNRegistrationParameterNode, include_extras=True)
        module.ISTNRegistration(types.SimpleNamespace())  # the module description

        lib = sys.modules["ISTNRegistrationLib"]
        models = lib.bundledModels()
        assert models and all(m.describe() for m in models), "bundled models not readable"
        assert "torch" in lib.dependencies.missingPackages()  # no torch here: the panel says what to install
        assert lib.dependencyMessage()
        assert lib.sampledata.sampleDataSourceArguments() is not None
        progress = lib.RegistrationProgress("affine", 1, 1, 3, 7, 0.25)
        assert str(progress) == "Affine refinement: iteration 3/7, loss 0.25"
        result = lib.ISTNRegistrationResult(transformType="affine", device="cpu")
        result.metrics = {"stages": [{"stage": "affine", "loss_one_pass": 0.5, "loss_final": 0.25, "iterations": 3,
                                      "iterations_requested": 7}]}
        assert "stopped early" in result.summary()
        config = sys.modules["istn.config"]
        config.train_config_from_dict(config.to_dict(config.TrainConfig()))
        sys.modules["istn.cli"].build_parser()
    except Exception as error:
        errors.append(f"running: {type(error).__name__}: {error}")
    return errors


def main() -> int:
    if importlib.util.find_spec("torch") is not None:  # the calls checked include the panel's "install torch"
        print(f"py39_check: {sys.executable} has torch; run this check with a Python without it (the pyenv 3.9 "
              "one, as .ci/run does): it checks the module as an older Slicer without the packages loads it",
              file=sys.stderr)
        return 2
    files = shipped_files()
    names = {".".join(p.relative_to(MODULE_DIR).with_suffix("").parts) for p in files}
    names = {n[:-len(".__init__")] if n.endswith(".__init__") else n for n in names}
    unaccounted = {n for n in names if n.split(".")[0] in ("istn", "ISTNRegistrationLib")} - set(IMPORTED) - set(
        COMPILED_ONLY)
    errors = [f"{n}: neither imported nor listed in COMPILED_ONLY" for n in sorted(unaccounted)]
    errors += byte_compile(files)
    if not errors:
        errors += import_and_run()
    version = ".".join(str(v) for v in sys.version_info[:3])
    for line in errors:
        print(f"Python {version}: {line}", file=sys.stderr)
    if not errors:
        print(f"Python {version}: {len(files)} files byte-compiled, {len(IMPORTED) + 1} modules imported and run")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
