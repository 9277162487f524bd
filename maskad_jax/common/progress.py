"""Progress output: bars on a terminal, log lines, and a training run's JSON-lines + TensorBoard record.

- `bar(total, desc)`: a tqdm progress bar with rate and ETA, shown only when stdout is a terminal
  and in process 0 (quiet in CI logs, files and extra processes); `bar.write(line)` prints a line
  without breaking the bar.
- `TrainingRecord`: what a training run reports every `log_every` steps (loss, learning rate,
  speed, ETA) and at each learning-curve point, to the console, <workdir>/<name>_log.jsonl and
  TensorBoard (<workdir>/tensorboard, tags <name>/* and eval/*). A resumed run first drops the
  records of steps after its checkpoint, so each step is recorded once.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
from tqdm.auto import tqdm


def log(msg: str) -> None:
    """A timestamped progress line on stdout."""
    print(f"[maskad {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def interactive() -> bool:
    """Whether to draw bars: stdout is a terminal and this is process 0."""
    return jax.process_index() == 0 and sys.stdout.isatty()


def bar(total: int, desc: str, unit: str = "img", initial: int = 0):
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        disable=not interactive(),
        dynamic_ncols=True,
        leave=False,
        file=sys.stdout,
    )


class TrainingRecord:
    """Console, JSON-lines and TensorBoard output of one training_loop run."""

    def __init__(self, name: str, workdir: str | None, start: int, total: int, batch: int, log):
        self.name, self.total, self.batch, self._log = name, total, batch, log
        writer = workdir is not None and jax.process_index() == 0
        self.path = os.path.join(workdir, f"{name}_log.jsonl") if writer else None
        if self.path:
            _drop_records_after(self.path, start)
        self.tb = _summary_writer(workdir) if writer else None
        self.bar = bar(total, name, unit="step", initial=start)
        self.t0, self.last = time.time(), start

    def tick(self):
        self.bar.update(1)

    def step(self, done: int, loss: float, lr: float):
        rate = (done - self.last) / max(time.time() - self.t0, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        prefix = "" if self.name == "train" else f"{self.name} "
        self._emit(
            f"{prefix}step {done}/{self.total} loss {loss:.5f} lr {lr:.2e} {rate:.2f} steps/s "
            f"{rate * self.batch:.1f} img/s eta {eta:.0f}s"
        )
        self._tb(
            {f"{self.name}/loss": loss, f"{self.name}/lr": lr, f"{self.name}/images_per_second": rate * self.batch},
            done,
        )
        self._jsonl({"step": done, "loss": loss, "lr": lr, "steps_per_s": rate, "time": time.time()})
        self.t0, self.last = time.time(), done

    def evaluation(self, values: dict, line: str, done: int, steps_per_epoch: int):
        self._emit(f"eval at step {done} (epoch {done / steps_per_epoch:g}): {line}")
        self._tb({f"eval/{k}": v for k, v in values.items()}, done)
        self._jsonl({"step": done, "epoch": done / steps_per_epoch, "eval": values, "time": time.time()})
        self.t0 = time.time()  # the evaluation's time is not training speed

    def close(self):
        self.bar.close()
        if self.tb is not None:
            self.tb.close()

    def _emit(self, line: str):
        if self.bar.disable:
            self._log(line)
        else:  # a line above the bar, and into the logger's other sinks as usual
            self.bar.clear()
            self._log(line)
            self.bar.refresh()

    def _tb(self, scalars: dict, step: int):
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def _jsonl(self, record: dict):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _drop_records_after(path: str, step: int):
    """Keep only the records of steps <= step (a resumed run replays the steps after its checkpoint)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by a kill: dropped
            continue
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def _summary_writer(workdir):
    """TensorBoard event files in <workdir>/tensorboard (tensorboardX: no TensorFlow needed)."""
    from tensorboardX import SummaryWriter  # noqa: PLC0415  (optional heavy import, only when writing)

    return SummaryWriter(os.path.join(workdir, "tensorboard"))
