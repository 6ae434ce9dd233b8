"""External attention modules hung off the backbone's decoder during training (ICL, EAM)."""

from __future__ import annotations

from torch import nn

from .attention import ClassQueryAttention, ClassQueryDecoder, DecoderOutput, ExternalModules, ScaleOutput
from .eam import EAMModule
from .icl import ICLModules

MODULE_KINDS = {"icl": ICLModules, "eam": EAMModule}


def build_modules(config: dict) -> nn.Module:
    """Rebuild modules from their saved ``config`` (kind, num_classes, tap_channels, heads, spatial_dims)."""
    cfg = dict(config)
    kind = cfg.pop("kind")
    if kind not in MODULE_KINDS:
        raise ValueError(f"unknown module kind {kind!r}; known: {sorted(MODULE_KINDS)}")
    return MODULE_KINDS[kind](**cfg)


__all__ = [
    "ClassQueryAttention", "ClassQueryDecoder", "DecoderOutput", "ExternalModules", "ScaleOutput",
    "EAMModule", "ICLModules", "MODULE_KINDS", "build_modules",
]
