"""Optional-dependency probes, done once.

Import never fails because of an optional package; *use* fails through :func:`require`, which
names the package and the extra that installs it (STYLE #13).
"""

from __future__ import annotations

import functools
import importlib
import sys

_TORCHVISION_LIB = None  # keeps the op-schema fragment alive for the life of the process


def ensure_torchvision_importable() -> bool:
    """Make ``import torchvision`` work on CPU torch when only a CUDA torchvision is installed.

    On the CPU machines the only torchvision that resolves against torch 2.13.0 is a CUDA build
    whose C++ library cannot load; its Python side then dies registering fake kernels for
    ``torchvision::nms`` (``RuntimeError: operator torchvision::nms does not exist``), which
    breaks open_clip, timm and diffusers' AutoencoderKL. Defining the two op schemas lets the
    pure-Python parts import; the C++ ops (nms, roi_align, image decode) stay unusable and
    MindEye needs none of them. A no-op where torchvision imports normally (GPU hosts) or is
    absent. Returns True when the shim was applied.
    """
    global _TORCHVISION_LIB
    if _TORCHVISION_LIB is not None:
        return True
    try:
        import torchvision  # noqa: F401
        return False
    except ImportError:
        return False
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    _TORCHVISION_LIB = torch.library.Library("torchvision", "FRAGMENT")
    _TORCHVISION_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401

    return True


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed."""


@functools.cache
def available(module: str) -> bool:
    """True if ``module`` imports (probed once per process)."""
    try:
        importlib.import_module(module)
        return True
    except Exception:  # a broken install counts as absent, loudly at use time
        return False


def require(module: str, extra: str | None = None, purpose: str = "") -> object:
    """Import ``module`` or raise a :class:`MissingDependency` that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        how = f"pip install -c constraints.txt 'mindeye_dist[{extra}]'" if extra else f"pip install -c constraints.txt {module}"
        why = f" for {purpose}" if purpose else ""
        raise MissingDependency(f"{module} is needed{why} but could not be imported ({err}). Install it with: {how}") from err
