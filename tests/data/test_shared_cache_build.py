"""Several processes build one latent cache (ldm.data.auto_cache + ldm.data.cache_claims): every DDP rank, or
independent runs on one folder, each encode a disjoint share (whole parts they claim); the cache they leave is the
one a single process builds, byte for byte; a process killed mid-build leaves only whole parts and shards, and the
next run finishes what it left."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldm.data import cache_claims
from ldm.data.auto_cache import cache_spec, sync_cache
from ldm.data.image_folder import ImageFolderDataset
from tests.helpers.data import CountingEncoder

REPO = Path(__file__).resolve().parents[2]
N = 12  # images; with part_size=2: 6 parts


def write_folder(root, images, n=N):
    for i in range(n):
        images.save(root / f"{i:03d}.png", size=(8, 8), color=(20 * i, 100, 200 - 10 * i))
        (root / f"{i:03d}.txt").write_text(f"image {i}")


def one_process_build(root, folder):
    enc = CountingEncoder()
    view = sync_cache(folder, cache_spec(ImageFolderDataset(root, resolution=8)), enc, batch_size=2,
                      progress=False, sample=False, part_size=2)
    assert enc.images == N == view.encoded
    return view


def contents(folder: Path) -> dict:
    """Every file of the cache's parts as bytes (a manifest without its creation time), claims and temporaries
    excluded: what a reader of the cache sees."""
    out = {}
    for path in sorted(folder.glob("part-*/*")):
        if path.name == "claim" or path.name.endswith(".tmp"):
            continue
        data = path.read_bytes()
        if path.name == "manifest.json":
            manifest = json.loads(data)
            manifest.pop("created")
            data = json.dumps(manifest, sort_keys=True).encode()
        out[str(path.relative_to(folder))] = data
    return out


def builder(root, folder, *extra, **env_vars):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env_vars}
    return subprocess.Popen([sys.executable, "-m", "tests.helpers.cache_builder", str(root), str(folder), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_split_the_work_and_leave_the_one_process_cache(tmp_path, images):
    root = tmp_path / "images"
    write_folder(root, images)
    one_process_build(root, tmp_path / "alone")
    go = tmp_path / "go"
    procs = [builder(root, tmp_path / "shared", "--sleep", "0.3", "--go", str(go)) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    encoded = [r["encoded"] for r in results]
    assert sum(encoded) == N, f"every image encoded once across the processes, got {encoded}"
    assert all(e > 0 for e in encoded), f"both processes took a share, got {encoded}"
    assert contents(tmp_path / "shared") == contents(tmp_path / "alone"), "byte for byte the one-process cache"
    assert not list((tmp_path / "shared").glob("part-*/claim")) and not (tmp_path / "shared" / "plan.lock").exists()
    again = CountingEncoder()
    view = sync_cache(tmp_path / "shared", cache_spec(ImageFolderDataset(root, resolution=8)), again,
                      progress=False, sample=False, part_size=2)
    assert again.calls == 0 and len(view) == N, "reused the same way as a one-process cache"


def test_a_killed_build_leaves_whole_parts_and_is_finished_next_time(tmp_path, images):
    root, folder = tmp_path / "images", tmp_path / "shared"
    write_folder(root, images)
    one_process_build(root, tmp_path / "alone")
    proc = builder(root, folder, "--sleep", "0.4")
    deadline = time.monotonic() + 60
    while not any(json.loads(m.read_text()).get("complete") for m in folder.glob("part-*/manifest.json")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts = sorted(folder.glob("part-*"))
    assert len(parts) == N // 2, "the whole plan was laid out before encoding began"
    done = [p for p in parts if (p / "manifest.json").exists() and json.loads((p / "manifest.json").read_text())["complete"]]
    assert 0 < len(done) < len(parts)
    for part in parts:  # every shard a manifest lists is whole
        if (part / "manifest.json").exists():
            for shard in json.loads((part / "manifest.json").read_text())["shards"]:
                assert (part / shard["file"]).stat().st_size == shard["bytes"]

    enc = CountingEncoder()  # the next run (same host, the killed pid is gone): takes over the stale claim
    view = sync_cache(folder, cache_spec(ImageFolderDataset(root, resolution=8)), enc, batch_size=2,
                      progress=False, sample=False, part_size=2, poll_seconds=0.05)
    assert enc.images == view.encoded <= N - 2 * len(done), "finished parts are not encoded again"
    assert contents(folder) == contents(tmp_path / "alone")


def test_claims(tmp_path):
    path = tmp_path / "claim"
    mine = cache_claims.try_claim(path)
    assert mine is not None and cache_claims.try_claim(path) is None, "one holder at a time"
    assert not cache_claims.is_stale(path), "its holder (this process) runs"
    mine.release()
    assert not path.exists() and cache_claims.try_claim(path) is not None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "token": "x", "time": 0}))
    assert cache_claims.is_stale(path), "its holder on this host is gone"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "x", "time": 0}))
    assert not cache_claims.is_stale(path, stale_seconds=60), "another host's holder beat recently"
    os.utime(path, (time.time() - 120, time.time() - 120))
    assert cache_claims.is_stale(path, stale_seconds=60), "its heartbeat stopped"
    assert cache_claims.break_if_stale(path, stale_seconds=60) and not path.exists()


def test_a_held_lock_times_out_with_the_fix(tmp_path):
    (tmp_path / "plan.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": "x"}))
    with pytest.raises(TimeoutError, match="delete it if no run uses this folder"):
        with cache_claims.folder_lock(tmp_path, timeout=0.2):
            pass


def test_webdataset_shards_are_split_between_ranks_and_leave_the_one_process_cache(tmp_path):
    """data=webdataset under DDP: each rank (RANK / WORLD_SIZE set, as torchrun and Lightning set them) encodes
    whole shards it claims, all shards between them (before: the rank that claimed the stream read only its own
    split of the shards, urls[rank::world_size], and cached half the data)."""
    from ldm.data.webdataset import WebDatasetSource
    from tests.helpers.data import write_green_shards

    shards, per_shard = 4, 3
    urls = write_green_shards(tmp_path / "shards", shards=shards, per_shard=per_shard)
    spec = cache_spec(WebDatasetSource(urls, resolution=8, shuffle_buffer=0))
    enc = CountingEncoder()
    alone = sync_cache(tmp_path / "alone", spec, enc, batch_size=2, progress=False, sample=False)
    assert enc.images == alone.encoded == len(alone) == shards * per_shard
    assert len(list((tmp_path / "alone").glob("part-*/manifest.json"))) == shards, "one part per shard"

    go = tmp_path / "go"
    procs = [builder(urls, tmp_path / "shared", "--webdataset", "--sleep", "0.3", "--go", str(go), RANK=str(rank),
                     WORLD_SIZE="2", LOCAL_RANK=str(rank)) for rank in (0, 1)]
    time.sleep(0.5)
    go.touch()
    encoded = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        encoded.append(json.loads(out.strip().splitlines()[-1])["encoded"])
    assert sum(encoded) == shards * per_shard, f"every sample encoded once across the ranks, got {encoded}"
    assert all(e > 0 and e % per_shard == 0 for e in encoded), f"each rank encoded whole shards, got {encoded}"
    assert contents(tmp_path / "shared") == contents(tmp_path / "alone"), "byte for byte the one-process cache"
    assert not list((tmp_path / "shared").glob("*.claim")) and not (tmp_path / "shared" / "plan.lock").exists()
    again = CountingEncoder()
    view = sync_cache(tmp_path / "shared", spec, again, progress=False, sample=False)
    assert again.calls == 0 and len(view) == len(alone), "reused the same way as a one-process cache"
    assert [view[i]["caption"] for i in range(len(view))] == [alone[i]["caption"] for i in range(len(alone))]


def test_a_stream_part_is_encoded_by_the_process_that_claims_it(tmp_path, images):
    """A webdataset shard's part is built by one process: a live holder's claim makes the others wait (here:
    time out, naming what they waited for); a dead holder's claim is taken over."""
    import io
    import tarfile

    from ldm.data.webdataset import WebDatasetSource

    shard = tmp_path / "shard-0.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            for suffix, data in (("png", images.bytes(size=(8, 8), color=(9 * i, 0, 0))), ("txt", f"s{i}".encode())):
                info = tarfile.TarInfo(f"{i:04d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    spec = cache_spec(WebDatasetSource(str(shard), resolution=8, shuffle_buffer=0))
    folder = tmp_path / "cache"
    folder.mkdir()
    claim = folder / "part-00000.claim"
    claim.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": "x"}))
    enc = CountingEncoder()
    with pytest.raises(TimeoutError, match=r"the parts of shard\(s\) 1 of 1 not finished"):
        sync_cache(folder, spec, enc, progress=False, wait_seconds=0.3, poll_seconds=0.05)
    assert enc.calls == 0, "a live holder builds it: this process waits"

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "token": "x"}))
    view = sync_cache(folder, spec, enc, progress=False, poll_seconds=0.05)
    assert enc.images == 3 == view.encoded and len(view) == 3 and not claim.exists()
