"""Weight initialization shared by every jin model (timm ViT convention)."""
from timm.layers import trunc_normal_
from torch import nn


def init_weights(m: nn.Module) -> None:
    """Truncated-normal(0.02) linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
