#!/usr/bin/env python3
"""CPU fast paths of torch for the bundled 3D models (issue #12 item 4): what each one saves, measured.

On the bundled brain models (48^3 internal grid, 8 ITN channels), one thread by default:

- ITN pass (`representation`, what the one pass runs twice per stage): under ``torch.no_grad`` (the engine),
  ``torch.inference_mode``, with oneDNN (mkldnn) disabled, and as a frozen TorchScript module put through
  ``torch.jit.optimize_for_inference`` (oneDNN convolution layouts, folded constants);
- ``torch.compile`` of the same ITN, rebuilt as an eager module (the models are TorchScript files, which
  ``torch.compile`` does not take): compile time and per-call time, or why it did not run;
- refinement iteration (STN forward, warp, MSE, backward, optimizer step, as in `istn.refinement.refine`):
  the engine's own Adam (`istn.refinement.Adam`, foreach kernels), ``torch.optim.Adam`` fused / foreach /
  for-loop, and the engine's with oneDNN off; and what the first ``torch.optim.Adam`` of a process costs.

Median milliseconds of ``--repeats`` calls after two warm-up calls. Maps are ITN outputs of two random 48^3 images
(the cost does not depend on the content).

    python benchmarks/cpu_fast_paths.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ISTNRegistration"))

from report import write_report  # noqa: E402
import torch  # noqa: E402

from istn.demo import MODELS_DIR  # noqa: E402
from istn.export import load_model  # noqa: E402
from istn.losses import refinement_loss  # noqa: E402
from istn.networks import ISTN  # noqa: E402
from istn.refinement import Adam  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def itn_rows(module, x: torch.Tensor, repeats: int) -> list[dict]:
    rows = []

    def no_grad():
        with torch.no_grad():
            return module.representation(x)

    def inference():
        with torch.inference_mode():
            return module.representation(x)

    ref = no_grad()
    rows.append({"what": "ITN pass, torch.no_grad (engine)", "ms": median_ms(no_grad, repeats)})
    rows.append({"what": "ITN pass, torch.inference_mode", "ms": median_ms(inference, repeats)})
    with torch.backends.mkldnn.flags(enabled=False):
        rows.append({"what": "ITN pass, no_grad, oneDNN disabled", "ms": median_ms(no_grad, repeats)})
    try:
        frozen = torch.jit.freeze(module.eval(), preserved_attrs=["representation"])
        fast = torch.jit.optimize_for_inference(frozen, other_methods=["representation"])

        def optimised():
            with torch.no_grad():
                return fast.representation(x)

        diff = float((optimised() - ref).abs().max())
        rows.append({"what": "ITN pass, frozen + optimize_for_inference", "ms": median_ms(optimised, repeats),
                     "note": f"max |difference| {diff:.2e}"})
    except Exception as exc:  # noqa: BLE001 - report why, do not stop
        rows.append({"what": "ITN pass, frozen + optimize_for_inference", "ms": None,
                     "note": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"})
    return rows


def compile_row(model, x: torch.Tensor, repeats: int) -> dict:
    try:
        eager = ISTN(model.config)
        eager.load_state_dict(model.module.state_dict())
        eager.eval()
        compiled = torch.compile(eager.itn)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(x)
        first = time.perf_counter() - t0

        def call():
            with torch.no_grad():
                return compiled(x)

        return {"what": "ITN pass, torch.compile (eager rebuild)", "ms": median_ms(call, repeats),
                "note": f"first call (compilation) {first:.1f} s"}
    except Exception as exc:  # noqa: BLE001
        return {"what": "ITN pass, torch.compile (eager rebuild)", "ms": None,
                "note": f"failed: {type(exc).__name__}: {traceback.format_exception_only(exc)[-1].strip()[:160]}"}


def refine_rows(module, s: torch.Tensor, t: torch.Tensor, repeats: int) -> list[dict]:
    stn = list(module.stn.parameters())
    saved = [p.detach().clone() for p in stn]
    for p in module.parameters():
        p.requires_grad_(False)
    for p in stn:
        p.requires_grad_(True)
    rows = []
    for name, kw, mkldnn in (("istn.refinement.Adam (engine: foreach kernels)", None, True),
                             ("torch.optim.Adam(fused=True)", {"fused": True}, True),
                             ("torch.optim.Adam(foreach=True)", {"foreach": True}, True),
                             ("torch.optim.Adam(foreach=False)", {"foreach": False}, True),
                             ("istn.refinement.Adam, oneDNN disabled", None, False)):
        with torch.no_grad():
            for p, v in zip(stn, saved):
                p.copy_(v)
        opt = Adam(stn, 1e-4) if kw is None else torch.optim.Adam(stn, lr=1e-4, **kw)

        def step():
            params = module.predict(s, t)
            loss = refinement_loss(module.warp(s, module.sampling_grid(params)), t)
            opt.zero_grad()
            loss.backward()
            opt.step()

        with torch.backends.mkldnn.flags(enabled=mkldnn):
            rows.append({"what": f"refinement iteration, {name}", "ms": median_ms(step, repeats)})
    with torch.no_grad():
        for p, v in zip(stn, saved):
            p.copy_(v)
    return rows


def first_optimizer_row() -> dict:
    """Seconds of the first ``torch.optim.Adam`` a fresh process builds (it imports torch._dynamo)."""
    code = ("import time, torch; t = time.perf_counter(); torch.optim.Adam([torch.zeros(1, requires_grad=True)]); "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"what": "first torch.optim.Adam(...) of a process (imports torch._dynamo)",
            "ms": 1000.0 * float(out.stdout.strip().splitlines()[-1]), "note": "once per process; istn's Adam: 0"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu_fast_paths"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.rand(1, 1, 48, 48, 48), torch.rand(1, 1, 48, 48, 48)
    results = {}
    for kind in ("affine", "bspline"):
        model = load_model(MODELS_DIR / f"brain-t1-{kind}.pt")
        module = model.module
        with torch.no_grad():
            s, t = module.representation(x), module.representation(y)
        rows = itn_rows(module, x, args.repeats) if kind == "affine" else []
        if kind == "affine" and not args.no_compile:
            rows.append(compile_row(model, x, args.repeats))
        rows += refine_rows(load_model(model.path).module, s, t, args.repeats)
        if kind == "affine":
            rows.append(first_optimizer_row())
        results[kind] = rows
        for r in rows:
            print(kind, r, flush=True)
    summary = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
               "torch": torch.__version__, "repeats": args.repeats, "results": results}
    md = [f"# CPU fast paths of torch, bundled 3D models ({summary['created']})", "",
          f"Command: `python benchmarks/cpu_fast_paths.py --threads {args.threads}`; torch {torch.__version__}, "
          f"{args.threads} thread(s), shared machine; median of {args.repeats} after 2 warm-up calls. The ITN pass is "
          "the same network in both models (measured on the affine one).", "",
          "| model | what | ms | note |", "| --- | --- | --- | --- |"]
    for kind, rows in results.items():
        for r in rows:
            ms = f"{r['ms']:.1f}" if r["ms"] is not None else "-"
            md.append(f"| {kind} | {r['what']} | {ms} | {r.get('note', '')} |")
    write_report(args.out, summary, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
