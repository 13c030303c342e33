import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the tests' shared module, helpers.py


@pytest.fixture(autouse=True, scope="session")
def _glyphs_cache(tmp_path_factory):
    """One Glyphs image cache for the session and the processes it starts, not the user's."""
    os.environ["FASTADAPT_CACHE"] = str(tmp_path_factory.mktemp("fastadapt-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
