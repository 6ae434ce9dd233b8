"""The segmentation backbone: MONAI's 2D/3D U-Net with decoder taps for external modules.

Instance normalisation, so one network serves any batch size and both CT and MRI without a
modality flag. Any input size works: the input is padded inside ``forward`` to a multiple of the
total stride and the logits are cropped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import UNet as MonaiUNet
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
    """MONAI's ``UNet`` (residual units, instance norm, PReLU) with decoder taps, any input size.

    ``forward(x)`` returns logits (B, out_channels, *spatial); ``forward(x, return_features=True)``
    returns a :class:`BackboneOutput` whose features are the up-path outputs at strides 8, 4, 2.
    The input is padded at the high end to a multiple of the total stride and the logits cropped back.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 4,
        channels: tuple[int, ...] = (16, 32, 64, 128, 256),
        num_res_units: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) < 5:
            raise ValueError("need at least 5 channel levels so that up-path taps at strides 8, 4, 2 exist")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = tuple(channels)
        self.num_res_units = num_res_units
        self.stride_multiple = 2 ** (len(channels) - 1)
        self.net = MonaiUNet(
            spatial_dims, in_channels, out_channels, self.channels, strides=(2,) * (len(channels) - 1),
            num_res_units=num_res_units, norm="instance", dropout=dropout,
        )

    @property
    def tap_channels(self) -> tuple[int, int, int]:
        """Channels of the decoder taps at strides 8, 4, 2 (deepest first)."""
        return (self.channels[2], self.channels[1], self.channels[0])

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
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
        return x, padded

    @staticmethod
    def _run_level(level: nn.Sequential, x: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        """MONAI nests each level as Sequential(down, SkipConnection(deeper), up); walk it and keep
        every up output (taps[d] is at stride 2**d)."""
        down, skip, up = level
        h = down(x)
        deeper = skip.submodule
        inner = UNet._run_level(deeper, h, taps) if _is_level(deeper) else deeper(h)
        out = up(torch.cat([h, inner], dim=1))  # SkipConnection(mode="cat") order: input first
        taps.insert(0, out)
        return out

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a (B, C, {'H, W' if self.spatial_dims == 2 else 'D, H, W'}) tensor, "
                f"got shape {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        x, padded = self._pad(x)
        crop = (slice(None), slice(None)) + tuple(slice(0, n) for n in spatial)
        if not return_features:
            return self.net(x)[crop]
        taps: list[torch.Tensor] = []
        logits = self._run_level(self.net.model, x, taps)
        return BackboneOutput(logits[crop], [taps[s.bit_length() - 1] for s in TAP_STRIDES], padded)


def _is_level(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and len(module) == 3 and isinstance(module[1], SkipConnection)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
