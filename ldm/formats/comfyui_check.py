"""Can ComfyUI load an SD single file as the architecture it claims, and compute what ldm computes?

ComfyUI never reads the yaml written next to the file (``comfy.sd.load_checkpoint_guess_config``; the deprecated
config loader reads only the parameterization and layer index): it detects the model from the tensors' shapes,
matches the result against a short list of known models and builds that model with the fixed settings of its class.
A model outside the list is refused ("Could not detect model type"); one that matches but differs in a setting the
shapes do not show (the number of attention heads, the latent scale, the schedule) loads and computes something
else. :func:`comfyui_check` says which, field by field. References: comfyanonymous/ComfyUI ``comfy/model_detection.py``
(``detect_unet_config``, ``model_config_from_unet_config``), ``comfy/supported_models.py`` (SD15, SD20, SDXL and the
distilled SDXL shapes), ``comfy/supported_models_base.py`` (``BASE.matches``, ``unet_extra_config``),
``comfy/latent_formats.py``, ``comfy/model_sampling.py``, ``comfy/sd.py`` (the SD VAE) and the CLIP configs
``comfy/sd1_clip_config.json``, ``comfy/sd2_clip_config.json``, ``comfy/clip_config_bigg.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# supported_models.py: the unet_config each class matches (BASE.matches: every listed key equal to the detected
# value), in ComfyUI's order, and the heads its class then builds with (unet_extra_config; SD20 / SDXL inherit
# BASE's num_heads=-1, num_head_channels=64). Stable_Zero123 comes first and takes an SD1 shape with in_channels 8.
# SDXL's distilled shapes (SSD1B, Segmind_Vega, KOALA_700M / _1B) load as SDXL with their own transformer depths.
SDXL_DEPTHS = ([0, 0, 2, 2, 10, 10], [0, 0, 2, 2, 4, 4], [0, 0, 1, 1, 2, 2], [0, 2, 5], [0, 2, 6])
COMFY_MODELS = {
    "SD1.5": dict(match=dict(context_dim=768, model_channels=320, use_linear_in_transformer=False,
                             adm_in_channels=None), heads=dict(num_heads=8, num_head_channels=-1)),
    "SD2": dict(match=dict(context_dim=1024, model_channels=320, use_linear_in_transformer=True,
                           adm_in_channels=None), heads=dict(num_heads=-1, num_head_channels=64)),
    "SDXL": dict(match=dict(context_dim=2048, model_channels=320, use_linear_in_transformer=True,
                            adm_in_channels=2816), depths=SDXL_DEPTHS, heads=dict(num_heads=-1, num_head_channels=64)),
}
# latent_formats.py: SD15 (SD1 and SD2) scale_factor 0.18215, SDXL 0.13025; 4 latent channels, no shift.
LATENT_SCALE = {"SD1.5": 0.18215, "SD2": 0.18215, "SDXL": 0.13025}
# sd.py VAE: the SD first stage it builds for these models (ch 128, ch_mult [1, 2, 4, 4], 2 res blocks, z 4).
SD_VAE = dict(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4, in_channels=3,
              out_channels=3, norm_groups=32, shift_factor=0.0)
# model_sampling.py ModelSamplingDiscrete defaults (supported models set no other): "linear" (our scaled_linear)
# betas 0.00085 -> 0.012 over 1000 steps; zero terminal SNR only for a file with a `ztsnr` key (we write none).
SD_SCHEDULE = dict(kind="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
# the text encoders ComfyUI builds from its own json configs (the file's sizes are not read).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, max_position_embeddings=77,
              vocab_size=49408, hidden_act="gelu")  # 24 layers, conditioned on the penultimate (see below)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              max_position_embeddings=77, vocab_size=49408, hidden_act="gelu")
# SD20.model_type: an SD2 U-Net (in_channels 4) is v-prediction when this bias has std > 0.09, else epsilon.
SD2_V_PROBE, SD2_V_STD = "output_blocks.11.1.transformer_blocks.0.norm1.bias", 0.09


@dataclass
class ComfyCheck:
    architecture: str | None  # the ComfyUI model class it is detected as (None: "Could not detect model type")
    problems: list[str] = field(default_factory=list)  # why it does not load, or computes something else
    notes: list[str] = field(default_factory=list)  # loads and computes the same with a setting the user makes

    @property
    def loadable(self) -> bool:
        return self.architecture is not None and not self.problems

    def verdict(self) -> str:
        if self.loadable:
            return f"ComfyUI detects it as {self.architecture}"
        claimed = f"detected as {self.architecture}, but " if self.architecture else ""
        return f"ComfyUI cannot load it as the model it is ({claimed}{'; '.join(self.problems)})"


def input_block_depths(unet: dict) -> list[int]:
    """detect_unet_config's ``transformer_depth``: one entry per encoder res block (num_res_blocks per level), the
    level's transformer depth where the level has attention, else 0."""
    levels = len(unet["channel_mult"])
    depth = unet["transformer_depth"]
    depths = [depth] * levels if isinstance(depth, int) else list(depth)
    return [depths[lvl] if lvl in unet["attention_levels"] else 0
            for lvl in range(levels) for _ in range(unet["num_res_blocks"])]


def _heads(unet: dict, channels: int, num_heads: int, num_head_channels: int) -> int:
    return channels // num_head_channels if num_head_channels > 0 else num_heads


def detect(unet: dict) -> tuple[str | None, dict, list[int]]:
    """model_detection.detect_unet_config: what the shapes show, and the first of ComfyUI's model classes they
    match (model_config_from_unet_config; None: none does)."""
    shown = dict(context_dim=unet["context_dim"], model_channels=unet["model_channels"],
                 use_linear_in_transformer=bool(unet.get("use_linear_projection")),
                 adm_in_channels=unet.get("adm_in_channels"))
    depths = input_block_depths(unet)
    if unet.get("in_channels") != 8:  # Stable_Zero123 is matched first for in_channels 8
        for name, model in COMFY_MODELS.items():
            if all(shown[k] == v for k, v in model["match"].items()) and depths in model.get("depths", (depths,)):
                return name, shown, depths
    return None, shown, depths


def comfyui_check(unet: dict, *, vae: dict | None = None, text: list[tuple[Any, bool]] | None = None,
                  schedule=None, weight: Callable[[str], Any] | None = None) -> ComfyCheck:
    """What ComfyUI makes of an SD single file of these parts: ``unet`` / ``vae`` configs (dicts as
    ``UNet.config`` / ``AutoencoderKL.config``), ``text``: (transformers text config, penultimate) per encoder,
    ``schedule``: a NoiseSchedule, ``weight(key)``: a U-Net tensor by its original name (or None). A U-Net-only
    file (ComfyUI's UNETLoader) passes no vae / text. Nothing is built: configs only."""
    arch, shown, depths = detect(unet)
    if arch is None:
        said = ", ".join(f"{k}={v}" for k, v in shown.items())
        return ComfyCheck(None, [f"its U-Net ({said}, transformer depths {depths}) matches none of ComfyUI's "
                                 "models, which load SD1.x (model_channels=320, context_dim=768, conv projections), "
                                 "SD2.x (320, 1024, linear) and SDXL (320, 2048, adm_in_channels=2816) sizes only: "
                                 "\"Could not detect model type\""])
    check = ComfyCheck(arch)
    problems = check.problems

    # supported_models: the heads each class builds with, whatever the file was trained with
    theirs = COMFY_MODELS[arch]["heads"]
    mc = unet["model_channels"]
    for level in sorted(set(unet["attention_levels"])):
        ch = mc * unet["channel_mult"][level]
        ours = _heads(unet, ch, unet.get("num_heads", -1), unet.get("num_head_channels", -1))
        builds = _heads(unet, ch, theirs["num_heads"], theirs["num_head_channels"])
        if ours != builds:
            problems.append(f"num_heads={unet.get('num_heads')} / num_head_channels={unet.get('num_head_channels')} "
                            f"gives {ours} attention heads on {ch} channels; ComfyUI's {arch} computes with {builds} "
                            f"(num_heads={theirs['num_heads']}, num_head_channels={theirs['num_head_channels']})")
            break
    # latent_formats: 4 latent channels in and out (in_channels 9: the inpainting variant, which ComfyUI detects)
    if unet.get("out_channels") != 4 or unet.get("in_channels") not in (4, 9):
        problems.append(f"in_channels={unet.get('in_channels')}, out_channels={unet.get('out_channels')}: ComfyUI's "
                        f"{arch} takes 4-channel latents (in_channels 9 for inpainting)")

    if schedule is not None:  # model_sampling.py
        for key, want in SD_SCHEDULE.items():
            have = getattr(schedule, key, None)
            if have != want and not (isinstance(want, float) and have is not None and abs(have - want) < 1e-9):
                problems.append(f"schedule {key}={have}: ComfyUI samples {arch} with {key}={want}")
        if getattr(schedule, "zero_terminal_snr", False):
            problems.append("the schedule has zero terminal SNR, which ComfyUI applies only to a file with a "
                            "`ztsnr` key (ModelSamplingDiscrete zsnr)")
        predicts = _comfy_prediction(arch, unet, weight)
        if predicts is not None and predicts != schedule.prediction_type:
            problems.append(f"prediction_type={schedule.prediction_type}: ComfyUI runs this {arch} file as a "
                            f"{predicts} model")

    if vae is not None:  # sd.py VAE + latent_formats
        for key, want in {**SD_VAE, "scaling_factor": LATENT_SCALE[arch]}.items():
            have = vae.get(key)
            have = tuple(have) if isinstance(have, (list, tuple)) else have
            if have != want and not (isinstance(want, float) and have is not None and abs(have - want) < 1e-9):
                problems.append(f"autoencoder {key}={have}: ComfyUI's {arch} VAE has {key}={want}")

    if text is not None:  # the CLIP models of sd1_clip.py / sd2_clip.py / sdxl_clip.py
        want_text = {"SD1.5": [CLIP_L], "SD2": [CLIP_H], "SDXL": [CLIP_L, CLIP_G]}[arch]
        if len(text) != len(want_text):
            problems.append(f"{len(text)} text encoder(s): ComfyUI's {arch} has {len(want_text)}")
        for i, ((config, penultimate), want) in enumerate(zip(text, want_text)):
            name = "text_encoder" + (f" {i + 1}" if len(want_text) > 1 else "")
            for key, value in want.items():
                if getattr(config, key, None) != value:
                    problems.append(f"{name} {key}={getattr(config, key, None)}: ComfyUI's {arch} builds "
                                    f"{key}={value}")
            layers = getattr(config, "num_hidden_layers", None)
            if arch == "SD2" and (layers, bool(penultimate)) not in ((23, False), (24, True)):
                # sd2_clip.py: 24 blocks, conditioned on the penultimate (23 blocks run to the end are the same)
                problems.append(f"{name} has {layers} layers (penultimate={bool(penultimate)}): ComfyUI's SD2 "
                                "conditions on the 23rd of 24 OpenCLIP blocks")
            if arch == "SD1.5" and penultimate:
                check.notes.append("the text encoder conditions on its penultimate layer (CLIP skip 2): set "
                                   "CLIPSetLastLayer to -2 in ComfyUI (A1111: Clip skip 2)")
    return check


def _comfy_prediction(arch: str, unet: dict, weight: Callable[[str], Any] | None) -> str | None:
    """The prediction type ComfyUI assumes (supported_models.py model_type): SD15 epsilon; SDXL epsilon unless the
    file has a ``v_pred`` key (we write none); SD20: v when the std of ``SD2_V_PROBE`` > 0.09 (in_channels 4)."""
    if arch != "SD2" or unet.get("in_channels") != 4:
        return "epsilon"
    probe = weight(SD2_V_PROBE) if weight is not None else None
    if probe is None or probe.device.type == "meta":
        return None  # nothing to measure: not judged
    return "v_prediction" if float(probe.float().std(unbiased=False)) > SD2_V_STD else "epsilon"


# SD3 / SD3.5 (supported_models.py SD3: unet_config in_channels 16; model_detection.py: an MMDiT of width D is
# built with depth = D / 64 blocks of D / 64 heads of 64; latent_formats.SD3: scale 1.5305, shift 0.0609;
# sampling_settings shift 3.0; sd.py: the SD first stage with 16 latent channels, no quant convs;
# text_encoders/sd3_clip.py: CLIP-L, CLIP-G, T5-XXL padded to a 4096-wide context, pooled 768 + 1280)
SD3_VAE = {**SD_VAE, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609}
SD3_SHIFT, SD3_HEAD_DIM, SD3_JOINT_DIM = 3.0, 64, 4096
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128)


def _differs(have, want) -> bool:
    have = tuple(have) if isinstance(have, (list, tuple)) else have
    return have != want and not (isinstance(want, float) and isinstance(have, (int, float))
                                 and abs(have - want) < 1e-9)


def _is_identity(weight) -> bool:
    import torch

    return weight.ndim == 2 and weight.shape[0] == weight.shape[1] and bool(
        torch.equal(weight.float(), torch.eye(weight.shape[0], device=weight.device)))


def comfyui_check_sd3(bundle, frozen: bool = True) -> ComfyCheck:
    """What ComfyUI makes of an SD3 single file of this bundle (``frozen=False``: the MMDiT alone)."""
    cfg = bundle.unet.config
    if cfg.get("in_channels") != 16:
        return ComfyCheck(None, [f"its MMDiT takes in_channels={cfg.get('in_channels')}: ComfyUI detects SD3 by 16 "
                                 "latent channels (\"Could not detect model type\" otherwise)"])
    check = ComfyCheck("SD3")
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if cfg["attention_head_dim"] != SD3_HEAD_DIM or cfg["num_layers"] != width // SD3_HEAD_DIM:
        check.problems.append(f"{cfg['num_layers']} blocks of {cfg['num_attention_heads']} heads x "
                              f"{cfg['attention_head_dim']}: ComfyUI builds a {width}-wide MMDiT as {width // 64} "
                              "blocks of 64-wide heads")
    if cfg.get("out_channels") != 16:
        check.problems.append(f"out_channels={cfg.get('out_channels')}: ComfyUI's SD3 outputs 16 latent channels")
    schedule = bundle.schedule
    if getattr(schedule, "dynamic_shift", False) or _differs(getattr(schedule, "shift", None), SD3_SHIFT):
        check.notes.append(f"the schedule's shift is {getattr(schedule, 'shift', None)}"
                           f"{' (dynamic)' if getattr(schedule, 'dynamic_shift', False) else ''}: ComfyUI samples "
                           f"SD3 with shift {SD3_SHIFT} unless a ModelSamplingSD3 node sets it")
    if not frozen:
        return check
    vae = bundle.autoencoder.config
    for key, want in {**SD3_VAE, "use_quant_conv": False, "use_post_quant_conv": False}.items():
        if _differs(vae.get(key, True if key.startswith("use_") else None), want):
            check.problems.append(f"autoencoder {key}={vae.get(key)}: ComfyUI's SD3 VAE has {key}={want}")
    te = bundle.text_encoder
    for name, model, want in (("clip_l", te.model, CLIP_L), ("clip_g", te.model_2, CLIP_G)):
        for key, value in want.items():
            if getattr(model.config, key, None) != value:
                check.problems.append(f"{name} {key}={getattr(model.config, key, None)}: ComfyUI builds {value}")
    projection = getattr(getattr(te.model, "text_projection", None), "weight", None)
    if projection is not None and not projection.is_meta and not _is_identity(projection):
        check.problems.append("clip_l's text_projection is not the identity: ComfyUI's SD3 pools CLIP-L without "
                              "it (sd3_clip.py return_projected_pooled=False; diffusers' from_single_file sets eye)")
    if te.joint_dim != SD3_JOINT_DIM:
        check.problems.append(f"the text context is {te.joint_dim} wide: ComfyUI pads SD3's to {SD3_JOINT_DIM}")
    if te.t5 is None:
        check.notes.append("no T5 in the file: ComfyUI's SD3 runs without it (as diffusers: zeros), or load a "
                           "t5xxl with a TripleCLIPLoader")
    else:
        for key, value in T5_XXL.items():
            if getattr(te.t5.config, key, None) != value:
                check.problems.append(f"t5xxl {key}={getattr(te.t5.config, key, None)}: ComfyUI builds {value}")
    return check


def comfyui_check_bundle(bundle, frozen: bool = True) -> ComfyCheck:
    """:func:`comfyui_check` of a ModelBundle's parts (``frozen=False``: a U-Net-only file)."""
    if hasattr(bundle.unet, "joint_blocks"):  # an MMDiT: SD3's rules
        return comfyui_check_sd3(bundle, frozen)
    te = bundle.text_encoder
    text = None
    if frozen and te is not None:
        models = [te.model, te.model_2] if hasattr(te, "model_2") else [getattr(te, "model", te)]
        text = [(m.config, getattr(te, "penultimate", False)) for m in models]
    state = dict(bundle.unet.named_parameters())
    return comfyui_check(bundle.unet.config, vae=bundle.autoencoder.config if frozen else None, text=text,
                         schedule=bundle.schedule, weight=state.get)
