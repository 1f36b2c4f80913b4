"""Mixture-of-experts MLP: top-k routing, padding-free grouped dispatch, load balancing, optional multiple gates."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from .precision import compute_dtype


def _grouped_mm_runs(x: torch.Tensor, hidden: int) -> bool:
    """Whether ``F.grouped_mm`` can run the experts on ``x [T·k, D]`` with no host sync.

    It needs rows of ``D`` and ``hidden`` elements to be multiples of 16 bytes, and
    then runs on CPU in fp32, bf16 or fp16 (under ``torch.compile`` only bf16: its
    compile-time kernel rejects the others there) and on CUDA in bf16 with compute
    capability ≥ 8.0, as its docs say; elsewhere torch's own fallback copies the
    offsets to the host on every call (torch's source takes its sync-free kernel
    only on 9.x and 10.x; on 8.x the result is the same, with that copy).
    """
    dtype = compute_dtype(x)
    if (x.shape[-1] * dtype.itemsize) % 16 or (hidden * dtype.itemsize) % 16:
        return False
    if x.device.type == "cpu":
        eager_only = (torch.float32, torch.float16)
        return dtype == torch.bfloat16 or (dtype in eager_only and not torch.compiler.is_compiling())
    return (x.device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_properties(x.device).major >= 8)


@dataclass(frozen=True)
class Experts:
    """A mixture of ``num`` expert MLPs; each token goes to ``top_k`` of them, routed by one of ``gates`` routers."""

    num: int
    top_k: int = 2
    gates: int = 1


class Routing(NamedTuple):
    """What one mixture-of-experts layer's router did in a forward: ``balance`` is the Switch Transformer
    load-balancing loss ``E · Σ_e f_e · P_e`` (Fedus et al. 2021, eq. 4; 1 when balanced, scalar), with ``f_e`` the
    share of assignments that went to expert ``e`` and ``P_e`` its mean router probability; ``load`` is ``f``
    itself ``[E]``."""

    balance: torch.Tensor
    load: torch.Tensor


class MoEMLP(nn.Module):
    """``num_experts`` two-layer GELU MLPs; each token goes to its ``top_k`` experts (Shazeer et al. 2017).

    Dispatch is padding-free: one stable sort orders the ``T·k`` (token, expert)
    assignments by expert, so expert ``e`` owns the contiguous rows
    ``offs[e-1]:offs[e]`` of the gathered inputs ``[T·k, D]`` (``offs`` = int32
    cumulative loads, an expert may own none), and each layer is one
    ``F.grouped_mm`` over the experts' true loads plus the row's own expert bias.
    The results are summed back per token, in fp32, with the renormalized top-k
    gate weights. No token is dropped, nothing waits on the host, and every shape
    depends only on ``T``, ``k`` and ``D`` (under ``torch.compile``, in bf16, the
    layer is one graph).

    Where ``grouped_mm`` cannot run without a host sync (see :func:`_grouped_mm_runs`:
    CUDA outside bf16, i.e. fp32 without autocast or fp16; compute capability
    < 8.0; rows not a multiple of 16 bytes; fp64; CPU fp32/fp16 under
    ``torch.compile``), the sorted rows are scattered into a zero-padded
    ``[E, C, D]`` buffer (``C`` = the busiest expert's load, read on the host) and
    every expert runs at once with ``torch.baddbmm``. A padding-free path without
    ``grouped_mm`` would need the loads on the host too, or ``E/k`` times the FLOPs.

    Under autocast the experts run in autocast's dtype (bf16 on CUDA) and the
    per-token sum is in fp32, on either path.

    ``num_gates > 1`` gives M3-JEPA's multi-gate variant: the experts are
    shared, and each task routes with its own gate (``forward(x, gate=g)``).

    ``forward`` returns the output and the layer's :class:`Routing` (its
    load-balancing loss and expert loads); the layer keeps no state between calls.

    References:
        Shazeer et al., Outrageously Large Neural Networks (arXiv:1701.06538).
        Fedus et al., Switch Transformers (arXiv:2101.03961).
        Gale et al., MegaBlocks: Efficient Sparse Training with Mixture-of-Experts (arXiv:2211.15841).
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

    def route(self, x: torch.Tensor, gate: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities ``[T, E]``, top-k experts ``[T, k]`` and their renormalized weights ``[T, k]``."""
        if not 0 <= gate < len(self.gates):
            raise ValueError(f"gate={gate} but this layer has {len(self.gates)} gate(s)")
        probs = self.gates[gate](x).float().softmax(-1)
        weight, expert = probs.topk(self.top_k, dim=-1)
        return probs, expert, weight / weight.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor, gate: int = 0) -> tuple[torch.Tensor, Routing]:
        """``x [..., D]`` → (``[..., D]``, :class:`Routing`), routed by router ``gate``.

        Raises:
            ValueError: ``gate`` is not one of the layer's routers.
        """
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        T, E, k = x.shape[0], self.num_experts, self.top_k
        probs, expert, weight = self.route(x, gate)

        # Step 1. sort the T·k assignments by expert; expert e owns rows offs[e-1]:offs[e]
        flat = expert.flatten()
        order = flat.argsort(stable=True)
        sorted_expert = flat[order]
        offs = torch.searchsorted(sorted_expert, torch.arange(1, E + 1, device=x.device)).to(torch.int32)
        token = order // k

        # Step 2. every expert on its own rows
        experts = self._grouped_experts if _grouped_mm_runs(x, self.w1.shape[-1]) else self._padded_experts
        y = experts(x.to(compute_dtype(x)).index_select(0, token), sorted_expert, offs)

        # Step 3. weighted sum back per token, in fp32
        contrib = y.float() * weight.flatten()[order, None]
        out = x.new_zeros(x.shape, dtype=torch.float32).index_add_(0, token, contrib)

        load = offs.diff(prepend=offs.new_zeros(1)).float() / (T * k)
        return out.to(x.dtype).reshape(shape), Routing(E * (load * probs.mean(0)).sum(), load)

    def _grouped_experts(self, xs: torch.Tensor, sorted_expert: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Rows ``xs [T·k, D]`` sorted by expert → each through its own expert ``[T·k, D]``, by ``grouped_mm``."""
        w1, b1, w2, b2 = (p.to(xs.dtype) for p in (self.w1, self.b1, self.w2, self.b2))
        # each row's expert bias, gathered as one_hot @ b: its backward is a matmul, not a scatter-add
        one_hot = (sorted_expert[:, None] == torch.arange(self.num_experts, device=xs.device)).to(xs.dtype)
        h = F.gelu(F.grouped_mm(xs, w1, offs=offs).addmm_(one_hot, b1[:, 0]))
        return F.grouped_mm(h, w2, offs=offs).addmm_(one_hot, b2[:, 0])

    def _padded_experts(self, xs: torch.Tensor, sorted_expert: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Same contract as :meth:`_grouped_experts`, through a zero-padded ``[E, C, D]`` buffer (one host sync)."""
        counts = offs.diff(prepend=offs.new_zeros(1))
        slot = torch.arange(len(xs), device=xs.device) - (offs - counts)[sorted_expert]
        buffer = xs.new_zeros(self.num_experts, int(counts.max()), xs.shape[-1])
        buffer[sorted_expert, slot] = xs
        h = F.gelu(torch.baddbmm(self.b1, buffer, self.w1))  # autocast runs baddbmm in bf16 on CUDA
        return torch.baddbmm(self.b2, h, self.w2)[sorted_expert, slot]


class PlainBlock(Block):
    """timm's ViT block (same parameters and state dict) with the block protocol of :class:`~jin.layers.Stage`:
    ``forward(x, attn_mask=None, gate=0)`` → ``(x, None)`` — no router, so no routing to report."""

    def forward(self, x: torch.Tensor, attn_mask=None, gate: int = 0) -> tuple[torch.Tensor, None]:
        return super().forward(x, attn_mask=attn_mask), None


class RoutedBlock(Block):
    """timm's ViT block whose MLP is a :class:`MoEMLP` of ``experts``; ``forward(x, attn_mask=None, gate=0)`` →
    ``(x, Routing)``, the MLP routed by router ``gate``. Other arguments as timm's ``Block``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, experts: Experts, **block_args):
        super().__init__(dim, num_heads, mlp_ratio, **block_args)
        self.mlp = MoEMLP(dim, int(dim * mlp_ratio), experts.num, experts.top_k, experts.gates)

    def forward(self, x: torch.Tensor, attn_mask=None, gate: int = 0) -> tuple[torch.Tensor, Routing]:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        y, routing = self.mlp(self.norm2(x), gate)
        return x + self.drop_path2(self.ls2(y)), routing
