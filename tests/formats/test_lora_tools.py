"""python -m ldm.lora merge / resize / extract (ldm/cli/lora_tools.py) on a tiny model: a merged adapter equals
applying its inputs (1e-5), a resize to the full rank reproduces the deltas and lower ranks lose what the printed
energy says, an extract from a fine-tune reproduces it at full rank (1e-4) and its printed error falls with the
rank; the files are kohya-layout with the right metadata; bad inputs are clear errors."""

import copy
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from ldm.cli import lora_tools
from ldm.cli.lora import main
from ldm.formats.ldm_bundle import save_ldm_bundle
from ldm.formats.load import load_bundle
from ldm.formats.lora_files import apply_lora_files, bundle_roots, read_lora_file, save_lora_file
from ldm.models.lora import LoRAConfig, LoRANetwork
from tests.helpers import ROOT
from tests.helpers.models import clip_folder, tiny_bundle  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_for(bundle, seed, rank=2, preset="full", alpha=None, std=0.3):
    torch.manual_seed(seed)
    net = LoRANetwork.build(bundle_roots(bundle), LoRAConfig(preset=preset, rank=rank, alpha=alpha,
                                                             text_encoder=True))
    with torch.no_grad():
        for m in net.loras.values():
            m.up.weight.normal_(std=std)
    return net


@pytest.fixture(scope="module")
def files(clip_folder, tmp_path_factory):  # noqa: F811
    """A tiny model as an ldm bundle folder, two adapters for it (a kohya file: LoCon rank 2 alpha 1; a diffusers
    folder: attention rank 3), a rank-4 adapter, and a fine-tune: the model with a known rank-2 LoRA merged in."""
    root = tmp_path_factory.mktemp("lora-tools")
    bundle = tiny_bundle(clip_folder)
    model = save_ldm_bundle(bundle, root / "model")
    roots = bundle_roots(bundle)
    a = save_lora_file(lora_for(bundle, 1, alpha=1.0), roots, root / "a.safetensors",
                       training={"ss_steps": "300", "ss_training_comment": "trained on cats"})
    b = save_lora_file(lora_for(bundle, 2, rank=3, preset="attention"), roots, root / "b", "peft").parent
    wide = save_lora_file(lora_for(bundle, 3, rank=4), roots, root / "wide.safetensors")
    tuned = copy.deepcopy(bundle)
    lora_for(bundle, 4).merge_into(bundle_roots(tuned), 1.0)
    return dict(root=root, model=str(model), a=str(a), b=str(b), wide=str(wide),
                tuned=str(save_ldm_bundle(tuned, root / "tuned")))


def fresh(files):
    return load_bundle(files["model"])


def applied(files, specs):
    bundle = fresh(files)
    apply_lora_files(bundle_roots(bundle), specs, report=lambda _: None)
    return bundle


def max_weight_difference(x, y) -> float:
    sx = {**{f"unet.{k}": v for k, v in x.unet.state_dict().items()},
          **{f"te.{k}": v for k, v in x.text_encoder.state_dict().items()}}
    sy = {**{f"unet.{k}": v for k, v in y.unet.state_dict().items()},
          **{f"te.{k}": v for k, v in y.text_encoder.state_dict().items()}}
    return max(float((sx[k].double() - sy[k].double()).abs().max()) for k in sx if sx[k].is_floating_point())


def deltas(path, files) -> dict:
    """{(root, path): the layer's delta} of a LoRA file, read against the model."""
    bundle = fresh(files)
    lora = read_lora_file(path, bundle_roots(bundle))
    net = lora.network(bundle_roots(bundle))
    return {net.paths[k]: m.weight_delta().detach().double() for k, m in net.loras.items()}


# ---------------------------------------------------------------------------------------------------- merge

@pytest.mark.parametrize("how", [["--concat"], ["--rank", "5"]])  # 5 = 2 + 3: the SVD at full rank
def test_merged_adapter_equals_applying_both(files, tmp_path, how, capsys):
    out = tmp_path / "merged.safetensors"
    specs = [f"{files['a']}:0.7", f"{files['b']}:-0.5"]
    assert main(["merge", *specs, "--model", files["model"], "--out", str(out), *how]) == 0
    both, merged = applied(files, specs), applied(files, [str(out)])
    assert max_weight_difference(both, merged) < 1e-5
    assert max_weight_difference(both, fresh(files)) > 1e-2  # the adapters do change the model
    printed = capsys.readouterr().out
    assert "relative error overall" in printed and f"written: {out}" in printed
    with safe_open(str(out), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)  # kohya's layout, diffusers-named U-Net
    assert meta["ss_network_module"] == "networks.lora" and json.loads(meta["ldm_lora"])["tool"] == "merge"
    sources = ["a.safetensors:0.7", "pytorch_lora_weights.safetensors:-0.5"]  # file names, not the user's folders
    assert json.loads(meta["ldm_lora"])["sources"] == sources


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_merge_folds_other_adapter_kinds_into_a_lora(files, tmp_path, kind):
    """A LoHa / LoKr / DoRA file merged at full rank (the layer's smaller side) equals applying it; --concat and
    resize, which work on LoRA factors, say how to convert it instead."""
    bundle = fresh(files)
    roots = bundle_roots(bundle)
    torch.manual_seed(5)
    net = LoRANetwork.build(roots, LoRAConfig(type=kind, preset="attention", rank=2, text_encoder=True))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    other = save_lora_file(net, roots, tmp_path / f"{kind}.safetensors")
    full = max(min(m.shape[0], m.shape[1]) for r in roots.values() for m in
               (p for n, p in r.named_parameters() if n.endswith("weight") and p.ndim == 2))
    out = tmp_path / "as_lora.safetensors"
    specs = [f"{other}:0.8", files["a"]]
    assert main(["merge", *specs, "--model", files["model"], "--rank", str(full), "--out", str(out)]) == 0
    assert max_weight_difference(applied(files, specs), applied(files, [str(out)])) < 1e-5
    assert read_lora_file(out, bundle_roots(fresh(files))).kinds == ["lora"]
    with pytest.raises(lora_tools.LoRAToolError, match="--rank R to fold it"):
        lora_tools.merge([str(other), files["a"]], files["model"], tmp_path / "c.safetensors", concat=True)
    with pytest.raises(lora_tools.LoRAToolError, match="merge FILE --rank R"):
        lora_tools.resize(str(other), files["model"], tmp_path / "r.safetensors", rank=2)


def test_merge_at_a_lower_rank_reports_its_error(files, tmp_path):
    errors, layers = [], deltas(files["a"], files).keys() | deltas(files["b"], files).keys()
    for rank in (1, 2, 3, 5):
        report = lora_tools.merge([files["a"], files["b"]], files["model"], tmp_path / f"m{rank}.safetensors",
                                  rank=rank, log=lambda _: None)
        errors.append(report.error)
        assert max(x.rank for x in report.layers) <= rank
        assert deltas(report.path, files).keys() == layers  # every layer of either file is in the merge
    assert errors[0] > errors[1] > errors[2] > 0.0 and errors[3] < 1e-6


# ---------------------------------------------------------------------------------------------------- resize

def test_resize_to_the_full_rank_reproduces_the_deltas(files, tmp_path):
    out = tmp_path / "same.safetensors"
    report = lora_tools.resize(files["a"], files["model"], out, rank=2, log=lambda _: None)
    before, after = deltas(files["a"], files), deltas(out, files)
    assert before.keys() == after.keys()
    assert max(float((before[k] - after[k]).abs().max()) for k in before) < 1e-5
    assert report.kept == pytest.approx(1.0, abs=1e-9)
    # alpha / r is kept (kohya): the file says alpha 1 at rank 2 (and conv_alpha = conv_rank 2 on the 3x3 convs)
    alphas = []
    for path in (files["a"], out):
        with safe_open(str(path), "pt") as f:
            alphas.append({k: float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")})
    assert alphas[0] == alphas[1] and set(alphas[0].values()) == {1.0, 2.0}
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "300" and meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1.0"
    assert meta["ss_training_comment"] == ("resize with python -m ldm.lora: resized from rank 2 to rank 2; "
                                           "trained on cats")  # kohya keeps the source's training metadata


def test_resize_with_a_weight_scales_the_adapter(files, tmp_path):
    out = tmp_path / "half.safetensors"
    lora_tools.resize(f"{files['a']}:-0.5", files["model"], out, rank=2, log=lambda _: None)
    before, after = deltas(files["a"], files), deltas(out, files)
    assert max(float((-0.5 * before[k] - after[k]).abs().max()) for k in before) < 1e-5
    with safe_open(str(out), "pt") as f:
        assert all(float(f.get_tensor(k)) > 0 for k in f.keys() if k.endswith(".alpha"))  # the sign is in up


def test_resize_error_falls_with_the_rank_and_the_printed_energy_is_right(files, tmp_path, capsys):
    original = deltas(files["wide"], files)
    errors = []
    for rank in (1, 2, 3, 4):
        out = tmp_path / f"r{rank}.safetensors"
        report = lora_tools.resize(files["wide"], files["model"], out, rank=rank)
        printed = capsys.readouterr().out
        resized = deltas(out, files)
        by_name = {x.name: x for x in report.layers}
        names = lora_tools.names(bundle_roots(fresh(files)), original)
        err = norm = 0.0
        for target, d in original.items():
            layer = by_name[names[target]]
            kept = float(resized[target].norm() / d.norm())  # ||D_r||_F / ||D||_F, measured on the files
            assert layer.kept == pytest.approx(kept, abs=1e-5)
            assert f"fro retained: {kept:.1%}" in printed  # kohya's verbose line, per layer
            err, norm = err + float((resized[target] - d).pow(2).sum()), norm + float(d.pow(2).sum())
        assert report.error == pytest.approx((err / norm) ** 0.5, abs=1e-5)
        assert f"fro retained overall: {report.kept:.2%}" in printed
        errors.append(report.error)
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 1e-6


def test_dynamic_resize_keeps_the_asked_energy(files, tmp_path):
    report = lora_tools.resize(files["wide"], files["model"], tmp_path / "dyn.safetensors", rank=4,
                               dynamic="sv_fro", value=0.9, log=lambda _: None)
    assert all(x.kept >= 0.9 - 1e-9 for x in report.layers)
    assert all(x.rank == 1 or lora_svd_kept(x, x.rank - 1) < 0.9 for x in report.layers)  # the fewest that do
    assert len({x.rank for x in report.layers}) > 1
    with safe_open(str(report.path), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "Dynamic"


def lora_svd_kept(layer, rank):
    from ldm.models.lora_svd import kept_energy

    return kept_energy(layer.spectrum, rank)


# ---------------------------------------------------------------------------------------------------- extract

def test_extract_reproduces_a_known_lora(files, tmp_path):
    out = tmp_path / "extracted.safetensors"
    report = lora_tools.extract(files["model"], files["tuned"], out, rank=2, conv_rank=2, text_encoder=True,
                                log=lambda _: None)
    assert report.error < 1e-5
    tuned = load_bundle(files["tuned"])
    assert max_weight_difference(applied(files, [str(out)]), tuned) < 1e-4
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and json.loads(meta["ss_network_args"])["conv_dim"] == "2"
    assert json.loads(meta["ldm_lora"])["preset"] == "full"  # --conv-rank: LoCon


@pytest.fixture(scope="module")
def perturbed(files):
    """A 'full fine-tune': every weight of the model moved by full-rank noise."""
    bundle = fresh(files)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in [*bundle.unet.parameters(), *bundle.text_encoder.parameters()]:
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return str(save_ldm_bundle(bundle, files["root"] / "perturbed"))


def test_extract_error_is_printed_and_falls_with_the_rank(files, perturbed, tmp_path, capsys):
    errors = []
    for rank in (1, 4, 16, 64):  # 64: the tiny model's widest layer's narrow side, the full rank
        out = tmp_path / f"x{rank}.safetensors"
        report = lora_tools.extract(files["model"], perturbed, out, rank=rank, preset="attention_ff")
        printed = capsys.readouterr().out
        assert re.search(rf"relative error overall: {report.error:.2e}", printed)
        assert "lies in tensors a LoRA of preset attention_ff does not hold" in printed
        assert "the text encoders differ: add --text-encoder" in printed
        errors.append(report.error)
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 1e-6
    # at full rank the adapted layers of the fine-tune are reproduced
    tuned, got = load_bundle(perturbed), applied(files, [str(tmp_path / "x64.safetensors")])
    layers = [p for p in deltas(tmp_path / "x64.safetensors", files)]
    for root, path in layers:
        want = tuned.unet.get_submodule(path).weight.detach()
        assert float((got.unet.get_submodule(path).weight.detach() - want).abs().max()) < 1e-4


def test_extract_clamp_quantile_changes_the_factors_and_counts_in_the_error(files, perturbed, tmp_path):
    plain = lora_tools.extract(files["model"], perturbed, tmp_path / "p.safetensors", rank=4, log=lambda _: None)
    clamped = lora_tools.extract(files["model"], perturbed, tmp_path / "c.safetensors", rank=4,
                                 clamp_quantile=0.5, log=lambda _: None)
    assert clamped.error > plain.error


# ---------------------------------------------------------------------------------------------------- the command

def test_the_command_runs_end_to_end(files, tmp_path):
    out = tmp_path / "small.safetensors"
    cmd = [sys.executable, "-m", "ldm.lora", "resize", files["wide"], "--model", files["model"], "--rank", "2",
           "--dynamic", "sv_cumulative", "--value", "0.8", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "sum(S) retained" in done.stdout and "fro retained overall" in done.stdout and out.is_file()
    read_lora_file(out, bundle_roots(fresh(files)))  # our reader takes it


def test_bad_inputs_are_clear_errors(files, clip_folder, tmp_path, capsys):  # noqa: F811
    model, out = files["model"], str(tmp_path / "o.safetensors")
    cases = [
        (["merge", str(tmp_path / "missing.safetensors"), "--model", model, "--rank", "2", "--out", out],
         "LoRA file not found"),
        (["resize", files["a"], "--model", model, "--rank", "2", "--out", files["a"]], "is also an input"),
        (["resize", files["a"], "--model", str(tmp_path / "nomodel"), "--rank", "2", "--out", out],
         "--model .*nomodel"),
        (["resize", files["a"], "--model", model, "--rank", "2", "--dynamic", "sv_fro", "--out", out],
         "needs --value"),
        (["resize", files["a"], "--model", model, "--rank", "2", "--dynamic", "sv_fro", "--value", "2",
          "--out", out], "fraction to keep"),
        (["resize", files["a"], "--model", model, "--rank", "2", "--out", str(tmp_path / "o.pt")], ".safetensors"),
        (["extract", "--base", model, "--tuned", model, "--rank", "2", "--out", out], "do not differ"),
        (["extract", "--base", model, "--tuned", files["tuned"], "--rank", "2", "--conv-rank", "2",
          "--preset", "attention", "--out", out], "only --preset full"),
        (["extract", "--base", model, "--tuned", files["tuned"], "--rank", "2", "--device", "gpu7", "--out", out],
         "--device gpu7: not usable"),
    ]
    other = save_ldm_bundle(tiny_bundle(clip_folder, model_channels=32), tmp_path / "other")
    cases.append((["extract", "--base", model, "--tuned", str(other), "--rank", "2", "--out", out],
                  "different architectures"))
    for argv, message in cases:
        assert main(argv) == 1, argv
        assert re.search(message, capsys.readouterr().err), (argv, message)
    assert not (tmp_path / "o.safetensors").exists()
    for argv in (["resize", files["a"], "--model", model, "--rank", "0", "--out", out],
                 ["merge", files["a"], "--model", model, "--out", out]):  # neither --rank nor --concat
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "a rank is a positive integer" in err and "one of the arguments --rank --concat is required" in err
    open(out, "wb").close()
    assert main(["resize", files["a"], "--model", model, "--rank", "1", "--out", out]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert main(["resize", files["a"], "--model", model, "--rank", "1", "--out", out, "--force"]) == 0


def test_files_naming_the_unet_in_sd_or_diffusers_words_merge_together(files, tmp_path):
    """The same adapter written with SD's module names (lora_unet_input_blocks_...) and with diffusers' (what we and
    kohya write) is one adapter on the model: merged at 0.5 + 0.5 it equals the adapter itself."""
    from safetensors.torch import load_file, save_file

    from ldm.formats.lora_kohya import UNET_PREFIX, name_table

    table = name_table(bundle_roots(fresh(files)))
    state = load_file(files["a"])
    renamed = {}
    for key, value in state.items():
        name, _, suffix = key.partition(".")
        root, path = table[name]
        renamed[(UNET_PREFIX + path.replace(".", "_") if root == "unet" else name) + "." + suffix] = value
    assert renamed.keys() != state.keys()
    sd_named = tmp_path / "sd_named.safetensors"
    save_file(renamed, str(sd_named))
    out = tmp_path / "halves.safetensors"
    report = lora_tools.merge([f"{files['a']}:0.5", f"{sd_named}:0.5"], files["model"], out, concat=True,
                              log=lambda _: None)
    assert len(report.layers) == len(deltas(files["a"], files)) and {x.rank for x in report.layers} == {4}  # one
    assert max_weight_difference(applied(files, [str(out)]), applied(files, [files["a"]])) < 1e-5


def test_extract_from_sdxl_covers_both_text_encoders(tmp_path):
    """An SDXL-shaped model: the extracted file names kohya's lora_te1_ / lora_te2_ layers and the SDXL base, and
    reproduces a full-rank text-encoder difference at full rank."""
    from ldm.models.tiny_clip import write_tiny_sdxl_clips
    from tests.helpers.models import tiny_sdxl_bundle

    bundle = tiny_sdxl_bundle(write_tiny_sdxl_clips(tmp_path / "clips"))
    base = save_ldm_bundle(bundle, tmp_path / "base")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in bundle.text_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    tuned = save_ldm_bundle(bundle, tmp_path / "tuned")
    out = tmp_path / "te.safetensors"
    with pytest.raises(lora_tools.LoRAToolError, match="do not differ.*text encoders differ: add --text-encoder"):
        lora_tools.extract(str(base), str(tuned), out, rank=4, log=lambda _: None)
    report = lora_tools.extract(str(base), str(tuned), out, rank=512, text_encoder=True, log=lambda _: None)
    assert report.error < 1e-6
    with safe_open(str(out), "pt") as f:
        prefixes = {k.split("_")[1] for k in f.keys()}
        assert prefixes == {"te1", "te2"} and f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
