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
_prob_dice = DiceLoss(include_background=True, batch=True)  # soft Dice of probabilities


def seg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE + Dice of logits (B, K, *s) against labels (B, *s)."""
    return _dice_ce(logits, labels.unsqueeze(1))


def map_supervision(maps: list[torch.Tensor], out, labels: torch.Tensor) -> torch.Tensor:
    """L_aux / EAM map loss: CE + Dice of each scale's class map, upsampled, averaged over scales."""
    return torch.stack([seg_loss(out.to_input_grid(m), labels) for m in maps]).mean()


def confidence_mask(backbone_logits: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """(B, 1, *s) float mask of the pixels whose stopped backbone softmax peaks at >= ``threshold``;
    None for threshold <= 0 (every pixel counts, as in the reference)."""
    if threshold <= 0:
        return None
    return (backbone_logits.detach().softmax(1).amax(1, keepdim=True) >= threshold).to(backbone_logits.dtype)


def _mask_at(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """The mask on ``like``'s grid (a pixel of a coarse map counts where any pixel under it counts)."""
    if mask is None or mask.shape[2:] == like.shape[2:]:
        return mask
    pool = F.adaptive_max_pool2d if mask.ndim == 4 else F.adaptive_max_pool3d
    return pool(mask, like.shape[2:])


def pseudo_label_loss(maps: list[torch.Tensor], out, backbone_logits: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_pse: soft Dice of the (upsampled) module maps against the backbone's stopped softmax.

    With a ``mask`` (B, 1, *s) only the masked pixels enter the Dice sums.
    """
    target = backbone_logits.detach().softmax(1)
    if mask is not None:
        target = target * mask
    terms = []
    for m in maps:
        probs = out.to_input_grid(m).softmax(1)
        terms.append(_prob_dice(probs if mask is None else probs * mask, target))
    return torch.stack(terms).mean()


def map_consistency(maps_a: list[torch.Tensor], maps_b: list[torch.Tensor],
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_cons: MSE between softmax(maps_a) and stopped softmax(maps_b), per scale, averaged.

    With a ``mask`` (B, 1, *s) on the input grid, the MSE is the mean over the masked pixels of
    each scale (zero where none is masked).
    """
    terms = []
    for a, b in zip(maps_a, maps_b):
        sq = (a.softmax(1) - b.detach().softmax(1)) ** 2
        m = _mask_at(mask, a)
        terms.append(sq.mean() if m is None else (sq * m).sum() / (m.sum() * a.shape[1]).clamp_min(1.0))
    return torch.stack(terms).mean()


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
