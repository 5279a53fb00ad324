import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*layer drop.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
