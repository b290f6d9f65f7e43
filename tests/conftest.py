import os
from pathlib import Path

import pytest
import torch

from utils.datasets import D4RL_KITCHEN_FILES, EMBEDDED_D4RL_DIR

# Two cores: one torch thread per process avoids oversubscription with env subprocesses and parallel test workers.
torch.set_num_threads(1)

# The D4RL files: $D4RL_DATASET_DIR (a relative path is taken from the repo root, as .ci/run sets it), else
# ../shared/data/d4rl. Made absolute once, so that loaders in this process and scripts run as subprocesses agree.
REPO_ROOT = Path(__file__).resolve().parents[1]
_folder = Path(os.environ.get("D4RL_DATASET_DIR", REPO_ROOT.parent / "shared" / "data" / "d4rl"))
os.environ["D4RL_DATASET_DIR"] = str(_folder if _folder.is_absolute() else (REPO_ROOT / _folder).resolve())


@pytest.fixture(scope="session")
def real_complete_file() -> Path:
    """The real D4RL kitchen-complete-v0 file: the one in D4RL_DATASET_DIR, else the copy shipped in utils/data."""
    name = D4RL_KITCHEN_FILES["Kitchen-Complete-v0"][0]
    path = Path(os.environ["D4RL_DATASET_DIR"]) / name
    return path if path.is_file() else EMBEDDED_D4RL_DIR / name


@pytest.fixture(scope="session", autouse=True)
def two_goals_demo_dir(tmp_path_factory) -> Path:
    """TwoGoals-v0's generated demonstrations go to a temporary folder, for this process and the scripts it starts."""
    folder = tmp_path_factory.mktemp("two_goals_demos")
    os.environ["TWO_GOALS_DEMO_DIR"] = str(folder)
    return folder
