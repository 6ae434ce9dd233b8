"""Make docs/images/widget-cardiac-function.png: the Cardiac function widget on the Sunnybrook cine.

Run under a virtual display (it segments all 20 phases, about a minute on 2 cores):
xvfb-run -a -s "-screen 0 1500x950x24" .venv/bin/python docs/make_cardiac_screenshot.py
"""

from __future__ import annotations

from pathlib import Path

import napari
from make_screenshots import wait_for  # Qt's event loop until the widget's task ends (same folder)
from qtpy.QtWidgets import QApplication

REPO_ROOT = Path(__file__).resolve().parents[1]
CINE = REPO_ROOT.parent / "shared" / "data" / "sunnybrook_cine" / "dicom" / "SCD0000301"
TARGET = REPO_ROOT / "docs" / "images" / "widget-cardiac-function.png"
PLUGIN = "napari-consistent-seg"


def main() -> Path:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1440, 900)
    (image,) = viewer.open(str(CINE), plugin=PLUGIN)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Cardiac function")
    widget.image.set_layer(image)
    widget.run()
    wait_for(widget)
    widget.labels_layer.opacity = 0.45
    widget.go_to_phase(widget.result.ed)
    axis = viewer.dims.ndim - 3  # the slice axis of the cine: show a mid-ventricular slice
    viewer.dims.set_point(axis, image.translate[1] + (image.data.shape[1] // 2) * image.scale[1])
    viewer.reset_view()
    QApplication.processEvents()
    viewer.screenshot(str(TARGET), canvas_only=False)
    viewer.close()
    return TARGET


if __name__ == "__main__":
    print(main())
