"""Every config group composes, every _target_ imports, and each group instantiates (GPU trainers and the
full-size SD models are only located, not built)."""

from pathlib import Path

import pytest
from hydra._internal.utils import _locate
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.helpers import CONFIGS
from tests.helpers.training import compose_train

GROUPS = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in Path(CONFIGS).iterdir() if p.is_dir()}
OPTIONS = [(g, o) for g, opts in GROUPS.items() if g not in ("hydra", "sampler") for o in opts]
NOT_BUILT_HERE = {("trainer", "gpu"), ("trainer", "ddp"), ("trainer", "fsdp"), ("model", "sd15"),
                  ("model", "sd21"), ("model", "sdxl"), ("model", "sd3_medium"), ("model", "sd35_medium"),
                  ("model", "sd35_large"), ("model", "flux_dev"), ("model", "flux_schnell")}
CPU = ["trainer.accelerator=cpu", "trainer.precision=32", "trainer.devices=1"]
REQUIRED = {("trainer", "ddp_multinode"): CPU, ("trainer", "fsdp2"): CPU, ("data", "folder"): ["data.train.root=REPLACE"],
            ("data", "hf"): ["data.train.path=REPLACE"],
            ("data", "webdataset"): ["data.train.urls=REPLACE"],
            ("data", "controlnet"): ["data.train.root=REPLACE", "data.train.conditioning_root=REPLACE"],
            ("data", "latent_cache"): ["data.train.path=REPLACE"], ("model", "sd15"): ["model.pretrained=x"],
            ("model", "sd21"): ["model.pretrained=x"], ("model", "sdxl"): ["model.pretrained=x"],
            ("experiment", "sdxl_finetune"): ["model.pretrained=x", "data.train.root=REPLACE"],
            ("experiment", "sd15_finetune"): ["model.pretrained=x", "data.train.root=REPLACE"],
            ("experiment", "sd3_finetune"): ["model.pretrained=x", "data.train.root=REPLACE"],
            ("model", "sd3_medium"): ["model.pretrained=x"], ("model", "sd35_medium"): ["model.pretrained=x"],
            ("model", "sd35_large"): ["model.pretrained=x"], ("model", "flux_dev"): ["model.pretrained=x"],
            ("model", "flux_schnell"): ["model.pretrained=x"],
            ("experiment", "own_data"): ["data.train.root=REPLACE"],
            ("data", "dreambooth"): ["data.train.instance_root=REPLACE", "data.train.instance_prompt=x"],
            ("experiment", "dreambooth_shapes"): ["data.train.instance_root=REPLACE"]}


def _targets(node):
    if OmegaConf.is_dict(node):
        if "_target_" in node:
            yield node._target_
        for v in node.values():
            yield from _targets(v)
    elif OmegaConf.is_list(node):
        for v in node:
            yield from _targets(v)


def test_groups_present():
    for g in ("model", "data", "schedule", "module", "trainer", "callbacks", "logger", "experiment", "paths",
              "hparams_search"):
        assert g in GROUPS, g


@pytest.mark.parametrize("group,option", OPTIONS)
def test_group_composes_and_instantiates(tmp_path, group, option):
    extra = [o.replace("REPLACE", str(tmp_path)) for o in REQUIRED.get((group, option), [])]
    cfg = compose_train(tmp_path, [f"{group}={option}", *extra])
    node = cfg if group in ("experiment", "hparams_search", "paths") else cfg[group]
    for target in _targets(node):
        assert _locate(target) is not None, target
    if (group, option) in NOT_BUILT_HERE or group in ("experiment", "hparams_search", "paths"):
        return
    if group == "model":
        OmegaConf.update(cfg, "model.autoencoder.weights", None)
        for part in ("unet", "autoencoder", "text_encoder"):
            assert instantiate(cfg.model[part]) is not None
    elif group == "data":
        if option == "shapes":
            dm = instantiate(cfg.data)
            dm.setup("fit")
            assert len(dm.train_dataset) > 0
        else:
            assert callable(instantiate(cfg.data.train, _partial_=True))
    elif group in ("callbacks", "logger"):
        built = [instantiate(c) for c in cfg[group].values()]
        assert all(b is not None for b in built)
    elif group == "module":
        assert callable(instantiate(cfg.module, _partial_=True))
    else:
        assert instantiate(cfg[group]) is not None


def test_fsdp_strategy_builds_and_wraps_unet_blocks(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    from ldm.models.unet import BasicTransformerBlock, ResBlock
    from ldm.training.build.strategies import unet_block_wrap_policy

    assert unet_block_wrap_policy() == {ResBlock, BasicTransformerBlock}
    cfg = compose_train(tmp_path, ["trainer=fsdp"])
    assert isinstance(instantiate(cfg.trainer.strategy), FSDPStrategy)


def test_fsdp2_builds_lightnings_model_parallel_strategy_on_the_cpu(tmp_path):
    """trainer=fsdp2: FSDP2 through ModelParallelStrategy, one data-parallel dimension over every rank (no tensor
    parallelism), sharded checkpoints by default; it builds for a CPU accelerator (FSDPStrategy refuses one)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from ldm.models.mmdit import JointBlock
    from ldm.training.build.strategies import ShardedDataParallel, unet_block_wrap_policy
    from ldm.training.module.sharded.fsdp2 import denoiser_blocks

    assert unet_block_wrap_policy() < denoiser_blocks() and JointBlock in denoiser_blocks()
    cfg = compose_train(tmp_path, ["trainer=fsdp2", *CPU])
    trainer = instantiate(cfg.trainer)
    assert isinstance(trainer.strategy, ShardedDataParallel) and isinstance(trainer.strategy, ModelParallelStrategy)
    assert trainer.strategy._tensor_parallel_size == 1 and trainer.strategy._save_distributed_checkpoint


def test_ddp_multinode_builds_with_its_process_group_timeout(tmp_path):
    """The strategy the 2-node runs of tests/training/test_multinode.py use, with the timeout a survivor waits for a
    dead node's collective (Lightning's DDPStrategy passes it to init_process_group)."""
    import datetime

    from lightning.pytorch.strategies import DDPStrategy

    cfg = compose_train(tmp_path, ["trainer=ddp_multinode", *CPU, "trainer.strategy.timeout.seconds=42"])
    trainer = instantiate(cfg.trainer)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_nodes == 2
    assert trainer.strategy._timeout == datetime.timedelta(seconds=42)


def test_top_level_schema_rejects_unknown_keys(tmp_path):
    with pytest.raises(Exception, match="not_a_key"):
        compose_train(tmp_path, ["not_a_key=1"])


def test_ckpt_path_auto_starts_fresh_then_resumes_the_run_folder(tmp_path):
    """ckpt_path=auto: one command for a first start and every restart (torchrun --max-restarts, a requeue)."""
    import torch

    from ldm.training.run.train import prepare_run_folder

    cfg = compose_train(tmp_path, ["ckpt_path=auto"])
    run_dir, ckpt = prepare_run_folder(cfg)
    assert ckpt is None and cfg.ckpt_path is None, "no last.ckpt yet: a fresh start"
    (run_dir / "checkpoints").mkdir()
    torch.save({"global_step": 3}, run_dir / "checkpoints" / "last.ckpt")
    cfg = compose_train(tmp_path, ["ckpt_path=auto"])
    assert prepare_run_folder(cfg) == (run_dir, str(run_dir / "checkpoints" / "last.ckpt"))
