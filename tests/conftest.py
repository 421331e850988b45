import sys
from pathlib import Path

# make `import ldm` work without installing the package (plain `pytest` from any directory)
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest (and robust on shared CPUs). A test module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    """Tests write into tmp_path, never into the checkout: `git status` (untracked and ignored files included) is
    the same after the whole session, runs and exports included, as before it. Nothing is checked outside a git
    checkout."""
    from tests.helpers.checkout import changes, checkout_state

    before = checkout_state(Path(ROOT))
    yield
    after = checkout_state(Path(ROOT)) if before is not None else None
    assert after == before, ("the tests changed the checkout (a test wrote outside tmp_path, or files were edited "
                             f"while the tests ran):\n{changes(before, after or [])}")
