"""The embedded default end to end (slow: ~12 min on 2 cores): `python train.py` learns the shapes, and
`sample.py` on its checkpoint draws "a green square" in green, by the shapes checker."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_default_run_and_sample_green_square(tmp_path):
    run = tmp_path / "run"
    subprocess.run([sys.executable, "train.py", f"paths.run_dir={run}", f"hydra.run.dir={run}/hydra",
                    "trainer.enable_progress_bar=false"], cwd=ROOT, check=True)
    acc = json.loads((run / "prompt_accuracy.json").read_text())
    assert acc["cfg"]["color_acc"] > acc["uncond"]["color_acc"] + 0.3
    assert acc["cfg"]["shape_acc"] > acc["uncond"]["shape_acc"]
    out = tmp_path / "samples"
    subprocess.run([sys.executable, "sample.py", f"ckpt={run}/checkpoints/last.ckpt",
                    "prompt=a green square on a white background", "n_images=8", "batch_size=8",
                    "guidance_scale=4", f"out_dir={out}"], cwd=ROOT, check=True)
    from PIL import Image

    from ldm.data.shapes_checker import classify_shapes_image

    labels = [classify_shapes_image(Image.open(p).convert("RGB")) for p in sorted(out.glob("0*.png"))]
    assert len(labels) == 8
    assert sum(c == "green" for c, _ in labels) >= 6, labels
    assert any(s == "square" for _, s in labels), labels
