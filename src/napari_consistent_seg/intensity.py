"""Input normalisation named in a model card: a CT window in HU, or MRI percentile scaling.

Both map intensities to [0, 1]. A spec is a small dict so that it can live in the JSON card:
``{"kind": "hu_window", "window": [-125, 275]}`` or ``{"kind": "percentile", "percentiles": [1, 99]}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConsistentSegError

CT_ABDOMEN_WINDOW = {"kind": "hu_window", "window": [-125.0, 275.0]}
MR_PERCENTILE = {"kind": "percentile", "percentiles": [1.0, 99.0]}


def normalise_intensity(data: np.ndarray, spec: dict) -> np.ndarray:
    """Return ``data`` as float32 in [0, 1] following ``spec``; NaNs become 0.

    The window is the one `intensity_map` fits (inference applies that same map batch by batch):
    hu_window: clip to [lo, hi] HU and rescale; an 8-bit CT (uint8) is taken as already windowed
    upstream (as btcv_ct is) and only rescaled from [0, 255]. percentile: clip to the given
    percentiles of the finite voxels and rescale; a constant volume gives all zeros.
    """
    fitted = intensity_map(data, spec)
    if fitted.hi <= fitted.lo:
        return np.zeros(data.shape, np.float32)
    out = (np.clip(data.astype(np.float32), fitted.lo, fitted.hi) - fitted.lo) / (fitted.hi - fitted.lo)
    return np.nan_to_num(out, nan=0.0).astype(np.float32, copy=False)


@dataclass(frozen=True)
class IntensityMap:
    """Maps raw intensities to [0, 1]: clip to [lo, hi] and rescale; non-finite voxels take ``fill``
    first (the volume's lowest finite value). ``lo == hi`` (a constant volume) maps to 0;
    ``lo = None``: values pass as they are (already normalised)."""

    lo: float | None
    hi: float | None = None
    fill: float | None = None

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """(B, ...) raw values, any dtype -> float32 in [0, 1], same shape."""
        x = values.float()
        if self.lo is None:
            return x
        if self.fill is not None:
            x = torch.where(torch.isfinite(x), x, torch.tensor(self.fill, dtype=x.dtype, device=x.device))
        if self.hi <= self.lo:
            return torch.zeros_like(x)
        # out of place first: a float32 `values` shares memory with the caller's array
        return x.clamp(self.lo, self.hi).sub_(self.lo).div_(self.hi - self.lo)


def intensity_map(data: np.ndarray, spec: dict) -> IntensityMap:
    """The card's normalisation ``spec`` fitted to ``data``, the one rule of this module:
    hu_window -> the window (an 8-bit CT is taken as windowed upstream: 0..255); percentile -> the
    percentiles of the finite voxels."""
    fill = None
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        finite = data[np.isfinite(data)]
        fill = float(finite.min()) if finite.size else 0.0
    kind = spec.get("kind")
    if kind == "hu_window":
        lo, hi = (0.0, 255.0) if data.dtype == np.uint8 else (float(v) for v in spec["window"])
    elif kind == "percentile":
        values = data if fill is None else data[np.isfinite(data)]
        if values.size == 0:
            return IntensityMap(0.0, 0.0)
        # kept as numpy float64 (a float): the percentile path has always rescaled in float64
        lo, hi = np.percentile(values, spec.get("percentiles", [1.0, 99.0]))
    else:
        raise ConsistentSegError(f"unknown normalisation kind {kind!r} in the model card")
    return IntensityMap(lo, hi, fill)


def spec_for_modality(normalisation: dict, modality: str) -> tuple[dict, str]:
    """Pick the card's spec for ``modality`` ("CT", "MR" or "unknown").

    Returns (spec, modality used). An unknown modality, or one the model was not trained on,
    falls back to the card's first modality; the caller warns about the mismatch.
    """
    if modality in normalisation:
        return normalisation[modality], modality
    first = next(iter(normalisation))
    return normalisation[first], first
