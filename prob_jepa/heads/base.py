"""The head contract: a conditional density ``p(target | cond)`` over ``R^D``."""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
from torch import nn

F = TypeVar("F", bound=Callable)


def fp32(method: F) -> F:
    """Run a head method in float32 with autocast off (densities are not bf16-safe)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        with torch.autocast(device_type=self.device_type(), enabled=False):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class Head(nn.Module):
    """Base class of every predictor head.

    Rows are target tokens flattened over batch, blocks and positions:
    ``cond [N, C]`` from the predictor trunk, ``target [N, D]`` from the target
    encoder. Every head answers the same five verbs, so the trainer and the
    evaluation never ask which head they hold:

    - ``loss(cond, target)``: scalar training objective, mean over rows, in
      nats per dimension for likelihood heads (so its scale does not grow with D);
    - ``log_prob(target, cond)``: ``[N]`` log-density in nats (exact, or a bound
      the head's docstring names);
    - ``sample(cond, num_samples)``: ``[S, N, D]``;
    - ``mean(cond)``: ``[N, D]`` point prediction;
    - ``energy(target, cond)``: ``[N]``, lower = more compatible; ``-log_prob``.

    ``forward(cond, target)`` is ``loss`` so that DDP / FSDP hooks see the call.

    A head may hold some of its parameters at their initial values for the first ``hold_steps`` optimizer steps
    (:meth:`held_parameters`): the training loops give them learning rate 0 until then
    (:func:`prob_jepa.train.param_groups`, :func:`prob_jepa.synthetic.train_head`).
    """

    hold_steps: int = 0

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.dim, self.cond_dim = dim, cond_dim

    def held_parameters(self) -> list[nn.Parameter]:
        """The parameters trained only from optimizer step ``hold_steps`` on (0-based); none by default."""
        return []

    def device_type(self) -> str:
        p = next(self.parameters(), None)
        return p.device.type if p is not None else "cpu"

    def forward(self, cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(cond, target)

    def loss(self, cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -self.log_prob(target, cond).mean() / self.dim

    def log_prob(self, target: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement log_prob")

    def sample(self, cond: torch.Tensor, num_samples: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement sample")

    def mean(self, cond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement mean")

    def energy(self, target: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return -self.log_prob(target, cond)
