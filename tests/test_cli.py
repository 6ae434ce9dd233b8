"""The ``consistent-seg`` command line, called in-process (``cli.main``) and once as a real program."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import save_tiny, write_toy_config

from napari_consistent_seg import cli
from napari_consistent_seg.inference import keep_largest_components
from napari_consistent_seg.io import load_volume
from napari_consistent_seg.models.store import load_model

pytestmark = pytest.mark.usefixtures("user_model_dir")


@pytest.fixture(scope="module")
def ct_model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("cli-models") / "tiny-ct", name="tiny-ct", modules=None,
                     modalities=("CT",))


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_as_a_real_program():
    exe = Path(sys.executable).with_name("consistent-seg")
    if not exe.is_file():
        pytest.skip("console script not installed beside this python")
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0
    for command in ("train", "predict", "evaluate", "strip", "info", "list"):
        assert command in done.stdout


def test_predict_a_nifti_file_on_its_grid_and_affine(shared_data, ct_model, tmp_path, capsys):
    source = shared_data / "totalseg_examples" / "example_ct_sm.nii.gz"
    code, out, err = _run(capsys, "predict", "--model", ct_model, "-o", tmp_path / "out", source)
    assert code == 0, err
    written = tmp_path / "out" / "example_ct_sm.nii.gz"
    assert str(written) in out and "ml" in out
    src, seg = nib.load(source), nib.load(written)
    assert seg.shape == src.shape
    assert np.allclose(seg.affine, src.affine, atol=1e-4)
    labels = np.asarray(seg.dataobj)
    assert labels.dtype == np.uint8 and labels.max() <= 3


def test_predict_reports_voxels_where_the_file_lost_its_voxel_size(shared_data, tmp_path, capsys):
    source = shared_data / "acdc" / "images" / "patient028_frame01.nii.gz"  # identity affine
    mr_model = save_tiny(tmp_path / "tiny-mr", name="tiny-mr", modules=None)
    code, out, err = _run(capsys, "predict", "--model", mr_model, "--modality", "MR", "-o", tmp_path / "out", source)
    assert code == 0, err
    assert "voxels" in out and " ml" not in out


def test_predict_a_folder_of_nifti_files(toy_data, tmp_path, capsys):
    model = save_tiny(tmp_path / "tiny-mr", name="tiny-mr", modules=None)
    inputs = toy_data / "toy_mr" / "images"
    code, _, err = _run(capsys, "predict", "-m", model, "-o", tmp_path / "out", inputs)
    assert code == 0, err
    names = sorted(p.name for p in inputs.glob("*.nii.gz"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    for name in names:
        assert nib.load(tmp_path / "out" / name).shape == nib.load(inputs / name).shape
    # --keep-largest post-processes what the card leaves raw
    code, _, err = _run(capsys, "predict", "-m", model, "-o", tmp_path / "post", "--keep-largest", inputs)
    assert code == 0, err
    for name in names:
        raw = np.asarray(nib.load(tmp_path / "out" / name).dataobj)
        post = np.asarray(nib.load(tmp_path / "post" / name).dataobj)
        assert np.array_equal(post, keep_largest_components(raw))


def test_predict_a_dicom_folder(shared_data, ct_model, tmp_path, capsys):
    series = shared_data / "totalseg_examples" / "example_ct_dicom"
    code, _, err = _run(capsys, "predict", "--model", ct_model, "-o", tmp_path / "out", series)
    assert code == 0, err
    written = tmp_path / "out" / "example_ct_dicom.nii.gz"
    scan, seg = load_volume(series), load_volume(written)
    assert seg.shape == scan.shape == (20, 512, 512)
    assert np.allclose(seg.geometry.affine, scan.geometry.affine, atol=1e-3)


def test_info_json_prints_the_card_and_list_shows_user_models(ct_model, user_model_dir, capsys):
    code, out, _ = _run(capsys, "info", ct_model, "--json")
    assert code == 0
    card = json.loads(out)
    assert card["classes"] == {"0": "background", "1": "class 1", "2": "class 2", "3": "class 3"}
    assert card["modalities"] == ["CT"]
    code, out, _ = _run(capsys, "info", ct_model)
    assert code == 0 and "tiny-ct" in out and "external modules: no" in out
    shutil.copytree(ct_model, user_model_dir / "mine")
    code, out, _ = _run(capsys, "list")
    assert code == 0 and "tiny-ct" in out and "user" in out
    assert load_model("mine").name == "tiny-ct"
    # the shipped abdomen model was trained in two stages; info names the first
    code, out, _ = _run(capsys, "info", "abdomen-ct-mri")
    assert code == 0 and "started from abdomen-ct-mri of 2026-11-22: eam for 2000 iterations" in out
    # and what the benchmark measured, with the post-processing users get
    assert "on chaos_t2 (MR, 3 val cases), largest component per class, the region search first: Dice" in out


def test_evaluate_writes_a_csv(toy_data, tmp_path, capsys):
    references = toy_data / "toy_mr" / "labels"
    predictions = tmp_path / "pred"
    predictions.mkdir()
    for path in sorted(references.glob("*.nii.gz"))[:2]:
        shutil.copy(path, predictions / path.name)  # perfect predictions
    code, _, err = _run(capsys, "evaluate", predictions, "-r", references, "--csv", tmp_path / "scores.csv")
    assert code == 0, err
    with open(tmp_path / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 3  # two cases, three classes
    assert {r["case"] for r in rows} == {"case00", "case01"}
    assert all(float(r["dice"]) == 1.0 for r in rows)


def test_train_resume_max_minutes_and_strip(toy_data, tmp_path, capsys):
    config = write_toy_config(tmp_path / "toy.yaml", toy_data, "icl")
    run = tmp_path / "run"
    code, _, err = _run(capsys, "train", config, "--run-dir", run, "--iterations", 2, "--device", "cpu")
    assert code == 0, err
    assert json.loads((run / "state.json").read_text())["iteration"] == 2
    code, _, err = _run(capsys, "train", config, "--run-dir", run, "--iterations", 4, "--resume",
                        "--max-minutes", 10)
    assert code == 0, err
    assert "from iteration 2 to 4" in err
    assert json.loads((run / "state.json").read_text())["iteration"] == 4
    code, out, err = _run(capsys, "train", config, "--run-dir", run, "--iterations", 6, "--resume",
                          "--max-minutes", 1e-6)
    assert code == 0 and "early" in out
    assert json.loads((run / "state.json").read_text())["iteration"] == 4
    code, out, err = _run(capsys, "strip", run, "-o", tmp_path / "stripped")
    assert code == 0, err
    model = load_model(tmp_path / "stripped")
    assert model.modules is not None and model.card.training.iterations == 4
    code, _, _ = _run(capsys, "strip", run, "-o", tmp_path / "bare", "--no-modules")
    assert code == 0 and load_model(tmp_path / "bare").modules is None


@pytest.mark.parametrize("argv,message", [
    (["predict", "--model", "no-such-model", "-o", "{tmp}/o", "{tmp}/x.nii.gz"], "no model called 'no-such-model'"),
    (["predict", "--model", "{model}", "-o", "{tmp}/o", "{tmp}/missing.nii.gz"], "does not exist"),
    (["info", "no-such-model"], "no model called"),
    (["strip", "{tmp}", "-o", "{tmp}/o"], "not a training run folder"),
    (["train", "{tmp}/missing.yaml", "--run-dir", "{tmp}/run"], "cannot read config"),
    (["evaluate", "{model}", "-r", "{tmp}/nothing"], "no prediction had a matching reference"),
])
def test_bad_inputs_exit_non_zero_with_a_clear_message(argv, message, ct_model, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, model=ct_model) for a in argv]
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert "consistent-seg: error: " in err and message in err.split("consistent-seg: error: ")[1]


def test_unreadable_input_is_skipped_and_the_exit_code_says_so(ct_model, tmp_path, capsys):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file")
    code, _, err = _run(capsys, "predict", "-m", ct_model, "-o", tmp_path / "out", bad)
    assert code == 1 and "skipped" in err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", "x.nii.gz"])  # --model and -o missing
    assert exc.value.code == 2
