"""Mixture-of-experts MLP: top-k routing, batched dispatch, load balancing, optional multiple gates."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MoEMLP(nn.Module):
    """``num_experts`` two-layer GELU MLPs; each token goes to its ``top_k`` experts (Shazeer et al. 2017).

    Dispatch is one sort and two batched matmuls: the ``T·k`` (token, expert)
    assignments are sorted by expert and scattered into a zero-padded
    ``[E, C, D]`` buffer (``C`` = the busiest expert's load, so no token is
    dropped), every expert runs at once with ``torch.baddbmm``, and the results are
    summed back per token with the renormalized top-k gate weights.

    ``num_gates > 1`` gives M3-JEPA's multi-gate variant: the experts are
    shared, and each task routes with its own gate (``forward(x, gate=g)``, or set
    ``active_gate`` when the layer sits inside a block that calls it as ``mlp(x)``).

    After each forward, ``aux_loss`` holds the Switch Transformer load-balancing
    loss ``E · Σ_e f_e · P_e`` (Fedus et al. 2021, eq. 4; 1 when balanced), with
    ``f_e`` the share of assignments that went to expert ``e`` and ``P_e`` its
    mean router probability, and ``load`` holds ``f`` itself ``[E]``.

    References:
        Shazeer et al., Outrageously Large Neural Networks (arXiv:1701.06538).
        Fedus et al., Switch Transformers (arXiv:2101.03961).
        Lei et al., M3-JEPA: Multimodal Alignment via Multi-gate MoE based on the JEPA (arXiv:2409.05929).
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int = 2, num_gates: int = 1):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.num_experts, self.top_k = num_experts, top_k
        self.gates = nn.ModuleList(nn.Linear(dim, num_experts) for _ in range(num_gates))
        bound1, bound2 = 1 / math.sqrt(dim), 1 / math.sqrt(hidden)  # nn.Linear's default init, per expert
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden).uniform_(-bound1, bound1))
        self.b1 = nn.Parameter(torch.zeros(num_experts, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim).uniform_(-bound2, bound2))
        self.b2 = nn.Parameter(torch.zeros(num_experts, 1, dim))
        self.aux_loss: torch.Tensor | None = None
        self.load: torch.Tensor | None = None
        self.active_gate = 0

    def route(self, x: torch.Tensor, gate: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities ``[T, E]``, top-k experts ``[T, k]`` and their renormalized weights ``[T, k]``."""
        if not 0 <= gate < len(self.gates):
            raise ValueError(f"gate={gate} but this layer has {len(self.gates)} gate(s)")
        probs = self.gates[gate](x).float().softmax(-1)
        weight, expert = probs.topk(self.top_k, dim=-1)
        return probs, expert, weight / weight.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor, gate: int | None = None) -> torch.Tensor:
        """``x [..., D]`` → ``[..., D]``, routed by ``gate`` (default ``active_gate``)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        T, E, k = x.shape[0], self.num_experts, self.top_k
        probs, expert, weight = self.route(x, self.active_gate if gate is None else gate)

        # Step 1. sort the T·k assignments by expert; each gets a slot in its expert's buffer row
        flat = expert.flatten()
        order = flat.argsort(stable=True)
        sorted_expert = flat[order]
        counts = torch.bincount(flat, minlength=E)
        slot = torch.arange(T * k, device=x.device) - (counts.cumsum(0) - counts)[sorted_expert]
        token = order // k
        buffer = x.new_zeros(E, int(counts.max()), shape[-1])
        buffer[sorted_expert, slot] = x[token]

        # Step 2. every expert at once
        h = F.gelu(torch.baddbmm(self.b1, buffer, self.w1))  # autocast runs baddbmm in bf16 on CUDA
        y = torch.baddbmm(self.b2, h, self.w2)

        # Step 3. weighted sum back per token
        contrib = y[sorted_expert, slot].float() * weight.flatten()[order, None]
        out = x.new_zeros(x.shape, dtype=torch.float32).index_add_(0, token, contrib)

        self.load = counts.float() / (T * k)
        self.aux_loss = E * (self.load * probs.mean(0)).sum()
        return out.to(x.dtype).reshape(shape)
