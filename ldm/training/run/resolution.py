"""The training resolution, read from the data actually trained on (image sources, or a latent cache)."""

from __future__ import annotations

from torch.utils.data import Subset


def training_resolution(datamodule, autoencoder=None) -> int | None:
    """Side in pixels of the training images: the source's ``resolution``, else (a latent cache) the latent side
    times the VAE's downsampling factor; None when neither is known."""
    datamodule.setup("fit")
    for dataset in (getattr(datamodule, "source_dataset", None), getattr(datamodule, "train_dataset", None)):
        while isinstance(dataset, Subset):
            dataset = dataset.dataset
        if dataset is None:
            continue
        resolution = getattr(dataset, "resolution", None)
        if resolution:
            return int(resolution)
        latent_shape = getattr(dataset, "latent_shape", None)
        factor = autoencoder.downsample_factor if autoencoder is not None else None
        if latent_shape and factor:
            return int(latent_shape[-1]) * int(factor)
    return None


def training_buckets(datamodule) -> dict | None:
    """With aspect-ratio buckets, what checkpoints record of them: the max area (resolution^2), kohya's table and
    the buckets in use ((width, height) each) with their numbers of training images; None without buckets."""
    from ldm.data.bucket_sampler import bucket_assignment

    datamodule.setup("fit")
    for dataset in (getattr(datamodule, "source_dataset", None), getattr(datamodule, "train_dataset", None)):
        assignment = bucket_assignment(dataset) if dataset is not None else None
        if assignment is not None:
            side = training_resolution(datamodule)
            return {"max_area": None if side is None else side * side,
                    "table": [list(b) for b in assignment.table],
                    "buckets": [list(b) for b in assignment.buckets], "images": assignment.counts()}
    return None
