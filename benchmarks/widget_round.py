"""The Fine-tune widget's round in napari: its time, and how smoothly napari draws meanwhile.

Runs napari (under Xvfb: ``xvfb-run -a -s "-screen 0 1400x900x24"``), opens acdc patient028_frame01
(10 slices) through our reader, paints the reference's slices 3 and 6 into a labels layer, and
presses Fine-tune with the widget's defaults and the shipped cardiac model. A 10 ms QTimer records
the Qt event loop's gaps (its heartbeat); ``--scroll-ms`` also steps napari's slider at that
interval, so napari redraws the way a user browsing the scan makes it.

Two ways of running torch off the main thread, interleaved A B A B in one process:
- ``low-priority`` (the widget's now, on Linux): a fresh thread at nice +10, torch on every core;
- ``one-core-left`` (the widget's before, and its fallback elsewhere): the worker's own thread,
  torch on all cores but one.

    xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python benchmarks/widget_round.py
        [--repeats 2] [--scroll-ms 0 500] [--steps 60]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

CASE = "patient028_frame01"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "acdc"
PLUGIN = "napari-consistent-seg"
MODES = ("low-priority", "one-core-left")


def _wait(app, seconds: float | None = None, until=None) -> None:
    """Run Qt's event loop (as napari does, not a Python polling loop) for a time or until ``until()``."""
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


def _gap_stats(gaps: list[tuple[float, float]]) -> dict:
    g = 1000 * np.asarray([b - a for a, b in gaps])
    return {"median": np.median(g), "p99": np.percentile(g, 99), "max": g.max(), "over 100 ms": int((g > 100).sum())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scroll-ms", type=int, nargs="+", default=[0, 500], help="0: no scrolling")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_consistent_seg._napari import _workers

    viewer = napari.Viewer(show=True)
    (image,) = viewer.open(str(DATA / "images" / f"{CASE}.nii.gz"), plugin=PLUGIN)
    (reference,) = viewer.open(str(DATA / "labels" / f"{CASE}.nii.gz"), plugin=PLUGIN)
    reference.visible = False
    painted = np.zeros_like(reference.data)
    painted[[3, 6]] = reference.data[[3, 6]]
    painted_layer = viewer.add_labels(painted, name="painted", scale=image.scale)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune (ICL)")
    widget.inputs.model.select("cardiac-cine-mri")
    widget.inputs.image.set_layer(image)
    widget.painted.set_layer(painted_layer)
    widget.steps.setValue(args.steps)
    app = QApplication.instance()
    _wait(app, seconds=2.0)

    # the GUI test's heartbeat: gaps while napari adds or removes a layer (its own work) are left out
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_widgets_gui import Heartbeat

    heartbeat, scroller = Heartbeat(viewer), QTimer()

    def scroll():
        viewer.dims.set_current_step(0, (viewer.dims.current_step[0] + 1) % image.data.shape[0])

    scroller.timeout.connect(scroll)
    wrap = {"low-priority": _workers._at_low_priority,
            "one-core-left": lambda task: (_workers._leaving_a_core_to_the_gui(task), lambda: None)}
    from speed import machine  # benchmarks/speed.py: the CPU's name, torch's threads, the load

    from napari_consistent_seg.inference import cpu_has_native_bf16

    print(f"{machine()}; forward passes in {'bf16' if cpu_has_native_bf16() else 'float32'}; {CASE}, "
          f"{args.steps} steps")
    print("| scrolling | torch off the main thread | round (s) | its steps (s) | heartbeat gap median / p99 / max (ms), napari's layer work left out | gaps > 100 ms |")
    print("|---|---|---|---|---|---|")
    for scroll_ms in args.scroll_ms:
        for _ in range(args.repeats):
            for mode in MODES:
                _workers._at_low_priority = wrap[mode]  # TaskRunner.start looks it up when it starts
                with heartbeat.measure():
                    if scroll_ms:
                        scroller.start(scroll_ms)
                    started = time.perf_counter()
                    assert widget.run()
                    _wait(app, until=lambda: not widget.runner.running)
                    seconds = time.perf_counter() - started
                    scroller.stop()
                steps_s = widget.tuner.elapsed_s
                widget.revert()
                s = _gap_stats(heartbeat.working_gaps())
                print(f"| {f'every {scroll_ms} ms' if scroll_ms else 'none'} | {mode} | {seconds:.1f} | {steps_s:.1f} | "
                      f"{s['median']:.0f} / {s['p99']:.0f} / {s['max']:.0f} | {s['over 100 ms']} |", flush=True)
    _workers._at_low_priority = wrap["low-priority"]
    viewer.close()


if __name__ == "__main__":
    main()
