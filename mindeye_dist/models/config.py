"""Model configuration: one dataclass for the whole MindEye composition, filled from a preset.

Owned by the models package; ``mindeye_dist.config.ExperimentConfig.model`` is this class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Named preset (see mindeye_dist.models.presets); explicit fields below override it."""
    arch: Optional[Literal["mindeye1", "mindeye2"]] = None
    """Backbone layout: MindEye1 (input Linear-LN-GELU-Dropout, residual Linear blocks) or
    MindEye2 (per-subject adapter, residual LN-Linear-GELU-Dropout-Linear blocks); null = preset's."""
    hidden_dim: Optional[int] = None
    """Backbone width; null = preset's."""
    n_blocks: Optional[int] = None
    """Residual blocks in the backbone; null = preset's."""
    n_voxels: Optional[int] = None
    """Input voxels (single subject); null = from the dataset's meta.json."""
    n_tokens: Optional[int] = None
    """Target tokens; null = from the dataset's meta.json."""
    token_dim: Optional[int] = None
    """Target token dimension; null = from the dataset's meta.json."""
