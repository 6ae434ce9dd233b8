"""napari writers: a Labels or Image layer as NIfTI on the grid of the scan it was read with."""

from __future__ import annotations

from ..io import save_volume
from .layers import volume_from_layer_data


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Save a Labels layer (uint8, or uint16 above 255); returns [path written]."""
    return _write(path, data, meta, "labels")


def write_image(path: str, data, meta: dict) -> list[str]:
    """Save an Image layer as float32; returns [path written]."""
    return _write(path, data, meta, "image")


def _write(path: str, data, meta: dict, layer_type: str) -> list[str]:
    # The source grid comes from the layer's metadata when it was read by us, else from its scale.
    volume = volume_from_layer_data(data, meta, layer_type)
    written = save_volume(volume, path)
    return [str(written)]
