"""What one reconstruction run is: a typed config (``launchers/reconstruct.py`` flags map 1:1)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

from mindeye_dist.errors import ConfigError

GENERATORS = ("synthetic", "versatile-diffusion", "unclip")
"""``synthetic``: the synthetic subject's own renderer (demo world); ``versatile-diffusion``: MindEye1's
generator (VD image-variation UNet, UniPC); ``unclip``: Stable unCLIP image-to-image."""

DEFAULT_GENERATOR_GUIDANCE = {"synthetic": 1.0, "versatile-diffusion": 3.5, "unclip": 5.0}
"""MindEye1 ran Versatile Diffusion at CFG 3.5; MindEye2's SDXL unCLIP at 5.0."""

RESUME_KEYS = ("run", "checkpoint", "data_url", "split", "brain", "generator", "weights", "vae", "best_of",
               "img2img_strength", "img2img_input", "sampler", "steps", "guidance", "generator_steps",
               "generator_guidance", "noise_level", "sample_std", "clip_weights", "clip_encoder", "clip_arch",
               "shuffle_brain", "blurry_blend", "seed", "batch_size", "limit")
"""Settings that change the pictures: a rerun into the same ``out`` must agree on all of them."""


@dataclass
class ReconstructConfig:
    out: str
    """Output directory: images/, index.jsonl, grid.png, reconstruct_config.json, timing.json."""
    run: Optional[str] = None
    """Run directory of a trained model (``brain=model``)."""
    data_url: Optional[str] = None
    """Dataset URL; default the run's ``data.url`` (required for ``brain=ridge``)."""
    split: str = "test"
    """Split whose stimuli are reconstructed."""
    checkpoint: Optional[str] = None
    """Checkpoint tag; default ``checkpoints/best`` when the run marked one, else ``latest`` (as evaluate)."""
    brain: Literal["model", "ridge"] = "model"
    """``model``: the run's backbone -> prior -> tokens; ``ridge``: closed-form ridge voxels -> tokens and
    voxels -> VAE latents fitted on the train split (the linear floor; no prior)."""
    generator: str = "synthetic"
    """One of GENERATORS."""
    weights: Optional[str] = None
    """Local diffusers pipeline folder of the generator (not needed for ``synthetic``)."""
    vae: Optional[str] = None
    """VAE that decodes the low-level latents (diffusers folder or MindEye's .pth); default the generator's."""
    best_of: int = 16
    """Candidates per stimulus; the one whose CLIP embedding is closest to the retrieval embedding is kept."""
    img2img_strength: float = 0.85
    """How much of the diffusion the generator runs from the blurry image (MindEye1: 0.85); 1 = no img2img,
    0 = output the blurry image itself."""
    img2img_input: Literal["auto", "clip", "standard"] = "auto"
    """How the blurry image enters the generator's VAE: ``clip`` normalises it with CLIP mean/std first, as
    MindEye1 does (a quirk); ``standard`` is diffusers' 2x-1. auto: clip for versatile-diffusion."""
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    """Prior sampler: ``ddpm`` runs all training timesteps (MindEye1: 100); ``ddim`` (MindEye2: 20 steps)."""
    steps: Optional[int] = None
    """Prior sampling steps (ddim only); default 20."""
    guidance: float = 1.0
    """Prior classifier-free guidance scale (both MindEye versions: 1, i.e. none)."""
    generator_steps: int = 20
    """Denoising steps of the diffusion generator (MindEye1: UniPC 20)."""
    generator_guidance: Optional[float] = None
    """Generator CFG scale; default per generator (DEFAULT_GENERATOR_GUIDANCE)."""
    noise_level: int = 0
    """unCLIP: noise level added to the image embedding (the pipeline's ``noise_level``)."""
    sample_std: float = 0.3
    """synthetic: the generator's sampling noise in latent units (candidates differ by it and by the prior)."""
    clip_weights: Optional[str] = None
    """Image encoder for best-of-k (the encoder that made the targets): open_clip checkpoint or OpenAI .pt."""
    clip_encoder: str = "clip-l14-mindeye1"
    """Encoder name from ``data.encoders.ENCODERS`` that computes tokens like the targets."""
    clip_arch: Optional[str] = None
    """open_clip architecture override for the encoder."""
    clip_model_config: Optional[str] = None
    """open_clip model-config JSON to register (tiny test encoders)."""
    shuffle_brain: bool = False
    """Control: every stimulus is reconstructed from another stimulus's voxels (a fixed derangement)."""
    blurry_blend: float = 0.0
    """Weight of the blurry image in a final pixel blend (MindEye2's "enhanced" evaluation: 0.25)."""
    seed: int = 0
    """Seeds every batch's generator (results do not depend on the number of ranks)."""
    batch_size: int = 4
    """Stimuli per batch (times best_of candidates go through the prior and the generator)."""
    limit: Optional[int] = None
    """Reconstruct only the first N stimuli of the split."""
    grid_n: int = 12
    """Stimuli (columns) in grid.png."""
    device: str = "auto"
    """auto: cuda:LOCAL_RANK (bf16 autocast) when available, else cpu (fp32)."""
    progress: bool = True
    """Progress bar with images/s on rank 0."""
    overwrite: bool = False
    """Start over in ``out`` even if it holds reconstructions made with other settings."""
    extra: dict = field(default_factory=dict)
    """Free-form notes stored in reconstruct_config.json (e.g. the demo's row name)."""

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise ConfigError(f"--generator {self.generator!r} is not one of {', '.join(GENERATORS)}")
        if self.brain not in ("model", "ridge"):
            raise ConfigError(f"brain={self.brain!r}: expected 'model' or 'ridge'")
        if self.brain == "model" and not self.run:
            raise ConfigError("--run RUN_DIR is required (or --brain ridge with --data URL)")
        if self.brain == "ridge" and not (self.data_url or self.run):
            raise ConfigError("--brain ridge needs --data URL (the ridge maps are fitted on its train split)")
        if self.generator != "synthetic" and not self.weights:
            raise ConfigError(f"--generator {self.generator} needs --weights: a local diffusers pipeline folder "
                              "(weights are never downloaded)")
        for name, low in (("best_of", 1), ("batch_size", 1), ("generator_steps", 1), ("grid_n", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= {low}")
        if not 0.0 <= self.img2img_strength <= 1.0:
            raise ConfigError(f"--img2img-strength {self.img2img_strength} must be in [0, 1] (1 = no img2img)")
        if not 0.0 <= self.blurry_blend <= 1.0:
            raise ConfigError(f"--blurry-blend {self.blurry_blend} must be in [0, 1]")
        if self.sampler not in ("ddpm", "ddim"):
            raise ConfigError(f"--sampler {self.sampler!r}: expected ddpm or ddim")
        if self.sampler == "ddpm" and self.steps is not None:
            raise ConfigError("--steps applies to --sampler ddim; ddpm runs every training timestep (MindEye1: 100)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit {self.limit} must be >= 1")

    def resolved_generator_guidance(self) -> float:
        return DEFAULT_GENERATOR_GUIDANCE[self.generator] if self.generator_guidance is None else self.generator_guidance

    def resolved_img2img_input(self) -> str:
        if self.img2img_input != "auto":
            return self.img2img_input
        return "clip" if self.generator == "versatile-diffusion" else "standard"

    def fingerprint(self) -> dict:
        """The settings a resumed run must share (RESUME_KEYS), with defaults resolved."""
        d = asdict(self)
        d["generator_guidance"] = self.resolved_generator_guidance()
        d["img2img_input"] = self.resolved_img2img_input()
        return {k: d[k] for k in RESUME_KEYS}
