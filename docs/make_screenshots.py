"""Make the documentation screenshots of napari (one function per image, saved in docs/images/).

Run under a virtual display: xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python docs/make_screenshots.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES_DIR = REPO_ROOT / "docs" / "images"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
PLUGIN = "napari-consistent-seg"
WINDOW_SIZE = (1280, 820)
CHAOS_LIVER = 1  # chaos_t2 label value of the liver (splits.json)


def _new_viewer() -> napari.Viewer:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(*WINDOW_SIZE)
    return viewer


def _save(viewer: napari.Viewer, name: str) -> Path:
    QApplication.processEvents()
    path = IMAGES_DIR / name
    viewer.screenshot(str(path), canvas_only=False)
    viewer.close()
    return path


def loaded_scan(case: str = "case_31") -> Path:
    """A chaos_t2 T2 MRI val case and its labels, opened by the plugin reader, mid-liver axial slice."""
    viewer = _new_viewer()
    (image_layer,) = viewer.open(str(SHARED_DATA / "chaos_t2" / "images" / f"{case}.nii.gz"), plugin=PLUGIN)
    (labels_layer,) = viewer.open(str(SHARED_DATA / "chaos_t2" / "labels" / f"{case}.nii.gz"), plugin=PLUGIN)
    labels_layer.opacity = 0.45
    liver_slices = np.nonzero((labels_layer.data == CHAOS_LIVER).any(axis=(1, 2)))[0]
    mid_liver_z = int(round(liver_slices.mean()))
    # dims points are in world units (mm), so the slice index is scaled by the z spacing.
    viewer.dims.set_point(0, mid_liver_z * image_layer.scale[0])
    viewer.reset_view()
    return _save(viewer, "napari-loaded-scan.png")


SCREENSHOTS = {"loaded_scan": loaded_scan}


def main(names: list[str]) -> None:
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    for name in names or SCREENSHOTS:
        print(SCREENSHOTS[name]())


if __name__ == "__main__":
    main(sys.argv[1:])
