"""The three training objectives on one code path: supervised, ICL, EAM.

``Objective`` wraps the backbone and (for ICL/EAM) the external modules in one ``nn.Module``
whose forward takes a batch and returns (total loss, logged terms), so that DDP can wrap it.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from . import losses


class Objective(nn.Module):
    """Batch keys: supervised ``images`` (B,1,H,W), ``labels`` (B,H,W); ICL adds ``unlabeled``;
    EAM takes ``domains``: a list of (images, labels), one per modality."""

    def __init__(self, method: str, backbone: nn.Module, modules: nn.Module | None = None,
                 weights: dict | None = None, aligned_classes=(), confidence_threshold: float = 0.0):
        super().__init__()
        if method in ("icl", "eam") and modules is None:
            raise ValueError(f"{method} needs its external modules")
        self.method = method
        self.backbone = backbone
        self.modules_ = modules
        self.weights = dict(weights or {})
        self.aligned = list(aligned_classes)
        self.confidence_threshold = confidence_threshold  # ICL: pse/cons only where the backbone is this sure
        self.ramp = 1.0  # factor on the unlabeled / cross-modality terms, set by the trainer each step

    def forward(self, batch: dict):
        return getattr(self, f"_{self.method}")(batch)

    def _supervised(self, batch):
        logits = self.backbone(batch["images"])
        seg = losses.seg_loss(logits, batch["labels"])
        return seg, {"seg": seg.detach()}

    def _icl(self, batch):
        w = self.weights
        out_l = self.backbone(batch["images"], return_features=True)
        out_u = self.backbone(batch["unlabeled"], return_features=True)
        sspa_l = self.modules_.attend(out_l.features)
        sspa_u = self.modules_.attend(out_u.features)
        # the labeled proxies are not detached: USCL's losses also shape the labeled path
        uscl_u = self.modules_.consistent(out_u.features, sspa_l.proxies())
        mask = losses.confidence_mask(out_u.logits, self.confidence_threshold)
        terms = {
            "seg": losses.seg_loss(out_l.logits, batch["labels"]),
            "aux": losses.map_supervision(sspa_l.maps, out_l, batch["labels"]),
            "pse": losses.pseudo_label_loss(uscl_u.maps, out_u, out_u.logits, mask),
            "cons": losses.map_consistency(uscl_u.maps, sspa_u.maps, mask),
        }
        unsup = w["pse"] * terms["pse"] + w["cons"] * terms["cons"]
        total = terms["seg"] + w["aux"] * terms["aux"] + self.ramp * unsup
        return total, {k: v.detach() for k, v in terms.items()}

    def _eam(self, batch):
        w = self.weights
        seg, maps, reps = [], [], []
        for images, labels in batch["domains"]:
            out = self.backbone(images, return_features=True)
            dec = self.modules_.attend(out.features)
            seg.append(losses.seg_loss(out.logits, labels))
            maps.append(losses.map_supervision(dec.maps, out, labels))
            reps.append(dec.proxies())
        rep_terms, corr_terms = [], []
        for ra, rb in itertools.combinations(reps, 2):
            for a, b in zip(ra, rb):  # every decoder scale
                rep_terms.append(losses.representation_kl(a, b, self.aligned))
                corr_terms.append(losses.correlation_consistency(a, b, self.aligned))
        terms = {
            "seg": torch.stack(seg).mean(),
            "map": torch.stack(maps).mean(),
            "rep": torch.stack(rep_terms).mean(),
            "corr": torch.stack(corr_terms).mean(),
        }
        align = w["rep"] * terms["rep"] + w["corr"] * terms["corr"]
        total = terms["seg"] + w["map"] * terms["map"] + self.ramp * align
        return total, {k: v.detach() for k, v in terms.items()}
