"""Fine-tuning benchmark: does a fine-tune from a few corrections help on the voxels nobody painted?

For each case, the starting model segments the scan; "corrections" are then simulated from the
expert labels, in one of these painting modes:
  worst2   two whole slices, the two where the starting model has the most wrong voxels;
  spread2  two whole slices at 1/3 and 2/3 of the labeled slice range;
  strokes  brush strokes (disks of radius 3 px) of the expert label over the wrong voxels of the
           3 worst slices, biggest mistakes first; the voxels they change (what napari records,
           about 300 a slice) are known, nothing else.
Each fine-tuning method then runs one round from the same corrections, and the Dice (mean over
the classes in the reference) on the voxels that were NOT painted is compared before and after.

  .venv/bin/python benchmarks/finetune.py --sets acdc mnms2 sunnybrook --paint worst2 strokes \
      --methods default icl supervised --csv out/finetune.csv --markdown docs/finetune-benchmark.md

Cases: acdc val, mnms2 short-axis ED/ES, sunnybrook_cine ED/ES with cardiac-cine-mri; chaos_t2 and
btcv_ct val with abdomen-ct-mri. mnms2 and sunnybrook are oblique: they are read with nibabel and
sliced along the NIfTI's third axis (their acquisition axis). Sunnybrook's labels miss the RV (and
the myocardium at ES) and some slices: only contoured slices and labeled classes are scored, and
voxels the model calls an unlabeled class are not taken as known when painting.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from napari_consistent_seg.inference import predict_volume
from napari_consistent_seg.io import load_volume
from napari_consistent_seg.models.store import load_model
from napari_consistent_seg.training.data import map_labels
from napari_consistent_seg.training.finetune import DEFAULTS, Finetuner

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BTCV_MAP = {6: 1, 1: 2, 2: 3, 3: 4}
CHAOS_MAP = {1: 1, 4: 2, 2: 3, 3: 4}

#: method name -> Finetuner options ("none" is the starting model).
METHODS = {
    "default": dict(DEFAULTS),
    "icl": {"method": "icl", "anchor": 0.0, "steps": 60},  # the fine-tuner before issue 13
    "supervised": {"method": "supervised", "anchor": 0.0, "steps": 60},
    "icl+anchor": {"method": "icl", "anchor": 1.0, "steps": 60},
    "icl+anchor+conf": {"method": "icl", "anchor": 1.0, "steps": 60, "confidence_threshold": 0.95},
}


@dataclass
class Case:
    set: str
    name: str
    image: np.ndarray  # (Z, Y, X), Z = acquisition (slice) axis
    labels: np.ndarray
    spacing_mm: tuple
    modality: str
    model: str
    scored_classes: list[int]
    scored_slices: np.ndarray  # bool (Z,)


def _nib_zyx(path: Path):
    import nibabel as nib

    img = nib.load(str(path))
    zooms = img.header.get_zooms()[:3]
    return np.asarray(img.dataobj).transpose(2, 1, 0), (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def load_cases(sets: list[str], limit: int | None) -> list[Case]:
    splits = json.loads((DATA / "splits.json").read_text())["splits"]
    cases = []
    for s in sets:
        if s == "acdc":
            for name in splits["acdc"]["val"][:limit]:
                v = load_volume(DATA / "acdc/images" / f"{name}.nii.gz")
                lab = load_volume(DATA / "acdc/labels" / f"{name}.nii.gz").data.astype(np.uint8)
                cases.append(Case(s, name, v.data, lab, v.spacing_mm, "MR", "cardiac-cine-mri", [1, 2, 3],
                                  lab.reshape(len(lab), -1).any(1)))
        elif s in ("mnms2", "sunnybrook"):
            names = ["001_SA_ED", "001_SA_ES"] if s == "mnms2" else ["SCD0000301_ED", "SCD0000301_ES"]
            folder = DATA / ("mnms2" if s == "mnms2" else "sunnybrook_cine")
            for name in names:
                image, spacing = _nib_zyx(folder / "images" / f"{name}.nii.gz")
                lab = _nib_zyx(folder / "labels" / f"{name}.nii.gz")[0].astype(np.uint8)
                classes = [c for c in (1, 2, 3) if (lab == c).any()]
                cases.append(Case(s, name, image.astype(np.float32), lab, spacing, "MR", "cardiac-cine-mri",
                                  classes, lab.reshape(len(lab), -1).any(1)))
        elif s in ("chaos_t2", "btcv_ct"):
            for name in splits[s]["val"][:limit]:
                v = load_volume(DATA / s / "images" / f"{name}.nii.gz")
                lab = map_labels(load_volume(DATA / s / "labels" / f"{name}.nii.gz").data,
                                 BTCV_MAP if s == "btcv_ct" else CHAOS_MAP)
                cases.append(Case(s, name, v.data, lab, v.spacing_mm, "CT" if s == "btcv_ct" else "MR",
                                  "abdomen-ct-mri", [1, 2, 3, 4], np.ones(len(lab), bool)))
        else:
            raise SystemExit(f"unknown set {s}")
    return cases


def dice_on(pred, ref, where, classes) -> float:
    """Mean Dice (%) over ``classes`` on the voxels of ``where``; a class absent from both counts 100."""
    scores = []
    for c in classes:
        p, r = (pred == c) & where, (ref == c) & where
        denom = p.sum() + r.sum()
        scores.append(100.0 if denom == 0 else 200.0 * (p & r).sum() / denom)
    return float(np.mean(scores))


def corrections(case: Case, pred: np.ndarray, mode: str, rng) -> tuple[np.ndarray, np.ndarray]:
    """(labels, known) a user would give in ``mode``, simulated from the expert labels."""
    ref = case.labels
    unlabeled_classes = [c for c in range(1, int(max(ref.max(), pred.max())) + 1)
                         if c not in case.scored_classes and case.set == "sunnybrook"]
    wrong = (pred != ref) & case.scored_slices[:, None, None]
    for c in unlabeled_classes:
        wrong &= pred != c
    scored = np.flatnonzero(case.scored_slices)
    errors = wrong.reshape(len(ref), -1).sum(1)
    known = np.zeros(ref.shape, bool)
    if mode in ("worst2", "spread2"):
        if mode == "worst2":
            picks = [z for z in np.argsort(-errors, kind="stable") if case.scored_slices[z]][:2]
        else:
            picks = [scored[len(scored) // 3], scored[(2 * len(scored)) // 3]]
        known[picks] = True
    elif mode == "strokes":
        picks = [z for z in np.argsort(-errors, kind="stable") if case.scored_slices[z]][:3]
        disk = np.hypot(*np.mgrid[-3:4, -3:4]) <= 3
        for z in picks:
            blobs, n = ndimage.label(wrong[z])
            if n == 0:
                continue
            sizes = ndimage.sum(np.ones_like(blobs), blobs, range(1, n + 1))
            budget = 300
            for blob in np.argsort(-sizes) + 1:  # biggest mistakes first, as a user would
                pts = np.argwhere(blobs == blob)
                for y, x in pts[rng.permutation(len(pts))][: max(1, len(pts) // 20)]:
                    patch = np.zeros(ref.shape[1:], bool)
                    patch[max(y - 3, 0):y + 4, max(x - 3, 0):x + 4] = disk[max(3 - y, 0):7 - max(y + 4 - ref.shape[1], 0),
                                                                          max(3 - x, 0):7 - max(x + 4 - ref.shape[2], 0)]
                    known[z] |= patch & wrong[z]  # napari records the voxels a stroke changed
                    if known[z].sum() >= budget:
                        break
                if known[z].sum() >= budget:
                    break
    else:
        raise SystemExit(f"unknown painting mode {mode}")
    for c in unlabeled_classes:  # no truth there: leave the model's own call unknown
        known &= pred != c
    return np.where(known, ref, 0).astype(np.uint8), known


def run_round(model, case: Case, labels, known, options: dict, seconds: float | None):
    options = dict(options)
    steps = options.pop("steps")
    started = time.monotonic()
    tuner = Finetuner(model, case.image, labels, known, spacing_mm=case.spacing_mm, modality=case.modality,
                      device="cpu", **options)
    for _ in range(steps):
        tuner.step()
        if seconds and time.monotonic() - started >= seconds:
            break
    tuned_s = time.monotonic() - started
    pred = predict_volume(tuner.model, case.image, spacing_mm=case.spacing_mm, modality=case.modality,
                          device="cpu").labels
    return pred, tuned_s, tuner.steps_done


def summarise(rows: list[dict]) -> str:
    """Markdown: per method and starting-Dice band, mean / worst / share improved of the Dice change."""
    def band(start):
        return "< 70" if start < 70 else "70-75" if start < 75 else "75-85" if start < 85 else ">= 85"

    out = ["| painting | method | start Dice | rounds | mean change | worst change | improved | mean round (s) |",
           "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["paint"], r["method"], band(float(r["before"]))) for r in rows},
                  key=lambda k: (k[0], k[1], ["< 70", "70-75", "75-85", ">= 85"].index(k[2])))
    for paint, method, b in keys + [(p, m, "all") for p, m in sorted({(r["paint"], r["method"]) for r in rows})]:
        sel = [r for r in rows if r["paint"] == paint and r["method"] == method
               and (b == "all" or band(float(r["before"])) == b)]
        delta = np.array([float(r["after"]) - float(r["before"]) for r in sel])
        secs = np.array([float(r["seconds"]) for r in sel])
        out.append(f"| {paint} | {method} | {b} | {len(sel)} | {delta.mean():+.1f} | {delta.min():+.1f} | "
                   f"{(delta > 0).mean() * 100:.0f} % | {secs.mean():.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=["acdc", "mnms2", "sunnybrook", "chaos_t2", "btcv_ct"])
    p.add_argument("--limit", type=int, help="first N val cases of each split-based set")
    p.add_argument("--cases", nargs="*", help="only these case names")
    p.add_argument("--paint", nargs="+", default=["worst2", "spread2", "strokes"])
    p.add_argument("--methods", nargs="+", default=["default", "icl", "supervised"])
    p.add_argument("--set-option", nargs="*", default=[], metavar="METHOD.KEY=VALUE",
                   help="override a method's option, e.g. default.steps=40")
    p.add_argument("--seconds", type=float, help="stop each round after this many seconds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--csv", type=Path, help="append one row per round here (rows already there are skipped)")
    p.add_argument("--markdown", type=Path, help="write the summary table here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = {m: dict(METHODS[m]) for m in args.methods}
    for item in args.set_option:
        key, value = item.split("=", 1)
        method, option = key.split(".", 1)
        methods[method][option] = value if option == "method" else float(value) if "." in value else int(value)
    rows, done = [], set()
    if args.csv and args.csv.is_file():
        with args.csv.open() as f:
            rows = list(csv.DictReader(f))
        done = {(r["case"], r["paint"], r["method"]) for r in rows}
    fields = ["set", "case", "paint", "method", "before", "after", "seconds", "steps", "known_voxels", "options"]
    models = {}
    for case in load_cases(args.sets, args.limit):
        if args.cases and case.name not in args.cases:
            continue
        model = models.setdefault(case.model, load_model(case.model))
        before = predict_volume(model, case.image, spacing_mm=case.spacing_mm, modality=case.modality,
                                device="cpu").labels
        for paint in args.paint:
            labels, known = corrections(case, before, paint, np.random.default_rng(0))
            where = ~known & case.scored_slices[:, None, None]
            start = dice_on(before, case.labels, where, case.scored_classes)
            for name, options in methods.items():
                if (case.name, paint, name) in done:
                    continue
                after, secs, steps = run_round(model, case, labels, known, options, args.seconds)
                row = {"set": case.set, "case": case.name, "paint": paint, "method": name,
                       "before": f"{start:.2f}", "after": f"{dice_on(after, case.labels, where, case.scored_classes):.2f}",
                       "seconds": f"{secs:.1f}", "steps": steps, "known_voxels": int(known.sum()),
                       "options": json.dumps(options, sort_keys=True)}
                rows.append(row)
                print(f"{case.set:10s} {case.name:20s} {paint:8s} {name:16s} {row['before']:>6s} -> "
                      f"{row['after']:>6s}  {secs:5.1f} s", flush=True)
                if args.csv:
                    new = not args.csv.is_file()
                    args.csv.parent.mkdir(parents=True, exist_ok=True)
                    with args.csv.open("a", newline="") as f:
                        writer = csv.DictWriter(f, fieldnames=fields)
                        if new:
                            writer.writeheader()
                        writer.writerow(row)
    if rows:
        table = summarise(rows)
        print(table)
        if args.markdown:
            args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
