"""adapter=textual_inversion: only the placeholder's vectors are optimised (every other embedding row and every
U-Net weight bit-identical after steps), only they are checkpointed, the run writes the diffusers and A1111 files,
sample.py embeddings=[FILE] loads them and gives the encoder the run trained, the sampling callback samples with
the learned tokens, and bad options name their key."""

from pathlib import Path

import lightning as L
import pytest
import torch

from ldm.formats.embeddings import read_embedding
from ldm.training.run.train import ConfigError, build_diffusion_module, train
from tests.helpers.sample import ckpt_config as sample_config
from tests.helpers.training import CKPT, stopped_and_resumed
from tests.helpers.training import base  # noqa: F401 - the trained tiny base fixture

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "<new-colour>"
TI = ["adapter=textual_inversion", f"adapter.placeholder_token='{TOKEN}'", "adapter.init_token=blue",
      "+data.train.colors=[cyan]", f"+data.train.template='a {TOKEN} {{shape}} on a {{background}} background'"]


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1,
            "caption": [f"a {TOKEN} circle on a white background"] * n}


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_only_the_new_rows_train(tiny_cfg, base, num_vectors):  # noqa: F811
    cfg = tiny_cfg(base, *TI, f"adapter.num_vectors={num_vectors}", "adapter.lr=0.05", "module.p_uncond=0.0")
    L.seed_everything(cfg.seed)
    module = build_diffusion_module(cfg)
    te, ti = module.text_encoder, module.textual_inversion
    table = te.model.get_input_embeddings()
    init_id = te.tokenizer("blue", add_special_tokens=False).input_ids[0]
    assert ti.vectors.shape == (num_vectors, te.context_dim) and ti.first_id == table.num_embeddings - num_vectors
    assert torch.equal(ti.vectors, table.weight[init_id].expand(num_vectors, -1))  # starts at the init token
    opt = module.configure_optimizers()["optimizer"]
    assert [p for g in opt.param_groups for p in g["params"]] == [ti.vectors]
    assert [g["lr"] for g in opt.param_groups] == [0.05]
    frozen = {**{"te." + k: v.clone() for k, v in te.state_dict().items()},
              **{"unet." + k: v.clone() for k, v in module.unet.state_dict().items()}}
    start = ti.vectors.detach().clone()
    module.train()
    for step in range(3):
        opt.zero_grad()
        module.step_loss(batch(seed=step)).backward()
        assert ti.vectors.grad is not None and ti.vectors.grad.abs().sum() > 0
        opt.step()
    after = {**{"te." + k: v for k, v in te.state_dict().items()},
             **{"unet." + k: v for k, v in module.unet.state_dict().items()}}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen), "a frozen weight changed"
    assert not any(p.requires_grad for p in [*te.parameters(), *module.unet.parameters()])
    assert (ti.vectors - start).abs().amax(dim=1).min() > 0  # every vector moved
    ids = te.tokenize([f"a {TOKEN} circle"])
    assert int((ids >= ti.first_id).sum()) == num_vectors  # the prompt's placeholder expands to all its tokens


def test_a_run_writes_the_files_and_sample_py_loads_them(tiny_cfg, base, tmp_path):  # noqa: F811
    from ldm.formats.load import load_bundle
    from ldm.pipelines.cli import sample

    cfg = tiny_cfg(base, *TI, "adapter.num_vectors=2", "adapter.lr=0.05", "module.ema_decay=0.9", "data.train.size=16",
                   *CKPT)
    result = train(cfg)
    run = Path(result["run_dir"])
    ckpt = torch.load(result["last_checkpoint"], weights_only=True)
    assert sorted(ckpt["state_dict"]) == ["ema.model.vectors", "ema.num_updates", "textual_inversion.vectors"]
    assert ckpt["ldm"]["textual_inversion"]["placeholder_token"] == TOKEN
    diffusers_file = read_embedding(run / "learned_embeds.safetensors")
    a1111 = read_embedding(run / "new-colour.safetensors")
    assert (diffusers_file.token, diffusers_file.layout, a1111.layout) == (TOKEN, "diffusers", "emb_params")
    from safetensors import safe_open

    with safe_open(str(run / "new-colour.safetensors"), "pt") as f:  # sd-scripts' keys (train_textual_inversion.py)
        meta = f.metadata()
    assert (meta["modelspec.architecture"], meta["modelspec.sai_model_spec"], meta["modelspec.prediction_type"]) == (
        "stable-diffusion-v1/textual-inversion", "1.0.1", "epsilon")
    torch.testing.assert_close(diffusers_file.vectors, ckpt["state_dict"]["ema.model.vectors"])  # the EMA vectors
    torch.testing.assert_close(a1111.vectors, diffusers_file.vectors)
    assert not torch.equal(ckpt["state_dict"]["ema.model.vectors"], ckpt["state_dict"]["textual_inversion.vectors"])

    base_ckpt = base.split("=", 1)[1]
    prompt = f"a {TOKEN} square on a black background"
    first = sample(sample_config(base_ckpt, tmp_path / "a", f"prompt='{prompt}'", "guidance_scale=2.0",
                          f"embeddings=[{run / 'learned_embeds.safetensors'}]"))
    second = sample(sample_config(base_ckpt, tmp_path / "b", f"prompt='{prompt}'", "guidance_scale=2.0",
                           f"embeddings=['{run / 'new-colour.safetensors'}:{TOKEN}']"))
    assert first[0].read_bytes() != b"" and first[0].name == "00000.png"
    from ldm.pipelines.png import read_parameters

    assert read_parameters(first[0])["embeddings"] == ["learned_embeds.safetensors"]  # a shareable name (issue 25)
    from PIL import Image
    import numpy as np

    a, b = (np.asarray(Image.open(p[0])) for p in (first, second))
    assert np.array_equal(a, b)  # both files carry the same vectors
    # the encoder sample.py builds is the one the run trained (the EMA vectors in the base encoder)
    L.seed_everything(cfg.seed)
    trained = build_diffusion_module(cfg)
    trained.load_state_dict(ckpt["state_dict"], strict=False)
    from ldm.formats.embeddings import load_embedding_files

    loaded = load_bundle(base_ckpt).text_encoder
    load_embedding_files(loaded, [str(run / "learned_embeds.safetensors")], report=lambda _m: None)
    with torch.no_grad():
        torch.testing.assert_close(loaded([prompt]), trained.bundle(use_ema=True).text_encoder([prompt]),
                                   atol=1e-6, rtol=1e-6)
        # sample.py ckpt=<run>/checkpoints/last.ckpt: the base from model.pretrained + the checkpoint's EMA vectors
        torch.testing.assert_close(load_bundle(result["last_checkpoint"]).text_encoder([prompt]), loaded([prompt]),
                                   atol=1e-6, rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="embeddings: file not found"):
        sample(sample_config(base_ckpt, tmp_path / "c", f"prompt='{prompt}'", f"embeddings=[{tmp_path / 'nope.safetensors'}]"))


def test_sampling_callback_samples_with_the_learned_tokens(tiny_cfg, base):  # noqa: F811
    from ldm.pipelines import text_to_image
    from ldm.pipelines.common import SamplingOptions
    from ldm.training.callbacks.sampling import generate

    module = build_diffusion_module(tiny_cfg(base, *TI, "module.ema_decay=0.9"))
    ddim = SamplingOptions(name="ddim", steps=2)
    args = dict(prompts=[f"a {TOKEN} circle"], sampler=ddim, guidance_scale=2.0, seed=0, resolution=16)
    def context(use_ema):
        with module.sampling_bundle(use_ema=use_ema) as bundle, torch.no_grad():
            return bundle.text_encoder(args["prompts"])

    before, context_before = generate(module, **args), context(True)
    with torch.no_grad():
        module.textual_inversion.vectors.normal_(std=2.0)
    assert torch.equal(generate(module, **args, use_ema=True), before)  # the EMA vectors did not move
    assert torch.equal(context(True), context_before)
    assert (context(False) - context_before).abs().max() > 0.1  # the live vectors reach the sampler's encoder
    raw = generate(module, **args, use_ema=False)
    assert not torch.equal(raw, before)  # (a 4-step base barely listens to its context: small, but not zero)
    merged = module.bundle(use_ema=False)  # a copy with the vectors in its rows == the training encoder
    torch.testing.assert_close(text_to_image(merged, args["prompts"], sampler=ddim, guidance_scale=2.0, seed=0,
                                             height=16, width=16), raw, atol=1e-5, rtol=1e-5)
    module.train()  # the splicing hook is back after sampling: gradients reach the vectors again
    module.step_loss(batch()).backward()
    assert module.textual_inversion.vectors.grad is not None


def test_bad_options_name_the_key(tiny_cfg):
    with pytest.raises(ConfigError, match="adapter.init_token='toyish'.*tokens"):
        build_diffusion_module(tiny_cfg("adapter=textual_inversion", "adapter.init_token=toyish"))
    with pytest.raises(ConfigError, match="adapter.placeholder_token='blue'.*already"):
        build_diffusion_module(tiny_cfg("adapter=textual_inversion", "adapter.placeholder_token=blue"))
    with pytest.raises(ConfigError, match="adapter.num_vectors"):
        build_diffusion_module(tiny_cfg("adapter=textual_inversion", "adapter.num_vectors=0"))
    with pytest.raises(ConfigError, match="adapter.placeholder_token.*spaces"):
        build_diffusion_module(tiny_cfg("adapter=textual_inversion", "adapter.placeholder_token='a b'"))


@pytest.mark.slow
def test_textual_inversion_run_stopped_and_resumed_equals_uninterrupted(tmp_path, base):  # noqa: F811
    args = [base, *TI, "adapter.num_vectors=2", "optim.lr=1e-2"]
    ref, run = stopped_and_resumed(tmp_path, *args)
