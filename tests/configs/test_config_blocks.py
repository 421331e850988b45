"""Blocks that several configs share are written once (configs/data/{loader,captions,buckets}/) and composed through
`defaults:`; each block states its class's defaults, and the keys users override on the command line still land."""

import inspect
from dataclasses import asdict
from pathlib import Path

import pytest
from hydra._internal.utils import _locate
from omegaconf import OmegaConf

from ldm.data.buckets import BucketSettings
from ldm.data.captions import CaptionProcessor
from tests.helpers.training import compose_train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SOURCES = {"folder": "data.train.root", "hf": "data.train.path", "webdataset": "data.train.urls"}


def _data(tmp_path, source, *overrides):
    return compose_train(tmp_path, [f"data={source}", f"{SOURCES[source]}={tmp_path}", *overrides]).data


@pytest.mark.parametrize("source", SOURCES)
def test_the_caption_block_is_every_caption_option_at_its_default(tmp_path, source):
    captions = OmegaConf.to_container(_data(tmp_path, source).train.captions, resolve=False)
    assert captions.pop("seed") == "${seed}"  # the run's seed
    expected = asdict(CaptionProcessor())
    del expected["seed"]
    if source != "folder":  # caption sidecar files exist in an image folder only (HFDataset refuses the key)
        del expected["extension"]
    assert captions == expected


@pytest.mark.parametrize("source", ["folder", "hf"])
def test_the_bucket_block_is_every_bucket_setting_at_its_default(tmp_path, source):
    buckets = OmegaConf.to_container(_data(tmp_path, source).train.buckets)
    assert buckets == asdict(BucketSettings())


@pytest.mark.parametrize("source", SOURCES)
def test_the_loader_block_is_shared(tmp_path, source):
    data = _data(tmp_path, source)
    assert (data.batch_size, data.num_workers) == (8, 2)
    assert OmegaConf.to_container(data, resolve=False)["latent_cache"] == "${paths.cache_dir}/latents"


def test_command_line_overrides_land_in_the_shared_blocks(tmp_path):
    """The overrides the README shows."""
    data = _data(tmp_path, "folder", "data.train.captions.extension=.caption", "data.train.captions.prefix='sks,'",
                 "data.train.captions.shuffle=true", "data.train.captions.keep_tokens=1",
                 "data.train.captions.tag_dropout=0.1", "data.train.resolution=32", "data.train.buckets.enabled=true",
                 "data.train.buckets.step=16", "data.batch_size=16", "data.latent_cache=null")
    assert CaptionProcessor.of({**data.train.captions, "seed": 0}) == CaptionProcessor(
        prefix="sks,", shuffle=True, keep_tokens=1, tag_dropout=0.1, extension=".caption")
    assert BucketSettings.of(data.train.buckets) == BucketSettings(enabled=True, step=16)
    assert (data.train.resolution, data.batch_size, data.latent_cache) == (32, 16, None)
    hf = _data(tmp_path, "hf", "data.train.captions.wildcards=true", "data.train.buckets.no_upscale=true")
    assert hf.train.captions.wildcards and hf.train.buckets.no_upscale
    assert _data(tmp_path, "webdataset", "data.train.captions.suffix=x").train.captions.suffix == "x"


def test_an_experiment_overrides_a_shared_block(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=own_data", f"data.train.root={tmp_path}", "data.train.resolution=32",
                                   "data.train.captions.separator='|'"])
    assert (cfg.data.batch_size, cfg.data.num_workers) == ("auto", 0)  # own_data's, over the loader block's
    assert cfg.data.train.resolution == 32 and cfg.data.train.captions.separator == "|"


def _schema_defaults(config: str, tmp_path: Path) -> dict:
    """The defaults of configs/<config>.yaml's schema, as Hydra's ConfigStore holds it (``<config>_schema``)."""
    from hydra.core.config_store import ConfigStore

    from ldm.cli.evaluate_config import register_configs as evaluate
    from ldm.pipelines.cli import register_configs as sample

    if config == "train":
        compose_train(tmp_path, [])  # registers train_schema, wherever the training package keeps it
    else:
        {"sample": sample, "evaluate": evaluate}[config]()
    return OmegaConf.to_container(OmegaConf.create(ConfigStore.instance().load(f"{config}_schema.yaml").node))


@pytest.mark.parametrize("config", ["train", "sample", "evaluate"])
def test_a_primary_config_restates_no_default_of_its_schema(config, tmp_path):
    """The schema (a dataclass) is the one place of a top-level default: the yaml only sets what differs."""
    defaults = _schema_defaults(config, tmp_path)
    written = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{config}.yaml"))
    restated = sorted(k for k, v in written.items() if k in defaults and v == defaults[k])
    assert restated == [], f"configs/{config}.yaml restates the schema's defaults of {restated}"


# module/diffusion.yaml's deliberate choices over LatentDiffusion's own defaults (a library user gets plain MSE)
MODULE_CHOICES = {"min_snr_gamma"}


def _disagreements(node, where: str):
    """(key, the config's value, the _target_'s default) of every ldm _target_ node under `node`."""
    if not OmegaConf.is_dict(node):
        return
    target = node.get("_target_")
    if isinstance(target, str) and target.startswith("ldm."):
        parameters = inspect.signature(_locate(target)).parameters
        for key, value in node.items():
            default = parameters[key].default if key in parameters else inspect.Parameter.empty
            if default is not inspect.Parameter.empty and not OmegaConf.is_config(value) and value != default:
                yield f"{where}.{key}", value, default
    for key, value in node.items():
        yield from _disagreements(value, f"{where}.{key}")


def test_the_diffusion_module_config_and_its_class_agree_on_defaults(tmp_path):
    """A default the config states is the class's too (EMA decay once said 0.999 in the yaml, 0.9999 in the code)."""
    module = compose_train(tmp_path, []).module
    found = [d for d in _disagreements(module, "module") if d[0].removeprefix("module.") not in MODULE_CHOICES]
    assert found == []
