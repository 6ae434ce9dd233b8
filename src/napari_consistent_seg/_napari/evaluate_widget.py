"""Evaluate widget: a prediction Labels layer against a reference one -> per-class Dice, HD95, ASD."""

from __future__ import annotations

import math

import napari
import numpy as np
from napari.layers import Labels
from qtpy.QtWidgets import QFormLayout, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from ..errors import ConsistentSegError
from ..metrics import evaluate_labels, summarise, write_csv
from ._widget_common import LayerPicker, button, class_names_of, export_csv_dialog, notify, row
from ._workers import TaskRunner
from .layers import geometry_from_layer, misplaced

# (row key, header, factor, decimals)
COLUMNS = (("class", "Class", None, 0), ("dice", "Dice (%)", 100.0, 1), ("hd95_mm", "HD95 (mm)", 1.0, 2),
           ("asd_mm", "ASD (mm)", 1.0, 2), ("ref_volume_ml", "Ref. (ml)", 1.0, 1),
           ("pred_volume_ml", "Pred. (ml)", 1.0, 1))


class EvaluateWidget(QWidget):
    """Per-class Dice (%), HD95 and ASD (mm, from the reference layer's voxel spacing) in a table,
    with a mean row, exportable as CSV. n/a: the class is in neither layer, or distances to an
    empty mask. Runs in a worker: surface distances of large organs take seconds.
    """

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self.prediction = LayerPicker(viewer, Labels)
        self.reference = LayerPicker(viewer, Labels, apart_from=self.prediction)
        form = QFormLayout()
        form.addRow("Prediction", self.prediction)
        form.addRow("Reference", self.reference)
        self.run_button = button("Evaluate", self.run)
        self.export_button = button("Export CSV…", self._export_dialog)
        self.export_button.setEnabled(False)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([header for _, header, _, _ in COLUMNS])
        self.table.verticalHeader().setVisible(False)
        self.runner = TaskRunner()
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(row(self.run_button, self.export_button))
        layout.addWidget(self.runner)
        layout.addWidget(self.table, 1)
        self.rows: list[dict] = []

    def run(self) -> bool:
        """Start scoring; False (with a message, table unchanged) if the choices are unusable."""
        pred_layer, ref_layer = self.prediction.layer(), self.reference.layer()
        problem = None
        if pred_layer is None or ref_layer is None:
            problem = "Choose a prediction and a reference Labels layer (open or segment them first)."
        elif pred_layer.name == ref_layer.name:
            problem = "Prediction and reference are the same layer: choose two different Labels layers."
        elif pred_layer.data.shape != ref_layer.data.shape:
            problem = (f"{pred_layer.name!r} has shape {pred_layer.data.shape} but {ref_layer.name!r} has "
                       f"{ref_layer.data.shape}: both must lie on the same grid (same scan).")
        else:
            problem = misplaced(pred_layer, ref_layer, "evaluate")
        if problem:
            notify(problem, "warning", self.runner.status)
            return False
        spacing_mm = geometry_from_layer(ref_layer).spacing_mm
        if not np.allclose(spacing_mm, geometry_from_layer(pred_layer).spacing_mm, rtol=1e-3):
            notify(f"The layers' voxel spacings differ; using the reference's {spacing_mm} mm.", "warning")
        names = {**class_names_of(ref_layer), **class_names_of(pred_layer)}
        # copies: the user may paint on either layer while the worker scores them
        pred, ref = np.array(pred_layer.data), np.array(ref_layer.data)

        def task(progress, cancel):
            present = set(np.unique(pred).tolist()) | set(np.unique(ref).tolist())
            values = sorted((present | set(names)) - {0})
            if not values:
                raise ConsistentSegError("Both layers are empty (only background): nothing to score.")
            classes = {int(v): names.get(int(v), f"label {int(v)}") for v in values}
            return evaluate_labels(pred, ref, classes, spacing_mm)

        started = self.runner.start(task, description=f"Scoring {pred_layer.name} against {ref_layer.name}",
                                    on_returned=self.show_rows,
                                    on_finished=lambda: self.run_button.setEnabled(True))
        self.run_button.setEnabled(not started)
        return started

    def show_rows(self, rows: list[dict]) -> None:
        """Fill the table with ``evaluate_labels`` rows and their mean row."""
        self.rows = [*rows, summarise({"case": rows})["mean"]]
        self.table.setRowCount(len(self.rows))
        for r, values in enumerate(self.rows):
            for c, (key, _, factor, decimals) in enumerate(COLUMNS):
                self.table.setItem(r, c, QTableWidgetItem(_cell(values.get(key), factor, decimals)))
        self.table.resizeColumnsToContents()
        self.export_button.setEnabled(True)

    def export_csv(self, path) -> str:
        """Write the table's rows (Dice as a fraction, distances in mm, volumes in ml) to ``path``."""
        if not self.rows:
            raise ConsistentSegError("Nothing to export yet: press Evaluate first.")
        return str(write_csv(self.rows, path))

    def _export_dialog(self) -> None:
        export_csv_dialog(self, "Export metrics", "metrics.csv", self.export_csv)


def _cell(value, factor, decimals) -> str:
    if value is None:
        return ""
    if factor is None or isinstance(value, str):
        return str(value)
    return "n/a" if math.isnan(value) else f"{factor * value:.{decimals}f}"
