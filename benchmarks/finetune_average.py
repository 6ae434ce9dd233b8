"""Screen: the fine-tuned weights averaged over the second half of the steps, on the 24 hard rounds.

The trained copy's weights are averaged over the last steps (31-60: "tail"; 1-60: "full"; 21-60,
41-60), and the result is the starting weights plus ``share`` of the averaged change (against the
last step's weights, share 0.5, the default until 2026-12-01). One training per round serves every
variant; each is scored as the Accept writes it (``segment(..., corrections=(labels, known,
start))``), Dice change on the unpainted voxels.
Results and the command: docs/finetune-history.md, "Fine-tuning" (2026-12-01). Steps 31-60 at 0.5 became
the default after the full 124-round run of benchmarks/finetune.py (``average_last`` 0.5).

    python benchmarks/finetune_average.py            # about 15 min on 2 cores
    python benchmarks/finetune_average.py --variants "tail-avg 0.5" "avg 21-60 0.5" --threads 1
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import finetune as fb  # noqa: E402

from napari_consistent_seg.inference import segment  # noqa: E402
from napari_consistent_seg.models.store import load_model  # noqa: E402
from napari_consistent_seg.training.finetune import recipe, running_mean  # noqa: E402

HARD = ["patient002_frame02", "patient028_frame02", "patient030_frame02", "patient039_frame02",
        "patient085_frame02", "SCD0000301_ES"]
#: name -> (the first step averaged, the share of the averaged change kept); one training serves all
VARIANTS = {"tail-avg 0.5": (31, 0.5), "tail-avg 1": (31, 1.0), "full-avg 1": (1, 1.0),
            "avg 21-60 0.5": (21, 0.5), "avg 41-60 0.5": (41, 0.5), "tail-avg 0.4": (31, 0.4),
            "tail-avg 0.6": (31, 0.6), "tail-avg 0.7": (31, 0.7)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = {name: VARIANTS[name] for name in args.variants}
    results = {}
    for case in [c for c in fb.load_cases(["acdc", "sunnybrook"], None) if c.name in HARD]:
        model = load_model(case.model)
        before = segment(model, case.volume, device="cpu").data
        for paint in ["worst2", "spread2", "strokes", "organ"]:
            labels, known = fb.corrections(case, before, paint, np.random.default_rng(0))
            # scored as the benchmark did when these figures were made: the labeled slices only
            where = ~known & case.labeled_slices[:, None, None]
            start = fb.dice_on(before, case.labels, where, case.scored_classes)
            # the script averages for itself; "last step": share 0.5 for strokes too, as until 2026-12-01
            base = recipe(model)
            options = {**base, "average_last": 0.0, "stroke_blend": base["blend"]}
            tuner = fb.tuner_for(model, case, labels, known, options)
            averages = {first: None for first, _ in variants.values()}
            for s in range(1, options["steps"] + 1):
                tuner.step()
                for first in [f for f in averages if s >= f]:
                    averages[first] = running_mean(averages[first], tuner.trained.backbone.parameters(), s - first + 1)
            models = {"last step": tuner.model}
            for name, (first, share) in variants.items():
                models[name] = tuner.blended(share, weights=averages[first])
            row = {}
            for name, m in models.items():
                labels_out = segment(m, case.volume, device="cpu", corrections=(labels, known, before)).data
                row[name] = fb.dice_on(labels_out, case.labels, where, case.scored_classes) - start
            results[(case.name, paint)] = row
            print(case.name, paint, f"{start:.2f}", " ".join(f"{k}: {v:+.2f}" for k, v in row.items()), flush=True)
    for name in ["last step", *variants]:
        d = np.array([r[name] for r in results.values()])
        print(f"{name}: mean {d.mean():+.2f}, worst {d.min():+.2f}, lower by > 1: {(d < -1).sum()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
