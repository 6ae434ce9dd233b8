"""Batched 2D augmentation in torch: one random affine per sample applied to image and labels,
then intensity jitter on the image. Cheap enough to run every step on a CPU."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Augmentation:
    """rotate_deg: max |angle|; scale: (min, max) zoom; flips/rot90 only where the anatomy allows
    it (never for left/right organ classes); flip_ap mirrors the rows (anterior-posterior in an axial
    slice; left and right stay), half the time, so that a model trained on files whose header
    mirrors them front to back (btcv_ct's) still meets the spine where scanners put it; gamma and
    noise act on the [0, 1] image."""

    rotate_deg: float = 20.0
    scale: tuple[float, float] = (0.85, 1.15)
    flips: bool = False
    rot90: bool = False
    flip_ap: bool = False
    gamma: tuple[float, float] = (0.7, 1.5)
    noise_std: float = 0.03
    probability: float = 0.8

    @classmethod
    def from_dict(cls, d: dict | None) -> "Augmentation":
        d = dict(d or {})
        for key in ("scale", "gamma"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator):
        """images (B, 1, H, W) in [0, 1]; labels (B, H, W) int64 or None. Returns both augmented."""
        b = images.shape[0]
        dev = images.device

        def uniform(lo, hi):
            return torch.rand(b, generator=generator).to(dev) * (hi - lo) + lo

        active = (torch.rand(b, generator=generator) < self.probability).to(dev)
        angle = uniform(-self.rotate_deg, self.rotate_deg) * math.pi / 180 * active
        if self.rot90:
            quarter = torch.randint(0, 4, (b,), generator=generator).to(dev) * (math.pi / 2)
            angle = angle + quarter * active
        zoom = torch.where(active, uniform(*self.scale), torch.ones(b, device=dev))
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom

        def mirror(on):  # -1 (mirrored) for about half of the active samples when ``on``, else 1
            if not on:
                return torch.ones(b, device=dev)
            return torch.where((torch.rand(b, generator=generator).to(dev) < 0.5) & active, -1.0, 1.0)

        flip_x = mirror(self.flips)  # drawn before flip_y: the draws of a run with flips stay the same
        flip_y = mirror(self.flip_ap)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 1] = cos * flip_x, -sin * flip_y
        theta[:, 1, 0], theta[:, 1, 1] = sin * flip_x, cos * flip_y
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if labels is not None:
            labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                                   align_corners=False)[:, 0].long()
        gamma = torch.where(active, uniform(*self.gamma), torch.ones(b, device=dev)).view(b, 1, 1, 1)
        images = images.clamp(0, 1) ** gamma
        if self.noise_std > 0:
            noise = torch.randn(images.shape, generator=generator).to(dev) * self.noise_std
            images = images + noise * active.view(b, 1, 1, 1)
        return images, labels
