"""Flux.1 against diffusers' FluxTransformer2DModel: outputs within 1e-5 with the weights mapped both ways
(ldm.formats.flux_keys), the packing and rotary ids as FluxPipeline's, BFL's original layout through diffusers' own
single-file converter, the transformer folder and single file read through the bounded loaders, and the presets'
parameter counts equal to the published FLUX.1-dev / -schnell configs (counted on the meta device)."""

import json

import pytest
import torch

from ldm.formats.flux_keys import (flux_config_from_bfl, flux_config_from_diffusers, flux_diffusers_config,
                                   flux_from_bfl, flux_from_diffusers, flux_to_bfl, flux_to_diffusers,
                                   read_flux_single_file, read_flux_transformer, write_flux_single_file,
                                   write_flux_transformer)
from ldm.formats.safe_load import CheckpointError
from ldm.models.flux import FLUX_PRESETS, Flux, FluxConfig, pack_latents, parameter_count, position_ids
from ldm.models.rope import apply_rope, rope_frequencies

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # noqa: E402

TINY = dict(in_channels=4, out_channels=4, patch_size=2, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(4, 6, 6))
DEV_LIKE = {**TINY, "guidance_embeds": True}


def _random(model, seed: int = 0, std: float = 0.2):
    """Every parameter random (adaLN-Zero's zeros would hide mapping errors)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    # a non-square latent (8 x 6: a 4 x 3 patch grid), 5 text tokens; sigmas whose x 1000 is exact in float32
    return (torch.randn(2, 4, 8, 6, generator=g), torch.tensor([250.0, 875.0]), torch.randn(2, 5, 12, generator=g),
            torch.randn(2, 10, generator=g))


def _reference(ref, x, t, ctx, y, guidance=None):
    """diffusers' call as FluxPipeline makes it: packed latents, sigma = t / 1000, image and (zero) text ids."""
    _, _, h, w = x.shape
    packed = FluxPipeline._pack_latents(x, x.shape[0], x.shape[1], h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(x.shape[0], h // 2, w // 2, "cpu", torch.float32)
    out = ref(packed, ctx, y, t / 1000, img_ids, torch.zeros(ctx.shape[1], 3), guidance=guidance, return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)  # its VAE factor 8: a latent of h x w


def _context(ctx, y, guidance=None):
    return {"crossattn": ctx, "vector": y, **({} if guidance is None else {"guidance": guidance})}


@pytest.mark.parametrize("cfg", [TINY, DEV_LIKE], ids=["schnell_like", "dev_like_guidance"])
def test_flux_matches_diffusers_with_weights_mapped_both_ways(cfg):
    ours = Flux(**cfg).eval()
    ref = _random(FluxTransformer2DModel(**flux_diffusers_config(ours.config)))
    ours.load_state_dict(flux_from_diffusers(ref.state_dict(), ours.config))
    x, t, ctx, y = _inputs()
    guidance = torch.tensor([3.5, 1.0]) if cfg.get("guidance_embeds") else None
    with torch.no_grad():
        expected = _reference(ref, x, t, ctx, y, guidance)
        got = ours(x, t, _context(ctx, y, guidance))
    assert expected.abs().max() > 1  # a real signal
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if guidance is not None:  # the guidance embedding is used
        with torch.no_grad():
            assert (ours(x, t, _context(ctx, y, torch.tensor([1.0, 1.0]))) - got).abs().max() > 1e-2
    # and back: our weights (perturbed) written in diffusers' layout load into a fresh diffusers model unchanged
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fresh = FluxTransformer2DModel(**flux_diffusers_config(ours.config)).eval()
    fresh.load_state_dict(flux_to_diffusers(ours.state_dict(), ours.config), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, _context(ctx, y, guidance)), _reference(fresh, x, t, ctx, y, guidance),
                                   atol=1e-5, rtol=0)
    round_trip = flux_from_diffusers(flux_to_diffusers(ours.state_dict(), ours.config), ours.config)
    assert all(torch.equal(round_trip[k], v) for k, v in ours.state_dict().items())


def test_packing_and_rotary_ids_are_flux_pipelines():
    x = torch.randn(3, 4, 8, 6)
    assert torch.equal(pack_latents(x, 2), FluxPipeline._pack_latents(x, 3, 4, 8, 6))
    ids = position_ids(4, 3, text_tokens=5)
    assert torch.equal(ids[:12].float(), FluxPipeline._prepare_latent_image_ids(3, 4, 3, "cpu", torch.float32))
    assert not ids[12:].any() and ids.shape == (17, 3)


def test_rope_is_a_rotation_of_pairs_by_position_times_frequency():
    """Closed form on one pair per axis: axis i's first pair turns by pos_i (frequency theta^0 = 1); relative
    positions only: <R(m) q, R(n) k> depends on m - n."""
    ids = torch.tensor([[0, 2, 5]])
    cos, sin = rope_frequencies(ids, (2, 2, 2))
    q = torch.tensor([1.0, 0.0] * 3).reshape(1, 1, 1, 6)
    rotated = apply_rope(q, (cos, sin)).flatten()
    angles = torch.tensor([0.0, 2.0, 5.0])
    torch.testing.assert_close(rotated, torch.stack([angles.cos(), angles.sin()], 1).flatten(), atol=1e-6, rtol=0)
    a, b = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        rm = rope_frequencies(torch.tensor([[0, m, 0]]), (4, 6, 6))
        rn = rope_frequencies(torch.tensor([[0, n, 0]]), (4, 6, 6))
        return (apply_rope(a, rm) * apply_rope(b, rn)).sum()

    torch.testing.assert_close(score(3, 1), score(7, 5), atol=1e-5, rtol=0)


def test_bfl_layout_is_what_diffusers_single_file_converter_reads(monkeypatch):
    """Our BFL-layout keys (``double_blocks.0.img_attn.qkv.weight`` ..., as ComfyUI's checkpoints under
    ``model.diffusion_model.``) through diffusers' own converter (convert_flux_transformer_checkpoint_to_diffusers)
    load into FluxTransformer2DModel with equal outputs. The converter hard-codes FLUX.1's width 3072 for the
    single blocks' linear1 split: the split sizes are given the tiny width here."""
    from diffusers.loaders import single_file_utils

    ours = _random(Flux(**DEV_LIKE))
    bfl = flux_to_bfl(ours.state_dict(), ours.config, prefix="model.diffusion_model.")
    for key in ("double_blocks.1.img_attn.norm.query_norm.scale", "double_blocks.0.txt_mod.lin.weight",
                "single_blocks.1.linear1.weight", "single_blocks.0.modulation.lin.bias", "guidance_in.out_layer.bias",
                "final_layer.adaLN_modulation.1.weight", "img_in.weight", "txt_in.bias"):
        assert "model.diffusion_model." + key in bfl
    dim = ours.config["num_attention_heads"] * ours.config["attention_head_dim"]
    real_split = torch.split

    def split(tensor, sizes, dim_=0, **kw):
        if tuple(sizes) == (3072, 3072, 3072, 12288):
            sizes = (dim, dim, dim, 4 * dim)
        return real_split(tensor, sizes, kw.get("dim", dim_))

    monkeypatch.setattr(single_file_utils.torch, "split", split)
    converted = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(
        {k: v.clone() for k, v in bfl.items()})
    monkeypatch.undo()
    ref = FluxTransformer2DModel(**flux_diffusers_config(ours.config)).eval()
    ref.load_state_dict(converted, strict=True)
    x, t, ctx, y = _inputs()
    g = torch.tensor([2.0, 4.0])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, _context(ctx, y, g)), _reference(ref, x, t, ctx, y, g), atol=1e-5, rtol=0)
    back = flux_from_bfl({**bfl, "vae.decoder.conv_in.weight": torch.zeros(1)}, ours.config)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    assert Flux(**flux_config_from_bfl(bfl, attention_head_dim=16, axes_dims_rope=(4, 6, 6))).config == ours.config
    del bfl["model.diffusion_model.single_blocks.1.linear2.bias"]
    with pytest.raises(CheckpointError, match="missing"):
        flux_from_bfl(bfl, ours.config)


def test_single_file_and_transformer_folder_are_read_through_the_bounded_loaders(tmp_path):
    """A BFL file (bare keys) and a ComfyUI-style one read back equal; our transformer/ folder loads with
    FluxTransformer2DModel.from_pretrained (equal outputs), a folder diffusers saved reads back; a config out of
    bounds is refused before anything is built."""
    ours = _random(Flux(**DEV_LIKE))
    x, t, ctx, y = _inputs()
    g = torch.tensor([3.0, 3.0])
    with torch.no_grad():
        expected = ours(x, t, _context(ctx, y, g))
    for prefix in ("", "model.diffusion_model."):
        path = write_flux_single_file(ours, tmp_path / f"flux{len(prefix)}.safetensors", prefix=prefix)
        back = read_flux_single_file(path, attention_head_dim=16, axes_dims_rope=(4, 6, 6)).eval()
        with torch.no_grad():
            torch.testing.assert_close(back(x, t, _context(ctx, y, g)), expected, atol=0, rtol=0)
    write_flux_transformer(ours, tmp_path / "ours")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(_reference(loaded, x, t, ctx, y, g), expected, atol=1e-5, rtol=0)
    loaded.save_pretrained(tmp_path / "theirs")
    back = read_flux_transformer(tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, _context(ctx, y, g)), expected, atol=1e-5, rtol=0)
    cfg = json.loads((tmp_path / "theirs" / "config.json").read_text())
    (tmp_path / "theirs" / "config.json").write_text(json.dumps({**cfg, "num_single_layers": 10**6}))
    with pytest.raises(CheckpointError, match="num_single_layers"):
        read_flux_transformer(tmp_path / "theirs")


def test_fresh_model_is_adaln_zero_and_bad_inputs_name_what_to_fix():
    m = Flux(**TINY)
    x, t, ctx, y = _inputs()
    assert torch.equal(m(x, t, _context(ctx, y)), torch.zeros_like(x))
    with pytest.raises(ValueError, match="crossattn"):
        m(x, t, ctx)
    with pytest.raises(ValueError, match="patch_size"):
        m(x[..., :5], t, _context(ctx, y))
    with pytest.raises(ValueError, match="guidance_embeds"):
        m(x, t, _context(ctx, y, torch.ones(2)))
    with pytest.raises(ValueError, match="axes_dims_rope"):
        FluxConfig(**{**TINY, "axes_dims_rope": (4, 6, 8)})
    with pytest.raises(CheckpointError, match="patch_size"):
        flux_config_from_diffusers({**flux_diffusers_config(m.config), "patch_size": 2})


def test_guidance_model_without_a_guidance_uses_its_training_guidance():
    m = _random(Flux(**DEV_LIKE, train_guidance=2.5))
    x, t, ctx, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, _context(ctx, y)), m(x, t, _context(ctx, y, torch.full((2,), 2.5))),
                                   atol=0, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, ctx, y = _inputs()
    grads = []
    for checkpointing in (False, True):
        m = _random(Flux(**DEV_LIKE, gradient_checkpointing=checkpointing)).train()
        m(x, t, _context(ctx, y)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# diffusers' published transformer/config.json values: black-forest-labs/FLUX.1-dev and FLUX.1-schnell (they
# differ only in guidance_embeds; out_channels unset, i.e. in_channels)
PUBLISHED = {
    name: dict(attention_head_dim=128, axes_dims_rope=[16, 56, 56], guidance_embeds=guidance, in_channels=64,
               joint_attention_dim=4096, num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1,
               pooled_projection_dim=768)
    for name, guidance in (("flux_dev", True), ("flux_schnell", False))}
# FluxTransformer2DModel(**PUBLISHED[name]) built on the meta device: sum of its parameters' numel (diffusers 0.42)
EXPECTED_PARAMETERS = {"flux_dev": 11_901_408_320, "flux_schnell": 11_891_178_560}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_diffusers_parameter_counts(name):
    with torch.device("meta"):
        ref = FluxTransformer2DModel(**PUBLISHED[name])
        preset = Flux.from_preset(name)
    assert sum(p.numel() for p in ref.parameters()) == EXPECTED_PARAMETERS[name]
    assert parameter_count(FLUX_PRESETS[name]) == EXPECTED_PARAMETERS[name]
    assert flux_diffusers_config(preset.config) == {**PUBLISHED[name], "out_channels": None}
    assert flux_config_from_diffusers(PUBLISHED[name]) == FLUX_PRESETS[name]


@pytest.mark.parametrize("preset,expected", [("attention", 12), ("attention_ff", 20)])
def test_lora_on_flux_round_trips_through_its_kohya_file(tmp_path, preset, expected):
    """adapter=lora finds Flux's layers (its lora_targets), writes kohya's Flux layout (BFL's module names:
    lora_unet_double_blocks_0_img_attn_qkv, lora_unet_single_blocks_0_linear1, as sd-scripts' Flux LoRAs) with
    Flux's model spec, and the file merged into a copy gives the adapted outputs."""
    import copy

    from safetensors import safe_open

    from ldm.formats.lora_files import apply_lora_files, save_lora_file
    from ldm.models.lora import LoRAConfig, LoRANetwork

    base = _random(Flux(**DEV_LIKE))
    merged = copy.deepcopy(base)
    roots = {"unet": base}
    network = LoRANetwork.build(roots, LoRAConfig(preset=preset, rank=2))
    # attention: 2 double blocks x 2 streams x (qkv, proj) + 2 single blocks x (linear1, linear2) = 12;
    # attention_ff: + 2 x 2 x (fc1, fc2) = 20
    assert len(network.weights()) == expected
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.2)
    network.attach(roots)
    x, t, ctx, y = _inputs()
    with torch.no_grad():
        adapted = base(x, t, _context(ctx, y))
    network.detach()
    path = save_lora_file(network, roots, tmp_path / "flux_lora.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_double_blocks_1_txt_attn_proj.alpha",
            "lora_unet_single_blocks_1_linear1.lora_up.weight"} <= keys
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    apply_lora_files({"unet": merged}, [str(path)], report=lambda m: None)
    with torch.no_grad():
        got = merged(x, t, _context(ctx, y))
        assert (got - base(x, t, _context(ctx, y))).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(got, adapted, atol=1e-4, rtol=1e-5)


def test_a_single_file_describing_too_many_blocks_is_refused_before_anything_is_built(tmp_path):
    """The config read from a file's tensor names is bounded like a stored config: 300 single blocks named by a
    few bytes each are refused (FluxConfig allows 256) before a network is built."""
    from safetensors.torch import save_file

    ours = Flux(**TINY)
    state = flux_to_bfl(ours.state_dict(), ours.config)
    state |= {f"single_blocks.{i}.linear2.bias": torch.zeros(1) for i in range(2, 300)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "huge.safetensors"))
    with pytest.raises(CheckpointError, match="num_single_layers"):
        read_flux_single_file(tmp_path / "huge.safetensors", attention_head_dim=16, axes_dims_rope=(4, 6, 6))
