"""The panel's glue code (ISTNRegistration.py) with stand-ins for Slicer's Qt layer.

Slicer's Qt widgets, ``slicer.ScriptedLoadableModule`` and the parameter node
wrapper exist only in the application. Here they are replaced by small
stand-ins, so the module file is really imported (class bodies, decorators,
annotations) and the widget's logic runs: model list, Apply enabling, Apply
turning into Cancel, progress, cancel, results and errors shown in the panel.
What the stand-ins cannot tell (real Qt behaviour) is left to the in-Slicer
self test.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML core) is not installed")

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "ISTNRegistration"
sys.path.insert(0, str(MODULE_DIR))


class FakeWidget:
    """Just enough of a Qt widget: properties as attributes, signals recorded, combo box items."""

    def __init__(self, name: str):
        self.objectName = name
        self.enabled, self.visible, self.text, self.toolTip = True, True, "", ""
        self.value, self.currentIndex, self.currentPath = 0, 0, ""
        self.connections = {}
        self.items: list[tuple[str, object]] = []

    def connect(self, signal, slot):
        self.connections[signal] = slot

    # QComboBox
    def blockSignals(self, flag):
        return False

    def clear(self):
        self.items.clear()

    def addItem(self, text, data=None):
        self.items.append((text, data))

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def itemData(self, index):
        return self.items[index][1] if 0 <= index < len(self.items) else None


@pytest.fixture
def module(monkeypatch):
    """ISTNRegistration.py imported with stand-ins for the application-only parts of Slicer."""
    sl = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    class ScriptedLoadableModuleTest:
        pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(sl, cls.__name__, cls)
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = lambda choices: ("Choice", tuple(choices))
    wrapper.WithinRange = lambda low, high: ("WithinRange", low, high)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    for name, stand_in in (("slicer.ScriptedLoadableModule", sl), ("slicer.parameterNodeWrapper", wrapper),
                           ("slicer.i18n", i18n)):
        monkeypatch.setitem(sys.modules, name, stand_in)
    events = []
    app = types.SimpleNamespace(connect=lambda *a: events.append(("connect", a)),
                                processEvents=lambda *a: events.append(("processEvents",)))
    monkeypatch.setattr(slicer, "app", app, raising=False)
    spec = importlib.util.spec_from_file_location("ISTNRegistration_under_test", MODULE_DIR / "ISTNRegistration.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.events = events
    return mod


def make_widget(module, logic):
    widget = module.ISTNRegistrationWidget(types.SimpleNamespace(isEntered=True))
    names = [w.get("name") for w in ET.parse(MODULE_DIR / "Resources/UI/ISTNRegistration.ui").getroot().iter("widget")]
    widget.ui = types.SimpleNamespace(**{n: FakeWidget(n) for n in names})
    widget.logic = logic
    widget._parameterNode = types.SimpleNamespace(
        fixedVolume=None, movingVolume=None, fixedSegmentation=None, movingSegmentation=None, modelChoice="",
        customModelPath=Path(), preAlign=True, iterations=7, learningRate=0.0, liveUpdate=True,
        outputTransform=None, outputVolume=None, showMaps=True, device="cpu", seed=-1)
    return widget


class FakeLogic:
    """Records the call the panel makes; ``behaviour`` decides what register does."""

    def __init__(self, behaviour):
        self.behaviour, self.calls, self.cancelled = behaviour, [], False

    def availableModels(self):
        return []

    def modelInfo(self, path):
        from ISTNRegistrationLib import readModelInfo

        return readModelInfo(path)

    def requestCancel(self):
        self.cancelled = True

    def register(self, fixed, moving, **kw):
        self.calls.append((fixed, moving, kw))
        return self.behaviour(kw)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from ISTNRegistrationLib import selftest

    return selftest.makeTinyModels(tmp_path_factory.mktemp("m"))["affine"]


def test_module_description(module):
    parent = types.SimpleNamespace()
    module.ISTNRegistration(parent)
    assert parent.title == "ISTN Registration" and parent.categories == ["Registration"]
    assert ("connect", ("startupCompleted()", module.registerSampleData)) in module.events


def test_parameter_node_fields(module):
    fields = module.ISTNRegistrationParameterNode.__annotations__
    assert {"fixedVolume", "movingVolume", "iterations", "learningRate", "liveUpdate", "outputTransform",
            "outputVolume", "showMaps", "device", "seed"} <= set(fields)


def test_apply_needs_inputs_and_a_model(module, model_file):
    widget = make_widget(module, FakeLogic(lambda kw: None))
    widget.populateModels()
    assert widget.ui.modelComboBox.items == [("Custom model file (.pt)...", module.CUSTOM_MODEL)]
    assert widget.ui.customModelPathLineEdit.visible  # no bundled model: the file picker shows
    widget._checkCanApply()
    assert not widget.ui.applyButton.enabled and "fixed and a moving" in widget.ui.applyButton.toolTip
    p = widget._parameterNode
    p.fixedVolume, p.movingVolume = object(), object()
    widget._checkCanApply()
    assert not widget.ui.applyButton.enabled and "model" in widget.ui.applyButton.toolTip
    widget.ui.customModelPathLineEdit.currentPath = str(model_file)
    widget.updateModelInfo()
    assert widget.ui.applyButton.enabled
    assert "affine 3D model" in widget.ui.modelInfoLabel.text
    assert not widget.ui.preAlignCheckBox.enabled  # pre-alignment is for B-spline models


def test_apply_turns_into_cancel_shows_progress_and_the_result(module, model_file):
    from ISTNRegistrationLib import ISTNRegistrationResult, RegistrationProgress

    seen = {}
    transform_node = object()

    def run(kw):
        progress = kw["progressCallback"]
        progress(RegistrationProgress("affine", 1, 1, 3, 7, 0.25))
        seen["button"] = widget.ui.applyButton.text
        seen["inputs enabled"] = widget.ui.inputsCollapsibleButton.enabled
        seen["progress"] = widget.ui.progressBar.value
        seen["status"] = widget.ui.statusLabel.text
        widget.onApplyButton()  # the user clicks Cancel
        result = ISTNRegistrationResult(transformType="affine", transformNode=transform_node, device="cpu")
        result.metrics = {"stages": []}
        return result

    logic = FakeLogic(run)
    widget = make_widget(module, logic)
    p = widget._parameterNode
    p.fixedVolume, p.movingVolume = object(), object()
    widget.populateModels()
    widget.ui.customModelPathLineEdit.currentPath = str(model_file)
    widget.onApplyButton()
    fixed, moving, kw = logic.calls[0]
    assert (fixed, moving) == (p.fixedVolume, p.movingVolume)
    assert kw["iterations"] == 7 and kw["modelPath"] == Path(model_file) and kw["device"] == "cpu"
    assert kw["seed"] is None and kw["learningRate"] is None  # "none" and "model default"
    assert seen == {"button": "Cancel", "inputs enabled": False, "progress": round(1000 * 3 / 7),
                    "status": "Affine refinement: iteration 3/7, loss 0.25"}
    assert ("processEvents",) in module.events
    assert logic.cancelled
    assert widget.ui.applyButton.text == "Apply" and widget.ui.inputsCollapsibleButton.enabled
    assert "Affine registration done" in widget.ui.resultsLabel.text
    assert p.outputTransform is transform_node  # the created transform is selected for the next Apply


def test_errors_are_shown_in_the_panel(module, model_file, caplog):
    def fail(kw):
        raise ValueError("the fixed volume '<x>' is empty")

    widget = make_widget(module, FakeLogic(fail))
    p = widget._parameterNode
    p.fixedVolume, p.movingVolume = object(), object()
    widget.populateModels()
    widget.ui.customModelPathLineEdit.currentPath = str(model_file)
    widget.onApplyButton()
    text = widget.ui.resultsLabel.text
    assert "Registration failed: the fixed volume '&lt;x&gt;' is empty" in text and "#c00" in text
    assert "ISTN Registration failed" in caplog.text  # logged with its traceback too
    assert widget.ui.applyButton.text == "Apply"
