"""Released MindEye1 / MindEye2 checkpoints -> this package's models, written in the export format.

    python launchers/convert_checkpoint.py --format mindeye1 --src prior_257_final_subj01/last.pth \\
        [--lowlevel-src autoencoder_subj01_4x_locont_no_reconst/epoch120.pth] --out me1.safetensors
    python launchers/convert_checkpoint.py --format mindeye2 --src final_subj01_pretrained_40sess_24bs/last.pth \\
        --out me2.safetensors [--subject subj01]

The output loads with :func:`mindeye_dist.export.load_exported`. Source layouts, read from the
reference code (MedARC-AI/fMRI-reconstruction-NSD and MedARC-AI/MindEyeV2 ``src/models.py``, their
training scripts, dalle2-pytorch 1.14.2); files are ``torch.save({'model_state_dict': ...,
'optimizer_state_dict': ..., ...})`` or a bare state dict (``.pth``) or ``.safetensors``:

MindEye1 ``BrainDiffusionPrior`` (``last.pth``) and ``Voxel2StableDiffusionModel`` (``epoch120.pth``)::

    voxel2clip.lin0.0 / lin0.1       -> backbone.adapters.linears.<subject> / backbone.stem.0 (LN)
    voxel2clip.mlp.<k>.{0,1}         -> backbone.blocks.<k>.{0,1}
    voxel2clip.lin1                  -> backbone.to_tokens
    voxel2clip.projector.<i>         -> projector.<i>
    net.*                            -> prior.net.* (dalle2 prior, :data:`DALLE2_PRIOR_NET_RULES`)
    lin0.0 / lin0.1 (low-level)      -> lowlevel.adapters.linears.<subject> / lowlevel.trunk.0
    mlp.<k>.{0,1}                    -> lowlevel.trunk.<3+k>.{0,1}
    lin1 / norm / upsampler.* / maps_projector.<i> -> lowlevel.to_map / map_norm / decoder.* / features.<i>

MindEye2 ``MindEyeModule`` (``last.pth``)::

    ridge.linears.<i>                -> backbone.adapters.linears.<subject i>
    backbone.mixer_blocks1.<k>.{0, 1.0, 1.3} -> backbone.blocks.<k>.{0, 1, 4}
    backbone.mixer_blocks2.<k>.{0, 1.0, 1.3} -> backbone.token_mixers.<k>.{0, 1, 4}  (backbone_blocks=released)
    backbone.backbone_linear / clip_proj.<i> -> backbone.to_tokens / projector.<i>
    backbone.blin1 / bnorm / bupsampler.* / b_maps_projector.<i>
                                     -> lowlevel.to_map.0 / map_norm / decoder.* / features.<i>
    diffusion_prior.net.*            -> prior.net.*

Verified, then dropped (computed on the fly here): the prior's rotary ``freqs`` (one copy per
layer, rotary-embedding-torch's frozen Parameter) and dalle2's ``noise_scheduler.*`` tables.
diffusers < 0.15 named the decoder's mid-block attention ``query/key/value/proj_attn``
(MindEye1 used 0.13); those become ``to_q/to_k/to_v/to_out.0``. A MindEye2 checkpoint is
converted with ``backbone_blocks="released"``: its residual blocks never trained (see
``models/backbone.py``), so only the released computation reproduces it.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from mindeye_dist.models.config import ModelConfig
from mindeye_dist.models.presets import NSD_VOXELS

EXPORT_FORMAT = "mindeye_dist/1"  # the header mindeye_dist.export.load_exported accepts
FORMATS = ("mindeye1", "mindeye2")

Rule = tuple[str, str]
"""(reference key regex, our key template); the regex must match the whole key."""

DALLE2_PRIOR_NET_RULES: list[Rule] = [
    (r"learned_query", "learned_queries"),
    (r"(null_brain_embeds|null_image_embed)", r"\1"),
    # SinusoidalPosEmb has no parameters; MLP(dim, dim) is net.{0.0, 1.0, 2}: Linear-SiLU x2, Linear.
    (r"to_time_embeds\.0\.1\.net\.0\.0\.(weight|bias)", r"time_mlp.1.\1"),
    (r"to_time_embeds\.0\.1\.net\.1\.0\.(weight|bias)", r"time_mlp.3.\1"),
    (r"to_time_embeds\.0\.1\.net\.2\.(weight|bias)", r"time_mlp.5.\1"),
    (r"causal_transformer\.rel_pos_bias\.relative_attention_bias\.weight", "transformer.rel_pos_bias.embedding.weight"),
    (r"causal_transformer\.layers\.(\d+)\.0\.norm\.g", r"transformer.layers.\1.0.norm.weight"),
    (r"causal_transformer\.layers\.(\d+)\.0\.(null_kv|to_q\.weight|to_kv\.weight|to_out\.0\.weight)",
     r"transformer.layers.\1.0.\2"),
    (r"causal_transformer\.layers\.(\d+)\.0\.to_out\.1\.g", r"transformer.layers.\1.0.to_out.1.weight"),
    # FeedForward: LayerNorm, Linear, SwiGLU, Identity (no post-activation norm), Dropout, Linear.
    (r"causal_transformer\.layers\.(\d+)\.1\.0\.g", r"transformer.layers.\1.1.0.weight"),
    (r"causal_transformer\.layers\.(\d+)\.1\.1\.weight", r"transformer.layers.\1.1.1.weight"),
    (r"causal_transformer\.layers\.(\d+)\.1\.5\.weight", r"transformer.layers.\1.1.4.weight"),
    (r"causal_transformer\.norm\.g", "transformer.norm_out.weight"),
    (r"causal_transformer\.project_out\.weight", "transformer.project_out.weight"),
]
"""MindEye's dalle2-built prior network (``DiffusionPrior.net``) -> our :class:`PriorNetwork`."""

ROTARY_FREQS = r"causal_transformer\.layers\.\d+\.0\.rotary_emb\.freqs"

ME1_BACKBONE_RULES: list[Rule] = [
    (r"lin0\.1\.(weight|bias)", r"backbone.stem.0.\1"),
    (r"mlp\.(\d+)\.([01])\.(weight|bias)", r"backbone.blocks.\1.\2.\3"),
    (r"lin1\.(weight|bias)", r"backbone.to_tokens.\1"),
    (r"projector\.(\d+)\.(weight|bias)", r"projector.\1.\2"),
]

ME1_LOWLEVEL_RULES: list[Rule] = [
    (r"lin0\.1\.(weight|bias)", r"lowlevel.trunk.0.\1"),
    (r"lin1\.weight", "lowlevel.to_map.weight"),
    (r"norm\.(weight|bias)", r"lowlevel.map_norm.\1"),
    (r"upsampler\.(.+)", r"lowlevel.decoder.\1"),
    (r"maps_projector\.(\d+)\.(weight|bias)", r"lowlevel.features.\1.\2"),
]

ME2_RULES: list[Rule] = [
    (r"backbone\.mixer_blocks1\.(\d+)\.0\.(weight|bias)", r"backbone.blocks.\1.0.\2"),
    (r"backbone\.mixer_blocks1\.(\d+)\.1\.0\.(weight|bias)", r"backbone.blocks.\1.1.\2"),
    (r"backbone\.mixer_blocks1\.(\d+)\.1\.3\.(weight|bias)", r"backbone.blocks.\1.4.\2"),
    (r"backbone\.mixer_blocks2\.(\d+)\.0\.(weight|bias)", r"backbone.token_mixers.\1.0.\2"),
    (r"backbone\.mixer_blocks2\.(\d+)\.1\.0\.(weight|bias)", r"backbone.token_mixers.\1.1.\2"),
    (r"backbone\.mixer_blocks2\.(\d+)\.1\.3\.(weight|bias)", r"backbone.token_mixers.\1.4.\2"),
    (r"backbone\.backbone_linear\.(weight|bias)", r"backbone.to_tokens.\1"),
    (r"backbone\.clip_proj\.(\d+)\.(weight|bias)", r"projector.\1.\2"),
    (r"backbone\.blin1\.(weight|bias)", r"lowlevel.to_map.0.\1"),
    (r"backbone\.bnorm\.(weight|bias)", r"lowlevel.map_norm.\1"),
    (r"backbone\.bupsampler\.(.+)", r"lowlevel.decoder.\1"),
    (r"backbone\.b_maps_projector\.(\d+)\.(weight|bias)", r"lowlevel.features.\1.\2"),
]

_OLD_DIFFUSERS_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class ConversionError(ValueError):
    """A reference checkpoint does not match the layout it was declared to have."""


@dataclass
class Conversion:
    """A converted checkpoint: what :func:`write_export` writes."""

    model: ModelConfig
    """Model config (preset + every size read from the source) for the export metadata."""
    dims: dict
    """Dataset dims for the export metadata: n_voxels, n_tokens, token_dim, lowlevel_shape."""
    state_dict: dict[str, torch.Tensor]
    """Our parameter names -> the reference's tensors."""
    verified: list[str] = field(default_factory=list)
    """Reference keys checked against what this package computes, then dropped."""


# ---- loading ------------------------------------------------------------------------------


class _Inert:
    """Stands in for every non-allowlisted object a checkpoint pickles; runs none of their code."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def load_reference_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights of a reference checkpoint file, never executing code from it.

    ``.safetensors`` or a ``torch.save`` file holding a state dict or ``{'model_state_dict': ...}``.
    Loaded with ``weights_only=True``. MindEye's training checkpoints also pickle the LR
    scheduler's state, which in torch < 2.2 holds a bound method (OneCycleLR's ``anneal_func``)
    that weights-only loading refuses; then every such global is mapped to an inert placeholder
    (``torch.serialization.get_unsafe_globals_in_checkpoint`` + ``safe_globals``), so the
    tensors load and nothing from the file runs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            with torch.serialization.safe_globals([(_Inert, name) for name in names]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, ValueError, RuntimeError) as err:
            raise ConversionError(
                f"{path} could not be read without running code from it ({err}); if you trust the file, "
                "extract the weights once: python -c \"import torch; torch.save(torch.load('SRC', "
                "weights_only=False)['model_state_dict'], 'weights.pth')\" and convert weights.pth") from err
    except (RuntimeError, EOFError) as err:
        raise ConversionError(f"{path} is not a readable torch checkpoint: {err}") from err
    return _unwrap(obj, path)


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object."""
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ConversionError(f"{path} holds no state dict: expected {{name: tensor}} or {{'model_state_dict': "
                              f"...}}, found {keys}")
    # DataParallel / DDP wrappers prefix every key with "module.".
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


# ---- key mapping ----------------------------------------------------------------------------


def _apply(state: Mapping[str, torch.Tensor], rules: Sequence[Rule], out: dict, consumed: set,
           src_prefix: str = "", dst_prefix: str = "") -> None:
    """Rename every key of ``state`` under ``src_prefix`` that a rule matches into ``out``."""
    compiled = [(re.compile(re.escape(src_prefix) + pattern), template) for pattern, template in rules]
    for key, value in state.items():
        for regex, template in compiled:
            match = regex.fullmatch(key)
            if match:
                out[dst_prefix + match.expand(template)] = value
                consumed.add(key)
                break


def dalle2_prior_net_key(key: str) -> Optional[str]:
    """Our :class:`PriorNetwork` key for one key of MindEye's dalle2-built prior network (the
    ``DiffusionPrior.net`` state dict), or None where we have no such parameter (rotary ``freqs``)."""
    for pattern, template in DALLE2_PRIOR_NET_RULES:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(template)
    if re.fullmatch(ROTARY_FREQS, key):
        return None
    raise KeyError(f"{key!r} is not a key of MindEye's dalle2 prior network")


def prior_net_from_dalle2(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A dalle2 prior-network state dict (keys relative to ``net``) renamed for our PriorNetwork;
    rotary ``freqs`` are checked against ours and dropped. Unknown keys raise ConversionError."""
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    _apply(state, DALLE2_PRIOR_NET_RULES, out, consumed)
    consumed |= _check_rotary(state, "")
    _refuse_unconsumed(state, consumed, "", "MindEye's dalle2 prior network")
    return out


def _decoder_renames(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers < 0.15 mid-block attention names -> today's (same tensors, same math)."""
    pattern = re.compile(r"(.*\.mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)")
    renamed = {}
    for key, value in state.items():
        match = pattern.fullmatch(key)
        renamed[f"{match[1]}{_OLD_DIFFUSERS_ATTENTION[match[2]]}.{match[3]}" if match else key] = value
    return renamed


def _refuse_unconsumed(state: Mapping, consumed: set, prefix: str, what: str) -> None:
    left = sorted(k for k in state if k.startswith(prefix) and k not in consumed)
    if left:
        raise ConversionError(f"unexpected keys for {what}: {left[:12]}{' ...' if len(left) > 12 else ''} "
                              f"({len(left)} in all); is --format right for this file?")


# ---- verified drops -------------------------------------------------------------------------


def _check_rotary(state: Mapping[str, torch.Tensor], prefix: str) -> set[str]:
    """Rotary ``freqs`` keys under ``prefix``, after checking they equal the frequencies we compute."""
    from mindeye_dist.models.prior import rotary_inverse_frequencies

    keys = {k for k in state if re.fullmatch(re.escape(prefix) + ROTARY_FREQS, k)}
    for key in keys:
        freqs = state[key]
        if freqs.is_meta:
            continue
        expected = rotary_inverse_frequencies(2 * freqs.numel())
        if not torch.allclose(freqs.float(), expected, rtol=1e-6, atol=0):
            raise ConversionError(f"{key} holds rotary frequencies {freqs.tolist()[:4]}..., not theta=10^4's "
                                  f"{expected.tolist()[:4]}...; this package computes the latter")
    return keys


def _check_schedule(state: Mapping[str, torch.Tensor], prefix: str) -> tuple[set[str], Optional[int]]:
    """dalle2 ``noise_scheduler.*`` buffers under ``prefix`` (checked against our cosine schedule),
    and the number of training timesteps they imply (None if absent)."""
    from mindeye_dist.models.prior import schedule_tables

    keys = {k for k in state if k.startswith(prefix + "noise_scheduler.")}
    if not keys:
        return keys, None
    betas = state.get(prefix + "noise_scheduler.betas")
    if betas is None:
        raise ConversionError(f"{prefix}noise_scheduler.* is present without {prefix}noise_scheduler.betas")
    if betas.is_meta:
        return keys, betas.numel()
    expected = schedule_tables(betas.numel())
    for key in sorted(keys):
        name = key[len(prefix + "noise_scheduler."):]
        if name not in expected:
            raise ConversionError(f"unexpected noise-schedule buffer {key}")
        if not torch.allclose(state[key].float(), expected[name], rtol=1e-4, atol=1e-6):
            raise ConversionError(f"{key} differs from the cosine schedule this package trains with "
                                  f"(s=0.008, {betas.numel()} steps): the checkpoint used another schedule")
    return keys, betas.numel()


# ---- subjects -------------------------------------------------------------------------------


def _subject_names(voxel_counts: list[int], names: Optional[Sequence[str]], where: str) -> list[str]:
    """Names for adapters with these voxel counts: given, or the NSD subject with that count."""
    by_count = {n: name for name, n in NSD_VOXELS.items()}
    if names is None:
        unknown = [n for n in voxel_counts if n not in by_count]
        if unknown:
            raise ConversionError(f"{where}: voxel counts {unknown} are not those of an NSD subject "
                                  f"({sorted(by_count)}); name the subjects with --subject NAME[,NAME...]")
        return [by_count[n] for n in voxel_counts]
    names = list(names)
    if len(names) != len(voxel_counts):
        raise ConversionError(f"{where} has {len(voxel_counts)} subject input layers (voxels {voxel_counts}) but "
                              f"{len(names)} subject names were given: {names}")
    for name, n in zip(names, voxel_counts):
        if name in NSD_VOXELS and NSD_VOXELS[name] != n:
            raise ConversionError(f"{where}: subject {name!r} has {NSD_VOXELS[name]} voxels in NSD but its input "
                                  f"layer takes {n}; give the right name with --subject")
    return names


# ---- per-format conversion ------------------------------------------------------------------


def _count(state: Mapping, pattern: str) -> int:
    return sum(1 for k in state if re.fullmatch(pattern, k))


def _prior_fields(state: Mapping[str, torch.Tensor], prefix: str, out: dict, consumed: set) -> dict:
    """Map ``prefix + net.*`` into ``prior.net.*``; verify and drop rotary and schedule buffers;
    return the prior's config fields read from the shapes."""
    net = {k[len(prefix + "net."):]: v for k, v in state.items() if k.startswith(prefix + "net.")}
    for key, value in prior_net_from_dalle2(net).items():
        out["prior.net." + key] = value
    consumed |= {prefix + "net." + k for k in net}
    schedule_keys, timesteps = _check_schedule(state, prefix)
    consumed |= schedule_keys
    dim_head = net["causal_transformer.layers.0.0.null_kv"].shape[1]
    dim = net["learned_query"].shape[1]
    fields = dict(prior=True, prior_depth=_count(net, r"causal_transformer\.layers\.\d+\.0\.to_q\.weight"),
                  prior_dim_head=dim_head,
                  prior_heads=net["causal_transformer.layers.0.0.to_q.weight"].shape[0] // dim_head,
                  prior_ff_mult=net["causal_transformer.layers.0.1.1.weight"].shape[0] // (2 * dim))
    if timesteps is not None:
        fields["prior_timesteps"] = timesteps
    return fields


def _lowlevel_fields(state: Mapping[str, torch.Tensor], decoder_prefix: str, to_map: str, features: str) -> dict:
    """Low-level head sizes read from the decoder's, map Linear's and feature projector's shapes."""
    blocks = _count(state, re.escape(decoder_prefix) + r"up_blocks\.\d+\.resnets\.0\.conv2\.weight")
    channels = [state[f"{decoder_prefix}up_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(blocks)][::-1]
    map_channels = state[decoder_prefix + "conv_in.weight"].shape[1]
    side = math.isqrt(state[to_map].shape[0] // map_channels)
    latent = state[decoder_prefix + "conv_out.weight"].shape[0]
    height = side * 2 ** (blocks - 1)
    return dict(lowlevel=True, lowlevel_shape=[latent, height, height], lowlevel_channels=channels,
                lowlevel_map_channels=map_channels, lowlevel_feature_dim=state[features].shape[0])


def convert_mindeye1(prior_state: Mapping[str, torch.Tensor], lowlevel_state: Optional[Mapping] = None,
                     subject: Optional[str] = None) -> Conversion:
    """MindEye1: a ``BrainDiffusionPrior`` state dict (``voxel2clip.*``, ``net.*``, ``noise_scheduler.*``;
    or a bare ``BrainNetwork``) and optionally a ``Voxel2StableDiffusionModel`` state dict."""
    consumed: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    src = "voxel2clip." if any(k.startswith("voxel2clip.") for k in prior_state) else ""
    if f"{src}lin0.0.weight" not in prior_state:
        raise ConversionError("not a MindEye1 checkpoint: no voxel2clip.lin0.0.weight (nor lin0.0.weight)")
    hidden, n_voxels = prior_state[f"{src}lin0.0.weight"].shape
    name = _subject_names([n_voxels], [subject] if subject else None, "MindEye1 voxel2clip")[0]
    for part in ("weight", "bias"):
        out[f"backbone.adapters.linears.{name}.{part}"] = prior_state[f"{src}lin0.0.{part}"]
        consumed.add(f"{src}lin0.0.{part}")
    _apply(prior_state, ME1_BACKBONE_RULES, out, consumed, src_prefix=src)
    token_dim = prior_state[f"{src}projector.0.weight"].shape[0]
    n_tokens = prior_state[f"{src}lin1.weight"].shape[0] // token_dim
    fields = dict(arch="mindeye1", backbone_blocks="working", subjects={name: n_voxels}, hidden_dim=hidden,
                  n_blocks=_count(prior_state, re.escape(src) + r"mlp\.\d+\.0\.weight"), n_tokens=n_tokens,
                  token_dim=token_dim, projector_hidden_dim=prior_state[f"{src}projector.2.weight"].shape[0],
                  prior=False, lowlevel=False)
    verified = []
    if any(k.startswith("net.") for k in prior_state):
        before = set(consumed)
        fields.update(_prior_fields(prior_state, "", out, consumed))
        verified = sorted(k for k in consumed - before if k.startswith("noise_scheduler.") or k.endswith(".freqs"))
        fields["prior_target_scale"] = math.sqrt(token_dim)  # dalle2's image_embed_scale default
    _refuse_unconsumed(prior_state, consumed, "", "a MindEye1 BrainDiffusionPrior checkpoint")
    if lowlevel_state is not None:
        fields.update(_convert_me1_lowlevel(lowlevel_state, name, n_voxels, out))
    return _finish("mindeye1", fields, out, verified)


def _convert_me1_lowlevel(state: Mapping[str, torch.Tensor], subject: str, n_voxels: int, out: dict) -> dict:
    """``Voxel2StableDiffusionModel`` ('4x', trained with use_cont=True) into ``lowlevel.*``."""
    if "lin0.0.weight" not in state or "maps_projector.0.weight" not in state:
        raise ConversionError("not a MindEye1 low-level checkpoint with its feature projector: expected lin0.0.weight "
                              "and maps_projector.* (Voxel2StableDiffusionModel trained with use_cont=True)")
    hidden, voxels = state["lin0.0.weight"].shape
    if voxels != n_voxels:
        raise ConversionError(f"the low-level checkpoint takes {voxels} voxels, the prior checkpoint {n_voxels}: "
                              "they are not the same subject's")
    state = _decoder_renames(dict(state))
    consumed = {"lin0.0.weight"}
    out[f"lowlevel.adapters.linears.{subject}.weight"] = state["lin0.0.weight"]
    n_blocks = _count(state, r"mlp\.\d+\.0\.weight")
    rules = ME1_LOWLEVEL_RULES + [(rf"mlp\.{k}\.([01])\.(weight|bias)", rf"lowlevel.trunk.{3 + k}.\1.\2")
                                  for k in range(n_blocks)]
    _apply(state, rules, out, consumed)
    _refuse_unconsumed(state, consumed, "", "a MindEye1 Voxel2StableDiffusionModel checkpoint")
    fields = _lowlevel_fields(state, "upsampler.", "lin1.weight", "maps_projector.6.weight")
    return dict(fields, lowlevel_from="voxels", lowlevel_hidden_dim=hidden, lowlevel_n_blocks=n_blocks)


def convert_mindeye2(state: Mapping[str, torch.Tensor], subjects: Optional[Sequence[str]] = None) -> Conversion:
    """MindEye2: a ``MindEyeModule`` state dict (``ridge.*``, ``backbone.*``, ``diffusion_prior.*``)."""
    if "backbone.backbone_linear.weight" not in state:
        raise ConversionError("not a MindEye2 checkpoint: no backbone.backbone_linear.weight")
    state = _decoder_renames(dict(state))
    consumed: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    n_ridge = _count(state, r"ridge\.linears\.\d+\.weight")
    counts = [state[f"ridge.linears.{i}.weight"].shape[1] for i in range(n_ridge)]
    names = _subject_names(counts, subjects, "MindEye2 ridge")
    for i, name in enumerate(names):
        for part in ("weight", "bias"):
            out[f"backbone.adapters.linears.{name}.{part}"] = state[f"ridge.linears.{i}.{part}"]
            consumed.add(f"ridge.linears.{i}.{part}")
    _apply(state, ME2_RULES, out, consumed)
    token_dim = state["backbone.clip_proj.0.weight"].shape[0]
    fields = dict(arch="mindeye2", backbone_blocks="released", subjects=dict(zip(names, counts)),
                  hidden_dim=state["backbone.backbone_linear.weight"].shape[1],
                  n_blocks=_count(state, r"backbone\.mixer_blocks1\.\d+\.0\.weight"), token_dim=token_dim,
                  n_tokens=state["backbone.backbone_linear.weight"].shape[0] // token_dim,
                  projector_hidden_dim=state["backbone.clip_proj.2.weight"].shape[0], prior=False, lowlevel=False)
    verified = []
    if any(k.startswith("diffusion_prior.") for k in state):
        before = set(consumed)
        fields.update(_prior_fields(state, "diffusion_prior.", out, consumed))
        verified = sorted(k for k in consumed - before if ".noise_scheduler." in k or k.endswith(".freqs"))
        fields["prior_target_scale"] = 1.0  # MindEye2 removed dalle2's image_embed_scale
    if "backbone.blin1.weight" in state:
        fields.update(_lowlevel_fields(state, "backbone.bupsampler.", "backbone.blin1.weight",
                                       "backbone.b_maps_projector.6.weight"))
        fields["lowlevel_from"] = "backbone"
    _refuse_unconsumed(state, consumed, "", "a MindEye2 MindEyeModule checkpoint")
    return _finish("mindeye2", fields, out, verified)


def _finish(preset: str, fields: dict, out: dict, verified: list[str]) -> Conversion:
    """Check the renamed tensors fill exactly our model's parameters, with the same shapes."""
    from mindeye_dist.models import build_model

    cfg = ModelConfig(preset=preset, **fields)
    lowlevel_shape = fields.get("lowlevel_shape")
    n_voxels = next(iter(fields["subjects"].values())) if len(fields["subjects"]) == 1 else None
    dims = {"n_voxels": n_voxels, "n_tokens": fields["n_tokens"], "token_dim": fields["token_dim"],
            "lowlevel_shape": lowlevel_shape}
    with torch.device("meta"):
        model = build_model(cfg, n_voxels=n_voxels, n_tokens=dims["n_tokens"], token_dim=dims["token_dim"],
                            lowlevel_shape=lowlevel_shape)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(out))
    if missing:
        raise ConversionError(f"no source for {len(missing)} of our parameters: {missing[:12]}"
                              f"{' ...' if len(missing) > 12 else ''}; the checkpoint lacks part of the model")
    extra = sorted(set(out) - set(ours))
    if extra:  # a rule produced a key our model does not have: the layouts disagree
        raise ConversionError(f"converted keys that the {preset} model does not have: {extra[:12]}")
    wrong = [f"{k}: checkpoint {tuple(out[k].shape)}, model {tuple(ours[k].shape)}" for k in ours
             if tuple(out[k].shape) != tuple(ours[k].shape)]
    if wrong:
        raise ConversionError("shape mismatch after conversion: " + "; ".join(wrong[:8]))
    return Conversion(model=cfg, dims=dims, state_dict={k: out[k] for k in ours}, verified=verified)


# ---- writing --------------------------------------------------------------------------------


def write_export(conversion: Conversion, out: str | os.PathLike, source: str = "") -> dict:
    """Write ``out`` (.safetensors) in :mod:`mindeye_dist.export`'s format; returns a summary."""
    from safetensors.torch import save_file

    from mindeye_dist.config import to_dict

    header = {"model": json.dumps(to_dict(conversion.model)), "dims": json.dumps(conversion.dims),
              "checkpoint": f"converted from {source}" if source else "converted", "format": EXPORT_FORMAT}
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in conversion.state_dict.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, out)
    return {"out": str(out), "tensors": len(tensors), "parameters": int(sum(t.numel() for t in tensors.values())),
            "verified_and_dropped": len(conversion.verified), "model": to_dict(conversion.model)}


def convert_checkpoint(fmt: str, src: str | os.PathLike, out: str | os.PathLike,
                       subjects: Optional[Sequence[str]] = None,
                       lowlevel_src: Optional[str | os.PathLike] = None) -> dict:
    """Read a released checkpoint of ``fmt`` (mindeye1 | mindeye2), convert it, write ``out``."""
    if fmt not in FORMATS:
        raise ConversionError(f"--format {fmt!r} is unknown: expected one of {', '.join(FORMATS)}")
    if lowlevel_src is not None and fmt != "mindeye1":
        raise ConversionError("--lowlevel-src is for mindeye1 (MindEye2 keeps its low-level head in the main file)")
    state = load_reference_state_dict(src)
    if fmt == "mindeye1":
        if subjects is not None and len(subjects) != 1:
            raise ConversionError(f"a MindEye1 checkpoint has one subject; got --subject {','.join(subjects)}")
        lowlevel = load_reference_state_dict(lowlevel_src) if lowlevel_src is not None else None
        conversion = convert_mindeye1(state, lowlevel, subjects[0] if subjects else None)
    else:
        conversion = convert_mindeye2(state, subjects)
    return write_export(conversion, out, source=Path(src).name)
