"""The host's side of a training run: where ``Trainer.fit`` is and what it waits for."""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from mil_jax import timing
from mil_jax.metric_writers import MetricWriter


@dataclasses.dataclass
class Progress:
  """What the named steps of ``Trainer.fit`` share, on the host.

  Attributes:
    step: the step the devices will have reached once the dispatched calls end.
    saved_step, saved_time: step and ``time.monotonic()`` of the last save.
    writer, mngr, meta: where metrics and checkpoints go, and the checkpoints' meta.
    stop: the signal the run stops for (SIGINT, SIGTERM), once one came.
    in_flight: the dispatched calls the host may run ahead of (``trainer.InFlight``).
    pending: ``(step, metrics)`` of each dispatched call whose metrics are not
      on the host yet, oldest first.
    logged: step and ``time.perf_counter()`` of the last log.
    best: the lowest validation loss this process has seen.
    kept: ``(step, state, metrics)`` of a best state not written yet: a copy,
      which the next save writes first (None when there is none).
    clock: the time of each phase of the current epoch.
    startup_s: process start to the first dispatched call (None before it).
    epochs: epochs this process finished.
  """
  step: int
  saved_step: int
  writer: MetricWriter
  mngr: ocp.CheckpointManager
  meta: dict[str, Any]
  stop: list[int]
  stop_requests: Any = None  # distributed.StopRequests: polled after every dispatched call
  in_flight: Any = None
  pending: list[tuple[int, dict[str, jax.Array]]] = dataclasses.field(default_factory=list)
  logged: tuple[int, float] = (0, 0.0)
  saved_time: float = dataclasses.field(default_factory=time.monotonic)
  best: float = math.inf
  kept: tuple[int, Any, dict[str, float]] | None = None
  clock: timing.PhaseClock = dataclasses.field(default_factory=timing.PhaseClock)
  startup_s: float | None = None
  epochs: int = 0
