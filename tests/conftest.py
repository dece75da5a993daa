"""Shared test setup: CPU-only, quiet DeepSpeed, torchvision shim before any library import."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import mindeye_dist  # noqa: E402,F401  (applies the torchvision shim)

from tests.s3_server import s3_auth_enforced, s3_bucket, s3_server  # noqa: E402,F401  (S3 fixtures for data tests)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: without it they are reported as skipped, with the reason."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU host: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
