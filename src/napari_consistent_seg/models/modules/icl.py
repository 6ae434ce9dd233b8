"""ICL's external modules: SSPA (supervised semantic proxy adaptor) and USCL (unsupervised
semantic consistent learner), both class-query decoders over the backbone's decoder taps."""

from __future__ import annotations

from torch import nn

from .attention import ClassQueries, ClassQueryDecoder, DecoderOutput


class ICLModules(nn.Module):
    """SSPA starts from learnable global class queries; USCL takes SSPA's labeled proxies.

    ``attend`` (SSPA on any features) is what the attention-map viewer shows.
    """

    kind = "icl"

    def __init__(self, num_classes: int, tap_channels=(64, 32, 16), heads=(8, 4, 2), spatial_dims: int = 2):
        super().__init__()
        self.config = dict(
            kind=self.kind, num_classes=num_classes, tap_channels=list(tap_channels),
            heads=list(heads), spatial_dims=spatial_dims,
        )
        self.queries = ClassQueries(num_classes, tap_channels[0])
        self.sspa = ClassQueryDecoder(tap_channels, heads, spatial_dims)
        self.uscl = ClassQueryDecoder(tap_channels, heads, spatial_dims)

    def attend(self, features) -> DecoderOutput:
        return self.sspa(features, queries=self.queries())

    def consistent(self, features, proxies) -> DecoderOutput:
        """USCL over (unlabeled) features with per-scale proxies (K, C_s); gradients reach the proxies."""
        return self.uscl(features, queries_per_scale=proxies)
