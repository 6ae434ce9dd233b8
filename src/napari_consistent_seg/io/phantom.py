"""A synthetic abdomen (body, liver, spleen, kidneys) for demos and tests; not a patient."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from ..errors import ConsistentSegError
from .volume import Geometry, Volume

PHANTOM_CLASSES = {1: "liver", 2: "spleen", 3: "right kidney", 4: "left kidney"}

# Ellipsoids as (centre, radii) in fractions of the (z, y, x) extent. Canonical axes: x toward the
# patient's left (liver at small x), y toward posterior (kidneys at large y), z toward superior.
_ORGANS = {
    1: ((0.62, 0.42, 0.30), (0.25, 0.20, 0.17)),  # liver: right, anterior, high
    2: ((0.64, 0.62, 0.75), (0.14, 0.10, 0.07)),  # spleen: left, posterior, high
    3: ((0.36, 0.68, 0.33), (0.14, 0.07, 0.06)),  # right kidney: lower than the left
    4: ((0.42, 0.68, 0.67), (0.14, 0.07, 0.06)),  # left kidney
}
# Tissue intensities: CT in HU of a portal-venous contrast phase, like the btcv scans the abdomen
# model learnt from (enhancing kidney cortex brightest, then spleen and liver above muscle); MR as
# T2-like arbitrary units (fluid-rich kidneys and spleen bright).
_INTENSITY = {
    "CT": {"air": -1000, "fat": -100, "muscle": 50, "bone": 700, 1: 100, 2: 115, 3: 160, 4: 160},
    "MR": {"air": 0, "fat": 90, "muscle": 160, "bone": 60, 1: 110, 2: 330, 3: 400, 4: 400},
}
_NOISE_SD = {"CT": 12.0, "MR": 15.0}


def make_phantom(
    modality: str = "CT",
    shape: tuple[int, int, int] = (40, 128, 128),
    spacing_mm: tuple[float, float, float] = (5.0, 1.5, 1.5),
    seed: int = 0,
) -> tuple[Volume, Volume]:
    """Synthetic abdomen image (int16) and its labels (uint8, PHANTOM_CLASSES), both (Z, Y, X).

    Deterministic for a given seed; CT values are HU-like, MR values T2-like.
    """
    modality = str(modality).upper()
    if modality not in _INTENSITY:
        raise ConsistentSegError(f"No phantom for modality {modality!r}: use 'CT' or 'MR'.")
    tissue = _INTENSITY[modality]
    z, y, x = np.meshgrid(*(np.linspace(0.0, 1.0, n) for n in shape), indexing="ij", sparse=True)

    # Body, abdominal cavity (inside the fat layer) and spine are cylinders along z.
    body = np.broadcast_to(_inside((y, x), (0.5, 0.5), (0.36, 0.46)), shape)
    cavity = np.broadcast_to(_inside((y, x), (0.5, 0.5), (0.31, 0.41)), shape)
    spine = np.broadcast_to(_inside((y, x), (0.78, 0.5), (0.05, 0.05)), shape)

    labels = np.zeros(shape, dtype=np.uint8)
    for label, (centre, radii) in _ORGANS.items():
        labels[_inside((z, y, x), centre, radii) & cavity] = label

    image = np.full(shape, tissue["air"], dtype=np.float32)
    image[body] = tissue["fat"]
    image[cavity] = tissue["muscle"]
    image[spine] = tissue["bone"]
    for label in PHANTOM_CLASSES:
        image[labels == label] = tissue[label]
    # Partial-volume blur in-plane, then scanner noise.
    image = gaussian_filter(image, sigma=(0.0, 1.0, 1.0))
    image += np.random.default_rng(seed).normal(0.0, _NOISE_SD[modality], size=shape)
    if modality == "MR":
        image = np.abs(image)  # magnitude images are non-negative

    geometry = Geometry.from_spacing(spacing_mm, shape)
    name = f"{modality} synthetic phantom"
    meta = {"source": "", "format": "phantom", "warnings": []}
    image_volume = Volume(np.round(image).astype(np.int16), geometry, modality, name, False, dict(meta))
    label_meta = dict(meta, class_names=dict(PHANTOM_CLASSES))
    label_volume = Volume(labels, geometry, modality, f"{name} labels", True, label_meta)
    return image_volume, label_volume


def _inside(coordinates, centre, radii) -> np.ndarray:
    """Boolean mask of the ellipse/ellipsoid; coordinates are broadcastable grids, one per axis."""
    return sum(((c - m) / r) ** 2 for c, m, r in zip(coordinates, centre, radii, strict=True)) <= 1.0
