"""LV and RV ejection fraction from the shipped cardiac model against the expert labels.

For each ED/ES pair of acdc val (10 patients), acdc_original (3 training patients as ACDC
distributes them), mnms2 (case 001, short axis) and sunnybrook_cine (one patient, LV only), the
model segments both frames (no post-processing), then the EF is computed three ways: from the raw
output, after the card's largest-component post-processing, and after ``clean_cardiac_labels``.

    python benchmarks/cardiac_function.py [--sets acdc acdc_original mnms2 sunnybrook] [--threads 2]

Every frame is read with ``load_volume`` (volume order: axis 0 runs through the scanner's slices,
the short axis for these cines, in-plane near radiological); ``--file-order`` slices the file's own
array instead. EF is a ratio, so acdc's lost voxel size does not matter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from napari_consistent_seg.cardiac import cardiac_function, clean_cardiac_labels
from napari_consistent_seg.demo import find_shared_data
from napari_consistent_seg.inference import keep_largest_components, predict_volume, segment
from napari_consistent_seg.io import Volume, load_volume
from napari_consistent_seg.models.store import load_model

SETS = ("acdc", "acdc_original", "mnms2", "sunnybrook")
METHODS = {"raw": lambda labels, spacing: labels,
           "largest component": lambda labels, spacing: keep_largest_components(labels),
           "clean_cardiac_labels": clean_cardiac_labels}


FILE_ORDER = {"on": False}


def read(path: Path):
    """A frame as ``load_volume`` reads it (volume order: axis 0 runs through the scanner's slices),
    and its voxel size where known.

    With ``--file-order``: the file's own (k, j, i) array instead, in-plane axes as stored.
    """
    volume = load_volume(path, modality="MR")
    spacing = volume.spacing_mm if volume.geometry.spacing_known else None
    if FILE_ORDER["on"]:
        image = nib.load(str(path))
        zooms = tuple(float(z) for z in image.header.get_zooms()[:3][::-1])
        return np.ascontiguousarray(np.asanyarray(image.dataobj).transpose(2, 1, 0)), spacing and zooms
    return volume, spacing


def array(frame) -> np.ndarray:
    return frame.data if isinstance(frame, Volume) else frame


def raw_labels(model, frame, spacing) -> np.ndarray:
    """The model's labels without post-processing: `segment` on a Volume, the array-level
    `predict_volume` for ``--file-order``."""
    if isinstance(frame, Volume):
        return segment(model, frame, keep_largest=False).data
    return predict_volume(model, frame, spacing_mm=spacing, modality="MR", keep_largest=False).labels


def pairs(data: Path, name: str):
    """(case, ED image, ED labels, ES image, ES labels, spacing or None): frames as `read` gives them
    (Volumes; (Z, Y, X) arrays with ``--file-order``)."""
    if name == "acdc":
        val = json.loads((data / "splits.json").read_text())["splits"]["acdc"]["val"]
        for patient in sorted({c.split("_frame")[0] for c in val}):
            # acdc's frame01 is ED and frame02 is ES (checked: the LV cavity is larger in frame01)
            frames = [read(data / "acdc" / kind / f"{patient}_{f}.nii.gz")[0]
                      for f in ("frame01", "frame02") for kind in ("images", "labels")]
            yield (patient, *frames, None)
    elif name == "acdc_original":
        for folder in sorted((data / "acdc_original").glob("patient*")):
            info = dict(line.split(":", 1) for line in (folder / "Info.cfg").read_text().splitlines() if ":" in line)
            arrays = []
            for frame in (int(info["ED"]), int(info["ES"])):
                stem = folder / f"{folder.name}_frame{frame:02d}"
                image, spacing = read(Path(f"{stem}.nii.gz"))
                arrays += [image, read(Path(f"{stem}_gt.nii.gz"))[0]]
            yield (folder.name, *arrays, spacing)
    else:
        folder, case = {"mnms2": ("mnms2", "001_SA_{}"), "sunnybrook": ("sunnybrook_cine", "SCD0000301_{}")}[name]
        arrays = []
        for phase in ("ED", "ES"):
            image, spacing = read(data / folder / "images" / f"{case.format(phase)}.nii.gz")
            arrays += [image, read(data / folder / "labels" / f"{case.format(phase)}.nii.gz")[0]]
        yield (case.format("ED/ES"), *arrays, spacing)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cardiac-cine-mri")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write per-case figures here")
    parser.add_argument("--file-order", action="store_true",
                        help="slice each file along its third axis, in-plane axes as stored (not load_volume's order)")
    args = parser.parse_args(argv)
    FILE_ORDER["on"] = args.file_order
    torch.set_num_threads(args.threads)
    data = find_shared_data()
    if data is None:
        sys.exit("no ../shared/data beside the checkout (or $CONSISTENT_SEG_DATA)")
    model = load_model(args.model, with_modules=False)
    rows, started = [], time.monotonic()
    print("| set | case | LV EF ref | " + " | ".join(f"LV EF {m}" for m in METHODS) + " | RV EF ref | "
          + " | ".join(f"RV EF {m}" for m in METHODS) + " |")
    print("|---" * (3 + 2 * len(METHODS) + 1) + "|")
    for set_name in args.sets:
        for case, ed_image, ed_ref, es_image, es_ref, spacing in pairs(data, set_name):
            raw = [raw_labels(model, image, spacing) for image in (ed_image, es_image)]
            reference = cardiac_function([array(ed_ref), array(es_ref)], spacing, ed=0, es=1)
            row = {"set": set_name, "case": case, "lv_ef_ref": reference.lv_ef_percent,
                   "rv_ef_ref": reference.rv_ef_percent}
            for method, clean in METHODS.items():
                result = cardiac_function([clean(labels, spacing) for labels in raw], spacing, ed=0, es=1)
                row[f"lv_ef {method}"] = result.lv_ef_percent
                row[f"rv_ef {method}"] = result.rv_ef_percent
                row[f"lv_edv {method}"], row[f"lv_esv {method}"] = result.lv_edv, result.lv_esv
            row["lv_edv_ref"], row["lv_esv_ref"], row["unit"] = reference.lv_edv, reference.lv_esv, reference.unit
            rows.append(row)
            print(f"| {set_name} | {case} | {_f(row['lv_ef_ref'])} | "
                  + " | ".join(_f(row[f'lv_ef {m}']) for m in METHODS) + f" | {_f(row['rv_ef_ref'])} | "
                  + " | ".join(_f(row[f'rv_ef {m}']) for m in METHODS) + " |", flush=True)
    print(f"\nabsolute EF error (points), mean / median / worst; {time.monotonic() - started:.0f} s in all\n")
    print("| set | cases | " + " | ".join(f"LV {m}" for m in METHODS) + " | "
          + " | ".join(f"RV {m}" for m in METHODS) + " |")
    print("|---" * (2 + 2 * len(METHODS)) + "|")
    for set_name in [*args.sets, "all"]:
        chosen = [r for r in rows if set_name in ("all", r["set"])]
        cells = []
        for side in ("lv", "rv"):
            for method in METHODS:
                errors = [abs(r[f"{side}_ef {method}"] - r[f"{side}_ef_ref"]) for r in chosen
                          if r[f"{side}_ef_ref"] is not None and r[f"{side}_ef {method}"] is not None]
                cells.append(_summary(errors))
        print(f"| {set_name} | {len(chosen)} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _f(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _summary(errors) -> str:
    if not errors:
        return "n/a"
    return f"{np.mean(errors):.1f} / {np.median(errors):.1f} / {max(errors):.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
