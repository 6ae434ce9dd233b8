"""Cardiac function widget: segment every phase of a cine layer, plot LV and RV volume over the
cycle (matplotlib in the dock), mark ED and ES, show EDV/ESV/SV/EF/mass, export CSV, jump to a phase.
"""

from __future__ import annotations

import napari
import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from napari.layers import Image
from qtpy.QtWidgets import (
    QCheckBox, QFormLayout, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget,
)

from ..cardiac import cine_function, frames_function
from ..errors import ConsistentSegError
from ..metrics import write_csv
from ..models.store import load_model
from ._widget_common import (
    LayerPicker, ModelPicker, add_labels_layer, button, combo, device_choices, export_csv_dialog, grid_kwargs, notify,
    row,
)
from ._workers import TaskRunner
from .layers import volume_from_layer

# napari's dark theme, so the plot sits in the dock like the rest of it
BACKGROUND, FOREGROUND = "#262930", "#d6d6d6"
LV_COLOUR, RV_COLOUR = "#4363d8", "#e6194b"


class VolumeCurve(FigureCanvasQTAgg):
    """LV and RV cavity volume per phase, ED and ES marked; a click reports the nearest phase."""

    def __init__(self, on_phase_clicked=None):
        self.figure = Figure(figsize=(4, 2.6), facecolor=BACKGROUND, layout="constrained")
        super().__init__(self.figure)
        self.axes = self.figure.add_subplot(111)
        self._on_phase_clicked = on_phase_clicked
        self.mpl_connect("button_press_event", self._clicked)
        self.result = None
        self.draw_result(None)

    def draw_result(self, result) -> None:
        self.result = result
        ax = self.axes
        ax.clear()
        ax.set_facecolor(BACKGROUND)
        for spine in ax.spines.values():
            spine.set_color(FOREGROUND)
        ax.tick_params(colors=FOREGROUND, labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("phase", color=FOREGROUND, fontsize=9)
        if result is None:
            ax.set_ylabel("volume", color=FOREGROUND, fontsize=9)
            ax.text(0.5, 0.5, "segment a cine to see its volume curve", ha="center", va="center",
                    color=FOREGROUND, fontsize=9, transform=ax.transAxes)
            self.draw_idle()
            return
        phases = np.arange(result.n_phases)
        ax.set_ylabel(f"cavity volume ({result.unit})", color=FOREGROUND, fontsize=9)
        ax.plot(phases, result.lv_volumes, "o-", color=LV_COLOUR, ms=3, label="LV")
        if result.rv_volumes is not None:
            ax.plot(phases, result.rv_volumes, "o-", color=RV_COLOUR, ms=3, label="RV")
        for t, name in ((result.ed, "ED"), (result.es, "ES")):
            ax.axvline(t, color=FOREGROUND, lw=0.8, ls="--")
            ax.annotate(name, (t, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", color=FOREGROUND, fontsize=8)
        ax.legend(fontsize=8, facecolor=BACKGROUND, labelcolor=FOREGROUND, edgecolor=FOREGROUND, loc="lower left")
        self.draw_idle()

    def _clicked(self, event) -> None:
        if self.result is None or event.inaxes is not self.axes or event.xdata is None:
            return
        phase = int(np.clip(round(event.xdata), 0, self.result.n_phases - 1))
        if self._on_phase_clicked is not None:
            self._on_phase_clicked(phase)


class CardiacFunctionWidget(QWidget):
    """Choose a cine image layer (phase, slice, row, column), or an ED and an ES frame (two 3D layers,
    as ACDC distributes them), and a cardiac model; "Segment all phases" runs in a worker (progress,
    Cancel) and adds the labels (a 4D layer, or one layer a frame); the curve, the table and the CSV
    follow. A click on the curve (or Go to ED / ES) moves the viewer to that phase, or shows that frame.
    """

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self.image = LayerPicker(viewer, Image)
        self.es_frame = LayerPicker(viewer, Image, apart_from=self.image)
        self.es_frame.setToolTip("Used when the first layer is one 3D frame: it is then the ED frame, this the ES")
        self.model = ModelPicker()
        self.model.select("cardiac-cine-mri")
        self.device = combo(device_choices(), "auto: a GPU when there is one, else the CPU")
        self.clean = QCheckBox("Cardiac clean-up")
        self.clean.setChecked(True)
        self.clean.setToolTip("Keep one heart: remove a false heart below the apex or above the base and "
                              "islands, close broken myocardium rings, fill a missed slice (docs/cardiac.md)")
        form = QFormLayout()
        form.addRow("Cine or ED frame", self.image)
        form.addRow("ES frame (with an ED frame)", self.es_frame)
        form.addRow("Model", self.model)
        form.addRow("Device", self.device)
        self.run_button = button("Segment all phases", self.run)
        self.runner = TaskRunner()
        self.curve = VolumeCurve(on_phase_clicked=self.go_to_phase)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["", "LV", "RV"])
        self.table.verticalHeader().setVisible(False)
        self.ed_button = button("Go to ED", lambda: self.go_to_phase(self.result.ed) if self.result else None)
        self.es_button = button("Go to ES", lambda: self.go_to_phase(self.result.es) if self.result else None)
        self.export_button = button("Export CSV…", self._export_dialog)
        for push in (self.ed_button, self.es_button, self.export_button):
            push.setEnabled(False)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.clean)
        layout.addWidget(self.run_button)
        layout.addWidget(self.runner)
        layout.addWidget(self.curve, 1)
        layout.addLayout(row(self.ed_button, self.es_button, self.export_button))
        layout.addWidget(self.table)
        self.result = None
        self.labels_layer = None
        self._cine_layer = None
        self._frames = None  # ED / ES mode: {0: (ED image, its labels), 1: (ES image, its labels)}

    def run(self) -> bool:
        """Start segmenting every phase; False (with a message) if the choices are unusable."""
        try:
            layers, volumes, model_choice = self._read()
        except ConsistentSegError as error:
            notify(str(error), "warning", self.runner.status)
            return False
        device, clean = self.device.currentText(), self.clean.isChecked()
        grids = [grid_kwargs(layer, layer.ndim) for layer in layers]  # a cine's 4D grid, or each frame's

        def task(progress, cancel):
            model = load_model(model_choice, device="cpu")
            measure = cine_function if len(volumes) == 1 else frames_function
            result, labels = measure(model, *volumes, clean=clean, device=device, progress=progress, cancel=cancel)
            return model, [np.stack(labels)] if len(volumes) == 1 else labels, result

        def returned(out):
            model, labels, result = out
            added = [add_labels_layer(self.viewer, data, grid, model.classes, model.colours,
                                      f"{layer.name} {model.name}", extra_metadata={"model": model.name})
                     for data, grid, layer in zip(labels, grids, layers)]
            self.labels_layer = added[0]
            self._cine_layer = layers[0] if len(layers) == 1 else None
            self._frames = None if len(layers) == 1 else dict(enumerate(zip(layers, added)))
            self.show_result(result)

        what = (f"{volumes[0].n_phases} phases of {layers[0].name}" if len(layers) == 1
                else f"ED frame {layers[0].name} and ES frame {layers[1].name}")
        started = self.runner.start(task, description=f"Segmenting {what}",
                                    on_returned=returned, on_finished=lambda: self.run_button.setEnabled(True))
        self.run_button.setEnabled(not started)
        return started

    def show_result(self, result) -> None:
        """Curve, table and buttons for a ``CardiacFunction``."""
        self.result = result
        self.curve.draw_result(result)
        u = result.unit
        rows = [("EDV", result.lv_edv, result.rv_edv, u), ("ESV", result.lv_esv, result.rv_esv, u),
                ("SV", result.lv_sv, result.rv_sv, u), ("EF", result.lv_ef_percent, result.rv_ef_percent, "%"),
                ("LV mass", result.lv_mass_g, None, "g"),
                ("ED / ES phase", " / ".join(result.phase_names[i] if result.phase_names else str(i)
                                             for i in (result.ed, result.es)), None, "")]
        self.table.setRowCount(len(rows))
        for r, (name, lv, rv, unit) in enumerate(rows):
            for c, text in enumerate((name, _cell(lv, unit), _cell(rv, unit))):
                self.table.setItem(r, c, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()
        self.table.setFixedHeight(self.table.horizontalHeader().height() + 2
                                  + sum(self.table.rowHeight(r) for r in range(len(rows))))
        for push in (self.ed_button, self.es_button, self.export_button):
            push.setEnabled(True)
        if result.warnings:
            self.runner.status.setText("\n".join(f"Warning: {w}" for w in result.warnings))

    def go_to_phase(self, phase: int) -> None:
        """Show ``phase`` of the cine in the viewer (its first axis); with ED and ES frames, show that
        frame and its labels and hide the other's."""
        if self._frames:
            for index, pair in self._frames.items():
                for layer in pair:
                    if layer in self.viewer.layers:
                        layer.visible = index == phase
            return
        layer = self._cine_layer or self.image.layer()
        if layer is None or layer.ndim < 4:
            return
        axis = self.viewer.dims.ndim - layer.ndim
        self.viewer.dims.set_point(axis, layer.translate[0] + phase * layer.scale[0])

    def export_csv(self, path) -> str:
        """Per-phase volumes, then the function figures, as CSV rows."""
        if self.result is None:
            raise ConsistentSegError("Nothing to export yet: press Segment all phases first.")
        figures = {k: v for k, v in self.result.as_dict().items() if not isinstance(v, list)}
        rows = self.result.phase_rows() + [{"phase": "summary", **figures}]
        return str(write_csv(rows, path))

    def _read(self):
        """([cine layer] or [ED layer, ES layer], their Volumes, the model choice), or ConsistentSegError."""
        layer = self.image.layer()
        if layer is None:
            raise ConsistentSegError("No image layer: open a cine scan (4D NIfTI or a cine DICOM folder), or an "
                                     "ED and an ES frame, first.")
        if getattr(layer, "rgb", False) or getattr(layer, "multiscale", False) or layer.ndim not in (3, 4):
            raise ConsistentSegError(
                f"{layer.name!r} has {layer.ndim} dimensions: choose a cine layer (phase, slice, row, column), "
                "or a 3D ED frame with its ES frame.")
        layers = [layer]
        if layer.ndim == 3:
            es = self.es_frame.layer()
            if es is None or es is layer or es.ndim != 3:
                raise ConsistentSegError(
                    f"{layer.name!r} is one 3D frame: choose its ES frame (another 3D image of the same cine) "
                    "as ES frame, or a cine layer.")
            layers.append(es)
        model_choice = self.model.choice()
        if model_choice is None:
            raise ConsistentSegError("No model: choose a cardiac model (cardiac-cine-mri).")
        volumes = [volume_from_layer(one) for one in layers]  # data not copied
        for volume in volumes:
            if volume.modality == "unknown":
                volume.modality = "MR"  # a scan without the tag: the cardiac models are MRI models
        return layers, volumes, model_choice

    def _export_dialog(self) -> None:
        export_csv_dialog(self, "Export cardiac function", "cardiac_function.csv", self.export_csv)


def _cell(value, unit: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return f"{value:.1f} {unit}"
