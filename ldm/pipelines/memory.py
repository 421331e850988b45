"""Will batch x resolution fit? An estimate of sampling's activation memory, checked before anything is sampled.

The estimate comes from one small probe: a U-Net call and a VAE decode at the smallest size the model takes, with
hooks that record the largest tensor any module returns and the U-Net's skip connections (its ``input_blocks``
outputs, held until the up path). Scaled to the asked size, with s = (latent pixels asked) / (latent pixels probed):

    peak ~= batch x s x (skips + K x largest output)

for the U-Net (K = 4; batch doubled under classifier-free guidance) and the same without skips for the VAE decode
(K = 6: a decoder block holds its input, the normalised copy, the activation and the upsampled map at once); the
larger of the two is compared with the free memory (CUDA: ``mem_get_info``; CPU: MemAvailable and the cgroup
limit). Attention adds no N^2 term: ``F.scaled_dot_product_attention`` runs fused kernels on CPU and CUDA that never
hold the score matrix (measured: 11 MiB for 16k x 16k tokens, not 1 GiB). K was set against the measured peak RSS of
the shapes model on CPU (batch 4 at 256 px: 0.27 GiB measured, 0.38 estimated; batch 2 at 512 px: 0.48
measured, 0.75 estimated): on the safe side, as it should be.
"""

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.diffusion.guidance import map_context
from ldm.pipelines.common import with_size_conditioning

GIB = 1024**3
HEADROOM = 0.9  # use at most this fraction of the free memory
UNET_K, VAE_K = 4, 6  # live copies of the largest activation (see the module docstring)


@dataclass
class Probe:
    """Bytes per image at the probed latent size `pixels` (h x w)."""

    pixels: int
    linear: float  # grows with the image area

    def bytes(self, batch: int, pixels: int) -> float:
        return batch * self.linear * pixels / self.pixels


@contextlib.contextmanager
def _largest_output():
    """Record the largest tensor any module returns while the block runs."""
    seen = {"largest": 0}

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor):
            seen["largest"] = max(seen["largest"], output.numel() * output.element_size())

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _skip_bytes(unet, run) -> int:
    blocks = getattr(unet, "input_blocks", None)
    if blocks is None:
        return 0
    sizes = []
    handles = [b.register_forward_hook(lambda m, i, o: sizes.append(o.numel() * o.element_size())) for b in blocks]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return sum(sizes)


@torch.no_grad()
def probe(bundle) -> tuple[Probe, Probe]:
    """(U-Net, VAE decode) per-image activation bytes at the smallest latent size the U-Net takes (x 2)."""
    param = next(bundle.unet.parameters())
    side = 2 * max(1, bundle.unet.downsample_factor)
    x = torch.zeros(1, bundle.latent_channels, side, side, device=param.device, dtype=param.dtype)
    t = torch.zeros(1, device=param.device, dtype=torch.long)
    context = map_context(lambda v: v.to(param.device, param.dtype), bundle.text_encoder([""]))
    context = with_size_conditioning(context, (side * bundle.downsample_factor,) * 2)  # SDXL: + the vector y

    def unet():
        bundle.unet(x, t, context)

    skips = _skip_bytes(bundle.unet, unet)
    with _largest_output() as seen:
        unet()
    u = Probe(side * side, skips + UNET_K * seen["largest"])
    vae_param = next(bundle.autoencoder.parameters())
    with _largest_output() as seen:
        bundle.autoencoder.decode_latents(x.to(vae_param.device, vae_param.dtype))
    v = Probe(side * side, VAE_K * seen["largest"])
    return u, v


def available_bytes(device: torch.device) -> tuple[float, str]:
    """Free memory for activations on `device`, and where the number comes from."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free), f"free on {device}"
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append((float(line.split()[1]) * 1024, "available RAM"))
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = float(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and float(limit) < 2**60:
            candidates.append((float(limit) - usage, "left under the container's memory limit"))
        break
    if not candidates:
        return float("inf"), "unknown"
    return min(candidates)


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def check_fits(bundle, batch: int, height: int, width: int, guidance: bool, trained_at: int | None = None,
               available: tuple[float, str] | None = None) -> dict:
    """Raise MemoryError (naming what to lower) when sampling `batch` images of height x width would not fit.

    Returns the estimate: {"unet", "vae", "needed", "available"} in bytes."""
    f = bundle.downsample_factor
    pixels = (height // f) * (width // f)
    unet, vae = probe(bundle)
    unet_batch = batch * (2 if guidance else 1)  # the conditional and unconditional halves run in one call
    need_unet, need_vae = unet.bytes(unet_batch, pixels), vae.bytes(batch, pixels)
    needed = max(need_unet, need_vae)
    device = next(bundle.unet.parameters()).device
    free, where = available or available_bytes(device)
    estimate = {"unet": need_unet, "vae": need_vae, "needed": needed, "available": free}
    if needed <= HEADROOM * free:
        return estimate
    budget = HEADROOM * free
    per_image = max(unet.bytes(unet_batch, pixels) / batch, vae.bytes(1, pixels))
    fixes = []
    max_batch = int(budget // per_image)
    if 1 <= max_batch < batch:
        fixes.append(f"batch_size={max_batch}")
    m = f * max(1, bundle.unet.downsample_factor)
    side = min(height, width) - m
    while side >= m and max(unet.bytes(2 if guidance else 1, (side // f) ** 2), vae.bytes(1, (side // f) ** 2)) > budget:
        side -= m
    if side >= m:
        fixes.append(f"batch_size=1 height={side} width={side}")
    trained = f" (the model was trained at {trained_at}x{trained_at})" if trained_at else ""
    raise MemoryError(
        f"sampling batch_size={batch} at {width}x{height}{trained} needs about {_size(needed)} of activation "
        f"memory (U-Net {_size(need_unet)}{' with guidance' if guidance else ''}, VAE decode "
        f"{_size(need_vae)}), but only {_size(free)} is {where}. "
        + (f"Lower it: {' or '.join(fixes)}." if fixes else "Even one image at the smallest size does not fit.")
        + " (check_memory=false skips this estimate.)")
