"""Text-to-image, image-to-image and inpainting over a :class:`~ldm.models.bundle.ModelBundle` (the seed's "Full
Architecture Combined"). The sampler math lives in ``ldm.diffusion``; these functions wire the models to it.

    from ldm.formats.load import load_bundle
    from ldm.pipelines import text_to_image
    images = text_to_image(load_bundle("model.safetensors"), "a red circle", steps=30, seed=0)  # (B, 3, H, W)
"""

from ldm.pipelines.common import default_size, size_multiple
from ldm.pipelines.images import make_grid, mask_batch, pil_to_mask, pil_to_tensor, to_pil
from ldm.pipelines.inpaint import inpaint
from ldm.pipelines.text_to_image import image_to_image, text_to_image

__all__ = [
    "default_size",
    "image_to_image",
    "inpaint",
    "make_grid",
    "mask_batch",
    "pil_to_mask",
    "pil_to_tensor",
    "size_multiple",
    "text_to_image",
    "to_pil",
]
