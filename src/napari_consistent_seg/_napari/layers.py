"""Volume <-> napari layer data tuples, and the source grid of a napari layer.

Our facts about a layer live in ``layer.metadata["consistent_seg"]``: geometry (Geometry.to_dict),
modality, source, warnings and, for labels with known classes, class_names {value: name}.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConsistentSegError, ShapeMismatchError
from ..io import Geometry, Volume

METADATA_KEY = "consistent_seg"


def volume_to_layer_data(volume: Volume) -> tuple[np.ndarray, dict, str]:
    """(data, kwargs, "image" | "labels") with scale = spacing_mm (z, y, x) and our metadata.

    The slider runs through the scanner's slices (volume order, docs/io.md); a cine gets a phase
    slider in front (scale 1 per phase). The full affine travels in the metadata.
    """
    ours = {
        "geometry": volume.geometry.to_dict(),
        "modality": volume.modality,
        "source": volume.meta.get("source", ""),
        "warnings": list(volume.meta.get("warnings", [])),
    }
    scale = tuple(volume.spacing_mm)
    axis_labels = ("slice", "row", "column")
    if volume.n_phases is not None:
        scale, axis_labels = (1.0, *scale), ("phase", *axis_labels)
        if volume.meta.get("phase_times_ms"):
            ours["phase_times_ms"] = list(volume.meta["phase_times_ms"])
    kwargs = {"name": volume.name, "scale": scale, "axis_labels": axis_labels,
              "metadata": {METADATA_KEY: ours}}
    if volume.is_label:
        class_names = volume.meta.get("class_names")
        if class_names:
            ours["class_names"] = dict(class_names)
            # The features table makes napari show the class name under the cursor.
            kwargs["features"] = {
                "index": [0, *class_names],
                "class": ["background", *class_names.values()],
            }
        return volume.data, kwargs, "labels"
    kwargs["contrast_limits"] = list(volume.display_limits())
    kwargs["colormap"] = "gray"
    return volume.data, kwargs, "image"


def volume_from_layer_data(data, meta: dict, layer_type: str) -> Volume:
    """Volume from a layer data tuple, the form napari writers receive (data, layer state, type).

    2D data becomes Z=1; 4D data is a cine (T, Z, Y, X). Raises ShapeMismatchError for data of more
    than 4 dimensions and ConsistentSegError for RGB images.
    """
    if meta.get("multiscale"):
        data = data[0]
    if meta.get("rgb"):
        raise ConsistentSegError("RGB images are not CT/MR volumes: convert the layer to grey levels first.")
    array = np.asarray(data)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim not in (3, 4):
        raise ShapeMismatchError(
            f"The layer has {array.ndim} dimensions {array.shape}; only a 2D, 3D (z, y, x) or cine "
            "(t, z, y, x) layer can be a volume: take one channel first."
        )
    ours = (meta.get("metadata") or {}).get(METADATA_KEY, {})
    return Volume(
        data=array,
        geometry=_geometry(array.shape[-3:], meta.get("scale"), ours.get("geometry")),
        modality=ours.get("modality", "unknown"),
        name=meta.get("name", ""),
        is_label=layer_type == "labels",
        meta={"source": ours.get("source", ""), "warnings": [],
              **({"phase_times_ms": ours["phase_times_ms"]} if ours.get("phase_times_ms") else {})},
    )


def volume_from_layer(layer) -> Volume:
    """Volume of a napari Image or Labels layer (data not copied)."""
    return volume_from_layer_data(*layer.as_layer_data_tuple())


def geometry_from_layer(layer) -> Geometry:
    """The layer's source grid from its metadata; else canonical at the origin with spacing = scale.

    2D layers count as Z=1 (z spacing 1 mm); layers with more than 3 axes use the last three.
    Stored geometry that no longer fits the layer's shape is ignored.
    """
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    shape = tuple(np.shape(data))
    if getattr(layer, "rgb", False):
        shape = shape[:-1]
    shape_zyx = ((1,) + shape)[-3:] if len(shape) == 2 else shape[-3:]
    stored = (layer.metadata or {}).get(METADATA_KEY, {}).get("geometry")
    return _geometry(shape_zyx, layer.scale, stored)


def misplaced(layer, other, command: str) -> str | None:
    """What to tell the user when ``layer`` (labels) and ``other`` (the scan, or a reference) were both
    read from files whose headers put them in different places, although their shapes agree: a label
    file written with an identity or default affine, whose voxels napari then shows in another order.
    None when they agree, or when either was made in napari (it lies where the user painted it).
    ``command``: the CLI command that takes such a file's voxels in the scan's file order."""
    mine, theirs = (_fitting((lay.metadata or {}).get(METADATA_KEY, {}).get("geometry"), np.shape(lay.data)[-3:])
                    for lay in (layer, other))
    if mine is None or theirs is None or mine.same_place(theirs):
        return None
    return (f"{layer.name!r} does not lie where {other.name!r} does: the header of its file places it elsewhere, "
            "so its voxels may be in another order (napari shows it so). Save it again with the scan's header, or "
            f"use `consistent-seg {command}`, which takes such a file's voxels in the scan's file order.")


def modality_from_layer(layer) -> str:
    """'CT', 'MR' or 'unknown', as recorded when the layer was read."""
    return (layer.metadata or {}).get(METADATA_KEY, {}).get("modality", "unknown")


def _fitting(stored: dict | None, shape_zyx) -> Geometry | None:
    """The stored geometry (our metadata) if it still fits an array of ``shape_zyx``, else None."""
    if stored is None:
        return None
    geometry = Geometry.from_dict(stored)
    return geometry if geometry.shape_zyx in (None, tuple(shape_zyx)) else None


def _geometry(shape_zyx, scale, stored: dict | None) -> Geometry:
    geometry = _fitting(stored, shape_zyx)
    if geometry is not None:
        return geometry
    scale = tuple(float(s) for s in (scale if scale is not None else (1.0, 1.0, 1.0)))
    spacing_mm = ((1.0,) + scale)[-3:] if len(scale) == 2 else scale[-3:]
    return Geometry.from_spacing(spacing_mm, shape_zyx)
