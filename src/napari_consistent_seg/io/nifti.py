"""Read NIfTI (.nii, .nii.gz) into a canonical Volume and write arrays back on the source grid."""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import ConsistentSegError, InvalidInputError, VolumeReadError
from .volume import Geometry, Volume, volume_from_source

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti_path(path) -> bool:
    """True if the name ends in .nii or .nii.gz (any case); the content is not checked."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _gunzip(path: Path) -> bytes:
    """The whole decompressed content of a .gz file, each gzip member in one zlib call.

    Faster than nibabel's chunked reading (1.37 -> 1.19 s for a 157 MB CT, benchmarks/speed.py's),
    and zlib lets other threads run meanwhile (the CLI loads a scan while torch loads).
    EOFError for a truncated file, zlib.error for one that is not gzip.
    """
    rest, parts = path.read_bytes(), []
    while rest.strip(b"\0"):  # members one after another; zero padding at the end is allowed
        stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
        parts.append(stream.decompress(rest))
        if not stream.eof:
            raise EOFError("the compressed data ends before its end-of-stream marker")
        rest = stream.unused_data
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _load_image(path: Path):
    """nibabel's image of a NIfTI file, its voxels in memory (no memory map: a mapped file stays
    open, locked on Windows, and could not be saved over)."""
    if not path.name.lower().endswith(".nii.gz"):
        return nib.load(path, mmap=False)
    content = _gunzip(path)
    size = int.from_bytes(content[:4], "little")
    nifti2 = 540 in (size, int.from_bytes(content[:4], "big"))
    return (nib.Nifti2Image if nifti2 else nib.Nifti1Image).from_bytes(content)


def nifti_stem(path) -> str:
    """File name without .nii / .nii.gz."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_nifti(path) -> Volume:
    """Load a 2D, 3D or 4D NIfTI file as a Volume; 4D (x, y, z, t) is a cine: data (T, Z, Y, X).

    2D images become Z=1 volumes; trailing dimensions of size 1 are dropped; 5D+ raises. How the
    header is read (sform or qform, pixdim, slice axis, complex data) is decided in `_header_affine`
    and `_slice_axis` and written down in docs/io.md; every decision that changes what the file
    says is reported in meta["warnings"].
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeReadError(f"{path} does not exist or is not a file: check the path.")
    name = nifti_stem(path)
    warnings: list[str] = []
    try:
        image = _load_image(path)
        header = image.header
        shape = tuple(int(n) for n in image.shape)
        dtype = header.get_data_dtype()
    except EOFError as error:
        raise VolumeReadError(
            f"{path} is truncated or corrupt: its compressed data ends early ({error}). "
            "Copy or download the file again."
        ) from error
    except Exception as error:  # nibabel raises several types for files that are not NIfTI
        raise VolumeReadError(
            f"{path} is not a readable NIfTI image ({type(error).__name__}: {error}). "
            "Check that it is a .nii/.nii.gz file and not another format renamed."
        ) from error
    if not isinstance(header, nib.Nifti1Header):
        raise VolumeReadError(f"{path} is not a NIfTI-1/2 image ({type(image).__name__}): convert it to NIfTI.")
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 4:
        raise VolumeReadError(
            f"{path} holds {len(shape)}D data of shape {image.shape}; only 2D, 3D and 4D (cine) scans "
            "can be opened: extract the 3D or 4D series you need first (e.g. with nibabel or fslroi)."
        )
    if len(shape) < 2 or 0 in shape:
        raise VolumeReadError(f"{path} holds no image (shape {image.shape}): re-export the scan.")
    if dtype.fields is not None:
        raise VolumeReadError(
            f"{path} holds colour (RGB) voxels, not CT/MR intensities: open the grey-level scan, or "
            "convert this one to grey levels first."
        )
    try:
        data = np.asanyarray(image.dataobj).reshape(shape + (1,) * (3 - len(shape)))
    except Exception as error:  # gzip, zlib and EOF errors of truncated or corrupt files
        raise VolumeReadError(
            f"{path} is truncated or corrupt: the header was read but the voxel data could not be "
            f"({type(error).__name__}: {error}). Copy or download the file again."
        ) from error
    if np.iscomplexobj(data):
        data = np.abs(data).astype(np.float32)
        warnings.append(f"{name}: complex voxels; loaded their magnitude.")
    elif data.dtype == bool:
        data = data.astype(np.uint8)

    affine = _header_affine(header, name, warnings)
    meta = {"source": str(path), "format": "nifti", "warnings": warnings}
    if data.ndim == 4:
        meta["phase_interval_ms"] = _phase_interval_ms(header)
    return volume_from_source(data, affine, name=name, meta=meta, path=path,
                              slice_axis=_slice_axis(header, affine))


# Relative disagreement between an affine's voxel size and pixdim above which pixdim is taken.
_PIXDIM_TOLERANCE = 0.01
# sform and qform "agree" if no entry of their 3x4 part differs by more than this (mm).
_FORM_TOLERANCE_MM = 1e-3


def _valid_affine(affine) -> bool:
    return affine is not None and np.isfinite(affine).all() and np.linalg.matrix_rank(affine[:3, :3]) == 3


def _header_affine(header: nib.Nifti1Header, name: str, warnings: list[str]) -> np.ndarray:
    """The voxel-to-RAS+ affine a NIfTI header means (docs/io.md, "Headers as they come").

    1. sform if its code is set and it is usable, else qform if set and usable (as nibabel and FSL);
       disagreeing forms are reported.
    2. A usable affine whose voxel size disagrees with pixdim (e.g. ACDC's unit-scaled sform with
       1.56 x 1.56 x 10 mm in pixdim) keeps its directions and origin and takes pixdim's lengths, as ITK.
    3. Neither form usable: pixdim as the voxel size (1 mm where zero or not a number), LPS-free
       diag orientation, reported: sizes in mm are then only as good as pixdim.
    """
    with np.errstate(all="ignore"):
        sform, sform_code = header.get_sform(coded=True)
        try:
            qform, qform_code = header.get_qform(coded=True)
        except Exception:  # a qform quaternion that is not a rotation
            qform, qform_code = None, 0
        pixdim = np.abs(np.asarray(header["pixdim"][1:4], dtype=float))
    sform_ok = bool(sform_code) and _valid_affine(sform)
    qform_ok = bool(qform_code) and _valid_affine(qform)
    if sform_ok:
        affine = np.array(sform, dtype=float)
        if qform_ok and np.abs(sform[:3] - qform[:3]).max() > _FORM_TOLERANCE_MM:
            warnings.append(
                f"{name}: the header's sform and qform disagree (by up to "
                f"{np.abs(sform[:3] - qform[:3]).max():.3g} mm); used the sform, as nibabel and FSL do. "
                "If the scan looks misplaced against other files, check its export."
            )
    elif qform_ok:
        affine = np.array(qform, dtype=float)
        if sform_code:
            warnings.append(f"{name}: the header's sform is unusable (degenerate); used the qform.")
    else:
        zooms = [p if np.isfinite(p) and p > 0 else 1.0 for p in pixdim]
        affine = np.diag(zooms + [1.0])
        if sform_code or qform_code:
            warnings.append(
                f"{name}: the header affine is degenerate; used the voxel sizes only "
                f"({' x '.join(f'{z:g}' for z in zooms)} mm) with an assumed orientation."
            )
        return affine
    lengths = np.linalg.norm(affine[:3, :3], axis=0)
    pixdim_usable = bool(np.all(np.isfinite(pixdim)) and np.all(pixdim > 0))
    if pixdim_usable and np.any(np.abs(lengths - pixdim) > _PIXDIM_TOLERANCE * pixdim):
        affine[:3, :3] = affine[:3, :3] / lengths * pixdim
        warnings.append(
            f"{name}: the header's affine gives {' x '.join(f'{v:.3g}' for v in lengths)} mm voxels "
            f"but pixdim says {' x '.join(f'{v:.3g}' for v in pixdim)} mm; used pixdim, as ITK does."
        )
    return affine


def _slice_axis(header: nib.Nifti1Header, affine: np.ndarray) -> int:
    """The source axis the slices were acquired along: dim_info's slice_dim when the header sets
    it; else the one axis at least 1.5x thicker than the others (2D multi-slice scans); else k."""
    try:
        slice_dim = header.get_dim_info()[2]
    except Exception:
        slice_dim = None
    if slice_dim in (0, 1, 2):
        return int(slice_dim)
    lengths = np.linalg.norm(affine[:3, :3], axis=0)
    thickest = int(np.argmax(lengths))
    others = np.delete(lengths, thickest)
    return thickest if np.all(lengths[thickest] >= 1.5 * others) else 2


def _phase_interval_ms(header: nib.Nifti1Header) -> float | None:
    """Time between the volumes of a 4D file in ms (pixdim[4] in the header's time unit), if given."""
    step = float(header["pixdim"][4])
    try:
        unit = header.get_xyzt_units()[1]
    except KeyError:  # a units code outside the standard: the step's unit is unknown
        return None
    factor = {"sec": 1000.0, "msec": 1.0, "usec": 0.001}.get(unit)
    return step * factor if factor and np.isfinite(step) and step > 0 else None


def save_nifti(array_zyx, geometry: Geometry, path, *, is_label: bool = True) -> Path:
    """Write a volume-order (Z, Y, X) or cine (T, Z, Y, X) array as NIfTI on the source grid
    (x, y, z[, t]), with its affine.

    Labels are stored as uint8 (uint16 above 255, uint32 above 65535), images as float32.
    sform and qform are both set (code 1, scanner). A name without .nii/.nii.gz gets .nii.gz.
    Raises ShapeMismatchError if the array is not on the geometry's grid.
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


def save_volume(volume: Volume, path) -> Path:
    """Write ``volume`` as NIfTI on its source grid and affine (:func:`save_nifti`): as labels when it
    is a labels Volume (``segment``'s result), else as an image. Returns the path written."""
    return save_nifti(volume.data, volume.geometry, path, is_label=volume.is_label)


def _label_array(array: np.ndarray, what: str = "Label arrays",
                 fix: str = "save this array as an image (is_label=False)") -> np.ndarray:
    """Smallest unsigned integer array that holds the labels; non-integer or negative labels raise
    InvalidInputError (``what`` names the array, ``fix`` says what to do about fractions)."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise InvalidInputError(f"{what} must hold whole numbers (class values): {fix}.")
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if lo < 0:
        raise InvalidInputError(f"{what} cannot hold negative values (minimum {lo}): relabel them from 0 first.")
    dtype = np.uint8 if hi <= 255 else np.uint16 if hi <= 65535 else np.uint32
    return array.astype(dtype, copy=False)
