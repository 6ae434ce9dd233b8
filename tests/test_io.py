"""Qt-free tests of io: canonical orientation, NIfTI/DICOM reading, source-grid writing, phantom."""

import json
import shutil
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from napari_consistent_seg.errors import ConsistentSegError, ShapeMismatchError, VolumeReadError
from napari_consistent_seg.io import (
    PHANTOM_CLASSES,
    Geometry,
    load_labels,
    load_volume,
    make_phantom,
    save_nifti,
    save_volume,
)

# One val case per set, image and label on the same grid.
CASES = {
    "acdc": "patient028_frame01",
    "chaos_t2": "case_31",
    "btcv_ct": "case_14",
    "la": "3C2QTUNI0852XV7ZH4Q1",
}
SOFT_TISSUE_WINDOW_HU = (-160.0, 240.0)


def _case(shared_data, dataset, kind="images"):
    return shared_data / dataset / kind / f"{CASES[dataset]}.nii.gz"


def _on_disk(path):
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def _assert_same_voxels_in_world(volume, raw_ijk, source_affine, n_points=50):
    """Each canonical voxel holds the source voxel at the same world position."""
    rng = np.random.default_rng(0)
    index_zyx = np.stack([rng.integers(0, n, n_points) for n in volume.shape], axis=1)
    world = nib.affines.apply_affine(volume.geometry.affine, index_zyx)
    index_ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(source_affine), world)).astype(int)
    np.testing.assert_array_equal(volume.data[tuple(index_zyx.T)], raw_ijk[tuple(index_ijk.T)])


def _write_nifti(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_acdc_identity_affine_is_flipped_to_lps(shared_data):
    raw, affine = _on_disk(_case(shared_data, "acdc"))  # (x, y, slice), identity affine = RAS
    volume = load_volume(_case(shared_data, "acdc"))
    assert raw.shape == (224, 256, 10) and np.allclose(affine, np.eye(4))
    np.testing.assert_array_equal(volume.data, raw[::-1, ::-1, :].transpose(2, 1, 0))
    assert volume.shape == (10, 256, 224) and volume.spacing_mm == (1.0, 1.0, 1.0)
    assert not volume.geometry.spacing_known  # the 1 mm is an assumption: sizes go out in voxels
    assert not volume.is_label and volume.meta["format"] == "nifti"
    _assert_same_voxels_in_world(volume, raw, affine)


def test_chaos_t2_las_anisotropic(shared_data):
    raw, affine = _on_disk(_case(shared_data, "chaos_t2"))
    volume = load_volume(_case(shared_data, "chaos_t2"))
    assert nib.aff2axcodes(affine) == ("L", "A", "S")
    np.testing.assert_array_equal(volume.data, raw[:, ::-1, :].transpose(2, 1, 0))
    np.testing.assert_allclose(volume.spacing_mm, (7.7, 1.25, 1.25), atol=1e-3)
    assert volume.geometry.spacing_known and Geometry.from_spacing((1.0, 1.0, 1.0)).spacing_known
    assert volume.modality == "MR" and volume.data.dtype == raw.dtype
    _assert_same_voxels_in_world(volume, raw, affine)


def test_btcv_ct_lps_uint8_is_ct_but_not_hu(shared_data):
    raw, affine = _on_disk(_case(shared_data, "btcv_ct"))
    volume = load_volume(_case(shared_data, "btcv_ct"))
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    np.testing.assert_array_equal(volume.data, raw.transpose(2, 1, 0))
    assert volume.data.dtype == np.uint8 and not volume.is_label
    assert volume.modality == "CT"  # from the folder name; 8-bit values are not HU
    lo, hi = volume.display_limits()
    assert (lo, hi) != SOFT_TISSUE_WINDOW_HU and 0 <= lo < hi <= 255


def test_la_isotropic_zscored_mri_is_not_ct(shared_data):
    volume = load_volume(_case(shared_data, "la"))
    np.testing.assert_allclose(volume.spacing_mm, (0.625,) * 3)
    assert volume.modality == "unknown" and not volume.is_label


@pytest.mark.parametrize("dataset", sorted(CASES))
def test_label_files_open_as_labels(shared_data, dataset):
    labels = load_volume(_case(shared_data, dataset, "labels"))
    image = load_volume(_case(shared_data, dataset))
    assert labels.is_label and np.issubdtype(labels.data.dtype, np.integer)
    assert labels.shape == image.shape
    np.testing.assert_allclose(labels.geometry.affine, image.geometry.affine)


@pytest.mark.parametrize("dataset", sorted(CASES))
def test_label_round_trip_is_voxel_identical(shared_data, dataset, tmp_path):
    image = load_volume(_case(shared_data, dataset))
    labels = load_volume(_case(shared_data, dataset, "labels"))
    saved = save_volume(labels, tmp_path / "labels.nii.gz")  # a labels Volume: written as labels

    reloaded = load_volume(saved)
    np.testing.assert_array_equal(reloaded.data, labels.data)
    raw_source, source_affine = _on_disk(_case(shared_data, dataset, "labels"))
    raw_saved, saved_affine = _on_disk(saved)
    np.testing.assert_array_equal(raw_saved, raw_source)  # the original on-disk voxel order
    np.testing.assert_allclose(saved_affine, source_affine, atol=1e-6)
    header = nib.load(saved).header
    assert int(header["sform_code"]) == 1 and int(header["qform_code"]) == 1
    assert raw_saved.dtype == np.uint8


@pytest.mark.parametrize(
    ("axcodes", "expected_spacing"),
    [(("P", "I", "R"), (4.0, 3.0, 2.0)), (("R", "A", "I"), (4.0, 3.0, 2.0))],
)
def test_permuted_flipped_affine_is_reoriented_without_resampling(tmp_path, axcodes, expected_spacing):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 1000, size=(4, 5, 6)).astype(np.int16)
    ornt = nib.orientations.axcodes2ornt(axcodes)
    affine = np.zeros((4, 4))
    for source_axis, ((world_axis, flip), size_mm) in enumerate(zip(ornt, (2.0, 3.0, 4.0), strict=True)):
        affine[int(world_axis), source_axis] = flip * size_mm
    affine[:, 3] = (10.0, -20.0, 30.0, 1.0)
    path = _write_nifti(tmp_path / "scan.nii.gz", raw, affine)

    volume = load_volume(path)
    assert volume.spacing_mm == expected_spacing
    _assert_same_voxels_in_world(volume, raw, affine, n_points=200)
    # Axis 0 follows the acquisition (k); sagittal P-I-R: slices toward L, rows down toward I, columns P.
    if axcodes == ("P", "I", "R"):
        np.testing.assert_array_equal(volume.data, raw.transpose(2, 1, 0)[::-1])

    saved = save_volume(volume, tmp_path / "back.nii.gz")  # an image Volume: written as float32
    raw_saved, saved_affine = _on_disk(saved)
    np.testing.assert_array_equal(raw_saved, raw.astype(np.float32))
    np.testing.assert_allclose(saved_affine, affine)


def test_geometry_dict_round_trip_and_spacing_only(tmp_path):
    geometry = Geometry.from_source_grid(np.diag([-2.0, 3.0, 4.0, 1.0]), (4, 5, 6))
    restored = Geometry.from_dict(json.loads(json.dumps(geometry.to_dict())))
    np.testing.assert_array_equal(restored.affine, geometry.affine)
    assert restored == geometry and restored != Geometry.from_spacing((1.0, 1.0, 1.0))
    assert restored.shape_zyx == geometry.shape_zyx == (6, 5, 4)
    data = np.arange(120).reshape(6, 5, 4)
    np.testing.assert_array_equal(geometry.from_source(geometry.to_source(data)), data)

    spacing_only = Geometry.from_spacing((5.0, 1.5, 1.0))
    assert spacing_only.source_shape is None and spacing_only.spacing_mm == (5.0, 1.5, 1.0)
    saved = save_nifti(np.ones((2, 3, 4), np.uint8), spacing_only, tmp_path / "new")
    assert saved.name == "new.nii.gz" and nib.load(saved).shape == (4, 3, 2)
    assert nib.aff2axcodes(nib.load(saved).affine) == ("L", "P", "S")


def test_save_nifti_refuses_array_off_the_grid(tmp_path):
    geometry = Geometry.from_spacing((1.0, 1.0, 1.0), (2, 3, 4))
    with pytest.raises(ShapeMismatchError):
        save_nifti(np.zeros((4, 3, 2), np.uint8), geometry, tmp_path / "x.nii.gz")
    with pytest.raises(ConsistentSegError, match="negative"):
        save_nifti(-np.ones((2, 3, 4), np.int16), geometry, tmp_path / "x.nii.gz")
    labels_300 = np.full((2, 3, 4), 300)
    assert nib.load(save_nifti(labels_300, geometry, tmp_path / "y.nii.gz")).get_data_dtype() == np.uint16


@pytest.fixture(scope="module")
def dicom_ct(shared_data):
    return load_volume(shared_data / "totalseg_examples" / "example_ct_dicom")


def test_dicom_series_matches_totalsegmentator_grid(shared_data, dicom_ct):
    seg = load_volume(shared_data / "totalseg_examples" / "example_seg_dicom.nii.gz")
    assert dicom_ct.shape == seg.shape == (20, 512, 512)
    np.testing.assert_allclose(dicom_ct.spacing_mm, seg.spacing_mm, atol=1e-4)
    np.testing.assert_allclose(dicom_ct.geometry.affine, seg.geometry.affine, atol=1e-3)
    assert dicom_ct.modality == "CT" and dicom_ct.data.dtype == np.int16
    assert dicom_ct.data.min() <= -1000 and dicom_ct.display_limits() == SOFT_TISSUE_WINDOW_HU
    # TotalSegmentator label 5 is the liver: soft tissue in HU only if the grids align.
    assert 40 < dicom_ct.data[seg.data == 5].mean() < 200
    assert dicom_ct.meta["format"] == "dicom" and dicom_ct.meta["n_slices"] == 20


def test_one_dicom_file_loads_its_whole_series(shared_data, dicom_ct):
    one_file = sorted((shared_data / "totalseg_examples" / "example_ct_dicom").iterdir())[7]
    volume = load_volume(one_file)
    np.testing.assert_array_equal(volume.data, dicom_ct.data)
    np.testing.assert_allclose(volume.geometry.affine, dicom_ct.geometry.affine)


def _copy_slices(shared_data, folder, n_slices):
    folder.mkdir()
    files = sorted((shared_data / "totalseg_examples" / "example_ct_dicom").iterdir())[:n_slices]
    return [shutil.copy(file, folder / file.name) for file in files]


def test_folder_with_two_series_loads_the_largest_and_warns(shared_data, tmp_path):
    files = _copy_slices(shared_data, tmp_path / "mixed", 8)
    other_uid = generate_uid()
    for file in files[:3]:
        dataset = pydicom.dcmread(file)
        dataset.SeriesInstanceUID = other_uid
        dataset.save_as(file)

    volume = load_volume(tmp_path / "mixed")
    assert volume.shape == (5, 512, 512)
    assert len(volume.meta["warnings"]) == 1 and "3 slices" in volume.meta["warnings"][0]
    assert load_volume(files[0]).shape == (3, 512, 512)  # one file: its own series


def test_dicom_series_of_mixed_sizes_is_refused(shared_data, tmp_path):
    files = _copy_slices(shared_data, tmp_path / "odd", 3)
    dataset = pydicom.dcmread(files[1])
    dataset.Rows = 256
    dataset.save_as(files[1])
    with pytest.raises(VolumeReadError, match="mixes slice sizes"):
        load_volume(tmp_path / "odd")


def test_bad_files_and_folders_raise_volume_read_error(shared_data, tmp_path):
    source = _case(shared_data, "chaos_t2")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    text = tmp_path / "x.nii.gz"
    text.write_text("not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    no_dicom = tmp_path / "notes"
    no_dicom.mkdir()
    (no_dicom / "readme.txt").write_text("hello")
    five_d = _write_nifti(tmp_path / "5d.nii.gz", np.zeros((2, 2, 2, 2, 2), np.int16), np.eye(4))
    zero = _write_nifti(tmp_path / "zero.nii", np.zeros((0, 3, 3), np.int16), np.eye(4))

    expected = {
        truncated: "truncated",
        text: "not a readable NIfTI",
        empty: "empty",
        no_dicom: "no DICOM",
        five_d: "5D",
        zero: "holds no image",
        tmp_path / "missing.nii.gz": "does not exist",
        no_dicom / "readme.txt": "neither NIfTI",
    }
    for path, message in expected.items():
        with pytest.raises(VolumeReadError, match=message):
            load_volume(path)


def test_4d_loads_every_phase_and_saves_back(tmp_path):
    data = np.stack([np.full((3, 4, 5), t, np.int16) for t in range(3)], axis=-1) + 200
    volume = load_volume(_write_nifti(tmp_path / "cine.nii.gz", data, np.eye(4)))
    assert volume.shape == (3, 5, 4, 3) and volume.n_phases == 3 and volume.meta["warnings"] == []
    assert [int(volume.phase(t).data.max()) for t in range(3)] == [200, 201, 202]
    saved = save_nifti(volume.data, volume.geometry, tmp_path / "back.nii.gz", is_label=False)
    np.testing.assert_array_equal(np.asarray(nib.load(saved).dataobj), data)

    single = load_volume(_write_nifti(tmp_path / "t1.nii.gz", data[..., :1], np.eye(4)))
    assert single.shape == (5, 4, 3) and single.meta["warnings"] == []


def test_2d_image_is_one_slice(tmp_path):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    volume = load_volume(_write_nifti(tmp_path / "slice.nii", data, np.eye(4)))
    assert volume.shape == (1, 4, 3)


def test_big_endian_file_loads_as_native(tmp_path):
    data = np.arange(-600, 600, dtype=np.int16).reshape(10, 12, 10)
    header = nib.Nifti1Header(endianness=">")
    header.set_data_dtype(np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4), header), tmp_path / "big.nii")
    assert nib.load(tmp_path / "big.nii").get_data_dtype() == np.dtype(">i2")
    volume = load_volume(tmp_path / "big.nii")
    assert volume.data.dtype.isnative and volume.data.dtype == np.int16
    np.testing.assert_array_equal(volume.data, data[::-1, ::-1, :].transpose(2, 1, 0))


def test_nan_is_replaced_by_the_minimum_with_warning(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 5
    data[0, 0, 0] = np.nan
    volume = load_volume(_write_nifti(tmp_path / "nan.nii.gz", data, np.eye(4)))
    assert np.isfinite(volume.data).all() and volume.data.min() == 6
    assert "NaN" in volume.meta["warnings"][0]
    all_nan = np.full((2, 2, 2), np.nan, np.float32)
    with pytest.raises(VolumeReadError, match="NaN"):
        load_volume(_write_nifti(tmp_path / "all_nan.nii.gz", all_nan, np.eye(4)))


def test_a_label_file_with_nan_fractions_or_negatives_is_refused_not_guessed(tmp_path):
    labels = np.zeros((2, 3, 4), np.float32)
    labels[1, 1, 1:3] = 2
    volume = load_labels(_write_nifti(tmp_path / "ok.nii.gz", labels, np.eye(4)))
    assert volume.is_label and volume.data.dtype == np.uint8 and volume.data.max() == 2
    for name, value, message in [("nan", np.nan, "1 NaN or infinite voxels"), ("inf", np.inf, "infinite"),
                                 ("half", 1.5, "whole numbers"), ("negative", -1, "negative")]:
        bad = labels.copy()
        bad[0, 0, 0] = value
        with pytest.raises(VolumeReadError, match=f"{name}.nii.gz.*{message}"):
            load_labels(_write_nifti(tmp_path / f"{name}.nii.gz", bad, np.eye(4)), "the corrections")


def test_hu_ct_gets_soft_tissue_window(shared_data):
    volume = load_volume(shared_data / "totalseg_examples" / "example_ct_sm.nii.gz")
    assert volume.modality == "CT" and volume.data.dtype == np.int16 and not volume.is_label
    assert volume.display_limits() == SOFT_TISSUE_WINDOW_HU


def test_modality_argument_overrides_the_guess(shared_data):
    assert load_volume(_case(shared_data, "btcv_ct"), modality="mri").modality == "MR"
    with pytest.raises(ConsistentSegError, match="Unknown modality"):
        load_volume(_case(shared_data, "btcv_ct"), modality="PET")


def test_phantom_is_fast_deterministic_and_anatomical():
    start = time.perf_counter()
    image, labels = make_phantom("CT")
    assert time.perf_counter() - start < 1.0
    again_image, again_labels = make_phantom("CT")
    np.testing.assert_array_equal(image.data, again_image.data)
    np.testing.assert_array_equal(labels.data, again_labels.data)

    assert image.shape == labels.shape == (40, 128, 128) and image.spacing_mm == (5.0, 1.5, 1.5)
    assert set(np.unique(labels.data)) == {0, *PHANTOM_CLASSES} and labels.is_label
    assert "synthetic phantom" in image.name and image.display_limits() == SOFT_TISSUE_WINDOW_HU
    x_centre = {label: np.nonzero(labels.data == label)[2].mean() for label in PHANTOM_CLASSES}
    assert x_centre[1] < 64 < x_centre[2]  # liver on the patient's right = small x (screen left)
    assert x_centre[3] < 64 < x_centre[4]
    assert image.data[labels.data == 1].mean() == pytest.approx(100, abs=15)  # liver in HU, contrast phase
    assert image.data[labels.data == 3].mean() > image.data[labels.data == 1].mean() + 40  # enhancing kidney

    mr_image, _ = make_phantom("MR")
    assert mr_image.modality == "MR" and mr_image.data.min() >= 0
    assert mr_image.data[labels.data == 3].mean() > mr_image.data[labels.data == 1].mean()


def test_io_imports_neither_napari_nor_qt():
    code = (
        "import sys, napari_consistent_seg.io, napari_consistent_seg.io.dicom; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('napari', 'qtpy', 'PyQt6', 'PyQt5')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_gzip_members_one_after_another_and_padding_read_like_one(shared_data, tmp_path):
    """.nii.gz is read in one zlib call per gzip member (faster than nibabel's chunks): a file of
    several members (concatenated by tools such as pigz or cat) or zero-padded reads the same."""
    import gzip

    source = _case(shared_data, "chaos_t2")
    raw = gzip.decompress(source.read_bytes())
    split = tmp_path / "members.nii.gz"
    split.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]) + b"\0" * 16)
    plain = tmp_path / "plain.nii"
    plain.write_bytes(raw)
    expected = load_volume(plain)
    for path in (source, split):
        volume = load_volume(path)
        assert np.array_equal(volume.data, expected.data) and volume.geometry == expected.geometry
