"""How much anatomy a model paints on acdc slices whose expert label is empty (no heart there).

Checks the reading in docs/training.md that ICL's unlabeled terms teach the network to find every
class in every slice: it compares the shipped ICL model with the supervised-7 baseline on the val
frames and on the 63 unlabeled training patients' frames (raw output, no post-processing).

    python benchmarks/empty_slices.py [--baseline runs/bench/sup-7/best] [--min-pixels 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_consistent_seg.demo import find_shared_data
from napari_consistent_seg.inference import segment
from napari_consistent_seg.io import load_volume
from napari_consistent_seg.models.store import load_model
from napari_consistent_seg.training.data import select_cases

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cardiac-cine-mri")
    parser.add_argument("--baseline", default=str(ROOT / "runs" / "bench" / "sup-7" / "best"))
    parser.add_argument("--min-pixels", type=int, default=100, help="a slice counts as painted from this many pixels")
    args = parser.parse_args(argv)
    data = find_shared_data()
    if data is None:
        sys.exit("no ../shared/data beside the checkout (or $CONSISTENT_SEG_DATA)")
    models = {"model": load_model(args.model, with_modules=False),
              "baseline": load_model(args.baseline, with_modules=False)}
    sets = {"val": select_cases(data, "acdc", "val"),
            "unlabeled train": select_cases(data, "acdc", "train", skip_patients=7)}
    print("| frames | slices with an empty label | model | of them painted | painted pixels on them |")
    print("|---|---|---|---|---|")
    for set_name, cases in sets.items():
        counts = {name: [0, 0] for name in models}
        n_empty = 0
        for case in cases:
            image, reference = load_volume(case.image, modality="MR"), load_volume(case.label).data
            empty = (reference > 0).sum((1, 2)) == 0
            n_empty += int(empty.sum())
            for name, model in models.items():
                pred = segment(model, image, keep_largest=False).data
                painted = (pred > 0).sum((1, 2))[empty]
                counts[name][0] += int((painted >= args.min_pixels).sum())
                counts[name][1] += int(painted.sum())
        for name, (slices, pixels) in counts.items():
            print(f"| {set_name} ({len(cases)}) | {n_empty} | {models[name].name} | {slices} | {pixels} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
