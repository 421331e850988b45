"""A file is bounded data (issue 25): every size a file states is checked against the bytes it holds before memory
is allocated, every walk of what it holds is bounded, every string that would become a pattern is matched
literally, every file name it holds stays inside its folder, and a token it names cannot take over a word.

Each test crafts a small file (< 50 KB) and asserts the clear error (type, file, key). Where the danger is an
allocation or a hang, the load runs in a fresh interpreter under ``RLIMIT_AS`` (MEMORY) and a timeout: before these
checks, each of these files made the load allocate 16-128 GB (MemoryError under the limit) or run for minutes.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.formats.safe_load import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
MEMORY = 4 << 30  # address space of a probe: importing torch + transformers and a tiny load take about 1.1 GB
TIMEOUT = 120  # seconds for a probe (its imports take ~10 s on a loaded machine; a hang runs for minutes)
SMALL = 50_000  # bytes: every crafted file is smaller

UNET = "ldm.models.unet.UNet"
SCHEDULE = {"_target_": "ldm.diffusion.schedules.NoiseSchedule.make"}
AUTOENCODER = {"_target_": "ldm.training.build.factories.autoencoder", "preset": "tiny"}
# 1.56e10 parameters (62 GB in float32): under safe_build.MAX_PARAMETERS, so only the file's tensors can refuse it
HUGE_UNET = {"model_channels": 1600, "channel_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attention_levels": [],
             "num_heads": 8, "context_dim": 32}

PRELUDE = '''
def attempt(load):
    try:
        load()
    except BaseException as err:  # what the load ended with, whatever it is
        print("RESULT", type(err).__name__, str(err).replace("\\n", " ")[:3000], flush=True)
    else:
        print("RESULT ok", flush=True)
'''


def probe(code: str, tmp_path: Path, timeout: int = TIMEOUT) -> str:
    """Run ``code`` (which calls ``attempt(fn)``) in a fresh interpreter with at most MEMORY of address space and
    ``timeout`` seconds; returns its RESULT lines (the exception type and message, or "RESULT ok"), one per
    attempt."""
    script = tmp_path / "probe.py"
    script.write_text(PRELUDE + textwrap.dedent(code), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TMPDIR": str(tmp_path)}

    def limit():  # runs in the child before python starts
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))

    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, preexec_fn=limit,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the load did not end within {timeout} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, f"the probe ended without a result (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return "\n".join(lines)


def small(path: Path) -> Path:
    assert path.stat().st_size < SMALL, f"{path.name} is {path.stat().st_size} bytes"
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A tiny CLIP (tokenizer/ + text_encoder/) that stored text-encoder nodes name, so no load writes one."""
    from ldm.models.tiny_clip import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def text_node(clip: Path) -> dict:
    return {"_target_": "ldm.models.text_encoder.CLIPTextEncoder.from_tiny", "preset": "tiny", "folder": str(clip)}


def training_checkpoint(path: Path, clip: Path, unet: dict, state: dict, pretrained=None, **ldm) -> Path:
    """An ldm training checkpoint: the run's stored model config + ``state``."""
    model = {"unet": unet, "autoencoder": AUTOENCODER, "text_encoder": text_node(clip), "pretrained": pretrained}
    torch.save({"state_dict": state, "global_step": 1, "ldm": {"model": {"model": model, "schedule": SCHEDULE},
                                                              **ldm}}, path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, clip) -> Path:
    """A real tiny training checkpoint: the base that LoRA / textual-inversion runs' checkpoints name."""
    from ldm.formats.safe_build import build_node

    unet_node = {"_target_": f"{UNET}.from_preset", "name": "tiny"}
    unet = build_node(unet_node, "unet", source="test", key="unet")
    ae = build_node(AUTOENCODER, "autoencoder", source="test", key="autoencoder")
    state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"autoencoder.{k}": v for k, v in ae.state_dict().items()})
    return training_checkpoint(tmp_path_factory.mktemp("base") / "base.ckpt", clip, unet_node, state)


# ---------------------------------------------------------------------------------------------------------------
# 1. allocation bombs: sizes a file states are checked against the tensors it holds, on the meta device


def test_training_checkpoint_describing_a_huge_unet(tmp_path, clip):
    path = small(training_checkpoint(tmp_path / "bomb.ckpt", clip, {"_target_": UNET, **HUGE_UNET},
                                     {"unet.input_blocks.0.0.weight": torch.zeros(1)}))
    out = probe(f"""
        from ldm.formats.load import load_bundle
        attempt(lambda: load_bundle({str(path)!r}))
    """, tmp_path)
    assert out.startswith("RESULT CheckpointError") and "bomb.ckpt" in out, out
    assert "U-Net" in out and "mis-shaped keys" in out and "input_blocks.0.0.weight" in out, out


def test_a_legitimate_checkpoint_still_loads_exactly(base):
    from ldm.formats.safe_load import load_state_dict
    from ldm.formats.training_checkpoint import load_training_checkpoint

    bundle = load_training_checkpoint(base)
    stored = load_state_dict(base)
    assert not any(p.is_meta for p in bundle.unet.parameters())
    assert all(torch.equal(v, stored[f"unet.{k}"]) for k, v in bundle.unet.state_dict().items())


def _sd_header_file(path: Path, unet_config: dict) -> Path:
    from ldm.models.autoencoder import AutoencoderKL

    vae = AutoencoderKL.from_preset("tiny").config
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, str(path),
              metadata={"ldm_unet_config": json.dumps(unet_config), "ldm_vae_config": json.dumps(vae)})
    return path


def test_sd_single_file_header_describing_a_huge_unet(tmp_path, clip):
    path = small(_sd_header_file(tmp_path / "bomb.safetensors", HUGE_UNET))
    out = probe(f"""
        from ldm.formats.single_file import load_sd_single_file
        from ldm.models.text_encoder import CLIPTextEncoder
        te = CLIPTextEncoder.from_tiny("tiny", folder={str(clip)!r})
        attempt(lambda: load_sd_single_file({str(path)!r}, text_encoder=te))
    """, tmp_path)
    assert out.startswith("RESULT CheckpointError") and "bomb.safetensors" in out, out
    assert "input_blocks.0.0.weight" in out and "missing keys" in out, out


def test_diffusers_config_describing_a_huge_unet(tmp_path):
    from ldm.formats.diffusers_keys import unet_diffusers_config
    from ldm.models.unet import UNet

    with torch.device("meta"):
        config = unet_diffusers_config(UNet(**HUGE_UNET).config, sample_size=8)
    (tmp_path / "model" / "unet").mkdir(parents=True)
    small(_write_json(tmp_path / "model" / "unet" / "config.json", config))
    save_file({"conv_in.weight": torch.zeros(1)}, str(tmp_path / "model" / "unet" /
                                                      "diffusion_pytorch_model.safetensors"))
    out = probe(f"""
        from ldm.formats.diffusers_folder import load_diffusers_folder
        attempt(lambda: load_diffusers_folder({str(tmp_path / "model")!r}, components=("unet",)))
    """, tmp_path)
    assert out.startswith("RESULT CheckpointError") and "unet" in out, out
    assert "conv_in" in out or "input_blocks.0.0.weight" in out, out


def test_lora_run_checkpoint_asking_rank_2_to_the_30(tmp_path, clip, base):
    lora = {"lora.loras.unet_x.down.weight": torch.zeros(1)}
    path = small(training_checkpoint(tmp_path / "lora.ckpt", clip, {"_target_": f"{UNET}.from_preset", "name": "tiny"},
                                     lora, pretrained=str(base), adapter={"preset": "attention", "rank": 2**30}))
    out = probe(f"""
        from ldm.formats.load import load_bundle
        attempt(lambda: load_bundle({str(path)!r}))
    """, tmp_path)
    assert out.startswith("RESULT CheckpointError") and "lora.ckpt" in out and "adapter.rank" in out, out
    # within the bound, the adapter is built on the meta device and checked against the file's tensors
    path = training_checkpoint(tmp_path / "lora4096.ckpt", clip, {"_target_": f"{UNET}.from_preset", "name": "tiny"},
                               lora, pretrained=str(base), adapter={"preset": "attention", "rank": 4096})
    from ldm.formats.load import load_bundle

    with pytest.raises(CheckpointError, match=r"(?s)lora4096\.ckpt.*adapter.*missing keys.*down\.weight"):
        load_bundle(path)


def test_diffusers_scheduler_with_2e9_timesteps(tmp_path):
    folder = tmp_path / "model"
    small(_write_json(folder / "scheduler" / "scheduler_config.json",
                      {"_class_name": "DDPMScheduler", "num_train_timesteps": 2_000_000_000}))
    out = probe(f"""
        from ldm.formats.diffusers_folder import read_scheduler_config, schedule_from_diffusers
        attempt(lambda: schedule_from_diffusers(read_scheduler_config({str(folder)!r})))  # what load_diffusers does
    """, tmp_path)
    assert out.startswith("RESULT CheckpointError") and "scheduler_config.json" in out, out
    assert "num_train_timesteps" in out and "100000" in out, out


def _clip_with_config(folder: Path, clip: Path, **fields) -> Path:
    """A copy of the tiny CLIP whose text_encoder/config.json states other sizes (its weights unchanged)."""
    import shutil

    shutil.copytree(clip, folder)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    _write_json(config_path, {**config, **fields})
    return folder


def test_clip_config_describing_a_huge_text_encoder(tmp_path, clip):
    # 1.4e9 parameters (5.4 GB): within every field's bound and within the parameter bound; the file holds none
    folder = _clip_with_config(tmp_path / "model", clip, vocab_size=100_000, hidden_size=8192)
    small(folder / "text_encoder" / "config.json")
    out = probe(f"""
        from ldm.formats.diffusers_folder import load_diffusers_folder
        attempt(lambda: load_diffusers_folder({str(folder)!r}, components=("text_encoder",)))
    """, tmp_path)
    assert out.startswith("RESULT CheckpointError") and "model.safetensors" in out, out
    assert "token_embedding.weight" in out and "config.json" in out, out
    # below the formats (a hub id, a config of one's own): the text encoders bound the parameter count
    folder = _clip_with_config(tmp_path / "wide", clip, vocab_size=400_000, hidden_size=16384)
    out = probe(f"""
        from ldm.models.text_encoder import CLIPTextEncoder
        attempt(lambda: CLIPTextEncoder.from_pretrained({str(folder)!r}))
    """, tmp_path)
    assert out.startswith("RESULT ValueError") and "config.json" in out and "parameters" in out, out
    folder = _clip_with_config(tmp_path / "vocab", clip, vocab_size=10**9)
    with pytest.raises(CheckpointError, match=r"config\.json.*vocab_size"):
        from ldm.formats.weight_folder import check_text_encoder_folder

        check_text_encoder_folder(folder / "text_encoder")


# ---------------------------------------------------------------------------------------------------------------
# 2. hangs: walks of what a file holds are bounded; patterns are literal; chains of bases end


def _shared_lists(width: int = 64, depth: int = 7):
    """width^depth leaves (4e12) from a few hundred bytes of pickle: every level references the one below
    ``width`` times (a "billion laughs"), each list within MAX_LIST and the whole within MAX_DEPTH."""
    node = [1] * width
    for _ in range(depth - 1):
        node = [node] * width
    return node


def test_stored_config_with_shared_references(tmp_path, clip):
    unet = {"_target_": UNET, **HUGE_UNET, "channel_mult": _shared_lists()}
    path = small(training_checkpoint(tmp_path / "laughs.ckpt", clip, unet, {"unet.x": torch.zeros(1)}))
    out = probe(f"""
        from ldm.formats.load import load_bundle
        attempt(lambda: load_bundle({str(path)!r}))
    """, tmp_path, timeout=90)
    assert out.startswith("RESULT CheckpointError") and "laughs.ckpt" in out, out
    assert "more than 100000 values" in out and "ldm.model.model.unet.channel_mult" in out, out


def test_check_plain_bounds_wide_dicts():
    from ldm.formats.safe_build import check_plain

    level = {f"k{i}": 1 for i in range(100)}
    for _ in range(3):  # dict width is not bounded by MAX_LIST: 10^8 values from 400 entries
        level = {f"k{i}": level for i in range(100)}
    with pytest.raises(CheckpointError, match=r"node\.json: config holds more than 100000 values"):
        check_plain(level, source="node.json", key="config")


def test_pt_embedding_with_shared_references(tmp_path):
    node = {"v": torch.zeros(1, 4)}
    for _ in range(5):  # 64^5 = 10^9 tensors to flatten
        node = {f"k{i}": node for i in range(64)}
    torch.save({"string_to_param": node}, tmp_path / "laughs.pt")
    path = small(tmp_path / "laughs.pt")
    out = probe(f"""
        from ldm.formats.embeddings import read_embedding
        attempt(lambda: read_embedding({str(path)!r}))
    """, tmp_path, timeout=90)
    assert out.startswith("RESULT CheckpointError") and "laughs.pt" in out, out
    assert "more than 100000 values" in out and "string_to_param.k" in out, out


def _peft_file(path: Path, patterns: dict) -> tuple[Path, dict]:
    """A diffusers/PEFT LoRA file for the tiny U-Net whose alpha_pattern is ``patterns``."""
    from ldm.formats.lora_peft import METADATA_KEY, to_peft
    from ldm.models.lora import LoRAConfig, LoRANetwork
    from ldm.models.unet import UNet

    roots = {"unet": UNet.from_preset("tiny"), "text_encoder": None}
    network = LoRANetwork.build(roots, LoRAConfig(rank=1))
    state, meta = to_peft(network, roots)
    config = json.loads(meta[METADATA_KEY])
    config.update({"unet.lora_alpha": 1.0, "unet.alpha_pattern": patterns})
    save_file(state, str(path), metadata={**meta, METADATA_KEY: json.dumps(config)})
    return path, roots


def test_peft_alpha_pattern_is_matched_literally(tmp_path):
    backtracking = "(([a-z_0-9.])+)+X"  # as a regex: 2^50 steps against a module path of 50 characters
    path, _ = _peft_file(tmp_path / "pytorch_lora_weights.safetensors", {backtracking: 7.0})
    small(path)
    out = probe(f"""
        from ldm.formats.lora_files import read_lora_file
        from ldm.models.unet import UNet
        lora = read_lora_file({str(path)!r}, {{"unet": UNet.from_preset("tiny"), "text_encoder": None}})
        alphas = {{float(w["alpha"]) for w in lora.weights.values()}}
        attempt(lambda: print("ALPHAS", sorted(alphas)))
    """, tmp_path, timeout=90)
    assert out == "RESULT ok", out
    # an exact key (what PEFT and we write) or a dotted suffix of the module path still names its layers
    from ldm.formats.lora_files import read_lora_file

    path, roots = _peft_file(tmp_path / "suffix.safetensors", {"attn1.to_q": 3.0})
    alphas = {path_: float(w["alpha"]) for (_, path_), w in read_lora_file(path, roots).weights.items()}
    assert {a for p, a in alphas.items() if p.endswith("attn1.to_q")} == {3.0}
    assert {a for p, a in alphas.items() if not p.endswith("attn1.to_q")} == {1.0}


def test_checkpoint_whose_base_is_itself_or_a_cycle(tmp_path, clip):
    unet = {"_target_": f"{UNET}.from_preset", "name": "tiny"}
    lora = {"lora.loras.unet_x.down.weight": torch.zeros(1)}
    me = tmp_path / "me.ckpt"
    small(training_checkpoint(me, clip, unet, lora, pretrained=str(me), adapter={"rank": 4}))
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    training_checkpoint(a, clip, unet, lora, pretrained=str(b), adapter={"rank": 4})
    training_checkpoint(b, clip, unet, {"textual_inversion.vectors": torch.zeros(1, 32)}, pretrained=str(a),
                        textual_inversion={"placeholder_token": "<b>"})
    itself, cycle = probe(f"""
        from ldm.formats.load import load_bundle
        attempt(lambda: load_bundle({str(me)!r}))
        attempt(lambda: load_bundle({str(a)!r}))
    """, tmp_path, timeout=90).splitlines()
    assert itself.startswith("RESULT CheckpointError") and "me.ckpt: ldm.model.model.pretrained leads back" in itself
    assert cycle.startswith("RESULT CheckpointError"), cycle
    assert f"{a.resolve()} -> {b.resolve()} -> {a.resolve()}" in cycle, cycle


DEEP = '{"a": ' + "[" * 20_000 + "]" * 20_000 + "}"  # 40 KB; json.loads raises RecursionError at ~1000 levels


@pytest.mark.parametrize("name", ["unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.json",
                                  "scheduler/scheduler_config.json"])
def test_deep_json_is_a_clear_error(tmp_path, name):
    from ldm.formats.diffusers_folder import load_diffusers_folder

    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    if name != "unet/config.json":
        from ldm.formats.diffusers_keys import unet_diffusers_config
        from ldm.models.unet import UNet

        _write_json(folder / "unet" / "config.json", unet_diffusers_config(UNet.from_preset("tiny").config, 8))
    small(_write_text(folder / name, DEEP))
    with pytest.raises(CheckpointError, match=rf"{Path(name).name}.*nested (too deeply|more than)"):
        load_diffusers_folder(folder, components=("unet",))


def test_json_numbers_python_refuses_are_a_clear_error(tmp_path):
    from ldm.formats.safe_load import read_json_file

    path = small(_write_text(tmp_path / "config.json", '{"sample_size": ' + "9" * 5000 + "}"))
    with pytest.raises(CheckpointError, match=r"config\.json.*not valid JSON"):
        read_json_file(path)


# ---------------------------------------------------------------------------------------------------------------
# 3. reads outside the folder: file names a folder's JSON holds stay inside it


@pytest.fixture
def other_weights(tmp_path) -> Path:
    """Another folder's tensors, beside the model folder."""
    (tmp_path / "other").mkdir()
    save_file({"secret": torch.ones(2)}, str(tmp_path / "other" / "x.safetensors"))
    return tmp_path / "other" / "x.safetensors"


@pytest.mark.parametrize("shard", ["../other/x.safetensors", "ABSOLUTE", "link.safetensors"])
def test_weight_index_naming_a_file_outside(tmp_path, other_weights, shard):
    from ldm.formats.weight_folder import read_weights

    unet = tmp_path / "model" / "unet"
    unet.mkdir(parents=True)
    (unet / "link.safetensors").symlink_to(other_weights)
    shard = str(other_weights) if shard == "ABSOLUTE" else shard
    small(_write_json(unet / "diffusion_pytorch_model.safetensors.index.json", {"weight_map": {"secret": shard}}))
    with pytest.raises(CheckpointError, match=r"index\.json.*weight_map.*(\.\.|absolute|outside)"):
        read_weights(unet, "diffusion_pytorch_model")


def test_hub_snapshot_links_into_its_blobs_are_kept(tmp_path):
    """huggingface_hub's cache links every file of a snapshot to the repo's blobs/: that is not outside."""
    from ldm.formats.weight_folder import read_weights

    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(repo / "blobs" / "0123abcd"))
    unet = repo / "snapshots" / "rev" / "unet"
    unet.mkdir(parents=True)
    (unet / "shard-1.safetensors").symlink_to(repo / "blobs" / "0123abcd")
    _write_json(unet / "diffusion_pytorch_model.safetensors.index.json", {"weight_map": {"w": "shard-1.safetensors"}})
    assert torch.equal(read_weights(unet, "diffusion_pytorch_model")["w"], torch.ones(2))


def test_ldm_bundle_weights_linked_outside(tmp_path, other_weights):
    from ldm.formats.ldm_bundle import _read_weights

    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(other_weights)
    with pytest.raises(CheckpointError, match=r"ldm_bundle\.json.*weights.*outside"):
        _read_weights(folder, {"weights": "model.safetensors"})


# ---------------------------------------------------------------------------------------------------------------
# 4. meaning hijack: an embedding's token cannot be a word of the vocabulary


@pytest.fixture
def encoder(clip):
    from ldm.models.text_encoder import CLIPTextEncoder

    return CLIPTextEncoder.from_tiny("tiny", folder=clip)


@pytest.mark.parametrize("stem", ["red", "Red"])
def test_embedding_named_like_a_word_is_refused(tmp_path, encoder, stem):
    from ldm.formats.embeddings import load_embedding_files, save_embedding

    before = encoder(["a red circle"]).clone()
    path = small(save_embedding(tmp_path / f"{stem}.safetensors", stem, torch.randn(1, 32), layout="a1111"))
    with pytest.raises(CheckpointError) as err:
        load_embedding_files(encoder, [str(path)], report=lambda _m: None)
    message = str(err.value)
    assert f"{stem}.safetensors" in message and f"token {stem!r}" in message and "'red</w>'" in message
    assert f"embeddings=['{path}:<{stem}>']" in message  # how to load it anyway
    load_embedding_files(encoder, [f"{path}:<{stem}>"], report=lambda _m: None)  # under a token of one's own
    assert torch.equal(encoder(["a red circle"]), before)  # the word still means what it meant


def test_textual_inversion_checkpoint_with_a_word_as_token(tmp_path, clip, base):
    path = small(training_checkpoint(tmp_path / "ti.ckpt", clip, {"_target_": f"{UNET}.from_preset", "name": "tiny"},
                                     {"textual_inversion.vectors": torch.zeros(1, 32)}, pretrained=str(base),
                                     textual_inversion={"placeholder_token": "blue"}))
    from ldm.formats.load import load_bundle

    with pytest.raises(CheckpointError, match=r"ti\.ckpt.*placeholder_token.*'blue</w>'"):
        load_bundle(path)


def test_new_placeholder_names_are_still_accepted(encoder):
    from ldm.models.textual_inversion import TextualInversionConfig, check_new_tokens, placeholder_tokens

    default = TextualInversionConfig().placeholder_token
    check_new_tokens(encoder.tokenizer, placeholder_tokens(default, 3))
    check_new_tokens(encoder.tokenizer, ["<new-colour>"])
    with pytest.raises(ValueError, match="spaces"):
        check_new_tokens(encoder.tokenizer, ["red circle"])


# ---------------------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj) -> Path:
    return _write_text(path, json.dumps(obj))


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# SD3 / SD3.5 weights (ldm/formats/sd3_folder.py, sd3_single_file.py)

# SD3.5-large's MMDiT (8.06e9 parameters, 32 GB in float32): under MAX_PARAMETERS, so only the tensors can refuse it
HUGE_MMDIT = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38, "attention_head_dim": 64,
              "num_attention_heads": 38, "joint_attention_dim": 4096, "pooled_projection_dim": 2048,
              "out_channels": 16, "pos_embed_max_size": 192, "dual_attention_layers": [], "qk_norm": "rms_norm"}
SD3_QKV = "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"


def test_sd3_single_file_header_describing_a_huge_mmdit(tmp_path):
    from ldm.models.autoencoder import AutoencoderKL

    path = tmp_path / "sd3_bomb.safetensors"
    save_file({"model.diffusion_model.x_embedder.proj.weight": torch.zeros(1), SD3_QKV: torch.zeros(1),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, str(path),
              metadata={"ldm_mmdit_config": json.dumps(HUGE_MMDIT),
                        "ldm_vae_config": json.dumps(AutoencoderKL.from_preset("tiny").config)})
    small(path)
    out = probe(f"""
        from ldm.formats.load import load_bundle
        attempt(lambda: load_bundle({str(path)!r}))
    """, tmp_path)
    assert out.startswith("RESULT CheckpointError") and "sd3_bomb.safetensors" in out, out
    assert "transformer" in out and "mis-shaped keys" in out and "x_embedder.proj.weight" in out, out


def test_sd3_file_stating_a_shape_larger_than_its_bytes(tmp_path):
    """A safetensors header stating a 10^10-element tensor over 16 bytes: refused by the reader, nothing allocated."""
    header = json.dumps({SD3_QKV: {"dtype": "F32", "shape": [100_000, 100_000], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "sd3_lying.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    out = probe(f"""
        from ldm.formats.load import load_bundle
        attempt(lambda: load_bundle({str(path)!r}))
    """, tmp_path)
    assert out.startswith("RESULT CheckpointError") and "sd3_lying.safetensors" in out and "corrupt" in out, out


def test_sd3_folder_transformer_config_describing_a_huge_mmdit(tmp_path):
    from ldm.formats.sd3_diffusers_keys import mmdit_diffusers_config

    sub = tmp_path / "sd3" / "transformer"
    sub.mkdir(parents=True)
    (tmp_path / "sd3" / "vae").mkdir()
    small(_write_json(sub / "config.json", {"_class_name": "SD3Transformer2DModel",
                                            **mmdit_diffusers_config(HUGE_MMDIT)}))
    save_file({"pos_embed.pos_embed": torch.zeros(1)}, str(sub / "diffusion_pytorch_model.safetensors"))
    out = probe(f"""
        from ldm.formats.load import load_bundle
        attempt(lambda: load_bundle({str(tmp_path / "sd3")!r}))
    """, tmp_path)
    assert out.startswith("RESULT CheckpointError") and "transformer" in out, out
    assert "missing" in out or "mis-shaped" in out, out
