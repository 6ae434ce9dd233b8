"""Read NIfTI (.nii, .nii.gz) into a canonical Volume and write arrays back on the source grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import ConsistentSegError, VolumeReadError
from .volume import Geometry, Volume, volume_from_source

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti_path(path) -> bool:
    """True if the name ends in .nii or .nii.gz (any case); the content is not checked."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path) -> str:
    """File name without .nii / .nii.gz."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_nifti(path) -> Volume:
    """Load a 2D, 3D or 4D NIfTI file as a Volume (4D: the first volume, with a warning).

    2D images become Z=1 volumes; trailing dimensions of size 1 are dropped; 5D+ raises.
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeReadError(f"{path} does not exist or is not a file: check the path.")
    name = nifti_stem(path)
    warnings: list[str] = []
    try:
        # No memory map: a mapped file stays open (locked on Windows) and could not be saved over.
        image = nib.load(path, mmap=False)
    except Exception as error:  # nibabel raises several types for files that are not NIfTI
        raise VolumeReadError(
            f"{path} is not a readable NIfTI image ({type(error).__name__}: {error}). "
            "Check that it is a .nii/.nii.gz file and not another format renamed."
        ) from error

    shape = tuple(image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 4:
        raise VolumeReadError(
            f"{path} holds {len(shape)}D data of shape {image.shape}; only 2D, 3D and 4D scans can be "
            "opened: extract the 3D volume you need first (e.g. with nibabel or fslroi)."
        )
    if len(shape) < 2 or 0 in shape:
        raise VolumeReadError(f"{path} holds no image (shape {image.shape}): re-export the scan.")
    if len(shape) == 4:
        warnings.append(
            f"{name}: 4D series with {shape[3]} volumes: loaded the first; split the file "
            "(e.g. fslsplit or nibabel) to open the others."
        )
    # Slicing the proxy reads only the first volume of a 4D file.
    index = (slice(None),) * min(len(shape), 3) + (0,) * (len(image.shape) - min(len(shape), 3))
    try:
        data = np.asanyarray(image.dataobj[index])
    except Exception as error:  # gzip, zlib and EOF errors of truncated or corrupt files
        raise VolumeReadError(
            f"{path} is truncated or corrupt: the header was read but the voxel data could not be "
            f"({type(error).__name__}: {error}). Copy or download the file again."
        ) from error
    if data.ndim == 2:
        data = data[:, :, np.newaxis]

    affine = image.affine
    if not np.isfinite(affine).all() or np.linalg.matrix_rank(affine[:3, :3]) < 3:
        zooms = (list(image.header.get_zooms()[:3]) + [1.0, 1.0])[:3]
        affine = np.diag([float(z) or 1.0 for z in zooms] + [1.0])
        warnings.append(f"{name}: the header affine is degenerate; used the voxel sizes only.")

    meta = {"source": str(path), "format": "nifti", "warnings": warnings}
    return volume_from_source(data, affine, name=name, meta=meta, path=path)


def save_nifti(array_zyx, geometry: Geometry, path, *, is_label: bool = True) -> Path:
    """Write a canonical (Z, Y, X) array as NIfTI on the source grid, with its affine.

    Labels are stored as uint8 (uint16 above 255, uint32 above 65535), images as float32.
    sform and qform are both set (code 1, scanner). A name without .nii/.nii.gz gets .nii.gz.
    Raises ShapeMismatchError if the array is not on the geometry's canonical grid.
    Returns the path written.
    """
    array_zyx = np.asarray(array_zyx)
    geometry.check_shape(array_zyx.shape)
    path = Path(path)
    if not is_nifti_path(path):
        path = path.with_name(path.name + ".nii.gz")

    data = _label_array(array_zyx) if is_label else array_zyx.astype(np.float32, copy=False)
    data_ijk = geometry.to_source(data)
    image = nib.Nifti1Image(data_ijk, geometry.source_affine)
    image.set_sform(geometry.source_affine, code=1)
    image.set_qform(geometry.source_affine, code=1)
    image.header.set_xyzt_units("mm")
    image.set_data_dtype(data_ijk.dtype)
    try:
        nib.save(image, path)
    except OSError as error:
        raise ConsistentSegError(
            f"Could not write {path} ({error}): check that the folder exists and is writable."
        ) from error
    return path


def _label_array(array: np.ndarray) -> np.ndarray:
    """Smallest unsigned integer array that holds the labels; non-integer or negative labels raise."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise ConsistentSegError(
                "Label arrays must hold whole numbers: save this array as an image (is_label=False)."
            )
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if lo < 0:
        raise ConsistentSegError(
            f"Label arrays cannot hold negative values (minimum {lo}): relabel them from 0 first."
        )
    dtype = np.uint8 if hi <= 255 else np.uint16 if hi <= 65535 else np.uint32
    return array.astype(dtype, copy=False)
