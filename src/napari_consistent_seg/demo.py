"""``make demo``: segment volumes with the shipped models, write NIfTI labels, report volumes and Dice.

Default inputs: val cases of ../shared/data when that folder is beside the checkout (or named by
``$CONSISTENT_SEG_DATA``); otherwise the synthetic phantom, after a short ICL fine-tune from a few
of its labeled slices. Any NIfTI file or DICOM folder can be given instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from .errors import ConsistentSegError
from .inference import segment
from .io import Geometry, Volume, load_volume, make_phantom, save_volume
from .metrics import class_sizes, dice
from .models.store import Model, load_model
from .training.data import map_labels

# (model, data set, val case, modality) segmented by default when the shared data is present;
# the modality is given because acdc's files carry no header or name that tells it
DEFAULT_CASES = [
    ("cardiac-cine-mri", "acdc", "patient028_frame01", "MR"),
    ("abdomen-ct-mri", "btcv_ct", "case_14", "CT"),
    ("abdomen-ct-mri", "chaos_t2", "case_31", "MR"),
]
# The real cine DICOM series segmented phase by phase; its ED and ES phases have expert contours.
SUNNYBROOK_PATIENT = "SCD0000301"


def find_shared_data() -> Path | None:
    """``$CONSISTENT_SEG_DATA`` if set (and only there), else ../shared/data beside the checkout."""
    if os.environ.get("CONSISTENT_SEG_DATA"):
        candidates = [os.environ["CONSISTENT_SEG_DATA"]]
    else:
        candidates = [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]
    for c in candidates:
        if c and (Path(c) / "splits.json").is_file():
            return Path(c)
    return None


def _label_map_for(model: Model, dataset: str) -> dict | None:
    for source in model.card.val_sources:
        if source.get("dataset") == dataset:
            return source.get("label_map")
    return None


def _dice_by_class(model: Model, labels: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Dice of each foreground class of ``model`` between two label arrays of one shape."""
    return {name: dice(labels, reference, k) for k, name in model.classes.items() if k}


def _report(model: Model, labels: np.ndarray, geometry: Geometry, scores: dict[str, float] | None = None) -> str:
    """Per-class size (ml, or voxels where the geometry lacks a voxel size), and Dice from ``scores``."""
    sizes = class_sizes(labels, model.classes, geometry)
    lines = []
    for name, size in sizes.items():
        text = f"    {name:16s} {size:>14s}"
        if scores is not None:
            text += f"   Dice {100 * scores[name]:5.1f} %"
        lines.append(text)
    return "\n".join(lines)


def _describe(volume: Volume) -> str:
    spacing = f"spacing {tuple(round(s, 2) for s in volume.spacing_mm)} mm" if volume.geometry.spacing_known else \
        "identity affine: voxel size unknown, sizes in voxels"
    return f"{volume.modality}, {volume.shape}, {volume.geometry.describe_plane()}, {spacing}"


def _segment_file(model: Model, path: Path, output: Path, device, reference: np.ndarray | None,
                  modality: str | None = None) -> None:
    volume = load_volume(path, modality=modality)
    labels = segment(model, volume, device=device)
    stem = path.name.split(".nii")[0]
    target = save_volume(labels, output / f"{stem}_{model.name}.nii.gz")
    print(f"{path.name} ({_describe(volume)}) -> {target}")
    for w in labels.meta["warnings"]:
        print(f"    warning: {w}")
    first = labels.phase(0).data
    scores = None if reference is None else _dice_by_class(model, first, reference)
    print(_report(model, first, volume.geometry, scores))


def matching_phase(cine: Volume, volume: Volume) -> int | None:
    """Index of the cine phase whose voxels equal ``volume``'s (e.g. an exported ED frame), or None."""
    if cine.n_phases is None or cine.shape[1:] != volume.shape:
        return None
    for t in range(cine.n_phases):
        if np.array_equal(cine.data[t], volume.data):
            return t
    return None


def contoured_dice(labels: np.ndarray, reference: np.ndarray, classes: dict) -> dict[str, float]:
    """Dice of the classes the reference holds, on the slices (axis 0) it contours at all: the
    Sunnybrook experts drew only some slices and, at ES, only the LV cavity."""
    slices = np.flatnonzero(reference.reshape(reference.shape[0], -1).any(1))
    present = set(np.unique(reference[slices]).tolist()) - {0}
    return {name: dice(labels[slices], reference[slices], k) for k, name in classes.items() if k in present}


def sunnybrook_demo(data: Path, output: Path, device=None) -> dict[str, dict[str, float]]:
    """Segment every phase of the Sunnybrook cine DICOM series with the cardiac model; print Dice
    against the expert ED / ES contours (NIfTI copies of two phases) and, where the function module
    is there, the cardiac function table. Returns {"ED": {class: Dice}, "ES": ...}."""
    folder = data / "sunnybrook_cine"
    cine = load_volume(folder / "dicom" / SUNNYBROOK_PATIENT)
    model = load_model("cardiac-cine-mri", with_modules=False)
    labels = segment(model, cine, device=device)
    target = save_volume(labels, output / f"{SUNNYBROOK_PATIENT}_cine_{model.name}.nii.gz")
    print(f"Sunnybrook cine DICOM {SUNNYBROOK_PATIENT} ({_describe(cine)}) -> {target}")
    scores = {}
    for frame in ("ED", "ES"):
        image = load_volume(folder / "images" / f"{SUNNYBROOK_PATIENT}_{frame}.nii.gz")
        reference = load_volume(folder / "labels" / f"{SUNNYBROOK_PATIENT}_{frame}.nii.gz").data
        t = matching_phase(cine, image)
        if t is None:
            print(f"    {frame}: no cine phase matches the exported {frame} frame; not scored")
            continue
        scores[frame] = contoured_dice(labels.data[t], reference, model.classes)
        text = ", ".join(f"{name} {100 * value:.1f} %" for name, value in scores[frame].items())
        print(f"    {frame} = phase {t}: Dice on the contoured slices: {text}")
    try:
        from .cardiac import cardiac_function, function_table
    except ImportError:  # the function module is optional for the demo
        return scores
    spacing = cine.spacing_mm if cine.geometry.spacing_known else None
    result = cardiac_function(labels.data, spacing)
    print(function_table(result, title=f"cardiac function of the Sunnybrook cine ({model.name})"))
    return scores


def _phantom_demo(output: Path, device, steps: int = 40) -> dict[str, dict[str, float]]:
    """Fine-tune the abdomen model on the CT phantom from three painted slices (through the
    kidneys, liver and kidneys, liver and spleen); returns Dice per class on the unpainted slices,
    ``{"before": ..., "after": ...}``."""
    from .training.finetune import ICLFinetuner

    image, labels = make_phantom("CT")
    model = load_model("abdomen-ct-mri")
    painted_slices = [14, 17, 25]
    painted = np.zeros_like(labels.data)
    painted[painted_slices] = labels.data[painted_slices]
    print(f"no ../shared/data found: using the SYNTHETIC CT phantom; ICL fine-tune of {model.name} "
          f"for {steps} steps from painted slices {painted_slices}")
    before = segment(model, image, device=device)
    tuner = ICLFinetuner(model, image.data, painted, spacing_mm=image.spacing_mm, modality="CT", device=device)
    for _ in range(steps):
        tuner.step()
    after = segment(tuner.model, image, device=device)
    unpainted = np.ones(image.shape[0], bool)
    unpainted[painted_slices] = False
    target = save_volume(after, output / "synthetic_ct_phantom_finetuned.nii.gz")
    reference = labels.data[unpainted]
    scores = {when: _dice_by_class(model, pred.data[unpainted], reference)
              for when, pred in (("before", before), ("after", after))}
    print(f"phantom -> {target}\n  before fine-tuning (Dice on unpainted slices):")
    print(_report(model, before.data, before.geometry, scores["before"]))
    print("  after fine-tuning:")
    print(_report(model, after.data, after.geometry, scores["after"]))
    return scores


def run_demo(inputs: list[str], *, output: Path, device=None, model_name: str = "abdomen-ct-mri") -> int:
    output.mkdir(parents=True, exist_ok=True)
    if inputs:
        model = load_model(model_name, with_modules=False)
        for item in inputs:
            _segment_file(model, Path(item), output, device, None)
        return 0
    data = find_shared_data()
    if data is None:
        _phantom_demo(output, device)
        return 0
    print(f"segmenting val cases of {data} with the shipped models (Dice against the expert labels)")
    models: dict[str, Model] = {}
    for name, dataset, case, modality in DEFAULT_CASES:
        try:
            model = models.setdefault(name, load_model(name, with_modules=False))
        except ConsistentSegError as exc:
            print(f"skipped {dataset}/{case}: {exc}", file=sys.stderr)
            continue
        reference = map_labels(load_volume(data / dataset / "labels" / f"{case}.nii.gz").data,
                               _label_map_for(model, dataset))
        _segment_file(model, data / dataset / "images" / f"{case}.nii.gz", output, device, reference, modality)
    if (data / "sunnybrook_cine" / "dicom" / SUNNYBROOK_PATIENT).is_dir():
        sunnybrook_demo(data, output, device)
    return 0
