"""Class-query cross-attention over decoder features, shared by ICL (SSPA, USCL) and EAM.

One learnable query per class attends over the pixels of a decoder feature map; the attention
logits of each class become that class's map. Every operator is per pixel or a small
convolution, so the module takes any image size (unlike the reference's N -> N MLP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ScaleOutput:
    """One scale's result. queries: (B, K, C); maps: (B, K, *s); attention: (B, heads, K, *s) logits."""

    queries: torch.Tensor
    maps: torch.Tensor
    attention: torch.Tensor


@dataclass
class DecoderOutput:
    """All scales, deepest first (strides 8, 4, 2)."""

    scales: list[ScaleOutput]

    @property
    def maps(self) -> list[torch.Tensor]:
        return [s.maps for s in self.scales]

    @property
    def queries(self) -> list[torch.Tensor]:
        return [s.queries for s in self.scales]

    def proxies(self) -> list[torch.Tensor]:
        """Batch-mean updated queries per scale, each (K, C_s): the class representations."""
        return [s.queries.mean(dim=0) for s in self.scales]


class ClassQueryAttention(nn.Module):
    """One scale of the class decoder.

    tokens = LayerNorm(Conv1x1(F)) over the N pixels; heads attend from the K class queries
    (logits A = q k^T / sqrt(d), softmax over pixels); Q' = Q + Proj(softmax(A) v), then
    Q' = Q' + MLP(LN(Q')). The class map of class k comes from its ``heads`` logit maps through
    a depthwise-separable conv and a 1x1 conv (weights shared by all classes).
    """

    def __init__(self, channels: int, heads: int, spatial_dims: int = 2, mlp_ratio: int = 2):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.channels, self.heads, self.spatial_dims = channels, heads, spatial_dims
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.token_proj = conv(channels, channels, kernel_size=1)
        self.token_norm = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, channels)
        self.mlp_norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels * mlp_ratio), nn.GELU(), nn.Linear(channels * mlp_ratio, channels)
        )
        self.map_head = nn.Sequential(
            conv(heads, heads, kernel_size=3, padding=1, groups=heads),
            conv(heads, heads, kernel_size=1),
            nn.GELU(),
            conv(heads, 1, kernel_size=1),
        )

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> ScaleOutput:
        """features (B, C, *s); queries (B, K, C) or (K, C) shared by the batch."""
        b, c = features.shape[:2]
        spatial = features.shape[2:]
        if queries.ndim == 2:
            queries = queries.unsqueeze(0).expand(b, -1, -1)
        k_cls = queries.shape[1]
        h, d = self.heads, c // self.heads
        tokens = self.token_norm(self.token_proj(features).flatten(2).transpose(1, 2))  # (B, N, C)
        q = self.q(queries).view(b, k_cls, h, d).transpose(1, 2)  # (B, h, K, d)
        k = self.k(tokens).view(b, -1, h, d).transpose(1, 2)  # (B, h, N, d)
        v = self.v(tokens).view(b, -1, h, d).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, h, K, N)
        attended = logits.softmax(dim=-1) @ v  # (B, h, K, d)
        # heads back next to their class before merging (the reference reshaped without permuting)
        attended = attended.transpose(1, 2).reshape(b, k_cls, c)
        updated = queries + self.out(attended)
        updated = updated + self.mlp(self.mlp_norm(updated))
        attention = logits.view(b, h, k_cls, *spatial)
        per_class = attention.transpose(1, 2).reshape(b * k_cls, h, *spatial)
        maps = self.map_head(per_class).view(b, k_cls, *spatial)
        return ScaleOutput(updated, maps, attention)


class ClassQueryDecoder(nn.Module):
    """Class-query attention at the three decoder taps, deepest first, handing queries down.

    The queries leaving scale s are projected linearly to scale s+1's channels. If
    ``queries_per_scale`` is given to ``forward``, each scale uses its own given queries instead
    (USCL's labeled proxies); otherwise ``queries`` enters at the deepest scale.
    """

    def __init__(self, tap_channels=(64, 32, 16), heads=(8, 4, 2), spatial_dims: int = 2):
        super().__init__()
        self.tap_channels = tuple(tap_channels)
        self.heads = tuple(heads)
        self.scales = nn.ModuleList(
            [ClassQueryAttention(c, h, spatial_dims) for c, h in zip(tap_channels, heads)]
        )
        self.handover = nn.ModuleList(
            [nn.Linear(tap_channels[i], tap_channels[i + 1]) for i in range(len(tap_channels) - 1)]
        )

    def forward(self, features, queries=None, queries_per_scale=None) -> DecoderOutput:
        if len(features) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} feature maps, got {len(features)}")
        outputs = []
        current = queries
        for i, (scale, feats) in enumerate(zip(self.scales, features)):
            q = queries_per_scale[i] if queries_per_scale is not None else current
            out = scale(feats, q)
            outputs.append(out)
            if i < len(self.handover):
                current = self.handover[i](out.queries)
        return DecoderOutput(outputs)


class ClassQueries(nn.Module):
    """K learnable global class queries (K, C). Small random init so classes start apart."""

    def __init__(self, num_classes: int, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, channels) * 0.02)

    def forward(self) -> torch.Tensor:
        return self.weight


def resize_maps(maps: torch.Tensor, size) -> torch.Tensor:
    """Resize (B, K, *s) maps to ``size`` with (tri)linear interpolation."""
    mode = "bilinear" if maps.ndim == 4 else "trilinear"
    return F.interpolate(maps, size=tuple(size), mode=mode, align_corners=False)


class ExternalModules(nn.Module):
    """Base of the external modules: K global class queries and the config that rebuilds them.

    Subclasses add their class decoders and set ``kind``; ``attend(features)`` runs the queries
    over a backbone's decoder taps (what the attention-map viewer shows).
    """

    kind = ""

    def __init__(self, num_classes: int, tap_channels=(64, 32, 16), heads=(8, 4, 2), spatial_dims: int = 2):
        super().__init__()
        self.config = dict(
            kind=self.kind, num_classes=num_classes, tap_channels=list(tap_channels),
            heads=list(heads), spatial_dims=spatial_dims,
        )
        self.queries = ClassQueries(num_classes, tap_channels[0])

    def new_decoder(self) -> ClassQueryDecoder:
        c = self.config
        return ClassQueryDecoder(c["tap_channels"], c["heads"], c["spatial_dims"])

    def attend(self, features) -> DecoderOutput:
        raise NotImplementedError
