"""A network's config object is the only place its arguments and their bounds are written: the schemas that
check configs stored in files (ldm.formats.safe_build) are generated from the dataclasses."""

import dataclasses

import pytest

from ldm.formats import safe_build
from ldm.formats.safe_build import BUILDERS, CheckpointError, Param, build_network, schema_of
from ldm.models.autoencoder import AutoencoderConfig, IdentityConfig
from ldm.models.config_fields import bounded, field_bounds
from ldm.models.controlnet import ControlNetConfig
from ldm.models.unet import UNetConfig

CONFIGS = {safe_build.UNET_TARGET: UNetConfig, safe_build.AUTOENCODER_TARGET: AutoencoderConfig,
           safe_build.IDENTITY_TARGET: IdentityConfig, safe_build.CONTROLNET_TARGET: ControlNetConfig}


@pytest.mark.parametrize("target", sorted(CONFIGS))
def test_the_builders_check_exactly_the_config_fields_and_bounds(target):
    config_cls, schema = CONFIGS[target], BUILDERS[target].schema
    fields = dataclasses.fields(config_cls)
    assert list(schema) == [f.name for f in fields]
    for f in fields:
        bounds = field_bounds(f)
        assert (schema[f.name].low, schema[f.name].high) == (bounds.low, bounds.high), f.name


def test_schema_of_reads_types_and_bounds():
    @dataclasses.dataclass
    class Example:
        width: int = bounded(8, 1, 64)
        mult: tuple[int, ...] = bounded((1, 2), 1, 4)
        depth: int | tuple[int, ...] = bounded(1, 0, 3)
        scale: float = bounded(1.0, 0.0, 2.0)
        extra: int | None = bounded(None, 1, 9)
        flag: bool = False
        name: str = "x"

    schema = schema_of(Example)
    assert schema["width"] == Param((int,), 1, 64)
    assert schema["mult"] == Param((int,), 1, 4, list_of=True)
    assert schema["depth"] == Param((int,), 0, 3, or_list=True)
    assert schema["scale"] == Param((int, float), 0.0, 2.0)
    assert schema["extra"] == Param((int, type(None)), 1, 9)
    assert schema["flag"] == Param((bool,)) and schema["name"] == Param((str,))


def test_a_stored_value_past_a_config_bound_is_refused():
    high = field_bounds(next(f for f in dataclasses.fields(UNetConfig) if f.name == "model_channels")).high
    with pytest.raises(CheckpointError, match=r"model_channels = .* is outside"):
        build_network("unet", {"model_channels": high + 1}, source="file.safetensors", key="unet")


def test_the_text_encoder_builders_check_their_config_fields():
    from ldm.models.text_encoder import CLIPFolder, TextEncoderOptions, TinyCLIPConfig
    from ldm.models.text_encoder_sdxl import DualTextOptions, TinyDualCLIPConfig

    def names(*classes):
        return {f.name for c in classes for f in dataclasses.fields(c)}

    schema = {name: set(b.schema) for name, b in BUILDERS.items() if b.role == "text_encoder"}
    clip, sdxl = "ldm.models.text_encoder.CLIPTextEncoder", "ldm.models.text_encoder_sdxl.DualCLIPTextEncoder"
    assert schema[f"{clip}.from_tiny"] == names(TinyCLIPConfig, TextEncoderOptions) | {"subfolder_layout"}
    assert schema[f"{clip}.from_pretrained"] == names(CLIPFolder, TextEncoderOptions)
    assert schema[f"{sdxl}.from_tiny"] == names(TinyDualCLIPConfig, DualTextOptions)
    assert schema[f"{sdxl}.from_pretrained"] == {"path_or_hub_id"} | names(DualTextOptions)
    from ldm.models.text_encoder_flux import FluxTextOptions

    flux = "ldm.models.text_encoder_flux.FluxTextEncoder.from_pretrained"  # model=flux_dev's (a FLUX.1 folder)
    assert schema[flux] == {"path_or_hub_id", "use_t5"} | names(FluxTextOptions)
