"""A reference-style loop: what the MindEye notebooks do every step, on the same model.

Per step: a frozen CLIP image encoder of ViT-L/14 size (open_clip ``ViT-L-14``, randomly
initialised from its config: no weights can be downloaded here, and the cost does not depend on
the values) runs eager fp32 under ``no_grad`` on the batch's 224x224 images; its 257x768 tokens
(``ln_post`` output over all tokens @ ``visual.proj``, captured with a forward hook) become the
targets, not cached; then the same training step as ours (``TrainingModel`` + ``MindEyeLoss``
through ``mindeye_dist.trainer.forward_loss``, the function ``Trainer.step`` calls) with plain ``torch.optim.AdamW`` at its defaults (no ``fused``,
no ``foreach`` argument: the single-tensor loop on CPU, foreach on CUDA) as the references used,
and no DeepSpeed. The model's token shape is smaller than 257x768 for the small presets, so the
encoder's tokens are cropped to ``(n_tokens, token_dim)`` (the encoder cost, which dominates, is the
same as for full-size targets; the crop is a view).

Images are random uint8 tensors already in memory, normalised with the CLIP mean/std on the fly
(the references decoded JPEGs in their loader; that cost is left out on both sides).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from mindeye_dist.bench.common import PresetSpec, build, experiment_config, log, median, sync, synthetic_batch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TokenEncoder:
    """Frozen open_clip vision tower -> (B, 1 + grid², embed_dim) tokens (ln_post @ proj)."""

    def __init__(self, name: str, device: torch.device):
        import mindeye_dist  # noqa: F401  (torchvision shim before open_clip)
        import open_clip

        clip = open_clip.create_model(name, pretrained=None)
        self.visual = clip.visual.to(device).eval().requires_grad_(False)
        del clip
        self.image_size = self.visual.image_size if isinstance(self.visual.image_size, int) else self.visual.image_size[0]
        self.params = sum(p.numel() for p in self.visual.parameters())
        self._captured: dict[str, torch.Tensor] = {}
        self.visual.ln_post.register_forward_hook(lambda _m, _i, out: self._captured.__setitem__("x", out))
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = (images_uint8.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        self.visual(x)
        return self._captured.pop("x") @ self.visual.proj


def fit_tokens(tokens: torch.Tensor, n_tokens: int, token_dim: int) -> torch.Tensor:
    """Crop (or tile, for an encoder smaller than the model) tokens to (B, n_tokens, token_dim)."""
    b, t, d = tokens.shape
    if t < n_tokens:
        tokens = tokens.repeat(1, -(-n_tokens // t), 1)
    if d < token_dim:
        tokens = tokens.repeat(1, 1, -(-token_dim // d))
    out = tokens[:, :n_tokens, :token_dim]
    return out / out[:, :1].norm(dim=-1, keepdim=True).clamp_min(1e-6)


class _PlainEngine:
    """What ``trainer.forward_loss`` needs from an engine: call the model, know the dtype."""

    dtype = torch.float32

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def measure_reference(spec: PresetSpec, micro_batch: int, steps: int, device: torch.device,
                      encoder: str = "ViT-L-14") -> dict[str, Any]:
    """Median seconds per reference-style step (encoder + step), with the parts timed separately."""
    from mindeye_dist.losses import MindEyeLoss
    from mindeye_dist.optim import param_groups
    from mindeye_dist.trainer import TrainingModel, forward_loss

    cfg = experiment_config(spec, micro_batch, precision="fp32")
    t = time.perf_counter()
    enc = TokenEncoder(encoder, device)
    build_s = time.perf_counter() - t
    torch.manual_seed(0)
    module = TrainingModel(build(spec, cfg)).to(device).train()
    groups = param_groups(module, cfg.optim.weight_decay)
    for g in groups:
        g.pop("name")
    opt = torch.optim.AdamW(groups, lr=cfg.optim.max_lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    engine, loss_fn = _PlainEngine(module), MindEyeLoss(cfg.loss, cfg.train.max_steps)
    gen = torch.Generator().manual_seed(0)
    model_cfg = module.model.config
    batch = synthetic_batch(model_cfg, micro_batch, device)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (micro_batch, enc.image_size, enc.image_size, 3), dtype=torch.uint8, generator=g)
    images = images.to(device)

    def step(i: int, parts: list | None = None) -> None:
        t0 = time.perf_counter()
        tokens = enc(images)  # targets computed on the fly, every step
        batch.targets = fit_tokens(tokens, model_cfg.n_tokens, model_cfg.token_dim)
        sync(device)
        t1 = time.perf_counter()
        terms = forward_loss(engine, loss_fn, batch, i, gen)
        terms.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if parts is not None:
            parts.append((t1 - t0, time.perf_counter() - t1))

    # Warm-up on one image (oneDNN primitive creation, first-touch of the weights) and one
    # model step, so the timed steps are steady state without paying a full warm-up batch.
    enc(images[:1])
    terms = forward_loss(engine, loss_fn, batch, 0, gen)
    terms.total.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    parts: list = []
    times = []
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step(i + 1, parts)
        times.append(time.perf_counter() - t0)
        log(f"reference step {i + 1}/{steps}: {times[-1]:.2f} s (encoder {parts[-1][0]:.2f} s)")
    med = median(times)
    return {
        "preset": spec.name, "micro_batch": micro_batch, "timed_steps": len(times), "step_times_s": times,
        "step_time_s": med, "samples_per_s": micro_batch / med,
        "encoder": {"name": encoder, "pretrained": None, "params": enc.params, "image_size": enc.image_size,
                    "tokens_shape": [int(enc.visual.positional_embedding.shape[0]), int(enc.visual.proj.shape[1])],
                    "seconds_per_step": median([p[0] for p in parts]), "build_s": build_s},
        "train_step_s": median([p[1] for p in parts]),
        "optimizer": "torch.optim.AdamW (defaults: no fused, no foreach argument)",
        "targets": f"encoder tokens cropped to the model's ({model_cfg.n_tokens}, {model_cfg.token_dim})",
    }


# ---------------------------------------------------------------------------------------------
# MindEye1 at full shape, from the references' own model code


@dataclass(frozen=True)
class MindEye1Shape:
    """MindEye1 subject 1 (``Train_MindEye.py --hidden``, prior on): the shape both sides train.
    The backbone width is chosen per run (4096 in the paper); the defaults are MindEye1's."""

    n_voxels: int = 15724
    n_tokens: int = 257
    token_dim: int = 768
    n_blocks: int = 4
    projector_hidden: int = 2048
    prior_depth: int = 6
    prior_heads: int = 12
    prior_dim_head: int = 64
    prior_mult: float = 30.0
    bimixco_temp: float = 0.006

    def preset_spec(self, hidden: int) -> str:
        """Our ``mindeye1`` preset at this shape (``bench.common.PresetSpec`` syntax), no low-level head."""
        spec = f"mindeye1:hidden_dim={hidden},lowlevel=false"
        default = MindEye1Shape()
        if self != dataclasses.replace(default, prior_mult=self.prior_mult, bimixco_temp=self.bimixco_temp):
            spec += (f",n_blocks={self.n_blocks},projector_hidden_dim={self.projector_hidden},n_tokens={self.n_tokens},"
                     f"token_dim={self.token_dim},prior_depth={self.prior_depth},prior_heads={self.prior_heads},"
                     f"prior_dim_head={self.prior_dim_head},prior_target_scale={self.token_dim ** 0.5},"
                     f"subjects={{subj01: {self.n_voxels}}}")
        return spec


def reference_mixco(voxels: torch.Tensor, beta: float = 0.15, s_thresh: float = 0.5):
    """MindEye's ``utils.mixco``: each sample mixed with probability ``s_thresh`` with a permuted
    partner at lambda ~ Beta(0.15, 0.15); returns (voxels, perm, betas, select)."""
    b = voxels.shape[0]
    perm = torch.randperm(b, device=voxels.device)
    betas = torch.distributions.Beta(beta, beta).sample([b]).to(voxels.device, voxels.dtype)
    select = (torch.rand(b, device=voxels.device) <= s_thresh)
    shape = [-1] + [1] * (voxels.dim() - 1)
    mixed = voxels[select] * betas[select].reshape(shape) + voxels[perm][select] * (1 - betas[select]).reshape(shape)
    voxels = voxels.clone()
    voxels[select] = mixed
    betas[~select] = 1
    return voxels, perm, betas, select


def reference_mixco_nce(preds: torch.Tensor, targets: torch.Tensor, temp: float, perm, betas) -> torch.Tensor:
    """MindEye's ``utils.mixco_nce`` (bidirectional): soft labels betas on the diagonal, 1 - betas at the partner."""
    logits = preds @ targets.T / temp
    probs = torch.diag(betas)
    probs[torch.arange(preds.shape[0], device=preds.device), perm] = 1 - betas
    loss = -(logits.log_softmax(-1) * probs).sum(-1).mean()
    loss_t = -(logits.T.log_softmax(-1) * probs.T).sum(-1).mean()
    return (loss + loss_t) / 2


def reference_param_groups(modules: dict[str, torch.nn.Module], weight_decay: float = 1e-2) -> list[dict]:
    """MindEye1's groups: per module, names containing ``bias``/``LayerNorm.*`` undecayed (which in
    nn.Sequential matches biases only: the references' quirk, kept)."""
    no_decay = ("bias", "LayerNorm.bias", "LayerNorm.weight")
    groups = []
    for module in modules.values():
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        groups.append({"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": weight_decay})
        groups.append({"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


class MindEye1ReferenceStep:
    """One step of MindEye1's ``Train_MindEye.py`` loop, eager fp32 on the CPU, from its own model
    code: ``BrainNetwork`` (voxel2clip with projector), dalle2-pytorch 1.14.2's prior
    (``VersatileDiffusionPriorNetwork`` composition + ``DiffusionPrior``, image_embed_scale
    sqrt(768)), BiMixCo (``mixco`` + ``mixco_nce`` at 0.006) + 30 x the prior loss, backward, plain
    ``torch.optim.AdamW`` (defaults: the single-tensor loop on CPU). Targets come from ``encoder``
    run on the batch's images when given ("with encoder", as the references did), else from
    memory ("cached targets"). Left out on both sides: image augmentation, the per-step
    accuracy logging, the LR schedule (a scalar per step)."""

    def __init__(self, hidden: int, device: torch.device, encoder: "TokenEncoder | None" = None,
                 shape: MindEye1Shape = MindEye1Shape()):
        from mindeye_dist.bench.reference_models import ME1BrainNetwork, dalle2_diffusion_prior, dalle2_prior_network

        s = self.shape = shape
        torch.manual_seed(0)
        self.voxel2clip = ME1BrainNetwork(s.n_voxels, hidden, s.n_blocks, s.token_dim, s.n_tokens,
                                          proj_h=s.projector_hidden).to(device).train()
        net = dalle2_prior_network(s.token_dim, s.n_tokens, s.prior_depth, s.prior_dim_head, s.prior_heads)
        self.prior = dalle2_diffusion_prior(net).to(device).train()
        modules = {"voxel2clip": self.voxel2clip, "prior": self.prior.net}
        self.params = sum(p.numel() for m in modules.values() for p in m.parameters() if p.requires_grad)
        self.opt = torch.optim.AdamW(reference_param_groups(modules), lr=3e-4)
        self.encoder, self.device = encoder, device

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's 257x768 tokens, normalised by the CLS token's norm (``norm_embs``)."""
        return fit_tokens(self.encoder(images), self.shape.n_tokens, self.shape.token_dim)

    def train_step(self, voxels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        s = self.shape
        voxels, perm, betas, _ = reference_mixco(voxels)
        clip_voxels, clip_voxels_proj = self.voxel2clip(voxels)
        clip_voxels = clip_voxels.view(len(voxels), -1, s.token_dim)
        loss_prior = self.prior(text_embed=clip_voxels, image_embed=targets.clone())  # scales its input in place
        preds = torch.nn.functional.normalize(clip_voxels_proj.flatten(1), dim=-1)
        targs = torch.nn.functional.normalize(targets.flatten(1), dim=-1)
        loss = reference_mixco_nce(preds, targs, s.bimixco_temp, perm, betas) + s.prior_mult * loss_prior
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return loss.detach()

    def __call__(self, voxels: torch.Tensor, cached_targets: torch.Tensor, images=None, parts: list | None = None):
        """One step; ``parts`` gets (encoder seconds, train-step seconds)."""
        t0 = time.perf_counter()
        targets = self.targets(images) if images is not None and self.encoder is not None else cached_targets
        sync(self.device)
        t1 = time.perf_counter()
        loss = self.train_step(voxels, targets)
        sync(self.device)
        if parts is not None:
            parts.append((t1 - t0, time.perf_counter() - t1))
        return loss
