"""data=folder / hf / webdataset choose the first stage and the text encoder from the data (data/fit/auto.yaml):
the shipped shapes VAE when it passes the VAE check on the folder's images, else a first stage trained first; the
tiny local CLIP with the captions' words, trained. Any value given wins; the shapes default is untouched."""

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.evaluation.reconstruction import ReconstructionReport
from ldm.tasks.glyphs.dataset import write_glyph_folder
from ldm.training.run.caption_vocab import choose_text_encoder
from ldm.training.run.first_stage import check_vae, choose_first_stage
from ldm.training.run.stages import STAGE_KINDS
from ldm.training.run.train import ConfigError, train
from tests.helpers.training import compose_train

SHIPPED = "builtin:shapes_vae"


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    """Dark letters on white: the shapes VAE reconstructs them poorly (about 15 dB)."""
    return write_glyph_folder(tmp_path_factory.mktemp("glyphs"), n=40, resolution=32, seed=0)


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    """The shapes as a folder of PNGs: the shapes VAE's own kind of image, which it passes."""
    from ldm.tasks.shapes.dataset import ShapesDataset

    root = tmp_path_factory.mktemp("shapes")
    rows = []
    for i, item in enumerate(ShapesDataset(size=40, resolution=32, seed=3)):
        array = ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(array).save(root / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": item["caption"]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def folder_cfg(tmp_path, root, *extra):
    return compose_train(tmp_path, ["data=folder", f"data.train.root={root}", "data.train.resolution=32", *extra])


def report(poor: bool) -> ReconstructionReport:
    return ReconstructionReport(psnr_db=14.0 if poor else 30.0, colour_shift=20.0 if poor else 1.0,
                                max_colour_shift=30.0, n_images=32)


def fake_check(poor: bool, calls: list):
    def check(cfg, weights):
        calls.append(weights)
        return report(poor), torch.zeros(4, 3, 32, 32)
    return check


def choose(cfg, poor=True):
    calls = []
    line = choose_first_stage(cfg, check=fake_check(poor, calls), minutes=lambda cfg, images: 2.0)
    return line, calls


def test_the_real_vae_check_passes_the_shapes_and_fails_the_glyphs(tmp_path, glyphs, shapes_folder):
    good, images = check_vae(folder_cfg(tmp_path, shapes_folder), SHIPPED)
    bad, _ = check_vae(folder_cfg(tmp_path, glyphs), SHIPPED)
    assert not good.poor and bad.poor and images.shape == (32, 3, 32, 32)
    passed = folder_cfg(tmp_path, shapes_folder)
    assert "-> the shipped VAE fits them" in choose_first_stage(passed)
    assert passed.model.autoencoder.weights == SHIPPED and passed.first_stage is None
    failed = folder_cfg(tmp_path, glyphs)
    line = choose_first_stage(failed, minutes=lambda cfg, images: 2.4)
    assert failed.model.autoencoder.weights is None and failed.first_stage.train is True
    assert line.startswith("VAE check on 32 of your images: ") and "-> training a first stage" in line
    assert "~2 min: 600 steps of 16" in line


def test_a_failed_check_trains_a_first_stage_and_a_passed_one_keeps_the_shipped_vae(tmp_path, glyphs):
    cfg = folder_cfg(tmp_path, glyphs)
    line, calls = choose(cfg, poor=True)
    assert calls == [SHIPPED] and cfg.model.autoencoder.weights is None and cfg.first_stage.train is True
    assert "14.0 dB, colour shift 20.0/255 (poor" in line
    cfg = folder_cfg(tmp_path, glyphs)
    line, _ = choose(cfg, poor=False)
    assert cfg.model.autoencoder.weights == SHIPPED and cfg.first_stage is None and "fits them" in line


@pytest.mark.parametrize("extra,weights,first_stage,says", [
    (["model.autoencoder.weights=/my/vae.safetensors"], "/my/vae.safetensors", None, None),
    (["model.autoencoder.weights=null"], None, None, None),  # a fresh VAE, as asked
    (["model.autoencoder.weights=builtin:shapes_vae"], SHIPPED, None, None),
    (["first_stage.train=false"], SHIPPED, False, "first_stage.train=false"),
    (["first_stage.train=true"], None, True, "first_stage.train=true"),
    (["experiment=own_data"], None, True, "first_stage.train=true"),
    (["model.pretrained=/some/checkpoint.ckpt"], SHIPPED, None, "a pretrained model or an adapter"),
    (["adapter=lora"], SHIPPED, None, "a pretrained model or an adapter"),
    (["model.autoencoder.preset=tiny"], None, None, "no VAE is shipped"),
])
def test_given_values_are_kept_and_no_check_runs(tmp_path, glyphs, extra, weights, first_stage, says):
    cfg = folder_cfg(tmp_path, glyphs, *extra)
    line, calls = choose(cfg, poor=True)
    assert calls == [] and cfg.model.autoencoder.weights == weights
    assert (cfg.first_stage if first_stage is None else cfg.first_stage.train) == first_stage
    assert line is None if says is None else says in line


def test_a_bad_first_stage_train_value_names_the_key(tmp_path, glyphs):
    with pytest.raises(ConfigError, match="first_stage.train must be auto, true or false"):
        choose(folder_cfg(tmp_path, glyphs, "first_stage.train=sometimes"))


def test_the_tiny_clip_gets_the_caption_words_and_trains(tmp_path, glyphs):
    cfg = folder_cfg(tmp_path, glyphs)
    line = choose_text_encoder(cfg)
    node = cfg.model.text_encoder
    assert node.frozen is False and "letter" in " ".join(node.words).split()
    assert node.folder.startswith(str(tmp_path.parent / "ldm-cache" / "tiny_clip") + "/")  # + the words' digest
    assert line.startswith("text encoder: tiny local CLIP -> vocabulary from your captions (")
    assert line.endswith("words), trained with the U-Net")


@pytest.mark.parametrize("extra,frozen,words", [
    (["model.text_encoder.frozen=true"], True, "captions"),
    (["model.text_encoder.words=[red,green]"], False, ["red", "green"]),
    (["model.text_encoder.words=[red,green]", "model.text_encoder.frozen=true"], True, ["red", "green"]),
])
def test_given_text_encoder_values_are_kept(tmp_path, glyphs, extra, frozen, words):
    cfg = folder_cfg(tmp_path, glyphs, *extra)
    choose_text_encoder(cfg)
    node = cfg.model.text_encoder
    assert node.frozen is frozen
    if words == "captions":
        assert "letter" in " ".join(node.words).split()
    else:
        assert list(node.words) == words


@pytest.mark.parametrize("extra", [["model.pretrained=/some/checkpoint.ckpt"], ["model=sdxl_tiny"]])
def test_a_pretrained_base_or_another_encoder_keeps_its_own(tmp_path, glyphs, extra):
    cfg = folder_cfg(tmp_path, glyphs, *extra)
    assert "its own words, frozen unless set" in choose_text_encoder(cfg)
    assert "words" not in cfg.model.text_encoder and "frozen" not in cfg.model.text_encoder


def test_a_stream_without_a_caption_list_keeps_the_default_words_and_trains(tmp_path):
    cfg = compose_train(tmp_path, ["data=webdataset", f"data.train.urls={tmp_path / 'x.tar'}",
                                   "data.train.resolution=32"])
    line = choose_text_encoder(cfg)
    assert "words" not in cfg.model.text_encoder and cfg.model.text_encoder.frozen is False
    assert "the default vocabulary (WebDatasetSource lists no captions up front" in line


def test_the_shapes_default_composes_and_resolves_as_before(tmp_path, capsys):
    cfg = compose_train(tmp_path, [])
    assert not re.search(r": auto$", OmegaConf.to_yaml(cfg), re.M) and cfg.first_stage is None
    assert cfg.model.autoencoder.weights == SHIPPED
    assert "words" not in cfg.model.text_encoder and "frozen" not in cfg.model.text_encoder
    assert cfg.data.batch_size == 64 and cfg.trainer.max_steps == 1200
    before = OmegaConf.to_container(cfg)
    STAGE_KINDS["diffusion"].resolve_config(cfg)
    assert OmegaConf.to_container(cfg) == before and "chosen for your data" not in capsys.readouterr().out


def test_the_plain_folder_command_says_its_choices_and_trains_the_first_stage(tiny_cfg, glyphs, capsys):
    """train() end to end: the VAE check of the shipped VAE fails on the glyphs, so a (tiny, 2-step) first stage
    trains first; the text encoder learns the captions' words."""
    result = train(tiny_cfg("data=folder", f"data.train.root={glyphs}", "data.num_workers=0",
                            "model.autoencoder.preset=shapes", "model.autoencoder.weights=auto",
                            "first_stage.max_steps=2", "first_stage.batch_size=4",
                            "first_stage.autoencoder.preset=tiny", "+first_stage.autoencoder.norm_groups=8",
                            "+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                            "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints",
                            "+callbacks.checkpoint.save_last=true"))
    out = capsys.readouterr().out
    block = out[out.index("chosen for your data"):].splitlines()[:4]
    assert block[1].startswith("  VAE check on 32 of your images: ") and "training a first stage" in block[1]
    assert block[2].startswith("  text encoder: tiny local CLIP -> vocabulary from your captions (")
    assert "first stage: training a VAE" in out
    weights = Path(result["run_dir"]) / "first_stage" / "autoencoder.safetensors"
    ckpt = torch.load(result["last_checkpoint"], weights_only=True)
    assert ckpt["ldm"]["model"]["model"]["autoencoder"]["weights"] == str(weights)
    assert ckpt["ldm"]["model"]["model"]["text_encoder"]["frozen"] is False


def test_the_first_stage_run_accumulates_nothing(tmp_path, glyphs):
    """The diffusion stage's accumulation (auto: 8 batches of 8 here) is not the first stage's: AutoencoderTraining
    optimises manually, once per batch of first_stage.batch_size."""
    from ldm.training.run.auto_defaults import resolve_auto
    from ldm.training.run.first_stage import first_stage_config

    cfg = folder_cfg(tmp_path, glyphs, "data.batch_size=2")
    resolve_auto(cfg, say=lambda line: None)
    assert cfg.trainer.accumulate_grad_batches == 2  # 40 glyphs: batch 4 wanted (a tenth), 2 x 2
    assert first_stage_config(cfg, tmp_path).trainer.accumulate_grad_batches == 1


def test_an_hf_dataset_lists_its_captions_without_decoding_images(tmp_path):
    datasets = pytest.importorskip("datasets")
    from ldm.data.hf_dataset import HFDataset

    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)],
                                     "text": ["a red kite", "a blue kite", None, "a kite"]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    assert HFDataset(tmp_path / "hf", resolution=8).captions == ["a red kite", "a blue kite", "", "a kite"]
    cfg = compose_train(tmp_path, ["data=hf", f"data.train.path={tmp_path / 'hf'}", "data.train.resolution=8"])
    assert "vocabulary from your captions (4 words)" in choose_text_encoder(cfg)
    assert {"red", "blue", "kite"} <= set(" ".join(cfg.model.text_encoder.words).split())


def test_a_module_built_outside_train_takes_the_presets_own_values(tmp_path, glyphs):
    """build_diffusion_module on a composed data=folder config (no data read, no first stage trained): the
    shipped VAE, the tiny CLIP's own words, frozen."""
    from ldm.training.run.train import build_diffusion_module

    module = build_diffusion_module(folder_cfg(tmp_path, glyphs))
    assert module.model_config["model"]["autoencoder"]["weights"] == SHIPPED
    assert module.text_encoder.frozen and "words" not in module.model_config["model"]["text_encoder"]
