"""Files people share carry no trace of the user's machine: after a tiny train -> LoRA train -> export -> sample ->
evaluate run whose data, caches and run folders all lie in the home folder (as a user's do), no file written holds
$HOME or any absolute path of the test (which also names the user: /tmp/pytest-of-<user>/...)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from ldm.cli.evaluate import evaluate
from ldm.cli.evaluate_config import compose_evaluate
from ldm.cli.export import main as export_main
from ldm.pipelines.cli import register_configs as register_sample_configs
from ldm.pipelines.cli import sample
from ldm.training.run.config import register_configs
from ldm.formats.lora_files import save_lora_file
from ldm.training.run.train import build_diffusion_module, train
from tests.helpers import CONFIGS
from tests.helpers.training import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
# TINY_MODEL without its switches for the parts a real run has: the latent cache (under ~/.cache/ldm) and callbacks
RUN = [o for o in TINY_MODEL if o not in ("callbacks=none", "++data.latent_cache=null")] + [
    "data=folder", "data.num_workers=0", "data.val_fraction=0.25", "data.train.resolution=16",
    "callbacks.sampling.n_prompts=2", "callbacks.sampling.every_n_steps=3", "sampler.steps=2",
    "callbacks.vae_check.n_images=4", "~callbacks.prompt_accuracy", "callbacks.checkpoint.every_n_train_steps=3"]


def write_pictures(folder: Path) -> Path:
    """8 flat-colour 16x16 pictures with .txt captions."""
    folder.mkdir(parents=True)
    for i, (name, rgb) in enumerate(list(COLOURS.items()) * 2):
        Image.new("RGB", (16, 16), rgb).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {name} picture")
    return folder


def compose_run(run: Path, pictures: Path, *overrides: str):
    """configs/train.yaml as `python train.py` composes it: paths.cache_dir left at its default, ~/.cache/ldm."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.run_dir={run}", f"data.train.root={pictures}", *RUN,
                                                       *overrides])


def sample_config(ckpt, out_dir: Path, *overrides: str):
    register_sample_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("sample", overrides=[f"ckpt={ckpt}", f"out_dir={out_dir}", "sampler.steps=2",
                                            "prompt='a red picture'", "n_images=1", *overrides])


# Written for the run itself, not for sharing, and needing its paths: Hydra's record of how the run was started
# (the user's own command line and config), and the training checkpoint, which is the run's resume state:
# Lightning's ModelCheckpoint keeps its dirpath and best paths in it to continue the run, and a LoRA run's
# checkpoint names its base (model.pretrained) to load it. Exports, LoRA files and PNGs are what people share.
def run_state(path: Path, runs: list[Path]) -> bool:
    for run in runs:
        if path == run / "config.yaml" or (run / ".hydra") in path.parents:
            return True
        if path.parent == run / "checkpoints" and path.suffix == ".ckpt":
            return True
    return False


def holders(root: Path, needles: list[str], runs: list[Path]) -> dict[str, list[str]]:
    """{file (relative to root): the needles its bytes hold} for every file under root but the runs' own state."""
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        if run_state(path, runs):
            continue
        data = path.read_bytes()
        if path.suffix == ".png":  # text chunks may be compressed (zTXt / iTXt): their decoded text too
            with Image.open(path) as image:
                data += "".join(image.text.values()).encode()
        hits = [n for n in needles if n.encode() in data]
        if hits:
            found[path.relative_to(root).as_posix()] = hits
    return found


def test_no_shared_output_holds_home_or_an_absolute_path(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("LDM_CACHE", raising=False)
    monkeypatch.chdir(home)  # a user works in their home: anything written relative to the working folder is scanned
    pictures = write_pictures(home / "pictures")
    base_run, lora_run = home / "outputs" / "base", home / "outputs" / "lora"

    base = train(compose_run(base_run, pictures))
    adapter = [f"model.pretrained={base['last_checkpoint']}", "adapter=lora", "adapter.rank=2"]
    start = home / "loras" / "start.safetensors"  # the LoRA run starts from a file: its path is in the config
    module = build_diffusion_module(compose_run(lora_run, pictures, *adapter))
    save_lora_file(module.lora, module.adapter_roots(), start)
    lora = train(compose_run(lora_run, pictures, *adapter, f"adapter.init_from={start}"))
    assert (lora_run / "lora.safetensors").is_file()
    assert (home / ".cache" / "ldm" / "latents").is_dir(), "the automatic latent cache was written (and is scanned)"

    exports = home / "exports"
    for fmt, out in (("ldm", exports / "bundle"), ("single-file", exports / "model.safetensors"),
                     ("diffusers", exports / "diffusers")):
        assert export_main([lora["last_checkpoint"], "--format", fmt, "--out", str(out), "--allow-unloadable"]) == 0
    images = sample(sample_config(exports / "bundle", home / "samples", f"lora=[{lora_run / 'lora.safetensors'}:0.5]"))
    assert images
    result = evaluate(compose_evaluate([f"ckpt={lora['last_checkpoint']}", "n=2", "sampler.steps=2", "batch_size=2",
                                        "metrics=[val_loss,fid,clip_score]", "data=folder",
                                        f"data.train.root={pictures}", "data.train.resolution=16",
                                        "data.val_fraction=0.25", "data.num_workers=0"]))
    assert set(result["skipped"]) == {"fid", "clip_score"}  # their files are missing: the reasons name paths

    needles = [str(home), str(tmp_path), str(tmp_path.resolve())]
    assert holders(tmp_path, needles, [base_run, lora_run]) == {}
    ckpt = torch.load(lora["last_checkpoint"], weights_only=True)
    assert ckpt["ldm"]["model"]["model"]["pretrained"] == base["last_checkpoint"], "the run keeps its base to load"
