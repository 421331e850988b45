"""The shapes task for ControlNet: the control image is the target shape's silhouette (white on black) at its
random place; a ControlNet trained on these pairs should draw the prompt's shape where the silhouette is.

Measured by the intersection over union of the generated shape's pixels (``ShapesChecker.foreground``) with the
control mask, beside the prompt accuracy (colour and shape read back by the checker); without a ControlNet the IoU is
that of a shape drawn anywhere."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import torch

from ldm.tasks.shapes.checker import ShapesChecker, image_to_array
from ldm.tasks.shapes.dataset import ShapesDataset, shape_mask


class SilhouetteShapesDataset(ShapesDataset):
    """``ShapesDataset`` items plus ``conditioning_image`` (3, R, R) in {0, 1}: the shape's silhouette (the pixels
    ``render_shape`` colours), the control image of data=controlnet pairs. ``python train.py adapter=controlnet
    data=shapes_silhouette ...``."""

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        mask = torch.from_numpy(shape_mask(self.spec(item["index"]), self.resolution)).float()
        item["conditioning_image"] = mask.expand(3, -1, -1).clone()
        return item

    def cache_key(self) -> str:
        """The shapes' key, told apart from plain shapes (the cache keeps the silhouettes beside the latents)."""
        return json.dumps({**json.loads(super().cache_key()), "silhouette": True}, sort_keys=True)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b| of two bool masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def silhouette_iou(images: torch.Tensor | Sequence, masks: torch.Tensor, checker: ShapesChecker | None = None
                   ) -> list[float]:
    """Per image: the IoU of its shape's pixels (the checker's foreground; none found: empty) with the control mask.
    images: (B, 3, H, W) in [-1, 1] (or what ``image_to_array`` reads); masks: (B, C, H, W) in [0, 1]."""
    checker = checker or ShapesChecker()
    images = list(images)
    if len(images) != len(masks):
        raise ValueError(f"silhouette_iou: {len(images)} images but {len(masks)} masks")
    out = []
    for image, mask in zip(images, masks):
        target = (torch.as_tensor(mask).float().mean(0) > 0.5).cpu().numpy()
        found = checker.foreground(image_to_array(image))
        if found.shape != target.shape:
            raise ValueError(f"silhouette_iou: image {found.shape} and mask {target.shape} differ in size")
        out.append(mask_iou(found, target))
    return out


def evaluate_silhouettes(bundle, controlnet, dataset: SilhouetteShapesDataset, n: int = 16, *, steps: int = 20,
                         guidance_scale: float = 3.0, seed: int = 0, batch_size: int = 8) -> dict:
    """The task's numbers on the first ``n`` items of ``dataset``: mean silhouette IoU and prompt accuracy (colour,
    shape) of samples for their captions, with the ControlNet given their silhouettes and without it (then the IoU
    is that of a shape drawn anywhere). Same seeds, DDIM, both ways."""
    from ldm.pipelines import text_to_image
    from ldm.pipelines.controlnet import Control
    from ldm.tasks.shapes.checker import prompt_accuracy

    checker = dataset.checker()
    out: dict = {}
    for name, net in (("with", controlnet), ("without", None)):
        images, masks, captions = [], [], []
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(n, start + batch_size))]
            hint = torch.stack([it["conditioning_image"] for it in items])
            caps = [it["caption"] for it in items]
            control = [Control(net, hint)] if net is not None else None
            images.append(text_to_image(bundle, caps, steps=steps, guidance_scale=guidance_scale, seed=seed + start,
                                        height=dataset.resolution, width=dataset.resolution, control=control))
            masks.append(hint)
            captions += caps
        images_t, masks_t = torch.cat(images), torch.cat(masks)
        accuracy = prompt_accuracy(images_t, captions, checker)
        out[name] = {"iou": float(np.mean(silhouette_iou(images_t, masks_t, checker))),
                     "color_acc": accuracy["color_acc"], "shape_acc": accuracy["shape_acc"], "n": n}
    return out
