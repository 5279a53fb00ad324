import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# tests/ on the path, so that tests here and in tests/conformance and tests/robustness import the shared model zoo
# (tests/model_zoo.py) by name. pytest's default import mode puts it there too; this holds under any mode.
TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
