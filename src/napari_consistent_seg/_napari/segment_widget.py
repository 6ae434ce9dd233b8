"""Segment widget: an image layer + a model -> a Labels layer on the image's grid, named by class."""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QCheckBox

from ..inference import predict_volume
from ..models.store import load_model
from ._model_widget import ModelTaskWidget
from ._widget_common import add_labels_layer, grid_kwargs, intensity_colormap, notify, unique_layer_name


class SegmentWidget(ModelTaskWidget):
    """Choose an image, a model and a device; Segment runs in a worker, Cancel stops it.

    The result is a new Labels layer ``"<image> <model>"`` with the model's class names and
    colours; optionally one probability Image layer per class. No existing layer is changed.
    """

    action = "Segment"

    def options(self) -> list:
        self.keep_largest = QCheckBox("Keep each class's largest piece")
        self.keep_largest.setChecked(True)
        self.keep_largest.setToolTip("Remove the islands a slice-wise model leaves elsewhere in the volume: "
                                     "each class keeps its largest connected component")
        self.probabilities = QCheckBox("Add per-class probability layers")
        return [self.keep_largest, self.probabilities]

    def make_task(self, layer, volume, modality, model_choice, device):
        with_probabilities, keep_largest = self.probabilities.isChecked(), self.keep_largest.isChecked()
        context = {"image_name": layer.name, "grid": grid_kwargs(layer)}

        def task(progress, cancel):
            model = load_model(model_choice, device="cpu")
            prediction = predict_volume(
                model, volume.data, spacing_mm=volume.spacing_mm, modality=modality, device=device,
                return_probabilities=with_probabilities, keep_largest=keep_largest, progress=progress,
                cancel=cancel,
            )
            present = np.bincount(prediction.labels.ravel(), minlength=len(model.classes)) > 0
            return model, prediction, present

        return f"Segmenting {layer.name}", task, lambda result: self._add_result(context, *result)

    def _add_result(self, context: dict, model, prediction, present) -> None:
        for warning in prediction.warnings:
            notify(warning, "warning")
        labels = add_labels_layer(
            self.viewer, prediction.labels, context["grid"], model.classes, model.colours,
            f"{context['image_name']} {model.name}", extra_metadata={"model": model.name},
        )
        self.last_layers = [labels]
        if prediction.probabilities is not None:
            for value, name in model.classes.items():
                if value == 0:
                    continue
                self.last_layers.append(self.viewer.add_image(
                    prediction.probabilities[value],
                    name=unique_layer_name(self.viewer, f"{context['image_name']} p({name})"),
                    colormap=intensity_colormap(model.colours.get(value, "#ffffff"), f"p {name}"),
                    contrast_limits=(0.0, 1.0), blending="additive", visible=False, **context["grid"],
                ))
        found = ", ".join(name for value, name in model.classes.items() if value and present[value]) or "nothing"
        self.runner.status.setText(f"Added {labels.name!r}: found {found}.")
