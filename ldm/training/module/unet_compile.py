"""module.compile=true: torch.compile of the U-Net's forward (one graph: fullgraph=True), in place, with the
compilation time reported. The backward is compiled from the same graph (AOTAutograd) by backends that do so.

``nn.Module.compile`` (not ``torch.compile(module)``) keeps the module object and its state-dict keys (no
``_orig_mod.`` prefix), so checkpoints, the EMA and exports are the same as without it; copies of the module
(the EMA, merged sampling bundles) drop the compiled forward (``nn.Module.__getstate__``) and run eager.
Compilation is lazy: the first forward pays it, and its time is what gets reported."""

from __future__ import annotations

import logging
import shutil
import time

from torch import nn

log = logging.getLogger("ldm.training")


def check_backend(backend: str) -> None:
    """module.compile_backend must name a torch.compile backend; inductor on the CPU needs a C++ compiler."""
    from torch._dynamo import list_backends

    known = list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"module.compile_backend={backend!r} is not a torch.compile backend; choose one of {known}")
    if backend == "inductor" and shutil.which("g++") is None and shutil.which("c++") is None:
        raise ValueError("module.compile_backend=inductor needs a C++ compiler (g++) on the CPU; install one or set "
                         "module.compile_backend=aot_eager")


class UNetCompile:
    """Compiles ``unet`` in place; call it instead of the U-Net to time the first (compiling) forward."""

    def __init__(self, unet: nn.Module, backend: str = "inductor"):
        check_backend(backend)
        self.unet, self.backend = unet, backend
        self.compile_s: float | None = None
        # static shapes: a new batch / context shape compiles once more instead of switching to dynamic shapes,
        # which inductor (torch 2.13, CPU) failed on for this U-Net ("cannot determine truth value of
        # Relational" when the caption length changed between batches). fullgraph: the forward (with any adapter
        # hooks) is one graph, and a change that would break it fails loudly instead of running half eager
        # (tests/training/test_unet_compile.py)
        unet.compile(backend=backend, dynamic=False, fullgraph=True)

    def __call__(self, *args, **kwargs):
        if self.compile_s is not None:
            return self.unet(*args, **kwargs)
        start = time.perf_counter()
        out = self.unet(*args, **kwargs)
        self.compile_s = time.perf_counter() - start
        message = (f"torch.compile(U-Net, backend={self.backend}): first forward {self.compile_s:.1f} s "
                   "(compilation included)")
        log.info(message)
        print(message)
        return out
