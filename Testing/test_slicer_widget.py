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
import unittest
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

    class ScriptedLoadableModuleTest(unittest.TestCase):  # as in Slicer
        def delayDisplay(self, message, msec=None):
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
    qt = types.ModuleType("qt")
    qt.Qt = types.SimpleNamespace(WaitCursor="WaitCursor")
    for name, stand_in in (("slicer.ScriptedLoadableModule", sl), ("slicer.parameterNodeWrapper", wrapper),
                           ("slicer.i18n", i18n), ("qt", qt)):
        monkeypatch.setitem(sys.modules, name, stand_in)
    events = []
    app = types.SimpleNamespace(connect=lambda *a: events.append(("connect", a)),
                                processEvents=lambda *a: events.append(("processEvents",)),
                                setOverrideCursor=lambda cursor: events.append(("cursor", cursor)),
                                restoreOverrideCursor=lambda: events.append(("cursor", None)))
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
        customModelPath="", preAlign=True, iterations=7, learningRate=0.0, bending=-1.0, anchor=-1.0, tolerance=-1.0, coarseIterations=-1,
        refineLayers="model default", comparedRegion="model default", polish=-1, passes=0, biasCorrect=False, retryVaried=True,
        liveUpdate=True,
        outputTransform=None, outputVolume=None, checkerboardVolume=None, jacobianVolume=None, atlasSegmentation=None,
        showMaps=True, device="cpu", seed=-1)
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
    assert {"fixedVolume", "movingVolume", "iterations", "learningRate", "bending", "anchor", "tolerance",
            "coarseIterations", "refineLayers", "comparedRegion", "polish", "passes", "biasCorrect", "retryVaried",
            "liveUpdate",
            "outputTransform", "outputVolume", "checkerboardVolume", "jacobianVolume", "atlasSegmentation", "showMaps",
            "device", "seed"} <= set(fields)


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
    # "Custom model file" chosen, no file yet: the tooltip asks for it (not that nothing is installed)
    assert not widget.ui.applyButton.enabled and widget.ui.applyButton.toolTip == "Choose the model file (.pt)."
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
    assert kw["bending"] is None and kw["tolerance"] is None  # "model default": the model's validated settings
    assert kw["anchor"] is None
    assert kw["coarseIterations"] is None and kw["refineLayers"] is None and kw["regionMargin"] is None
    assert kw["polish"] is None and kw["passes"] is None  # "model default"
    assert kw["retryVaried"] is True  # after a failed self-check, the varied-view models' try (checked by default)
    assert kw["biasCorrect"] is False  # N4 only when asked (raw scans with coil shading)
    assert kw["atlasSegmentationNode"] is None  # no atlas chosen
    assert seen == {"button": "Cancel", "inputs enabled": False, "progress": round(1000 * 3 / 7),
                    "status": "Affine refinement: iteration 3/7, loss 0.25"}
    assert ("processEvents",) in module.events
    assert logic.cancelled
    assert widget.ui.applyButton.text == "Apply" and widget.ui.inputsCollapsibleButton.enabled
    assert "Affine registration done" in widget.ui.resultsLabel.text
    assert p.outputTransform is transform_node  # the created transform is selected for the next Apply
    p.refineLayers, p.outputTransform = "fc", None  # the combo box's text reaches the logic as the engine's name
    p.comparedRegion = "whole grid"  # an infinite margin: the box is the whole grid
    p.polish = 0  # the spin box's 0: Adam only
    p.passes = 1  # one B-spline refinement, the paper's
    p.retryVaried = False  # the check box cleared
    p.atlasSegmentation = atlas = object()  # an atlas chosen in the Outputs section
    p.iterations = -1  # "model default"
    widget.onApplyButton()
    assert logic.calls[-1][2]["refineLayers"] == "fc" and logic.calls[-1][2]["regionMargin"] == float("inf")
    assert logic.calls[-1][2]["polish"] == 0 and logic.calls[-1][2]["iterations"] is None
    assert logic.calls[-1][2]["passes"] == 1 and logic.calls[-1][2]["retryVaried"] is False
    assert logic.calls[-1][2]["atlasSegmentationNode"] is atlas


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


class FakeNode:
    """A node for the panel: an ID and attributes (what the panel reads of volumes and transforms)."""

    def __init__(self, node_id: str):
        self.node_id, self.attributes = node_id, {}

    def GetID(self):
        return self.node_id

    def GetAttribute(self, name):
        return self.attributes.get(name)


def ready_widget(module, logic, model_file):
    widget = make_widget(module, logic)
    p = widget._parameterNode
    p.fixedVolume, p.movingVolume = FakeNode("fixed"), FakeNode("moving1")
    widget.populateModels()
    widget.ui.customModelPathLineEdit.currentPath = str(model_file)
    return widget


def done_result(transform_node=None, **metrics):
    from ISTNRegistrationLib import ISTNRegistrationResult

    result = ISTNRegistrationResult(transformType="affine", transformNode=transform_node, device="cpu")
    result.metrics = {"stages": [], **metrics}
    return result


def test_ctest_runs_each_test_method_and_those_needing_torch_skip_without_it(module, monkeypatch):
    """slicer_add_python_unittest -> runUnitTest -> loadTestsFromName: each test_* on its own, not runTest()."""
    monkeypatch.setattr(module.dependencies, "missingPackages", lambda: ["torch"])
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    names = [n for n in unittest.TestLoader().getTestCaseNames(module.ISTNRegistrationTest)
             if n != "test_ModuleImportsWithoutTorch"]  # the one that needs no torch (it needs the application)
    assert names == ["test_AffineAndBSplineGeometry", "test_CancelLeavesSceneUnchanged", "test_QualityVolumes",
                     "test_SampleData", "test_WidgetApply"]
    for name in names:
        outcome = unittest.TestResult()
        unittest.TestLoader().loadTestsFromName(name, module.ISTNRegistrationTest).run(outcome)
        assert [reason for _, reason in outcome.skipped] == ["needs torch, not installed in this Slicer"], name
        assert not outcome.errors and not outcome.failures, name


def test_custom_model_path_starts_empty(module):
    widget = make_widget(module, FakeLogic(lambda kw: None))
    assert module.ISTNRegistrationParameterNode.customModelPath == ""
    widget.onCustomModelPathChanged("/models/mine.pt")
    assert widget._parameterNode.customModelPath == "/models/mine.pt"


def test_closing_the_scene_during_a_run_cancels_it_and_leaves_the_old_parameter_node_alone(module, model_file):
    def run(kw):
        kw["progressCallback"](module.ISTNRegistrationLib.RegistrationProgress("affine", 1, 1, 1, 7, 0.5))
        widget.onSceneStartClose(None, None)  # File > Close Scene, reached through processEvents
        assert logic.cancelled
        kw["progressCallback"](module.ISTNRegistrationLib.RegistrationProgress("affine", 1, 1, 2, 7, 0.4))
        from ISTNRegistrationLib import ISTNRegistrationResult

        return ISTNRegistrationResult(transformType="affine", cancelled=True)

    logic = FakeLogic(run)
    widget = ready_widget(module, logic, model_file)
    old = widget._parameterNode
    module.events.clear()
    widget.setParameterNode = lambda node: setattr(widget, "_parameterNode", node)  # no GUI binding here
    widget.onApplyButton()
    # no events processed once closing: the run unwinds before anything else happens
    assert module.events.count(("processEvents",)) == 1
    assert old.outputTransform is None and widget._parameterNode is None
    assert widget.ui.applyButton.text == "Apply" and not widget._running and not widget._closing


def test_steps_without_progress_show_a_wait_cursor_and_their_status(module, model_file):
    from ISTNRegistrationLib import RegistrationProgress

    statuses = []

    def run(kw):
        for p in (RegistrationProgress("load", 1, 1, 0, 5, None, "Loading the model m.pt..."),
                  RegistrationProgress("affine", 1, 1, 0, 5, None, "Running the Affine model (m.pt)..."),
                  RegistrationProgress("affine", 1, 1, 1, 5, 0.3),
                  RegistrationProgress("outputs", 1, 1, 5, 5, None, "Computing outputs and quality measures...")):
            kw["progressCallback"](p)
            statuses.append(widget.ui.statusLabel.text)
        return done_result()

    widget = ready_widget(module, FakeLogic(run), model_file)
    module.events.clear()
    widget.onApplyButton()
    cursor = [e[1] for e in module.events if e[0] == "cursor"]
    assert cursor == ["WaitCursor", None, "WaitCursor", None]  # on for load + one pass, off while refining, ...
    assert statuses == ["Loading the model m.pt...", "Running the Affine model (m.pt)...",
                        "Affine refinement: iteration 1/5, loss 0.3", "Computing outputs and quality measures..."]
    assert widget.ui.statusLabel.text == "" and not widget._busy  # ... and off at the end


def test_results_show_iterations_actually_run_and_engine_warnings(module, model_file):
    def run(kw):
        result = done_result(stages=[{"stage": "affine", "loss_one_pass": 0.5, "loss_final": 0.25, "iterations": 12,
                                      "iterations_requested": 50}])
        result.warnings.append("GPU out of memory: the registration ran on the CPU instead")
        return result

    widget = ready_widget(module, FakeLogic(run), model_file)
    widget.onApplyButton()
    text = widget.ui.resultsLabel.text
    assert "after 12 refinement iterations (stopped early at convergence; 50 allowed)" in text
    assert "Warning: GPU out of memory: the registration ran on the CPU instead" in text
    assert "#a60" in text  # shown as a warning


def test_a_new_moving_volume_gets_a_new_transform_not_the_one_made_for_the_previous_volume(module, model_file):
    from ISTNRegistrationLib.logic import ATTRIBUTE_FIXED, ATTRIBUTE_MOVING

    made = FakeNode("transform1")

    def run(kw):
        made.attributes[ATTRIBUTE_MOVING] = widget._parameterNode.movingVolume.GetID()  # what the logic records
        made.attributes[ATTRIBUTE_FIXED] = widget._parameterNode.fixedVolume.GetID()
        return done_result(transform_node=made if kw["outputTransformNode"] is None else kw["outputTransformNode"])

    logic = FakeLogic(run)
    widget = ready_widget(module, logic, model_file)
    p = widget._parameterNode
    widget.onApplyButton()
    assert p.outputTransform is made and logic.calls[0][2]["outputTransformNode"] is None
    widget.onApplyButton()  # same moving volume: the same transform again (a second Apply)
    assert logic.calls[1][2]["outputTransformNode"] is made
    p.movingVolume = FakeNode("moving2")
    widget.onApplyButton()
    assert logic.calls[2][2]["outputTransformNode"] is None  # a new one, the first volume stays put
    # a transform the user picked is passed on as it is (the logic refuses it if it would move another volume)
    mine = FakeNode("mine")
    mine.attributes[ATTRIBUTE_MOVING] = "moving1"
    p.outputTransform = mine
    widget.onApplyButton()
    assert logic.calls[3][2]["outputTransformNode"] is mine
    # another fixed volume (same moving): a new transform too, the registration to the first fixed volume is kept
    p.outputTransform = widget._autoOutputTransform = made
    p.fixedVolume = FakeNode("fixed2")
    widget.onApplyButton()
    assert logic.calls[4][2]["outputTransformNode"] is None


def test_loading_the_module_imports_no_numpy_heavy_package(tmp_path):
    """Slicer imports every scripted module at start-up: SimpleITK, torch, scipy and the engine wait for a run."""
    import subprocess

    code = r"""
import sys, types
sys.path.insert(0, sys.argv[1])
import slicer
for name in ("slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", "slicer.i18n", "qt"):
    sys.modules[name] = types.ModuleType(name)
sl = sys.modules["slicer.ScriptedLoadableModule"]
for cls in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
            "ScriptedLoadableModuleTest"):
    setattr(sl, cls, type(cls, (), {}))
w = sys.modules["slicer.parameterNodeWrapper"]
w.parameterNodeWrapper, w.Choice, w.WithinRange = (lambda c: c), (lambda c: c), (lambda a, b: (a, b))
sys.modules["slicer.i18n"].tr = sys.modules["slicer.i18n"].translate = lambda *a: a[-1]
before = set(sys.modules)
import importlib.util
spec = importlib.util.spec_from_file_location("ISTNRegistration", sys.argv[1] + "/ISTNRegistration.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))
loaded = {m.split(".")[0] for m in set(sys.modules) - before}
print(sorted(loaded & {"SimpleITK", "torch", "istn", "scipy", "numpy"}))
"""
    out = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
