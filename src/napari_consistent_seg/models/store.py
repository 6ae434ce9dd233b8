"""The model store: stripped checkpoints (safetensors weights + a JSON model card) on disk.

A model is a folder holding ``card.json``, ``backbone.safetensors`` and, optionally,
``modules.safetensors`` (the external attention modules kept for attention maps and warm-start
fine-tuning). Shipped models live in the package; user models in the user's data folder.
Nothing is ever unpickled: weights are read with safetensors, the card with json.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..errors import ModelLoadError
from .modules import build_modules
from .unet import UNet

CARD_FILE = "card.json"
BACKBONE_FILE = "backbone.safetensors"
MODULES_FILE = "modules.safetensors"
SHIPPED_DIR = Path(__file__).parent / "weights"
#: Environment variable that overrides the user model folder (tests, shared installs).
USER_DIR_ENV = "CONSISTENT_SEG_MODEL_DIR"

REQUIRED_CARD_KEYS = ("name", "architecture", "classes", "colours", "modalities", "normalisation", "patch_size")
# A palette for classes without a colour of their own (tab10-like, readable on grey scans).
DEFAULT_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
                   "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8"]


def user_model_dir() -> Path:
    """Where models saved by the user live (``$CONSISTENT_SEG_MODEL_DIR`` or the platform data dir)."""
    if os.environ.get(USER_DIR_ENV):
        return Path(os.environ[USER_DIR_ENV])
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-consistent-seg")) / "models"


def default_colours(classes: dict) -> dict[str, str]:
    return {str(k): DEFAULT_COLOURS[(int(k) - 1) % len(DEFAULT_COLOURS)] for k in classes if int(k) > 0}


def validate_card(card: dict) -> dict:
    """Check a model card's required keys and class table; return it with int-able class keys.

    ``classes`` maps each label value (as a string, JSON keys are strings) to its name,
    background (0) included; ``colours`` maps each foreground label to ``#rrggbb``.
    """
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise ModelLoadError(f"model card is missing {', '.join(missing)}; is this a napari-consistent-seg model?")
    classes = card["classes"]
    try:
        labels = sorted(int(k) for k in classes)
    except (TypeError, ValueError):
        raise ModelLoadError("model card 'classes' must map label values (0..K) to names") from None
    if labels != list(range(len(labels))):
        raise ModelLoadError(f"model card classes must be 0..K without gaps, got {labels}")
    if card["architecture"].get("out_channels") != len(labels):
        raise ModelLoadError("model card: architecture.out_channels differs from the number of classes")
    for k, colour in card["colours"].items():
        if not re.fullmatch(r"#[0-9a-fA-F]{6}", str(colour)):
            raise ModelLoadError(f"model card: colour of class {k} is not #rrggbb: {colour!r}")
    if not card["modalities"] or any(m not in ("CT", "MR") for m in card["modalities"]):
        raise ModelLoadError(f"model card 'modalities' must list CT and/or MR, got {card['modalities']}")
    post = card.get("postprocessing", {})
    if not isinstance(post, dict) or not isinstance(post.get("keep_largest_component", False), bool):
        raise ModelLoadError("model card 'postprocessing' must be {\"keep_largest_component\": true|false}")
    return card


def build_backbone(architecture: dict) -> UNet:
    arch = dict(architecture)
    arch.pop("name", None)
    return UNet(**arch)


def architecture_of(backbone: UNet) -> dict:
    return dict(
        name="unet", spatial_dims=backbone.spatial_dims, in_channels=backbone.in_channels,
        out_channels=backbone.out_channels, channels=list(backbone.channels),
        num_res_units=backbone.num_res_units,
    )


@dataclass
class Model:
    """A loaded model: the stripped backbone, its card, and the modules if they were saved."""

    backbone: UNet
    card: dict
    modules: nn.Module | None = None
    path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def classes(self) -> dict[int, str]:
        return {int(k): v for k, v in self.card["classes"].items()}

    @property
    def colours(self) -> dict[int, str]:
        return {int(k): v for k, v in self.card["colours"].items()}

    @property
    def spatial_dims(self) -> int:
        return self.backbone.spatial_dims

    def to(self, device) -> "Model":
        self.backbone.to(device)
        if self.modules is not None:
            self.modules.to(device)
        return self


def _load_weights(module: nn.Module, path: Path) -> None:
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read weights {path}: {exc}. Re-save or re-download the model.") from exc
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights {path.name} do not fit the architecture in the card: {exc}") from exc


def save_model(folder: str | Path, backbone: UNet, card: dict, modules: nn.Module | None = None) -> Path:
    """Write a stripped model folder: card.json, backbone.safetensors, and modules.safetensors.

    The card gets the architecture, the module config, the code version and a timestamp.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card = dict(card)
    card["architecture"] = architecture_of(backbone)
    card.setdefault("colours", default_colours(card["classes"]))
    card["code_version"] = __version__
    card.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    card["format"] = "napari-consistent-seg/1"
    state = {k: v.detach().to("cpu").contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(folder / BACKBONE_FILE))
    if modules is not None:
        card["modules"] = dict(modules.config)
        mstate = {k: v.detach().to("cpu").contiguous() for k, v in modules.state_dict().items()}
        save_file(mstate, str(folder / MODULES_FILE))
    else:
        card.pop("modules", None)
        (folder / MODULES_FILE).unlink(missing_ok=True)
    validate_card(card)
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return folder


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A shipped or user model name, or a path to a model folder / its card / its backbone file."""
    text = str(name_or_path)
    for root in (user_model_dir(), SHIPPED_DIR):
        if re.fullmatch(r"[\w.+-]+", text) and (root / text / CARD_FILE).is_file():
            return root / text
    path = Path(text).expanduser()
    if path.is_dir() and (path / CARD_FILE).is_file():
        return path
    if path.is_file() and path.name in (CARD_FILE, BACKBONE_FILE, MODULES_FILE):
        return path.parent
    if path.is_file():
        raise ModelLoadError(
            f"{path} is not a napari-consistent-seg model: expected a folder with {CARD_FILE} and "
            f"{BACKBONE_FILE} (pickled .pt/.pth checkpoints are never loaded)"
        )
    known = ", ".join(m["name"] for m in list_models()) or "none"
    raise ModelLoadError(f"no model called {text!r} and no such folder. Known models: {known}")


def read_card(name_or_path: str | Path) -> dict:
    folder = resolve_model_path(name_or_path)
    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read model card {folder / CARD_FILE}: {exc}") from exc
    return validate_card(card)


def load_model(name_or_path: str | Path, *, with_modules: bool = True, device: str | torch.device = "cpu") -> Model:
    """Load a model by name (shipped or user) or path. Modules are loaded if saved and asked for."""
    folder = resolve_model_path(name_or_path)
    card = read_card(folder)
    backbone = build_backbone(card["architecture"])
    _load_weights(backbone, folder / BACKBONE_FILE)
    backbone.eval()
    modules = None
    if with_modules and card.get("modules") and (folder / MODULES_FILE).is_file():
        modules = build_modules(card["modules"])
        _load_weights(modules, folder / MODULES_FILE)
        modules.eval()
    return Model(backbone, card, modules, folder).to(device)


def list_models() -> list[dict]:
    """Every loadable model: {"name", "source" ("shipped" | "user"), "path", "modalities", "classes"}."""
    found = []
    for source, root in (("shipped", SHIPPED_DIR), ("user", user_model_dir())):
        if not root.is_dir():
            continue
        for card_path in sorted(root.glob(f"*/{CARD_FILE}")):
            try:
                card = json.loads(card_path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            found.append(dict(
                name=card.get("name", card_path.parent.name), source=source, path=str(card_path.parent),
                modalities=card.get("modalities", []), classes=card.get("classes", {}),
            ))
    return found


def save_user_model(name: str, model: Model, *, overwrite: bool = False) -> Path:
    """Save ``model`` under the user's data folder as ``name`` so it is listed and loadable by name."""
    if not re.fullmatch(r"[\w.+-]+", name):
        raise ModelLoadError(f"model name {name!r}: use letters, digits, '.', '_', '+' or '-' only")
    if (SHIPPED_DIR / name).exists():
        raise ModelLoadError(f"{name!r} is the name of a shipped model; choose another name")
    folder = user_model_dir() / name
    if folder.exists() and not overwrite:
        raise ModelLoadError(f"a user model called {name!r} exists already ({folder}); choose another name")
    card = dict(model.card, name=name)
    return save_model(folder, model.backbone, card, model.modules)
