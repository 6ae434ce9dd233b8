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
from .inference import predict_volume
from .io import Geometry, load_volume, make_phantom, save_nifti
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
    for source in model.card.get("training", {}).get("data", {}).get("val", []):
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


def _segment_file(model: Model, path: Path, output: Path, device, reference: np.ndarray | None,
                  modality: str | None = None) -> None:
    volume = load_volume(path, modality=modality)
    pred = predict_volume(model, volume.data, spacing_mm=volume.spacing_mm, modality=volume.modality, device=device)
    stem = path.name.split(".nii")[0]
    target = save_nifti(pred.labels, volume.geometry, output / f"{stem}_{model.name}.nii.gz")
    spacing = f"spacing {tuple(round(s, 2) for s in volume.spacing_mm)} mm" if volume.geometry.spacing_known else \
        "identity affine: voxel size unknown, sizes in voxels"
    print(f"{path.name} ({volume.modality}, {volume.shape}, {spacing}) -> {target}")
    for w in pred.warnings:
        print(f"    warning: {w}")
    scores = None if reference is None else _dice_by_class(model, pred.labels, reference)
    print(_report(model, pred.labels, volume.geometry, scores))


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
    before = predict_volume(model, image.data, spacing_mm=image.spacing_mm, modality="CT", device=device)
    tuner = ICLFinetuner(model, image.data, painted, spacing_mm=image.spacing_mm, modality="CT", device=device)
    for _ in range(steps):
        tuner.step()
    after = predict_volume(tuner.model, image.data, spacing_mm=image.spacing_mm, modality="CT", device=device)
    unpainted = np.ones(image.shape[0], bool)
    unpainted[painted_slices] = False
    target = save_nifti(after.labels, image.geometry, output / "synthetic_ct_phantom_finetuned.nii.gz")
    reference = labels.data[unpainted]
    scores = {when: _dice_by_class(model, pred.labels[unpainted], reference)
              for when, pred in (("before", before), ("after", after))}
    print(f"phantom -> {target}\n  before fine-tuning (Dice on unpainted slices):")
    print(_report(model, before.labels, image.geometry, scores["before"]))
    print("  after fine-tuning:")
    print(_report(model, after.labels, image.geometry, scores["after"]))
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
    return 0
