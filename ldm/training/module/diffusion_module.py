"""The LightningModule of latent diffusion: the seed's Algorithm 1 in latent space, with classifier-free
conditioning dropout.

    repeat
        x_0 ~ q(x_0)                      (an image's latent: the frozen VAE's, or the latent cache's)
        c = "" with probability p_uncond  (conditioning dropout, so the model also learns the unconditional output)
        (SD3: each text encoder's features zeroed with its own probability, module.encoder_dropout)
        t ~ Uniform({1, ..., T}),  eps ~ N(0, I)
        take a gradient step on  || target(x_0, eps, t) - model(x_t(x_0, eps, t), t, c) ||^2

with x_t, the target and the loss from the objective (``ldm.diffusion.objectives``): x_t = sqrt(abar_t) x_0 +
sqrt(1 - abar_t) eps with an eps / v target, or flow matching's x_t = (1 - sigma_t) x_0 + sigma_t eps with the
velocity eps - x_0.
    until converged

What trains is a :class:`~ldm.training.module.trained.TrainedPart` (the whole U-Net, the U-Net and text encoder, an
adapter network, textual-inversion rows): the module holds one and never asks which. Beside the loop, with names
of their own: the step's skip-or-apply decision (``GuardedUpdate``), what a checkpoint holds (``CheckpointGate``),
the compiled U-Net forward (``UNetCompile``) and the optimizer's training / inference weights (``OptimizerModes``:
schedule-free AdamW's y and x, switched around validation, sampling, the EMA update, checkpoints and files)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import torch
from torch import Tensor, nn

from ldm.diffusion.losses import LossOptions
from ldm.diffusion.noise import NoiseOptions
from ldm.diffusion.objectives import noised_batch, objective_for
from ldm.diffusion.prior_preservation import prior_preservation_loss
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.timestep_sampling import TimestepSampling
from ldm.models.bundle import ModelBundle
from ldm.training.module.checkpoint_gate import CheckpointGate
from ldm.training.module.divergence import DivergenceGuard
from ldm.training.module.ema import holds_average
from ldm.training.module.guarded_update import GuardedUpdate
from ldm.training.module.micro_conditioning import is_dual_text, training_conditioning
from ldm.training.module.optimizer_mode import NO_MODES, optimizer_modes, restore_train_weights
from ldm.training.module.sharded.fsdp2 import shard_module, whole_weights
from ldm.training.module.text_context import EncoderDropout, cached_context
from ldm.training.module.trained import Networks, RunEnd, freeze, trained_part
from ldm.training.module.unet_compile import UNetCompile

VAL_TIMESTEP_FRACTIONS = (0.05, 0.25, 0.5, 0.75, 0.95)

__all__ = ["LatentDiffusion", "freeze"]


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
        ema_decay: float | None = 0.999,
        sample_posterior: bool = True,
        channels_last: bool = False,
        max_nonfinite_steps: int = 5,
        adapter: Any = None,
        loss_spike_factor: float | None = 100.0,
        grad_norm_spike_factor: float | None = 100.0,
        prior_loss_weight: float = 1.0,
        loss: LossOptions | None = None,
        timesteps: TimestepSampling | None = None,
        noise: NoiseOptions | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        text_encoder_lr: float | None = None,
        encoder_dropout: dict[str, float] | None = None,
    ):
        super().__init__()
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        self.encoder_dropout = EncoderDropout(text_encoder, encoder_dropout)  # SD3: each encoder on its own
        self.unet, self.autoencoder, self.text_encoder = unet, freeze(autoencoder), text_encoder
        self.schedule, self.sample_posterior = schedule, sample_posterior
        # eps / v on a noise schedule, or flow matching's velocity (schedule=flow): the loop below never asks which
        self.objective = objective_for(schedule)
        self.objective.check(min_snr_gamma, loss)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.p_uncond, self.min_snr_gamma, self.offset_noise = p_uncond, min_snr_gamma, offset_noise
        self.prior_loss_weight = float(prior_loss_weight)  # DreamBooth batches (data=dreambooth): class rows' weight
        # loss type / debiased weighting, timestep sampling, pyramid noise / input perturbation (None: the defaults)
        self.loss_options, self.timestep_sampling, self.noise_options = loss, timesteps, noise
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.networks = Networks(unet, self.autoencoder, text_encoder, schedule)
        self.part = trained_part(self.networks, adapter, ema_decay, text_encoder_lr)
        for name, module in self.part.modules().items():  # their names are the checkpoint's key prefixes
            self.add_module(name, module)
        self.strict_loading = self.part.strict_loading
        # the EMA averages the weights inference uses (schedule-free: x), switched to only where there is one
        self.keeps_average = holds_average(self.part.modules().values())
        self.optimizer_mode = NO_MODES  # the optimizer's (configure_optimizers)
        # after the EMA copy: module copies drop the compiled forward (nn.Module.__getstate__), so they run eager
        self.unet_compile = UNetCompile(self.unet, compile_backend) if compile else None
        self.model_config: dict[str, Any] = {}  # the Hydra model node, saved with every checkpoint
        # skipped steps: NaN/inf, or a loss / gradient-norm spike; max_nonfinite_steps in a row stop the run
        self.guard = DivergenceGuard(loss_spike_factor, grad_norm_spike_factor,
                                     max_skipped_in_a_row=max_nonfinite_steps)
        self.update_guard, self.checkpoint_gate = GuardedUpdate(self.guard), CheckpointGate(self.guard)
        self._last_batch: dict[str, Any] | None = None
        self.written_files: dict[str, str] = {}  # what the trained part wrote when training ended
        self.run_dir: Path | None = None  # set by train(cfg); a module fitted without a run folder writes no files

    def adapter_roots(self) -> dict[str, nn.Module]:
        return self.networks.roots()

    @contextmanager
    def sampling_bundle(self, use_ema: bool = True) -> Iterator[ModelBundle]:
        """The model as sampling sees it for the length of the block ((EMA) weights in place; inference weights)."""
        with self.optimizer_mode.inference_weights(), self.part.sampling_bundle(self.global_step, use_ema) as bundle:
            yield bundle

    def sampling_controls(self, images: Tensor, use_ema: bool = True) -> list:
        """What the trained part samples with these control images (a ControlNet's ``Control``; else nothing)."""
        return self.part.controls(images, use_ema)

    def bundle(self, use_ema: bool = True) -> ModelBundle:
        """The model as sampling sees it (EMA weights by default), as copies where training would change them
        (the optimizer's inference weights: copied where the part would share them)."""
        with self.optimizer_mode.inference_weights():
            return self.optimizer_mode.own_copies(self.part.bundle(self.global_step, use_ema))

    def train(self, mode: bool = True):
        super().train(mode)
        freeze(self.autoencoder)  # Lightning's .train() must not wake the frozen parts up
        self.part.set_train_mode()
        return self

    # ---------------------------------------------------------------------------------------------- Algorithm 1
    @torch.no_grad()
    def encode_images(self, batch: dict[str, Any]) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, h, w); a batch from the latent cache passes."""
        if "latents" in batch:
            return batch["latents"]
        return self.autoencoder.encode_latents(batch["image"], sample=self.sample_posterior)

    def drop_captions(self, captions: list[str]) -> tuple[list[str], Tensor]:
        """Classifier-free conditioning dropout: each caption becomes "" with probability p_uncond, so the model
        also learns the unconditional prediction, from the same empty-prompt context sampling uses. The mask is
        drawn on the host (the captions are host strings): reading it back is no device sync."""
        drop = torch.rand(len(captions)) < self.p_uncond
        return ["" if d else c for c, d in zip(captions, drop.tolist())], drop

    def encode_text(self, captions: list[str]) -> Tensor:
        with torch.set_grad_enabled(self.part.text_encoder_learns and torch.is_grad_enabled()):
            return self.text_encoder(list(captions))

    def forward(self, x_t: Tensor, t: Tensor, context, **unet_kwargs) -> Tensor:
        if self.unet_compile is not None:  # the same (compiled in place) U-Net, timing its first forward
            return self.unet_compile(x_t, t, context, **unet_kwargs)
        return self.unet(x_t, t, context, **unet_kwargs)

    def step_loss(self, batch: dict[str, Any]) -> Tensor:
        """Algorithm 1's loss on a batch (caption dropout, random timesteps and noise)."""
        latents = self.encode_images(batch)
        captions, dropped = self.drop_captions(batch["caption"])
        if "context" not in batch or self.part.text_encoder_learns:  # a learning encoder cannot use cached contexts
            context = self.encode_text(captions)
        else:
            context = cached_context(self.text_encoder, batch, captions)  # the dropped captions' the empty prompt's
        context = self.encoder_dropout(context, len(captions))
        context = self._unet_conditioning(context, batch, dropped, latents)
        x_t, t, target = noised_batch(self.objective, latents, self.offset_noise, timesteps=self.timestep_sampling,
                                      noise_options=self.noise_options)
        denoiser = self.part.denoiser(self, batch)  # the U-Net (+ what the trained part adds from the batch)
        return self.batch_loss(denoiser(x_t, self.objective.model_timestep(t, x_t), context), target, t, batch)

    def batch_loss(self, output: Tensor, target: Tensor, t: Tensor, batch: dict[str, Any]) -> Tensor:
        """The loss of a batch's prediction (loss type, min-SNR / debiased weighting): masked where the batch has
        a "mask" (ldm.diffusion.masked_loss), and instance + prior_loss_weight x class rows where it marks class
        rows in "is_prior" (DreamBooth, ldm.diffusion.prior_preservation); a plain batch has neither."""
        mask = batch.get("mask")

        def loss_of(rows):
            return self.objective.loss(output[rows], target[rows], t[rows], self.min_snr_gamma,
                                       self.loss_options, mask=None if mask is None else mask[rows])

        return prior_preservation_loss(loss_of, batch.get("is_prior"), self.prior_loss_weight)

    def _unet_conditioning(self, context, batch: dict[str, Any], dropped: Tensor, latents: Tensor):
        """SDXL (a dual encoder's {"crossattn", "pooled"}): + the micro-conditioning vector from the batch, the
        dropped captions' text zeroed (see ldm.training.module.micro_conditioning); other contexts pass unchanged."""
        if not is_dual_text(context):
            return context
        f = self.autoencoder.downsample_factor
        image_size = (latents.shape[-2] * f, latents.shape[-1] * f)
        return training_conditioning(context, batch, dropped, image_size,
                                     zero_dropped=self.text_encoder.zero_uncond)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # always backpropagated, even when NaN: with DDP every rank must join the gradient all-reduce; whether the
        # update is applied is decided in on_before_optimizer_step, on values all ranks agree on
        loss = self.step_loss(batch)
        self.update_guard.add_loss(loss)
        self._last_batch = batch
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Apply the update or skip it (see GuardedUpdate: decided on the device, reported at logging steps)."""
        self.update_guard.decide(self, optimizer, self.part.parameters(), batch_size=len(self._last_batch["caption"]))

    def optimizer_step(self, *args, **kwargs) -> None:
        """The step (closure: training_step + backward, then on_before_optimizer_step's verdict), then the EMA
        update weighted by the verdict, before any callback (checkpointing) sees the batch end; a skipped step
        leaves the EMA alone."""
        super().optimizer_step(*args, **kwargs)
        applied = self.update_guard.after_step()
        with self.optimizer_mode.inference_weights() if self.keeps_average else nullcontext():
            self.part.update_ema(applied)

    def configure_model(self) -> None:  # trainer=fsdp2 (ModelParallelStrategy's mesh): FSDP2, before the optimizer
        shard_module(self, self.device_mesh)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.part.param_groups())
        self.optimizer_mode = optimizer_modes(optimizer)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "step"}}

    # ----------------------------------------------------------------------------------------------- validation
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
        losses, denoiser = [], self.part.denoiser(self.unet, batch)
        for frac in VAL_TIMESTEP_FRACTIONS:
            t = torch.full((latents.shape[0],), int(frac * (T - 1)), device=latents.device, dtype=torch.long)
            noise = torch.randn(latents.shape, generator=g).to(latents)
            x_t = self.objective.noisy(latents, t, noise)
            output = denoiser(x_t, self.objective.model_timestep(t, x_t), context)
            losses.append(self.objective.loss(output, self.objective.target(latents, noise, t), t))
        return torch.stack(losses).mean()

    def on_train_start(self) -> None:
        self.optimizer_mode.start_training()

    def on_validation_start(self) -> None:
        self.optimizer_mode.to_inference()

    def on_validation_end(self) -> None:
        self.optimizer_mode.to_training()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.validation_loss(batch, batch_idx)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["caption"]))

    # ---------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        names = {id(p): n for n, p in self.named_parameters()}
        named = [(names.get(id(p), "?"), p) for p in self.part.parameters()]
        self.checkpoint_gate.fill(checkpoint, model_config=self.model_config, part=self.part, named=named,
                                  global_step=self.global_step, last_loss=self._last_batch_loss())
        self.optimizer_mode.save(checkpoint, names)  # inference weights in state_dict, training weights beside

    def _last_batch_loss(self) -> Callable[[], Tensor] | None:
        """The loss of the last training batch with the current weights, its random draws from a forked generator
        state (the run's streams are untouched); None before the first batch."""
        if self._last_batch is None:
            return None

        def loss() -> Tensor:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                return self.step_loss(self._last_batch)

        return loss

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_train_weights(checkpoint)  # resuming: the optimizer's training weights, not the saved inference ones
        self.guard.load_state_dict(checkpoint.get("ldm", {}).get("guard", {}))
        self.part.check_loaded(checkpoint, list(self.state_dict()))

    def on_train_end(self) -> None:
        """The trained part's files (adapter, embeddings): once, by rank 0, into the run folder (none without one)."""
        with whole_weights(self):  # trainer=fsdp2: gathered on every rank (a collective) for rank 0's files
            if self.run_dir is not None and self.trainer.is_global_zero:
                with self.optimizer_mode.inference_weights():
                    end = RunEnd(Path(self.run_dir), self.global_step, self.model_config)
                    self.written_files = self.part.write_files(end)
