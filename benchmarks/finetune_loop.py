"""The clinician's loop, repeated: segment, paint the two worst slices, fine-tune, Accept, and again.

Each round paints (simulated from the expert labels, as ``benchmarks/finetune.py`` does) the two
slices the accepted segmentation now gets most wrong, fine-tunes the model the last round left with
the model card's recipe on every correction so far (as the widget does: its known mask grows), and
Accepts (corrections win). Scored after each round: Dice (%) on the voxels no round has painted,
of the first segmentation and of the accepted one, and of the round before (what this round adds).
``--fresh``: each round fine-tunes the starting model instead (the fine-tuned weights dropped, as
Revert drops them). Rows: benchmarks/finetune-loop-rows.csv; results: docs/training.md, "Where it stands".

    CONSISTENT_SEG_PRECISION=float32 python benchmarks/finetune_loop.py --csv rows.csv   # 24 scans, ~25 min a core
    python benchmarks/finetune_loop.py --cases patient030_frame02 --rounds 3 --fresh
"""
import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import finetune as fb  # noqa: E402

from napari_consistent_seg.inference import segment  # noqa: E402
from napari_consistent_seg.models.store import load_model  # noqa: E402

SCORES = ["first", "before", "after"]
#: the round's share of the change kept, and for strokes the share of the voxels they label that they change
FIELDS = ["set", "case", "mode", "round", "painted_slices", "known_voxels", *SCORES, "paint", "blend", "changed_share"]


def loop(model, case: fb.Case, rounds: int, paint: str, fresh: bool = False):
    """Yield one row a round (dict of FIELDS). ``fresh``: every round fine-tunes the starting model on
    all the corrections so far, instead of continuing from the last round's."""
    shipped = model
    options = fb.options_for(model, {"steps": fb.DEFAULTS["steps"], "anchor_to_start": True})
    first = accepted = segment(model, case.volume, device="cpu").data
    labels, known = np.zeros(first.shape, np.uint8), np.zeros(first.shape, bool)
    for r in range(1, rounds + 1):
        new_labels, new_known = fb.corrections(case, accepted, paint, np.random.default_rng(r))
        labels, known = np.where(new_known, new_labels, labels), known | new_known
        # as the widget: the anchor holds the round's model's own segmentation, and Accept keeps the
        # first one for the classes the user never labeled
        if fresh:
            model = shipped
        own = first if model is shipped else segment(model, case.volume, device="cpu").data
        tuner = fb.tuner_for(model, case, labels, known, options, own)
        for _ in range(options["steps"]):
            tuner.step()
        model, before = tuner.model, accepted
        accepted = segment(model, case.volume, device="cpu", corrections=(labels, known, first)).data
        where = ~known & case.scored_slices[:, None, None]
        score = [fb.dice_on(s, case.labels, where, case.scored_classes) for s in (first, before, accepted)]
        yield {"set": case.set, "case": case.name, "mode": "fresh" if fresh else "continue", "round": r,
               "painted_slices": " ".join(map(str, np.flatnonzero(known.reshape(len(known), -1).any(1)))),
               "known_voxels": int(known.sum()), **{k: f"{v:.2f}" for k, v in zip(SCORES, score)}, "paint": paint,
               "blend": tuner.blend,
               "changed_share": "" if tuner.changed_share is None else f"{tuner.changed_share:.3f}"}


def summary(rows: list[dict]) -> str:
    """Markdown: per mode, painting and round, the mean and worst change from the first segmentation and
    from the round before."""
    out = ["| mode | paint | round | scans | first -> accepted: mean | worst | round before -> accepted: mean | "
           "worst | scans lower than the round before by > 1 |", "|---|---|---|---|---|---|---|---|---|"]

    def key(row):
        return row["mode"], row.get("paint") or "worst2", int(row["round"])
    for group in sorted({key(row) for row in rows}):
        sel = [row for row in rows if key(row) == group]
        total = np.array([float(s["after"]) - float(s["first"]) for s in sel])
        step = np.array([float(s["after"]) - float(s["before"]) for s in sel])
        out.append(f"| {' | '.join(map(str, group))} | {len(sel)} | {total.mean():+.2f} | {total.min():+.2f} | "
                   f"{step.mean():+.2f} | {step.min():+.2f} | {(step < -1).sum()} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=["acdc", "mnms2", "sunnybrook"])
    p.add_argument("--cases", nargs="*", help="only these case names")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--paint", default="worst2", choices=["worst2", "strokes", "brush"])
    p.add_argument("--fresh", action="store_true",
                   help="each round fine-tunes the starting model on all corrections so far (not the last round's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--csv", type=Path, help="append the rows here (scans already there are skipped)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = list(csv.DictReader(args.csv.open())) if args.csv and args.csv.is_file() else []
    mode = "fresh" if args.fresh else "continue"
    done = {row["case"] for row in rows if row["mode"] == mode and row.get("paint", "worst2") == args.paint}
    model = load_model("cardiac-cine-mri")
    for case in fb.load_cases(args.sets, None):
        if (args.cases and case.name not in args.cases) or case.name in done:
            continue
        scan = []
        for row in loop(model, case, args.rounds, args.paint, args.fresh):
            scan.append(row)
            print(f"{row['case']:20s} round {row['round']}: slices {row['painted_slices']:14s} never painted: "
                  f"{row['first']} first, {row['before']} -> {row['after']}", flush=True)
        rows += scan
        if args.csv:  # a scan's rows once all its rounds are done, so that a rerun resumes by scan
            new = not args.csv.is_file()
            with args.csv.open("a", newline="") as f:  # an older file keeps its columns
                writer = csv.DictWriter(f, fieldnames=FIELDS if new else list(rows[0]), extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerows(scan)
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
