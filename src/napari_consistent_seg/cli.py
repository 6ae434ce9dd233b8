"""The ``consistent-seg`` command line: segment, fine-tune, measure and train without Qt.

Stable contract (scripts rely on it):
``consistent-seg predict --model NAME_OR_PATH -o OUTDIR INPUT...`` writes ``OUTDIR/<input name>.nii.gz``
(labels 0..K on the input's grid and affine), and ``consistent-seg info NAME_OR_PATH --json`` prints
the model card, whose ``classes`` maps each label value to its name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .errors import ConsistentSegError
from .models.card import FINETUNE_METHODS


def _progress_bar(total: int | None, desc: str, unit: str = "it"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)


class _SliceBar:
    """A progress callback ``(done, total)`` whose bar appears at the first call, with that call's total
    (the model's slices, which its plane decides): input refused before any work shows no bar."""

    def __init__(self, desc: str, unit: str = "slice"):
        self.desc, self.unit, self.bar = desc, unit, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = _progress_bar(total, self.desc, unit=self.unit)
        self.bar.total, self.bar.n = total, done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- train ----------------------------------------------------------------------------------
def cmd_train(args) -> int:
    import torch

    from .training.config import load_config
    from .training.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"method": args.method, "iterations": args.iterations, "max_minutes": args.max_minutes,
                 "stop_at": args.stop_at, "seed": args.seed, "init_from": args.init_from}
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.run_dir or Path("runs") / cfg.name)
    command = "consistent-seg " + " ".join(sys.argv[1:])
    trainer = Trainer(cfg, run_dir, device=args.device, resume=args.resume, command=command)
    if trainer.rank == 0:
        print(f"{cfg.method} training of {cfg.name}: {trainer.n_labeled_slices} labeled / "
              f"{trainer.n_unlabeled_slices} unlabeled slices, from iteration {trainer.iteration} "
              f"to {cfg.iterations}, on {trainer.device}; run folder {run_dir}", file=sys.stderr)
    bar = _progress_bar(cfg.iterations, cfg.name) if trainer.rank == 0 else None
    if bar is not None:
        bar.update(trainer.iteration)

    def progress(i, total, logs):
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items()}, refresh=False)

    result = trainer.fit(progress=progress if bar is not None else None)
    if bar is not None:
        bar.close()
        print(f"stopped at iteration {result.iterations} ({'early' if result.stopped_early else 'done'}); "
              f"best val mean Dice {result.best_score:.4f}; best model in {run_dir / 'best'}")
    return 0


# ---- predict --------------------------------------------------------------------------------
def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def expand_inputs(inputs: list[str]) -> list[Path]:
    """NIfTI files and DICOM folders as given; a folder of NIfTI files becomes its files."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise ConsistentSegError(f"input {path} does not exist")
        niftis = sorted(p for p in path.glob("*.nii*") if p.is_file()) if path.is_dir() else []
        out.extend(niftis or [path])
    return out


def cmd_predict(args) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from .io import load_volume, save_volume

    try:
        inputs, missing = expand_inputs(args.inputs), None
    except ConsistentSegError as error:  # reported after the model's name, as before
        inputs, missing = [], error
    with ThreadPoolExecutor(1) as pool:
        # The first scan loads while torch and the model do (decompression frees the GIL):
        # about a second of a CT's 12 (docs/inference.md).
        preloaded = pool.submit(load_volume, inputs[0], modality=args.modality) if inputs else None
        from .inference import model_plane, segment
        from .metrics import class_sizes
        from .models.store import load_model

        model = load_model(args.model, with_modules=False)
    if missing is not None:
        raise missing
    outdir = Path(args.output)
    outdir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for i, path in enumerate(inputs):
        try:
            volume = preloaded.result() if i == 0 else load_volume(path, modality=args.modality)
        except ConsistentSegError as exc:
            print(f"skipped {path}: {exc}", file=sys.stderr)
            failures += 1
            continue
        for warning in volume.meta.get("warnings", []):
            print(f"warning: {path.name}: {warning}", file=sys.stderr)
        phases = f", {volume.n_phases} phases" if volume.n_phases else ""
        print(f"{path.name}: {volume.geometry.describe_plane()} acquisition{phases}; model slices in its "
              f"{model_plane(model)} plane", file=sys.stderr)
        bar = _SliceBar(path.name)
        labels = segment(model, volume, device=args.device, keep_largest=args.keep_largest, progress=bar)
        bar.close()
        for warning in labels.meta["warnings"]:
            print(f"warning: {path.name}: {warning}", file=sys.stderr)
        target = outdir / f"{_nifti_stem(path)}.nii.gz"
        save_volume(labels, target)
        first = labels.phase(0).data if labels.n_phases else labels.data
        sizes = class_sizes(first, model.classes, volume.geometry)
        print(f"{target}\t" + ("phase 0: " if labels.n_phases else "") + "\t".join(f"{n}={v}" for n, v in sizes.items()))
    return 1 if failures else 0


# ---- finetune -------------------------------------------------------------------------------
def cmd_finetune(args) -> int:
    import torch

    from .inference import segment
    from .io import load_labels, load_volume, save_nifti
    from .models.store import load_model, save_model
    from .training.finetune import (check_painted, finetune, model_slices, most_changed_slices, recipe, slices_text,
                                     whole_slice_known)

    if args.threads:
        torch.set_num_threads(args.threads)
    volume = load_volume(args.image, modality=args.modality)
    model = load_model(args.model)
    painted = load_labels(args.painted, "the corrections", on=volume)
    # painted slices as napari shows them (the scan's own slices), before any change of plane
    known = None if args.known is None else load_labels(args.known, "a known mask", on=volume)
    for warning in painted.meta["warnings"] + ([] if known is None else known.meta["warnings"]):
        print(f"warning: {warning}", file=sys.stderr)
    painted = check_painted(painted.data, model)
    known = whole_slice_known(painted) if known is None else known.data != 0
    # the starting model's segmentation: the anchor holds what its clean-up added to the network's call,
    # and the classes the user labeled on no known voxel keep it
    start = segment(model, volume, device=args.device).data
    # the model learns from slices in its own plane; a cine gives the slices of all its phases
    (image, labels, known_slices, start_slices), spacing = model_slices(model, volume, volume.data, painted, known,
                                                                        start)
    # --seconds alone: as many steps as fit; no --steps: the model's recipe (the widget's default)
    steps = 10**9 if args.seconds else recipe(model)["steps"] if args.steps is None else args.steps
    bar = _progress_bar(None if args.seconds else steps, f"fine-tuning {model.name}", unit="step")

    def progress(done, total):
        bar.n = done
        bar.refresh()

    tuner = finetune(model, image, labels, known_slices, steps=steps, seconds=args.seconds,
                     spacing_mm=spacing, modality=volume.modality, device=args.device, progress=progress,
                     method=args.method, start=start_slices)
    bar.close()
    for warning in tuner.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    tuned = tuner.finished_model()
    # every phase, on the scan's own grid; the painted voxels win, the clean-up keeps their slices,
    # and the classes the user labeled on no known voxel keep the starting model's labels
    merged = segment(tuned, volume, device=args.device, corrections=(painted, known, start)).data
    outdir = Path(args.output)
    outdir.mkdir(parents=True, exist_ok=True)
    target = save_nifti(merged, volume.geometry, outdir / f"{_nifti_stem(Path(args.image))}.nii.gz", is_label=True)
    folder = save_model(outdir / "model", tuned.backbone, tuned.card, tuned.modules)
    print(f"{target}\t{tuner.steps_done} steps in {tuner.elapsed_s:.1f} s on {len(tuner.painted_slices)} "
          f"painted slices ({tuner.known_voxels} known voxels); {tuner.share_text}")
    print(f"{folder}\tmodel (load it with --model {folder})")
    changed = most_changed_slices(start, merged, known)
    if changed:  # slices as napari's slider numbers them (the scan's own, a cine's phases summed)
        print(f"check slices {slices_text(changed)}: changed most beyond the corrections, against the "
              "starting model's segmentation")
    return 0


# ---- attention ------------------------------------------------------------------------------
def cmd_attention(args) -> int:
    import re

    from .inference import attention_volume
    from .io import load_volume, save_nifti
    from .models.store import load_model

    volume = load_volume(args.image, modality=args.modality)
    phase = 0 if args.phase is None else args.phase
    if phase < 0:
        raise ConsistentSegError(f"--phase counts from 0, got {phase}")
    stem = _nifti_stem(Path(args.image)) + ("" if volume.n_phases is None else f"_phase{phase}")
    volume = volume.phase(phase)  # says which phases a cine has, and that a 3D scan has phase 0 only
    model = load_model(args.model)  # with its external modules: the class queries live there
    bar = _SliceBar(f"attention of {model.name}")  # a bad --scale or --head is refused before it shows
    maps = attention_volume(model, volume, scale=args.scale, head=args.head, device=args.device, progress=bar)
    bar.close()
    outdir = Path(args.output)
    outdir.mkdir(parents=True, exist_ok=True)
    for k, name in model.classes.items():
        if k == 0 and not args.background:
            continue
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        target = save_nifti(maps[k], volume.geometry, outdir / f"{stem}_attention_{slug}.nii.gz", is_label=False)
        z = int(np.argmax(maps[k].reshape(len(maps[k]), -1).max(1)))
        print(f"{target}\t{name}: peak {maps[k].max():.1f} x uniform, on slice {z}")
    return 0


# ---- evaluate -------------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    from .io import load_labels
    from .metrics import evaluate_labels, format_table, summarise, write_csv

    preds = expand_inputs(args.predictions)
    ref_dir = Path(args.references)
    classes = None
    if args.model:
        from .models.store import read_card

        classes = read_card(args.model).foreground
    per_case, rows = {}, []
    for pred_path in preds:
        ref_path = ref_dir / pred_path.name if ref_dir.is_dir() else ref_dir
        if not ref_path.exists():
            print(f"skipped {pred_path.name}: no reference {ref_path}", file=sys.stderr)
            continue
        ref = load_labels(ref_path, "a reference segmentation")
        pred = load_labels(pred_path, "a segmentation", on=ref)
        for warning in pred.meta["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        found = set(np.unique(ref.data).tolist()) | set(np.unique(pred.data).tolist())
        case_classes = classes or {int(k): f"label {int(k)}" for k in sorted(found) if k > 0}
        case_rows = evaluate_labels(pred.data, ref.data, case_classes, ref.spacing_mm)
        per_case[_nifti_stem(pred_path)] = case_rows
        rows += [{"case": _nifti_stem(pred_path), **r} for r in case_rows]
    if not per_case:
        raise ConsistentSegError("no prediction had a matching reference: name them alike")
    summary = summarise(per_case)
    print(format_table(summary["per_class"] + [summary["mean"]]))
    if args.csv:
        write_csv(rows, args.csv)
        print(f"per-case rows written to {args.csv}")
    return 0


# ---- strip / info / list --------------------------------------------------------------------
def cmd_strip(args) -> int:
    from .training.trainer import strip_run

    folder = strip_run(args.run, args.output, keep_modules=not args.no_modules)
    print(f"stripped model written to {folder}")
    return 0


def _benchmark_lines(bench: dict) -> list[str]:
    """A card's ``benchmark`` (val Dice as `segment` gives it, with the card's post-processing), a line a val set."""
    names = {"keep_largest_component": "largest component per class", "cardiac": "cardiac clean-up"}
    post = " + ".join(name for key, name in names.items() if bench.get("postprocessing", {}).get(key))
    post = (post or "no post-processing") + (", the region search first" if bench.get("inference") else "")
    lines = []
    for source, scores in bench.get("val", {}).items():
        mean, raw = scores.get("mean", {}), scores.get("raw_mean", {})
        nan = float("nan")
        lines.append(f"benchmark {bench.get('date', '?')} on {source}, {post}: "
                     f"Dice {100 * mean.get('dice', nan):.1f} % (raw {100 * raw.get('dice', nan):.1f} %), "
                     f"HD95 {mean.get('hd95_mm', nan):.2f}, ASD {mean.get('asd_mm', nan):.2f} "
                     "(mm where the files know their voxel size, else voxels)")
    return lines


def cmd_info(args) -> int:
    from .models.store import read_card, resolve_model_path

    card = read_card(args.model)
    if args.json:
        print(json.dumps(card.to_dict(), indent=2))
        return 0
    training = card.training
    print(f"{card.name}  ({resolve_model_path(args.model)})")
    if card.description:
        print(f"  {card.description}")
    spacing = f"{card.target_spacing_mm} mm" if card.target_spacing_mm else "the scan's own"
    print(f"  modalities: {', '.join(card.modalities)}; patch {card.patch_size}; "
          f"in-plane spacing {spacing}; slices in the {card.plane} plane")
    print("  classes: " + ", ".join(f"{k}={v}" for k, v in card.classes.items()))
    if training.method:
        print(f"  trained: {training.method} for {training.iterations} iterations, "
              f"{training.wall_time_s} s on {training.hardware}")
    for start in training.earlier_stages:
        print(f"  started from {start.get('name', '?')} of {str(start.get('created', '?'))[:10]}: "
              f"{start.get('method', '?')} for {start.get('iterations', '?')} iterations")
    for record in card.fine_tuning:  # a fine-tuned model: each round, oldest first
        slices = record.get("painted_slices") or []
        print(f"  fine-tuned from {record.get('from_model', '?')} ({record.get('method', '?')}): "
              f"{record.get('steps', '?')} steps on {record.get('known_voxels', '?')} known voxels of "
              f"{len(slices)} slice(s), {record.get('wall_time_s', '?')} s")
    if card.val_scores.get("mean") is not None:
        print(f"  val mean Dice at training (the network's raw output): {100 * card.val_scores['mean']:.1f} %")
    for line in _benchmark_lines(card.extra.get("benchmark") or {}):  # benchmarks/accuracy.py --update-cards
        print(f"  {line}")
    print(f"  external modules: {'yes (' + card.modules['kind'] + ')' if card.modules else 'no'}")
    return 0


def cmd_list(args) -> int:
    from .models.store import list_models

    for m in list_models():
        print(f"{m['name']:28s} {m['source']:8s} {'/'.join(m['modalities']):6s} {m['path']}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.inputs, output=Path(args.output), device=args.device)


# ---- cardiac-function -----------------------------------------------------------------------
def cmd_cardiac_function(args) -> int:
    from .cardiac import cine_function, frames_function, function_table
    from .io import load_volume
    from .models.store import load_model

    if args.cine and (args.ed or args.es):
        raise ConsistentSegError("give either a CINE scan or --ed and --es, not both")
    if not args.cine and not (args.ed and args.es):
        raise ConsistentSegError("give a CINE scan (4D NIfTI or cine DICOM folder), or both --ed and --es")
    model = load_model(args.model, with_modules=False)
    volumes = [load_volume(p, modality=args.modality) for p in ([args.cine] if args.cine else [args.ed, args.es])]
    if args.cine and not volumes[0].n_phases:
        raise ConsistentSegError(f"{args.cine} is a single 3D scan, not a cine: give its ED and ES frames "
                                 "with --ed ED --es ES")
    bar = _SliceBar("segmenting")  # a refused scan shows none (the scan's warnings: in the table)
    options = {"clean": args.clean, "device": args.device, "progress": bar}
    result, _ = cine_function(model, volumes[0], **options) if args.cine else frames_function(model, *volumes,
                                                                                              **options)
    bar.close()
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(function_table(result, title=f"cardiac function ({model.name})"))
    if args.csv:
        from .metrics import write_csv

        print(f"per-phase volumes written to {write_csv(result.phase_rows(), args.csv)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="consistent-seg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config (supervised | icl | eam)")
    p.add_argument("config", help="YAML training config (see configs/)")
    p.add_argument("--method", choices=["supervised", "icl", "eam"], help="override the config's method")
    p.add_argument("--run-dir", help="where checkpoints go (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--iterations", type=int, help="override the planned number of iterations")
    p.add_argument("--max-minutes", type=float, help="stop (resumably) after this many minutes")
    p.add_argument("--stop-at", type=int, help="stop (resumably) at this iteration; the LR schedule is unchanged")
    p.add_argument("--seed", type=int)
    p.add_argument("--init-from", metavar="MODEL",
                   help="start from this model's weights (a name or folder) instead of a random init")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="segment NIfTI files, DICOM folders or folders of NIfTI files")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--model", "-m", required=True, help="shipped/user model name, or a model folder")
    p.add_argument("--output", "-o", required=True, help="folder for <input name>.nii.gz label files")
    p.add_argument("--keep-largest", action=argparse.BooleanOptionalAction, default=None,
                   help="keep each class's largest connected component only (default: as the model card says)")
    p.add_argument("--modality", choices=["CT", "MR"], help="override the modality read from the file")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("finetune", help="fine-tune a model on one scan from corrections; write the result and the model")
    p.add_argument("image", help="the scan: NIfTI file or DICOM folder")
    p.add_argument("painted", help="labels on the image's grid: your corrections (0 = background where known)")
    p.add_argument("--model", "-m", required=True, help="shipped/user model name, or a model folder")
    p.add_argument("--known", metavar="MASK", help="non-zero where PAINTED was edited (default: every slice "
                   "of PAINTED with a label is known in full)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the widget's)")
    budget.add_argument("--seconds", type=float,
                        help="as many steps as fit in this many seconds of training (no steps are planned, "
                             "so the last step's weights are kept rather than the mean of the last ones)")
    p.add_argument("--method", choices=FINETUNE_METHODS, default=None,
                   help="supervised: the corrections, anchored to the starting model elsewhere; icl: adds ICL's "
                        "unlabeled terms (a step costs about 1.6 times; docs/training.md). Default: the model's recipe")
    p.add_argument("--output", "-o", required=True, help="folder for <image name>.nii.gz and model/")
    p.add_argument("--modality", choices=["CT", "MR"], help="override the modality read from the file")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("attention", help="class-attention maps of a model's external modules, as NIfTI images "
                                         "on the scan's grid (one per class)")
    p.add_argument("image", help="the scan: NIfTI file or DICOM folder")
    p.add_argument("--model", "-m", required=True, help="a model saved with its external modules (ICL or EAM)")
    p.add_argument("--output", "-o", required=True, help="folder for <image name>_attention_<class>.nii.gz")
    p.add_argument("--scale", type=int, default=0, help="decoder tap: 0 = deepest (stride 8, default), 1, 2")
    p.add_argument("--head", type=int, default=None, help="one attention head (default: their mean)")
    p.add_argument("--phase", type=int, default=None, help="for a cine: the phase (default 0)")
    p.add_argument("--background", action="store_true", help="also the background query's map")
    p.add_argument("--modality", choices=["CT", "MR"], help="override the modality read from the file")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("evaluate", help="Dice, HD95 and ASD (mm) of predictions against references")
    p.add_argument("predictions", nargs="+", help="label files or folders")
    p.add_argument("--references", "-r", required=True, help="folder of reference label files (same names)")
    p.add_argument("--model", help="take class names from this model's card")
    p.add_argument("--csv", help="write per-case, per-class rows here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("strip", help="stripped model (backbone + card, modules beside) from a training run")
    p.add_argument("run", help="training run folder (holds state.safetensors)")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--no-modules", action="store_true", help="do not keep the external modules")
    p.set_defaults(func=cmd_strip)

    p = sub.add_parser("info", help="show a model card")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("list", help="list shipped and user models")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("demo", help="segment a bundled default (or the given inputs) and report")
    p.add_argument("inputs", nargs="*")
    p.add_argument("--output", "-o", default="out/demo")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("cardiac-function",
                       help="LV/RV EDV, ESV, SV, EF and LV mass from a short-axis cine or its ED and ES frames")
    p.add_argument("cine", nargs="?", metavar="CINE", help="4D NIfTI or cine DICOM folder (ED/ES: largest/smallest LV)")
    p.add_argument("--ed", help="the end-diastolic frame (NIfTI or DICOM folder), with --es")
    p.add_argument("--es", help="the end-systolic frame, with --ed")
    p.add_argument("--model", "-m", default="cardiac-cine-mri", help="a cardiac model (default cardiac-cine-mri)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--csv", help="write the per-phase volumes here")
    p.add_argument("--clean", action=argparse.BooleanOptionalAction, default=True,
                   help="cardiac clean-up of the labels (false hearts, islands, broken rings; default on)")
    p.add_argument("--modality", choices=["CT", "MR"], help="override the modality read from the file")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_cardiac_function)
    return parser


def main(argv=None) -> int:
    """The command line (``argv`` None: sys.argv, a process of its own; else a call from Python)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    finally:
        if argv is None:
            # The process ends next: the interpreter's last garbage collection would walk every
            # object torch's import made, about 1 s on our CPU (docs/inference.md). Frozen
            # objects are skipped; atexit handlers still run.
            import gc

            gc.freeze()


def _run(args) -> int:
    try:
        return args.func(args)
    except ConsistentSegError as exc:
        print(f"consistent-seg: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output folder that is a file, a full disk, no permission
        print(f"consistent-seg: error: {exc}; check the paths and that you may write there", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("consistent-seg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
