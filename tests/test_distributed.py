"""Several processes under torchrun (gloo on the CPU): shards, one checkpoint, the same
result as one process with the global batch, and a stop agreed by every rank."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_image_folder
from helpers.core.device import seed_everything
from helpers.model import checkpoint
from helpers.model.classifier import build_model
from helpers.serve import prediction

TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason=f"no torchrun at {TORCHRUN}")
# Exact conditions: a frozen backbone (batch norm frozen too), no dropout, no augmentation,
# and 12 training images = one global batch of 2 x 6, so one process with batch 12 sees the
# same images in every step. DDP averages the two shards' gradients: the same as one process
# on the whole batch, up to the order of float sums.
EXACT = ["--arch", "test_efficientnet", "--recipe", "course", "--hidden_units", "8",
         "--dropout", "0", "--no_augment", "--learning_rate", "0.01", "--seed", "3"]
EPOCHS = 12
TOLERANCE = 1e-5  # measured on a CPU: 4.5e-8 after 12 Adam steps (printed by the test)
# Records which training images each rank loads (helpers.data.folders' own folder class, patched
# in this process only), then runs train.py's command line.
PROBE = """
import os, sys
from pathlib import Path
from helpers.cli import main
from helpers.data import folders

seen = open(Path(os.environ["SEEN_DIR"]) / f"rank{os.environ.get('RANK', '0')}.txt", "a")
original = folders.PhotoFolder.__getitem__

def getitem(self, index):
    if Path(self.root).name == "train":
        print(Path(self.samples[index][0]).relative_to(self.root), file=seen, flush=True)
    return original(self, index)

folders.PhotoFolder.__getitem__ = getitem
sys.exit(main(["train", *sys.argv[1:]], prog="train.py"))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The data, a probe script, and how to run it with one process or with torchrun."""
    root = tmp_path_factory.mktemp("ddp")
    folder = make_image_folder(root / "flowers", ["1", "2", "3"], per_class=4)
    probe = root / "probe.py"
    probe.write_text(PROBE)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "FLOWERS_CACHE": str(root / "cache"), "SEEN_DIR": str(root)}

    def command(out: Path, *extra: str, processes: int = 2, batch: int = 6) -> list[str]:
        launcher = ([str(TORCHRUN), "--standalone", f"--nproc_per_node={processes}"]
                    if processes > 1 else [sys.executable])
        return [*launcher, str(probe), str(folder), "--save_dir", str(out), *EXACT,
                "--batch_size", str(batch), "--epochs", str(EPOCHS), *extra]

    return root, folder, env, command


@pytest.fixture(scope="module")
def reference(runs):
    """An uninterrupted run of 2 processes of batch 6, and one of 1 process of batch 12."""
    root, _, env, command = runs
    seen = {}
    for name, processes, batch in (("ddp", 2, 6), ("single", 1, 12)):
        for old in root.glob("rank*.txt"):
            old.unlink()
        done = subprocess.run(command(root / name, processes=processes, batch=batch), env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        seen[name] = {p.stem: p.read_text().split() for p in root.glob("rank*.txt")}
        seen[name + " log"] = done.stdout
    return seen


def _last_weights(out: Path) -> dict[str, torch.Tensor]:
    return checkpoint.read_resume(out / "last.pth")["model"]


@pytest.mark.slow
def test_two_ranks_train_on_different_shards_and_write_one_checkpoint(runs, reference):
    root, folder, _, _ = runs
    log = reference["ddp log"]
    assert "distributed: world size 2, backend gloo" in log
    assert log.count("train 1/") == 1  # rank 0 alone logs
    ranks = reference["ddp"]
    assert set(ranks) == {"rank0", "rank1"}
    images = {str(p.relative_to(folder / "train")) for p in (folder / "train").rglob("*.jpg")}
    for epoch in range(EPOCHS):  # each epoch: two disjoint halves that make up the train set
        shard0 = set(ranks["rank0"][6 * epoch: 6 * epoch + 6])
        shard1 = set(ranks["rank1"][6 * epoch: 6 * epoch + 6])
        assert len(shard0) == len(shard1) == 6 and not shard0 & shard1
        assert shard0 | shard1 == images
    assert len(ranks["rank0"]) == len(ranks["rank1"]) == 6 * EPOCHS
    written = sorted(p.name for p in (root / "ddp").iterdir())
    assert written == sorted(p.name for p in (root / "single").iterdir())
    assert written.count("checkpoint.pth") == 1
    model, _ = checkpoint.load_checkpoint(root / "ddp" / "checkpoint.pth")
    result = prediction.predict(next((folder / "test").rglob("*.jpg")), model, topk=3)
    assert sorted(result.names) == ["1", "2", "3"] and abs(sum(result.probs) - 1) < 1e-4


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_global_batch(runs, reference):
    root, *_ = runs
    ddp, single = _last_weights(root / "ddp"), _last_weights(root / "single")
    assert ddp.keys() == single.keys()  # plain keys: the DDP wrapper is never saved
    head = [k for k in ddp if k.startswith("head.")]
    assert all(ddp[k].shape == single[k].shape for k in ddp)
    # the known verdict's buffers are empty while training (fitted after it): no difference
    differences = {k: (ddp[k] - single[k]).abs().max().item() if ddp[k].numel() else 0.0
                   for k in ddp}
    print(f"largest difference of a head weight: {max(differences[k] for k in head):.2e}")
    assert max(differences.values()) <= TOLERANCE, differences
    assert all(differences[k] == 0 for k in ddp if k not in head)  # the frozen backbone
    seed_everything(3)  # the head it started from: training moved it far beyond the tolerance
    start = build_model("test_efficientnet", {"1": 0, "2": 1, "3": 2}, hidden_units=8,
                        dropout=0.0).state_dict()
    assert max((ddp[k] - start[k]).abs().max().item() for k in head) > 1000 * TOLERANCE


def _rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    """The process id of one rank among torchrun's children (its RANK variable tells)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text()
        for pid in children.split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} never started")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_and_resuming_gives_the_same_weights(runs, reference):
    root, folder, env, command = runs
    out = root / "stopped"
    launcher = subprocess.Popen(command(out), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    rank1 = _rank_pid(launcher, 1)
    deadline = time.time() + 120
    while not (out / "last.pth").is_file() and time.time() < deadline:
        time.sleep(0.02)  # the first epoch is saved: training is under way
    os.kill(rank1, signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)  # no hang: both ranks leave
    assert launcher.returncode == 1  # torchrun's status when a process failed
    ranks, report = err.split("failed (exitcode: 130)", 1)  # the ranks' lines, then torchrun's
    assert "error: stopped by SIGTERM" in ranks  # rank 1, which got the signal
    assert "error: stopped by another process" in ranks  # rank 0, which agreed to stop
    assert "Traceback" not in ranks and "--resume" in ranks
    # The first rank to leave leaves with 130; torchrun then sends SIGTERM to any rank still
    # closing down (a race on a loaded machine), so the other shows 130 or -15, nothing else.
    codes = re.findall(r"exitcode\s*: (-?\d+)", report)
    assert len(codes) == 2 and "130" in codes and set(codes) <= {"130", "-15"}, report
    assert "Root Cause" in report and report.split("Root Cause", 1)[1].count(": 130") == 1
    state = checkpoint.read_resume(out / "last.pth")
    assert 1 <= state["epoch"] < EPOCHS
    resume = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(root / "probe.py"),
              str(folder), "--save_dir", str(out), "--resume", str(out / "last.pth")]
    resumed = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # the saved settings, none typed
    expected = _last_weights(root / "ddp")
    got = _last_weights(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_the_cached_recipe_runs_on_rank_0_and_the_others_leave(runs):
    root, folder, env, _ = runs
    out = root / "cached"
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2",
                           str(ROOT / "train.py"), str(folder), "--save_dir", str(out),
                           "--arch", "test_efficientnet", "--recipe", "cached", "--epochs", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the cached recipe runs on one process" in done.stdout
    assert done.stdout.count("checkpoint: ") == 1 and (out / "checkpoint.pth").is_file()


@pytest.mark.slow
def test_a_killed_rank_leaves_the_other_one_line_that_resumes(runs):
    """SIGKILL one rank mid-training: the other says in one line that its peer stopped and
    how to resume, leaves promptly (torchrun's SIGKILL comes 30 s after its SIGTERM), and the
    printed command resumes the run."""
    root, folder, env, _ = runs
    out = root / "killed"
    launcher = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node=2",
                                 "train.py", str(folder), "--save_dir", str(out), *EXACT,
                                 "--batch_size", "6", "--epochs", str(EPOCHS)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    rank0 = _rank_pid(launcher, 0)  # rank 1 survives: it never waits as the root of a send
    deadline = time.time() + 120
    while not (out / "last.pth").is_file() and time.time() < deadline:
        time.sleep(0.02)  # the first epoch is saved: training is under way
    os.kill(rank0, signal.SIGKILL)
    killed = time.time()
    log, err = launcher.communicate(timeout=120)
    print(f"torchrun ended {time.time() - killed:.1f} s after the kill; "
          f"{len((log + err).splitlines())} lines in all")
    assert time.time() - killed < 25
    assert launcher.returncode == 1  # torchrun's status when a process failed
    ranks, report = err.split("failed (exitcode:", 1)  # the ranks' lines, then torchrun's
    own = [line for line in ranks.splitlines() if not re.match(r"[WEI]\d{4} ", line)]
    assert "Traceback" not in ranks and len(own) == 1, ranks
    line = own[0]
    assert line.startswith("error: another process of the run stopped"), line
    assert line.endswith(f"--resume {out / 'last.pth'}") and "resume with: " in line, line
    assert sorted(re.findall(r"exitcode\s*: (-?\d+)", report)) == ["-9", "130"], report
    assert len((log + err).splitlines()) < 70
    state = checkpoint.read_resume(out / "last.pth")
    assert 1 <= state["epoch"] < EPOCHS
    again = shlex.split(line.split("resume with: ", 1)[1])
    again[0] = {"python": sys.executable, "torchrun": str(TORCHRUN)}[again[0]]
    resumed = subprocess.run(again, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint.read_resume(out / "last.pth")["epoch"] == EPOCHS
    assert (out / "checkpoint.pth").is_file()


def test_what_counts_as_a_lost_process_and_how_long_collectives_wait(monkeypatch):
    from helpers.core.distributed import collective_timeout, lost_peer, relaunch
    from helpers.core.errors import UserError

    gone = "[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:36545: Connection reset by peer"
    assert lost_peer(RuntimeError(gone)) and lost_peer(torch.distributed.DistBackendError("x"))
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not lost_peer(RuntimeError("DataLoader timed out after 5 seconds"))  # not a peer
    monkeypatch.setenv("FLOWERS_DIST_TIMEOUT", "42")
    assert collective_timeout() == 42
    monkeypatch.setenv("FLOWERS_DIST_TIMEOUT", "soon")
    with pytest.raises(UserError, match="FLOWERS_DIST_TIMEOUT"):
        collective_timeout()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert relaunch("python train.py d --save_dir s") == "python train.py d --save_dir s"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (relaunch("python train.py d --save_dir s")
            == "torchrun --standalone --nproc_per_node=2 train.py d --save_dir s")
