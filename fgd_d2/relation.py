"""Relation modules of the FGD global loss (FGD_SPEC.md section 5). Pure torch."""
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GcBlock"]


class GcBlock(nn.Module):
    """
    Global-context block: ``R(x) = x + W2(ReLU(LN(W1(ctx))))`` with ``ctx`` the attention-pooled feature.

    ``conv_mask`` (C -> 1) gives a softmax over all positions (no temperature); ``ctx`` (N, C, 1, 1) is the
    weighted sum of the feature vectors. The channel-add branch is 1x1 convs C -> C/2 -> C with LayerNorm and ReLU
    between them. Init: ``conv_mask`` kaiming-normal (fan_in, relu), bias 0; the last conv weight and bias 0, so
    ``R(x) = x`` at init and only the last conv receives gradient in the first step.
    """

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(1, channels // 2)
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        n, c, h, w = x.shape
        position_weight = F.softmax(self.conv_mask(x).view(n, 1, h * w), dim=2)  # (N, 1, HW)
        context = torch.bmm(x.view(n, c, h * w), position_weight.transpose(1, 2)).view(n, c, 1, 1)
        return x + self.channel_add(context)
