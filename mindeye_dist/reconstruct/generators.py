"""Image generators behind one small interface, and the decoders of the low-level latent.

A :class:`Generator` turns CLIP-like image tokens (N, T, D) -- the prior's samples -- into
pictures (N, 3, H, W) in [0, 1], optionally starting from an init image (the blurry low-level
reconstruction) at an img2img ``strength`` (1 = start from noise, as MindEye1 defines it):

* :class:`SyntheticGenerator` -- the synthetic subject's known renderer (``data/render.py``);
* :class:`VersatileDiffusionGenerator` -- MindEye1's generator: Versatile Diffusion's image-variation
  UNet conditioned on the 257 x 768 tokens (MindEye1 ran ``VersatileDiffusionDualGuidedPipeline``
  with ``text_image_ratio=0``; its dual transformers then reduce to the image transformer fed the
  257 image tokens, which is this UNet), UniPC 20 steps, CFG 3.5 with an all-zero unconditional
  embedding, img2img from the blurry image at 0.85;
* :class:`UnCLIPGenerator` -- Stable unCLIP image-to-image (``StableUnCLIPImg2ImgPipeline``), the closest
  diffusers analogue of MindEye2's SDXL unCLIP: conditioned on the pooled image embedding (token 0,
  the CLS token, of MindEye1-layout tokens; see the class) through the pipeline's own
  ``noise_image_embeddings``, with the empty prompt's text embedding (MindEye2's SDXL unCLIP
  instead cross-attends to the 256 x 1664 bigG tokens, which no diffusers pipeline can load).

Both diffusion generators run one img2img loop (:meth:`DiffusersGenerator.generate`), the
computation of diffusers' img2img pipelines and of MindEye1's ``utils.reconstruction``: timesteps
``[steps - int(steps * strength):]``, the init image VAE-encoded (a sample of the posterior) and
noised to the first of them. At strength 1 it is exactly the pipeline's text/image-to-image call
from noise (``tests/test_reconstruct_diffusers.py`` checks unCLIP against ``pipe(...)``).
Weights always come from a local ``save_pretrained`` folder; nothing is downloaded.
"""

from __future__ import annotations

import inspect
import os
from typing import Optional, Protocol

import torch
import torch.nn.functional as F

from mindeye_dist.data.encoders import CLIP_MEAN, CLIP_STD, VAE_SCALE
from mindeye_dist.errors import ConfigError


class Generator(Protocol):
    name: str

    def generate(self, tokens: torch.Tensor, init: Optional[torch.Tensor], strength: float,
                 generator: torch.Generator) -> torch.Tensor:
        """tokens (N, T, D) [+ init (N, 3, H, W) in [0, 1]] -> (N, 3, H', W') float in [0, 1]."""

    def describe(self) -> dict:
        """What it is and its settings (JSON)."""


class LowLevelDecoder(Protocol):
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) predicted VAE latents -> (N, 3, H, W) blurry images (about [0, 1])."""


# --------------------------------------------------------------------------------------------
# The synthetic world


class SyntheticGenerator:
    """The synthetic subject's renderer as a generator (see ``SyntheticRenderer.generate``)."""

    name = "synthetic"

    def __init__(self, renderer, sample_std: float = 0.3):
        self.renderer, self.sample_std = renderer, sample_std

    def generate(self, tokens, init, strength, generator):
        cpu_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
        return self.renderer.generate(tokens, init, strength, self.sample_std, cpu_gen)

    def describe(self) -> dict:
        return {"name": self.name, "sample_std": self.sample_std,
                "what": "the synthetic subject's known renderer: tokens -> latent (Gauss-Newton on the target map) -> image"}


class SyntheticVAEDecoder:
    """The synthetic subject's VAE decoder: latents -> latent z (atanh, least squares) -> image."""

    def __init__(self, renderer):
        self.renderer = renderer

    def decode(self, latents):
        return self.renderer.decode_vae(latents.float())


# --------------------------------------------------------------------------------------------
# diffusers


class DiffusersVAEDecoder:
    """A diffusers AutoencoderKL decoding MindEye's scaled latents: ``decode(z / 0.18215) / 2 + 0.5``."""

    def __init__(self, vae):
        self.vae = vae

    @torch.no_grad()
    def decode(self, latents):
        vae = self.vae
        return vae.decode(latents.to(vae.device, vae.dtype) / VAE_SCALE).sample.float() / 2 + 0.5


def _check_folder(path: str, subfolders: tuple[str, ...], what: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(f"--weights {path} is not a folder; {what} loads a diffusers pipeline folder (save_pretrained "
                          "layout) from local disk")
    missing = [s for s in subfolders if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise ConfigError(f"--weights {path} has no {', '.join(missing)} subfolder(s); {what} needs a diffusers pipeline "
                          f"folder with {', '.join(subfolders)}")


class DiffusersGenerator:
    """UNet + VAE + scheduler: the shared img2img denoising loop (subclasses say how to condition)."""

    name = "diffusers"

    def __init__(self, unet, vae, scheduler, *, steps: int, guidance: float, img2img_input: str, device, dtype):
        cast = {} if dtype == torch.float32 else {"dtype": dtype}  # diffusers warns on any to(dtype)
        self.unet = unet.eval().requires_grad_(False).to(device, **cast)
        self.vae = vae.eval().requires_grad_(False).to(device, **cast)
        self.scheduler, self.steps, self.guidance = scheduler, steps, guidance
        self.img2img_input, self.device, self.dtype = img2img_input, torch.device(device), dtype
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        size = unet.config.sample_size
        self.latent_hw = (size, size) if isinstance(size, int) else tuple(size)
        self._step_takes_generator = "generator" in inspect.signature(scheduler.step).parameters

    def conditioning(self, tokens: torch.Tensor, generator) -> tuple[dict, dict]:
        """(conditional, unconditional) UNet keyword arguments for a batch of tokens."""
        raise NotImplementedError

    def lowlevel_decoder(self) -> DiffusersVAEDecoder:
        return DiffusersVAEDecoder(self.vae)

    @torch.no_grad()
    def encode_init(self, init: torch.Tensor, generator) -> torch.Tensor:
        """(N, 3, H, W) [0, 1] -> scaled init latents at the UNet's resolution."""
        hw = tuple(s * self.vae_scale_factor for s in self.latent_hw)
        x = F.interpolate(init.float(), hw, mode="bilinear", align_corners=False, antialias=True)
        if self.img2img_input == "clip":  # MindEye1 normalises the blurry image with CLIP mean/std (a quirk)
            mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
            x = (x - mean) / std
        else:
            x = 2 * x - 1
        dist = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        return dist.sample(generator) * self.vae.config.scaling_factor

    @torch.no_grad()
    def generate(self, tokens, init, strength, generator):
        n = tokens.shape[0]
        cond, uncond = self.conditioning(tokens.to(self.device, self.dtype), generator)
        do_cfg = self.guidance > 1.0
        kwargs = {k: torch.cat([uncond[k], cond[k]]) for k in cond} if do_cfg else cond
        sch = self.scheduler
        sch.set_timesteps(self.steps, device=self.device)
        timesteps = sch.timesteps
        shape = (n, self.unet.config.in_channels, *self.latent_hw)
        from diffusers.utils.torch_utils import randn_tensor

        if init is not None and strength < 1.0:
            init_latents = self.encode_init(init, generator)
            t_start = max(self.steps - min(int(self.steps * strength), self.steps), 0)
            timesteps = timesteps[t_start * sch.order:]
            if hasattr(sch, "set_begin_index"):
                sch.set_begin_index(t_start * sch.order)
            noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
            latents = sch.add_noise(init_latents, noise, timesteps[:1].repeat(n))
        else:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype) * sch.init_noise_sigma
        step_kwargs = {"generator": generator} if self._step_takes_generator else {}
        for t in timesteps:
            x = torch.cat([latents] * 2) if do_cfg else latents
            eps = self.unet(sch.scale_model_input(x, t), t, **kwargs).sample
            if do_cfg:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + self.guidance * (eps_cond - eps_uncond)
            latents = sch.step(eps, t, latents, **step_kwargs).prev_sample
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def describe(self) -> dict:
        return {"name": self.name, "steps": self.steps, "guidance": self.guidance, "scheduler": type(self.scheduler).__name__,
                "img2img_input": self.img2img_input, "latent_hw": list(self.latent_hw)}


class VersatileDiffusionGenerator(DiffusersGenerator):
    """MindEye1's generator: VD's ``image_unet`` conditioned on the (N, 257, 768) tokens, UniPC.

    Loaded from a Versatile Diffusion pipeline folder (``shi-labs/versatile-diffusion`` layout:
    ``image_unet/``, ``vae/``, ``scheduler/``); the scheduler is UniPC built from that folder's
    scheduler config, as MindEye1 swaps it in. The unconditional branch is all zeros (MindEye1),
    not the pipeline's CLIP embedding of a grey image.
    """

    name = "versatile-diffusion"

    @classmethod
    def from_folder(cls, path: str, **kw) -> "VersatileDiffusionGenerator":
        from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler

        _check_folder(path, ("image_unet", "vae", "scheduler"), "--generator versatile-diffusion")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="image_unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        scheduler = UniPCMultistepScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        return cls(unet, vae, scheduler, **kw)

    def conditioning(self, tokens, generator):
        want = self.unet.config.cross_attention_dim
        if tokens.shape[-1] != want:
            raise ConfigError(f"the UNet cross-attends to {want}-d tokens but the prior samples {tokens.shape[-1]}-d ones; "
                              "Versatile Diffusion needs MindEye1's 257 x 768 CLIP ViT-L/14 targets")
        return {"encoder_hidden_states": tokens}, {"encoder_hidden_states": torch.zeros_like(tokens)}


class UnCLIPGenerator(DiffusersGenerator):
    """Stable unCLIP image-to-image, conditioned on a pooled CLIP image embedding.

    The embedding is token 0 of the prior's sample: with MindEye1's targets that is the CLS token
    through CLIP's projection, i.e. the CLIP image embedding, divided by its norm. unCLIP was
    trained on unnormalised embeddings, so it is rescaled to the norm implied by the pipeline's own
    embedding statistics, ``sqrt(sum(mean^2 + std^2))`` of ``image_normalizer`` (a deliberate,
    documented step; the direction is the brain's). Then ``noise_image_embeddings`` at
    ``noise_level``, zeros as the unconditional embedding and the empty prompt's text embedding,
    all as the pipeline's ``__call__`` does.
    """

    name = "unclip"

    def __init__(self, pipe, *, noise_level: int = 0, **kw):
        super().__init__(pipe.unet, pipe.vae, pipe.scheduler, **kw)
        self.pipe, self.noise_level = pipe, noise_level
        pipe.text_encoder.to(self.device)
        prompt, negative = pipe.encode_prompt(prompt="", device=self.device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=True, negative_prompt=None)
        self.prompt_embeds, self.negative_embeds = prompt.to(self.dtype), negative.to(self.dtype)  # (1, 77, C)
        normaliser = pipe.image_normalizer
        self.embed_dim = normaliser.mean.shape[-1]
        self.embed_norm = float((normaliser.mean.detach().float() ** 2 + normaliser.std.detach().float() ** 2).sum().sqrt())

    @classmethod
    def from_folder(cls, path: str, **kw) -> "UnCLIPGenerator":
        from mindeye_dist.compat import require

        require("transformers", "recon", "the Stable unCLIP generator (its CLIP text encoder and tokenizer)")
        from diffusers import StableUnCLIPImg2ImgPipeline

        _check_folder(path, ("unet", "vae", "scheduler", "image_normalizer", "image_noising_scheduler", "text_encoder",
                             "tokenizer"), "--generator unclip")
        # The image encoder only embeds input images; the brain gives the embedding, so it is not loaded.
        pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(path, feature_extractor=None, image_encoder=None,
                                                           local_files_only=True)
        return cls(pipe, **kw)

    def conditioning(self, tokens, generator):
        if tokens.shape[-1] != self.embed_dim:
            raise ConfigError(f"this unCLIP takes {self.embed_dim}-d image embeddings; the prior samples {tokens.shape[-1]}-d "
                              "tokens. Use targets whose token 0 is the projected CLS token (MindEye1's CLIP ViT-L/14 "
                              "257 x 768 with stable-diffusion-2-1-unclip-small)")
        pooled = tokens[:, 0].float()
        pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-6) * self.embed_norm
        embeds = self.pipe.noise_image_embeddings(pooled, self.noise_level, generator=generator).to(self.dtype)
        n = tokens.shape[0]
        cond = {"encoder_hidden_states": self.prompt_embeds.expand(n, -1, -1), "class_labels": embeds}
        uncond = {"encoder_hidden_states": self.negative_embeds.expand(n, -1, -1), "class_labels": torch.zeros_like(embeds)}
        return cond, uncond

    def describe(self) -> dict:
        return {**super().describe(), "noise_level": self.noise_level, "embed_norm": self.embed_norm}


# --------------------------------------------------------------------------------------------


def build_generator(cfg, device: torch.device, meta=None) -> tuple[Generator, LowLevelDecoder]:
    """The generator ``cfg.generator`` names and the decoder of low-level latents (``cfg.vae`` or the
    generator's own VAE)."""
    if cfg.generator == "synthetic":
        from mindeye_dist.data.render import SyntheticRenderer

        renderer = SyntheticRenderer.from_meta(meta)
        generator, decoder = SyntheticGenerator(renderer, cfg.sample_std), SyntheticVAEDecoder(renderer)
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        kw = dict(steps=cfg.generator_steps, guidance=cfg.resolved_generator_guidance(),
                  img2img_input=cfg.resolved_img2img_input(), device=device, dtype=dtype)
        if cfg.generator == "versatile-diffusion":
            generator = VersatileDiffusionGenerator.from_folder(cfg.weights, **kw)
        else:
            generator = UnCLIPGenerator.from_folder(cfg.weights, noise_level=cfg.noise_level, **kw)
        decoder = generator.lowlevel_decoder()
    if cfg.vae:
        from mindeye_dist.data.encoders import TargetSpec, load_vae

        decoder = DiffusersVAEDecoder(load_vae(TargetSpec(encoder="sd-vae-mindeye1", weights=cfg.vae), device))
    return generator, decoder
