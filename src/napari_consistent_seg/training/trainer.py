"""The training loop shared by the supervised, ICL and EAM methods.

Resumable: every ``checkpoint_every`` iterations the backbone, modules and optimizer go to
``<run>/state.safetensors`` with the loop's counters in ``<run>/state.json`` (no pickle).
The best model on val is kept as a stripped model in ``<run>/best`` (backbone + card + modules).
Runs unchanged under ``torchrun`` (DDP: gloo on CPU, NCCL on CUDA); rank 0 evaluates and saves.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..errors import Cancelled, ConsistentSegError
from ..inference import check_cancel, pick_device, run_slices
from ..metrics import dice
from ..models.modules import EAMModule, ICLModules
from ..models.card import ModelCard, TrainingRecord
from ..models.store import architecture_of, save_model
from ..models.unet import UNet
from .augment import Augmentation
from .config import TrainConfig
from .data import LoadedCase, SliceStream, load_cases
from .objectives import Objective

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def build_networks(cfg: TrainConfig) -> tuple[UNet, torch.nn.Module | None]:
    backbone = UNet(2, 1, cfg.num_classes, tuple(cfg.channels))
    kind = {"icl": ICLModules, "eam": EAMModule}.get(cfg.method)
    modules = kind(cfg.num_classes, backbone.tap_channels, tuple(cfg.heads), 2) if kind else None
    return backbone, modules


def init_weights(backbone: UNet, modules: torch.nn.Module | None, name_or_path: str) -> dict:
    """Copy a saved model's weights into freshly built networks (``init_from``), and return what the
    new card records of it (``training.extra["init_from"]``): its name, creation date and training.

    The backbone must match exactly; modules are copied when both sides have them and they match,
    else they keep their random init (e.g. ICL modules on top of a supervised model).
    """
    from ..models.store import load_model

    source = load_model(name_or_path, with_modules=modules is not None)
    try:
        backbone.load_state_dict(source.backbone.state_dict(), strict=True)
    except RuntimeError as exc:
        raise ConsistentSegError(
            f"init_from={name_or_path!r}: its backbone does not fit this config (classes, channels): {exc}") from exc
    if modules is not None and source.modules is not None and type(source.modules) is type(modules):
        try:
            modules.load_state_dict(source.modules.state_dict(), strict=True)
        except RuntimeError as exc:
            raise ConsistentSegError(f"init_from={name_or_path!r}: its modules do not fit this config: {exc}") from exc
    card, training = source.card, source.card.training
    return {"model": str(name_or_path), "name": card.name, "created": card.created, "method": training.method,
            "iterations": training.iterations, "commands": list(training.commands), "notes": training.notes,
            "started_from": dict(training.extra.get("init_from", {}))}


def validate(backbone, cases: list[LoadedCase], num_classes: int, device, batch_size: int = 16) -> dict:
    """Mean 3D Dice per class over ``cases`` (normalised volumes in memory), and per modality.

    Returns {"dice": {class: mean}, "mean": float, "by_modality": {mod: {"dice": ..., "mean": ...}}}.
    A class absent from both prediction and reference in a case is not scored for that case.
    """
    backbone.eval()
    per_mod: dict[str, list[list[float]]] = {}
    for case in cases:
        probs = run_slices(lambda x: backbone(x), case.image, num_classes, device=device, batch_size=batch_size)
        pred = probs.argmax(0)
        per_mod.setdefault(case.modality, []).append([dice(pred, case.labels, k) for k in range(1, num_classes)])
    backbone.train()

    def summary(rows):
        per_class = np.nanmean(np.array(rows, float), axis=0)
        return {"dice": {k + 1: float(v) for k, v in enumerate(per_class)}, "mean": float(np.nanmean(per_class))}

    by_mod = {m: summary(rows) for m, rows in per_mod.items()}
    overall = summary([r for rows in per_mod.values() for r in rows])
    # selection score: the mean over modalities, so neither modality dominates by case count
    overall["mean"] = float(np.mean([v["mean"] for v in by_mod.values()]))
    overall["by_modality"] = by_mod
    return overall


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


@dataclass
class TrainResult:
    run_dir: Path
    iterations: int
    best_score: float
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False


class Trainer:
    """Builds data, networks and optimizer from a config; ``fit()`` runs or resumes training."""

    def __init__(self, cfg: TrainConfig, run_dir, *, device=None, resume: bool = False, command: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.distributed = dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if self.distributed and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device = f"cuda:{torch.cuda.current_device()}"
        self.device = pick_device(device)
        self.command = command or " ".join(sys.argv)
        self.commands = [self.command]  # every invocation that contributed, resumes included
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.backbone, self.modules = build_networks(cfg)
        resuming = resume and (self.run_dir / STATE_JSON).is_file()
        self.started_from: dict = {}  # the init_from model, as its card described it
        if cfg.init_from and not resuming:  # a resumed run has its own weights
            self.started_from = init_weights(self.backbone, self.modules, cfg.init_from)
        self.objective = Objective(cfg.method, self.backbone, self.modules, cfg.weights, cfg.aligned_classes,
                                   cfg.confidence_threshold).to(self.device)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model = self.objective
        if self.distributed:
            # ICL's USCL takes given proxies, so its query path (v, out, MLP, hand-over) gets no
            # gradient; DDP must be told, or it fails on the second iteration.
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.objective, find_unused_parameters=cfg.method == "icl")
        self.augment = Augmentation.from_dict(cfg.augmentation)
        self.iteration = 0
        self.best_score = -1.0
        self.history: list[dict] = []
        self.wall_time_s = 0.0
        if resuming:
            self._load_state()
        self._load_data()

    # ---- data -------------------------------------------------------------------------------
    def _load_data(self) -> None:
        cfg = self.cfg
        seed = cfg.seed + 1000 * self.rank + self.iteration  # fresh draws after a resume
        norm, target = cfg.normalisation, cfg.target_spacing_mm
        labeled = [load_cases(cfg.data_root, s, norm, target) for s in cfg.labeled]
        kw = dict(foreground_fraction=cfg.foreground_fraction)
        self.labeled_streams = [SliceStream.from_cases(c, cfg.patch_size, seed=seed + i, **kw) for i, c in enumerate(labeled)]
        self.unlabeled_stream = None
        if cfg.method == "icl":
            unl = [c for s in cfg.unlabeled for c in load_cases(cfg.data_root, s, norm, target, with_labels=False)]
            self.unlabeled_stream = SliceStream.from_cases(unl, cfg.patch_size, use_labels=False, seed=seed + 99)
        self.val_cases = [c for s in cfg.val for c in load_cases(cfg.data_root, s, norm, target)] if self.rank == 0 else []
        self.generator = torch.Generator().manual_seed(seed)
        self.n_labeled_slices = sum(len(s) for s in self.labeled_streams)
        self.n_unlabeled_slices = len(self.unlabeled_stream) if self.unlabeled_stream else 0

    def _draw(self, stream: SliceStream, batch_size: int, labeled: bool = True):
        """A sampled batch, moved to the device first so the augmentation runs there (the random
        draws still come from the CPU generator, so CPU and GPU runs see the same transforms)."""
        images, labels = stream.sample(batch_size)
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True) if labeled and labels is not None else None
        return self.augment(images, labels, self.generator)

    def next_batch(self) -> dict:
        cfg = self.cfg
        if cfg.method == "eam":
            return {"domains": [self._draw(s, cfg.batch_size) for s in self.labeled_streams]}
        # several labeled sources (a joint baseline) share the batch evenly
        n = len(self.labeled_streams)
        sizes = [cfg.batch_size // n + (i < cfg.batch_size % n) for i in range(n)]
        parts = [self._draw(s, b) for s, b in zip(self.labeled_streams, sizes) if b]
        batch = {"images": torch.cat([p[0] for p in parts]), "labels": torch.cat([p[1] for p in parts])}
        if cfg.method == "icl":
            batch["unlabeled"] = self._draw(self.unlabeled_stream, cfg.unlabeled_batch_size, labeled=False)[0]
        return batch

    # ---- state ------------------------------------------------------------------------------
    def _save_state(self) -> None:
        tensors = {f"objective.{k}": v.detach().cpu().contiguous() for k, v in self.objective.state_dict().items()}
        opt_tensors, opt_meta = _flatten_optimizer(self.optimizer)
        tensors.update(opt_tensors)
        tmp = self.run_dir / (STATE_TENSORS + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self.run_dir / STATE_TENSORS)
        meta = {
            "iteration": self.iteration, "best_score": self.best_score, "history": self.history,
            "wall_time_s": self.wall_time_s, "optimizer": opt_meta, "config": self.cfg.to_dict(),
            "commands": self.commands, "started_from": self.started_from,
            "card": self.card(self.history[-1]["val"] if self.history else None).to_dict(),
        }
        (self.run_dir / STATE_JSON).write_text(json.dumps(meta, indent=1, default=float))

    def _load_state(self) -> None:
        if not (self.run_dir / STATE_TENSORS).is_file():
            raise ConsistentSegError(
                f"{self.run_dir} has {STATE_JSON} but no {STATE_TENSORS} (a finished run kept without its "
                "optimizer state?): it cannot be resumed; train without --resume or into another folder")
        meta = json.loads((self.run_dir / STATE_JSON).read_text())
        tensors = load_file(str(self.run_dir / STATE_TENSORS))
        own = {k[len("objective."):]: v for k, v in tensors.items() if k.startswith("objective.")}
        self.objective.load_state_dict(own)
        self.objective.to(self.device)
        self.optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        self.iteration = meta["iteration"]
        self.best_score = meta["best_score"]
        self.history = meta["history"]
        self.wall_time_s = meta.get("wall_time_s", 0.0)
        self.commands = meta.get("commands", []) + [f"{self.command}  # resumed at iteration {self.iteration}"]
        self.started_from = meta.get("started_from", {})

    def card(self, scores: dict | None) -> ModelCard:
        cfg = self.cfg
        record = TrainingRecord(
            method=cfg.method,
            iterations=self.iteration,
            iterations_planned=cfg.iterations,
            wall_time_s=round(self.wall_time_s, 1),
            hardware=f"{platform.machine()} {os.cpu_count()} cpu; device {self.device}{self._device_name()}; "
                     f"world size {self.world}",
            torch=torch.__version__,
            command=self.commands[0],
            commands=list(self.commands),
            data={
                "labeled": [vars(s) for s in cfg.labeled],
                "unlabeled": [vars(s) for s in cfg.unlabeled],
                "val": [vars(s) for s in cfg.val],
                "labeled_slices": self.n_labeled_slices,
                "unlabeled_slices": self.n_unlabeled_slices,
            },
            config=cfg.to_dict(),
            extra={"init_from": self.started_from} if self.started_from else {},
        )
        modules = dict(self.modules.config) if self.modules is not None else None
        return ModelCard.for_training(cfg, architecture=architecture_of(self.backbone), modules=modules,
                                      training=record, val_scores=scores)

    def _device_name(self) -> str:
        return f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else ""

    # ---- loop -------------------------------------------------------------------------------
    def _lr(self) -> float:
        return self.cfg.lr * (1 - min(self.iteration, self.cfg.iterations - 1) / self.cfg.iterations) ** 0.9

    def _ramp(self) -> float:
        """exp(-5 (1 - t)^2), t = iteration / rampup_iterations capped at 1 (Laine & Aila); 1 without ramp-up."""
        if self.cfg.rampup_iterations <= 0:
            return 1.0
        t = min(self.iteration / self.cfg.rampup_iterations, 1.0)
        return math.exp(-5.0 * (1.0 - t) ** 2)

    def fit(self, progress=None, cancel=None) -> TrainResult:
        """Train until ``cfg.iterations`` (or ``cfg.stop_at``, ``cfg.max_minutes`` of this call, or ``cancel``).

        ``progress(iteration, total, logs)`` is called every iteration on rank 0.
        """
        cfg = self.cfg
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else None
        stopped_early = False
        self.objective.train()
        cuda = self.device.type == "cuda"
        # mixed precision on CUDA: bf16 where the card has it (no loss scaling, no fp16 overflow in
        # the attention losses), else fp16 with a gradient scaler; CPU stays in fp32
        bf16 = cuda and torch.cuda.is_bf16_supported()
        scaler = torch.amp.GradScaler("cuda") if cuda and not bf16 else None
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed patch size: tune the convolutions once
        running: dict[str, float] = {}
        start_wall = time.monotonic()
        end = min(cfg.iterations, cfg.stop_at or cfg.iterations)
        while self.iteration < end:
            try:
                check_cancel(cancel)
            except Cancelled:
                stopped_early = True
                break
            if deadline is not None and time.monotonic() > deadline:
                stopped_early = True
                break
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr()
            self.objective.ramp = self._ramp()
            batch = self.next_batch()
            with torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16, enabled=cuda):
                loss, terms = self.model(batch)
            self.optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(self.optimizer)
                scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            self.iteration += 1
            # one device-to-host copy for all terms: a float() per term would sync the GPU each time
            values = torch.stack([loss.detach().float(), *(v.float() for v in terms.values())]).tolist()
            logs = dict(zip(["loss", *terms], values))
            for k, v in logs.items():
                running[k] = 0.98 * running.get(k, v) + 0.02 * v
            if self.rank == 0 and progress is not None:
                progress(self.iteration, cfg.iterations, logs)
            at_val = self.iteration % cfg.val_every == 0 or self.iteration == cfg.iterations
            at_ckpt = self.iteration % cfg.checkpoint_every == 0
            if at_val or at_ckpt:
                self.wall_time_s += time.monotonic() - start_wall
                start_wall = time.monotonic()
                if self.rank == 0:
                    if at_val:
                        self._evaluate_and_keep_best(running)
                    self._save_state()
                if self.distributed:
                    dist.barrier()
        self.wall_time_s += time.monotonic() - start_wall
        if self.rank == 0:
            self._save_state()
            save_model(self.run_dir / "last", self.backbone, self.card(self.history[-1]["val"] if self.history else None), self.modules)
        return TrainResult(self.run_dir, self.iteration, self.best_score, self.history, stopped_early)

    def _evaluate_and_keep_best(self, running: dict) -> None:
        scores = validate(self.backbone, self.val_cases, self.cfg.num_classes, self.device) if self.val_cases else None
        entry = {"iteration": self.iteration, "wall_time_s": round(self.wall_time_s, 1),
                 "train": {k: round(v, 5) for k, v in running.items()}, "val": scores}
        self.history.append(entry)
        with open(self.run_dir / "history.jsonl", "a") as fh:
            fh.write(json.dumps(entry, default=float) + "\n")
        if scores is not None and scores["mean"] > self.best_score:
            self.best_score = scores["mean"]
            save_model(self.run_dir / "best", self.backbone, self.card(scores), self.modules)


def strip_run(run_dir, out_dir, *, keep_modules: bool = True) -> Path:
    """Write the stripped model of a run's last checkpoint: backbone (+ modules beside it) and card.

    The optimizer state and the objective wrapper are dropped; the backbone's weights are exactly
    the training model's backbone weights.
    """
    from ..models.store import build_backbone, build_saved_modules

    run_dir = Path(run_dir)
    meta_path, tensors_path = run_dir / STATE_JSON, run_dir / STATE_TENSORS
    if not meta_path.is_file() or not tensors_path.is_file():
        raise ConsistentSegError(f"{run_dir} is not a training run folder (no {STATE_JSON} / {STATE_TENSORS})")
    meta = json.loads(meta_path.read_text())
    card = ModelCard.from_dict(meta["card"])
    tensors = load_file(str(tensors_path))
    backbone = build_backbone(card.architecture)
    part = {k[len("objective.backbone."):]: v for k, v in tensors.items() if k.startswith("objective.backbone.")}
    backbone.load_state_dict(part)
    modules = None
    if keep_modules and card.modules:
        modules = build_saved_modules(card.modules)
        modules.load_state_dict({k[len("objective.modules_."):]: v for k, v in tensors.items()
                                 if k.startswith("objective.modules_.")})
    return save_model(out_dir, backbone, card, modules)


def train(cfg: TrainConfig, run_dir, *, resume=False, device=None, progress=None, cancel=None, command=None) -> TrainResult:
    """Build a :class:`Trainer` and run it (the Python API behind ``consistent-seg train``)."""
    return Trainer(cfg, run_dir, device=device, resume=resume, command=command).fit(progress, cancel)
