"""Shared test setup: CPU-only, quiet DeepSpeed, torchvision shim before any library import."""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import mindeye_dist  # noqa: E402,F401  (applies the torchvision shim)

from tests.s3_server import s3_auth_enforced, s3_bucket, s3_server  # noqa: E402,F401  (S3 fixtures for data tests)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """``tiny_dataset(seed)`` -> the url of the built-in ``tiny`` synthetic dataset drawn with that
    seed, built once per session and shared by every module that asks for it: read-only (a test
    that damages data copies it first)."""
    built: dict[int, str] = {}

    def get(seed: int) -> str:
        if seed not in built:
            from mindeye_dist.data import build_synthetic_dataset

            out = tmp_path_factory.mktemp(f"tiny_seed{seed}") / "tiny"
            build_synthetic_dataset("tiny", str(out), seed=seed, progress=False)
            built[seed] = str(out)
        return built[seed]

    return get


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: without it they are reported as skipped, with the reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU host: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
