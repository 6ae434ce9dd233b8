"""Fine-tune widget: correct the segmentation in place with brush and eraser, fine-tune the model
on those strokes, preview, Accept into the same layer (your strokes always win), repeat; Revert
or save the adapted model."""

from __future__ import annotations

import napari
import numpy as np
import torch._dynamo  # noqa: F401  (see below)
from napari.layers import Labels
from qtpy.QtWidgets import QFormLayout, QLabel, QLineEdit, QWidget

from ..errors import ConsistentSegError
from ..inference import segment, segment_slice
from ..models.card import FINETUNE_METHODS
from ..models.store import load_model, read_card, save_user_model
from ..training.finetune import (DEFAULTS, Finetuner, merge_corrections, model_slices, most_changed_slices, recipe,
                                 slices_text, whole_slice_known)
from ._widget_common import (
    LayerPicker,
    ModelInputs,
    add_labels_layer,
    button,
    combo,
    current_phase,
    current_slice,
    grid_kwargs,
    notify,
    row,
    spin_box,
    stack,
)
from ._workers import TaskRunner
from .layers import METADATA_KEY, misplaced

# torch.optim imports torch._dynamo (and sympy) on first use: seconds of module compiling that,
# in the worker, would hold the GIL and stall the GUI. Imported above, while the widget opens.


class EditRecorder:
    """Which voxels of a Labels layer the user touched, from napari's paint events.

    Brush, eraser, fill and polygon emit ``events.paint`` with their history atoms: a bounding box
    and the voxels whose value changed. A brush or eraser dab counts its whole disk (the ellipse in
    its box), right voxels under the brush included, so that a stroke along a boundary teaches
    both sides of it; fill and polygon count the voxels they changed. A dab that changes nothing
    emits no event and counts nothing. Undo and redo emit no paint event; napari keeps the live
    edits in the layer's undo history, so an edit counts only while it is there (private, but the
    only record of an undo; without it every recorded edit counts). ``base`` holds voxels known by
    another rule (whole painted slices) once a fine-tune has used it.
    """

    def __init__(self, layer: Labels):
        self.layer = layer
        self.atoms: list = []
        self.base: np.ndarray | None = None
        # edits made before the widget opened are in the layer's undo history: count them as dabs
        for item in getattr(layer, "_undo_history", []):
            self.atoms.extend((atom, True) for atom in item)
        layer.events.paint.connect(self._on_paint)

    def _on_paint(self, event) -> None:
        whole_dab = self.layer.mode not in ("fill", "polygon")
        self.atoms.extend((atom, whole_dab) for atom in event.value)

    def disconnect(self) -> None:
        self.layer.events.paint.disconnect(self._on_paint)

    def _live_atoms(self) -> list:
        history = getattr(self.layer, "_undo_history", None)
        if history is None:
            return self.atoms
        live = {id(atom) for item in history for atom in item}
        return [entry for entry in self.atoms if id(entry[0]) in live]

    def known(self) -> np.ndarray | None:
        """(Z, Y, X) bool: the voxels edited (and not undone), with ``base``; None if none."""
        shape = self.layer.data.shape
        known = np.zeros(shape, bool) if self.base is None or self.base.shape != shape else self.base.copy()
        for atom, whole_dab in self._live_atoms():
            if not hasattr(atom, "slice_key"):  # data_setitem: (indices, old values, new values)
                known[atom[0]] = True
            elif atom.mask is None:
                known[atom.slice_key] = True
            else:
                known[atom.slice_key] |= atom.mask | (_ellipse_in(atom.mask.shape) if whole_dab else False)
        return known if known.any() else None


def _ellipse_in(shape) -> np.ndarray:
    """The ellipse (disk) inscribed in a box, over its axes longer than one: a brush dab's footprint."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    radius = sum(((g + 0.5 - n / 2) / (n / 2)) ** 2 for g, n in zip(grids, shape) if n > 1)
    return np.broadcast_to(np.asarray(radius) <= 1.0, shape)


class FinetuneWidget(QWidget):
    """Train a copy of the chosen model, in a worker, on the voxels you corrected in a Labels layer.

    Corrections: brush and eraser strokes in the layer (a model's segmentation, corrected in
    place); only the voxels your strokes changed count as labeled, the rest is unlabeled. A layer
    without recorded strokes (painted elsewhere, or loaded) counts whole slices: every slice with
    a label is labeled in full. Accept: the whole scan with the fine-tuned model, written into the
    same layer, your corrections winning. Fine-tuning again continues from the fine-tuned weights.
    Revert: drop the last round (its weights, and the layer as it was before its Accept, your
    corrections kept); again, the round before, back to the starting model.
    """

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self.inputs = ModelInputs(viewer)
        self.painted = LayerPicker(viewer, Labels)
        self.painted.setToolTip("The segmentation you corrected with brush and eraser (or a layer of painted slices)")
        self.method = combo(FINETUNE_METHODS, "supervised: your corrections, anchored to the starting "
                            "model elsewhere (the default: in benchmarks/finetune.py, more than a point worse in "
                            "one round of 93 with dabs on three seeds, none of 124 with exact corrections); icl: "
                            "adds ICL's unlabeled terms (better on average, 40 steps take about the default's "
                            "time, but with brush dabs it can lose several points)")
        self.method.setCurrentText(DEFAULTS["method"])
        self.steps = spin_box(1, 100_000, DEFAULTS["steps"], tooltip="Training steps (at most)")
        self.seconds = spin_box(0, 24 * 3600, 0, "no limit", "Time budget in seconds (0: no limit)")
        self.preview_every = spin_box(0, 10_000, 20, "off", "Preview the current slice every N steps")
        form = QFormLayout()
        for label, field in (("Corrected labels", self.painted), ("Method", self.method), ("Steps", self.steps),
                             ("Time budget (s)", self.seconds), ("Preview every", self.preview_every)):
            form.addRow(label, field)
        self.train_button = button("Fine-tune", self.run)
        self.runner = TaskRunner()
        self.accept_button = button("Accept", self.accept, "Segment the whole scan with the fine-tuned model into "
                                                           "the corrected layer; your corrections keep their label")
        self.revert_button = button("Revert", self.revert, "Drop the last round: its weights and its Accept "
                                                           "(your corrections stay); again for the round before")
        self.save_name = QLineEdit()
        self.save_name.setPlaceholderText("name of the new model")
        self.save_button = button("Save as", lambda: self.save_as(self.save_name.text().strip()),
                                  "Save the fine-tuned model as a user model, listed in every widget")
        self.loss = QLabel("")
        stack(self, self.inputs, form, self.train_button, self.runner, self.loss,
              row(self.accept_button, self.revert_button), row(self.save_name, self.save_button))
        self.tuner = None  # the Finetuner of the last finished round; None = no fine-tuned weights
        self.steps_done = 0
        self.losses: list[float] = []
        self.preview_layer = None
        self.result_layer = None
        # each finished round: what Revert brings back (the weights, counters and session before it, and
        # the corrected layer before its first Accept)
        self._history: list[dict] = []
        self._session: dict = {}
        self._round: dict = {}
        self._preview_at = [(None, 0)]  # read by the worker: (phase or None, slice) shown when the last step ended
        self.recorders: dict[int, EditRecorder] = {}
        for layer in viewer.layers:
            self._record(layer)
        viewer.layers.events.inserted.connect(lambda event: self._record(event.value))
        viewer.layers.events.removed.connect(self._forget)
        self._recipe_of: str | None = None  # the model whose recipe Method and Steps were set from
        self.inputs.model.combo.currentIndexChanged.connect(self._follow_recipe)
        self._follow_recipe()
        self._update_buttons()

    def _follow_recipe(self, *_) -> None:
        """Method and Steps start at the chosen model's recipe (its card's `finetune` over DEFAULTS)
        when another model is chosen; the list refilling itself (as it does when it opens or the
        widget shows) leaves what the user set."""
        choice = self.inputs.model.choice()
        if choice is None or choice == self._recipe_of:
            return
        self._recipe_of = choice
        try:
            chosen = recipe(read_card(choice))
        except ConsistentSegError:  # an unreadable card: Fine-tune will say why
            chosen = DEFAULTS
        self.method.setCurrentText(chosen["method"])
        self.steps.setValue(int(chosen["steps"]))

    def _record(self, layer) -> None:
        if isinstance(layer, Labels) and id(layer) not in self.recorders:
            self.recorders[id(layer)] = EditRecorder(layer)

    def _forget(self, event) -> None:
        recorder = self.recorders.pop(id(event.value), None)
        if recorder is not None:
            recorder.disconnect()

    def known_of(self, layer: Labels) -> np.ndarray | None:
        """The voxels of ``layer`` that count as labeled: recorded edits, else whole painted slices."""
        self._record(layer)
        return self.recorders[id(layer)].known()

    def run(self) -> bool:
        """Start (or continue) fine-tuning; False (with a message, nothing changed) if unusable."""
        try:
            layer, volume, modality, model_choice, device = self.inputs.read()
            painted_layer = self.painted.layer()
            if painted_layer is None:
                raise ConsistentSegError("No Labels layer to learn from: segment the scan, then correct it "
                                         "with the brush and eraser (or paint a few slices in a new layer).")
            if painted_layer.data.shape != volume.data.shape:
                raise ConsistentSegError(f"{painted_layer.name!r} has shape {painted_layer.data.shape}, the "
                                         f"image {volume.data.shape}: correct a layer of the image's grid.")
            problem = misplaced(painted_layer, layer, "finetune")
            if problem:
                raise ConsistentSegError(problem)
            known = self.known_of(painted_layer)
            labels = np.array(painted_layer.data)  # a copy: the user may keep painting while it trains
            whole_slices = known is None
            if whole_slices:
                if _model_output(painted_layer):
                    raise ConsistentSegError(
                        f"No corrections in {painted_layer.name!r} yet: fix it with the brush (and the eraser "
                        "where the model is wrong), then Fine-tune.")
                known = whole_slice_known(labels)
                if not known.any():
                    raise ConsistentSegError(f"{painted_layer.name!r} is empty: paint a few slices, or correct "
                                             "a segmentation with the brush and eraser.")
        except ConsistentSegError as error:
            notify(str(error), "warning", self.runner.status)
            return False
        continuing = self.tuner is not None and self._session.get("model_choice") == model_choice
        start_model = self.tuner.model if continuing else None
        # the segmentation before any fine-tuning of this scan (else the one of the model this round starts from)
        same_scan = continuing and self._session.get("image_name") == layer.name
        start_labels = self._session["corrections"][2] if same_scan else None
        if start_labels is not None and start_labels.shape != volume.shape:
            start_labels = None
        steps, budget_s, every = self.steps.value(), self.seconds.value(), self.preview_every.value()
        method = self.method.currentText()
        self._preview_at[0] = (current_phase(self.viewer, layer), current_slice(self.viewer, layer))
        session = {"model_choice": model_choice, "volume": volume, "modality": modality, "device": device,
                   "grid": grid_kwargs(layer, volume.data.ndim), "image_name": layer.name, "layer": painted_layer}

        def task(progress, cancel):
            model = start_model or load_model(model_choice, device="cpu")
            # the round's model's segmentation, cleaned up: the anchor holds what its clean-up added to
            # the network's call (a refilled slice). The starting model's (this scan's first round's):
            # classes the user labeled on no known voxel keep it
            own = segment(model, volume, device=device).data
            start = own if start_labels is None else start_labels
            fixes = (labels, known, start)
            # the model learns from slices in its own plane (the scan's own for a cardiac model)
            (image, painted, known_slices, held), spacing = model_slices(model, volume, volume.data, labels, known,
                                                                        own)
            tuner = Finetuner(model, image, painted, known_slices, spacing_mm=spacing, modality=modality,
                              device=device, method=method, steps=steps, start=held)
            yield "ready", (tuner, fixes)
            for step in range(1, steps + 1):
                if cancel.is_set():
                    break
                stats = tuner.step()
                preview = None
                if every and (step % every == 0 or step == steps):
                    t, z = self._preview_at[0]
                    preview = (t, z), segment_slice(tuner.model, volume, z, phase=t, device=device,
                                                    corrections=fixes)
                yield "step", (step, steps, float(stats["loss"]), tuner.elapsed_s, budget_s, preview)
                if budget_s and tuner.elapsed_s >= budget_s:
                    break

        # what a cancelled round must leave as it was
        self._round = {"before": self._state(), "preview_layer": self.preview_layer,
                       "preview_data": None if self.preview_layer is None else np.array(self.preview_layer.data),
                       "whole_slices": known if whole_slices else None, "recorder": self.recorders[id(painted_layer)]}
        if not self.runner.start(task, description=("Continuing to fine-tune" if continuing else "Fine-tuning")
                                 + f" on {layer.name}", on_yielded=self._on_yielded,
                                 on_finished=self._on_finished):
            return False
        if not continuing:
            self.steps_done, self.losses = 0, []
        self._session = session
        self._update_buttons()
        return True

    def _on_yielded(self, item) -> None:
        kind, value = item
        if kind == "ready":
            tuner, fixes = value
            self._round["new_tuner"] = tuner
            self._session["corrections"] = fixes  # (labels, known, the starting segmentation)
            for warning in tuner.warnings:
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
            self._preview_at[0] = (current_phase(self.viewer, image), current_slice(self.viewer, image))
        if preview is not None:
            self._show_preview(*preview)

    def _show_preview(self, at: tuple[int | None, int], labels: np.ndarray) -> None:
        if self.preview_layer is None or self.preview_layer not in self.viewer.layers:
            model = self._round["new_tuner"].model
            empty = np.zeros(self._session["volume"].data.shape, np.uint8)
            self.preview_layer = add_labels_layer(
                self.viewer, empty, self._session["grid"], model.classes, model.colours,
                f"{self._session['image_name']} fine-tune preview", opacity=0.5)
        t, z = at
        self.preview_layer.data[z if t is None else (t, z)] = labels
        self.preview_layer.refresh()

    def _on_finished(self) -> None:
        r = self._round
        if self.runner.cancel_requested or self.runner.last_error is not None or not r.get("new_tuner"):
            self._restore_round()
        else:
            self._history.append(r["before"])
            self.tuner = r["new_tuner"]
            if r["whole_slices"] is not None:  # from now on, Accept fills this layer: keep what was painted
                r["recorder"].base = r["whole_slices"]
            if self.steps_done:
                self.runner.status.setText(f"{self.runner.status.text()} {self.steps_done} steps so far, "
                                           f"{self.tuner.share_text}: Accept, Revert, Save as, or Fine-tune "
                                           "again to continue.")
        self._round = {}
        self._update_buttons()

    def _state(self) -> dict:
        """The weights, counters and session a round starts from: what a cancelled round restores,
        and what Revert brings back after it (with the layer before its Accept, added then)."""
        return {"tuner": self.tuner, "steps_done": self.steps_done, "losses": list(self.losses),
                "session": self._session}

    def _set_state(self, state: dict) -> None:
        self.tuner, self.steps_done, self.losses = state["tuner"], state["steps_done"], list(state["losses"])
        self._session = state["session"]

    def _restore_round(self) -> None:
        """A cancelled or failed round: the weights, counters and preview as before it started."""
        r = self._round
        self._set_state(r["before"])
        if self.preview_layer is not None and self.preview_layer is not r["preview_layer"]:
            if self.preview_layer in self.viewer.layers:
                self.viewer.layers.remove(self.preview_layer)
            self.preview_layer = r["preview_layer"]
        if self.preview_layer is not None and r["preview_data"] is not None:
            self.preview_layer.data[...] = r["preview_data"]
            self.preview_layer.refresh()
        self.loss.setText("")
        if self.runner.cancel_requested:
            self.runner.status.setText("Cancelled: the model and every layer are as they were.")

    def accept(self) -> bool:
        """Segment the scan with the fine-tuned model into the corrected layer; corrections win."""
        if self.tuner is None or self.runner.running:
            notify("Nothing to accept: fine-tune first (and wait for it to end).", "warning", self.runner.status)
            return False
        s = self._session
        layer = s["layer"]
        if layer not in self.viewer.layers or layer.data.shape != s["volume"].data.shape:
            notify(f"The corrected layer {layer.name!r} is gone or changed shape: fine-tune again.", "warning",
                   self.runner.status)
            return False
        model = self.tuner.model

        def task(progress, cancel):
            return segment(model, s["volume"], device=s["device"], corrections=s["corrections"], progress=progress,
                           cancel=cancel).data

        def write(prediction):
            known = self.known_of(layer)  # read now: corrections made while it ran win too
            current = np.asarray(layer.data)
            merged = prediction if known is None else merge_corrections(prediction, current, known)
            last = self._history[-1]  # the round whose weights these are
            if last.get("before_accept") is None:
                last.update(before_accept=current.copy(), layer=layer)
            layer.data[...] = merged.astype(current.dtype)
            layer.refresh()
            layer.metadata.setdefault(METADATA_KEY, {})["fine_tuned"] = f"{model.name} ({self.steps_done} steps)"
            if self.preview_layer is not None and self.preview_layer in self.viewer.layers:
                self.viewer.layers.remove(self.preview_layer)
            self.preview_layer = None
            self.result_layer = layer
            _, trained_on, start = s["corrections"]
            changed = most_changed_slices(start, merged, trained_on if known is None else known)
            where = (f"Check slices {slices_text(changed)}: changed most beyond your corrections. " if changed
                     else "Nothing changed beyond them. ")
            self.runner.status.setText(f"Accepted into {layer.name!r}, your corrections kept. {where}"
                                       "Correct more and Fine-tune again, or Revert.")

        started = self.runner.start(task, description="Segmenting with the fine-tuned model", on_returned=write,
                                    on_finished=self._update_buttons)
        self._update_buttons()
        return started

    def revert(self) -> None:
        """Drop the last round: the weights go back to the round before's (the starting model's after
        the first), and the layer to what it was before that round's Accept, corrections kept."""
        if self.runner.running:
            notify("Cancel the running task first.", "warning", self.runner.status)
            return
        if not self._history:
            notify("Nothing to revert: no fine-tuned weights.", "warning", self.runner.status)
            return
        last = self._history.pop()
        layer, before = last.get("layer"), last.get("before_accept")
        restored = ""
        if before is not None and layer in self.viewer.layers and layer.data.shape == before.shape:
            known = self.known_of(layer)
            current = np.asarray(layer.data)
            layer.data[...] = before if known is None else np.where(known, current, before)
            layer.refresh()
            restored = f" {layer.name!r} is as before that round's Accept, with your corrections."
        self._set_state(last)
        self.loss.setText("")
        back = ("the fine-tuned weights are gone" if self.tuner is None else
                f"back to the weights of the round before ({self.steps_done} steps); Revert again to go further")
        self.runner.status.setText(f"Reverted the last round: {back}." + (restored or " Layers are unchanged."))
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

    def _update_buttons(self) -> None:
        idle, tuned = not self.runner.running, self.tuner is not None and self.steps_done > 0
        self.train_button.setEnabled(idle)
        for push in (self.accept_button, self.revert_button, self.save_button):
            push.setEnabled(idle and tuned)
        self.revert_button.setEnabled(idle and bool(self._history))
        self.train_button.setText("Fine-tune again (continue)" if idle and tuned else "Fine-tune")


def _model_output(layer) -> bool:
    """Whether a Labels layer holds a model's segmentation (every slice labeled), not a painting."""
    return "model" in (layer.metadata or {}).get(METADATA_KEY, {})
