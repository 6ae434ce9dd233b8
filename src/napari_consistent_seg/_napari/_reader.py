"""napari reader: NIfTI files and DICOM series (a folder, or files of one) as Image or Labels layers; a
folder without DICOM that holds NIfTI files (a patient as ACDC distributes it) opens each of them."""

from __future__ import annotations

from pathlib import Path

from ..errors import VolumeReadError
from ..io import load_volume
from ..io.dicom import find_dicom_files, is_dicom_file, series_id
from ..io.nifti import is_nifti_path
from .layers import volume_to_layer_data

# get_reader looks at this many entries of a folder for a DICOM file before declining it.
_FOLDER_ENTRIES_CHECKED = 64
_DICOM_SUFFIXES = (".dcm", ".ima")


def get_reader(path):
    """The reader function if every path is ours (NIfTI, DICOM file, folder with DICOM), else None.

    Never raises: napari then asks the next plugin.
    """
    paths = _as_paths(path)
    if not paths or not all(_is_readable_by_us(p) for p in paths):
        return None
    return read_layers


def _as_paths(path) -> list | None:
    """[path] for one path, the list for a list or tuple of paths, else None."""
    if isinstance(path, (str, Path)):
        return [path]
    if isinstance(path, (list, tuple)) and all(isinstance(p, (str, Path)) for p in path):
        return list(path)
    return None


def read_layers(path) -> list[tuple]:
    """Layer data tuples of the given path(s); a DICOM series listed file by file is read once.

    Raises VolumeReadError (napari shows its message) for anything that cannot be read.
    """
    from napari.utils.notifications import show_warning

    paths = _as_paths(path)
    if paths is None:
        raise VolumeReadError(f"napari passed {path!r}, which is not a path to a NIfTI file or DICOM folder.")
    layers, series_seen = [], set()
    for one_path in [p for given in paths for p in (_nifti_files(given) or [given])]:
        try:
            if is_dicom_file(one_path):
                series = series_id(one_path)
                if series in series_seen:
                    continue
                series_seen.add(series)
            volume = load_volume(one_path)
        except VolumeReadError:
            raise
        except Exception as error:  # napari shows only our message type cleanly
            raise VolumeReadError(
                f"{one_path} could not be opened ({type(error).__name__}: {error})."
            ) from error
        for warning in volume.meta.get("warnings", []):
            show_warning(warning)
        layers.append(volume_to_layer_data(volume))
    return layers


def _nifti_files(path) -> list[Path]:
    """The NIfTI files directly in a folder that holds no DICOM, sorted; [] for anything else."""
    path = Path(path)
    if not path.is_dir() or find_dicom_files(path, max_checked=_FOLDER_ENTRIES_CHECKED):
        return []
    return sorted(p for p in path.iterdir() if p.is_file() and is_nifti_path(p))


def _is_readable_by_us(path) -> bool:
    path = Path(path)
    try:
        if path.is_dir():
            return bool(find_dicom_files(path, max_checked=_FOLDER_ENTRIES_CHECKED) or _nifti_files(path))
        if not path.is_file():
            return False
        return is_nifti_path(path) or path.suffix.lower() in _DICOM_SUFFIXES or is_dicom_file(path)
    except OSError:
        return False
