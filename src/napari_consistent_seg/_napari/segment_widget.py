"""Segment widget: an image layer + a model -> a Labels layer on the image's grid, named by class.

A cine layer (phase, slice, row, column) gets a 4D Labels layer: the shown phase or every phase."""

from __future__ import annotations

from qtpy.QtWidgets import QCheckBox

from ..inference import segment
from ..metrics import class_sizes
from ..models.store import load_model
from ._model_widget import ModelTaskWidget
from ._widget_common import (
    add_labels_layer,
    current_phase,
    grid_kwargs,
    intensity_colormap,
    notify,
    unique_layer_name,
)


class SegmentWidget(ModelTaskWidget):
    """Choose an image, a model and a device; Segment runs in a worker, Cancel stops it.

    The result is a new Labels layer ``"<image> <model>"`` with the model's class names and
    colours; optionally one probability Image layer per class. No existing layer is changed.
    """

    action = "Segment"

    def options(self) -> list:
        self.keep_largest = QCheckBox("Clean up (the model's post-processing)")
        self.keep_largest.setChecked(True)
        self.keep_largest.setToolTip("Remove the islands a slice-wise model leaves elsewhere in the volume: "
                                     "each class keeps its largest connected component; cardiac models keep "
                                     "one heart with a closed myocardium (docs/cardiac.md)")
        self.probabilities = QCheckBox("Add per-class probability layers")
        self.all_phases = QCheckBox("Cine: segment every phase (else the phase shown)")
        self.all_phases.setChecked(True)
        return [self.keep_largest, self.probabilities, self.all_phases]

    def make_task(self, layer, volume, modality, model_choice, device):
        with_probabilities, keep_largest = self.probabilities.isChecked(), self.keep_largest.isChecked()
        shown = current_phase(self.viewer, layer)
        phases = None if shown is None or self.all_phases.isChecked() else [shown]
        context = {"image_name": layer.name, "grid": grid_kwargs(layer, volume.data.ndim), "phases": phases}
        volume.modality = modality

        def task(progress, cancel):
            model = load_model(model_choice, device="cpu")
            labels = segment(model, volume, phases=phases, device=device, keep_largest=keep_largest,
                             return_probabilities=with_probabilities, progress=progress, cancel=cancel)
            # what it found, as sizes a user can judge (0.6 ml of liver is not a liver): the phase shown or the first
            phase = None if labels.n_phases is None else (phases or [0])[0]
            sizes = class_sizes(labels.data if phase is None else labels.data[phase], model.classes, labels.geometry)
            return model, labels, sizes, phase

        what = "" if volume.n_phases is None else (
            f" (phase {shown})" if phases else f" ({volume.n_phases} phases)")
        return f"Segmenting {layer.name}{what}", task, lambda result: self._add_result(context, *result)

    def _add_result(self, context: dict, model, labels_volume, sizes: dict, phase: int | None) -> None:
        for warning in labels_volume.meta["warnings"]:
            notify(warning, "warning")
        suffix = "" if context["phases"] is None else f" phase {context['phases'][0]}"
        labels = add_labels_layer(
            self.viewer, labels_volume.data, context["grid"], model.classes, model.colours,
            f"{context['image_name']} {model.name}{suffix}", extra_metadata={"model": model.name},
        )
        self.last_layers = [labels]
        probabilities = labels_volume.meta.get("probabilities")
        if probabilities is not None:
            for value, name in model.classes.items():
                if value == 0:
                    continue
                self.last_layers.append(self.viewer.add_image(
                    probabilities[value],
                    name=unique_layer_name(self.viewer, f"{context['image_name']} p({name})"),
                    colormap=intensity_colormap(model.colours.get(value, "#ffffff"), f"p {name}"),
                    contrast_limits=(0.0, 1.0), blending="additive", visible=False, **context["grid"],
                ))
        found = ", ".join(f"{name} {size}" for name, size in sizes.items())
        where = "" if phase is None else f" (phase {phase})"
        warned = "".join(f" Warning: {w}." for w in labels_volume.meta["warnings"])  # notifications fade; this stays
        self.runner.status.setText(f"Added {labels.name!r}: {found}{where}.{warned}")
