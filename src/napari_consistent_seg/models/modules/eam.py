"""EAM's external attention module: class queries shared by CT and MRI, attending over each
modality's decoder features to give per-modality class representations and attention maps."""

from __future__ import annotations

from torch import nn

from .attention import ClassQueries, ClassQueryDecoder, DecoderOutput


class EAMModule(nn.Module):
    """One class-query decoder and one set of K queries for every modality."""

    kind = "eam"

    def __init__(self, num_classes: int, tap_channels=(64, 32, 16), heads=(8, 4, 2), spatial_dims: int = 2):
        super().__init__()
        self.config = dict(
            kind=self.kind, num_classes=num_classes, tap_channels=list(tap_channels),
            heads=list(heads), spatial_dims=spatial_dims,
        )
        self.queries = ClassQueries(num_classes, tap_channels[0])
        self.decoder = ClassQueryDecoder(tap_channels, heads, spatial_dims)

    def attend(self, features) -> DecoderOutput:
        return self.decoder(features, queries=self.queries())
