"""napari reader, writers, sample data and layer conversion; the last tests open a real viewer."""

import nibabel as nib
import numpy as np
import pytest
from napari.layers import Image, Labels

from napari_consistent_seg._napari._reader import get_reader
from napari_consistent_seg._napari._sample_data import ct_phantom, mr_phantom
from napari_consistent_seg._napari._writer import write_image, write_labels
from napari_consistent_seg._napari.layers import (
    METADATA_KEY,
    geometry_from_layer,
    modality_from_layer,
    volume_from_layer,
)
from napari_consistent_seg.errors import VolumeReadError
from napari_consistent_seg.io import PHANTOM_CLASSES, load_volume

PLUGIN = "napari-consistent-seg"


@pytest.fixture
def chaos_case(shared_data):
    return {kind: shared_data / "chaos_t2" / kind / "case_31.nii.gz" for kind in ("images", "labels")}


@pytest.fixture
def dicom_folder(shared_data):
    return shared_data / "totalseg_examples" / "example_ct_dicom"


def test_get_reader_declines_what_it_cannot_read(tmp_path, chaos_case):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    declined = [
        tmp_path / "missing.nii.gz",
        tmp_path / "notes.txt",
        tmp_path,  # a folder without DICOM
        tmp_path / "empty",
        [str(chaos_case["images"]), str(tmp_path / "notes.txt")],
        [],
    ]
    for path in declined:
        assert get_reader(str(path) if not isinstance(path, list) else path) is None


def test_get_reader_accepts_nifti_dicom_folder_and_suffixless_dicom(chaos_case, dicom_folder):
    suffixless_slice = sorted(dicom_folder.iterdir())[0]
    for path in (chaos_case["images"], dicom_folder, suffixless_slice):
        assert callable(get_reader(str(path)))
    assert callable(get_reader([str(chaos_case["images"]), str(chaos_case["labels"])]))


def test_reader_returns_image_and_labels_layers(chaos_case):
    paths = [str(chaos_case["images"]), str(chaos_case["labels"])]
    (image, image_kwargs, image_type), (labels, labels_kwargs, labels_type) = get_reader(paths)(paths)
    volume = load_volume(chaos_case["images"])
    assert (image_type, labels_type) == ("image", "labels")
    np.testing.assert_array_equal(image, volume.data)
    assert image_kwargs["scale"] == labels_kwargs["scale"] == volume.spacing_mm
    assert image_kwargs["colormap"] == "gray"
    assert tuple(image_kwargs["contrast_limits"]) == volume.display_limits()
    ours = image_kwargs["metadata"][METADATA_KEY]
    assert ours["modality"] == "MR" and ours["source"] == str(chaos_case["images"])
    assert ours["geometry"] == volume.geometry.to_dict()
    assert np.issubdtype(labels.dtype, np.integer)


def test_a_folder_of_nifti_files_opens_each_as_acdc_distributes_a_patient(shared_data):
    folder = shared_data / "acdc_original" / "patient021"  # ED and ES frames, their _gt labels, Info.cfg
    layers = get_reader(str(folder))(str(folder))
    assert [(kwargs["name"], kind) for _, kwargs, kind in layers] == [
        ("patient021_frame01", "image"), ("patient021_frame01_gt labels", "labels"),
        ("patient021_frame13", "image"), ("patient021_frame13_gt labels", "labels")]
    assert all(kwargs["scale"] == layers[0][1]["scale"] for _, kwargs, _ in layers)  # pixdim's 10 mm slices
    assert layers[0][1]["scale"][0] == pytest.approx(10.0)


def test_reader_reads_a_series_listed_file_by_file_once(dicom_folder):
    files = [str(path) for path in sorted(dicom_folder.iterdir())[:3]]
    layers = get_reader(files)(files)
    assert len(layers) == 1 and layers[0][0].shape == (20, 512, 512)


def test_reader_raises_volume_read_error_on_bad_content(tmp_path):
    fake = tmp_path / "scan.nii.gz"
    fake.write_text("not an image")
    fake_dicom = tmp_path / "slice.dcm"
    fake_dicom.write_text("not DICOM either")
    for path in (fake, fake_dicom):
        reader = get_reader(str(path))
        with pytest.raises(VolumeReadError):
            reader(str(path))


def test_reader_shows_load_warnings(tmp_path, monkeypatch):
    import napari.utils.notifications

    shown = []
    monkeypatch.setattr(napari.utils.notifications, "show_warning", shown.append)
    path = tmp_path / "cine.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), np.diag([1.0, 1, 1, 1])), path)
    image = nib.load(path)
    image.header["pixdim"][1:4] = (2.0, 2.0, 5.0)  # a unit-scaled sform beside the real voxel size
    nib.save(image, path)
    layers = get_reader(str(path))(str(path))
    assert len(shown) == 1 and "used pixdim" in shown[0]
    assert layers[0][1]["scale"] == (5.0, 2.0, 2.0)


def test_writers_put_layers_back_on_the_source_grid(chaos_case, tmp_path):
    path = str(chaos_case["labels"])
    labels, labels_kwargs, _ = get_reader(path)(path)[0]
    written = write_labels(str(tmp_path / "labels.nii.gz"), labels, labels_kwargs)
    assert written == [str(tmp_path / "labels.nii.gz")]
    source = nib.load(chaos_case["labels"])
    saved = nib.load(written[0])
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), np.asanyarray(source.dataobj))
    np.testing.assert_allclose(saved.affine, source.affine, atol=1e-6)

    path = str(chaos_case["images"])
    image, image_kwargs, _ = get_reader(path)(path)[0]
    written = write_image(str(tmp_path / "image.nii"), image, image_kwargs)
    saved = nib.load(written[0])
    assert saved.get_data_dtype() == np.float32
    np.testing.assert_array_equal(saved.get_fdata(), np.asanyarray(nib.load(path).dataobj))


def test_writer_without_our_metadata_uses_the_scale(tmp_path):
    layer = Labels(np.ones((4, 5, 6), np.uint8), scale=(3.0, 2.0, 1.0))
    data, state, layer_type = layer.as_layer_data_tuple()
    (written,) = write_labels(str(tmp_path / "drawn.nii.gz"), data, state)
    saved = nib.load(written)
    assert saved.shape == (6, 5, 4) and saved.header.get_zooms() == (1.0, 2.0, 3.0)
    assert nib.aff2axcodes(saved.affine) == ("L", "P", "S")


def test_geometry_from_layers_without_metadata_and_2d():
    layer_3d = Image(np.zeros((4, 5, 6), np.float32), scale=(3.0, 2.0, 1.0))
    assert geometry_from_layer(layer_3d).spacing_mm == (3.0, 2.0, 1.0)
    assert geometry_from_layer(layer_3d).shape_zyx == (4, 5, 6)
    layer_2d = Labels(np.zeros((5, 6), np.uint8), scale=(0.5, 0.7))
    geometry = geometry_from_layer(layer_2d)
    assert geometry.shape_zyx == (1, 5, 6) and geometry.spacing_mm == (1.0, 0.5, 0.7)
    assert volume_from_layer(layer_2d).shape == (1, 5, 6) and volume_from_layer(layer_2d).is_label
    assert modality_from_layer(layer_2d) == "unknown"


def test_layer_geometry_survives_metadata(chaos_case):
    volume = load_volume(chaos_case["images"])
    data, kwargs, _ = get_reader(str(chaos_case["images"]))(str(chaos_case["images"]))[0]
    layer = Image(data, **kwargs)
    np.testing.assert_allclose(geometry_from_layer(layer).source_affine, volume.geometry.source_affine)
    assert modality_from_layer(layer) == "MR"


@pytest.mark.parametrize("make_sample", [ct_phantom, mr_phantom])
def test_sample_data_is_image_and_named_labels(make_sample):
    (image, image_kwargs, image_type), (labels, labels_kwargs, labels_type) = make_sample()
    assert (image_type, labels_type) == ("image", "labels")
    assert image.shape == labels.shape and "synthetic phantom" in image_kwargs["name"]
    assert labels_kwargs["metadata"][METADATA_KEY]["class_names"] == PHANTOM_CLASSES
    assert set(np.unique(labels)) == {0, *PHANTOM_CLASSES}


@pytest.mark.gui
def test_viewer_opens_and_saves_nifti_through_the_plugin(make_napari_viewer, chaos_case, tmp_path):
    viewer = make_napari_viewer()
    (image_layer,) = viewer.open(str(chaos_case["images"]), plugin=PLUGIN)
    (labels_layer,) = viewer.open(str(chaos_case["labels"]), plugin=PLUGIN)
    volume = load_volume(chaos_case["images"])
    assert isinstance(image_layer, Image) and isinstance(labels_layer, Labels)
    np.testing.assert_allclose(image_layer.scale, volume.spacing_mm)
    np.testing.assert_allclose(labels_layer.scale, volume.spacing_mm)
    assert image_layer.metadata[METADATA_KEY]["modality"] == "MR"
    np.testing.assert_allclose(geometry_from_layer(labels_layer).affine, volume.geometry.affine)

    viewer.layers.selection = {labels_layer}
    (written,) = viewer.layers.save(str(tmp_path / "edited.nii.gz"), selected=True, plugin=PLUGIN)
    source = nib.load(chaos_case["labels"])
    np.testing.assert_array_equal(np.asanyarray(nib.load(written).dataobj), np.asanyarray(source.dataobj))


@pytest.mark.gui
def test_viewer_opens_dicom_folder_through_the_plugin(make_napari_viewer, dicom_folder):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(dicom_folder), plugin=PLUGIN)
    assert isinstance(layer, Image) and layer.data.shape == (20, 512, 512)
    assert tuple(layer.contrast_limits) == (-160.0, 240.0)


@pytest.mark.gui
def test_viewer_opens_sample_data(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "ct_phantom")
    image_layer, labels_layer = viewer.layers
    assert isinstance(image_layer, Image) and isinstance(labels_layer, Labels)
    assert tuple(image_layer.scale) == (5.0, 1.5, 1.5)
    assert labels_layer.metadata[METADATA_KEY]["class_names"] == PHANTOM_CLASSES
