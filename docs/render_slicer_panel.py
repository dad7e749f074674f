"""Render the Slicer panel (ISTNRegistration.ui) to a PNG without Slicer, for the documentation.

Slicer's own widgets (qMRMLWidget, ctkCollapsibleButton, qMRMLNodeComboBox,
ctkPathLineEdit) do not exist outside Slicer, so they are rewritten to their
closest Qt base class before PySide6's QUiLoader builds the panel; the node
selectors get the node names the sample pair loads with. The picture shows a
B-spline run in progress (Apply has turned into Cancel).

    pip install PySide6
    QT_QPA_PLATFORM=offscreen python docs/render_slicer_panel.py [out.png]
"""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UI_FILE = REPO / "ISTNRegistration" / "Resources" / "UI" / "ISTNRegistration.ui"
DEFAULT_OUT = REPO / "Resources" / "Screenshots" / "panel.png"

#: Slicer class -> the Qt class it is drawn as.
REPLACE = {
    "qMRMLWidget": "QWidget",
    "ctkCollapsibleButton": "QGroupBox",
    "qMRMLNodeComboBox": "QComboBox",
    "ctkPathLineEdit": "QLineEdit",
}
SLICER_ONLY_PROPERTIES = {"nodeTypes", "showChildNodeTypes", "noneEnabled", "noneDisplay", "addEnabled",
                          "removeEnabled", "renameEnabled", "filters", "nameFilters", "collapsed"}
#: What the selectors show (the sample pair's node names).
DEMO_NODES = {
    "fixedVolumeSelector": "ISTN fixed T1",
    "movingVolumeSelector": "ISTN moving T1",
    "fixedSegmentationSelector": "ISTN fixed labels",
    "movingSegmentationSelector": "ISTN moving labels",
    "outputTransformSelector": "ISTN moving T1 to ISTN fixed T1 (ISTN)",
    "outputVolumeSelector": "None (move the moving volume)",
    "checkerboardVolumeSelector": "None",
    "jacobianVolumeSelector": "None",
    "atlasSegmentationSelector": "ISTN fixed labels",
}


def qt_ui_text() -> tuple[str, set[str]]:
    """The .ui rewritten for plain Qt; also the names of the collapsed sections."""
    tree = ET.parse(UI_FILE)
    root = tree.getroot()
    collapsed = set()
    for widget in root.iter("widget"):
        cls = widget.get("class")
        if cls not in REPLACE:
            continue
        for prop in list(widget.findall("property")):
            name = prop.get("name")
            if cls == "ctkCollapsibleButton" and name == "collapsed" and prop.findtext("bool") == "true":
                collapsed.add(widget.get("name"))
            if name in SLICER_ONLY_PROPERTIES:
                widget.remove(prop)
            elif cls == "ctkCollapsibleButton" and name == "text":
                prop.set("name", "title")
        widget.set("class", REPLACE[cls])
    for tag in ("customwidgets", "connections"):
        for node in root.findall(tag):
            root.remove(node)
    return ET.tostring(root, encoding="unicode"), collapsed


def bundled_models() -> tuple[list[str], int, str]:
    """Labels of the bundled models, the index of the one shown (the B-spline if any) and its description.

    Read from the model files themselves (`ISTNRegistrationLib.models`, zip + JSON: no torch, and loaded without
    the package's ``__init__``, which needs slicer-core's vtk; the picture does not); entries that say the files
    are absent when they are.
    """
    import types

    sys.path.insert(0, str(REPO / "ISTNRegistration"))  # the engine's torch-free istn.config, as the __init__ does
    if "ISTNRegistrationLib" not in sys.modules:  # the package without its __init__: models.py needs i18n and istn.config
        package = types.ModuleType("ISTNRegistrationLib")
        package.__path__ = [str(REPO / "ISTNRegistration" / "ISTNRegistrationLib")]
        sys.modules["ISTNRegistrationLib"] = package
    from ISTNRegistrationLib.models import bundledModels

    found = bundledModels()
    if found:
        shown = next((i for i, m in enumerate(found) if m.transformType == "bspline"), 0)
        return [m.label for m in found], shown, found[shown].describe()
    return (["Affine: brain-t1-affine", "B-spline: brain-t1-bspline"], 1,
            "ISTN-E bspline 3D model, internal grid 48x48x48 at 4.0 mm, control points every 30.0 mm; "
            "structures of interest: sub-cortical structures (the model files are absent from this checkout).")


def render(out: Path) -> Path:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtGui import QFont
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import (QApplication, QComboBox, QFrame, QGroupBox, QLabel, QLineEdit, QProgressBar,
                                   QPushButton, QWidget)

    app = QApplication.instance() or QApplication([])
    app.setStyle("Fusion")
    app.setFont(QFont("DejaVu Sans", 9))
    text, collapsed = qt_ui_text()
    data = QByteArray(text.encode("utf-8"))  # kept alive while the loader reads it
    buffer = QBuffer(data)
    buffer.open(QIODevice.ReadOnly)
    loader = QUiLoader()
    panel = loader.load(buffer)
    find = panel.findChild

    for name, value in DEMO_NODES.items():
        find(QComboBox, name).addItem(value)
    labels, shown, description = bundled_models()
    models = find(QComboBox, "modelComboBox")
    for label in labels + ["Custom model file (.pt)..."]:
        models.addItem(label)
    models.setCurrentIndex(shown)
    find(QLabel, "customModelPathLabel").setVisible(False)
    find(QLineEdit, "customModelPathLineEdit").setVisible(False)
    find(QLabel, "modelInfoLabel").setText(description)
    find(QComboBox, "deviceComboBox").setCurrentIndex(0)
    find(QFrame, "dependenciesFrame").setVisible(False)  # torch is installed in the picture
    for name in collapsed:
        box = find(QGroupBox, name)
        box.setTitle("\u25b8 " + box.title())
        for child in box.findChildren(QWidget):
            child.setVisible(False)
        box.setMaximumHeight(22)
    for box in panel.findChildren(QGroupBox):
        if box.objectName() not in collapsed:
            box.setTitle("\u25be " + box.title())
    apply = find(QPushButton, "applyButton")
    apply.setText("Cancel")
    apply.setEnabled(True)
    # stage 2 of 2, its second pass, 12 of the pass's 15 iterations (10 Adam + 5 polish: the bundled B-spline's)
    find(QProgressBar, "progressBar").setValue(900)
    find(QLabel, "statusLabel").setText("B-spline refinement: iteration 12/15 (pass 2/2), loss 0.00021")
    find(QLabel, "resultsLabel").setText("")
    panel.resize(440, 10)
    panel.adjustSize()
    panel.resize(440, panel.sizeHint().height())
    out.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(out)):
        raise RuntimeError(f"could not write {out}")
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    print(render(target))
