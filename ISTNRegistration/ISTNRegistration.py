"""ISTN Registration: structure-guided deep-learning registration (Lee et al., MICCAI 2019) in 3D Slicer.

This file is the thin Slicer face of the module: the module description, the
panel (widget + parameter node) and the self test. Everything the module does
lives in ``ISTNRegistrationLib`` (no Qt) and the engine ``istn``; from Slicer's
Python console::

    import ISTNRegistration
    logic = ISTNRegistration.ISTNRegistrationLogic()
    result = logic.register(getNode("fixed"), getNode("moving"), transformType="bspline")
    print(result.summary())
"""

import logging
import os
import pathlib
import sys
from html import escape
from typing import Annotated, Optional, Union

import qt
import vtk

import slicer
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLLinearTransformNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:  # ISTNRegistrationLib and the engine `istn` live next to this file
    sys.path.append(_MODULE_DIR)

# Slicer imports every scripted module at start-up: ISTNRegistrationLib imports neither numpy, SimpleITK,
# torch nor the engine until a registration runs (checked by Testing/test_slicer_widget.py).
import ISTNRegistrationLib  # noqa: E402
from ISTNRegistrationLib import dependencies, sampledata  # noqa: E402
from ISTNRegistrationLib.logic import ATTRIBUTE_FIXED, ATTRIBUTE_MOVING  # noqa: E402

CUSTOM_MODEL = "custom"  # modelChoice value of "a model file of my own"
#: Where the documentation lives (the repository placeholder: see .ci/set_repository_url.py).
DOCUMENTATION_URL = "https://github.com/istn-registration/SlicerISTNRegistration/blob/main/docs/slicer.md"


#
# ISTNRegistration
#


class ISTNRegistration(ScriptedLoadableModule):
    """Module description (Slicer's module list and help panel)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ISTN Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []  # torch comes from the PyTorch extension, checked when the panel opens
        self.parent.contributors = ["ISTN Registration maintainers (istn-registration)"]
        self.parent.helpText = _("""
Structure-guided image registration with Image-and-Spatial Transformer Networks (ISTNs).
Pick a fixed and a moving volume and click Apply: a trained network predicts an affine or
B-spline transform in one pass, then refines it on this pair (test-time refinement) while the
views follow. The learned structure maps (ITN maps) can be shown over the images. Optional
segmentations give Dice per structure before and after.
""") + _('See <a href="{url}">the documentation</a>.').format(url=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _("""
Method: M. C. H. Lee, O. Oktay, A. Schuh, M. Schaap, B. Glocker, "Image-and-Spatial Transformer
Networks for Structure-Guided Image Registration", MICCAI 2019. Module layout after the Slicer
scripted-module template (J.-C. Fillion-Robin, Kitware; S. Pieper, Isomics; A. Lasso, PerkLab).
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Add the bundled brain pair to the Sample Data module (if the files are installed)."""
    try:
        if not sampledata.registerSampleData():
            logging.info("ISTN Registration: sample pair not installed; nothing added to Sample Data")
    except Exception:  # a broken Sample Data registration must not break the module
        logging.exception("ISTN Registration: could not register the sample data")


#
# ISTNRegistrationParameterNode
#


@parameterNodeWrapper
class ISTNRegistrationParameterNode:
    """The panel's state, saved with the scene.

    Every field but ``modelChoice`` is bound to the widget whose
    ``SlicerParameterName`` property (in the .ui) has the field's name.
    ``modelChoice``: file name of a bundled model, or "custom" for ``customModelPath``;
    ``customModelPath``: the custom model file, "" for none (set by code: a
    ``pathlib.Path`` bound to the path widget would start as ".").
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: Optional[Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]
    movingSegmentation: Optional[Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]
    modelChoice: str = ""
    customModelPath: str = ""
    preAlign: bool = True
    iterations: Annotated[int, WithinRange(-1, 1000)] = -1  # < 0: the model's (chosen on validation)
    learningRate: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    bending: Annotated[float, WithinRange(-1.0, 1e6)] = -1.0  # < 0: the model's (chosen on validation)
    anchor: Annotated[float, WithinRange(-1.0, 1e3)] = -1.0  # < 0: the model's (chosen on validation)
    tolerance: Annotated[float, WithinRange(-1.0, 1.0)] = -1.0  # < 0: the model's
    coarseIterations: Annotated[int, WithinRange(-1, 1000)] = -1  # < 0: the model's (coarse to fine)
    refineLayers: Annotated[str, Choice(["model default", "all", "fc"])] = "model default"  # STN weights refined
    comparedRegion: Annotated[str, Choice(["model default", "whole grid"])] = "model default"  # where maps are compared
    polish: Annotated[int, WithinRange(-1, 1000)] = -1  # < 0: the model's (quasi-Newton evaluations at the end)
    passes: Annotated[int, WithinRange(0, 5)] = 0  # 0: each model's (refinement passes, every stage)
    biasCorrect: bool = False  # divide the working copies by their intensity bias (N4) first
    retryVaried: bool = True  # after a failed self-check: the varied-view models beside, the better result kept
    liveUpdate: bool = True
    outputTransform: Optional[vtkMRMLLinearTransformNode]
    outputVolume: Optional[vtkMRMLScalarVolumeNode]
    checkerboardVolume: Optional[vtkMRMLScalarVolumeNode]
    jacobianVolume: Optional[vtkMRMLScalarVolumeNode]
    atlasSegmentation: Optional[Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]  # fixed space -> moving
    showMaps: bool = True
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    seed: Annotated[int, WithinRange(-1, 2147483647)] = 0


#
# ISTNRegistrationWidget
#


class ISTNRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds the .ui to the parameter node and turns clicks into logic calls."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._closing = False  # the scene or the application is closing during a run
        self._busy = False  # a wait cursor is shown
        self._autoOutputTransform = None  # the output transform the panel selected after creating it

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ISTNRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ISTNRegistrationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.customModelPathLineEdit.connect("currentPathChanged(QString)", self.onCustomModelPathChanged)

        self.populateModels()
        self.updateDependencies()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._stopRun()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.updateDependencies()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self._stopRun()
        self.setParameterNode(None)

    def _stopRun(self) -> None:
        """Cancel a run in progress because the scene or the application closes.

        The run sits lower on this very call stack (this handler is reached from
        `slicer.app.processEvents` in `onProgress`), so it cannot be waited for
        here; instead no more events are processed once this returns, and the run
        unwinds at its next check, before anything else happens. The logic
        itself also stops on the scene's StartCloseEvent and touches nothing of
        the closed scene; the panel does not write into the old parameter node.
        """
        if self._running:
            self._closing = True
            self.logic.requestCancel()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node -------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.fixedVolume = first
        self.selectModel(self._parameterNode.modelChoice)
        self.ui.customModelPathLineEdit.currentPath = self._parameterNode.customModelPath

    def setParameterNode(self, inputParameterNode: Optional[ISTNRegistrationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._running:
            return
        p = self._parameterNode
        reason = ""
        if not p or not p.fixedVolume or not p.movingVolume:
            reason = _("Select a fixed and a moving volume.")
        elif p.fixedVolume == p.movingVolume:
            reason = _("The fixed and moving volumes must be different.")
        elif self.selectedModelPath() is None:
            custom = self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex) == CUSTOM_MODEL
            reason = (_("Choose the model file (.pt).") if custom
                      else _("Select a model (no bundled model is installed: choose a model file)."))
        elif dependencies.missingPackages():
            reason = _("Install the missing Python packages first.")
        self.ui.applyButton.enabled = not reason
        self.ui.applyButton.toolTip = reason or _("Register the moving volume to the fixed volume.")

    # -- models ------------------------------------------------------------------
    def populateModels(self) -> None:
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        combo.clear()
        for info in self.logic.availableModels():
            combo.addItem(info.label, info.path.name)
        combo.addItem(_("Custom model file (.pt)..."), CUSTOM_MODEL)
        combo.blockSignals(False)
        self.onModelChanged(combo.currentIndex)

    def selectModel(self, choice: str) -> None:
        combo = self.ui.modelComboBox
        index = combo.findData(choice) if choice else -1
        combo.currentIndex = index if index >= 0 else 0
        self.onModelChanged(combo.currentIndex)

    def onModelChanged(self, index) -> None:
        choice = self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex) or ""
        if self._parameterNode and self._parameterNode.modelChoice != choice:
            self._parameterNode.modelChoice = choice
        custom = choice == CUSTOM_MODEL
        self.ui.customModelPathLabel.visible = custom
        self.ui.customModelPathLineEdit.visible = custom
        self.updateModelInfo()

    def onCustomModelPathChanged(self, path: str) -> None:
        if self._parameterNode and self._parameterNode.customModelPath != path:
            self._parameterNode.customModelPath = path
        self.updateModelInfo()

    def selectedModelPath(self) -> Optional[pathlib.Path]:
        choice = self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex) or ""
        if choice == CUSTOM_MODEL:
            path = pathlib.Path(self.ui.customModelPathLineEdit.currentPath) if self.ui.customModelPathLineEdit.currentPath else None
            return path if path is not None and path.is_file() else None
        for info in self.logic.availableModels():
            if info.path.name == choice:
                return info.path
        return None

    def updateModelInfo(self, *args) -> None:
        path = self.selectedModelPath()
        if path is None:
            self.ui.modelInfoLabel.text = _("No model selected.")
            self.ui.preAlignCheckBox.enabled = False
        else:
            try:
                info = self.logic.modelInfo(path)
                self.ui.modelInfoLabel.text = info.describe()
                self.ui.modelInfoLabel.toolTip = info.card or ""
                self.ui.preAlignCheckBox.enabled = info.transformType == "bspline"
            except ISTNRegistrationLib.ModelInfoError as error:
                self.ui.modelInfoLabel.text = f"<span style='color:#c00'>{error}</span>"
                self.ui.preAlignCheckBox.enabled = False
        self._checkCanApply()

    # -- dependencies -------------------------------------------------------------
    def updateDependencies(self) -> None:
        message = dependencies.dependencyMessage()
        self.ui.dependenciesFrame.visible = bool(message)
        self.ui.dependenciesLabel.text = message
        self._checkCanApply()

    def onInstallDependencies(self) -> None:
        try:
            with slicer.util.tryWithErrorDisplay(_("Installing the Python packages failed."), waitCursor=True):
                dependencies.installDependencies(askConfirmation=True)
        finally:
            self.updateDependencies()

    # -- run ---------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._running:
            self.logic.requestCancel()
            self.ui.applyButton.enabled = False
            self.ui.statusLabel.text = _("Cancelling...")
            return
        p = self._parameterNode
        modelPath = self.selectedModelPath()
        output = p.outputTransform
        if output is not None and output is self._autoOutputTransform and (
                output.GetAttribute(ATTRIBUTE_MOVING) not in (None, p.movingVolume.GetID())
                or output.GetAttribute(ATTRIBUTE_FIXED) not in (None, p.fixedVolume.GetID())):
            # the panel picked this transform after registering another pair: another moving or fixed volume gets
            # a new transform, and the earlier result stays (a transform the user picked is checked by the logic)
            output = p.outputTransform = None
        self._setRunning(True)
        self.ui.resultsLabel.text = ""
        try:
            result = self.logic.register(
                p.fixedVolume, p.movingVolume,
                iterations=p.iterations if p.iterations >= 0 else None,
                outputTransformNode=output,
                modelPath=modelPath,
                preAlign=p.preAlign,
                learningRate=p.learningRate if p.learningRate > 0 else None,
                bending=p.bending if p.bending >= 0 else None,
                anchor=p.anchor if p.anchor >= 0 else None,
                tolerance=p.tolerance if p.tolerance >= 0 else None,
                coarseIterations=p.coarseIterations if p.coarseIterations >= 0 else None,
                refineLayers=p.refineLayers if p.refineLayers in ("all", "fc") else None,
                regionMargin=float("inf") if p.comparedRegion == "whole grid" else None,
                polish=p.polish if p.polish >= 0 else None,
                passes=p.passes if p.passes >= 1 else None,
                biasCorrect=p.biasCorrect,
                retryVaried=p.retryVaried,
                liveUpdate=p.liveUpdate,
                outputVolumeNode=p.outputVolume,
                checkerboardVolumeNode=p.checkerboardVolume,
                jacobianVolumeNode=p.jacobianVolume,
                showMaps=p.showMaps,
                fixedSegmentationNode=p.fixedSegmentation,
                movingSegmentationNode=p.movingSegmentation,
                atlasSegmentationNode=p.atlasSegmentation,
                device=p.device,
                seed=p.seed if p.seed >= 0 else None,
                progressCallback=self.onProgress,
            )
            if self._closing:  # the parameter node belongs to the closed scene
                return
            if not result.cancelled and output is None:
                p.outputTransform = self._autoOutputTransform = result.transformNode
            self._showMessage(result.summary(), warning=bool(result.warnings))
        except Exception as error:  # shown in the panel and logged with its traceback, never swallowed
            logging.exception("ISTN Registration failed")
            self._showMessage(_("Registration failed: {error}").format(error=error), error=True)
        finally:
            self._closing = False
            self._setRunning(False)

    def onProgress(self, progress) -> None:
        self.ui.progressBar.value = int(round(1000 * progress.fraction))
        self.ui.statusLabel.text = str(progress)
        self._setBusy(progress.busy)  # model load, one pass, outputs: nothing to report until they end
        if not self._closing:  # once closing, the run must unwind before any other event
            slicer.app.processEvents()  # views follow the live transform; Cancel is clickable; status painted

    def _setBusy(self, busy: bool) -> None:
        if busy == self._busy:
            return
        if busy:
            slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        else:
            slicer.app.restoreOverrideCursor()
        self._busy = busy

    def _setRunning(self, running: bool) -> None:
        self._running = running
        for section in (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton,
                        self.ui.refinementCollapsibleButton, self.ui.outputsCollapsibleButton,
                        self.ui.advancedCollapsibleButton):
            section.enabled = not running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = True
        self.ui.progressBar.value = 0
        if not running:
            self._setBusy(False)
            self.ui.statusLabel.text = ""
            self._checkCanApply()

    def _showMessage(self, text: str, error: bool = False, warning: bool = False) -> None:
        colour = "#c00" if error else ("#a60" if warning else "")
        html = escape(text, quote=False).replace("\n", "<br>")
        self.ui.resultsLabel.text = f"<span style='color:{colour}'>{html}</span>" if colour else html


#
# ISTNRegistrationLogic
#


class ISTNRegistrationLogic(ScriptedLoadableModuleLogic, ISTNRegistrationLib.ISTNRegistrationLogic):
    """The registration logic (see `ISTNRegistrationLib.logic`) plus the module's parameter node."""

    def __init__(self, scene=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        ISTNRegistrationLib.ISTNRegistrationLogic.__init__(self, scene)

    def getParameterNode(self):
        return ISTNRegistrationParameterNode(super().getParameterNode())


#
# ISTNRegistrationTest
#


class ISTNRegistrationTest(ScriptedLoadableModuleTest):
    """In-Slicer self test (runs inside Slicer only; CI runs the same checks headless on slicer-core)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def _skipWithoutDependencies(self) -> None:
        # slicer_add_python_unittest runs each test_* method on its own (not runTest): each one checks
        missing = dependencies.missingPackages()
        if missing:
            self.skipTest(f"needs {', '.join(missing)}, not installed in this Slicer")

    def runTest(self):
        self.setUp()
        self.test_ModuleImportsWithoutTorch()
        if dependencies.missingPackages():
            self.delayDisplay("torch or scipy missing: only the import test ran")
            return
        self.setUp()
        self.test_AffineAndBSplineGeometry()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()
        self.setUp()
        self.test_QualityVolumes()
        self.setUp()
        self.test_SampleData()
        self.setUp()
        self.test_WidgetApply()

    def test_ModuleImportsWithoutTorch(self):
        self.delayDisplay("Module and panel")
        self.assertIsNotNone(slicer.util.getModuleWidget("ISTNRegistration"))

    def _models(self):
        from ISTNRegistrationLib import selftest

        return selftest.makeTinyModels(pathlib.Path(slicer.app.temporaryPath) / "ISTNRegistrationTest")

    def test_AffineAndBSplineGeometry(self):
        self._skipWithoutDependencies()
        from ISTNRegistrationLib import selftest

        self.delayDisplay("Affine and B-spline on oblique anisotropic volumes")
        report = selftest.checkAffineAndBSpline(ISTNRegistrationLogic(), slicer.mrmlScene, self._models())
        self.delayDisplay(f"Slicer resampling vs engine (relative max difference): {report}")

    def test_CancelLeavesSceneUnchanged(self):
        self._skipWithoutDependencies()
        from ISTNRegistrationLib import selftest

        self.delayDisplay("Cancel during refinement")
        selftest.checkCancelLeavesSceneUnchanged(ISTNRegistrationLogic(), slicer.mrmlScene, self._models())

    def test_QualityVolumes(self):
        self._skipWithoutDependencies()
        from ISTNRegistrationLib import selftest

        self.delayDisplay("Checkerboard and Jacobian determinant volumes")
        selftest.checkQualityVolumes(ISTNRegistrationLogic(), slicer.mrmlScene, self._models())

    def test_SampleData(self):
        self._skipWithoutDependencies()
        if sampledata.sampleDataDirectory() is None:
            self.delayDisplay("Sample pair not installed: skipped")
            return
        self.delayDisplay("Sample pair through the Sample Data module")
        loaded = sampledata.loadSampleData()
        logic = ISTNRegistrationLogic()
        models = logic.availableModels()
        modelPath = models[0].path if models else self._models()["affine"]
        result = logic.register(loaded["fixed"], loaded["moving"], modelPath=modelPath, iterations=5,
                                fixedSegmentationNode=loaded["fixedLabels"],
                                movingSegmentationNode=loaded["movingLabels"],
                                atlasSegmentationNode=loaded["fixedLabels"])
        self.assertFalse(result.cancelled)
        self.assertIn("left caudate", result.metrics.get("dice", {}))  # segments loaded with structure names
        # the fixed labels as an atlas: on the moving volume, every structure there, under the moving's transform
        atlas = result.atlasSegmentationNode
        self.assertEqual(atlas.GetSegmentation().GetNumberOfSegments(), 8)
        self.assertTrue(all(ml > 0 for ml in result.metrics["atlas"]["volumes_ml"].values()))
        self.assertEqual(atlas.GetTransformNodeID(), loaded["moving"].GetTransformNodeID())
        self.delayDisplay(result.summary())

    def test_WidgetApply(self):
        self._skipWithoutDependencies()
        from ISTNRegistrationLib import selftest

        self.delayDisplay("Apply from the panel")
        fixedNode, movingNode = selftest.addObliquePair(slicer.mrmlScene)[:2]
        widget = slicer.util.getModuleWidget("ISTNRegistration")
        slicer.util.selectModule("ISTNRegistration")
        widget._parameterNode.fixedVolume = fixedNode
        widget._parameterNode.movingVolume = movingNode
        widget._parameterNode.iterations = 3
        widget._parameterNode.outputTransform = None
        widget.ui.modelComboBox.currentIndex = widget.ui.modelComboBox.findData(CUSTOM_MODEL)
        widget.ui.customModelPathLineEdit.currentPath = str(self._models()["affine"])
        self.assertTrue(widget.ui.applyButton.enabled)
        widget.onApplyButton()
        self.assertIsNotNone(widget._parameterNode.outputTransform)
        self.assertIs(movingNode.GetParentTransformNode(), widget._parameterNode.outputTransform)
        self.delayDisplay("Test passed")
