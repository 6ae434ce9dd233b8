"""`Volume` and `Geometry`: a scan as an array in acquisition order plus the grid it came from.

Volume order (docs/io.md): axis 0 runs through the scanner's slices (the acquisition's through-plane
axis), axes 1 and 2 are the in-plane rows and columns, flipped so the view is as close to radiological
as the plane allows. For an axial acquisition this is (z, y, x) with x toward patient Left, y toward
Posterior, z toward Superior (LPS), as in every training set. A cine adds a leading phase axis:
(T, Z, Y, X). Every reorientation is a permutation plus flips of the source voxel grid: exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff

from ..errors import ConsistentSegError, InvalidInputError, ShapeMismatchError, VolumeReadError

MODALITIES = ("CT", "MR", "unknown")
PLANES = ("axial", "coronal", "sagittal")
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

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
# Per plane (named by the patient axis closest to the slice normal): the LPS directions that the
# slice axis, the rows (down the screen) and the columns (to the right) should follow. Radiological:
# axial anterior up and patient left on the right; coronal and sagittal head up, sagittal anterior left.
_PLANE_AXES_LPS = {
    "sagittal": ((1, 0, 0), (0, 0, -1), (0, 1, 0)),
    "coronal": ((0, 1, 0), (0, 0, -1), (1, 0, 0)),
    "axial": ((0, 0, 1), (0, 1, 0), (1, 0, 0)),
}
_PLANE_OF_LPS_AXIS = ("sagittal", "coronal", "axial")


@dataclass
class Geometry:
    """Where the voxels of a volume-order (Z, Y, X) array lie, and how to put them back on the source grid.

    source_affine maps source voxel indices (i, j, k) to RAS+ mm (NIfTI convention). slice_axis is the
    source axis that volume axis 0 runs along; acquisition_axis the one the scanner stepped along
    (they differ only in a view made for a model trained in another plane, see `view`).
    `source_shape` is None for a geometry made from spacing alone: it then fits any array shape.
    """

    spacing_mm: tuple[float, float, float]
    affine: np.ndarray
    source_affine: np.ndarray
    source_shape: tuple[int, int, int] | None
    slice_axis: int = 2
    acquisition_axis: int = 2
    ornt: np.ndarray = field(default=None, repr=False)

    def __eq__(self, other) -> bool:
        # Same source grid and same view means same geometry; the other fields derive from them.
        return (
            isinstance(other, Geometry)
            and self.source_shape == other.source_shape
            and self.slice_axis == other.slice_axis
            and np.array_equal(self.source_affine, other.source_affine)
        )

    @classmethod
    def from_source_grid(cls, source_affine, source_shape, slice_axis: int = 2,
                         acquisition_axis: int | None = None) -> Geometry:
        """Geometry of a source voxel grid viewed along `slice_axis` (0, 1 or 2 of the source axes)."""
        source_affine = np.asarray(source_affine, dtype=float)
        if source_affine.shape != (4, 4) or not np.isfinite(source_affine).all():
            raise ConsistentSegError("The affine must be a finite 4x4 matrix: fix the header before loading.")
        shape = None if source_shape is None else tuple(int(n) for n in source_shape)
        ornt = _volume_ornt(source_affine, int(slice_axis))
        affine = source_affine @ inv_ornt_aff(ornt, shape if shape is not None else (1, 1, 1))
        spacing_mm = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
        acquisition_axis = int(slice_axis) if acquisition_axis is None else int(acquisition_axis)
        return cls(spacing_mm, affine, source_affine, shape, int(slice_axis), acquisition_axis, ornt)

    @classmethod
    def from_spacing(cls, spacing_mm, shape_zyx=None) -> Geometry:
        """Geometry of an axial array with no source file: LPS (z, y, x) grid at the origin.

        spacing_mm: (z, y, x) voxel size. shape_zyx: the array shape when known (enables shape checks).
        The source grid is then the array stored in LPS (i, j, k) order.
        """
        dz, dy, dx = (float(s) for s in spacing_mm)
        source_affine = np.diag([-dx, -dy, dz, 1.0])  # LPS axes in RAS+ world
        source_shape = None if shape_zyx is None else tuple(int(n) for n in shape_zyx[-3:])[::-1]
        return cls.from_source_grid(source_affine, source_shape)

    def same_place(self, other: Geometry, atol_mm: float = 0.01) -> bool:
        """Whether the two volume-order grids put every voxel at the same place (within ``atol_mm``),
        whatever order their source files store the axes in."""
        return (self.shape_zyx == other.shape_zyx
                and np.allclose(self.affine, other.affine, rtol=0, atol=atol_mm))

    @property
    def spacing_known(self) -> bool:
        """False for an identity source affine, the mark of a file that lost its voxel size (acdc):
        its 1 mm spacing is an assumption, so sizes in mm or ml would be made up."""
        return not np.allclose(self.source_affine, np.eye(4))

    @property
    def slice_normal_lps(self) -> np.ndarray:
        """Unit vector (LPS) along which the acquisition's slices follow one another."""
        return _unit_directions_lps(self.source_affine)[:, self.acquisition_axis]

    @property
    def plane(self) -> str:
        """The anatomical plane closest to the acquisition: "axial", "coronal" or "sagittal"."""
        return _PLANE_OF_LPS_AXIS[int(np.argmax(np.abs(self.slice_normal_lps)))]

    @property
    def obliquity_deg(self) -> float:
        """Angle between the slice normal and the nearest patient axis (0 for a straight plane)."""
        return float(np.degrees(np.arccos(min(1.0, float(np.abs(self.slice_normal_lps).max())))))

    def describe_plane(self) -> str:
        """E.g. "axial" or "oblique, closest to coronal (34 deg off)"."""
        angle = self.obliquity_deg
        return self.plane if angle < 1.0 else f"oblique, closest to {self.plane} ({angle:.0f} deg off)"

    def view(self, plane: str) -> Geometry:
        """The same source grid viewed with axis 0 along `plane`: "acquisition", or "axial",
        "coronal", "sagittal" (axis 0 along the source axis closest to S, P or L)."""
        if plane == "acquisition":
            axis = self.acquisition_axis
        elif plane in PLANES:
            target = np.asarray(_PLANE_AXES_LPS[plane][0], dtype=float)
            axis = int(np.argmax(np.abs(target @ _unit_directions_lps(self.source_affine))))
        else:
            raise ConsistentSegError(f"Unknown plane {plane!r}: use 'acquisition' or one of {', '.join(PLANES)}.")
        if axis == self.slice_axis:
            return self
        return Geometry.from_source_grid(self.source_affine, self.source_shape, axis, self.acquisition_axis)

    def transfer(self, data: np.ndarray, other: Geometry) -> np.ndarray:
        """`data` on this geometry's volume order -> the same voxels in `other`'s (same source grid)."""
        if other is self or np.array_equal(other.ornt, self.ornt):
            return data
        return other.from_source(self.to_source(data))

    @property
    def shape_zyx(self) -> tuple[int, int, int] | None:
        """Volume-order array shape (Z, Y, X), or None when the geometry is spacing only."""
        if self.source_shape is None:
            return None
        shape = [0, 0, 0]
        for source_axis, (volume_axis, _flip) in enumerate(self.ornt):
            shape[int(volume_axis)] = self.source_shape[source_axis]
        return tuple(shape)

    def to_source(self, data: np.ndarray) -> np.ndarray:
        """Volume-order (Z, Y, X) or (T, Z, Y, X) array -> the source file's (I, J, K[, T]) order.

        A view (axes swapped and flipped), not a copy: NIfTI writers store (I, J, K) with I
        fastest, which is how a transposed C-order volume already lies in memory, and a C-order
        copy here cost 1.2 s of each 512 x 512 x 300 save."""
        self.check_shape(data.shape)
        if data.ndim == 4:
            data = np.moveaxis(data, 0, -1)
        return apply_orientation(data, _inverse_ornt(self.ornt))

    def from_source(self, data_ijk: np.ndarray) -> np.ndarray:
        """Source (I, J, K[, T]) voxel order -> volume-order (Z, Y, X) or (T, Z, Y, X) array."""
        if data_ijk.ndim not in (3, 4) or (
            self.source_shape is not None and tuple(data_ijk.shape[:3]) != self.source_shape
        ):
            raise ShapeMismatchError(
                f"Array of shape {data_ijk.shape} is not on the source grid {self.source_shape}: "
                "use the geometry of the file the array was read from."
            )
        data = apply_orientation(data_ijk, self.ornt)
        if data.ndim == 4:
            data = np.moveaxis(data, -1, 0)
        return np.ascontiguousarray(data)

    def check_shape(self, shape) -> None:
        """Raise ShapeMismatchError unless `shape` is (Z, Y, X) or (T, Z, Y, X) on this grid."""
        shape = tuple(shape)
        expected = self.shape_zyx
        if len(shape) not in (3, 4) or (expected is not None and shape[-3:] != expected):
            raise ShapeMismatchError(
                f"Array of shape {shape} does not match the volume grid {expected} (z, y, x): "
                "save or compare only arrays made on the grid of the scan they belong to."
            )

    def to_dict(self) -> dict:
        """JSON-safe form (lists of floats), for napari layer metadata."""
        return {
            "spacing_mm": list(self.spacing_mm),
            "affine": self.affine.tolist(),
            "source_affine": self.source_affine.tolist(),
            "source_shape": None if self.source_shape is None else list(self.source_shape),
            "slice_axis": self.slice_axis,
            "acquisition_axis": self.acquisition_axis,
            "plane": self.describe_plane(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        """Inverse of `to_dict`; the derived fields are recomputed from the source grid."""
        return cls.from_source_grid(d["source_affine"], d.get("source_shape"), d.get("slice_axis", 2),
                                    d.get("acquisition_axis"))


def _unit_directions_lps(source_affine: np.ndarray) -> np.ndarray:
    """(3, 3): column i is the LPS unit direction of source axis i."""
    columns = _RAS_TO_LPS @ np.asarray(source_affine, dtype=float)[:3, :3]
    norms = np.linalg.norm(columns, axis=0)
    if not np.all(np.isfinite(columns)) or np.any(norms < 1e-12) or abs(np.linalg.det(columns)) < 1e-12 * np.prod(norms):
        raise ConsistentSegError(
            "The affine has a zero-length or degenerate axis, so the voxel orientation is unknown: "
            "fix the header (e.g. with nibabel) before loading."
        )
    return columns / norms


def _volume_ornt(source_affine: np.ndarray, slice_axis: int) -> np.ndarray:
    """nibabel orientation (source axis -> [volume axis, flip]) of the volume order along `slice_axis`."""
    if slice_axis not in (0, 1, 2):
        raise ConsistentSegError(f"slice_axis must be 0, 1 or 2, not {slice_axis!r}.")
    directions = _unit_directions_lps(source_affine)
    normal = directions[:, slice_axis]
    plane = _PLANE_OF_LPS_AXIS[int(np.argmax(np.abs(normal)))]
    slice_dir, row_dir, col_dir = (np.asarray(v, dtype=float) for v in _PLANE_AXES_LPS[plane])
    a, b = (axis for axis in (0, 1, 2) if axis != slice_axis)
    # Rows and columns: the assignment of the two in-plane axes that best follows the plane's convention.
    straight = abs(directions[:, a] @ row_dir) + abs(directions[:, b] @ col_dir)
    swapped = abs(directions[:, b] @ row_dir) + abs(directions[:, a] @ col_dir)
    row_axis, col_axis = (a, b) if straight >= swapped else (b, a)
    ornt = np.zeros((3, 2))
    for source_axis, volume_axis, wanted in ((slice_axis, 0, slice_dir), (row_axis, 1, row_dir), (col_axis, 2, col_dir)):
        ornt[source_axis] = (volume_axis, -1.0 if directions[:, source_axis] @ wanted < 0 else 1.0)
    return ornt


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    inverse = np.zeros((3, 2))
    for source_axis, (volume_axis, flip) in enumerate(ornt):
        inverse[int(volume_axis)] = (source_axis, flip)
    return inverse


@dataclass(eq=False)  # arrays have no single truth value; compare .data and .geometry instead
class Volume:
    """A scan or a label map. data: (Z, Y, X) in volume order (see module docstring), or
    (T, Z, Y, X) for a cine: one volume per cardiac phase (or time point) on the same grid."""

    data: np.ndarray
    geometry: Geometry
    modality: str = "unknown"
    name: str = ""
    is_label: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def n_phases(self) -> int | None:
        """Number of phases of a cine (T of a (T, Z, Y, X) volume); None for a 3D volume."""
        return int(self.data.shape[0]) if self.data.ndim == 4 else None

    def phase(self, t: int) -> Volume:
        """Phase `t` of a cine as a 3D Volume (a view, not a copy); a 3D volume answers itself for t=0."""
        if self.data.ndim == 3:
            if t != 0:
                raise ConsistentSegError(f"{self.name or 'this volume'} is 3D: it has phase 0 only.")
            return self
        if not -self.data.shape[0] <= t < self.data.shape[0]:
            raise ConsistentSegError(f"{self.name or 'this cine'} has phases 0..{self.data.shape[0] - 1}, not {t}.")
        meta = {k: v for k, v in self.meta.items() if k != "phase_times_ms"}
        return Volume(self.data[t], self.geometry, self.modality, self.name, self.is_label, meta)

    def with_data(self, data: np.ndarray, *, name: str | None = None, is_label: bool | None = None,
                  meta: dict | None = None) -> Volume:
        """A Volume on this grid holding `data` (e.g. labels of this scan); the shape is checked."""
        self.geometry.check_shape(np.shape(data))
        return Volume(np.asarray(data), self.geometry, self.modality, self.name if name is None else name,
                      self.is_label if is_label is None else is_label, dict(self.meta if meta is None else meta))

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

    if not isinstance(path, (str, Path)) and not hasattr(path, "__fspath__"):
        raise VolumeReadError(f"a scan is a path to a NIfTI file or a DICOM folder, got {type(path).__name__}")
    path = Path(path)
    override = None if modality is None else normalize_modality(modality)
    try:
        volume = read_nifti(path) if is_nifti_path(path) else read_dicom(path)
    except ConsistentSegError:
        raise
    except MemoryError as error:
        raise VolumeReadError(f"{path} is too large for this computer's memory ({error}).") from error
    except Exception as error:  # a header no decision in docs/io.md foresaw: still our error type
        raise VolumeReadError(
            f"{path} could not be interpreted ({type(error).__name__}: {error}). Check the file with "
            "another viewer, or convert it again (e.g. with dcm2niix or nibabel)."
        ) from error
    if override is not None:
        volume.modality = override
    return volume


def load_labels(path, what: str = "a label file", on: Volume | None = None) -> Volume:
    """Read a label map (a segmentation, a user's corrections, a known mask) as `load_volume` does,
    as unsigned integers. Where an image's NaN or infinite voxels are replaced (with a warning), a
    label file's are refused, as are fractions and negative values: VolumeReadError saying which
    file and what to do. ``what`` names the file's role in the message.

    ``on``: the scan the labels belong to; they are returned on its grid. A header that places them
    where the scan lies (volume-order affines within 0.01 mm; the file may store its axes in another
    order) is trusted. One that places them elsewhere on a grid of the scan's file shape (a tool that
    wrote the array with an identity or default affine) is not: the voxels are taken in the scan's
    file order, as written, and meta["warnings"] says so. Any other grid raises ShapeMismatchError."""
    from .nifti import _label_array  # nifti builds on this module

    volume = load_volume(path)
    fix = f"save {Path(path).name} again as labels (e.g. from napari's Labels layer)"
    if volume.meta.get("non_finite_voxels"):
        raise VolumeReadError(f"{path} is {what}, but it holds {volume.meta['non_finite_voxels']} NaN or infinite "
                              f"voxels: {fix}.")
    try:
        volume.data = _label_array(volume.data, what=f"{path} ({what})", fix=fix)
    except InvalidInputError as error:
        raise VolumeReadError(str(error)) from error
    volume.is_label = True
    return volume if on is None else _labels_on(volume, on, f"{path} ({what})")


def _labels_on(labels: Volume, scan: Volume, name: str) -> Volume:
    """``labels`` on ``scan``'s grid (`load_labels`' ``on``)."""
    mine, theirs = labels.geometry, scan.geometry
    if labels.data.ndim != scan.data.ndim:
        raise ShapeMismatchError(f"{name} has shape {labels.shape}, the scan {scan.shape}: a label map needs the "
                                 "scan's phases")
    if mine.same_place(theirs):
        data, warnings = labels.data, []
    elif mine.source_shape == theirs.source_shape and labels.shape[:-3] == scan.shape[:-3]:
        data = theirs.from_source(mine.to_source(labels.data))
        warnings = [f"{name}: its header places it elsewhere than the scan (voxel (0, 0, 0) at "
                    f"{np.round(mine.source_affine[:3, 3], 1).tolist()} mm, the scan's at "
                    f"{np.round(theirs.source_affine[:3, 3], 1).tolist()}); its voxels were taken in the scan's "
                    "file order, as written"]
    else:
        raise ShapeMismatchError(f"{name} is not on the scan's grid: {mine.source_shape} voxels in the file against "
                                 f"the scan's {theirs.source_shape}: save the labels on the scan's grid "
                                 "(e.g. from napari's Labels layer made for it)")
    return scan.with_data(data, name=labels.name, is_label=True,
                          meta={**labels.meta, "warnings": labels.meta.get("warnings", []) + warnings})


def volume_from_source(
    data_ijk: np.ndarray,
    source_affine: np.ndarray,
    *,
    name: str,
    meta: dict,
    modality: str | None = None,
    path: Path | None = None,
    slice_axis: int = 2,
) -> Volume:
    """The one place a source (I, J, K[, T]) array becomes a Volume: NaNs, labels, modality, reorientation.

    modality: known modality (DICOM tag), or None to guess from the values and the `path` names.
    slice_axis: the source axis the scanner stepped along (the acquisition's through-plane axis).
    """
    meta.setdefault("warnings", [])
    data_ijk = _native_byte_order(data_ijk)
    if np.issubdtype(data_ijk.dtype, np.floating):
        data_ijk = _replace_non_finite(data_ijk, meta, name)
    is_label = looks_like_labels(data_ijk)
    if modality is None:
        modality = guess_modality(data_ijk, path)
    geometry = Geometry.from_source_grid(source_affine, data_ijk.shape[:3], slice_axis)
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


def _subsample(data: np.ndarray, n_max: int = 1_000_000) -> np.ndarray:
    """A strided, deterministic sample of at most about n_max voxels."""
    flat = np.ravel(data, order="K")  # a view for C- and Fortran-ordered arrays
    return flat[:: max(1, flat.size // n_max)]


def _native_byte_order(data: np.ndarray) -> np.ndarray:
    # torch and some numpy routines reject big-endian arrays, which NIfTI allows.
    if not data.dtype.isnative:
        return data.astype(data.dtype.newbyteorder("="))
    return data


def _replace_non_finite(data: np.ndarray, meta: dict, name: str) -> np.ndarray:
    """NaN and infinite voxels replaced by the finite extremes; their count in meta["non_finite_voxels"]
    (`load_labels` refuses them) and a line in meta["warnings"]."""
    finite = np.isfinite(data)
    n_bad = int(data.size - np.count_nonzero(finite))
    if n_bad == 0:
        return data
    if n_bad == data.size:
        raise VolumeReadError(f"{name}: every voxel is NaN or infinite; the file holds no image.")
    meta["non_finite_voxels"] = n_bad
    lo, hi = float(data[finite].min()), float(data[finite].max())
    meta["warnings"].append(
        f"{name}: {n_bad} NaN/infinite voxels replaced by the finite minimum {lo:g} "
        f"(+inf by the maximum {hi:g})."
    )
    return np.nan_to_num(data, nan=lo, posinf=hi, neginf=lo)
