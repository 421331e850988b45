"""Small local stand-ins for the paths a reader of the docs replaces with their own (/path/to/images, <model>, ...),
made once per test session when a command first names them.

Two kinds: a path that is the same wherever the command runs (``/path/to/images``, ``<model>``,
``outputs/train/<time>``) is replaced in the command's text; a bare name the command reads from the folder it runs
in (``photo.png``, ``style.safetensors``, ``my-bundle``) is copied into that folder when the command reads it (the
same name can be what another command writes, e.g. ``--out my-bundle``). Every model stand-in is the one tiny
architecture of a 2-step tiny run, so a LoRA or an embedding made for it fits wherever a command combines them."""

import re
import shutil
from pathlib import Path

import torch
from PIL import Image

from tests.helpers.data import write_green_shards

# text in a command -> the DocsData method that makes what it stands for
ABSOLUTE = {
    "/path/to/images": "images", "/tmp/glyphs": "images", "/path/to/latents": "latents",
    "/path/to/control-images": "masks",
    "/path/to/diffusers-folder": "diffusers_folder", "/path/to/stable-diffusion-xl-base-1.0": "sdxl_folder",
    "/path/to/stable-diffusion-3.5-medium": "sd3_folder",
    "/path/to/FLUX.1-dev": "flux_folder",
    "<model>": "checkpoint", "<checkpoint>": "checkpoint", "<run>": "run",
    "shards/train-{000..099}.tar": "shards", "user/dataset": "hf_dataset",
}
RUN_FOLDER = re.compile(r"outputs/\w+/<time>")  # any run folder train.py prints
# a name read from the command's working folder -> the DocsData method that makes it
RELATIVE = {
    "v1-5-pruned-emaonly.safetensors": "sd_file", "sd_xl_base_1.0.safetensors": "sdxl_file",
    "sd3.5_medium.safetensors": "sd3_file",
    "photo.png": "photo", "mask.png": "mask", "edges.png": "mask", "prompts.txt": "prompts",
    "style.safetensors": "lora_file", "someone_elses_lora.safetensors": "lora_file",
    "diffusers_lora_folder": "lora_folder", "someones_style.safetensors": "a1111_embedding",
    "my-bundle": "bundle", "dog": "images", "dogs": "class_images", "dog_masks": "masks",
}
TINY_CLIP_DIM = 32  # the tiny local CLIP's width (TINY_MODEL's context)


def write_controlnets(run: Path) -> None:
    """The files an adapter=controlnet run writes (for the tiny run's U-Net and factor-2 VAE)."""
    from ldm.formats.controlnet_file import write_controlnet_folder, write_controlnet_single_file
    from ldm.formats.load import load_bundle
    from ldm.models.controlnet import ControlNet

    net = ControlNet.from_unet(load_bundle(run / "checkpoints" / "last.ckpt").unet, hint_channels=(8, 16))
    write_controlnet_folder(net, run / "controlnet")
    write_controlnet_single_file(net, run / "controlnet.safetensors")


def write_images(folder: Path, n: int = 8) -> Path:
    """n small PNGs, each with a .txt caption."""
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (20, 20), (30 * i % 256, 100, 200 - 20 * i)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a picture of the letter {'ABCDEFGH'[i % 8]}")
    return folder


class DocsData:
    """Makes each stand-in once, under ``root``."""

    def __init__(self, root: Path):
        self.root, self._made = root, {}

    def _once(self, name: str, make) -> Path:
        """make(path) writes the stand-in at path (or returns where it wrote it); done once."""
        if name not in self._made:
            path = self.root / name
            made = make(path)
            self._made[name] = Path(made) if isinstance(made, (str, Path)) else path
        return self._made[name]

    # ---- what a command's text names

    def substitute(self, args: list[str]) -> list[str]:
        """The arguments with every absolute placeholder replaced by its stand-in."""
        out = []
        for arg in args:
            arg = RUN_FOLDER.sub(lambda m: str(self.run()), arg)
            for text, make in ABSOLUTE.items():
                if text in arg:
                    arg = arg.replace(text, str(getattr(self, make)()))
            out.append(arg)
        return out

    def provide(self, value: str) -> None:
        """A bare name a command reads, copied into the working folder from its stand-in (when it is one)."""
        name = str(value).rstrip("/")
        if name in RELATIVE and not Path(name).exists():
            source = getattr(self, RELATIVE[name])()
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, name)

    # ---- data

    def images(self) -> Path:
        return self._once("images", write_images)

    def class_images(self) -> Path:
        return self._once("class_images", lambda p: write_images(p, 3))

    def masks(self) -> Path:
        def make(folder):
            folder.mkdir()
            for png in self.images().glob("*.png"):
                Image.new("L", (20, 20), 255).save(folder / png.name)
            return folder

        return self._once("masks", make)

    def photo(self) -> Path:
        return self._once("photo.png", lambda p: Image.new("RGB", (16, 16), (200, 40, 40)).save(p))

    def mask(self) -> Path:
        return self._once("mask.png", lambda p: Image.new("L", (16, 16), 255).save(p))

    def prompts(self) -> Path:
        return self._once("prompts.txt", lambda p: p.write_text("a red circle\na blue square\n"))

    def shards(self) -> str:
        return str(self._once("shards", write_green_shards))

    def hf_dataset(self) -> Path:
        """The images as a Hugging Face dataset saved to disk (what data=hf reads without the hub)."""
        def make(path):
            import datasets

            pngs = sorted(self.images().glob("*.png"))
            features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
            datasets.Dataset.from_dict({"image": [Image.open(p) for p in pngs],
                                        "text": [p.with_suffix(".txt").read_text() for p in pngs]},
                                       features=features).save_to_disk(str(path))

        return self._once("hf", make)

    def latents(self) -> Path:
        from ldm.cli.latent_cache import main

        return self._once("latents", lambda p: main([str(p), "--source", "folder", "--path", str(self.images()),
                                                      "--resolution", "16", "--vae-preset", "tiny", "--device", "cpu",
                                                      "--no-progress"]))

    # ---- models: a 2-step tiny run and what is made from it

    def run(self) -> Path:
        """A finished tiny run (checkpoints/last.ckpt, config.yaml), with the embeddings file a textual-inversion
        run writes beside them."""
        def make(root):
            from ldm.formats.embeddings import save_embedding
            from ldm.training.run.train import train
            from tests.helpers.training import CKPT, TINY_MODEL, compose_train

            run = Path(train(compose_train(root, TINY_MODEL + CKPT + ["trainer.max_steps=2"]))["run_dir"])
            save_embedding(run / "learned_embeds.safetensors", "<cat-toy>", torch.randn(4, TINY_CLIP_DIM) * 0.01)
            write_controlnets(run)
            return run

        return self._once("tiny-run", make)

    def checkpoint(self) -> Path:
        return self.run() / "checkpoints" / "last.ckpt"

    def tiny_bundle(self):
        from ldm.formats.load import load_bundle

        return load_bundle(str(self.checkpoint()))

    def sd_file(self) -> Path:
        from ldm.formats.single_file import save_single_file

        return self._once("sd.safetensors", lambda p: save_single_file(p, self.tiny_bundle(), resolution=16))

    def diffusers_folder(self) -> Path:
        from ldm.formats.diffusers_folder import write_diffusers

        return self._once("diffusers", lambda p: write_diffusers(self.tiny_bundle(), p, resolution=16))

    def bundle(self) -> Path:
        from ldm.formats.exporter import export

        return self._once("bundle", lambda p: export(str(self.checkpoint()), "ldm", p))

    def lora_network(self):
        from ldm.formats.lora_files import bundle_roots
        from ldm.models.lora import LoRAConfig, LoRANetwork

        bundle = self.tiny_bundle()
        return LoRANetwork.build(bundle_roots(bundle), LoRAConfig()), bundle_roots(bundle)  # adapter=lora's shape

    def lora_file(self) -> Path:
        from ldm.formats.lora_files import save_lora_file

        return self._once("lora.safetensors", lambda p: save_lora_file(*self.lora_network(), p))

    def lora_folder(self) -> Path:
        from ldm.formats.lora_files import save_lora_file

        return self._once("lora-peft", lambda p: save_lora_file(*self.lora_network(), p, "peft").parent)

    def a1111_embedding(self) -> Path:
        from ldm.formats.embeddings import save_embedding

        return self._once("style.safetensors", lambda p: save_embedding(
            p, "<style>", torch.randn(2, TINY_CLIP_DIM) * 0.01, layout="a1111"))

    # ---- SDXL-shaped stand-ins

    def sdxl_bundle(self):
        from ldm.models.tiny_clip import write_tiny_sdxl_clips
        from tests.helpers.models import tiny_sdxl_bundle

        return tiny_sdxl_bundle(write_tiny_sdxl_clips(self.root / "sdxl-clips"))

    def sdxl_file(self) -> Path:
        from ldm.formats.single_file import save_single_file

        return self._once("sdxl.safetensors", lambda p: save_single_file(p, self.sdxl_bundle(), resolution=32))

    def sd3_folder(self) -> Path:
        """A tiny SD3 diffusers folder (with a T5) saved by diffusers' StableDiffusion3Pipeline."""
        from tests.helpers.sd3 import write_tiny_sd3_folder

        return self._once("sd3", lambda p: write_tiny_sd3_folder(p, use_t5=True)[0])

    def flux_folder(self) -> Path:
        """A tiny FLUX.1 diffusers folder saved by diffusers' FluxPipeline."""
        from tests.helpers.flux import write_tiny_flux_folder

        return self._once("flux", lambda p: write_tiny_flux_folder(p)[0])

    def sd3_file(self) -> Path:
        from ldm.formats.exporter import export

        return self._once("sd3.5_medium.safetensors",
                          lambda p: export(str(self.sd3_folder()), "single-file", p, allow_unloadable=True))

    def sdxl_folder(self) -> Path:
        from ldm.formats.diffusers_folder import write_diffusers

        return self._once("sdxl-diffusers", lambda p: write_diffusers(self.sdxl_bundle(), p, resolution=32))
