"""Fuzzed NIfTI files through load_volume and the napari reader: a Volume or our error, nothing else.

Hypothesis writes 2 x 250 small NIfTI-1 files byte by byte (so that headers can lie):
random dtypes (complex, RGB, bool stored as uint8, unknown codes), shapes with zero dimensions
and up to 5D, affines with NaN, zero columns or huge values, every qform/sform code, pixdim
zero/negative/NaN, scaling NaN/inf, and truncated or gzip-truncated bytes. A Volume that comes
back must be usable: real numbers, 3D or 4D, finite positive voxel sizes.
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_consistent_seg.errors import ConsistentSegError
from napari_consistent_seg.io import Volume, load_volume

RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
RGBA32 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])
# (NIfTI datatype code, numpy dtype of the bytes on disk); "bool" is uint8 0/1 as tools write it.
DTYPES = {
    "uint8": (2, np.uint8), "int16": (4, np.int16), "int32": (8, np.int32), "float32": (16, np.float32),
    "complex64": (32, np.complex64), "float64": (64, np.float64), "rgb24": (128, RGB24),
    "int8": (256, np.int8), "uint16": (512, np.uint16), "uint32": (768, np.uint32),
    "int64": (1024, np.int64), "uint64": (1280, np.uint64), "complex128": (1792, np.complex128),
    "rgba32": (2304, RGBA32), "bool": (2, np.uint8),
}
ODD_FLOATS = [0.0, -1.0, -2.5, float("nan"), float("inf"), -float("inf"), 1e-12, 1e30, 0.7, 1.0, 2.5, 10.0]

small_float = st.floats(-300, 300, allow_nan=False, allow_infinity=False)
odd_float = st.one_of(st.sampled_from(ODD_FLOATS), small_float)


@st.composite
def nifti_files(draw):
    """(bytes of a .nii or .nii.gz file, suffix, description) with a possibly lying header."""
    ndim = draw(st.sampled_from([1, 2, 3, 3, 3, 4, 4, 5]))
    shape = draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim))
    if draw(st.integers(0, 9)) == 0:
        shape[draw(st.integers(0, ndim - 1))] = 0
    shape = tuple(shape)
    dtype_name = draw(st.sampled_from(sorted(DTYPES)))
    code, dtype = DTYPES[dtype_name]
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = int(np.prod(shape))
    if dtype_name == "bool":
        data = rng.integers(0, 2, n).astype(np.uint8)
    elif dtype.fields:
        data = np.frombuffer(rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).tobytes(), dtype)
    elif np.issubdtype(dtype, np.complexfloating):
        data = (rng.normal(size=n) + 1j * rng.normal(size=n)).astype(dtype)
    elif np.issubdtype(dtype, np.floating):
        data = (rng.normal(size=n) * 100).astype(dtype)
        if n and draw(st.booleans()):
            data[rng.integers(0, n, max(1, n // 3))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    else:
        info = np.iinfo(dtype)
        hi = min(draw(st.sampled_from([4, 2000, 2**62])), int(info.max))
        data = rng.integers(max(info.min, -hi), hi, n, dtype=dtype, endpoint=True)

    header = nib.Nifti1Header()
    header["dim"] = [ndim, *shape] + [1] * (7 - ndim)
    header["datatype"] = code if draw(st.integers(0, 7)) else draw(st.sampled_from([0, 1, 2048, 1536, 999]))
    header["bitpix"] = dtype.itemsize * 8
    header["pixdim"] = [draw(st.sampled_from([1.0, -1.0, 0.0]))] + draw(st.lists(odd_float, min_size=7, max_size=7))
    header["scl_slope"], header["scl_inter"] = draw(st.sampled_from(
        [(float("nan"), float("nan"))] * 3 + [(0.0, 0.0)] * 3 + [(1.0, -1024.0), (2.0, 0.0), (-1.0, 0.0),
                                                                 (1.0, float("nan")), (float("inf"), 0.0)]))
    header["xyzt_units"] = draw(st.sampled_from([0, 2, 10, 3, 255]))
    header["qform_code"] = draw(st.integers(0, 5))
    header["sform_code"] = draw(st.integers(0, 5))
    header["quatern_b"], header["quatern_c"], header["quatern_d"] = draw(
        st.lists(st.one_of(st.sampled_from([0.0, 0.0, 0.5, 2.0, float("nan")]), st.floats(-0.57, 0.57)),
                 min_size=3, max_size=3))
    header["qoffset_x"], header["qoffset_y"], header["qoffset_z"] = draw(st.lists(odd_float, min_size=3, max_size=3))
    rows = draw(st.sampled_from(["diagonal", "oblique", "zero_column", "random"]))
    if rows == "diagonal":
        srow = np.diag(draw(st.lists(odd_float, min_size=3, max_size=3)))
    elif rows == "oblique":
        angle = draw(st.floats(0, 6.3))
        c, s = np.cos(angle), np.sin(angle)
        srow = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]) @ np.diag([0.7, 0.7, 8.0])
    else:
        srow = np.array(draw(st.lists(odd_float, min_size=9, max_size=9))).reshape(3, 3)
        if rows == "zero_column":
            srow[:, draw(st.integers(0, 2))] = 0.0
    offsets = np.array(draw(st.lists(odd_float, min_size=3, max_size=3)))
    header["srow_x"], header["srow_y"], header["srow_z"] = np.column_stack([srow, offsets])
    header["vox_offset"] = 352
    header["magic"] = b"n+1" if draw(st.integers(0, 9)) else draw(st.sampled_from([b"ni1", b"xx"]))

    raw = header.binaryblock + b"\0\0\0\0" + data.tobytes(order="F")
    truncate = draw(st.floats(0, 1, exclude_max=True)) if draw(st.integers(0, 4)) == 0 else None
    gz = draw(st.booleans())
    if gz:
        raw = gzip.compress(raw, compresslevel=1)
    if truncate is not None:
        raw = raw[: int(len(raw) * truncate)]
    description = (f"shape {shape} {dtype_name} (code {int(header['datatype'])}) rows {rows} "
                   f"qform {int(header['qform_code'])} sform {int(header['sform_code'])} "
                   f"pixdim {header['pixdim'].tolist()} truncate {truncate} gz {gz}")
    return raw, ".nii.gz" if gz else ".nii", description


def _check_volume(volume):
    assert isinstance(volume, Volume)
    data = np.asarray(volume.data)
    assert data.ndim in (3, 4), data.shape
    assert data.dtype.kind in "biuf", data.dtype  # no complex, no structured RGB
    spacing = np.asarray(volume.spacing_mm, float)
    assert np.isfinite(spacing).all() and (spacing > 0).all(), spacing


FUZZ = settings(max_examples=250, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(nifti_files())
def test_load_volume_gives_a_volume_or_our_error(tmp_path, case):
    raw, suffix, description = case
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(raw)
    try:
        volume = load_volume(path)
    except ConsistentSegError as error:
        assert str(error), description
        return
    _check_volume(volume)


@FUZZ
@given(nifti_files())
def test_napari_reader_gives_layers_or_our_error(tmp_path, case):
    pytest.importorskip("napari")
    from napari_consistent_seg._napari._reader import get_reader

    raw, suffix, description = case
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(raw)
    reader = get_reader(str(path))
    assert reader is not None, description
    try:
        layers = reader(str(path))
    except ConsistentSegError as error:
        assert str(error), description
        return
    assert len(layers) == 1
    data, kwargs, kind = layers[0]
    assert kind in ("image", "labels")
    assert np.asarray(data).dtype.kind in "biuf"
    assert np.isfinite(kwargs["scale"]).all() and min(kwargs["scale"]) > 0, kwargs["scale"]


def test_random_bytes_named_nifti(tmp_path):
    rng = np.random.default_rng(0)
    for size in (0, 10, 348, 400, 5000):
        path = tmp_path / f"noise{size}.nii"
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        with pytest.raises(ConsistentSegError):
            load_volume(path)
