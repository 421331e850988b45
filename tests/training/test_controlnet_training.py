"""adapter=controlnet: on a frozen base only the ControlNet (and its EMA) trains and is checkpointed, its loss on the
pairs falls, the run writes a diffusers folder that ControlNetModel.from_pretrained loads unchanged (and our
control_model.* file), and a stopped run resumes exactly. Data: data=controlnet over a folder of pairs."""

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from ldm.data.collate import collate_image_caption
from ldm.formats.controlnet_file import read_controlnet
from ldm.pipelines.sampling_options import SamplingOptions
from ldm.training.run.train import build_diffusion_module, train
from tests.helpers import ROOT
from tests.helpers.control_pairs import write_control_pairs
from tests.helpers.training import CKPT, TINY_MODEL, assert_same_run, child_env, logged_losses
from tests.helpers.training import base  # noqa: F401 - the trained tiny base fixture

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_control_pairs(tmp_path_factory.mktemp("pairs"))


# the sampling callback at the end: 3 items drawn from the data, each as control | sample | real
SAMPLING = ["+callbacks.sampling._target_=ldm.training.callbacks.sampling.SamplingCallback",
            "+callbacks.sampling.n_prompts=3", "+callbacks.sampling.every_n_steps=0", "+callbacks.sampling.sampler=ddim"]


def controlnet_args(pairs):
    images, controls = pairs
    return ["adapter=controlnet", "adapter.hint_channels=[8,16]", "data=controlnet", f"data.train.root={images}",
            f"data.train.conditioning_root={controls}", "data.num_workers=0", "data.batch_size=4",
            "data.train.resolution=16"]


def fixed_loss(module, dataset):
    """The deterministic validation loss over every pair (fixed timesteps and noise)."""
    module.eval()
    batch = collate_image_caption([dataset[i] for i in range(len(dataset))])
    return float(module.validation_loss(batch, 0))


def test_controlnet_trains_on_a_frozen_base_and_writes_files(tiny_cfg, base, pairs):
    from diffusers import ControlNetModel

    cfg = tiny_cfg(base, *controlnet_args(pairs), "trainer.max_steps=40", "optim.lr=2e-3", "module.ema_decay=0.9",
                   *CKPT, *SAMPLING)
    L.seed_everything(cfg.seed)
    module = build_diffusion_module(cfg)
    opt = module.configure_optimizers()["optimizer"]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in module.controlnet.parameters()}
    assert not any(p.requires_grad for p in module.unet.parameters())
    from ldm.data.control_pairs import ControlPairsDataset

    dataset = ControlPairsDataset(root=str(pairs[0]), conditioning_root=str(pairs[1]), resolution=16)
    item = dataset[0]
    assert item["conditioning_image"].shape == (3, 16, 16) and item["conditioning_image"].min() >= 0
    before = fixed_loss(module, dataset)  # a fresh ControlNet adds zeros: the base's loss

    result = train(cfg)
    ckpt = torch.load(result["last_checkpoint"], weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith(("controlnet.", "ema.")) for k in ckpt["state_dict"])
    assert ckpt["ldm"]["controlnet"]["hint_channels"] == [8, 16]
    # the checkpoint loads as its base model (sample.py ckpt=<run ckpt> controlnet=<run>/controlnet)
    from ldm.formats.load import load_bundle

    L.seed_everything(cfg.seed)
    fresh = build_diffusion_module(cfg)
    loaded = load_bundle(result["last_checkpoint"])
    assert loaded.meta["controlnet"]["hint_channels"] == [8, 16]
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in fresh.unet.state_dict().items())
    raw = {k[len("controlnet."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("controlnet.")}
    module.controlnet.load_state_dict(raw)
    after = fixed_loss(module, dataset)
    print(f"fixed-batch loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, (before, after)

    # the files: the EMA ControlNet, in diffusers' folder (loaded unchanged by diffusers) and control_model.*
    ema = {k[len("ema.model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.model.")}
    folder = read_controlnet(result["files"]["controlnet"])
    single = read_controlnet(result["files"]["controlnet_single_file"])
    for net in (folder, single):
        assert all(torch.equal(net.state_dict()[k], v) for k, v in ema.items())
    theirs = ControlNetModel.from_pretrained(result["files"]["controlnet"])
    assert sum(p.numel() for p in theirs.parameters()) == sum(v.numel() for v in ema.values())

    # the sampling callback's grid: control | sample | real per item, the sample made with the (EMA) ControlNet
    from ldm.training.callbacks.sampling import generate

    grid = sorted((Path(result["run_dir"]) / "samples").glob("step_*.png"))
    assert grid
    hint = torch.stack([dataset[i]["conditioning_image"] for i in range(2)])
    args = dict(prompts=["a red square", "a blue square"], sampler=SamplingOptions(name="ddim", steps=3),
                guidance_scale=2.0, seed=0, resolution=16)
    module.ema.model.load_state_dict(ema)
    with_control = generate(module, **args, control_images=hint)
    from ldm.pipelines import text_to_image
    from ldm.pipelines.controlnet import Control

    with module.sampling_bundle() as bundle:
        direct = text_to_image(bundle, args["prompts"], sampler=args["sampler"], guidance_scale=2.0, seed=0,
                               height=16, width=16, control=[Control(module.ema.model, hint)])
    torch.testing.assert_close(with_control, direct)
    assert (with_control - generate(module, **args)).abs().max() > 1e-3


def test_controlnet_trains_from_the_latent_cache(tiny_cfg, base, pairs, tmp_path):
    from safetensors import safe_open

    cache = tmp_path / "latents"
    result = train(tiny_cfg(base, *controlnet_args(pairs), f"++data.latent_cache={cache}", "trainer.max_steps=3"))
    assert result["global_step"] == 3
    shards = list(cache.rglob("*.safetensors"))
    assert shards
    with safe_open(str(shards[0]), framework="pt") as f:
        assert "conditioning_image" in f.keys() and f.get_slice("conditioning_image").get_dtype() == "U8"


def test_the_shapes_silhouette_task_trains_from_its_cache(tiny_cfg, base, tmp_path):
    """data=shapes_silhouette: the shapes with their silhouettes as control images, through the latent cache."""
    result = train(tiny_cfg(base, "adapter=controlnet", "adapter.hint_channels=[8,16]", "data=shapes_silhouette",
                            "data.train.size=8", "data.val.size=4", "data.val.resolution=16",
                            f"++data.latent_cache={tmp_path / 'latents'}", "trainer.max_steps=2"))
    assert result["global_step"] == 2 and (Path(result["run_dir"]) / "controlnet" / "config.json").is_file()


@pytest.fixture(scope="module")
def mixed_pairs(tmp_path_factory):
    from tests.helpers.control_pairs import write_mixed_pairs

    return write_mixed_pairs(tmp_path_factory.mktemp("mixed_pairs"))


BUCKETED = ["data.train.buckets.enabled=true", "data.train.buckets.step=8", "data.train.random_flip=true",
            "data.batch_size=3"]


def test_controlnet_trains_with_buckets_and_flips_from_the_latent_cache(tiny_cfg, base, mixed_pairs, tmp_path,
                                                                        capsys):
    """Pairs of three aspect ratios: batches of one bucket, the cache holding each control image at its bucket size
    (both flips), and the sampling grid drawn at the buckets' sizes as control | sample | real."""
    from safetensors import safe_open

    cache = tmp_path / "latents"
    result = train(tiny_cfg(base, *controlnet_args(mixed_pairs), *BUCKETED, f"++data.latent_cache={cache}",
                            "trainer.max_steps=3", *CKPT, *SAMPLING))
    assert result["global_step"] == 3
    out = capsys.readouterr().out
    assert "aspect-ratio buckets" in out and "24 x 8" in out and "8 x 24" in out
    shapes = set()
    for shard in cache.rglob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            latents, control = f.get_slice("mean").get_shape(), f.get_slice("conditioning_image").get_shape()
            assert latents[0] == control[0] and [2 * n for n in latents[2:]] == control[2:]  # the tiny VAE: /2
            shapes.add(tuple(control[2:]))
    assert shapes == {(8, 24), (24, 8), (16, 16)}
    ckpt = torch.load(result["last_checkpoint"], weights_only=True)
    assert sorted(map(tuple, ckpt["ldm"]["model"]["buckets"]["buckets"])) == [(8, 24), (16, 16), (24, 8)]
    from PIL import Image

    grid = Image.open(result["sample_grid"])
    assert grid.size[0] > grid.size[1]  # control | sample | real cells per caption, at their own sizes


def test_an_sdxl_controlnet_run_writes_a_folder_diffusers_loads(tmp_path, pairs):
    """SDXL shapes (vector conditioning through label_emb / add_embedding, dual text encoder contexts)."""
    from diffusers import ControlNetModel

    from tests.helpers.training import compose_train

    images, controls = pairs
    cfg = compose_train(tmp_path, ["model=sdxl_tiny", *controlnet_args(pairs), "trainer.max_steps=2",
                                   "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
                                   "trainer.enable_model_summary=false", "lr_scheduler.warmup_steps=1",
                                   "callbacks=none", "++data.latent_cache=null"])
    result = train(cfg)
    assert result["global_step"] == 2
    theirs = ControlNetModel.from_pretrained(result["files"]["controlnet"])
    assert theirs.config.addition_embed_type == "text_time"
    ours = read_controlnet(result["files"]["controlnet"])
    assert ours.config["adm_in_channels"] == 1552


def test_controlnet_needs_pairs(tiny_cfg, base, pairs, tmp_path):
    from ldm.data.control_pairs import ControlPairsDataset

    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no conditioning image for 16"):
        ControlPairsDataset(root=str(pairs[0]), conditioning_root=str(empty))
    with pytest.raises(Exception, match=r"adapter.hint_channels \[16, 32, 96, 256\] downsample by 8 but the VAE by 2"):
        build_diffusion_module(tiny_cfg(base, "adapter=controlnet", "adapter.hint_channels=[16,32,96,256]"))
    auto = build_diffusion_module(tiny_cfg(base, "adapter=controlnet"))  # auto: one stride-2 step for factor 2
    assert list(auto.part.net.config["hint_channels"]) == [16, 32]
    module = build_diffusion_module(tiny_cfg(base, "adapter=controlnet", "adapter.hint_channels=[8,16]"))
    batch = {"caption": ["x"], "image": torch.zeros(1, 3, 16, 16)}
    with pytest.raises(ValueError, match="data=controlnet"):
        module.validation_loss(batch, 0)


@pytest.mark.slow
@pytest.mark.parametrize("data, stop", [("pairs", 6), ("mixed_pairs", 7)], ids=["square", "buckets"])
def test_controlnet_run_stopped_and_resumed_equals_uninterrupted(tmp_path, base, request, data, stop):
    """16 square pairs in batches of 4 (stopped mid-epoch 1), or the mixed pairs with buckets and flips from the
    latent cache: 3 batches of one bucket per epoch (stopped mid-epoch 2)."""
    extra_data = BUCKETED if data == "mixed_pairs" else []
    pairs = request.getfixturevalue(data)

    def cmd(run, *extra):
        overrides = [o for o in TINY_MODEL if not o.startswith(("trainer.max_steps", "data.batch_size",
                                                                  "data.train.resolution"))]
        return [sys.executable, "train.py", *overrides, base, *controlnet_args(pairs), *extra_data,
                f"paths.run_dir={run}",
                f"paths.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=10", "trainer.val_check_interval=null",
                "trainer.limit_val_batches=0", "module.ema_decay=0.9", "trainer.deterministic=true",
                "optim.lr=2e-3", *CKPT, "+callbacks.checkpoint.save_top_k=-1",
                "+logger.csv.flush_logs_every_n_steps=1", "hydra.run.dir=" + str(run / "hydra"), *extra]

    ref = tmp_path / "ref"
    subprocess.run(cmd(ref), cwd=ROOT, env=child_env(), check=True, capture_output=True)
    assert [s for s, _ in logged_losses(ref)][-1] == 9
    run = tmp_path / "stopped"
    every = "+callbacks.checkpoint.every_n_train_steps=1"
    subprocess.run([*cmd(run, every), f"trainer.max_steps={stop}"], cwd=ROOT, env=child_env(), check=True,
                   capture_output=True)
    subprocess.run([*cmd(run, every), "ckpt_path=last"], cwd=ROOT, env=child_env(), check=True, capture_output=True)
    assert_same_run(ref, run)


class RecordControlNet(L.Callback):
    """Writes each rank's trained indices, final ControlNet and EMA weights, and the files it wrote (spawned
    processes pickle it: module level). on_fit_end runs after the module's on_train_end, which writes the files."""

    def __init__(self, out: str):
        self.out, self.seen = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += batch["index"].tolist()

    def on_fit_end(self, trainer, pl_module):
        torch.save({"seen": self.seen, "controlnet": pl_module.controlnet.state_dict(),
                    "ema": pl_module.ema.model.state_dict(), "written": dict(pl_module.written_files)},
                   Path(self.out, f"rank{trainer.global_rank}.pt"))


@pytest.mark.slow  # two spawned processes: 42 s on the shared 2-core machine
def test_two_process_ddp_trains_one_controlnet_and_rank_0_writes_it(tiny_cfg, base, pairs, tmp_path):
    """adapter=controlnet under 2-process DDP (gloo): the ranks split the epoch, end with identical ControlNets (and
    EMAs) that did train, and only rank 0 writes the run's files, which load (ours and diffusers')."""
    from diffusers import ControlNetModel
    from hydra.utils import instantiate

    cfg = tiny_cfg(base, *controlnet_args(pairs), "module.ema_decay=0.9", "optim.lr=2e-3",
                   "trainer.limit_val_batches=0")
    L.seed_everything(0)
    module = build_diffusion_module(cfg)
    module.run_dir = tmp_path / "run"  # train(cfg) sets it; the files go there
    initial = {k: v.clone() for k, v in module.controlnet.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[RecordControlNet(str(tmp_path))],
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=instantiate(cfg.data))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == list(range(16))  # 16 pairs: disjoint, the whole epoch
    for name in ("controlnet", "ema"):
        a, b = ranks[0][name], ranks[1][name]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trained = ranks[0]["controlnet"]
    assert any(not torch.equal(trained[k], initial[k]) for k in initial if trained[k].is_floating_point())
    # rank 0 wrote the files, rank 1 nothing
    assert set(ranks[0]["written"]) == {"controlnet", "controlnet_single_file"} and ranks[1]["written"] == {}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["controlnet", "controlnet.safetensors"]
    for path in ranks[0]["written"].values():  # the EMA weights, as every run writes them
        net = read_controlnet(path)
        assert all(torch.equal(net.state_dict()[k], v) for k, v in ranks[0]["ema"].items())
    theirs = ControlNetModel.from_pretrained(ranks[0]["written"]["controlnet"])
    assert sum(p.numel() for p in theirs.parameters()) == sum(v.numel() for v in ranks[0]["ema"].values())
