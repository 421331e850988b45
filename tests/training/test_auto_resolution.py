"""data.train.resolution=auto (data=folder / hf / webdataset): from scratch, the images' median short side capped by
the machine (64 px on a CPU) and rounded to what the model downsamples by; with a pretrained model, 256; a side
given is kept. The plain command on a folder of 64-128 px photos no longer trains at 256 px for hours."""

import pytest
from PIL import Image

from ldm.training.run import auto_defaults
from ldm.training.run.auto_defaults import choose_resolution, image_sides
from tests.helpers.training import compose_train


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Photos of several sizes with .txt captions, one broken file."""
    root = tmp_path_factory.mktemp("mixed")
    for i, size in enumerate([(96, 64), (64, 96), (128, 96), (80, 60), (72, 72), (200, 150)] * 2):
        Image.new("RGB", size, (40 * (i % 6), 90, 200)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a picture {i}")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not an image")
    (root / "broken.txt").write_text("broken")
    return root


def cfg_for(tmp_path, root, *extra):
    return compose_train(tmp_path, ["data=folder", f"data.train.root={root}", *extra])


def test_the_folder_default_is_auto(tmp_path, mixed):
    assert cfg_for(tmp_path, mixed).data.train.resolution == "auto"


def test_image_sides_are_read_from_the_headers(tmp_path, mixed):
    sides = image_sides(cfg_for(tmp_path, mixed))
    assert sorted(sides) == sorted([64, 64, 96, 60, 72, 150] * 2)  # short sides; the broken file is left out


@pytest.mark.parametrize("sides, cuda, expected", [
    ([64, 64, 96, 60, 72, 150], False, 64),  # median 68 -> capped at 64 on a CPU
    ([32] * 10, False, 32),                   # small images: their own side
    ([45] * 10, False, 40),                   # rounded down to a multiple of the model's 8 (VAE 4 x U-Net 2)
    ([20] * 10, False, 32),                   # never below 32
    ([], False, 64),                          # sizes unknown (a stream): the cap
    ([512] * 10, True, 256),                  # a GPU: up to 256 from scratch
    ([100] * 10, True, 96),
])
def test_from_scratch_the_side_follows_the_images_and_the_machine(tmp_path, mixed, sides, cuda, expected):
    cfg = cfg_for(tmp_path, mixed)
    assert auto_defaults.downsampling(cfg) == 8
    line = choose_resolution(cfg, sides=lambda c: sides, cuda=lambda c: cuda)
    assert cfg.data.train.resolution == expected
    assert line.startswith(f"resolution: {expected} px") and "data.train.resolution=N" in line


def test_a_pretrained_model_or_a_given_side_is_kept(tmp_path, mixed):
    cfg = cfg_for(tmp_path, mixed, "+model.pretrained=some.ckpt")
    assert "pretrained" in choose_resolution(cfg, sides=lambda c: pytest.fail("not read"))
    assert cfg.data.train.resolution == auto_defaults.PRETRAINED_SIDE
    given = cfg_for(tmp_path, mixed, "data.train.resolution=48")
    assert choose_resolution(given, sides=lambda c: pytest.fail("not read")) is None
    assert given.data.train.resolution == 48


def test_the_plain_command_says_and_trains_at_the_chosen_side(tmp_path, mixed):
    """train(cfg) on the folder with no resolution given: the side is chosen, said, and what the run trains at."""
    from ldm.training.run.train import train

    cfg = cfg_for(tmp_path, mixed, "trainer.max_steps=2", "data.batch_size=4", "data.num_workers=0",
                  "model.autoencoder.weights=builtin:shapes_vae", "first_stage=null", "callbacks=none",
                  "trainer.limit_val_batches=0", "data.val_fraction=0")
    result = train(cfg)
    assert result["global_step"] == 2
    assert cfg.data.train.resolution == 64


@pytest.mark.parametrize("resolution, model, expected", [
    (64, [], 16),                 # the shapes model (VAE x4, U-Net x4) at 64 px: 16 px steps, several buckets
    (64, ["model.unet._target_=some.Net"], 64),  # a network it does not know: SD's 64, as before auto
    (32, ["model.unet._target_=some.Net"], 32),  # ... or the resolution (a multiple of the model's) below 64
    (128, [], 16),                # 128 / 8
    (512, ["model=sd15"], 64),    # SD at 512 px: kohya's 64
    (256, ["model=sd15"], 64),    # SD's downsampling (64) is the least step
])
def test_bucket_step_auto_follows_the_resolution_and_the_model(tmp_path, mixed, resolution, model, expected):
    from ldm.data.buckets import BucketSettings, bucket_table

    cfg = cfg_for(tmp_path, mixed, *model, f"data.train.resolution={resolution}", "data.train.buckets.enabled=true",
                  "model.autoencoder.weights=null")  # as after the first-stage choice: the VAE's preset decides
    assert cfg.data.train.buckets.step == "auto"
    line = auto_defaults.choose_bucket_step(cfg)
    assert cfg.data.train.buckets.step == expected and f"step {expected} px" in line
    step, low, high = BucketSettings(step=expected).resolved(resolution)
    assert len(bucket_table(resolution, step, low, high)) > 1 or expected > resolution // 8  # buckets that do something
    given = cfg_for(tmp_path, mixed, "data.train.resolution=64", "data.train.buckets.step=32")
    assert auto_defaults.choose_bucket_step(given) is None and given.data.train.buckets.step == 32
