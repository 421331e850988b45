"""A local stand-in for the metrics' feature extractors (nothing is downloaded)."""

import torch
from torch import nn


class SmallExtractor(nn.Module):
    """Images in [0, 1] -> 16 fixed random projections of their 4x4 average-pooled pixels (deterministic)."""

    num_features = 16

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 4 * 4, self.num_features, generator=g))

    def forward(self, images):
        pooled = nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)
        return pooled @ self.proj / 7.0  # ~unit scale, like pool features (KID's cubic kernel)
