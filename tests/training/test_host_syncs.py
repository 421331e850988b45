"""No host syncs in the training step (issue 28, item 1): a few optimizer steps of a tiny Lightning fit run under a
recorder of every op that copies a device value to the host, and none may happen outside the documented sync
points (ldm.training.module.host_sync): the report at a logging step, a checkpoint, and the per-step verdict of an
optimizer that cannot skip on the device.

On the CPU nothing syncs for real, so the recorder tracks where each tensor lives as it would on a GPU: the
parameters, the batch after Lightning moved it, and everything computed from them are device tensors; tensors made
on the host (a factory call without a device, e.g. the caption-dropout mask ``torch.rand(n) < p``) and results of
host tensors alone stay on the host. A scalar read (``_local_scalar_dense``: ``.item()``, ``float(t)``,
``bool(t)``, ``int(t)``; ``aten.equal``; ``aten.is_nonzero``) of a device tensor is recorded, and so is a copy of
one to the host (``.cpu()``, ``.to("cpu")`` unless non_blocking, ``.tolist()``, ``.numpy()``), each with a summary
of the Python stack. ``.to(x.device)`` counts as a move to the device: on the CPU it cannot be told from
``.to(torch.device("cpu"))``, which the code therefore never writes for a host copy."""

from __future__ import annotations

import csv
import traceback
from dataclasses import dataclass

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from ldm.data.datamodule import HOST_KEYS
from ldm.training.callbacks.throughput import ThroughputCallback
from ldm.training.module.host_sync import HOST_SKIP, REPORT, active_sync_point
from ldm.training.run.train import build_diffusion_module
from tests.helpers.training import SDXL_TINY

pytestmark = pytest.mark.usefixtures("one_thread")

aten = torch.ops.aten
SCALAR_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
FACTORIES = {torch.tensor, torch.as_tensor, torch.rand, torch.randn, torch.randint, torch.randperm, torch.zeros,
             torch.ones, torch.full, torch.empty, torch.arange, torch.linspace, torch.from_numpy}
HOST_COPIES = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}
STACK_FILES = ("/ldm/", "/lightning/", "/torch/optim/", "/tests/")


@dataclass(frozen=True)
class Sync:
    op: str
    step: int
    point: str | None  # the documented sync point it happened in (None: a stray sync)
    lightning_logging: bool  # inside Lightning's logger connector (its conversion of logged tensors)
    in_optimizer: bool  # inside a torch optimizer's own step
    where: str

    def __str__(self) -> str:
        return f"step {self.step}: {self.op} at {self.where}"


def _stack() -> tuple[str, bool, bool]:
    """A summary of the innermost frames of ldm, Lightning and torch.optim; in Lightning's logger connector;
    in a torch optimizer."""
    frames = [f for f in traceback.extract_stack() if any(s in f.filename for s in STACK_FILES)
              and "test_host_syncs" not in f.filename]
    summary = " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-6:]))
    return (summary, any("logger_connector" in f.filename for f in frames),
            bool(frames) and "/torch/optim/" in frames[-1].filename)


class HostSyncs:
    """Records the copies of device values to the host while active (see the module docstring)."""

    def __init__(self):
        self.host = WeakIdKeyDictionary()  # tensors living on the host; any other tensor is a device tensor
        self.syncs: list[Sync] = []
        self.step = -1
        self.active = False
        self._modes = (_Calls(self), _Ops(self))

    def start(self) -> None:
        for mode in self._modes:
            mode.__enter__()
        self.active = True

    def stop(self) -> None:
        if self.active:
            for mode in reversed(self._modes):
                mode.__exit__(None, None, None)
            self.active = False

    def on_host(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.host

    def moved_to_device(self, *tensors) -> None:
        for t in tensors:
            self.host.pop(t, None)

    def record(self, op: str, inputs) -> None:
        if any(isinstance(t, torch.Tensor) and not self.on_host(t) for t in inputs):
            where, lightning_logging, in_optimizer = _stack()
            self.syncs.append(Sync(op, self.step, active_sync_point(), lightning_logging, in_optimizer, where))


class _Recording:
    """A torch mode that reports to one HostSyncs."""

    def __init__(self, rec: HostSyncs):
        super().__init__()
        self.rec = rec


class _Ops(_Recording, TorchDispatchMode):
    """aten level: scalar reads, and which results stay on the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in SCALAR_READS:
            self.rec.record(f"aten.{func.overloadpacket.__name__}", inputs)
        out = func(*args, **kwargs)
        outputs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        if inputs and all(self.rec.on_host(t) for t in inputs):
            for o in outputs:
                self.rec.host[o] = True
        elif inputs:
            self.rec.moved_to_device(*outputs)  # device inputs (an in-place op on a host tensor included)
        return out


class _Calls(_Recording, TorchFunctionMode):
    """Python level: host copies that do not reach aten on the CPU, factories, moves to the device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        targets = list(args[1:]) + [kwargs.get("device")]
        to_cpu = func is torch.Tensor.to and "cpu" in [a for a in targets if isinstance(a, str)]
        if func in HOST_COPIES or (to_cpu and not kwargs.get("non_blocking")):
            self.rec.record(f"Tensor.{func.__name__}", args[:1])
        out = func(*args, **kwargs)
        if func in FACTORIES and isinstance(out, torch.Tensor) and kwargs.get("device") in (None, "cpu"):
            if not (func is torch.as_tensor and isinstance(args[0], torch.Tensor)):
                self.rec.host[out] = True
        elif func is torch.Tensor.to and any(isinstance(a, (torch.device, torch.Tensor)) for a in targets):
            self.rec.moved_to_device(out)  # .to(x.device): where the step's tensors live
        return out


class Window(L.Callback):
    """Records from the first training batch to the end of training; each batch moved to the device is a
    device tensor (but the keys the data module keeps on the host)."""

    def __init__(self, rec: HostSyncs):
        self.rec = rec

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.rec.active:
            self.rec.start()
        self.rec.step = trainer.global_step
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and key in HOST_KEYS:
                self.rec.host[value] = True
            elif isinstance(value, torch.Tensor):
                self.rec.moved_to_device(value)

    def on_train_end(self, trainer, pl_module):
        self.rec.stop()


class WithPriorAndContext:
    """The data module's batches with DreamBooth's class rows (``is_prior``) and cached text contexts."""

    def __init__(self, loader, text_encoder):
        self.loader, self.text_encoder = loader, text_encoder

    def __iter__(self):
        for batch in self.loader:
            n = len(batch["caption"])
            batch["is_prior"] = torch.arange(n) >= n // 2
            with torch.no_grad():
                batch["context"] = self.text_encoder(list(batch["caption"]))
            yield batch


def fit_recorded(cfg, root, max_steps: int = 5, log_every: int = 3, nan_step: int | None = 2, prior_and_context=False,
                 logger=False, progress_bar=False):
    """A tiny fit under the recorder; the latents of ``nan_step`` poisoned (a skipped step)."""
    module = build_diffusion_module(cfg)
    encode, calls = module.encode_images, {"n": 0}

    def poisoned(batch):
        latents = encode(batch)
        step, calls["n"] = calls["n"], calls["n"] + 1
        return latents * float("nan") if step == nan_step else latents

    module.encode_images = poisoned
    data = instantiate(cfg.data)
    if prior_and_context:
        loader = data.train_dataloader
        data.train_dataloader = lambda: WithPriorAndContext(loader(), module.text_encoder)
    rec = HostSyncs()
    callbacks = [Window(rec), ThroughputCallback(), *([LearningRateMonitor("step")] if logger else [])]
    trainer = L.Trainer(default_root_dir=root, max_steps=max_steps, accelerator="cpu", logger=logger,
                        enable_checkpointing=False, enable_progress_bar=progress_bar, enable_model_summary=False,
                        limit_val_batches=0, log_every_n_steps=log_every, gradient_clip_val=1.0,
                        callbacks=callbacks)
    try:
        trainer.fit(module, datamodule=data)
    finally:
        rec.stop()
    return module, trainer, rec


def assert_syncs_only_at_report_steps(rec: HostSyncs, report_steps: set[int], per_step: tuple[str, ...] = (),
                                      optimizer_reads: bool = False):
    """No stray sync; the guard's report once at each report step; Lightning's conversions of logged tensors at
    those steps only; the ``per_step`` points at every step; the optimizer's own reads when ``optimizer_reads``."""
    stray = [s for s in rec.syncs if s.point is None and not s.lightning_logging
             and not (optimizer_reads and s.in_optimizer)]
    assert not stray, "host syncs in the training step:\n" + "\n".join(map(str, stray))
    reports = [s.step for s in rec.syncs if s.point == REPORT]
    assert sorted(reports) == sorted(report_steps), "the guard reads its device state once per logging step"
    lightning = {s.step for s in rec.syncs if s.lightning_logging}
    assert lightning <= report_steps, "Lightning converts logged tensors at its logging steps only"
    for point in per_step:
        assert sorted(s.step for s in rec.syncs if s.point == point) == sorted(set(range(max(report_steps) + 1)))
    others = {s.point for s in rec.syncs} - {None, REPORT, *per_step}
    assert not others, others


CONFIGS = {
    # the whole U-Net + EMA, min-SNR (the default), cached contexts with caption dropout, DreamBooth's prior rows,
    # pyramid noise
    "full": ("module.ema_decay=0.9", "module.p_uncond=0.5", "module.noise.pyramid_iterations=2"),
    "lora": ("adapter=lora", "adapter.preset=full", "adapter.text_encoder=true", "module.ema_decay=0.9"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_host_sync_in_the_training_step(tiny_cfg, tmp_path, name):
    """With the CSV logger and the learning-rate monitor (full), the progress bar (lora) and the throughput
    callback, as a run has them."""
    logger = L.pytorch.loggers.CSVLogger(tmp_path / "logs", name="", version="") if name == "full" else False
    module, trainer, rec = fit_recorded(tiny_cfg(*CONFIGS[name]), tmp_path, prior_and_context=name == "full",
                                        logger=logger, progress_bar=name == "lora")
    assert trainer.global_step == 5 and module.guard.nonfinite_total == 1  # step 2 was skipped, learned at step 2
    assert int(module.part.ema.num_updates) == 4
    # logging steps: (step + 1) % 3 == 0, and the run's last step
    assert_syncs_only_at_report_steps(rec, {2, 4})
    if logger:  # Lightning's logging step 2 was the skipped one: its row counts it and has no loss
        with open(tmp_path / "logs" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        guarded = [(r["step"], r["train/nonfinite_steps"], r.get("train/loss", "")) for r in rows
                   if r.get("train/nonfinite_steps") or r.get("train/loss")]
        assert guarded == [("2", "1.0", "")]


def test_no_host_sync_in_an_sdxl_training_step(tmp_path):
    from tests.helpers.training import compose_train

    cfg = compose_train(tmp_path, SDXL_TINY + ["++data.latent_cache=null", "module.ema_decay=0.9",
                                                "module.p_uncond=0.5"])
    module, trainer, rec = fit_recorded(cfg, tmp_path, max_steps=4, log_every=2, nan_step=None)
    assert trainer.global_step == 4 and module.guard.nonfinite_total == 0
    assert_syncs_only_at_report_steps(rec, {1, 3})


def test_an_optimizer_that_cannot_skip_on_the_device_reads_the_verdict_every_step(tiny_cfg, tmp_path):
    """Adafactor has no fused kernel taking found_inf: the verdict is read on the host every step (HOST_SKIP), and
    the skipped step still leaves the weights alone."""
    module, trainer, rec = fit_recorded(tiny_cfg("optim=adafactor", "module.ema_decay=0.9"), tmp_path)
    assert module.guard.nonfinite_total == 1 and all(torch.isfinite(p).all() for p in module.unet.parameters())
    # torch's Adafactor reads two norms of every parameter per step itself (torch/optim/_adafactor.py: .item())
    assert any(s.in_optimizer for s in rec.syncs)
    assert_syncs_only_at_report_steps(rec, {2, 4}, per_step=(HOST_SKIP,), optimizer_reads=True)


def test_the_recorder_tells_device_reads_from_host_reads():
    weight = torch.nn.Parameter(torch.randn(3))
    rec = HostSyncs()
    rec.start()
    try:
        mask = torch.rand(4) < 0.5
        mask.tolist(), bool(mask.any()), (mask & mask).tolist()  # made on the host: no device sync
        y = (weight * 2).sum().detach()
        float(y), y.tolist(), weight.detach().cpu(), bool(weight.isfinite().all())
        weight.to("cpu", non_blocking=True)
        moved = torch.tensor([1.0]).to(weight.device)
        moved.item()
    finally:
        rec.stop()
    # float(y), y.tolist(), .cpu(), bool(...), .item() of a tensor moved to the device; none of the host mask's
    assert [s.op for s in rec.syncs] == ["aten._local_scalar_dense", "Tensor.tolist", "Tensor.cpu",
                                         "aten._local_scalar_dense", "aten._local_scalar_dense"]
