"""The segmentation backbone: a small 2D/3D U-Net with decoder taps for external modules.

Built from MONAI's dynamic U-Net blocks with instance normalisation, so one network serves
any batch size and both CT and MRI without a modality flag. Any input size works: the input
is padded inside ``forward`` to a multiple of the total stride and the logits are cropped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from torch import nn

#: Decoder taps handed to external modules, deepest first: strides 8, 4 and 2.
TAP_STRIDES = (8, 4, 2)


@dataclass
class BackboneOutput:
    """Logits on the input grid, and decoder features on the padded grid.

    logits: (B, K, *spatial) on the input grid.
    features: decoder outputs at strides 8, 4, 2 (deepest first), each (B, C_s, *padded / s).
    padded_size: the spatial size the network actually ran on (input padded at the high end).
    """

    logits: torch.Tensor
    features: list[torch.Tensor]
    padded_size: tuple[int, ...]

    def to_input_grid(self, maps: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """Resize maps (B, K, *s) from any tap to the input grid: up to the padded size, then crop."""
        spatial = self.logits.shape[2:]
        if mode == "bilinear" and len(spatial) == 3:
            mode = "trilinear"
        # align_corners is accepted by the linear modes only ("nearest" would raise)
        align = False if mode in ("linear", "bilinear", "bicubic", "trilinear") else None
        up = F.interpolate(maps, size=self.padded_size, mode=mode, align_corners=align)
        return up[(slice(None), slice(None)) + tuple(slice(0, n) for n in spatial)]


class UNet(nn.Module):
    """U-Net, 2D or 3D, instance norm, leaky ReLU; ``len(channels)`` stride-2 downsamplings.

    ``forward(x)`` returns logits (B, out_channels, *spatial); ``forward(x, return_features=True)``
    returns a :class:`BackboneOutput` whose features are the decoder outputs at strides 8, 4, 2.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 4,
        channels: tuple[int, ...] = (16, 32, 64, 128, 256),
        dropout: float = 0.0,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) < 4:
            raise ValueError("need at least 4 channel levels so that strides 8, 4, 2 exist")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = tuple(channels)
        # level i runs at stride 2**(i+1): the stem already halves the grid, as in MONAI's UNet,
        # because full-resolution convolutions cost most of the time on a CPU.
        self.stride_multiple = 2 ** len(channels)
        norm = "instance"
        drop = dropout if dropout > 0 else None

        def block(cin: int, cout: int, stride: int) -> nn.Module:
            return UnetBasicBlock(spatial_dims, cin, cout, kernel_size=3, stride=stride, norm_name=norm)

        self.encoder = nn.ModuleList(
            [block(in_channels, channels[0], 2)]
            + [block(channels[i - 1], channels[i], 2) for i in range(1, len(channels))]
        )
        # decoder[i] goes from level i+1 up to level i
        self.decoder = nn.ModuleList(
            [
                UnetUpBlock(
                    spatial_dims, channels[i + 1], channels[i], kernel_size=3, stride=1,
                    upsample_kernel_size=2, norm_name=norm, dropout=drop,
                )
                for i in range(len(channels) - 1)
            ]
        )
        # back to full resolution with the raw input as the only skip: keeps edges, costs little
        full = max(channels[0] // 2, 8)
        self.final_up = UnetUpBlock(
            spatial_dims, channels[0], full, kernel_size=3, stride=1, upsample_kernel_size=2,
            norm_name=norm,
        )
        self.final_up.conv_block = UnetBasicBlock(
            spatial_dims, full + in_channels, full, kernel_size=3, stride=1, norm_name=norm
        )
        self.head = UnetOutBlock(spatial_dims, full, out_channels)

    @property
    def tap_channels(self) -> tuple[int, int, int]:
        """Channels of the decoder taps at strides 8, 4, 2 (deepest first)."""
        return (self.channels[2], self.channels[1], self.channels[0])

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a (B, C, {'H, W' if self.spatial_dims == 2 else 'D, H, W'}) tensor, "
                f"got shape {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        m = self.stride_multiple
        padded = [-(-n // m) * m for n in spatial]
        if all(p == m for p in padded):
            # the deepest level would be one voxel, where instance norm fails: give it two
            padded[-1] = 2 * m
        padded = tuple(padded)
        if padded != spatial:
            pad: list[int] = []
            for n, p in zip(reversed(spatial), reversed(padded)):
                pad += [0, p - n]
            x = F.pad(x, pad)
        skips = []
        h = x
        for enc in self.encoder:
            h = enc(h)
            skips.append(h)
        taps: dict[int, torch.Tensor] = {}
        h = skips[-1]
        for level in range(len(self.decoder) - 1, -1, -1):
            h = self.decoder[level](h, skips[level])
            taps[2 ** (level + 1)] = h
        logits = self.head(self.final_up(h, x))
        logits = logits[(slice(None), slice(None)) + tuple(slice(0, n) for n in spatial)]
        if not return_features:
            return logits
        return BackboneOutput(logits, [taps[s] for s in TAP_STRIDES], padded)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
