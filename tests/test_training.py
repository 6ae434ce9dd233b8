"""The training loop: runs, checkpoints, resume, stripping a run, and short runs on the real data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CHANNELS, toy_config

from napari_consistent_seg.errors import ConsistentSegError
from napari_consistent_seg.models.store import BACKBONE_FILE, MODULES_FILE, load_model
from napari_consistent_seg.training.config import config_from_dict, load_config
from napari_consistent_seg.training.augment import Augmentation
from napari_consistent_seg.training.data import Source, load_cases, unenhance
from napari_consistent_seg.training.trainer import (
    STATE_JSON,
    STATE_TENSORS,
    Trainer,
    strip_run,
    validate,
)

pytestmark = pytest.mark.usefixtures("user_model_dir")


def _cfg(data_root, method="supervised", **overrides):
    return config_from_dict(toy_config(data_root, method, **overrides))


@pytest.mark.parametrize("method", ["supervised", "icl", "eam"])
def test_toy_run_writes_state_history_and_stripped_models(toy_data, tmp_path, method):
    trainer = Trainer(_cfg(toy_data, method), tmp_path / "run", device="cpu")
    logs = []
    result = trainer.fit(progress=lambda i, total, terms: logs.append((i, total, terms)))
    assert result.iterations == 4 and not result.stopped_early
    assert [i for i, _, _ in logs] == [1, 2, 3, 4] and all(t == 4 for _, t, _ in logs)
    assert all(np.isfinite(terms["loss"]) for _, _, terms in logs)
    run = tmp_path / "run"
    for name in (STATE_JSON, STATE_TENSORS, "config.json", "history.jsonl", "best/card.json", "last/card.json"):
        assert (run / name).is_file(), name
    state = json.loads((run / STATE_JSON).read_text())
    assert state["iteration"] == 4
    assert [h["iteration"] for h in state["history"]] == [2, 4]
    val = state["history"][-1]["val"]
    assert set(val["by_modality"]) == ({"MR", "CT"} if method == "eam" else {"MR"})
    assert 0.0 <= val["mean"] <= 1.0
    card = load_model(run / "last").card
    assert card.training.method == method and card.training.iterations == 4
    assert "world size 1" in card.training.hardware
    assert (card.modules is None) == (method == "supervised")


def test_strip_run_gives_exactly_the_training_backbone(toy_data, tmp_path):
    trainer = Trainer(_cfg(toy_data, "icl"), tmp_path / "run", device="cpu")
    trainer.fit()
    stripped = load_model(strip_run(tmp_path / "run", tmp_path / "stripped"))
    x = torch.randn(2, 1, 61, 47)
    trainer.backbone.eval()
    with torch.no_grad():
        assert torch.equal(stripped.backbone(x), trainer.backbone(x))
    expected = trainer.modules.state_dict()
    assert stripped.modules.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in stripped.modules.state_dict().items())
    assert stripped.card.training.iterations == 4
    assert stripped.card.architecture["channels"] == list(TINY_CHANNELS)
    # only the backbone and the modules: no optimizer state, no objective wrapper
    assert {p.name for p in (tmp_path / "stripped").iterdir()} == {"card.json", BACKBONE_FILE, MODULES_FILE}
    plain = strip_run(tmp_path / "run", tmp_path / "plain", keep_modules=False)
    assert not (plain / MODULES_FILE).exists() and load_model(plain).modules is None
    with pytest.raises(ConsistentSegError, match="not a training run folder"):
        strip_run(tmp_path / "stripped", tmp_path / "nothing")


def _optimizer_tensors(trainer):
    return {(i, k): v.clone() for i, st in trainer.optimizer.state_dict()["state"].items() for k, v in st.items()}


def test_resume_continues_from_the_stopped_iteration_with_the_same_optimizer_state(toy_data, tmp_path):
    cfg = _cfg(toy_data, "icl", iterations=6, checkpoint_every=100)
    whole = Trainer(cfg, tmp_path / "whole", device="cpu").fit()

    first = Trainer(cfg, tmp_path / "split", device="cpu")
    stopped = first.fit(cancel=lambda: first.iteration >= 3)
    assert stopped.iterations == 3 and stopped.stopped_early
    saved = _optimizer_tensors(first)

    second = Trainer(cfg, tmp_path / "split", device="cpu", resume=True)
    assert second.iteration == 3
    restored = _optimizer_tensors(second)
    assert saved.keys() == restored.keys() and len(saved) > 0
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    assert all(torch.equal(a, b) for a, b in zip(first.objective.state_dict().values(),
                                                   second.objective.state_dict().values()))
    resumed = second.fit()
    assert resumed.iterations == whole.iterations == 6
    history = json.loads((tmp_path / "split" / STATE_JSON).read_text())["history"]
    assert [h["iteration"] for h in history] == [h["iteration"] for h in whole.history] == [2, 4, 6]
    assert history[0] == json.loads(json.dumps(stopped.history[0]))  # the first part is kept as it was
    lines = (tmp_path / "split" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [2, 4, 6]


def test_resume_without_the_optimizer_state_says_so(toy_data, tmp_path):
    Trainer(_cfg(toy_data, iterations=2), tmp_path / "run", device="cpu").fit()
    (tmp_path / "run" / STATE_TENSORS).unlink()  # a finished run kept without its optimizer state
    with pytest.raises(ConsistentSegError, match="cannot be resumed"):
        Trainer(_cfg(toy_data), tmp_path / "run", device="cpu", resume=True)


def test_max_minutes_stops_early_and_resumably(toy_data, tmp_path):
    result = Trainer(_cfg(toy_data, max_minutes=1e-6), tmp_path / "run", device="cpu").fit()
    assert result.stopped_early and result.iterations == 0
    again = Trainer(_cfg(toy_data), tmp_path / "run", device="cpu", resume=True).fit()
    assert again.iterations == 4


def test_stop_at_pauses_without_changing_the_lr_schedule(toy_data, tmp_path):
    cfg = _cfg(toy_data, iterations=6, stop_at=2)
    trainer = Trainer(cfg, tmp_path / "run", device="cpu")
    result = trainer.fit()
    assert result.iterations == 2
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * (1 - 1 / 6) ** 0.9)
    card = json.loads((tmp_path / "run" / "last" / "card.json").read_text())
    assert card["training"]["iterations_planned"] == 6
    assert card["postprocessing"] == {"keep_largest_component": True}
    assert card["plane"] == "axial"
    cfg.stop_at = None
    assert Trainer(cfg, tmp_path / "run", device="cpu", resume=True).fit().iterations == 6


def test_init_from_starts_from_a_saved_model_and_resume_still_wins(toy_data, tmp_path):
    Trainer(_cfg(toy_data, "icl"), tmp_path / "first", device="cpu").fit()
    source = load_model(tmp_path / "first" / "last")
    cfg = _cfg(toy_data, "icl", seed=7, init_from=str(tmp_path / "first" / "last"))
    second = Trainer(cfg, tmp_path / "second", device="cpu")
    for name, part in (("backbone", source.backbone), ("modules", source.modules)):
        mine = getattr(second, name).state_dict()
        assert all(torch.equal(v, mine[k]) for k, v in part.state_dict().items()), name
    # a supervised model under ICL: the backbone is copied, the modules keep their own init
    Trainer(_cfg(toy_data), tmp_path / "sup", device="cpu").fit()
    mixed = Trainer(_cfg(toy_data, "icl", init_from=str(tmp_path / "sup" / "last")), tmp_path / "mixed", device="cpu")
    assert mixed.modules is not None
    second.fit(cancel=lambda: second.iteration >= 2)
    resumed = Trainer(cfg, tmp_path / "second", device="cpu", resume=True)
    assert resumed.iteration == 2
    # the card says what the run started from, resumed or not
    assert resumed.started_from == second.started_from
    assert (second.started_from["name"], second.started_from["iterations"]) == (source.card.name, 4)
    saved = json.loads((tmp_path / "second" / STATE_JSON).read_text())["card"]["training"]
    assert saved["init_from"]["created"] == source.card.created
    assert all(torch.equal(a, b) for a, b in zip(second.objective.state_dict().values(),
                                                   resumed.objective.state_dict().values()))
    wrong = _cfg(toy_data, "icl", init_from=str(tmp_path / "first" / "last"), channels=[8, 16, 32, 64, 128])
    with pytest.raises(ConsistentSegError, match="does not fit"):
        Trainer(wrong, tmp_path / "wrong", device="cpu")


def test_rampup_scales_only_the_unlabeled_terms(toy_data, tmp_path):
    cfg = _cfg(toy_data, "icl", iterations=8, rampup_iterations=4)
    trainer = Trainer(cfg, tmp_path / "run", device="cpu")
    ramps = []
    for it in (0, 2, 4, 6):
        trainer.iteration = it
        ramps.append(trainer._ramp())
    assert ramps == pytest.approx([np.exp(-5), np.exp(-5 / 4), 1.0, 1.0])
    torch.manual_seed(0)
    batch = trainer.next_batch()
    trainer.objective.ramp = 0.0
    total, terms = trainer.objective(batch)
    assert float(total) == pytest.approx(float(terms["seg"] + cfg.weights["aux"] * terms["aux"]), rel=1e-5)
    assert Trainer(_cfg(toy_data, "icl"), tmp_path / "flat", device="cpu")._ramp() == 1.0  # the reference


def test_config_errors_say_what_is_wrong(toy_data, tmp_path):
    with pytest.raises(ConsistentSegError, match="method must be"):
        _cfg(toy_data, "magic")
    with pytest.raises(ConsistentSegError, match="unlabeled"):
        config_from_dict({**toy_config(toy_data, "icl"), "data": toy_config(toy_data, "supervised")["data"]})
    with pytest.raises(ConsistentSegError, match="two labeled sources"):
        config_from_dict({**toy_config(toy_data, "eam"), "data": toy_config(toy_data, "supervised")["data"]})
    with pytest.raises(ConsistentSegError, match="bad training config"):
        _cfg(toy_data, no_such_key=1)
    with pytest.raises(ConsistentSegError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConsistentSegError, match="splits.json"):
        Trainer(_cfg(tmp_path), tmp_path / "run", device="cpu")


# ---- real data -------------------------------------------------------------------------------
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_config_loads(path):
    cfg = load_config(path)
    assert cfg.labeled and cfg.val and cfg.iterations > 0
    assert Path(cfg.data_root).resolve() == (Path(__file__).resolve().parents[2] / "shared" / "data").resolve()


def _acdc_config(shared_data, method, iterations):
    data = {
        "root": str(shared_data),
        "labeled": [{"dataset": "acdc", "split": "train", "modality": "MR", "first_patients": 2}],
        "unlabeled": [{"dataset": "acdc", "split": "train", "modality": "MR", "skip_patients": 2,
                       "first_patients": 2}],
        "val": [{"dataset": "acdc", "split": "val", "modality": "MR", "cases": ["patient028_frame01"]}],
    }
    return load_config(CONFIGS / "cardiac-cine-mri.yaml", {
        "method": method, "data": data, "patch_size": [96, 96], "channels": [8, 16, 32, 64, 128],
        "heads": [4, 2, 2], "batch_size": 4, "unlabeled_batch_size": 4, "iterations": iterations,
        "val_every": iterations, "checkpoint_every": 1000, "lr": 0.01,
        "augmentation": {"rotate_deg": 15, "flips": False, "rot90": False},
    })


@pytest.mark.slow
def test_short_supervised_run_on_acdc_lowers_the_loss_and_raises_val_dice(shared_data, tmp_path):
    """2 labeled patients, 60 iterations of batch 4 at 96 x 96 (about 10 s on one core); seeds 0-2 all
    raised the val mean Dice (0.06 -> 0.08, 0.02 -> 0.07, 0.02 -> 0.09)."""
    cfg = _acdc_config(shared_data, "supervised", iterations=60)
    assert cfg.val[0].cases == ["patient028_frame01"] and isinstance(cfg.val[0], Source)
    trainer = Trainer(cfg, tmp_path / "run", device="cpu")
    assert len(trainer.val_cases) == 1 and trainer.n_labeled_slices > 0
    untrained = validate(trainer.backbone, trainer.val_cases, cfg.num_classes, trainer.device)
    losses = []
    result = trainer.fit(progress=lambda i, total, logs: losses.append(logs["loss"]))
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    trained = result.history[-1]["val"]
    print(f"\nacdc supervised 60 it: loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}; "
          f"val mean Dice {untrained['mean']:.3f} -> {trained['mean']:.3f}")
    assert trained["mean"] > untrained["mean"]


@pytest.mark.slow
def test_short_eam_run_on_btcv_ct_and_chaos_t2_reports_per_modality_val(shared_data, tmp_path):
    raw = load_config(CONFIGS / "abdomen-ct-mri.yaml").to_dict()
    # one (short) CT and one MR case each, sources in the config's order: btcv_ct, chaos_t2
    for key, cases in (("labeled", ("case_11", "case_02")), ("val", ("case_14", "case_31"))):
        assert [s["dataset"] for s in raw[key]] == ["btcv_ct", "chaos_t2"]
        for source, case in zip(raw[key], cases):
            source["cases"] = [case]
    raw.update(data_root=str(shared_data), channels=[4, 8, 16, 32, 64], heads=[2, 2, 2], patch_size=[96, 96],
               batch_size=2, iterations=3, val_every=3, checkpoint_every=1000)
    cfg = config_from_dict(raw)
    trainer = Trainer(cfg, tmp_path / "run", device="cpu")
    result = trainer.fit()
    assert result.iterations == 3
    val = result.history[-1]["val"]
    assert set(val["by_modality"]) == {"CT", "MR"}
    assert set(val["by_modality"]["CT"]["dice"]) == {1, 2, 3, 4}
    assert np.isfinite(result.history[-1]["train"]["rep"])


def test_flip_ap_mirrors_image_and_labels_front_to_back_together():
    image = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1) / 16
    labels = (image[:, 0] * 16).long()
    flipping = Augmentation(rotate_deg=0, scale=(1, 1), gamma=(1, 1), noise_std=0, probability=1.0, flip_ap=True)
    images_out, labels_out = flipping(image, labels, torch.Generator().manual_seed(0))
    flipped = (labels_out == labels.flip(1)).flatten(1).all(1)
    assert 10 < int(flipped.sum()) < 54  # about half
    assert ((labels_out == labels).flatten(1).all(1) | flipped).all()  # the rest unchanged, and never left-right
    assert torch.allclose(images_out * 16, labels_out.float()[:, None])


@pytest.mark.slow
def test_unenhance_moves_btcv_tissues_toward_their_unenhanced_hu_and_leaves_the_rest(shared_data):
    source = next(s for s in load_config(CONFIGS / "abdomen-ct-mri.yaml").labeled if s.dataset == "btcv_ct")
    source.cases = ["case_11"]
    (case,) = load_cases(shared_data, source, {"CT": {"kind": "hu_window", "window": [-125, 275]}}, (1.25, 1.25))
    extra = case.unenhanced
    assert extra.tissues.shape == case.image.shape and extra.probability == 0.3 and extra.hu_per_unit == 400
    kidney = extra.tissues == 2  # btcv's right kidney: bright with contrast
    z = int(np.argmax(kidney.sum((1, 2))))
    before = case.image[z]
    assert 400 * extra.shift[2] < -50  # its median lies well above 30 HU
    after = unenhance(before, extra.tissues[z], extra, np.random.default_rng(0))
    moved = 400 * (np.median(after[kidney[z]]) - np.median(before[kidney[z]]))
    assert 400 * extra.shift[2] - 15 <= moved < 0.3 * 400 * extra.shift[2] + 10
    from scipy.ndimage import distance_transform_edt

    far = distance_transform_edt(~np.isin(extra.tissues[z], list(extra.shift))) > 4
    assert np.allclose(after[far], before[far], atol=1e-4)
    with pytest.raises(ConsistentSegError, match="HU window"):
        load_cases(shared_data, source, {"CT": {"kind": "percentile", "percentiles": [1, 99]}})
