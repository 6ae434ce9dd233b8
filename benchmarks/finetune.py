"""Fine-tuning benchmark: does a fine-tune from a few corrections help on the voxels nobody painted?

For each case, the starting model segments the scan; "corrections" are then simulated from the
expert labels, in one of these painting modes:
  worst2   two whole slices, the two where the starting model has the most wrong voxels;
  spread2  two whole slices at 1/3 and 2/3 of the labeled slice range;
  strokes  brush dabs (disks of radius 3 px, 37 voxels) of the expert label centred on wrong
           voxels of the 3 worst slices, biggest mistakes first, about 300 voxels a slice; the
           voxels under the brush are known (right ones included, as the widget records them),
           nothing else;
  organ    one structure's boundary fixed on one slice: brush-size-5 dabs on every sixth wrong
           voxel of the class with the most wrong voxels, on its worst slice (at most 25 dabs);
  erase    one structure's leak into background erased on one slice: eraser dabs (size 5) on
           every sixth voxel the model gives the class that leaks most and the reference calls
           background, on its worst slice (at most 25 dabs; only background voxels count as known).
  brush    napari's brush as a user clicks it: size-5 dabs (21 voxels) on every 20th wrong voxel of
           the 3 worst slices (at most 15 a slice), each painting the expert label at its centre
           over its whole disk, so a dab on a boundary paints both sides with one label; the
           other modes paint the expert label under the brush, which one dab cannot.
Each fine-tuning method then runs one round from the same corrections, and the Dice (mean over
the classes in the reference) on the voxels that were NOT painted is compared before and after.

  .venv/bin/python benchmarks/finetune.py --sets acdc mnms2 sunnybrook --paint worst2 strokes \
      --methods default icl supervised --csv out/finetune.csv --markdown docs/finetune-benchmark.md
  .venv/bin/python benchmarks/finetune.py --timing --threads 1   # one default round, 10-slice scan

Cases: acdc val, mnms2 short-axis ED/ES, sunnybrook_cine ED/ES with cardiac-cine-mri; chaos_t2 and
btcv_ct val with abdomen-ct-mri. Every scan is read with ``load_volume`` and goes through the
product's own path, as the widget and ``consistent-seg finetune`` take it: ``model_slices`` gives
the fine-tuner the model's plane, and ``segment`` (corrections kept) scores the result on the
scan's grid. mnms2 and sunnybrook are oblique; the cardiac model slices them in their acquisition
plane. Dice is scored on every slice of acdc, mnms2 and the abdomen sets (their experts labeled
every slice with the organs on it: heart the model adds beyond the labeled base is wrong; before
the `every-slice` rows of 2026-12-02 the acdc and mnms2 rows scored the labeled slices only).
Sunnybrook's labels miss the RV (and the myocardium at ES) and some slices: only contoured slices
and labeled classes are scored, and voxels the model calls an unlabeled class are not taken as
known when painting. Paintings are simulated on the labeled slices.
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

from accuracy import KEPT_MARKER  # benchmarks/ is this script's folder: accuracy.py owns the marker
from napari_consistent_seg.inference import segment
from napari_consistent_seg.io import Volume, load_volume
from napari_consistent_seg.models.store import load_model
from napari_consistent_seg.training.data import map_labels
from napari_consistent_seg.training.finetune import DEFAULTS, Finetuner, model_slices, recipe

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BTCV_MAP = {6: 1, 1: 2, 2: 3, 3: 4}
CHAOS_MAP = {1: 1, 4: 2, 2: 3, 3: 4}

#: method name -> Finetuner options over the model's recipe ("default": the recipe as it is, which
#: the model card may set: the cardiac model anchors foreground and background alike with weight 1).
#: The methods of before 2026-12-01 blend the last step's weights (``average_last`` 0), and every
#: method but "default" and "stroke-blend" keeps one share for whole slices and strokes alike.
def _share(b: float) -> dict:
    return {"blend": b, "stroke_blend": b, "touchup_blend": b}


LAST = {**DEFAULTS, **_share(DEFAULTS["blend"]), "average_last": 0.0, "slice_weight": 1.0}
METHODS = {
    "default": {"steps": DEFAULTS["steps"]},
    "last-step": {"steps": DEFAULTS["steps"], **_share(0.5), "average_last": 0.0},  # the default until 2026-12-01
    "anchor-3": {**LAST, **_share(1.0)},  # every model's default until the evening of 2026-11-30
    "foreground-anchor-1": {**LAST, "anchor": 1.0, "anchor_groups": "foreground", **_share(1.0)},
    "foreground-anchor-3": {**LAST, "anchor_groups": "foreground", **_share(1.0)},
    "classes-anchor-3": {**LAST, "anchor_groups": "classes", **_share(1.0)},
    "voxels+classes-anchor-3": {**LAST, "anchor_groups": "voxels+classes", **_share(1.0)},
    "anchor-1": {**LAST, "anchor": 1.0, **_share(1.0)},  # the default until the morning of 2026-11-30
    "icl": {"method": "icl", "anchor": 0.0, "steps": 60, **_share(1.0), "average_last": 0.0,
            "confidence_threshold": 0.0},  # before issue 13
    "supervised": {"method": "supervised", "anchor": 0.0, "steps": 60, **_share(1.0), "average_last": 0.0},
    "icl+anchor": {"method": "icl", "anchor": 1.0, "steps": 60, **_share(1.0), "average_last": 0.0,
                   "confidence_threshold": 0.0},
    "icl+anchor+conf": {"method": "icl", "anchor": 1.0, "steps": 60, "confidence_threshold": 0.95, **_share(1.0),
                        "average_last": 0.0},
    "other-patches-2": {"steps": DEFAULTS["steps"], "other_patches": 2, **_share(0.5), "average_last": 0.0},
    # weights averaged over steps 31-60, share 0.5 for whole slices and strokes: the default of 2026-12-01
    "tail-average": {"steps": DEFAULTS["steps"], "average_last": 0.5, **_share(0.5)},
    # and share 0.25 for strokes: the default since the evening of 2026-12-01
    "stroke-blend": {"steps": DEFAULTS["steps"], "average_last": 0.5, "blend": 0.5, "stroke_blend": 0.25},
    # the default with the other slices' patches at 2/3 of the edge (128 x 128 for the shipped models)
    "other-patches-small": {"steps": DEFAULTS["steps"], "other_patch_scale": 0.667},
    # the same, scored with the start's heart slices kept by the cardiac clean-up (the rule on main
    # since 2026-12-02; with the cardiac card's other_patch_scale 0.667 it is the default on the heart)
    "small+start-slices": {"steps": DEFAULTS["steps"], "other_patch_scale": 0.667},
    # the other slices' patches at the card's full edge: the cardiac default until 2026-12-02
    "full-other-patches": {"steps": DEFAULTS["steps"], "other_patch_scale": 1.0},
    # each model's recipe once the anchor held only the slices' unknown voxels (not the padding that
    # augmentation brings in) and the teacher skipped the patches without one (the code since the
    # night of 2026-12-02; the rows of the methods above ran before it)
    "slice-anchor": {"steps": DEFAULTS["steps"]},
    # slice-anchor with the cardiac clean-up's end rules (cavity-less end slices kept, the walk to the
    # base from half-way through the slices with a cavity; on main since 2026-12-02, run on the heart's
    # rounds only: the abdomen model has no cardiac clean-up, so its rounds are slice-anchor's)
    "end-rules": {"steps": DEFAULTS["steps"]},
    # ICL's unlabeled terms on each model's recipe of 2026-12-02 (anchor, shares, averaging, the
    # other slices' patch size as the card sets them), confidence-masked at 0.95 as in training
    "icl-now": {"method": "icl", "steps": DEFAULTS["steps"], "confidence_threshold": 0.95},
    # the same in 40 steps: about the time of the supervised default's 60 on a CPU
    "icl-now-40": {"method": "icl", "steps": 40, "confidence_threshold": 0.95},
    # end-rules with the supervised loss weighted 2 when the corrections are whole slices (strokes
    # keep 1): the default since 2026-12-02 (recipe key slice_weight)
    "slice-weight-2": {"steps": DEFAULTS["steps"], "slice_weight": 2.0},
    # the same with weight 3 and 4 (probes of 2026-12-02, not adopted unless docs/training.md says so)
    "slice-weight-3": {"steps": DEFAULTS["steps"], "slice_weight": 3.0},
    "slice-weight-4": {"steps": DEFAULTS["steps"], "slice_weight": 4.0},
    # slice-weight-2 (the default) scored on every slice of acdc and M&Ms-2 (load_cases; the rows above
    # score the slices the expert labeled): a fine-tune that adds heart beyond the labeled base counts
    "every-slice": {"steps": DEFAULTS["steps"], "slice_weight": 2.0},
    "every-slice-weight-3": {"steps": DEFAULTS["steps"], "slice_weight": 3.0},
    # every-slice with the heart held to the start on the slices the user left alone (no heart past
    # its ends unless the user showed some, its end slices not widened, no slice's LV halved;
    # inference._held_to_start_heart, on main since 2026-12-02), run on the heart's rounds only
    "held-heart": {"steps": DEFAULTS["steps"], "slice_weight": 2.0},
    # held-heart with the cardiac card's share 0.85 for whole slices (since the evening of 2026-12-02)
    # and the clean-up refilling a collapsed slice (its LV under half the smaller neighbour's) as an
    # empty one, in place of the held rule that gave such a slice the start's labels (on main since
    # 2026-12-02, late); run on the heart's rounds only
    "collapsed-gap": {"steps": DEFAULTS["steps"], "slice_weight": 2.0, "blend": 0.85},
    # collapsed-gap with a slice refilled when its LV is under three quarters of the smaller
    # neighbour's (min_neighbour_share 0.75; the default since the night of 2026-12-02)
    "refill-3/4": {"steps": DEFAULTS["steps"], "slice_weight": 2.0, "blend": 0.85},
    # refill-3/4 with the anchor's target the start's labels (the cleaned-up segmentation the user
    # accepted) wherever the starting network calls another class, removals by the clean-up included
    # (a probe of 2026-12-02, late; not adopted: M&Ms-2 ES with one organ's dabs -11.91)
    "start-anchor": {"steps": DEFAULTS["steps"], "slice_weight": 2.0, "blend": 0.85, "anchor_to_start": True},
    # the same where the start labels heart the network did not call (what the clean-up added: a
    # refilled slice), Finetuner's ``start`` as the widget and the CLI pass it since then
    "start-fill": {"steps": DEFAULTS["steps"], "slice_weight": 2.0, "blend": 0.85, "anchor_to_start": True},
    # start-fill with strokes anchored as the recipe's DEFAULTS do (weight 3, every voxel alike; the cardiac
    # card's 1, foreground and background alike, stays for whole slices) and half their change kept
    "stroke-anchor-3": {"steps": DEFAULTS["steps"], "slice_weight": 2.0, "blend": 0.85, "anchor_to_start": True,
                        "stroke_anchor": 3.0, "stroke_anchor_groups": "voxels", "stroke_blend": 0.5},
    # the abdomen model's rows since 2026-12-03: its second-stage weights and its card's recipe (the
    # default with blend 0.25 for whole slices), as "default" runs it on that model
    "abdomen-12-03": {"steps": DEFAULTS["steps"]},
    # each model's card recipe since the evening of 2026-12-03, as the widget runs it (the anchor holding
    # what the clean-up added to the start): the cardiac card keeps 0.35 of the change for strokes and
    # 0.25 for a touch-up (strokes that change under touchup_below of the voxels they label from the start)
    "touchup": {"steps": DEFAULTS["steps"], "anchor_to_start": True},
}
#: methods that run a model's card recipe as it is: the loops below leave them alone
CARD_RECIPE = ("default", "abdomen-12-03", "touchup")
#: every method before slice-weight-2 ran with the supervised loss weighted 1
for _name in list(METHODS)[:list(METHODS).index("slice-weight-2")]:
    if _name not in CARD_RECIPE:
        METHODS[_name].setdefault("slice_weight", 1.0)
#: and every method since stroke-blend kept half the change for whole slices: the cardiac card keeps
#: 0.85 since the evening of 2026-12-02 (its rows: "held-heart, blend 0.85" on whole slices)
for _name in list(METHODS)[list(METHODS).index("stroke-blend") + 1:]:
    if _name not in CARD_RECIPE:
        METHODS[_name].setdefault("blend", DEFAULTS["blend"])
#: and every method before stroke-anchor-3 anchored strokes as whole slices and kept its own share of
#: their change, else DEFAULTS', as the cardiac card did until 2026-12-03 (`options_for`: their rows stay
#: reproducible)
for _name in list(METHODS)[:list(METHODS).index("stroke-anchor-3")]:
    if _name not in CARD_RECIPE:
        METHODS[_name]["strokes_as_slices"] = True
#: and every method before touchup kept its strokes' share for a touch-up too (`options_for`)
for _name in list(METHODS)[:list(METHODS).index("touchup")]:
    if _name not in CARD_RECIPE:
        METHODS[_name]["touchups_as_strokes"] = True


HEADER = """# Fine-tuning benchmark

Generated by `python benchmarks/finetune.py ... --csv benchmarks/finetune-rows.csv --markdown
docs/finetune-benchmark.md --benchmarks-md` (one round per line of the CSV; `--summary-only` rewrites
this file and the section of docs/benchmarks.md from the CSV). Each round starts from the shipped
model (cardiac-cine-mri for acdc, mnms2, sunnybrook; abdomen-ct-mri for chaos_t2, btcv_ct), simulates
corrections from the expert labels and scores the Dice (%, mean over the classes in the reference,
one 3D score per case) on the voxels that were **not** painted, before and after.

- **worst2**: the two whole slices where the starting model has the most wrong voxels are painted.
- **spread2**: two whole slices at a third and two thirds of the range of slices the reference
  labels (every slice for the abdomen), wherever the model is wrong or right.
- **strokes**: brush dabs of radius 3 px centred on wrong voxels of the three worst slices, about
  300 voxels a slice, right voxels under the brush included; nothing else is known.
- **organ**: one structure's boundary fixed on one slice: napari brush-size-5 dabs (21 voxels) on
  every sixth wrong voxel of the class with the most wrong voxels, on its worst slice, at most 25
  dabs (a user checking one organ; added on the evening of 2026-11-30, after a kidney corrected
  this way in napari vanished from the rest of a CT).
- **erase**: one structure's leak into background erased on one slice: napari eraser dabs (brush
  size 5) on every sixth voxel the starting model gives the class that leaks most where the
  reference has background, on its worst slice, at most 25 dabs; only the voxels under the eraser
  that the reference calls background count as known (a careful user). Corrections of one sign
  only, as with the kidney above (added on 2026-11-30, late evening).
- **brush**: napari's brush as a user clicks it: size-5 dabs (21 voxels) on every 20th wrong voxel
  of the three worst slices, at most 15 a slice, each painting the reference's label at its centre
  over its whole disk, so that a dab on a boundary paints both sides with one label (the modes
  above paint the reference's label under the brush, which one dab cannot); the widget counts the
  whole disk as known (added on the evening of 2026-12-01, after a check in napari).
- **default**: each model's recipe (`training.finetune.recipe`: supervised loss on the known voxels
  + an anchor to the starting model, 60 steps; bf16 forward passes on this CPU; the result's weights
  the starting ones plus half the change the steps made, `blend` 0.5), scored on what
  the widget's Accept and `consistent-seg finetune` write: `segment(..., corrections=(labels,
  known, start))`, the corrections winning where known, the cardiac clean-up keeping the slices the
  user corrected and left LV on, and the classes the user labeled on no known voxel (not corrected,
  or only erased) neither lost nor moved outside the known voxels (`inference.apply_corrections`;
  before the last 37 rounds below were run again, only the classes not touched at all). The cardiac model's card anchors the starting model's
  foreground and background alike with weight 1; the abdomen model keeps the plain anchor (the
  mean over voxels) with weight 3. Run late on the evening of 2026-11-30 on the current code
  (`--methods default --blends 0.5 0.6 0.7 0.85 1.0`): every scan read with `load_volume` and
  fine-tuned through `model_slices` as the widget does; one torch thread each, two rounds at a time.
- **default, blend B**: the same rounds (the same training), the weights blended at share B
  instead (B = 1: the trained weights themselves, the default before `blend`).
  The 37 rounds where a class was only erased or painted over (every erase round, four organ
  rounds, chaos case_31 strokes, case_32 two worst slices) were run again for every share after
  the rule above took in such classes; the other rows are unchanged by it.
- **default, float32 (12-01)** and **other-patches-2**: the default again, and the default with 2
  patches from the slices without corrections per step instead of 4 (`other_patches`), the
  issue's four paintings (124 rounds), run side by side on 2026-12-01 on a 2-core Zen 3 (float32:
  no bf16 in hardware), one torch thread each; so their starts differ from the `default` rows
  (Zen 4, bf16) by up to 1.5 points, and their round times are those of float32 on one thread.
- **tail-average**: the default since the afternoon of 2026-12-01 (`average_last` 0.5): the
  blend starts from the mean of the trained weights after steps 31-60 instead of the last step's;
  the issue's four paintings, run on the same Zen 3 in float32 as `default, float32 (12-01)` (the
  same starts), one torch thread per process, the cases split over two processes (a third job
  shared the cores for the first 40 minutes, so its round times are not comparable). The rows
  named `default` above are the recipe of before, the last step's weights.
- **stroke-blend**: the default since the evening of 2026-12-01 (`stroke_blend` 0.25): the
  `tail-average` training, and a quarter of the change kept when the corrections are strokes (a
  corrected slice known in part), half for whole slices. Run on the strokes and organ rounds (the
  same Zen 3, float32, two processes of one thread; `--methods stroke-blend --blends 0.5`, whose
  `blend 0.5` rows equal the `tail-average` rows on all 62 and are left out); on whole slices it is
  `tail-average` itself, and on the brush rounds `tail-average, blend 0.25`.
- **tail-average** and **tail-average, blend B** on the **brush** rounds: all 31 scans, one
  training per round scored at shares 0.5 (its own), 0.25, 0.35 and 0.75 on every slice, the same
  Zen 3 in float32, two processes of one thread, 2026-12-01 evening.
- **other-patches-small**: the default of the evening of 2026-12-01 (`tail-average` training,
  `stroke_blend` 0.25) with the 4 patches from the slices without corrections at two thirds of the
  patch edge (`other_patch_scale`, 128 x 128 for both shipped models; the corrections' 4 stay 192 x
  192): all 155 rounds of the five paintings but erase, on 2026-12-01 late evening, the same Zen 3
  in float32, two processes of one torch thread (so the same starts as `tail-average`). Not
  adopted for the abdomen (docs/finetune-history.md).
- **small+start-slices**: `other-patches-small` scored with the cardiac clean-up keeping the slices
  the user left alone where the start has LV (`inference.post_process` with the start): the 120
  cardiac rounds of the five paintings but erase, 2026-12-01 late evening, the same Zen 3, two
  processes of one thread; equal to `other-patches-small` on all 120 from seed 0. **The cardiac
  model's default since 2026-12-02** (its card: `other_patch_scale` 0.667); its seed rows (1-4) and
  the `default, seed N` rows of 2026-12-02 are the old default (`full-other-patches`).
- **full-other-patches**: the other slices' patches at the card's full edge (`other_patch_scale` 1):
  the cardiac default until 2026-12-02 (its rows are `tail-average`, `stroke-blend` and
  `tail-average, blend 0.25`).
- **slice-anchor**: each model's recipe on the code since the night of 2026-12-02: the anchor holds
  the unknown voxels of the slices only, not the corners that rotation and zoom pad into a patch
  (before, those were anchored too, so the teacher ran on every patch around whole painted
  slices for them); the teacher now runs only on patches with an unknown voxel. All 155 rounds of
  the five paintings but erase, the same Zen 3 in float32, two processes of one torch thread (the
  same starts as the rows above). **The default since then**: the cardiac rows replace
  `small+start-slices`, the abdomen rows `tail-average` / `stroke-blend` / `tail-average, blend 0.25`.
- **end-rules**: `slice-anchor` with the cardiac clean-up's end rules (a cavity-less end slice kept,
  the walk to the base from half-way through the slices with a cavity): the heart's 120 rounds
  (the abdomen model has no cardiac clean-up: its rounds are `slice-anchor`'s). **The default on
  the heart since 2026-12-02.**
- **icl-now**, **icl-now-40**: ICL's unlabeled terms on each model's recipe of 2026-12-02,
  confidence-masked at 0.95, in 60 and in 40 steps (40 take about the default's time): `icl-now`
  on 50 rounds of ten cardiac scans, `icl-now-40` on all 155 (the 105 beyond those 50 the same
  day, later); a lead, not the default (docs/finetune-history.md).
- **slice-weight-2**: `end-rules` (the abdomen: `slice-anchor`) with the supervised loss weighted 2
  when the corrections are whole slices (`slice_weight`; strokes keep 1, so only the two
  whole-slice paintings were run: 62 rounds, float32 forced by `CONSISTENT_SEG_PRECISION=float32`
  on a 2-core Zen 5, which gives the Zen 3's starts and `end-rules` results to the hundredth; two
  processes of one torch thread, 2026-12-02). **The default since then** on whole slices; on
  strokes, organ and brush rounds the default is `end-rules` / `slice-anchor` as before.
- **slice-weight-3**, **slice-weight-4**: the same 62 rounds with weight 3 and 4 (probes, the same
  machine and day); **slice-weight-2, seed 1** and **slice-weight-3, seed 1**: 53 and 52 of them
  from seed 1 (stopped before the btcv_ct rounds). Scored on the labeled slices; on every slice
  weight 3 loses acdc patient030 ED (below), so the default stays 2.
- **every-slice**: the default until `held-heart` (`slice-weight-2` on whole slices, `end-rules` on strokes) scored on
  every slice of acdc and mnms2 (above, *Scored slices*); **every-slice-weight-3** the same with
  whole slices weighted 3. The same Zen 5 in float32, two processes of one torch thread.
  **every-slice, seed 1**: the default's 62 whole-slice rounds from seed 1, scored so.
- **held-heart**: `every-slice` with the fine-tuned heart held to the start's on the slices the
  user left alone (`inference._held_to_start_heart`, since the afternoon of 2026-12-02). The 120
  rounds of the heart model (the abdomen model's are `every-slice`'s), from seeds 0, 1 and 2; the
  same Zen 5 in float32, two processes of one torch thread. **held-heart, blend B**: the same
  training's weights blended at share B, whole slices and strokes alike (seed 0: all 120 rounds;
  seed 1: the 48 whole-slice rounds, B 0.7 and 0.85; seed 2: those 48 at 0.85, run with
  `--set-option held-heart.blend=0.85` and renamed so). **The default since the evening of
  2026-12-02**: for the heart model, `held-heart, blend 0.85` on whole slices (its card's `blend`)
  and `held-heart` on strokes, organ and brush (share 0.25); for the abdomen model `every-slice`.
  Those rows blend Sunnybrook's whole-slice rounds at 0.85 too; the default then used 0.25 there,
  as their paintings left about 2 % of each slice unknown (the model's RV, which Sunnybrook's
  experts do not label) and so counted as strokes.
- **collapsed-gap**: the default since the late evening of 2026-12-02, on the heart's 120 rounds
  (seed 0; the abdomen model's are `every-slice`'s): `held-heart` with the card's share 0.85 for
  whole slices, the cardiac clean-up refilling a collapsed slice (its LV under half of the smaller
  neighbour's, `clean_cardiac_labels`' `min_neighbour_share`) in place of the held rule that gave
  such a slice the start's labels, and a slice counted as painted whole when 90 % of it is known
  (`finetune.WHOLE_SLICE_SHARE`; before: all of it). The refill raises Sunnybrook ED's start by 3.9
  points (its slice 6); nothing else's start moves. The same Zen 5 in float32, two processes of one
  torch thread.
- **refill-3/4**: `collapsed-gap` with a slice refilled when its LV is under three quarters of the
  smaller neighbour's (`min_neighbour_share` 0.75): **the default since the night of 2026-12-02**
  for the heart model (the abdomen model's rounds are `every-slice`'s). The heart's 120 rounds,
  seed 0, the same machine and setting; they equal `collapsed-gap` but on two rounds (Sunnybrook ED
  with one organ, acdc patient030 ES with dabs), where a slice the tuned network left between half
  and three quarters of its neighbours' LV is now refilled. **refill-3/4, seed 1**: the same 120
  rounds from seed 1.
- **start-anchor**: `refill-3/4` with the anchor's target the start's labels (the cleaned-up
  segmentation the user accepted, Finetuner's `start`) wherever the starting network calls another
  class, decided once on the slices as they are: the heart's 120 rounds, seed 0, on a 2-core Intel
  Xeon in float32 (which gives the Zen 5's starts and `refill-3/4` rows to the hundredth), two
  processes of one torch thread, the night of 2026-12-02. Not adopted: holding what the clean-up
  removed above the base as background lost M&Ms-2 ES with one organ's dabs (-11.91).
- **start-fill**: the same, held only where the start labels heart the network did not call (what
  the clean-up added: a refilled slice). **The default since the night of 2026-12-02** for the heart
  model (the widget and the CLI pass the start; the abdomen model, without a clean-up that adds,
  holds nothing more: its rounds are `every-slice`'s). The same machine and setting.
  **start-fill, seed 1**: the 15 rounds of the three scans where `start-fill` moved most from seed
  0 (Sunnybrook ED, acdc patient030 ES and patient039 ES), from seed 1.
- **stroke-anchor-3**: `start-fill` with a round of strokes anchored as the recipe's DEFAULTS do
  (weight 3, every voxel alike, not the cardiac card's 1 with foreground and background alike) and
  half its change kept; **stroke-anchor-3, blend B** the same training with the share B. The heart's
  72 stroke, organ and dab rounds, seed 0, the same machine and setting, 2026-12-03. Its `blend
  0.3` rows were the heart's default for strokes that day (the cardiac card's `stroke_anchor` 3,
  `stroke_anchor_groups` "voxels", `stroke_blend` 0.3); its whole slices stay `start-fill`'s. The
  methods above it anchor strokes as their whole slices, at their own share or DEFAULTS' 0.25 (as
  the card did when they ran). Every method before `touchup` keeps its strokes' share for a touch-up.
- **touchup**: each model's card recipe as the widget runs it, since the evening of 2026-12-03: for the
  heart, `stroke-anchor-3` keeping 0.35 of a round of strokes' change, or 0.25 when the round is a
  touch-up (strokes that change fewer than 72 % of the voxels they label from the start:
  `touchup_blend`, `touchup_below`). **The heart's default for strokes**: its 72 stroke, organ and
  dab rounds, seed 0, the same machine and setting; each row equals the `stroke-anchor-3` row of the
  share it picks. Whole slices are `start-fill`'s (the recipe did not change).
- **held-heart, anchor 0**: `held-heart` with no anchor (`--set-option held-heart.anchor=0
  held-heart.blend=0.85`, renamed so): the heart's 96 exact rounds (no brush), seed 0, the night of
  2026-12-02 before the collapsed-slice refill and the 90 % whole-slice rule; **held-heart, 120
  steps**: acdc patient030 ES's four exact rounds with 120 steps (blend 0.85). Probes for the
  start below 70 %, not adopted.
- **METHOD, seed N**: the same round trained from seed N instead of 0 (`--seed N`: other patch
  draws and augmentation, the same painting and start): how much of a round's figure is chance.
- **default 11-30 (blend 1)**: the default of earlier that evening (no blend; four paintings; only
  untouched classes held): it gives `default, blend 1` exactly on the 118 rounds the later rule
  leaves alone.
- **default without the untouched-class rule**: the same rounds, the same evening, scored without
  the `start` labels (the Accept of the day before).
- **classes-anchor-3**: the abdomen model anchored with `anchor_groups="classes"` (each class the
  starting model sees weighs alike; weight 3), the 12 btcv_ct rounds of three paintings, the same
  evening on the current code (it holds a kidney corrected by erasing on one slice; docs/finetune-history.md).
- **voxels+classes-anchor-3**: the abdomen model anchored with the mean of the plain and the
  per-class terms (`anchor_groups="voxels+classes"`, weight 3), its 28 rounds, the same evening.
- **foreground-anchor-3**: the abdomen model anchored with `anchor_groups="foreground"` (organs
  and background weigh alike; weight 3), its 28 rounds of four paintings, the same evening on the
  current code.
- **foreground-anchor-1**, **anchor-3** (every model's default until the evening of 2026-11-30;
  the plain anchor with weight 3) and **anchor-1** (the plain anchor with weight 1, the default
  until that morning): run earlier that day on the pipeline of then (mnms2 and Sunnybrook read in
  the NIfTI's file order, so their rows start from other Dice; instance norm; no untouched-class
  rule), worst2 and strokes only. The anchor-3 cardiac rows were run again after two clean-up
  changes (the base rule fixed; the user's LV slices kept); the anchor-1 rows before both, so acdc
  patient030_frame02 shows the first bug there (-37.8 / -24.5).
- **icl**: the former ICL fine-tuner (ICL's unlabeled terms on the other slices, no anchor);
  **supervised**: supervised loss on the known voxels only, no anchor. Both run on 2026-11-30 after
  both clean-up changes (the btcv rows after the first), on the 20 rounds that start below 85 %
  (10 scans, both paintings).
- **icl (11-29)** and **supervised (11-29)**: the former ICL fine-tuner (ICL's unlabeled terms, no
  anchor) and supervised-only fine-tuning, from the earlier run on fewer cases, on the pipeline of
  2026-11-29 (some of its cardiac rows before the cardiac clean-up): compare them with each other,
  not with today's rows.
- **abdomen-12-03**: the abdomen model's rows since 2026-12-03: its second training stage (CT seen
  both ways round and made unenhanced: docs/hu-ct.md) and its card's recipe, the default with a
  share of 0.25 for whole slices (`blend`); all six paintings, float32, a Xeon with two processes of
  one thread. Its starts differ from the earlier abdomen rows' because the model does.
- Start Dice bands are of the Dice on the unpainted voxels before fine-tuning.
- Round times are wall seconds of the steps with two rounds sharing the 2 cores (a Zen 4, bf16);
  a default round alone on a 10-slice scan: `--timing` (docs/finetune-history.md). The btcv_ct rows of
  `default` and its blends were run again on 2026-12-01, after `segment` gained its region search
  (docs/inference.md), which changed their start: on a Zen 3 (float32), one round at a time on 2
  threads, so their times are not comparable with the others.
- mnms2 and sunnybrook are oblique short-axis scans; the cardiac model slices them in their
  acquisition plane. **Scored slices**: since the `every-slice` rows (2026-12-02) every slice of
  acdc and mnms2 is scored, as for the abdomen sets (their experts labeled every slice with heart,
  so heart that a fine-tuned model adds beyond the labeled base or apex is wrong); every row before
  them scored the slices the expert labeled only, which missed such additions (a napari check on
  mnms2 001 ES found one: a fine-tuned model painting 1,353 voxels of heart on the slice above the
  labeled base). Sunnybrook's labels miss the RV (and the myocardium at ES) and some slices:
  only contoured slices and labeled classes are scored, and voxels the model calls an unlabeled
  class are left unknown when painting (so those classes stay untouched). acdc lost its voxel size
  upstream (1 mm assumed).
"""


@dataclass
class Case:
    set: str
    name: str
    volume: Volume  # the scan as load_volume reads it (its modality set)
    labels: np.ndarray  # on the volume's grid
    model: str
    scored_classes: list[int]
    labeled_slices: np.ndarray  # bool (Z,): the slices the expert labeled, where the painting is simulated
    scored_slices: np.ndarray  # bool (Z,): where Dice is scored (see load_cases)


def load_cases(sets: list[str], limit: int | None) -> list[Case]:
    splits = json.loads((DATA / "splits.json").read_text())["splits"]
    cases = []
    for s in sets:
        if s == "acdc":
            for name in splits["acdc"]["val"][:limit]:
                v = load_volume(DATA / "acdc/images" / f"{name}.nii.gz", modality="MR")
                lab = load_volume(DATA / "acdc/labels" / f"{name}.nii.gz").data.astype(np.uint8)
                cases.append(Case(s, name, v, lab, "cardiac-cine-mri", [1, 2, 3], lab.reshape(len(lab), -1).any(1),
                                  np.ones(len(lab), bool)))
        elif s in ("mnms2", "sunnybrook"):
            names = ["001_SA_ED", "001_SA_ES"] if s == "mnms2" else ["SCD0000301_ED", "SCD0000301_ES"]
            folder = DATA / ("mnms2" if s == "mnms2" else "sunnybrook_cine")
            for name in names:
                v = load_volume(folder / "images" / f"{name}.nii.gz", modality="MR")
                lab = load_volume(folder / "labels" / f"{name}.nii.gz").data.astype(np.uint8)
                classes = [c for c in (1, 2, 3) if (lab == c).any()]
                labeled = lab.reshape(len(lab), -1).any(1)
                # M&Ms-2's experts labeled every slice with heart; Sunnybrook's skipped some
                scored = np.ones(len(lab), bool) if s == "mnms2" else labeled
                cases.append(Case(s, name, v, lab, "cardiac-cine-mri", classes, labeled, scored))
        elif s in ("chaos_t2", "btcv_ct"):
            for name in splits[s]["val"][:limit]:
                v = load_volume(DATA / s / "images" / f"{name}.nii.gz", modality="CT" if s == "btcv_ct" else "MR")
                lab = map_labels(load_volume(DATA / s / "labels" / f"{name}.nii.gz").data,
                                 BTCV_MAP if s == "btcv_ct" else CHAOS_MAP)
                cases.append(Case(s, name, v, lab, "abdomen-ct-mri", [1, 2, 3, 4], np.ones(len(lab), bool),
                                  np.ones(len(lab), bool)))
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
    wrong = (pred != ref) & case.labeled_slices[:, None, None]
    for c in unlabeled_classes:
        wrong &= pred != c
    labeled = np.flatnonzero(case.labeled_slices)
    errors = wrong.reshape(len(ref), -1).sum(1)
    known = np.zeros(ref.shape, bool)
    if mode in ("worst2", "spread2"):
        if mode == "worst2":
            picks = [z for z in np.argsort(-errors, kind="stable") if case.labeled_slices[z]][:2]
        else:
            picks = [labeled[len(labeled) // 3], labeled[(2 * len(labeled)) // 3]]
        known[picks] = True
    elif mode in ("organ", "erase"):
        # organ: one structure's boundary fixed on one slice, as a user who checks one structure
        # would (the class with the most wrong voxels); erase: its leak into background erased, as
        # a user who cleans up a leak would (the class with most voxels the reference calls
        # background; only those count as erased: a careful user). On that class's worst slice,
        # brush size 5 dabs (napari's, 21 voxels) on every sixth such voxel, at most 25 dabs
        classes = [c for c in case.scored_classes if c not in unlabeled_classes]
        if mode == "organ":
            per_class = {c: wrong & ((ref == c) | (pred == c)) for c in classes}
        else:
            per_class = {c: wrong & (pred == c) & (ref == 0) for c in classes}
        c = max(classes, key=lambda k: int(per_class[k].sum()))
        z = int(np.argmax(per_class[c].reshape(len(ref), -1).sum(1)))
        yy, xx = np.mgrid[:ref.shape[1], :ref.shape[2]]
        allowed = ref[z] == 0 if mode == "erase" else True
        for y, x in np.argwhere(per_class[c][z])[::6][:25]:
            known[z] |= ((yy - y) ** 2 + (xx - x) ** 2 <= 4) & allowed
    elif mode == "strokes":
        picks = [z for z in np.argsort(-errors, kind="stable") if case.labeled_slices[z]][:3]
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
                    known[z] |= patch  # every voxel under the brush, as the widget records it
                    if known[z].sum() >= budget:
                        break
                if known[z].sum() >= budget:
                    break
    elif mode == "brush":
        # napari's brush as a user clicks it: each dab (size 5: a disk of 21 voxels) paints one label,
        # the reference's at its centre, over its whole disk, right or wrong (a dab on a boundary
        # paints both sides with one label); later dabs paint over earlier ones. Every 20th wrong
        # voxel of the three worst slices, at most 15 dabs a slice
        painted = np.zeros(ref.shape, np.uint8)
        yy, xx = np.mgrid[:ref.shape[1], :ref.shape[2]]
        for z in [z for z in np.argsort(-errors, kind="stable") if case.labeled_slices[z]][:3]:
            for y, x in np.argwhere(wrong[z])[::20][:15]:
                disk = (yy - y) ** 2 + (xx - x) ** 2 <= 6.25
                known[z] |= disk
                painted[z][disk] = ref[z, y, x]
        ref = painted  # what the user's dabs say, not the reference
    else:
        raise SystemExit(f"unknown painting mode {mode}")
    for c in unlabeled_classes:  # no truth there: leave the model's own call unknown
        known &= pred != c
    return np.where(known, ref, 0).astype(np.uint8), known


def options_for(model, options: dict) -> dict:
    """The recipe a method runs on ``model``: the card's, with the method's options over it; strokes
    anchored as the method's (else the card's) whole slices, with DEFAULTS' share, where the method
    says ``strokes_as_slices``; a touch-up given the strokes' share where it says ``touchups_as_strokes``."""
    options, card = dict(options), recipe(model)
    touchups_as_strokes = options.pop("touchups_as_strokes", False)
    if options.pop("strokes_as_slices", False):
        options.setdefault("stroke_blend", DEFAULTS["stroke_blend"])
        for key in ("anchor", "anchor_groups"):
            options.setdefault("stroke_" + key, options.get(key, card[key]))
    chosen = {**card, **options}
    if touchups_as_strokes:
        chosen["touchup_blend"] = chosen["stroke_blend"]
    return chosen


def tuner_for(model, case: Case, labels, known, options: dict, start: np.ndarray) -> Finetuner:
    """A fine-tuner on the model's slices of the case, as the widget and the CLI build it, with the
    recipe ``options`` (`options_for`); the anchor held to the ``start`` segmentation's labels when
    its ``anchor_to_start`` says so."""
    options = dict(options)
    to_start = options.pop("anchor_to_start", False)
    (image, painted, known_slices, start_slices), spacing = model_slices(
        model, case.volume, case.volume.data, labels, known, start if to_start else None)
    return Finetuner(model, image, painted, known_slices, spacing_mm=spacing, modality=case.volume.modality,
                     device="cpu", start=start_slices, **options)


def run_round(model, case: Case, labels, known, options: dict, seconds: float | None, start: np.ndarray,
              blends=(None,)):
    """One round; for each share of ``blends`` (None: the round's own, ``blend`` or for strokes
    ``stroke_blend``), the segmentation the widget's Accept and the CLI write with the weights
    blended so (one training serves all). Returns (segmentations, seconds, steps, the own share)."""
    steps = options["steps"]
    started = time.monotonic()
    tuner = tuner_for(model, case, labels, known, options, start)
    for _ in range(steps):
        tuner.step()
        if seconds and time.monotonic() - started >= seconds:
            break
    tuned_s = time.monotonic() - started
    # as the widget's Accept and the CLI: corrections win, classes the user did not label keep ``start``
    preds = [segment(tuner.model if b is None else tuner.blended(b), case.volume, device="cpu",
                     corrections=(labels, known, start)).data for b in blends]
    return preds, tuned_s, tuner.steps_done, tuner.blend


def time_rounds(threads: int, methods: dict, repeats: int = 2, paint: str = "worst2") -> int:
    """Wall time of rounds of each of ``methods`` (name -> options over the model's recipe),
    interleaved: the steps, as the widget's progress bar counts, and the whole round (set-up, steps
    and the segmentation that Accept writes) on acdc patient028_frame01 (10 slices, 256 x 224),
    painted as ``paint`` says (two whole slices unless told); the load average beside it."""
    import os

    (case,) = [c for c in load_cases(["acdc"], None) if c.name == "patient028_frame01"]
    model = load_model(case.model)
    before = segment(model, case.volume, device="cpu").data
    labels, known = corrections(case, before, paint, np.random.default_rng(0))
    for r in range(repeats):
        for name, chosen in methods.items():
            options = options_for(model, chosen)
            steps = options["steps"]
            started = time.monotonic()
            start = segment(model, case.volume, device="cpu").data  # the widget's round begins with it
            tuner = tuner_for(model, case, labels, known, options, start)
            for _ in range(steps):
                tuner.step()
            segment(tuner.model, case.volume, device="cpu", corrections=(labels, known, start))  # the Accept
            whole = time.monotonic() - started
            print(f"round {r + 1}, {name}: {steps} steps ({options}) in {tuner.elapsed_s:.1f} s, {whole:.1f} s "
                  f"with set-up and the Accept segmentation, on {threads} thread(s); load average "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    return 0


def per_case(rows: list[dict]) -> str:
    """Markdown: one line per case and painting, the Dice change of each method."""
    methods = sorted({r["method"] for r in rows}, key=lambda m: (list(METHODS).index(m) if m in METHODS else 99, m))
    out = ["| set | case | painting | known voxels | start Dice | " + " | ".join(methods) + " |",
           "|---|---|---|---|---|" + "---|" * len(methods)]
    keys = []
    for r in rows:
        if (r["set"], r["case"], r["paint"]) not in keys:
            keys.append((r["set"], r["case"], r["paint"]))
    for key in sorted(keys, key=lambda k: (k[2], k[0], k[1])):
        sel = {r["method"]: r for r in rows if (r["set"], r["case"], r["paint"]) == key}
        first = sel.get("default", next(iter(sel.values())))  # the start of the current pipeline where run
        cells = [f"{float(sel[m]['after']) - float(sel[m]['before']):+.1f}" if m in sel else "" for m in methods]
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {first['known_voxels']} | {float(first['before']):.1f} | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


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
    p.add_argument("--paint", nargs="+", default=["worst2", "spread2", "strokes", "organ", "erase", "brush"])
    p.add_argument("--methods", nargs="+", default=["default", "icl", "supervised"])
    p.add_argument("--set-option", nargs="*", default=[], metavar="METHOD.KEY=VALUE",
                   help="override a method's option, e.g. default.steps=40")
    p.add_argument("--seconds", type=float, help="stop each round after this many seconds")
    p.add_argument("--blends", nargs="+", type=float,
                   help="score each round's weights blended at these shares too (one row each, method "
                        "'NAME, blend B' unless B is the method's own)")
    p.add_argument("--seed", type=int, default=0,
                   help="the fine-tune's seed (its patch draws and augmentation; the painting does not change); "
                        "rows of a seed other than 0 are named 'METHOD, seed N'")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--csv", type=Path, help="append one row per round here (rows already there are skipped)")
    p.add_argument("--markdown", type=Path, help="write the summary table here")
    p.add_argument("--benchmarks-md", type=Path, nargs="?", const=BENCHMARKS_MD,
                   help="also put the summary in docs/benchmarks.md's fine-tuning section")
    p.add_argument("--timing", action="store_true", help="only time rounds of --methods, interleaved, on a 10-slice acdc scan "
                        "(painted as one --paint, else two whole slices)")
    p.add_argument("--summary-only", action="store_true", help="only summarise the rows of --csv")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.summary_only:
        with args.csv.open() as f:
            rows = list(csv.DictReader(f))
        return write_summary(rows, args.markdown, args.benchmarks_md)
    methods = {m: dict(METHODS[m]) for m in args.methods}
    for item in args.set_option:
        key, value = item.split("=", 1)
        method, option = key.split(".", 1)
        try:
            methods[method][option] = float(value) if "." in value else int(value)
        except ValueError:
            methods[method][option] = value  # a name: method, anchor_groups
    if args.seed:
        methods = {f"{name}, seed {args.seed}": {**options, "seed": args.seed} for name, options in methods.items()}
    if args.timing:
        return time_rounds(args.threads, methods, paint=args.paint[0] if len(args.paint) == 1 else "worst2")
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
        before = segment(model, case.volume, device="cpu").data
        for paint in args.paint:
            labels, known = corrections(case, before, paint, np.random.default_rng(0))
            where = ~known & case.scored_slices[:, None, None]
            start = dice_on(before, case.labels, where, case.scored_classes)
            for name, options in methods.items():
                chosen = options_for(model, options)
                # None: the round's own share, as the Accept; a number: that share (the own row already
                # when the method has one share for whole slices and strokes alike)
                shares = {chosen[key] for key in ("blend", "stroke_blend", "touchup_blend")}
                same = shares if len(shares) == 1 else set()
                blends = [None, *sorted(set(args.blends or []) - same)]
                names = {b: name if b is None else f"{name}, blend {b:g}" for b in blends}
                if all((case.name, paint, n) in done for n in names.values()):
                    continue
                preds, secs, steps, own = run_round(model, case, labels, known, chosen, args.seconds, before,
                                                    blends)
                for b, after in zip(blends, preds):
                    if (case.name, paint, names[b]) in done:
                        continue
                    row = {"set": case.set, "case": case.name, "paint": paint, "method": names[b],
                           "before": f"{start:.2f}", "after": f"{dice_on(after, case.labels, where, case.scored_classes):.2f}",
                           "seconds": f"{secs:.1f}", "steps": steps, "known_voxels": int(known.sum()),
                           "options": json.dumps({**chosen, **({} if b is None else _share(b)),
                                                  "share": own if b is None else b}, sort_keys=True)}
                    rows.append(row)
                    print(f"{case.set:10s} {case.name:20s} {paint:8s} {names[b]:22s} {row['before']:>6s} -> "
                          f"{row['after']:>6s}  {secs:5.1f} s", flush=True)
                    if args.csv:
                        new = not args.csv.is_file()
                        args.csv.parent.mkdir(parents=True, exist_ok=True)
                        with args.csv.open("a", newline="") as f:
                            writer = csv.DictWriter(f, fieldnames=fields)
                            if new:
                                writer.writeheader()
                            writer.writerow(row)
    return write_summary(rows, args.markdown, args.benchmarks_md)


#: docs/benchmarks.md: the fine-tuning summary goes below accuracy.py's marker (which keeps it).
BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


#: which rows are the shipped default's (said above the summary table in docs/benchmarks.md)
DEFAULT_ROWS = ("The default recipe's rows: for the heart model (its card's recipe since 2026-12-03) `start-fill` "
                "on whole slices (worst2, spread2: the anchor holding what the clean-up added to the start) and "
                "`touchup` on strokes, organ and brush (since the evening of 2026-12-03; `stroke-anchor-3, blend "
                "0.3` before); `abdomen-12-03` for the abdomen model "
                "(its second-stage weights and card; `every-slice` before 2026-12-03); the other methods are "
                "earlier defaults and probes, each described in finetune-benchmark.md.")


def write_summary(rows: list[dict], markdown: Path | None, benchmarks_md: Path | None = None) -> int:
    if not rows:
        return 0
    table = summarise(rows)
    print(table)
    if markdown:
        markdown.write_text(f"{HEADER}\n{table}\n\nPer case: the change of Dice (points) on the unpainted "
                            f"voxels (empty: not run).\n\n{per_case(rows)}\n")
    if benchmarks_md:
        text = benchmarks_md.read_text()
        head = text[:text.index(KEPT_MARKER)] if KEPT_MARKER in text else text.rstrip("\n") + "\n\n"
        benchmarks_md.write_text(
            f"{head}{KEPT_MARKER}\n\n## Fine-tuning\n\n`benchmarks/finetune.py` (this section; per case and the "
            "painting modes: [finetune-benchmark.md](finetune-benchmark.md); the recipe: "
            "[training.md](training.md#fine-tuning)): one fine-tune round from corrections simulated from the "
            "expert labels, the change of Dice (points) on the voxels nobody painted, by painting, method and "
            f"starting Dice. {DEFAULT_ROWS}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
