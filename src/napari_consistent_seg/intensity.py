"""Input normalisation named in a model card: a CT window in HU, or MRI percentile scaling.

Both map intensities to [0, 1]. A spec is a small dict so that it can live in the JSON card:
``{"kind": "hu_window", "window": [-125, 275]}`` or ``{"kind": "percentile", "percentiles": [1, 99]}``.
"""

from __future__ import annotations

import numpy as np

from .errors import ConsistentSegError

CT_ABDOMEN_WINDOW = {"kind": "hu_window", "window": [-125.0, 275.0]}
MR_PERCENTILE = {"kind": "percentile", "percentiles": [1.0, 99.0]}


def normalise_intensity(data: np.ndarray, spec: dict) -> np.ndarray:
    """Return ``data`` as float32 in [0, 1] following ``spec``; NaNs become 0.

    hu_window: clip to [lo, hi] HU and rescale. An 8-bit CT (uint8) is taken as already
    windowed to this window upstream (as btcv_ct is) and only rescaled from [0, 255].
    percentile: clip to the given percentiles of the finite voxels and rescale; a constant
    volume gives all zeros.
    """
    kind = spec.get("kind")
    if kind == "hu_window":
        lo, hi = (float(v) for v in spec["window"])
        if data.dtype == np.uint8:
            out = data.astype(np.float32) / 255.0
        else:
            out = (np.clip(data.astype(np.float32), lo, hi) - lo) / (hi - lo)
    elif kind == "percentile":
        finite = np.isfinite(data)
        values = data[finite] if not finite.all() else data
        if values.size == 0:
            return np.zeros(data.shape, np.float32)
        lo, hi = np.percentile(values, spec.get("percentiles", [1.0, 99.0]))
        if hi <= lo:
            return np.zeros(data.shape, np.float32)
        out = (np.clip(data.astype(np.float32), lo, hi) - lo) / (hi - lo)
    else:
        raise ConsistentSegError(f"unknown normalisation kind {kind!r} in the model card")
    return np.nan_to_num(out, nan=0.0).astype(np.float32, copy=False)


def spec_for_modality(normalisation: dict, modality: str) -> tuple[dict, str]:
    """Pick the card's spec for ``modality`` ("CT", "MR" or "unknown").

    Returns (spec, modality used). An unknown modality, or one the model was not trained on,
    falls back to the card's first modality; the caller warns about the mismatch.
    """
    if modality in normalisation:
        return normalisation[modality], modality
    first = next(iter(normalisation))
    return normalisation[first], first
