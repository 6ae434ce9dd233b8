"""Training data: case lists from a ``splits.json`` folder, and 2D slice streams to sample from.

A data-set folder holds ``<set>/images/<case>.nii.gz`` and ``<set>/labels/<case>.nii.gz`` with a
``splits.json`` beside the sets (the layout of ../shared/data). Volumes are loaded once through
``io.load_volume`` (canonical (z, y, x)), normalised, optionally resampled in-plane, and kept in
memory as slices; labels are mapped onto the model's class list with a per-data-set label map.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from ..errors import ConsistentSegError
from ..inference import inplane_size
from ..intensity import normalise_intensity
from ..io import load_labels, load_volume


@dataclass
class Case:
    name: str
    image: Path
    label: Path | None


def patient_of(case_name: str) -> str:
    """Cases of one patient share the part before ``_frame`` (acdc); other sets: one case each."""
    return case_name.split("_frame")[0]


def select_cases(root, dataset: str, split: str, *, first_patients: int | None = None,
                 skip_patients: int = 0, cases: list[str] | None = None) -> list[Case]:
    """Cases of ``dataset``/``split`` from ``root/splits.json``, in the file's order.

    ``skip_patients`` then ``first_patients`` select by patient (all frames of a patient together),
    e.g. the first 7 acdc training patients, or all but them.
    """
    root = Path(root)
    splits_path = root / "splits.json"
    if not splits_path.is_file():
        raise ConsistentSegError(f"no splits.json in {root}: point the config's data root at the data folder")
    splits = json.loads(splits_path.read_text())["splits"]
    if dataset not in splits or split not in splits[dataset]:
        raise ConsistentSegError(f"splits.json has no {dataset}/{split}")
    names = cases if cases is not None else splits[dataset][split]
    patients: list[str] = []
    for name in names:
        if patient_of(name) not in patients:
            patients.append(patient_of(name))
    keep = patients[skip_patients:]
    if first_patients is not None:
        keep = keep[:first_patients]
    keep_set = set(keep)
    out = []
    for name in names:
        if patient_of(name) in keep_set:
            label = root / dataset / "labels" / f"{name}.nii.gz"
            out.append(Case(name, root / dataset / "images" / f"{name}.nii.gz", label if label.is_file() else None))
    return out


def map_labels(labels: np.ndarray, label_map: dict | None) -> np.ndarray:
    """Map data-set label values onto the model's classes; unmapped values become background."""
    if not label_map:
        return labels.astype(np.uint8)
    lut = np.zeros(max(256, int(labels.max()) + 1), np.uint8)
    for src, dst in label_map.items():
        lut[int(src)] = int(dst)
    return lut[labels.astype(np.int64)]


def resample_inplane(image: np.ndarray, labels: np.ndarray | None, spacing_mm, target_yx):
    """Resample (Z, Y, X) slices to ``target_yx`` mm in-plane (bilinear image, nearest labels)."""
    size = inplane_size(image.shape[1:], spacing_mm, target_yx)
    if size is None:
        return image, labels
    img = F.interpolate(torch.from_numpy(image)[:, None], size=size, mode="bilinear", align_corners=False)
    return img[:, 0].numpy(), None if labels is None else resample_labels(labels, spacing_mm, target_yx)


def resample_labels(labels: np.ndarray, spacing_mm, target_yx) -> np.ndarray:
    """(Z, Y, X) uint8 labels resampled as ``resample_inplane`` resamples them (nearest), without an image."""
    size = inplane_size(labels.shape[1:], spacing_mm, target_yx)
    if size is None:
        return labels
    lab = F.interpolate(torch.from_numpy(labels)[:, None].float(), size=size, mode="nearest")
    return lab[:, 0].numpy().astype(np.uint8)


@dataclass
class Source:
    """One data set's contribution: which cases, how to read them, which modality."""

    dataset: str
    split: str = "train"
    modality: str = "MR"
    first_patients: int | None = None
    skip_patients: int = 0
    label_map: dict | None = None
    cases: list[str] | None = None
    # CT only: data-set label -> that tissue's HU on an unenhanced (no contrast) scan. With
    # ``unenhanced_probability`` a sampled slice has its labelled tissues moved toward these values
    # (see ``unenhance``), so that a model trained on contrast CT sees scans without contrast.
    unenhanced_hu: dict | None = None
    unenhanced_probability: float = 0.5

    def select(self, root) -> list[Case]:
        return select_cases(root, self.dataset, self.split, first_patients=self.first_patients,
                            skip_patients=self.skip_patients, cases=self.cases)


@dataclass
class LoadedCase:
    """A normalised volume in memory: image (Z, Y, X) float32, labels (Z, Y, X) uint8 or None."""

    name: str
    image: np.ndarray
    labels: np.ndarray | None
    spacing_mm: tuple[float, float, float]
    modality: str
    unenhanced: Unenhanced | None = None  # where the source sets unenhanced_hu


@dataclass
class Unenhanced:
    """What ``unenhance`` needs of a case: the data set's own labels (``tissues``, on the case's grid),
    per label the change in normalised units that takes the tissue's median to its unenhanced HU,
    how often a slice is changed, and the HU of one normalised unit (the window's width)."""

    tissues: np.ndarray
    shift: dict[int, float]
    probability: float
    hu_per_unit: float


def load_cases(root, source: Source, normalisation: dict, target_spacing_yx=None, *, with_labels=True) -> list[LoadedCase]:
    spec = normalisation[source.modality]
    out = []
    for case in source.select(root):
        vol = load_volume(case.image, modality=source.modality)
        image = normalise_intensity(vol.data, spec)
        labels = unenhanced = None
        if with_labels:
            if case.label is None:
                raise ConsistentSegError(f"{case.name}: no label file, but the config uses it as labeled")
            raw = load_labels(case.label, f"{case.name}'s labels").data
            labels = map_labels(raw, source.label_map)
            if source.unenhanced_hu:
                unenhanced = _unenhanced(image, raw.astype(np.uint8), source, spec)
        spacing = vol.geometry.spacing_mm
        if unenhanced is not None:
            unenhanced.tissues = resample_labels(unenhanced.tissues, spacing, target_spacing_yx)
        image, labels = resample_inplane(image, labels, spacing, target_spacing_yx)
        if target_spacing_yx:
            spacing = (spacing[0], *target_spacing_yx)
        out.append(LoadedCase(case.name, image, labels, tuple(spacing), source.modality, unenhanced))
    return out


def _unenhanced(image: np.ndarray, tissues: np.ndarray, source: Source, spec: dict) -> Unenhanced | None:
    """For each of ``source.unenhanced_hu``'s labels present, its unenhanced HU minus its median, in
    ``image``'s normalised units; None where none is present."""
    if spec.get("kind") != "hu_window":
        raise ConsistentSegError("unenhanced_hu needs a CT source normalised with a HU window")
    lo, hi = (float(v) for v in spec["window"])
    shift = {}
    for label, hu in source.unenhanced_hu.items():
        inside = tissues == int(label)
        if inside.any():
            shift[int(label)] = (float(hu) - lo) / (hi - lo) - float(np.median(image[inside]))
    return Unenhanced(tissues, shift, source.unenhanced_probability, hi - lo) if shift else None


def unenhance(image: np.ndarray, tissues: np.ndarray, case: Unenhanced, rng: np.random.Generator) -> np.ndarray:
    """A contrast CT slice (``tissues``: its labels) made to look unenhanced, for augmentation.

    Each labelled tissue moves a share ``a`` (drawn from 0.3-1, so later and weaker phases too) of the
    way from its median to its unenhanced value, all tissues together offset by up to -15..+10 HU
    (scanners and doses differ); the change is blurred over about a pixel, so no step edge tells the
    network where a label ends. Texture and unlabelled tissue (fat, muscle, bone, bowel) stay as they are.
    """
    share, offset = rng.uniform(0.3, 1.0), rng.uniform(-15.0, 10.0) / case.hu_per_unit
    change = np.zeros(image.shape, np.float32)
    for label, value in case.shift.items():
        change[tissues == label] = share * value + offset
    if not change.any():
        return image
    return np.clip(image + gaussian_filter(change, 1.0), 0.0, 1.0)


class SliceStream:
    """Random 2D patches from the z slices of in-memory volumes.

    ``slice_mask`` restricts which slices of each volume may be drawn (e.g. only painted slices
    for fine-tuning). With probability ``foreground_fraction`` a labeled patch is centred on a
    random foreground pixel (label ``foreground_from`` or above), so that small organs are seen
    often enough.
    """

    def __init__(self, images: list[np.ndarray], labels: list[np.ndarray | None], patch_size,
                 *, slice_masks: list[np.ndarray] | None = None, foreground_fraction: float = 0.5,
                 foreground_from: int = 1, seed: int = 0):
        if not images:
            raise ConsistentSegError("no volumes to sample slices from")
        self.images, self.labels = images, labels
        self.patch = tuple(int(p) for p in patch_size)
        self.fg, self.fg_from = foreground_fraction, foreground_from
        self.rng = np.random.default_rng(seed)
        self.unenhanced: list[Unenhanced | None] = [None] * len(images)  # per volume, see from_cases
        self.index = []
        for v, img in enumerate(images):
            allowed = np.ones(img.shape[0], bool) if slice_masks is None else slice_masks[v]
            self.index += [(v, z) for z in np.flatnonzero(allowed)]
        if not self.index:
            raise ConsistentSegError("no slices to sample from")

    @classmethod
    def from_cases(cls, cases: list[LoadedCase], patch_size, *, use_labels=True, **kw) -> "SliceStream":
        stream = cls([c.image for c in cases], [c.labels if use_labels else None for c in cases], patch_size, **kw)
        stream.unenhanced = [c.unenhanced for c in cases]
        return stream

    def __len__(self) -> int:
        return len(self.index)

    def _crop_origin(self, shape, labels2d) -> tuple[int, int]:
        ph, pw = self.patch
        h, w = shape
        if labels2d is not None and self.fg > 0 and self.rng.random() < self.fg:
            fg = np.argwhere(labels2d >= self.fg_from)
            if len(fg):
                cy, cx = fg[self.rng.integers(len(fg))]
                return (int(np.clip(cy - ph // 2, 0, max(h - ph, 0))), int(np.clip(cx - pw // 2, 0, max(w - pw, 0))))
        return int(self.rng.integers(max(h - ph, 0) + 1)), int(self.rng.integers(max(w - pw, 0) + 1))

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 1, ph, pw) float32 images and (B, ph, pw) int64 labels (None if unlabeled).

        Slices smaller than the patch are zero-padded (background) at the high end.
        """
        ph, pw = self.patch
        images = np.zeros((batch_size, 1, ph, pw), np.float32)
        labels = np.zeros((batch_size, ph, pw), np.int64)
        has_labels = True
        for b in range(batch_size):
            v, z = self.index[self.rng.integers(len(self.index))]
            img = self.images[v][z]
            lab = self.labels[v][z] if self.labels[v] is not None else None
            has_labels &= lab is not None
            y0, x0 = self._crop_origin(img.shape, lab)
            crop = img[y0:y0 + ph, x0:x0 + pw]
            extra = self.unenhanced[v]
            if extra is not None and self.rng.random() < extra.probability:
                crop = unenhance(crop, extra.tissues[z, y0:y0 + ph, x0:x0 + pw], extra, self.rng)
            images[b, 0, :crop.shape[0], :crop.shape[1]] = crop
            if lab is not None:
                lcrop = lab[y0:y0 + ph, x0:x0 + pw]
                labels[b, :lcrop.shape[0], :lcrop.shape[1]] = lcrop
        return torch.from_numpy(images), (torch.from_numpy(labels) if has_labels else None)
