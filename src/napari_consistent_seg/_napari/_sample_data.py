"""napari sample data: synthetic CT and MRI abdomen phantoms with organ labels (not patients)."""

from __future__ import annotations

from ..io import make_phantom
from .layers import volume_to_layer_data


def ct_phantom() -> list[tuple]:
    """CT-like phantom (HU) and its labels: 1 liver, 2 spleen, 3 right kidney, 4 left kidney."""
    return _phantom_layers("CT")


def mr_phantom() -> list[tuple]:
    """MRI-like (T2) phantom and its labels, same classes as ct_phantom."""
    return _phantom_layers("MR")


def _phantom_layers(modality: str) -> list[tuple]:
    image, labels = make_phantom(modality)
    return [volume_to_layer_data(image), volume_to_layer_data(labels)]
