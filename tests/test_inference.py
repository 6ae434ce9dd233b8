"""Whole-volume prediction (2D slice by slice, 3D sliding window) and class-attention maps."""

import json
import threading

import numpy as np
import pytest
import torch
from conftest import save_tiny

from napari_consistent_seg.errors import (
    Cancelled,
    ConsistentSegError,
    ShapeMismatchError,
)
from napari_consistent_seg.inference import (
    PRECISION_ENV,
    attention_maps,
    bilinear_argmax,
    inference_precision,
    keep_largest_components,
    pick_device,
    predict_volume,
    uses_region,
)
from napari_consistent_seg.models.store import CARD_FILE, load_model

pytestmark = pytest.mark.usefixtures("user_model_dir")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random models: 2D MR with ICL modules, 2D CT without modules, 3D MR."""
    root = tmp_path_factory.mktemp("models")
    mr = save_tiny(root / "mr", name="tiny-mr")
    ct = save_tiny(root / "ct", name="tiny-ct", modules=None, modalities=("CT",))
    vol3d = save_tiny(root / "3d", name="tiny-3d", spatial_dims=3, modules=None, patch_size=(16, 32, 32))
    return {"mr": load_model(mr), "ct": load_model(ct), "3d": load_model(vol3d), "mr_path": mr}


def _volume(shape, seed=0):
    return np.random.default_rng(seed).normal(500, 100, shape).astype(np.float32)


def test_pick_device_is_cpu_here():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert pick_device() == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "mps")
    assert pick_device("cpu") == torch.device("cpu")


def test_predict_2d_labels_on_the_input_grid_and_probabilities_sum_to_one(models):
    data = _volume((5, 61, 47))
    calls = []
    pred = predict_volume(models["mr"], data, modality="MR", batch_size=2, return_probabilities=True,
                          progress=lambda done, total: calls.append((done, total)))
    assert pred.labels.shape == (5, 61, 47) and pred.labels.dtype == np.uint8
    assert pred.probabilities.shape == (4, 5, 61, 47) and pred.probabilities.dtype == np.float16
    assert np.allclose(pred.probabilities.sum(0, dtype=np.float32), 1.0, atol=3e-3)
    top2 = np.sort(pred.probabilities.astype(np.float32), axis=0)[-2:]
    clear = top2[1] - top2[0] > 2e-3  # float16 rounding may tie the two best classes elsewhere
    assert np.array_equal(pred.labels[clear], pred.probabilities.argmax(0)[clear])
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert pred.modality == "MR" and pred.warnings == []
    # a single (Y, X) image gives (Y, X) labels
    single = predict_volume(models["mr"], data[0], modality="MR", return_probabilities=True)
    assert single.labels.shape == (61, 47) and single.probabilities.shape == (4, 61, 47)
    one_slice = predict_volume(models["mr"], data[:1], modality="MR", return_probabilities=True)
    assert np.allclose(single.probabilities, one_slice.probabilities[:, 0], atol=1e-3)


def test_keep_largest_components_removes_islands_class_by_class():
    labels = np.zeros((6, 20, 20), np.uint8)
    labels[1:4, 2:10, 2:10] = 1      # the organ
    labels[5, 15:17, 15:17] = 1      # an island of class 1 on another slice
    labels[1:3, 12:18, 12:18] = 2    # class 2: two pieces touching only at a corner count as one
    labels[3, 18:20, 18:20] = 2
    labels[0, 0, 19] = 3             # a class with one voxel keeps it
    kept = keep_largest_components(labels)
    assert kept.dtype == labels.dtype and kept is not labels
    expected = labels.copy()
    expected[5, 15:17, 15:17] = 0
    assert np.array_equal(kept, expected)
    assert labels[5, 15, 15] == 1  # the input is left as it was
    empty = np.zeros((3, 4, 4), np.uint8)
    assert np.array_equal(keep_largest_components(empty), empty)


def test_post_processing_follows_the_card_unless_asked(models, monkeypatch):
    data = _volume((6, 40, 40), seed=3)
    model = models["ct"]
    raw = predict_volume(model, data, modality="CT", keep_largest=False).labels
    post = predict_volume(model, data, modality="CT", keep_largest=True).labels
    assert np.array_equal(post, keep_largest_components(raw))
    assert np.array_equal(predict_volume(model, data, modality="CT").labels, raw)  # card says nothing: off
    monkeypatch.setitem(model.card, "postprocessing", {"keep_largest_component": True})
    assert np.array_equal(predict_volume(model, data, modality="CT").labels, post)
    # a preview of some slices is never post-processed (it needs the whole volume)
    assert np.array_equal(predict_volume(model, data, modality="CT", slices=[1, 2]).labels, raw[1:3])


def test_predict_2d_resamples_to_the_training_spacing_and_back(tmp_path):
    folder = save_tiny(tmp_path / "spaced")
    card = json.loads((folder / CARD_FILE).read_text())
    card["target_spacing_mm"] = [1.0, 1.0]
    (folder / CARD_FILE).write_text(json.dumps(card))
    model = load_model(folder)
    data = _volume((3, 40, 30))
    pred = predict_volume(model, data, spacing_mm=(5.0, 0.7, 1.6), modality="MR", return_probabilities=True)
    assert pred.labels.shape == (3, 40, 30)
    assert np.allclose(pred.probabilities.sum(0, dtype=np.float32), 1.0, atol=3e-3)
    plain = predict_volume(model, data, modality="MR", return_probabilities=True)
    assert not np.allclose(plain.probabilities, pred.probabilities)  # it did resample


def test_predict_3d_sliding_window_labels_on_the_input_grid(models):
    data = _volume((13, 30, 21))
    calls = []
    pred = predict_volume(models["3d"], data, modality="MR", return_probabilities=True,
                          progress=lambda done, total: calls.append(done))
    assert pred.labels.shape == (13, 30, 21)
    assert pred.probabilities.shape == (4, 13, 30, 21)
    assert np.allclose(pred.probabilities.sum(0, dtype=np.float32), 1.0, atol=3e-3)
    assert calls and calls == sorted(calls)
    big = predict_volume(models["3d"], _volume((20, 70, 40)), modality="MR")  # several windows
    assert big.labels.shape == (20, 70, 40)


@pytest.mark.parametrize("which", ["mr", "3d"])
def test_cancel_raises_cancelled(models, which):
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        predict_volume(models[which], _volume((4, 32, 32)), modality="MR", cancel=stop)
    done = []

    def cancel_after_first():
        return bool(done)

    with pytest.raises(Cancelled):
        predict_volume(models["mr"], _volume((6, 32, 32)), modality="MR", batch_size=2,
                       progress=lambda d, t: done.append(d), cancel=cancel_after_first)
    assert done == [2]


def test_warnings_for_nan_voxels_and_modality_mismatch(models):
    data = _volume((2, 32, 32))
    data[0, 3, 4] = np.nan
    pred = predict_volume(models["mr"], data, modality="MR")
    assert any("NaN" in w for w in pred.warnings)
    assert pred.labels.shape == (2, 32, 32)
    ct_on_mr = predict_volume(models["ct"], _volume((2, 32, 32)), modality="MR")
    assert any("trained on CT, not MR" in w for w in ct_on_mr.warnings)
    unknown = predict_volume(models["mr"], _volume((2, 32, 32)))
    assert any("modality unknown" in w for w in unknown.warnings)


def test_bad_arrays_are_refused_with_a_clear_error(models):
    with pytest.raises(ShapeMismatchError, match="expected a"):
        predict_volume(models["mr"], np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ShapeMismatchError, match="empty"):
        predict_volume(models["mr"], np.zeros((0, 8, 8), np.float32))
    with pytest.raises(ConsistentSegError, match="not numbers"):
        predict_volume(models["mr"], np.full((1, 8, 8), "a"))


def test_attention_maps_shape_and_head_scale_selection(models):
    data = _volume((3, 61, 47))
    calls = []
    maps = attention_maps(models["mr"], data, modality="MR", progress=lambda d, t: calls.append(d))
    assert maps.shape == (4, 3, 61, 47) and maps.dtype == np.float32
    assert calls and calls[-1] == 3
    assert (maps >= 0).all()
    head0 = attention_maps(models["mr"], data, modality="MR", head=0)
    head1 = attention_maps(models["mr"], data, modality="MR", head=1)
    assert not np.allclose(head0, head1)
    assert np.allclose((head0 + head1) / 2, maps, atol=1e-4)  # None averages the heads
    fine = attention_maps(models["mr"], data, modality="MR", scale=2)
    assert fine.shape == maps.shape and not np.allclose(fine, maps)
    assert attention_maps(models["mr"], data[1], modality="MR").shape == (4, 61, 47)
    with pytest.raises(ValueError, match="scale must be"):
        attention_maps(models["mr"], data, scale=3)
    with pytest.raises(ValueError, match="heads 0..1"):
        attention_maps(models["mr"], data, head=2)


def test_attention_maps_need_modules_and_a_2d_model(models):
    with pytest.raises(ConsistentSegError, match="without its external modules"):
        attention_maps(models["ct"], _volume((1, 16, 16)))
    without = load_model(models["mr_path"], with_modules=False)
    with pytest.raises(ConsistentSegError, match="without its external modules"):
        attention_maps(without, _volume((1, 16, 16)))


def test_the_input_array_is_left_as_it_was(models):
    data = _volume((3, 40, 40), seed=5)
    before = data.copy()
    predict_volume(models["ct"], data, modality="CT", spacing_mm=(2.0, 0.7, 0.7))
    predict_volume(models["mr"], data, modality="MR")
    assert np.array_equal(data, before)


def test_named_stages_compose_to_predict_volume(models):
    from napari_consistent_seg.inference import infer, post_process, prepare_array

    model = models["mr"]
    data = _volume((4, 50, 36), seed=6)
    prepared = prepare_array(model, data, (3.0, 1.0, 1.0), "MR")
    assert prepared.data is data or np.shares_memory(prepared.data, data)  # no normalised copy is made
    inferred = infer(model, prepared, batch_size=3)
    assert inferred.labels.shape == (4, 50, 36) and inferred.probabilities is None
    labels = post_process(model, inferred.labels, keep_largest=True)
    assert np.array_equal(labels, predict_volume(model, data, spacing_mm=(3.0, 1.0, 1.0), modality="MR",
                                                 keep_largest=True).labels)


def test_label_upsampling_keeps_the_grid_and_mostly_agrees(tmp_path):
    from napari_consistent_seg.inference import infer, prepare_array

    folder = save_tiny(tmp_path / "spaced")
    card = json.loads((folder / CARD_FILE).read_text())
    card["target_spacing_mm"] = [1.0, 1.0]
    (folder / CARD_FILE).write_text(json.dumps(card))
    model = load_model(folder)
    prepared = prepare_array(model, _volume((3, 40, 30)), (5.0, 0.5, 0.5), "MR")
    assert prepared.model_size_yx == (20, 15)
    by_probs = infer(model, prepared, upsampling="probabilities").labels
    by_labels = infer(model, prepared, upsampling="labels").labels
    assert by_labels.shape == by_probs.shape == (3, 40, 30)
    assert (by_labels == by_probs).mean() > 0.8
    with pytest.raises(ValueError, match="upsampling"):
        infer(model, prepared, upsampling="cubic")


def test_keep_largest_components_matches_monai():
    from monai.transforms import KeepLargestConnectedComponent

    labels = np.random.default_rng(1).integers(0, 4, (8, 30, 30)).astype(np.uint8)
    labels[labels == 2] = 0  # a class absent in between
    keep = KeepLargestConnectedComponent(applied_labels=[1, 3], is_onehot=False, independent=True)
    assert np.array_equal(keep_largest_components(labels), np.asarray(keep(labels[None].copy()))[0])
    assert np.array_equal(keep_largest_components(labels[0]), np.asarray(keep(labels[:1].copy()))[0])


def test_inference_threads_follow_the_env_and_the_idle_cores(monkeypatch):
    from napari_consistent_seg import inference

    monkeypatch.setenv(inference.THREADS_ENV, "3")
    assert inference.inference_threads() == 3
    monkeypatch.setenv(inference.THREADS_ENV, "many")
    with pytest.raises(ConsistentSegError, match="whole number"):
        inference.inference_threads()
    monkeypatch.delenv(inference.THREADS_ENV)
    monkeypatch.setattr(inference.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(inference.torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(inference, "_busy_cores", lambda: 0.0)
    assert inference.inference_threads() == 4
    monkeypatch.setattr(inference, "_busy_cores", lambda: 2.0)
    assert inference.inference_threads() == 2
    monkeypatch.setattr(inference, "_busy_cores", lambda: 9.0)
    assert inference.inference_threads() == 1


def test_a_busy_core_reading_holds_for_a_while(monkeypatch):
    """/proc/loadavg is read (three times, 5 ms apart) once per BUSY_READING_HOLDS_S, not per call."""
    from napari_consistent_seg import inference

    reads = []
    monkeypatch.setattr(inference, "_read_busy_cores", lambda samples: reads.append(samples) or 1.0)
    monkeypatch.setattr(inference, "_BUSY_READ", [-1e9, 0.0])
    assert inference._busy_cores() == 1.0 and inference._busy_cores() == 1.0
    assert len(reads) == 1
    monkeypatch.setattr(inference, "BUSY_READING_HOLDS_S", 0.0)
    inference._busy_cores()
    assert len(reads) == 2


def test_inference_restores_torch_threads(models, monkeypatch):
    from napari_consistent_seg import inference

    before = torch.get_num_threads()
    monkeypatch.setattr(inference, "inference_threads", lambda: 1)
    seen = []
    predict_volume(models["mr"], _volume((2, 32, 32)), modality="MR",
                   progress=lambda d, t: seen.append(torch.get_num_threads()))
    assert seen == [1] and torch.get_num_threads() == before


@pytest.mark.parametrize("size_in,size_out", [((29, 23), (64, 50)), ((40, 40), (17, 90)), ((3, 2), (11, 11)),
                                              ((1, 1), (4, 4)), ((32, 32), (32, 32))])
def test_bilinear_argmax_gives_the_labels_of_resized_probabilities(size_in, size_out):
    """Same labels as resizing the probabilities bilinearly and taking the argmax, up or down."""
    torch.manual_seed(0)
    logits = torch.nn.functional.avg_pool2d(torch.randn(3, 5, *size_in) * 4, 3, 1, 1)  # regions, not noise
    probs = logits.softmax(1)
    expected = torch.nn.functional.interpolate(probs, size=size_out, mode="bilinear", align_corners=False).argmax(1)
    got = bilinear_argmax(probs, size_out)
    assert got.dtype == torch.uint8 and got.shape == (3, *size_out)
    assert torch.equal(got.long(), expected)


def test_precision_follows_the_device_and_the_environment(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert inference_precision(torch.device("cpu")) in ("bfloat16", "float32")
    assert inference_precision(torch.device("cuda")) == "float16"
    monkeypatch.setenv(PRECISION_ENV, "float32")
    assert inference_precision(torch.device("cpu")) == "float32"
    assert inference_precision(torch.device("cuda")) == "float32"
    monkeypatch.setenv(PRECISION_ENV, "half")
    with pytest.raises(ConsistentSegError, match="auto or float32"):
        inference_precision(torch.device("cpu"))


def _ringed_heart(n_slices: int, slices) -> np.ndarray:
    """(n_slices, 64, 64) labels: on ``slices`` an LV cavity (3) inside a ring of myocardium (2)."""
    yy, xx = np.mgrid[:64, :64]
    r2 = (yy - 32) ** 2 + (xx - 32) ** 2
    labels = np.zeros((n_slices, 64, 64), np.uint8)
    labels[list(slices)] = np.where(r2 <= 8 ** 2, 3, np.where(r2 <= 14 ** 2, 2, 0)).astype(np.uint8)
    return labels


def test_corrections_win_and_keep_their_lv_slices_through_the_cardiac_clean_up(models):
    """What a fine-tune's Accept runs: the user's voxels replace the prediction, and the cardiac
    clean-up does not drop a slice the user corrected and left LV on (as it drops an atrium above
    the base)."""
    from napari_consistent_seg.inference import post_process, segment
    from napari_consistent_seg.io.volume import Geometry, Volume

    cardiac = load_model("cardiac-cine-mri", with_modules=False)
    yy, xx = np.mgrid[:64, :64]
    labels = _ringed_heart(6, range(1, 6))
    labels[0][(yy - 32) ** 2 + (xx - 32) ** 2 <= 12 ** 2] = 3  # a cavity with no wall: an atrium
    spacing = (8.0, 1.5, 1.5)
    assert not (post_process(cardiac, labels, None, spacing)[0] == 3).any()
    painted, known = np.zeros_like(labels), np.zeros(labels.shape, bool)
    known[0, 30:34, 30:34] = True
    painted[known] = 3
    kept = post_process(cardiac, labels, None, spacing, corrections=(painted, known))
    assert (kept[0] == 3).sum() == (labels[0] == 3).sum()
    painted[known] = 0  # the user erased there and left no LV on the slice: nothing to keep
    assert not (post_process(cardiac, labels, None, spacing, corrections=(painted, known))[0] == 3).any()
    corrected = labels.copy()  # the segmentation corrected in place: a dab erased on the cavity's edge
    corrected[known] = 0
    kept = post_process(cardiac, labels, None, spacing, corrections=(corrected, known))
    assert (kept[0] == 3).sum() == (labels[0] == 3).sum()  # the user saw heart there: kept
    # a fine-tune's Accept passes the start too: a slice the user left alone keeps the start's LV slices
    elsewhere = np.zeros(labels.shape, bool)
    elsewhere[3, 30:34, 30:34] = True  # the user corrected slice 3 only
    fixes = np.where(elsewhere, labels, 0)
    assert not (post_process(cardiac, labels, None, spacing, corrections=(fixes, elsewhere))[0] == 3).any()
    kept = post_process(cardiac, labels, None, spacing, corrections=(fixes, elsewhere, labels))
    assert (kept[0] == 3).sum() == (labels[0] == 3).sum()  # the start had LV there: the fine-tune keeps it
    no_lv = labels.copy()
    no_lv[0] = 0
    assert not (post_process(cardiac, labels, None, spacing, corrections=(fixes, elsewhere, no_lv))[0] == 3).any()
    erased = elsewhere.copy()
    erased[0] = labels[0] == 3  # the user erased the start's slice-0 cavity: their word wins
    fixes = np.where(erased, labels, 0)
    fixes[0] = 0
    assert not (post_process(cardiac, labels, None, spacing, corrections=(fixes, erased, labels))[0] == 3).any()

    data = _volume((5, 40, 40))
    volume = Volume(data, Geometry.from_spacing((4.0, 1.5, 1.5), data.shape), name="scan", modality="MR")
    plain = segment(models["mr"], volume).data
    fixes, where = np.zeros_like(plain), np.zeros(plain.shape, bool)
    where[2, 10:20, 10:20] = True
    fixes[where] = (plain[where] + 1) % models["mr"].backbone.out_channels
    corrected = segment(models["mr"], volume, corrections=(fixes, where)).data
    np.testing.assert_array_equal(corrected, np.where(where, fixes, plain))
    with pytest.raises(ShapeMismatchError, match="grid"):
        segment(models["mr"], volume, corrections=(fixes[:2], where[:2]))


def test_a_fine_tune_holds_the_heart_to_the_start_where_the_user_said_nothing():
    """On the slices the user left alone, a fine-tune's result has no heart past the start's first
    or last heart slice unless the user labeled heart past it on that side, on those end slices no
    heart where the start has background."""
    from napari_consistent_seg.inference import post_process, shown_heart_slices

    cardiac = load_model("cardiac-cine-mri", with_modules=False)
    yy, xx = np.mgrid[:64, :64]
    tuned = _ringed_heart(8, range(8))
    start = tuned.copy()
    start[[0, 5, 6, 7]] = 0  # the start's heart: slices 1-4
    spacing = (8.0, 1.5, 1.5)
    known = np.zeros(tuned.shape, bool)
    known[2, 30:34, 30:34] = True  # a correction inside the start's heart
    painted = np.where(known, tuned, 0)
    np.testing.assert_array_equal(shown_heart_slices(painted, known, start), [0, 1, 1, 1, 1, 0, 0, 0])
    out = post_process(cardiac, tuned, None, spacing, corrections=(painted, known, start))
    np.testing.assert_array_equal(out.reshape(8, -1).any(1), [0, 1, 1, 1, 1, 0, 0, 0])
    assert post_process(cardiac, tuned, None, spacing, corrections=(painted, known)).reshape(8, -1).any(1).all()
    wider = tuned.copy()  # a thicker wall on the start's end slices 1 and 4: held to the start's outline
    wider[[1, 4]] = np.where((yy - 32) ** 2 + (xx - 32) ** 2 <= 17 ** 2, np.maximum(tuned[[1, 4]], 2), 0)
    out = post_process(cardiac, wider, None, spacing, corrections=(painted, known, start))
    np.testing.assert_array_equal(out[[1, 4]] > 0, start[[1, 4]] > 0)
    np.testing.assert_array_equal(out[[2, 3]], wider[[2, 3]])
    known[1, 40:44, 30:34] = True  # the user corrected slice 1: the fine-tune's call stands there
    painted = np.where(known, wider, 0)
    out = post_process(cardiac, wider, None, spacing, corrections=(painted, known, start))
    assert (out[1] > 0).sum() == (wider[1] > 0).sum() and (out[4] > 0).sum() == (start[4] > 0).sum()
    known[1] = False
    painted = np.where(known, tuned, 0)
    shrunk = tuned.copy()  # the fine-tune left a scrap of slice 3's LV: the clean-up refills it
    shrunk[3] = np.where((yy - 32) ** 2 + (xx - 32) ** 2 <= 6 ** 2, 2, 0)
    for corrections in ((painted, known, start), (painted, known)):
        out = post_process(cardiac, shrunk, None, spacing, corrections=corrections)
        np.testing.assert_array_equal(out[3], tuned[3])

    known[6, 30:34, 30:34] = True  # heart labeled past the start's last slice: that side is open
    painted = np.where(known, tuned, 0)
    np.testing.assert_array_equal(shown_heart_slices(painted, known, start), [0, 1, 1, 1, 1, 1, 1, 1])
    out = post_process(cardiac, tuned, None, spacing, corrections=(painted, known, start))
    np.testing.assert_array_equal(out.reshape(8, -1).any(1), [0, 1, 1, 1, 1, 1, 1, 1])
    erased = known.copy()  # only background labeled there: nothing shown
    np.testing.assert_array_equal(shown_heart_slices(np.where(erased & (np.arange(8) < 6)[:, None, None], tuned, 0),
                                                     erased, start), [0, 1, 1, 1, 1, 0, 0, 0])
    nothing = np.zeros_like(start)
    np.testing.assert_array_equal(shown_heart_slices(painted, known, nothing), np.ones(8, bool))
    np.testing.assert_array_equal(shown_heart_slices(nothing, known, nothing), np.zeros(8, bool))


def test_classes_the_user_did_not_label_keep_the_starting_labels():
    """A fine-tune's result: the user's voxels win; a class the user labeled on no known voxel
    (nobody corrected it, or it was only erased or painted over) is neither lost to background nor
    moved; a labeled class follows the prediction, and may take a held class's voxels."""
    from napari_consistent_seg.inference import apply_corrections, labeled_classes

    start = np.array([[0, 1, 1, 2, 2, 3, 0, 0]], np.uint8)
    tuned = np.array([[0, 1, 0, 0, 2, 1, 2, 3]], np.uint8)
    labels = np.array([[0, 1, 0, 0, 0, 0, 0, 0]], np.uint8)
    known = labels.astype(bool)
    assert labeled_classes(labels, known, start) == [1]
    assert labeled_classes(labels, known) is None
    # voxel 2: 1 -> background (1 is labeled) follows; voxel 3: 2 -> background, kept 2;
    # voxel 5: 3 -> 1 (labeled) allowed; voxels 6-7: new 2 / 3, not allowed
    np.testing.assert_array_equal(apply_corrections(tuned, labels, known, start), [[0, 1, 0, 2, 2, 1, 0, 0]])
    np.testing.assert_array_equal(apply_corrections(tuned, labels, known), tuned)  # no start: no rule
    erased = known.copy()
    erased[0, 3] = True  # an erase where the start said 2: background is labeled, class 2 only erased
    assert labeled_classes(labels, erased, start) == [0, 1]
    # the erased voxel is background; class 2 is held elsewhere: not lost at 4, not grown at 6
    np.testing.assert_array_equal(apply_corrections(tuned, labels, erased, start), [[0, 1, 0, 0, 2, 1, 0, 0]])
    lost = tuned.copy()
    lost[0, 4] = 0  # the tuned network drops the erased class elsewhere: the start's 2 stands
    np.testing.assert_array_equal(apply_corrections(lost, labels, erased, start), [[0, 1, 0, 0, 2, 1, 0, 0]])


def test_a_cine_counts_the_corrections_of_every_phase(models):
    """Classes labeled on one phase of a cine count as labeled in every phase."""
    from napari_consistent_seg.inference import segment
    from napari_consistent_seg.io.volume import Geometry, Volume

    data = np.stack([_volume((3, 32, 32), seed) for seed in (0, 1)])
    cine = Volume(data, Geometry.from_spacing((4.0, 1.5, 1.5), data.shape[1:]), name="cine", modality="MR")
    plain = segment(models["mr"], cine).data
    start = np.zeros_like(plain)  # a start that said background everywhere
    labels, known = np.zeros_like(plain), np.zeros(plain.shape, bool)
    present = [int(c) for c in np.unique(plain[1]) if c != 0]
    for i, c in enumerate(present):  # phase 0 only: one known voxel of each class phase 1 shows
        known[0, 0, 0, i] = True
        labels[0, 0, 0, i] = c
    out = segment(models["mr"], cine, corrections=(labels, known, start)).data
    np.testing.assert_array_equal(out[1], plain[1])  # every class labeled: phase 1 follows the model
    out = segment(models["mr"], cine, corrections=(np.zeros_like(labels), known, start)).data
    assert not out[1].any()  # only background labeled: every class held, the start (all background) stays


def test_the_busy_core_reading_leaves_out_our_own_threads(monkeypatch, tmp_path):
    """torch's OpenMP workers spin after a batch: a reading taken then must not count them as
    another process's load (it sent back-to-back predictions to one thread)."""
    from napari_consistent_seg import inference

    loadavg = tmp_path / "loadavg"
    loadavg.write_text("1.20 0.80 0.50 4/312 4242\n")
    monkeypatch.setattr(inference, "LOADAVG", str(loadavg))
    monkeypatch.setattr(inference, "_own_running_threads", lambda: 3)
    assert inference._read_busy_cores(3) == 1.0
    monkeypatch.setattr(inference, "_own_running_threads", lambda: 5)
    assert inference._read_busy_cores(1) == 0.0
    assert inference._own_running_threads() >= 1  # the real count: at least the thread asking


def test_channels_last_copy_gives_the_backbone_labels_and_follows_new_weights(models, monkeypatch):
    """On the CPU, 2D labels come from a channels-last copy of the backbone in the inference
    precision (bf16 where the CPU has it natively, else float32); the copy is made again when the
    weights or the precision change (fine-tuning, loading) and not otherwise."""
    from napari_consistent_seg import inference

    model = models["ct"]
    backbone = model.backbone.eval()
    cpu = torch.device("cpu")
    x = torch.rand(3, 1, 48, 40)
    monkeypatch.setattr(inference, "inference_precision", lambda device: "bfloat16")
    copy = inference._channels_last_copy(backbone, cpu)
    assert copy is not backbone and copy is inference._channels_last_copy(backbone, cpu)
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    with torch.inference_mode():
        native = copy(x.bfloat16().contiguous(memory_format=torch.channels_last)).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = backbone(x).float()
    assert native.is_contiguous(memory_format=torch.channels_last)
    assert (native.argmax(1) == mixed.argmax(1)).float().mean() > 0.99
    assert torch.allclose(native, mixed, atol=0.1 * mixed.abs().max().item())
    with torch.no_grad():
        next(backbone.parameters()).add_(0.5)
    assert inference._channels_last_copy(backbone, cpu) is not copy
    monkeypatch.setattr(inference, "inference_precision", lambda device: "float32")
    single = inference._channels_last_copy(backbone, cpu)
    assert all(p.dtype == torch.float32 for p in single.parameters())
    with torch.inference_mode():
        got = single(x.contiguous(memory_format=torch.channels_last))
        want = backbone(x)
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item())
    assert inference._channels_last_copy(backbone, torch.device("meta")) is None


class _Threshold(torch.nn.Module):
    """A pointwise 'network': class 1 where the normalised intensity exceeds one half. Its labels
    do not depend on what else the slice holds, so a region search must give the same labels."""

    out_channels = 2
    spatial_dims = 2

    def __init__(self):
        super().__init__()
        self.pixels = 0

    def forward(self, x):
        self.pixels += x.shape[0] * x.shape[-2] * x.shape[-1]
        return torch.cat([torch.zeros_like(x), x - 0.5], 1)


def test_region_search_runs_the_organ_s_slices_and_box_only(tmp_path, monkeypatch):
    import napari_consistent_seg.inference as inference

    model = load_model(save_tiny(tmp_path / "ct", name="tiny-ct", modules=None, modalities=("CT",)))
    monkeypatch.setitem(model.card, "postprocessing", {"keep_largest_component": True})
    monkeypatch.setattr(inference, "_channels_last_copy", lambda backbone, device: None)
    net = _Threshold()
    monkeypatch.setattr(model, "backbone", net)
    data = np.full((60, 128, 128), -1000, np.int16)  # air: 0 after the CT window
    data[20:35, 30:40, 30:45] = 200                   # an organ, 0.81 after it
    data[40, 100, 100] = 200                          # a speck, on a slice the search skips
    spacing = (2.5, 1.0, 1.0)
    target = model.card.target_spacing_mm
    assert not target or tuple(target) == (1.0, 1.0)  # no in-plane resampling: pixels are voxels

    calls = []
    whole = predict_volume(model, data, spacing_mm=spacing, modality="CT", keep_largest=False).labels
    pixels_whole, net.pixels = net.pixels, 0
    found = predict_volume(model, data, spacing_mm=spacing, modality="CT",
                           progress=lambda done, total: calls.append((done, total))).labels
    assert uses_region(model) and not uses_region(model, keep_largest=False)
    assert np.array_equal(found, keep_largest_components(whole))  # the organ, not the speck
    # every 6th slice (15 mm) whole, then slices 19-35 (between the empty samples 18 and 36)
    # inside the organ's box widened by 30 mm: rows 0-70, columns 0-75
    sampled = len(range(0, 60, 6)) + 1
    assert net.pixels == sampled * 128 * 128 + (36 - 18 - 1 - 2) * 70 * 75
    assert net.pixels < pixels_whole / 2
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1] == (60, 60)
    # a volume with nothing found costs the samples only and is all background
    net.pixels = 0
    empty = predict_volume(model, np.full((60, 64, 64), -1000, np.int16), spacing_mm=spacing, modality="CT")
    assert not empty.labels.any() and net.pixels == sampled * 64 * 64
    # short volumes (a cardiac stack) run whole, as before
    net.pixels = 0
    predict_volume(model, data[:40], spacing_mm=spacing, modality="CT")
    assert net.pixels == 40 * 128 * 128


def test_keep_largest_components_in_place_looks_only_where_labels_are():
    labels = np.zeros((40, 60, 60), np.uint8)
    labels[10:20, 20:30, 20:30] = 1
    labels[25, 40, 40] = 1   # an island
    labels[12:14, 22:24, 40:45] = 2
    expected = labels.copy()
    expected[25, 40, 40] = 0
    assert np.array_equal(keep_largest_components(labels), expected) and labels[25, 40, 40] == 1
    same = keep_largest_components(labels, in_place=True)
    assert same is labels and np.array_equal(labels, expected)
    with pytest.raises(ConsistentSegError):
        keep_largest_components(np.array([[-1, 1]], np.int8))
