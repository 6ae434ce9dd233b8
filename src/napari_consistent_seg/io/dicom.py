"""Read a DICOM CT/MR series (a folder, or one file of it) into a canonical Volume with pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.misc import is_dicom
from pydicom.pixels import apply_modality_lut

from ..errors import VolumeReadError
from .volume import Volume, volume_from_source

# DICOM patient coordinates are LPS; NIfTI world coordinates are RAS+.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Slices share a grid if orientation cosines agree to this (absolute) and pixel spacing (relative).
_GEOMETRY_TOLERANCE = 1e-4


def is_dicom_file(path) -> bool:
    """True if `path` is a file with the DICOM preamble and 'DICM' marker (reads 132 bytes)."""
    path = Path(path)
    try:
        return path.is_file() and is_dicom(path)
    except OSError:
        return False


def find_dicom_files(folder, max_checked: int | None = None) -> list[Path]:
    """DICOM files directly in `folder` (not in sub-folders), sorted by name.

    max_checked: stop after looking at this many files (a cheap "is there any DICOM here?").
    """
    candidates = sorted(p for p in Path(folder).iterdir() if not p.name.startswith("."))
    return [p for p in candidates[:max_checked] if is_dicom_file(p)]


def series_id(path) -> str:
    """Identifier of the series a DICOM file belongs to (folder + series UID), to skip repeats."""
    path = Path(path)
    return f"{path.parent}|{_series_key_of_file(path)}"


def read_dicom(path) -> Volume:
    """Load the DICOM series in folder `path`, or the series that file `path` belongs to.

    A folder with several series: the one with most slices is loaded and the others are named in
    meta["warnings"]. Slices are sorted along the slice normal; rescale slope/intercept are applied
    (CT in HU): data is int16 when that is exact, else float32. A cine series (several images per
    slice position, told apart by TriggerTime) loads as one (T, Z, Y, X) Volume.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(f"{path} does not exist: check the path.")
    try:
        return _read_series(path)
    except VolumeReadError:
        raise
    except Exception as error:  # malformed tags, unreadable files: say which series failed
        raise VolumeReadError(
            f"{path}: the DICOM series could not be read ({type(error).__name__}: {error}). "
            "Check the export, or convert it to NIfTI with dcm2niix."
        ) from error


def _read_series(path: Path) -> Volume:
    folder = path if path.is_dir() else path.parent
    if path.is_file() and not is_dicom_file(path):
        raise VolumeReadError(
            f"{path} is neither NIfTI (.nii, .nii.gz) nor DICOM (no 'DICM' marker): open a NIfTI "
            "file or a folder holding one DICOM series."
        )
    if path.is_dir() and not any(folder.iterdir()):
        raise VolumeReadError(
            f"The folder {folder} is empty: choose a folder of DICOM slices or a .nii/.nii.gz file."
        )
    series = _group_by_series(find_dicom_files(folder))
    if not series:
        raise VolumeReadError(
            f"The folder {folder} holds no DICOM image files. If it holds NIfTI files, open one of "
            "them; if it holds one sub-folder per series, open one of those."
        )
    warnings: list[str] = []
    if path.is_file():
        chosen = series.get(_series_key_of_file(path))
        if chosen is None:
            raise VolumeReadError(
                f"{path} is a DICOM file without an image (e.g. a DICOMDIR or a report): open the "
                "folder of the series or one of its image files."
            )
    else:
        ranked = sorted(series.values(), key=len, reverse=True)
        chosen = ranked[0]
        if len(ranked) > 1:
            others = "; ".join(_describe(headers) for headers in ranked[1:])
            warnings.append(
                f"The folder holds {len(ranked)} series: loaded {_describe(chosen)}; not loaded: "
                f"{others}. Open one file of another series to load that one."
            )
    return _assemble(chosen, folder, path, warnings)


def _group_by_series(files: list[Path]) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    series: dict[str, list] = {}
    for file in files:
        header = pydicom.dcmread(file, stop_before_pixels=True)
        if "Rows" not in header:  # DICOMDIR, reports, presentation states: no image
            continue
        series.setdefault(_series_key(header), []).append((file, header))
    return series


def _series_key(header: pydicom.Dataset) -> str:
    # Anonymisers sometimes blank the UID; number + description then tell series apart.
    uid = str(header.get("SeriesInstanceUID", "") or "")
    return uid or f"#{header.get('SeriesNumber', '')} {header.get('SeriesDescription', '')}"


def _series_key_of_file(path: Path) -> str:
    return _series_key(pydicom.dcmread(path, stop_before_pixels=True))


def _describe(headers: list) -> str:
    header = headers[0][1]
    description = header.get("SeriesDescription", "") or "(no description)"
    uid = header.get("SeriesInstanceUID", "") or "no UID"
    return f"'{description}' ({len(headers)} slices, {uid})"


def _assemble(headers: list, folder: Path, path: Path, warnings: list[str]) -> Volume:
    """Sort the slices of one series, check they form one grid, and build the volume."""
    first = headers[0][1]
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise VolumeReadError(
            f"{headers[0][0]} is an enhanced multi-frame DICOM, which is not supported: convert the "
            "series to NIfTI with dcm2niix and open the .nii.gz."
        )
    for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        if tag not in first:
            raise VolumeReadError(
                f"{headers[0][0]} has no {tag}, so it is not a CT/MR slice with a known position: "
                "open a cross-sectional CT or MR series."
            )
    orientation = np.array(first.ImageOrientationPatient, dtype=float)
    pixel_spacing = np.array(first.PixelSpacing, dtype=float)
    size = (int(first.Rows), int(first.Columns))
    for file, header in headers:
        same_grid = (
            (int(header.Rows), int(header.Columns)) == size
            and np.allclose(header.ImageOrientationPatient, orientation, atol=_GEOMETRY_TOLERANCE)
            and np.allclose(header.PixelSpacing, pixel_spacing, rtol=_GEOMETRY_TOLERANCE)
        )
        if not same_grid:
            raise VolumeReadError(
                f"The series in {folder} mixes slice sizes or orientations ({file.name} differs from "
                f"{headers[0][0].name}), e.g. a localiser saved with the scan: move the odd files out "
                "or convert the series with dcm2niix."
            )

    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    positions_mm = np.array([h.ImagePositionPatient for _, h in headers], dtype=float)
    order = np.argsort(positions_mm @ normal, kind="stable")
    headers = [headers[i] for i in order]
    positions_mm = positions_mm[order]
    headers, positions_mm, phase_times = _split_phases(headers, positions_mm, normal, folder)
    slice_step = _slice_step(positions_mm, normal, first, folder, warnings)

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_direction * pixel_spacing[1]  # i: along a row (column index)
    affine_lps[:3, 1] = column_direction * pixel_spacing[0]  # j: down a column (row index)
    affine_lps[:3, 2] = slice_step
    affine_lps[:3, 3] = positions_mm[0]

    data, exact_integers = _read_pixels([h for phase in headers for h in phase], size)
    if exact_integers and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)
    n_phases = len(headers)
    data = data.reshape(n_phases, len(positions_mm), *size)  # (T, K, J, I)
    modality = {"CT": "CT", "MR": "MR"}.get(str(first.get("Modality", "")).upper(), "unknown")
    description = str(first.get("SeriesDescription", "") or "")
    meta = {
        "source": str(path),
        "format": "dicom",
        "warnings": warnings,
        "series_uid": str(first.get("SeriesInstanceUID", "") or ""),
        "series_description": description,
        "dicom_modality": str(first.get("Modality", "")),
        "n_slices": len(positions_mm),
    }
    if n_phases > 1:
        meta["phase_times_ms"] = phase_times
        source = data.transpose(3, 2, 1, 0)  # (I, J, K, T)
    else:
        source = data[0].transpose(2, 1, 0)
    return volume_from_source(
        source,
        _LPS_TO_RAS @ affine_lps,
        name=description or folder.name,
        meta=meta,
        modality=modality,
        path=folder,
    )


# Slices closer than this along the normal (mm) share a position: phases of a cine.
_SAME_POSITION_MM = 0.01


def _split_phases(headers, positions_mm, normal, folder):
    """Group a series sorted along the normal into phases: ([phase][slice] headers, positions, times).

    One image per position: one phase. Several: a cine, ordered within each position by TriggerTime
    (else TemporalPositionIdentifier, else InstanceNumber), whatever the order of the files.
    """
    along = positions_mm @ normal
    starts = np.flatnonzero(np.diff(along, prepend=-np.inf) > _SAME_POSITION_MM)
    groups = np.split(np.arange(len(headers)), starts[1:])
    if len(groups) == len(headers):
        return [headers], positions_mm, None
    counts = sorted({len(g) for g in groups})
    if len(counts) > 1:
        raise VolumeReadError(
            f"The series in {folder} has {len(headers)} images at {len(groups)} slice positions, with "
            f"{counts[0]} to {counts[-1]} images per position (an incomplete cine?): export it again, "
            "or move each time point to its own folder."
        )
    time_key = _time_key(headers, groups)
    if time_key is None:
        raise VolumeReadError(
            f"The series in {folder} has {len(headers)} images at only {len(groups)} positions and no "
            "trigger times or temporal positions that tell them apart: it holds several volumes "
            "(echoes or repeats). Export each to its own folder."
        )
    phases = [[] for _ in range(counts[0])]
    times = np.zeros((counts[0], len(groups)))
    for k, group in enumerate(groups):
        ranked = sorted(group, key=lambda i: time_key(headers[i][1]))
        for t, i in enumerate(ranked):
            phases[t].append(headers[i])
            times[t, k] = _float_tag(headers[i][1], "TriggerTime")
    positions = positions_mm[[g[0] for g in groups]]
    phase_times = [float(v) for v in np.nanmean(times, axis=1)] if np.isfinite(times).all() else None
    return phases, positions, phase_times


def _float_tag(header, tag: str) -> float:
    value = header.get(tag, None)
    try:
        return float(value) if value not in (None, "") else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _time_key(headers, groups):
    """A header -> sort key that tells the images of each position apart, or None if no tag does."""
    for tag in ("TriggerTime", "TemporalPositionIdentifier", "InstanceNumber"):
        ok = True
        for group in groups:
            values = [_float_tag(headers[i][1], tag) for i in group]
            if not np.isfinite(values).all() or len(set(values)) < len(values):
                ok = False
                break
        if ok:
            return lambda header, tag=tag: _float_tag(header, tag)
    return None


def _slice_step(positions_mm, normal, first, folder, warnings) -> np.ndarray:
    """Vector (mm, LPS) from one slice position to the next; warns on uneven gaps."""
    if len(positions_mm) == 1:
        thickness = float(first.get("SpacingBetweenSlices", 0) or first.get("SliceThickness", 0) or 1)
        return normal * thickness
    gaps_mm = np.diff(positions_mm @ normal)
    if gaps_mm.max() - gaps_mm.min() > 0.01 * gaps_mm.mean():
        warnings.append(
            f"Slice gaps vary from {gaps_mm.min():.3g} to {gaps_mm.max():.3g} mm (missing slices?); "
            f"the volume assumes an even {gaps_mm.mean():.3g} mm."
        )
    # First-to-last over the count keeps a gantry tilt in the affine.
    return (positions_mm[-1] - positions_mm[0]) / (len(positions_mm) - 1)


def _read_pixels(headers: list, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """(K, J, I) float32 array in stored units (HU for CT), and whether every value is an exact integer."""
    data_kji = np.empty((len(headers),) + size, dtype=np.float32)
    exact_integers = True
    for k, (file, _) in enumerate(headers):
        dataset = pydicom.dcmread(file)
        try:
            pixels = dataset.pixel_array
        except Exception as error:
            syntax = getattr(dataset.file_meta, "TransferSyntaxUID", "unknown")
            raise VolumeReadError(
                f"{file}: the pixel data could not be decoded (transfer syntax {syntax}: {error}). "
                "Install a decoder (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg) or "
                "convert the series with dcm2niix."
            ) from error
        if pixels.shape != size:
            raise VolumeReadError(
                f"{file}: pixel data of shape {pixels.shape} (colour or multi-frame?) where a "
                f"{size} grey-level slice was expected: open a CT or MR series."
            )
        slope = float(dataset.get("RescaleSlope", 1) or 1)
        intercept = float(dataset.get("RescaleIntercept", 0) or 0)
        exact_integers &= (
            np.issubdtype(pixels.dtype, np.integer)
            and slope.is_integer()
            and intercept.is_integer()
            and "ModalityLUTSequence" not in dataset
        )
        data_kji[k] = apply_modality_lut(pixels, dataset)
    return data_kji, exact_integers
