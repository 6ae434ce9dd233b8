"""Screen: the fine-tuned weights averaged over the second half of the steps, on the 24 hard rounds.

The trained copy's weights are averaged over steps 31-60 ("tail") or 1-60 ("full"), and the result
is the starting weights plus ``share`` of the averaged change (the default: the last step's weights,
share 0.5). One training per round serves every variant; each is scored as the Accept writes it
(``segment(..., corrections=(labels, known, start))``), Dice change on the unpainted voxels.
Results and the command: docs/training.md, "Fine-tuning" (2026-12-01). Not the default yet: it
needs the full 124-round run of benchmarks/finetune.py.

    python benchmarks/finetune_average.py            # about 15 min on 2 cores
"""
import copy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import finetune as fb  # noqa: E402

from napari_consistent_seg.inference import segment  # noqa: E402
from napari_consistent_seg.models.store import load_model  # noqa: E402
from napari_consistent_seg.training.finetune import recipe  # noqa: E402

HARD = ["patient002_frame02", "patient028_frame02", "patient030_frame02", "patient039_frame02",
        "patient085_frame02", "SCD0000301_ES"]
VARIANTS = [("tail-avg 0.5", "tail", 0.5), ("tail-avg 1", "tail", 1.0), ("full-avg 1", "full", 1.0)]


def running_mean(into, params, n):
    with torch.no_grad():
        for a, p in zip(into, params):
            a.add_((p - a) / n)


def main() -> int:
    torch.set_num_threads(2)
    results = {}
    for case in [c for c in fb.load_cases(["acdc", "sunnybrook"], None) if c.name in HARD]:
        model = load_model(case.model)
        before = segment(model, case.volume, device="cpu").data
        for paint in ["worst2", "spread2", "strokes", "organ"]:
            labels, known = fb.corrections(case, before, paint, np.random.default_rng(0))
            where = ~known & case.scored_slices[:, None, None]
            start = fb.dice_on(before, case.labels, where, case.scored_classes)
            options = recipe(model)
            steps = options.pop("steps")
            tuner = fb.tuner_for(model, case, labels, known, options)
            averages = {k: [p.detach().clone() for p in tuner.trained.backbone.parameters()] for k in ("tail", "full")}
            for s in range(1, steps + 1):
                tuner.step()
                running_mean(averages["full"], tuner.trained.backbone.parameters(), s)
                if s > steps // 2:
                    running_mean(averages["tail"], tuner.trained.backbone.parameters(), s - steps // 2)
            models = {"default": tuner.model}
            for name, which, share in VARIANTS:
                models[name] = copy.deepcopy(tuner.model)
                with torch.no_grad():
                    for out, first, avg in zip(models[name].backbone.parameters(), tuner.teacher.parameters(),
                                               averages[which]):
                        torch.lerp(first, avg, share, out=out)
            row = {}
            for name, m in models.items():
                labels_out = segment(m, case.volume, device="cpu", corrections=(labels, known, before)).data
                row[name] = fb.dice_on(labels_out, case.labels, where, case.scored_classes) - start
            results[(case.name, paint)] = row
            print(case.name, paint, f"{start:.2f}", " ".join(f"{k}: {v:+.2f}" for k, v in row.items()), flush=True)
    for name in ["default"] + [v[0] for v in VARIANTS]:
        d = np.array([r[name] for r in results.values()])
        print(f"{name}: mean {d.mean():+.2f}, worst {d.min():+.2f}, lower by > 1: {(d < -1).sum()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
