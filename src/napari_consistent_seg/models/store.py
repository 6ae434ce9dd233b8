"""The model store: stripped checkpoints (safetensors weights + a JSON model card) on disk.

A model is a folder holding ``card.json``, ``backbone.safetensors`` and, optionally,
``modules.safetensors`` (the external attention modules kept for attention maps and warm-start
fine-tuning). Shipped models live in the package; user models in the user's data folder.
Nothing is ever unpickled: weights are read with safetensors, the card with json.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..errors import ModelLoadError
from .card import MAX_NAME_LENGTH, ModelCard, default_colours
from .modules import build_modules
from .unet import UNet

CARD_FILE = "card.json"
BACKBONE_FILE = "backbone.safetensors"
MODULES_FILE = "modules.safetensors"
SHIPPED_DIR = Path(__file__).parent / "weights"
#: Environment variable that overrides the user model folder (tests, shared installs).
USER_DIR_ENV = "CONSISTENT_SEG_MODEL_DIR"

_NAME = re.compile(r"[\w.+-]+")


def user_model_dir() -> Path:
    """Where models saved by the user live (``$CONSISTENT_SEG_MODEL_DIR`` or the platform data dir)."""
    if os.environ.get(USER_DIR_ENV):
        return Path(os.environ[USER_DIR_ENV])
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-consistent-seg")) / "models"


def validate_card(card: dict | ModelCard) -> ModelCard:
    """The validated (and migrated) ModelCard of a JSON card; ModelLoadError says what is wrong."""
    return card if isinstance(card, ModelCard) else ModelCard.from_dict(card)


def build_backbone(architecture: dict) -> UNet:
    arch = dict(architecture)
    arch.pop("name", None)
    try:
        return UNet(**arch)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"the card's architecture {architecture} cannot be built: {exc}") from exc


def build_saved_modules(config: dict) -> nn.Module:
    try:
        return build_modules(config)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"the card's modules {config} cannot be built: {exc}") from exc


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
    card: ModelCard
    modules: nn.Module | None = None
    path: Path | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.card = validate_card(self.card)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def classes(self) -> dict[int, str]:
        return dict(self.card.classes)

    @property
    def colours(self) -> dict[int, str]:
        return dict(self.card.colours)

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


def save_model(folder: str | Path, backbone: UNet, card: ModelCard | dict[str, Any],
               modules: nn.Module | None = None) -> Path:
    """Write a stripped model folder: card.json, backbone.safetensors, and modules.safetensors.

    ``card``: a ModelCard, or its JSON form (architecture and colours may be left out). The written
    card gets the backbone's architecture, the modules' config, the code version and a timestamp.
    """
    folder = Path(folder)
    if isinstance(card, ModelCard):
        card = card.to_dict()
    card = {**card, "architecture": architecture_of(backbone)}
    if modules is not None:
        card["modules"] = dict(modules.config)
    else:
        card.pop("modules", None)
    card = validate_card(card).stamped(
        architecture=architecture_of(backbone), modules=None if modules is None else dict(modules.config),
        code_version=__version__, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in backbone.state_dict().items()}
        save_file(state, str(folder / BACKBONE_FILE))
        if modules is not None:
            mstate = {k: v.detach().to("cpu").contiguous() for k, v in modules.state_dict().items()}
            save_file(mstate, str(folder / MODULES_FILE))
        else:
            (folder / MODULES_FILE).unlink(missing_ok=True)
        (folder / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2, sort_keys=False) + "\n")
    except OSError as exc:
        raise ModelLoadError(f"cannot write the model to {folder}: {exc}. Choose a folder you can write to.") from exc
    return folder


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A shipped or user model name, or a path to a model folder / its card / its backbone file."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelLoadError(f"a model is a name or a folder, got {type(name_or_path).__name__}")
    text = str(name_or_path)
    if not text.strip():
        raise ModelLoadError("no model given: pass a model name (consistent-seg list) or a model folder")
    try:
        for root in (user_model_dir(), SHIPPED_DIR):
            if _NAME.fullmatch(text) and len(text) <= MAX_NAME_LENGTH and (root / text / CARD_FILE).is_file():
                return root / text
        path = Path(text).expanduser()
        is_dir, is_file = path.is_dir(), path.is_file()
        has_card = is_dir and (path / CARD_FILE).is_file()
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        raise ModelLoadError(f"{text[:80]!r}{'...' if len(text) > 80 else ''} is neither a model name nor a "
                             f"readable folder ({getattr(exc, 'strerror', None) or exc}); see consistent-seg list") from exc
    if has_card:
        return path
    if is_file and path.name in (CARD_FILE, BACKBONE_FILE, MODULES_FILE):
        return path.parent
    if is_file:
        raise ModelLoadError(
            f"{path} is not a napari-consistent-seg model: expected a folder with {CARD_FILE} and "
            f"{BACKBONE_FILE} (pickled .pt/.pth checkpoints are never loaded)"
        )
    known = ", ".join(m["name"] for m in list_models()) or "none"
    shown = text if len(text) <= 80 else text[:80] + "..."
    raise ModelLoadError(f"no model called {shown!r} and no such folder. Known models: {known}")


def read_card(name_or_path: str | Path) -> ModelCard:
    folder = resolve_model_path(name_or_path)
    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read model card {folder / CARD_FILE}: {exc}") from exc
    try:
        return validate_card(card)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{folder / CARD_FILE}: {exc}") from exc


def load_model(name_or_path: str | Path, *, with_modules: bool = True, device: str | torch.device = "cpu") -> Model:
    """Load a model by name (shipped or user) or path. Modules are loaded if saved and asked for."""
    folder = resolve_model_path(name_or_path)
    card = read_card(folder)
    backbone = build_backbone(card.architecture)
    _load_weights(backbone, folder / BACKBONE_FILE)
    backbone.eval()
    modules = None
    if with_modules and card.modules and (folder / MODULES_FILE).is_file():
        modules = build_saved_modules(card.modules)
        _load_weights(modules, folder / MODULES_FILE)
        modules.eval()
    model = Model(backbone, card, modules, folder)
    try:
        return model.to(device)
    except (RuntimeError, AssertionError, TypeError, ValueError) as exc:  # torch's words for a bad device
        raise ModelLoadError(f"cannot put the model on device {device!r} ({exc}); use cpu, cuda or cuda:N "
                             "where this machine has one") from exc


def list_models() -> list[dict]:
    """Every loadable model: {"name", "source" ("shipped" | "user"), "path", "modalities", "classes"}."""
    found = []
    for source, root in (("shipped", SHIPPED_DIR), ("user", user_model_dir())):
        if not root.is_dir():
            continue
        for card_path in sorted(root.glob(f"*/{CARD_FILE}")):
            try:
                card = json.loads(card_path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if not isinstance(card, dict):
                continue
            found.append(dict(
                name=card.get("name", card_path.parent.name), source=source, path=str(card_path.parent),
                modalities=card.get("modalities", []), classes=card.get("classes", {}),
            ))
    return found


def save_user_model(name: str, model: Model, *, overwrite: bool = False) -> Path:
    """Save ``model`` under the user's data folder as ``name`` so it is listed and loadable by name."""
    if not isinstance(model, Model):
        raise ModelLoadError(f"only a loaded or fine-tuned Model can be saved, got {type(model).__name__}")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise ModelLoadError(f"model name {name!r}: use letters, digits, '.', '_', '+' or '-' only")
    if len(name) > MAX_NAME_LENGTH:
        raise ModelLoadError(f"model name is {len(name)} characters long: use at most {MAX_NAME_LENGTH}")
    if (SHIPPED_DIR / name).exists():
        raise ModelLoadError(f"{name!r} is the name of a shipped model; choose another name")
    folder = user_model_dir() / name
    if folder.exists() and not overwrite:
        raise ModelLoadError(f"a user model called {name!r} exists already ({folder}); choose another name")
    card = dataclasses.replace(validate_card(model.card), name=name)
    return save_model(folder, model.backbone, card, model.modules)
