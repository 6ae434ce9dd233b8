"""napari-consistent-seg: CT/MRI segmentation with stripped backbones trained by ICL and EAM.

The package is a Qt-free core (``io``, ``models``, ``training``, ``inference``, ``metrics``)
plus a thin napari layer in ``_napari``. Nothing here imports napari or Qt.
"""

__version__ = "0.1.0"

from .errors import ConsistentSegError  # noqa: E402

__all__ = ["ConsistentSegError", "__version__"]
