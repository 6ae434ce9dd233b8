"""Bad input at every public entry point gives one of our errors with a message, never a raw one.

load_volume and the napari reader, load_model / save_user_model, prediction, fine-tuning,
evaluation and the CLI (whose main() prints "consistent-seg: error: ..." and returns 2).
"""

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import save_tiny

from napari_consistent_seg.cli import main
from napari_consistent_seg.errors import ConsistentSegError, InvalidInputError, ModelLoadError, VolumeReadError
from napari_consistent_seg.io import load_volume
from napari_consistent_seg.metrics import evaluate_labels
from napari_consistent_seg.models.store import CARD_FILE, MODULES_FILE, load_model, save_user_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("errors") / "tiny", modules="icl")


@pytest.fixture(scope="module")
def tiny_model(tiny_folder):
    return load_model(tiny_folder)


def _edited_model(tmp_path, edit):
    folder = save_tiny(tmp_path / "edited", modules="icl")
    card = json.loads((folder / CARD_FILE).read_text())
    edit(card)
    (folder / CARD_FILE).write_text(json.dumps(card))
    return folder


# ---- load_model / save_user_model -----------------------------------------------------------
def test_a_card_whose_architecture_does_not_match_its_weights(tmp_path):
    folder = _edited_model(tmp_path, lambda c: c["architecture"].update(channels=[8, 16, 32, 64, 128]))
    with pytest.raises(ModelLoadError, match="do not fit the architecture in the card"):
        load_model(folder)


def test_a_card_with_2d_weights_and_a_3d_architecture(tmp_path):
    folder = _edited_model(tmp_path, lambda c: c["architecture"].update(spatial_dims=3))
    with pytest.raises(ModelLoadError, match="patch_size|do not fit"):
        load_model(folder)


def test_an_unknown_module_kind(tmp_path):
    folder = _edited_model(tmp_path, lambda c: c["modules"].update(kind="transformer"))
    with pytest.raises(ModelLoadError, match="unknown module kind 'transformer'; known: eam, icl"):
        load_model(folder)


def test_modules_that_do_not_fit_their_weights(tmp_path):
    folder = _edited_model(tmp_path, lambda c: c["modules"].update(heads=[3, 3, 3]))
    with pytest.raises(ModelLoadError, match="modules"):
        load_model(folder)
    assert load_model(folder, with_modules=False).modules is None  # the backbone alone still loads


@pytest.mark.parametrize("name", ["x" * 300, "", "   ", "a\0b", None, 5, ["tiny"]])
def test_load_model_with_a_name_that_cannot_be_a_model(name):
    with pytest.raises(ModelLoadError) as info:
        load_model(name)
    assert len(str(info.value)) < 400  # a 300-character name is not echoed in full


@pytest.mark.parametrize("content", ["[1, 2]", "{}", "not json", b"\xff\xfe\x00binary"])
def test_load_model_with_a_card_that_is_not_a_card(tmp_path, content):
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / CARD_FILE
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ModelLoadError, match="card"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("device", ["tpu", "cuda:7", "banana"])
def test_load_model_on_a_device_this_machine_does_not_have(tiny_folder, device):
    import torch

    if torch.cuda.is_available() and device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ModelLoadError, match="cannot put the model on device"):
        load_model(tiny_folder, device=device)


@pytest.mark.parametrize("name,message", [
    ("x" * 300, "at most 100"), ("", "letters"), ("..", "letters"), ("a/b", "letters"),
    ("my model", "letters"), (None, "letters"), (5, "letters"), ("abdomen-ct-mri", "shipped model"),
])
def test_save_user_model_refuses_bad_names(tiny_model, user_model_dir, name, message):
    with pytest.raises(ModelLoadError, match=message):
        save_user_model(name, tiny_model)


def test_save_user_model_refuses_what_is_not_a_model(user_model_dir):
    with pytest.raises(ModelLoadError, match="only a loaded or fine-tuned Model"):
        save_user_model("fine", {"name": "fine"})


# ---- evaluation -----------------------------------------------------------------------------
LABELS = np.zeros((4, 8, 8), np.uint8)


@pytest.mark.parametrize("args,message", [
    ((LABELS, LABELS, {1: "a"}, (1.0, 1.0)), "spacing_mm"),
    ((LABELS, LABELS, {1: "a"}, (-1.0, 1.0, 1.0)), "positive"),
    ((LABELS, LABELS, {1: "a"}, "1mm"), "numbers"),
    ((LABELS, LABELS, None, (1.0, 1.0, 1.0)), "classes"),
    ((LABELS[None, None], LABELS[None, None], {1: "a"}, (1.0,) * 5), "2D or 3D"),
    ((LABELS.astype(complex), LABELS, {1: "a"}, (1.0, 1.0, 1.0)), "arrays of numbers"),
    (("a", "b", {1: "a"}, (1.0, 1.0, 1.0)), "2D or 3D"),
    ((LABELS, LABELS[:2], {1: "a"}, (1.0, 1.0, 1.0)), "differs from reference shape"),
])
def test_evaluate_labels_bad_input(args, message):
    with pytest.raises(ConsistentSegError, match=message):
        evaluate_labels(*args)


def test_invalid_input_is_also_a_value_error():
    assert issubclass(InvalidInputError, ValueError) and issubclass(InvalidInputError, ConsistentSegError)


# ---- the CLI --------------------------------------------------------------------------------
@pytest.fixture
def scan(tmp_path):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((24, 24, 4)).astype(np.float32), np.eye(4)), path)
    return path


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_cli_turns_our_errors_into_error_lines_and_exit_code_2(tmp_path, tiny_folder, scan, capsys):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    cases = [
        ("predict", "-m", "no-such-model", "-o", tmp_path / "out", scan),
        ("predict", "-m", "x" * 300, "-o", tmp_path / "out", scan),
        ("predict", "-m", tiny_folder, "-o", tmp_path / "out", tmp_path / "missing.nii.gz"),
        ("predict", "-m", tiny_folder, "-o", tmp_path / "a_file", scan),  # the output folder is a file
        ("evaluate", tmp_path / "missing", "-r", tmp_path),
        ("info", "no-such-model"),
        ("train", tmp_path / "missing.yaml"),
        ("train", tmp_path / "empty.yaml"),
        ("train", tmp_path / "list.yaml"),
        ("strip", tmp_path, "-o", tmp_path / "stripped"),
    ]
    for argv in cases:
        code, err = _cli(capsys, *argv)
        assert code == 2, argv
        last = err.strip().splitlines()[-1]
        assert last.startswith("consistent-seg: error: ") and "Traceback" not in err, (argv, err)


def test_cli_usage_errors_exit_with_code_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


# ---- reading scans --------------------------------------------------------------------------
@pytest.mark.parametrize("path", [None, 123, ["a.nii.gz"], 4.5])
def test_load_volume_with_something_that_is_not_a_path(path):
    with pytest.raises(VolumeReadError, match="path"):
        load_volume(path)


def test_load_volume_with_a_file_name_too_long_for_the_file_system(tmp_path):
    with pytest.raises(VolumeReadError):
        load_volume(tmp_path / ("x" * 300 + ".nii.gz"))


@pytest.mark.parametrize("path", [None, 123, [None], 4.5])
def test_napari_reader_declines_what_is_not_a_path(path):
    pytest.importorskip("napari")
    from napari_consistent_seg._napari._reader import get_reader, read_layers

    assert get_reader(path) is None
    with pytest.raises(VolumeReadError):
        read_layers(path)


# ---- prediction -----------------------------------------------------------------------------
VOLUME = np.random.default_rng(0).random((3, 24, 24)).astype(np.float32)


@pytest.mark.parametrize("kwargs,message", [
    ({"data": VOLUME.astype(np.complex64)}, "numbers"),
    ({"data": np.array([["a", "b"]])}, "numbers"),
    ({"data": VOLUME > 0.5}, "numbers"),
    ({"spacing_mm": "abc"}, "spacing_mm"),
    ({"spacing_mm": (1.0, 1.0)}, "spacing_mm"),
    ({"spacing_mm": (0.0, 1.0, 1.0)}, "spacing_mm"),
    ({"spacing_mm": (-1.0, 1.0, 1.0)}, "spacing_mm"),
    ({"spacing_mm": (float("nan"), 1.0, 1.0)}, "spacing_mm"),
    ({"device": "tpu"}, "device"),
    ({"device": "banana:3"}, "device"),
    ({"slices": [99]}, "slices"),
    ({"slices": [-99]}, "slices"),
])
def test_predict_volume_bad_input(tiny_model, kwargs, message):
    from napari_consistent_seg.inference import predict_volume

    kwargs = {"data": VOLUME, "modality": "MR", **kwargs}
    data = kwargs.pop("data")
    with pytest.raises(ConsistentSegError, match=message):
        predict_volume(tiny_model, data, **kwargs)


def test_predict_on_a_cuda_device_this_machine_lacks(tiny_model):
    import torch

    from napari_consistent_seg.inference import predict_volume

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConsistentSegError, match="CUDA"):
        predict_volume(tiny_model, VOLUME, device="cuda")


@pytest.mark.parametrize("model", [None, "tiny", 3])
def test_prediction_needs_a_loaded_model(model):
    from napari_consistent_seg.inference import predict_volume, segment
    from napari_consistent_seg.io import Geometry, Volume

    with pytest.raises(InvalidInputError, match="load_model"):
        predict_volume(model, VOLUME)
    with pytest.raises(InvalidInputError, match="load_model"):
        segment(model, Volume(VOLUME, Geometry.from_spacing((1.0, 1.0, 1.0), VOLUME.shape)))


@pytest.mark.parametrize("volume", [None, VOLUME, "scan.nii.gz"])
def test_segment_needs_a_volume(tiny_model, volume):
    from napari_consistent_seg.inference import segment

    with pytest.raises(InvalidInputError, match="load_volume"):
        segment(tiny_model, volume)
