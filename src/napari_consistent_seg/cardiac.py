"""Cardiac function from short-axis label volumes: LV and RV cavity volumes per phase, EDV, ESV,
SV, EF and LV myocardial mass; and the clean-up that keeps those figures right when a slice-wise
model paints a false heart, islands, a broken myocardium ring or misses a slice.

Qt-free. Label volumes are (Z, Y, X) arrays, axis 0 the slice axis (through-plane), one per phase.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .errors import ConsistentSegError, ShapeMismatchError

# Myocardial tissue density (g/ml), the value cardiac MRI guidelines and the ACDC challenge use.
MYOCARDIUM_DENSITY_G_PER_ML = 1.05
#: An RV cavity at ED smaller than this share of the LV cavity is flagged as likely missed: in the expert
#: labels of acdc val and M&Ms-2 the share at ED is 0.36-2.28; the model finds 0.09 on the Sunnybrook cine.
RV_LV_MIN_AT_ED = 0.2
# In-plane pixel size assumed by the clean-up when the scan does not know its own (acdc's files):
# about what ACDC's scanners wrote (1.37 to 1.68 mm).
ASSUMED_PIXEL_MM = 1.5


@dataclass(frozen=True)
class CardiacLabels:
    """Label values of the RV cavity, LV myocardium and LV cavity (None: not segmented)."""

    rv: int | None = 1
    myo: int | None = 2
    lv: int = 3

    @classmethod
    def from_classes(cls, classes: Mapping) -> CardiacLabels:
        """Find the values in a model card's ``classes`` ({value: name}) by their names."""
        by_name = {str(name).strip().lower(): int(value) for value, name in classes.items()}
        lv = by_name.get("lv cavity")
        if lv is None:
            raise ConsistentSegError(
                f"the model's classes ({', '.join(map(str, classes.values()))}) have no 'LV cavity': "
                "cardiac function needs a cardiac model such as cardiac-cine-mri"
            )
        return cls(rv=by_name.get("rv cavity"), myo=by_name.get("lv myocardium"), lv=lv)


@dataclass
class CardiacFunction:
    """Volumes per phase and the function figures derived from them.

    ``unit`` is "ml", or "voxels" when the voxel size is unknown (then ``lv_mass_g`` is None and
    only the EF, a ratio, is comparable across scans). RV figures are None when no phase has RV.
    """

    lv_volumes: list[float]
    rv_volumes: list[float] | None
    myo_volumes: list[float] | None
    ed: int
    es: int
    unit: str = "ml"
    phase_names: list[str] = field(default_factory=list)
    ed_es_given: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def lv_edv(self) -> float:
        return self.lv_volumes[self.ed]

    @property
    def lv_esv(self) -> float:
        return self.lv_volumes[self.es]

    @property
    def lv_sv(self) -> float:
        return self.lv_edv - self.lv_esv

    @property
    def lv_ef_percent(self) -> float:
        return 100.0 * self.lv_sv / self.lv_edv

    @property
    def lv_mass_g(self) -> float | None:
        """Myocardial volume at ED times 1.05 g/ml; None in voxels or without myocardium."""
        if self.unit != "ml" or self.myo_volumes is None:
            return None
        return MYOCARDIUM_DENSITY_G_PER_ML * self.myo_volumes[self.ed]

    @property
    def rv_edv(self) -> float | None:
        return None if self.rv_volumes is None else self.rv_volumes[self.ed]

    @property
    def rv_esv(self) -> float | None:
        return None if self.rv_volumes is None else self.rv_volumes[self.es]

    @property
    def rv_sv(self) -> float | None:
        return None if self.rv_volumes is None else self.rv_edv - self.rv_esv

    @property
    def rv_ef_percent(self) -> float | None:
        if self.rv_volumes is None or self.rv_edv <= 0:
            return None
        return 100.0 * self.rv_sv / self.rv_edv

    @property
    def n_phases(self) -> int:
        return len(self.lv_volumes)

    def as_dict(self) -> dict:
        """JSON-safe: ``lv_edv_ml`` ... ``rv_ef_percent`` (volumes None when ``unit`` is voxels),
        the same volumes as ``*_voxels`` in that case, ED/ES phase indices, per-phase volumes."""
        ml = self.unit == "ml"
        out = {"unit": self.unit}
        for side in ("lv", "rv"):
            for key in ("edv", "esv", "sv"):
                value = getattr(self, f"{side}_{key}")
                out[f"{side}_{key}_ml"] = _round(value) if ml else None
                if not ml:
                    out[f"{side}_{key}_voxels"] = _round(value)
            out[f"{side}_ef_percent"] = _round(getattr(self, f"{side}_ef_percent"))
        out["lv_mass_g"] = _round(self.lv_mass_g)
        out.update(ed_phase=self.ed, es_phase=self.es, ed_es_given=self.ed_es_given,
                   phases=list(self.phase_names) or list(range(self.n_phases)))
        suffix = "ml" if ml else "voxels"
        out[f"lv_volumes_{suffix}"] = [_round(v) for v in self.lv_volumes]
        out[f"rv_volumes_{suffix}"] = None if self.rv_volumes is None else [_round(v) for v in self.rv_volumes]
        out["warnings"] = list(self.warnings)
        return out

    def phase_rows(self) -> list[dict]:
        """One row per phase (CSV): phase, name, LV / RV / myocardium volume, unit, ED/ES mark."""
        rows = []
        for t in range(self.n_phases):
            rows.append({
                "phase": t,
                "name": self.phase_names[t] if self.phase_names else str(t),
                "lv_cavity": _round(self.lv_volumes[t]),
                "rv_cavity": None if self.rv_volumes is None else _round(self.rv_volumes[t]),
                "lv_myocardium": None if self.myo_volumes is None else _round(self.myo_volumes[t]),
                "unit": self.unit,
                "mark": "ED" if t == self.ed else ("ES" if t == self.es else ""),
            })
        return rows


def _round(value, digits: int = 2):
    return None if value is None else round(float(value), digits)


def voxel_volume_ml(spacing_mm) -> float:
    """Volume of one voxel in ml (1 ml = 1000 mm^3)."""
    return float(np.prod([float(s) for s in spacing_mm])) / 1000.0


def _check_stack(n_slices: int) -> None:
    """Volumes add up a stack of short-axis slices: one slice (a long-axis cine: M&Ms-2's 4-chamber view gave
    EF 100 %, EDV 1.1 ml) cannot give a ventricle's volume."""
    if n_slices < 2:
        raise ConsistentSegError("cardiac function needs a stack of short-axis slices; this scan has one slice a "
                                 "phase (a long-axis view?), and a ventricle's volume cannot be measured from one")


def cardiac_function(
    phases,
    spacing_mm=None,
    *,
    ed: int | None = None,
    es: int | None = None,
    labels: CardiacLabels = CardiacLabels(),
    phase_names: Sequence[str] | None = None,
) -> CardiacFunction:
    """Function figures from cardiac label volumes, one per phase.

    phases: a (T, Z, Y, X) array or a sequence of (Z, Y, X) arrays on one grid (T >= 2; for an
    ED + ES pair pass ``ed=0, es=1``). spacing_mm: (z, y, x) voxel size, or None when unknown:
    volumes are then voxel counts, the mass is None and a warning says so. ED and ES default to
    the phases of largest and smallest LV cavity volume.
    Raises ConsistentSegError when there are fewer than two phases, one slice a phase, no LV cavity at ED,
    or ED = ES.
    """
    stack = [np.asarray(p) for p in phases]
    if len(stack) < 2:
        raise ConsistentSegError("cardiac function needs at least two phases (ED and ES, or a cine)")
    shape = stack[0].shape
    for p in stack:
        if p.shape != shape or p.ndim != 3:
            raise ShapeMismatchError(
                f"every phase must be one (Z, Y, X) label volume on one grid; got {shape} and {p.shape}")
    _check_stack(shape[0])
    warnings = []
    if spacing_mm is None:
        unit, per_voxel = "voxels", 1.0
        warnings.append("the scan does not know its voxel size: volumes are voxel counts, no mass in g; "
                        "the ejection fractions (ratios) are still valid")
    else:
        unit, per_voxel = "ml", voxel_volume_ml(spacing_mm)

    def volumes(value):
        return None if value is None else [per_voxel * int(np.count_nonzero(p == value)) for p in stack]

    lv = volumes(labels.lv)
    rv = volumes(labels.rv)
    myo = volumes(labels.myo)
    if rv is not None and not any(rv):
        rv = None
    if myo is not None and not any(myo):
        myo = None
    if max(lv) <= 0:
        raise ConsistentSegError("no LV cavity in any phase: check the segmentation and the model")
    given = ed is not None or es is not None
    ed = int(np.argmax(lv)) if ed is None else int(ed)
    es = int(np.argmin(lv)) if es is None else int(es)
    for name, t in (("ED", ed), ("ES", es)):
        if not 0 <= t < len(stack):
            raise ConsistentSegError(f"{name} phase {t} is outside 0..{len(stack) - 1}")
    if ed == es:
        raise ConsistentSegError("ED and ES are the same phase: give two different phases")
    if lv[ed] <= 0:
        raise ConsistentSegError(f"no LV cavity in the ED phase ({ed}): check the segmentation and the model")
    if lv[es] > lv[ed]:
        warnings.append(f"the LV is larger at ES ({lv[es]:.1f}) than at ED ({lv[ed]:.1f} {unit}): "
                        "ED and ES may be swapped")
    if rv is not None and rv[ed] < RV_LV_MIN_AT_ED * lv[ed]:
        warnings.append(f"the RV at ED ({rv[ed]:.1f} {unit}) is under {100 * RV_LV_MIN_AT_ED:.0f} % of the LV's "
                        f"({lv[ed]:.1f} {unit}): "
                        "much of the RV is probably missed; check it before reading the RV figures")
    return CardiacFunction(lv, rv, myo, ed, es, unit, [str(n) for n in (phase_names or [])], given, warnings)


def function_table(result: CardiacFunction, title: str = "") -> str:
    """The figures as a plain-text table (for ``make demo`` and the CLI), per-phase volumes below."""
    u = result.unit

    def fmt(value, unit):
        return "n/a" if value is None else f"{value:8.1f} {unit}"

    lines = [title] if title else []
    lines.append(f"  {'':10s} {'LV':>14s} {'RV':>14s}")
    for label, key, unit in (("EDV", "edv", u), ("ESV", "esv", u), ("SV", "sv", u), ("EF", "ef_percent", "%")):
        lines.append(f"  {label:10s} {fmt(getattr(result, 'lv_' + key), unit):>14s} "
                     f"{fmt(getattr(result, 'rv_' + key), unit):>14s}")
    lines.append(f"  {'LV mass':10s} {fmt(result.lv_mass_g, 'g'):>14s}")
    names = result.phase_names or [str(t) for t in range(result.n_phases)]
    how = "given" if result.ed_es_given else "largest / smallest LV"
    lines.append(f"  ED = phase {names[result.ed]}, ES = phase {names[result.es]} ({how})")
    if result.n_phases > 2:
        lines.append("  LV volume per phase (" + u + "): " + " ".join(f"{v:.0f}" for v in result.lv_volumes))
        if result.rv_volumes is not None:
            lines.append("  RV volume per phase (" + u + "): " + " ".join(f"{v:.0f}" for v in result.rv_volumes))
    lines += [f"  warning: {w}" for w in result.warnings]
    return "\n".join(lines)


# ---- clean-up of a slice-wise model's cardiac labels ---------------------------------------


def clean_cardiac_labels(
    labels: np.ndarray,
    spacing_mm=None,
    *,
    classes: CardiacLabels = CardiacLabels(),
    max_shift_mm: float = 20.0,
    rv_reach_mm: float = 10.0,
    min_area_mm2: float = 20.0,
    min_ring_cover: float = 0.5,
    max_base_growth: float = 2.0,
    max_base_area_growth: float = 1.5,
    min_neighbour_share: float = 0.75,
    keep_slices=(),
) -> np.ndarray:
    """Keep the one heart of a short-axis label volume and mend what breaks function figures.

    labels: (Z, Y, X), axis 0 the short-axis slice axis. spacing_mm: (z, y, x), or None (pixels
    taken as ``ASSUMED_PIXEL_MM``). Returns a new array of the same dtype.

    1. LV (myocardium + cavity) pieces are found slice by slice; the heart is the longest run of
       slices linked by pieces whose centres move at most ``max_shift_mm`` from one slice to the
       next (one slice may be skipped); larger pieces break ties. Pieces off that run (a false
       heart below the apex or above the base, islands) are removed, and slices outside it lose
       their myocardium and LV cavity. End slices of the run whose LV cavity is less than
       ``min_ring_cover`` surrounded by myocardium (an atrium above the base, or a guess past the
       apex) are dropped from the run; myocardium without cavity stays (the apex at end-systole).
       Walking to the base (the end of larger cavity) from half-way through the slices from the
       first with a cavity, the run ends before the first slice whose cavity is more than
       ``max_base_growth`` times the widest one before it and whose whole LV (myocardium and
       cavity) is more than ``max_base_area_growth`` times the widest before it: the LV widens smoothly
       toward the base, an atrium the model takes for LV does not. (The cavity alone is no guide
       at end-systole, when the mid cavity shrinks to a few pixels under a thick wall.)
    2. In each kept slice, the myocardium ring is closed over small gaps and everything it encloses
       becomes LV cavity.
    3. RV pieces are kept only within ``rv_reach_mm`` of the kept LV, on the run's slices.
    4. A skipped (empty) slice inside the run is filled by interpolating its two neighbours; so is
       a collapsed one, whose LV piece is less than ``min_neighbour_share`` of the smaller of its
       two neighbours' (the LV's area changes smoothly between mid slices: a dip between two fuller
       slices is a miss, not anatomy; docs/cardiac.md).

    ``keep_slices``: slice indices the user corrected and left LV (myocardium or cavity) on, e.g.
    before a fine-tune: the end rules of step 1 never drop them from the run, nor the slices
    between them. The user's word outranks the atrium and apex guesses.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ShapeMismatchError(f"expected a (Z, Y, X) label volume, got shape {labels.shape}")
    pixel_mm = _inplane_mm(spacing_mm)
    lv_value, myo_value, rv_value = classes.lv, classes.myo, classes.rv
    is_lv = labels == lv_value
    if myo_value is not None:
        is_lv = is_lv | (labels == myo_value)
    pieces = [_pieces(is_lv[z], pixel_mm, min_area_mm2) for z in range(labels.shape[0])]
    keep = {int(z) for z in keep_slices}
    chain = _trim_open_ends(_heart_chain(pieces, max_shift_mm), pieces, labels, classes, min_ring_cover, keep)
    chain = _cut_base_jump(chain, pieces, labels, classes, max_base_growth, max_base_area_growth, keep)
    chain = _without_collapsed(chain, pieces, min_neighbour_share)
    out = labels.copy()
    lv_classes = [v for v in (lv_value, myo_value) if v is not None]
    out[np.isin(out, lv_classes)] = 0
    kept_lv = np.zeros(labels.shape, bool)
    for z, index in chain.items():
        mask = pieces[z][index][2]
        kept_lv[z] = mask
        out[z][mask] = labels[z][mask]
        _close_ring(out[z], mask, pixel_mm, lv_value, myo_value)
    if rv_value is not None:
        _keep_rv_near_lv(out, labels, kept_lv, chain, pixel_mm, rv_reach_mm, rv_value)
    if chain:
        _fill_gaps(out, sorted(chain), spacing_mm, [v for v in (myo_value, lv_value, rv_value) if v is not None])
    return out


def _inplane_mm(spacing_mm) -> tuple[float, float]:
    if spacing_mm is None:
        return (ASSUMED_PIXEL_MM, ASSUMED_PIXEL_MM)
    return (float(spacing_mm[-2]), float(spacing_mm[-1]))


def _pieces(mask2d: np.ndarray, pixel_mm, min_area_mm2: float) -> list[tuple]:
    """[(centre_mm (y, x), area_mm2, mask), ...] of the 8-connected pieces of one slice's mask."""
    labelled, n = ndi.label(mask2d, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    pixel_area = pixel_mm[0] * pixel_mm[1]
    counts = np.bincount(labelled.ravel(), minlength=n + 1)
    centres = ndi.center_of_mass(mask2d, labelled, range(1, n + 1))
    out = []
    for i in range(1, n + 1):
        area = counts[i] * pixel_area
        if area >= min_area_mm2:
            centre = np.array(centres[i - 1]) * np.array(pixel_mm)
            out.append((centre, area, labelled == i))
    return out


def _heart_chain(pieces: list[list[tuple]], max_shift_mm: float) -> dict[int, int]:
    """{slice: piece index} of the best run (dynamic programming over slices, one skip allowed).

    A run's score is its number of slices plus half its share of the largest piece's area per
    slice, so length decides and size breaks ties.
    """
    largest = max((a for ps in pieces for _, a, _ in ps), default=0.0)
    if largest == 0:
        return {}
    best: list[list[float]] = []
    back: list[list[tuple | None]] = []
    for z, ps in enumerate(pieces):
        row_best, row_back = [], []
        for centre, area, _ in ps:
            score, link = 0.0, None
            for step in (1, 2):  # the previous slice, or one slice skipped
                if z - step < 0:
                    continue
                for j, (prev_centre, _, _) in enumerate(pieces[z - step]):
                    if np.linalg.norm(centre - prev_centre) <= max_shift_mm and best[z - step][j] > score:
                        score, link = best[z - step][j], (z - step, j)
            row_best.append(score + 1.0 + 0.5 * area / largest)
            row_back.append(link)
        best.append(row_best)
        back.append(row_back)
    end = max(((z, i) for z in range(len(pieces)) for i in range(len(pieces[z]))), key=lambda zi: best[zi[0]][zi[1]])
    chain = {}
    node = end
    while node is not None:
        chain[node[0]] = node[1]
        node = back[node[0]][node[1]]
    return chain


def ring_cover(slice_labels: np.ndarray, lv_value: int = 3, myo_value: int | None = 2) -> float | None:
    """Share of the pixels just outside the LV cavity that are myocardium (None: no cavity)."""
    cavity = slice_labels == lv_value
    if not cavity.any() or myo_value is None:
        return None
    rim = ndi.binary_dilation(cavity, structure=np.ones((3, 3), bool)) & ~cavity
    return float(np.mean(slice_labels[rim] == myo_value)) if rim.any() else 1.0


def _trim_open_ends(chain: dict[int, int], pieces, labels, classes: CardiacLabels, min_cover: float,
                    keep=frozenset()) -> dict:
    """Drop end slices of the run (from either end, while more than two remain) with a cavity the
    myocardium does not enclose; an end in ``keep`` stops the trimming from its side. A slice of
    myocardium without cavity stays (the apex at end-systole)."""
    chain = dict(chain)

    def open_ring(z):
        if z in keep:
            return False
        piece = np.where(pieces[z][chain[z]][2], labels[z], 0)
        cover = ring_cover(piece, classes.lv, classes.myo)
        return cover is not None and cover < min_cover  # no cavity: an apex at end-systole, kept

    while len(chain) > 2:
        ends = [z for z in (min(chain), max(chain)) if open_ring(z)]
        if not ends:
            break
        del chain[ends[0]]
    return chain


def _cut_base_jump(chain: dict[int, int], pieces, labels, classes: CardiacLabels, max_growth: float,
                   max_area_growth: float, keep=frozenset()) -> dict:
    """The run without the slices from the first sudden widening of the cavity, and of the whole LV,
    toward the base, past the last slice in ``keep``."""
    if len(chain) < 3:
        return chain
    ordered = sorted(chain)
    cavity = [int(np.count_nonzero(pieces[z][chain[z]][2] & (labels[z] == classes.lv))) for z in ordered]
    area = [int(np.count_nonzero(pieces[z][chain[z]][2])) for z in ordered]
    if cavity[0] > cavity[-1]:  # walk toward the base: reverse so that the base is last
        ordered, cavity, area = ordered[::-1], cavity[::-1], area[::-1]
    kept = [i for i, z in enumerate(ordered) if z in keep]
    # from half-way through the slices with a cavity: a cavity-less apex and the small mid cavities of
    # end-systole are no reference for the base
    first = next((i for i, c in enumerate(cavity) if c > 0), 0)
    for i in range(max([first + (len(ordered) - first) // 2, *kept]) + 1, len(ordered)):
        # against the widest so far: one slice the model under-segments is no reference
        if (cavity[i] > max_growth * max(max(cavity[:i]), 1)
                and area[i] > max_area_growth * max(max(area[:i]), 1)):
            return {z: chain[z] for z in ordered[:i]}
    return chain


def _without_collapsed(chain: dict[int, int], pieces, min_share: float) -> dict:
    """The run without its collapsed slices: those whose LV piece is less than ``min_share`` of the
    smaller of its two neighbours' in the run. Two neighbouring slices cannot both be collapsed, so
    each leaves a one-slice gap for `_fill_gaps`."""
    area = {z: pieces[z][i][1] for z, i in chain.items()}
    return {z: i for z, i in chain.items()
            if z - 1 not in area or z + 1 not in area or area[z] >= min_share * min(area[z - 1], area[z + 1])}


def _disk(radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return yy ** 2 + xx ** 2 <= r * r


def _close_ring(slice_out: np.ndarray, lv_mask: np.ndarray, pixel_mm, lv_value, myo_value,
                gap_mm: float = 4.0) -> None:
    """Bridge myocardium gaps up to about ``2 * gap_mm`` and make what the ring encloses LV cavity
    (only background pixels change)."""
    closed = ndi.binary_closing(lv_mask, structure=_disk(gap_mm / min(pixel_mm)), border_value=0)
    closed |= lv_mask
    inside = ndi.binary_fill_holes(closed) & ~closed
    background = slice_out == 0
    if myo_value is not None:
        slice_out[closed & ~lv_mask & background] = myo_value
    slice_out[inside & background] = lv_value
    # holes of the original mask (cavity pixels called background) are cavity too
    slice_out[ndi.binary_fill_holes(lv_mask) & ~lv_mask & (slice_out == 0)] = lv_value


def _keep_rv_near_lv(out, labels, kept_lv, chain, pixel_mm, reach_mm, rv_value) -> None:
    out[out == rv_value] = 0
    if not chain:
        return
    for z in range(min(chain), max(chain) + 1):
        rv = labels[z] == rv_value
        if not rv.any():
            continue
        nearest = min(chain, key=lambda c: abs(c - z))
        distance = ndi.distance_transform_edt(~kept_lv[nearest], sampling=pixel_mm)
        pieces, n = ndi.label(rv, structure=np.ones((3, 3), bool))
        near = np.unique(pieces[(distance <= reach_mm) & rv])
        keep = np.isin(pieces, near[near > 0]) & (out[z] == 0)
        out[z][keep] = rv_value


def _fill_gaps(out, chain_slices: list[int], spacing_mm, values) -> None:
    """A slice skipped inside the run gets each class where the mean of its neighbours' signed
    distances is negative (shape-based interpolation)."""
    pixel_mm = _inplane_mm(spacing_mm)
    for a, b in zip(chain_slices, chain_slices[1:]):
        if b - a != 2:
            continue
        z = a + 1
        filled = np.zeros(out.shape[1:], out.dtype)
        for value in values:  # later classes win: LV cavity over myocardium, RV on what is left
            inside = (_signed_distance(out[a] == value, pixel_mm) + _signed_distance(out[b] == value, pixel_mm)) < 0
            if value == values[-1] and len(values) == 3:
                inside &= filled == 0
            filled[inside] = value
        keep = filled > 0
        out[z][keep] = filled[keep]


def _signed_distance(mask: np.ndarray, pixel_mm) -> np.ndarray:
    if not mask.any():
        return np.full(mask.shape, 1e6)
    return ndi.distance_transform_edt(~mask, sampling=pixel_mm) - ndi.distance_transform_edt(mask, sampling=pixel_mm)


# ---- segmentation of every phase, for the CLI, the widget and the demo ---------------------


def _spacing_of(volume):
    return volume.spacing_mm if volume.geometry.spacing_known else None


def segment_cardiac(model, volume, *, clean: bool = True, device=None, progress=None,
                    cancel=None) -> list[np.ndarray]:
    """Segment a short-axis scan Volume (3D: one phase; cine: every phase) with a cardiac model;
    labels per phase, each (Z, Y, X) on the scan's grid.

    The model slices in its card's plane (``inference.segment``, raw labels); ``clean`` then applies
    :func:`clean_cardiac_labels` along the scan's own slice axis (axis 0, the short axis of a
    cine), whatever the card says; without it each class keeps its largest component (the
    post-processing before the clean-up). Progress counts slices over all phases.
    """
    from .inference import keep_largest_components, segment

    classes = CardiacLabels.from_classes(model.classes)
    labels = segment(model, volume, device=device, keep_largest=False, progress=progress, cancel=cancel)
    phases = [labels.data[t] for t in range(volume.n_phases)] if volume.n_phases else [labels.data]
    if not clean:
        return [keep_largest_components(p) for p in phases]
    return [clean_cardiac_labels(p, _spacing_of(volume), classes=classes) for p in phases]


def frames_function(model, ed, es, *, clean: bool = True, device=None, progress=None,
                    cancel=None) -> tuple[CardiacFunction, list[np.ndarray]]:
    """Segment an end-diastolic and an end-systolic frame (two 3D Volumes of one cine acquisition, as
    ACDC distributes them) and compute their function figures; returns (figures, [ED labels, ES labels]).
    Progress counts the slices of both frames."""
    for name, volume in (("ED", ed), ("ES", es)):
        if volume.n_phases is not None:
            raise ConsistentSegError(f"the {name} frame {volume.name!r} is a cine: give one 3D frame, or use the cine")
    if ed.shape != es.shape:
        raise ShapeMismatchError(f"the ED frame has shape {ed.shape} but the ES frame {es.shape}: give two frames "
                                 "of one cine acquisition")
    _check_stack(ed.shape[-3])  # before segmenting
    n = ed.shape[-3]

    def frame_progress(offset):
        return None if progress is None else (lambda done, total: progress(offset + done, 2 * n))

    labels = [segment_cardiac(model, frame, clean=clean, device=device, progress=frame_progress(i * n),
                              cancel=cancel)[0] for i, frame in enumerate((ed, es))]
    result = cardiac_function(labels, _spacing_of(ed), ed=0, es=1, labels=CardiacLabels.from_classes(model.classes),
                              phase_names=["ED", "ES"])
    result.warnings[:0] = list(ed.meta.get("warnings", []))
    return result, labels


def cine_function(model, volume, *, ed: int | None = None, es: int | None = None, clean: bool = True,
                  device=None, progress=None, cancel=None) -> tuple[CardiacFunction, list[np.ndarray]]:
    """Segment every phase of a cine Volume (T, Z, Y, X) and compute its function figures;
    returns (figures, labels per phase).

    ED and ES default to the largest and smallest LV; volumes are voxel counts where the scan does
    not know its voxel size. Raises ConsistentSegError for a 3D scan (segment its ED and ES frames
    with :func:`segment_cardiac` and pass both to :func:`cardiac_function`).
    """
    if not volume.n_phases:
        raise ConsistentSegError(f"{volume.name or 'the scan'} is one 3D frame, not a cine: segment its ED and "
                                 "ES frames and pass both label volumes to cardiac_function")
    _check_stack(volume.shape[-3])  # before segmenting
    labels = segment_cardiac(model, volume, clean=clean, device=device, progress=progress, cancel=cancel)
    names = [str(t) for t in range(len(labels))]
    result = cardiac_function(labels, _spacing_of(volume), ed=ed, es=es,
                              labels=CardiacLabels.from_classes(model.classes), phase_names=names)
    result.warnings[:0] = list(volume.meta.get("warnings", []))
    return result, labels
