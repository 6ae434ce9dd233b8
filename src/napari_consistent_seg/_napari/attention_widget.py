"""Class-attention widget: one Image layer per class showing where that class's query looks."""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QCheckBox, QFormLayout

from ..inference import attention_volume
from ..models.store import load_model
from ._model_widget import ModelTaskWidget
from ._widget_common import combo, current_phase, grid_kwargs, intensity_colormap, spin_box, unique_layer_name

SCALES = {"0: deepest (1/8 resolution)": 0, "1: middle (1/4)": 1, "2: finest (1/2)": 2}
# Display from uniform attention (1) up to this percentile of the map: colour = "looks here more".
UPPER_PERCENTILE = 99.5


class AttentionWidget(ModelTaskWidget):
    """Choose an image, a model with modules, a decoder scale and a head (or the average of heads).

    Adds one Image layer per class (background skipped unless asked), coloured from black to the
    class colour and blended additively over the scan, on the scan's scale and translate.
    A value of 1 is uniform attention; the display starts there.
    """

    action = "Show attention maps"

    def options(self) -> list:
        self.scale = combo(SCALES)
        self.head = spin_box(-1, 63, -1, "average of heads", "One attention head (0, 1, ...) or the average of all heads")
        self.background = QCheckBox("Include background")
        form = QFormLayout()
        form.addRow("Decoder scale", self.scale)
        form.addRow("Head", self.head)
        form.addRow(self.background)
        return [form]

    def make_task(self, layer, volume, modality, model_choice, device):
        scale = SCALES[self.scale.currentText()]
        head = None if self.head.value() < 0 else self.head.value()
        with_background = self.background.isChecked()
        phase = current_phase(self.viewer, layer)
        if phase is not None:  # a cine: the phase shown
            volume = volume.phase(phase)
        volume.modality = modality
        name = layer.name if phase is None else f"{layer.name} phase {phase}"
        context = {"image_name": name, "grid": grid_kwargs(layer), "scale": scale, "head": head}

        def task(progress, cancel):
            model = load_model(model_choice, device="cpu")
            maps = attention_volume(model, volume, scale=scale, head=head, device=device, progress=progress,
                                    cancel=cancel)
            shown = [k for k in model.classes if k != 0 or with_background]
            upper = {k: max(float(np.percentile(maps[k], UPPER_PERCENTILE)), 1.0 + 1e-3) for k in shown}
            return model, maps, upper

        return f"Attention maps of {layer.name}", task, lambda result: self._add_maps(context, *result)

    def _add_maps(self, context: dict, model, maps: np.ndarray, upper: dict[int, float]) -> None:
        head = "heads averaged" if context["head"] is None else f"head {context['head']}"
        for k, top in upper.items():
            name = model.classes[k]
            colour = model.colours.get(k, "#ffffff")
            self.last_layers.append(self.viewer.add_image(
                maps[k],
                name=unique_layer_name(self.viewer, f"{name} attention ({context['image_name']}, "
                                                    f"scale {context['scale']}, {head})"),
                colormap=intensity_colormap(colour, f"attention {name} {colour}"),
                contrast_limits=(1.0, top), blending="additive", **context["grid"],
            ))
        self.runner.status.setText(
            f"Added {len(upper)} attention layers ({head}, scale {context['scale']}) of {model.name!r}. "
            "1 = uniform attention; brighter = the class looks there more.")
