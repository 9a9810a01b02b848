"""MSN's three schedules: warmup-cosine lr, cosine weight-decay ramp, linear EMA-momentum ramp.

All run over `horizon = total_steps * schedule_horizon_factor` steps. Official MSN uses a factor
of 1.25 (its schedules are built for 1.25x the training length, so the final lr is ~1e-4, not
1e-6); we keep that as a config value rather than a hidden quirk.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import optax


@dataclasses.dataclass(frozen=True)
class Schedules:
  learning_rate: Callable
  weight_decay: Callable
  ema_momentum: Callable


def horizon_steps(config) -> int:
  return max(1, int(round(config.total_steps * config.optim.schedule_horizon_factor)))


def make_schedules(config) -> Schedules:
  opt = config.optim
  horizon = horizon_steps(config)
  warmup = min(opt.warmup_steps, horizon - 1)
  learning_rate = optax.warmup_cosine_decay_schedule(
      init_value=opt.start_lr, peak_value=opt.lr, warmup_steps=warmup,
      decay_steps=horizon, end_value=opt.final_lr)
  # A cosine that goes *up*: optax's cosine decay reaches alpha * init_value at the end.
  weight_decay = optax.cosine_decay_schedule(
      init_value=opt.weight_decay, decay_steps=horizon,
      alpha=opt.final_weight_decay / opt.weight_decay if opt.weight_decay else 1.0)
  ema_momentum = optax.linear_schedule(
      init_value=opt.ema_momentum, end_value=opt.final_ema_momentum, transition_steps=horizon)
  return Schedules(learning_rate, weight_decay, ema_momentum)
