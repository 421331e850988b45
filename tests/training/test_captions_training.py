"""train(cfg) with caption options and long prompts: an image folder of tag captions (.caption sidecars), shuffled
with tag dropout per (seed, epoch, index), some longer than 75 tokens, encoded in chunks (max_chunks=2) and padded
per batch; the automatic latent cache then holds latents and captions, never per-image text contexts."""

import json

import pytest
from PIL import Image

from ldm.data.captions import CaptionProcessor
from ldm.formats.exporter import export
from ldm.formats.ldm_bundle import load_ldm_bundle
from ldm.formats.training_checkpoint import load_training_checkpoint
from ldm.training.module.diffusion_module import LatentDiffusion
from ldm.training.run.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "red green blue yellow circle square triangle star".split()


def test_shuffled_long_captions_train_from_a_latent_cache_without_cached_contexts(tiny_cfg, tmp_path, monkeypatch):
    root = tmp_path / "tags"
    root.mkdir()
    raw = {}
    for i in range(8):
        Image.new("RGB", (20, 20), (30 * i, 100, 200)).save(root / f"img{i}.png")
        n = 90 if i % 2 else 4  # odd images: 90 tags (90 tokens + separators: 3 chunks, cut to 2 with a warning)
        raw[i] = ", ".join([f"sks{i}"] + [WORDS[(i + k) % len(WORDS)] for k in range(n)])
        (root / f"img{i}.caption").write_text(raw[i])
    seen = []
    encode_text = LatentDiffusion.encode_text

    def recording(self, captions):
        context = encode_text(self, captions)
        seen.append((list(captions), tuple(context.shape)))
        return context

    monkeypatch.setattr(LatentDiffusion, "encode_text", recording)
    options = {"shuffle": True, "tag_dropout": 0.1, "keep_tokens": 1, "extension": ".caption"}
    result = train(tiny_cfg("data=folder", f"data.train.root={root}", "data.train.resolution=16",
                            "data.num_workers=0", "data.val_fraction=0", "module.p_uncond=0",
                            f"++data.latent_cache={tmp_path / 'latents'}", "model.text_encoder.max_chunks=2",
                            *[f"data.train.captions.{k}={v}" for k, v in options.items()],
                            "+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                            "+callbacks.checkpoint.save_last=true",
                            "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints"))
    assert result["global_step"] == 3
    bundle = load_training_checkpoint(result["last_checkpoint"])  # sampling from it encodes long prompts alike
    assert bundle.text_encoder.max_chunks == 2
    export(bundle, "ldm", tmp_path / "exported")
    assert load_ldm_bundle(tmp_path / "exported").text_encoder.max_chunks == 2
    manifests = list((tmp_path / "latents").glob("*/part-*/manifest.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["text"] == "caption"
    train_batches = [s for s in seen if len(s[0]) == 4][:3]
    assert len(train_batches) == 3
    processor = CaptionProcessor.of({**options, "seed": 0})  # train.yaml's seed
    for step, (captions, shape) in enumerate(train_batches):
        epoch = step // 2  # 8 images, batches of 4
        assert shape[0] == 4 and shape[1] in (77, 154) and shape[2] == 32
        assert shape[1] == (154 if any(len(c) > 200 for c in captions) else 77)  # padded to the batch's longest
        for caption in captions:
            i = int(caption.split(",")[0].removeprefix("sks"))
            assert caption == processor(raw[i], i, epoch)  # that epoch's draw for image i, as any run sees it
