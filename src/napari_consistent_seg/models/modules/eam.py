"""EAM's external attention module: class queries shared by CT and MRI, attending over each
modality's decoder features to give per-modality class representations and attention maps."""

from __future__ import annotations

from .attention import DecoderOutput, ExternalModules


class EAMModule(ExternalModules):
    """One class-query decoder and one set of K queries for every modality."""

    kind = "eam"

    def __init__(self, num_classes: int, tap_channels=(64, 32, 16), heads=(8, 4, 2), spatial_dims: int = 2):
        super().__init__(num_classes, tap_channels, heads, spatial_dims)
        self.decoder = self.new_decoder()

    def attend(self, features) -> DecoderOutput:
        return self.decoder(features, queries=self.queries())
