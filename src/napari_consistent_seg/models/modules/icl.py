"""ICL's external modules: SSPA (supervised semantic proxy adaptor) and USCL (unsupervised
semantic consistent learner), both class-query decoders over the backbone's decoder taps."""

from __future__ import annotations

from .attention import DecoderOutput, ExternalModules


class ICLModules(ExternalModules):
    """SSPA starts from learnable global class queries; USCL takes SSPA's labeled proxies."""

    kind = "icl"

    def __init__(self, num_classes: int, tap_channels=(64, 32, 16), heads=(8, 4, 2), spatial_dims: int = 2):
        super().__init__(num_classes, tap_channels, heads, spatial_dims)
        self.sspa = self.new_decoder()
        self.uscl = self.new_decoder()

    def attend(self, features) -> DecoderOutput:
        return self.sspa(features, queries=self.queries())

    def consistent(self, features, proxies) -> DecoderOutput:
        """USCL over (unlabeled) features with per-scale proxies (K, C_s); gradients reach the proxies."""
        return self.uscl(features, queries_per_scale=proxies)
