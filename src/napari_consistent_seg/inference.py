"""Prediction and class-attention maps for a whole volume, on the volume's own grid.

`segment` takes a Volume (3D or cine) and returns its labels Volume: it views the scan in the plane
the model card names (`plane`: "acquisition" = the scanner's own slices, or "axial"...), runs the
array-level `predict_volume` and puts the labels back on the source grid, voxel for voxel.
2D models run slice by slice along axis 0 of the array they get, optionally resampled in-plane to
the spacing the model was trained at; 3D models run MONAI's sliding-window inferer. Long work reports ``progress(done, total)`` and stops when ``cancel``
(a callable or a threading.Event) says so, raising :class:`~napari_consistent_seg.errors.Cancelled`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import Cancelled, ConsistentSegError, ShapeMismatchError
from .intensity import normalise_intensity, spec_for_modality
from .io.volume import Geometry, Volume
from .models.store import Model

Progress = Callable[[int, int], None]


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto": CUDA if present, then Apple MPS, else CPU; otherwise the named device."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def check_cancel(cancel) -> None:
    if cancel is None:
        return
    stop = cancel.is_set() if hasattr(cancel, "is_set") else cancel()
    if stop:
        raise Cancelled("stopped on request")


def _autocast(device: torch.device):
    # mixed precision only where it pays: CUDA. CPU bf16 is slower for these small convs.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@dataclass
class PreparedInput:
    """A volume normalised for a model: (Z, Y, X) float32 in [0, 1], and what was assumed."""

    data: np.ndarray
    spacing_mm: tuple[float, float, float] | None
    modality: str
    warnings: list[str] = field(default_factory=list)


def prepare_input(model: Model, data: np.ndarray, spacing_mm=None, modality: str | None = None) -> PreparedInput:
    """Check the array, pick the card's normalisation for ``modality`` and apply it.

    A 2D (Y, X) array is taken as one slice. Warns (does not refuse) when the modality is not one
    the model was trained on, or unknown.
    """
    arr = np.asarray(data)
    if arr.ndim == 2:
        arr = arr[None]
        if spacing_mm is not None and len(spacing_mm) == 2:
            spacing_mm = (1.0, *spacing_mm)
    if arr.ndim != 3:
        raise ShapeMismatchError(f"expected a (Z, Y, X) volume or a (Y, X) image, got shape {arr.shape}")
    if arr.size == 0:
        raise ShapeMismatchError("the volume is empty")
    if not np.issubdtype(arr.dtype, np.number):
        raise ConsistentSegError(f"the volume holds {arr.dtype} values, not numbers")
    warnings = []
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        warnings.append("the volume has NaN or infinite voxels; they were treated as the lowest intensity")
        finite = arr[np.isfinite(arr)]
        arr = np.where(np.isfinite(arr), arr, finite.min() if finite.size else 0).astype(arr.dtype)
    card_modalities = model.card["modalities"]
    asked = modality or "unknown"
    spec, used = spec_for_modality(model.card["normalisation"], asked)
    if asked == "unknown":
        warnings.append(f"modality unknown: normalised as {used}, the model's first modality")
    elif asked not in card_modalities:
        warnings.append(
            f"model {model.name!r} was trained on {'/'.join(card_modalities)}, not {asked}: "
            f"results may be poor (normalised as {used})"
        )
    spacing = tuple(float(s) for s in spacing_mm) if spacing_mm is not None else None
    return PreparedInput(normalise_intensity(arr, spec), spacing, used, warnings)


def inplane_size(shape_yx, spacing_mm, target_yx) -> tuple[int, int] | None:
    """(Y, X) size of slices resampled from ``spacing_mm`` (z, y, x) to ``target_yx`` mm; None if unchanged."""
    if spacing_mm is None or not target_yx:
        return None
    size = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape_yx, spacing_mm[1:], target_yx))
    return None if size == tuple(shape_yx) else size


def run_slices(forward, data: np.ndarray, channels: int, *, device, batch_size: int = 8,
               spacing_mm=None, target_spacing_yx=None, progress=None, cancel=None) -> np.ndarray:
    """Apply ``forward(batch (B, 1, h, w)) -> (B, channels, h, w)`` to every z slice of ``data``.

    data: (Z, Y, X) float32, already normalised. With ``spacing_mm`` (z, y, x) and
    ``target_spacing_yx``, slices are resampled in-plane to the target and the result back.
    Returns (channels, Z, Y, X) float32.
    """
    z, h, w = data.shape
    resized = inplane_size((h, w), spacing_mm, target_spacing_yx)
    out = np.empty((channels, z, h, w), np.float32)
    with torch.inference_mode(), _autocast(device):
        for start in range(0, z, batch_size):
            check_cancel(cancel)
            batch = torch.from_numpy(data[start:start + batch_size]).to(device)[:, None]
            if resized:
                batch = F.interpolate(batch, size=resized, mode="bilinear", align_corners=False)
            result = forward(batch).float()
            if resized:
                result = F.interpolate(result, size=(h, w), mode="bilinear", align_corners=False)
            out[:, start:start + batch_size] = result.permute(1, 0, 2, 3).cpu().numpy()
            if progress is not None:
                progress(min(start + batch_size, z), z)
    return out


@dataclass
class Prediction:
    """labels: (Z, Y, X) uint8, 0 = background; probabilities: (K, Z, Y, X) float32 or None."""

    labels: np.ndarray
    probabilities: np.ndarray | None
    modality: str
    warnings: list[str]


def predict_volume(
    model: Model,
    data: np.ndarray,
    *,
    spacing_mm=None,
    modality: str | None = None,
    device=None,
    batch_size: int = 8,
    overlap: float = 0.25,
    return_probabilities: bool = False,
    keep_largest: bool | None = None,
    slices=None,
    progress: Progress | None = None,
    cancel=None,
) -> Prediction:
    """Segment a (Z, Y, X) volume (or a (Y, X) image) with ``model``; labels on the input grid.

    ``spacing_mm`` (z, y, x) enables in-plane resampling to the model's training spacing.
    ``keep_largest``: keep each class's largest connected component only (None: as the model
    card's ``postprocessing`` says). ``slices`` (2D models): segment only these z indices,
    normalised as the whole volume (a preview matches the full result, less the post-processing,
    which needs the whole volume); labels are then (len(slices), Y, X).
    """
    device = pick_device(device)
    model.to(device)
    model.backbone.eval()
    prepared = prepare_input(model, data, spacing_mm, modality)
    if slices is not None:
        if model.spatial_dims != 2:
            raise ConsistentSegError("predict_volume(slices=...) is for 2D models only")
        prepared.data = prepared.data[np.asarray(slices, dtype=int)]
    k = model.backbone.out_channels
    if model.spatial_dims == 2:
        probs = run_slices(
            lambda x: model.backbone(x).softmax(1), prepared.data, k, device=device, batch_size=batch_size,
            spacing_mm=prepared.spacing_mm, target_spacing_yx=model.card.get("target_spacing_mm"),
            progress=progress, cancel=cancel,
        )
    else:
        probs = _sliding_window_3d(model, prepared, device, overlap, progress, cancel)
    labels = probs.argmax(0).astype(np.uint8)
    if keep_largest is None:
        keep_largest = bool(model.card.get("postprocessing", {}).get("keep_largest_component", False))
    if keep_largest and slices is None:
        labels = keep_largest_components(labels)
    if np.asarray(data).ndim == 2:
        labels, probs = labels[0], probs[:, 0]
    return Prediction(labels, probs if return_probabilities else None, prepared.modality, prepared.warnings)


def model_plane(model: Model) -> str:
    """The plane a model slices in: the card's `plane`; "axial" for cards that predate it and for
    3D models (their windows follow the patient axes, as in training)."""
    if model.spatial_dims != 2:
        return "axial"
    card = model.card
    plane = card.plane if hasattr(card, "plane") else card.get("plane")
    return plane or "axial"


def model_view(model: Model, volume: Volume) -> Geometry:
    """The geometry whose axis 0 runs along the model's slicing plane, on the volume's source grid."""
    return volume.geometry.view(model_plane(model))


def segment(
    model: Model,
    volume: Volume,
    *,
    phases=None,
    device=None,
    batch_size: int = 8,
    keep_largest: bool | None = None,
    return_probabilities: bool = False,
    progress: Progress | None = None,
    cancel=None,
) -> Volume:
    """Segment a scan: a Volume (Z, Y, X) or cine (T, Z, Y, X) in, its labels Volume out (uint8, same
    grid and shape, named ``"<scan> labels"``, classes in ``meta["class_names"]``).

    The model sees the scan in its card's plane (`model_view`); labels come back on the scan's grid.
    ``phases``: for a cine, segment only these phases (the others stay 0); None = all.
    ``return_probabilities``: ``meta["probabilities"]`` holds (K, [T,] Z, Y, X) float16 (3D or all phases).
    Warnings (modality, spacing) are in ``meta["warnings"]``. Progress counts slices over all phases.
    """
    if volume.is_label:
        raise ConsistentSegError(f"{volume.name!r} is a label map, not a scan: choose the image to segment.")
    view = model_view(model, volume)
    n_phases = volume.n_phases
    chosen = [None] if n_phases is None else (list(range(n_phases)) if phases is None else
                                               sorted({int(t) % n_phases for t in phases}))
    labels = np.zeros(volume.shape, np.uint8)
    probabilities = None
    warnings: list[str] = []
    n_slices = view.shape_zyx[0] if view.shape_zyx is not None else volume.shape[-3]
    for index, t in enumerate(chosen):
        scan = volume if t is None else volume.phase(t)

        def phase_progress(done, total, offset=index * n_slices):
            if progress is not None:
                progress(offset + done, len(chosen) * n_slices)

        prediction = predict_volume(
            model, volume.geometry.transfer(scan.data, view), spacing_mm=view.spacing_mm,
            modality=volume.modality, device=device, batch_size=batch_size, keep_largest=keep_largest,
            return_probabilities=return_probabilities, progress=phase_progress, cancel=cancel,
        )
        result = view.transfer(prediction.labels, volume.geometry)
        if t is None:
            labels[...] = result
        else:
            labels[t] = result
        warnings.extend(w for w in prediction.warnings if w not in warnings)
        if return_probabilities:
            probs = np.stack([view.transfer(p, volume.geometry) for p in prediction.probabilities]).astype(np.float16)
            if t is None:
                probabilities = probs
            else:
                if probabilities is None:
                    probabilities = np.zeros((probs.shape[0], *volume.shape), np.float16)
                probabilities[:, t] = probs
    meta = {
        "source": volume.meta.get("source", ""),
        "model": model.name,
        "class_names": {int(k): v for k, v in model.classes.items() if int(k) != 0},
        "warnings": warnings,
        "plane": model_plane(model),
        **({"phase_times_ms": volume.meta["phase_times_ms"]} if volume.meta.get("phase_times_ms") else {}),
    }
    if probabilities is not None:
        meta["probabilities"] = probabilities
    return volume.with_data(labels, name=f"{volume.name} labels", is_label=True, meta=meta)


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Each class keeps its largest connected component (full connectivity); the rest becomes 0.

    For anatomy where every class is one organ: it removes the islands a slice-wise model leaves
    on other slices, which dominate HD95 (see docs/benchmarks.md). Returns a new array.
    """
    from monai.transforms import KeepLargestConnectedComponent

    present = [int(c) for c in np.unique(labels) if c != 0]
    if not present:
        return labels.copy()
    keep = KeepLargestConnectedComponent(applied_labels=present, is_onehot=False, independent=True)
    out = labels[None].copy()  # MONAI edits a numpy input in place
    return np.asarray(keep(out))[0].astype(labels.dtype)


def _sliding_window_3d(model: Model, prepared: PreparedInput, device, overlap, progress, cancel) -> np.ndarray:
    from monai.inferers import sliding_window_inference

    roi = tuple(int(s) for s in model.card["patch_size"])
    image = torch.from_numpy(prepared.data)[None, None].to(device)
    done = [0]

    def predictor(window: torch.Tensor) -> torch.Tensor:
        check_cancel(cancel)
        result = model.backbone(window).softmax(1)
        done[0] += 1
        if progress is not None:
            progress(done[0], done[0] + 1)  # the window count is MONAI's; report a running count
        return result

    with torch.inference_mode(), _autocast(device):
        probs = sliding_window_inference(image, roi, 4, predictor, overlap=overlap, mode="gaussian")
    return probs[0].float().cpu().numpy()


def attention_volume(model: Model, volume: Volume, **options) -> np.ndarray:
    """`attention_maps` of a 3D Volume in the model's plane, returned on the volume's grid: (K, Z, Y, X)."""
    if volume.n_phases is not None:
        raise ConsistentSegError("attention maps take one phase of a cine: pass volume.phase(t)")
    view = model_view(model, volume)
    maps = attention_maps(model, volume.geometry.transfer(volume.data, view), spacing_mm=view.spacing_mm,
                          modality=volume.modality, **options)
    return np.stack([view.transfer(m, volume.geometry) for m in maps])


def attention_maps(
    model: Model,
    data: np.ndarray,
    *,
    spacing_mm=None,
    modality: str | None = None,
    scale: int = 0,
    head: int | None = None,
    device=None,
    batch_size: int = 8,
    progress: Progress | None = None,
    cancel=None,
) -> np.ndarray:
    """Per-class attention of the model's class queries over the image: (K, Z, Y, X) float32.

    ``scale`` picks the decoder tap: 0 = deepest (stride 8), 1 = stride 4, 2 = stride 2.
    ``head`` picks one attention head, or ``None`` to average them. Values are softmax attention
    over the pixels of each slice times the number of pixels, so 1 means "uniform attention"
    and 10 means ten times more attention than uniform. 2D models only.
    """
    if model.modules is None:
        raise ConsistentSegError(
            f"model {model.name!r} has no external modules saved beside it, so it has no attention maps"
        )
    if model.spatial_dims != 2:
        raise ConsistentSegError("attention maps are implemented for 2D models only")
    n_scales = len(model.modules.config["heads"])
    if not 0 <= scale < n_scales:
        raise ValueError(f"scale must be 0..{n_scales - 1} (0 = deepest), got {scale}")
    heads = model.modules.config["heads"][scale]
    if head is not None and not 0 <= head < heads:
        raise ValueError(f"scale {scale} has heads 0..{heads - 1}, got {head}")
    device = pick_device(device)
    model.to(device)
    model.backbone.eval()
    model.modules.eval()
    prepared = prepare_input(model, data, spacing_mm, modality)

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = model.backbone(x, return_features=True)
        logits = model.modules.attend(out.features).scales[scale].attention  # (B, h, K, *s)
        n_pixels = logits[0, 0, 0].numel()
        weights = logits.flatten(3).softmax(-1).view_as(logits) * n_pixels
        weights = weights.mean(1) if head is None else weights[:, head]
        return out.to_input_grid(weights)

    k = model.backbone.out_channels
    maps = run_slices(forward, prepared.data, k, device=device, batch_size=batch_size,
                      spacing_mm=prepared.spacing_mm, target_spacing_yx=model.card.get("target_spacing_mm"),
                      progress=progress, cancel=cancel)
    return maps[:, 0] if np.asarray(data).ndim == 2 else maps
