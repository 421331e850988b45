""":class:`SamplingOptions`: every setting of a sampler run except the model, the prompts and the seed.

It is the ``sampler`` config node (``configs/sampler/*.yaml``) as one object, and it travels whole: sample.py,
the training callbacks (sample grids, prompt accuracy, metrics) and ``python -m ldm.evaluate`` all take the node
and hand it to the pipelines unchanged, so ``sampler=dpmpp_2m sampler.karras=true`` means the same everywhere.
The dataclass is also the config schema of that node (unknown keys are errors).

The math is in ``ldm.diffusion.samplers``; this file only says which option applies to which sampler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ldm.diffusion.flow import FlowMatching
from ldm.diffusion.samplers import SAMPLERS, TIMESTEP_SPACINGS, make_timesteps
from ldm.diffusion.schedules import NoiseSchedule

ETA_SAMPLERS = ("ddim",)
KARRAS_SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m")
FINAL_ALPHA_SAMPLERS = ("ddim",)
FLOW_SAMPLERS = ("flow_euler",)  # the samplers of flow-matching (velocity) models


@dataclass
class SamplingOptions:
    name: str = "ddim"  # ddpm | ddim | euler | euler_ancestral | dpmpp_2m | flow_euler (flow-matching models)
    steps: int = 50
    eta: float = 0.0  # ddim only: 0 deterministic, 1 = DDPM's variance
    karras: bool = False  # euler, euler_ancestral, dpmpp_2m: Karras et al. noise levels
    spacing: str = "leading"  # leading | trailing | linspace (Lin et al. 2023, Table 2)
    steps_offset: int = 0  # leading only: added to every timestep (Stable Diffusion / diffusers / A1111: 1)
    final_alpha_one: bool = True  # ddim only: the last step goes to abar = 1; false: to abar_0 (SD's setting)

    @classmethod
    def of(cls, value: Any, key: str = "sampler") -> "SamplingOptions":
        """A checked copy of ``value``: SamplingOptions, a sampler name, or a config node / mapping with the keys
        above (missing keys take the defaults). Errors name ``key`` (the config key of the node)."""
        if isinstance(value, SamplingOptions):
            options = dataclasses.replace(value)
        elif isinstance(value, str):
            options = cls(name=value)
        elif isinstance(value, Mapping) or hasattr(value, "items"):  # dict or omegaconf DictConfig
            items = dict(value.items())
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(items) - fields)
            if unknown:
                raise ValueError(f"{key}: unknown key(s) {unknown}; a sampler takes {sorted(fields)}")
            options = cls(**items)
        else:
            raise ValueError(f"{key} must be a sampler name or a sampler config node (configs/sampler/), got "
                             f"{type(value).__name__}")
        return options.check(key)

    def replace(self, **changes: Any) -> "SamplingOptions":
        """A checked copy with ``changes``; a change of None keeps the field."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None}).check()

    def check(self, key: str = "sampler") -> "SamplingOptions":
        """Raise ValueError naming ``key.<field>`` for a setting that is wrong or does not apply to the sampler."""
        if self.name not in SAMPLERS:
            raise ValueError(f"{key}.name: unknown sampler {self.name!r}; choose one of {sorted(SAMPLERS)}")
        if int(self.steps) < 1:
            raise ValueError(f"{key}.steps must be >= 1, got {self.steps}")
        if self.spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"{key}.spacing: unknown timestep spacing {self.spacing!r}; choose one of "
                             f"{TIMESTEP_SPACINGS}")
        if self.eta and self.name not in ETA_SAMPLERS:
            raise ValueError(f"{key}.eta: eta={self.eta} only applies to the {ETA_SAMPLERS} sampler(s), not "
                             f"{self.name!r}; set eta=0")
        if self.eta < 0:
            raise ValueError(f"{key}.eta must be >= 0, got {self.eta}")
        if self.karras and self.name not in KARRAS_SAMPLERS:
            raise ValueError(f"{key}.karras: karras=True only applies to the {KARRAS_SAMPLERS} samplers, not "
                             f"{self.name!r}")
        if not self.final_alpha_one and self.name not in FINAL_ALPHA_SAMPLERS:
            raise ValueError(f"{key}.final_alpha_one: false only applies to the {FINAL_ALPHA_SAMPLERS} sampler(s), "
                             f"not {self.name!r}")
        if int(self.steps_offset) < 0:
            raise ValueError(f"{key}.steps_offset must be >= 0, got {self.steps_offset}")
        if self.steps_offset and self.spacing != "leading":
            raise ValueError(f"{key}.steps_offset={self.steps_offset} only applies to leading spacing, not "
                             f"{self.spacing!r}; set steps_offset=0")
        return self

    def timesteps(self, schedule: NoiseSchedule, latent_size: tuple[int, int] | None = None) -> Tensor:
        """The descending inference timesteps of this run (``ldm.diffusion.samplers.make_timesteps``; for a
        flow-matching model its shifted sigmas times T, ``FlowMatching.inference_timesteps``, shifted by the
        latent's token count with ``schedule.dynamic_shift``: the sampling pipelines pass ``latent_size``, the
        config checks that only count steps do not)."""
        is_flow = isinstance(schedule, FlowMatching)
        if is_flow != (self.name in FLOW_SAMPLERS):
            need = f"one of {FLOW_SAMPLERS}" if is_flow else f"not {self.name!r} (it samples flow-matching models)"
            raise ValueError(f"sampler.name: this model was trained with "
                             f"{'flow matching' if is_flow else 'a noise schedule'}: use {need}")
        if is_flow:
            seq = None
            if schedule.dynamic_shift:
                seq = schedule.seq_len(latent_size) if latent_size else schedule.base_seq_len
            return schedule.inference_timesteps(int(self.steps), seq)
        return make_timesteps(schedule, int(self.steps), self.spacing, int(self.steps_offset))

    def sampler_kwargs(self) -> dict:
        """The keyword options the sampler function takes (those that apply to it)."""
        opts: dict = {}
        if self.name in ETA_SAMPLERS:
            opts["eta"] = float(self.eta)
        if self.name in KARRAS_SAMPLERS:
            opts["karras"] = bool(self.karras)
        if self.name in FINAL_ALPHA_SAMPLERS:
            opts["final_alpha_one"] = bool(self.final_alpha_one)
        return opts

    def record(self) -> dict:
        """The settings that apply to this sampler, for PNG text chunks and result files."""
        return {"sampler": self.name, "steps": int(self.steps), "spacing": self.spacing,
                "steps_offset": int(self.steps_offset) if self.spacing == "leading" else None,
                **self.sampler_kwargs()}
