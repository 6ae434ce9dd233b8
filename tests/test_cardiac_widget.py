"""The Cardiac function widget on a display-less ViewerModel: a cine layer -> labels layer, curve,
table, CSV, ED/ES navigation; its messages on bad choices. Segmentation is faked (fast)."""

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_consistent_seg import cardiac
from napari_consistent_seg._napari.cardiac_widget import CardiacFunctionWidget
from napari_consistent_seg._napari.layers import METADATA_KEY
from napari_consistent_seg.io import Geometry
from napari_consistent_seg.metrics import read_csv

SPACING = (8.0, 1.5, 1.5)
WIDTHS = [6, 8, 5, 3, 4]  # LV cavity width per phase: ED = 1, ES = 3


def fake_segment(model, volume, **kwargs):
    """segment_cardiac's stand-in: per phase, an LV whose width is the phase's mean intensity."""
    phases = [volume.phase(t).data for t in range(volume.n_phases or 1)] if hasattr(volume, "phase") else volume
    progress = kwargs.get("progress")
    out = []
    for t, phase in enumerate(phases):
        labels = np.zeros(phase.shape, np.uint8)
        width = int(round(float(phase.mean())))
        labels[:, 4:12, 2:2 + width] = 3
        labels[:, 12:14, :] = 2
        labels[:, 16:20, :width] = 1
        out.append(labels)
        if progress is not None:
            progress(t + 1, len(phases))
    return out


@pytest.fixture
def widget(qtbot, monkeypatch):
    monkeypatch.setattr(cardiac, "segment_cardiac", fake_segment)
    viewer = ViewerModel()
    cine = np.stack([np.full((3, 24, 24), w, np.float32) for w in WIDTHS])
    geometry = Geometry.from_spacing(SPACING, cine.shape[1:]).to_dict()
    viewer.add_image(cine, name="cine", scale=(1.0, *SPACING),
                     metadata={METADATA_KEY: {"geometry": geometry, "modality": "MR", "source": "x"}})
    w = CardiacFunctionWidget(viewer)
    qtbot.addWidget(w)
    return viewer, w


def test_segment_all_phases_plots_marks_and_tabulates(qtbot, widget, tmp_path):
    viewer, w = widget
    assert w.model.choice() is not None and w.model.choice().endswith("cardiac-cine-mri")
    assert w.run()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=20_000)
    assert w.result is not None and (w.result.ed, w.result.es) == (1, 3)
    assert w.result.unit == "ml" and w.result.lv_ef_percent == pytest.approx(100 * 5 / 8)
    labels = w.labels_layer
    assert labels.data.shape == (5, 3, 24, 24) and tuple(labels.scale) == (1.0, *SPACING)
    lines = w.curve.axes.get_lines()
    np.testing.assert_allclose(lines[0].get_ydata(), w.result.lv_volumes)  # LV curve, then RV
    assert w.table.item(3, 0).text() == "EF" and w.table.item(3, 1).text() == "62.5 %"
    rows = read_csv(w.export_csv(tmp_path / "cf.csv"))
    assert [r["mark"] for r in rows[:5]] == ["", "ED", "", "ES", ""]
    assert rows[-1]["phase"] == "summary" and rows[-1]["lv_ef_percent"] == pytest.approx(62.5)


def test_a_missed_rv_is_said_in_the_status_line(qtbot, widget, monkeypatch):
    def little_rv(model, volume, **kwargs):  # one RV voxel a slice: far under a fifth of the LV
        out = fake_segment(model, volume, **kwargs)
        for labels in out:
            labels[labels == 1] = 0
            labels[:, 16, 0] = 1
        return out

    monkeypatch.setattr(cardiac, "segment_cardiac", little_rv)
    _, w = widget
    assert w.run()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=20_000)
    assert w.runner.status.text().startswith("Warning: the RV at ED")
    assert w.table.item(0, 2).text().endswith("ml")  # the RV figures are still shown


def test_ed_es_buttons_and_curve_click_move_the_viewer(qtbot, widget):
    viewer, w = widget
    w.run()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=20_000)
    w.es_button.click()
    assert viewer.dims.current_step[0] == 3
    w.ed_button.click()
    assert viewer.dims.current_step[0] == 1

    class Click:  # what matplotlib hands the canvas on a click in the plot
        inaxes, xdata = w.curve.axes, 3.8

    w.curve._clicked(Click)
    assert viewer.dims.current_step[0] == 4


def test_a_3d_layer_alone_is_refused_with_what_to_do(qtbot, widget):
    viewer, w = widget
    viewer.layers.clear()
    viewer.add_image(np.zeros((3, 8, 8), np.float32), name="one frame")
    assert not w.run()
    assert "choose its ES frame" in w.runner.status.text() and w.labels_layer is None


def test_an_ed_and_an_es_frame_give_the_figures_and_a_labels_layer_each(qtbot, widget):
    """ACDC's way: two 3D frames of one cine. Go to ED / ES shows that frame and its labels."""
    viewer, w = widget
    viewer.layers.clear()
    geometry = Geometry.from_spacing(SPACING, (3, 24, 24)).to_dict()
    ed, es = (viewer.add_image(np.full((3, 24, 24), width, np.float32), name=name, scale=SPACING,
                               metadata={METADATA_KEY: {"geometry": geometry, "modality": "MR", "source": "x"}})
              for name, width in (("ED frame", 8), ("ES frame", 3)))
    w.image.set_layer(ed)
    w.es_frame.set_layer(es)
    assert w.run()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=20_000)
    assert (w.result.ed, w.result.es) == (0, 1) and w.result.lv_ef_percent == pytest.approx(100 * 5 / 8)
    assert w.table.item(5, 1).text() == "ED / ES"
    labels = [viewer.layers[f"{name} frame cardiac-cine-mri"] for name in ("ED", "ES")]
    assert [layer.data.shape for layer in labels] == [(3, 24, 24)] * 2 and tuple(labels[1].scale) == SPACING
    w.es_button.click()
    assert [layer.visible for layer in (ed, labels[0], es, labels[1])] == [False, False, True, True]
    w.ed_button.click()
    assert [layer.visible for layer in (ed, labels[0], es, labels[1])] == [True, True, False, False]


def test_export_before_a_run_says_what_to_do(widget, tmp_path):
    _, w = widget
    with pytest.raises(cardiac.ConsistentSegError, match="Segment all phases"):
        w.export_csv(tmp_path / "x.csv")


@pytest.mark.gui
def test_docked_from_the_plugin_menu_on_a_real_cine(make_napari_viewer, qtbot, shared_data, monkeypatch):
    """napari.yaml's entry docks the widget; the Sunnybrook cine DICOM opens as a 4D layer it accepts."""
    def by_phase(model, volume, **kwargs):  # LV width 20 +- 8 over the cycle: one ED, one ES
        n = volume.n_phases
        return fake_segment(model, [np.full(volume.shape[1:], 20 + 8 * np.cos(2 * np.pi * t / n), np.float32)
                                    for t in range(n)])

    monkeypatch.setattr(cardiac, "segment_cardiac", by_phase)
    viewer = make_napari_viewer()
    (cine,) = viewer.open(str(shared_data / "sunnybrook_cine" / "dicom" / "SCD0000301"),
                          plugin="napari-consistent-seg")
    _, w = viewer.window.add_plugin_dock_widget("napari-consistent-seg", "Cardiac function")
    assert isinstance(w, CardiacFunctionWidget) and cine.ndim == 4
    w.image.set_layer(cine)
    assert w.run()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60_000)
    assert w.result is not None and w.result.n_phases == cine.data.shape[0] == 20
    assert w.result.ed == 0 and w.result.es in (9, 10, 11)  # rounded widths tie round the minimum
    assert w.result.unit == "ml" and w.labels_layer.data.shape == cine.data.shape
    w.es_button.click()
    assert viewer.dims.current_step[0] == w.result.es
