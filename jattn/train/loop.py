"""The stage-independent training loop: resume, steps, metrics log, checkpoints, clean stop.

``run_steps`` drives a jitted step function from the state's step to ``total_steps``:

* metrics: every ``log_every`` steps one JSON line ``{"step", "loss", ..., "lr",
  "steps_per_s", "elapsed_s"}`` (means over the window) is appended and flushed to
  ``metrics.jsonl``; lines of steps beyond a resumed checkpoint are dropped first, so the
  log of a resumed run reads like an uninterrupted one;
* checkpoints every ``checkpoint_every`` steps and at the end;
* a time budget (``--max-minutes``, running time: time the process spends stopped by
  SIGSTOP is not counted) or SIGTERM/SIGINT stops the loop after the current step, with a
  checkpoint, and returns ``finished=False``.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jattn.train.checkpointing import StageCheckpoints

__all__ = ["run_steps", "StopFlag", "RunningClock", "trim_metrics"]


class RunningClock:
    """Seconds this process has been running, not counting time it spent stopped
    (SIGSTOP/SIGTSTP, e.g. paused by someone timing a benchmark on a shared machine).

    A daemon thread ticks every ``tick`` seconds; a gap of more than ``gap`` seconds between
    two ticks is taken as a pause and not counted.
    """

    def __init__(self, tick: float = 1.0, gap: float = 10.0):
        self._start = time.monotonic()
        self._paused = 0.0
        self._last = self._start
        self._tick, self._gap = tick, gap
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True, name="jattn-running-clock").start()

    def _run(self):
        while True:
            time.sleep(self._tick)
            self._update()

    def _update(self):
        with self._lock:
            now = time.monotonic()
            if now - self._last > self._gap:
                self._paused += now - self._last - self._tick
            self._last = now

    @property
    def paused(self) -> float:
        """Seconds spent stopped so far."""
        self._update()
        return self._paused

    def elapsed(self) -> float:
        """Running seconds since creation."""
        self._update()
        return time.monotonic() - self._start - self._paused


class StopFlag:
    """Set by SIGTERM/SIGINT (while installed), a time budget (``max_seconds`` of running
    time, see :class:`RunningClock`) or a step count (``at_step``: stop before running
    that step, e.g. to test resuming)."""

    def __init__(self, max_seconds: float | None = None, at_step: int | None = None):
        self.max_seconds = max_seconds
        self.clock = RunningClock() if max_seconds is not None else None
        self.at_step = at_step
        self.signalled = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handler(self, signum, frame):
        print(f"\n[jattn.train] signal {signum}: stopping after this step with a checkpoint",
              file=sys.stderr, flush=True)
        self.signalled = True

    def should_stop(self, step: int) -> bool:
        """Whether to stop before running step ``step``."""
        over = self.clock is not None and self.clock.elapsed() >= self.max_seconds
        return self.signalled or over or (self.at_step is not None and step >= self.at_step)

    @property
    def stop(self) -> bool:
        return self.should_stop(-1)


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop metrics lines with ``step > last_step`` (work redone after a resume)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(x + "\n" for x in keep))


def run_steps(*, name: str, state: dict, step_fn: Callable, batch_fn: Callable[[int], tuple],
              total_steps: int, checkpoints: StageCheckpoints, metrics_path: Path,
              log_every: int, checkpoint_every: int, stop: StopFlag | None = None,
              progress: bool = True) -> tuple[dict, bool]:
    """Run ``state = step_fn(state, *batch_fn(step))`` until ``total_steps``.

    Args:
      name: stage name (progress bar, log).
      state: train state whose ``"step"`` is the next step to run (0 or a restored step).
      step_fn: jitted ``(state, *batch) -> (state, metrics dict of scalars)``.
      batch_fn: ``step -> batch tuple`` (deterministic in the step).
      total_steps: stop after this step count.
      checkpoints: where to save.
      metrics_path: the jsonl log.
      log_every, checkpoint_every: cadences in steps.
      stop: a :class:`StopFlag` (deadline / signals), or None.
      progress: show a tqdm bar (updated at most every 10 s when not on a terminal).
    Returns:
      (state, finished): finished is False when stopped early (a checkpoint was saved).
    """
    start = int(jax.device_get(state["step"]))
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    trim_metrics(metrics_path, start)
    bar = None
    if progress and start < total_steps:
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()
        bar = tqdm(total=total_steps, initial=start, desc=name, dynamic_ncols=tty,
                   mininterval=0.5 if tty else 10.0, file=sys.stderr, smoothing=0.05)
    window: list[dict] = []
    t_window = time.time()
    t0 = time.time()
    finished = True
    step = start
    with open(metrics_path, "a") as log:
        while step < total_steps:
            if stop is not None and stop.should_stop(step):
                finished = False
                break
            state, metrics = step_fn(state, *batch_fn(step))
            step += 1
            window.append(metrics)
            if bar is not None:
                bar.update(1)
            if step % log_every == 0 or step == total_steps:
                host = jax.device_get(window)
                now = time.time()
                line = {"step": step}
                for k in host[0]:
                    line[k] = float(np.mean([m[k] for m in host]))
                line["steps_per_s"] = len(host) / max(now - t_window, 1e-9)
                line["elapsed_s"] = now - t0
                log.write(json.dumps(line) + "\n")
                log.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{line['loss']:.4f}", refresh=False)
                window, t_window = [], now
            if step % checkpoint_every == 0:
                checkpoints.save(step, state)
    if bar is not None:
        bar.close()
    checkpoints.save(step, state)
    if not finished:
        print(f"[jattn.train] {name}: stopped at step {step}/{total_steps}; run again to resume",
              file=sys.stderr, flush=True)
    return state, finished
