"""The typed model card: validation, JSON round trip, migration of older cards, the places it is built."""

import copy
import json

import pytest
from conftest import build_tiny, tiny_card

from napari_consistent_seg.errors import ModelLoadError
from napari_consistent_seg.models.card import FORMAT, PLANES, ModelCard, TrainingRecord
from napari_consistent_seg.models.store import SHIPPED_DIR, load_model, save_model
from napari_consistent_seg.training.config import config_from_dict

SHIPPED_PLANES = {"cardiac-cine-mri": "acquisition", "abdomen-ct-mri": "axial"}


def _shipped_json(name) -> dict:
    return json.loads((SHIPPED_DIR / name / "card.json").read_text())


def _valid() -> dict:
    return {**tiny_card(), "architecture": {"name": "unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 4,
                                            "channels": [4, 8, 16, 32, 64], "num_res_units": 2}}


@pytest.mark.parametrize("name", sorted(SHIPPED_PLANES))
def test_shipped_cards_load_and_round_trip_through_json(name):
    raw = _shipped_json(name)
    card = ModelCard.from_dict(raw)
    assert card.plane == SHIPPED_PLANES[name]
    assert card.keep_largest_component is True and card.training.iterations > 0
    assert card.classes[0] == "background" and all(isinstance(k, int) for k in card.classes)
    again = json.loads(json.dumps(card.to_dict()))
    assert ModelCard.from_dict(again) == card
    # nothing of the shipped JSON is lost (benchmark and notes included); only plane may be added
    assert {k: v for k, v in again.items() if k != "plane"} == {k: v for k, v in raw.items() if k != "plane"}


@pytest.mark.parametrize("name", sorted(SHIPPED_PLANES))
def test_cards_without_a_plane_are_migrated(name):
    raw = _shipped_json(name)
    raw.pop("plane", None)
    assert ModelCard.from_dict(raw).plane == SHIPPED_PLANES[name]


def test_a_model_fine_tuned_from_the_cine_model_keeps_its_plane():
    raw = _shipped_json("cardiac-cine-mri")
    raw.pop("plane", None)
    raw["name"] = "my-hearts"
    raw["fine_tuning"] = [{"method": "icl", "steps": 10, "from_model": "cardiac-cine-mri"}]
    assert ModelCard.from_dict(raw).plane == "acquisition"
    raw["fine_tuning"] = []
    assert ModelCard.from_dict(raw).plane == "axial"


@pytest.mark.parametrize("plane", PLANES)
def test_every_plane_is_accepted(plane):
    assert ModelCard.from_dict({**_valid(), "plane": plane}).plane == plane


def _broken(**changes):
    raw = _valid()
    for key, value in changes.items():
        if value is ...:
            raw.pop(key)
        else:
            raw[key] = value
    return raw


BROKEN = [
    (_broken(plane="oblique"), "'plane' must be one of"),
    (_broken(name="x" * 300), "at most 100"),
    (_broken(name=""), "non-empty"),
    (_broken(name=7), "'name' must be text"),
    (_broken(classes=...), "missing classes"),
    (_broken(classes={"0": "background"}), "at least one named class"),
    (_broken(classes={"0": "bg", "1": "a", "2": "", "3": "c"}), "at least one named class"),
    (_broken(colours={"9": "#ffffff"}), "not classes"),
    (_broken(colours={"1": "blue"}), "#rrggbb"),
    (_broken(modalities=["MR", "MR"]), "CT and/or MR"),
    (_broken(modalities="MR"), "'modalities' must be a list"),
    (_broken(normalisation={"MR": {"kind": "zscore"}}), "normalisation of MR"),
    (_broken(normalisation={"CT": {"kind": "hu_window", "window": [0, 1]}}), "normalisation of MR"),
    (_broken(modalities=["CT"], normalisation={"CT": {"kind": "hu_window", "window": [300, -100]}}), "low < high"),
    (_broken(patch_size=[64]), "patch_size"),
    (_broken(patch_size=[64, -64]), "patch_size"),
    (_broken(patch_size=[64.5, 64]), "patch_size"),
    (_broken(target_spacing_mm=[0, 1]), "target_spacing_mm"),
    (_broken(target_spacing_mm="1mm"), "target_spacing_mm"),
    (_broken(postprocessing={"keep_largest": True}), "postprocessing"),
    (_broken(training={"method": "magic"}), "training.method"),
    (_broken(training={"iterations": -3}), "training.iterations"),
    (_broken(training={"wall_time_s": "long"}), "training.wall_time_s"),
    (_broken(training=[1, 2]), "'training' must be an object"),
    (_broken(val_scores={"mean": 1.5}), "val_scores.mean"),
    (_broken(val_scores={"dice": {"1": -0.1}}), "val_scores.dice"),
    (_broken(val_scores={"by_modality": {"MR": {"mean": "high"}}}), "val_scores.by_modality.MR.mean"),
    (_broken(architecture={"name": "resnet"}), "describe a unet"),
    (_broken(architecture={**_valid()["architecture"], "dropout": 0.1}), "unknown keys"),
    (_broken(architecture={**_valid()["architecture"], "spatial_dims": 4}), "spatial_dims"),
    (_broken(architecture={**_valid()["architecture"], "channels": [4, "8"]}), "architecture.channels"),
    (_broken(architecture={**_valid()["architecture"], "out_channels": 3}), "out_channels"),
    (_broken(modules={"kind": "transformer", "num_classes": 4}), "unknown module kind 'transformer'"),
    (_broken(modules={"kind": "icl", "num_classes": 3}), "modules.num_classes"),
    (_broken(format="napari-consistent-seg/9"), "another version"),
    (_broken(fine_tuning={"steps": 3}), "fine_tuning"),
    (_broken(finetune={"anchor": 1.0, "momentum": 0.9}), "'finetune' must be an object"),
    (_broken(finetune={"anchor": "strong"}), "finetune.anchor"),
    (_broken(finetune={"steps": 0}), "finetune.steps"),
    (_broken(finetune={"anchor_groups": "organs"}), "finetune.anchor_groups"),
    (_broken(finetune={"method": "eam"}), "finetune.method"),
    (_broken(finetune=[1]), "'finetune' must be an object"),
]


@pytest.mark.parametrize("raw,message", BROKEN, ids=[m for _, m in BROKEN])
def test_invalid_cards_raise_model_load_error_naming_the_field(raw, message):
    with pytest.raises(ModelLoadError, match=message):
        ModelCard.from_dict(raw)


@pytest.mark.parametrize("raw", [None, [], "card", 3])
def test_a_card_that_is_not_an_object_is_refused(raw):
    with pytest.raises(ModelLoadError, match="JSON object"):
        ModelCard.from_dict(raw)


def test_defaults_fill_colours_and_nan_scores_are_allowed():
    card = ModelCard.from_dict({**_valid(), "val_scores": {"dice": {"1": float("nan"), "2": 0.5}, "mean": 0.5}})
    assert set(card.colours) == {1, 2, 3}
    assert card.plane == "axial" and card.keep_largest_component is False and card.format == FORMAT
    assert card.foreground == {1: "class 1", 2: "class 2", 3: "class 3"}


def test_save_and_load_keep_the_card(tmp_path):
    backbone, modules = build_tiny(modules="icl")
    card = ModelCard.from_dict({**_valid(), "plane": "acquisition", "benchmark": {"note": "kept"}})
    folder = save_model(tmp_path / "m", backbone, card, modules)
    loaded = load_model(folder).card
    assert loaded.plane == "acquisition" and loaded.extra == {"benchmark": {"note": "kept"}}
    assert loaded.modules["kind"] == "icl" and loaded.code_version and loaded.created
    assert json.loads((folder / "card.json").read_text()) == loaded.to_dict()


def test_the_trainer_card_is_built_from_the_config():
    cfg = config_from_dict({
        "name": "toy", "method": "supervised", "classes": {1: "a", 2: "b", 3: "c"}, "colours": {2: "#123456"},
        "normalisation": {"MR": {"kind": "percentile", "percentiles": [1, 99]}}, "plane": "acquisition",
        "data": {"root": ".", "labeled": [{"dataset": "x", "split": "train", "modality": "MR"}],
                 "val": [{"dataset": "x", "split": "val", "modality": "MR"}]},
        "patch_size": [64, 64],
    })
    backbone, _ = build_tiny()
    from napari_consistent_seg.models.store import architecture_of

    card = ModelCard.for_training(cfg, architecture=architecture_of(backbone), modules=None,
                                  training=TrainingRecord(method="supervised", iterations=2))
    assert card.plane == "acquisition" and card.colours[2] == "#123456" and card.modalities == ["MR"]
    assert card.keep_largest_component is True and card.classes == {0: "background", 1: "a", 2: "b", 3: "c"}
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card


def test_fine_tuned_card_records_the_run_and_clears_val_scores():
    card = ModelCard.from_dict(_shipped_json("cardiac-cine-mri"))
    before = copy.deepcopy(card)
    tuned = card.fine_tuned({"method": "icl", "steps": 5, "from_model": card.name})
    assert card == before  # the original is untouched
    assert tuned.val_scores == {} and tuned.fine_tuning[-1]["steps"] == 5 and tuned.plane == "acquisition"


def test_dict_style_access_reads_and_writes_the_json_form_with_validation():
    card = ModelCard.from_dict(_valid())
    assert card["classes"]["0"] == "background" and card.get("postprocessing") == {"keep_largest_component": False}
    assert card.get("no-such-key", 7) == 7
    card["postprocessing"] = {"keep_largest_component": True}
    assert card.keep_largest_component is True
    card.setdefault("fine_tuning", []).append({"steps": 1})
    assert card.fine_tuning == [{"steps": 1}]
    with pytest.raises(ModelLoadError, match="plane"):
        card["plane"] = "diagonal"
    assert card.plane == "axial"  # a refused write changes nothing


# ---- fuzzed cards: a ModelCard or a ModelLoadError, nothing else ------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
FIELDS = ["name", "architecture", "classes", "colours", "modalities", "normalisation", "patch_size", "plane",
          "target_spacing_mm", "postprocessing", "modules", "training", "val_scores", "fine_tuning", "format",
          "description", "created"]


_SHIPPED = {name: _shipped_json(name) for name in SHIPPED_PLANES}


@st.composite
def mutated_cards(draw):
    raw = copy.deepcopy(_SHIPPED[draw(st.sampled_from(sorted(SHIPPED_PLANES)))])
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(FIELDS))
        target = raw
        if isinstance(raw.get(key), dict) and raw[key] and draw(st.booleans()):
            target, key = raw[key], draw(st.sampled_from(sorted(raw[key])))
        if draw(st.integers(0, 4)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(json_values)
    return raw


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_cards())
def test_fuzzed_cards_give_a_card_or_model_load_error(raw):
    try:
        card = ModelCard.from_dict(raw)
    except ModelLoadError as error:
        assert str(error)
        return
    text = json.dumps(card.to_dict())  # compared as JSON text: NaN != NaN as numbers
    assert json.dumps(ModelCard.from_dict(json.loads(text)).to_dict()) == text
