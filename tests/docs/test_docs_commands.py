"""Every command the README, docs/ and bench/README.md show is run by this test (litgpt tests its README).

Each command is checked: `python train.py ...` is composed by Hydra and passes the checks train(cfg) makes before
it builds anything; sample.py, ldm.evaluate, ldm.export, the cache and bench commands go through their own configs
and parsers; pip installs name the pin and the extras the project has. The files a command reads must be there:
placeholders (/path/to/images, <model>, outputs/train/<time>, ...) become small local stand-ins
(tests/helpers/docs_data.py). A few representative commands run for real with overrides that make them tiny; every
other command that can run on a CPU runs too under `-m slow`."""

import pytest

from tests.helpers.docs_commands import DOCS, Checks, Command, all_commands, commands_in, program
from tests.helpers.docs_data import DocsData

pytestmark = pytest.mark.usefixtures("one_thread")

COMMANDS = all_commands()
# run for real (tiny) in every test run: one of each program the docs teach first
REAL = {
    "python train.py data=folder data.train.root=/path/to/images data.train.resolution=32",
    "python sample.py 'ckpt=outputs/train/<time>/checkpoints/last.ckpt' 'prompt=a green square on a white "
    "background' n_images=4",
    "python -m ldm.export '<checkpoint>' --format ldm --out my-bundle",
}
# checked, never run here: full-size models (SD 1.5, SDXL base), GPUs, stages of many steps, resuming the stand-in
# (and a LoRA extract: the stand-ins of a base and its fine-tune are the same tiny model, nothing to extract)
# trainer=fsdp2 with trainer.devices=2: Lightning starts the second rank by running this process's command line again
# (pytest's, here); it runs as train.py in tests/training/test_fsdp2_train.py
NOT_RUN = ("model=sd15", "model=sdxl ", "experiment=sd15_finetune", "experiment=sdxl_finetune", "trainer=ddp",
           "experiment=sd3_finetune", "model=flux_dev", "trainer=fsdp2",
           "hparams_search=", "experiment=own_data", "experiment=shapes_vae", "ckpt_path=last", "ldm.lora extract")


@pytest.fixture(scope="session")
def docs(tmp_path_factory):
    return DocsData(tmp_path_factory.mktemp("docs-data"))


@pytest.fixture
def checks(docs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs (samples/, my-bundle, ...) land here
    return Checks(docs, tmp_path)


def command(text: str, doc: str = "test") -> Command:
    found = commands_in(doc, f"```bash\n{text}\n```\n")
    assert len(found) == 1
    return found[0]


def test_the_docs_are_read():
    assert {"README.md", "docs/README.md", "docs/own-data.md", "bench/README.md"} <= set(DOCS)
    read = {c.doc for c in COMMANDS}
    assert {"README.md", "docs/own-data.md", "docs/sampling.md", "docs/adapters.md"} <= read
    assert {c.text for c in COMMANDS} >= REAL, "a command that runs for real is no longer in the docs"


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_command_is_checked(cmd, checks):
    checks.check(cmd)


@pytest.mark.parametrize("text", sorted(REAL))
def test_representative_command_runs(text, checks):
    checks.run(next(c for c in COMMANDS if c.text == text))


RUNNABLE = [c for c in COMMANDS
            if program(c.argv) in ("train", "sample", "export", "evaluate", "lora", "latent_cache")
            and c.text not in REAL and not any(word in " ".join(c.argv) + " " for word in NOT_RUN)]


@pytest.mark.slow
@pytest.mark.parametrize("cmd", RUNNABLE, ids=[c.id for c in RUNNABLE])
def test_command_runs(cmd, checks):
    checks.run(cmd)


def test_blocks_continuations_and_compound_lines_are_read():
    text = ("text\n```python\npython train.py not_a_shell_block=1\n```\n"
            "```console\n$ python train.py a=1 \\\n    b=2   # a comment\n```\n"
            "```bash\npip install -e . && python -m pytest\n```\n")
    found = commands_in("x.md", text)
    assert [(c.line, c.argv) for c in found] == [
        (6, ("python", "train.py", "a=1", "b=2")), (10, ("pip", "install", "-e", ".")),
        (10, ("python", "-m", "pytest"))]


@pytest.mark.parametrize("text, match", [
    ("python train.py data=folder data.train.roo=/path/to/images", "data.train.roo"),           # a misspelt key
    ("python train.py schedule=zero_snr", "schedule/zero_snr"),                                # no such option
    ('python train.py data=folder data.train.root=/path/to/images data.train.captions.prefix="sks,"',
     "mismatched input"),                                                                      # a bare comma
    ("python train.py data=folder data.train.root=/path/to/nowhere", "/path/to/nowhere is not there"),
    ("python train.py data=folder", "data.train.root is not set"),                             # left ???
    ("python train.py optim.lr=-1", "optim.lr must be a positive number"),                     # refused by the run
    ("python train.py model=sd15", "model.pretrained is not set"),                             # no weights given
    ("python sample.py ckpt=<model> promt=a", "promt"),                                        # a misspelt key
    ("python sample.py ckpt=<model> prompt=a init_image=picture.png", "picture.png is not there"),
    ("python -m ldm.export <checkpoint> --formt ldm --out x", "do not parse"),                 # a misspelt option
    ("python -m ldm.export missing.ckpt --format ldm --out x", "missing.ckpt is not there"),
    ("python -m ldm.evaluate <checkpoint> n=0", "n must be >= 1"),                             # refused by evaluate
    ("python bench/own_data.py --nn 3", "do not parse"),                                       # no such option
    ('pip install -e ".[devv]"', r"no extra \[devv\]"),
    ("pip install torch==2.0.0", "not the torch .ci/run installs"),
    ("cd somewhere", "no check for `cd somewhere`"),                                           # unknown command
])
def test_a_broken_command_fails(text, match, checks):
    with pytest.raises(Exception, match=match):
        checks.check(command(text))
