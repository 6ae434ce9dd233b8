"""Speed and memory of the inference pipeline, as ratios measured in one run (A and B interleaved).

Absolute times depend on the machine and on whatever else runs on it, so every comparison is made
in the same run, A B A B ..., and quoted as the median of the per-pair ratios; the CPU, the
threads and the load average are printed with the figures.

Sections (``--sections``, all by default):
- ``ct``: a 512 x 512 x 300 CT in Hounsfield units (int16, 0.7 mm pixels, 2.5 mm slices), rebuilt
  from a btcv val case as benchmarks/hu_ct.py does (8-bit values mapped back to HU, resampled):
  `predict_volume` (in the precision `inference_precision` picks, and forced to float32) against
  the previous pipeline (a whole float32 probability volume, numpy argmax, MONAI's
  KeepLargestConnectedComponent), the time of each stage, labels and Dice compared;
- ``memory``: peak memory above the loaded volume, new pipeline and previous one, each in a fresh
  process (Linux: peak RSS reset through /proc/self/clear_refs after loading);
- ``cli``: ``consistent-seg predict`` end to end on that CT as .nii.gz (process start, load,
  segment, save);
- ``cardiac``: a 10 x 256 x 256 cine MRI volume with the cardiac model: FLOPs counted, divided by
  a matmul rate measured in the same run in the precision each path runs in (its floor), and
  against MONAI's SliceInferer;
- ``ideas``: what each speed idea gave (channels_last, bf16, TorchScript with oneDNN fusion,
  batch size, threads, argmax layout, label vs probability upsampling with its Dice effect,
  connected components with scipy vs MONAI);
- ``stripping``: backbone alone vs backbone + external modules (what stripping saves).

    .venv/bin/python benchmarks/speed.py [--sections ct memory cli cardiac ideas stripping]
        [--repeats 3] [--threads 2] [--markdown out/speed.md]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_consistent_seg import inference
from napari_consistent_seg.inference import (
    PRECISION_ENV,
    argmax_labels,
    _cpu_threads,
    infer,
    inference_precision,
    inference_threads,
    keep_largest_components,
    pick_device,
    post_process,
    predict_volume,
    prepare_array,
    uses_region,
)
from napari_consistent_seg.models.store import load_model
from napari_consistent_seg.models.unet import count_parameters

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CT_SHAPE = (300, 512, 512)
CT_SPACING = (2.5, 0.7, 0.7)
WINDOW_HU = (-125.0, 275.0)
SECTIONS = ("ct", "memory", "cli", "cardiac", "ideas", "stripping")


# ---- inputs --------------------------------------------------------------------------------------

def hu_ct(data: Path, shape=CT_SHAPE) -> tuple[np.ndarray, np.ndarray | None]:
    """(Z, Y, X) int16 HU CT of ``shape`` and its labels (ours: 1 liver, 2 spleen, 3/4 kidneys) from
    btcv val case_14; without the data, a synthetic CT phantom resampled to ``shape`` (no labels)."""
    path = data / "btcv_ct" / "images" / "case_14.nii.gz"
    if path.is_file():
        import nibabel as nib

        raw = np.asarray(nib.load(path).dataobj).astype(np.float32)  # (x, y, z)
        ref = np.asarray(nib.load(data / "btcv_ct" / "labels" / "case_14.nii.gz").dataobj)
        lo, hi = WINDOW_HU
        hu = raw / 255.0 * (hi - lo) + lo
        hu[raw == 0], hu[raw == 255] = -1000.0, 1000.0
        ours = np.zeros(256, np.uint8)
        for btcv, k in {6: 1, 1: 2, 2: 3, 3: 4}.items():
            ours[btcv] = k
        labels = torch.from_numpy(ours[ref].astype(np.float32)).permute(2, 1, 0)[None, None]
        labels = F.interpolate(labels, size=shape, mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
        image = torch.from_numpy(hu).permute(2, 1, 0)[None, None]
    else:
        from napari_consistent_seg.io import make_phantom

        phantom, _ = make_phantom("CT")
        image, labels = torch.from_numpy(phantom.data.astype(np.float32))[None, None], None
    big = F.interpolate(image, size=shape, mode="trilinear", align_corners=False)[0, 0]
    return np.rint(big.numpy()).astype(np.int16), labels


def cardiac_volume(data: Path) -> np.ndarray:
    """A 10 x 256 x 256 cine MRI volume: acdc val patient028 ED padded to 256 x 256 (or noise)."""
    path = data / "acdc" / "images" / "patient028_frame01.nii.gz"
    if not path.is_file():
        return np.random.default_rng(0).normal(300, 80, (10, 256, 256)).astype(np.float32)
    import nibabel as nib

    raw = np.asarray(nib.load(path).dataobj).astype(np.float32).transpose(2, 1, 0)  # (z, y, x)
    out = np.zeros((10, 256, 256), np.float32)
    z, y, x = (min(a, b) for a, b in zip(raw.shape, out.shape))
    out[:z, :y, :x] = raw[:z, :y, :x]
    return out


# ---- the previous pipeline, for the ratios ------------------------------------------------------

def previous_predict(model, data, spacing_mm, modality, batch_size=8):
    """What predict_volume did before the staged pipeline: torch's own thread count, the whole
    volume normalised to float32, a (K, Z, Y, X) float32 probability volume upsampled batch by
    batch, numpy argmax, MONAI's KeepLargestConnectedComponent."""
    from monai.transforms import KeepLargestConnectedComponent

    from napari_consistent_seg.intensity import normalise_intensity, spec_for_modality

    spec, _ = spec_for_modality(model.card.normalisation, modality)
    norm = normalise_intensity(np.asarray(data), spec)
    prepared = prepare_array(model, data, spacing_mm, modality)
    z, h, w = norm.shape
    k = model.backbone.out_channels
    probs = np.empty((k, z, h, w), np.float32)
    model.backbone.eval()
    with torch.inference_mode():
        for start in range(0, z, batch_size):
            x = torch.from_numpy(norm[start:start + batch_size])[:, None]
            if prepared.model_size_yx:
                x = F.interpolate(x, size=prepared.model_size_yx, mode="bilinear", align_corners=False)
            p = model.backbone(x).softmax(1)
            if prepared.model_size_yx:
                p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
            probs[:, start:start + batch_size] = p.permute(1, 0, 2, 3).numpy()
    labels = probs.argmax(0).astype(np.uint8)
    present = [int(c) for c in np.unique(labels) if c]
    keep = KeepLargestConnectedComponent(applied_labels=present, is_onehot=False, independent=True)
    return np.asarray(keep(labels[None].copy()))[0].astype(np.uint8)


# ---- timing helpers ------------------------------------------------------------------------------

def interleaved(fns: dict, repeats: int, warmup: bool = True) -> dict[str, list[float]]:
    """Wall times of each callable, run in turn (A B C A B C ...) ``repeats`` times after a warm-up."""
    if warmup:
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict, a: str, b: str) -> float:
    """Median over pairs of time(a) / time(b)."""
    return float(np.median(np.asarray(times[a]) / np.asarray(times[b])))


def med(values) -> float:
    return float(np.median(values))


def dice(a: np.ndarray, b: np.ndarray, k: int) -> float:
    x, y = a == k, b == k
    total = int(x.sum()) + int(y.sum())
    return float("nan") if total == 0 else 2.0 * int((x & y).sum()) / total


def mean_dice(labels, reference, classes=(1, 2, 3, 4)) -> float:
    return 100 * float(np.nanmean([dice(labels, reference, k) for k in classes]))


# ---- sections ------------------------------------------------------------------------------------

@contextlib.contextmanager
def float32_only():
    """Inference in float32 whatever the CPU (``CONSISTENT_SEG_PRECISION=float32``)."""
    before = os.environ.get(PRECISION_ENV)
    os.environ[PRECISION_ENV] = "float32"
    try:
        yield
    finally:
        if before is None:
            del os.environ[PRECISION_ENV]
        else:
            os.environ[PRECISION_ENV] = before


@contextlib.contextmanager
def whole_slices():
    """`infer` without its region search: every slice, whole (as before 2026-12-01)."""
    before = inference.REGION_MIN_SLICES
    inference.REGION_MIN_SLICES = sys.maxsize
    try:
        yield
    finally:
        inference.REGION_MIN_SLICES = before


def section_ct(out: list[str], model, image, reference, repeats: int) -> None:
    def new():
        return predict_volume(model, image, spacing_mm=CT_SPACING, modality="CT").labels

    def new_float32():
        with float32_only():
            return new()

    def new_whole():
        with whole_slices():
            return new()

    results = {}
    names = {"new": new, "new, float32": new_float32, "new, whole slices": new_whole,
             "previous": lambda: previous_predict(model, image, CT_SPACING, "CT")}
    times = interleaved({name: lambda name=name, fn=fn: results.__setitem__(name, fn())
                         for name, fn in names.items()}, repeats, warmup=False)
    precision = inference_precision(torch.device("cpu"))
    out += [f"## 512 x 512 x 300 HU CT, abdomen-ct-mri ({repeats} interleaved runs each)", "",
            f"\"new\" runs in {precision} here (`inference_precision`); \"new, float32\" is the same pipeline "
            "with CONSISTENT_SEG_PRECISION=float32; \"new, whole slices\" without the region search "
            "(every slice, whole).", "",
            "| pipeline | median wall time | min-max | x faster than previous (median of pairs) | labels differing from previous |",
            "|---|---|---|---|---|"]
    for name in names:
        speedup = "" if name == "previous" else f"{1 / ratio(times, name, 'previous'):.2f}x"
        differ = "" if name == "previous" else f"{int((results[name] != results['previous']).sum())} of {image.size}"
        out.append(f"| {name} | {med(times[name]):.1f} s | {min(times[name]):.1f}-{max(times[name]):.1f} s | "
                   f"{speedup} | {differ} |")
    out.append("")
    if reference is not None:
        out += ["Mean Dice vs the expert labels (4 organs, post-processed): " + ", ".join(
            f"{name} {mean_dice(results[name], reference):.2f} %" for name in names) + ".", ""]
    # the stages, one run
    stage = {}
    start = time.perf_counter()
    prepared = prepare_array(model, image, CT_SPACING, "CT")
    stage["prepare"] = time.perf_counter() - start
    start = time.perf_counter()
    inferred = infer(model, prepared, region=uses_region(model))
    stage["infer"] = time.perf_counter() - start
    start = time.perf_counter()
    post_process(model, inferred.labels, in_place=True)
    stage["post_process"] = time.perf_counter() - start
    total = sum(stage.values())
    out += ["Stages of the new pipeline (one run): " + ", ".join(
        f"{k} {v:.2f} s ({100 * v / total:.0f} %)" for k, v in stage.items()) + ".", ""]


def _peak_child(args) -> None:
    """In a fresh process: load the CT, reset the peak RSS, segment, print the peak above the load."""
    from napari_consistent_seg.inference import segment
    from napari_consistent_seg.io import load_volume

    torch.set_num_threads(args.threads)
    model = load_model("abdomen-ct-mri", with_modules=False)
    volume = load_volume(args.child_input, modality="CT")
    volume.data.sum()  # touch every page
    rss = _rss_kb()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    start = time.perf_counter()
    if args.child == "new":
        segment(model, volume)
    else:
        previous_predict(model, volume.data, volume.spacing_mm, "CT")
    print(json.dumps({"loaded_mb": rss / 1024, "peak_above_mb": (_hwm_kb() - rss) / 1024,
                      "volume_mb": volume.data.nbytes / 2 ** 20, "seconds": time.perf_counter() - start}))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_kb() -> int:
    return _status_kb("VmRSS")


def _hwm_kb() -> int:
    return _status_kb("VmHWM")


def section_memory(out: list[str], nifti: Path, threads: int) -> None:
    rows = {}
    for which in ("new", "previous"):
        result = subprocess.run([sys.executable, __file__, "--child", which, "--child-input", str(nifti),
                                 "--threads", str(threads)], capture_output=True, text=True, check=True)
        rows[which] = json.loads(result.stdout.strip().splitlines()[-1])
    out += ["## Peak memory above the loaded volume (512 x 512 x 300 int16 CT, fresh process each)", "",
            "| pipeline | volume | process after loading | peak above that | wall time |", "|---|---|---|---|---|"]
    for which, r in rows.items():
        out.append(f"| {which} | {r['volume_mb']:.0f} MB | {r['loaded_mb']:.0f} MB | **{r['peak_above_mb']:.0f} MB** | "
                   f"{r['seconds']:.1f} s |")
    out.append("")


def section_cli(out: list[str], nifti: Path, repeats: int) -> None:
    exe = Path(sys.executable).with_name("consistent-seg")
    command = [str(exe), "predict", "--model", "abdomen-ct-mri", "-o"]
    times = []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([*command, folder, str(nifti)], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
    out += ["## `consistent-seg predict` end to end (process start, load .nii.gz, segment, save .nii.gz)", "",
            f"Median {med(times):.1f} s over {repeats} runs (min {min(times):.1f}, max {max(times):.1f}).", ""]


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """Best matmul rate in ``dtype``, over torch's thread count and the one inference picks (the
    higher rate gives the lower, stricter floor)."""
    a, b = torch.rand(n, n, dtype=dtype), torch.rand(n, n, dtype=dtype)
    before, best = torch.get_num_threads(), 0.0
    for threads in sorted({before, inference_threads()}):
        torch.set_num_threads(threads)
        try:
            times = interleaved({"mm": lambda: torch.mm(a, b)}, repeats)["mm"]
        finally:
            torch.set_num_threads(before)
        best = max(best, 2 * n ** 3 / min(times) / 1e9)
    return best


def count_gflop(module, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() / 1e9


def section_cardiac(out: list[str], data: Path, repeats: int) -> None:
    from monai.inferers import SliceInferer

    model = load_model("cardiac-cine-mri", with_modules=False)
    image = cardiac_volume(data)
    backbone = model.backbone.eval()
    gflop = count_gflop(backbone, torch.rand(10, 1, 256, 256))
    prepared = prepare_array(model, image, None, "MR")
    norm = prepared.intensity(torch.from_numpy(image))[None, None]  # (1, 1, Z, Y, X)
    inferer = SliceInferer(roi_size=(256, 256), sw_batch_size=8, spatial_dim=0, progress=False)

    cpu = torch.device("cpu")

    def monai_slice_inferer():  # on the threads predict_volume picks, for a like-for-like ratio
        with torch.inference_mode(), _cpu_threads(cpu):
            return inferer(norm, backbone).argmax(1)

    def network_only():
        with _cpu_threads(cpu):
            return _no_grad(backbone, torch.rand(10, 1, 256, 256))

    def float32_predict():
        with float32_only():
            return predict_volume(model, image, modality="MR", keep_largest=False)

    precision = inference_precision(cpu)
    fns = {"predict_volume": lambda: predict_volume(model, image, modality="MR", keep_largest=False),
           "predict_volume, float32": float32_predict,
           "SliceInferer": monai_slice_inferer, "network only, one batch of 10": network_only}
    times = interleaved(fns, repeats)
    rates = {"float32": matmul_gflops()}
    if precision != "float32":
        rates[precision] = matmul_gflops(dtype=getattr(torch, precision))
    floors = {name: gflop / rate for name, rate in rates.items()}
    out += ["## Cardiac 10 x 256 x 256 volume, cardiac-cine-mri", "",
            f"Network FLOPs counted: {gflop:.1f} GFLOP. Matmul rates in this run: "
            + ", ".join(f"{name} {rate:.0f} GFLOP/s (floor {1000 * floors[name]:.0f} ms)" for name, rate in rates.items())
            + f". predict_volume runs in {precision} here; each path is set against the floor of the "
            "precision it runs in. Every path runs on the threads inference picks.", "",
            "| path | precision | median | GFLOP/s | x its floor |", "|---|---|---|---|---|"]
    for name, t in times.items():
        runs_in = "float32" if name != "predict_volume" else precision
        out.append(f"| {name} | {runs_in} | {1000 * med(t):.0f} ms | {gflop / med(t):.0f} | "
                   f"{med(t) / floors[runs_in]:.2f} |")
    out += ["", f"predict_volume / SliceInferer (median of pairs): {ratio(times, 'predict_volume', 'SliceInferer'):.2f}; "
            f"predict_volume, float32 / SliceInferer (same precision): "
            f"{ratio(times, 'predict_volume, float32', 'SliceInferer'):.2f}", ""]


def _no_grad(module, x):
    with torch.inference_mode():
        return module(x)


def section_ideas(out: list[str], data: Path, image, reference, repeats: int) -> None:
    model = load_model("abdomen-ct-mri", with_modules=False)
    backbone = model.backbone.eval()
    x = torch.rand(8, 1, 288, 288)  # one batch at the CT's model size (512 x 0.7 / 1.25 mm)
    rows = []

    def pair(name, a, b, note=""):
        times = interleaved({"a": a, "b": b}, repeats)
        r = ratio(times, "b", "a")
        rows.append(f"| {name} | {1000 * med(times['a']):.0f} ms | {1000 * med(times['b']):.0f} ms | {r:.2f} | {note} |")

    cl_backbone = copy.deepcopy(backbone).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    pair("channels_last (weights and input)", lambda: _no_grad(backbone, x), lambda: _no_grad(cl_backbone, x_cl))

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _no_grad(backbone, x)

    with torch.inference_mode():
        agree = float((bf16().float().argmax(1) == backbone(x).argmax(1)).float().mean())
    pair("bf16 autocast", lambda: _no_grad(backbone, x), bf16, f"argmax agrees on {100 * agree:.2f} % of pixels")
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        scripted = torch.jit.optimize_for_inference(torch.jit.trace(copy.deepcopy(backbone), x, check_trace=False))
    pair("TorchScript + optimize_for_inference (oneDNN fusion)", lambda: _no_grad(backbone, x),
         lambda: _no_grad(scripted, x))
    x16 = torch.rand(16, 1, 288, 288)
    pair("batch 16 vs 8", lambda: _no_grad(backbone, x), lambda: _no_grad(backbone, x16),
         "B runs 16 slices, A 8: a ratio of 2.0 = the same time per slice")
    old_threads = torch.get_num_threads()

    def one_thread():
        torch.set_num_threads(1)
        try:
            _no_grad(backbone, x)
        finally:
            torch.set_num_threads(old_threads)

    pair(f"1 thread vs {old_threads}", lambda: _no_grad(backbone, x), one_thread,
         "inference_threads() picks the idle cores' count from the runnable tasks")
    probs = torch.rand(8, 5, 512, 512).softmax(1)
    pair("argmax over K: channels-last vs strided (8 x 5 x 512 x 512)", lambda: probs.argmax(1),
         lambda: argmax_labels(probs))
    # label vs probability upsampling on the whole CT
    prepared = prepare_array(model, image, CT_SPACING, "CT")
    results = {}
    times = interleaved({m: (lambda m=m: results.__setitem__(m, infer(model, prepared, upsampling=m).labels))
                         for m in ("probabilities", "labels")}, max(1, repeats // 2), warmup=False)
    changed = 100 * float((results["labels"] != results["probabilities"]).mean())
    note = f"{changed:.2f} % of voxels change"
    if reference is not None:
        note += (f"; mean Dice vs expert (raw) {mean_dice(results['probabilities'], reference):.2f} -> "
                 f"{mean_dice(results['labels'], reference):.2f} %")
    rows.append(f"| infer on the CT: labels (argmax at the model's 288 px, nearest up) vs probabilities (bilinear up) "
                f"| {med(times['probabilities']):.1f} s | {med(times['labels']):.1f} s | "
                f"{ratio(times, 'labels', 'probabilities'):.2f} | {note} |")
    labels = results["probabilities"]

    def monai_largest():
        from monai.transforms import KeepLargestConnectedComponent

        present = [int(c) for c in np.unique(labels) if c]
        keep = KeepLargestConnectedComponent(applied_labels=present, is_onehot=False, independent=True)
        return np.asarray(keep(labels[None].copy()))[0]

    same = np.array_equal(monai_largest(), keep_largest_components(labels))
    pair("largest component per class on the CT: scipy.ndimage on bounding boxes vs MONAI", monai_largest,
         lambda: keep_largest_components(labels), "identical output" if same else "OUTPUT DIFFERS")
    out += ["## Ideas, each measured A/B interleaved (ratio B / A < 1: B is faster)", "",
            "| idea | A | B | B / A | note |", "|---|---|---|---|---|", *rows, ""]


def section_stripping(out: list[str], repeats: int) -> None:
    model = load_model("cardiac-cine-mri")
    x = torch.rand(8, 1, 256, 256)

    def with_modules():
        with torch.inference_mode():
            model.modules.attend(model.backbone(x, return_features=True).features)

    times = interleaved({"stripped": lambda: _no_grad(model.backbone, x), "full": with_modules}, repeats)
    out += ["## What stripping saves (cardiac model, batch of 8 at 256 x 256)", "",
            f"Backbone {count_parameters(model.backbone) / 1e6:.2f} M parameters, external modules "
            f"{count_parameters(model.modules) / 1e6:.3f} M (dropped at inference). Stripped "
            f"{1000 * med(times['stripped']):.0f} ms, with modules {1000 * med(times['full']):.0f} ms: "
            f"ratio {ratio(times, 'full', 'stripped'):.2f}.", ""]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, torch threads {torch.get_num_threads()} "
            f"(inference picks {inference_threads()} at this load), load average {load}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", help="also write the report here")
    parser.add_argument("--child", choices=("new", "previous"), help=argparse.SUPPRESS)
    parser.add_argument("--child-input", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _peak_child(args)
        return 0
    torch.set_num_threads(args.threads)
    if pick_device(args.device).type != "cpu":
        print("this benchmark measures the CPU path; GPU figures need the same script on the device", file=sys.stderr)
    data = Path(args.data)
    out = [f"# Inference speed and memory ({machine()})", ""]
    image = reference = None
    with tempfile.TemporaryDirectory() as folder:
        if {"ct", "memory", "cli", "ideas"} & set(args.sections):
            image, reference = hu_ct(data)
        if {"memory", "cli"} & set(args.sections):
            import nibabel as nib

            nifti = Path(folder) / "ct_hu_512x512x300.nii.gz"
            affine = np.diag([-CT_SPACING[2], -CT_SPACING[1], CT_SPACING[0], 1.0])
            nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), affine), nifti)
        for name in args.sections:
            start = time.perf_counter()
            if name == "ct":
                section_ct(out, load_model("abdomen-ct-mri", with_modules=False), image, reference, args.repeats)
            elif name == "memory":
                section_memory(out, nifti, args.threads)
            elif name == "cli":
                section_cli(out, nifti, args.repeats)
            elif name == "cardiac":
                section_cardiac(out, data, max(args.repeats, 5))
            elif name == "ideas":
                section_ideas(out, data, image, reference, args.repeats)
            elif name == "stripping":
                section_stripping(out, max(args.repeats, 5))
            print(f"[{name}: {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    out.append(f"Load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}.")
    text = "\n".join(out)
    print(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
