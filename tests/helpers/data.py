"""Stand-ins for the data tests."""

import torch
import torch.nn.functional as F


class CountingEncoder:
    """A stand-in first stage: mean = 2x2 average pool of the image, logvar = -30 (so a draw is the mean)."""

    def __init__(self):
        self.calls, self.images = 0, 0

    def __call__(self, images, captions, generator=None):
        self.calls += 1
        self.images += len(images)
        mean = F.avg_pool2d(images, 2)
        return {"mean": mean, "logvar": torch.full_like(mean, -30.0)}
