"""The segmentation backbone: MONAI's 2D/3D residual U-Net, with decoder taps for external modules.

The network is MONAI's ``monai.networks.nets.UNet`` (residual units, instance norm, PReLU, strided
convolutions down, transposed convolutions up), rebuilt here from plain torch modules with the same
module tree, so its state dict is MONAI's key for key and its outputs are MONAI's
(tests/test_models.py checks both against MONAI itself). Why not import it: ``import monai`` loads all
of MONAI's subpackages (pandas, matplotlib, scipy.signal...) and took 4.5 s of a 20 s
``consistent-seg predict`` on our 2-core CPU; segmenting needs only these few layers, so inference
runs without importing MONAI at all (training still uses MONAI's losses and metrics).

One difference in how it runs, not in what it computes: any input size works (the input is
padded inside ``forward`` to a multiple of the total stride and the logits are cropped back).

Instance normalisation, so one network serves any batch size and both CT and MRI without a
modality flag.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
    """MONAI's ``UNet`` layout (residual units, instance norm, PReLU) with decoder taps, any input size.

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
        self.net = _MonaiLayout(spatial_dims, in_channels, out_channels, self.channels, num_res_units, dropout)

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


# ---- MONAI's UNet module tree, in plain torch ------------------------------------------------------
# Names and nesting follow monai.networks.nets.UNet (kernel 3, strides 2, adn_ordering "NDA", act
# PReLU, norm instance) so that checkpoints trained with either load into the other.

class SkipConnection(nn.Module):
    """``cat([x, submodule(x)], dim=1)``: MONAI's SkipConnection in "cat" mode."""

    def __init__(self, submodule: nn.Module):
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.submodule(x)], dim=1)


class _PerChannelGroupNorm:
    """Instance norm computed as a group norm with one group per channel: the same function and the
    same (empty) state dict, but torch's CPU group-norm kernel is 5-7x faster than its instance-norm
    one in float32 (which reshapes to a batch norm): the cardiac network 0.86x per forward in
    float32, unchanged in bf16 (docs/inference.md). Mixed into torch's InstanceNorm classes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.track_running_stats or x.dim() != self._get_no_batch_dim() + 1:
            return super().forward(x)
        if _slow_channels_last_norm(x):
            out = F.group_norm(x.contiguous(), x.shape[1], self.weight, self.bias, self.eps)
            return out.contiguous(memory_format=torch.channels_last)
        return F.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)


def _slow_channels_last_norm(x: torch.Tensor) -> bool:
    """Whether torch's channels-last group-norm kernel is the slow one for this 2D input.

    That kernel parallelises over (batch, channel) with strided reads when a map has fewer than
    1,024 pixels, and vectorises over channels otherwise, which a 4-channel map cannot fill. Both
    cases ran 4-21x slower than a round trip through the standard layout (bf16, batch of 5, our
    2-core EPYC: (128, 16 x 16) 2.6 -> 0.19 ms, (4, 256 x 256) 5.7 -> 0.7 ms); the 16- to
    64-channel maps of 32 x 32 and more ran 2-14x faster in place (docs/inference.md)."""
    if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    return x.shape[2] * x.shape[3] < 1024 or x.shape[1] < 16


class _InstanceNorm2d(_PerChannelGroupNorm, nn.InstanceNorm2d):
    pass


class _InstanceNorm3d(_PerChannelGroupNorm, nn.InstanceNorm3d):
    pass


class _PReLU(nn.PReLU):
    """PReLU (MONAI's activation, one slope), computed in place when no gradient is recorded: it
    follows a norm whose output nothing else reads. Inference then skips one allocation per layer:
    the cardiac volume 0.91x in bf16 (15 interleaved pairs, identical labels; docs/inference.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.weight.numel() != 1:
            return super().forward(x)
        return F.leaky_relu_(x, float(self.weight))


def _conv(dims: int, cin: int, cout: int, stride: int, transposed: bool, norm_act: bool, dropout: float):
    """MONAI's ``Convolution``: conv (padding 1; transposed: output padding stride - 1), then
    ``adn`` = instance norm, dropout, PReLU (the "NDA" order) unless ``conv_only``."""
    if transposed:
        kind = (nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 2]
        conv = kind(cin, cout, 3, stride=stride, padding=1, output_padding=stride - 1)
    else:
        conv = (nn.Conv2d, nn.Conv3d)[dims - 2](cin, cout, 3, stride=stride, padding=1)
    block = nn.Sequential()
    block.add_module("conv", conv)
    if norm_act:
        adn = nn.Sequential()
        adn.add_module("N", (_InstanceNorm2d, _InstanceNorm3d)[dims - 2](cout))
        adn.add_module("D", nn.Dropout(dropout))
        adn.add_module("A", _PReLU())
        block.add_module("adn", adn)
    return block


class _ResidualUnit(nn.Module):
    """MONAI's ``ResidualUnit``: ``subunits`` convolutions plus a residual path (a 3x3 strided
    convolution when the stride changes the size, 1x1 when only the channels change)."""

    def __init__(self, dims, cin, cout, stride, subunits, dropout, last_conv_only=False):
        super().__init__()
        self.conv = nn.Sequential()
        channels, step = cin, stride
        for i in range(max(1, subunits)):
            plain = last_conv_only and i == max(1, subunits) - 1
            self.conv.add_module(f"unit{i}", _conv(dims, channels, cout, step, False, not plain, dropout))
            channels, step = cout, 1
        self.residual: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            size, pad = (3, 1) if stride != 1 else (1, 0)
            self.residual = (nn.Conv2d, nn.Conv3d)[dims - 2](cin, cout, size, stride, pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.conv(x) + self.residual(x)
        out = self.conv(x)  # a new tensor (the unit ends in a convolution or its norm-activation)
        return out.add_(self.residual(x))


class _MonaiLayout(nn.Module):
    """``model`` = the nested Sequential(down, SkipConnection(deeper), up) levels of MONAI's UNet."""

    def __init__(self, dims, in_channels, out_channels, channels, num_res_units, dropout):
        super().__init__()
        if num_res_units < 1:
            raise ValueError("the backbone uses residual units: num_res_units must be at least 1")

        def down(cin, cout, stride):
            return _ResidualUnit(dims, cin, cout, stride, num_res_units, dropout)

        def up(cin, cout, is_top):
            return nn.Sequential(_conv(dims, cin, cout, 2, True, True, dropout),
                                 _ResidualUnit(dims, cout, cout, 1, 1, dropout, last_conv_only=is_top))

        def level(cin, cout, chans, is_top):
            c = chans[0]
            if len(chans) > 2:
                deeper, up_in = level(c, c, chans[1:], False), 2 * c
            else:
                deeper, up_in = down(c, chans[1], 1), c + chans[1]
            return nn.Sequential(down(cin, c, 2), SkipConnection(deeper), up(up_in, cout, is_top))

        self.model = level(in_channels, out_channels, tuple(channels), True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
