"""Static checks of the Slicer extension: the .ui, the module file, CMake, the catalog entry.

None of these need Slicer: the panel file is XML, the module file is parsed
(not imported: it needs Slicer's Qt), the build files are text.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "ISTNRegistration"
UI_FILE = MODULE / "Resources" / "UI" / "ISTNRegistration.ui"
MODULE_FILE = MODULE / "ISTNRegistration.py"
LIB = MODULE / "ISTNRegistrationLib"

#: parameter type -> the widget classes Slicer's parameterNodeWrapper can bind it to
WIDGETS_FOR_TYPE = {
    "node": {"qMRMLNodeComboBox"},
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "str": {"QComboBox", "QLineEdit", "QTextEdit"},
    "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
}
#: kept in the parameter node, set by code: the model list is dynamic; a Path bound to ctkPathLineEdit starts as "."
NOT_BOUND = {"modelChoice", "customModelPath"}


# --------------------------------------------------------------------------
# Parsing helpers
# --------------------------------------------------------------------------


def ui_tree() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ui_tree().iter("widget")}


def ui_property(widget: ET.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            child = prop[0]
            if child.tag == "stringlist":
                return [s.text for s in child.findall("string")]
            return child.text
    return None


def module_ast() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def parameter_fields() -> dict[str, str]:
    """Fields of the @parameterNodeWrapper class: name -> annotation source."""
    for node in module_ast().body:
        if isinstance(node, ast.ClassDef) and any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in ISTNRegistration.py")


def field_kind(annotation: str) -> str:
    inner = re.sub(r"^Annotated\[(.*?),.*\]$", r"\1", annotation)
    if "vtkMRML" in inner:
        return "node"
    return inner


def node_classes(annotation: str) -> set[str]:
    return set(re.findall(r"vtkMRML\w+", annotation))


def ui_attributes_used() -> set[str]:
    """Every ``self.ui.<name>`` the module file touches."""
    used = set()
    for node in ast.walk(module_ast()):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id in ("self", "widget")):
            used.add(node.attr)
    return used


# --------------------------------------------------------------------------
# The panel (.ui)
# --------------------------------------------------------------------------


def test_ui_is_a_slicer_panel_with_the_issue_sections():
    root = ui_tree()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "ISTNRegistration"
    sections = {ui_property(w, "text") for w in root.iter("widget") if w.get("class") == "ctkCollapsibleButton"}
    assert {"Inputs", "Model", "Refinement", "Outputs", "Advanced"} <= sections
    advanced = next(w for w in root.iter("widget") if ui_property(w, "text") == "Advanced")
    assert ui_property(advanced, "collapsed") == "true"



def test_the_refinement_tuning_waits_under_advanced():
    """What a user sets (iterations, live update, second try) is in sight; the refinement's fine tuning, every
    setting of which defaults to the model's own, is in the collapsed Advanced section (with device and seed)."""
    root = ui_tree()

    def bound_in(section: str) -> set[str]:
        box = next(w for w in root.iter("widget") if ui_property(w, "text") == section)
        return {ui_property(w, "SlicerParameterName") for w in box.iter("widget")} - {None}

    assert bound_in("Refinement") == {"iterations", "liveUpdate", "retryVaried"}
    assert {"learningRate", "bending", "anchor", "tolerance", "coarseIterations", "refineLayers", "comparedRegion",
            "polish", "passes", "biasCorrect", "device", "seed"} <= bound_in("Advanced")


def test_every_widget_the_code_touches_exists():
    missing = ui_attributes_used() - set(ui_widgets())
    assert not missing, f"ISTNRegistration.py uses widgets the .ui lacks: {sorted(missing)}"


def test_parameter_names_match_the_parameter_node_fields():
    bound = {ui_property(w, "SlicerParameterName"): name for name, w in ui_widgets().items()
             if ui_property(w, "SlicerParameterName")}
    fields = parameter_fields()
    assert set(bound) == set(fields) - NOT_BOUND, (set(bound) ^ (set(fields) - NOT_BOUND))
    for parameter, widget_name in bound.items():
        cls = ui_widgets()[widget_name].get("class")
        kind = field_kind(fields[parameter])
        assert cls in WIDGETS_FOR_TYPE[kind], f"{parameter} ({kind}) cannot bind to a {cls}"


def test_node_selectors_offer_exactly_the_parameter_node_types():
    fields = parameter_fields()
    for name, widget in ui_widgets().items():
        if widget.get("class") != "qMRMLNodeComboBox":
            continue
        parameter = ui_property(widget, "SlicerParameterName")
        assert parameter, f"{name} is not bound to the parameter node"
        assert set(ui_property(widget, "nodeTypes")) == node_classes(fields[parameter]), name
        optional = "Optional[" in fields[parameter]
        assert (ui_property(widget, "noneEnabled") == "true") == optional, f"{name}: noneEnabled vs Optional"


def test_every_mrml_widget_gets_the_scene():
    connected = {c.findtext("receiver") for c in ui_tree().iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    selectors = {n for n, w in ui_widgets().items() if w.get("class", "").startswith("qMRML") and n != "ISTNRegistration"}
    assert selectors <= connected, selectors - connected


def test_custom_widget_classes_are_declared():
    root = ui_tree()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget") if not w.get("class").startswith("Q")}
    assert used <= declared, used - declared


def test_choices_and_ranges_agree_with_the_logic():
    sys.path.insert(0, str(MODULE))
    pytest.importorskip("slicer")
    from ISTNRegistrationLib.logic import DEVICES

    fields = parameter_fields()
    choices = ast.literal_eval(re.search(r"Choice\((\[.*?\])\)", fields["device"]).group(1))
    assert choices == list(DEVICES)
    widgets = ui_widgets()
    for parameter, widget_name in (("iterations", "iterationsSpinBox"), ("seed", "seedSpinBox")):
        low, high = re.search(r"WithinRange\((-?\d+), (\d+)\)", fields[parameter]).groups()
        assert int(ui_property(widgets[widget_name], "minimum") or 0) == int(low)
        assert int(ui_property(widgets[widget_name], "maximum")) == int(high)


def test_panel_loads_in_plain_qt_and_renders(tmp_path):
    pytest.importorskip("PySide6", reason="PySide6 renders the panel outside Slicer")
    out = tmp_path / "panel.png"
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    done = subprocess.run([sys.executable, str(REPO / "docs" / "render_slicer_panel.py"), str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    from PIL import Image

    width, height = Image.open(out).size
    assert width >= 400 and height >= 500


# --------------------------------------------------------------------------
# The module file
# --------------------------------------------------------------------------


def test_module_file_has_module_widget_logic_and_registered_test():
    classes = {c.name: [ast.unparse(b) for b in c.bases] for c in module_ast().body if isinstance(c, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["ISTNRegistration"]
    assert "ScriptedLoadableModuleWidget" in classes["ISTNRegistrationWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["ISTNRegistrationLogic"]
    assert "ScriptedLoadableModuleTest" in classes["ISTNRegistrationTest"]
    cmake = (MODULE / "CMakeLists.txt").read_text()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
    assert "WITH_GENERIC_TESTS" in cmake


def test_module_file_imports_neither_torch_nor_the_engine_at_load_time():
    top = [n for n in module_ast().body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert not names & {"torch", "istn", "scipy"}, names


def test_only_slicer_modules_at_the_top_of_the_module_folder():
    # Slicer's extension reviewers: every top-level .py in a module folder must be a Slicer module
    assert sorted(p.name for p in MODULE.glob("*.py")) == ["ISTNRegistration.py"]


# --------------------------------------------------------------------------
# Build files, resources, catalog entry
# --------------------------------------------------------------------------


def test_cmake_lists_every_library_file_and_resource():
    cmake = (MODULE / "CMakeLists.txt").read_text()
    for path in sorted(LIB.glob("*.py")):
        assert f"${{MODULE_NAME}}Lib/{path.name}" in cmake, f"{path.name} is not shipped"
    for resource in re.findall(r"^\s+(Resources/\S+)$", cmake, flags=re.M):
        assert (MODULE / resource.replace("${MODULE_NAME}", "ISTNRegistration")).is_file(), resource
    assert "istn/*.py" in cmake and "Resources/Models/*.pt" in cmake
    testing = (MODULE / "Testing" / "Python" / "CMakeLists.txt").read_text()
    for script in re.findall(r"SCRIPT (\S+\.py)", testing):
        assert (MODULE / "Testing" / "Python" / script).is_file()


def test_top_level_cmake_metadata():
    cmake = (REPO / "CMakeLists.txt").read_text()
    meta = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', cmake))
    assert meta["EXTENSION_CATEGORY"] == "Registration"
    assert meta["EXTENSION_DEPENDS"] == "PyTorch"
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS"):
        assert meta.get(key), key
    assert "add_subdirectory(ISTNRegistration)" in cmake
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in cmake and "Slicer_EXTENSION_CPACK" in cmake


def test_icons_are_128_pixel_pngs():
    from PIL import Image

    for icon in (REPO / "ISTNRegistration.png", MODULE / "Resources" / "Icons" / "ISTNRegistration.png"):
        assert Image.open(icon).size == (128, 128), icon


def test_repository_name_and_urls_pass_the_extensions_index_checks():
    """What scripts/check_description_files.py of Slicer/ExtensionsIndex checks, without the network."""
    entry = json.loads((REPO / "ISTNRegistration.json").read_text())
    repository = re.match(r"https://github\.com/([\w.-]+)/([\w.-]+)\.git$", entry["scm_url"])
    assert repository, entry["scm_url"]
    owner, name = repository.groups()
    assert "slicer" in name.lower() and name == "Slicer" + "ISTNRegistration"  # convention: Slicer + extension name
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert re.findall(r"project\s*\(\s*([^\s\)]+)", cmake)[0] == "ISTNRegistration"  # = the .json file name
    icon = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', cmake)
    shots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', cmake)
    assert icon and shots, "literal icon and screenshot URLs"
    raw = f"https://raw.githubusercontent.com/{owner}/{name}/{entry['scm_revision']}/"
    for url in icon + shots[0].split():
        assert url.startswith(raw) and (REPO / url[len(raw):]).is_file(), url  # the file is in the repository
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]+)"\)', cmake).group(1)
    prefix = f"https://github.com/{owner}/{name}/blob/{entry['scm_revision']}/"
    assert homepage.startswith(prefix) and (REPO / homepage[len(prefix):]).is_file()
    # every other copy of the URL agrees with scm_url (one place to edit: .ci/set_repository_url.py)
    done = subprocess.run([sys.executable, str(REPO / ".ci" / "set_repository_url.py")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_set_repository_url_rewrites_every_copy(tmp_path):
    import shutil

    for relative in ("ISTNRegistration.json", "CMakeLists.txt", "ISTNRegistration/ISTNRegistration.py", "README.md",
                     "docs/slicer.md", ".ci/set_repository_url.py"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / relative, tmp_path / relative)
    script = str(tmp_path / ".ci" / "set_repository_url.py")
    done = subprocess.run([sys.executable, script, "https://github.com/some-lab/SlicerISTNRegistration"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    texts = "".join((tmp_path / r).read_text() for r in ("ISTNRegistration.json", "CMakeLists.txt",
                                                         "ISTNRegistration/ISTNRegistration.py"))
    assert "istn-registration" not in texts
    assert "https://github.com/some-lab/SlicerISTNRegistration.git" in texts
    assert "raw.githubusercontent.com/some-lab/SlicerISTNRegistration/main/ISTNRegistration.png" in texts
    assert "ISTN Registration maintainers (some-lab)" in texts
    refused = subprocess.run([sys.executable, script, "https://github.com/some-lab/ISTNRegistration"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "'Slicer' in the repository name" in refused.stderr


def test_contributors_are_name_organisation_and_agree():
    cmake = (REPO / "CMakeLists.txt").read_text()
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]+)"\)', cmake).group(1)
    assert re.fullmatch(r"[^,()]+ \([^()]+\)(, [^,()]+ \([^()]+\))*", contributors), contributors
    module = MODULE_FILE.read_text()
    assert f'self.parent.contributors = ["{contributors}"]' in module


def test_cmake_minimums_are_those_of_the_slicer_5_10_template():
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert cmake.startswith("cmake_minimum_required(VERSION 3.20.6...3.22.6 FATAL_ERROR)")


def test_extensions_index_entry():
    entry = json.loads((REPO / "ISTNRegistration.json").read_text())
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}  # schema v1.0.2: no other key
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"]
    assert entry["category"] == "Registration" and entry["build_dependencies"] == ["PyTorch"]


def test_requirements_never_reinstall_slicer_packages_or_torch():
    lines = [ln.split("#")[0].strip() for ln in (MODULE / "Resources" / "requirements.txt").read_text().splitlines()]
    names = {re.split(r"[<>=!~ ;\[]", ln)[0].lower() for ln in lines if ln}
    assert names and not names & {"numpy", "simpleitk", "vtk", "torch"}


def test_documentation_for_slicer_users():
    doc = (REPO / "docs" / "slicer.md").read_text()
    for must in ("Extensions Manager", "Sample Data", "ISTNRegistrationLogic", "Inside Slicer only",
                 "Resources/Screenshots/panel.png", "PyTorch"):
        assert must in doc, must
    assert (REPO / "Resources" / "Screenshots" / "panel.png").is_file()


# --------------------------------------------------------------------------
# Older Slicer Pythons (.ci/py39_check.py)
# --------------------------------------------------------------------------


def _python(version: str) -> str | None:
    import glob
    import shutil

    found = sorted(glob.glob(f"/root/.pyenv/versions/{version}.*/bin/python")) or [shutil.which(f"python{version}")]
    return found[-1] if found and found[-1] else None


@pytest.mark.parametrize("version", ["3.9", "3.12"])  # Slicer 5.6/5.8, and 5.10 or later
def test_shipped_code_compiles_and_imports_on_slicer_pythons(version):
    python = _python(version)
    if python is None:
        pytest.skip(f"no Python {version} here (CI's .ci/run requires 3.9)")
    done = subprocess.run([python, str(REPO / ".ci" / "py39_check.py")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_py39_check_catches_runtime_only_syntax(tmp_path):
    import shutil

    python = _python("3.9")
    if python is None:
        pytest.skip("no Python 3.9 here")
    shutil.copytree(REPO / "ISTNRegistration", tmp_path / "ISTNRegistration",
                    ignore=shutil.ignore_patterns("*.pt", "__pycache__"))
    shutil.copytree(REPO / "Resources" / "SampleData", tmp_path / "Resources" / "SampleData")
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "py39_check.py", tmp_path / ".ci")
    for model in (REPO / "ISTNRegistration" / "Resources" / "Models").glob("*.pt"):  # only the metadata is read
        shutil.copy(model, tmp_path / "ISTNRegistration" / "Resources" / "Models")
    config = tmp_path / "ISTNRegistration" / "istn" / "config.py"
    config.write_text(config.read_text() + "\nOptionalInt = int | None  # a runtime union: Python >= 3.10\n")
    done = subprocess.run([python, str(tmp_path / ".ci" / "py39_check.py")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "import istn.config: TypeError" in done.stderr, done.stderr
    config.write_text(config.read_text() + "\nmatch 1:\n    case _:\n        pass\n")
    done = subprocess.run([python, str(tmp_path / ".ci" / "py39_check.py")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "istn/config.py" in done.stderr and "invalid syntax" in done.stderr, done.stderr


def test_library_messages_go_through_tr_with_placeholders():
    """Every error the Lib raises for people is ``_("... {name} ...").format(...)``: translatable, no concatenation."""

    def translated(node) -> bool:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
            node = node.func.value
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dependencyMessage":
            return True  # builds its text with _() itself
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_"
                and len(node.args) == 1 and isinstance(node.args[0], ast.Constant))

    bad = []
    for path in sorted(LIB.glob("*.py")):
        if path.name == "selftest.py":  # test checks: assertion messages for developers
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
                if not translated(node.exc.args[0]):
                    bad.append(f"{path.name}:{node.lineno}")
    assert not bad, bad
