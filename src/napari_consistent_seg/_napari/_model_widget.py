"""The frame of the widgets that run a model on an image layer: Segment and Class-attention maps."""

from __future__ import annotations

from collections.abc import Callable

import napari
from qtpy.QtWidgets import QWidget

from ._widget_common import ModelInputs, button, stack
from ._workers import TaskRunner


class ModelTaskWidget(QWidget):
    """Image, modality, model and device rows, the widget's own options, one action button, and
    the progress / Cancel row. ``run()`` reads the choices (or says why they are unusable) and
    starts ``make_task``'s work in a worker; ``last_layers`` holds the layers the last run added.

    Subclasses set ``action`` (the button's text) and define ``options()`` and ``make_task()``.
    """

    action = "Run"

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self.inputs = ModelInputs(viewer)
        self.run_button = button(self.action, self.run)
        self.runner = TaskRunner()
        stack(self, self.inputs, *self.options(), self.run_button, self.runner)
        self.last_layers: list = []

    def options(self) -> list:
        """The widgets or layouts shown between the model rows and the button."""
        return []

    def make_task(self, layer, volume, modality, model_choice, device) -> tuple[str, Callable, Callable]:
        """(description, ``task(progress, cancel)`` for the worker, ``on_returned(result)`` on the GUI thread).

        Read every choice here, not in the task: layers may be renamed or removed meanwhile.
        """
        raise NotImplementedError

    def run(self) -> bool:
        """Start the work on the chosen image; False (with a message) if the choices are unusable."""
        choices = self.inputs.read_or_say(self.runner.status)
        if choices is None:
            return False
        description, task, on_returned = self.make_task(*choices)
        self.last_layers = []
        started = self.runner.start(task, description=description, on_returned=on_returned,
                                    on_finished=lambda: self.run_button.setEnabled(True))
        self.run_button.setEnabled(not started)
        return started
