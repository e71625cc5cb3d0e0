"""Relation modules of the FGD global loss (FGD_SPEC.md section 5). Pure torch."""
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GcBlock", "NonLocalBlock", "RELATION_MODULES"]


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


class NonLocalBlock(nn.Module):
    """
    Embedded-Gaussian non-local block: ``R(x) = x + W_z(y)`` with ``y_i = sum_j softmax_j(theta_i . phi_j) g_j``.

    ``theta``, ``phi`` and ``g`` are 1x1 convs C -> C/2 and ``W_z`` a 1x1 conv C/2 -> C whose weight and bias start
    at 0, so ``R(x) = x`` at init (like ``GcBlock``). The affinity is (N, HW, HW): memory grows with the square of
    the number of cells.
    """

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(1, channels // 2)
        self.theta = nn.Conv2d(channels, hidden, kernel_size=1)
        self.phi = nn.Conv2d(channels, hidden, kernel_size=1)
        self.g = nn.Conv2d(channels, hidden, kernel_size=1)
        self.out = nn.Conv2d(hidden, channels, kernel_size=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        n, _, h, w = x.shape
        theta = self.theta(x).flatten(2)  # (N, C/2, HW)
        phi = self.phi(x).flatten(2)
        g = self.g(x).flatten(2)
        affinity = F.softmax(torch.bmm(theta.transpose(1, 2), phi), dim=2)  # (N, HW_i, HW_j), rows sum to 1
        y = torch.bmm(g, affinity.transpose(1, 2)).view(n, -1, h, w)  # y[:, :, i] = sum_j affinity[i, j] g[:, :, j]
        return x + self.out(y)


RELATION_MODULES = {"GcBlock": GcBlock, "NonLocal": NonLocalBlock}
