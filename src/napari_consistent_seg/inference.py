"""Segmentation and class-attention maps of a whole scan, as four named stages.

``segment(model, volume)`` (a Volume in, its labels Volume out) runs:

1. :func:`prepare` - view the scan in the model card's plane, note the in-plane resampling to the
   model's spacing, and fix the intensity mapping (CT window or MRI percentiles) without copying
   the volume: intensities are normalised batch by batch;
2. :func:`infer` - 2D models slice by slice (a batch of slices at a time), 3D models with MONAI's
   ``sliding_window_inference``; each batch is reduced to uint8 labels at once, and a probability
   volume (float16) exists only when asked for;
3. :func:`post_process` - each class keeps its largest connected component (as the card says);
4. :func:`restore` - the labels back on the scan's own grid, voxel for voxel.

``predict_volume`` runs stages 1-3 on a bare (Z, Y, X) array; ``attention_volume`` /
``attention_maps`` run the same prepare and slice loop with another forward. Long work reports
``progress(done, total)`` and stops when ``cancel`` (a callable or a threading.Event) says so,
raising :class:`~napari_consistent_seg.errors.Cancelled`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import weakref
from copy import deepcopy as copy_module
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .errors import Cancelled, ConsistentSegError, InvalidInputError, ShapeMismatchError
from .intensity import IntensityMap, intensity_map, spec_for_modality
from .io.volume import Geometry, Volume
from .models.store import Model

Progress = Callable[[int, int], None]

#: How labels reach the scan's grid when a 2D model runs at another in-plane spacing.
#: "probabilities": softmax, bilinear upsampling, then argmax (the reference, what training saw);
#: "labels": argmax at the model's resolution, nearest upsampling of the labels (benchmarks/speed.py).
UPSAMPLING = ("probabilities", "labels")

#: The region search of `infer` (2D models whose post-processing keeps one component per class):
#: volumes of at least REGION_MIN_SLICES slices run whole slices REGION_STEP_MM apart (every
#: REGION_STEP_SLICES-th slice where the spacing is unknown) first, then only the slices and the
#: in-plane box, widened by REGION_MARGIN_MM (REGION_MARGIN_PX), around what they found.
REGION_MIN_SLICES = 48
REGION_STEP_MM = 15.0
REGION_STEP_SLICES = 5
REGION_MARGIN_MM = 30.0
REGION_MARGIN_PX = 40


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto": CUDA if present, then Apple MPS, else CPU; otherwise the named device."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise InvalidInputError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from error
    if chosen.type == "cuda" and (not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()):
        raise InvalidInputError(f"device {device!r}: this machine has no such CUDA GPU; use auto or cpu")
    if chosen.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidInputError(f"device {device!r}: Apple MPS is not available here; use auto or cpu")
    return chosen


def check_cancel(cancel) -> None:
    if cancel is None:
        return
    stop = cancel.is_set() if hasattr(cancel, "is_set") else cancel()
    if stop:
        raise Cancelled("stopped on request")


#: Environment variable that fixes the CPU threads of inference (default: see `inference_threads`).
THREADS_ENV = "CONSISTENT_SEG_THREADS"


def inference_threads() -> int:
    """CPU threads for inference: ``$CONSISTENT_SEG_THREADS`` if set, else torch's thread count
    capped at the cores that other processes leave idle now (`_busy_cores`), at least 1.

    Why: torch's threads meet at a barrier after every operation, so one thread that the kernel
    parks stalls them all. On our 2-core CPU at load 6, the abdomen network ran 3-10x slower per
    slice on 2 threads than on 1 (benchmarks/speed.py, "ideas"); on idle cores all threads are kept.
    The count of runnable tasks is read now rather than the 1-minute load average, which would
    also count this process's own last run and keep a laptop on one thread after each job.
    """
    fixed = os.environ.get(THREADS_ENV, "").strip()
    if fixed:
        try:
            return max(1, int(fixed))
        except ValueError:
            raise ConsistentSegError(f"{THREADS_ENV}={fixed!r} is not a whole number of threads: "
                                     "set it to e.g. 2, or unset it") from None
    threads = torch.get_num_threads()
    idle = idle_cores()
    if idle is None:  # not Linux: trust torch
        return threads
    return max(1, min(threads, math.ceil(idle)))


def idle_cores() -> float | None:
    """The cores this process may run on less the tasks other processes run or queue now
    (`_busy_cores`); None where the cores cannot be read (not Linux)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    return cores - _busy_cores()


LOADAVG = "/proc/loadavg"
_BUSY_READ: list = [-1e9, 0.0]  # (time.monotonic() of the last reading, its value)
BUSY_READING_HOLDS_S = 2.0


def _busy_cores(samples: int = 3) -> float:
    """Tasks running or waiting for a core besides the one asking, median of a few reads of
    /proc/loadavg's runnable count 5 ms apart; 0 where it cannot be read (then all threads).

    A reading holds for ``BUSY_READING_HOLDS_S``: the 10 ms of waiting were a tenth of segmenting
    a 10-slice phase (104 ms), paid again for each phase of a cine."""
    now = time.monotonic()
    if now - _BUSY_READ[0] < BUSY_READING_HOLDS_S:
        return _BUSY_READ[1]
    _BUSY_READ[1] = _read_busy_cores(samples)
    _BUSY_READ[0] = time.monotonic()
    return _BUSY_READ[1]


def _read_busy_cores(samples: int) -> float:
    """Runnable tasks of other processes: /proc/loadavg's runnable count less this process's own
    running threads (/proc/self/task/*/stat). Our own threads must not count: torch's OpenMP
    workers spin for a while after each parallel region, so a reading taken just after a batch
    saw them as load and a loop of `predict_volume` calls fell to one thread (80 -> 140 ms per
    cardiac volume on our 2-core CPU)."""
    counts = []
    for i in range(samples):
        try:
            with open(LOADAVG) as f:
                runnable = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0.0
        counts.append(max(0, runnable - _own_running_threads()))
        if i + 1 < samples:
            time.sleep(0.005)
    return float(np.median(counts))


def _own_running_threads() -> int:
    """This process's threads in state R (the reader included); 1 where /proc/self/task is not there."""
    running = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended
            continue
        if stat[stat.rindex(")") + 2:].startswith("R"):
            running += 1
    return max(1, running)


@contextlib.contextmanager
def _cpu_threads(device: torch.device):
    """Run the block with `inference_threads()` on the CPU, then restore torch's thread count."""
    before = torch.get_num_threads()
    wanted = inference_threads() if device.type == "cpu" else before
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if wanted != before:
            torch.set_num_threads(before)


#: Environment variable for the arithmetic of inference: "auto" (default) or "float32".
PRECISION_ENV = "CONSISTENT_SEG_PRECISION"


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (x86 AVX512-BF16 or AMX-BF16; Linux reads
    /proc/cpuinfo). Elsewhere bf16 would be emulated, slower than float32, so it is not used."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def inference_precision(device: torch.device) -> str:
    """The arithmetic the network runs in: "float16" on CUDA, "bfloat16" on a CPU with native
    bf16, else "float32"; ``$CONSISTENT_SEG_PRECISION=float32`` forces float32 everywhere.

    Why bf16 on such CPUs: it halves the time of the CT benchmark (9.1 -> 4.6 s for 512 x 512 x 300
    on our 2-core AMD EPYC) and changes 0.013 % of its voxels, every Dice within 0.11 points; the
    validation sets move by at most a tenth of a point (docs/inference.md). 2D labels on the CPU
    come from a channels-last copy of the network in that precision (`_channels_last_copy`);
    elsewhere convolutions, matmuls and the like run in the reduced precision under torch's
    autocast. Softmax maps are float32.
    """
    asked = os.environ.get(PRECISION_ENV, "auto").strip().lower() or "auto"
    if asked not in ("auto", "float32"):
        raise ConsistentSegError(f"{PRECISION_ENV}={asked!r}: use auto or float32")
    if asked == "float32":
        return "float32"
    if device.type == "cuda":
        return "float16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def _autocast(device: torch.device):
    """Mixed precision where it pays (`inference_precision`)."""
    precision = inference_precision(device)
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, precision))


_CL_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _channels_last_copy(backbone: torch.nn.Module, device: torch.device) -> torch.nn.Module | None:
    """The network a 2D model's labels are computed with on the CPU: a copy of ``backbone`` with
    channels-last weights, in the inference precision (bf16 on a CPU with native bf16, else
    float32), run on channels-last input of that precision without autocast. None elsewhere
    (CUDA, 3D models: the backbone itself, under autocast where it pays).

    Why (docs/inference.md): on our 2-core EPYC Zen 4 the cardiac network runs a batch of five
    256 x 256 slices in bf16 in 30-36 ms this way against 39-46 ms under autocast on the standard
    layout (oneDNN's channels-last kernels fill the vector units where the 16- and 4-channel layers
    could not, and no activation is cast); in float32 on a 2-core Zen 3 (AVX2, no bf16) in 109
    against 122 ms. The copy is kept while the backbone's parameters are the same tensors at the
    same version, so fine-tuning or loading new weights makes a new one.
    """
    if device.type != "cpu" or backbone.spatial_dims != 2:
        return None
    dtype = getattr(torch, inference_precision(device))
    key = (dtype, *((id(p), p.data_ptr(), p._version) for p in backbone.parameters()))
    cached = _CL_COPIES.get(backbone)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        copy = copy_module(backbone).to(dtype=dtype, memory_format=torch.channels_last).eval()
    _CL_COPIES[backbone] = (key, copy)
    return copy


# ---- stage 1: prepare ----------------------------------------------------------------------------

@dataclass
class PreparedScan:
    """A scan as the model will see it, before any copy is made.

    data: (Z, Y, X) raw intensities, axis 0 along the model's slicing axis (a view of the scan).
    spacing_mm: (z, y, x) of ``data``, or None when unknown (no in-plane resampling then).
    model_size_yx: the in-plane size at the model's training spacing, or None if unchanged.
    view / source: the geometry of ``data`` and of the scan, for :func:`restore` (None for arrays).
    """

    data: np.ndarray
    intensity: IntensityMap
    spacing_mm: tuple[float, float, float] | None
    model_size_yx: tuple[int, int] | None
    modality: str
    warnings: list[str] = field(default_factory=list)
    view: Geometry | None = None
    source: Geometry | None = None


def _check_array(data) -> np.ndarray:
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise ShapeMismatchError(f"expected a (Z, Y, X) volume or a (Y, X) image, got shape {arr.shape}")
    if arr.size == 0:
        raise ShapeMismatchError("the volume is empty")
    if arr.dtype.kind not in "iuf":  # bool, complex, text, objects: not intensities
        raise InvalidInputError(f"the volume holds {arr.dtype} values, not numbers (real intensities)")
    return arr


def _check_model(model) -> None:
    if not isinstance(model, Model):
        raise InvalidInputError(f"expected a model from load_model(name), got {type(model).__name__}")


def _check_spacing(spacing_mm) -> tuple[float, float, float] | None:
    """(z, y, x) voxel size in mm as floats, or None; InvalidInputError for anything else."""
    if spacing_mm is None:
        return None
    try:
        spacing = tuple(float(s) for s in spacing_mm)
    except (TypeError, ValueError):
        raise InvalidInputError(f"spacing_mm {spacing_mm!r} must be three numbers (z, y, x) in mm") from None
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InvalidInputError(f"spacing_mm {spacing} must be three positive sizes (z, y, x) in mm")
    return spacing


def prepare_array(model: Model, data, spacing_mm=None, modality: str | None = None) -> PreparedScan:
    """Stage 1 on a bare (Z, Y, X) array already in the model's plane (axis 0 = slices).

    Warns (does not refuse) when the modality is not one the model was trained on, or unknown,
    and when the volume has NaN or infinite voxels (they take the lowest intensity).
    """
    _check_model(model)
    arr = _check_array(data)
    card = model.card
    asked = modality or "unknown"
    spec, used = spec_for_modality(card.normalisation, asked)
    warnings = []
    if asked == "unknown":
        warnings.append(f"modality unknown: normalised as {used}, the model's first modality")
    elif asked not in card.modalities:
        warnings.append(f"model {model.name!r} was trained on {'/'.join(card.modalities)}, not {asked}: "
                        f"results may be poor (normalised as {used})")
    intensity = intensity_map(arr, spec)
    if intensity.fill is not None:
        warnings.insert(0, "the volume has NaN or infinite voxels; they were treated as the lowest intensity")
    spacing = _check_spacing(spacing_mm)
    size = inplane_size(arr.shape[1:], spacing, card.target_spacing_mm) if model.spatial_dims == 2 else None
    return PreparedScan(arr, intensity, spacing, size, used, warnings)


def prepare(model: Model, volume: Volume) -> PreparedScan:
    """Stage 1 on a 3D Volume (one phase of a cine): view it in the model's plane, then
    :func:`prepare_array`. Costs no copy when the model's plane is the volume's own."""
    view = model_view(model, volume)
    prepared = prepare_array(model, volume.geometry.transfer(volume.data, view), view.spacing_mm, volume.modality)
    prepared.view, prepared.source = view, volume.geometry
    return prepared


def inplane_size(shape_yx, spacing_mm, target_yx) -> tuple[int, int] | None:
    """(Y, X) size of slices resampled from ``spacing_mm`` (z, y, x) to ``target_yx`` mm; None if unchanged."""
    if spacing_mm is None or not target_yx:
        return None
    size = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape_yx, spacing_mm[1:], target_yx))
    return None if size == tuple(shape_yx) else size


# ---- stage 2: infer ------------------------------------------------------------------------------

def _slice_batches(prepared: PreparedScan, batch_size: int, device, cancel, index=None, box=None):
    """Yield (where, x): x (B, 1, h, w) float32 on ``device``, normalised, at the model's size.

    ``index``: the z slices to run, in increasing order (default all); ``box``: (rows, columns)
    slices of each slice to run alone (default the whole slice). ``where`` = (slices, rows,
    columns), the part of the (Z, Y, X) volume that x is (slices: a slice object where they are
    consecutive, else their indices).
    Batches of at most ``batch_size`` slices, as even as can be: a 10-slice cine phase runs as two
    batches of 5, not 8 + 2 (104 against 113 ms on our CPU; docs/inference.md)."""
    h, w = prepared.data.shape[1:]
    index = np.arange(prepared.data.shape[0]) if index is None else np.asarray(index, dtype=int)
    rows, cols = box if box is not None else (slice(0, h), slice(0, w))
    size = prepared.model_size_yx
    if size and box is not None:  # the crop at the model's spacing: the same scale as whole slices
        size = tuple(max(1, round(n * m / full)) for n, m, full in
                     zip((rows.stop - rows.start, cols.stop - cols.start), size, (h, w)))
    n = len(index)
    batch_size = max(1, math.ceil(n / max(1, math.ceil(n / max(1, batch_size)))))
    for start in range(0, n, batch_size):
        check_cancel(cancel)
        part = index[start:start + batch_size]
        where = slice(int(part[0]), int(part[-1]) + 1) if part[-1] - part[0] == len(part) - 1 else part
        raw = prepared.data[where, rows, cols]
        x = prepared.intensity(torch.from_numpy(np.ascontiguousarray(raw)).to(device))[:, None]
        if size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        yield (where, rows, cols), x


def _each_batch(work, prepared: PreparedScan, batch_size: int, device, progress, cancel,
                mixed_precision: bool = True, runs=None) -> None:
    """Call ``work(where, x)`` on every slice batch (`_slice_batches`) in turn, under
    inference mode and the threads of `inference_threads`; with ``mixed_precision``, in the
    precision of `inference_precision` (labels), else float32 (maps that users read as numbers).

    ``runs``: an iterable of (index, box) passes (default one pass over every whole slice); it may
    be a generator that decides the next pass from the results so far. Progress counts the slices
    run, plus those left out, which ``runs`` yields as a count.

    (Two batches at once, each in a worker on one torch thread, gained nothing measurable on our
    2-core CPU over one batch on two threads: docs/inference.md.)
    """
    z = prepared.data.shape[0]
    done = 0
    precision = _autocast(device) if mixed_precision else contextlib.nullcontext()
    with torch.inference_mode(), precision, _cpu_threads(device):
        for run in runs if runs is not None else [(None, None)]:
            if not isinstance(run, tuple):  # slices that will not run: count them as done
                done += int(run)
                continue
            index, box = run
            for where, x in _slice_batches(prepared, batch_size, device, cancel, index, box):
                work(where, x)
                done += len(x)
                if progress is not None:
                    progress(done, z)
    if progress is not None and done < z:
        progress(z, z)


@dataclass
class Inferred:
    """labels: (Z, Y, X) uint8 on the prepared grid; probabilities: (K, Z, Y, X) float16 or None."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None


def infer(model: Model, prepared: PreparedScan, *, device=None, batch_size: int = 8, overlap: float = 0.25,
          return_probabilities: bool = False, upsampling: str = "probabilities", region: bool = False,
          progress: Progress | None = None, cancel=None) -> Inferred:
    """Stage 2: labels of every slice (2D) or window (3D), reduced to uint8 batch by batch.

    ``upsampling`` (2D models at another spacing): see :data:`UPSAMPLING`.
    ``region`` (2D models, labels only, volumes of REGION_MIN_SLICES slices or more): find the
    labeled region on slices REGION_STEP_MM apart, then run only the slices and the in-plane box
    around it; everything outside is background (`_region_runs`). For models whose post-processing
    keeps one component per class (`uses_region`), where it changes what post-processing leaves by
    little and saves most of the work on a scan whose organs fill part of it (docs/inference.md).
    """
    if upsampling not in UPSAMPLING:
        raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {upsampling!r}")
    device = pick_device(device)
    model.to(device)
    model.backbone.eval()
    if model.spatial_dims != 2:
        probs = _sliding_window_3d(model, prepared, device, overlap, progress, cancel)
        return Inferred(probs.argmax(0).astype(np.uint8), probs.astype(np.float16) if return_probabilities else None)
    z, h, w = prepared.data.shape
    labels = np.empty((z, h, w), np.uint8)
    k = model.backbone.out_channels
    probabilities = np.empty((k, z, h, w), np.float16) if return_probabilities else None
    resized = prepared.model_size_yx is not None

    native = _channels_last_copy(model.backbone, device)
    dtype = None if native is None else next(native.parameters()).dtype

    def work(where, x):
        rows, cols = where[1:]
        size = (rows.stop - rows.start, cols.stop - cols.start)
        if native is not None:
            logits = native(x.to(dtype).contiguous(memory_format=torch.channels_last))
        else:
            logits = model.backbone(x)
        if return_probabilities:
            probs = logits.float().softmax(1)
            if resized:
                probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
            labels[where] = argmax_labels(probs).cpu().numpy()
            probabilities[(slice(None), *where)] = probs.to(torch.float16).transpose(0, 1).cpu().numpy()
            return
        if resized and upsampling == "probabilities":
            result = bilinear_argmax(logits.float().softmax(1), size)
        else:  # argmax of the logits (in the precision they came in: widening is exact) is the softmax's
            result = argmax_labels(logits)[:, None]
            if resized:
                result = F.interpolate(result, size=size, mode="nearest-exact")
            result = result[:, 0]
        labels[where] = result.cpu().numpy()

    search = region and not return_probabilities and z >= REGION_MIN_SLICES
    runs = _region_runs(prepared, labels) if search else None
    _each_batch(work, prepared, batch_size, device, progress, cancel, mixed_precision=native is None, runs=runs)
    return Inferred(labels, probabilities)


def uses_region(model: Model, keep_largest: bool | None = None) -> bool:
    """Whether `segment` and `predict_volume` let `infer` search the labeled region first: 2D models
    whose post-processing keeps each class's largest component (`_keeps_largest_components`)."""
    return model.spatial_dims == 2 and _keeps_largest_components(model, keep_largest)


def _region_runs(prepared: PreparedScan, labels: np.ndarray):
    """The passes of a region search (`infer`'s ``region``), for `_each_batch`.

    1. Every slice about REGION_STEP_MM apart, whole (the samples).
    2. The other slices from the last empty sample before the first labeled one to the first empty
       sample after the last labeled one, each cropped to one box: around every label the samples
       hold, widened by REGION_MARGIN_MM in-plane. An organ that ends between two samples is
       inside that range; one that no sample meets (shorter than REGION_STEP_MM) is missed.
    Every other slice stays background. Yields (slices, box) passes and counts of slices left out;
    the caller's passes write into ``labels``, which the next pass reads.
    """
    z, h, w = labels.shape
    spacing = _known_spacing(prepared)  # not 1 mm where the file lost the voxel size
    if spacing:
        step = max(1, round(REGION_STEP_MM / spacing[0]))
        margin = tuple(round(REGION_MARGIN_MM / s) for s in spacing[1:])
    else:
        step, margin = REGION_STEP_SLICES, (REGION_MARGIN_PX, REGION_MARGIN_PX)
    samples = np.unique(np.r_[np.arange(0, z, step), z - 1])
    labels[...] = 0
    yield samples, None
    labeled = samples[labels[samples].any(axis=(1, 2))]
    if labeled.size == 0:
        yield z - len(samples)  # slices left out count as done
        return
    rest = np.setdiff1d(np.arange(max(0, labeled[0] - step), min(z, labeled[-1] + step + 1)), samples)
    seen = _nonzero_box(labels[labeled].any(axis=0))
    box = tuple(slice(max(0, s.start - m), min(n, s.stop + m)) for s, m, n in zip(seen, margin, (h, w)))
    yield z - len(samples) - len(rest)
    yield rest, box


def _linear_taps(n_in: int, n_out: int, device) -> tuple[torch.Tensor, ...]:
    """Source rows (i0, i1) and weights (l0, l1) of each output row in torch's bilinear resize
    with ``align_corners=False``: src = (out + 0.5) * n_in / n_out - 0.5, clamped at the edges."""
    src = ((torch.arange(n_out, dtype=torch.float32, device=device) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    i0 = src.to(torch.long).clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    l1 = (src - i0).clamp(0, 1)
    return i0, i1, 1 - l1, l1


def bilinear_argmax(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``argmax(F.interpolate(probs, size, "bilinear"), dim=1)`` as uint8, without the (B, K, H, W)
    resized probabilities: the same labels, several times faster (docs/inference.md).

    Each output pixel is a convex combination of four input pixels. Where one class wins at all
    four, it wins the combination too (p_c > p_k at each corner gives sum w p_c > sum w p_k), so
    that pixel takes the corners' label; only pixels whose corners disagree (the few along label
    boundaries) are interpolated, class by class, and argmaxed.
    """
    h, w = probs.shape[2:]
    low = argmax_labels(probs)  # (B, h, w)
    y0, y1, wy0, wy1 = _linear_taps(h, size[0], probs.device)
    x0, x1, wx0, wx1 = _linear_taps(w, size[1], probs.device)
    # the four corner labels of every output pixel; index_select is several times faster than
    # advanced indexing here
    rows0, rows1 = low.index_select(1, y0), low.index_select(1, y1)  # (B, H, w)
    out = rows0.index_select(2, x0)
    mixed = (out != rows0.index_select(2, x1)) | (out != rows1.index_select(2, x0)) | (out != rows1.index_select(2, x1))
    n, yy, xx = mixed.nonzero(as_tuple=True)
    if n.numel():
        p = probs.permute(0, 2, 3, 1)  # (B, h, w, K): a view; each pixel's K scores
        ax, bx = wx0[xx, None], wx1[xx, None]
        top = p[n, y0[yy], x0[xx]] * ax + p[n, y0[yy], x1[xx]] * bx
        bottom = p[n, y1[yy], x0[xx]] * ax + p[n, y1[yy], x1[xx]] * bx
        out[n, yy, xx] = (top * wy0[yy, None] + bottom * wy1[yy, None]).argmax(1).to(torch.uint8)
    return out


def argmax_labels(scores: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) -> (B, h, w) uint8 argmax over K. Channels-last first: torch's argmax over a
    strided dim 1 is 4x slower on the CPU than over a contiguous one (benchmarks/speed.py), and 8x
    in a fine-tune's anchor (the teacher's 8 x 4 x 192 x 192 logits, float32, Zen 3)."""
    return scores.contiguous(memory_format=torch.channels_last).argmax(1).to(torch.uint8)


def run_slices(forward, data: np.ndarray, channels: int, *, device, batch_size: int = 8,
               spacing_mm=None, target_spacing_yx=None, progress=None, cancel=None) -> np.ndarray:
    """Apply ``forward(batch (B, 1, h, w)) -> (B, channels, h, w)`` to every z slice of ``data``.

    data: (Z, Y, X) float32, already normalised. With ``spacing_mm`` (z, y, x) and
    ``target_spacing_yx``, slices are resampled in-plane to the target and the result back.
    Returns (channels, Z, Y, X) float32 (for maps and training-time validation; labels use `infer`).
    """
    data = _check_array(data)
    prepared = PreparedScan(data, IntensityMap(None), spacing_mm,
                            inplane_size(data.shape[1:], spacing_mm, target_spacing_yx), "")
    return _float_maps(forward, prepared, channels, device, batch_size, progress, cancel)


def _float_maps(forward, prepared: PreparedScan, channels: int, device, batch_size, progress, cancel) -> np.ndarray:
    """``forward`` over every slice batch of ``prepared``, its float maps back at the slices' own
    size: (channels, Z, Y, X) float32."""
    z, h, w = prepared.data.shape
    out = np.empty((channels, z, h, w), np.float32)

    def work(where, x):
        result = forward(x).float()
        if prepared.model_size_yx:
            result = F.interpolate(result, size=(h, w), mode="bilinear", align_corners=False)
        out[(slice(None), *where)] = result.transpose(0, 1).cpu().numpy()

    _each_batch(work, prepared, batch_size, device, progress, cancel, mixed_precision=False)
    return out


def _sliding_window_3d(model: Model, prepared: PreparedScan, device, overlap, progress, cancel) -> np.ndarray:
    from monai.inferers import sliding_window_inference

    roi = tuple(int(s) for s in model.card.patch_size)
    image = prepared.intensity(torch.from_numpy(np.ascontiguousarray(prepared.data)))[None, None].to(device)
    done = [0]

    def predictor(window: torch.Tensor) -> torch.Tensor:
        check_cancel(cancel)
        result = model.backbone(window).float().softmax(1)
        done[0] += 1
        if progress is not None:
            progress(done[0], done[0] + 1)  # the window count is MONAI's; report a running count
        return result

    with torch.inference_mode(), _autocast(device), _cpu_threads(device):
        probs = sliding_window_inference(image, roi, 4, predictor, overlap=overlap, mode="gaussian")
    return probs[0].float().cpu().numpy()


# ---- stage 3: post-process -----------------------------------------------------------------------

def post_process(model: Model, labels: np.ndarray, keep_largest: bool | None = None,
                 spacing_mm=None, corrections=None, *, in_place: bool = False) -> np.ndarray:
    """Stage 3: the card's post-processing of (Z, Y, X) labels, axis 0 the model's slicing axis.

    Cards with ``postprocessing.cardiac`` get the cardiac clean-up (one heart, closed myocardium,
    no atrium or false apical heart: `cardiac.clean_cardiac_labels`, docs/cardiac.md); others keep
    each class's largest component when ``keep_largest_component`` says so. ``keep_largest``:
    None = as the card says; False = none; True = the card's clean-up, else the largest component.
    ``spacing_mm``: (z, y, x) of ``labels``, or None when the scan does not know it.
    ``corrections``: the user's (labels, known[, start]) on the same grid; the cardiac clean-up
    keeps the slices the user corrected and left LV on (`clean_cardiac_labels`' ``keep_slices``): a
    slice where the user trimmed the cavity's edge is a slice they saw as heart. With ``start`` (a
    fine-tune's result: the starting model's labels) it also keeps the slices the user left alone
    where the start has LV: a fine-tune does not shorten the heart the user accepted (one that
    learned a solid, cavity-less myocardium on the mid slices had the start's basal slices cut as
    atrium: acdc patient030 ES, docs/finetune-history.md). Nor does it, on those slices, lengthen the heart
    or widen its end slices (`_held_to_start_heart`).
    ``in_place``: the largest components may be kept in ``labels`` itself (an array of the caller's
    own, such as `infer`'s labels), which saves a copy of the volume.
    """
    if keep_largest is False:
        return labels
    if model.card.cardiac_cleanup:
        from .cardiac import CardiacLabels, clean_cardiac_labels

        classes = CardiacLabels.from_classes(model.classes)
        if corrections is not None:
            painted, known, *start = (np.asarray(a) for a in corrections)
            lv_values = [v for v in (classes.lv, classes.myo) if v is not None]

            def slices_with_lv(labels_):
                return np.isin(labels_, lv_values).reshape(len(labels_), -1).any(1)

            touched = known.reshape(len(known), -1).any(1)
            kept = touched & slices_with_lv(painted)
            if start:
                kept |= ~touched & slices_with_lv(start[0])
            cleaned = clean_cardiac_labels(labels, spacing_mm, classes=classes, keep_slices=np.flatnonzero(kept))
            return _held_to_start_heart(cleaned, painted, known, start[0]) if start else cleaned
        return clean_cardiac_labels(labels, spacing_mm, classes=classes)
    if not _keeps_largest_components(model, keep_largest):
        return labels
    return keep_largest_components(labels, in_place=in_place)


def shown_heart_slices(painted: np.ndarray, known: np.ndarray, start: np.ndarray) -> np.ndarray:
    """(Z,) bool: the slices a fine-tune's result may have heart on, axis 0 the slicing axis.

    The start's heart (its first to its last slice with a label) and, on either side past it, every
    slice when the user labeled heart on a known voxel past it on that side: they showed the heart
    goes on there, so where it ends is the network's to find. A start with no heart: every slice
    when the user labeled heart anywhere, else none."""
    n = len(start)
    has = np.flatnonzero(np.asarray(start).reshape(n, -1).any(1))
    shown = np.flatnonzero((np.asarray(known) & (np.asarray(painted) > 0)).reshape(n, -1).any(1))
    allowed = np.zeros(n, bool)
    if not len(has):
        allowed[:] = len(shown) > 0
        return allowed
    first, last = int(has[0]), int(has[-1])
    allowed[first:last + 1] = True
    allowed[:first] = (shown < first).any()
    allowed[last + 1:] = (shown > last).any()
    return allowed


def _held_to_start_heart(labels: np.ndarray, painted: np.ndarray, known: np.ndarray, start: np.ndarray) -> np.ndarray:
    """A fine-tune's cleaned-up labels held to the start's heart on the slices the user left alone
    (no known voxel), in place: no heart past the start's first and last heart slices unless the
    user labeled heart past them on that side (`shown_heart_slices`), and on those two end slices no
    heart where the start has background (the fine-tune may shrink or relabel them). Measured on the
    110 acdc and mnms2 rounds from two seeds (docs/finetune-history.md): rounds grew heart on two slices
    above mnms2 001's end-systolic base (-8.2 points) and widened the RV on acdc patient030's basal
    slice (-1.1 and -1.5); with the rule no round lost more than a point, and the mean gain moved by
    0.03 points or less. (A slice whose LV the fine-tune collapsed is the clean-up's to mend.)"""
    n = len(start)
    alone = ~np.asarray(known).reshape(n, -1).any(1)
    labels[~shown_heart_slices(painted, known, start) & alone] = 0
    has = np.flatnonzero(np.asarray(start).reshape(n, -1).any(1))
    for z in ({int(has[0]), int(has[-1])} if len(has) else ()):
        if alone[z]:
            labels[z][start[z] == 0] = 0
    return labels


def _keeps_largest_components(model: Model, keep_largest: bool | None) -> bool:
    """Whether `post_process` ends in `keep_largest_components` (and not the cardiac clean-up)."""
    if keep_largest is False or model.card.cardiac_cleanup:
        return False
    return bool(keep_largest or model.card.keep_largest_component)


def _nonzero_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every nonzero element of ``mask``, from its projections (no label
    pass over the array); None when there is none."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _known_spacing(prepared: PreparedScan):
    """The prepared scan's spacing, or None where its file lost the voxel size (identity affine)."""
    if prepared.view is not None and not prepared.view.spacing_known:
        return None
    return prepared.spacing_mm


def keep_largest_components(labels: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """Each class keeps its largest connected component (full connectivity); the rest becomes 0.

    For anatomy where every class is one organ: it removes the islands a slice-wise model leaves
    on other slices, which dominate HD95 (see docs/benchmarks.md). Returns a new array, or
    ``labels`` itself changed with ``in_place`` (the pipeline's own arrays).
    scipy.ndimage on each class's bounding box, not MONAI's KeepLargestConnectedComponent: same
    result, several times faster on a 512x512x300 CT (benchmarks/speed.py). The boxes are looked
    for only inside the box of all labels, found from the array's projections.
    """
    out = labels if in_place else np.array(labels, copy=True)
    if out.ndim == 0 or out.size == 0:
        return out
    if not np.issubdtype(out.dtype, np.integer) or (out.dtype.kind == "i" and out.min() < 0):
        raise ConsistentSegError("label maps hold whole numbers >= 0")
    outer = _nonzero_box(out != 0)
    if outer is None:
        return out
    inner = out[outer]
    structure = ndimage.generate_binary_structure(out.ndim, out.ndim)
    for value, box in enumerate(ndimage.find_objects(inner), start=1):
        if box is None:
            continue
        region = inner[box]
        mask = region == value
        components, n = ndimage.label(mask, structure)
        if n > 1:
            sizes = np.bincount(components[mask])
            region[mask & (components != int(sizes.argmax()))] = 0
    return out


# ---- stage 4: restore ----------------------------------------------------------------------------

def restore(prepared: PreparedScan, data: np.ndarray) -> np.ndarray:
    """Stage 4: ``data`` on the prepared grid ((Z, Y, X), or (K, Z, Y, X) maps) -> the scan's grid."""
    if prepared.view is None or prepared.source is None:
        return data
    if data.ndim == 4:
        return np.stack([prepared.view.transfer(d, prepared.source) for d in data])
    return prepared.view.transfer(data, prepared.source)


# ---- the pipeline --------------------------------------------------------------------------------

def model_plane(model: Model) -> str:
    """The plane a model slices in: the card's `plane`; "axial" for 3D models (their windows follow
    the patient axes, as in training)."""
    if model.spatial_dims != 2:
        return "axial"
    return model.card.plane or "axial"


#: What `segment` warns when a cardiac model (trained on short-axis stacks) is given one slice: on
#: M&Ms-2's 4-chamber long-axis ED frame it calls 168 LV voxels where the experts drew 1,147, none on them.
ONE_SLICE_HEART = ("the scan has one slice: a cardiac model segments stacks of short-axis slices; on a long-axis "
                   "view (2-, 3- or 4-chamber) it finds little or no heart, and what it finds is not reliable")


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
    corrections=None,
    progress: Progress | None = None,
    cancel=None,
) -> Volume:
    """Segment a scan: a Volume (Z, Y, X) or cine (T, Z, Y, X) in, its labels Volume out (uint8, same
    grid and shape, named ``"<scan> labels"``, classes in ``meta["class_names"]``).

    prepare -> infer -> post_process -> restore, phase by phase. ``phases``: for a cine, segment
    only these phases (the others stay 0); None = all. ``return_probabilities``:
    ``meta["probabilities"]`` holds (K, [T,] Z, Y, X) float16. Warnings (modality, spacing) are in
    ``meta["warnings"]``. Progress counts slices over all phases. ``corrections``: the user's
    (labels, known) on the volume's grid (a fine-tune's painted voxels): they replace the prediction
    where known, and the post-processing does not remove what the user labeled. A third array,
    (labels, known, start), is the starting model's segmentation: then the classes the user labeled
    on no known voxel (over every phase) keep their starting labels (:func:`apply_corrections`).
    """
    _check_model(model)
    if not isinstance(volume, Volume):
        raise InvalidInputError(f"segment() takes a Volume from load_volume(path), got {type(volume).__name__}; "
                                "use predict_volume for a bare array")
    if volume.is_label:
        raise ConsistentSegError(f"{volume.name!r} is a label map, not a scan: choose the image to segment.")
    n_phases = volume.n_phases
    chosen = [None] if n_phases is None else (list(range(n_phases)) if phases is None else
                                               sorted({int(t) % n_phases for t in phases}))
    labels = np.zeros(volume.shape, np.uint8)
    probabilities = None
    warnings: list[str] = []
    every = None if corrections is None else _checked_corrections(volume, corrections)
    labeled = None if every is None else labeled_classes(*every)
    for index, t in enumerate(chosen):
        prepared = prepare(model, volume if t is None else volume.phase(t))
        n_slices = prepared.data.shape[0]
        fixes = every if every is None or t is None else tuple(a[t] for a in every)

        def phase_progress(done, total, offset=index * n_slices, n=n_slices):
            if progress is not None:
                progress(offset + done, len(chosen) * n)

        inferred = infer(model, prepared, device=device, batch_size=batch_size,
                         return_probabilities=return_probabilities, region=uses_region(model, keep_largest),
                         progress=phase_progress, cancel=cancel)
        in_view = None if fixes is None else [prepared.source.transfer(a, prepared.view) for a in fixes]
        result = restore(prepared, post_process(model, inferred.labels, keep_largest, _known_spacing(prepared), in_view,
                                                in_place=True))
        if fixes is not None:
            result = apply_corrections(result, *fixes, labeled=labeled)
        if t is None:
            labels[...] = result
        else:
            labels[t] = result
        warnings.extend(w for w in prepared.warnings if w not in warnings)
        if model.card.cardiac_cleanup and n_slices == 1 and ONE_SLICE_HEART not in warnings:
            warnings.append(ONE_SLICE_HEART)
        if return_probabilities:
            probs = restore(prepared, inferred.probabilities)
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


def segment_slice(model: Model, volume: Volume, z: int, *, phase: int | None = None, device=None,
                  corrections=None) -> np.ndarray:
    """Slice ``z`` (the volume's axis 0, the slice napari shows; of ``phase`` for a cine) as
    :func:`segment` labels it: a fine-tune preview. When a 2D model slices in the volume's own
    plane only that slice runs, normalised as the whole volume (phase), without the
    post-processing that needs the whole volume; otherwise each of the model's slices crosses the
    shown one, so the whole volume (phase) is segmented. ``corrections``: (labels, known[, start])
    on the volume's grid, as :func:`segment`'s (a cine's labeled classes count over every phase)."""
    _check_model(model)
    if not isinstance(volume, Volume):
        raise InvalidInputError(f"segment_slice() takes a Volume, got {type(volume).__name__}")
    t = None
    if volume.n_phases is not None:
        if phase is None or not 0 <= int(phase) < volume.n_phases:
            raise InvalidInputError(f"a cine of {volume.n_phases} phases: say which phase to preview (phase=t)")
        t = int(phase)
    shown = volume if t is None else volume.phase(t)
    z = int(z)
    if not 0 <= z < shown.shape[0]:
        raise InvalidInputError(f"slice {z} out of range for a volume of {shown.shape[0]} slices")
    if model.spatial_dims != 2 or not np.array_equal(model_view(model, shown).ornt, shown.geometry.ornt):
        labels = segment(model, volume, phases=None if t is None else [t], device=device, corrections=corrections).data
        return labels[z] if t is None else labels[t, z]
    fixes = labeled = None
    if corrections is not None:
        every = _checked_corrections(volume, corrections)
        labeled = labeled_classes(*every)
        fixes = every if t is None else tuple(a[t] for a in every)
    prepared = prepare(model, shown)
    prepared.data = prepared.data[z:z + 1]
    labels = infer(model, prepared, device=device).labels[0]
    return labels if fixes is None else apply_corrections(labels, *(a[z] for a in fixes), labeled=labeled)


def labeled_classes(labels: np.ndarray, known: np.ndarray, start: np.ndarray | None = None) -> list[int] | None:
    """The classes the user labeled on a known voxel (background included: an erase labels it).
    None without ``start`` (the starting model's labels; no rule to apply)."""
    if start is None:
        return None
    return sorted(np.unique(np.asarray(labels)[np.asarray(known, bool)]).tolist())


def apply_corrections(prediction: np.ndarray, labels: np.ndarray, known: np.ndarray, start: np.ndarray | None = None,
                      *, labeled: list[int] | None = None) -> np.ndarray:
    """The user's ``labels`` where ``known``, the ``prediction`` elsewhere (in the prediction's dtype).

    With ``start`` (a fine-tune's result: the starting model's labels), a class the user labeled on
    no known voxel (not in `labeled_classes` of these arrays, unless ``labeled`` is given) is neither
    lost nor moved outside the known voxels: where the start called it and the prediction says
    background, and wherever the prediction calls it, the start's label stands. That covers the
    classes nobody corrected and those the user only erased or painted over. A class the user
    labeled may still take their voxels (a corrected LV cavity grows into what the start called
    myocardium). A fine-tune learns only from what the user labeled; without this it lost classes
    nobody corrected (btcv_ct case_17 with two painted slices, neither through the spleen: spleen
    Dice 90 -> 65 %), and a class erased on one slice shrank or moved elsewhere (the left kidney of
    case_17 erased on one slice: 10,299 -> 861 voxels; docs/finetune-history.md)."""
    known = np.asarray(known, bool)
    out = np.where(known, labels, prediction).astype(prediction.dtype, copy=False)
    if start is None:
        return out
    start = np.asarray(start)
    labeled = labeled_classes(labels, known, start) if labeled is None else labeled
    held = [int(c) for c in np.union1d(np.unique(start), np.unique(prediction)) if c != 0 and c not in labeled]
    if held:
        keep = (((prediction == 0) & np.isin(start, held)) | np.isin(prediction, held)) & ~known
        out[keep] = start[keep]
    return out


def _checked_corrections(volume: Volume, corrections) -> tuple[np.ndarray, ...]:
    """(labels, known[, start]) of ``corrections`` as arrays (known as bool), checked against the grid."""
    if len(corrections) not in (2, 3):
        raise InvalidInputError("corrections are (labels, known) or (labels, known, start labels)")
    arrays = [np.asarray(a) for a in corrections]
    if any(a.shape != volume.shape for a in arrays):
        raise ShapeMismatchError(f"corrections of shape {' / '.join(str(a.shape) for a in arrays)} do not lie on "
                                 f"the scan's grid {volume.shape}")
    arrays[1] = arrays[1].astype(bool, copy=False)
    return tuple(arrays)


@dataclass
class Prediction:
    """labels: (Z, Y, X) uint8, 0 = background; probabilities: (K, Z, Y, X) float16 or None."""

    labels: np.ndarray
    probabilities: np.ndarray | None
    modality: str
    warnings: list[str]


def _prepare_slices(model: Model, data, spacing_mm, modality) -> tuple[PreparedScan, bool]:
    """`prepare_array` of a (Z, Y, X) volume or of one (Y, X) image (then Z = 1 and True)."""
    arr = np.asarray(data)
    single = arr.ndim == 2
    if single:
        arr = arr[None]
        if spacing_mm is not None and len(spacing_mm) == 2:
            spacing_mm = (1.0, *spacing_mm)
    return prepare_array(model, arr, spacing_mm, modality), single


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
    corrections=None,
    progress: Progress | None = None,
    cancel=None,
) -> Prediction:
    """Segment a bare (Z, Y, X) array (or a (Y, X) image) already in the model's plane: stages
    prepare, infer and post-process, labels on the input grid. Prefer :func:`segment` for a Volume.

    ``spacing_mm`` (z, y, x) enables in-plane resampling to the model's training spacing.
    ``keep_largest``: keep each class's largest connected component only (None: as the model
    card says). ``slices`` (2D models): segment only these z indices, normalised as the whole
    volume (a preview matches the full result, less the post-processing, which needs the whole
    volume); labels are then (len(slices), Y, X). ``corrections``: (labels, known[, start]) on the input
    grid, as :func:`segment`'s.
    """
    prepared, single = _prepare_slices(model, data, spacing_mm, modality)
    if slices is not None:
        if model.spatial_dims != 2:
            raise ConsistentSegError("predict_volume(slices=...) is for 2D models only")
        index = np.asarray(slices, dtype=int).reshape(-1)
        n = prepared.data.shape[0]
        if index.size and (index.min() < -n or index.max() >= n):
            raise InvalidInputError(f"slices {index.tolist()} out of range for a volume of {n} slices")
        prepared.data = prepared.data[index]
    inferred = infer(model, prepared, device=device, batch_size=batch_size, overlap=overlap,
                     return_probabilities=return_probabilities,
                     region=slices is None and uses_region(model, keep_largest), progress=progress, cancel=cancel)
    labels, probs = inferred.labels, inferred.probabilities
    if slices is None:
        labels = post_process(model, labels, keep_largest, prepared.spacing_mm, corrections, in_place=True)
        if corrections is not None:
            labels = apply_corrections(labels, *corrections)
    if single:
        labels, probs = labels[0], None if probs is None else probs[:, 0]
    return Prediction(labels, probs, prepared.modality, prepared.warnings)


@dataclass
class PreparedInput:
    """A volume normalised for a model: (Z, Y, X) float32 in [0, 1], and what was assumed."""

    data: np.ndarray
    spacing_mm: tuple[float, float, float] | None
    modality: str
    warnings: list[str] = field(default_factory=list)


def prepare_input(model: Model, data: np.ndarray, spacing_mm=None, modality: str | None = None) -> PreparedInput:
    """The whole array normalised at once (float32), for training code that needs it in memory
    (fine-tuning); inference uses :func:`prepare_array`, which normalises batch by batch."""
    arr = np.asarray(data)
    if arr.ndim == 2:
        arr = arr[None]
        if spacing_mm is not None and len(spacing_mm) == 2:
            spacing_mm = (1.0, *spacing_mm)
    prepared = prepare_array(model, arr, spacing_mm, modality)
    normalised = prepared.intensity(torch.from_numpy(np.ascontiguousarray(prepared.data))).numpy()
    return PreparedInput(normalised, prepared.spacing_mm, prepared.modality, prepared.warnings)


# ---- class-attention maps: the same stages with another forward ----------------------------------

def attention_volume(model: Model, volume: Volume, **options) -> np.ndarray:
    """`attention_maps` of a 3D Volume in the model's plane, returned on the volume's grid: (K, Z, Y, X)."""
    if not isinstance(volume, Volume):
        raise InvalidInputError(f"attention_volume() takes a Volume from load_volume(path), got {type(volume).__name__}")
    if volume.n_phases is not None:
        raise ConsistentSegError("attention maps take one phase of a cine: pass volume.phase(t)")
    _check_attention(model, options.get("scale", 0), options.get("head"))
    prepared = prepare(model, volume)
    return restore(prepared, _attention_of_prepared(model, prepared, **options))


def _check_attention(model: Model, scale: int, head: int | None) -> None:
    _check_model(model)
    if model.modules is None:
        raise ConsistentSegError(
            f"model {model.name!r} was saved without its external modules, so it has no attention maps: choose a "
            "model whose folder has modules.safetensors"
        )
    if model.spatial_dims != 2:
        raise ConsistentSegError("attention maps are implemented for 2D models only")
    n_scales = len(model.modules.config["heads"])
    if not 0 <= scale < n_scales:
        raise InvalidInputError(f"scale must be 0..{n_scales - 1} (0 = deepest), got {scale}")
    heads = model.modules.config["heads"][scale]
    if head is not None and not 0 <= head < heads:
        raise InvalidInputError(f"head {head} does not exist: scale {scale} of model {model.name!r} has heads "
                                f"0..{heads - 1}")


def _attention_of_prepared(model: Model, prepared: PreparedScan, *, scale: int = 0, head: int | None = None,
                           device=None, batch_size: int = 8, progress=None, cancel=None) -> np.ndarray:
    device = pick_device(device)
    model.to(device)
    model.backbone.eval()
    model.modules.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = model.backbone(x, return_features=True)
        logits = model.modules.attend(out.features).scales[scale].attention  # (B, h, K, *s)
        n_pixels = logits[0, 0, 0].numel()
        weights = logits.flatten(3).softmax(-1).view_as(logits) * n_pixels
        weights = weights.mean(1) if head is None else weights[:, head]
        return out.to_input_grid(weights)

    return _float_maps(forward, prepared, model.backbone.out_channels, device, batch_size, progress, cancel)


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
    and 10 means ten times more attention than uniform. 2D models only; ``data`` is a bare array
    in the model's plane (for a Volume use :func:`attention_volume`).
    """
    _check_attention(model, scale, head)
    prepared, single = _prepare_slices(model, data, spacing_mm, modality)
    maps = _attention_of_prepared(model, prepared, scale=scale, head=head, device=device, batch_size=batch_size,
                                  progress=progress, cancel=cancel)
    return maps[:, 0] if single else maps
