"""Shared test fixtures: the real CT/MRI data beside the repository (../shared/data)."""

from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[1]
# Beside the repository on workstations; inside it where a checkout carries shared/.
_SHARED_DATA_CANDIDATES = (_REPO_ROOT.parent / "shared" / "data", _REPO_ROOT / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the shared data folder (README.md, splits.json, one folder per set); skips if absent."""
    for folder in _SHARED_DATA_CANDIDATES:
        if (folder / "splits.json").is_file():
            return folder
    pytest.skip("shared data not found at ../shared/data (see /work/shared/data/README.md)")


# ---- tiny models and a tiny synthetic data folder for the core tests (models, training, inference, CLI)

TINY_CHANNELS = (4, 8, 16, 32, 64)
TINY_CHANNELS_3D = (4, 8, 16, 32, 64)
TINY_HEADS = (2, 2, 2)
TOY_CLASSES = {1: "disk", 2: "ring", 3: "square"}
TOY_COLOURS = {1: "#ff0000", 2: "#00ff00", 3: "#0000ff"}


def tiny_card(name="tiny", *, modalities=("MR",), patch_size=(64, 64), num_classes=4) -> dict:
    """A model card for a tiny model (architecture and format are filled in by ``save_model``)."""
    from napari_consistent_seg.intensity import CT_ABDOMEN_WINDOW, MR_PERCENTILE

    specs = {"CT": CT_ABDOMEN_WINDOW, "MR": MR_PERCENTILE}
    return {
        "name": name,
        "classes": {"0": "background", **{str(k): f"class {k}" for k in range(1, num_classes)}},
        "modalities": list(modalities),
        "normalisation": {m: specs[m] for m in modalities},
        "patch_size": list(patch_size),
    }


def build_tiny(spatial_dims=2, num_classes=4, modules=None, seed=0):
    """A random tiny backbone and, with ``modules`` "icl" or "eam", its external modules."""
    import torch

    from napari_consistent_seg.models.modules import MODULE_KINDS
    from napari_consistent_seg.models.unet import UNet

    torch.manual_seed(seed)
    channels = TINY_CHANNELS if spatial_dims == 2 else TINY_CHANNELS_3D
    backbone = UNet(spatial_dims, 1, num_classes, channels).eval()
    mods = None
    if modules is not None:
        mods = MODULE_KINDS[modules](num_classes, backbone.tap_channels, TINY_HEADS, spatial_dims).eval()
    return backbone, mods


def save_tiny(folder, *, name="tiny", spatial_dims=2, modules="icl", modalities=("MR",), patch_size=None, seed=0):
    """Write a tiny random model folder; returns its path."""
    from napari_consistent_seg.models.store import save_model

    backbone, mods = build_tiny(spatial_dims, modules=modules, seed=seed)
    patch_size = patch_size or ((64, 64) if spatial_dims == 2 else (16, 32, 32))
    return save_model(folder, backbone, tiny_card(name, modalities=modalities, patch_size=patch_size), mods)


@pytest.fixture
def user_model_dir(tmp_path, monkeypatch) -> Path:
    """A fresh, empty user model folder ($CONSISTENT_SEG_MODEL_DIR)."""
    folder = tmp_path / "user-models"
    folder.mkdir()
    monkeypatch.setenv("CONSISTENT_SEG_MODEL_DIR", str(folder))
    return folder


@pytest.fixture
def tiny_model_path(tmp_path) -> Path:
    """A tiny 2D MR model with ICL modules saved beside it."""
    return save_tiny(tmp_path / "tiny-model")


def _toy_case(rng, modality="MR", n_slices=4, size=64):
    """(X, Y, Z) int16 image and uint8 labels: a disk (1), a ring (2), a square (3); CT in HU-like values."""
    import numpy as np

    yy, xx = np.mgrid[:size, :size]
    image = rng.normal(100, 20, (n_slices, size, size))
    labels = np.zeros((n_slices, size, size), np.uint8)
    for z in range(n_slices):
        cy, cx = rng.integers(18, size - 18, 2)
        r = np.hypot(yy - cy, xx - cx)
        labels[z][(r >= 8) & (r < 12)] = 2
        labels[z][r < 8] = 1
        sy, sx = rng.integers(2, size - 10, 2)
        square = np.zeros((size, size), bool)
        square[sy:sy + 8, sx:sx + 8] = True
        labels[z][square & (labels[z] == 0)] = 3
    image += np.choose(labels, [0, 700, 300, 500] if modality == "MR" else [-1100, 100, -100, 0])
    return image.astype(np.int16).transpose(2, 1, 0), labels.transpose(2, 1, 0)


def write_toy_data(root, n_train=3, n_val=1, seed=0) -> Path:
    """A shared-data-like folder (splits.json, <set>/images, <set>/labels) with two small sets,
    toy_mr and toy_ct, of 4 slices of 64 x 64 each; the same three classes in both."""
    import json

    import nibabel as nib
    import numpy as np

    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = {}
    for dataset in ("toy_mr", "toy_ct"):
        names = {"train": [f"case{i:02d}" for i in range(n_train)],
                 "val": [f"case{i:02d}" for i in range(n_train, n_train + n_val)]}
        splits[dataset] = names
        for sub in ("images", "labels"):
            (root / dataset / sub).mkdir(parents=True, exist_ok=True)
        for name in names["train"] + names["val"]:
            image, labels = _toy_case(rng, "CT" if dataset == "toy_ct" else "MR")
            affine = np.diag([1.5, 1.5, 3.0, 1.0])
            nib.save(nib.Nifti1Image(image, affine), root / dataset / "images" / f"{name}.nii.gz")
            nib.save(nib.Nifti1Image(labels, affine), root / dataset / "labels" / f"{name}.nii.gz")
    labels = {d: {str(k): v for k, v in TOY_CLASSES.items()} for d in splits}
    (root / "splits.json").write_text(json.dumps({"splits": splits, "labels": labels}))
    return root


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """A tiny synthetic data folder (see ``write_toy_data``), made once per session; read only."""
    return write_toy_data(tmp_path_factory.mktemp("toy-data"))


def toy_config(data_root, method="supervised", **overrides) -> dict:
    """A raw training config (as read from YAML) for the toy data: tiny network, few iterations."""
    mr = {"dataset": "toy_mr", "split": "train", "modality": "MR", "first_patients": 2}
    ct = {"dataset": "toy_ct", "split": "train", "modality": "CT", "first_patients": 2}
    raw = {
        "name": f"toy-{method}",
        "method": method,
        "data": {
            "root": str(data_root),
            "labeled": [mr, ct] if method == "eam" else [mr],
            "unlabeled": [{"dataset": "toy_mr", "split": "train", "modality": "MR", "skip_patients": 2}]
            if method == "icl" else [],
            "val": [{"dataset": "toy_mr", "split": "val", "modality": "MR"}]
            + ([{"dataset": "toy_ct", "split": "val", "modality": "CT"}] if method == "eam" else []),
        },
        "classes": dict(TOY_CLASSES),
        "colours": dict(TOY_COLOURS),
        "aligned_classes": [1, 2, 3] if method == "eam" else [],
        "normalisation": {"MR": {"kind": "percentile", "percentiles": [1, 99]},
                          "CT": {"kind": "hu_window", "window": [-125, 275]}},
        "channels": list(TINY_CHANNELS),
        "heads": list(TINY_HEADS),
        "patch_size": [48, 48],
        "batch_size": 2,
        "unlabeled_batch_size": 2,
        "iterations": 4,
        "lr": 0.003,
        "val_every": 2,
        "checkpoint_every": 2,
        "augmentation": {"rotate_deg": 10, "flips": False, "rot90": False},
        "seed": 0,
    }
    raw.update(overrides)
    return raw


def write_toy_config(path, data_root, method="supervised", **overrides) -> Path:
    """Write ``toy_config`` as a YAML file; returns its path."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(toy_config(data_root, method, **overrides)))
    return path
