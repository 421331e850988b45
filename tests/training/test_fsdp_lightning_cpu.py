"""Lightning's own FSDP2 strategy, `ModelParallelStrategy`, runs on 2 CPU ranks with gloo (Lightning 2.6: unlike
`FSDPStrategy`, which its accelerator connector refuses without a GPU, it has no accelerator check): a LoRA on the
frozen, sharded tiny U-Net (tests/helpers/fsdp_lightning.py) trains like one process on the whole batch (1e-5, the
order of the gradient sums), its sharded checkpoint (a folder of per-rank files) resumes exactly, and its full
checkpoint (one file gathered on rank 0) holds the plain module's state dict."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.fsdp import adapter_only, adapter_optimizer, make_lora_model, train_steps

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # 2 Lightning launches of 2 processes, ~1-2 min on the shared CPUs


def lightning_run(out: Path, *args: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.fsdp_lightning", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / "adapter.pt", weights_only=True)


def test_model_parallel_strategy_shards_a_lora_run_on_two_cpu_ranks(tmp_path):
    uninterrupted = lightning_run(tmp_path / "uninterrupted", "--steps", "4")
    step_2 = tmp_path / "uninterrupted" / "checkpoints" / "step-2.ckpt"
    assert sorted(p.name for p in step_2.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], "a file per rank"
    resumed = lightning_run(tmp_path / "resumed", "--steps", "4", "--resume", str(step_2))
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), f"resume from the sharded checkpoint differs at {key}"

    torch.set_num_threads(1)
    model = make_lora_model()
    train_steps(model, adapter_optimizer(model), [0, 1, 0, 1])  # 2 epochs of the 2 steps
    reference = adapter_only(model.state_dict())
    assert uninterrupted.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(uninterrupted[key], value, atol=1e-5, rtol=1e-5, msg=key)

    full = torch.load(tmp_path / "uninterrupted" / "full.ckpt", weights_only=False)["state_dict"]
    plain = make_lora_model()
    plain.load_state_dict({k[len("model."):]: v for k, v in full.items()})  # the plain module's keys, unsharded
    for key, value in uninterrupted.items():
        assert torch.equal(plain.state_dict()[key], value), key
