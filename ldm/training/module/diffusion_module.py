"""The LightningModule of latent diffusion: frozen VAE + frozen text encoder + trainable U-Net (the seed's
Algorithm 1 in latent space, with classifier-free conditioning dropout). A text encoder built with ``frozen=False``
(``model.text_encoder.frozen=false``: the from-scratch tiny CLIP of experiment=own_data) trains with the U-Net, in
its own parameter group (``text_encoder_lr``), with its own EMA copy."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from typing import Any, Callable, Iterator

import lightning as L
import torch
from torch import Tensor, nn

from ldm.models.bundle import ModelBundle
from ldm.diffusion.losses import LossOptions, diffusion_loss, noised_batch
from ldm.diffusion.noise import NoiseOptions
from ldm.diffusion.prior_preservation import prior_preservation_loss
from ldm.diffusion.process import q_sample, training_target
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.timestep_sampling import TimestepSampling
from ldm.models.lora import LoRAConfig, LoRANetwork
from ldm.training.module.divergence import DivergenceGuard
from ldm.training.module.ema import EMA
from ldm.training.module.trained import textual_inversion as ti
from ldm.training.module.micro_conditioning import is_dual_text, training_conditioning
from ldm.training.module.unet_compile import UNetCompile

log = logging.getLogger("ldm.training")

VAL_TIMESTEP_FRACTIONS = (0.05, 0.25, 0.5, 0.75, 0.95)


def freeze(module: nn.Module) -> nn.Module:
    """Frozen for real: no gradients, eval mode (dropout/BN off)."""
    return module.requires_grad_(False).eval()


class LatentDiffusion(L.LightningModule):
    def __init__(
        self,
        unet: nn.Module,
        autoencoder: nn.Module,
        text_encoder: nn.Module,
        schedule: NoiseSchedule,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        p_uncond: float = 0.1,
        min_snr_gamma: float | None = None,
        offset_noise: float = 0.0,
        ema_decay: float | None = 0.9999,
        sample_posterior: bool = True,
        channels_last: bool = False,
        max_nonfinite_steps: int = 5,
        adapter: LoRAConfig | ti.TextualInversionConfig | None = None,
        loss_spike_factor: float | None = 100.0,
        grad_norm_spike_factor: float | None = 100.0,
        prior_loss_weight: float = 1.0,
        loss: LossOptions | None = None,
        timesteps: TimestepSampling | None = None,
        noise: NoiseOptions | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        text_encoder_lr: float | None = None,
    ):
        super().__init__()
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        self.unet = unet
        self.autoencoder = freeze(autoencoder)
        # model.text_encoder.frozen=false: the encoder's weights train too (nothing pretrained to preserve)
        self.trains_text_encoder = not getattr(text_encoder, "frozen", True)
        if self.trains_text_encoder and adapter is not None:
            raise ValueError("model.text_encoder.frozen=false with adapter=lora: a LoRA run keeps its base frozen "
                             "(adapter.text_encoder=true adapts the text encoder instead)")
        if text_encoder_lr is not None and not float(text_encoder_lr) > 0:
            raise ValueError(f"module.text_encoder_lr must be > 0 (or null: optim.lr), got {text_encoder_lr!r}")
        self.text_encoder_lr = text_encoder_lr
        self.text_encoder = text_encoder.requires_grad_(True) if self.trains_text_encoder else freeze(text_encoder)
        self.schedule = schedule
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.p_uncond, self.min_snr_gamma, self.offset_noise = p_uncond, min_snr_gamma, offset_noise
        self.sample_posterior = sample_posterior
        self.prior_loss_weight = float(prior_loss_weight)  # DreamBooth batches (data=dreambooth): class rows' weight
        # loss type / debiased weighting, timestep sampling, pyramid noise / input perturbation (None: the defaults)
        self.loss_options, self.timestep_sampling, self.noise_options = loss, timesteps, noise
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.adapter_config = adapter
        self.lora = self._build_adapter(adapter) if isinstance(adapter, LoRAConfig) else None
        # adapter=textual_inversion: only the placeholder's vectors train (ldm/training/textual_inversion.py)
        self.textual_inversion = ti.build(self, adapter) if ti.is_textual_inversion(adapter) else None
        # EMA of what trains: the whole U-Net, or only the adapter weights
        self.ema = EMA(self.trained_module, ema_decay) if ema_decay else None
        self.ema_text = EMA(self.text_encoder, ema_decay) if (ema_decay and self.trains_text_encoder) else None
        # after the EMA copy: module copies drop the compiled forward (nn.Module.__getstate__), so they run eager
        self.unet_compile = UNetCompile(self.unet, compile_backend) if compile else None
        self.model_config: dict[str, Any] = {}  # the Hydra model node, saved with every checkpoint
        # skipped steps: NaN/inf, or a loss / gradient-norm spike; max_nonfinite_steps in a row stop the run
        self.guard = DivergenceGuard(loss_spike_factor, grad_norm_spike_factor, max_skipped_in_a_row=max_nonfinite_steps)
        self._step_losses: list[Tensor] = []  # the losses of the optimizer step being computed (accumulation)
        self._step_skipped = False
        self._last_batch: dict[str, Any] | None = None
        self._checked_step: tuple[int, str | None] | None = None  # (global step, verdict) of the weights to save

    @property
    def nonfinite_total(self) -> int:
        return self.guard.nonfinite_total

    # ------------------------------------------------------------------------------------------------- adapters
    def _build_adapter(self, config: LoRAConfig) -> LoRANetwork:
        """LoRA: the U-Net (and text encoder) stay frozen; the adapter's forward hooks add to their layers."""
        self.unet.requires_grad_(False)  # frozen, but left in train mode: gradient checkpointing needs it
        roots = self.adapter_roots()
        network = LoRANetwork.build(roots, config).attach(roots)
        if config.text_encoder:  # gradients through the encoder, and no cached (stale) contexts
            self.text_encoder.frozen = False
        if config.init_from:
            from ldm.formats.lora_files import read_lora_file

            from ldm.formats.lora_files import LoRAFileError

            try:
                lora = read_lora_file(config.init_from, roots)
            except LoRAFileError as e:
                raise ValueError(f"adapter.init_from: {e}") from e
            not_here = network.load_weights(lora.weights)
            print(f"adapter.init_from: {len(lora.weights) - len(not_here)} layers from {lora.path} ({lora.layout})")
            skipped = lora.unmapped + not_here
            if skipped:
                print(f"adapter.init_from: {len(skipped)} entries of the file are not used (not in this model or not "
                      f"adapted by preset={config.preset!r}): {', '.join(skipped[:10])}")
        # only the adapter is in the checkpoint; the base comes from model.pretrained again on resume
        self.strict_loading = False
        return network

    @property
    def trained_module(self) -> nn.Module:
        """What the optimizer updates: the adapter (LoRA / textual-inversion vectors), or the whole U-Net."""
        if self.textual_inversion is not None:
            return self.textual_inversion
        return self.lora if self.lora is not None else self.unet

    def adapter_roots(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    @property
    def text_encoder_adapted(self) -> bool:
        if self.textual_inversion is not None:  # gradients flow through the frozen encoder to the vectors
            return True
        return self.adapter_config is not None and bool(self.adapter_config.text_encoder)

    @property
    def text_encoder_learns(self) -> bool:
        """Gradients flow through the text encoder (its weights or its adapter train): no cached contexts."""
        return self.trains_text_encoder or self.text_encoder_adapted

    def trained_parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimizer updates: the U-Net (or adapter), and a training text encoder's."""
        params = list(self.trained_module.parameters())
        return params + list(self.text_encoder.parameters()) if self.trains_text_encoder else params

    @contextmanager
    def sampling_bundle(self, use_ema: bool = True) -> Iterator[ModelBundle]:
        """The model as sampling sees it, for the length of the block: with an adapter, the (EMA) adapter is applied
        to the shared frozen networks; without one, `bundle()`."""
        if self.textual_inversion is not None:
            with ti.sampling_bundle(self, use_ema) as bundle:
                yield bundle
            return
        if self.lora is None:
            yield self.bundle(use_ema)
            return
        weights = self.ema.model if (use_ema and self.ema is not None) else self.lora
        with self.lora.weights_of(weights) if weights is not self.lora else nullcontext():
            self.text_encoder._clear_cache()  # contexts made with other adapter weights
            try:
                yield ModelBundle(self.unet, self.autoencoder, self.text_encoder, self.schedule, source="training",
                                  meta={"global_step": self.global_step})
            finally:
                self.text_encoder._clear_cache()

    # ----------------------------------------------------------------------------------------------- frozen parts
    def train(self, mode: bool = True):
        super().train(mode)
        freeze(self.autoencoder)  # Lightning's .train() must not wake the frozen parts up
        if not self.trains_text_encoder:
            freeze(self.text_encoder)
        if self.text_encoder_adapted:
            self.text_encoder.frozen = False  # freeze() set eval mode and no grads on the base; the adapter trains
        return self

    @torch.no_grad()
    def encode_images(self, batch: dict[str, Any]) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, h, w); a batch from the latent cache passes."""
        if "latents" in batch:
            return batch["latents"]
        return self.autoencoder.encode_latents(batch["image"], sample=self.sample_posterior)

    def drop_captions(self, captions: list[str]) -> tuple[list[str], Tensor]:
        """Classifier-free conditioning dropout: each caption becomes "" with probability p_uncond, so the model
        also learns the unconditional prediction, from the same empty-prompt context sampling uses."""
        drop = torch.rand(len(captions)) < self.p_uncond
        return ["" if d else c for c, d in zip(captions, drop.tolist())], drop

    def encode_text(self, captions: list[str]) -> Tensor:
        with torch.set_grad_enabled(self.text_encoder_learns and torch.is_grad_enabled()):
            return self.text_encoder(list(captions))

    # -------------------------------------------------------------------------------------------------- training
    def forward(self, x_t: Tensor, t: Tensor, context) -> Tensor:
        if self.unet_compile is not None:  # the same (compiled in place) U-Net, timing its first forward
            return self.unet_compile(x_t, t, context)
        return self.unet(x_t, t, context)

    def step_loss(self, batch: dict[str, Any]) -> Tensor:
        """Algorithm 1's loss on a batch (caption dropout, random timesteps and noise)."""
        latents = self.encode_images(batch)
        captions, dropped = self.drop_captions(batch["caption"])
        if "context" not in batch or self.text_encoder_learns:  # a learning encoder cannot use cached contexts
            context = self.encode_text(captions)
        else:
            context = self._dropped_context(batch, captions)
        context = self._unet_conditioning(context, batch, dropped, latents)
        x_t, t, target = noised_batch(self.schedule, latents, self.offset_noise, timesteps=self.timestep_sampling,
                                      noise_options=self.noise_options)
        return self.batch_loss(self(x_t, t, context), target, t, batch)

    def batch_loss(self, output: Tensor, target: Tensor, t: Tensor, batch: dict[str, Any]) -> Tensor:
        """The loss of a batch's prediction (loss type, min-SNR / debiased weighting): masked where the batch has
        a "mask" (ldm.diffusion.masked_loss), and instance + prior_loss_weight x class rows where it marks class
        rows in "is_prior" (DreamBooth, ldm.diffusion.prior_preservation); a plain batch has neither."""
        mask = batch.get("mask")

        def loss_of(rows):
            return diffusion_loss(output[rows], target[rows], self.schedule, t[rows], self.min_snr_gamma,
                                  self.loss_options, mask=None if mask is None else mask[rows])

        return prior_preservation_loss(loss_of, batch.get("is_prior"), self.prior_loss_weight)

    def _unet_conditioning(self, context, batch: dict[str, Any], dropped: Tensor, latents: Tensor):
        """SDXL (a dual encoder's {"crossattn", "pooled"}): + the micro-conditioning vector from the batch, the
        dropped captions' text zeroed (see ldm.training.module.micro_conditioning); other contexts pass unchanged."""
        if not is_dual_text(context):
            return context
        f = int(getattr(self.autoencoder, "downsample_factor", 1))
        image_size = (latents.shape[-2] * f, latents.shape[-1] * f)
        return training_conditioning(context, batch, dropped, image_size,
                                     zero_dropped=bool(getattr(self.text_encoder, "zero_uncond", False)))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # always backpropagated, even when NaN: with DDP every rank must join the gradient all-reduce; whether the
        # update is applied is decided in on_before_optimizer_step, on values all ranks agree on
        loss = self.step_loss(batch)
        self._step_losses.append(loss.detach())
        self._last_batch = batch
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Apply the update or skip it: a NaN/inf or spiking loss or U-Net gradient norm (after unscaling, before
        clipping) clears the gradients, so the optimizer leaves the weights alone; the EMA and the logged
        loss then skip the step too (see DivergenceGuard). Logs train/loss and train/grad_norm of applied steps."""
        local = torch.stack(self._step_losses).mean() if self._step_losses else torch.tensor(float("nan"))
        self._step_losses = []
        loss = local
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            loss = loss.clone()  # the decision is on the mean loss over the ranks: every rank skips or none does
            torch.distributed.all_reduce(loss)
            loss /= torch.distributed.get_world_size()
        params = [p for p in self.trained_parameters() if p.grad is not None]
        grad_norm = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
                     if params else None)  # DDP has all-reduced the gradients already: the same on every rank
        loss_value = float(loss)
        grad_value = None if grad_norm is None else float(grad_norm)
        if self._loss_scale_overflow(loss_value, grad_value):
            self._step_skipped = True  # GradScaler skips the update and lowers its scale: no EMA update, no log
            return
        reason = self.guard.verdict(loss_value, grad_value)
        self._step_skipped = reason is not None
        if reason is None:
            self.guard.accept(loss_value, grad_value)
            self.log("train/loss", local, prog_bar=True, batch_size=len(self._last_batch["caption"]))
            if grad_norm is not None:
                self.log("train/grad_norm", grad_norm, batch_size=1)
            return
        for p in self.trained_parameters():
            p.grad = None
        self._forget_step_metrics("train/loss", "train/grad_norm")  # no stale value in this step's log row
        log.warning("step %d skipped: %s", self.global_step, reason)
        self.guard.skip(reason)
        self.log("train/nonfinite_steps", float(self.guard.nonfinite_total), batch_size=1)
        self.log("train/diverged_steps", float(self.guard.diverged_total), batch_size=1)
        self.guard.stop_if_persistent(reason)  # max_nonfinite_steps in a row

    def _loss_scale_overflow(self, loss: float, grad_norm: float | None) -> bool:
        """fp16 loss scaling (16-mixed): a finite loss whose unscaled gradients are inf/NaN is the scaler's overflow,
        which GradScaler handles itself (skips the step, halves the scale), not a divergence of the weights."""
        trainer = self._trainer
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None) if trainer is not None else None
        if scaler is None or grad_norm is None or math.isfinite(grad_norm) or not math.isfinite(loss):
            return False
        log.info("step %d: fp16 loss-scale overflow (scale %g), the scaler skips it", self.global_step,
                 scaler.get_scale())
        return True

    def _dropped_context(self, batch: dict[str, Any], captions: list[str]) -> Tensor:
        """Cached text contexts: swap in the empty-prompt context where the caption was dropped."""
        context = batch["context"].clone()
        dropped = torch.tensor([c == "" for c in captions], device=context.device)
        if dropped.any():
            context[dropped] = self.text_encoder.empty_context(1).to(context)
        return context

    def optimizer_step(self, *args, **kwargs) -> None:
        """The step (closure: training_step + backward, then on_before_optimizer_step's verdict), then the EMA
        update, before any callback (checkpointing) sees the batch end; a skipped step leaves the EMA alone."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and not self._step_skipped:
            self.ema.update(self.trained_module)
        if self.ema_text is not None and not self._step_skipped:
            self.ema_text.update(self.text_encoder)

    def _forget_step_metrics(self, *names: str) -> None:
        """Drop this epoch's cached values of these step metrics so that the logger writes none for this step
        (Lightning re-sends the last logged value of a metric at every step until the epoch ends)."""
        results = getattr(self.trainer, "_results", None)  # Lightning's _ResultCollection: no public API for this
        for metric in (results or {}).values():
            meta = getattr(metric, "meta", None)
            if meta is not None and meta.name in names:
                metric.reset()

    @torch.no_grad()
    def validation_loss(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Deterministic validation loss: fixed timesteps and noise seeded by the batch index, no dropout, the
        posterior mean as latent, so the same weights always give the same number (for selection and sweeps)."""
        images = batch.get("image")
        latents = batch["latents"] if images is None else self.autoencoder.encode_latents(images, sample=False)
        context = self._unet_conditioning(self.encode_text(batch["caption"]), batch,
                                          torch.zeros(len(batch["caption"]), dtype=torch.bool), latents)
        g = torch.Generator(device="cpu").manual_seed(10_000 + batch_idx)
        T = self.schedule.num_train_timesteps
        losses = []
        for frac in VAL_TIMESTEP_FRACTIONS:
            t = torch.full((latents.shape[0],), int(frac * (T - 1)), device=latents.device, dtype=torch.long)
            noise = torch.randn(latents.shape, generator=g).to(latents)
            x_t = q_sample(self.schedule, latents, t, noise)
            target = training_target(self.schedule, latents, noise, t)
            losses.append(diffusion_loss(self.unet(x_t, t, context), target, self.schedule, t))
        return torch.stack(losses).mean()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.validation_loss(batch, batch_idx)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["caption"]))

    def configure_optimizers(self):
        if self.textual_inversion is not None:
            optimizer = self.optimizer_factory(ti.param_groups(self))
        elif self.lora is not None:
            optimizer = self.optimizer_factory(self.adapter_param_groups())
        elif self.trains_text_encoder:  # two groups: module.text_encoder_lr (null: optim.lr) for the encoder
            lr = {"lr": float(self.text_encoder_lr)} if self.text_encoder_lr is not None else {}
            optimizer = self.optimizer_factory([{"params": list(self.unet.parameters()), "name": "unet"},
                                                {"params": list(self.text_encoder.parameters()),
                                                 "name": "text_encoder", **lr}])
        else:
            optimizer = self.optimizer_factory(self.unet.parameters())  # only the U-Net trains
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "step"}}

    def adapter_param_groups(self) -> list[dict[str, Any]]:
        """U-Net and text-encoder adapters as two parameter groups; adapter.unet_lr / text_encoder_lr override
        optim.lr (the text encoder's defaults to the U-Net adapter's)."""
        cfg = self.adapter_config
        groups = []
        for root, lr in (("unet", cfg.unet_lr), ("text_encoder", cfg.text_encoder_lr or cfg.unet_lr)):
            params = [p for k, m in self.lora.loras.items() if self.lora.paths[k][0] == root for p in m.parameters()]
            if params:
                groups.append({"params": params, "name": f"lora_{root}", **({"lr": float(lr)} if lr else {})})
        return groups

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trained = self.trained_module
        named = list(trained.named_parameters())
        if self.trains_text_encoder:
            named += [("text_encoder." + n, p) for n, p in self.text_encoder.named_parameters()]
        bad = [n for n, p in named if not bool(torch.isfinite(p).all())]
        if bad:
            raise FloatingPointError(f"refusing to write a checkpoint with non-finite weights ({bad[:3]}...); "
                                     "the previous checkpoints are kept")
        checkpoint["ldm"] = {"model": self.model_config, "kind": "latent_diffusion", "guard": self.guard.state_dict()}
        if self.lora is not None:  # the trainable checkpoint: the adapter (and its EMA), not the frozen base
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if k.startswith(("lora.", "ema."))}
            checkpoint["ldm"]["adapter"] = asdict(self.adapter_config)
        if self.textual_inversion is not None:  # the placeholder's vectors (and their EMA) only
            ti.checkpoint_entries(self, checkpoint)
        reason = self.weights_verdict()
        if reason is not None:  # AtomicCheckpointIO writes nothing for it: the previous checkpoints stay the last
            log.warning("step %d: not writing a checkpoint, the weights diverged (%s)", self.global_step, reason)
            checkpoint["ldm"]["refused"] = reason
    @torch.no_grad()
    def weights_verdict(self) -> str | None:
        """Do the weights about to be saved still train? The last update's result was never evaluated, so the
        loss of the last batch is computed once more with them (its random draws from a forked generator state:
        the run's streams are untouched) and judged like a training step's (None: fine)."""
        if self._last_batch is None:
            return None
        if self._checked_step is not None and self._checked_step[0] == self.global_step:
            return self._checked_step[1]  # the step's other checkpoint (last.ckpt beside stepNNN.ckpt)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            loss = self.step_loss(self._last_batch).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss)  # on_save_checkpoint runs on every rank
            loss /= torch.distributed.get_world_size()
        reason = self.guard.verdict(float(loss))
        self._checked_step = (self.global_step, reason)
        return reason

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard.load_state_dict(checkpoint.get("ldm", {}).get("guard", {}))
        if self.textual_inversion is not None:
            ti.check_loaded(self, checkpoint)
        if self.lora is None and self.textual_inversion is None:
            return
        prefixes = ti.PREFIXES if self.textual_inversion is not None else ("lora.", "ema.")
        expected = {k for k in self.state_dict() if k.startswith(prefixes)}
        missing = sorted(expected - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} adapter weights of this config (e.g. "
                             f"{', '.join(missing[:3])}): was it trained with another adapter.preset / rank?")

    def bundle(self, use_ema: bool = True) -> ModelBundle:
        """The model as sampling sees it (EMA weights by default; a copy, so training is untouched). With an adapter:
        copies of the U-Net and text encoder with the (EMA) adapter merged in."""
        if self.textual_inversion is not None:
            return ti.copied_bundle(self, use_ema)
        if self.lora is not None:
            return self._merged_bundle(use_ema)
        unet = self.ema.model if (use_ema and self.ema is not None) else self.unet
        text = self.ema_text.model if (use_ema and self.ema_text is not None) else self.text_encoder
        return ModelBundle(unet, self.autoencoder, text, self.schedule, source="training",
                           meta={"global_step": self.global_step})

    def _merged_bundle(self, use_ema: bool) -> ModelBundle:
        import copy

        weights = self.ema.model if (use_ema and self.ema is not None) else self.lora
        self.lora.detach()  # copy the bases without the hooks
        try:
            roots = {"unet": copy.deepcopy(self.unet), "text_encoder": copy.deepcopy(self.text_encoder)}
        finally:
            self.lora.attach(self.adapter_roots())
        weights.merge_into(roots, 1.0)
        roots["text_encoder"].frozen = True
        return ModelBundle(roots["unet"], self.autoencoder, roots["text_encoder"], self.schedule, source="training",
                           meta={"global_step": self.global_step})

    def on_train_end(self) -> None:
        """With an adapter: <run>/lora.safetensors (kohya layout: ComfyUI / A1111 / sample.py lora=...), EMA
        weights when the run kept them. Textual inversion: <run>/learned_embeds.safetensors + <token>.safetensors."""
        if self.textual_inversion is not None and self.trainer.is_global_zero:
            from pathlib import Path

            self.embedding_paths = ti.save_files(self, Path(self.trainer.default_root_dir))
            print(f"textual inversion: {', '.join(self.embedding_paths.values())}")
        if self.lora is None or not self.trainer.is_global_zero:
            return
        from pathlib import Path

        from ldm.formats.lora_files import ldm_metadata, save_lora_file

        weights = self.ema.model if self.ema is not None else self.lora
        resolution = self.model_config.get("resolution")
        path = save_lora_file(weights, self.adapter_roots(), Path(self.trainer.default_root_dir) / "lora.safetensors",
                              metadata=ldm_metadata(self.adapter_config), resolution=resolution,
                              prediction_type=self.schedule.prediction_type,
                              training={"ss_steps": str(self.global_step)})
        self.lora_path = str(path)
        print(f"LoRA: {path}")
