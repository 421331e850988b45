"""Issue 15: runs that never lose anything. Each test reproduces one thing a hostile-but-realistic user broke,
at the level where the user hits it (train.py / sample.py on the command line where it matters)."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.training import TINY_MODEL, logged_losses

ROOT = Path(__file__).resolve().parents[2]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}


def train_cmd(outputs: Path, cache: Path, *extra: str) -> list[str]:
    """train.py on the tiny model with the default run folders (outputs/train/<paths.run_stamp>/)."""
    overrides = [o for o in TINY_MODEL if not o.startswith(("trainer.max_steps", "callbacks="))]
    return [sys.executable, "train.py", *overrides, f"paths.output_dir={outputs}", f"paths.cache_dir={cache}",
            "data.train.size=24", "trainer.val_check_interval=null", "trainer.limit_val_batches=0",
            "~callbacks.sampling", "~callbacks.prompt_accuracy", "callbacks.checkpoint.every_n_train_steps=2",
            "+logger.csv.flush_logs_every_n_steps=1", *extra]


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ---- item 2: run folders

def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    """paths.run_stamp without time fields: both runs ask for the very same folder name, as two runs started
    in the same second do with the default stamp."""
    outputs = tmp_path / "outputs"
    cmds = [train_cmd(outputs, tmp_path / "cache", "paths.run_stamp=same-second", f"trainer.max_steps={n}",
                      f"seed={n}") for n in (3, 4)]
    procs = [subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    runs = sorted(p.name for p in (outputs / "train").iterdir())
    assert runs == ["same-second", "same-second-1"]
    steps = sorted(len(logged_losses(outputs / "train" / r)) for r in runs)
    assert steps == [3, 4], "each folder holds one run's metrics, each step once"
    seeds = sorted((outputs / "train" / r / "config.yaml").read_text().count("seed: 3") for r in runs)
    assert seeds == [0, 1], "each folder has its own config.yaml"
    for r in runs:
        assert (outputs / "train" / r / "checkpoints" / "last.ckpt").exists()


def test_resume_leaves_no_stray_folder_and_no_versioned_duplicate(tmp_path):
    """A run 'killed' after writing step0000004.ckpt but before last.ckpt caught up (last.ckpt is step 2),
    resumed with ckpt_path=last: step 4 is written again under its own name, not as step0000004-v1.ckpt, and
    the resumed process's fresh Hydra folder is folded into the run (resume-1/), not left behind."""
    outputs, cache = tmp_path / "outputs", tmp_path / "cache"
    run_ok(train_cmd(outputs, cache, "paths.run_stamp=first", "trainer.max_steps=4"))
    ckpts = outputs / "train" / "first" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]
    (ckpts / "last.ckpt").write_bytes((ckpts / "step0000002.ckpt").read_bytes())
    out = run_ok(train_cmd(outputs, cache, "paths.run_stamp=second", "trainer.max_steps=6", "ckpt_path=last"))
    assert "resuming" in out.stdout
    assert sorted(p.name for p in (outputs / "train").iterdir()) == ["first"], "no folder left by the resume"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt",
                                                      "step0000006.ckpt"]
    kept = outputs / "train" / "first" / "resume-1"
    assert (kept / "hydra" / "config.yaml").exists() and (kept / "train.log").exists()


# ---- item 3: values that used to escape the up-front checks

@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test if train(cfg) gets as far as building a network or a datamodule."""
    import ldm.training.run.train as train_module

    def built(*args, **kwargs):
        raise AssertionError("something was built before the bad value was reported")

    for name in ("build_diffusion_module", "build_autoencoder_module", "build"):
        monkeypatch.setattr(train_module, name, built)


@pytest.mark.parametrize("override,key,valid", [
    ("data.train.resolution=40", "data.train.resolution", "multiple of 16 (e.g. 32 or 48)"),
    ("data.train.resolution=33", "data.train.resolution", "multiple of 16 (e.g. 32 or 48)"),
    ("data.val.resolution=8", "data.val.resolution", "multiple of 16"),
    ("optim.lr=-1", "optim.lr", "positive number"),
    ("optim.lr=abc", "optim.lr", "positive number"),
    ("optim.lr=0", "optim.lr", "positive number"),
    ("data.batch_size=abc", "data.batch_size", "positive integer"),
    ("data.batch_size=2.5", "data.batch_size", "positive integer"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval", "fraction of an epoch in (0, 1]"),
    ("trainer.val_check_interval=1.5", "trainer.val_check_interval", "fraction of an epoch in (0, 1]"),
])
def test_bad_value_is_refused_before_anything_is_built(tmp_path, nothing_built, override, key, valid):
    """The default model (shapes VAE x4, U-Net x4) with one bad value."""
    from tests.helpers.training import compose_train

    from ldm.training.run.train import ConfigError, train

    with pytest.raises(ConfigError) as err:
        train(compose_train(tmp_path, [override]))
    assert key in str(err.value) and valid in str(err.value)


@pytest.mark.parametrize("override", ["data.train.resolution=48", "data.train.resolution=[32,48]",
                                      "optim.lr=3e-4", "trainer.val_check_interval=0.5",
                                      "trainer.val_check_interval=null"])
def test_good_values_pass_the_checks(tmp_path, override):
    from tests.helpers.training import compose_train

    from ldm.training.run.config_checks import check_values

    check_values(compose_train(tmp_path, [override]))


def test_multiple_comes_from_the_model(tmp_path):
    """Not a hard-coded 16: the tiny model (VAE x2, U-Net x2) takes 20, pixel space with U-Net x4 takes 36."""
    from tests.helpers.training import compose_train

    from ldm.training.run.config_checks import ConfigError, check_values

    check_values(compose_train(tmp_path, [*TINY_MODEL, "data.train.resolution=20", "data.val.resolution=20"]))
    check_values(compose_train(tmp_path, ["model=pixel", "data.train.resolution=36", "data.val.resolution=36"]))
    with pytest.raises(ConfigError, match=r"multiple of 4 \(e.g. 32 or 36\)"):
        check_values(compose_train(tmp_path, ["model=pixel", "data.train.resolution=34"]))


def test_cli_names_the_resolution_key(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "data.train.resolution=40",
                           f"paths.output_dir={tmp_path / 'outputs'}", f"paths.cache_dir={tmp_path / 'cache'}"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "data.train.resolution=40" in proc.stderr and "multiple of 16" in proc.stderr
    assert not (tmp_path / "cache" / "latents").exists(), "nothing was encoded"


def _torch_file(path: Path) -> Path:
    import torch

    torch.save({"state_dict": {"w": torch.randn(256, 256)}, "global_step": 3}, path)
    return path


def test_truncated_ckpt_path_names_the_file(tmp_path, nothing_built):
    from tests.helpers.training import compose_train

    from ldm.formats.safe_load import CheckpointError
    from ldm.training.run.train import train

    ckpt = _torch_file(tmp_path / "step0000010.ckpt")
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{ckpt}.*truncated"):
        train(compose_train(tmp_path, [f"ckpt_path={ckpt}"]))


def test_unreadable_checkpoint_at_load_names_the_file(tmp_path):
    """A file that is a zip archive but not a checkpoint gets past the header check: the loader names it."""
    import zipfile

    from ldm.formats.safe_load import CheckpointError
    from ldm.training.run.resume import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
    with pytest.raises(CheckpointError, match=str(path)):
        AtomicCheckpointIO().load_checkpoint(path)


# ---- item 5: disk full during a checkpoint save

class _FullDisk:
    """A file whose device fills up after ``room`` bytes: write() raises OSError(ENOSPC) as the kernel's would."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.room:
            self.f.write(bytes(memoryview(data).cast("B")[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_during_save_names_the_file_and_keeps_last(tmp_path, monkeypatch):
    """train(cfg) with checkpoints every 2 steps; the disk fills up during the step-4 save."""
    import torch

    import ldm.training.run.resume as resume
    from tests.helpers.training import compose_train

    from ldm.training.run.train import train

    real_open, saves = open, []

    def filling_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            saves.append(Path(file))
            if "step0000004" in Path(file).name:
                return _FullDisk(f, room=4096)
        return f

    monkeypatch.setattr(resume, "open", filling_open, raising=False)
    cfg = compose_train(tmp_path, [*[o for o in TINY_MODEL if not o.startswith(("trainer.max_steps", "callbacks="))],
                                   "trainer.max_steps=6", "trainer.val_check_interval=null",
                                   "trainer.limit_val_batches=0", "~callbacks.sampling", "~callbacks.prompt_accuracy",
                                   "callbacks.checkpoint.every_n_train_steps=2"])
    ckpts = tmp_path / "run" / "checkpoints"
    with pytest.raises(OSError, match=f"no space left on device writing {ckpts / 'step0000004.ckpt'}") as err:
        train(cfg)
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000002.ckpt"], "no partial .tmp left"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 2, "the previous last.ckpt is kept"
    assert any(".step0000004.ckpt.tmp" == p.name for p in saves), "the save went through the atomic writer"


def test_stale_tmp_from_a_killed_save_is_removed_at_the_next_start(tmp_path):
    from tests.helpers.training import compose_train

    from ldm.training.run.train import train

    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / ".step0000002.ckpt.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    (ckpts / "notes.txt").write_text("not ours")
    train(compose_train(tmp_path, [*TINY_MODEL, "trainer.limit_val_batches=0", "trainer.val_check_interval=null",
                                   "+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                                   f"+callbacks.checkpoint.dirpath={ckpts}", "+callbacks.checkpoint.save_last=true"]))
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "notes.txt"]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only): a real ENOSPC from the kernel, without filling the real disk."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_real_full_tmpfs(tiny_tmpfs):
    import torch

    from ldm.training.run.resume import AtomicCheckpointIO

    io, last = AtomicCheckpointIO(), tiny_tmpfs / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(1000)}, last)
    with pytest.raises(OSError, match=f"no space left on device writing {last}"):
        io.save_checkpoint({"w": torch.randn(1000, 1000)}, last)  # 4 MB into 1 MiB
    assert [p.name for p in tiny_tmpfs.iterdir()] == ["last.ckpt"]
    torch.testing.assert_close(torch.load(last, weights_only=True)["w"], torch.ones(1000))


# ---- item 7: sample.py never overwrites, refuses an unwritable out_dir and a negative guidance scale

from tests.helpers.sample import config, model  # noqa: E402,F401 - the tiny single-file model fixture


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the bad out_dir / option was caught")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_second_sample_run_into_the_same_out_dir_is_refused(model, tmp_path, monkeypatch):
    import ldm.pipelines.cli as cli

    out = tmp_path / "samples"
    cli.sample(config(model, out, "prompt=a", "n_images=2"))
    before = _files(out)
    assert sorted(before) == ["00000.png", "00001.png", "grid.png"]
    monkeypatch.setattr(cli, "load_bundle", _no_model)
    with pytest.raises(cli.SampleConfigError, match=f"out_dir {out} already holds 3 image.*overwrite=true"):
        cli.sample(config(model, out, "prompt=b", "n_images=1"))
    assert _files(out) == before, "nothing was touched"


def test_overwrite_replaces_all_of_the_earlier_run(model, tmp_path):
    import ldm.pipelines.cli as cli

    out, fresh = tmp_path / "samples", tmp_path / "fresh"
    cli.sample(config(model, out, "prompt=a", "n_images=2"))
    (out / "notes.txt").write_text("mine")
    cli.sample(config(model, out, "prompt=b", "n_images=1", "overwrite=true"))
    cli.sample(config(model, fresh, "prompt=b", "n_images=1"))
    files = _files(out)
    assert sorted(files) == ["00000.png", "grid.png", "notes.txt"], "no old 00001.png mixed in; other files kept"
    assert {k: v for k, v in files.items() if k != "notes.txt"} == _files(fresh)


def test_sample_cli_refuses_the_second_run(model, tmp_path):
    import ldm.pipelines.cli as cli

    out = tmp_path / "samples"
    cli.sample(config(model, out, "prompt=a"))
    before = _files(out)
    ckpt, clip = model
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"ckpt={ckpt}", f"text_encoder={clip}",
                           "prompt=b", "sampler.steps=2", f"out_dir={out}"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "overwrite=true" in proc.stderr
    assert _files(out) == before


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write: a read-only tmpfs when root (root ignores permission bits), else 0o555."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                          capture_output=True).returncode != 0:
            pytest.skip("root, and cannot mount a read-only tmpfs")
        yield ro
        subprocess.run(["umount", str(ro)], check=True)
    else:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_unwritable_out_dir_is_refused_before_the_model_loads(model, tmp_path, monkeypatch, request, where):
    import ldm.pipelines.cli as cli

    if where == "under_a_file":
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "samples"
    else:
        out = request.getfixturevalue("read_only_dir") / "samples"
    monkeypatch.setattr(cli, "load_bundle", _no_model)
    with pytest.raises(cli.SampleConfigError, match=f"out_dir {out} is not writable"):
        cli.sample(config(model, out, "prompt=a"))


@pytest.mark.parametrize("scale", ["-1", "-0.5"])
def test_negative_guidance_scale_is_refused(model, tmp_path, monkeypatch, scale):
    import ldm.pipelines.cli as cli

    monkeypatch.setattr(cli, "load_bundle", _no_model)
    with pytest.raises(cli.SampleConfigError, match=f"guidance_scale must be a finite number >= 0.*got {scale}"):
        cli.sample(config(model, tmp_path / "out", "prompt=a", f"guidance_scale={scale}"))
    assert not (tmp_path / "out").exists()
