"""`Volume` and `Geometry`: a scan as a canonical (z, y, x) array plus the grid it came from.

Canonical axes: x toward patient Left, y toward Posterior, z toward Superior (LPS); see docs/io.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from ..errors import ConsistentSegError, ShapeMismatchError, VolumeReadError

# The canonical array is the LPS-ordered (i, j, k) array transposed to (k, j, i).
LPS_ORNT = axcodes2ornt(("L", "P", "S"))
# (z, y, x, 1) -> (i, j, k, 1): swaps the first and third index.
_ZYX_TO_IJK = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)

MODALITIES = ("CT", "MR", "unknown")
MAX_LABEL_VALUES = 64
# Soft-tissue window W400/L40, in HU.
CT_SOFT_TISSUE_WINDOW_HU = (-160.0, 240.0)
# A volume whose minimum is at or below this is in Hounsfield units (fat is -100 HU, lung and air
# below -500): used for the display window.
HU_AIR_THRESHOLD = -500
# Guessing the modality asks for air itself (about -1000 HU): z-scored MRI stored as integers
# (the `la` set, minimum about -800) would otherwise pass for CT.
HU_AIR_GUESS_THRESHOLD = -900

_CT_NAME = re.compile(r"(?:^|[^a-z0-9])ct(?:[^a-z]|$)")
_MR_NAME = re.compile(r"(?:^|[^a-z0-9])(?:mri?|t1w?|t2w?)(?:[^a-z0-9]|$)")


@dataclass
class Geometry:
    """Where the voxels of a canonical (z, y, x) array lie, and how to put them back on the source grid.

    `source_shape` is None for a geometry made from spacing alone (`from_spacing` without a shape):
    it then fits any array shape.
    """

    spacing_mm: tuple[float, float, float]
    affine: np.ndarray
    source_affine: np.ndarray
    source_shape: tuple[int, int, int] | None

    def __eq__(self, other) -> bool:
        # Same source grid means same geometry; the other fields derive from it.
        return (
            isinstance(other, Geometry)
            and self.source_shape == other.source_shape
            and np.array_equal(self.source_affine, other.source_affine)
        )

    @classmethod
    def from_source_grid(cls, source_affine, source_shape) -> Geometry:
        """Geometry of a source voxel grid: `source_affine` maps (i, j, k) to RAS+ mm."""
        source_affine = np.asarray(source_affine, dtype=float)
        shape_for_flips = source_shape if source_shape is not None else (1, 1, 1)
        to_lps = _ornt_to_lps(source_affine)
        lps_affine = source_affine @ inv_ornt_aff(to_lps, shape_for_flips)
        affine = lps_affine @ _ZYX_TO_IJK
        spacing_mm = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
        shape = None if source_shape is None else tuple(int(n) for n in source_shape)
        return cls(spacing_mm, affine, source_affine, shape)

    @classmethod
    def from_spacing(cls, spacing_mm, shape_zyx=None) -> Geometry:
        """Geometry of an array with no source file: canonical grid at the origin.

        spacing_mm: (z, y, x) voxel size. shape_zyx: the array shape when known (enables shape checks).
        The source grid is then the canonical array stored in LPS (i, j, k) order.
        """
        dz, dy, dx = (float(s) for s in spacing_mm)
        source_affine = np.diag([-dx, -dy, dz, 1.0])  # LPS axes in RAS+ world
        source_shape = None if shape_zyx is None else tuple(int(n) for n in shape_zyx)[::-1]
        return cls.from_source_grid(source_affine, source_shape)

    @property
    def spacing_known(self) -> bool:
        """False for an identity source affine, the mark of a file that lost its voxel size (acdc):
        its 1 mm spacing is an assumption, so sizes in mm or ml would be made up."""
        return not np.allclose(self.source_affine, np.eye(4))

    @property
    def shape_zyx(self) -> tuple[int, int, int] | None:
        """Canonical array shape (Z, Y, X), or None when the geometry is spacing only."""
        if self.source_shape is None:
            return None
        to_lps = _ornt_to_lps(self.source_affine)
        shape_lps = [0, 0, 0]
        for source_axis, (lps_axis, _flip) in enumerate(to_lps):
            shape_lps[int(lps_axis)] = self.source_shape[source_axis]
        return tuple(shape_lps[::-1])

    def to_source(self, data_zyx: np.ndarray) -> np.ndarray:
        """Canonical (Z, Y, X) array -> the source file's (I, J, K) voxel order (exact inverse)."""
        self.check_shape(data_zyx.shape)
        from_lps = ornt_transform(LPS_ORNT, io_orientation(self.source_affine))
        return np.ascontiguousarray(apply_orientation(data_zyx.transpose(2, 1, 0), from_lps))

    def from_source(self, data_ijk: np.ndarray) -> np.ndarray:
        """Source (I, J, K) voxel order -> canonical (Z, Y, X) array."""
        if self.source_shape is not None and tuple(data_ijk.shape[:3]) != self.source_shape:
            raise ShapeMismatchError(
                f"Array of shape {data_ijk.shape} is not on the source grid {self.source_shape}: "
                "use the geometry of the file the array was read from."
            )
        lps = apply_orientation(data_ijk, _ornt_to_lps(self.source_affine))
        return np.ascontiguousarray(lps.transpose(2, 1, 0))

    def check_shape(self, shape_zyx) -> None:
        """Raise ShapeMismatchError if `shape_zyx` is not this geometry's canonical shape."""
        expected = self.shape_zyx
        if len(shape_zyx) != 3 or (expected is not None and tuple(shape_zyx) != expected):
            raise ShapeMismatchError(
                f"Array of shape {tuple(shape_zyx)} does not match the volume grid {expected} (z, y, x): "
                "save or compare only arrays made on the grid of the scan they belong to."
            )

    def to_dict(self) -> dict:
        """JSON-safe form (lists of floats), for napari layer metadata."""
        return {
            "spacing_mm": list(self.spacing_mm),
            "affine": self.affine.tolist(),
            "source_affine": self.source_affine.tolist(),
            "source_shape": None if self.source_shape is None else list(self.source_shape),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        """Inverse of `to_dict`; the derived fields are recomputed from the source grid."""
        return cls.from_source_grid(d["source_affine"], d.get("source_shape"))


@dataclass(eq=False)  # arrays have no single truth value; compare .data and .geometry instead
class Volume:
    """A scan or a label map. data: (Z, Y, X) in the canonical orientation (see module docstring)."""

    data: np.ndarray
    geometry: Geometry
    modality: str = "unknown"
    name: str = ""
    is_label: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return self.geometry.spacing_mm

    def display_limits(self) -> tuple[float, float]:
        """Default contrast: CT in HU -> soft-tissue window (-160, 240); else 1st-99th percentile.

        Labels get (0, max label). A constant image gets (v, v + 1).
        """
        if self.is_label:
            return 0.0, float(max(int(self.data.max()), 1))
        if self.modality == "CT" and self.data.min() <= HU_AIR_THRESHOLD:
            return CT_SOFT_TISSUE_WINDOW_HU
        lo, hi = np.percentile(_subsample(self.data), [1, 99])
        if hi <= lo:
            hi = lo + 1.0
        return float(lo), float(hi)


def load_volume(path, *, modality: str | None = None) -> Volume:
    """Read a NIfTI file (.nii, .nii.gz) or a DICOM series (a folder, or one file of it) as a Volume.

    modality: "CT", "MR" or "unknown" overrides the guess (DICOM tag, HU range, file name).
    Raises VolumeReadError with what to do for anything that is not a readable 2D/3D/4D scan.
    """
    # Imported here: both readers build on this module.
    from .dicom import read_dicom
    from .nifti import is_nifti_path, read_nifti

    path = Path(path)
    override = None if modality is None else normalize_modality(modality)
    volume = read_nifti(path) if is_nifti_path(path) else read_dicom(path)
    if override is not None:
        volume.modality = override
    return volume


def volume_from_source(
    data_ijk: np.ndarray,
    source_affine: np.ndarray,
    *,
    name: str,
    meta: dict,
    modality: str | None = None,
    path: Path | None = None,
) -> Volume:
    """The one place a source (I, J, K) array becomes a Volume: NaNs, labels, modality, reorientation.

    modality: known modality (DICOM tag), or None to guess from the values and the `path` names.
    """
    meta.setdefault("warnings", [])
    data_ijk = _native_byte_order(data_ijk)
    if np.issubdtype(data_ijk.dtype, np.floating):
        data_ijk = _replace_non_finite(data_ijk, meta["warnings"], name)
    is_label = looks_like_labels(data_ijk)
    if modality is None:
        modality = guess_modality(data_ijk, path)
    geometry = Geometry.from_source_grid(source_affine, data_ijk.shape)
    if is_label and "label" not in name.lower() and "seg" not in name.lower():
        name = f"{name} labels"
    return Volume(
        data=geometry.from_source(data_ijk),
        geometry=geometry,
        modality=modality,
        name=name,
        is_label=is_label,
        meta=meta,
    )


def normalize_modality(modality: str) -> str:
    """'ct' -> 'CT', 'mri' -> 'MR', 'unknown' -> 'unknown'; anything else raises ConsistentSegError."""
    key = str(modality).strip().upper()
    if key in ("MR", "MRI"):
        return "MR"
    if key == "CT":
        return "CT"
    if key == "UNKNOWN":
        return "unknown"
    raise ConsistentSegError(f"Unknown modality {modality!r}: use one of {', '.join(MODALITIES)}.")


def guess_modality(data: np.ndarray, path: Path | None = None) -> str:
    """'CT' for integer data spanning air to bone in HU (min <= -900, max >= 300); else a hint in
    the file or folder names ('ct' -> CT; 'mr', 'mri', 't1', 't2' -> MR); else 'unknown'.

    Only the file name and its two parent folders are read (e.g. ``btcv_ct/images/case.nii.gz``),
    so that unrelated folders higher up do not decide.
    """
    if np.issubdtype(data.dtype, np.integer) and data.size:
        if data.min() <= HU_AIR_GUESS_THRESHOLD and data.max() >= 300:
            return "CT"
    if path is not None:
        for part in reversed(Path(path).parts[-3:]):
            lowered = part.lower()
            if _CT_NAME.search(lowered):
                return "CT"
            if _MR_NAME.search(lowered):
                return "MR"
    return "unknown"


def looks_like_labels(data: np.ndarray) -> bool:
    """Integer data with at most MAX_LABEL_VALUES distinct values (a subsample is checked first)."""
    if not np.issubdtype(data.dtype, np.integer) or data.size == 0:
        return False
    if len(np.unique(_subsample(data))) > MAX_LABEL_VALUES:
        return False
    values: set = set()
    # Slab by slab, so memory stays small and a long image stops early.
    for slab in np.array_split(np.ravel(data, order="K"), max(1, data.size // 2_000_000)):
        values.update(np.unique(slab).tolist())
        if len(values) > MAX_LABEL_VALUES:
            return False
    return True


def _ornt_to_lps(source_affine: np.ndarray) -> np.ndarray:
    source_ornt = io_orientation(source_affine)
    if np.isnan(source_ornt).any():
        raise ConsistentSegError(
            "The affine has a zero-length or degenerate axis, so the voxel orientation is unknown: "
            "fix the header (e.g. with nibabel) before loading."
        )
    return ornt_transform(source_ornt, LPS_ORNT)


def _subsample(data: np.ndarray, n_max: int = 1_000_000) -> np.ndarray:
    """A strided, deterministic sample of at most about n_max voxels."""
    flat = np.ravel(data, order="K")  # a view for C- and Fortran-ordered arrays
    return flat[:: max(1, flat.size // n_max)]


def _native_byte_order(data: np.ndarray) -> np.ndarray:
    # torch and some numpy routines reject big-endian arrays, which NIfTI allows.
    if not data.dtype.isnative:
        return data.astype(data.dtype.newbyteorder("="))
    return data


def _replace_non_finite(data: np.ndarray, warnings: list, name: str) -> np.ndarray:
    finite = np.isfinite(data)
    n_bad = int(data.size - np.count_nonzero(finite))
    if n_bad == 0:
        return data
    if n_bad == data.size:
        raise VolumeReadError(f"{name}: every voxel is NaN or infinite; the file holds no image.")
    lo, hi = float(data[finite].min()), float(data[finite].max())
    warnings.append(
        f"{name}: {n_bad} NaN/infinite voxels replaced by the finite minimum {lo:g} "
        f"(+inf by the maximum {hi:g})."
    )
    return np.nan_to_num(data, nan=lo, posinf=hi, neginf=lo)
