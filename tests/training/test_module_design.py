"""The shape of the training core (issue 26): LatentDiffusion is Algorithm 1 holding one trained part and never
asks which kind it is; each kind of trained part follows the one protocol; functions stay readable."""

import ast
import inspect
from pathlib import Path

import pytest

from ldm.training.module import diffusion_module
from ldm.training.module.trained import ADAPTERS
from ldm.training.module.trained.base import TrainedPart
from ldm.training.module.trained.denoiser import WholeDenoiser
from ldm.training.module.trained.denoiser_and_text_encoder import DenoiserAndTextEncoder

LDM = Path(__file__).resolve().parents[2] / "ldm"
PARTS = [WholeDenoiser, DenoiserAndTextEncoder, *ADAPTERS.values()]
KIND_WORDS = ("lora", "textual_inversion", "adapter_config", "LoRA", "TextualInversion", "trains_text_encoder")


def test_the_module_never_asks_which_kind_of_part_it_holds():
    source = Path(diffusion_module.__file__).read_text(encoding="utf-8")
    assert len(source.splitlines()) <= 300
    tree = ast.parse(source)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    asked = sorted(n for n in names if any(w in n for w in KIND_WORDS))
    assert not asked, f"LatentDiffusion names kinds of trained part: {asked}"
    isinstance_calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") in
                        ("isinstance", "type")]
    assert not isinstance_calls


@pytest.mark.parametrize("part", PARTS, ids=lambda p: p.__name__)
def test_every_part_follows_the_protocol(part):
    members = {n for n, _ in inspect.getmembers(TrainedPart) if not n.startswith("_")}
    members |= set(TrainedPart.__annotations__)
    missing = sorted(m for m in members if not hasattr(part, m))
    assert not missing, f"{part.__name__} lacks {missing}"
    for name in members & {n for n, v in inspect.getmembers(TrainedPart) if inspect.isfunction(v)}:
        ours, protocol = inspect.signature(getattr(part, name)), inspect.signature(getattr(TrainedPart, name))
        assert list(ours.parameters) == list(protocol.parameters), f"{part.__name__}.{name}{ours} vs {protocol}"


def test_no_function_in_ldm_is_longer_than_80_lines():
    long = []
    for path in sorted(LDM.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(LDM.parent)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "\n".join(long)
