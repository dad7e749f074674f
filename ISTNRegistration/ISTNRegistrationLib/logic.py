"""The registration logic on MRML nodes: what Apply does, callable from Slicer's Python console.

Example (Slicer's Python console)::

    from ISTNRegistrationLib import ISTNRegistrationLogic
    fixed = getNode("fixed_t1"); moving = getNode("moving_t1")
    result = ISTNRegistrationLogic().register(fixed, moving, transformType="bspline", iterations=50)
    print(result.summary())
    result.transformNode          # linear node (the affine), moving volume placed under the B-spline child
    result.bsplineTransformNode   # the B-spline, child of transformNode
    result.fixedMapNode, result.movingMapNode   # the ITN representations as volumes
    result.metrics                # losses, Dice per segment before/after, folding fraction

Geometry: the fixed volume is taken where it is displayed (its linear parent
transforms included), the moving volume in its own coordinates, because the
result is put between the two: Slicer's "transform from parent" of the output
maps fixed (world, RAS) points to moving points, which is what places the
moving volume onto the fixed one when it is put under the transform.

Nothing here imports Qt; torch is imported only when a registration runs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import numpy as np
import SimpleITK as sitk
import vtk

import slicer

from . import nodes as nodeio
from .dependencies import dependencyMessage, missingPackages
from .models import ModelInfo, bundledModels, defaultModel, readModelInfo

CancelFlag = Union[threading.Event, Callable[[], bool], None]

TRANSFORM_TYPES = ("affine", "bspline")
DEVICES = ("auto", "cpu", "cuda")
#: Node reference roles on the output (linear) transform node, so a second Apply reuses its nodes.
ROLE_BSPLINE = "ISTNRegistration.bspline"
ROLE_FIXED_MAP = "ISTNRegistration.fixedMap"
ROLE_MOVING_MAP = "ISTNRegistration.movingMap"
#: Colour tables for the ITN maps, best first (the file-based ones exist only in the application).
MAP_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeFileViridis.txt",
                      "vtkMRMLColorTableNodeIron")
#: Above this many voxels the folding fraction is computed on a coarser copy of the fixed grid.
FOLDING_MAX_VOXELS = 2_000_000


class RegistrationCancelled(Exception):
    """Raised inside the run to unwind a cancelled registration (never escapes `register`)."""


@dataclass
class RegistrationProgress:
    """What ``progressCallback`` receives: after each refinement iteration, and at each step."""

    stage: str  # "affine" | "bspline" | "outputs"
    stageIndex: int  # 1-based
    stageCount: int
    iteration: int  # 0 before the first refinement iteration
    iterations: int
    loss: float | None
    message: str = ""

    @property
    def fraction(self) -> float:
        """Overall progress in [0, 1]."""
        within = self.iteration / self.iterations if self.iterations else 1.0
        return min(1.0, ((self.stageIndex - 1) + within) / max(1, self.stageCount))

    def __str__(self) -> str:
        if self.message:
            return self.message
        name = {"affine": "Affine", "bspline": "B-spline"}.get(self.stage, self.stage)
        loss = f", loss {self.loss:.5g}" if self.loss is not None else ""
        return f"{name} refinement: iteration {self.iteration}/{self.iterations}{loss}"


@dataclass
class ISTNRegistrationResult:
    """What `ISTNRegistrationLogic.register` made. Node attributes are None after a cancelled run."""

    transformType: str
    cancelled: bool = False
    transformNode: object = None  # vtkMRMLLinearTransformNode (the affine; identity if none)
    bsplineTransformNode: object = None  # vtkMRMLBSplineTransformNode, child of transformNode
    fixedMapNode: object = None  # ITN(fixed) as a scalar volume
    movingMapNode: object = None  # ITN(moving), under the output transform (so it is displayed aligned)
    outputVolumeNode: object = None  # moving volume resampled onto the fixed grid, if asked for
    transform: sitk.Transform | None = None  # the final world transform (ITK, LPS, fixed -> moving points)
    metrics: dict = field(default_factory=dict)
    stages: list = field(default_factory=list)  # istn.registration.RegistrationResult of each stage
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    device: str = ""

    def summary(self) -> str:
        """A few lines for people (the panel shows them)."""
        if self.cancelled:
            return "Registration cancelled: the scene was left as it was before."
        kind = {"affine": "Affine", "bspline": "B-spline"}[self.transformType]
        lines = [f"{kind} registration done in {self.timings.get('total', 0.0):.1f} s on {self.device}."]
        for stage in self.metrics.get("stages", []):
            lines.append(f"{stage['stage']}: ITN map MSE {stage['loss_one_pass']:.4g} after one pass, "
                         f"{stage['loss_final']:.4g} after {stage['iterations']} refinement iterations.")
        dice = self.metrics.get("dice", {})
        if dice:
            parts = [f"{name} {v['before']:.3f} → {v['after']:.3f}" for name, v in dice.items()]
            lines.append("Dice before → after: " + "; ".join(parts) + ".")
        if self.metrics.get("folding_fraction") is not None:
            lines.append(f"Folding (Jacobian ≤ 0): {100.0 * self.metrics['folding_fraction']:.3f} % of voxels.")
        lines.extend(f"Warning: {w}" for w in self.warnings)
        return "\n".join(lines)


class _SceneChanges:
    """Every change a run makes to the scene, undone if the run fails or is cancelled."""

    def __init__(self, scene):
        self.scene = scene
        self.created: list = []
        self.undo: list[Callable[[], None]] = []

    def addNode(self, className: str, name: str):
        node = self.scene.AddNewNodeByClass(className, self.scene.GenerateUniqueName(name))
        self.created.append(node)
        return node

    def adopt(self, node):
        """A node created by a helper (e.g. `nodes.addVolumeNodeFromImage`), to remove on rollback."""
        self.created.append(node)
        return node

    def rememberParent(self, node) -> None:
        old = node.GetTransformNodeID()
        self.undo.append(lambda: node.SetAndObserveTransformNodeID(old))

    def rememberTransform(self, transformNode) -> None:
        if transformNode.IsLinear():
            matrix = vtk.vtkMatrix4x4()
            transformNode.GetMatrixTransformFromParent(matrix)
            self.undo.append(lambda: transformNode.SetMatrixTransformFromParent(matrix))
        else:
            # a run never edits a transform object it did not make, so the old object is intact
            saved = transformNode.GetTransformFromParent()
            self.undo.append(lambda: transformNode.SetAndObserveTransformFromParent(saved))

    def rememberReference(self, node, role: str) -> None:
        old = node.GetNodeReferenceID(role)
        self.undo.append(lambda: node.SetNodeReferenceID(role, old))

    def rollback(self) -> None:
        for undo in reversed(self.undo):
            try:
                undo()
            except Exception:  # keep undoing: a half-restored scene is worse
                logging.exception("ISTN Registration: could not undo a change")
        for node in reversed(self.created):
            self._remove(node)
        self.created, self.undo = [], []

    def _remove(self, node) -> None:
        if not self.scene.IsNodePresent(node):
            return
        extra = []
        if node.IsA("vtkMRMLDisplayableNode"):
            extra += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if node.IsA("vtkMRMLStorableNode"):
            extra += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
        self.scene.RemoveNode(node)
        for other in extra:
            if other is not None and self.scene.IsNodePresent(other):
                self.scene.RemoveNode(other)


class ISTNRegistrationLogic:
    """Structure-guided registration of two volume nodes with a trained ISTN model.

    Usable without the GUI (Slicer's Python console, scripts, tests). One
    instance caches the models it loaded; refinement never changes a cached
    model (the engine restores the trained weights after every run), so two
    runs on the same inputs give the same result.
    """

    def __init__(self, scene=None) -> None:
        self._scene = scene
        self._models: dict[tuple[str, float], object] = {}
        self._cancelEvent = threading.Event()

    # -- small helpers ----------------------------------------------------
    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    @staticmethod
    def availableModels() -> list[ModelInfo]:
        """The bundled 3D models (``Resources/Models/*.pt``), affine first."""
        return bundledModels()

    @staticmethod
    def modelInfo(path: str | Path) -> ModelInfo:
        """Metadata of a model file (raises `models.ModelInfoError` for a file that is not an ISTN model)."""
        return readModelInfo(path)

    def requestCancel(self) -> None:
        """Ask the running `register` to stop (it stops within one refinement iteration and undoes its changes)."""
        self._cancelEvent.set()

    def loadModel(self, path: str | Path):
        """`istn.export.LoadedModel` of ``path``, cached per file and modification time."""
        from istn.export import load_model

        p = Path(path).resolve()
        if not p.is_file():
            raise ValueError(f"model file '{p}' does not exist")
        key = (str(p), p.stat().st_mtime)
        if key not in self._models:
            self._models[key] = load_model(p)
        return self._models[key]

    # -- the registration ---------------------------------------------------
    def register(
        self,
        fixedVolumeNode,
        movingVolumeNode,
        transformType: str | None = None,
        iterations: int = 50,
        outputTransformNode=None,
        *,
        modelPath: str | Path | None = None,
        preAlign: bool = True,
        affineModelPath: str | Path | None = None,
        learningRate: float | None = None,
        liveUpdate: bool = True,
        outputVolumeNode=None,
        showMaps: bool = True,
        updateViews: bool = True,
        fixedSegmentationNode=None,
        movingSegmentationNode=None,
        device: str = "auto",
        seed: int | None = 0,
        threads: int | None = None,
        progressCallback: Callable[[RegistrationProgress], None] | None = None,
        cancel: CancelFlag = None,
    ) -> ISTNRegistrationResult:
        """Register ``movingVolumeNode`` to ``fixedVolumeNode``; returns an `ISTNRegistrationResult`.

        - ``transformType``: ``"affine"`` or ``"bspline"``; default: that of
          ``modelPath``, else ``"affine"``. Without ``modelPath`` the bundled
          model of that type is used.
        - B-spline: with ``preAlign`` an affine model (``affineModelPath`` or the
          bundled one) runs first; its result goes into ``outputTransformNode``
          (a linear node) and the B-spline into a child node of it.
        - ``iterations`` of test-time refinement per model (0: one pass only);
          ``learningRate`` None or <= 0 uses the model's own.
        - ``outputTransformNode``: a linear transform node, created if None.
          Without ``outputVolumeNode`` the moving volume is placed under the
          result; with it, the moving volume stays where it is and the output
          volume receives the moving image resampled onto the fixed grid.
        - ``fixedSegmentationNode`` / ``movingSegmentationNode``: segmentations
          or label maps; Dice per structure (matched by name, else by label
          value) before and after goes into ``result.metrics["dice"]``.
        - ``liveUpdate``: the transform nodes follow every refinement iteration.
        - ``device``: auto | cpu | cuda (a GPU out of memory falls back to the CPU
          with a warning); ``seed`` seeds torch (None: do not seed).
        - ``progressCallback(RegistrationProgress)``; ``cancel`` (an Event or a
          callable) or `requestCancel` stops the run: every change it made to the
          scene is undone and ``result.cancelled`` is True.

        Inputs are never modified, except that the moving volume's parent
        transform is set (when no output volume is asked for). A failed run
        raises and leaves the scene as it was.
        """
        started = time.perf_counter()
        self._cancelEvent.clear()
        scene = self.scene
        if scene is None:
            raise RuntimeError("no MRML scene: set slicer.mrmlScene or pass a scene to ISTNRegistrationLogic(scene)")

        # ---- check everything before touching the scene ------------------------
        self._checkInputs(fixedVolumeNode, movingVolumeNode, outputTransformNode, outputVolumeNode)
        iterations = int(iterations)
        if iterations < 0:
            raise ValueError(f"'iterations' must be >= 0, got {iterations}")
        device = {"gpu": "cuda"}.get(str(device).lower(), str(device).lower())
        if device not in DEVICES:
            raise ValueError(f"'device' must be one of {', '.join(DEVICES)}, got {device!r}")
        missing = missingPackages()
        if missing:
            raise RuntimeError(dependencyMessage(missing))
        stagesToRun = self._resolveModels(transformType, modelPath, preAlign, affineModelPath)
        transformType = stagesToRun[-1][0]
        warnings: list[str] = []
        if transformType == "bspline" and len(stagesToRun) == 1 and preAlign:
            warnings.append("no affine model is available for the pre-alignment: the B-spline starts from the identity")
        fixedStructures = nodeio.structuresFromNode(fixedSegmentationNode, world=True)
        movingStructures = nodeio.structuresFromNode(movingSegmentationNode, world=False)
        pairs = nodeio.matchStructures(fixedStructures, movingStructures)
        if fixedSegmentationNode is not None and movingSegmentationNode is not None and not pairs:
            raise ValueError(
                f"'{fixedSegmentationNode.GetName()}' and '{movingSegmentationNode.GetName()}' have no structure in "
                "common (segments are matched by name, else by label value)"
            )
        if (fixedSegmentationNode is None) != (movingSegmentationNode is None):
            warnings.append("Dice needs both a fixed and a moving segmentation: only one was given, no Dice computed")
            pairs = []
        fixedImage = nodeio.volumeNodeToImage(fixedVolumeNode, world=True)
        movingImage = nodeio.volumeNodeToImage(movingVolumeNode, world=False)

        models = [(kind, self.loadModel(path)) for kind, path in stagesToRun]
        if seed is not None:
            import torch

            torch.manual_seed(int(seed))

        from istn.registration import is_cancelled

        userCancel = cancel

        def cancelled() -> bool:
            return self._cancelEvent.is_set() or is_cancelled(userCancel)

        result = ISTNRegistrationResult(transformType=transformType, warnings=warnings)
        changes = _SceneChanges(scene)
        try:
            linearNode, bsplineNode, leafNode = self._prepareTransformNodes(
                changes, transformType, outputTransformNode, fixedVolumeNode, movingVolumeNode)
            bsplineWriter = nodeio.BSplineNodeWriter(bsplineNode) if bsplineNode is not None else None
            if outputVolumeNode is None:
                changes.rememberParent(movingVolumeNode)
                movingVolumeNode.SetAndObserveTransformNodeID(leafNode.GetID())
                if updateViews:
                    self._showInSliceViews(fixedVolumeNode, movingVolumeNode, 0.5)

            initial = None
            final = None
            for index, (kind, model) in enumerate(models, start=1):
                if cancelled():
                    raise RegistrationCancelled()
                stageResult = self._runStage(kind, model, index, len(models), fixedImage, movingImage, initial,
                                             iterations, learningRate, device, threads, liveUpdate,
                                             linearNode, bsplineWriter, progressCallback, cancelled)
                if stageResult.cancelled:
                    raise RegistrationCancelled()
                result.stages.append(stageResult)
                result.warnings.extend(w for w in stageResult.warnings if w not in result.warnings)
                initial = final = stageResult.transform
            self._writeTransform(final, linearNode, bsplineWriter)

            if progressCallback is not None:
                progressCallback(RegistrationProgress("outputs", len(models), len(models), iterations, iterations,
                                                      None, "Computing outputs and quality measures..."))
            last = result.stages[-1]
            result.metrics = self._metrics(result.stages, final, fixedImage, pairs, transformType)
            if cancelled():
                raise RegistrationCancelled()
            result.fixedMapNode, result.movingMapNode = self._writeMaps(
                changes, linearNode, leafNode, last, fixedVolumeNode, movingVolumeNode)
            if outputVolumeNode is not None:
                from istn.registration import warp_image

                warped = warp_image(movingImage, fixedImage, final)
                nodeio.updateVolumeNodeFromImage(outputVolumeNode, warped)
                outputVolumeNode.SetAndObserveTransformNodeID(None)
                if outputVolumeNode.GetDisplayNode() is None:
                    outputVolumeNode.CreateDefaultDisplayNodes()
                result.outputVolumeNode = outputVolumeNode
            if updateViews:
                foreground = result.movingMapNode if showMaps else (outputVolumeNode or movingVolumeNode)
                self._showInSliceViews(fixedVolumeNode, foreground, 0.5)
        except RegistrationCancelled:
            changes.rollback()
            return ISTNRegistrationResult(transformType=transformType, cancelled=True, warnings=result.warnings,
                                          timings={"total": time.perf_counter() - started})
        except BaseException:
            changes.rollback()
            raise

        result.transformNode = linearNode
        result.bsplineTransformNode = bsplineNode
        result.transform = final
        result.device = last.device
        result.timings = {"total": time.perf_counter() - started}
        for stage in result.stages:
            for key, value in stage.timings.items():
                result.timings[f"{stage.transform_type}_{key}"] = value
        return result

    # -- steps ----------------------------------------------------------------
    @staticmethod
    def _checkInputs(fixed, moving, outputTransform, outputVolume) -> None:
        for role, node in (("fixed", fixed), ("moving", moving)):
            if node is None:
                raise ValueError(f"no {role} volume selected")
            if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise ValueError(f"the {role} volume '{node.GetName()}' must be a scalar (grey-level) volume")
        if fixed is moving:
            raise ValueError("the fixed and moving volumes are the same node; pick two different volumes")
        if outputTransform is not None:
            if not outputTransform.IsA("vtkMRMLLinearTransformNode") or outputTransform.IsA("vtkMRMLBSplineTransformNode") \
                    or outputTransform.IsA("vtkMRMLGridTransformNode"):
                raise ValueError(
                    f"the output transform '{outputTransform.GetName()}' must be a linear transform node "
                    "(a B-spline result is written into a child node of it)")
            parent = fixed.GetParentTransformNode()
            while parent is not None:
                if parent is outputTransform:
                    raise ValueError(f"the fixed volume is under the output transform '{outputTransform.GetName()}'; "
                                     "pick another output transform or move the fixed volume out of it")
                parent = parent.GetParentTransformNode()
        if outputVolume is not None and (outputVolume is fixed or outputVolume is moving):
            raise ValueError("the output volume must not be one of the inputs: inputs are never overwritten")

    @staticmethod
    def _resolveModels(transformType, modelPath, preAlign, affineModelPath) -> list[tuple[str, Path]]:
        """``[(kind, path)]`` in the order they run."""
        if transformType is not None and transformType not in TRANSFORM_TYPES:
            raise ValueError(f"'transformType' must be 'affine' or 'bspline', got {transformType!r}")
        if modelPath:
            info = readModelInfo(modelPath)
            if info.ndim != 3:
                raise ValueError(f"model '{info.path.name}' is {info.ndim}D; Slicer volumes need a 3D model")
            if transformType is not None and info.transformType != transformType:
                raise ValueError(f"model '{info.path.name}' is a {info.transformType} model, not {transformType}")
            transformType = info.transformType
        else:
            transformType = transformType or "affine"
            info = defaultModel(transformType)
            if info is None:
                raise ValueError(
                    f"no bundled {transformType} model is installed (Resources/Models of the module); "
                    "choose a model file (.pt)")
        stages = [(transformType, info.path)]
        if transformType == "bspline" and preAlign:
            affine = readModelInfo(affineModelPath) if affineModelPath else defaultModel("affine")
            if affine is not None:
                if affine.transformType != "affine" or affine.ndim != 3:
                    raise ValueError(f"pre-alignment model '{affine.path.name}' is not a 3D affine model")
                stages.insert(0, ("affine", affine.path))
        return stages

    def _prepareTransformNodes(self, changes, transformType, outputNode, fixedNode, movingNode):
        """(linear node, B-spline node or None, leaf node); created or reused, their old content remembered."""
        if outputNode is None:
            name = f"{movingNode.GetName()} to {fixedNode.GetName()} (ISTN)"
            outputNode = changes.addNode("vtkMRMLLinearTransformNode", name)
        else:
            changes.rememberTransform(outputNode)
        nodeio.setLinearTransformFromParent(outputNode, np.eye(4))
        if transformType != "bspline":
            return outputNode, None, outputNode
        bspline = outputNode.GetNodeReference(ROLE_BSPLINE)
        if bspline is not None and bspline.IsA("vtkMRMLTransformNode") and self.scene.IsNodePresent(bspline):
            changes.rememberTransform(bspline)
            changes.rememberParent(bspline)
            bspline.SetAndObserveTransformFromParent(vtk.vtkTransform())  # identity until the B-spline stage
        else:
            bspline = changes.addNode("vtkMRMLBSplineTransformNode", f"{outputNode.GetName()} B-spline")
            # identity until the B-spline stage (its default B-spline has no coefficients yet)
            bspline.SetAndObserveTransformFromParent(vtk.vtkTransform())
            changes.rememberReference(outputNode, ROLE_BSPLINE)
            outputNode.SetNodeReferenceID(ROLE_BSPLINE, bspline.GetID())
        bspline.SetAndObserveTransformNodeID(outputNode.GetID())
        return outputNode, bspline, bspline

    def _runStage(self, kind, model, index, count, fixedImage, movingImage, initial, iterations, learningRate,
                  device, threads, liveUpdate, linearNode, bsplineWriter, progressCallback, cancelled):
        from istn.registration import register

        def callback(info) -> None:
            if liveUpdate:
                self._writeTransform(info.transform(), linearNode, bsplineWriter)
            if progressCallback is not None:
                progressCallback(RegistrationProgress(kind, index, count, info.iteration, info.iterations, info.loss))

        if progressCallback is not None:
            name = {"affine": "affine", "bspline": "B-spline"}[kind]
            progressCallback(RegistrationProgress(kind, index, count, 0, iterations, None,
                                                  f"Running the {name} model ({model.path.name})..."))
        lr = float(learningRate) if learningRate is not None and learningRate > 0 else None
        return register(fixedImage, movingImage, model, iterations=iterations, lr=lr, device=device,
                        initial_transform=initial, callback=callback, cancel=cancelled, threads=threads)

    @staticmethod
    def _writeTransform(transform: sitk.Transform, linearNode, bsplineWriter) -> None:
        linear, bspline = nodeio.splitComposite(transform)
        current = vtk.vtkMatrix4x4()
        linearNode.GetMatrixTransformFromParent(current)
        matrix = nodeio.lpsToRasMatrix(linear)
        if not np.array_equal(nodeio.arrayFromVtkMatrix(current), matrix):  # no redraw for an unchanged affine
            nodeio.setLinearTransformFromParent(linearNode, matrix)
        if bspline is not None:
            if bsplineWriter is None:
                raise RuntimeError("a B-spline result needs a B-spline transform node")
            bsplineWriter.write(bspline)

    @staticmethod
    def _metrics(stages, final, fixedImage, pairs, transformType) -> dict:
        from istn.metrics import dice, folding_fraction

        metrics: dict = {"stages": [
            {"stage": s.transform_type, "loss_one_pass": s.loss_one_pass, "loss_final": s.loss_final,
             "iterations": s.iterations, "losses": list(s.losses)} for s in stages]}
        metrics["loss_one_pass"] = stages[-1].loss_one_pass
        metrics["loss_final"] = stages[-1].loss_final
        if pairs:
            identity = sitk.Transform(3, sitk.sitkIdentity)
            reference = sitk.Image(fixedImage.GetSize(), sitk.sitkUInt8)
            reference.CopyInformation(fixedImage)

            def onFixedGrid(mask, transform):
                # a copy, not a view: the resampled image is a temporary
                return sitk.GetArrayFromImage(
                    sitk.Resample(mask, reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0

            metrics["dice"] = {}
            for f, m in pairs:
                target = onFixedGrid(f.mask, identity)
                metrics["dice"][f.name] = {
                    "before": dice(target, onFixedGrid(m.mask, identity)),
                    "after": dice(target, onFixedGrid(m.mask, final)),
                }
        metrics["folding_fraction"] = None
        if transformType == "bspline":
            metrics["folding_fraction"] = folding_fraction(final, _foldingGrid(fixedImage))
        return metrics

    def _writeMaps(self, changes, linearNode, leafNode, stage, fixedNode, movingNode):
        maps = []
        for role, image, source, parent in (
            (ROLE_FIXED_MAP, stage.fixed_map, fixedNode, None),
            (ROLE_MOVING_MAP, stage.moving_map, movingNode, leafNode),
        ):
            node = linearNode.GetNodeReference(role)
            if node is None or not self.scene.IsNodePresent(node) or not node.IsA("vtkMRMLScalarVolumeNode"):
                node = changes.adopt(nodeio.addVolumeNodeFromImage(self.scene, image, f"{source.GetName()} ITN map"))
                changes.rememberReference(linearNode, role)
                linearNode.SetNodeReferenceID(role, node.GetID())
            else:
                nodeio.updateVolumeNodeFromImage(node, image)
                if node.GetDisplayNode() is None:
                    node.CreateDefaultDisplayNodes()
            node.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)
            node.SetAttribute("ISTNRegistration.map", "fixed" if parent is None else "moving")
            self._styleMap(node, image)
            maps.append(node)
        return maps[0], maps[1]

    def _styleMap(self, node, image) -> None:
        display = node.GetDisplayNode()
        if display is None:
            return
        for colorId in MAP_COLOR_NODE_IDS:
            if self.scene.GetNodeByID(colorId) is not None:
                display.SetAndObserveColorNodeID(colorId)
                break
        high = float(np.max(sitk.GetArrayViewFromImage(image)))
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, high if high > 0 else 1.0)

    def _showInSliceViews(self, background, foreground, opacity: float) -> None:
        """Fixed volume as background, ``foreground`` over it, in every slice view of the scene."""
        scene = self.scene
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
            composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
            composite.SetForegroundOpacity(opacity)


def _foldingGrid(fixedImage: sitk.Image) -> sitk.Image:
    """The fixed grid, made coarser (same extent and direction) if it is very large."""
    size = np.asarray(fixedImage.GetSize(), dtype=float)
    factor = max(1.0, (size.prod() / FOLDING_MAX_VOXELS) ** (1.0 / 3.0))
    if factor <= 1.0:
        return fixedImage
    new_size = [max(4, int(s // factor)) for s in size]
    spacing = [sp * (s - 1) / max(1, n - 1) for sp, s, n in zip(fixedImage.GetSpacing(), size, new_size)]
    reference = sitk.Image(new_size, sitk.sitkUInt8)
    reference.SetOrigin(fixedImage.GetOrigin())
    reference.SetDirection(fixedImage.GetDirection())
    reference.SetSpacing(spacing)
    return reference
