"""Speed benchmark: what stripping saves, and whole-volume inference time, measured in one run.

Reports ratios (stripped backbone vs backbone + external modules) rather than absolute targets,
because absolute times depend on the machine and its load.

    python benchmarks/speed.py [--device cpu] [--size 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from napari_consistent_seg.inference import pick_device, predict_volume
from napari_consistent_seg.io import make_phantom
from napari_consistent_seg.models.store import load_model
from napari_consistent_seg.models.unet import count_parameters


def _median_time(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn``; on CUDA each call is synchronised, since kernels run asynchronously."""
    def timed():
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()  # warm-up
    return float(np.median([timed() for _ in range(repeats)]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cardiac-cine-mri")
    parser.add_argument("--device", default=None)
    parser.add_argument("--size", type=int, default=256, help="slice size in pixels")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    model = load_model(args.model).to(device)
    x = torch.rand(args.batch, 1, args.size, args.size, device=device)

    def stripped():
        with torch.inference_mode():
            model.backbone(x)

    def with_modules():
        with torch.inference_mode():
            out = model.backbone(x, return_features=True)
            model.modules.attend(out.features)

    t_stripped = _median_time(stripped, args.repeats, device)
    t_full = _median_time(with_modules, args.repeats, device)
    image, _ = make_phantom("MR")
    t_volume = _median_time(lambda: predict_volume(model, image.data, spacing_mm=image.spacing_mm,
                                                   modality="MR", device=device), max(1, args.repeats // 2), device)
    print(f"# Speed ({platform.processor() or platform.machine()}, torch {torch.__version__}, device {device}, "
          f"{torch.get_num_threads()} threads)\n")
    print("| measure | value |\n|---|---|")
    print(f"| backbone parameters | {count_parameters(model.backbone) / 1e6:.2f} M |")
    print(f"| external module parameters (dropped at inference) | {count_parameters(model.modules) / 1e6:.3f} M |")
    print(f"| stripped backbone, batch {args.batch} at {args.size}x{args.size} | {1000 * t_stripped:.0f} ms |")
    print(f"| backbone + modules, same batch | {1000 * t_full:.0f} ms |")
    print(f"| ratio (with modules / stripped) | {t_full / t_stripped:.2f} |")
    print(f"| whole phantom volume {image.shape} (predict_volume) | {t_volume:.2f} s "
          f"({1000 * t_volume / image.shape[0]:.0f} ms per slice) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
