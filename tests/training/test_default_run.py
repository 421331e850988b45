"""The embedded default end to end (slow: ~10 min on 2 cores): `python train.py` learns the shapes (>= 80% colour
and >= 60% shape accuracy with CFG, far above unconditional samples), and `sample.py` on its checkpoint draws
"a green square" as green squares, by the shapes checker. (The checker reads a square tilted by a few degrees as a
triangle, since the corners of its bounding box empty out, so not every visible square counts.)"""

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
    assert acc["cfg"]["color_acc"] >= 0.8 and acc["cfg"]["shape_acc"] >= 0.6, acc
    assert acc["cfg"]["color_acc"] > acc["uncond"]["color_acc"] + 0.3
    assert acc["cfg"]["shape_acc"] > acc["uncond"]["shape_acc"] + 0.2
    out = tmp_path / "samples"
    subprocess.run([sys.executable, "sample.py", f"ckpt={run}/checkpoints/last.ckpt",
                    "prompt=a green square on a white background", "n_images=8", "batch_size=8",
                    "guidance_scale=3", f"out_dir={out}"], cwd=ROOT, check=True)
    from PIL import Image

    from ldm.tasks.shapes.checker import classify_shapes_image

    labels = [classify_shapes_image(Image.open(p).convert("RGB")) for p in sorted(out.glob("0*.png"))]
    assert len(labels) == 8
    assert sum(c == "green" for c, _ in labels) >= 6, labels
    assert sum(s == "square" for _, s in labels) >= 3, labels
    assert sum(c == "green" and s == "square" for c, s in labels) >= 3, labels
