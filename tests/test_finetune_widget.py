"""Fine-tune widget without a window: strokes recorded from napari's paint events (undo included),
the in-place loop (Fine-tune, Accept, Revert, Save as), and a cancel that changes nothing."""

import numpy as np
import pytest
from napari.components import ViewerModel
from napari.layers import Labels
from test_widgets import add_scan, layer_names, messages, open_widget, tiny_model, wait_done  # noqa: F401

from napari_consistent_seg._napari.finetune_widget import EditRecorder, FinetuneWidget
from napari_consistent_seg._napari.layers import METADATA_KEY


def brush(layer, z, y, x, label, size=3):
    """One brush dab as the mouse does it: napari records it in its history and emits ``paint``."""
    layer.brush_size = size
    layer.paint((z, y, x), label)


def test_recorder_follows_brush_eraser_fill_undo_and_redo():
    layer = Labels(np.zeros((3, 20, 20), np.uint8))
    layer.data[1, 0:6, 0:6] = 2  # set without painting (e.g. a model's output): not an edit
    recorder = EditRecorder(layer)
    assert recorder.known() is None
    brush(layer, 1, 10, 10, 3, size=5)
    disk = layer.data[1] == 3  # napari's 5-pixel brush: a 21-voxel disk
    assert disk.sum() == 21 and (recorder.known()[1] == disk).all()
    brush(layer, 1, 5, 5, 0, size=5)  # an eraser dab half over the 2s: its whole disk is known
    assert recorder.known().sum() == 42 and layer.data[1, 5, 5] == 0 and recorder.known()[1, 7, 5]
    layer.undo()
    assert recorder.known().sum() == 21 and layer.data[1, 5, 5] == 2
    layer.redo()
    assert recorder.known().sum() == 42
    brush(layer, 1, 10, 10, 3, size=5)  # a dab that changes nothing: napari emits nothing
    assert recorder.known().sum() == 42
    layer.mode = "fill"
    layer.fill((2, 15, 15), 1)
    assert recorder.known()[2].all()
    assert (EditRecorder(layer).known()[1] == recorder.known()[1]).all()  # opened later: sees the history
    recorder.base = np.zeros(layer.data.shape, bool)
    recorder.base[0, 0, 0] = True
    assert recorder.known()[0].sum() == 1


def segmented(viewer, image, model):
    """A model's segmentation layer, as the Segment widget adds it (every slice labeled)."""
    seg = np.zeros(image.data.shape, np.uint8)
    seg[:, 12:28, 14:34] = 3
    return viewer.add_labels(seg, name=f"scan {model}", scale=image.scale, translate=image.translate,
                             metadata={METADATA_KEY: {"model": model}})


def test_bad_choices_say_so_and_change_nothing(qtbot, tiny_model, messages):  # noqa: F811
    viewer, image, widget = open_widget(qtbot, FinetuneWidget, tiny_model)
    assert not widget.run() and "No Labels layer" in messages[-1][1]
    viewer.add_labels(np.zeros((3, 3, 3), np.uint8), name="wrong shape")
    assert not widget.run() and "shape" in messages[-1][1]
    empty = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="empty")
    widget.painted.set_layer(empty)
    assert not widget.run() and "empty" in messages[-1][1]
    seg = segmented(viewer, image, tiny_model)
    widget.painted.set_layer(seg)
    assert not widget.run() and "No corrections" in messages[-1][1]  # a model's output needs strokes
    assert widget.tuner is None and not widget.accept() and not widget.save_as("x")
    assert layer_names(viewer) == ["scan", "wrong shape", "empty", f"scan {tiny_model}"]


@pytest.mark.slow
def test_correct_in_place_fine_tune_accept_revert_and_save(qtbot, tiny_model, messages):  # noqa: F811
    viewer = ViewerModel()
    image = add_scan(viewer)
    widget = FinetuneWidget(viewer)  # opened before the segmentation exists: it still records it
    qtbot.addWidget(widget)
    seg = segmented(viewer, image, tiny_model)
    before = seg.data.copy()
    widget.inputs.model.select(tiny_model)
    widget.painted.set_layer(seg)
    brush(seg, 2, 20, 20, 1)  # a correction inside the organ
    brush(seg, 3, 5, 5, 2)
    brush(seg, 3, 20, 20, 0)  # an eraser stroke
    known = widget.known_of(seg)
    assert known.sum() == 3 * 9  # three 3-pixel dabs, 9 voxels each, right voxels under them included
    corrected = seg.data.copy()
    widget.steps.setValue(3)
    widget.preview_every.setValue(2)
    assert widget.run()
    wait_done(qtbot, widget)
    assert widget.steps_done == 3 and len(widget.losses) == 3 and widget.accept_button.isEnabled()
    assert widget.tuner.known_voxels == 27 and widget.tuner.method == "supervised"
    assert widget.preview_layer is not None and widget.preview_layer.data.shape == image.data.shape
    start = widget._session["corrections"][2]  # the starting model's segmentation: untouched classes keep it
    assert start.shape == image.data.shape and len(widget._session["corrections"]) == 3
    np.testing.assert_array_equal(seg.data, corrected)  # nothing written before Accept
    assert widget.accept()
    wait_done(qtbot, widget)
    assert widget.result_layer is seg and widget.preview_layer is None
    np.testing.assert_array_equal(seg.data[known], corrected[known])  # corrections win
    assert layer_names(viewer) == ["scan", f"scan {tiny_model}"]  # in place: no copy layer
    assert widget.known_of(seg).sum() == 27  # Accept is not an edit of the user's
    assert widget.save_as("tiny-tuned")
    assert not widget.save_as("tiny-tuned")  # exists already: a message, not an overwrite
    widget.revert()
    np.testing.assert_array_equal(seg.data, np.where(known, corrected, before))
    assert widget.tuner is None and not widget.accept_button.isEnabled()
    assert not [m for m in messages if m[0] == "error" and "exists" not in m[1]]


@pytest.mark.slow
def test_painted_slices_count_whole_until_accept_fills_the_layer(qtbot, tiny_model, messages):  # noqa: F811
    viewer, image, widget = open_widget(qtbot, FinetuneWidget, tiny_model)
    painted = np.zeros(image.data.shape, np.uint8)
    painted[[1, 4], 10:30, 12:36] = 3
    layer = viewer.add_labels(painted, name="painted", scale=image.scale, translate=image.translate)
    widget.painted.set_layer(layer)
    widget.steps.setValue(2)
    widget.preview_every.setValue(0)
    assert widget.run()
    wait_done(qtbot, widget)
    assert widget.tuner.painted_slices == [1, 4]
    assert widget.accept()
    wait_done(qtbot, widget)
    assert widget.run()  # the filled layer still counts only the painted slices
    wait_done(qtbot, widget)
    assert widget.tuner.painted_slices == [1, 4] and widget.steps_done == 4


@pytest.mark.slow
def test_cancel_leaves_the_model_and_every_layer_as_they_were(qtbot, tiny_model, messages):  # noqa: F811
    viewer, image, widget = open_widget(qtbot, FinetuneWidget, tiny_model)
    seg = segmented(viewer, image, tiny_model)
    widget.painted.set_layer(seg)
    brush(seg, 2, 20, 20, 1)
    widget.steps.setValue(2)
    widget.preview_every.setValue(1)
    assert widget.run()
    wait_done(qtbot, widget)
    tuned, steps, layers = widget.tuner, widget.steps_done, layer_names(viewer)
    preview = widget.preview_layer.data.copy()
    widget.steps.setValue(100_000)
    assert widget.run()
    qtbot.waitUntil(lambda: widget.steps_done > steps + 1, timeout=60_000)
    widget.runner.cancel()
    wait_done(qtbot, widget)
    assert widget.tuner is tuned and widget.steps_done == steps and layer_names(viewer) == layers
    np.testing.assert_array_equal(widget.preview_layer.data, preview)
    assert "as they were" in widget.runner.status.text()


def test_method_and_steps_start_at_the_chosen_models_recipe(qtbot, tiny_model, user_model_dir):  # noqa: F811
    """A model whose card sets its own fine-tuning recipe: choosing it sets Method and Steps."""
    import json

    from test_widgets import save_tiny_model

    from napari_consistent_seg.training.finetune import DEFAULTS

    folder = save_tiny_model(user_model_dir, name="tiny-recipe")
    card = json.loads((folder / "card.json").read_text())
    card["finetune"] = {"method": "icl", "steps": 25}
    (folder / "card.json").write_text(json.dumps(card))
    viewer, image, widget = open_widget(qtbot, FinetuneWidget, tiny_model)
    assert widget.steps.value() == DEFAULTS["steps"] and widget.method.currentText() == DEFAULTS["method"]
    widget.inputs.model.refresh()
    assert widget.inputs.model.select("tiny-recipe")
    assert widget.steps.value() == 25 and widget.method.currentText() == "icl"
    assert widget.inputs.model.select(tiny_model)
    assert widget.steps.value() == DEFAULTS["steps"]
    widget.steps.setValue(6)
    widget.inputs.model.refresh()  # the list refills itself when it opens: the user's Steps stay
    assert widget.steps.value() == 6
