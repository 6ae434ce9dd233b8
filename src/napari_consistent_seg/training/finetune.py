"""Fine-tuning on one volume from the user's corrections: labels plus a "known" mask.

Only known voxels are labeled (a brush stroke, an erased stroke = background, or whole painted
slices); every other voxel is unlabeled, and the starting model's own prediction there is kept
as a soft target ("anchor"), so that a few corrections do not undo what the model got right.
This is what the napari Fine-tune widget and ``consistent-seg finetune`` run, one ``step()`` at
a time, so that the caller can show progress, preview, and stop between steps with valid weights.
"""

from __future__ import annotations

import contextlib
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConsistentSegError, InvalidInputError, ShapeMismatchError
from ..inference import (_cpu_threads, apply_corrections, argmax_labels, check_cancel, inference_precision,
                         model_view, pick_device, prepare_input, run_slices)
from ..io.volume import Volume
from ..models.card import finetune_option_problem
from ..models.modules import EAMModule, ICLModules
from ..models.store import Model
from . import losses
from .augment import Augmentation
from .data import SliceStream, resample_inplane, resample_labels

#: The default recipe (see docs/training.md, "Fine-tuning", and benchmarks/finetune.py); a model
#: card's ``finetune`` overrides it for its model (`recipe`).
DEFAULTS = {"method": "supervised", "steps": 60, "lr": 3e-4, "anchor": 3.0, "anchor_groups": "voxels",
            "stroke_anchor": 3.0, "stroke_anchor_groups": "voxels", "blend": 0.5, "stroke_blend": 0.25,
            "touchup_blend": 0.25, "touchup_below": 0.72, "slice_weight": 2.0, "other_patches": 4,
            "other_patch_scale": 1.0, "average_last": 0.5, "confidence_threshold": 0.95}


#: How the patches mark their voxels (uint8): beyond the slice (what augmentation and zero padding
#: bring in), unknown, the start's label + START where a voxel is unknown and the anchor holds the
#: start there (`Finetuner._mark_start`), and label + KNOWN where the user labeled it.
OUTSIDE, UNKNOWN, START, KNOWN = 0, 1, 2, 128


def _unknown(codes: torch.Tensor) -> torch.Tensor:
    """Where patches of those codes show a voxel of the slice that the user did not label."""
    return (codes != OUTSIDE) & (codes < KNOWN)


def _held_start(codes: torch.Tensor) -> torch.Tensor:
    """The start's labels where the anchor holds them, -1 elsewhere (int64)."""
    return torch.where((codes >= START) & (codes < KNOWN), codes.long() - START, -1)


def recipe(model) -> dict:
    """The fine-tuning recipe of ``model`` (a Model or its ModelCard): DEFAULTS, with what the
    card's ``finetune`` sets. The shipped cardiac model anchors whole painted slices' foreground
    and background alike with weight 1 (never more than a point worse on 48 cardiac rounds, where
    the plain anchor 3 lost 2.3 once), strokes as DEFAULTS do, keeping 0.35 of their change, 0.25 for a
    touch-up (docs/training.md, docs/finetune-history.md)."""
    card = getattr(model, "card", model)
    return {**DEFAULTS, **card.finetune}


def icl_modules_for(model: Model) -> ICLModules:
    """ICL modules to fine-tune with: the model's own, or a warm start from its EAM module
    (same class-decoder architecture: SSPA and USCL both start from it), or fresh ones."""
    bb = model.backbone
    if isinstance(model.modules, ICLModules):
        return copy.deepcopy(model.modules)
    if not isinstance(model.modules, EAMModule):
        return ICLModules(bb.out_channels, bb.tap_channels, spatial_dims=bb.spatial_dims)
    eam = model.modules  # its heads and its weights
    modules = ICLModules(bb.out_channels, bb.tap_channels, eam.config["heads"], bb.spatial_dims)
    modules.queries.load_state_dict(eam.queries.state_dict())
    modules.sspa.load_state_dict(eam.decoder.state_dict())
    modules.uscl.load_state_dict(eam.decoder.state_dict())
    return modules


#: A corrected slice counts as painted whole when at least this share of its voxels is known: a slice
#: relabeled in full may leave some out (Sunnybrook's simulated paintings leave the 2 % where the
#: model calls a class its experts did not label unknown), while strokes cover a few per cent at most.
WHOLE_SLICE_SHARE = 0.9


def whole_slice_known(painted: np.ndarray) -> np.ndarray:
    """The whole-slice rule: every voxel of a slice (the last two axes: a (Z, Y, X) volume, or each
    phase of a (T, Z, Y, X) cine) with a non-zero voxel is known."""
    painted = np.asarray(painted)
    touched = painted.reshape(*painted.shape[:-2], -1).any(-1)
    return np.broadcast_to(touched[..., None, None], painted.shape).copy()


def partial_seg_loss(logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """CE + soft Dice (all K classes, over the batch) on the known voxels only.

    logits (B, K, H, W); target (B, H, W) int64; known (B, H, W) bool. With every voxel known this
    is the training loss (``losses.seg_loss``); a class absent from the known voxels is pushed
    towards zero there. Zero when no voxel is known.
    """
    k = logits.shape[1]
    m = known.to(logits.dtype)
    n = m.sum()
    if n == 0:
        return logits.sum() * 0
    ce = (F.cross_entropy(logits, target, reduction="none") * m).sum() / n
    probs = logits.softmax(1) * m[:, None]
    onehot = F.one_hot(target, k).permute(0, 3, 1, 2).to(logits.dtype) * m[:, None]
    inter = (probs * onehot).sum((0, 2, 3))
    denom = (probs + onehot).sum((0, 2, 3))
    dice = 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()
    return ce + dice


def anchor_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, where: torch.Tensor,
                groups: str = "voxels", start: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) per voxel over the voxels of ``where`` (B, H, W) bool. ``start``
    (B, H, W) int64, -1 where not given: the labels the user accepted (the start's segmentation,
    cleaned up); where the teacher calls another class, the target is the start's label, one-hot.
    ``groups``: "voxels", their mean; "foreground", the mean of the means over the voxels the target
    calls foreground and background (so a heart weighs as much as the chest around it); "classes",
    the mean over classes of the means over the voxels the target gives each class;
    "voxels+classes", the mean of the "voxels" and "classes" terms."""
    _check("anchor_groups", groups)
    if groups == "voxels+classes":
        return 0.5 * (anchor_loss(logits, teacher_logits, where, "voxels", start)
                      + anchor_loss(logits, teacher_logits, where, "classes", start))
    t = teacher_logits.log_softmax(1)
    called = argmax_labels(teacher_logits)  # 48 -> 6 ms for 8 x 4 x 192 x 192 (Zen 3)
    override = None if start is None else (start >= 0) & (start != called)
    if override is None or not override.any():
        kl = (t.exp() * (t - logits.log_softmax(1))).sum(1)
    else:  # the start's label where it overrides: p log p is 0 for a one-hot target
        onehot = F.one_hot(start.clamp_min(0), logits.shape[1]).permute(0, 3, 1, 2).to(t.dtype)
        p = torch.where(override[:, None], onehot, t.exp())
        kl = (torch.where(override[:, None], 0, p * t) - p * logits.log_softmax(1)).sum(1)
        called = torch.where(override, start, called)
    if groups == "voxels":
        groups = [where]
    elif groups == "foreground":
        groups = [where & (called != 0), where & (called == 0)]
    else:
        groups = [where & (called == c) for c in range(logits.shape[1])]
    terms = [(kl * m).sum() / m.sum() for m in groups if m.any()]
    return torch.stack(terms).mean() if terms else logits.sum() * 0


def _one_batch(*batches: torch.Tensor) -> torch.Tensor:
    """Batches of patches, (B, C, H, W) or (B, H, W), as one for the per-voxel terms
    (``anchor_loss``): concatenated when their patches are the same size, else one row of all their
    voxels, (1, C, N, 1) or (1, N, 1)."""
    if all(b.shape[-2:] == batches[0].shape[-2:] for b in batches):
        return torch.cat(batches)
    if batches[0].ndim == 3:
        return _one_batch(*(b[:, None] for b in batches))[:, 0]
    rows = [b.movedim(1, 0).reshape(b.shape[1], -1) for b in batches]
    return torch.cat(rows, 1)[None, :, :, None]


def _check(key: str, value) -> None:
    """``value`` as the fine-tuning option ``key`` (models.card.FINETUNE_KEYS), or a clear error."""
    problem = finetune_option_problem(key, value)
    if problem:
        raise ConsistentSegError(f"{key} {problem}, not {value!r}")


def running_mean(means: list[torch.Tensor] | None, tensors, n: int) -> list[torch.Tensor]:
    """The mean of n values, from ``means`` (that of the n - 1 before; None when n is 1) and the
    n-th, ``tensors``: updated in place, or copies of ``tensors`` to start with."""
    with torch.no_grad():
        if means is None:
            return [t.detach().clone() for t in tensors]
        for mean, now in zip(means, tensors):
            mean.add_((now - mean) / n)
    return means


class Finetuner:
    """Fine-tune a copy of ``model`` on ``image`` (Z, Y, X) from ``labels`` (Z, Y, X) where ``known``.

    known: (Z, Y, X) bool, the voxels the user labeled (painted or erased); ``None`` = the
    whole-slice rule (:func:`whole_slice_known`). Slices with a known voxel feed the supervised
    loss; ``anchor`` weighs a KL term that keeps the prediction on unknown voxels near the
    starting model's (averaged as ``anchor_groups`` says). ``start``: (Z, Y, X) labels, the
    segmentation the user accepted before the round (the starting model's, cleaned up), on the same
    slices; where the cardiac clean-up added a class to the starting network's call (a refilled
    slice), the anchor holds the start's label instead (:meth:`_mark_start`; the widget and the CLI
    pass it; other models' clean-up only removes, and their start is not used). ``options``: the
    recipe's keys (those of ``DEFAULTS``); any left out or None come from the model's :func:`recipe`.
    ``method``: "supervised" or "icl" (adds ICL's unlabeled terms on the slices
    without a known voxel, counted where the network's top class probability reaches
    ``confidence_threshold``; 0: everywhere, as the reference code). ``blend`` in (0, 1]: the share
    of the weight change the steps made that the result keeps (a weight-space ensemble of the
    starting and the trained network, as WiSE-FT) when every corrected slice is known whole (at
    least ``WHOLE_SLICE_SHARE`` of its voxels);
    ``stroke_blend`` the share when the corrections are strokes (a slice known in part: brush dabs
    paint one label over their disk, right or wrong, so they are trusted less; docs/finetune-history.md),
    and ``touchup_blend`` when they are a touch-up: strokes that change fewer than ``touchup_below`` of
    the voxels they label from the start's labels (``self.changed_share``; :meth:`_changed_share`).
    ``stroke_anchor`` and ``stroke_anchor_groups`` replace ``anchor`` and ``anchor_groups`` in a
    round of strokes (``self.anchor``, ``self.anchor_groups``: those in use).
    ``self.blend`` is the share in use. ``slice_weight`` weighs the supervised loss when every
    corrected slice is known whole (strokes: 1, for the same reason); ``self.seg_weight`` is the
    weight in use. The steps train ``self.trained`` and ``self.model`` is the blend, valid after
    every ``step()``.
    Each step draws ``batch_size`` patches around the corrections and ``other_patches`` from the
    slices without corrections (for the anchor and ICL's unlabeled terms). ``average_last`` in
    [0, 1): the trained weights are averaged over that share of the ``steps`` planned, at the end
    (0: the last step's weights), and the blend starts from the average (as SWA; from step
    ``average_from``, the last step's weights before it).
    Both are deep copies: the model passed in is never changed.
    """

    def __init__(self, model: Model, image: np.ndarray, labels: np.ndarray, known: np.ndarray | None = None, *,
                 spacing_mm=None, modality: str | None = None, device=None, batch_size: int = 4, seed: int = 0,
                 start: np.ndarray | None = None, **options):
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ConsistentSegError(f"unknown fine-tuning option {', '.join(unknown)}: the options are "
                                     f"{', '.join(DEFAULTS)}")
        # the model's recipe, with what the caller sets (None: the recipe's)
        r = {**recipe(model), **{k: v for k, v in options.items() if v is not None}}
        if model.spatial_dims != 2:
            raise ConsistentSegError("fine-tuning is implemented for 2D models only")
        for key, value in r.items():
            _check(key, value)
        image = np.asarray(image)
        if image.ndim != 3 or not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
            raise InvalidInputError(
                f"fine-tuning takes a (Z, Y, X) volume of real numbers, not an array of shape "
                f"{image.shape} and type {image.dtype}: pass one 3D scan (one phase of a cine)"
            )
        labels, k = check_painted(labels, model), model.backbone.out_channels
        if image.shape != labels.shape:
            raise ShapeMismatchError(
                f"the painted labels {labels.shape} do not match the image {image.shape}: "
                "paint in a Labels layer made for this image"
            )
        known = whole_slice_known(labels) if known is None else np.asarray(known).astype(bool)
        if known.shape != image.shape:
            raise ShapeMismatchError(f"the known mask {known.shape} does not match the image {image.shape}")
        if start is not None:
            start = np.asarray(start)
            if start.shape != image.shape:
                raise ShapeMismatchError(f"the start's labels {start.shape} do not match the image {image.shape}")
            if start.min() < 0 or start.max() >= k or not np.array_equal(start, np.round(start)):
                raise ConsistentSegError(f"the start's labels must be classes 0..{k - 1} of model {model.name!r}")
        labeled = np.flatnonzero(known.reshape(known.shape[0], -1).any(1))
        if labeled.size == 0:
            raise ConsistentSegError("nothing painted: correct the segmentation with the brush or eraser "
                                     "(or paint at least one slice) first")
        self.device = pick_device(device)
        # strokes: a corrected slice known in part (under WHOLE_SLICE_SHARE)
        strokes = bool((known[labeled].reshape(labeled.size, -1).mean(1) < WHOLE_SLICE_SHARE).any())
        self.method = r["method"]
        self.anchor = float(r["stroke_anchor" if strokes else "anchor"])
        self.anchor_groups = r["stroke_anchor_groups" if strokes else "anchor_groups"]
        self.seg_weight = 1.0 if strokes else float(r["slice_weight"])
        self.painted_slices = [int(z) for z in labeled]
        # only the cardiac clean-up adds labels (a refilled slice); the others only remove (_mark_start)
        self.has_start = start is not None and bool(model.card.cardiac_cleanup)
        self.known_voxels = int(known.sum())
        self.trained = Model(copy.deepcopy(model.backbone), copy.deepcopy(model.card), None, model.path)
        # the icl method trains ICL modules (the model's own, or warm-started from its EAM module); the supervised
        # one trains the backbone only, and the model keeps its own modules (an EAM model's stay EAM's)
        self.trained.modules = icl_modules_for(model) if self.method == "icl" else copy.deepcopy(model.modules)
        self.trained.to(self.device)
        self.teacher = copy.deepcopy(model.backbone).to(self.device).eval().requires_grad_(False)
        self._blended: Model | None = None
        self._blended_at = -1
        self.planned_steps, self.average_last = int(r["steps"]), float(r["average_last"])
        # the first step whose weights are averaged (never, with average_last 0)
        self.average_from = self.planned_steps - round(self.planned_steps * self.average_last) + 1
        self._average: list[torch.Tensor] | None = None
        prepared = prepare_input(self.trained, image, spacing_mm, modality)
        self.warnings = prepared.warnings
        # label + KNOWN where known, UNKNOWN where not, and 0 (OUTSIDE) is what augmentation and zero
        # padding bring in beyond the slice: neither trained nor anchored there (nearest resampling)
        encoded = np.where(known, labels.astype(np.int64) + KNOWN, UNKNOWN).astype(np.uint8)
        grid = (prepared.spacing_mm or (1, 1, 1), self.trained.card.target_spacing_mm if prepared.spacing_mm else None)
        data, encoded = resample_inplane(prepared.data, encoded, *grid)
        start = resample_labels(start.astype(np.uint8), *grid) if start is not None and (
            strokes or self.has_start) else None
        # strokes: the share of the voxels they label that the user changed from the start (the start's
        # labels, else the starting network's call); below touchup_below, a touch-up
        self.changed_share = self._changed_share(data, encoded, labeled, start) if strokes else None
        self.touchup = strokes and self.changed_share < r["touchup_below"]
        self.blend = float(r["touchup_blend" if self.touchup else "stroke_blend" if strokes else "blend"])
        if self.has_start:
            encoded = self._mark_start(data, encoded, start)
        patch = [min(p, n) for p, n in zip(self.trained.card.patch_size, data.shape[1:])]
        is_labeled = np.zeros(data.shape[0], bool)
        is_labeled[labeled] = True
        self.labeled = SliceStream([data], [encoded], patch, slice_masks=[is_labeled], foreground_from=KNOWN,
                                   seed=seed)
        unlabeled_mask = ~is_labeled if (~is_labeled).any() else is_labeled
        self.other_patch_scale = r["other_patch_scale"]
        other_patch = [min(round(p * self.other_patch_scale), n)
                       for p, n in zip(self.trained.card.patch_size, data.shape[1:])]
        self.unlabeled = SliceStream([data], [encoded], other_patch, slice_masks=[unlabeled_mask],
                                     foreground_fraction=0, seed=seed + 1)
        self.batch_size, self.other_patches = batch_size, int(r["other_patches"])
        self.confidence_threshold = float(r["confidence_threshold"])
        self.weights = {"aux": 1.0, "pse": 1.0, "cons": 50.0,
                        **self.trained.card.training_weights}
        params = list(self.trained.backbone.parameters())
        if self.method == "icl":
            params += list(self.trained.modules.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=r["lr"], weight_decay=1e-4)
        self.augment = Augmentation(rotate_deg=10, scale=(0.9, 1.1), flips=False, noise_std=0.02)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_done = 0
        self.elapsed_s = 0.0
        self.precision = "bfloat16" if inference_precision(self.device) == "bfloat16" else "float32"

    def _mark_start(self, data: np.ndarray, encoded: np.ndarray, start: np.ndarray) -> np.ndarray:
        """``encoded`` with start + START on the unknown voxels where the start labels a class other
        than background and the teacher calls another: what the clean-up added to the network's call
        (a refilled slice), which the anchor then holds. Not what it removed (heart above the base, a
        stray piece): the clean-up removes it again from every result, and holding it as background
        taught the network that blood pools like the atria's are background, which lost the LV of
        M&Ms-2 ES (-11.9 points). Decided once on the slices as they are, not on the augmented
        patches: there the start's labels, resampled nearest, and the teacher's call on the
        interpolated image part along every boundary, and holding those voxels moved every boundary
        of acdc patient030 ED (two worst slices: +3.2 points -> -1.6; docs/finetune-history.md). Only with
        the cardiac clean-up (``has_start``), the one that adds; the shipped cardiac model does not
        resample slices in-plane. The abdomen model does, and its start resampled to the model's
        grid parts from the teacher's call along boundaries too (btcv_ct case_14: 11,441 voxels)."""
        held = (encoded == UNKNOWN) & (start != self._call(data)) & (start != 0)
        return np.where(held, start.astype(np.int64) + START, encoded).astype(np.uint8)

    def _call(self, data: np.ndarray) -> np.ndarray:
        """The starting network's labels on the (prepared, resampled) slices ``data``."""
        k = self.teacher.out_channels
        return np.concatenate([run_slices(self.teacher, data[z:z + 16], k, device=self.device).argmax(0)
                               for z in range(0, len(data), 16)])  # 16 slices at a time: a cine's maps are large

    def _changed_share(self, data: np.ndarray, encoded: np.ndarray, labeled: np.ndarray,
                       start: np.ndarray | None) -> float:
        """The share of the known voxels (on the model's grid) whose label differs from the ``start``'s,
        or from the starting network's call without one. A round of napari's dabs on a good
        segmentation changes few of the voxels it paints (the heart's: 60-71 % against 74-99 % where
        the start is wrong over a larger area), and those carry its wrong halves: the share of the
        change kept is then ``touchup_blend`` (docs/finetune-history.md, *Touch-ups*)."""
        codes = encoded[labeled]
        before = start[labeled] if start is not None else self._call(data[labeled])
        known = codes >= KNOWN
        return float((before[known] != codes[known].astype(np.int64) - KNOWN).mean())

    def step(self) -> dict:
        """One optimiser step. Returns {"loss", "seg", ...} as floats (the terms in use).

        On the CPU it runs on the cores other processes leave idle (`inference_threads`, read again
        every 2 s): torch's threads wait for each other after every operation, so one the kernel parks
        stalls the rest; beside two busy processes on a 2-core CPU a round took 200 s on 2 threads and
        112 s on 1 (docs/finetune-history.md, *Beside other work*)."""
        with _cpu_threads(self.device):
            return self._step()

    def _step(self) -> dict:
        start = time.monotonic()
        bb = self.trained.backbone
        bb.train()
        images, encoded = self.labeled.sample(self.batch_size)
        images, encoded = self.augment(images, encoded, self.generator)
        images, encoded = images.to(self.device), encoded.to(self.device)
        need_unlabeled = self.method == "icl" or self.anchor > 0
        unlabeled = encoded_u = None
        if need_unlabeled:
            unlabeled, encoded_u = self.unlabeled.sample(self.other_patches)
            unlabeled, encoded_u = self.augment(unlabeled, encoded_u, self.generator)
            unlabeled, encoded_u = unlabeled.to(self.device), encoded_u.to(self.device)
        total, terms = self._losses(bb, images, encoded, unlabeled, encoded_u)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        bb.eval()
        if self.trained.modules is not None:
            self.trained.modules.eval()
        self.steps_done += 1
        if self.steps_done >= self.average_from:
            self._average = running_mean(self._average, bb.parameters(), self.steps_done - self.average_from + 1)
        self.elapsed_s += time.monotonic() - start
        return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}

    def _mixed_precision(self):
        """bf16 autocast for the forward passes on a CPU with native bf16 (as inference), else float32:
        a default round on a 10-slice scan on one thread took 35.6 s in float32 and 22.0 s in bf16,
        with the same gain (+2.15 / +1.96 Dice points; docs/finetune-history.md). The losses, weights,
        gradients and optimiser stay float32."""
        if self.precision == "bfloat16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _losses(self, bb, images, encoded, unlabeled, encoded_u):
        """The step's loss and its terms: ``encoded`` and ``encoded_u`` the codes of the patches around
        the corrections and of the other slices' (OUTSIDE, UNKNOWN, start + START, label + KNOWN)."""
        known, target = encoded >= KNOWN, (encoded.long() - KNOWN).clamp_min(0)
        terms = {}
        if self.method == "icl":
            modules = self.trained.modules
            modules.train()
            with self._mixed_precision():  # forward passes only: the losses below run in float32
                out_l = bb(images, return_features=True)
                out_u = bb(unlabeled, return_features=True)
                sspa_l = modules.attend(out_l.features)
                sspa_u = modules.attend(out_u.features)
                uscl_u = modules.consistent(out_u.features, sspa_l.proxies())
            logits_l, logits_u = out_l.logits.float(), out_u.logits.float()
            maps_l, maps_u = [m.float() for m in sspa_l.maps], [m.float() for m in sspa_u.maps]
            consistent_u = [m.float() for m in uscl_u.maps]
            mask = losses.confidence_mask(logits_u, self.confidence_threshold)
            terms["aux"] = torch.stack([partial_seg_loss(out_l.to_input_grid(m), target, known)
                                        for m in maps_l]).mean()
            terms["pse"] = losses.pseudo_label_loss(consistent_u, out_u, logits_u, mask)
            terms["cons"] = losses.map_consistency(consistent_u, maps_u, mask)
        else:
            logits_l, logits_u = self._forward(bb, images, unlabeled)
        terms["seg"] = partial_seg_loss(logits_l, target, known)
        total = self.seg_weight * terms["seg"] + sum(self.weights[name] * terms[name]
                                                     for name in ("aux", "pse", "cons") if name in terms)
        if self.anchor > 0:
            # the anchored voxels: the unknown ones of the slices. The teacher runs only on the patches
            # that have some: around whole painted slices, none (a fifth of a step on Zen 3)
            unknown = _unknown(encoded)
            rows = unknown.flatten(1).any(1)
            with torch.no_grad():
                teacher_l, teacher_u = self._forward(self.teacher, images[rows], unlabeled)
            start = _one_batch(_held_start(encoded[rows]), _held_start(encoded_u)) if self.has_start else None
            terms["anchor"] = anchor_loss(_one_batch(logits_l[rows], logits_u), _one_batch(teacher_l, teacher_u),
                                          _one_batch(unknown[rows], _unknown(encoded_u)), self.anchor_groups, start)
            total = total + self.anchor * terms["anchor"]
        return total, terms

    def _forward(self, net, images, unlabeled):
        """float32 logits of ``net`` on the patches around the corrections and on the other slices'
        (None when there are none); one pass for both when they are the same size."""
        with self._mixed_precision():
            if unlabeled is None:
                return net(images).float(), None
            if not len(images):
                return images.new_zeros((0, net.out_channels, *images.shape[2:])), net(unlabeled).float()
            if unlabeled.shape[2:] != images.shape[2:]:
                return net(images).float(), net(unlabeled).float()
            both = net(torch.cat([images, unlabeled])).float()
        return both[:len(images)], both[len(images):]

    @property
    def share_text(self) -> str:
        """The share of the change the result keeps, and why, as the widget and the CLI say it."""
        why = "whole slices" if self.changed_share is None else (
            f"{'a touch-up' if self.touchup else 'strokes'}: {100 * self.changed_share:.0f} % of the voxels they label "
            "changed from the start")
        return f"{self.blend:g} of the change kept ({why})"

    @property
    def model(self) -> Model:
        """The fine-tuned model as the user gets it (preview, Accept, :meth:`finished_model`):
        :meth:`blended` at the round's ``blend`` (``self.trained`` itself when that is 1 and no
        weights are averaged), updated after each step on first use."""
        if self.blend >= 1.0 and self._average is None:
            return self.trained
        if self._blended_at != self.steps_done:
            self._blended = self.blended(self.blend, into=self._blended)
            self._blended_at = self.steps_done
        return self._blended

    def blended(self, share: float, into: Model | None = None, weights=None) -> Model:
        """The starting weights plus ``share`` times the change the steps made so far: to
        ``weights`` (the backbone's parameters, in order), by default the average of the round's
        last steps (``average_last``) once it has begun, else the trained weights. Written into
        ``into``'s network when given, else into a new copy; the ICL modules are the trained ones."""
        _check("blend", share)
        if into is None:
            into = Model(copy.deepcopy(self.trained.backbone), self.trained.card, self.trained.modules, self.trained.path)
        if weights is None:
            weights = self._average if self._average is not None else self.trained.backbone.parameters()
        with torch.no_grad():
            for out, start, now in zip(into.backbone.parameters(), self.teacher.parameters(), weights):
                torch.lerp(start, now, share, out=out)
        return into

    def finished_model(self) -> Model:
        """The fine-tuned model with a card that records the fine-tune (a copy, safe to save)."""
        card = self.model.card.fine_tuned({  # a copy; its val scores are cleared (no longer measured)
            "method": self.method, "anchor": self.anchor, "anchor_groups": self.anchor_groups,
            **({"confidence_threshold": self.confidence_threshold} if self.method == "icl" else {}),
            "blend": self.blend,
            **({} if self.changed_share is None else {"changed_share": round(self.changed_share, 3)}),
            "seg_weight": self.seg_weight,
            "other_patches": self.other_patches, "other_patch_scale": self.other_patch_scale,
            "precision": self.precision,
            "average_last": self.average_last, "planned_steps": self.planned_steps,
            "steps": self.steps_done,
            "painted_slices": self.painted_slices, "known_voxels": self.known_voxels,
            "wall_time_s": round(self.elapsed_s, 1), "from_model": self.model.card.name,
        })
        return Model(copy.deepcopy(self.model.backbone), card, copy.deepcopy(self.model.modules), None)


def finetune(model: Model, image: np.ndarray, labels: np.ndarray, known: np.ndarray | None = None, *,
             steps: int | None = None, seconds: float | None = None, progress=None, cancel=None,
             **options) -> Finetuner:
    """One fine-tuning round: ``steps`` steps (default: the model's recipe), or fewer if ``seconds``
    (wall time of the steps) runs out first. ``progress(done, total)`` after each step; ``cancel``
    (an Event or a callable) raises Cancelled between steps. Returns the Finetuner (its ``model``)."""
    tuner = Finetuner(model, image, labels, known, steps=steps, **options)  # checks steps (None: the recipe's)
    steps = tuner.planned_steps
    for done in range(1, steps + 1):
        check_cancel(cancel)
        tuner.step()
        if progress is not None:
            progress(done, steps)
        if seconds and tuner.elapsed_s >= seconds:
            break
    return tuner


def check_painted(labels, model: Model) -> np.ndarray:
    """``labels`` as int64 class values of ``model``, or an error that says what is wrong with them:
    not whole numbers (a float file with fractions, NaN or infinity) or outside 0..K-1. Callers that
    resample the labels (`model_slices`) check them first, so nothing is rounded or cast silently."""
    labels = np.asarray(labels)
    if labels.dtype != bool:
        if not np.issubdtype(labels.dtype, np.number) or np.iscomplexobj(labels):
            raise InvalidInputError(f"painted labels must be whole numbers (class values), not {labels.dtype} values")
        if not np.issubdtype(labels.dtype, np.integer):
            if not np.isfinite(labels).all():
                raise InvalidInputError("painted labels hold NaN or infinite values: save the corrections as a "
                                        "label image (whole numbers, e.g. from napari's Labels layer)")
            if not np.array_equal(labels, np.round(labels)):
                raise InvalidInputError("painted labels must be whole numbers (class values); these hold fractions "
                                        f"(e.g. {labels[labels != np.round(labels)].flat[0]:g})")
    k = model.backbone.out_channels
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ConsistentSegError(
            f"painted label values must be 0..{k - 1} (the classes of model {model.name!r}); "
            f"found {labels.min():g}..{labels.max():g}"
        )
    return labels.astype(np.int64)


def model_slices(model: Model, volume: Volume, *arrays):
    """``arrays`` on ``volume``'s grid ((Z, Y, X), or (T, Z, Y, X) for a cine) as stacks of slices
    in the plane the model slices in (`inference.model_view`: the acquisition plane of a cardiac
    cine, the axial plane of an abdominal scan whatever its acquisition), the phases of a cine one
    after another. Returns (stacks, spacing_mm of those slices) - what `Finetuner` takes."""
    first = volume if volume.n_phases is None else volume.phase(0)  # every phase lies on its grid
    view = model_view(model, first)
    stacks = []
    for array in arrays:
        if array is None:
            stacks.append(None)
            continue
        array = np.asarray(array)
        if array.shape != volume.shape:
            raise ShapeMismatchError(f"an array of shape {array.shape} is not on the scan's grid {volume.shape}: "
                                     "save the corrections on the image's grid (e.g. from napari's Labels layer)")
        per_phase = [array] if volume.n_phases is None else list(array)
        stacks.append(np.concatenate([first.geometry.transfer(a, view) for a in per_phase]))
    return stacks, view.spacing_mm


def merge_corrections(prediction: np.ndarray, labels: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """The user's labels where known (None: the whole-slice rule), the prediction elsewhere."""
    return apply_corrections(prediction, labels, whole_slice_known(labels) if known is None else known)


def most_changed_slices(start: np.ndarray, result: np.ndarray, known: np.ndarray,
                        top: int = 3) -> list[tuple[int, int]]:
    """Where a fine-tune's ``result`` differs most from the ``start`` segmentation off the ``known``
    voxels: up to ``top`` (slice, voxels) pairs, most first, slices along axis -3 (napari's slider
    for a scan, the phases of a cine summed), none unchanged. What a user should look at after
    Accept: a fine-tune may grow heart above the base on a slice nobody corrected (docs/finetune-history.md,
    *Scored on every slice*)."""
    changed = (np.asarray(start) != np.asarray(result)) & ~np.asarray(known, bool)
    per_slice = changed.reshape(-1, *changed.shape[-3:]).sum(axis=(0, 2, 3))
    order = np.argsort(-per_slice, kind="stable")[:top]
    return [(int(z), int(per_slice[z])) for z in order if per_slice[z] > 0]


def slices_text(changed: list[tuple[int, int]]) -> str:
    """``most_changed_slices``' answer as the widget and the CLI say it: "8 (1356 voxels), 4 (200 voxels)"."""
    return ", ".join(f"{z} ({n} voxels)" for z, n in changed)


class ICLFinetuner(Finetuner):
    """ICL fine-tuning on whole painted slices, as before the known mask existed (no anchor, the
    trained weights themselves: unblended, not averaged; the supervised loss weighted 1)."""

    def __init__(self, model: Model, image: np.ndarray, painted: np.ndarray, known: np.ndarray | None = None,
                 **kw):
        kw.setdefault("method", "icl")
        kw.setdefault("anchor", 0.0)
        kw.setdefault("blend", 1.0)
        kw.setdefault("stroke_blend", kw["blend"])
        kw.setdefault("touchup_blend", kw["stroke_blend"])
        kw.setdefault("slice_weight", 1.0)
        kw.setdefault("average_last", 0.0)
        kw.setdefault("confidence_threshold", 0.0)
        super().__init__(model, image, painted, known, **kw)
