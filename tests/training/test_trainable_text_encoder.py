"""model.text_encoder.frozen=false (experiment=own_data's from-scratch tiny CLIP, with words=captions): the text
encoder trains in its own optimizer group, keeps an EMA copy, is saved in the checkpoint and read back from it
(EMA by default), and a stopped run resumes to exactly the weights of an uninterrupted one."""

from pathlib import Path

import pytest
import torch

from ldm.formats.training_checkpoint import load_training_checkpoint
from ldm.models.text_encoder import CLIPTextEncoder
from ldm.tasks.glyphs.dataset import write_glyph_folder
from ldm.training.run.train import train

CKPT = ["+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints", "+callbacks.checkpoint.save_last=true",
        "+callbacks.checkpoint.every_n_train_steps=1"]


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    return write_glyph_folder(tmp_path_factory.mktemp("glyphs"), n=24, resolution=16, seed=0)


def learning_encoder(glyphs, *extra):
    return ["data=folder", f"data.train.root={glyphs}", "data.num_workers=0", "data.val_fraction=0",
            "trainer.limit_val_batches=0", "trainer.val_check_interval=null", "++model.text_encoder.words=captions",
            "++model.text_encoder.frozen=false", "module.text_encoder_lr=3e-3", "module.ema_decay=0.9",
            "trainer.deterministic=true", *CKPT, *extra]


def test_trains_in_its_own_group_with_an_ema_and_is_read_back(tiny_cfg, glyphs):
    result = train(tiny_cfg(*learning_encoder(glyphs)))
    ckpt = torch.load(result["last_checkpoint"], weights_only=True)
    node = ckpt["ldm"]["model"]["model"]["text_encoder"]
    assert "letter" in " ".join(node["words"]).split() and not node["frozen"]
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["name"] for g in groups] == ["unet", "text_encoder"]
    assert groups[1]["initial_lr"] == pytest.approx(3e-3) and groups[0]["initial_lr"] == pytest.approx(1e-3)
    state = ckpt["state_dict"]
    fresh = CLIPTextEncoder.from_tiny(folder=node["folder"], words=node["words"]).state_dict()
    raw = {k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")}
    ema = {k[len("ema_text.model."):]: v for k, v in state.items() if k.startswith("ema_text.model.")}
    assert raw.keys() == ema.keys() == fresh.keys()
    emb = next(k for k in raw if k.endswith("token_embedding.weight"))
    assert not torch.equal(raw[emb], fresh[emb]) and not torch.equal(raw[emb], ema[emb])  # it trained; EMA lags
    for use_ema, expected in ((True, ema), (False, raw)):
        bundle = load_training_checkpoint(result["last_checkpoint"], use_ema=use_ema)
        te = bundle.text_encoder
        assert te.frozen and not any(p.requires_grad for p in te.parameters())  # loaded for use
        assert torch.equal(te.state_dict()[emb], expected[emb])
        assert len(te.tokenize(["the letter K"])[0].unique()) == 5  # BOS, the, letter, k, then EOS padding


@pytest.mark.slow  # three short trainings: ~4 min on the busy shared 2-core machine
def test_stopped_and_resumed_equals_uninterrupted(tiny_cfg, glyphs, tmp_path):
    straight = train(tiny_cfg(*learning_encoder(glyphs, "trainer.max_steps=6")))
    a = torch.load(straight["last_checkpoint"], weights_only=True)
    resumed_cfg = learning_encoder(glyphs, f"paths.run_dir={tmp_path / 'resumed'}")
    train(tiny_cfg(*resumed_cfg, "trainer.max_steps=3"))
    resumed = train(tiny_cfg(*resumed_cfg, "trainer.max_steps=6", "ckpt_path=last"))
    b = torch.load(resumed["last_checkpoint"], weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    keys = [k for k in a["state_dict"] if k.startswith(("unet.", "ema.", "text_encoder.", "ema_text."))]
    assert any(k.startswith("ema_text.") for k in keys) and a["state_dict"].keys() == b["state_dict"].keys()
    for k in keys:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], atol=1e-6, rtol=1e-6, msg=k)
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], atol=1e-6, rtol=1e-6)
