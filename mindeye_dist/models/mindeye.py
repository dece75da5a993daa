"""MindEye: backbone + retrieval projector (+ diffusion prior) (+ low-level head).

``model(voxels, subject)`` returns a :class:`MindEyeOutput`; the trainer computes the prior's
loss itself with ``model.prior.loss(out.backbone, clip_targets)`` (the prior is a submodule, so
ZeRO and the optimizer see its parameters, but its loss needs the targets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from mindeye_dist.models.backbone import Backbone
from mindeye_dist.models.config import ModelConfig
from mindeye_dist.models.lowlevel import LowLevelHead
from mindeye_dist.models.resolve import check_resolved, resolve_model_config
from mindeye_dist.models.prior import DiffusionPrior, LayerNorm, PriorNetwork
from mindeye_dist.models.projector import Projector
from mindeye_dist.models.ridge_skip import RidgeSkip, combine
from mindeye_dist.models.subjects import SubjectAdapters, SubjectIds, adapter_key_subject

COMPONENTS = ("backbone", "projector", "prior", "lowlevel")
"""Top-level submodules; parameter counts and FLOPs are reported per component."""


@dataclass
class MindEyeOutput:
    backbone: torch.Tensor
    """(B, T, D) backbone tokens: the prior's condition."""
    projector: torch.Tensor
    """(B, T, D) retrieval-submodule output for the contrastive loss and retrieval."""
    lowlevel: Optional[torch.Tensor] = None
    """(B, C, H, W) predicted VAE latent, when the model has a low-level head."""
    lowlevel_features: Optional[torch.Tensor] = None
    """(B, h*w, F) low-level feature tokens for the auxiliary contrastive loss."""


def build_prior(cfg: ModelConfig) -> DiffusionPrior:
    net = PriorNetwork(n_tokens=cfg.n_tokens, dim=cfg.token_dim, depth=cfg.prior_depth, heads=cfg.prior_heads,
                       dim_head=cfg.prior_dim_head, ff_mult=cfg.prior_ff_mult, dropout=cfg.prior_dropout,
                       activation_checkpointing=bool(cfg.activation_checkpointing))
    return DiffusionPrior(net, timesteps=cfg.prior_timesteps, cond_drop_prob=cfg.prior_cond_drop_prob,
                          target_scale=cfg.prior_target_scale)


class MindEye(nn.Module):
    def __init__(self, cfg: ModelConfig):
        """``cfg`` must be resolved (see :func:`build_model`)."""
        super().__init__()
        check_resolved(cfg)
        self.config = cfg
        self.backbone = Backbone(cfg)
        self.projector = Projector(cfg.token_dim, cfg.projector_hidden_dim)
        self.ridge_skip = None
        if cfg.ridge_skip_rank:
            self.ridge_skip = RidgeSkip(cfg.input_voxels(), cfg.n_tokens, cfg.token_dim, cfg.ridge_skip_rank)
        self.prior = build_prior(cfg) if cfg.prior else None
        self.lowlevel = LowLevelHead(cfg) if cfg.lowlevel else None

    def subject_index(self, name: str) -> int:
        """Index of subject ``name`` in this model's subject table (what ``subject`` ids mean)."""
        return self.config.subject_names().index(name)

    def no_weight_decay_names(self) -> set[str]:
        """See :func:`no_weight_decay_names` (the optimizer's parameter groups ask the model)."""
        return no_weight_decay_names(self)

    def forward(self, voxels: torch.Tensor, subject: SubjectIds = None) -> MindEyeOutput:
        """voxels: (B, max_voxels), zero-padded past each subject's count; subject: an int for the
        whole batch or (B,) ids indexing the subject table (ignored by a single-subject model)."""
        hidden = self.backbone.hidden(voxels, subject)  # (B, h)
        tokens = self.backbone.tokens(hidden)  # (B, T, D)
        projected = self.projector(tokens)
        if self.ridge_skip is not None and not self.training:
            # stacked with ridge at the validation-chosen blend (training trains the MLP alone)
            projected = combine(projected, self.ridge_skip(voxels), self.ridge_skip.blend)
        out = MindEyeOutput(backbone=tokens, projector=projected)
        if self.lowlevel is not None:
            source = voxels if self.lowlevel.from_voxels else hidden
            out.lowlevel, out.lowlevel_features = self.lowlevel(source, subject)
        return out


def build_model(cfg: ModelConfig, *, n_voxels: Optional[int] = None, n_tokens: Optional[int] = None,
                token_dim: Optional[int] = None, lowlevel_shape: Optional[list[int] | tuple[int, ...]] = None,
                subjects: Optional[dict[str, int]] = None, nominal: bool = False) -> MindEye:
    """Resolve preset < explicit fields against the dataset's dims and build the model.

    Dims given here come from the dataset's meta.json; a preset or explicit value that
    disagrees is a ConfigError naming both. Build under ``torch.device("meta")`` to count
    without allocating.
    """
    resolved = resolve_model_config(cfg, n_voxels=n_voxels, n_tokens=n_tokens, token_dim=token_dim,
                                    lowlevel_shape=lowlevel_shape, subjects=subjects, nominal=nominal)
    return MindEye(resolved)


def load_with_new_subjects(state_dict: Mapping[str, torch.Tensor], subjects: dict[str, int], cfg: ModelConfig,
                           **dims: Any) -> MindEye:
    """A model for the subject table ``subjects`` with every weight of ``state_dict`` except the
    adapters of subjects it lacks, which start fresh (MindEye2's fine-tune of a multi-subject
    checkpoint on a held-out subject). Adapters of subjects not in the new table are dropped.

    ``cfg`` is the checkpointed model's config; ``dims`` go to :func:`build_model`. Anything
    else missing, unexpected or of the wrong shape is an error.
    """
    new_cfg = dataclasses.replace(cfg, subjects=dict(subjects), n_voxels=None)
    model = build_model(new_cfg, **dims)
    prefixes = [name for name, module in model.named_modules() if isinstance(module, SubjectAdapters)]
    kept = {k: v for k, v in state_dict.items()
            if adapter_key_subject(k, prefixes) is None or adapter_key_subject(k, prefixes) in subjects}
    result = model.load_state_dict(kept, strict=False)
    unexpected = list(result.unexpected_keys)
    not_adapters = [k for k in result.missing_keys if adapter_key_subject(k, prefixes) is None]
    if unexpected or not_adapters:
        raise KeyError(f"checkpoint does not match the model apart from subject adapters: "
                       f"missing {not_adapters[:5]}, unexpected {unexpected[:5]}")
    return model


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, LayerNorm, nn.Embedding)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameter names that get no weight decay: biases, norm gains, embeddings, the prior's
    learned queries and null embeddings, and attention null K/V. Subject adapters' weights do
    decay (MindEye2's "ridge")."""
    names = set()
    for module_name, module in model.named_modules():
        skip = set(getattr(module, "_no_weight_decay", ()))
        for name, _ in module.named_parameters(recurse=False):
            if name == "bias" or name in skip or isinstance(module, _NORMS):
                names.add(f"{module_name}.{name}" if module_name else name)
    # GroupNorms inside diffusers' Decoder are nn.GroupNorm; its attention norms too.
    return names


def component_parameters(model: MindEye) -> dict[str, int]:
    """Parameter count per component (absent components count 0) and the total."""
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters()) if getattr(model, name) is not None
              else 0 for name in COMPONENTS}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
