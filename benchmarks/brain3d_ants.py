#!/usr/bin/env python3
"""ANTs worker of `brain3d.py`, run with the interpreter of the separate ANTs venv (antspyx 0.6.3).

antspyx pins older numpy/scipy than the project, so it never runs in the project's environment: `brain3d.py`
calls this file as a subprocess that reads NIfTI images, runs ``ants.registration`` and leaves ANTs' own
transform files (``0GenericAffine.mat``, ``1Warp.nii.gz``) plus ANTs' own warped image (``warped.nii.gz``,
used to check the conversion) in the work folder. Only ``ants`` and the standard library are imported.

    python brain3d_ants.py SPEC.json METHOD      # METHOD: ants_affine | ants_syn

``SPEC.json`` (written by brain3d.py for one group of cases): ``{"pairs": [{"index", "key", "fixed", "moving"},
...], "work": folder, "threads": n, "syn_iterations": [..], "ants_seed": n}`` ("ants_seed" absent: unseeded, as
runs before it existed; each case has its own fixed image: the storage layouts re-store it). Adds to
``<work>/<METHOD>/records.json`` (records of earlier groups kept): per case the wall and CPU seconds of the
``ants.registration`` call and the peak resident memory of this process during it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from procmem import reset_peak, status_kb  # benchmarks/procmem.py, beside this script


def main(spec_path: str, method: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(spec["threads"])
    t0 = time.perf_counter()
    import ants

    import_s = time.perf_counter() - t0
    # ANTs samples the affine metric at random points: without a seed the whole-head rows moved between runs with
    # identical inputs (affine Dice 0.205 vs 0.255). antspyx passes `--random-seed` only from this module-level
    # value; its public `set_ants_deterministic` would also force one thread and another metric, so it is set alone.
    # Measured on the sample pair: seeded, one thread -> identical affines; seeded, two threads -> still up to 0.03
    # apart in a parameter (unseeded 0.05): runs repeat exactly only with `--threads 1`.
    if spec.get("ants_seed") is not None:
        ants.config._random_seed = int(spec["ants_seed"])
    work = Path(spec["work"])
    out_dir = work / method
    out_dir.mkdir(parents=True, exist_ok=True)
    images: dict = {}

    def read(path: str):
        if path not in images:
            images[path] = ants.image_read(path)
        return images[path]

    records = []
    for pair in spec["pairs"]:
        i = pair["index"]
        fixed = read(pair.get("fixed", spec.get("fixed")))
        moving = read(pair["moving"])
        prefix = str(out_dir / f"pair{i:02d}_")
        if method == "ants_affine":
            kwargs = dict(type_of_transform="Affine")
        elif method == "ants_syn":
            # from ANTs' own affine of this pair; SyNOnly = the SyN stage alone (no second affine)
            init = str(work / "ants_affine" / f"pair{i:02d}_0GenericAffine.mat")
            kwargs = dict(type_of_transform="SyNOnly", initial_transform=init,
                          reg_iterations=tuple(spec["syn_iterations"]))
        else:
            raise SystemExit(f"brain3d_ants.py: unknown method {method!r}")
        reset_peak()
        rss_before = status_kb("VmRSS")
        w0, c0 = time.perf_counter(), time.process_time()
        reg = ants.registration(fixed, moving, outprefix=prefix, **kwargs)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        peak = status_kb("VmHWM")
        ants.image_write(reg["warpedmovout"], prefix + "warped.nii.gz")
        records.append({"index": i, "seconds": wall, "cpu_seconds": cpu, "peak_mb": peak / 1024.0,
                        "rss_before_mb": rss_before / 1024.0, "fwdtransforms": list(reg["fwdtransforms"])})
        rp = out_dir / "records.json"  # saved case by case: an interrupted worker keeps its finished cases
        old = json.loads(rp.read_text()) if rp.exists() else {"method": method, "records": []}
        old["records"] = sorted([r for r in old["records"] if r["index"] != i] + [records[-1]], key=lambda r: r["index"])
        rp.write_text(json.dumps(old, indent=1))
        print(f"  {method} case {i} ({pair.get('key', '')}): {wall:.1f} s wall, {cpu:.1f} s CPU, {peak / 1024:.0f} MB",
              flush=True)
    rp = out_dir / "records.json"
    old = json.loads(rp.read_text()) if rp.exists() else {}
    new_idx = {r["index"] for r in records}
    merged = [r for r in old.get("records", []) if r["index"] not in new_idx] + records
    rp.write_text(json.dumps({"method": method, "records": sorted(merged, key=lambda r: r["index"]),
                              "setup_seconds": old.get("setup_seconds") or {"import_ants": import_s},
                              "setup_seconds_runs": old.get("setup_seconds_runs", []) + [{"import_ants": import_s}],
                              "ants_version": ants.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
