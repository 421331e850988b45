"""adapter=textual_inversion wired into LatentDiffusion: the U-Net and the text encoder stay frozen, the
placeholder's vectors (``ldm.models.textual_inversion.PlaceholderEmbedding``) are the only trained weights,
in the optimizer, the EMA and the checkpoint; the run ends with the embedding files.

LatentDiffusion calls the functions here from its adapter hooks (configure_optimizers, sampling_bundle, bundle,
on_save_checkpoint / on_load_checkpoint, on_train_end)."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from ldm.models.bundle import ModelBundle
from ldm.models.textual_inversion import PlaceholderEmbedding, TextualInversionConfig

PREFIXES = ("textual_inversion.", "ema.")  # what a textual-inversion checkpoint holds


def build(module, config: TextualInversionConfig) -> PlaceholderEmbedding:
    """Freeze the U-Net, add the placeholder tokens and splice the trained vectors into the encoder's lookup.
    The encoder's ``frozen=False`` only means: gradients flow through it to the vectors, and no cached contexts
    (its weights still have requires_grad=False)."""
    module.unet.requires_grad_(False)  # left in train mode: gradient checkpointing needs it
    embedding = PlaceholderEmbedding.build(module.text_encoder, config)
    module.text_encoder.frozen = False
    module._ti_hook = embedding.attach(module.text_encoder)
    module.strict_loading = False  # the checkpoint holds only the vectors; the base comes from model.pretrained
    return embedding


def param_groups(module) -> list[dict[str, Any]]:
    lr = module.adapter_config.lr
    return [{"params": [module.textual_inversion.vectors], "name": "textual_inversion",
             **({"lr": float(lr)} if lr else {})}]


@contextmanager
def plain_lookup(module, weights: PlaceholderEmbedding) -> Iterator[None]:
    """For the length of the block the encoder's embedding rows hold ``weights`` (the EMA or live vectors) and
    the splicing hook is off: the encoder is then what an exported / diffusers-loaded one is."""
    module._ti_hook.remove()
    weights.write_rows(module.text_encoder)
    try:
        yield
    finally:
        module._ti_hook = module.textual_inversion.attach(module.text_encoder)
        module.text_encoder._clear_cache()


def trained_weights(module, use_ema: bool) -> PlaceholderEmbedding:
    return module.ema.model if (use_ema and module.ema is not None) else module.textual_inversion


@contextmanager
def sampling_bundle(module, use_ema: bool) -> Iterator[ModelBundle]:
    with plain_lookup(module, trained_weights(module, use_ema)):
        yield ModelBundle(module.unet, module.autoencoder, module.text_encoder, module.schedule, source="training",
                          meta={"global_step": module.global_step})


def copied_bundle(module, use_ema: bool) -> ModelBundle:
    """A copy of the text encoder with the (EMA) vectors in its rows; the frozen U-Net and VAE are shared."""
    with plain_lookup(module, trained_weights(module, use_ema)):
        text_encoder = copy.deepcopy(module.text_encoder)
    text_encoder.frozen = True
    return ModelBundle(module.unet, module.autoencoder, text_encoder, module.schedule, source="training",
                       meta={"global_step": module.global_step})


def checkpoint_entries(module, checkpoint: dict[str, Any]) -> None:
    """Keep only the vectors (and their EMA) in the checkpoint; record the config."""
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(PREFIXES)}
    checkpoint["ldm"]["textual_inversion"] = asdict(module.adapter_config)


def check_loaded(module, checkpoint: dict[str, Any]) -> None:
    stored = checkpoint.get("ldm", {}).get("textual_inversion")
    ours = asdict(module.adapter_config)
    if stored is None:
        raise ValueError("the checkpoint was not made by a textual-inversion run (no ldm.textual_inversion entry)")
    changed = [k for k in ("placeholder_token", "num_vectors") if stored.get(k) != ours[k]]
    if changed:
        raise ValueError(f"the checkpoint's adapter.{changed[0]} is {stored.get(changed[0])!r}, this config's "
                         f"{ours[changed[0]]!r}: resume with the same placeholder")


def save_files(module, run_dir: Path) -> dict[str, str]:
    """<run>/learned_embeds.safetensors (diffusers) and <run>/<token>.safetensors (A1111 / ComfyUI), with the EMA
    vectors when the run kept them."""
    from ldm.formats.embeddings import DIFFUSERS_FILE, save_embedding

    weights = trained_weights(module, use_ema=True)
    token, vectors = module.textual_inversion.token, weights.vectors.detach()
    meta = {"ldm_steps": str(module.global_step), "ldm_init_token": module.adapter_config.init_token}
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in token.strip("<>")) or "embedding"
    return {"diffusers": str(save_embedding(run_dir / DIFFUSERS_FILE, token, vectors, "diffusers", meta)),
            "a1111": str(save_embedding(run_dir / f"{stem}.safetensors", token, vectors, "a1111", meta))}


def is_textual_inversion(adapter) -> bool:
    return isinstance(adapter, TextualInversionConfig)

