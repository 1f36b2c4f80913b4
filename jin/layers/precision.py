"""The dtype a layer computes in under autocast."""
from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Autocast's dtype on ``x``'s device where autocast is on, else ``x``'s (for ops autocast does not cast:
    an SDPA mask, FlexAttention, ``grouped_mm``). The meta device has no autocast."""
    device = x.device.type
    if device == "meta":
        return x.dtype
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
