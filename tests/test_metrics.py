"""Hand-computed cases for napari_consistent_seg.metrics (Dice, HD95, ASD in mm, summaries, CSV)."""

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from napari_consistent_seg import metrics
from napari_consistent_seg.errors import ShapeMismatchError

CHAOS_LABEL = Path("/work/shared/data/chaos_t2/labels/case_31.nii.gz")


def edt_distances(pred_mask, ref_mask, spacing):
    """Reference path: both directed surface-distance sets from full-volume distance transforms (no crop)."""
    surface = [m ^ ndimage.binary_erosion(m) for m in (pred_mask, ref_mask)]  # default = face connectivity
    to_ref = ndimage.distance_transform_edt(~surface[1], sampling=spacing)[surface[0]]
    to_pred = ndimage.distance_transform_edt(~surface[0], sampling=spacing)[surface[1]]
    return np.concatenate([to_ref, to_pred])


def cube_pair(axis, shift=2):
    """A 4x4x4 cube and the same cube shifted by ``shift`` voxels along ``axis``, in a 12^3 grid."""
    a = np.zeros((12, 12, 12), bool)
    a[2:6, 2:6, 2:6] = True
    return a, np.roll(a, shift, axis=axis)


def ball(shape, centre, radius):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def same_or_both_nan(a, b):
    return (isinstance(a, float) and math.isnan(a) and math.isnan(b)) or a == b


def test_dice_of_known_overlaps():
    pred = np.zeros((4, 5), np.uint8)
    ref = np.zeros((4, 5), np.uint8)
    pred[0, :3] = 1  # 3 voxels
    ref[0, 1:5] = 1
    ref[1, 0] = 1  # 5 voxels, 2 shared
    pred[3, :] = 2
    ref[3, :] = 2
    assert metrics.dice(pred, ref, 1) == pytest.approx(2 * 2 / (3 + 5))
    assert metrics.dice(pred, ref, 2) == 1.0
    pred[3, :] = 0
    assert metrics.dice(pred, ref, 2) == 0.0


# Hand count for a 4x4x4 cube shifted by 2 voxels (face-connected surface, 56 voxels each way).
# Along axis 0 at spacing (3, 1, 1), per direction: the far face (16 voxels) lies 2 slices = 6 mm
# from the other cube's near face, the next ring (12) 3 mm, 24 rim voxels are shared (0), and the 4 inner
# voxels of the overlapping face are 1 mm from the other cube's side wall. Union of both directions:
# 48 x 0, 8 x 1, 24 x 3, 32 x 6 -> 95th percentile (position 105.45 of 0..111) = 6 mm,
# ASD = (8 + 72 + 192) / 112 = 17/7 mm. Along axis 2 (1 mm) the 6 and 3 become 2 and 1, the inner 1 stays:
# 48 x 0, 32 x 1, 32 x 2 -> HD95 2 mm, ASD = (32 + 64) / 112 = 6/7 mm.
@pytest.mark.parametrize(("axis", "hd95", "asd"), [(0, 6.0, 17 / 7), (2, 2.0, 6 / 7)])
def test_shifted_cubes_anisotropic(axis, hd95, asd):
    a, b = cube_pair(axis)
    spacing = (3.0, 1.0, 1.0)
    assert metrics.hd95_mm(a, b, spacing) == pytest.approx(hd95)
    assert metrics.asd_mm(a, b, spacing) == pytest.approx(asd)
    assert metrics.dice(a.astype(np.uint8), b.astype(np.uint8), 1) == pytest.approx(0.5)


def test_shifted_squares_2d():
    # 4x4 squares shifted by 2 along x at spacing (0.5, 2) mm; face-connected rim of 12 each way:
    # 4 at 4 mm, 2 at 2 mm, 4 shared (0), 2 inner voxels 0.5 mm from the rim along y.
    # Union: 8 x 0, 4 x 0.5, 4 x 2, 8 x 4 -> HD95 4 mm (position 21.85 of 0..23), ASD 42 / 24 mm.
    a = np.zeros((8, 10), bool)
    a[2:6, 2:6] = True
    b = np.roll(a, 2, axis=1)
    assert metrics.hd95_mm(a, b, (0.5, 2.0)) == pytest.approx(4.0)
    assert metrics.asd_mm(a, b, (0.5, 2.0)) == pytest.approx(42 / 24)


def test_sphere_against_itself_is_zero():
    sphere = ball((20, 30, 30), (10, 15, 15), 8)
    assert metrics.hd95_mm(sphere, sphere, (2.5, 0.7, 0.7)) == 0.0
    assert metrics.asd_mm(sphere, sphere, (2.5, 0.7, 0.7)) == 0.0
    assert metrics.dice(sphere, sphere, True) == 1.0


def test_swapping_pred_and_ref_gives_the_same_scores():
    shape, spacing = (16, 24, 24), (2.0, 0.8, 1.1)
    labels_a = ball(shape, (8, 12, 12), 6).astype(np.uint8)
    labels_b = np.zeros(shape, np.uint8)
    labels_b[5:13, 4:15, 9:20] = 1
    forward = metrics.evaluate_labels(labels_a, labels_b, {1: "x"}, spacing)[0]
    backward = metrics.evaluate_labels(labels_b, labels_a, {1: "x"}, spacing)[0]
    for key in metrics.METRIC_KEYS:
        assert forward[key] == pytest.approx(backward[key])
    assert forward["ref_voxels"] == backward["pred_voxels"]
    assert forward["pred_voxels"] == backward["ref_voxels"]
    assert 0 < forward["dice"] < 1 and forward["asd_mm"] < forward["hd95_mm"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cropped_kdtree_equals_full_volume_transform(seed):
    # Blobs touching the array border too: the crop and border handling must not change any distance.
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((12, 40, 40)), 3)
    a, b = noise > 0.02, np.roll(noise, 3, axis=2) > -0.01
    spacing = (4.0, 0.9, 1.3)
    expected = edt_distances(a, b, spacing)
    assert metrics.hd95_mm(a, b, spacing) == pytest.approx(np.percentile(expected, 95))
    assert metrics.asd_mm(a, b, spacing) == pytest.approx(expected.mean())


@pytest.mark.parametrize(
    ("pred_has", "ref_has", "expected_dice"),
    [(False, False, math.nan), (True, False, 0.0), (False, True, 0.0)],
    ids=["both-empty", "ref-empty", "pred-empty"],
)
def test_empty_masks(pred_has, ref_has, expected_dice):
    pred = np.zeros((6, 8, 8), np.uint8)
    ref = np.zeros((6, 8, 8), np.uint8)
    pred[2:4, 2:5, 2:5] = 3 if pred_has else 0
    ref[2:4, 3:6, 3:6] = 3 if ref_has else 0
    (row,) = metrics.evaluate_labels(pred, ref, {3: "spleen"}, (3.0, 1.0, 1.0))
    assert same_or_both_nan(row["dice"], expected_dice)
    assert same_or_both_nan(metrics.dice(pred, ref, 3), expected_dice)
    assert math.isnan(row["hd95_mm"]) and math.isnan(row["asd_mm"])
    assert math.isnan(metrics.hd95_mm(pred == 3, ref == 3, (3.0, 1.0, 1.0)))
    assert math.isnan(metrics.asd_mm(pred == 3, ref == 3, (3.0, 1.0, 1.0)))
    assert row["ref_voxels"] == (18 if ref_has else 0) and row["pred_voxels"] == (18 if pred_has else 0)
    assert row["ref_volume_ml"] == pytest.approx(row["ref_voxels"] * 3.0 / 1000)


def test_evaluate_labels_rows():
    pred = np.zeros((4, 10, 10), np.uint8)
    pred[1:3, 2:6, 2:6] = 1
    rows = metrics.evaluate_labels(pred, pred.copy(), {1: "liver", 2: "spleen"}, (2.0, 0.5, 0.5))
    keys = ["label", "class", "dice", "hd95_mm", "asd_mm", "ref_voxels", "pred_voxels", "ref_volume_ml",
            "pred_volume_ml"]
    assert [list(r) for r in rows] == [keys, keys]
    assert rows[0]["dice"] == 1.0 and rows[0]["hd95_mm"] == 0.0
    assert rows[0]["ref_voxels"] == 32 and rows[0]["ref_volume_ml"] == pytest.approx(32 * 0.5 / 1000)
    assert math.isnan(rows[1]["dice"])


def test_shape_mismatch_names_both_shapes():
    pred, ref = np.zeros((4, 5, 6), np.uint8), np.zeros((4, 5, 7), np.uint8)
    for call in (
        lambda: metrics.dice(pred, ref, 1),
        lambda: metrics.hd95_mm(pred, ref, (1, 1, 1)),
        lambda: metrics.asd_mm(pred, ref, (1, 1, 1)),
        lambda: metrics.evaluate_labels(pred, ref, {1: "liver"}, (1, 1, 1)),
    ):
        with pytest.raises(ShapeMismatchError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
            call()


@pytest.mark.parametrize(
    "spacing", [(1.0, 1.0), (1.0, 1.0, 1.0, 1.0), 1.0, (0.0, 1.0, 1.0), (1.0, -2.0, 1.0), (1, math.nan, 1)]
)
def test_bad_spacing_raises_value_error(spacing):
    mask = np.ones((3, 4, 4), bool)
    with pytest.raises(ValueError, match="spacing_mm"):
        metrics.hd95_mm(mask, mask, spacing)
    with pytest.raises(ValueError, match="spacing_mm"):
        metrics.evaluate_labels(mask, mask, {1: "liver"}, spacing)


def row(label, dice, hd95, asd, ref_voxels, pred_voxels):
    return {"label": label, "class": f"c{label}", "dice": dice, "hd95_mm": hd95, "asd_mm": asd,
            "ref_voxels": ref_voxels, "pred_voxels": pred_voxels}


def test_summarise_skips_nan_and_counts_missed_and_false_positive():
    nan = math.nan
    summary = metrics.summarise({
        "a": [row(1, 0.8, 2.0, 1.0, 10, 10), row(2, 0.9, 4.0, 2.0, 10, 10), row(3, nan, nan, nan, 0, 0)],
        "b": [row(1, nan, nan, nan, 0, 0), row(2, 0.0, nan, nan, 10, 0), row(3, nan, nan, nan, 0, 0)],
        "c": [row(1, 0.6, 6.0, 3.0, 10, 10), row(2, 0.0, nan, nan, 0, 5), row(3, nan, nan, nan, 0, 0)],
    })
    one, two, three = summary["per_class"]
    assert (one["dice"], one["hd95_mm"], one["asd_mm"]) == pytest.approx((0.7, 4.0, 2.0))
    assert one["n_scored"] == 2
    assert (two["dice"], two["hd95_mm"], two["n_scored"]) == pytest.approx((0.3, 4.0, 3))
    assert (two["n_missed"], two["n_false_positive"], one["n_missed"]) == (1, 1, 0)
    assert math.isnan(three["dice"]) and three["n_scored"] == 0
    mean = summary["mean"]
    assert mean["class"] == "mean"
    assert (mean["dice"], mean["hd95_mm"], mean["asd_mm"]) == pytest.approx((0.5, 4.0, 2.0))
    assert (mean["n_missed"], mean["n_false_positive"]) == (1, 1)


def test_csv_round_trip_and_markdown_table(tmp_path):
    pred = np.zeros((3, 6, 6), np.uint8)
    pred[1, 1:4, 1:4] = 1
    ref = np.roll(pred, 1, axis=2)
    rows = metrics.evaluate_labels(pred, ref, {1: "liver", 4: "spleen"}, (5.0, 1.5, 1.5))
    back = metrics.read_csv(metrics.write_csv(rows, tmp_path / "case.csv"))
    assert [list(r) for r in back] == [list(r) for r in rows]
    for original, parsed in zip(rows, back):
        assert all(same_or_both_nan(original[k], parsed[k]) for k in original)
        assert type(parsed["label"]) is int and type(parsed["class"]) is str

    table = metrics.format_table(rows, columns=["class", "dice", "hd95_mm", "ref_volume_ml"])
    lines = table.splitlines()
    assert lines[0] == "| class | dice (%) | hd95_mm | ref_volume_ml |"
    assert lines[2] == f"| liver | {100 * rows[0]['dice']:.1f} | {rows[0]['hd95_mm']:.2f} | 0.1 |"
    assert lines[3] == "| spleen | n/a | n/a | 0.0 |"


@pytest.fixture(scope="module")
def chaos_labels():
    if not CHAOS_LABEL.exists():
        pytest.skip(f"{CHAOS_LABEL} is absent (shared data not mounted)")
    nib = pytest.importorskip("nibabel")
    image = nib.load(CHAOS_LABEL)
    # NIfTI arrays are (X, Y, Z); the package works in (Z, Y, X).
    labels = np.asarray(image.dataobj).transpose(2, 1, 0)
    spacing = tuple(float(z) for z in image.header.get_zooms()[::-1])
    assert spacing[1:] == (1.25, 1.25)  # chaos_t2 was resampled to 1.25 mm in-plane
    return labels, spacing


def test_real_liver_eroded_in_plane_by_one_voxel(chaos_labels):
    labels, spacing = chaos_labels
    ref = labels == 1  # liver
    in_plane_cross = np.zeros((3, 3, 3), bool)
    in_plane_cross[1] = ndimage.generate_binary_structure(2, 1)
    pred = ndimage.binary_erosion(ref, structure=in_plane_cross)
    # Expected HD95 = 1.25 mm exactly: eroding by one in-plane voxel moves each slice's outline inward by
    # one 1.25 mm step, so a removed rim voxel and the new rim are 1.25 mm apart, while surface voxels
    # that face another slice (7.7 mm away) and survive the erosion are shared (0 mm). Only outline corners
    # give more (1.25 * sqrt 2, 2.5 mm). If those are under 5 % of the union and the zeros under 95 %, the
    # 95th percentile lies between two 1.25 values. Check both premises on an independent distance path.
    distances = edt_distances(pred, ref, spacing)
    assert np.mean(distances > 1.25 + 1e-9) < 0.05
    assert np.mean(distances < 1.25 - 1e-9) < 0.95
    assert np.all((distances == 0) | (distances >= 1.25))

    (row,) = metrics.evaluate_labels(pred.astype(np.uint8), ref.astype(np.uint8), {1: "liver"}, spacing)
    assert 0.9 < row["dice"] < 1.0
    assert row["hd95_mm"] == pytest.approx(1.25, abs=1e-9)
    assert row["asd_mm"] == pytest.approx(distances.mean())
    assert 0 < row["asd_mm"] < 1.25
    assert row["pred_voxels"] < row["ref_voxels"]
