"""Fine-tune (ICL) widget: adapt a model to one scan from a few painted slices, then accept the
result as a new Labels layer, revert to the starting model, or save the adapted model."""

from __future__ import annotations

import copy
import time

import napari
import numpy as np
import torch._dynamo  # noqa: F401  (see below)
from napari.layers import Labels
from qtpy.QtWidgets import QFormLayout, QLabel, QLineEdit, QWidget

from ..errors import ConsistentSegError
from ..inference import predict_volume
from ..models.store import load_model, save_user_model
from ..training.finetune import ICLFinetuner
from ._widget_common import (
    LayerPicker,
    ModelInputs,
    add_labels_layer,
    button,
    current_slice,
    grid_kwargs,
    notify,
    row,
    spin_box,
    stack,
    unique_layer_name,
)
from ._workers import TaskRunner
from .layers import METADATA_KEY

# torch.optim imports torch._dynamo (and sympy) on first use: seconds of module compiling that,
# in the worker, would hold the GIL and stall the GUI. Imported above, while the widget opens.


class FinetuneWidget(QWidget):
    """Painted slices (any non-zero voxel marks a slice as labeled, and fully labeled) train a copy
    of the chosen model with ICL in a worker; the preview layer shows the current slice now and then.

    Accept: the whole scan with the fine-tuned model, painted voxels winning, as a new layer
    ``"<image> fine-tuned"``. Revert: forget the fine-tuned weights. Save as: a user model.
    Fine-tuning again with the same model continues from the fine-tuned weights.
    """

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self.inputs = ModelInputs(viewer)
        self.painted = LayerPicker(viewer, Labels)
        self.painted.setToolTip("Labels layer holding only the slices you painted or corrected")
        self.copy_from = LayerPicker(viewer, Labels, apart_from=self.painted)
        copy_button = button("Copy this slice", self.copy_current_slice, "Copy the current slice of this layer "
                             "(e.g. a segmentation) into the painted layer, to correct it with the brush")
        self.steps = spin_box(1, 100_000, 100, tooltip="Training steps (at most)")
        self.seconds = spin_box(0, 24 * 3600, 300, "no limit", "Time budget in seconds (0: no limit)")
        self.preview_every = spin_box(0, 10_000, 10, "off", "Preview the current slice every N steps")
        form = QFormLayout()
        for label, field in (("Painted labels", self.painted), ("Copy from", row(self.copy_from, copy_button)),
                             ("Steps", self.steps), ("Time budget (s)", self.seconds),
                             ("Preview every", self.preview_every)):
            form.addRow(label, field)
        self.train_button = button("Fine-tune", self.run)
        self.runner = TaskRunner()
        self.accept_button = button("Accept", self.accept, "Segment the whole scan with the fine-tuned model "
                                                           "into a new layer; painted voxels keep their label")
        self.revert_button = button("Revert", self.revert, "Drop the fine-tuned weights: back to the starting model")
        self.save_name = QLineEdit()
        self.save_name.setPlaceholderText("name of the new model")
        self.save_button = button("Save as", lambda: self.save_as(self.save_name.text().strip()),
                                  "Save the fine-tuned model as a user model, listed in every widget")
        self.loss = QLabel("")
        stack(self, self.inputs, form, self.train_button, self.runner, self.loss,
              row(self.accept_button, self.revert_button), row(self.save_name, self.save_button))
        self.tuner = None  # the ICLFinetuner of the last run; None = no fine-tuned weights
        self.steps_done = 0
        self.losses: list[float] = []
        self.preview_layer = None
        self.result_layer = None
        self._session: dict = {}
        self._preview_z = [0]  # read by the worker: the slice shown when the last step ended
        self._update_buttons()

    def run(self) -> bool:
        """Start (or continue) fine-tuning; False (with a message, nothing changed) if unusable."""
        try:
            layer, volume, modality, model_choice, device = self.inputs.read()
            painted_layer = self.painted.layer()
            if painted_layer is None:
                raise ConsistentSegError("No painted Labels layer: paint a few slices (or use Copy this slice).")
            if _model_output(painted_layer):
                raise ConsistentSegError(
                    f"{painted_layer.name!r} is a model's output, labeled on every slice: choose it under Copy "
                    "from, press Copy this slice for a painted layer, correct that slice, then Fine-tune.")
            if painted_layer.data.shape != volume.data.shape:
                raise ConsistentSegError(f"{painted_layer.name!r} has shape {painted_layer.data.shape}, the "
                                         f"image {volume.data.shape}: paint on a layer of the image's grid.")
        except ConsistentSegError as error:
            notify(str(error), "warning", self.runner.status)
            return False
        painted = np.array(painted_layer.data)  # a copy: the user may keep painting while it trains
        continuing = self.tuner is not None and self._session.get("model_choice") == model_choice
        start_model = self.tuner.model if continuing else None
        steps, budget_s, every = self.steps.value(), self.seconds.value(), self.preview_every.value()
        self._preview_z[0] = current_slice(self.viewer, layer)
        session = {"model_choice": model_choice, "volume": volume, "modality": modality, "device": device,
                   "grid": grid_kwargs(layer), "image_name": layer.name}

        def task(progress, cancel):
            model = start_model or load_model(model_choice, device="cpu")
            tuner = ICLFinetuner(model, volume.data, painted, spacing_mm=volume.spacing_mm,
                                 modality=modality, device=device)
            yield "ready", tuner
            started = time.monotonic()
            for step in range(1, steps + 1):
                if cancel.is_set():
                    break
                stats = tuner.step()
                elapsed = time.monotonic() - started
                preview = None
                if every and (step % every == 0 or step == steps):
                    z = self._preview_z[0]
                    preview = z, predict_volume(tuner.model, volume.data, spacing_mm=volume.spacing_mm,
                                                modality=modality, device=device, slices=[z]).labels[0]
                yield "step", (step, steps, float(stats["loss"]), elapsed, budget_s, preview)
                if budget_s and elapsed >= budget_s:
                    break

        if not self.runner.start(task, description=("Continuing to fine-tune" if continuing else "Fine-tuning")
                                 + f" on {layer.name}", on_yielded=self._on_yielded,
                                 on_finished=self._on_finished):
            return False
        if not continuing:
            self.tuner, self.steps_done, self.losses = None, 0, []
        self._session = session
        self._update_buttons()
        return True

    def _on_yielded(self, item) -> None:
        kind, value = item
        if kind == "ready":
            self.tuner = value
            for warning in value.warnings:
                notify(warning, "warning")
            return
        step, steps, loss, elapsed, budget_s, preview = value
        self.steps_done += 1
        self.losses.append(loss)
        fraction = max(step / steps, elapsed / budget_s if budget_s else 0.0)
        self.runner.show_progress(int(1000 * min(fraction, 1.0)), 1000)
        self.loss.setText(f"step {step}/{steps} · loss {loss:.4f} · {elapsed:.0f} s")
        image = self.inputs.image.layer()
        if image is not None and image.name == self._session["image_name"]:
            self._preview_z[0] = current_slice(self.viewer, image)
        if preview is not None:
            self._show_preview(*preview)

    def _show_preview(self, z: int, labels: np.ndarray) -> None:
        if self.preview_layer is None or self.preview_layer.name not in {l.name for l in self.viewer.layers}:
            model = self.tuner.model
            empty = np.zeros(self._session["volume"].data.shape, np.uint8)
            self.preview_layer = add_labels_layer(
                self.viewer, empty, self._session["grid"], model.classes, model.colours,
                f"{self._session['image_name']} fine-tune preview", opacity=0.5)
        self.preview_layer.data[z] = labels
        self.preview_layer.refresh()

    def _on_finished(self) -> None:
        if self.tuner is not None and self.steps_done:
            self.runner.status.setText(f"{self.runner.status.text()} {self.steps_done} steps so far: Accept, "
                                       "Revert, Save as, or Fine-tune again to continue.")
        self._update_buttons()

    def accept(self) -> bool:
        """Segment the scan with the fine-tuned model; painted voxels win. Result: a new layer."""
        painted_layer = self.painted.layer()
        if self.tuner is None or self.runner.running:
            notify("Nothing to accept: fine-tune first (and wait for it to end).", "warning", self.runner.status)
            return False
        s = self._session
        if painted_layer is None or painted_layer.data.shape != s["volume"].data.shape:
            notify("Choose the painted layer of the fine-tuned image to merge.", "warning", self.runner.status)
            return False
        painted, model = np.array(painted_layer.data), self.tuner.model

        def task(progress, cancel):
            prediction = predict_volume(model, s["volume"].data, spacing_mm=s["volume"].spacing_mm,
                                        modality=s["modality"], device=s["device"], progress=progress, cancel=cancel)
            return np.where(painted > 0, painted, prediction.labels).astype(prediction.labels.dtype)

        def add(merged):
            self.result_layer = add_labels_layer(self.viewer, merged, s["grid"], model.classes, model.colours,
                                                 f"{s['image_name']} fine-tuned",
                                                 {"model": f"{model.name} fine-tuned ({self.steps_done} steps)"})
            self.runner.status.setText(f"Added {self.result_layer.name!r}; {painted_layer.name!r} is unchanged.")

        started = self.runner.start(task, description="Segmenting with the fine-tuned model", on_returned=add,
                                    on_finished=self._update_buttons)
        self._update_buttons()
        return started

    def revert(self) -> None:
        """Drop the fine-tuned weights; the next run starts from the chosen model again."""
        if self.runner.running:
            notify("Cancel the running task first.", "warning", self.runner.status)
            return
        self.tuner, self.steps_done, self.losses = None, 0, []
        self.loss.setText("")
        self.runner.status.setText("Reverted: the fine-tuned weights are gone; layers are unchanged.")
        self._update_buttons()

    def save_as(self, name: str) -> bool:
        """Save the fine-tuned model as user model ``name``; it then appears in every model list."""
        if self.tuner is None or self.runner.running:
            notify("Nothing to save: fine-tune first (and wait for it to end).", "warning", self.runner.status)
            return False
        try:
            folder = save_user_model(name, self.tuner.finished_model())
        except ConsistentSegError as error:
            notify(str(error), "error", self.runner.status)
            return False
        self.inputs.model.refresh()
        notify(f"Saved model {name!r} in {folder}.", "info", self.runner.status)
        return True

    def copy_current_slice(self) -> bool:
        """Copy the current slice of the "Copy from" layer into the painted layer (a new one if needed)."""
        source, image = self.copy_from.layer(), self.inputs.image.layer()
        if source is None or image is None or source.data.shape != image.data.shape:
            notify("Choose an image and a Labels layer of the same shape to copy from.", "warning",
                   self.runner.status)
            return False
        target = self.painted.layer()
        if target is None or target.name == source.name or _model_output(target) or target.data.shape != source.data.shape:
            metadata = copy.deepcopy(source.metadata)
            metadata.get(METADATA_KEY, {}).pop("model", None)  # the user's painting, not a model's output
            target = self.viewer.add_labels(
                np.zeros_like(np.asarray(source.data)), name=unique_layer_name(self.viewer, f"{image.name} painted"),
                scale=source.scale, translate=source.translate, metadata=metadata, colormap=source.colormap,
                features=source.features)
            self.painted.set_layer(target)
            self.copy_from.set_layer(source)
        z = current_slice(self.viewer, image)
        target.data[z] = np.asarray(source.data[z])
        target.refresh()
        self.runner.status.setText(f"Copied slice {z} of {source.name!r} into {target.name!r}: correct it, "
                                   "then Fine-tune.")
        return True

    def _update_buttons(self) -> None:
        idle, tuned = not self.runner.running, self.tuner is not None and self.steps_done > 0
        self.train_button.setEnabled(idle)
        for push in (self.accept_button, self.revert_button, self.save_button):
            push.setEnabled(idle and tuned)
        self.train_button.setText("Fine-tune again (continue)" if idle and tuned else "Fine-tune")


def _model_output(layer) -> bool:
    """Whether a Labels layer holds a model's segmentation (every slice labeled), not a painting."""
    return "model" in (layer.metadata or {}).get(METADATA_KEY, {})
