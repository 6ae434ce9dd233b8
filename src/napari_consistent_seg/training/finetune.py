"""ICL fine-tuning on one volume: a few painted slices are the labeled set, the rest unlabeled.

This is what the napari Fine-tune widget runs, one ``step()`` at a time, so that the caller can
show progress, preview, and stop between steps with valid weights.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from ..errors import ConsistentSegError, ShapeMismatchError
from ..inference import pick_device, prepare_input
from ..models.modules import EAMModule, ICLModules
from ..models.store import Model
from .augment import Augmentation
from .data import SliceStream, resample_inplane
from .objectives import Objective


def icl_modules_for(model: Model) -> ICLModules:
    """ICL modules to fine-tune with: the model's own, or a warm start from its EAM module
    (same class-decoder architecture: SSPA and USCL both start from it), or fresh ones."""
    bb = model.backbone
    if isinstance(model.modules, ICLModules):
        return copy.deepcopy(model.modules)
    modules = ICLModules(bb.out_channels, bb.tap_channels, spatial_dims=bb.spatial_dims)
    if isinstance(model.modules, EAMModule):
        modules.queries.load_state_dict(model.modules.queries.state_dict())
        modules.sspa.load_state_dict(model.modules.decoder.state_dict())
        modules.uscl.load_state_dict(model.modules.decoder.state_dict())
    return modules


class ICLFinetuner:
    """Fine-tune a copy of ``model`` with ICL on ``image`` (Z, Y, X) and ``painted`` (Z, Y, X).

    Slices of ``painted`` with any non-zero voxel are labeled (taken as fully labeled: unpainted
    voxels there are background); all other slices are unlabeled. ``self.model`` is a deep copy,
    valid after every ``step()``; the model passed in is never changed.
    """

    def __init__(self, model: Model, image: np.ndarray, painted: np.ndarray, *, spacing_mm=None,
                 modality: str | None = None, device=None, lr: float = 3e-4, batch_size: int = 4,
                 seed: int = 0):
        if model.spatial_dims != 2:
            raise ConsistentSegError("fine-tuning is implemented for 2D models only")
        image = np.asarray(image)
        painted = np.asarray(painted)
        if image.shape != painted.shape:
            raise ShapeMismatchError(
                f"the painted labels {painted.shape} do not match the image {image.shape}: "
                "paint in a Labels layer made for this image"
            )
        k = model.backbone.out_channels
        if painted.min() < 0 or painted.max() >= k:
            raise ConsistentSegError(
                f"painted label values must be 0..{k - 1} (the classes of model {model.name!r}); "
                f"found {int(painted.min())}..{int(painted.max())}"
            )
        labeled = np.flatnonzero(painted.reshape(painted.shape[0], -1).any(1))
        if labeled.size == 0:
            raise ConsistentSegError("no painted slice: paint at least one slice with the model's classes first")
        self.device = pick_device(device)
        self.painted_slices = [int(z) for z in labeled]
        self.model = Model(copy.deepcopy(model.backbone), copy.deepcopy(model.card), None, model.path)
        self.model.modules = icl_modules_for(model)
        self.model.to(self.device)
        prepared = prepare_input(self.model, image, spacing_mm, modality)
        self.warnings = prepared.warnings
        data, labels = resample_inplane(prepared.data, painted.astype(np.uint8), prepared.spacing_mm or (1, 1, 1),
                                        self.model.card.get("target_spacing_mm") if prepared.spacing_mm else None)
        patch = [min(p, n) for p, n in zip(self.model.card["patch_size"], data.shape[1:])]
        is_labeled = np.zeros(data.shape[0], bool)
        is_labeled[labeled] = True
        self.labeled = SliceStream([data], [labels], patch, slice_masks=[is_labeled], seed=seed)
        unlabeled_mask = ~is_labeled if (~is_labeled).any() else is_labeled
        self.unlabeled = SliceStream([data], [None], patch, slice_masks=[unlabeled_mask], seed=seed + 1)
        self.batch_size = batch_size
        weights = self.model.card.get("training", {}).get("config", {}).get("weights", {})
        self.objective = Objective("icl", self.model.backbone, self.model.modules,
                                   {"aux": 1.0, "pse": 1.0, "cons": 50.0, **weights})
        self.optimizer = torch.optim.AdamW(self.objective.parameters(), lr=lr, weight_decay=1e-4)
        self.augment = Augmentation(rotate_deg=10, scale=(0.9, 1.1), flips=False, noise_std=0.02)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_done = 0
        self.elapsed_s = 0.0

    def step(self) -> dict:
        """One ICL step. Returns {"loss", "seg", "aux", "pse", "cons"} as floats."""
        start = time.monotonic()
        self.objective.train()
        images, labels = self.labeled.sample(self.batch_size)
        images, labels = self.augment(images, labels, self.generator)
        unlabeled, _ = self.unlabeled.sample(self.batch_size)
        unlabeled, _ = self.augment(unlabeled, None, self.generator)
        batch = {"images": images.to(self.device), "labels": labels.to(self.device),
                 "unlabeled": unlabeled.to(self.device)}
        loss, terms = self.objective(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.objective.eval()
        self.steps_done += 1
        self.elapsed_s += time.monotonic() - start
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in terms.items()}}

    def finished_model(self) -> Model:
        """The fine-tuned model with a card that records the fine-tune (a copy, safe to save)."""
        card = copy.deepcopy(self.model.card)
        card.setdefault("fine_tuning", []).append({
            "method": "icl", "steps": self.steps_done, "painted_slices": self.painted_slices,
            "wall_time_s": round(self.elapsed_s, 1), "from_model": self.model.card["name"],
        })
        card["val_scores"] = {}  # no longer measured on val after fine-tuning
        return Model(copy.deepcopy(self.model.backbone), card, copy.deepcopy(self.model.modules), None)
