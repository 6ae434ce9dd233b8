"""A probe of 2026-12-03, not adopted: L2-SP (the sum of the squared changes of the weights, times a weight,
added to the loss) in place of the output anchor (anchor 0), on the rounds that decide below 70 % and
never-worse. The methods are benchmarks/finetune.py's with this fine-tuner; `l2sp-0-check` is anchor 0 alone.

    CONSISTENT_SEG_PRECISION=float32 python benchmarks/probe_l2sp.py --sets acdc --cases patient030_frame02 \
        --paint worst2 spread2 strokes organ --methods l2sp-0.003 l2sp-0.03 l2sp-0.3 l2sp-0-check \
        --blends 1.0 --threads 1 --csv rows.csv     # and patient028_frame02 with --paint worst2 strokes brush

Rows: benchmarks/probe-l2sp-rows.csv; results: docs/finetune-history.md, "L2-SP in place of the output anchor".
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import finetune as fb  # noqa: E402

from napari_consistent_seg.training import finetune as ft  # noqa: E402


class L2SPFinetuner(ft.Finetuner):
    def __init__(self, *args, l2sp: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.l2sp = l2sp

    def _losses(self, bb, *rest):
        total, terms = super()._losses(bb, *rest)
        if self.l2sp:
            terms["l2sp"] = sum(((p - p0) ** 2).sum() for p, p0 in zip(bb.parameters(), self.teacher.parameters()))
            total = total + self.l2sp * terms["l2sp"]
        return total, terms


fb.Finetuner = L2SPFinetuner
for a in (0.003, 0.03, 0.3):
    fb.METHODS[f"l2sp-{a:g}"] = {"steps": fb.DEFAULTS["steps"], "anchor": 0.0, "stroke_anchor": 0.0, "l2sp": a}
fb.METHODS["l2sp-0-check"] = {"steps": fb.DEFAULTS["steps"], "anchor": 0.0, "stroke_anchor": 0.0}
if __name__ == "__main__":
    sys.exit(fb.main(sys.argv[1:]))
