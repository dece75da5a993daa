"""mindeye_dist: distributed large-scale training of MindEye (fMRI voxels -> CLIP image space)."""

from mindeye_dist.compat import ensure_torchvision_importable

# Must run before anything imports open_clip, timm or diffusers (they import torchvision).
ensure_torchvision_importable()

__version__ = "0.1.0"
