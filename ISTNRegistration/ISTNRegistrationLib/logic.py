"""The registration logic on MRML nodes: what Apply does, callable from Slicer's Python console.

Example (Slicer's Python console)::

    from ISTNRegistrationLib import ISTNRegistrationLogic
    fixed = getNode("ISTN fixed T1"); moving = getNode("ISTN moving T1")  # the module's Sample Data
    result = ISTNRegistrationLogic().register(fixed, moving, transformType="bspline")
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

Nothing here imports Qt; numpy, SimpleITK and torch are imported only when a registration runs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import vtk

import slicer

from .dependencies import dependencyMessage, missingPackages
from .i18n import _
from .models import ModelInfo, bundledModels, companionAffine, defaultModel, readModelInfo

# numpy, SimpleITK, `nodes` and the engine are imported where they are used:
# Slicer imports every scripted module at start-up, and this one should cost nothing then.

CancelFlag = Union[threading.Event, Callable[[], bool], None]

TRANSFORM_TYPES = ("affine", "bspline")
DEVICES = ("auto", "cpu", "cuda")
#: Node reference roles on the output (linear) transform node, so a second Apply reuses its nodes.
ROLE_BSPLINE = "ISTNRegistration.bspline"
ROLE_FIXED_MAP = "ISTNRegistration.fixedMap"
ROLE_MOVING_MAP = "ISTNRegistration.movingMap"
#: The name a map volume was last given by this module: a reused map is renamed only while it bears it.
MAP_NAME_ATTRIBUTE = "ISTNRegistration.mapName"
#: Colour tables for the ITN maps, best first (the file-based ones exist only in the application).
MAP_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeFileViridis.txt",
                      "vtkMRMLColorTableNodeIron")
#: Colour tables for the Jacobian volume, best first: blue-white-red (white at the window's centre, 1), then
#: blue-to-red ones (the file-based ones exist only in the application).
JACOBIAN_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileDivergingBlueRed.txt",
                           "vtkMRMLColorTableNodeFileColdToHotRainbow.txt", "vtkMRMLColorTableNodeRainbow")
#: Above this many voxels the folding fraction is computed on a coarser copy of the fixed grid.
FOLDING_MAX_VOXELS = 2_000_000
#: Attribute on an output transform node: the ID of the moving volume its last run registered.
ATTRIBUTE_MOVING = "ISTNRegistration.movingVolumeID"
#: On the output transform node: the fixed volume of its run (the panel gives another fixed volume a new node)
ATTRIBUTE_FIXED = "ISTNRegistration.fixedVolumeID"
#: On the output transform node: where the run started (the moving volume's placement under a transform of the
#: user's, 16 numbers, row-major RAS to-world matrix) and that transform's name, so that a second Apply, with the
#: volume now under the result, starts there again rather than from the volume's own geometry
ATTRIBUTE_START = "ISTNRegistration.startToWorld"
ATTRIBUTE_START_NAME = "ISTNRegistration.startedFrom"
#: On an atlas output segmentation: the IDs of the atlas it was made from and of the output transform of its run
#: (a second Apply of that atlas into that transform updates it; another atlas or transform gets a node of its own)
ATTRIBUTE_ATLAS = "ISTNRegistration.atlasID"
ATTRIBUTE_ATLAS_TRANSFORM = "ISTNRegistration.outputTransformID"
STAGE_NAMES = {"affine": "Affine", "bspline": "B-spline"}


class RegistrationCancelled(Exception):
    """Raised inside the run to unwind a cancelled registration (never escapes `register`)."""


@dataclass
class RegistrationProgress:
    """What ``progressCallback`` receives: after each refinement iteration, and at each step."""

    stage: str  # "load" | "affine" | "bspline" | "outputs"
    stageIndex: int  # 1-based
    stageCount: int
    iteration: int  # 0 before the first refinement iteration
    iterations: int
    loss: float | None
    message: str = ""
    passNumber: int = 1  # B-spline refinement pass (each compares a new look of the network: its own loss scale)
    passes: int = 1

    @property
    def busy(self) -> bool:
        """A step that reports nothing until it is done (model load, one pass, outputs): show a wait cursor."""
        return bool(self.message)

    @property
    def fraction(self) -> float:
        """Overall progress in [0, 1]."""
        within = self.iteration / self.iterations if self.iterations else 1.0
        return min(1.0, ((self.stageIndex - 1) + within) / max(1, self.stageCount))

    def __str__(self) -> str:
        if self.message:
            return self.message
        text = _("{stage} refinement: iteration {iteration}/{iterations}").format(
            stage=STAGE_NAMES.get(self.stage, self.stage), iteration=self.iteration, iterations=self.iterations)
        if self.passes > 1:
            text += _(" (pass {number}/{passes})").format(number=self.passNumber, passes=self.passes)
        if self.loss is not None:
            text += _(", loss {loss:.5g}").format(loss=self.loss)
        return text


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
    checkerboardVolumeNode: object = None  # fixed and resampled moving in alternating cubes, if asked for
    jacobianVolumeNode: object = None  # Jacobian determinant of the result on the fixed grid, if asked for
    atlasSegmentationNode: object = None  # the atlas (fixed space) on the moving volume's grid, if asked for
    transform: object = None  # SimpleITK transform: the final world transform (LPS, fixed -> moving points)
    metrics: dict = field(default_factory=dict)
    stages: list = field(default_factory=list)  # istn.registration.RegistrationResult of each stage
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    device: str = ""
    hint: str = ""  # after a failed self-check: models beside the ones used that were made for such inputs
    retry: object = None  # istn.chain.Retry: after a failed self-check, the varied-view models' try and the choice
    startedFrom: str = ""  # the user's transform the moving volume was under: registration started from it

    def summary(self) -> str:
        """A few lines for people (the panel shows them)."""
        if self.cancelled:
            lines = [_("Registration cancelled: the scene was left as it was before.")]
            lines.extend(_("Warning: {warning}").format(warning=w) for w in self.warnings)
            return "\n".join(lines)
        lines = [_("{kind} registration done in {seconds:.1f} s on {device}.").format(
            kind=STAGE_NAMES[self.transformType], seconds=self.timings.get("total", 0.0), device=self.device)]
        if self.startedFrom:
            lines.append(_("Started from the moving volume's placement under '{name}' (now replaced by the "
                           "result, which includes it).").format(name=self.startedFrom))
        for stage in self.metrics.get("stages", []):
            values = dict(stage=STAGE_NAMES.get(stage["stage"], stage["stage"]), onePass=stage["loss_one_pass"],
                          final=stage["loss_final"], iterations=stage["iterations"],
                          requested=stage.get("iterations_requested", stage["iterations"]),
                          polish=stage.get("polish_iterations", 0))
            # an STN-u/s model compares the images as the network takes them (it has no ITN maps)
            values["compared"] = _("ITN map MSE") if stage.get("itn", True) else _("image MSE")
            if values["iterations"] < values["requested"]:  # refinement converged before the last iteration
                line = _("{stage}: {compared} {onePass:.4g} after one pass, {final:.4g} after {iterations} "
                         "refinement iterations (stopped early at convergence; {requested} allowed).")
            else:
                line = _("{stage}: {compared} {onePass:.4g} after one pass, {final:.4g} after {iterations} "
                         "refinement iterations.")
            if values["polish"]:
                line += " " + _("The last {polish} polished the transform itself.")
            info = stage.get("mutual_information") or {}
            if info:  # a measure of the images themselves, whatever the model: registration should raise it
                line += " " + _("Images' mutual information {given:.3f} as given, {result:.3f} registered.")
                values.update(given=info["as_given"], result=info["result"])
            lines.append(line.format(**values))
        dice = self.metrics.get("dice", {})
        if dice:
            parts = "; ".join(_("{name} {before:.3f} → {after:.3f}").format(name=name, before=v["before"],
                                                                             after=v["after"])
                              for name, v in dice.items())
            lines.append(_("Dice before → after: {parts}.").format(parts=parts))
        if self.metrics.get("folding_fraction") is not None:
            lines.append(_("Folding (Jacobian ≤ 0): {percent:.3f} % of voxels.").format(
                percent=100.0 * self.metrics["folding_fraction"]))
        jacobian = self.metrics.get("jacobian")
        if jacobian:
            lines.append(_("Jacobian determinant (local volume change, moving / fixed): {p1:.3f} to {p99:.3f} "
                           "(1st to 99th percentile), median {median:.3f}.").format(**jacobian))
        atlas = self.metrics.get("atlas")
        if atlas:
            volumes = atlas["volumes_ml"]
            shown = "; ".join(_("{name} {ml:.2f}").format(name=name, ml=ml) for name, ml in list(volumes.items())[:20])
            if len(volumes) > 20:
                shown += _("; ... ({count} more in the segmentation)").format(count=len(volumes) - 20)
            lines.append(_("Atlas on the moving volume: '{name}', {count} segments, {total:.1f} ml in all; ml per "
                           "segment: {shown}.").format(name=atlas["output"], count=len(volumes),
                                                       total=sum(volumes.values()), shown=shown))
        lines.extend(_("Warning: {warning}").format(warning=w) for w in self.warnings)
        if self.hint:
            lines.append(_("Hint: {hint}").format(hint=self.hint))
        return "\n".join(lines)


def variedViewsHint(stages: list) -> str:
    """After a failed self-check of models trained on plain T1 heads only: the models beside them trained on
    other contrasts and cropped fields of view (`istn.config.varied_models_beside`), as panel choices ('' if none).
    ``stages``: `istn.registration.RegistrationResult` of each stage run."""
    from istn.chain import retry_models

    if not all(s.model_path for s in stages):
        return ""
    picks = retry_models(stages, lambda p: readModelInfo(p).meta)
    if not picks:
        return ""
    return _("{models} (beside the models used) were trained on other contrasts and cropped fields of view; for a "
             "T2 or PD image or a partial head, choose {choice}.").format(
        models=", ".join(p.name for p in picks), choice=readModelInfo(picks[-1]).label)


class _SceneChanges:
    """Every change a run makes to the scene, undone if the run fails or is cancelled."""

    def __init__(self, scene):
        self.scene = scene
        self.created: list = []
        self.undo: list[Callable[[], None]] = []
        self.sceneClosed = False  # set when the scene closes mid-run: then nothing of it may be touched

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

    def rememberName(self, node) -> None:
        old = node.GetName()
        self.undo.append(lambda: node.SetName(old))

    def rememberAttribute(self, node, name: str) -> None:
        old = node.GetAttribute(name)
        self.undo.append(lambda: node.SetAttribute(name, old) if old is not None else node.RemoveAttribute(name))

    def rememberVolume(self, volumeNode) -> None:
        """A volume node's voxels, geometry, parent transform and window/level, put back on rollback (an output
        volume the user chose may hold an earlier result: a run that fails after writing it must not lose it)."""
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        old = volumeNode.GetImageData()
        saved = None
        if old is not None:  # a copy: writing the new voxels may reuse the node's image data object
            saved = vtk.vtkImageData()
            saved.DeepCopy(old)
        display = volumeNode.GetDisplayNode()
        window = None if display is None else (display.GetAutoWindowLevel(), display.GetWindow(), display.GetLevel())

        def restore() -> None:
            volumeNode.SetIJKToRASMatrix(matrix)
            volumeNode.SetAndObserveImageData(saved)
            shown = volumeNode.GetDisplayNode()
            if window is not None and shown is display:
                display.SetWindowLevel(window[1], window[2])
                display.SetAutoWindowLevel(window[0])

        self.undo.append(restore)
        self.rememberParent(volumeNode)

    def rememberSegmentation(self, segmentationNode) -> None:
        """An atlas output's segments (voxels, names, colours, order; IDs and display settings where the run kept
        them: it updates segments by name), reference geometry and parent transform, put back on rollback. (Read
        as label layers: vtkSegmentation.DeepCopy needs the application's data object factory.)"""
        from istn.segfile import REFERENCE_GEOMETRY

        from . import nodes as nodeio

        content = segmentationNode.GetSegmentation()
        geometry = content.GetConversionParameter(REFERENCE_GEOMETRY)
        layers = (nodeio.labelLayersFromNode(segmentationNode, allowEmpty=True)
                  if content.GetNumberOfSegments() else [])

        def restore() -> None:
            nodeio.setSegmentsFromLayers(segmentationNode, layers)
            segmentationNode.GetSegmentation().SetConversionParameter(REFERENCE_GEOMETRY, geometry)

        self.undo.append(restore)
        self.rememberParent(segmentationNode)

    def rememberViews(self) -> None:
        """The layers of every slice view, put back on cancel (the run shows its own)."""
        saved = []
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = self.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            saved.append((composite, composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID(),
                          composite.GetForegroundOpacity()))

        def restore() -> None:
            for composite, background, foreground, opacity in saved:
                composite.SetBackgroundVolumeID(background)
                composite.SetForegroundVolumeID(foreground)
                composite.SetForegroundOpacity(opacity)

        self.undo.append(restore)

    def rollback(self) -> None:
        if self.sceneClosed:
            # the scene was cleared under the run: its nodes are gone and the IDs it remembered may now
            # name nodes of the next scene, so nothing is restored or removed
            self.created, self.undo = [], []
            return
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
        self._running = False
        self._sceneClosed = False

    @property
    def running(self) -> bool:
        """True while `register` runs (a progress callback may ask: a run cannot start inside another)."""
        return self._running

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
        if p.is_dir():
            raise ValueError(_("'{path}' is a folder; choose a model file (.pt) in it").format(path=p))
        if not p.is_file():
            raise ValueError(_("model file '{path}' does not exist").format(path=p))
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
        iterations: int | None = None,
        outputTransformNode=None,
        *,
        modelPath: str | Path | None = None,
        preAlign: bool = True,
        affineModelPath: str | Path | None = None,
        learningRate: float | None = None,
        bending: float | None = None,
        anchor: float | None = None,
        tolerance: float | None = None,
        coarseIterations: int | None = None,
        refineLayers: str | None = None,
        regionMargin: float | None = None,
        polish: int | None = None,
        passes: int | None = None,
        biasCorrect: bool = False,
        retryVaried: bool = True,
        liveUpdate: bool = True,
        outputVolumeNode=None,
        checkerboardVolumeNode=None,
        jacobianVolumeNode=None,
        showMaps: bool = True,
        updateViews: bool = True,
        fixedSegmentationNode=None,
        movingSegmentationNode=None,
        atlasSegmentationNode=None,
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
        - B-spline: with ``preAlign`` an affine model (``affineModelPath``, else
          the affine of the B-spline's own family next to it, ``X-bspline.pt``
          -> ``X-affine.pt``, else the bundled default) runs first; its result goes into ``outputTransformNode``
          (a linear node) and the B-spline into a child node of it.
        - ``iterations`` of test-time refinement per model (0: one pass only;
          None: each model's own number, chosen on its validation pairs);
          ``learningRate`` None or <= 0 uses the model's own; ``bending`` (B-spline
          stage, mm^2), ``anchor`` (B-spline stage, mm^-2: holds the B-spline
          at the affine's result away from the structures) and ``tolerance`` (stop refining when the loss gains
          less than this over 10 iterations) None or < 0 use the model's
          settings, chosen on its validation pairs; so does ``coarseIterations``
          (the first iterations on half-resolution maps, coarse to fine; 0: off)
          and ``refineLayers`` ("all" STN weights, the paper, or "fc": only its
          fully connected layers, a cheaper iteration; None: the model's) and
          ``regionMargin`` (mm: the maps compared in the box around the fixed
          structures grown by this, ``float("inf")``: the whole grid; None: the
          model's; the panel's "Compared region": model default or whole grid)
          and ``polish`` (iterations after the refinement that polish the
          transform's parameters themselves, Gauss-Newton for an affine,
          L-BFGS for a B-spline, so that the result does not depend on where
          the network's refinement stopped; None or < 0: the model's; 0: off)
          and ``passes`` (every stage: refinements, each after the network's
          new look at the moving image through the result so far, an affine
          composed with it, a B-spline still one B-spline in the end; None or
          < 1: each model's; 1: one, the paper).
        - ``biasCorrect``: both volumes' working copies divided by their smooth
          intensity bias (N4, `istn.data.bias_corrected`) before the network
          sees them: raw scans with coil shading; the outputs are resampled
          from the volumes as they are.
        - ``retryVaried``: when a stage's self-check fails and the models' folder
          holds models trained on varied views (brain-synth beside brain-t1),
          register again with those and keep the result whose images end the
          more alike (`istn.chain`; ``result.retry`` says what was tried and
          kept); without it, ``result.hint`` names them. When the result kept
          still fails a check, the moving head's 24 turns by right angles are
          searched and the chain run again from the best (`istn.chain.turned_chain`;
          its first stage's ``turned`` and warnings say so); not without it.
        - ``outputTransformNode``: a linear transform node, created if None.
          Without ``outputVolumeNode`` the moving volume is placed under the
          result; with it, the moving volume stays where it is and the output
          volume receives the moving image resampled onto the fixed grid.
        - ``checkerboardVolumeNode``: receives the fixed image and the moving image
          through the result in alternating 20 mm cubes (world coordinates, each
          image in its own window, values in [0, 1]; `istn.figures.checkerboard_image`):
          edges that run on across the cubes show a registration that fits.
        - ``jacobianVolumeNode``: receives the Jacobian determinant of the result on
          the fixed grid (`istn.registration.jacobian_image`: the local volume
          change, above 1 where the moving anatomy is larger, <= 0 where the map
          folds; one value everywhere for an affine), shown in a blue-white-red
          colour table centred on 1.
        - ``fixedSegmentationNode`` / ``movingSegmentationNode``: segmentations
          or label maps; Dice per structure (matched by name, else by label
          value) before and after goes into ``result.metrics["dice"]``.
        - ``atlasSegmentationNode``: a segmentation or label map of the FIXED
          space (drawn on the fixed volume or its template), brought onto the
          moving volume's own grid through the result's inverse (nearest
          neighbour; overlapping segments stay whole) as a segmentation that
          follows the moving volume (same parent transform): names and colours
          kept, its volumes (ml) in ``result.metrics["atlas"]`` and the summary.
          A second Apply of the same atlas reuses that node.
        - ``liveUpdate``: the transform nodes follow every refinement iteration.
        - ``device``: auto | cpu | cuda (a GPU out of memory falls back to the CPU
          with a warning); ``seed`` seeds torch (None: do not seed).
        - ``progressCallback(RegistrationProgress)``; ``cancel`` (an Event or a
          callable) or `requestCancel` stops the run: every change it made to the
          scene is undone and ``result.cancelled`` is True.

        Inputs are never modified, except that the moving volume's parent
        transform is set (when no output volume is asked for). A moving volume
        under a linear transform of the user's is registered from where it is
        shown (`preAlignment`: the result includes that transform and replaces
        it above the volume); under a non-linear one it is refused. A failed
        run raises and leaves the scene as it was.
        """
        scene = self.scene
        if scene is None:
            raise RuntimeError(_("no MRML scene: set slicer.mrmlScene or pass a scene to ISTNRegistrationLogic(scene)"))
        if self._running:
            raise RuntimeError(_("a registration is already running; cancel it or wait until it ends"))
        self._cancelEvent.clear()
        self._sceneClosed = False

        def onSceneClose(caller, event) -> None:
            # File > Close Scene (or quitting) while the panel's progress callback processes events:
            # stop at the next check and touch nothing of that scene again
            self._sceneClosed = True
            self._cancelEvent.set()

        closeObserver = scene.AddObserver(scene.StartCloseEvent, onSceneClose)
        # the run's nodes (inputs, outputs) while it runs: one the user removes meanwhile (the Data module stays
        # usable while the panel processes events) stops the run, which then fails saying so, its changes undone
        watched: list = []
        removed: list[str] = []

        def onNodeRemoved(caller, event) -> None:
            if removed or self._sceneClosed:
                return
            gone = [n for n in watched if n is not None and not scene.IsNodePresent(n)]
            if gone:
                removed.append(gone[0].GetName())
                self._cancelEvent.set()

        removeObserver = scene.AddObserver(scene.NodeRemovedEvent, onNodeRemoved)
        self._running = True
        stack = contextlib.ExitStack()
        try:
            started = time.perf_counter()
            from . import nodes as nodeio

            scene = self.scene
            # ---- check everything before touching the scene ------------------------
            self._checkInputs(fixedVolumeNode, movingVolumeNode, outputTransformNode, outputVolumeNode,
                              checkerboardVolumeNode, jacobianVolumeNode,
                              segmentations=(fixedSegmentationNode, movingSegmentationNode, atlasSegmentationNode),
                              fixedSegmentation=fixedSegmentationNode)
            _checkNumbers(iterations=iterations, coarseIterations=coarseIterations, polish=polish, passes=passes,
                          learningRate=learningRate, bending=bending, anchor=anchor, tolerance=tolerance,
                          regionMargin=regionMargin)
            if iterations is not None:
                iterations = int(iterations)
                if iterations < 0:
                    raise ValueError(_("'iterations' must be >= 0, got {iterations}").format(iterations=iterations))
            shown = iterations if iterations is not None else 1  # the busy steps' progress: 0 of this
            device = {"gpu": "cuda"}.get(str(device).lower(), str(device).lower())
            if device not in DEVICES:
                raise ValueError(_("'device' must be one of {choices}, got '{device}'").format(
                    choices=", ".join(DEVICES), device=device))
            missing = missingPackages()
            if missing:
                raise RuntimeError(dependencyMessage(missing))
            stagesToRun = self._resolveModels(transformType, modelPath, preAlign, affineModelPath)
            transformType = stagesToRun[-1][0]
            warnings: list[str] = []
            if transformType == "bspline" and len(stagesToRun) == 1 and preAlign:
                warnings.append(_("no affine model is available for the pre-alignment: the B-spline starts from the "
                                  "identity"))
            fixedStructures = nodeio.structuresFromNode(fixedSegmentationNode, world=True)
            # where the registration starts from (the user's placement of the moving volume): read first, as the
            # moving segmentation is scored where the volume's voxels see it
            start, startName, startToWorld = preAlignment(movingVolumeNode)
            movingStructures = nodeio.structuresFromNode(
                movingSegmentationNode, placement=_segmentationPlacement(movingSegmentationNode, movingVolumeNode,
                                                                         startToWorld))
            pairs, notes = nodeio.matchStructures(fixedStructures, movingStructures)
            if fixedSegmentationNode is not None and movingSegmentationNode is not None and not pairs:
                raise ValueError(_("'{fixed}' and '{moving}' have no structure in common (segments are matched by name, "
                                   "else by label value where each value stands for one segment on each side); give "
                                   "the segments the same names").format(fixed=fixedSegmentationNode.GetName(),
                                                                        moving=movingSegmentationNode.GetName()))
            warnings.extend(notes)
            if outputTransformNode is not None and not _isModuleOutput(outputTransformNode):
                # a transform of the user's chosen as output: whatever lies under it moves with the result
                # (the output volumes are taken out of every transform: they do not move with it)
                along = [n.GetName() for n in _nodesUnder(scene, outputTransformNode)
                         if not any(n is o for o in (movingVolumeNode, outputVolumeNode, checkerboardVolumeNode,
                                                     jacobianVolumeNode))]
                if along:
                    warnings.append(_("{nodes} under the output transform '{name}' moved with the result (it "
                                      "replaced that transform's matrix)").format(
                                          nodes=", ".join(f"'{n}'" for n in along), name=outputTransformNode.GetName()))
            # a moving segmentation that lies with the volume under the user's transform stays there: said after
            userParent = movingVolumeNode.GetParentTransformNode()
            # read (and refused if unusable) before anything runs
            atlasLayers = None
            if atlasSegmentationNode is not None:
                if any(atlasSegmentationNode is node for node in (outputVolumeNode, checkerboardVolumeNode,
                                                                  jacobianVolumeNode, movingVolumeNode)):
                    raise ValueError(_("the atlas '{name}' cannot also be the moving volume or an output volume; "
                                       "it is only read").format(name=atlasSegmentationNode.GetName()))
                atlasLayers = nodeio.labelLayersFromNode(atlasSegmentationNode, world=True)
            if (fixedSegmentationNode is None) != (movingSegmentationNode is None):
                warnings.append(_("Dice needs both a fixed and a moving segmentation: only one was given, no Dice "
                                  "computed"))
                pairs = []
            fixedImage = nodeio.volumeNodeToImage(fixedVolumeNode, world=True)
            movingImage = nodeio.volumeNodeToImage(movingVolumeNode, world=False)
            lr = float(learningRate) if learningRate is not None and learningRate > 0 else None
            refineOptions = {"lr": lr,
                             "bending": float(bending) if bending is not None and bending >= 0 else None,
                             "anchor": float(anchor) if anchor is not None and anchor >= 0 else None,
                             "tolerance": float(tolerance) if tolerance is not None and tolerance >= 0 else None,
                             # passed as given (a fraction or a bool is refused by the engine's check)
                             "coarse_iterations": (coarseIterations if coarseIterations is not None
                                                   and not coarseIterations < 0 else None),
                             "refine_layers": refineLayers or None,
                             "region_margin_mm": regionMargin,
                             "polish": polish if polish is not None and not polish < 0 else None,
                             "passes": passes if passes is not None and not passes < 1 else None,
                             "bias_correct": bool(biasCorrect)}

            from istn.refinement import is_cancelled

            models = []
            for kind, path in stagesToRun:
                if progressCallback is not None:  # loading is silent: the panel shows a wait cursor meanwhile
                    progressCallback(RegistrationProgress("load", 1, len(stagesToRun), 0, shown, None,
                                                          _("Loading the model {name}...").format(name=Path(path).name)))
                models.append((kind, self.loadModel(path)))
            from istn.registration import check_register_inputs

            # the engine's own checks (chain order, dimensions, numbers, device) before anything runs
            check_register_inputs(fixedImage, movingImage, [m for _, m in models], iterations=iterations,
                                  device=device, initial_transform=start,
                                  initial_name=_("the moving volume's transform '{name}'").format(
                                      name=startName) if startName is not None else "the initial transform",
                                  **refineOptions)
            # refinement draws no random numbers today; seeding in a fork keeps Slicer's global RNG as it was
            stack.enter_context(_seededTorch(seed, device))

            userCancel = cancel

            def cancelled() -> bool:
                return self._cancelEvent.is_set() or self._sceneClosed or is_cancelled(userCancel)

            result = ISTNRegistrationResult(transformType=transformType, warnings=warnings)
            changes = _SceneChanges(scene)
            watched.extend([fixedVolumeNode, movingVolumeNode, outputTransformNode, outputVolumeNode,
                            checkerboardVolumeNode, jacobianVolumeNode, atlasSegmentationNode])

            def undo() -> None:
                watched.clear()  # first: the rollback removes the run's own new nodes, no user's removal
                changes.sceneClosed = self._sceneClosed
                changes.rollback()
            try:
                if cancelled():  # e.g. the scene closed while a model was loading
                    raise RegistrationCancelled()
                if updateViews:
                    changes.rememberViews()
                linearNode, bsplineNode, leafNode, staleBSpline = self._prepareTransformNodes(
                    changes, transformType, outputTransformNode, fixedVolumeNode, movingVolumeNode,
                    (startToWorld, startName))
                watched.extend([linearNode, bsplineNode])
                bsplineWriter = nodeio.BSplineNodeWriter(bsplineNode) if bsplineNode is not None else None
                if outputVolumeNode is None:
                    changes.rememberParent(movingVolumeNode)
                    movingVolumeNode.SetAndObserveTransformNodeID(leafNode.GetID())
                    if updateViews:
                        self._showInSliceViews(fixedVolumeNode, movingVolumeNode, 0.5)

                from istn.chain import register_with_second_try

                def sayAgain(message: str, stages: int) -> None:
                    """A chain runs again (the second try, the turned head): its own B-spline from the identity."""
                    if bsplineNode is not None:  # identity until that chain's B-spline stage (live views)
                        bsplineNode.SetAndObserveTransformFromParent(vtk.vtkTransform())
                    if progressCallback is not None:
                        progressCallback(RegistrationProgress("load", 1, stages, 0, shown, None, message))

                def sayRetry(paths) -> None:
                    sayAgain(_("A self-check failed: registering again with {models}...").format(
                        models=", ".join(p.name for p in paths)), len(paths))

                def sayTurns(count) -> None:
                    sayAgain(_("A self-check failed: looking for how the moving head lies ({count} turns)...").format(
                        count=count), len(models))

                stages, result.retry = register_with_second_try(
                    fixedImage, movingImage, [m for _, m in models], retry=retryVaried,
                    read_meta=lambda p: readModelInfo(p).meta, load=self.loadModel, on_retry=sayRetry,
                    turns=retryVaried, on_turns=sayTurns,
                    callback_for=self._stageCallbacks(len(models), iterations, liveUpdate, linearNode, bsplineWriter,
                                                      progressCallback, cancelled),
                    device=device, iterations=iterations, cancel=cancelled, threads=threads, initial_transform=start,
                    **refineOptions)
                if cancelled() or stages[-1].cancelled:
                    raise RegistrationCancelled()
                if result.retry is not None:
                    result.warnings.append(result.retry.note())
                for stageResult in stages:  # which stage each is from (both stages may say the same)
                    stage = STAGE_NAMES.get(stageResult.transform_type, stageResult.transform_type)
                    model = Path(stageResult.model_path).name if stageResult.model_path else "?"
                    for w in stageResult.warnings:  # one format call: a model named 'brain{v2}.pt' is text
                        line = _("{stage} ({model}): {warning}").format(stage=stage, model=model, warning=w)
                        if line not in result.warnings:
                            result.warnings.append(line)
                result.stages = stages
                final = stages[-1].transform
                self._writeTransform(final, linearNode, bsplineWriter)

                if progressCallback is not None:
                    progressCallback(RegistrationProgress("outputs", len(models), len(models), shown, shown,
                                                          None, _("Computing outputs and quality measures...")))
                last = result.stages[-1]
                result.metrics = self._metrics(result.stages, final, fixedImage, pairs, transformType, start)
                if startName is not None:
                    result.startedFrom = startName
                if result.retry is not None:
                    result.metrics["retry"] = result.retry.summary()
                if cancelled():
                    raise RegistrationCancelled()
                result.fixedMapNode, result.movingMapNode = self._writeMaps(
                    changes, linearNode, leafNode, last, fixedVolumeNode, movingVolumeNode)
                from istn.registration import OUTPUT_FIELD_SPACING_MM

                outputs = []  # (node, image): computed first, then written
                if outputVolumeNode is not None or checkerboardVolumeNode is not None:
                    from istn.registration import warp_image

                    warped = warp_image(movingImage, fixedImage, final, field_spacing=OUTPUT_FIELD_SPACING_MM)
                    if outputVolumeNode is not None:
                        outputs.append((outputVolumeNode, warped))
                        result.outputVolumeNode = outputVolumeNode
                    if checkerboardVolumeNode is not None:
                        from istn.figures import checkerboard_image

                        outputs.append((checkerboardVolumeNode, checkerboard_image(fixedImage, warped)))
                        result.checkerboardVolumeNode = checkerboardVolumeNode
                if jacobianVolumeNode is not None:
                    import SimpleITK as sitk

                    from istn.metrics import jacobian_statistics
                    from istn.registration import jacobian_image

                    jacobian = jacobian_image(final, fixedImage, OUTPUT_FIELD_SPACING_MM)
                    result.metrics["jacobian"] = jacobian_statistics(sitk.GetArrayViewFromImage(jacobian))
                    outputs.append((jacobianVolumeNode, jacobian))
                    result.jacobianVolumeNode = jacobianVolumeNode
                atlasOnMoving = None
                if atlasLayers is not None:
                    atlasOnMoving = self._atlasOnMoving(atlasLayers, movingImage, final, result)
                for node, image in outputs:
                    changes.rememberVolume(node)
                    nodeio.updateVolumeNodeFromImage(node, image)
                    node.SetAndObserveTransformNodeID(None)
                    if node.GetDisplayNode() is None:
                        node.CreateDefaultDisplayNodes()
                if atlasOnMoving is not None:
                    result.atlasSegmentationNode = self._writeAtlas(
                        changes, atlasOnMoving, linearNode, atlasSegmentationNode, movingVolumeNode,
                        [fixedSegmentationNode, movingSegmentationNode])
                    result.metrics["atlas"]["output"] = result.atlasSegmentationNode.GetName()
                if checkerboardVolumeNode is not None:  # [0, 1] by construction: show it as it is
                    display = checkerboardVolumeNode.GetDisplayNode()
                    display.AutoWindowLevelOff()
                    display.SetWindowLevel(1.0, 0.5)
                if jacobianVolumeNode is not None:  # white at 1 (no change), wide enough for the 1st..99th percentile
                    from istn.metrics import jacobian_half_width

                    display = jacobianVolumeNode.GetDisplayNode()
                    self._useColors(display, JACOBIAN_COLOR_NODE_IDS)
                    display.AutoWindowLevelOff()
                    stats = result.metrics["jacobian"]
                    display.SetWindowLevel(2.0 * jacobian_half_width(stats["p1"], stats["p99"]), 1.0)
                if updateViews:  # a checkerboard asked for is what to look at: the background, maps over it
                    foreground = result.movingMapNode if showMaps else (
                        None if checkerboardVolumeNode is not None else (outputVolumeNode or movingVolumeNode))
                    self._showInSliceViews(checkerboardVolumeNode or fixedVolumeNode, foreground, 0.5)
                if cancelled():
                    raise RegistrationCancelled()
            except RegistrationCancelled:
                undo()
                if removed:
                    raise RuntimeError(_("'{name}' was removed from the scene during the registration: the run was "
                                         "stopped and its changes to the scene undone").format(name=removed[0]))
                return ISTNRegistrationResult(transformType=transformType, cancelled=True, warnings=result.warnings,
                                              timings={"total": time.perf_counter() - started})
            except BaseException as exc:
                undo()
                named = _volumeNamed(exc, fixedVolumeNode, movingVolumeNode)
                if named is not None:
                    raise named from exc
                raise
            watched.clear()
            if staleBSpline is not None:
                self._dropStaleBSpline(linearNode, staleBSpline)
            for node in _atlasOutputs(scene, linearNode):
                # an atlas an earlier run into this output made, not made again now: it keeps that result's shape
                if node is not result.atlasSegmentationNode:
                    result.warnings.append(_("'{name}' was made by an earlier run into '{transform}' and not made "
                                             "again by this one: it keeps the earlier result's shape; choose its "
                                             "atlas again to update it, or delete it").format(
                                                 name=node.GetName(), transform=linearNode.GetName()))
            if (movingSegmentationNode is not None and outputVolumeNode is None and userParent is not None
                    and userParent is not linearNode and not _isModuleOutput(userParent)
                    and movingSegmentationNode.GetParentTransformNode() is userParent):
                result.warnings.append(_("the moving segmentation '{segmentation}' stays under '{parent}', so it no "
                                         "longer lies on '{moving}' (now under the result '{result}'): put it under "
                                         "'{result}' to see it registered").format(
                                             segmentation=movingSegmentationNode.GetName(), parent=userParent.GetName(),
                                             moving=movingVolumeNode.GetName(), result=leafNode.GetName()))

            # with the second try on, the varied models beside were tried already (or there are none)
            result.hint = variedViewsHint(result.stages) if not retryVaried else ""
            result.transformNode = linearNode
            result.bsplineTransformNode = bsplineNode
            result.transform = final
            result.device = last.device
            result.timings = {"total": time.perf_counter() - started}
            for stage in result.stages:
                for key, value in stage.timings.items():
                    result.timings[f"{stage.transform_type}_{key}"] = value
            return result
        finally:
            stack.close()
            self._running = False
            scene.RemoveObserver(closeObserver)
            scene.RemoveObserver(removeObserver)

    # -- steps ----------------------------------------------------------------
    @staticmethod
    def _checkInputs(fixed, moving, outputTransform, outputVolume, checkerboardVolume=None,
                     jacobianVolume=None, segmentations=(), fixedSegmentation=None) -> None:
        for node in (fixed, moving, outputTransform, outputVolume, checkerboardVolume, jacobianVolume, *segmentations):
            if node is not None and not callable(getattr(node, "IsA", None)):  # a script passing a node's name
                raise ValueError(_("nodes are given as MRML nodes (e.g. slicer.util.getNode('name')), got {kind} "
                                   "{value!r}").format(kind=type(node).__name__, value=node))
        for role, node in (("fixed", fixed), ("moving", moving)):
            if node is None:
                raise ValueError(_("no {role} volume selected").format(role=role))
            if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise ValueError(_("the {role} volume '{name}' must be a scalar (grey-level) volume").format(
                    role=role, name=node.GetName()))
            image = node.GetImageData()
            if image is not None and sorted(image.GetDimensions())[1] == 1:  # a line or a point: no slice either
                raise ValueError(_("the {role} volume '{name}' has {size} voxels: a 3D volume of at least 4 voxels "
                                   "per axis is needed").format(role=role, name=node.GetName(), size=" x ".join(
                                       map(str, image.GetDimensions()))))
            if image is not None and 1 in image.GetDimensions():
                raise ValueError(_("the {role} volume '{name}' is a single slice: this module registers 3D volumes "
                                   "with 3D models; register 2D images with the command line (istn register) and a "
                                   "2D model").format(role=role, name=node.GetName()))
            _checkFinite(role, node)
        if fixed is moving:
            raise ValueError(_("the fixed and moving volumes are the same node; pick two different volumes"))
        if outputTransform is not None:
            name = outputTransform.GetName()
            if not outputTransform.IsA("vtkMRMLLinearTransformNode") or outputTransform.IsA("vtkMRMLBSplineTransformNode") \
                    or outputTransform.IsA("vtkMRMLGridTransformNode"):
                raise ValueError(_("the output transform '{name}' must be a linear transform node (a B-spline result "
                                   "is written into a child node of it)").format(name=name))
            if _isUnder(fixed, outputTransform):
                raise ValueError(_("the fixed volume is under the output transform '{name}'; pick another output "
                                   "transform or move the fixed volume out of it").format(name=name))
            if fixedSegmentation is not None and _isUnder(fixedSegmentation, outputTransform):
                raise ValueError(_("the fixed segmentation '{segmentation}' is under the output transform '{name}', "
                                   "which the result replaces: it would move off the fixed volume; pick another "
                                   "output transform or move it out of that one").format(
                                       segmentation=fixedSegmentation.GetName(), name=name))
            parent = outputTransform.GetParentTransformNode()
            if parent is not None:
                # the result maps fixed WORLD points to moving points; under a parent it would be composed with it
                raise ValueError(_("the output transform '{name}' is itself under the transform '{parent}', which "
                                   "would misalign the result; pick a transform that is not under another one, or "
                                   "'Create new transform'").format(name=name, parent=parent.GetName()))
            previous = _previousMovingVolume(outputTransform)
            if previous is not None and previous is not moving and _isUnder(previous, outputTransform):
                raise ValueError(_("the output transform '{name}' holds the registration of '{previous}', which is "
                                   "still under it and would move; pick 'Create new transform' (or another output "
                                   "transform) for '{moving}'").format(name=name, previous=previous.GetName(),
                                                                       moving=moving.GetName()))
        if outputVolume is not None and any(outputVolume is n for n in (fixed, moving, *segmentations)):
            raise ValueError(_("the output volume must not be one of the inputs: inputs are never overwritten"))
        taken = [fixed, moving, *segmentations, outputVolume]
        for what, node in ((_("checkerboard"), checkerboardVolume), (_("Jacobian"), jacobianVolume)):
            if node is not None and any(node is n for n in taken):
                raise ValueError(_("the {what} volume must be a volume of its own, not an input or another output "
                                   "volume: inputs are never overwritten").format(what=what))
            taken.append(node)
        # the maps this run writes into the output transform's map volumes: not also an output volume's content
        maps = [outputTransform.GetNodeReference(role) for role in (ROLE_FIXED_MAP, ROLE_MOVING_MAP)] \
            if outputTransform is not None else []
        for what, node in ((_("output"), outputVolume), (_("checkerboard"), checkerboardVolume),
                           (_("Jacobian"), jacobianVolume)):
            if node is None:
                continue
            if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise ValueError(_("the {what} volume '{name}' is a {kind}, which holds labels; pick a scalar volume "
                                   "or create a new one").format(what=what, name=node.GetName(),
                                                                 kind=node.GetClassName()))
            if any(node is m for m in maps if m is not None):
                raise ValueError(_("the {what} volume '{name}' is a structure map of the output transform '{transform}',"
                                   " which this run writes again; pick another volume or create a new one").format(
                                       what=what, name=node.GetName(), transform=outputTransform.GetName()))

    @staticmethod
    def _resolveModels(transformType, modelPath, preAlign, affineModelPath) -> list[tuple[str, Path]]:
        """``[(kind, path)]`` in the order they run."""
        if transformType is not None and transformType not in TRANSFORM_TYPES:
            raise ValueError(_("'transformType' must be 'affine' or 'bspline', got '{value}'").format(
                value=transformType))
        if modelPath:
            info = readModelInfo(modelPath)
            if info.ndim != 3:
                raise ValueError(_("model '{name}' is {ndim}D; Slicer volumes need a 3D model").format(
                    name=info.path.name, ndim=info.ndim))
            if transformType is not None and info.transformType != transformType:
                raise ValueError(_("model '{name}' gives {kind} transforms, but 'transformType' asks for {wanted}").format(
                    name=info.path.name, kind=info.transformType, wanted=transformType))
            transformType = info.transformType
        else:
            transformType = transformType or "affine"
            info = defaultModel(transformType)
            if info is None:
                raise ValueError(_("no bundled {kind} model is installed (Resources/Models of the module); choose "
                                   "a model file (.pt)").format(kind=transformType))
        stages = [(transformType, info.path)]
        if transformType == "bspline" and preAlign:
            # the chosen affine, else the B-spline's own family's (X-bspline -> X-affine), else the default one
            affine = (readModelInfo(affineModelPath) if affineModelPath
                      else companionAffine(info) or defaultModel("affine"))
            if affine is not None:
                if affine.transformType != "affine" or affine.ndim != 3:
                    raise ValueError(_("pre-alignment model '{name}' is not a 3D affine model").format(
                        name=affine.path.name))
                stages.insert(0, ("affine", affine.path))
        return stages

    def _prepareTransformNodes(self, changes, transformType, outputNode, fixedNode, movingNode, start=(None, None)):
        """(linear node, B-spline node or None, leaf node, an earlier B-spline child an affine run leaves behind or
        None); created or reused, their old content remembered.
        ``start``: (the RAS to-world matrix the run starts from, its transform's name), recorded on the output
        node for a second Apply (`preAlignment`); (None, None): the volume's own geometry."""
        if outputNode is None:
            name = _("{moving} to {fixed} (ISTN)").format(moving=movingNode.GetName(), fixed=fixedNode.GetName())
            outputNode = changes.addNode("vtkMRMLLinearTransformNode", name)
        else:
            changes.rememberTransform(outputNode)
            for attribute in (ATTRIBUTE_MOVING, ATTRIBUTE_FIXED, ATTRIBUTE_START, ATTRIBUTE_START_NAME):
                changes.rememberAttribute(outputNode, attribute)
        outputNode.SetAttribute(ATTRIBUTE_MOVING, movingNode.GetID())  # a later run for another volume is refused
        outputNode.SetAttribute(ATTRIBUTE_FIXED, fixedNode.GetID())  # the panel: another fixed volume, a new node
        toWorld, name = start
        if toWorld is None:
            outputNode.RemoveAttribute(ATTRIBUTE_START)
            outputNode.RemoveAttribute(ATTRIBUTE_START_NAME)
        else:
            outputNode.SetAttribute(ATTRIBUTE_START, " ".join(repr(float(v)) for v in toWorld.reshape(-1)))
            outputNode.SetAttribute(ATTRIBUTE_START_NAME, name or "")
        outputNode.SetMatrixTransformFromParent(vtk.vtkMatrix4x4())  # identity
        bspline = outputNode.GetNodeReference(ROLE_BSPLINE)
        if transformType != "bspline":
            # an earlier B-spline result's child is no longer part of the result: dropped once this run succeeds
            stale = bspline if bspline is not None and self.scene.IsNodePresent(bspline) else None
            return outputNode, None, outputNode, stale
        if bspline is not None and bspline.IsA("vtkMRMLTransformNode") and self.scene.IsNodePresent(bspline):
            changes.rememberTransform(bspline)
            changes.rememberParent(bspline)
            bspline.SetAndObserveTransformFromParent(vtk.vtkTransform())  # identity until the B-spline stage
        else:
            bspline = changes.addNode("vtkMRMLBSplineTransformNode",
                                      _("{name} B-spline").format(name=outputNode.GetName()))
            # identity until the B-spline stage (its default B-spline has no coefficients yet)
            bspline.SetAndObserveTransformFromParent(vtk.vtkTransform())
            changes.rememberReference(outputNode, ROLE_BSPLINE)
            outputNode.SetNodeReferenceID(ROLE_BSPLINE, bspline.GetID())
        bspline.SetAndObserveTransformNodeID(outputNode.GetID())
        return outputNode, bspline, bspline, None

    def _dropStaleBSpline(self, linearNode, bspline) -> None:
        """After an affine run into a node that held a B-spline result: remove that B-spline child (the result is
        the affine alone now), or, if something of the user's still lies under it, make it the identity."""
        if any(node.GetParentTransformNode() is bspline for node in _transformableNodes(self.scene)):
            bspline.SetAndObserveTransformFromParent(vtk.vtkTransform())
            return
        linearNode.RemoveNodeReferenceIDs(ROLE_BSPLINE)
        self.scene.RemoveNode(bspline)

    def _stageCallbacks(self, count, iterations, liveUpdate, linearNode, bsplineWriter, progressCallback, cancelled):
        """`istn.chain.register_chain`'s ``callback_for``: before each stage, the panel's progress message (and a
        cancel check); the stage's iteration callback updates the transform nodes live and reports progress.
        ``count``: the stages of a chain (a second try has as many)."""

        def callbackFor(index, model):
            kind = model.transform_type

            def callback(info) -> None:
                if liveUpdate:
                    self._writeTransform(info.transform(), linearNode, bsplineWriter)
                if progressCallback is not None:
                    progressCallback(RegistrationProgress(kind, index + 1, count, info.iteration, info.iterations,
                                                          info.loss, passNumber=info.pass_number, passes=info.passes))

            if cancelled():
                raise RegistrationCancelled()
            if progressCallback is not None:  # the one pass reports nothing until it is done
                progressCallback(RegistrationProgress(kind, index + 1, count, 0,
                                                      iterations if iterations is not None else 1, None,
                                                      _("Running the {stage} model ({name})...").format(
                                                          stage=STAGE_NAMES[kind], name=model.path.name)))
            return callback

        return callbackFor

    @staticmethod
    def _writeTransform(transform, linearNode, bsplineWriter) -> None:
        import numpy as np

        from . import nodes as nodeio

        linear, bspline = nodeio.splitComposite(transform)
        current = vtk.vtkMatrix4x4()
        linearNode.GetMatrixTransformFromParent(current)
        matrix = nodeio.lpsToRasMatrix(linear)
        if not np.array_equal(nodeio.arrayFromVtkMatrix(current), matrix):  # no redraw for an unchanged affine
            nodeio.setLinearTransformFromParent(linearNode, matrix)
        if bspline is not None:
            if bsplineWriter is None:
                raise RuntimeError(_("a B-spline result needs a B-spline transform node"))
            bsplineWriter.write(bspline)

    @staticmethod
    def _metrics(stages, final, fixedImage, pairs, transformType, start=None) -> dict:
        import SimpleITK as sitk

        from istn.metrics import dice, folding_fraction

        # "iterations": those the engine ran (it may stop early at convergence), "polish_iterations" of them the
        # polish's; "iterations_requested": the limit (refinement + polish)
        from istn.config import has_itn

        metrics: dict = {"stages": [
            {"stage": s.transform_type, "itn": has_itn(s.model_meta), "loss_one_pass": s.loss_one_pass,
             "loss_final": s.loss_final,
             "iterations": s.iterations, "polish_iterations": s.polish_iterations,
             "iterations_requested": s.iterations_allowed, "losses": list(s.losses),
             "mutual_information": dict(s.information), "turned": s.turned or None, "start_kept": s.start_kept}
            for s in stages]}
        metrics["loss_one_pass"] = stages[-1].loss_one_pass
        metrics["loss_final"] = stages[-1].loss_final
        if pairs:
            from .nodes import layersOfStructures

            identity = sitk.Transform(3, sitk.sitkIdentity)
            reference = sitk.Image(fixedImage.GetSize(), sitk.sitkUInt8)
            reference.CopyInformation(fixedImage)

            def onFixedGrid(structures, transform) -> list:
                """The structures as label layers, each resampled (nearest neighbour, exact) onto the fixed grid
                once, and where each structure is: (its layer's array, its value). One resampling per layer,
                not per structure: through a B-spline at 1 mm 256^3 each took 5.6 s. warp_image: the same labels
                however the layer's voxels are stored (nearest-neighbour ties)."""
                from istn.registration import warp_image

                layers = layersOfStructures(structures)
                arrays = [sitk.GetArrayFromImage(warp_image(layer.labels, reference, transform,
                                                            sitk.sitkNearestNeighbor, 0))
                          for layer in layers]
                where = {s.order: (arrays[i], s.value) for i, layer in enumerate(layers) for s in layer.segments}
                return [where[k] for k in range(len(structures))]

            fixedOnes = [f for f, _ in pairs]
            movingOnes = [m for _, m in pairs]
            targets = onFixedGrid(fixedOnes, identity)
            # before: the moving volume where it was shown (its pre-alignment)
            before = onFixedGrid(movingOnes, start if start is not None else identity)
            after = onFixedGrid(movingOnes, final)
            metrics["dice"] = {}
            for k, f in enumerate(fixedOnes):
                target = targets[k][0] == targets[k][1]
                metrics["dice"][f.name] = {"before": dice(target, before[k][0] == before[k][1]),
                                           "after": dice(target, after[k][0] == after[k][1])}
        metrics["folding_fraction"] = None
        if transformType == "bspline":
            metrics["folding_fraction"] = folding_fraction(final, _foldingGrid(fixedImage))
        return metrics

    def _writeMaps(self, changes, linearNode, leafNode, stage, fixedNode, movingNode):
        from istn.config import has_itn

        from . import nodes as nodeio

        maps = []
        for role, image, source, parent in (
            (ROLE_FIXED_MAP, stage.fixed_map, fixedNode, None),
            (ROLE_MOVING_MAP, stage.moving_map, movingNode, leafNode),
        ):
            node = linearNode.GetNodeReference(role)
            # a model without an ITN (STN-u/s) maps nothing: its "maps" are the images as the network takes them;
            # the fixed one says for which moving volume (a fixed volume registered with several has one each)
            partner = _(" (for {moving})").format(moving=movingNode.GetName()) if parent is None else ""
            names = {kind: text.format(name=source.GetName()) + partner
                     for kind, text in ((True, _("{name} ITN map")), (False, _("{name} network input")))}
            name = names[has_itn(stage.model_meta)]
            if node is None or not self.scene.IsNodePresent(node) or not node.IsA("vtkMRMLScalarVolumeNode"):
                node = changes.adopt(nodeio.addVolumeNodeFromImage(self.scene, image, name))
                changes.rememberReference(linearNode, role)
                linearNode.SetNodeReferenceID(role, node.GetID())
            else:  # an earlier run's map: given back as it was if this run fails or is cancelled
                changes.rememberVolume(node)
                nodeio.updateVolumeNodeFromImage(node, image)
                if node.GetDisplayNode() is None:
                    node.CreateDefaultDisplayNodes()
                # the model's kind or the moving volume changed: the name this module gave is given anew, one
                # the user gave is kept (scenes saved before the attribute: the names of this run's pair)
                given = node.GetAttribute(MAP_NAME_ATTRIBUTE)
                if node.GetName() != name and (node.GetName() == given or node.GetName() in names.values()):
                    changes.rememberName(node)
                    node.SetName(name)
            if node.GetName() == name:
                changes.rememberAttribute(node, MAP_NAME_ATTRIBUTE)
                node.SetAttribute(MAP_NAME_ATTRIBUTE, name)
            node.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)
            node.SetAttribute("ISTNRegistration.map", "fixed" if parent is None else "moving")
            self._styleMap(node, image)
            maps.append(node)
        return maps[0], maps[1]

    @staticmethod
    def _atlasOnMoving(layers, movingImage, final, result) -> list:
        """The atlas' layers on the moving volume's grid through ``final``'s inverse; its volumes (ml) per segment
        and what to warn of in ``result``."""
        import numpy as np
        import SimpleITK as sitk

        from istn.inverse import labels_onto_moving, round_trip_warning

        from .nodes import LabelLayer

        inverted, ontoMoving = labels_onto_moving(final, movingImage)  # as `istn register --atlas`
        voxelMl = float(np.prod(movingImage.GetSpacing())) / 1000.0
        onMoving, sizes = [], []  # sizes: (order, name, voxels in the atlas, voxels on the moving grid)
        for layer in layers:
            warped = ontoMoving(layer.labels)
            onMoving.append(LabelLayer(warped, layer.segments))
            given, found = (np.bincount(sitk.GetArrayViewFromImage(image).ravel(),
                                        minlength=len(layer.segments) + 1) for image in (layer.labels, warped))
            sizes.extend((s.order, s.name, int(given[s.value]), int(found[s.value])) for s in layer.segments)
        volumes, outside = {}, []
        for _order, name, given, found in sorted(sizes):
            key, k = name, 2
            while key in volumes:  # Slicer allows two segments of one name
                key, k = f"{name} ({k})", k + 1
            volumes[key] = found * voxelMl
            if given and not found:  # an empty segment of the atlas is no news
                outside.append(key)
        result.metrics["atlas"] = {"volumes_ml": volumes, "inverse": inverted.summary()}
        if outside and len(outside) == sum(1 for size in sizes if size[2]):
            result.warnings.append(_("no segment of the atlas lies in the moving volume after registration: is the "
                                     "atlas drawn on the fixed volume's space?"))
        elif outside:
            result.warnings.append(_("atlas segments outside the moving volume after registration (left empty): "
                                     "{names}").format(names=", ".join(outside)))
        missed = round_trip_warning(inverted.round_trip_mm)
        if missed:
            result.warnings.append(_("atlas: {warning}").format(warning=missed))
        return onMoving

    def _writeAtlas(self, changes, layers, linearNode, atlasNode, movingNode, inputs):
        """The atlas on the moving grid into a segmentation that follows the moving volume: the node an earlier
        run of the same atlas into this output transform made, else a new one."""
        from . import nodes as nodeio

        scene = self.scene
        node = None
        for candidate in _atlasOutputs(scene, linearNode):
            if (candidate.GetAttribute(ATTRIBUTE_ATLAS) == atlasNode.GetID()
                    and all(candidate is not other for other in [atlasNode, movingNode, *inputs])):
                node = candidate
                break
        if node is not None:
            changes.rememberSegmentation(node)
        else:
            node = changes.addNode("vtkMRMLSegmentationNode", _("{atlas} on {moving}").format(
                atlas=atlasNode.GetName(), moving=movingNode.GetName()))
            node.SetAttribute(ATTRIBUTE_ATLAS, atlasNode.GetID())
            node.SetAttribute(ATTRIBUTE_ATLAS_TRANSFORM, linearNode.GetID())
            node.CreateDefaultDisplayNodes()
        # in the moving volume's coordinates; the parent first: the reference geometry is taken relative to it
        node.SetAndObserveTransformNodeID(movingNode.GetTransformNodeID())
        nodeio.setSegmentsFromLayers(node, layers, movingNode)
        return node

    def _useColors(self, display, colorIds) -> None:
        """The first of ``colorIds`` the scene holds as ``display``'s colour table (none: its own left)."""
        for colorId in colorIds:
            if self.scene.GetNodeByID(colorId) is not None:
                display.SetAndObserveColorNodeID(colorId)
                return

    def _styleMap(self, node, image) -> None:
        import numpy as np
        import SimpleITK as sitk

        display = node.GetDisplayNode()
        if display is None:
            return
        self._useColors(display, MAP_COLOR_NODE_IDS)
        from istn.refinement import MAP_DISPLAY_THRESHOLD
        from istn.registration import bounded_map

        display.AutoWindowLevelOff()
        if bounded_map(image):  # probabilities: the structures only, the sigmoid's floor transparent
            display.SetWindowLevelMinMax(0.0, 1.0)
            display.SetLowerThreshold(MAP_DISPLAY_THRESHOLD)
            display.SetUpperThreshold(1.0)
            display.SetApplyThreshold(1)
            return
        high = float(np.max(sitk.GetArrayViewFromImage(image)))
        display.SetApplyThreshold(0)
        display.SetWindowLevelMinMax(0.0, high if high > 0 else 1.0)

    def _showInSliceViews(self, background, foreground, opacity: float) -> None:
        """``background`` (the fixed volume, or the checkerboard), ``foreground`` over it, in every slice view."""
        scene = self.scene
        if scene is slicer.mrmlScene:
            slicer.util.setSliceViewerLayers(background=background, foreground=foreground, foregroundOpacity=opacity)
            return
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
            composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
            composite.SetForegroundOpacity(opacity)


def _foldingGrid(fixedImage):
    """The fixed grid (a SimpleITK image), made coarser (same extent and direction) if it is very large."""
    import numpy as np
    import SimpleITK as sitk

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


def preAlignment(movingNode):
    """``(initial transform, name, RAS to-world matrix)``: where registration of ``movingNode`` starts.

    A moving volume the user placed under a transform of theirs (a manual or another tool's alignment) is
    registered from there: the engine's initial transform maps fixed world points to the moving volume's own
    (LPS), the inverse of its parents' transform to world; ``name`` is that transform's. Under this module's own
    output (a second Apply), the start that output's run recorded (`ATTRIBUTE_START`: the user's placement then,
    even though the volume is now under the result, which includes it), so a second Apply starts as the first did;
    an edit of the result by hand is not a start (put the volume under a transform of your own for that). Under
    the result of another volume's run (the same subject's other scan placed with it): from there, as under a
    transform of the user's.
    ``(None, None, None)``: the volume's own geometry (under no transform, or under an output whose run started
    there). Raises for a non-linear transform of the user's (an acquisition correction, another tool's warp):
    harden it first."""
    parent = movingNode.GetParentTransformNode()
    if parent is None:
        return None, None, None
    import numpy as np

    from istn.transforms import matrix_to_sitk_affine

    from . import nodes as nodeio

    output = None
    if _isModuleOutput(parent):
        output = parent if parent.GetAttribute(ATTRIBUTE_MOVING) is not None else parent.GetParentTransformNode()
    if output is not None and output.GetAttribute(ATTRIBUTE_MOVING) == movingNode.GetID():
        recorded = output.GetAttribute(ATTRIBUTE_START)
        if not recorded:
            return None, None, None
        toWorld = np.array([float(v) for v in recorded.split()]).reshape(4, 4)
        name = output.GetAttribute(ATTRIBUTE_START_NAME) or output.GetName()
    else:
        # another volume's result is, for this one, a placement like any of the user's (the same subject's other
        # scan put under it: it was ignored, the run started where the volume lay before and Dice 'before' was
        # that of a placement not shown)
        # RAS: the volume's own points -> where they are shown (refused, as for the fixed volume, if not linear)
        toWorld, name = nodeio.parentToWorldMatrix(movingNode), parent.GetName()
    return matrix_to_sitk_affine(nodeio.lpsToRasMatrix(np.linalg.inv(toWorld))), name, toWorld


def _segmentationPlacement(segmentationNode, movingNode, startToWorld):
    """The RAS matrix that places the moving segmentation in the moving volume's own coordinates, those the
    registration starts from (``startToWorld``: `preAlignment`'s, None: the volume's own geometry).

    Under no transform (drawn on the volume, which alone was then aligned by hand), under the volume's own
    transform, or under a result of this module (put there to follow an earlier result): it lies with the volume,
    the identity. Under a transform of its own: where it is shown, seen from where the volume is, so that lined up
    on screen with the volume (a hardened volume, the segmentation still under the user's alignment) it is
    scored so (Slicer audit: Dice 0.87 -> 0.00 reported for a registration that brought it to 0.91)."""
    import numpy as np

    from . import nodes as nodeio

    if segmentationNode is None:
        return None
    parent = segmentationNode.GetParentTransformNode()
    if parent is None or parent is movingNode.GetParentTransformNode() or _isModuleOutput(parent):
        return np.eye(4)
    frame = startToWorld if startToWorld is not None else np.eye(4)
    return np.linalg.inv(frame) @ nodeio.parentToWorldMatrix(segmentationNode)


def _isModuleOutput(transformNode) -> bool:
    """Whether ``transformNode`` is one this module wrote a result into (an output transform, or its B-spline)."""
    if transformNode.GetAttribute(ATTRIBUTE_MOVING) is not None:
        return True
    parent = transformNode.GetParentTransformNode()
    return parent is not None and parent.GetNodeReference(ROLE_BSPLINE) is transformNode


def _nodesUnder(scene, transformNode) -> list:
    """The transformable nodes of ``scene`` (directly or further down) under ``transformNode``, this module's own
    (its B-spline child, the structure maps it wrote, an atlas brought onto the moving volume) left out."""
    own = {transformNode.GetNodeReferenceID(role) for role in (ROLE_BSPLINE, ROLE_FIXED_MAP, ROLE_MOVING_MAP)}
    return [node for node in _transformableNodes(scene) if node.GetID() not in own
            and node.GetAttribute(ATTRIBUTE_ATLAS_TRANSFORM) is None and _isUnder(node, transformNode)]


def _transformableNodes(scene) -> list:
    """Every node of ``scene`` that can lie under a transform."""
    nodes = (scene.GetNthNodeByClass(i, "vtkMRMLTransformableNode")
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLTransformableNode")))
    return [node for node in nodes if node is not None]


def _atlasOutputs(scene, linearNode) -> list:
    """The segmentations runs into the output transform ``linearNode`` made of an atlas (any atlas)."""
    nodes = (scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")))
    return [node for node in nodes if node is not None
            and node.GetAttribute(ATTRIBUTE_ATLAS_TRANSFORM) == linearNode.GetID()]


def _checkNumbers(**values) -> None:
    """``ValueError`` for a number of `ISTNRegistrationLogic.register` that a script got wrong: a count that is
    not a whole number (2.7 was cut to 2, "3" taken), a setting that is not a number or is NaN (it was replaced
    by the model's own without a word); infinity only for ``regionMargin`` (the whole grid)."""
    import math

    import numpy as np

    counts = ("iterations", "coarseIterations", "polish", "passes")
    for name, value in values.items():
        if value is None:
            continue
        number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        if name in counts:
            if not number or not math.isfinite(value) or value != int(value):
                raise ValueError(_("'{name}' must be a whole number, got {value!r}").format(name=name, value=value))
        elif not number or math.isnan(value) or (math.isinf(value) and name != "regionMargin"):
            raise ValueError(_("'{name}' must be a finite number (or None: the model's own), got {value!r}").format(
                name=name, value=value))


def _volumeNamed(exc: BaseException, fixed, moving) -> Exception | None:
    """The engine's refusal of an image ("moving image is constant ...") as one of the volume the user chose ("the
    moving volume 'T1 follow-up' is constant ..."), of the same type; None for any other error."""
    message = str(exc)
    for role, node in (("fixed", fixed), ("moving", moving)):
        if message.startswith(f"{role} image ") and isinstance(exc, ValueError):
            try:
                return type(exc)(_("the {role} volume '{name}' ").format(role=role, name=node.GetName())
                                 + message[len(f"{role} image "):])
            except TypeError:  # an exception type that takes other arguments: left as it is
                return None
    return None


def _checkFinite(role: str, node) -> None:
    """Refuse a volume with NaN or infinite voxels, naming it, with a way out that works in Slicer (the engine's own
    message names no node and gives command-line tools). A NaN volume comes from a NRRD or MHA file of a masking
    pipeline; a NIfTI file's NaN are read as 0 by Slicer's reader already."""
    import numpy as np

    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        return  # said where the image is read ("has no voxels")
    array = slicer.util.arrayFromVolume(node)
    if array.dtype.kind != "f" or np.all(np.isfinite(array)):  # integers are finite: no 512^3 mask made for them
        return
    from istn.io import nonfinite_counts

    raise ValueError(_("the {role} volume '{name}' has {counts} voxel values (the outside of a masked image?): set "
                       "them to the background first, e.g. in the Python console: import numpy; node = "
                       "slicer.util.getNode('{name}'); a = slicer.util.arrayFromVolume(node); a[~numpy.isfinite(a)] = 0; "
                       "slicer.util.arrayFromVolumeModified(node)").format(role=role, name=node.GetName(),
                                                                   counts=nonfinite_counts(array)[2]))


def _isUnder(node, transformNode) -> bool:
    """Whether ``node`` is (directly or further down) under ``transformNode``."""
    parent = node.GetParentTransformNode()
    while parent is not None:
        if parent is transformNode:
            return True
        parent = parent.GetParentTransformNode()
    return False


def _previousMovingVolume(outputTransform):
    """The moving volume an earlier run registered into ``outputTransform`` (None if none or gone)."""
    nodeId = outputTransform.GetAttribute(ATTRIBUTE_MOVING)
    scene = outputTransform.GetScene()
    return scene.GetNodeByID(nodeId) if nodeId and scene is not None else None


def _seededTorch(seed: int | None, device: str):
    """A context in which torch's random numbers start from ``seed``; the global generators are restored after.

    Slicer's Python is shared by every module: reseeding its global RNG would
    change what other code draws.
    """
    if seed is None:
        return contextlib.nullcontext()
    import torch

    cuda = device != "cpu" and torch.cuda.is_available()

    @contextlib.contextmanager
    def seeded():
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
            torch.random.default_generator.manual_seed(int(seed))
            if cuda:
                torch.cuda.manual_seed(int(seed))
            yield

    return seeded()
