"""Model files: metadata inside, fresh-process loading, clear refusal of bad files."""

import json
import subprocess
import sys
import zipfile

import pytest
import torch

from istn.errors import ModelFileError
from istn.export import FORMAT_VERSION, META_NAME, load_model


def test_metadata_round_trip(make_model):
    m = load_model(make_model(3, "bspline"))
    meta = m.meta
    assert meta["format_version"] == FORMAT_VERSION and meta["ndim"] == 3 and meta["transform"] == "bspline"
    assert meta["grid"] == {"size": [16, 16, 16], "spacing_mm": 4.0}
    assert meta["control_point_spacing_mm"] == 24.0
    for key in ("intensity", "soi", "training", "engine_version", "variant", "model_config"):
        assert key in meta
    assert m.config.cp_spacing_mm == 24.0
    assert "ISTN-I bspline 3D" in m.describe()
    assert "validated on" not in m.describe()  # no training recipe data options: no claim
    # a model made by istn train stores no validation losses: the loss self-check cannot run, and it says so
    assert "so a registration's loss is not checked against them" in m.describe()


def test_the_bundled_models_say_which_contrasts_they_are_validated_on():
    from istn.demo import AFFINE_MODEL, BSPLINE_MODEL, bundled_model

    for name in (AFFINE_MODEL, BSPLINE_MODEL):
        assert "validated on T1 images (T2, PD: not validated)" in load_model(bundled_model(name)).describe()
        assert "is not checked against them" not in load_model(bundled_model(name)).describe()  # they store them
        # the structures by name (Slicer audit: a warning said "structure 5 (label 5)" for the left pallidum)
        assert load_model(bundled_model(name)).meta["soi"]["names"][4] == "left_pallidum"


def _absolute_paths(value: object) -> list[str]:
    """The strings in nested metadata that name a folder of some machine (/work/..., C:\\...)."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _absolute_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _absolute_paths(v)]
    if isinstance(value, str) and (value.startswith(("/", "~")) or value[1:3] in (":\\", ":/")):
        return [value]
    return []


def test_no_bundled_model_names_a_folder_of_the_machine_it_was_made_on():
    from istn.demo import MODELS_DIR

    models = sorted(MODELS_DIR.glob("*.pt"))
    assert len(models) >= 4
    for path in models:
        assert _absolute_paths(load_model(path).meta) == [], path.name


def test_rewriting_the_metadata_keeps_the_training_paths_by_name(make_model):
    from istn.export import rewrite_metadata

    path = make_model(2, "affine")
    meta = load_model(path).meta
    meta["training"]["config"]["out_dir"] = "/home/someone/patient-0042/run"  # an older engine's metadata
    rewrite_metadata(path, meta)
    assert load_model(path).meta["training"]["config"]["out_dir"] == "run"
    assert _absolute_paths(load_model(path).meta) == []


def test_loads_in_a_fresh_process_with_only_torch(make_model):
    path = make_model(2, "affine")
    code = (
        "import sys, json, torch\n"
        f"extra = {{'{META_NAME}': ''}}\n"
        f"m = torch.jit.load({str(path)!r}, _extra_files=extra)\n"
        "x = torch.rand(1, 1, 32, 32)\n"
        "s, t, p, g = m(x, x)\n"
        "assert p.shape == (1, 2, 3) and g.shape == (1, 32, 32, 2)\n"
        "assert 'istn' not in sys.modules\n"
        "print(json.loads(extra['meta.json'])['variant'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "istn-i"


def _rewrite_meta(src, dst, meta_text):
    """Copy a model archive replacing its meta.json."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("extra/" + META_NAME):
                if meta_text is None:
                    continue
                data = meta_text.encode()
            zout.writestr(item, data)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda meta: None, "without ISTN metadata"),
        (lambda meta: "{not json", "not valid JSON"),
        (lambda meta: json.dumps({**meta, "format_version": 99}), "format_version 99"),
        (lambda meta: json.dumps({k: v for k, v in meta.items() if k != "format_version"}), "no format_version"),
        (lambda meta: json.dumps({**meta, "format": "something-else"}), "not of format"),
    ],
)
def test_refuses_missing_or_incompatible_metadata(make_model, tmp_path, mutate, message):
    path = make_model(2, "affine")
    meta = load_model(path).meta
    bad = tmp_path / "bad.pt"
    _rewrite_meta(path, bad, mutate(meta))
    with pytest.raises(ModelFileError, match=message):
        load_model(bad)


@pytest.mark.parametrize("content", [b"hello, not a model", b"PK\x03\x04garbage"])
def test_refuses_foreign_or_corrupt_files(tmp_path, content):
    p = tmp_path / "x.pt"
    p.write_bytes(content)
    with pytest.raises(ModelFileError, match="not an ISTN model file"):
        load_model(p)


def test_refuses_a_plain_torch_checkpoint(tmp_path):
    p = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(3)}, p)
    with pytest.raises(ModelFileError):
        load_model(p)


def test_refuses_a_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
