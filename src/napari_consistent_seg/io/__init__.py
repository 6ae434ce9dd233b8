"""Qt-free reading and writing of CT/MRI volumes in one canonical (z, y, x) orientation (docs/io.md)."""

from .nifti import save_nifti, save_volume
from .phantom import PHANTOM_CLASSES, make_phantom
from .volume import Geometry, Volume, load_labels, load_volume

__all__ = ["Geometry", "PHANTOM_CLASSES", "Volume", "load_labels", "load_volume", "make_phantom", "save_nifti",
           "save_volume"]
