"""What the LoRA file formats share: our module paths in diffusers' and transformers' names, and fitting a file's
down/up weights to our layers' shapes."""

from __future__ import annotations

from torch import Tensor, nn

from ldm.formats.diffusers_keys import unet_ldm_to_diffusers

HUB_TEXT_PREFIX = "text_model."


def unet_diffusers_paths(unet: nn.Module, paths: list[str]) -> dict[str, str]:
    """Our U-Net module paths -> diffusers module paths, with the project's one key map (diffusers_keys). An MMDiT's
    paths stay as they are: kohya's SD3 LoRAs (sd-scripts networks/lora_sd3.py) name the original MMDiT modules
    (``lora_unet_joint_blocks_0_x_block_attn_qkv``), which are ours."""
    from ldm.models.flux import Flux
    from ldm.models.mmdit import MMDiT

    if isinstance(unet, MMDiT):
        return {p: p for p in paths}
    if isinstance(unet, Flux):  # kohya's Flux LoRAs (sd-scripts networks/lora_flux.py) name BFL's modules
        from ldm.formats.flux_keys import flux_bfl_module_paths

        return flux_bfl_module_paths(paths, unet.config)
    renamed = unet_ldm_to_diffusers({f"{p}.weight": p for p in paths}, unet.config)
    return {ours: key[: -len(".weight")] for key, ours in renamed.items()}


def text_hub_path(path: str) -> str:
    """A module path inside our CLIPTextEncoder (`model.` + transformers' path, with or without the `text_model.`
    level newer transformers dropped) -> the hub CLIPTextModel path kohya names (`text_model.encoder...`)."""
    inner = path.removeprefix("model.")
    return inner if inner.startswith(HUB_TEXT_PREFIX) else HUB_TEXT_PREFIX + inner


def fit_weights(parts: dict[str, Tensor], base: nn.Module) -> dict[str, Tensor]:
    """Linear <-> 1x1-conv weights differ only by trailing (1, 1) (SD1 proj_in/out are convs, SD2's Linear):
    reshape, as ComfyUI does."""
    down, up = parts["down"].float(), parts["up"].float()
    if isinstance(base, nn.Linear):
        down, up = down.flatten(1) if down.ndim == 4 and down.shape[2:] == (1, 1) else down, up.flatten(1)
    elif isinstance(base, nn.Conv2d) and down.ndim == 2:
        down, up = down[:, :, None, None], up[:, :, None, None]
    elif isinstance(base, nn.Conv2d) and up.ndim == 2:
        up = up[:, :, None, None]
    alpha = parts.get("alpha")
    fitted = {"down": down, "up": up, "alpha": None if alpha is None else float(alpha)}
    if parts.get("magnitude") is not None:
        fitted["magnitude"] = fit_magnitude(parts["magnitude"], base)
    return fitted


def fit_magnitude(magnitude: Tensor, base: nn.Module) -> Tensor:
    """A DoRA magnitude in the broadcast shape of the layer's weight: (out, 1) <-> (out, 1, 1, 1) between Linear and
    1x1 conv, and PEFT's (out,) / (1, out, 1, 1) vector -> (out, 1[, 1, 1]) (the per-output-channel axis)."""
    ndim = 2 if isinstance(base, nn.Linear) else 4
    m = magnitude.float()
    if m.ndim == ndim:
        return m
    if m.ndim in (2, 4) and m.shape[2:] in ((), (1, 1)):  # kohya's (out, 1) / (1, in) on the other layer form
        return m.reshape(*m.shape[:2], *[1] * (ndim - 2))
    return m.reshape(-1, *[1] * (ndim - 1))  # PEFT: one value per output channel
