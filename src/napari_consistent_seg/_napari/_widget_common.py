"""Pieces every widget of the plugin shares: layer, model, device and modality pickers; messages;
unique layer names; the grid of a layer; and new layers carrying a model's class names and colours.

No maths here and no state outside the widget instances that own these pieces.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from napari.utils.colormaps import Colormap, DirectLabelColormap
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLayout, QPushButton, QSpinBox, QVBoxLayout, QWidget,
)

from ..errors import ConsistentSegError
from ..io import Volume
from ..models.store import list_models
from .layers import METADATA_KEY, volume_from_layer

MODALITY_CHOICES = {"from layer": None, "CT": "CT", "MR": "MR"}


def notify(message: str, level: str = "info", label: QLabel | None = None) -> None:
    """Show ``message`` as a napari notification ("info" | "warning" | "error") and in ``label``."""
    from napari.utils import notifications

    if label is not None:
        label.setText(message)
    {"error": notifications.show_error, "warning": notifications.show_warning}.get(
        level, notifications.show_info)(message)


def unique_layer_name(viewer, base: str) -> str:
    """``base`` if no layer has that name, else ``base [2]``, ``base [3]``, ... (never an existing one)."""
    taken = {layer.name for layer in viewer.layers}
    if base not in taken:
        return base
    n = 2
    while f"{base} [{n}]" in taken:
        n += 1
    return f"{base} [{n}]"


def volume_of(layer) -> Volume:
    """The layer as a (Z, Y, X) or cine (T, Z, Y, X) Volume (data not copied); ConsistentSegError for
    RGB and multiscale layers."""
    if layer is None:
        raise ConsistentSegError("Choose a layer first (open a scan with File > Open, or a sample).")
    if getattr(layer, "multiscale", False):
        raise ConsistentSegError(f"{layer.name!r} is multiscale: open the scan at full resolution.")
    return volume_from_layer(layer)


def current_slice(viewer, layer) -> int:
    """Index along z (the layer's first axis) of the slice the viewer shows, clipped to the layer."""
    z_world = viewer.dims.point[-3] if len(viewer.dims.point) >= 3 else 0.0
    z = round((z_world - layer.translate[-3]) / layer.scale[-3])
    return int(np.clip(z, 0, layer.data.shape[-3] - 1))


def grid_kwargs(layer, ndim: int = 3) -> dict:
    """Layer keyword arguments that put a new layer on ``layer``'s grid: scale, translate, our metadata.

    ndim: 3 for a (Z, Y, X) layer (one phase of a cine), 4 for a whole cine (T, Z, Y, X).
    """
    ours = dict((layer.metadata or {}).get(METADATA_KEY, {}))
    ours.pop("class_names", None)
    ours["warnings"] = []
    scale, translate = tuple(layer.scale), tuple(layer.translate)
    if len(scale) < ndim:
        scale, translate = (1.0,) * (ndim - len(scale)) + scale, (0.0,) * (ndim - len(scale)) + translate
    return {"scale": scale[-ndim:], "translate": translate[-ndim:], "metadata": {METADATA_KEY: ours}}


def current_phase(viewer, layer) -> int | None:
    """The cine phase (first axis of a 4D layer) the viewer shows, or None for a 3D layer."""
    if layer.data.ndim != 4:
        return None
    t = round((viewer.dims.point[-4] - layer.translate[-4]) / layer.scale[-4])
    return int(np.clip(t, 0, layer.data.shape[0] - 1))


def label_colormap(colours: dict[int, str]) -> DirectLabelColormap:
    """Label value -> colour; background and unknown values transparent."""
    colour_dict = {None: "transparent", 0: "transparent"}
    colour_dict.update({int(k): v for k, v in colours.items() if int(k) != 0})
    return DirectLabelColormap(color_dict=colour_dict)


def intensity_colormap(colour: str, name: str) -> Colormap:
    """Transparent black -> ``colour``, for one class's map blended additively over the scan."""
    rgb = np.array([int(colour[i:i + 2], 16) / 255.0 for i in (1, 3, 5)])
    return Colormap(colors=[[0.0, 0.0, 0.0, 0.0], [*rgb, 1.0]], name=name)


def labels_layer_data(labels: np.ndarray, grid: dict, classes: dict[int, str], colours: dict[int, str],
                      name: str, extra_metadata: dict | None = None) -> tuple[np.ndarray, dict]:
    """(data, kwargs) of a Labels layer on ``grid`` (``grid_kwargs`` of its image) with class names
    (shown on hover) and colours. ``classes`` {value: name} includes background 0.
    """
    kwargs = copy.deepcopy(grid)
    foreground = {int(k): str(v) for k, v in classes.items() if int(k) != 0}
    kwargs["metadata"][METADATA_KEY].update(class_names=foreground, **(extra_metadata or {}))
    kwargs.update(
        name=name,
        colormap=label_colormap(colours),
        # The features table makes napari show the class name under the cursor.
        features={"index": [0, *foreground], "class": [classes.get(0, "background"), *foreground.values()]},
    )
    return labels, kwargs


def add_labels_layer(viewer, labels, grid, classes, colours, name, extra_metadata=None, **layer_kwargs) -> Labels:
    """Add labels as a new layer on ``grid`` (never replacing one: the name is made unique).

    ``layer_kwargs`` (e.g. opacity) go to ``viewer.add_labels``: set at creation, not after, each
    change of a shown layer costs napari a redraw and a new thumbnail on the main thread.
    """
    data, kwargs = labels_layer_data(labels, grid, classes, colours, unique_layer_name(viewer, name),
                                     extra_metadata)
    return viewer.add_labels(data, **kwargs, **layer_kwargs)


def class_names_of(layer) -> dict[int, str]:
    """{value: name} recorded on a Labels layer (by our reader or a model), or {} if none."""
    names = (layer.metadata or {}).get(METADATA_KEY, {}).get("class_names") or {}
    return {int(k): str(v) for k, v in names.items()}


class LayerPicker(QComboBox):
    """Combo box of the viewer's layers of one type; follows layers added, removed and renamed.

    With ``apart_from`` (another picker), a refresh moves this one off the other's layer when
    there is another to choose: two pickers that need two layers offer two by default.
    """

    def __init__(self, viewer, layer_type: type = Image, parent: QWidget | None = None, *,
                 apart_from: LayerPicker | None = None):
        super().__init__(parent)
        self._viewer = viewer
        self._layer_type = layer_type
        self._apart_from = apart_from
        self._none_text = f"(no {layer_type.__name__.lower()} layer)"
        # napari holds these callbacks weakly and drops them once this widget is deleted.
        viewer.layers.events.inserted.connect(self._on_inserted)
        viewer.layers.events.removed.connect(self.refresh)
        viewer.layers.events.moved.connect(self.refresh)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.refresh()

    def layer(self):
        """The chosen layer, or None when there is none of this type."""
        index = self.currentIndex()
        if index < 0:
            return None
        wanted = self.itemData(index)
        return next((layer for layer in self._viewer.layers if _key(layer) == wanted), None)

    def set_layer(self, layer) -> None:
        index = self.findData(_key(layer))
        if index >= 0:
            self.setCurrentIndex(index)

    def refresh(self, *_event) -> None:
        current = self.itemData(self.currentIndex()) if self.currentIndex() >= 0 else None
        self.blockSignals(True)
        self.clear()
        for layer in reversed(self._viewer.layers):  # top of the layer list first, as napari shows it
            if isinstance(layer, self._layer_type):
                self.addItem(layer.name, _key(layer))
        index = self.findData(current) if current is not None else -1
        self.setCurrentIndex(index if index >= 0 else (0 if self.count() else -1))
        if self._apart_from is not None and self.count() > 1 and self.currentText() == self._apart_from.currentText():
            self.setCurrentIndex(1 if self.currentIndex() == 0 else 0)
        self.setPlaceholderText(self._none_text)
        self.blockSignals(False)
        self.currentIndexChanged.emit(self.currentIndex())

    def _on_inserted(self, event) -> None:
        event.value.events.name.connect(self.refresh)
        self.refresh()


def _key(layer) -> str:
    # not id(): napari hands plugins proxies of layers, a new proxy object on each access
    return str(layer.unique_id)


class _RefreshingComboBox(QComboBox):
    """Re-reads its items each time its list opens, so models saved elsewhere show up."""

    about_to_show = Signal()

    def showPopup(self):
        self.about_to_show.emit()
        super().showPopup()


class ModelPicker(QWidget):
    """Shipped and user models (refreshed whenever the list opens or the widget shows) plus any
    model folder chosen with "Folder…"."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.combo = _RefreshingComboBox()
        self.combo.setPlaceholderText("(no model: choose a folder)")
        self.combo.about_to_show.connect(self.refresh)
        browse = QPushButton("Folder…")
        browse.setToolTip("Use a model folder (card.json + backbone.safetensors)")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo, 1)
        row.addWidget(browse)
        self._folders: list[str] = []
        self.refresh()

    def choice(self) -> str | None:
        """The chosen model's folder, or None."""
        index = self.combo.currentIndex()
        return None if index < 0 else self.combo.itemData(index)

    def refresh(self) -> None:
        current = self.choice()
        self.combo.clear()
        for entry in list_models():
            classes = ", ".join(v for k, v in sorted(entry["classes"].items(), key=lambda kv: int(kv[0]))
                                if int(k) != 0)
            self.combo.addItem(f"{entry['name']} ({entry['source']}, {'/'.join(entry['modalities'])})",
                               entry["path"])
            self.combo.setItemData(self.combo.count() - 1, f"{classes}\n{entry['path']}",
                                   Qt.ItemDataRole.ToolTipRole)
        for folder in self._folders:
            self.combo.addItem(f"{Path(folder).name} (folder)", folder)
        index = self.combo.findData(current) if current is not None else -1
        self.combo.setCurrentIndex(index if index >= 0 else (0 if self.combo.count() else -1))

    def select(self, name: str) -> bool:
        """Choose the listed model called ``name``; False if there is none."""
        self.refresh()
        for entry in list_models():
            if entry["name"] == name:
                self.combo.setCurrentIndex(self.combo.findData(entry["path"]))
                return True
        return False

    def add_folder(self, folder: str | Path) -> None:
        """Offer a model folder (it is checked when the model loads) and choose it."""
        folder = str(folder)
        if folder not in self._folders:
            self._folders.append(folder)
        self.refresh()
        self.combo.setCurrentIndex(self.combo.findData(folder))

    def showEvent(self, event):
        self.refresh()
        super().showEvent(event)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model folder (with card.json)")
        if folder:
            self.add_folder(folder)


def device_choices() -> list[str]:
    """"auto" and "cpu", plus "cuda" / "mps" where this machine has them."""
    import torch

    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        choices.append("mps")
    return choices


def button(text: str, slot, tooltip: str = "") -> QPushButton:
    push = QPushButton(text)
    push.setToolTip(tooltip)
    push.clicked.connect(slot)
    return push


def row(*widgets: QWidget) -> QHBoxLayout:
    """The widgets side by side; the first one takes the spare width."""
    layout = QHBoxLayout()
    for i, widget in enumerate(widgets):
        layout.addWidget(widget, 1 if i == 0 else 0)
    return layout


def spin_box(low: int, high: int, value: int, special: str = "", tooltip: str = "") -> QSpinBox:
    """An integer box; ``special`` is shown in place of ``low`` (e.g. "off")."""
    box = QSpinBox()
    box.setRange(low, high)
    box.setValue(value)
    box.setSpecialValueText(special)
    box.setToolTip(tooltip)
    return box


def combo(items, tooltip: str = "") -> QComboBox:
    box = QComboBox()
    box.addItems(list(items))
    box.setToolTip(tooltip)
    return box


class ModelInputs(QWidget):
    """The form rows the model-running widgets share: image, modality, model, device."""

    def __init__(self, viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.image = LayerPicker(viewer, Image)
        self.modality = combo(MODALITY_CHOICES, "Which normalisation to use; 'from layer' uses what the "
                                                "reader found (unknown: the model's first modality)")
        self.model = ModelPicker()
        self.device = combo(device_choices(), "auto: a GPU when there is one, else the CPU")
        self.form = QFormLayout(self)
        self.form.setContentsMargins(0, 0, 0, 0)
        self.form.addRow("Image", self.image)
        self.form.addRow("Modality", self.modality)
        self.form.addRow("Model", self.model)
        self.form.addRow("Device", self.device)

    def read(self) -> tuple:
        """(image layer, Volume, modality or None, model choice, device); ConsistentSegError if unusable."""
        layer = self.image.layer()
        if layer is None:
            raise ConsistentSegError("No image layer: open a scan (File > Open) or a sample first.")
        volume = volume_of(layer)
        modality = MODALITY_CHOICES[self.modality.currentText()] or volume.modality
        if modality != volume.modality:  # the user's choice travels with the scan (core calls read it there)
            volume = dataclasses.replace(volume, modality=modality)
        model = self.model.choice()
        if model is None:
            raise ConsistentSegError("No model: no model is installed yet; choose a model folder.")
        return layer, volume, modality, model, self.device.currentText()

    def read_or_say(self, status: QLabel | None = None) -> tuple | None:
        """``read()``, or None after showing (in napari and in ``status``) why the choices are unusable."""
        try:
            return self.read()
        except ConsistentSegError as error:
            notify(str(error), "warning", status)
            return None


def stack(widget: QWidget, *items) -> QVBoxLayout:
    """Lay ``items`` (widgets or layouts) out top to bottom on ``widget``, with a stretch below."""
    layout = QVBoxLayout(widget)
    for item in items:
        (layout.addLayout if isinstance(item, QLayout) else layout.addWidget)(item)
    layout.addStretch(1)
    return layout


def export_csv_dialog(widget, title: str, default_name: str, export) -> None:
    """Ask for a file name and call ``export(path)`` (which returns the path written); say what came of it
    in ``widget.runner.status``, errors included."""
    from qtpy.QtWidgets import QFileDialog

    path, _ = QFileDialog.getSaveFileName(widget, title, default_name, "CSV (*.csv)")
    if not path:
        return
    try:
        notify(f"Saved {export(path)}", "info", widget.runner.status)
    except (ConsistentSegError, OSError) as error:
        notify(f"Could not save the CSV: {error}", "error", widget.runner.status)
