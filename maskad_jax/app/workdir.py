"""The workdir: what a run needs to find there, and the lock that keeps two runs out of one workdir.

Two runs writing one workdir would mix checkpoints of two configs and crash inside orbax; train,
eval and predict therefore hold an exclusive lock (fcntl.flock on <workdir>/.maskad.lock, released
when the run ends or its process dies). A second run is refused at once with the holder's pid,
host, mode and start time. With several processes (jax.distributed) process 0 holds it for the job.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time

import jax

from maskad_jax.common.errors import MissingInputError, WorkdirBusyError
from maskad_jax.engine import fit_state

LOCK_NAME = ".maskad.lock"


@contextlib.contextmanager
def locked(workdir: str, mode: str):
    """Hold the workdir's lock for the duration of the block (process 0 only)."""
    if jax.process_index() != 0:
        yield
        return
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise MissingInputError(f"--workdir {workdir} is a file, not a folder: name a folder (new or a run's)")
    created = not os.path.isdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    f = open(os.path.join(workdir, LOCK_NAME), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "a process that did not say who it is"
        f.close()
        raise WorkdirBusyError(
            f"workdir {workdir} is in use by another run ({holder}); wait for it to finish or use another --workdir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, --mode={mode}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    try:
        yield
    finally:
        f.seek(0)
        f.truncate()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
        if created and os.listdir(workdir) == [LOCK_NAME]:  # a run that stopped before writing anything
            os.remove(os.path.join(workdir, LOCK_NAME))
            os.rmdir(workdir)


def require_trained(workdir: str) -> None:
    """eval and predict reuse a trained workdir: refuse at once (writing nothing) when it has no
    checkpoint or no fit."""
    if not os.path.isdir(workdir):
        raise MissingInputError(
            f"workdir {workdir} does not exist: train first (--mode=train or train_and_eval) "
            f"or point --workdir at a trained one"
        )
    ckpt = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt) or not any(name.isdigit() for name in os.listdir(ckpt)):
        raise MissingInputError(f"no checkpoint in {ckpt}: train first (--mode=train or train_and_eval)")
    if not fit_state.exists(os.path.join(workdir, "fit")):
        raise MissingInputError(
            f"no fit in {os.path.join(workdir, 'fit')} (training did not finish): rerun the "
            f"training command on this workdir; it resumes"
        )
