"""``consistent-seg cardiac-function``: ED/ES pairs and cines, JSON and table, and its errors.

The fast tests replace the segmentation by synthetic hearts (the plumbing is under test, not the
model); the slow one runs the shipped model on the Sunnybrook ED/ES frames of ../shared/data.
"""

import json

import nibabel as nib
import numpy as np
import pytest

from napari_consistent_seg import cardiac, cli
from napari_consistent_seg.io import Volume

SPACING_XYZ = (1.5, 1.5, 8.0)
KEYS = ("lv_edv_ml", "lv_esv_ml", "lv_sv_ml", "lv_ef_percent", "lv_mass_g", "rv_edv_ml", "rv_esv_ml",
        "rv_ef_percent")


def _write(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.diag([*SPACING_XYZ, 1.0]) if affine is None else affine), str(path))
    return path


def _fake_heart(shape, lv_width):
    labels = np.zeros(shape, np.uint8)
    labels[:, 4:12, 2:2 + lv_width] = 3
    labels[:, 12:14, :] = 2
    labels[:, 16:20, :lv_width] = 1
    return labels


@pytest.fixture
def fake_segmentation(monkeypatch):
    """segment_cardiac -> a heart whose LV width follows each phase's mean intensity (voxel value)."""
    def segment(model, volume, **kwargs):
        phases = [volume.phase(t).data for t in range(volume.n_phases)] if volume.n_phases else [volume.data]
        return [_fake_heart(p.shape, int(round(float(np.mean(p))))) for p in phases]

    monkeypatch.setattr(cardiac, "segment_cardiac", segment)


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_ed_es_pair_as_json(tmp_path, capsys, fake_segmentation):
    ed = _write(tmp_path / "ed.nii.gz", np.full((24, 24, 3), 8, np.int16))
    es = _write(tmp_path / "es.nii.gz", np.full((24, 24, 3), 4, np.int16))
    code, out, err = _run(capsys, "cardiac-function", "--ed", ed, "--es", es, "--json")
    assert code == 0, err
    result = json.loads(out)
    for key in KEYS:
        assert key in result
    voxel_ml = np.prod(SPACING_XYZ) / 1000
    assert result["lv_edv_ml"] == pytest.approx(8 * 8 * 3 * voxel_ml, abs=0.01)
    assert result["lv_ef_percent"] == pytest.approx(50.0)
    assert result["rv_ef_percent"] == pytest.approx(50.0)
    assert result["lv_mass_g"] == pytest.approx(1.05 * 2 * 24 * 3 * voxel_ml, abs=0.01)


def test_table_and_csv_and_voxels_for_a_file_without_voxel_size(tmp_path, capsys, fake_segmentation):
    ed = _write(tmp_path / "ed.nii.gz", np.full((24, 24, 3), 8, np.int16), np.eye(4))
    es = _write(tmp_path / "es.nii.gz", np.full((24, 24, 3), 6, np.int16), np.eye(4))
    code, out, err = _run(capsys, "cardiac-function", "--ed", ed, "--es", es, "--csv", tmp_path / "v.csv")
    assert code == 0, err
    assert "EF" in out and "25.0 %" in out and "voxels" in out and "voxel size" in out
    assert (tmp_path / "v.csv").read_text().splitlines()[0].startswith("phase,name,lv_cavity")


def test_cine_picks_ed_and_es(tmp_path, capsys, fake_segmentation):
    if not hasattr(Volume, "n_phases"):
        pytest.skip("cine Volumes (4D) have not landed yet")
    widths = [6, 8, 5, 3, 4]
    cine = np.stack([np.full((24, 24, 3), w, np.int16) for w in widths], axis=-1)
    path = _write(tmp_path / "cine.nii.gz", cine)
    code, out, err = _run(capsys, "cardiac-function", path, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["ed_phase"], result["es_phase"]) == (1, 3)
    assert len(result["lv_volumes_ml"]) == 5
    assert result["lv_ef_percent"] == pytest.approx(100 * (8 - 3) / 8)


@pytest.mark.parametrize("argv, message", [
    ((), "give a CINE"),
    (("--ed", "x.nii.gz"), "give a CINE"),
])
def test_missing_inputs_are_our_errors(capsys, argv, message):
    code, _, err = _run(capsys, "cardiac-function", *argv)
    assert code == 2 and message in err


def test_a_3d_scan_is_not_a_cine(tmp_path, capsys, fake_segmentation):
    path = _write(tmp_path / "one.nii.gz", np.full((24, 24, 3), 8, np.int16))
    code, _, err = _run(capsys, "cardiac-function", path)
    assert code == 2 and "--ed ED --es ES" in err


def test_a_non_cardiac_model_is_refused(tmp_path, capsys, fake_segmentation):
    ed = _write(tmp_path / "ed.nii.gz", np.full((24, 24, 3), 8, np.int16))
    code, _, err = _run(capsys, "cardiac-function", "--model", "abdomen-ct-mri", "--ed", ed, "--es", ed)
    assert code == 2 and "cardiac model" in err


@pytest.mark.slow
def test_shipped_model_on_sunnybrook_ed_es(shared_data, capsys):
    folder = shared_data / "sunnybrook_cine" / "images"
    code, out, err = _run(capsys, "cardiac-function", "--ed", folder / "SCD0000301_ED.nii.gz",
                          "--es", folder / "SCD0000301_ES.nii.gz", "--json")
    assert code == 0, err
    result = json.loads(out)
    # expert contours: LV EF 21.5 %, EDV 234 ml, ESV 184 ml; the shipped model with the clean-up:
    # 30.6 %, 200 ml, 139 ml: both volumes short, the ESV by more (24.8 % before the clean-up
    # refilled the collapsed slice 6 of ED, when the EDV was shorter still; docs/cardiac.md)
    assert abs(result["lv_ef_percent"] - 21.5) < 10
    assert 0.8 * 234 < result["lv_edv_ml"] < 1.1 * 234 and 0.7 * 184 < result["lv_esv_ml"] < 1.1 * 184
    # the experts drew no RV on this scan and the model finds little: said, not hidden
    assert any("much of the RV is probably missed" in w for w in result["warnings"])
