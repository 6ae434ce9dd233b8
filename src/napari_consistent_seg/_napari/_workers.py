"""Run one long task at a time off the Qt main thread, with a progress bar, a Cancel button and a
status line; stop it when the widget goes away (viewer closed) so nothing touches a dead window.

A task is ``task(progress, cancel)``: ``progress(done, total)`` may be called from the worker
thread, ``cancel`` is a ``threading.Event``. A plain function returns its result; a generator
yields intermediate results (delivered on the main thread) and returns its result.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from napari.qt.threading import create_worker
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from ..errors import Cancelled, ConsistentSegError
from ._widget_common import notify

log = logging.getLogger(__name__)


class _ProgressRelay(QObject):
    """Carries ``progress(done, total)`` calls from the worker thread to the main thread (queued)."""

    progressed = Signal(int, int)


class _RunState:
    """What a running task needs to be stopped; a plain object so that it outlives the widget."""

    def __init__(self):
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.done.set()
        self.worker = None

    def begin(self, worker, cancel: threading.Event) -> None:
        self.cancel = cancel
        self.done.clear()
        self.worker = worker
        # Direct connection: set from the worker thread itself, so a blocked main thread can wait on it.
        worker.finished.connect(self.done.set, Qt.ConnectionType.DirectConnection)

    def stop(self, *_args) -> None:
        self.cancel.set()
        worker = self.worker
        if worker is not None:
            worker.quit()  # a generator task stops at its next yield


class TaskRunner(QWidget):
    """Progress bar, Cancel button and status line for one task at a time.

    ``start`` returns False (and says so) when a task is already running. Callbacks run on the
    main thread: ``on_returned(result)``, ``on_yielded(value)``, ``on_finished()`` (always, last).
    A ``Cancelled`` error is a normal end; a ``ConsistentSegError`` shows its message; any other
    error shows its type and message and is logged; none reaches napari.
    """

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.progress_bar = QProgressBar()
        self.progress_bar.setTextVisible(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.progress_bar, 1)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.status)
        self._state = _RunState()
        self._relay = _ProgressRelay()
        self._relay.progressed.connect(self._show_progress)
        self._callbacks: dict[str, Callable | None] = {}
        self._description = ""
        self._started_at = 0.0
        self.last_error: BaseException | None = None
        # The widget is deleted with the main window: stop the task then (plain-object slot).
        self.destroyed.connect(self._state.stop)
        self._idle()

    @property
    def running(self) -> bool:
        return self._state.worker is not None

    @property
    def cancel_requested(self) -> bool:
        """Whether the current (or last) task was asked to stop: Cancel, or the widget deleted."""
        return self._state.cancel.is_set()

    def start(self, task: Callable, *, description: str, on_returned=None, on_yielded=None,
              on_finished=None) -> bool:
        if self.running:
            notify("A task is running already: wait for it or press Cancel.", "warning", self.status)
            return False
        relay = self._relay

        def progress(done: int, total: int) -> None:
            relay.progressed.emit(int(done), int(total))

        cancel = threading.Event()
        off_the_gui, finish = _at_low_priority(task)
        worker = create_worker(off_the_gui, progress, cancel, _ignore_errors=True)
        worker.finished.connect(finish, Qt.ConnectionType.DirectConnection)  # in the worker's thread, first
        self._state.begin(worker, cancel)
        self._callbacks = {"returned": on_returned, "yielded": on_yielded, "finished": on_finished}
        self._description = description
        self._started_at = time.monotonic()
        self.last_error = None
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        if on_yielded is not None:
            worker.yielded.connect(self._on_yielded)
        worker.finished.connect(self._on_finished)
        self.progress_bar.setRange(0, 0)  # busy until the first progress report
        self.progress_bar.setVisible(True)
        self.cancel_button.setEnabled(True)
        self.status.setText(f"{description}…")
        worker.start()
        return True

    def cancel(self) -> None:
        """Ask the task to stop at its next check; its finish callbacks still run."""
        if self.running:
            self._state.cancel.set()
            self.status.setText(f"{self._description}: cancelling…")

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Cancel and wait (blocking) up to ``timeout_s`` for the worker thread to end."""
        self._state.stop()
        return self._state.done.wait(timeout_s)

    def wait(self, timeout_s: float = 60.0) -> bool:
        """Block until the task's thread ends (tests and scripts; the GUI never calls this)."""
        return self._state.done.wait(timeout_s)

    def show_progress(self, done: int, total: int, text: str = "") -> None:
        """Main thread only: set the bar (and the status line when ``text`` is given)."""
        self.progress_bar.setRange(0, max(int(total), 1))
        self.progress_bar.setValue(min(int(done), max(int(total), 1)))
        if text:
            self.status.setText(text)

    # -- worker signals (main thread) --
    def _show_progress(self, done: int, total: int) -> None:
        self.show_progress(done, total)

    def _on_yielded(self, value) -> None:
        self._call("yielded", value)

    def _on_returned(self, result) -> None:
        seconds = time.monotonic() - self._started_at
        self.status.setText(f"{self._description}: done in {seconds:.1f} s.")
        self._call("returned", result)

    def _on_errored(self, error: BaseException) -> None:
        self.last_error = error
        if isinstance(error, Cancelled):
            self.status.setText(f"{self._description}: cancelled; nothing was changed.")
        elif isinstance(error, ConsistentSegError):
            notify(str(error), "error", self.status)
        else:
            log.error("%s failed", self._description, exc_info=error)
            notify(f"{self._description} failed: {type(error).__name__}: {error}", "error", self.status)

    def _on_finished(self) -> None:
        self._state.worker = None
        self._idle(completed=self.last_error is None and not self.cancel_requested)
        self._call("finished")

    def _call(self, name: str, *args) -> None:
        callback = self._callbacks.get(name)
        if callback is None:
            return
        try:
            callback(*args)
        except ConsistentSegError as error:
            notify(str(error), "error", self.status)
        except Exception as error:  # a bug of ours must not reach napari as a crash
            log.error("%s: %s callback failed", self._description, name, exc_info=error)
            notify(f"{self._description}: {type(error).__name__}: {error}", "error", self.status)

    def _idle(self, completed: bool = False) -> None:
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(int(completed))
        self.cancel_button.setEnabled(False)


#: How much lower than napari's the CPU priority of our torch threads is (Linux nice levels).
NICENESS = 10


def _at_low_priority(task: Callable) -> tuple[Callable, Callable[[], None]]:
    """``task`` to run on a fresh thread of lower CPU priority, torch on every core; and ``finish()``.

    napari's main thread must keep drawing while torch computes. On Linux a thread's nice level is
    its own and the threads it starts inherit it, so the task runs on a new thread that lowers its
    priority first; torch's OpenMP team, started by that thread, is lowered with it. Idle, the task
    gets both cores of a 2-core laptop; when napari draws, the kernel gives napari the core it needs.
    When other processes keep every core busy as the task starts, it stays at normal priority
    (`_niceness`), and the fine-tune's steps run on the cores left idle (`Finetuner.step`).
    Elsewhere (no per-thread nice) torch runs on all cores but one (`_one_core_left`).
    docs/gui-responsiveness.md has the measurements.

    ``finish()``, called once the worker is done (returned, failed, or stopped resuming a cancelled
    generator), runs a cancelled generator's own clean-up and ends the thread and its OpenMP team.
    """
    if not sys.platform.startswith("linux"):
        return _leaving_a_core_to_the_gui(task), lambda: None
    background, started = _LowPriorityThread(), []

    def finish() -> None:
        for steps in started:
            background.call(steps.close)
        background.close()

    if inspect.isgeneratorfunction(task):
        def generator(*args):
            steps = background.call(task, *args)
            started.append(steps)
            reply = None
            while True:
                try:
                    value = background.call(steps.send, reply)
                except StopIteration as stop:
                    return stop.value
                reply = yield value
        return generator, finish
    return functools.partial(background.call, task), finish


class _LowPriorityThread:
    """One thread at `NICENESS` below the caller's priority that runs the calls handed to it, in turn.

    It starts with the first call; ``close()`` ends it, and its OpenMP team with it.
    """

    def __init__(self):
        import torch

        self._pool = ThreadPoolExecutor(1, "consistent-seg", initializer=_lower_this_thread,
                                        initargs=(torch.get_num_threads(),))

    def call(self, function: Callable, *args):
        return self._pool.submit(function, *args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _lower_this_thread(threads: int) -> None:
    import torch

    try:
        niceness = _niceness()
        if niceness:
            os.nice(niceness)  # Linux: this thread only
    except OSError as error:  # a sandbox may refuse: run at the caller's priority
        log.warning("could not lower the priority of the torch thread: %s", error)
    torch.set_num_threads(threads)  # a new thread takes torch's last count, which inference may have lowered


def _niceness() -> int:
    """`NICENESS`, or 0 when other processes keep every core busy as the task starts.

    A thread at nice +10 gets a tenth of a core against each normal-priority process: beside a
    build or a training run on every core the round would crawl (a default round had done 22 of its
    60 steps after 4 minutes), while at normal priority, on its fair share, it took 2 minutes.
    With a core to spare the lower priority costs the round nothing and keeps napari smooth.
    (A thread cannot raise its priority again, so the choice is made once, when the task starts.)
    """
    from ..inference import idle_cores

    idle = idle_cores()
    return 0 if idle is not None and idle <= 0 else NICENESS


@contextlib.contextmanager
def _one_core_left():
    """torch on all cores but one in this thread (OpenMP's count is per thread), restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, previous - 1))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _leaving_a_core_to_the_gui(task: Callable) -> Callable:
    """``task`` running torch on all cores but one, so the Qt main thread keeps a core to draw.

    torch's OpenMP thread count is per calling thread: the main thread and other workers keep theirs.
    """
    if inspect.isgeneratorfunction(task):
        def generator(*args):
            with _one_core_left():
                return (yield from task(*args))
        return generator

    def function(*args):
        with _one_core_left():
            return task(*args)
    return function
