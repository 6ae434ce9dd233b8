"""Training configuration: one YAML file per run, saved next to its checkpoints and in the card.

Paths in the YAML (``data.root``) are relative to the YAML file's folder unless absolute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import ConsistentSegError
from .data import Source

METHODS = ("supervised", "icl", "eam")

DEFAULT_WEIGHTS = {
    # ICL (ACDC setting of the reference): L_seg + L_aux + L_pse + 50 L_cons
    "aux": 1.0, "pse": 1.0, "cons": 50.0,
    # EAM: L_seg + map supervision + representation KL + correlation consistency
    "map": 1.0, "rep": 0.1, "corr": 1.0,
}


@dataclass
class TrainConfig:
    name: str
    method: str
    data_root: str
    classes: dict[int, str]
    normalisation: dict
    labeled: list[Source]
    val: list[Source]
    unlabeled: list[Source] = field(default_factory=list)
    aligned_classes: list[int] = field(default_factory=list)
    colours: dict[int, str] = field(default_factory=dict)
    target_spacing_mm: list[float] | None = None
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    heads: list[int] = field(default_factory=lambda: [8, 4, 2])
    iterations: int = 10000
    batch_size: int = 8
    unlabeled_batch_size: int = 8
    patch_size: list[int] = field(default_factory=lambda: [224, 224])
    lr: float = 1e-3
    weight_decay: float = 1e-4
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    augmentation: dict = field(default_factory=dict)
    foreground_fraction: float = 0.5
    val_every: int = 500
    checkpoint_every: int = 250
    max_minutes: float | None = None
    rampup_iterations: int = 0  # 0: the reference (no ramp-up); else a sigmoid ramp of ICL's pse/cons, EAM's rep/corr
    # ICL: pse and cons only over unlabeled pixels where the backbone's softmax peaks at >= this
    # (0: every pixel, as in the reference)
    confidence_threshold: float = 0.0
    keep_largest_component: bool = True  # inference post-processing written into the model card
    # the slice plane written into the model card: "acquisition" (the scans' own slice axis) or
    # "axial" / "coronal" / "sagittal"; the training sets are axial, where both are the same
    plane: str = "axial"
    # start from a model's weights (a shipped or user model name, or a model folder) instead of a
    # random init: the backbone, and the modules too when the model has them and the method uses them
    init_from: str | None = None
    stop_at: int | None = None  # stop this call at this iteration; the LR schedule still spans `iterations`
    seed: int = 0
    description: str = ""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConsistentSegError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "icl" and not self.unlabeled:
            raise ConsistentSegError("an icl config needs data.unlabeled sources")
        if self.method == "eam" and len(self.labeled) < 2:
            raise ConsistentSegError("an eam config needs two labeled sources (one per modality)")
        self.classes = {int(k): str(v) for k, v in self.classes.items()}
        self.classes.setdefault(0, "background")
        self.colours = {int(k): str(v) for k, v in self.colours.items()}
        self.weights = {**DEFAULT_WEIGHTS, **self.weights}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def modalities(self) -> list[str]:
        seen: list[str] = []
        for s in self.labeled + self.unlabeled:
            if s.modality not in seen:
                seen.append(s.modality)
        return seen

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["classes"] = {str(k): v for k, v in self.classes.items()}
        d["colours"] = {str(k): v for k, v in self.colours.items()}
        return d


def _sources(items) -> list[Source]:
    return [Source(**dict(item)) for item in (items or [])]


def config_from_dict(raw: dict, base_dir: Path | None = None) -> TrainConfig:
    raw = dict(raw)
    data = dict(raw.pop("data", {}))
    root = Path(data.pop("root", raw.pop("data_root", ".")))
    if base_dir is not None and not root.is_absolute():
        root = (base_dir / root).resolve()
    try:
        return TrainConfig(
            data_root=str(root),
            labeled=_sources(data.pop("labeled", raw.pop("labeled", []))),
            unlabeled=_sources(data.pop("unlabeled", raw.pop("unlabeled", []))),
            val=_sources(data.pop("val", raw.pop("val", []))),
            **raw,
        )
    except TypeError as exc:
        raise ConsistentSegError(f"bad training config: {exc}") from exc


def load_config(path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML config; ``overrides`` replace top-level keys (e.g. iterations, max_minutes)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConsistentSegError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConsistentSegError(f"config {path} must be a YAML mapping (name: ..., method: ..., data: ...); "
                                 "see configs/ for examples")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_dict(raw, path.parent)
