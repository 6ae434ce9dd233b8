"""Widget logic on a display-less ViewerModel: pickers, names, new layers, each widget's run and its
messages on bad choices. A tiny random-weight model stands in for the shipped ones."""

import math
import os
import sys
import threading
import time

import numpy as np
import pytest
import torch
from napari.components import ViewerModel
from napari.layers import Labels

from napari_consistent_seg._napari import _widget_common as common
from napari_consistent_seg._napari.attention_widget import AttentionWidget
from napari_consistent_seg._napari.evaluate_widget import EvaluateWidget
from napari_consistent_seg._napari.layers import METADATA_KEY
from napari_consistent_seg._napari.segment_widget import SegmentWidget
from napari_consistent_seg.errors import ConsistentSegError
from napari_consistent_seg.inference import keep_largest_components
from napari_consistent_seg.io import Geometry
from napari_consistent_seg.metrics import evaluate_labels, read_csv
from napari_consistent_seg.models.modules import ICLModules
from napari_consistent_seg.models.store import save_model
from napari_consistent_seg.models.unet import UNet

CLASSES = {"0": "background", "1": "RV cavity", "2": "LV myocardium", "3": "LV cavity"}
COLOURS = {"1": "#ff0000", "2": "#00ff00", "3": "#0000ff"}
SPACING = (5.0, 1.5, 1.25)
WAIT_MS = 20_000


def save_tiny_model(folder, name="tiny-mr", with_modules=True):
    """A random-weight 2D U-Net (+ ICL modules) with the acdc classes, saved as a model folder."""
    torch.manual_seed(0)
    backbone = UNet(2, 1, len(CLASSES), channels=(4, 8, 16, 32, 64))
    modules = ICLModules(len(CLASSES), backbone.tap_channels, heads=(2, 2, 1)) if with_modules else None
    card = {"name": name, "classes": CLASSES, "colours": COLOURS, "modalities": ["MR"],
            "normalisation": {"MR": {"kind": "percentile", "percentiles": [1, 99]}},
            "patch_size": [128, 128], "target_spacing_mm": None}
    return save_model(folder / name, backbone, card, modules)


@pytest.fixture
def tiny_model(user_model_dir):
    """Name of a tiny user model in a fresh user model folder (conftest's ``user_model_dir``)."""
    save_tiny_model(user_model_dir)
    return "tiny-mr"


@pytest.fixture
def messages(monkeypatch):
    """Every notification the widgets show, as (level, text)."""
    from napari.utils import notifications

    shown = []
    for level in ("info", "warning", "error"):
        monkeypatch.setattr(notifications, f"show_{level}", lambda text, level=level: shown.append((level, text)))
    return shown


def add_scan(viewer, shape=(6, 40, 48), modality="MR", name="scan"):
    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, shape).astype(np.float32)
    data[:, 10:30, 12:36] += 200  # something to segment
    geometry = Geometry.from_spacing(SPACING, shape).to_dict()
    return viewer.add_image(data, name=name, scale=SPACING, translate=(10.0, -5.0, 3.0),
                            metadata={METADATA_KEY: {"geometry": geometry, "modality": modality, "source": "x"}})


def open_widget(qtbot, widget_class, model=None, **scan):
    """A ViewerModel with a scan layer (``scan``: add_scan's options), the widget on it, ``model`` chosen."""
    viewer = ViewerModel()
    image = add_scan(viewer, **scan)
    widget = widget_class(viewer)
    qtbot.addWidget(widget)
    if model is not None:
        widget.inputs.model.select(model)
    return viewer, image, widget


def layer_names(viewer):
    return [layer.name for layer in viewer.layers]


def wait_done(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=WAIT_MS)


# -- shared pieces --

def test_layer_picker_follows_added_removed_and_renamed_layers(qtbot):
    viewer = ViewerModel()
    picker = common.LayerPicker(viewer, Labels)
    assert picker.layer() is None and picker.count() == 0
    viewer.add_image(np.zeros((2, 4, 4)), name="img")
    first = viewer.add_labels(np.zeros((2, 4, 4), np.uint8), name="a")
    viewer.add_labels(np.zeros((2, 4, 4), np.uint8), name="b")
    assert [picker.itemText(i) for i in range(picker.count())] == ["b", "a"]
    picker.set_layer(first)
    first.name = "renamed"
    assert picker.layer() is first and picker.currentText() == "renamed"
    viewer.layers.remove(first)
    assert picker.layer().name == "b"


def test_unique_layer_name_never_returns_a_taken_name():
    viewer = ViewerModel()
    assert common.unique_layer_name(viewer, "x") == "x"
    viewer.add_labels(np.zeros((2, 2), np.uint8), name="x")
    viewer.add_labels(np.zeros((2, 2), np.uint8), name="x [2]")
    assert common.unique_layer_name(viewer, "x") == "x [3]"


def test_labels_layer_from_prediction_has_grid_colours_and_class_names(qtbot):
    viewer = ViewerModel()
    image = add_scan(viewer)
    labels = np.zeros(image.data.shape, np.uint8)
    labels[2, 5, 5] = 3
    classes = {int(k): v for k, v in CLASSES.items()}
    layer = common.add_labels_layer(viewer, labels, common.grid_kwargs(image), classes,
                                    {int(k): v for k, v in COLOURS.items()}, "scan")
    assert layer.name == "scan [2]"  # the image is called "scan" already
    np.testing.assert_allclose(layer.scale, image.scale)
    np.testing.assert_allclose(layer.translate, image.translate)
    ours = layer.metadata[METADATA_KEY]
    assert ours["geometry"] == image.metadata[METADATA_KEY]["geometry"]
    assert ours["class_names"] == {1: "RV cavity", 2: "LV myocardium", 3: "LV cavity"}
    assert list(layer.features["class"]) == list(CLASSES.values())
    np.testing.assert_allclose(layer.colormap.map(np.array([3]))[0], [0, 0, 1, 1])
    assert layer.colormap.map(np.array([0]))[0][3] == 0  # background transparent


def test_model_picker_lists_user_models_and_refreshes(qtbot, tiny_model, user_model_dir, tmp_path):
    picker = common.ModelPicker()
    assert picker.select(tiny_model) and picker.choice().endswith(tiny_model)
    save_tiny_model(user_model_dir, name="later")
    assert not any("later" in picker.combo.itemText(i) for i in range(picker.combo.count()))
    picker.combo.about_to_show.emit()  # what opening the list does
    assert picker.select("later")
    picker.add_folder(tmp_path / "somewhere")
    assert picker.choice() == str(tmp_path / "somewhere")


# -- Segment --

def test_segment_adds_a_named_labels_layer_on_the_image_grid(qtbot, tiny_model, messages):
    viewer, image, widget = open_widget(qtbot, SegmentWidget, tiny_model)
    widget.probabilities.setChecked(True)
    assert widget.run()
    wait_done(qtbot, widget)
    labels = viewer.layers["scan tiny-mr"]
    assert labels.data.shape == image.data.shape and labels.data.dtype == np.uint8
    np.testing.assert_allclose(labels.scale, image.scale)
    np.testing.assert_allclose(labels.translate, image.translate)
    assert labels.metadata[METADATA_KEY]["class_names"][3] == "LV cavity"
    ml = float(np.prod(SPACING)) / 1000 * int((labels.data == 3).sum())
    assert f"LV cavity {ml:.1f} ml" in widget.runner.status.text()  # sizes a user can judge
    probabilities = [layer for layer in viewer.layers if "p(" in layer.name]
    assert len(probabilities) == 3 and probabilities[0].data.shape == image.data.shape
    assert widget.keep_largest.isChecked()  # on by default: each class is one piece
    widget.keep_largest.setChecked(False)
    assert widget.run()  # again: a new layer, never the old one replaced
    wait_done(qtbot, widget)
    assert "scan tiny-mr [2]" in layer_names(viewer)
    raw = viewer.layers["scan tiny-mr [2]"].data
    assert np.array_equal(labels.data, keep_largest_components(raw))
    assert not [m for m in messages if m[0] == "error"]


def test_segment_warns_when_the_model_was_not_trained_on_the_modality(qtbot, tiny_model, messages):
    viewer, _, widget = open_widget(qtbot, SegmentWidget, tiny_model, modality="CT")
    widget.run()
    wait_done(qtbot, widget)
    assert any(level == "warning" and "not CT" in text for level, text in messages)
    assert "Warning: model" in widget.runner.status.text() and "not CT" in widget.runner.status.text()  # it stays


def test_segment_bad_choices_say_so_and_change_nothing(qtbot, tiny_model, messages, tmp_path):
    viewer = ViewerModel()
    widget = SegmentWidget(viewer)
    qtbot.addWidget(widget)
    assert not widget.run()  # no image layer
    assert "No image layer" in widget.runner.status.text()
    add_scan(viewer)
    (tmp_path / "not-a-model").mkdir()
    widget.inputs.model.add_folder(tmp_path / "not-a-model")
    assert widget.run()
    wait_done(qtbot, widget)
    assert layer_names(viewer) == ["scan"]
    assert messages[-1][0] == "error" and "not-a-model" in messages[-1][1]


def test_segment_cancel_adds_no_layer(qtbot, tiny_model, messages):
    viewer, _, widget = open_widget(qtbot, SegmentWidget, tiny_model, shape=(200, 64, 64))
    widget.run()
    widget.runner.cancel()
    wait_done(qtbot, widget)
    assert layer_names(viewer) == ["scan"]
    assert "cancelled" in widget.runner.status.text()


# -- Attention --

def test_attention_adds_one_additive_layer_per_foreground_class(qtbot, tiny_model):
    viewer, image, widget = open_widget(qtbot, AttentionWidget, tiny_model)
    widget.head.setValue(1)
    assert widget.run()
    wait_done(qtbot, widget)
    maps = widget.last_layers
    assert [layer.name for layer in maps] == [
        f"{name} attention (scan, scale 0, head 1)" for name in ("RV cavity", "LV myocardium", "LV cavity")]
    for layer in maps:
        assert layer.data.shape == image.data.shape and layer.blending == "additive"
        np.testing.assert_allclose(layer.scale, image.scale)
        np.testing.assert_allclose(layer.translate, image.translate)
    np.testing.assert_allclose(maps[0].colormap.colors[-1], [1, 0, 0, 1])


def test_attention_without_modules_or_with_a_missing_head_says_so(qtbot, user_model_dir, messages):
    save_tiny_model(user_model_dir, name="no-modules", with_modules=False)
    save_tiny_model(user_model_dir, name="with-modules")
    viewer, _, widget = open_widget(qtbot, AttentionWidget, "no-modules")
    widget.run()
    wait_done(qtbot, widget)
    assert "no attention maps" in messages[-1][1]
    widget.inputs.model.select("with-modules")
    widget.head.setValue(5)
    widget.run()
    wait_done(qtbot, widget)
    assert "head 5 does not exist" in messages[-1][1]
    assert layer_names(viewer) == ["scan"]


# -- Evaluate --

def test_evaluate_table_and_csv_on_a_known_case(qtbot, tmp_path):
    viewer = ViewerModel()
    ref = np.zeros((4, 20, 20), np.uint8)
    ref[1:3, 5:15, 5:15] = 1
    pred = np.zeros_like(ref)
    pred[1:3, 5:15, 10:15] = 1  # half of the reference: Dice 2*100/(200+100) = 66.7 %
    viewer.add_labels(ref, name="reference", scale=SPACING)
    viewer.add_labels(pred, name="prediction", scale=SPACING)
    widget = EvaluateWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.prediction.currentText() == "prediction" and widget.reference.currentText() == "reference"
    assert widget.run()
    wait_done(qtbot, widget)
    expected = evaluate_labels(pred, ref, {1: "label 1"}, SPACING)[0]
    cells = [widget.table.item(0, c).text() for c in range(widget.table.columnCount())]
    assert cells[:4] == ["label 1", "66.7", f"{expected['hd95_mm']:.2f}", f"{expected['asd_mm']:.2f}"]
    assert widget.table.item(1, 0).text() == "mean"
    rows = read_csv(widget.export_csv(tmp_path / "metrics.csv"))
    assert math.isclose(rows[0]["dice"], 2 / 3) and rows[1]["class"] == "mean"


def test_evaluate_mismatched_shapes_say_so(qtbot, messages):
    viewer = ViewerModel()
    viewer.add_labels(np.zeros((4, 20, 20), np.uint8), name="reference")
    viewer.add_labels(np.zeros((4, 20, 21), np.uint8), name="prediction")
    widget = EvaluateWidget(viewer)
    qtbot.addWidget(widget)
    widget.prediction.set_layer(viewer.layers["prediction"])
    widget.reference.set_layer(viewer.layers["reference"])
    assert not widget.run()
    assert "same grid" in messages[-1][1] and widget.table.rowCount() == 0
    widget.reference.set_layer(viewer.layers["prediction"])
    assert not widget.run() and "same layer" in messages[-1][1]


def test_evaluate_refuses_a_layer_whose_file_header_puts_it_elsewhere(qtbot, messages):
    """Both read from files (our geometry in their metadata), same shape, different places: a label file
    written with an identity affine. Layers made in napari carry no such geometry and are taken as shown."""
    viewer = ViewerModel()
    shape = (4, 20, 20)
    for name, geometry in [("reference", Geometry.from_spacing(SPACING, shape)),
                           ("prediction", Geometry.from_source_grid(np.eye(4), shape[::-1]))]:
        assert geometry.shape_zyx == shape
        viewer.add_labels(np.zeros(shape, np.uint8), name=name, metadata={METADATA_KEY: {"geometry": geometry.to_dict()}})
    widget = EvaluateWidget(viewer)
    qtbot.addWidget(widget)
    widget.prediction.set_layer(viewer.layers["prediction"])
    widget.reference.set_layer(viewer.layers["reference"])
    assert not widget.run()
    assert "does not lie where 'reference' does" in messages[-1][1] and "consistent-seg evaluate" in messages[-1][1]
    viewer.layers["prediction"].metadata = {}
    viewer.layers["prediction"].data[0, 0, 0] = 1
    assert widget.run()  # made in napari: as shown
    wait_done(qtbot, widget)


# -- Fine-tune: tests/test_finetune_widget.py --


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice level is Linux's")
def test_tasks_run_on_a_lower_priority_thread_with_torch_on_every_core(monkeypatch):
    """What the widgets run goes to a fresh thread at nice +10 (torch's OpenMP team inherits it), with
    replies, the return value, errors and an abandoned task's clean-up as if it ran in the caller."""
    from napari_consistent_seg import inference
    from napari_consistent_seg._napari import _workers

    monkeypatch.setattr(inference, "_busy_cores", lambda: 0.0)  # a core to spare (the next test: none)
    caller, seen, others = threading.get_native_id(), {}, set(threading.enumerate())

    def task(progress, cancel):
        seen["thread"] = threading.get_native_id()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, seen["thread"])
        seen["torch threads"] = torch.get_num_threads()
        try:
            reply = yield 1
            yield reply
        finally:
            seen["closed on"] = threading.get_native_id()
        return "done"

    run, finish = _workers._at_low_priority(task)
    steps = run(None, None)
    assert next(steps) == 1 and steps.send("echo") == "echo"
    with pytest.raises(StopIteration) as end:
        next(steps)
    assert end.value.value == "done"
    assert seen["thread"] != caller and seen["torch threads"] == torch.get_num_threads()
    assert seen["nice"] == min(19, os.getpriority(os.PRIO_PROCESS, caller) + _workers.NICENESS)

    finish()
    run, finish = _workers._at_low_priority(task)
    abandoned = run(None, None)
    next(abandoned)  # napari stops resuming a cancelled generator: its clean-up runs at finish, on its thread
    finish()
    assert seen["closed on"] == seen["thread"] != caller

    def failing(progress, cancel):
        raise ConsistentSegError("a clear message")

    run, finish = _workers._at_low_priority(failing)
    with pytest.raises(ConsistentSegError, match="a clear message"):
        run(None, None)
    finish()
    deadline, ours = time.monotonic() + 5, lambda: set(threading.enumerate()) - others  # each thread ends
    while ours() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not ours()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice level is Linux's")
def test_tasks_keep_normal_priority_when_other_processes_fill_every_core(monkeypatch):
    """At nice +10 beside a process on every core a round would get a tenth of its share: it starts at
    normal priority then, and at nice +10 whenever a core is left."""
    from napari_consistent_seg import inference
    from napari_consistent_seg._napari import _workers

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(inference, "_busy_cores", lambda: float(cores))
    assert _workers._niceness() == 0
    def nice(*_args):
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    run, finish = _workers._at_low_priority(nice)
    assert run(None, None) == nice()
    finish()
    monkeypatch.setattr(inference, "_busy_cores", lambda: cores - 1.0)
    assert _workers._niceness() == _workers.NICENESS
