"""The Fine-tune widget's round in napari: its time, and how smoothly napari draws meanwhile.

Runs napari (under Xvfb: ``xvfb-run -a -s "-screen 0 1400x900x24"``), opens acdc patient028_frame01
(10 slices) through our reader, paints the reference's slices 3 and 6 into a labels layer (``--paint
slices``; ``dabs``: segments the scan with the Segment widget and dabs the reference's label with a
size-5 brush on 15 wrong voxels of each of its three worst slices, in place, as the screenshot of
docs/user-guide.md), and presses Fine-tune with the widget's defaults and the shipped cardiac model.
A 10 ms QTimer records the Qt event loop's gaps (its heartbeat); ``--scroll-ms`` also steps napari's
slider at that interval, so napari redraws the way a user browsing the scan makes it.

Ways of running torch off the main thread (``--modes``), interleaved A B A B in one process:
- ``nice N`` (the widget's on Linux, with its `NICENESS`): a fresh thread at nice +N, torch on every core;
- ``..., always``: at nice +N even when other processes keep every core busy (`_workers._niceness`);
- ``..., N threads``: torch on N threads whatever the other processes do (else the steps follow the idle cores);
- ``one-core-left`` (the widget's fallback elsewhere): the worker's own thread, torch on all cores but one.

``--load N`` runs N busy processes at normal priority beside napari (a user's other work: a build, a
training run); ``--limit-s`` cancels a round that has not finished by then (its row says how far it got).

    xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python benchmarks/widget_round.py
        [--repeats 2] [--scroll-ms 0 500] [--steps 60] [--modes "nice 10" one-core-left] [--load 2] [--paint dabs]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

CASE = "patient028_frame01"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "acdc"
PLUGIN = "napari-consistent-seg"
MODES = ("nice 10", "one-core-left")
MODEL = "cardiac-cine-mri"


def _mode(name: str):
    """The `_at_low_priority` stand-in for a mode, with `_workers`' settings for it."""
    from napari_consistent_seg._napari import _workers
    from napari_consistent_seg.inference import THREADS_ENV

    if name == "one-core-left":
        return lambda task: (_workers._leaving_a_core_to_the_gui(task), lambda: None)
    words = [w.strip() for w in name.split(",")]
    niceness = next((int(w.split()[1]) for w in words if w.startswith("nice ")), 0)
    threads = next((w.split()[0] for w in words if w.endswith(" threads")), "")

    def wrap(task, original=_workers._at_low_priority, choose=_workers._niceness):
        _workers.NICENESS = niceness  # read when the thread starts
        _workers._niceness = (lambda: niceness) if "always" in words else choose
        os.environ[THREADS_ENV] = threads  # read at each step: "" lets the steps follow the idle cores
        return original(task)
    return wrap


def _busy() -> None:
    while True:
        pass


def run_qt_until(seconds: float | None = None, until=None) -> None:
    """Run Qt's event loop (as napari does, not a Python polling loop, which keeps a core busy) for a
    time or until ``until()``. docs/make_screenshots.py waits for its widgets with it too."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop, start = QEventLoop(), time.perf_counter()

    def check():
        if (until is not None and until()) or (seconds is not None and time.perf_counter() - start > seconds):
            loop.quit()

    poll = QTimer()
    poll.setInterval(50)
    poll.timeout.connect(check)
    poll.start()
    loop.exec()
    poll.stop()


def dab_worst_slices(layer, reference, slices: int = 3) -> np.ndarray:
    """Size-5 dabs of ``reference``'s label on 15 of the voxels the Labels ``layer`` gets wrong on each of
    its ``slices`` worst slices, painted as napari's brush paints them (a user correcting in place).
    Returns those slices, worst first."""
    ref = np.asarray(reference.data)
    wrong = np.asarray(layer.data) != ref
    worst = np.argsort(-wrong.reshape(len(ref), -1).sum(1))[:slices]
    layer.brush_size = 5
    for z in worst:
        for y, x in np.argwhere(wrong[z])[::20][:15]:
            layer.paint((z, y, x), int(ref[z, y, x]))
    return worst


def _dabbed(viewer, image, reference):
    """The Segment widget's layer for ``image``, dabbed on its three worst slices (`dab_worst_slices`)."""
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    segment.inputs.model.select(MODEL)
    segment.inputs.image.set_layer(image)
    segment.run()
    run_qt_until(until=lambda: not segment.runner.running)
    layer = viewer.layers[f"{image.name} {MODEL}"]
    dab_worst_slices(layer, reference)
    return layer


def _gap_stats(gaps: list[tuple[float, float]]) -> dict:
    g = 1000 * np.asarray([b - a for a, b in gaps])
    return {"median": np.median(g), "p99": np.percentile(g, 99), "max": g.max(), "over 100 ms": int((g > 100).sum())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scroll-ms", type=int, nargs="+", default=[0, 500], help="0: no scrolling")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--load", type=int, default=0, help="busy processes at normal priority beside napari")
    parser.add_argument("--limit-s", type=float, help="cancel a round after this many seconds")
    parser.add_argument("--paint", choices=["slices", "dabs"], default="slices",
                        help="two reference slices in a new layer, or dabs in place on the segmentation")
    args = parser.parse_args(argv)
    import multiprocessing

    hogs = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(args.load)]
    for hog in hogs:
        hog.start()

    import napari
    from qtpy.QtCore import QTimer

    from napari_consistent_seg._napari import _workers

    viewer = napari.Viewer(show=True)
    (image,) = viewer.open(str(DATA / "images" / f"{CASE}.nii.gz"), plugin=PLUGIN)
    (reference,) = viewer.open(str(DATA / "labels" / f"{CASE}.nii.gz"), plugin=PLUGIN)
    reference.visible = False
    painted_layer = _dabbed(viewer, image, reference) if args.paint == "dabs" else viewer.add_labels(
        np.where(np.isin(np.arange(len(reference.data)), [3, 6])[:, None, None], reference.data, 0),
        name="painted", scale=image.scale)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    widget.inputs.model.select(MODEL)
    widget.inputs.image.set_layer(image)
    widget.painted.set_layer(painted_layer)
    widget.steps.setValue(args.steps)
    run_qt_until(seconds=2.0)

    # the GUI test's heartbeat: gaps while napari adds or removes a layer (its own work) are left out
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_widgets_gui import Heartbeat

    heartbeat, scroller = Heartbeat(viewer), QTimer()

    def scroll():
        viewer.dims.set_current_step(0, (viewer.dims.current_step[0] + 1) % image.data.shape[0])

    scroller.timeout.connect(scroll)
    from napari_consistent_seg.inference import THREADS_ENV

    original = _workers._at_low_priority
    settings = (_workers.NICENESS, _workers._niceness, os.environ.get(THREADS_ENV))
    wrap = {mode: _mode(mode) for mode in args.modes}
    from speed import machine  # benchmarks/speed.py: the CPU's name, torch's threads, the load

    from napari_consistent_seg.inference import cpu_has_native_bf16

    print(f"{machine()}; forward passes in {'bf16' if cpu_has_native_bf16() else 'float32'}; {CASE}, "
          f"{args.paint}, {args.steps} steps; {args.load} busy processes beside napari")
    print("| scrolling | torch off the main thread | round (s) | its steps (s) | heartbeat gap median / p99 / max (ms), napari's layer work left out | gaps > 100 ms |")
    print("|---|---|---|---|---|---|")
    for scroll_ms in args.scroll_ms:
        for _ in range(args.repeats):
            for mode in args.modes:
                _workers._at_low_priority = wrap[mode]  # TaskRunner.start looks it up when it starts
                with heartbeat.measure():
                    if scroll_ms:
                        scroller.start(scroll_ms)
                    started = time.perf_counter()
                    assert widget.run()
                    run_qt_until(until=lambda: not widget.runner.running or (
                        args.limit_s and time.perf_counter() - started > args.limit_s))
                    bar = widget.runner.progress_bar
                    steps_done = round(args.steps * bar.value() / max(bar.maximum(), 1))
                    if widget.runner.running:
                        widget.runner.cancel()
                        run_qt_until(until=lambda: not widget.runner.running)
                    seconds = time.perf_counter() - started
                    scroller.stop()
                if widget.runner.cancel_requested:
                    round_s, steps_s = f"cancelled at {seconds:.0f}", f"{steps_done} of {args.steps} done"
                else:
                    round_s, steps_s = f"{seconds:.1f}", f"{widget.tuner.elapsed_s:.1f}"
                    widget.revert()
                s = _gap_stats(heartbeat.working_gaps())
                print(f"| {f'every {scroll_ms} ms' if scroll_ms else 'none'} | {mode} | {round_s} | {steps_s} | "
                      f"{s['median']:.0f} / {s['p99']:.0f} / {s['max']:.0f} | {s['over 100 ms']} |", flush=True)
    _workers._at_low_priority = original
    _workers.NICENESS, _workers._niceness, threads = settings
    if threads is None:
        os.environ.pop(THREADS_ENV, None)
    else:
        os.environ[THREADS_ENV] = threads
    for hog in hogs:
        hog.terminate()
    viewer.close()


if __name__ == "__main__":
    main()
