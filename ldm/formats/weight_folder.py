"""A component folder of the diffusers / transformers layout (``<stem>.safetensors``, ``<stem>.bin`` or the shards
of ``<stem>.safetensors.index.json``), read as bounded data: the shards an index names stay inside the folder,
and a CLIP text model's ``config.json`` is bounded, built on the meta device and compared with the tensors its
weight file holds before transformers allocates anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from ldm.formats.safe_load import CheckpointError, load_state_dict, read_json_file, tensor_shapes
from ldm.formats.safe_paths import inside, is_inside

TEXT_PREFIX = "text_model."  # transformers CLIPTextModel's level, absent from its keys since transformers 5.6


def inside_model_folder(folder: Path, name: str, *, source: str, key: str) -> Path:
    """``folder / name`` for a file name that a model folder's JSON holds (a weight index's shard, an ldm bundle's
    weights): relative, without ``..``, and inside ``folder`` once symlinks are followed (``safe_paths.inside``),
    or, in a hub snapshot, a link into its repo's ``blobs/`` (huggingface_hub's cache links every file there)."""
    if isinstance(name, str) and ".." in Path(name).parts:
        raise CheckpointError(f"{source}: {key} = {name!r} leads out of {folder} through '..'; refused")
    try:
        return inside(folder, name, source=source, key=key)
    except CheckpointError:
        repo = _hub_repo(Path(folder))
        if repo is not None and not os.path.isabs(name) and is_inside(Path(folder) / name, repo / "blobs"):
            return Path(folder) / name
        raise


def _hub_repo(folder: Path) -> Path | None:
    """The cache entry ``models--org--name`` of a folder inside one of its ``snapshots/<revision>/``, or None."""
    for parent in (folder, *folder.parents):
        if parent.parent.name == "snapshots" and (parent.parent.parent / "blobs").is_dir():
            return parent.parent.parent
    return None


def weights_file(folder: Path, stem: str, variant: str | None = None) -> list[Path]:
    """Weight files of a component folder: single file or the shards of an index (each inside ``folder``)."""
    folder = Path(folder)
    name = f"{stem}.{variant}" if variant else stem
    for suffix in (".safetensors", ".bin"):
        if (folder / (name + suffix)).is_file():
            return [folder / (name + suffix)]
        index = folder / f"{name}{suffix}.index.json"
        if index.is_file():
            weight_map = read_json_file(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
            return [inside_model_folder(folder, s, source=str(index), key="weight_map")
                    for s in sorted(set(weight_map.values()))]
    raise CheckpointError(f"{folder}: no {name}.safetensors or {name}.bin weights")


def read_weights(folder: Path, stem: str, variant: str | None = None) -> dict:
    state = {}
    for file in weights_file(folder, stem, variant):
        state.update(load_state_dict(file))
    return state


def read_clip_text_config(folder: Path) -> dict:
    """``folder/config.json`` of a transformers CLIP text model, its size fields checked before transformers
    reads it."""
    from ldm.models.clip_bounds import check_clip_text_fields

    path = Path(folder) / "config.json"
    config = read_json_file(path, key="config.json")
    try:
        check_clip_text_fields(config, source=str(path))
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    return config


def check_text_encoder_folder(folder: Path, projection: bool = False) -> None:
    """A text encoder folder (``config.json`` + ``model.safetensors`` or shards) holds the model its config
    describes: the config bounded, the model built on the meta device (no memory), and every one of its tensors
    present in the weight file with the same shape, before transformers builds it for real. ``projection``: a
    ``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2/``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm.models.clip_bounds import check_clip_text_fields, meta_text_model

    folder = Path(folder)
    read_clip_text_config(folder)
    source = str(folder / "config.json")
    try:
        config = CLIPTextConfig.from_pretrained(str(folder))
        check_clip_text_fields(config.to_dict(), source=source)  # the fields as read (a nested text_config too)
        model = meta_text_model(CLIPTextModelWithProjection if projection else CLIPTextModel, config, source=source)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{source}: {err}") from err
    files = weights_file(folder, "model")
    held: dict[str, tuple[int, ...]] = {}
    for file in files:
        held.update({k.removeprefix(TEXT_PREFIX): v for k, v in tensor_shapes(file).items()})
    for key, tensor in model.state_dict().items():
        name = key.removeprefix(TEXT_PREFIX)
        if name.endswith("position_ids"):
            continue  # a buffer transformers computes, not stored in every file
        if name not in held:
            raise CheckpointError(f"{files[0]}: holds no {name} of the text encoder {source} describes")
        if held[name] != tuple(tensor.shape):
            raise CheckpointError(f"{files[0]}: {name} has shape {held[name]}, but {source} describes "
                                  f"{tuple(tensor.shape)}")


def cached_hub_folder(hub_id: str, patterns: list[str], *, source: str, key: str) -> Path:
    """The folder of a hub repo that a *file* names (a stored text encoder node, a LoRA run's base): taken only from
    this machine's hub cache. A file never makes ldm download anything (issue 25: a file is bounded data); the
    user downloads a model they chose themselves."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(hub_id), allow_patterns=patterns, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - huggingface_hub's LocalEntryNotFoundError and kin: not cached here
        raise CheckpointError(
            f"{source}: {key} = {hub_id!r} names a hub model that is not on this machine, and a file never makes ldm "
            f"download anything: download it yourself if you trust it (huggingface-cli download {hub_id}) or give "
            "the model explicitly (model.pretrained= / text_encoder=)") from err


T5_TIED = ("encoder.embed_tokens.weight",)
# an SD3 diffusers folder's text encoders and their tokenizers (the T5 pair optional)
CLIP_SUBS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
T5_SUB, T5_TOKENIZER = "text_encoder_3", "tokenizer_3"  # tied to shared.weight: transformers stores only that one
# a FLUX.1 diffusers folder's: CLIP-L (a CLIPTextModel, pooled unprojected) and the T5 as its second encoder
FLUX_CLIP_SUBS = (("text_encoder", "tokenizer"),)
FLUX_T5_SUBS = ("text_encoder_2", "tokenizer_2")


def check_t5_folder(folder: Path) -> None:
    """A T5 encoder folder (SD3's ``text_encoder_3/``) holds the model its config describes: the size fields
    bounded, the ``T5EncoderModel`` built on the meta device and counted, and each of its tensors present in the
    weight files with the same shape, before transformers allocates anything."""
    from transformers import T5Config

    from ldm.models.clip_bounds import check_t5_fields, meta_t5_encoder

    folder = Path(folder)
    path = folder / "config.json"
    try:
        check_t5_fields(read_json_file(path, key="config.json"), source=str(path))
        model = meta_t5_encoder(T5Config.from_pretrained(str(folder)), source=str(path))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{err}" if str(path) in str(err) else f"{path}: {err}") from err
    files = weights_file(folder, "model")
    held: dict[str, tuple[int, ...]] = {}
    for file in files:
        held.update(tensor_shapes(file))
    for name, tensor in model.state_dict().items():
        if name not in held and name in T5_TIED and "shared.weight" in held:
            continue
        if name not in held:
            raise CheckpointError(f"{files[0]}: holds no {name} of the T5 encoder {path} describes")
        if held[name] != tuple(tensor.shape):
            raise CheckpointError(f"{files[0]}: {name} has shape {held[name]}, but {path} describes "
                                  f"{tuple(tensor.shape)}")


def check_text_folders(folder: Path, use_t5: bool = True, *, clips=CLIP_SUBS, t5_subs=(T5_SUB, T5_TOKENIZER),
                       projection: bool = True, what: str = "an SD3 folder") -> bool:
    """The CLIP text encoders (``clips``: (model, tokenizer) folders; ``projection``: CLIPTextModelWithProjection)
    and the T5 (``t5_subs``, if there and wanted) checked against their weights; True when the T5 is used.
    SD3: two projected CLIPs + text_encoder_3/; Flux.1: CLIP-L (no projection) + text_encoder_2/ (``FLUX_*``)."""
    for sub, tokenizer in clips:
        check_text_encoder_folder(folder / sub, projection=projection)
        if not (folder / tokenizer).is_dir():
            raise CheckpointError(f"{folder}: {what} needs {tokenizer}/ beside {sub}/")
    t5_sub, t5_tokenizer = t5_subs
    t5 = use_t5 and (folder / t5_sub).is_dir()
    if t5:
        check_t5_folder(folder / t5_sub)
        if not (folder / t5_tokenizer).is_dir():
            raise CheckpointError(f"{folder}: {t5_sub}/ needs {t5_tokenizer}/ beside it")
    return t5


def check_flux_text_folders(folder: Path, use_t5: bool = True) -> bool:
    """A FLUX.1 folder's CLIP-L (``text_encoder/``, a CLIPTextModel) and T5 (``text_encoder_2/``, if there and
    wanted) checked against their weights; True when the T5 is used."""
    return check_text_folders(folder, use_t5, clips=FLUX_CLIP_SUBS, t5_subs=FLUX_T5_SUBS, projection=False,
                              what="a FLUX.1 folder")
