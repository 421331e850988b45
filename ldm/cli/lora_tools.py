"""The LoRA tools behind ``python -m ldm.lora``: merge adapters into one, resize an adapter's rank, extract an adapter
from the difference of two models. Callable without a command line; each writes a kohya-layout file
(``ldm.formats.lora_files.save_lora_file``) and returns a :class:`Report` of what every layer kept.

Reference behaviours (kohya-ss/sd-scripts, read, not copied): networks/svd_merge_lora.py (sum the weighted deltas
alpha_i / r_i * ratio_i * B_i A_i, SVD to the new rank, alpha = rank), networks/resize_lora.py (SVD of each layer
to the new or a dynamically chosen rank, alpha rescaled so alpha / r is kept, the Frobenius fraction printed),
networks/extract_lora_from_models.py (SVD of tuned - base per adapted layer, alpha = rank, optional clamp of both
factors at a quantile). The math: ldm/models/lora_svd.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.formats.lora_files import (LoRAFile, LoRAFileError, bundle_roots, ldm_metadata, parse_lora_spec,
                                    read_lora_file, save_lora_file)
from ldm.formats.lora_kohya import kohya_names
from ldm.models import lora_svd
from ldm.models.lora import PRESETS, LoRANetwork, adapter_kind, module_from_parts, text_encoder_targets, unet_targets

Weights = dict[tuple[str, str], dict[str, Tensor]]  # (root, module path) -> down / up / alpha (LoRANetwork's)


class LoRAToolError(ValueError):
    """Bad input to a LoRA tool: the message names the file or option to fix."""


# ------------------------------------------------------------------------------------------------ reports

@dataclass
class Layer:
    """What one layer of the written adapter kept: its spectrum before truncation and the rank it got."""

    name: str  # kohya's module name (lora_unet_...)
    rank: int
    spectrum: Tensor  # singular values of the delta it approximates, descending
    error_sq: float  # ||delta - written delta||_F^2
    norm_sq: float  # ||delta||_F^2
    old_rank: int | None = None

    @property
    def kept(self) -> float:
        return lora_svd.kept_energy(self.spectrum, self.rank)

    @property
    def error(self) -> float:
        return lora_svd.relative(self.error_sq, self.norm_sq)

    def line(self) -> str:
        """kohya resize_lora.py's verbose line: name | sum(S) retained, fro retained, max(S) ratio."""
        s = self.spectrum
        rank = f"rank {self.old_rank} -> {self.rank}" if self.old_rank is not None else f"rank {self.rank}"
        if self.norm_sq == 0:
            return f"{self.name:75} | {rank}, zero delta"
        smallest = float(s[self.rank - 1])
        ratio = f"{float(s[0]) / smallest:0.1f}" if smallest > 0 else "inf"
        return (f"{self.name:75} | {rank}, sum(S) retained: {lora_svd.kept_sum(s, self.rank):.1%}, fro retained: "
                f"{self.kept:.1%}, max(S) ratio: {ratio}, relative error: {self.error:.2e}")


@dataclass
class Report:
    path: Path
    layers: list[Layer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def kept(self) -> float:
        """The Frobenius fraction of the whole adapter: sqrt(sum of kept s_i^2 over all layers / sum of all s_i^2)."""
        total = sum(float(x.spectrum.pow(2).sum()) for x in self.layers)
        kept = sum(float(x.spectrum[: x.rank].pow(2).sum()) for x in self.layers)
        return 1.0 if total == 0 else math.sqrt(kept / total)

    @property
    def error(self) -> float:
        """||all deltas - written deltas||_F / ||all deltas||_F over every layer."""
        return lora_svd.relative(sum(x.error_sq for x in self.layers), sum(x.norm_sq for x in self.layers))

    def summary(self) -> str:
        nonzero = [x.kept for x in self.layers if x.norm_sq > 0]
        mean = sum(nonzero) / len(nonzero) if nonzero else 1.0
        std = math.sqrt(sum((k - mean) ** 2 for k in nonzero) / len(nonzero)) if nonzero else 0.0
        ranks = sorted({x.rank for x in self.layers})
        return (f"{len(self.layers)} layers, rank {ranks[0]}" + (f"..{ranks[-1]}" if len(ranks) > 1 else "")
                + f" | fro retained overall: {self.kept:.2%}, average per layer: {mean:.2%} (std {std:0.3f})"
                + f" | relative error overall: {self.error:.2e}")

    def show(self, log=print) -> None:
        for x in self.layers:
            log(x.line())
        for note in self.notes:
            log(note)
        log(self.summary())
        log(f"written: {self.path}")


# ------------------------------------------------------------------------------------------------ inputs

def load_model(source: str, what: str):
    """Any model ldm.formats.load reads, as a CPU bundle; errors name the option."""
    from ldm.formats.load import load_bundle

    try:
        return load_bundle(source, device="cpu")
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise LoRAToolError(f"{what} {source}: cannot load it as a model ({err})") from err


def check_out(out, inputs: list[str], force: bool) -> Path:
    path = Path(out).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise LoRAToolError(f"--out {out}: the adapter is written as one .safetensors file (kohya's layout)")
    for source in inputs:
        if Path(source).expanduser().resolve() == path.resolve():
            raise LoRAToolError(f"--out {out} is also an input: write to another file")
    if path.exists() and not force:
        raise LoRAToolError(f"--out {out} exists: choose another name or pass --force to replace it")
    return path


def read_files(specs: list[str], roots: dict[str, nn.Module], log=print) -> list[tuple[LoRAFile, float]]:
    """Every FILE[:WEIGHT] read against the model (all checked before any work); keys that address nothing are
    reported: they are not in the written file."""
    out = []
    for spec in specs:
        path, weight = parse_lora_spec(spec)
        try:
            lora = read_lora_file(path, roots)
        except LoRAFileError as err:
            raise LoRAToolError(str(err)) from err
        if lora.unmapped:
            shown = ", ".join(lora.unmapped[:10]) + (" ..." if len(lora.unmapped) > 10 else "")
            log(f"{lora.path}: {len(lora.unmapped)} keys address nothing in the model and are left out: {shown}")
        out.append((lora, weight))
    return out


def scale_of(w: dict[str, Tensor]) -> float:
    """alpha / r of one layer's LoRA (no alpha: scale 1, as kohya and diffusers read it)."""
    alpha = w.get("alpha")
    return 1.0 if alpha is None else float(alpha) / w["down"].shape[0]


def full_delta(roots: dict[str, nn.Module], target: tuple[str, str], parts: dict[str, Tensor]) -> Tensor:
    """A LoHa / LoKr / DoRA layer's update of its base weight (scale included), in double: W' - W."""
    base = roots[target[0]].get_submodule(target[1])
    with torch.no_grad():
        return module_from_parts(base, parts).weight_delta(base.weight.detach()).to(lora_svd.WORK_DTYPE)


def is_spatial(roots: dict[str, nn.Module], target: tuple[str, str]) -> bool:
    module = roots[target[0]].get_submodule(target[1])
    return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)


def check_ranks(rank: int | None, conv_rank: int | None) -> None:
    if rank is not None:
        lora_svd.check_rank(rank, "--rank")
    if conv_rank is not None:
        lora_svd.check_rank(conv_rank, "--conv-rank")


# ------------------------------------------------------------------------------------------------ output

# What kohya_metadata writes afresh for the new file; a resized file keeps the source's other ss_* keys (its
# training details, tag frequencies: resize_lora.py copies the metadata and updates dim, alpha and the comment).
REWRITTEN = ("ss_network_", "ss_base_model_version", "ss_v2", "ss_resolution", "ss_training_comment")


def write(weights: Weights, roots: dict[str, nn.Module], bundle, out: Path, about: dict, title: str,
          carried: dict[str, str] | None = None) -> Path:
    """The kohya-layout file with kohya's ss_* / modelspec.* keys (lora_kohya.kohya_metadata) and our ldm_lora
    key saying how it was made; ss_network_dim / alpha are "Dynamic" when the ranks differ (as resize_lora.py).
    `carried`: a source file's metadata whose ss_* training keys are kept."""
    from ldm.formats.exporter import resolution_of
    from ldm.formats.shared_names import shared_config

    network = LoRANetwork.from_weights(roots, weights)
    linear = {(m.rank, float(m.alpha)) for m in network.loras.values()
              if not (m.kind == "conv" and m.down.kernel_size != (1, 1))}
    carried = {k: v for k, v in (carried or {}).items() if k.startswith("ss_") and not k.startswith(REWRITTEN)}
    comment = about['tool'] + " with python -m ldm.lora" + (f": {about['comment']}" if about.get("comment") else "")
    training = {"ss_training_comment": comment}
    if len(linear) > 1:
        training.update(ss_network_dim="Dynamic", ss_network_alpha="Dynamic")
    metadata = {**carried, **ldm_metadata(shared_config({k: v for k, v in about.items() if k != "comment"}))}
    return save_lora_file(network, roots, out, metadata=metadata, title=title,
                          prediction_type=bundle.schedule.prediction_type, resolution=resolution_of(bundle),
                          training=training)


def names(roots: dict[str, nn.Module], targets) -> dict[tuple[str, str], str]:
    return kohya_names(roots, list(targets))


# ------------------------------------------------------------------------------------------------ merge

def merge(specs: list[str], model: str, out, *, rank: int | None = None, conv_rank: int | None = None,
          concat: bool = False, clamp_quantile: float | None = None, force: bool = False, log=print) -> Report:
    """Several adapters (FILE[:WEIGHT]) as one: with `concat` exactly (factors stacked along the rank, rank = sum
    of ranks), else the weighted sum of deltas by SVD to `rank` (`conv_rank` for 3x3 convs; kohya svd_merge_lora)."""
    if not specs:
        raise LoRAToolError("merge needs at least one adapter FILE[:WEIGHT]")
    if concat == (rank is not None):
        raise LoRAToolError("merge: give --rank R (SVD of the summed deltas) or --concat (exact), not both")
    if concat and (conv_rank is not None or clamp_quantile is not None):
        raise LoRAToolError("merge --concat is exact: --conv-rank and --clamp-quantile apply to --rank")
    check_ranks(rank, conv_rank)
    check_quantile(clamp_quantile)
    path = check_out(out, [parse_lora_spec(s)[0] for s in specs] + [model], force)
    bundle = load_model(model, "--model")
    roots = bundle_roots(bundle)
    files = read_files(specs, roots, log)
    layers: dict[tuple[str, str], list[tuple[Tensor, Tensor, float]]] = {}
    dense: dict[tuple[str, str], Tensor] = {}  # LoHa / LoKr / DoRA layers: their weighted full deltas, summed
    for lora, weight in files:
        for target, w in lora.weights.items():
            if adapter_kind(w) == "lora":
                layers.setdefault(target, []).append((w["up"], w["down"], weight * scale_of(w)))
            elif concat:
                raise LoRAToolError(f"{lora.path} holds {adapter_kind(w)} layers: --concat stacks LoRA factors; "
                                    "give --rank R to fold it into a LoRA by SVD of its delta")
            else:
                dense[target] = dense.get(target, 0) + weight * full_delta(roots, target, w)
    label = names(roots, [*layers, *dense])
    weights, report = {}, Report(path)
    for target in dict.fromkeys([*layers, *dense]):
        max_rank = (conv_rank or rank) if is_spatial(roots, target) else rank
        if target in dense:  # any non-LoRA layer: the SVD of the whole summed delta
            delta = dense[target]
            if target in layers:
                delta = delta + lora_svd.product(*lora_svd.concat(layers[target])).reshape(delta.shape)
            new_up, new_down, spectrum, new_rank = lora_svd.from_delta(delta, max_rank, clamp_quantile)
            err, norm = lora_svd.squared_error(delta, new_up, new_down)
            report.layers.append(Layer(label[target], new_rank, spectrum, err, norm))
            weights[target] = {"down": new_down.float(), "up": new_up.float(),
                               "alpha": torch.tensor(float(new_rank))}
            continue
        up, down = lora_svd.concat(layers[target])
        if concat:
            new_up, new_down, new_rank = up, down, down.shape[0]
            spectrum = lora_svd.svd_of_product(up, down)[1]
        else:
            new_up, new_down, spectrum, new_rank = lora_svd.lowrank(up, down, max_rank, quantile=clamp_quantile)
        err, norm = lora_svd.squared_error(lora_svd.product(up, down), new_up, new_down)
        report.layers.append(Layer(label[target], new_rank, spectrum, err, norm, old_rank=down.shape[0]))
        weights[target] = {"down": new_down.float(), "up": new_up.float(), "alpha": torch.tensor(float(new_rank))}
    about = {"tool": "merge", "sources": [f"{f.path}:{w:g}" for f, w in files],
             "rank": "concat" if concat else rank, "conv_rank": conv_rank, "clamp_quantile": clamp_quantile}
    report.path = write(weights, roots, bundle, path, about, title=path.stem)
    report.show(log)
    return report


# ------------------------------------------------------------------------------------------------ resize

def resize(spec: str, model: str, out, *, rank: int, conv_rank: int | None = None, dynamic: str | None = None,
           value: float | None = None, force: bool = False, log=print) -> Report:
    """Each layer re-factored by SVD to `rank` (`conv_rank` for 3x3 convs), or to the rank a `dynamic` rule keeps
    (sv_ratio / sv_fro / sv_cumulative with `value`, capped by the rank); alpha is rescaled so that alpha / r, the
    adapter's scale, is unchanged (kohya resize_lora.py). FILE:WEIGHT also scales the adapter."""
    check_ranks(rank, conv_rank)
    if dynamic is not None:
        if value is None:
            raise LoRAToolError(f"--dynamic {dynamic} needs --value (sv_ratio: >= 1; sv_fro, sv_cumulative: in (0, 1])")
        try:
            lora_svd.dynamic_rank(torch.ones(1), dynamic, value)
        except ValueError as err:
            raise LoRAToolError(f"--dynamic {dynamic} --value {value}: {err}") from err
    elif value is not None:
        raise LoRAToolError("--value is the threshold of --dynamic: give --dynamic too")
    path = check_out(out, [parse_lora_spec(spec)[0], model], force)
    bundle = load_model(model, "--model")
    roots = bundle_roots(bundle)
    [(lora, weight)] = read_files([spec], roots, log)
    kinds = sorted({adapter_kind(w) for w in lora.weights.values()} - {"lora"})
    if kinds:
        raise LoRAToolError(f"{lora.path} holds {', '.join(kinds)} layers: resize re-factors LoRA factors; "
                            "`merge FILE --rank R` folds any adapter into a LoRA by SVD of its delta")
    label = names(roots, lora.weights)
    weights, report = {}, Report(path)
    for target, w in lora.weights.items():
        up = w["up"] * weight  # FILE:WEIGHT scales the adapter; its alpha / r stays
        max_rank = (conv_rank or rank) if is_spatial(roots, target) else rank
        new_up, new_down, spectrum, new_rank = lora_svd.lowrank(up, w["down"], max_rank, dynamic, value)
        err, norm = lora_svd.squared_error(lora_svd.product(up, w["down"]), new_up, new_down)
        report.layers.append(Layer(label[target], new_rank, spectrum, err, norm, old_rank=w["down"].shape[0]))
        weights[target] = {"down": new_down.float(), "up": new_up.float(),
                           "alpha": torch.tensor(scale_of(w) * new_rank)}
    old = sorted({w["down"].shape[0] for w in lora.weights.values()})
    rule = f"{dynamic} {value:g}, at most rank {rank}" if dynamic else f"rank {rank}"
    about = {"tool": "resize", "source": f"{lora.path}:{weight:g}", "rank": rank, "conv_rank": conv_rank,
             "dynamic": dynamic, "value": value,
             "comment": "; ".join(filter(None, [f"resized from rank {'/'.join(map(str, old))} to {rule}",
                                                lora.metadata.get("ss_training_comment")]))}
    report.path = write(weights, roots, bundle, path, about, title=path.stem, carried=lora.metadata)
    report.show(log)
    return report


# ------------------------------------------------------------------------------------------------ extract

def check_quantile(q: float | None) -> None:
    if q is not None and not 0 < q <= 1:
        raise LoRAToolError(f"--clamp-quantile must be in (0, 1] (kohya uses 0.99), got {q}")


def check_same_model(base: dict[str, nn.Module], tuned: dict[str, nn.Module], root_names) -> None:
    """The two models have the same tensors of the same shapes (a LoRA of one must fit the other)."""
    problems = []
    for root in root_names:
        a, b = base[root].state_dict(), tuned[root].state_dict()
        problems += [f"{root}.{k} only in --base" for k in a.keys() - b.keys()]
        problems += [f"{root}.{k} only in --tuned" for k in b.keys() - a.keys()]
        problems += [f"{root}.{k}: {tuple(a[k].shape)} in --base, {tuple(b[k].shape)} in --tuned"
                     for k in a.keys() & b.keys() if a[k].shape != b[k].shape]
    if problems:
        shown = "; ".join(sorted(problems)[:5]) + (" ..." if len(problems) > 5 else "")
        raise LoRAToolError(f"--base and --tuned are different architectures ({len(problems)} differences: "
                            f"{shown}); extract needs a fine-tune of the base")


def outside_share(base: dict[str, nn.Module], tuned: dict[str, nn.Module], root: str, adapted: set[str]) -> float:
    """The share of the root's whole weight difference (||.||_F^2) in tensors the adapter does not hold (biases,
    norms, layers outside the preset)."""
    a, b = base[root].state_dict(), tuned[root].state_dict()
    total = outside = 0.0
    for k, v in a.items():
        if not v.is_floating_point():
            continue
        d = float((b[k].double() - v.double()).pow(2).sum())
        total += d
        if k not in adapted:
            outside += d
    return 0.0 if total == 0 else outside / total


def text_encoders_differ(base: dict[str, nn.Module], tuned: dict[str, nn.Module]) -> bool:
    a, b = base.get("text_encoder"), tuned.get("text_encoder")
    if a is None or b is None:
        return False
    x, y = a.state_dict(), b.state_dict()
    return x.keys() != y.keys() or any(x[k].shape != y[k].shape or not torch.equal(x[k], y[k]) for k in x)


def extract(base: str, tuned: str, out, *, rank: int, conv_rank: int | None = None, preset: str | None = None,
            text_encoder: bool = False, clamp_quantile: float | None = None, min_diff: float = 0.0,
            device: str = "cpu", force: bool = False, log=print) -> Report:
    """A LoRA of tuned - base: per layer the preset adapts, the rank-`rank` truncated SVD of the difference
    (`conv_rank` for 3x3 convs: LoCon, preset full), alpha = rank (kohya extract_lora_from_models.py). Layers whose
    largest |difference| is at most `min_diff` are left out."""
    check_ranks(rank, conv_rank)
    check_quantile(clamp_quantile)
    preset = preset or ("full" if conv_rank is not None else "attention_ff")
    if preset not in PRESETS:
        raise LoRAToolError(f"--preset must be one of {PRESETS}, got {preset!r}")
    if conv_rank is not None and preset != "full":
        raise LoRAToolError(f"--conv-rank sets the rank of the 3x3 convs, which only --preset full adapts "
                            f"(got --preset {preset})")
    if min_diff < 0:
        raise LoRAToolError(f"--min-diff must be >= 0, got {min_diff}")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:  # a bad name, or CUDA that this machine lacks
        raise LoRAToolError(f"--device {device}: not usable here ({err})") from err
    path = check_out(out, [base, tuned], force)
    base_bundle, tuned_bundle = load_model(base, "--base"), load_model(tuned, "--tuned")
    roots, tuned_roots = bundle_roots(base_bundle), bundle_roots(tuned_bundle)
    root_names = ["unet"] + (["text_encoder"] if text_encoder else [])
    if text_encoder and (roots["text_encoder"] is None or tuned_roots["text_encoder"] is None):
        raise LoRAToolError("--text-encoder: --base or --tuned has no text encoder")
    check_same_model(roots, tuned_roots, root_names)
    targets = [("unet", p) for p in unet_targets(roots["unet"], preset)]
    if text_encoder:
        targets += [("text_encoder", p) for p in text_encoder_targets(roots["text_encoder"])]
    label = names(roots, targets)
    weights, report, skipped = {}, Report(path), 0
    with torch.no_grad():
        for target in targets:
            a = roots[target[0]].get_submodule(target[1]).weight
            b = tuned_roots[target[0]].get_submodule(target[1]).weight
            delta = b.to(device, lora_svd.WORK_DTYPE) - a.to(device, lora_svd.WORK_DTYPE)
            if float(delta.abs().max()) <= min_diff:
                skipped += 1
                continue
            max_rank = (conv_rank or rank) if is_spatial(roots, target) else rank
            up, down, spectrum, new_rank = lora_svd.from_delta(delta, max_rank, clamp_quantile)
            err, norm = lora_svd.squared_error(delta, up, down)
            report.layers.append(Layer(label[target], new_rank, spectrum.cpu(), err, norm))
            weights[target] = {"down": down.float().cpu(), "up": up.float().cpu(),
                               "alpha": torch.tensor(float(new_rank))}
    te_hint = not text_encoder and text_encoders_differ(roots, tuned_roots)
    if not weights:
        raise LoRAToolError(f"--base and --tuned do not differ in the {len(targets)} layers of --preset {preset}"
                            + (f" by more than --min-diff {min_diff:g}" if min_diff else "") + ": nothing to extract"
                            + ("; their text encoders differ: add --text-encoder" if te_hint else ""))
    if skipped:
        report.notes.append(f"{skipped} of {len(targets)} layers differ by at most {min_diff:g}: left out")
    for root in root_names:
        adapted = {f"{p}.weight" for r, p in targets if r == root}
        share = outside_share(roots, tuned_roots, root, adapted)
        report.notes.append(f"{root}: {share:.2%} of the weight difference (squared Frobenius) lies in tensors a "
                            f"LoRA of preset {preset} does not hold (biases, norms, other layers)")
    if te_hint:
        report.notes.append("the text encoders differ: add --text-encoder to extract it too")
    about = {"tool": "extract", "base": str(base), "tuned": str(tuned), "preset": preset, "rank": rank,
             "conv_rank": conv_rank, "text_encoder": text_encoder, "clamp_quantile": clamp_quantile,
             "min_diff": min_diff}
    report.path = write(weights, roots, base_bundle, path, about, title=path.stem)
    report.show(log)
    return report
