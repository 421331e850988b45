"""A model file is data: configs stored in any file we read (training checkpoint, ldm bundle, SD single-file header,
diffusers config.json, latent-cache manifest) can only build our own classes from plain, bounded values. Each
malicious variant is refused with a CheckpointError naming the file and the key, and nothing it names runs."""

import json
import pickle
import sys

import pytest
import torch
from safetensors.torch import save_file

from ldm.formats.safe_load import CheckpointError
from ldm.formats.safe_build import build_network, build_node, check_plain

PAYLOAD = "ldm_evil_payload"  # a module that writes the marker file when imported


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """The marker path, an importable payload module writing it, and a pickle writing it when unpickled."""
    marker = tmp_path / "PWNED"
    (tmp_path / f"{PAYLOAD}.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef run(*a, **k):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pkl = tmp_path / "payload.pkl"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    pkl.write_bytes(pickle.dumps(Payload()))
    before = set(sys.modules)
    yield {"marker": marker, "pickle": str(pkl)}
    assert not marker.exists(), "a file made us run code"
    assert PAYLOAD not in sys.modules
    assert not {"pandas", "os.system"} & (set(sys.modules) - before)


def bad_unet_nodes(pickle_path: str) -> dict[str, tuple[dict, str]]:
    """name -> (a stored U-Net node, the key the error must name)."""
    ok = {"_target_": "ldm.models.unet.UNet", "model_channels": 32, "channel_mult": [1], "attention_levels": [],
          "num_heads": 1, "context_dim": 8}
    return {
        "payload module": ({"_target_": f"{PAYLOAD}.run"}, "_target_"),
        "torch.load of a pickle": ({"_target_": "torch.load", "f": pickle_path, "weights_only": False}, "_target_"),
        "os.system": ({"_target_": "os.system", "_args_": ["touch PWNED"]}, "_target_"),
        "_args_": ({**ok, "_args_": ["x"]}, "_args_"),
        "_partial_": ({**ok, "_partial_": True}, "_partial_"),
        "nested _target_": ({**ok, "context_dim": {"_target_": f"{PAYLOAD}.run"}}, "context_dim._target_"),
        "unknown key": ({**ok, "eval_me": "__import__('os')"}, "eval_me"),
        "absurd size": ({**ok, "model_channels": 4096, "channel_mult": [32, 32, 32, 32]}, "parameters"),
        "absurd count": ({**ok, "num_res_blocks": 10**9}, "num_res_blocks"),
        "not a number": ({**ok, "model_channels": "32"}, "model_channels"),
    }


CASES = list(bad_unet_nodes("x"))


@pytest.mark.parametrize("case", CASES)
def test_stored_unet_node_refused(case, evil):
    node, key = bad_unet_nodes(evil["pickle"])[case]
    with pytest.raises(CheckpointError, match=key) as err:
        build_node(node, "unet", source="model.ckpt", key="ldm.model.model.unet")
    assert "model.ckpt" in str(err.value)


def test_a_target_of_another_role_is_refused():
    with pytest.raises(CheckpointError, match="_target_"):
        build_node({"_target_": "ldm.diffusion.schedules.NoiseSchedule.make"}, "unet", source="f", key="unet")


def test_well_formed_nodes_build():
    unet = build_node({"_target_": "ldm.models.unet.UNet", "model_channels": 32, "channel_mult": [1],
                       "attention_levels": [], "num_heads": 1, "context_dim": 8}, "unet", source="f", key="unet")
    assert unet.config["model_channels"] == 32
    ae = build_node({"_target_": "ldm.training.build.factories.autoencoder", "preset": "tiny", "weights": None},
                    "autoencoder", source="f", key="ae")
    assert type(ae).__name__ == "AutoencoderKL"
    sched = build_node({"_target_": "ldm.diffusion.schedules.NoiseSchedule.make", "kind": "linear"}, "schedule",
                       source="f", key="schedule")
    assert sched.kind == "linear"


def test_plain_values_only():
    check_plain({"a": [1, 2.0, "x", None, True]}, source="f", key="k")
    for bad, key in [({"a": {"_recursive_": False}}, "a._recursive_"), ({"a": float("nan")}, "a"),
                     ({"a": "x" * 10_000}, "a"), ({"a": list(range(1000))}, "a")]:
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
            check_plain(bad, source="f", key="k")


# ---- each kind of file, end to end through load_bundle (what sample.py / export call)


def _training_checkpoint(path, unet_node):
    model = {"unet": unet_node,
             "autoencoder": {"_target_": "ldm.training.build.factories.autoencoder", "preset": "tiny"},
             "text_encoder": {"_target_": "ldm.models.text_encoder.CLIPTextEncoder.from_tiny"}}
    torch.save({"state_dict": {"unet.x": torch.zeros(1)}, "global_step": 1,
                "ldm": {"model": {"model": model, "schedule": {"_target_": "ldm.diffusion.schedules.NoiseSchedule.make"}}}},
               path)
    return path


@pytest.mark.parametrize("case", ["torch.load of a pickle", "os.system", "nested _target_", "absurd size"])
def test_training_checkpoint_refused(case, evil, tmp_path):
    from ldm.formats.load import load_bundle

    node, key = bad_unet_nodes(evil["pickle"])[case]
    path = _training_checkpoint(tmp_path / "downloaded.ckpt", node)
    with pytest.raises(CheckpointError, match=key) as err:
        load_bundle(path)
    assert "downloaded.ckpt" in str(err.value) and "ldm.model.model.unet" in str(err.value)


def test_training_checkpoint_schedule_refused(evil, tmp_path):
    from ldm.formats.training_checkpoint import load_training_checkpoint

    path = _training_checkpoint(tmp_path / "m.ckpt", bad_unet_nodes("x")["unknown key"][0])
    ckpt = torch.load(path, weights_only=True)
    ckpt["ldm"]["model"]["schedule"] = {"_target_": f"{PAYLOAD}.run"}
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"ldm\.model\.schedule\._target_"):
        load_training_checkpoint(path)


def test_ldm_bundle_refused(evil, tmp_path):
    from ldm.formats.ldm_bundle import load_ldm_bundle

    folder = tmp_path / "bundle"
    folder.mkdir()
    save_file({"unet.x": torch.zeros(1), "autoencoder.y": torch.zeros(1)}, str(folder / "model.safetensors"))
    base = {"format": "ldm_bundle", "version": 1, "components": ["unet", "autoencoder"], "dtype": "float32",
            "schedule": {"_target_": "ldm.diffusion.schedules.NoiseSchedule.make"},
            "model": {"unet": {"_target_": "ldm.models.unet.UNet"},
                      "autoencoder": {"_target_": "ldm.models.autoencoder.AutoencoderKL"}, "text_encoder": None}}
    variants = [
        ({"model": {**base["model"], "unet": {"_target_": "torch.load", "f": evil["pickle"]}}}, "model.unet"),
        ({"model": {**base["model"], "unet": {"_target_": "ldm.models.unet.UNet", "_partial_": True}}}, "_partial_"),
        ({"model": {**base["model"], "autoencoder": {"_target_": "ldm.models.autoencoder.AutoencoderKL",
                                                     "base_channels": 10**7}}}, "base_channels"),
        ({"schedule": {"_target_": f"{PAYLOAD}.run"}}, "schedule._target_"),
        ({"schedule": {"_target_": "ldm.diffusion.schedules.NoiseSchedule.make", "_args_": [1]}}, "_args_"),
        ({"weights": "../../elsewhere.safetensors"}, "weights"),
        ({"model": {**base["model"], "text_encoder": {
            "_target_": "ldm.models.text_encoder.CLIPTextEncoder.from_pretrained", "path_or_hub_id": ".",
            "trust_remote_code": True}}, "components": ["unet", "autoencoder", "text_encoder"]},
         "text_encoder.trust_remote_code"),
    ]
    for change, key in variants:
        (folder / "ldm_bundle.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(CheckpointError, match=key) as err:
            load_ldm_bundle(folder)
        assert "ldm_bundle.json" in str(err.value)


def _sd_file(path, header):
    from ldm.models.autoencoder import AutoencoderKL

    vae = AutoencoderKL.from_preset("tiny")
    state = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}
    state.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    save_file(state, str(path), metadata={k: json.dumps(v) for k, v in header.items()})
    return path


@pytest.mark.parametrize("header,key", [
    ({"ldm_unet_config": {"_target_": f"{PAYLOAD}.run"}}, "ldm_unet_config"),
    ({"ldm_unet_config": {"model_channels": 4096, "channel_mult": [32, 32, 32]}}, "parameters"),
    ({"ldm_unet_config": {"model_channels": 32, "channel_mult": [1], "attention_levels": [], "num_heads": 1},
      "ldm_vae_config": {"base_channels": 32, "_args_": ["x"]}}, "ldm_vae_config._args_"),
    ({"ldm_unet_config": {"model_channels": 32, "channel_mult": [1], "attention_levels": [], "num_heads": 1},
      "ldm_vae_config": {"base_channels": 32, "norm_groups": 8},
      "ldm_schedule": {"kind": "linear", "_target_": "torch.load"}}, "ldm_schedule"),
])
def test_sd_single_file_header_refused(header, key, evil, tmp_path):
    from ldm.formats.load import load_bundle

    path = _sd_file(tmp_path / "sd.safetensors", header)
    with pytest.raises(CheckpointError, match=key) as err:
        load_bundle(path)
    assert "sd.safetensors" in str(err.value)


@pytest.mark.parametrize("component,config,key", [
    ("unet", {"_target_": f"{PAYLOAD}.run", "block_out_channels": [32]}, "config._target_"),
    ("unet", {"block_out_channels": [2**20, 2**21], "down_block_types": ["DownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "UpBlock2D"], "attention_head_dim": 8,
              "cross_attention_dim": 8}, "model_channels"),
    ("vae", {"block_out_channels": [32], "latent_channels": 4, "_partial_": True}, "config._partial_"),
    ("text_encoder", {"hidden_size": 2**40, "num_hidden_layers": 2}, "hidden_size"),
    ("text_encoder", {"hidden_size": 32, "auto_map": {"AutoModel": f"{PAYLOAD}.run"}}, "auto_map"),
])
def test_diffusers_config_refused(component, config, key, evil, tmp_path):
    from ldm.formats.diffusers_folder import load_diffusers_folder

    folder = tmp_path / "pipe"
    (folder / component).mkdir(parents=True)
    (folder / component / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=key) as err:
        load_diffusers_folder(folder, components=(component,))
    assert "config.json" in str(err.value)


def test_latent_cache_manifest_refused(evil, tmp_path):
    from ldm.data.latent_cache import read_manifest

    good = {"format": "ldm-latent-cache", "version": 1, "store": "mode", "text": "caption", "shard_size": 4,
            "dtype": "float32", "latent_shape": [4, 8, 8], "scaling_factor": 1.0, "shift_factor": 0.0, "shards": []}
    for change, key in [({"vae": {"_target_": f"{PAYLOAD}.run"}}, r"manifest\.vae\._target_"),
                        ({"latent_shape": [4, 2**40, 2**40]}, "latent_shape"),
                        ({"description": {"_args_": ["touch PWNED"]}}, "_args_")]:
        (tmp_path / "manifest.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(CheckpointError, match=key) as err:
            read_manifest(tmp_path)
        assert "manifest.json" in str(err.value)
    (tmp_path / "manifest.json").write_text(json.dumps(good))
    assert read_manifest(tmp_path)["latent_shape"] == [4, 8, 8]


def test_build_network_refuses_unknown_and_huge():
    with pytest.raises(CheckpointError, match="unknown key unet.bogus"):
        build_network("unet", {"bogus": 1}, source="f", key="unet")
    with pytest.raises(CheckpointError, match="norm_groups"):
        build_network("autoencoder", {"norm_groups": 10**6}, source="f", key="vae")
