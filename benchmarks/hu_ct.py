"""The abdomen model on CT in Hounsfield units at clinical resolution (docs/hu-ct.md).

btcv_ct, our only CT with expert labels, was windowed to 8 bit and resampled to 257 x 257 upstream.
Each btcv val case is turned back into what a scanner writes: int16 HU (the 8-bit values mapped onto
the model's window, -125..275 HU; 0 -> air, -1000 HU; 255 -> bone, 1000 HU) on a 512 x 512 grid at
half the pixel size, written as NIfTI and read back. The model then meets HU data, a HU window and a
2x in-plane resampling it never saw in training, and its Dice on both versions is compared.
The totalseg DICOM series (real 512 x 512 HU CT, 20 slices) and its small NIfTI CT (3 mm voxels,
without contrast) have no expert labels: there we report agreement with TotalSegmentator's output,
which is a model's opinion, not ground truth. The small CT's median HU in TotalSegmentator's aorta
tells its contrast phase; each btcv case resampled to 3 mm (linear image, nearest labels) tells what
the voxel size alone costs. Each TotalSegmentator CT is also segmented mirrored front to back (and
the labels mirrored back): btcv_ct's files are stored that way (the spine lies anterior by their
header), so a model that learned CT from them alone scores far better on the mirrored scan.

    .venv/bin/python benchmarks/hu_ct.py [--data ../shared/data] [--model FOLDER] [--markdown docs/hu-ct-table.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from napari_consistent_seg.inference import segment
from napari_consistent_seg.io import load_volume
from napari_consistent_seg.metrics import dice
from napari_consistent_seg.models.store import load_model
from napari_consistent_seg.training.data import map_labels

REPO = Path(__file__).resolve().parents[1]
BTCV_TO_OURS = {6: 1, 1: 2, 2: 3, 3: 4}  # liver, spleen, right kidney, left kidney
TOTALSEG_TO_OURS = {5: 1, 1: 2, 2: 3, 3: 4}  # TotalSegmentator v2 ids
TOTALSEG_AORTA = 52
WINDOW_HU = (-125.0, 275.0)


def to_hu_512(path: Path, out: Path, labels: Path | None = None) -> tuple[Path, Path | None]:
    """Write the 8-bit btcv scan as int16 HU at 512 x 512 (and its labels, nearest) with a matching affine."""
    image = nib.load(path)
    raw = np.asarray(image.dataobj).astype(np.float32)
    lo, hi = WINDOW_HU
    hu = raw / 255.0 * (hi - lo) + lo
    hu[raw == 0], hu[raw == 255] = -1000.0, 1000.0
    size = (512, 512)
    tensor = torch.from_numpy(hu).permute(2, 0, 1)[:, None]  # (k, 1, i, j)
    big = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[:, 0].permute(1, 2, 0)
    affine = image.affine.copy()
    for axis, n in enumerate(raw.shape[:2]):
        affine[:3, axis] *= n / size[axis]
        # keep the scan's extent: voxel centres move by half the old and new sizes
        affine[:3, 3] += image.affine[:3, axis] * (-0.5 + 0.5 * n / size[axis])
    scan = out / f"{path.name.split('.nii')[0]}_hu512.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(big.numpy()).astype(np.int16), affine), scan)
    if labels is None:
        return scan, None
    lab = torch.from_numpy(np.asarray(nib.load(labels).dataobj).astype(np.float32)).permute(2, 0, 1)[:, None]
    lab_big = F.interpolate(lab, size=size, mode="nearest")[:, 0].permute(1, 2, 0).numpy().astype(np.uint8)
    label_path = out / f"{path.name.split('.nii')[0]}_hu512_labels.nii.gz"
    nib.save(nib.Nifti1Image(lab_big, affine), label_path)
    return scan, label_path


def at_3mm(volume, reference: np.ndarray, model) -> tuple[np.ndarray, np.ndarray]:
    """The model's labels and the reference on ``volume`` resampled to 3 mm in-plane (and 3 mm slices where
    they are thinner): linear image, nearest labels."""
    from scipy import ndimage

    from napari_consistent_seg.io import Geometry, Volume

    zoom = [min(1.0, s / 3.0) for s in volume.spacing_mm]
    image = ndimage.zoom(volume.data.astype(np.float32), zoom, order=1)
    small = Volume(image, Geometry.from_spacing([s / z for s, z in zip(volume.spacing_mm, zoom)], image.shape),
                   volume.modality, "3 mm")
    return segment(model, small).data, ndimage.zoom(reference, zoom, order=0)


def mirrored_ap(model, volume) -> np.ndarray:
    """``model``'s labels for ``volume`` with its rows (front to back in an axial scan) reversed, put back."""
    from napari_consistent_seg.io import Volume

    mirror = Volume(np.ascontiguousarray(volume.data[:, ::-1]), volume.geometry, volume.modality, "mirrored")
    return segment(model, mirror).data[:, ::-1]


def organ_dice(labels: np.ndarray, reference: np.ndarray, classes: dict) -> dict[str, float]:
    return {name: dice(labels, reference, k) for k, name in classes.items() if k and (reference == k).any()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--markdown", help="write the result table here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="abdomen-ct-mri", help="a model name or folder (default: the shipped one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    model = load_model(args.model, with_modules=False)
    classes = {k: v for k, v in model.classes.items() if k}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("case_14", "case_15", "case_16", "case_17"):
            image_path = data / "btcv_ct" / "images" / f"{case}.nii.gz"
            label_path = data / "btcv_ct" / "labels" / f"{case}.nii.gz"
            eight_bit = load_volume(image_path, modality="CT")
            reference = map_labels(load_volume(label_path).data, BTCV_TO_OURS)
            start = time.perf_counter()
            scores_8 = organ_dice(segment(model, eight_bit).data, reference, classes)
            seconds_8 = time.perf_counter() - start
            hu_path, hu_labels = to_hu_512(image_path, Path(tmp), label_path)
            hu = load_volume(hu_path)  # modality guessed from the HU values, as for a user's file
            reference_hu = map_labels(load_volume(hu_labels).data, BTCV_TO_OURS)
            start = time.perf_counter()
            scores_hu = organ_dice(segment(model, hu).data, reference_hu, classes)
            seconds_hu = time.perf_counter() - start
            rows.append((f"btcv {case}", f"{eight_bit.shape}", hu.modality, f"{hu.shape}", scores_8, scores_hu,
                         seconds_8, seconds_hu))
            print(rows[-1], file=sys.stderr)
            three_mm = organ_dice(*at_3mm(eight_bit, reference, model), classes)
            rows[-1] += (three_mm,)
    dicom = load_volume(data / "totalseg_examples" / "example_ct_dicom")
    start = time.perf_counter()
    ours = segment(model, dicom).data
    seconds = time.perf_counter() - start
    totalseg = map_labels(load_volume(data / "totalseg_examples" / "example_seg_dicom.nii.gz").data, TOTALSEG_TO_OURS)
    agreement = organ_dice(ours, totalseg, classes)
    agreement_mirrored = organ_dice(mirrored_ap(model, dicom), totalseg, classes)
    small = load_volume(data / "totalseg_examples" / "example_ct_sm.nii.gz")
    small_seg = load_volume(data / "totalseg_examples" / "example_seg.nii.gz").data
    small_theirs = map_labels(small_seg, TOTALSEG_TO_OURS)
    small_agreement = organ_dice(segment(model, small).data, small_theirs, classes)
    small_mirrored = organ_dice(mirrored_ap(model, small), small_theirs, classes)
    aorta_hu = float(np.median(small.data[small_seg == TOTALSEG_AORTA]))

    def listed(scores):
        return ", ".join(f"{n} {100 * v:.1f} %" for n, v in scores.items())

    lines = [
        f"Model: {args.model}. CPU: {platform.processor() or platform.machine()}, {args.threads} threads; "
        f"torch {torch.__version__}.",
        "",
        "| case | 8-bit grid | HU grid (modality found) | Dice 8-bit (liver / spleen / R kidney / L kidney) | "
        "Dice HU 512 | mean 8-bit | mean HU | time 8-bit / HU (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, shape8, modality, shape_hu, s8, shu, t8, thu, _ in rows:
        fmt = " / ".join(f"{100 * s8.get(n, float('nan')):.1f}" for n in classes.values())
        fmt_hu = " / ".join(f"{100 * shu.get(n, float('nan')):.1f}" for n in classes.values())
        lines.append(f"| {name} | {shape8} | {shape_hu} ({modality}) | {fmt} | {fmt_hu} | "
                     f"{100 * np.mean(list(s8.values())):.1f} | {100 * np.mean(list(shu.values())):.1f} | "
                     f"{t8:.1f} / {thu:.1f} |")
    mean8 = np.mean([np.mean(list(r[4].values())) for r in rows])
    meanhu = np.mean([np.mean(list(r[5].values())) for r in rows])
    lines += ["", f"Mean over the {len(rows)} cases: 8-bit {100 * mean8:.1f} %, HU 512 x 512 {100 * meanhu:.1f} %.", "",
              f"totalseg DICOM series ({dicom.shape}, {dicom.modality}, min {int(dicom.data.min())} HU), "
              f"{seconds:.1f} s: agreement (Dice) with TotalSegmentator's output, NOT accuracy: "
              + listed(agreement) + f"; the scan mirrored front to back: {listed(agreement_mirrored)}.", "",
              f"totalseg NIfTI CT ({small.shape}, {' x '.join(f'{s:g}' for s in small.spacing_mm)} mm, median "
              f"{aorta_hu:.0f} HU in TotalSegmentator's aorta): agreement with its output, NOT accuracy: "
              + listed(small_agreement) + f"; the scan mirrored front to back: {listed(small_mirrored)}.", "",
              "btcv resampled to 3 mm in-plane (slices as they are, or 3 mm where thinner), Dice 8-bit -> 3 mm: "
              + "; ".join(f"{r[0]} " + " / ".join(f"{100 * r[4].get(n, float('nan')):.1f} -> "
                                                  f"{100 * r[8].get(n, float('nan')):.1f}" for n in classes.values())
                          for r in rows) + "."]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
