import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def shared_data(relative: str) -> Path:
    """A file under ../shared/data: skipped when absent locally, a failure under CI=true."""
    path = SHARED_DATA / relative
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs {path}, which is missing")
        pytest.skip(f"{path} not present")
    return path
