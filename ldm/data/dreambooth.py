"""DreamBooth data (Ruiz et al. 2023): instance images of the new subject with one instance prompt ("a sks circle
on a white background"), paired with class images with one class prompt ("a circle on a white background") for the
prior-preservation loss; optional per-image loss masks.

Layout follows diffusers' examples/dreambooth/train_dreambooth.py ``DreamBoothDataset`` / ``collate_fn``: an epoch
has max(#instance, #class) items, item i pairs instance image i mod #instance with class image i mod #class, and a
batch is the instance rows followed by the class rows (``is_prior`` marks the class rows; the loss splits there,
ldm.diffusion.prior_preservation). The class folder's first ``num_class_images`` images (sorted by path) are used;
train(cfg) fills a folder holding fewer with samples of the base model first (ldm.training.run.class_images).

Masks (instance images only; class rows get all-ones masks): ``mask_root``, a folder with one mask image per
instance image with the same relative path stem (any image extension; its R channel, as kohya-ss/sd-scripts reads
``conditioning_data_dir`` masks: white = learn, black = ignore), or ``mask_from_alpha=true``: the instance image's
alpha channel (the image itself is composited on white, as everywhere in ldm.data). A mask goes through the same
resize and centre crop as its image and is kept in memory at the training resolution (the loss resizes it to the
latent size, ldm.diffusion.masked_loss). Masks are not part of the latent cache: they are read afresh when the
dataset is built, so they can never be stale, and the cached latents stay usable.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.bad_samples import decode_image
from ldm.data.collate import collate_image_caption
from ldm.data.protocols import EpochAware
from ldm.data.image_folder import IMAGE_EXTENSIONS, ImageFolderDataset
from ldm.formats.safe_paths import inside

logger = logging.getLogger("ldm.data")

KEY = "data.train"


class PromptedImageFolder(ImageFolderDataset):
    """Every image under ``root`` (sorted by path, at most ``limit``), each captioned with the one ``prompt``.

    ``own_captions=True`` (the class folder): an image's own caption (its ``.txt`` sidecar or a metadata file, read
    as ``data=folder`` reads them) takes precedence and ``prompt`` captions the rest; ``prompt=None`` then requires
    every image to have one (a list of class prompts: each generated image gets its prompt's sidecar)."""

    def __init__(self, root: str | Path, prompt: str | None, resolution: int = 512, center_crop: bool = True,
                 random_flip: bool = False, seed: int | None = None, limit: int | None = None,
                 own_captions: bool = False):
        self.prompt, self.limit, self.own_captions = None if prompt is None else str(prompt), limit, own_captions
        super().__init__(root, resolution, center_crop=center_crop, random_flip=random_flip, seed=seed)

    def _find_images(self) -> list[str]:
        files = super()._find_images()
        return files[: self.limit] if self.limit is not None else files

    def _load_captions(self) -> tuple[list[str], int]:
        if not self.own_captions:
            return [self.prompt] * len(self.files), 0  # no metadata or sidecars: the prompt is the caption
        captions, _ = super()._load_captions()
        missing = [key for key, caption in zip(self.files, captions) if not caption]
        if missing and self.prompt is None:
            raise ValueError(f"{KEY}.class_root: {len(missing)} class image(s) have no caption file (first: "
                             f"{self.root / missing[0]}) and {KEY}.class_prompt is a list of prompts: give each "
                             f"image a .txt caption, or set {KEY}.class_prompt to one prompt for them")
        return [caption or self.prompt for caption in captions], 0

    def cache_spec(self):
        spec = super().cache_spec()
        spec.settings["kind"] = "PromptedImageFolder"
        return spec


class _Rows(Dataset):
    """The instance folder's images, then the class folder's: the flat row order the latent cache stores."""

    def __init__(self, parts: list[Dataset]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, j: int) -> dict:
        part = int(np.searchsorted(self.offsets, j, side="right")) - 1
        return self.parts[part][j - self.offsets[part]]


def class_prompts(class_prompt) -> list[str]:
    """``data.train.class_prompt`` as a list: one prompt, or several (class image k is sampled with prompt
    k mod n and captioned by its sidecar), none of them empty."""
    prompts = [class_prompt] if isinstance(class_prompt, str) else list(class_prompt or [])
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{KEY}.class_prompt must be a prompt or a non-empty list of prompts, got {class_prompt!r}")
    return prompts


def count_images(root: str | Path) -> int:
    """Image files under ``root`` (what a class folder holds; 0 when it does not exist)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return 0
    return sum(1 for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class DreamBoothDataset(Dataset):
    """Instance (+ class) images for DreamBooth; see the module docstring.

    Item i: the instance row ``{"image" (3, R, R), "caption": instance_prompt, "index", ["mask" (1, R, R)]}`` with
    the class row under ``"prior"`` (``{"image", "caption": class_prompt, ...}``) when there is a class folder.
    Batch them with ``collate_fn`` (the DataModule does).

    Args:
        instance_root, instance_prompt: the subject's images and their prompt.
        class_root, class_prompt: class images and their prompt (prior preservation); None: instance images only.
            A class image's own caption file wins over class_prompt; class_prompt may be a list of prompts (the
            generated images cycle through it, each with its prompt's .txt sidecar).
        num_class_images: the class folder's first images used (train(cfg) generates missing ones).
        resolution, center_crop, random_flip, seed: as ``ImageFolderDataset``.
        mask_root: folder of masks named like the instance images (any image extension).
        mask_from_alpha: the instance images' alpha channel is the mask.
    """

    def __init__(self, instance_root: str | Path, instance_prompt: str, class_root: str | Path | None = None,
                 class_prompt: str | list[str] | None = None, num_class_images: int = 100, resolution: int = 512,
                 center_crop: bool = True, random_flip: bool = False, seed: int | None = None,
                 mask_root: str | Path | None = None, mask_from_alpha: bool = False):
        if not instance_prompt:
            raise ValueError(f"{KEY}.instance_prompt is empty: set the prompt of the instance images, e.g. "
                             "'a sks dog'")
        if (class_root is None) != (class_prompt is None):
            raise ValueError(f"{KEY}.class_root and {KEY}.class_prompt go together (prior preservation needs both; "
                             f"got class_root={class_root!r}, class_prompt={class_prompt!r})")
        if mask_root is not None and mask_from_alpha:
            raise ValueError(f"{KEY}.mask_root and {KEY}.mask_from_alpha=true both set: choose one source of masks")
        if (mask_root is not None or mask_from_alpha) and random_flip:
            raise ValueError(f"{KEY}.random_flip=true with masks: the flip of a cached latent is not known to its "
                             f"mask; set {KEY}.random_flip=false")
        if int(num_class_images) <= 0:
            raise ValueError(f"{KEY}.num_class_images must be a positive integer, got {num_class_images!r}")
        folder = dict(resolution=resolution, center_crop=center_crop, random_flip=random_flip, seed=seed)
        if not Path(instance_root).expanduser().is_dir():
            raise FileNotFoundError(f"{KEY}.instance_root: folder not found: {instance_root}")
        self.instance = PromptedImageFolder(instance_root, instance_prompt, **folder)
        self.class_images: PromptedImageFolder | None = None
        self.num_class_images = int(num_class_images)
        if class_root is not None:
            found = count_images(class_root)
            if found == 0:
                raise FileNotFoundError(
                    f"{KEY}.class_root: no class images in {class_root} (train.py generates "
                    f"{KEY}.num_class_images of them with the base model before training)")
            if found < self.num_class_images:
                logger.warning("%s.class_root %s holds %d image(s), fewer than num_class_images=%d: using those",
                               KEY, class_root, found, self.num_class_images)
            prompts = class_prompts(class_prompt)
            self.class_images = PromptedImageFolder(class_root, prompts[0] if len(prompts) == 1 else None,
                                                    limit=self.num_class_images, own_captions=True, **folder)
        self.mask_root = None if mask_root is None else Path(mask_root).expanduser()
        self.mask_from_alpha = bool(mask_from_alpha)
        self.masks = self._load_masks() if (self.mask_root is not None or self.mask_from_alpha) else None
        parts = [self.instance] + ([self.class_images] if self.class_images is not None else [])
        self.rows: Dataset = _Rows(parts)

    # ------------------------------------------------------------------------------------------------------ items
    @property
    def n_instance(self) -> int:
        return len(self.instance)

    @property
    def n_class(self) -> int:
        return 0 if self.class_images is None else len(self.class_images)

    @property
    def resolution(self) -> int:
        return self.instance.resolution

    def __len__(self) -> int:
        return max(self.n_instance, self.n_class)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        i = index % self.n_instance
        item = dict(self.rows[i])
        item["index"] = index
        if self.masks is not None:
            item["mask"] = self.masks[i].float() / 255.0
        if self.class_images is not None:
            item["prior"] = dict(self.rows[self.n_instance + index % self.n_class])
        return item

    @staticmethod
    def collate_fn(samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Instance rows, then class rows (diffusers' ``collate_fn`` with prior preservation), with ``is_prior``
        (B,) and, when the instance rows have masks, ``mask`` (B, 1, R, R) (class rows: ones)."""
        instance = [{k: v for k, v in s.items() if k != "prior"} for s in samples]
        prior = [s["prior"] for s in samples if "prior" in s]
        if prior and len(prior) != len(samples):
            raise ValueError("DreamBoothDataset.collate_fn: some items have a class row and some do not")
        batch = collate_image_caption(instance + prior)
        batch["is_prior"] = torch.tensor([False] * len(instance) + [True] * len(prior))
        if "mask" in instance[0]:
            masks = [s["mask"] for s in instance]
            masks += [torch.ones_like(masks[0])] * len(prior)
            batch["mask"] = torch.stack(masks)
        return batch

    # -------------------------------------------------------------------------------------------------- the cache
    def cache_spec(self):
        """The latent cache holds the instance rows then the class rows (their folders' identities: path, size,
        mtime, prompt); masks are not cached (see the module docstring)."""
        from ldm.data.auto_cache import CacheSpec

        specs = [("instance", self.instance.cache_spec())]
        if self.class_images is not None:
            specs.append(("class", self.class_images.cache_spec()))
        items = [f"{name}:{item}" for name, spec in specs for item in spec.items]
        settings = {"kind": "DreamBoothDataset", **{name: spec.settings for name, spec in specs}}
        return CacheSpec(settings, items, _Rows([spec.source for _, spec in specs]), flip=specs[0][1].flip,
                         random_crop=specs[0][1].random_crop, resolution=self.resolution)

    def with_cache(self, view: Dataset) -> "DreamBoothDataset":
        """This dataset reading its rows (latents + contexts) from the cache ``view`` (in ``cache_spec`` order)."""
        if len(view) != len(self.rows):
            raise ValueError(f"DreamBoothDataset: the latent cache has {len(view)} rows, the folders {len(self.rows)}")
        cached = copy.copy(self)
        cached.rows = view
        return cached

    def set_epoch(self, epoch: int) -> None:
        """New posterior draws (and flip choices) of a cached view each epoch."""
        if isinstance(self.rows, EpochAware):
            self.rows.set_epoch(epoch)

    def bad_sample_sources(self) -> list[Dataset]:
        """The folders whose unreadable images are each named once per run (see share_bad_sample_log)."""
        return [part for part in (self.instance, self.class_images) if part is not None]

    # ------------------------------------------------------------------------------------------------------ masks
    def _load_masks(self) -> list[torch.Tensor]:
        """One uint8 (1, R, R) mask per instance image, through the image's resize and centre crop."""
        transform = self.instance.transform
        masks, without_alpha = [], []
        by_stem = self._mask_files() if self.mask_root is not None else {}
        for key in self.instance.files:
            if self.mask_root is not None:
                stem = str(Path(key).with_suffix(""))
                if stem not in by_stem:
                    raise FileNotFoundError(f"{KEY}.mask_root: no mask for instance image {key} (looked for "
                                            f"{self.mask_root / stem}.<png|jpg|...>)")
                mask_file = inside(self.mask_root, by_stem[stem], source=f"{KEY}.mask_root", key=f"mask of {key}")
                channel = decode_image(str(mask_file)).convert("RGB").getchannel("R")
            else:  # an instance image linked from outside instance_root is refused here, as it is when loaded
                image = decode_image(str(self.instance.image_path(key)))
                if image.mode == "P" and "transparency" in image.info:
                    image = image.convert("RGBA")
                if "A" not in image.getbands():
                    without_alpha.append(key)
                    channel = Image.new("L", image.size, 255)
                else:
                    channel = image.getchannel("A")
            mask = transform.crop(transform.resize(channel))
            masks.append(torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy()).unsqueeze(0))
        if without_alpha:
            logger.warning("%s.mask_from_alpha: %d instance image(s) have no alpha channel and are learned whole "
                           "(e.g. %s)", KEY, len(without_alpha), without_alpha[0])
        return masks

    def _mask_files(self) -> dict[str, str]:
        """{instance image stem: mask file name relative to mask_root} (a link out of mask_root is refused when
        the mask is read)."""
        if not self.mask_root.is_dir():
            raise FileNotFoundError(f"{KEY}.mask_root: folder not found: {self.mask_root}")
        instance_root = self.instance.root.resolve()
        if self.mask_root.resolve().is_relative_to(instance_root):
            raise ValueError(f"{KEY}.mask_root {self.mask_root} is inside instance_root: its masks would be read "
                             "as instance images; keep the masks in a folder of their own")
        return {str(p.relative_to(self.mask_root).with_suffix("")): p.relative_to(self.mask_root).as_posix()
                for p in sorted(self.mask_root.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()}

    def __repr__(self) -> str:
        return (f"DreamBoothDataset({self.n_instance} instance image(s) {self.instance.prompt!r} from "
                f"{self.instance.root}, {self.n_class} class image(s)"
                + (f" {self.class_images.prompt!r} from {self.class_images.root}" if self.class_images else "")
                + (", masked" if self.masks is not None else "") + ")")
