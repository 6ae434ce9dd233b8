"""Losses of the supervised, ICL and EAM objectives, built on MONAI's Dice and DiceCE losses.

Shapes: logits and maps (B, K, *s); labels (B, *s) int64 with values 0..K-1. Module maps at a
decoder tap are resized to the input grid through ``BackboneOutput.to_input_grid`` before they are
compared with labels; consistency terms compare maps on their own grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss

# Dice over all K classes, background included, computed over the whole batch as the reference
# does: a per-sample Dice punishes every crop in which a small class is absent, and the network
# then learns to never predict it. CE and Dice weighted equally.
_dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=True, batch=True)
_soft_dice = DiceLoss(softmax=True, include_background=True, batch=True)


def seg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE + Dice of logits (B, K, *s) against labels (B, *s)."""
    return _dice_ce(logits, labels.unsqueeze(1))


def map_supervision(maps: list[torch.Tensor], out, labels: torch.Tensor) -> torch.Tensor:
    """L_aux / EAM map loss: CE + Dice of each scale's class map, upsampled, averaged over scales."""
    return torch.stack([seg_loss(out.to_input_grid(m), labels) for m in maps]).mean()


def pseudo_label_loss(maps: list[torch.Tensor], out, backbone_logits: torch.Tensor) -> torch.Tensor:
    """L_pse: soft Dice of the (upsampled) module maps against the backbone's stopped softmax."""
    target = backbone_logits.detach().softmax(1)
    return torch.stack([_soft_dice(out.to_input_grid(m), target) for m in maps]).mean()


def map_consistency(maps_a: list[torch.Tensor], maps_b: list[torch.Tensor]) -> torch.Tensor:
    """L_cons: MSE between softmax(maps_a) and stopped softmax(maps_b), per scale, averaged."""
    return torch.stack(
        [F.mse_loss(a.softmax(1), b.detach().softmax(1)) for a, b in zip(maps_a, maps_b)]
    ).mean()


def representation_kl(rep_a: torch.Tensor, rep_b: torch.Tensor, classes: list[int], temperature: float = 2.0) -> torch.Tensor:
    """EAM: symmetric KL between softmax(R_a[k] / T) and softmax(R_b[k] / T), summed over ``classes``.

    rep_a, rep_b: (K, C) class representations of two modalities. Multiplied by T^2 (as in
    distillation) so that its gradient scale does not depend on T.
    """
    idx = torch.as_tensor(classes, device=rep_a.device)
    log_a = F.log_softmax(rep_a[idx] / temperature, dim=-1)
    log_b = F.log_softmax(rep_b[idx] / temperature, dim=-1)
    kl_ab = F.kl_div(log_b, log_a, log_target=True, reduction="none").sum(-1)  # KL(a || b) per class
    kl_ba = F.kl_div(log_a, log_b, log_target=True, reduction="none").sum(-1)
    return (kl_ab + kl_ba).sum() * temperature**2


def correlation_matrix(rep: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """G = norm(R) norm(R)^T over the given classes: (k, k) cosine similarities."""
    r = F.normalize(rep[torch.as_tensor(classes, device=rep.device)], dim=-1)
    return r @ r.t()


def correlation_consistency(rep_a: torch.Tensor, rep_b: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """EAM structural consistency: MSE between the class-correlation matrices of two modalities."""
    return F.mse_loss(correlation_matrix(rep_a, classes), correlation_matrix(rep_b, classes))
