"""Training schedules as pure functions of the optimizer step (so resuming needs no state)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import OmegaConf

from .config import ConfigError, is_finite_number


def warmup_cosine(step: int, warmup: int, total: int, start: float, peak: float, final: float) -> float:
    """Linear warm-up ``start → peak`` over ``warmup`` steps, then cosine ``peak → final`` (I-JEPA)."""
    if step < warmup:
        return start + (peak - start) * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine from ``start`` to ``end`` over ``total`` steps (I-JEPA's weight-decay schedule)."""
    progress = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear(step: int, total: int, start: float, end: float) -> float:
    """Linear from ``start`` to ``end`` over ``total`` steps (EMA momentum 0.996 → 1.0)."""
    return start + (end - start) * min(1.0, step / max(1, total))


@dataclass(frozen=True)
class Schedules:
    """Learning rate, weight decay and EMA momentum at every step of a run of ``total`` steps."""

    total: int
    warmup: int
    start_lr: float
    lr: float
    final_lr: float
    weight_decay: float
    final_weight_decay: float
    ema_start: float
    ema_end: float

    @classmethod
    def from_config(cls, optim, total: int, steps_per_epoch: int) -> "Schedules":
        """The schedules of ``cfg.optim``.

        Raises:
            ConfigError: a learning rate, weight decay or warm-up that is not a finite number ≥ 0 (``optim.lr``
                > 0), or ``optim.ema`` that is not two momenta in [0, 1]; the message names the key.
        """
        check_optim(optim)
        return cls(
            total=total,
            warmup=int(round(optim.warmup_epochs * steps_per_epoch)),
            start_lr=optim.start_lr,
            lr=optim.lr,
            final_lr=optim.final_lr,
            weight_decay=optim.weight_decay,
            final_weight_decay=optim.final_weight_decay,
            ema_start=optim.ema[0],
            ema_end=optim.ema[1],
        )

    def __call__(self, step: int) -> tuple[float, float, float]:
        """(lr, weight decay, EMA momentum) at ``step``."""
        return (
            warmup_cosine(step, self.warmup, self.total, self.start_lr, self.lr, self.final_lr),
            cosine(step, self.total, self.weight_decay, self.final_weight_decay),
            linear(step, self.total, self.ema_start, self.ema_end),
        )


def check_optim(optim) -> None:
    """Raise :class:`ConfigError` for ``optim.*`` schedule values no run can train with (see
    :meth:`Schedules.from_config`)."""
    for key in ("lr", "start_lr", "final_lr", "weight_decay", "final_weight_decay", "warmup_epochs"):
        value = optim[key]
        if not (is_finite_number(value) and value >= 0) or (key == "lr" and value == 0):
            raise ConfigError(f"optim.{key}={value!r} must be a finite number {'> 0' if key == 'lr' else '>= 0'}")
    ema = optim.ema
    if not (OmegaConf.is_list(ema) or isinstance(ema, (list, tuple))) or len(ema) != 2 or not all(
        is_finite_number(m) and 0 <= m <= 1 for m in ema
    ):
        raise ConfigError(f"optim.ema={ema!r} must be [first, last]: two target-encoder EMA momenta in [0, 1]")
