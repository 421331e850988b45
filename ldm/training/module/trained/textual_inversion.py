"""adapter=textual_inversion: the U-Net and the text encoder stay frozen; the placeholder's vectors
(``ldm.models.textual_inversion.PlaceholderEmbedding``) are the only trained weights, in the optimizer, the EMA and
the checkpoint; the run ends with the embedding files."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Iterator

from torch import Tensor, nn

from ldm.models.bundle import ModelBundle
from ldm.models.textual_inversion import PlaceholderEmbedding, TextualInversionConfig
from ldm.training.module.ema import EMA
from ldm.training.module.trained.base import (Networks, RunEnd, check_has_keys, freeze, UNetAsIs,
                                              state_with_prefixes)

PREFIXES = ("textual_inversion.", "ema.")  # what a textual-inversion checkpoint holds


class TextualInversionRows(UNetAsIs):
    # gradients flow through the frozen encoder to the vectors: contexts are computed, never cached
    text_encoder_learns = True
    strict_loading = False  # the checkpoint holds only the vectors; the base comes from model.pretrained

    def __init__(self, networks: Networks, config: TextualInversionConfig, ema_decay: float | None):
        """Freeze the U-Net, add the placeholder tokens and splice the trained vectors into the encoder's lookup.
        The encoder's ``frozen=False`` only means: gradients flow through it to the vectors, and no cached
        contexts (its weights still have requires_grad=False)."""
        self.networks, self.config = networks, config
        networks.unet.requires_grad_(False)  # left in train mode: gradient checkpointing needs it
        self.embedding = PlaceholderEmbedding.build(networks.text_encoder, config)
        networks.text_encoder.frozen = False
        self._hook = self.embedding.attach(networks.text_encoder)
        self.ema = EMA(self.embedding, ema_decay) if ema_decay else None

    def modules(self) -> dict[str, nn.Module]:
        return {"textual_inversion": self.embedding, **({"ema": self.ema} if self.ema is not None else {})}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.embedding.parameters())

    def param_groups(self) -> list[dict[str, Any]]:
        lr = self.config.lr
        return [{"params": [self.embedding.vectors], "name": "textual_inversion", **({"lr": float(lr)} if lr else {})}]

    def set_train_mode(self) -> None:
        freeze(self.networks.text_encoder)
        self.networks.text_encoder.frozen = False  # the splicing hook's gradients reach the vectors

    def update_ema(self, applied: Tensor | None = None) -> None:
        if self.ema is not None:
            self.ema.update(self.embedding, applied)

    def checkpoint_entries(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the vectors (and their EMA) in the checkpoint; record the config."""
        state_with_prefixes(checkpoint, PREFIXES)
        checkpoint["ldm"]["textual_inversion"] = asdict(self.config)

    def check_loaded(self, checkpoint: dict[str, Any], expected: list[str]) -> None:
        stored = checkpoint.get("ldm", {}).get("textual_inversion")
        ours = asdict(self.config)
        if stored is None:
            raise ValueError("the checkpoint was not made by a textual-inversion run (no ldm.textual_inversion entry)")
        changed = [k for k in ("placeholder_token", "num_vectors") if stored.get(k) != ours[k]]
        if changed:
            raise ValueError(f"the checkpoint's adapter.{changed[0]} is {stored.get(changed[0])!r}, this config's "
                             f"{ours[changed[0]]!r}: resume with the same placeholder")
        check_has_keys(checkpoint, expected, PREFIXES)

    def _weights(self, use_ema: bool) -> PlaceholderEmbedding:
        return self.ema.model if (use_ema and self.ema is not None) else self.embedding

    @contextmanager
    def _plain_lookup(self, weights: PlaceholderEmbedding) -> Iterator[None]:
        """For the length of the block the encoder's embedding rows hold ``weights`` (the EMA or live vectors) and
        the splicing hook is off: the encoder is then what an exported / diffusers-loaded one is."""
        text_encoder = self.networks.text_encoder
        self._hook.remove()
        weights.write_rows(text_encoder)
        try:
            yield
        finally:
            self._hook = self.embedding.attach(text_encoder)
            text_encoder._clear_cache()

    @contextmanager
    def sampling_bundle(self, global_step: int, use_ema: bool) -> Iterator[ModelBundle]:
        with self._plain_lookup(self._weights(use_ema)):
            yield self.networks.bundle(global_step)

    def bundle(self, global_step: int, use_ema: bool) -> ModelBundle:
        """A copy of the text encoder with the (EMA) vectors in its rows; the frozen U-Net and VAE are shared."""
        with self._plain_lookup(self._weights(use_ema)):
            text_encoder = copy.deepcopy(self.networks.text_encoder)
        text_encoder.frozen = True
        return self.networks.bundle(global_step, text_encoder=text_encoder)

    def write_files(self, end: RunEnd) -> dict[str, str]:
        """<run>/learned_embeds.safetensors (diffusers) and <run>/<token>.safetensors (A1111 / ComfyUI), with the EMA
        vectors when the run kept them."""
        from ldm.formats.embeddings import DIFFUSERS_FILE, save_embedding
        from ldm.formats.model_spec import infer_base_model_version, model_spec

        token, vectors = self.embedding.token, self._weights(use_ema=True).vectors.detach()
        prediction = self.networks.schedule.prediction_type
        version = infer_base_model_version(self.networks.roots(), prediction)
        meta = {"ldm_steps": str(end.global_step), "ldm_init_token": self.config.init_token,  # + sd-scripts' keys:
                **model_spec(version, "textual-inversion", title=token, prediction_type=prediction,
                             resolution=end.model_config.get("resolution"))}
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in token.strip("<>")) or "embedding"
        paths = {"diffusers": str(save_embedding(end.run_dir / DIFFUSERS_FILE, token, vectors, "diffusers", meta)),
                 "a1111": str(save_embedding(end.run_dir / f"{stem}.safetensors", token, vectors, "a1111", meta))}
        print(f"textual inversion: {', '.join(paths.values())}")
        return paths
