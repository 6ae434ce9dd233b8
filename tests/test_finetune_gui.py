"""The clinician's loop in a real napari window (pytest-xvfb), without copy layers: segment,
correct with brush strokes in place, Fine-tune with a preview, Accept, correct again, Fine-tune
again, Revert, Save as."""

import numpy as np
import pytest
from test_widgets_gui import PLUGIN, dock, open_scan, tiny_model, wait_done  # noqa: F401

from napari_consistent_seg._napari.layers import METADATA_KEY

pytestmark = pytest.mark.gui
CASE = "patient028_frame01"  # acdc val


@pytest.fixture
def acdc_case(shared_data):
    return {kind: shared_data / "acdc" / kind / f"{CASE}.nii.gz" for kind in ("images", "labels")}


def strokes(layer, reference, slices, dabs=6):
    """Brush dabs of the reference label where the layer is wrong, through napari's paint path."""
    wrong = np.asarray(layer.data) != reference
    layer.brush_size = 5
    for z in slices:
        for y, x in np.argwhere(wrong[z])[:: max(1, int(wrong[z].sum()) // dabs)][:dabs]:
            layer.paint((z, y, x), int(reference[z, y, x]))


def test_segment_correct_in_place_finetune_accept_repeat_revert_save(make_napari_viewer, qtbot, acdc_case,
                                                                    tiny_model):  # noqa: F811
    viewer = make_napari_viewer()
    image, reference_layer = open_scan(viewer, acdc_case, with_labels=True)
    reference = np.asarray(reference_layer.data)
    segment = dock(viewer, "Segment")
    segment.inputs.model.select(tiny_model)
    segment.inputs.image.set_layer(image)
    assert segment.run()
    wait_done(qtbot, segment)
    seg = viewer.layers[f"{image.name} {tiny_model}"]
    finetune = dock(viewer, "Fine-tune")
    finetune.inputs.model.select(tiny_model)
    finetune.inputs.image.set_layer(image)
    finetune.painted.set_layer(seg)
    assert not finetune.run()  # a model's output without corrections: nothing to learn from
    layers = [layer.name for layer in viewer.layers]

    strokes(seg, reference, [3, 6])
    first = finetune.known_of(seg)
    assert 0 < first.sum() < 2 * seg.data[0].size and set(np.flatnonzero(first.any((1, 2)))) == {3, 6}
    corrected = np.asarray(seg.data).copy()
    finetune.steps.setValue(4)
    finetune.preview_every.setValue(2)
    assert finetune.run()
    wait_done(qtbot, finetune)
    assert finetune.steps_done == 4 and finetune.preview_layer is not None
    assert f"{finetune.tuner.share_text}:" in finetune.runner.status.text()  # the share kept, and why
    assert finetune.tuner.changed_share is not None  # strokes, not whole slices
    assert finetune.accept()
    wait_done(qtbot, finetune)
    assert finetune.result_layer is seg and finetune.preview_layer is None
    assert [layer.name for layer in viewer.layers] == layers  # corrected in place: no new layer
    np.testing.assert_array_equal(np.asarray(seg.data)[first], corrected[first])  # corrections win
    assert seg.metadata[METADATA_KEY]["fine_tuned"]
    status = finetune.runner.status.text()  # where to look: the slices the round changed most, if any
    assert "changed most beyond your corrections" in status or "Nothing changed" in status

    first_round = finetune.tuner
    strokes(seg, reference, [4])  # the loop again: more corrections, continue from the tuned weights
    assert finetune.known_of(seg).sum() > first.sum()
    assert finetune.run()
    wait_done(qtbot, finetune)
    assert finetune.steps_done == 8 and finetune.tuner.painted_slices == [3, 4, 6]
    before_second_accept = np.asarray(seg.data).copy()
    assert finetune.accept()
    wait_done(qtbot, finetune)
    assert finetune.save_as("tiny-tuned-028")
    known = finetune.known_of(seg)
    now = np.asarray(seg.data).copy()
    finetune.revert()  # the second round undone: the first round's weights, the layer before its Accept
    assert finetune.tuner is first_round and finetune.steps_done == 4
    np.testing.assert_array_equal(np.asarray(seg.data), before_second_accept)  # the corrections in it
    assert "Revert again" in finetune.runner.status.text() and finetune.accept_button.isEnabled()
    finetune.revert()  # and the first: the starting model
    np.testing.assert_array_equal(np.asarray(seg.data)[known], now[known])
    assert finetune.tuner is None and not finetune.accept_button.isEnabled()
    assert "weights are gone" in finetune.runner.status.text() and not finetune.revert_button.isEnabled()
    assert segment.inputs.model.select("tiny-tuned-028")  # the saved model is listed everywhere
