"""Make the documentation screenshots of napari (one function per image, saved in docs/images/).

Run under a virtual display: xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python docs/make_screenshots.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from widget_round import dab_worst_slices, run_qt_until  # noqa: E402  (the widget round's benchmark)

IMAGES_DIR = REPO_ROOT / "docs" / "images"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
PLUGIN = "napari-consistent-seg"
WINDOW_SIZE = (1280, 820)
CHAOS_LIVER = 1  # chaos_t2 label value of the liver (splits.json)


def _new_viewer() -> napari.Viewer:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(*WINDOW_SIZE)
    return viewer


def _save(viewer: napari.Viewer, name: str) -> Path:
    QApplication.processEvents()
    path = IMAGES_DIR / name
    viewer.screenshot(str(path), canvas_only=False)
    viewer.close()
    return path


def loaded_scan(case: str = "case_31") -> Path:
    """A chaos_t2 T2 MRI val case and its labels, opened by the plugin reader, mid-liver axial slice."""
    viewer = _new_viewer()
    (image_layer,) = viewer.open(str(SHARED_DATA / "chaos_t2" / "images" / f"{case}.nii.gz"), plugin=PLUGIN)
    (labels_layer,) = viewer.open(str(SHARED_DATA / "chaos_t2" / "labels" / f"{case}.nii.gz"), plugin=PLUGIN)
    labels_layer.opacity = 0.45
    liver_slices = np.nonzero((labels_layer.data == CHAOS_LIVER).any(axis=(1, 2)))[0]
    mid_liver_z = int(round(liver_slices.mean()))
    # dims points are in world units (mm), so the slice index is scaled by the z spacing.
    viewer.dims.set_point(0, mid_liver_z * image_layer.scale[0])
    viewer.reset_view()
    return _save(viewer, "napari-loaded-scan.png")


def oblique_cine() -> Path:
    """The Sunnybrook cine DICOM (double-oblique short axis) opened by the plugin: the slider runs
    through the scanner's slices, a phase slider in front; segmented at ED by the cardiac model."""
    viewer = _new_viewer()
    folder = SHARED_DATA / "sunnybrook_cine" / "dicom" / "SCD0000301"
    (image,) = viewer.open(str(folder), plugin=PLUGIN)
    viewer.dims.set_point(0, 19)  # ED
    viewer.dims.set_point(1, 5 * image.scale[1])  # mid-ventricle
    widget = _dock(viewer, "Segment", CARDIAC_MODEL)
    widget.inputs.image.set_layer(image)
    widget.all_phases.setChecked(False)
    widget.run()
    wait_for(widget)
    widget.last_layers[0].opacity = 0.45
    viewer.reset_view()
    return _save(viewer, "napari-oblique-cine.png")


SCREENSHOTS = {"loaded_scan": loaded_scan, "oblique_cine": oblique_cine}


# ---- the four widgets in use (acdc val case, shipped cardiac model) ----

ACDC_CASE = "patient028_frame01"
CARDIAC_MODEL = "cardiac-cine-mri"


def _acdc_viewer(case: str = ACDC_CASE):
    """A viewer with an acdc val scan and its reference labels (hidden), mid-heart slice shown."""
    viewer = _new_viewer()
    (image,) = viewer.open(str(SHARED_DATA / "acdc" / "images" / f"{case}.nii.gz"), plugin=PLUGIN)
    (reference,) = viewer.open(str(SHARED_DATA / "acdc" / "labels" / f"{case}.nii.gz"), plugin=PLUGIN)
    reference.name, reference.visible = "reference", False
    heart = np.nonzero(reference.data.any(axis=(1, 2)))[0]
    viewer.dims.set_point(0, round(heart.mean()) * image.scale[0])
    viewer.reset_view()
    return viewer, image, reference


def _dock(viewer, title: str, model: str | None = CARDIAC_MODEL):
    from napari_consistent_seg.models.store import list_models

    if model and model not in {m["name"] for m in list_models()}:
        raise SystemExit(f"model {model!r} is not installed yet: train it first (see docs/training.md)")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, title)
    if model:
        widget.inputs.model.select(model)
        widget.inputs.modality.setCurrentText("MR")  # acdc lost its DICOM tags: say it is MRI
    return widget


def wait_for(widget) -> None:
    """Run Qt's event loop, as napari does, until the widget's task ends. (A Python loop polling Qt's
    events kept a core busy: the fine-tune round in the screenshot took 42 s instead of 26.)"""
    run_qt_until(until=lambda: not widget.runner.running)
    QApplication.processEvents()


def _segment(viewer, image):
    widget = _dock(viewer, "Segment")
    widget.inputs.image.set_layer(image)
    widget.run()
    wait_for(widget)
    return widget


def segment_widget() -> Path:
    """Segment docked: the cardiac model's result over the scan, with class colours."""
    viewer, image, _ = _acdc_viewer()
    _segment(viewer, image).last_layers[0].opacity = 0.5
    return _save(viewer, "widget-segment.png")


def finetune_widget() -> Path:
    """Fine-tune docked: the segmentation corrected in place with brush strokes on its three worst
    slices, fine-tuned with the default recipe, then accepted into the same layer."""
    viewer, image, reference = _acdc_viewer()
    _segment(viewer, image)
    segmentation = viewer.layers[f"{image.name} {CARDIAC_MODEL}"]
    worst = dab_worst_slices(segmentation, reference)  # the right label where the model is wrong, as a user paints
    widget = _dock(viewer, "Fine-tune")
    widget.inputs.image.set_layer(image)
    widget.painted.set_layer(segmentation)
    widget.run()
    wait_for(widget)
    widget.accept()
    wait_for(widget)
    viewer.dims.set_point(0, int(worst[0]) * image.scale[0])
    segmentation.opacity = 0.5
    widget.save_name.setText("cardiac-patient028")
    return _save(viewer, "widget-finetune.png")


def attention_widget() -> Path:
    """Class-attention maps of the cardiac model (deepest scale, heads averaged) over the scan."""
    viewer, image, _ = _acdc_viewer()
    widget = _dock(viewer, "Class-attention maps")
    widget.inputs.image.set_layer(image)
    widget.run()
    wait_for(widget)
    return _save(viewer, "widget-attention.png")


def evaluate_widget() -> Path:
    """Evaluate docked: the cardiac model's segmentation scored against the reference labels."""
    viewer, image, reference = _acdc_viewer()
    segmentation = _segment(viewer, image).last_layers[0]
    widget = _dock(viewer, "Evaluate", model=None)
    widget.prediction.set_layer(segmentation)
    widget.reference.set_layer(reference)
    widget.run()
    wait_for(widget)
    return _save(viewer, "widget-evaluate.png")


SCREENSHOTS.update(segment_widget=segment_widget, finetune_widget=finetune_widget,
                   attention_widget=attention_widget, evaluate_widget=evaluate_widget)


def main(names: list[str]) -> None:
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    for name in names or SCREENSHOTS:
        print(SCREENSHOTS[name]())


if __name__ == "__main__":
    main(sys.argv[1:])
