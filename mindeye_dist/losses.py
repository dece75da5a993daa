"""MindEye losses: BiMixCo, SoftCLIP, InfoNCE, low-level loss, their schedule and the total.

Formulas (digest sections 3 and 8; p_i, t_i are the L2-normalised flattened prediction and
target of sample i, S = P Tᵀ / τ, and CE(z, y) = -Σ_j y_j log softmax(z)_j):

- BiMixCo:  ½ [ mean_i CE(S_i·, Y_i·) + mean_j CE(S_·j, Y_·j) ], Y the mixup soft labels,
  τ = 0.006. With λ = 1 everywhere Y = I and it *is* bidirectional InfoNCE.
- SoftCLIP: ½ [ mean_i CE(S_i·, softmax(Q_i·)) + mean_i CE(Sᵀ_i·, softmax(Q_i·)) ],
  Q = T Tᵀ / τ; τ cosine-annealed upward 0.004 -> 0.0075 over the SoftCLIP phase.
- Low-level: mean |v̂ - v| / l1_scale + cont_weight · soft_cont_loss(student, teacher, teacher_aug).
- Cosine regression (optional, not in the references): mean_i (1 − cos(p_i, t̃_i)) with t̃ the
  target mixed like the voxels during BiMixCo; it pulls every prediction toward its own target
  instead of only away from the batch's negatives.
- Totals: clip_weight · contrastive + prior_weight · prior + lowlevel_weight · lowlevel
  + cosine_weight · cosine; absent terms are skipped (MindEye1: contrastive + 30 · prior;
  MindEye2 adds 0.5 · low-level).

There is no learnable logit scale; contrastive logits are computed in fp32 even under autocast
because τ ≈ 0.004 puts them near ±250.

Negatives (``ContrastiveLoss``; flags named after open_clip's ``ClipLoss``):

- ``gather_negatives=False`` (default; what both references do): each rank scores its own
  batch of B. Data-parallel gradient averaging then optimises the mean of the per-rank losses.
- ``gather_negatives=True``: predictions and targets are all-gathered with gradients
  (:func:`mindeye_dist.distributed.all_gather_with_grad`), so the contrastive set is the global
  batch of N = W·B; this rank's samples sit at rows ``rank·B .. rank·B + B - 1``, so its labels
  are offset by rank·B. Mixup never crosses ranks, so BiMixCo's global Y is block-diagonal.
  Every rank must bring the same B (drop_last batching).

  * ``local_loss=False``: every rank computes the full N×N loss, so the loss each rank reports
    *is* the global-batch loss.
  * ``local_loss=True``: a rank computes only its own B rows of S and its own B columns (rows
    of Sᵀ); the reported loss is the rank's share and the mean over ranks is the global loss.
    W times less matmul work, same gradients.

  Gradient convention: the gather's backward sums gradients over ranks, so on rank r the
  gradient w.r.t. its local features is W · ∂L_global/∂f_r in both modes; DDP/DeepSpeed
  average parameter gradients over ranks, giving exactly ∂L_global/∂θ. Note that gathering
  changes the objective relative to the references (digest §8.4); it is off by default.

Deliberate differences from the references are listed in :data:`KNOWN_REFERENCE_BUGS` (bugs we
fix) and :data:`DELIBERATE_DIFFERENCES` (choices), which the README cites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mindeye_dist.config import LossConfig
from mindeye_dist.distributed import all_gather_with_grad, is_initialized

__all__ = [
    "BIMIXCO",
    "DELIBERATE_DIFFERENCES",
    "KNOWN_REFERENCE_BUGS",
    "SOFTCLIP",
    "ContrastiveLoss",
    "LossSchedule",
    "LossTerms",
    "LowLevelTerms",
    "MindEyeLoss",
    "VoxelMixup",
    "bimixco_loss",
    "combine_losses",
    "cosine_regression_loss",
    "draw_mixup",
    "info_nce_loss",
    "lowlevel_loss",
    "mix_voxels",
    "sample_beta",
    "soft_clip_loss",
    "soft_cont_loss",
    "soft_cross_entropy",
]

KNOWN_REFERENCE_BUGS: dict[str, str] = {
    "mindeye2_multisubject_mixup_offsets": (
        "MindEye2 Train.ipynb builds a BiMixCo permutation per subject over indices 0..bs_s-1 and "
        "concatenates them without offsets, so every subject after the first mixes voxels and "
        "points soft labels into the first subject's block. Fix: draw_mixup(subject_ids=...) "
        "permutes the *global* batch indices of each subject's samples, so k_i always lies in "
        "the same subject's rows and Y matches the voxels actually mixed."
    ),
    "mindeye2_lowlevel_target_mixed_after_loss": (
        "MindEye2 mixes the VAE-latent target after loss_blurry has been computed, so the L1 "
        "target is unmixed while the voxels are mixed. Fix: lowlevel_loss(mix=...) mixes the "
        "target latents with the same lambda and permutation as the voxels *before* the L1 "
        "(VoxelMixup.apply). Teacher feature tokens for the soft contrastive term stay unmixed, "
        "as in both references."
    ),
    "mixco_self_permutation_label": (
        "utils.mixco_nce sets Y_ii = lambda_i and then Y_{i,k_i} = 1 - lambda_i; when k_i = i "
        "the second write overwrites the first, giving Y_ii = 1 - lambda_i (0 for an unmixed "
        "sample) although x~_i = x_i. Fix: the two parts are added (Y_ii = 1), so every row "
        "of Y sums to 1."
    ),
}

DELIBERATE_DIFFERENCES: dict[str, str] = {
    "schedule_by_progress": (
        "The BiMixCo/SoftCLIP switch and the SoftCLIP temperature follow training progress "
        "step/total_steps (continuous) instead of epochs, so they survive resume and changes "
        "of world size or batch size."
    ),
    "gather_negatives_option": "Optional global negatives (off by default, as in both references).",
}

BIMIXCO = "bimixco"
SOFTCLIP = "softclip"
Mode = Literal["infonce", "bimixco", "softclip"]


# --------------------------------------------------------------------------------------------
# Voxel mixup (BiMixCo's augmentation)


def _log_standard_gamma(shape: float, n: int, generator, device) -> Tensor:
    """log of n Gamma(shape, 1) draws in fp64 (Marsaglia & Tsang 2000), honouring ``generator``."""
    boost = shape < 1.0  # G(a) = G(a + 1) · U^(1/a) for a < 1
    d = (shape + 1.0 if boost else shape) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64, device=device)
    todo = torch.arange(n, device=device)
    while todo.numel() > 0:  # rejection sampling; acceptance is > 95 % per round
        x = torch.randn(todo.numel(), generator=generator, dtype=torch.float64, device=device)
        v = (1.0 + c * x) ** 3
        log_u = torch.log1p(-torch.rand(todo.numel(), generator=generator, dtype=torch.float64, device=device))
        log_v = torch.log(v.clamp_min(1e-300))
        ok = (v > 0) & (log_u < 0.5 * x * x + d - d * v + d * log_v)
        out[todo[ok]] = math.log(d) + log_v[ok]
        todo = todo[~ok]
    if boost:
        u = 1.0 - torch.rand(n, generator=generator, dtype=torch.float64, device=device)  # (0, 1]
        out = out + torch.log(u) / shape
    return out


def sample_beta(a: float, b: float, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """n draws of Beta(a, b) in fp64, reproducible from ``generator`` (torch.distributions takes none).

    Computed as sigmoid(log G_a - log G_b) so tiny concentrations (0.15) do not underflow.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.sigmoid(_log_standard_gamma(a, n, generator, device) - _log_standard_gamma(b, n, generator, device))


@dataclass(frozen=True)
class VoxelMixup:
    """One BiMixCo draw: x~_i = lam_i · x_i + (1 - lam_i) · x_{perm_i} for the mixed samples."""

    lam: Tensor
    """(B,) mixing coefficient; exactly 1 for samples that are not mixed."""
    perm: Tensor
    """(B,) long, the partner index k_i of every sample (within its subject when ids are given)."""
    mixed: Tensor
    """(B,) bool, which samples were mixed (drawn with probability ``prob``)."""

    def apply(self, x: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        """Mix any tensor with batch dim 0 the same way (voxels, or low-level target latents).

        ``rows`` gives the batch positions of ``x``'s rows when ``x`` is a part of the batch, e.g.
        one subject's voxels when subjects have different voxel counts; every partner of those
        rows must lie among them (draw with ``subject_ids``).
        """
        n, device = self.lam.shape[0], self.perm.device
        rows = torch.arange(n, device=device) if rows is None else rows.reshape(-1).to(device)
        if x.shape[0] != rows.numel():
            raise ValueError(f"VoxelMixup.apply: x has {x.shape[0]} rows but {rows.numel()} batch positions")
        position = torch.full((n,), -1, dtype=torch.long, device=device)
        position[rows] = torch.arange(rows.numel(), device=device)
        partner = position[self.perm[rows]]  # partner index within x
        if rows.numel() != n and bool((partner < 0).any()):
            raise ValueError("VoxelMixup.apply: some partners lie outside `rows`; draw the mixup with subject_ids")
        shape = (-1,) + (1,) * (x.dim() - 1)  # broadcast (R,) over x's trailing dims
        lam = self.lam[rows].to(device=x.device, dtype=x.dtype).reshape(shape)
        mixed = lam * x + (1 - lam) * x[partner.to(x.device)]
        return torch.where(self.mixed[rows].to(x.device).reshape(shape), mixed, x)

    def soft_labels(self) -> Tensor:
        """(B, B) BiMixCo labels: Y_ii = lam_i, Y_{i,k_i} += 1 - lam_i; rows sum to 1.

        The two parts are *added*, so k_i = i gives Y_ii = 1 (see KNOWN_REFERENCE_BUGS
        "mixco_self_permutation_label").
        """
        n = self.lam.shape[0]
        lam = self.lam.to(torch.float32)
        labels = torch.diag(lam)
        rows = torch.arange(n, device=lam.device)
        return labels.index_put((rows, self.perm.to(lam.device)), 1 - lam, accumulate=True)


def _draw_permutation(n: int, generator, device, subject_ids: Optional[Tensor]) -> Tensor:
    if subject_ids is None:
        return torch.randperm(n, generator=generator, device=device)
    subject_ids = subject_ids.reshape(-1).to(device)
    if subject_ids.numel() != n:
        raise ValueError(f"subject_ids has {subject_ids.numel()} entries for a batch of {n}")
    perm = torch.empty(n, dtype=torch.long, device=device)
    for subject in torch.unique(subject_ids):  # sorted, so the draw order is reproducible
        idx = torch.nonzero(subject_ids == subject).reshape(-1)  # global batch indices
        # Permute the subject's own global indices: the offset fix for MindEye2's bug.
        perm[idx] = idx[torch.randperm(idx.numel(), generator=generator, device=device)]
    return perm


def draw_mixup(
    batch_size: int,
    *,
    beta: float = 0.15,
    prob: float = 0.5,
    generator: Optional[torch.Generator] = None,
    subject_ids: Optional[Tensor] = None,
    device: Optional[torch.device] = None,
) -> VoxelMixup:
    """Draw BiMixCo's permutation, lam ~ Beta(beta, beta) and which samples get mixed.

    With ``subject_ids`` (B,), partners are drawn only among the same subject's samples, using
    their positions in the whole batch (MindEye2 forgot the offsets; KNOWN_REFERENCE_BUGS
    "mindeye2_multisubject_mixup_offsets"). Draws happen on the generator's device (CPU by
    default) and are moved to ``device``.
    """
    draw_device = generator.device if generator is not None else torch.device("cpu")
    perm = _draw_permutation(batch_size, generator, draw_device, subject_ids)
    lam = sample_beta(beta, beta, batch_size, generator)
    mixed = torch.rand(batch_size, generator=generator, device=draw_device) < prob
    lam = torch.where(mixed, lam, torch.ones_like(lam)).to(torch.float32)
    device = device if device is not None else draw_device
    return VoxelMixup(lam=lam.to(device), perm=perm.to(device), mixed=mixed.to(device))


def mix_voxels(
    voxels: Tensor,
    *,
    beta: float = 0.15,
    prob: float = 0.5,
    generator: Optional[torch.Generator] = None,
    subject_ids: Optional[Tensor] = None,
) -> tuple[Tensor, VoxelMixup]:
    """Mix voxels (B, ...) BiMixCo-style; returns the mixed voxels and the draw (for labels)."""
    mix = draw_mixup(voxels.shape[0], beta=beta, prob=prob, generator=generator,
                     subject_ids=subject_ids, device=voxels.device)
    return mix.apply(voxels), mix


# --------------------------------------------------------------------------------------------
# Functional losses (single process; inputs (B, ...) are flattened and L2-normalised)


def soft_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """mean_i -Σ_j labels_ij · log softmax(logits_i)_j for (R, N) logits and labels."""
    return -(labels * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def _flat_unit(x: Tensor) -> Tensor:
    return F.normalize(rearrange(x.float(), "b ... -> b (...)"), dim=-1)  # (B, D)


def _bidirectional(p_rows: Tensor, t_rows: Tensor, p_all: Tensor, t_all: Tensor, temperature: float,
                   labels_rows: Tensor, labels_cols: Tensor) -> Tensor:
    """½ [CE(rows of S) + CE(columns of S)] for the rows this caller owns; S = P Tᵀ / τ."""
    brain_to_image = p_rows @ t_all.T / temperature  # (R, N): rows of S
    image_to_brain = t_rows @ p_all.T / temperature  # (R, N): rows of Sᵀ, i.e. columns of S
    return 0.5 * (soft_cross_entropy(brain_to_image, labels_rows) + soft_cross_entropy(image_to_brain, labels_cols))


def info_nce_loss(preds: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Bidirectional InfoNCE with identity labels (validation loss of the BiMixCo phase)."""
    p, t = _flat_unit(preds), _flat_unit(targets)
    eye = torch.eye(p.shape[0], device=p.device)
    return _bidirectional(p, t, p, t, temperature, eye, eye)


def bimixco_loss(preds: Tensor, targets: Tensor, temperature: float, soft_labels: Tensor) -> Tensor:
    """Bidirectional soft-label cross-entropy with BiMixCo labels Y (B, B) (VoxelMixup.soft_labels)."""
    p, t = _flat_unit(preds), _flat_unit(targets)
    labels = soft_labels.to(device=p.device, dtype=p.dtype)
    return _bidirectional(p, t, p, t, temperature, labels, labels.T)


def soft_clip_loss(preds: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """SoftCLIP: labels softmax(T Tᵀ / τ) for both S and Sᵀ."""
    p, t = _flat_unit(preds), _flat_unit(targets)
    labels = (t @ t.T / temperature).softmax(dim=-1)
    return _bidirectional(p, t, p, t, temperature, labels, labels)


def cosine_regression_loss(preds: Tensor, targets: Tensor, mix: Optional["VoxelMixup"] = None) -> Tensor:
    """mean_i (1 - cos(p_i, t_i)) over flattened rows; with ``mix`` the targets are mixed like the voxels."""
    t = targets.float()
    if mix is not None:
        t = mix.apply(t)
    return (1.0 - (_flat_unit(preds) * _flat_unit(t)).sum(dim=-1)).mean()


def soft_cont_loss(student: Tensor, teacher: Tensor, teacher_aug: Tensor, temperature: float) -> Tensor:
    """Soft contrastive loss on feature tokens (digest §3.4), all B·N tokens as one set.

    Inputs (B, N, C) or (M, C) are flattened to (M, C) tokens and L2-normalised over C. With
    A = teacher · teacher_augᵀ / τ and S = student · teacher_augᵀ / τ:
    ½ [ mean_i CE(S_i·, softmax(A_i·)) + mean_j CE(Sᵀ_j·, softmax(Aᵀ_j·)) ].
    """
    s, t, a = (F.normalize(x.float().reshape(-1, x.shape[-1]), dim=-1) for x in (student, teacher, teacher_aug))
    forward = soft_cross_entropy(s @ a.T / temperature, (t @ a.T / temperature).softmax(dim=-1))
    backward = soft_cross_entropy(a @ s.T / temperature, (a @ t.T / temperature).softmax(dim=-1))
    return 0.5 * (forward + backward)


# --------------------------------------------------------------------------------------------
# Contrastive loss module with explicit local-vs-gathered negatives (STYLE #9)


class ContrastiveLoss(nn.Module):
    """InfoNCE / BiMixCo / SoftCLIP over per-rank or gathered negatives (see module docstring).

    Args:
        gather_negatives: all-gather features (with gradients) so negatives span all ranks.
        local_loss: with gathering, score only this rank's rows/columns (loss is the rank's share).
        group: process group for the gather (default: the world).
    """

    def __init__(self, gather_negatives: bool = False, local_loss: bool = False, group=None) -> None:
        super().__init__()
        self.gather_negatives = gather_negatives
        self.local_loss = local_loss
        self.group = group

    def forward(self, preds: Tensor, targets: Tensor, temperature: float, mode: Mode = "infonce",
                soft_labels: Optional[Tensor] = None) -> Tensor:
        """Loss for local ``preds``/``targets`` (B, ...); ``soft_labels`` (B, B) only for bimixco."""
        if mode not in ("infonce", "bimixco", "softclip"):
            raise ValueError(f"unknown contrastive mode {mode!r}; expected infonce, bimixco or softclip")
        if soft_labels is not None and mode != "bimixco":
            raise ValueError(f"soft_labels are only used by mode='bimixco', got mode={mode!r}")
        with torch.autocast(device_type=preds.device.type, enabled=False):
            p, t = _flat_unit(preds), _flat_unit(targets)  # (B, D)
            b = p.shape[0]
            # Without a process group the gather is the identity (and refuses WORLD_SIZE > 1).
            p_all = all_gather_with_grad(p, self.group) if self.gather_negatives else p  # (N, D)
            t_all = all_gather_with_grad(t, self.group) if self.gather_negatives else t
            gathered = self.gather_negatives and is_initialized()
            rank = torch.distributed.get_rank(self.group) if gathered else 0
            own_rows = self.local_loss or not gathered
            p_rows, t_rows = (p, t) if own_rows else (p_all, t_all)
            offset = rank * b if own_rows else 0
            labels_rows, labels_cols = self._labels(mode, soft_labels, t_rows, t_all, temperature, offset, own_rows)
            return _bidirectional(p_rows, t_rows, p_all, t_all, temperature, labels_rows, labels_cols)

    def _labels(self, mode, soft_labels, t_rows, t_all, temperature, offset, own_rows):
        """Soft labels (R, N) for rows of S and rows of Sᵀ; R = B (own rows) or N (full)."""
        r, n = t_rows.shape[0], t_all.shape[0]
        if mode == "softclip":
            labels = (t_rows @ t_all.T / temperature).softmax(dim=-1)  # Q is symmetric
            return labels, labels
        if mode == "infonce" or soft_labels is None:  # BiMixCo with lambda = 1 is InfoNCE
            eye = torch.zeros(r, n, device=t_rows.device)
            eye[torch.arange(r), offset + torch.arange(r)] = 1.0
            return eye, eye
        block = soft_labels.to(device=t_rows.device, dtype=t_rows.dtype)  # (B, B), this rank's Y
        if not own_rows:  # full global loss over gathered ranks: Y is block-diagonal
            blocks = all_gather_with_grad(block.contiguous(), self.group).split(block.shape[0])
            full = torch.block_diag(*blocks)
            return full, full.T
        rows = torch.zeros(r, n, device=block.device, dtype=block.dtype)
        cols = torch.zeros_like(rows)
        rows[:, offset : offset + r] = block
        cols[:, offset : offset + r] = block.T
        return rows, cols


# --------------------------------------------------------------------------------------------
# Schedule


class LossSchedule:
    """BiMixCo for the first ``mixup_pct`` of training progress, then SoftCLIP.

    A pure function of ``step`` (optimizer steps completed, 0-based) and ``total_steps``:
    progress = step / total_steps. BiMixCo while progress < mixup_pct at the fixed
    ``bimixco_temp``; afterwards SoftCLIP with τ cosine-annealed from ``softclip_temp_start``
    (at the switch) up to ``softclip_temp_end`` (at progress 1; clamped after). The references
    anneal per epoch; by-progress is our deliberate difference (DELIBERATE_DIFFERENCES).
    """

    def __init__(self, cfg: LossConfig, total_steps: int) -> None:
        if total_steps <= 0:
            raise ValueError(f"LossSchedule needs total_steps > 0, got {total_steps}")
        self.cfg = cfg
        self.total_steps = int(total_steps)

    def progress(self, step: int) -> float:
        """Share of training done; exact under scaling (k·step / k·total_steps)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return step / self.total_steps

    def phase(self, step: int) -> str:
        """``BIMIXCO`` or ``SOFTCLIP``."""
        return BIMIXCO if self.progress(step) < self.cfg.mixup_pct else SOFTCLIP

    def temperature(self, step: int) -> float:
        """Training temperature at ``step``."""
        cfg = self.cfg
        if self.phase(step) == BIMIXCO:
            return cfg.bimixco_temp
        span = 1.0 - cfg.mixup_pct
        u = 1.0 if span <= 0 else min(1.0, (self.progress(step) - cfg.mixup_pct) / span)
        # utils.cosine_anneal(start, end): end + (start - end)/2 · (1 + cos(pi·u)), u in [0, 1]
        start, end = cfg.softclip_temp_start, cfg.softclip_temp_end
        return end + 0.5 * (start - end) * (1 + math.cos(math.pi * u))

    def validation(self, step: int) -> tuple[Mode, float]:
        """(mode, τ) of the validation loss: InfoNCE during BiMixCo, SoftCLIP after; τ = bimixco_temp."""
        return ("infonce" if self.phase(step) == BIMIXCO else "softclip"), self.cfg.bimixco_temp

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "mixup_pct": self.cfg.mixup_pct}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """The schedule is stateless; this only checks the resumed run has the same shape."""
        saved = (state.get("total_steps"), state.get("mixup_pct"))
        if strict and saved != (self.total_steps, self.cfg.mixup_pct):
            raise ValueError(
                f"checkpoint loss schedule (total_steps, mixup_pct)={saved} differs from this run's "
                f"{(self.total_steps, self.cfg.mixup_pct)}: the BiMixCo/SoftCLIP switch would move. "
                "Resume with the original train.max_steps and loss.mixup_pct, or load with strict=False"
            )


# --------------------------------------------------------------------------------------------
# Low-level loss and totals


@dataclass
class LowLevelTerms:
    """Low-level loss: ``total = l1 / l1_scale + cont_weight · cont`` (cont may be absent)."""

    total: Tensor
    l1: Tensor
    cont: Optional[Tensor] = None


def lowlevel_loss(
    pred_latents: Tensor,
    target_latents: Tensor,
    *,
    l1_scale: float = 1.0,
    cont_weight: float = 0.1,
    cont_temp: float = 0.2,
    student: Optional[Tensor] = None,
    teacher: Optional[Tensor] = None,
    teacher_aug: Optional[Tensor] = None,
    mix: Optional[VoxelMixup] = None,
) -> LowLevelTerms:
    """L1 on VAE latents plus the optional soft contrastive term on feature tokens.

    ``mix`` is the draw that mixed this batch's voxels: the target latents are mixed the same
    way before the L1, so the target matches the input (KNOWN_REFERENCE_BUGS
    "mindeye2_lowlevel_target_mixed_after_loss"). The contrastive term runs when ``teacher`` and
    ``teacher_aug`` are present (then ``student`` is required); teacher tokens stay unmixed.
    """
    if mix is not None:
        target_latents = mix.apply(target_latents)
    l1 = F.l1_loss(pred_latents.float(), target_latents.float())
    total = l1 / l1_scale
    cont = None
    if (teacher is None) != (teacher_aug is None):
        raise ValueError("lowlevel_loss: pass both teacher and teacher_aug feature tokens, or neither")
    if teacher is not None:
        if student is None:
            raise ValueError("lowlevel_loss: teacher features given but no student tokens from the low-level head")
        cont = soft_cont_loss(student, teacher, teacher_aug, cont_temp)
        total = total + cont_weight * cont
    return LowLevelTerms(total=total, l1=l1, cont=cont)


@dataclass
class LossTerms:
    """Weighted total and the unweighted terms, for the backward pass and for logging."""

    total: Tensor
    contrastive: Optional[Tensor] = None
    prior: Optional[Tensor] = None
    lowlevel: Optional[Tensor] = None
    lowlevel_l1: Optional[Tensor] = None
    lowlevel_cont: Optional[Tensor] = None
    temperature: Optional[float] = None
    phase: Optional[str] = None
    cosine: Optional[Tensor] = None

    def as_dict(self) -> dict[str, Tensor | float]:
        """``loss/<term>`` -> detached tensor (no host sync; call ``.item()`` on log steps)."""
        out: dict[str, Tensor | float] = {}
        for name in ("total", "contrastive", "prior", "lowlevel", "lowlevel_l1", "lowlevel_cont", "cosine"):
            value = getattr(self, name)
            if value is not None:
                out[f"loss/{name}"] = value.detach()
        if self.temperature is not None:
            out["loss/temperature"] = self.temperature
        return out


def combine_losses(
    cfg: LossConfig,
    contrastive: Optional[Tensor] = None,
    prior: Optional[Tensor] = None,
    lowlevel: Optional[Tensor | LowLevelTerms] = None,
) -> LossTerms:
    """clip_weight·contrastive + prior_weight·prior + lowlevel_weight·lowlevel over present terms.

    MindEye1: contrastive + 30·prior. MindEye2: 30·prior + contrastive + 0.5·lowlevel.
    """
    parts = [(w, x) for w, x in ((cfg.clip_weight, contrastive), (cfg.prior_weight, prior)) if x is not None]
    terms = LowLevelTerms(total=lowlevel, l1=None) if isinstance(lowlevel, Tensor) else lowlevel
    if terms is not None:
        parts.append((cfg.lowlevel_weight, terms.total))
    if not parts:
        raise ValueError("combine_losses: no loss term given (contrastive, prior and lowlevel are all None)")
    total = sum(w * x for w, x in parts)
    return LossTerms(
        total=total,
        contrastive=contrastive,
        prior=prior,
        lowlevel=terms.total if terms is not None else None,
        lowlevel_l1=terms.l1 if terms is not None else None,
        lowlevel_cont=terms.cont if terms is not None else None,
    )


class MindEyeLoss(nn.Module):
    """Everything the trainer needs: schedule, mixup, contrastive, low-level and the total.

    Usage per step::

        voxels, mix = loss_fn.mix(step, batch.voxels, generator, batch.subject)  # mix is None after BiMixCo
        out, prior_loss = model(voxels, batch.subject, batch.targets)   # MindEye.forward
        terms = loss_fn(step, out.projector, batch.targets, mix=mix, prior=prior_loss,
                        lowlevel_pred=out.lowlevel, lowlevel_target=batch.vae)
        terms.total.backward()

    (``mindeye_dist.trainer.forward_loss`` is this, with SoftCont's teacher tokens.)
    """

    def __init__(self, cfg: LossConfig, total_steps: int, group=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.schedule = LossSchedule(cfg, total_steps)
        self.contrastive = ContrastiveLoss(cfg.gather_negatives, cfg.gather_local_loss, group)

    def mix(self, step: int, voxels: Tensor, generator: Optional[torch.Generator] = None,
            subject_ids: Optional[Tensor] = None) -> tuple[Tensor, Optional[VoxelMixup]]:
        """Mix voxels during the BiMixCo phase (unchanged afterwards); with ``voxel_noise`` > 0 add
        fresh Gaussian noise in both phases, so the network cannot memorise the few noisy
        repetitions of each training stimulus (for a linear map this is ridge, alpha = N·std²)."""
        if self.cfg.voxel_noise > 0:
            noise = torch.randn(voxels.shape, generator=generator, dtype=torch.float32,
                                device=generator.device if generator is not None else voxels.device)
            voxels = voxels + self.cfg.voxel_noise * noise.to(device=voxels.device, dtype=voxels.dtype)
        if self.schedule.phase(step) != BIMIXCO:
            return voxels, None
        return mix_voxels(voxels, beta=self.cfg.mixup_beta, prob=self.cfg.mixup_prob,
                          generator=generator, subject_ids=subject_ids)

    def forward(self, step: int, preds: Optional[Tensor], targets: Optional[Tensor], *,
                mix: Optional[VoxelMixup] = None, prior: Optional[Tensor] = None,
                lowlevel_pred: Optional[Tensor] = None, lowlevel_target: Optional[Tensor] = None,
                student: Optional[Tensor] = None, teacher: Optional[Tensor] = None,
                teacher_aug: Optional[Tensor] = None) -> LossTerms:
        """Training loss at ``step``; ``preds=None`` skips the contrastive term (prior-only runs)."""
        phase, temperature = self.schedule.phase(step), self.schedule.temperature(step)
        if mix is not None and phase != BIMIXCO:
            raise ValueError(f"a mixup draw was passed at step {step}, which is in the {phase} phase")
        contrastive = None
        if preds is not None:
            if phase == BIMIXCO:
                labels = mix.soft_labels() if mix is not None else None
                contrastive = self.contrastive(preds, targets, temperature, "bimixco", labels)
            else:
                contrastive = self.contrastive(preds, targets, temperature, "softclip")
        lowlevel = None
        if lowlevel_pred is not None:
            lowlevel = lowlevel_loss(lowlevel_pred, lowlevel_target, l1_scale=self.cfg.lowlevel_l1_scale,
                                     cont_weight=self.cfg.lowlevel_cont_weight, cont_temp=self.cfg.lowlevel_cont_temp,
                                     student=student, teacher=teacher, teacher_aug=teacher_aug, mix=mix)
        terms = combine_losses(self.cfg, contrastive, prior, lowlevel)
        if preds is not None and self.cfg.cosine_weight > 0:
            terms.cosine = cosine_regression_loss(preds, targets, mix)
            terms.total = terms.total + self.cfg.cosine_weight * terms.cosine
        terms.temperature, terms.phase = temperature, phase
        return terms

    def validation_loss(self, step: int, preds: Tensor, targets: Tensor) -> Tensor:
        """Contrastive validation loss: InfoNCE in the BiMixCo phase, SoftCLIP after (τ 0.006)."""
        mode, temperature = self.schedule.validation(step)
        return self.contrastive(preds, targets, temperature, mode)
