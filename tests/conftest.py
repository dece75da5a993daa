"""Shared test setup: CPU-only, quiet DeepSpeed, torchvision shim before any library import."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import mindeye_dist  # noqa: E402,F401  (applies the torchvision shim)

from tests.s3_server import s3_auth_enforced, s3_bucket, s3_server  # noqa: E402,F401  (S3 fixtures for data tests)
