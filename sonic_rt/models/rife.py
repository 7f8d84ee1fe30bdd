"""RIFE frame interpolation network (``IFNet``, HDv3 layout) as Sonic ships it in ``RIFE/flownet.pkl``.

Three IFBlocks refine a bidirectional flow and a blend mask coarse to fine (scales 4, 2, 1); the middle
frame is the sigmoid-mask blend of the two backward-warped inputs. ``block_tea`` (the distillation
teacher) is kept only so the official state dict loads strictly; it never runs.

The official file has no config: the width ``c`` (official 90) is read from the checkpoint shapes by
:func:`ifnet_width_from_state_dict`, so the same code loads the small demo file.

Source: Practical-RIFE ``IFNet_HDv3`` as vendored by official Sonic (``src/utils/RIFE``),
docs/official_algorithm.md section 2.11.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=True), nn.PReLU(cout))


class IFBlock(nn.Module):
    """One coarse-to-fine refinement block: image pair + mask + flow -> flow delta [B,4,H,W], mask delta [B,1,H,W]."""

    def __init__(self, in_planes: int, c: int):
        super().__init__()
        self.conv0 = nn.Sequential(_conv(in_planes, c // 2, 2), _conv(c // 2, c, 2))
        self.convblock0 = nn.Sequential(_conv(c, c), _conv(c, c))
        self.convblock1 = nn.Sequential(_conv(c, c), _conv(c, c))
        self.convblock2 = nn.Sequential(_conv(c, c), _conv(c, c))
        self.convblock3 = nn.Sequential(_conv(c, c), _conv(c, c))
        self.conv1 = nn.Sequential(
            nn.ConvTranspose2d(c, c // 2, 4, 2, 1), nn.PReLU(c // 2), nn.ConvTranspose2d(c // 2, 4, 4, 2, 1)
        )
        self.conv2 = nn.Sequential(
            nn.ConvTranspose2d(c, c // 2, 4, 2, 1), nn.PReLU(c // 2), nn.ConvTranspose2d(c // 2, 1, 4, 2, 1)
        )

    def forward(self, x: torch.Tensor, flow: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear", align_corners=False)
        flow = F.interpolate(flow, scale_factor=1.0 / scale, mode="bilinear", align_corners=False) / scale
        feat = self.conv0(torch.cat((x, flow), 1))
        feat = self.convblock0(feat) + feat
        feat = self.convblock1(feat) + feat
        feat = self.convblock2(feat) + feat
        feat = self.convblock3(feat) + feat
        flow = F.interpolate(self.conv1(feat), scale_factor=scale, mode="bilinear", align_corners=False) * scale
        mask = F.interpolate(self.conv2(feat), scale_factor=scale, mode="bilinear", align_corners=False)
        return flow, mask


def backward_warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Warp ``image`` [B,C,H,W] by ``flow`` [B,2,H,W] (pixels): bilinear, border padding, align_corners=True."""
    b, _, h, w = flow.shape
    xs = torch.linspace(-1.0, 1.0, w, device=flow.device, dtype=flow.dtype).view(1, 1, 1, w).expand(b, -1, h, -1)
    ys = torch.linspace(-1.0, 1.0, h, device=flow.device, dtype=flow.dtype).view(1, 1, h, 1).expand(b, -1, -1, w)
    grid = torch.cat([xs, ys], 1)
    flow = torch.cat([flow[:, 0:1] / ((image.shape[3] - 1.0) / 2.0), flow[:, 1:2] / ((image.shape[2] - 1.0) / 2.0)], 1)
    return F.grid_sample(
        image, (grid + flow).permute(0, 2, 3, 1), mode="bilinear", padding_mode="border", align_corners=True
    )


class IFNet(nn.Module):
    """RIFE HDv3 flow network. ``c`` is the block width (official 90)."""

    def __init__(self, c: int = 90):
        super().__init__()
        self.block0 = IFBlock(7 + 4, c)
        self.block1 = IFBlock(7 + 4, c)
        self.block2 = IFBlock(7 + 4, c)
        self.block_tea = IFBlock(10 + 4, c)  # teacher block: in the checkpoint, unused at inference

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Middle frame between ``img0`` and ``img1`` ([B,3,H,W] float32 in [0,1], H and W multiples of
        ``64 / scale``); returns [B,3,H,W], not clamped (the caller clamps to [0,1] as official Sonic does)."""
        scales = (4.0 / scale, 2.0 / scale, 1.0 / scale)
        flow = img0.new_zeros(img0.shape[0], 4, img0.shape[2], img0.shape[3])
        mask = img0.new_zeros(img0.shape[0], 1, img0.shape[2], img0.shape[3])
        warped0, warped1 = img0, img1
        for block, s in zip((self.block0, self.block1, self.block2), scales):
            f0, m0 = block(torch.cat((warped0, warped1, mask), 1), flow, s)
            f1, m1 = block(torch.cat((warped1, warped0, -mask), 1), torch.cat((flow[:, 2:4], flow[:, :2]), 1), s)
            flow = flow + (f0 + torch.cat((f1[:, 2:4], f1[:, :2]), 1)) / 2
            mask = mask + (m0 - m1) / 2
            warped0 = backward_warp(img0, flow[:, :2])
            warped1 = backward_warp(img1, flow[:, 2:4])
        weight = torch.sigmoid(mask)
        return warped0 * weight + warped1 * (1 - weight)


def ifnet_width_from_state_dict(state_dict: dict[str, torch.Tensor]) -> int:
    """Block width ``c`` of an IFNet state dict (keys without the ``module.`` prefix): twice the output
    channels of ``block0.conv0.0.0``. Raises KeyError if that key is absent."""
    return int(state_dict["block0.conv0.0.0.weight"].shape[0]) * 2
