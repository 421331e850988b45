"""SamplingOptions: the sampler config node as one object; every configs/sampler/ option builds one, settings that
do not apply to the sampler are errors naming the key, and the timesteps are the diffusion module's."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.diffusion.flow import FlowMatching
from ldm.diffusion.samplers import make_timesteps
from ldm.diffusion.schedules import NoiseSchedule
from ldm.pipelines.sampling_options import FLOW_SAMPLERS, SamplingOptions

SAMPLER_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "sampler").glob("*.yaml"))


@pytest.mark.parametrize("path", SAMPLER_CONFIGS, ids=lambda p: p.stem)
def test_every_sampler_config_is_a_valid_node(path):
    node = OmegaConf.load(path)
    options = SamplingOptions.of(node)
    assert options.name == node.name and options.steps == node.steps
    schedule = FlowMatching() if options.name in FLOW_SAMPLERS else NoiseSchedule.make("scaled_linear")
    assert options.timesteps(schedule).shape == (options.steps,)


def test_flow_and_noise_schedule_samplers_do_not_mix():
    with pytest.raises(ValueError, match="flow_euler"):
        SamplingOptions(name="ddim").timesteps(FlowMatching())
    with pytest.raises(ValueError, match="flow-matching models"):
        SamplingOptions(name="flow_euler").timesteps(NoiseSchedule.make("scaled_linear"))


def test_ddim_diffusers_is_sds_ddim():
    options = SamplingOptions.of(OmegaConf.load(SAMPLER_CONFIGS[0].parent / "ddim_diffusers.yaml"))
    assert options == SamplingOptions(name="ddim", steps=50, spacing="leading", steps_offset=1,
                                      final_alpha_one=False)
    ts = options.timesteps(NoiseSchedule.make("scaled_linear"))
    assert ts[:3].tolist() == [981, 961, 941] and ts[-1] == 1  # diffusers' DDIMScheduler with SD's config
    assert options.sampler_kwargs() == {"eta": 0.0, "final_alpha_one": False}


def test_of_accepts_names_nodes_and_options():
    assert SamplingOptions.of("euler") == SamplingOptions(name="euler")
    assert SamplingOptions.of({"name": "dpmpp_2m", "karras": True}) == SamplingOptions(name="dpmpp_2m", karras=True)
    opts = SamplingOptions(name="ddim", steps=7)
    copy = SamplingOptions.of(opts)
    assert copy == opts and copy is not opts
    assert opts.replace(steps=None, eta=0.5) == SamplingOptions(name="ddim", steps=7, eta=0.5)


@pytest.mark.parametrize("node, match", [
    ({"name": "heun"}, r"cb\.sampler\.name: unknown sampler 'heun'"),
    ({"steps": 0}, r"cb\.sampler\.steps must be >= 1"),
    ({"spacing": "middle"}, r"cb\.sampler\.spacing: unknown timestep spacing"),
    ({"name": "euler", "eta": 0.5}, r"cb\.sampler\.eta: eta=0.5 only applies"),
    ({"name": "ddim", "karras": True}, r"cb\.sampler\.karras: karras=True only applies"),
    ({"name": "euler", "final_alpha_one": False}, r"cb\.sampler\.final_alpha_one: false only applies"),
    ({"spacing": "trailing", "steps_offset": 1}, r"cb\.sampler\.steps_offset=1 only applies to leading"),
    ({"steps_offset": -1}, r"cb\.sampler\.steps_offset must be >= 0"),
    ({"stpes": 3}, r"cb\.sampler: unknown key\(s\) \['stpes'\]"),
])
def test_bad_settings_name_the_key(node, match):
    with pytest.raises(ValueError, match=match):
        SamplingOptions.of(node, key="cb.sampler")


def test_steps_offset_cannot_pass_the_last_timestep():
    schedule = NoiseSchedule.make("scaled_linear")
    assert make_timesteps(schedule, 500, "leading", steps_offset=1)[0] == 999
    with pytest.raises(ValueError, match="reach timestep 1000, past the schedule's last one"):
        SamplingOptions(steps=1000, steps_offset=1).timesteps(schedule)


def test_record_lists_what_applies():
    assert SamplingOptions(name="euler", steps=3).record() == {
        "sampler": "euler", "steps": 3, "spacing": "leading", "steps_offset": 0, "karras": False}
    assert SamplingOptions(spacing="trailing").record()["steps_offset"] is None
    assert torch.equal(SamplingOptions(steps=4, steps_offset=1).timesteps(NoiseSchedule.make("linear")),
                       torch.tensor([751.0, 501.0, 251.0, 1.0], dtype=torch.float64))
