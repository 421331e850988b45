"""adapter=lora / loha / lokr / dora (LoRA / LoCon, LyCORIS's LoHa and LoKr, DoRA: ``adapter.type``): the U-Net (and
text encoder) stay frozen; the adapter network's forward hooks add its updates to their layers. The network holds
whichever kind the config names and this part never asks which. Only the adapter (and its EMA) is optimised and
checkpointed; the run ends with ``<run>/lora.safetensors`` (kohya / LyCORIS layout: ComfyUI / A1111 / sample.py
lora=...), and for an MMDiT also ``<run>/lora_diffusers/`` (diffusers' layout: StableDiffusion3Pipeline's
load_lora_weights reads no kohya names)."""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from typing import Any, Iterator

from torch import Tensor, nn

from ldm.models.bundle import ModelBundle
from ldm.models.lora import LoRAConfig, LoRANetwork
from ldm.models.quantized_base import dequantize_  # merging into a quantized base: into its fp32 copy
from ldm.training.module.ema import EMA
from ldm.training.module.trained.base import (Networks, RunEnd, check_has_keys, freeze, UNetAsIs,
                                              state_with_prefixes)

PREFIXES = ("lora.", "ema.")  # what an adapter run's checkpoint holds


class LoRAAdapter(UNetAsIs):
    strict_loading = False  # the checkpoint holds only the adapter; the base comes from model.pretrained again

    def __init__(self, networks: Networks, config: LoRAConfig, ema_decay: float | None):
        self.networks, self.config = networks, config
        networks.unet.requires_grad_(False)  # frozen, but left in train mode: gradient checkpointing needs it
        self.network = LoRANetwork.build(networks.roots(), config).attach(networks.roots())
        if config.text_encoder:  # gradients through the encoder, and no cached (stale) contexts
            networks.text_encoder.frozen = False
        if config.init_from:
            self._init_from(config.init_from)
        self.ema = EMA(self.network, ema_decay) if ema_decay else None

    @property
    def text_encoder_learns(self) -> bool:
        """adapter.text_encoder=true: gradients flow through the encoder to its adapter (no cached contexts)."""
        return bool(self.config.text_encoder)

    def _init_from(self, path: str) -> None:
        from ldm.formats.lora_files import LoRAFileError, read_lora_file

        try:
            lora = read_lora_file(path, self.networks.roots())
        except LoRAFileError as e:
            raise ValueError(f"adapter.init_from: {e}") from e
        not_here = self.network.load_weights(lora.weights)
        print(f"adapter.init_from: {len(lora.weights) - len(not_here)} layers from {lora.path} ({lora.layout})")
        skipped = lora.unmapped + not_here
        if skipped:
            print(f"adapter.init_from: {len(skipped)} entries of the file are not used (not in this model or not "
                  f"adapted by preset={self.config.preset!r}): {', '.join(skipped[:10])}")

    def modules(self) -> dict[str, nn.Module]:
        return {"lora": self.network, **({"ema": self.ema} if self.ema is not None else {})}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.network.parameters())

    def param_groups(self) -> list[dict[str, Any]]:
        """U-Net and text-encoder adapters as two parameter groups; adapter.unet_lr / text_encoder_lr override
        optim.lr (the text encoder's defaults to the U-Net adapter's)."""
        cfg, groups = self.config, []
        for root, lr in (("unet", cfg.unet_lr), ("text_encoder", cfg.text_encoder_lr or cfg.unet_lr)):
            params = [p for k, m in self.network.loras.items() if self.network.paths[k][0] == root
                      for p in m.parameters()]
            if params:
                groups.append({"params": params, "name": f"lora_{root}", **({"lr": float(lr)} if lr else {})})
        return groups

    def set_train_mode(self) -> None:
        freeze(self.networks.text_encoder)
        if self.config.text_encoder:
            self.networks.text_encoder.frozen = False  # the base is frozen; its adapter trains

    def update_ema(self, applied: Tensor | None = None) -> None:
        if self.ema is not None:
            self.ema.update(self.network, applied)

    def checkpoint_entries(self, checkpoint: dict[str, Any]) -> None:
        state_with_prefixes(checkpoint, PREFIXES)  # the adapter (and its EMA), not the frozen base
        checkpoint["ldm"]["adapter"] = asdict(self.config)

    def check_loaded(self, checkpoint: dict[str, Any], expected: list[str]) -> None:
        check_has_keys(checkpoint, expected, PREFIXES)

    def _weights(self, use_ema: bool) -> LoRANetwork:
        return self.ema.model if (use_ema and self.ema is not None) else self.network

    @contextmanager
    def sampling_bundle(self, global_step: int, use_ema: bool) -> Iterator[ModelBundle]:
        """The (EMA) adapter applied to the shared frozen networks for the length of the block."""
        weights = self._weights(use_ema)
        text_encoder = self.networks.text_encoder
        with self.network.weights_of(weights) if weights is not self.network else nullcontext():
            text_encoder._clear_cache()  # contexts made with other adapter weights
            try:
                yield self.networks.bundle(global_step)
            finally:
                text_encoder._clear_cache()

    def bundle(self, global_step: int, use_ema: bool) -> ModelBundle:
        """Copies of the U-Net and text encoder with the (EMA) adapter merged in."""
        self.network.detach()  # copy the bases without the hooks
        try:
            roots = {name: dequantize_(copy.deepcopy(m)) for name, m in self.networks.roots().items()}
        finally:
            self.network.attach(self.networks.roots())
        self._weights(use_ema).merge_into(roots, 1.0)
        roots["text_encoder"].frozen = True
        return self.networks.bundle(global_step, unet=roots["unet"], text_encoder=roots["text_encoder"])

    def write_files(self, end: RunEnd) -> dict[str, str]:
        """<run>/lora.safetensors with the EMA weights when the run kept them (+ <run>/lora_diffusers/ where diffusers
        reads only its own layout: an MMDiT's)."""
        from ldm.formats.lora_files import diffusers_needs_peft, ldm_metadata, save_lora_file

        weights, roots = self._weights(use_ema=True), self.networks.roots()
        path = save_lora_file(weights, roots, end.run_dir / "lora.safetensors",
                              metadata=ldm_metadata(self.config), resolution=end.model_config.get("resolution"),
                              prediction_type=self.networks.schedule.prediction_type,
                              training={"ss_steps": str(end.global_step)})
        print(f"LoRA ({self.config.type}): {path}")
        files = {"lora": str(path)}
        if diffusers_needs_peft(weights, roots):
            folder = save_lora_file(weights, roots, end.run_dir / "lora_diffusers", "peft",
                                    metadata=ldm_metadata(self.config)).parent
            print(f"LoRA ({self.config.type}, diffusers layout): {folder}")
            files["lora_diffusers"] = str(folder)
        return files
