"""Multi-node DDP shown on one machine: 2 "nodes" x 1 CPU rank (gloo) on localhost, started through torchrun
(`--nnodes 2 --node-rank`) and through the SLURM variables Lightning reads, training the tiny model with
`trainer=ddp_multinode`. Every rank ends with the same weights, each epoch is split disjointly, only global rank 0
writes run files; a node killed mid-run makes the other stop (no hang) and a restart resumes exactly."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.helpers.training import TINY_MODEL, assert_same_run, final_weights, logged_losses

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
N = 16  # images: 8 per rank and epoch, 2 steps of 4

pytestmark = pytest.mark.slow  # each run starts 2 processes of train.py (~30-60 s on 2 shared cores)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(run: Path, cache: Path, *extra: str, steps: int = 4) -> list[str]:
    tiny = [o for o in TINY_MODEL if not o.startswith(("trainer.max_steps", "trainer.val_check_interval",
                                                       "trainer.limit_val_batches", "++data.latent_cache"))]
    return [*tiny, "trainer=ddp_multinode", "trainer.accelerator=cpu", "trainer.precision=32", "trainer.devices=1",
            "trainer.num_nodes=2", "trainer.strategy.timeout.seconds=60", f"trainer.max_steps={steps}",
            "trainer.val_check_interval=null", "trainer.limit_val_batches=0", f"data.train.size={N}",
            "data.val.resolution=16", f"data.latent_cache={cache / 'latents'}", "data.latent_cache_part_size=4",
            f"paths.run_dir={run}", f"paths.cache_dir={cache}", "trainer.deterministic=true",
            "+logger.csv.flush_logs_every_n_steps=1", *extra]


def env(**more) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONHASHSEED": "0", **more}


def torchrun_node(rank: int, port: int, args: list[str], out: Path, *launcher: str) -> subprocess.Popen:
    cmd = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank), "--master-addr",
           "127.0.0.1", "--master-port", str(port), *launcher, "train.py", *args,
           f"hydra.run.dir={out.parent / f'hydra-node{rank}'}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=open(out, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(procs, timeout=300) -> None:
    with killed_on_failure(procs):
        for proc in procs:
            assert proc.wait(timeout=timeout) == 0, Path(proc.args[-1].split("=", 1)[1]).parent


@contextmanager
def killed_on_failure(agents):
    """A failed or timed-out check kills every node still running (agents and their ranks): nothing outlives the
    test, and a hang can only cost the test's timeouts."""
    try:
        yield
    except BaseException:
        for agent in agents:
            if agent.poll() is None:
                lose_node(agent)
        raise


def lose_node(agent: subprocess.Popen) -> None:
    """Node 1 is lost: its torchrun agent and its ranks, which torchrun starts in sessions of their own (killing
    the agent's process group alone leaves the rank training on, an orphan)."""
    ranks = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    try:
        os.killpg(agent.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in ranks:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait()


def record(out: Path) -> list[str]:
    return ["+callbacks.seen._target_=tests.helpers.training.RecordSeen", f"+callbacks.seen.out={out}"]


def check_ranks(out: Path, steps: int) -> None:
    """Identical weights on both ranks; every epoch split disjointly between them."""
    seen = [json.loads((out / f"seen{r}.json").read_text()) for r in (0, 1)]
    per_epoch = N // 2
    assert len(seen[0]) == len(seen[1]) == steps * 4
    for e in range(steps * 4 // per_epoch):
        epoch = seen[0][e * per_epoch:(e + 1) * per_epoch] + seen[1][e * per_epoch:(e + 1) * per_epoch]
        assert sorted(epoch) == list(range(N)), f"epoch {e}: each sample on exactly one rank"
    a, b = (torch.load(out / f"unet{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a), "the ranks' weights differ"


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_two_nodes_through_torchrun(tmp_path):
    cache, port = tmp_path / "cache", free_port()
    runs = [tmp_path / "run-node0", tmp_path / "run-node1"]  # each node told its own run folder: node 1 writes none
    procs = [torchrun_node(r, port, overrides(runs[r], cache, *record(tmp_path)), tmp_path / f"node{r}.txt")
             for r in (0, 1)]
    finish(procs)
    check_ranks(tmp_path, steps=4)
    assert "metrics.csv" in files(runs[0]) and "config.yaml" in files(runs[0])
    assert files(runs[1]) == [], "only global rank 0 writes run files"
    latents = [p for p in (cache / "latents").iterdir() if p.is_dir()]
    assert len(latents) == 1 and len(list(latents[0].glob("part-*/manifest.json"))) == N // 4, \
        "the cache is built once, in parts of 4 shared out between the nodes"


def test_two_nodes_cache_every_webdataset_shard(tmp_path):
    """data=webdataset with the latent cache on 2 torchrun nodes: the cache holds every shard, one part each, built
    by whichever rank claimed it (before: the stream was one part, and the rank that built it read only its own
    split of the shards, urls[rank::2]: half the data). Which rank encodes which shard is a race here; that the
    ranks split the work is tests/data/test_shared_cache_build.py's."""
    from tests.helpers.data import write_green_shards

    shards, per_shard = 4, 4
    urls = write_green_shards(tmp_path / "shards", shards=shards, per_shard=per_shard)
    cache, port = tmp_path / "cache", free_port()
    args = [o for o in overrides(tmp_path / "run", cache, steps=2)
            if not o.startswith(("data.train.size=", "data.val.resolution="))]
    args += ["data=webdataset", f"data.train.urls='{urls}'", "data.num_workers=0", "data.train.shuffle_buffer=0"]
    finish([torchrun_node(r, port, args, tmp_path / f"node{r}.txt") for r in (0, 1)])
    parts = sorted(p for p in (cache / "latents").glob("*/part-*") if p.is_dir())
    assert [len(json.loads((p / "rows.json").read_text())) for p in parts] == [per_shard] * shards
    assert all(json.loads((p / "manifest.json").read_text())["complete"] for p in parts)
    logs = "".join((tmp_path / f"node{r}.txt").read_text() for r in (0, 1))
    assert logs.count(f"of {shards} once with the frozen VAE") == shards, "every shard encoded once"


def test_two_nodes_through_slurm_variables(tmp_path):
    """What `srun --nodes 2 --ntasks-per-node 1 python train.py ...` sets; Lightning's SLURMEnvironment reads it."""
    cache, port = tmp_path / "cache", free_port()
    procs = []
    for r in (0, 1):
        slurm = dict(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="2", SLURM_PROCID=str(r),
                     SLURM_LOCALID="0", SLURM_NODEID=str(r), SLURM_JOB_NAME="ldm-train", SLURM_JOB_ID="4242",
                     SLURM_NODELIST="127.0.0.1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "train.py", *overrides(tmp_path / f"run-node{r}", cache, *record(tmp_path)),
               f"hydra.run.dir={tmp_path / f'hydra-node{r}'}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(**slurm), stdout=open(tmp_path / f"node{r}.txt", "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    finish(procs)
    check_ranks(tmp_path, steps=4)
    assert files(tmp_path / "run-node1") == [], "only global rank 0 writes run files"


STEPS, EVERY = 24, 5  # the killed runs: a checkpoint every 5 steps, enough steps left after the kill point
CKPT = ["+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints", "+callbacks.checkpoint.save_last=true",
        "+callbacks.checkpoint.save_top_k=-1", f"+callbacks.checkpoint.every_n_train_steps={EVERY}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, latent cache folder) of the 2-node run the killed runs must equal."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    port, run, cache = free_port(), tmp / "reference", tmp / "cache"
    finish([torchrun_node(r, port, overrides(run, cache, *CKPT, steps=STEPS), tmp / f"ref{r}.txt") for r in (0, 1)])
    return run, cache


def wait_past_checkpoint(run: Path, procs, timeout: float = 300) -> None:
    """Until step EVERY + 1 is logged: the first checkpoint is written and training went on past it."""
    deadline = time.monotonic() + timeout
    while not any(s >= EVERY + 1 for s, _ in logged_losses(run)) if (run / "metrics.csv").exists() else True:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run must be training"
        time.sleep(0.05)


def test_a_killed_node_stops_the_other_and_a_restart_resumes_exactly(tmp_path, uninterrupted):
    reference, cache = uninterrupted
    steps = STEPS
    run, port = tmp_path / "killed", free_port()  # one run folder, as on a shared file system
    args = overrides(run, cache, *CKPT, "ckpt_path=auto", steps=steps)
    procs = [torchrun_node(r, port, args, tmp_path / f"killed{r}.txt") for r in (0, 1)]
    with killed_on_failure(procs):
        wait_past_checkpoint(run, procs)
    lose_node(procs[1])
    try:
        code = procs[0].wait(timeout=120)
    except subprocess.TimeoutExpired:
        lose_node(procs[0])
        pytest.fail("node 0 hung after node 1 died")
    assert code != 0
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 0 < saved < steps

    port = free_port()  # the same command on both nodes again: ckpt_path=auto resumes the last checkpoint
    finish([torchrun_node(r, port, args, tmp_path / f"resumed{r}.txt") for r in (0, 1)])
    assert f"resuming {run / 'checkpoints' / 'last.ckpt'}" in (tmp_path / "resumed0.txt").read_text()
    assert_same_run(reference, run)


def elastic_node(name: str, port: int, args: list[str], out: Path) -> subprocess.Popen:
    """A torchrun agent that restarts its node's rank once (`--max-restarts 1`); the agents meet at a c10d
    rendezvous (the first to start hosts its store), which hands out the node ranks."""
    cmd = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
           f"127.0.0.1:{port}", "--rdzv-id", "ldm-test", "--max-restarts", "1", "train.py", *args,
           f"hydra.run.dir={out.parent / f'hydra-{name}'}"]
    # a fresh store for every round: torch's default (the agents' rendezvous store, shared with the ranks) keeps
    # the last round's gloo addresses, and a restarted group then hangs in init_process_group (pytorch#135712)
    return subprocess.Popen(cmd, cwd=ROOT, env=env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"), stdout=open(out, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def rank_of(agent: subprocess.Popen) -> int:
    """The pid of the agent's rank (train.py): the process `kill -9` hits when a worker dies."""
    for pid in subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split():
        if "train.py" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return int(pid)
    raise AssertionError(f"agent {agent.pid} has no train.py rank")


def test_torchrun_max_restarts_restarts_the_group_after_a_kill_and_resumes_exactly(tmp_path, uninterrupted):
    """kill -9 of one node's rank mid-run: the other rank's next collective fails at once (gloo sees the socket
    close) and it exits; both agents restart their rank (--max-restarts 1) and meet again at the rendezvous; the
    new group's `ckpt_path=auto` finds last.ckpt and resumes from it, ending with the uninterrupted run's weights."""
    reference, cache = uninterrupted
    run, port = tmp_path / "killed", free_port()
    args = overrides(run, cache, *CKPT, "ckpt_path=auto", steps=STEPS)
    agents = [elastic_node(name, port, args, tmp_path / f"{name}.txt") for name in ("a", "b")]
    with killed_on_failure(agents):
        wait_past_checkpoint(run, agents)
        os.kill(rank_of(agents[1]), signal.SIGKILL)
    finish(agents, timeout=300)  # both agents end with 0: the restarted group finished the run

    logs = [(tmp_path / f"{name}.txt").read_text() for name in ("a", "b")]
    assert "failed (exitcode: -9)" in logs[1], "node b's agent saw its rank killed"
    assert sum(f"resuming {run / 'checkpoints' / 'last.ckpt'}" in log for log in logs) == 2, \
        "both restarted ranks resumed the last checkpoint (the first start had none to resume)"
    assert_same_run(reference, run)
    a, b = final_weights(reference), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's weights are not the uninterrupted run's"
