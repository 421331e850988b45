"""The session fixture that keeps the checkout clean (tests/conftest.py) sees what a stray test would leave: a
changed tracked file, a new file in a new folder, a run folder that .gitignore hides; not the __pycache__ that
importing makes."""

import shutil
import subprocess

import pytest

from tests.helpers.checkout import changes, checkout_state

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / ".gitignore").write_text("outputs/\n__pycache__/\n")
    (root / "train.py").write_text("print('train')\n")
    subprocess.run(["git", "add", "."], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init"], cwd=root,
                   check=True)
    return root


def test_what_a_stray_test_leaves_is_seen(repo):
    before = checkout_state(repo)
    assert before == []
    (repo / "__pycache__").mkdir()
    (repo / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"")
    assert checkout_state(repo) == before  # importing is not writing
    (repo / "train.py").write_text("print('changed')\n")
    (repo / "runs" / "x").mkdir(parents=True)
    (repo / "runs" / "x" / "lora.safetensors").write_bytes(b"")
    (repo / "outputs" / "train").mkdir(parents=True)
    after = checkout_state(repo)
    assert after == [" M train.py", "!! outputs/", "?? runs/x/lora.safetensors"]
    message = changes(before, after)
    assert "new:  ?? runs/x/lora.safetensors" in message and "new:  !! outputs/" in message


def test_outside_a_checkout_there_is_nothing_to_compare(tmp_path):
    if subprocess.run(["git", "rev-parse"], cwd=tmp_path, capture_output=True).returncode == 0:
        pytest.skip("the temporary folder is inside a git checkout")
    assert checkout_state(tmp_path) is None
