"""The model card: what a saved model is for and how it was made, as a validated dataclass.

A card is built here and nowhere else: :meth:`ModelCard.from_dict` reads (and migrates) a JSON
card, :meth:`ModelCard.for_training` makes a trainer's card, :meth:`ModelCard.fine_tuned` a
fine-tuner's. ``to_dict`` / ``from_dict`` round-trip through JSON, unknown keys included.
Every problem is a ModelLoadError that names the field and what it should be.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelLoadError

FORMAT = "napari-consistent-seg/1"
#: Slice planes of a 2D model: the scan's own slice plane, or an anatomical plane.
PLANES = ("acquisition", "axial", "coronal", "sagittal")
MODALITIES = ("CT", "MR")
METHODS = ("supervised", "icl", "eam")
NORMALISATION_KINDS = {"hu_window": "window", "percentile": "percentiles"}
ARCHITECTURE_KEYS = {"name", "spatial_dims", "in_channels", "out_channels", "channels", "num_res_units"}
MODULE_KEYS = {"kind", "num_classes", "tap_channels", "heads", "spatial_dims"}
MAX_NAME_LENGTH = 100
# A palette for classes without a colour of their own (tab10-like, readable on grey scans).
DEFAULT_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
                   "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8"]
# Shipped models trained before cards had a plane: cine short-axis slices are the acquisition plane.
_ACQUISITION_PLANE_MODELS = ("cardiac-cine-mri",)
_REQUIRED = ("name", "architecture", "classes", "modalities", "normalisation", "patch_size")
# The JSON type of each top-level key (None: may be null); checked before anything looks inside.
_JSON_TYPES = {
    "name": (str,), "description": (str,), "architecture": (dict,), "classes": (dict,), "colours": (dict, None),
    "modalities": (list,), "normalisation": (dict,), "patch_size": (list,), "plane": (str,),
    "target_spacing_mm": (list, None), "postprocessing": (dict, None), "modules": (dict, None),
    "training": (dict, None), "val_scores": (dict, None), "fine_tuning": (list,), "finetune": (dict, None),
    "format": (str,),
    "code_version": (str,), "created": (str,),
}
_JSON_NAMES = {str: "text", dict: "an object", list: "a list", None: "null"}


#: How the fine-tuner's anchor averages its KL term: over all unknown voxels ("voxels"), over the
#: starting model's foreground and background alike ("foreground"), over each class alike
#: ("classes"), or the mean of the first and the last ("voxels+classes").
ANCHOR_GROUPS = ("voxels", "foreground", "classes", "voxels+classes")
#: Fine-tuning methods: the supervised loss on the corrections, or that plus ICL's unlabeled terms.
FINETUNE_METHODS = ("supervised", "icl")
#: The fine-tuning recipe a card may set for its model (``finetune``), over training.finetune.DEFAULTS.
FINETUNE_KEYS = {"method": str, "steps": int, "lr": float, "anchor": float, "anchor_groups": str,
                 "stroke_anchor": float, "stroke_anchor_groups": str, "blend": float, "stroke_blend": float,
                 "touchup_blend": float, "touchup_below": float, "slice_weight": float, "other_patches": int,
                 "other_patch_scale": float, "average_last": float, "confidence_threshold": float}


_KEPT = "the share of the fine-tune's weight change kept"
#: The fine-tuning options that are shares in (0, 1], and what each is a share of.
_SHARES = {"blend": _KEPT, "stroke_blend": _KEPT, "touchup_blend": _KEPT,
           "other_patch_scale": "the other slices' patch edge as a share of the card's patch size"}
#: The fine-tuning options in [0, 1), and what each is.
_BELOW_ONE = {"confidence_threshold": "ICL's terms count where the network's top class probability reaches it; "
                                      "0: everywhere",
              "average_last": "the share of the planned steps, at the end, whose weights are averaged",
              "touchup_below": "strokes that change fewer than this share of the voxels they label from the "
                               "start are a touch-up"}


def finetune_option_problem(key: str, value) -> str | None:
    """What is wrong with ``value`` as the fine-tuning option ``key``, said after the option's name
    (None: nothing): the one rule for a card's recipe and for the fine-tuner's arguments."""
    kind = FINETUNE_KEYS[key]
    if kind is str:
        if not isinstance(value, str):
            return "must be text"
    elif isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return "must be a number"
    elif kind is int and (not isinstance(value, numbers.Integral) or value < 1):
        return "must be a whole number >= 1"
    elif value < 0:
        return "must be >= 0"
    if key == "method" and value not in FINETUNE_METHODS:
        return "must be " + " or ".join(map(repr, FINETUNE_METHODS))
    if key in ("anchor_groups", "stroke_anchor_groups") and value not in ANCHOR_GROUPS:
        return f"must be one of {', '.join(ANCHOR_GROUPS)}"
    if key in _SHARES and not 0 < value <= 1:
        return f"({_SHARES[key]}) must be in (0, 1]"
    if key in _BELOW_ONE and not value < 1:
        return f"({_BELOW_ONE[key]}) must be in [0, 1)"
    return None


def default_colours(classes) -> dict[int, str]:
    """A palette colour for each foreground label of ``classes`` (keys: label values, int or str)."""
    return {int(k): DEFAULT_COLOURS[(int(k) - 1) % len(DEFAULT_COLOURS)] for k in classes if int(k) > 0}


def _error(message: str) -> ModelLoadError:
    return ModelLoadError(f"model card: {message}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_POSTPROCESSING_FORM = ("'postprocessing' must be {\"keep_largest_component\": true|false} with an optional "
                        "\"cardiac\": true|false (the cardiac clean-up, docs/cardiac.md)")


@dataclass
class TrainingRecord:
    """How the weights were trained: method, iterations, wall time, hardware, commands, data, config."""

    method: str = ""
    iterations: int = 0
    iterations_planned: int | None = None
    wall_time_s: float = 0.0
    hardware: str = ""
    torch: str = ""
    command: str = ""
    commands: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.method, str) or (self.method and self.method not in METHODS):
            raise _error(f"training.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for key in ("iterations", "iterations_planned"):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value < 0):
                raise _error(f"training.{key} must be a whole number >= 0, got {value!r}")
        if not _is_number(self.wall_time_s) or self.wall_time_s < 0:
            raise _error(f"training.wall_time_s must be seconds >= 0, got {self.wall_time_s!r}")
        if not isinstance(self.commands, list) or not all(isinstance(c, str) for c in self.commands):
            raise _error("training.commands must be a list of command lines")
        for key in ("hardware", "torch", "command", "notes"):
            if not isinstance(getattr(self, key), str):
                raise _error(f"training.{key} must be text")
        if not isinstance(self.data, dict) or not isinstance(self.config, dict):
            raise _error("training.data and training.config must be objects")

    @classmethod
    def from_dict(cls, raw) -> TrainingRecord:
        if not isinstance(raw, dict):
            raise _error(f"training must be an object, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in raw.items() if k in known},
                   extra={k: v for k, v in raw.items() if k not in known})

    @property
    def earlier_stages(self) -> list[dict]:
        """The trainings these weights started from (``init_from`` records, newest first; empty for a
        model trained from scratch): name, created, method, iterations, commands, notes."""
        stages, start = [], self.extra.get("init_from")
        while start:
            stages.append(start)
            start = start.get("started_from")
        return stages

    def to_dict(self) -> dict:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        if self.iterations_planned is None:
            out.pop("iterations_planned")
        if not self.notes:
            out.pop("notes")
        return {**out, **copy.deepcopy(self.extra)}


def _is_dice(value) -> bool:
    """None, NaN (a class not scored) or a number in [0, 1]."""
    if value is None:
        return True
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return math.isnan(value) or 0 <= value <= 1


def _check_scores(scores, where: str) -> None:
    """{"dice": {label: 0..1}, "mean": 0..1, "by_modality": {modality: {...}}}; every part optional."""
    if not isinstance(scores, dict):
        raise _error(f"{where} must be an object")
    mean = scores.get("mean")
    if not _is_dice(mean):
        raise _error(f"{where}.mean must be a Dice in [0, 1], got {mean!r}")
    dice = scores.get("dice", {})
    if not isinstance(dice, dict) or not all(_is_dice(v) for v in dice.values()):
        raise _error(f"{where}.dice must map labels to Dice values in [0, 1]")
    by_modality = scores.get("by_modality", {})
    if not isinstance(by_modality, dict):
        raise _error(f"{where}.by_modality must be an object")
    for modality, sub in by_modality.items():
        _check_scores(sub, f"{where}.by_modality.{modality}")


@dataclass
class ModelCard:
    """A model's card. ``classes`` maps every label value 0..K to its name (background included);
    ``colours`` maps each foreground label to ``#rrggbb``; ``patch_size`` and ``target_spacing_mm``
    are in the model's slice plane (2D: rows, cols); ``plane`` is where a 2D model's slices lie."""

    name: str
    architecture: dict
    classes: dict[int, str]
    modalities: list[str]
    normalisation: dict[str, dict]
    patch_size: list[int]
    colours: dict[int, str] = field(default_factory=dict)
    plane: str = "axial"
    target_spacing_mm: list[float] | None = None
    keep_largest_component: bool = False
    cardiac_cleanup: bool = False
    description: str = ""
    modules: dict | None = None
    training: TrainingRecord = field(default_factory=TrainingRecord)
    val_scores: dict = field(default_factory=dict)
    fine_tuning: list[dict] = field(default_factory=list)
    #: this model's fine-tuning recipe where it differs from training.finetune.DEFAULTS
    finetune: dict = field(default_factory=dict)
    code_version: str = ""
    created: str = ""
    format: str = FORMAT
    #: keys this version does not know (e.g. ``benchmark``), kept as they are for the round trip
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self._check_name()
        self._check_classes()
        self._check_architecture()
        self._check_colours()
        if (not isinstance(self.modalities, list) or not self.modalities
                or not all(isinstance(m, str) and m in MODALITIES for m in self.modalities)
                or len(set(self.modalities)) < len(self.modalities)):
            raise _error(f"'modalities' must list CT and/or MR, got {self.modalities!r}")
        self._check_normalisation()
        if not isinstance(self.plane, str) or self.plane not in PLANES:
            raise _error(f"'plane' must be one of {', '.join(PLANES)}, got {self.plane!r}")
        dims = self.architecture["spatial_dims"]
        if (not isinstance(self.patch_size, list) or len(self.patch_size) != dims
                or not all(_is_int(p) and p > 0 for p in self.patch_size)):
            raise _error(f"'patch_size' must be {dims} positive whole numbers, got {self.patch_size!r}")
        spacing = self.target_spacing_mm
        if spacing is not None and (not isinstance(spacing, list) or len(spacing) not in (2, 3)
                                    or not all(_is_number(s) and s > 0 for s in spacing)):
            raise _error(f"'target_spacing_mm' must be null or 2-3 positive sizes in mm, got {spacing!r}")
        if not isinstance(self.keep_largest_component, bool) or not isinstance(self.cardiac_cleanup, bool):
            raise _error(_POSTPROCESSING_FORM)
        if self.modules is not None:
            self._check_modules()
        if not isinstance(self.training, TrainingRecord):
            raise _error("'training' must be a training record")
        _check_scores(self.val_scores, "val_scores")
        if not isinstance(self.fine_tuning, list) or not all(isinstance(f, dict) for f in self.fine_tuning):
            raise _error("'fine_tuning' must be a list of records")
        self._check_finetune()
        if not isinstance(self.description, str):
            raise _error("'description' must be text")

    # ---- validation ---------------------------------------------------------------------------
    def _check_name(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise _error("'name' must be a non-empty text")
        if len(self.name) > MAX_NAME_LENGTH:
            raise _error(f"'name' is {len(self.name)} characters long; use at most {MAX_NAME_LENGTH}")

    def _check_classes(self) -> None:
        if not isinstance(self.classes, dict):
            raise _error("'classes' must map label values (0..K) to names")
        try:
            classes = {int(k): v for k, v in self.classes.items()}
        except (TypeError, ValueError):
            raise _error("'classes' must map label values (0..K) to names")
        labels = sorted(classes)
        if labels != list(range(len(labels))):
            raise _error(f"classes must be 0..K without gaps, got {labels}")
        if len(labels) < 2 or not all(isinstance(v, str) and v for v in classes.values()):
            raise _error("'classes' needs background (0) and at least one named class")
        self.classes = dict(sorted(classes.items()))

    def _check_colours(self) -> None:
        classes = self.classes
        if not isinstance(self.colours, dict):
            raise _error("'colours' must map foreground labels to #rrggbb")
        colours = {}
        for k, colour in self.colours.items():
            if not re.fullmatch(r"#[0-9a-fA-F]{6}", str(colour)):
                raise _error(f"colour of class {k} is not #rrggbb: {colour!r}")
            try:
                colours[int(k)] = str(colour)
            except (TypeError, ValueError):
                raise _error(f"'colours' key {k!r} is not a label value")
        if set(colours) - set(classes) - {0}:
            raise _error(f"colours given for labels {sorted(set(colours) - set(classes))} that are not classes")
        self.colours = {**default_colours(classes), **colours}

    def _check_architecture(self) -> None:
        arch = self.architecture
        if not isinstance(arch, dict) or arch.get("name", "unet") != "unet":
            raise _error("'architecture' must describe a unet ({\"name\": \"unet\", ...})")
        unknown = set(arch) - ARCHITECTURE_KEYS
        if unknown:
            raise _error(f"architecture has unknown keys {sorted(unknown)}; known: {sorted(ARCHITECTURE_KEYS)}")
        if arch.get("spatial_dims") not in (2, 3):
            raise _error(f"architecture.spatial_dims must be 2 or 3, got {arch.get('spatial_dims')!r}")
        if arch.get("in_channels", 1) != 1:
            raise _error("architecture.in_channels must be 1 (one grey-level channel)")
        if arch.get("out_channels") != len(self.classes):
            raise _error("architecture.out_channels differs from the number of classes")
        channels = arch.get("channels")
        if not isinstance(channels, list) or len(channels) < 2 or not all(_is_int(c) and c > 0 for c in channels):
            raise _error(f"architecture.channels must be a list of positive channel counts, got {channels!r}")
        units = arch.get("num_res_units", 2)
        if not _is_int(units) or not 0 <= units <= 8:
            raise _error(f"architecture.num_res_units must be 0..8, got {units!r}")

    def _check_normalisation(self) -> None:
        norm = self.normalisation
        if not isinstance(norm, dict):
            raise _error("'normalisation' must map each modality to a spec")
        for modality in self.modalities:
            spec = norm.get(modality)
            if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str) or spec["kind"] not in NORMALISATION_KINDS:
                raise _error(f"normalisation of {modality} must be {{\"kind\": \"hu_window\" | \"percentile\", ...}}, "
                      f"got {spec!r}")
            bounds = spec.get(NORMALISATION_KINDS[spec["kind"]], [1.0, 99.0])
            if (not isinstance(bounds, list) or len(bounds) != 2 or not all(_is_number(b) for b in bounds)
                    or bounds[0] >= bounds[1]):
                raise _error(f"normalisation of {modality}: {NORMALISATION_KINDS[spec['kind']]} must be [low, high] "
                      f"with low < high, got {bounds!r}")

    def _check_modules(self) -> None:
        from .modules import MODULE_KINDS

        mods = self.modules
        if not isinstance(mods, dict):
            raise _error("'modules' must be null or the modules' config")
        if not isinstance(mods.get("kind"), str) or mods["kind"] not in MODULE_KINDS:
            raise _error(f"unknown module kind {mods.get('kind')!r}; known: {', '.join(sorted(MODULE_KINDS))}")
        unknown = set(mods) - MODULE_KEYS
        if unknown:
            raise _error(f"modules have unknown keys {sorted(unknown)}; known: {sorted(MODULE_KEYS)}")
        if mods.get("num_classes") != len(self.classes):
            raise _error("modules.num_classes differs from the number of classes")

    def _check_finetune(self) -> None:
        recipe = self.finetune
        if not isinstance(recipe, dict) or set(recipe) - set(FINETUNE_KEYS):
            raise _error(f"'finetune' must be an object with some of {', '.join(FINETUNE_KEYS)}, got {recipe!r}")
        for key, value in recipe.items():
            problem = finetune_option_problem(key, value)
            if problem:
                raise _error(f"'finetune.{key}' {problem}, got {value!r}")

    # ---- views --------------------------------------------------------------------------------
    @property
    def spatial_dims(self) -> int:
        return self.architecture["spatial_dims"]

    @property
    def foreground(self) -> dict[int, str]:
        """Classes without background: {label: name} for labels 1..K."""
        return {k: v for k, v in self.classes.items() if k > 0}

    @property
    def training_weights(self) -> dict[str, float]:
        """Loss weights of the training config (empty if the card does not record them)."""
        return dict(self.training.config.get("weights", {}))

    @property
    def val_sources(self) -> list[dict]:
        """The val data sources of the training record (dataset, split, modality, label_map, ...)."""
        return list(self.training.data.get("val", []))

    # ---- JSON ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw) -> ModelCard:
        """Validate a JSON card (as read) and migrate older ones: a card without ``plane`` gets
        "acquisition" if it is (or was fine-tuned from) the cine short-axis model, else "axial"."""
        if not isinstance(raw, dict):
            raise ModelLoadError("model card must be a JSON object; is this a napari-consistent-seg model?")
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ModelLoadError(f"model card is missing {', '.join(missing)}; is this a napari-consistent-seg model?")
        for key, types in _JSON_TYPES.items():
            if key in raw and not any(raw[key] is None if t is None else isinstance(raw[key], t) for t in types):
                raise _error(f"'{key}' must be {' or '.join(_JSON_NAMES[t] for t in types)}, "
                             f"got {type(raw[key]).__name__}")
        raw = copy.deepcopy(raw)
        fmt = raw.pop("format", FORMAT)
        if fmt != FORMAT:
            raise _error(f"format {fmt!r} is not {FORMAT!r}: the model was saved by another version; "
                  "update napari-consistent-seg or re-save the model")
        if "plane" not in raw:
            origins = [raw.get("name")] + [f.get("from_model") for f in raw.get("fine_tuning", [])
                                           if isinstance(f, dict)]
            raw["plane"] = "acquisition" if any(o in origins for o in _ACQUISITION_PLANE_MODELS) else "axial"
        post = raw.pop("postprocessing", None) or {}
        if not isinstance(post, dict) or set(post) - {"keep_largest_component", "cardiac"}:
            raise _error(_POSTPROCESSING_FORM)
        raw["keep_largest_component"] = post.get("keep_largest_component", False)
        raw["cardiac_cleanup"] = post.get("cardiac", False)
        if raw.get("colours") is None:
            raw["colours"] = {}
        raw["training"] = TrainingRecord.from_dict(raw.get("training") or {})
        raw["val_scores"] = raw.get("val_scores") or {}
        raw["finetune"] = raw.get("finetune") or {}
        for key in ("patch_size", "target_spacing_mm"):
            if isinstance(raw.get(key), tuple):
                raw[key] = list(raw[key])
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: raw.pop(k) for k in list(raw) if k not in known}
        try:
            return cls(**raw, extra=extra)
        except TypeError as exc:  # a field of the wrong JSON type reached a comparison
            raise ModelLoadError(f"model card: a field has the wrong type ({exc})") from exc

    def to_dict(self) -> dict:
        """The JSON form: string label keys, ``postprocessing`` as an object, extra keys kept."""
        out = {
            "name": self.name,
            "description": self.description,
            "architecture": copy.deepcopy(self.architecture),
            **({"modules": copy.deepcopy(self.modules)} if self.modules is not None else {}),
            "classes": {str(k): v for k, v in self.classes.items()},
            "colours": {str(k): v for k, v in self.colours.items()},
            "modalities": list(self.modalities),
            "normalisation": copy.deepcopy(self.normalisation),
            "plane": self.plane,
            "target_spacing_mm": None if self.target_spacing_mm is None else list(self.target_spacing_mm),
            "patch_size": list(self.patch_size),
            "postprocessing": {"keep_largest_component": self.keep_largest_component,
                               **({"cardiac": True} if self.cardiac_cleanup else {})},
            "training": self.training.to_dict() if self.training != TrainingRecord() else {},
            "val_scores": copy.deepcopy(self.val_scores),
            **({"fine_tuning": copy.deepcopy(self.fine_tuning)} if self.fine_tuning else {}),
            **({"finetune": copy.deepcopy(self.finetune)} if self.finetune else {}),
            "code_version": self.code_version,
            "created": self.created,
            "format": self.format,
        }
        return {**out, **copy.deepcopy(self.extra)}

    # ---- the places a card is made ------------------------------------------------------------
    @classmethod
    def for_training(cls, cfg, *, architecture: dict, modules: dict | None, training: TrainingRecord,
                     val_scores: dict | None = None) -> ModelCard:
        """The card of a model trained from ``cfg`` (a TrainConfig)."""
        return cls(
            name=cfg.name,
            description=cfg.description,
            architecture=dict(architecture),
            modules=None if modules is None else dict(modules),
            classes={int(k): v for k, v in cfg.classes.items()},
            colours={**default_colours(cfg.classes), **{int(k): v for k, v in cfg.colours.items()}},
            modalities=list(cfg.modalities),
            normalisation={m: cfg.normalisation[m] for m in cfg.modalities},
            plane=getattr(cfg, "plane", "axial"),
            target_spacing_mm=None if cfg.target_spacing_mm is None else list(cfg.target_spacing_mm),
            patch_size=list(cfg.patch_size),
            keep_largest_component=cfg.keep_largest_component,
            training=training,
            val_scores=val_scores or {},
        )

    def fine_tuned(self, record: dict) -> ModelCard:
        """A copy with one more fine-tuning ``record``; val scores are cleared (no longer measured)."""
        card = copy.deepcopy(self)
        card.fine_tuning.append(dict(record))
        card.val_scores = {}
        return card

    def stamped(self, *, architecture: dict, modules: dict | None, code_version: str, created: str) -> ModelCard:
        """A copy as written next to its weights: their architecture and modules, code version, date."""
        card = dataclasses.replace(self, architecture=dict(architecture),
                                   modules=None if modules is None else dict(modules),
                                   code_version=code_version, created=self.created or created, format=FORMAT)
        return copy.deepcopy(card)

    # ---- transitional dict-style reading ------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        """``card["key"]`` reads the JSON form, for code written when cards were dicts."""
        return self.to_dict()[key]

    def get(self, key: str, default=None) -> Any:
        return self.to_dict().get(key, default)

    def __setitem__(self, key: str, value) -> None:
        """``card["key"] = value`` with the JSON form of ``value``; the result is validated again."""
        raw = self.to_dict()
        raw[key] = value
        new = ModelCard.from_dict(raw)
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(new, f.name))

    def setdefault(self, key: str, default=None) -> Any:
        """As dict.setdefault; for ``fine_tuning`` the card's own list is returned (appends stick)."""
        if key == "fine_tuning":
            return self.fine_tuning
        if key not in self.to_dict():
            self[key] = default
        return self[key]
