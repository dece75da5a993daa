"""Reconstruction throughput: stimuli/s and candidates/s per generator configuration, and where the
time goes (brain forward, prior sampling, blurry decode, generation, best-of-k selection).

Each case runs the code ``launchers/reconstruct.py`` runs (:func:`~mindeye_dist.reconstruct.reconstruct_batch`)
on random voxels through a randomly initialised model of the named preset, with randomly
initialised image models built from config: what is measured is compute, not quality.

    rows = bench_reconstruction(["synthetic-ddim20", "vd-tiny"], stimuli=8)
    print(format_markdown(rows))

``real_size_estimate`` (optional, minutes on CPU) times one call of each real-size component --
MindEye1's prior (257 x 768, depth 6), an SD1-size UNet (Versatile Diffusion's image UNet has
that shape) at 512 px with CFG, the SD VAE decoder, CLIP ViT-L/14 -- and multiplies by the
number of calls MindEye1's recipe makes per image (an estimate from measured per-call times).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from mindeye_dist.reconstruct.pipeline import PhaseTimer, reconstruct_batch


@dataclass(frozen=True)
class ReconBenchCase:
    name: str
    """Row label."""
    generator: str
    """synthetic | versatile-diffusion | unclip."""
    preset: str
    """Model preset (random init at the synthetic subject's dims: tiny or demo)."""
    sampler: str = "ddim"
    """Prior sampler."""
    steps: Optional[int] = 20
    """Prior steps (ddim)."""
    best_of: int = 4
    """Candidates per stimulus."""
    generator_steps: int = 20
    """Diffusion generator steps."""
    guidance: float = 3.5
    """Diffusion generator CFG."""
    strength: float = 0.85
    """img2img strength (1: from noise)."""


CASES = {
    "synthetic-ddim20": ReconBenchCase("synthetic renderer, demo model, prior DDIM 20, best-of 8", "synthetic", "demo",
                                       "ddim", 20, 8),
    "synthetic-ddpm100": ReconBenchCase("synthetic renderer, demo model, prior DDPM 100 (MindEye1), best-of 8", "synthetic",
                                        "demo", "ddpm", None, 8),
    "vd-tiny": ReconBenchCase("tiny VD UNet, UniPC 20, CFG 3.5, img2img 0.85, tiny model DDPM 100, best-of 4",
                              "versatile-diffusion", "tiny", "ddpm", None, 4),
    "unclip-tiny": ReconBenchCase("tiny Stable unCLIP, DDIM 20 (gen), CFG 5, from noise, tiny model DDIM 20, best-of 1",
                                  "unclip", "tiny", "ddim", 20, 1, guidance=5.0, strength=1.0),
}
TINY_DIMS = {"n_voxels": 64, "n_tokens": 5, "token_dim": 16, "lowlevel_shape": [4, 8, 8]}
"""Model dims of the diffusers cases: 5 x 16 tokens (a tiny ViT: CLS + 2 x 2 patches)."""


def _model(preset: str, dims: dict):
    from mindeye_dist.config import load_config
    from mindeye_dist.models import build_model

    torch.manual_seed(0)
    cfg = load_config(None, [f"model.preset={preset}"])
    return build_model(cfg.model, **dims).eval()


def _tiny_unet(**kw):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=4, **kw)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1)


def _tiny_clip_encoder(tmp: str, device):
    """MindEye1's CLIP-token encoder (``clip-l14-mindeye1``) on a tiny random ViT: (N, 5, 16) tokens."""
    import open_clip

    from mindeye_dist.data.encoders import ENCODERS, TargetSpec

    config = {"embed_dim": 16, "quick_gelu": True,
              "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "patch_size": 14, "head_width": 16},
              "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}}
    path = os.path.join(tmp, "bench-recon-vit.json")
    with open(path, "w") as f:
        json.dump(config, f)
    open_clip.add_model_config(path)
    torch.save(open_clip.create_model("bench-recon-vit").state_dict(), os.path.join(tmp, "clip.bin"))
    spec = TargetSpec("clip-l14-mindeye1", os.path.join(tmp, "clip.bin"), arch="bench-recon-vit", model_config=path)
    encoder = ENCODERS["clip-l14-mindeye1"][1](spec, device)
    return lambda images: encoder.fn(images.to(device)).float()


def _tiny_unclip_pipe(tmp: str):
    from diffusers import DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2}
    with open(os.path.join(tmp, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(tmp, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=3, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1))
    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=None, image_encoder=None, image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=16),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), model_max_length=77),
        text_encoder=text, unet=_tiny_unet(cross_attention_dim=32, class_embed_type="projection",
                                           projection_class_embeddings_input_dim=32),
        scheduler=DDIMScheduler(), vae=_tiny_vae())


def _build(case: ReconBenchCase, device: torch.device, tmp: str):
    """(model, generator, low-level decoder, candidate encoder) for a case."""
    from mindeye_dist.reconstruct import generators as G

    if case.generator == "synthetic":
        from mindeye_dist.data.render import SyntheticRenderer
        from mindeye_dist.data.synthetic import SyntheticSubject, get_spec

        s = get_spec(case.preset)
        renderer = SyntheticRenderer(SyntheticSubject(s, 0))
        dims = {"n_voxels": s.n_voxels, "n_tokens": s.n_tokens, "token_dim": s.token_dim,
                "lowlevel_shape": [4, s.vae_size, s.vae_size]}
        return (_model(case.preset, dims), G.SyntheticGenerator(renderer), G.SyntheticVAEDecoder(renderer), renderer.encode)
    kw = dict(steps=case.generator_steps, guidance=case.guidance, device=device,
              dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    if case.generator == "versatile-diffusion":
        from diffusers import UniPCMultistepScheduler

        gen = G.VersatileDiffusionGenerator(_tiny_unet(cross_attention_dim=16), _tiny_vae(), UniPCMultistepScheduler(),
                                            img2img_input="clip", **kw)
    else:
        gen = G.UnCLIPGenerator(_tiny_unclip_pipe(tmp), img2img_input="standard", **kw)
    encoder = _tiny_clip_encoder(tmp, device) if case.best_of > 1 else None
    return _model(case.preset, TINY_DIMS), gen, gen.lowlevel_decoder(), encoder


def run_case(case: ReconBenchCase, stimuli: int = 8, batch_size: int = 4, device: str | torch.device = "cpu") -> dict:
    """Time ``stimuli`` stimuli (after one untimed batch) through :func:`reconstruct_batch`."""
    from mindeye_dist.reconstruct.brain import ModelBrain

    device = torch.device(device)
    with tempfile.TemporaryDirectory(prefix="bench_recon_") as tmp:
        model, generator, decoder, encoder = _build(case, device, tmp)
        brain = ModelBrain(model.to(device), device)
        n_vox = max(model.config.subject_table().values())
        voxels = torch.randn(stimuli, n_vox, generator=torch.Generator().manual_seed(1))
        subject = torch.zeros(stimuli, dtype=torch.long)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

        def batch(rows, timer):
            with autocast:
                reconstruct_batch(brain, generator, decoder, encoder, voxels[rows], subject[rows], best_of=case.best_of,
                                  strength=case.strength, sampler=case.sampler, steps=case.steps, guidance=1.0,
                                  cls_norm=True, torch_generator=torch.Generator(device).manual_seed(0), timer=timer)

        batch(slice(0, min(batch_size, stimuli)), PhaseTimer(device))  # warm-up: allocations, first-call costs
        timer = PhaseTimer(device)
        t = time.perf_counter()
        for start in range(0, stimuli, batch_size):
            batch(slice(start, start + batch_size), timer)
        seconds = time.perf_counter() - t
    busy = sum(timer.seconds.values()) or 1.0
    share = {k: v / busy for k, v in timer.seconds.items()}
    return {"case": asdict(case), "stimuli": stimuli, "candidates": stimuli * case.best_of, "seconds": seconds,
            "stimuli_per_s": stimuli / seconds, "candidates_per_s": stimuli * case.best_of / seconds,
            "seconds_per_stimulus": seconds / stimuli, "phases_s": timer.seconds, "phase_share": share,
            "load_avg": list(os.getloadavg()), "device": str(device), "torch_threads": torch.get_num_threads()}


def bench_reconstruction(cases=None, stimuli: int = 8, batch_size: int = 4, device: str = "cpu") -> list[dict]:
    """One row per case (names from :data:`CASES`); a case whose optional package is missing is
    reported with ``skipped`` and the reason instead of failing the others."""
    rows = []
    for key in cases or list(CASES):
        try:
            rows.append({"key": key, **run_case(CASES[key], stimuli, batch_size, device)})
        except ImportError as err:  # unCLIP without transformers
            rows.append({"key": key, "case": asdict(CASES[key]), "skipped": f"{type(err).__name__}: {err}"})
    return rows


# --------------------------------------------------------------------------------------------
# Real-size estimate (optional)


def _time_call(fn, device) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


@torch.no_grad()
def real_size_estimate(device: str | torch.device = "cpu", best_of: int = 16, prior_steps: int = 100,
                       unet_steps: int = 17, guidance: bool = True) -> dict:
    """Seconds per image of MindEye1's recipe at real size, from one timed call of each component.

    Defaults: 16 candidates, DDPM 100 prior steps, 17 of 20 UniPC steps (img2img 0.85) with CFG
    (batch doubled), 16 VAE decodes at 512 px, 16 CLIP ViT-L/14 encodes (selection). Random init.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from mindeye_dist.data.encoders import MINDEYE_VAE_CONFIG
    from mindeye_dist.models.prior import PriorNetwork

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prior = PriorNetwork(n_tokens=257, dim=768, depth=6, heads=12, dim_head=64).to(device, dtype).eval()
    brain = torch.randn(best_of, 257, 768, device=device, dtype=dtype)
    t_prior = _time_call(lambda: prior(brain, torch.full((best_of,), 50, device=device), brain), device)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).to(device, dtype).eval()  # SD1 shape
    per_call = 2 if guidance else 1
    lat = torch.randn(per_call, 4, 64, 64, device=device, dtype=dtype)
    ctx = torch.randn(per_call, 257, 768, device=device, dtype=dtype)
    t_unet = _time_call(lambda: unet(lat, 500, encoder_hidden_states=ctx), device)  # one candidate, CFG pair
    del unet
    vae = AutoencoderKL(**MINDEYE_VAE_CONFIG).to(device, dtype).eval()
    t_vae = _time_call(lambda: vae.decode(lat[:1]), device)
    del vae
    import open_clip

    visual = open_clip.create_model("ViT-L-14-quickgelu", pretrained=None).visual.to(device, dtype).eval()
    t_clip = _time_call(lambda: visual(torch.randn(1, 3, 224, 224, device=device, dtype=dtype)), device)
    parts = {"prior": t_prior * prior_steps, "generate": t_unet * unet_steps * best_of + t_vae * best_of,
             "select": t_clip * best_of}
    return {"seconds_per_image": sum(parts.values()), "parts_s": parts,
            "per_call_s": {"prior_batch": t_prior, "unet_cfg_pair": t_unet, "vae_decode_512": t_vae, "clip_l14": t_clip},
            "recipe": {"best_of": best_of, "prior_steps": prior_steps, "unet_steps": unet_steps, "cfg": guidance},
            "device": str(device), "load_avg": list(os.getloadavg()), "method": "one timed call per component x calls per image"}


def format_markdown(rows: list[dict], real: Optional[dict] = None) -> str:
    lines = ["| case | stimuli/s | candidates/s | s/stimulus | prior | generate | other (brain, blurry, select, write) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['case']['name']} | skipped: {r['skipped']} | | | | | |")
            continue
        s = r["phase_share"]
        other = 1.0 - s.get("prior", 0.0) - s.get("generate", 0.0)
        lines.append(f"| {r['case']['name']} | {r['stimuli_per_s']:.2f} | {r['candidates_per_s']:.2f} | "
                     f"{r['seconds_per_stimulus']:.2f} | {s.get('prior', 0):.0%} | {s.get('generate', 0):.0%} | {other:.0%} |")
    loads = sorted({tuple(round(x, 1) for x in r["load_avg"]) for r in rows if "load_avg" in r})
    lines.append("")
    lines.append(f"Load average during the rows: {', '.join(str(list(x)) for x in loads)}; "
                 f"{rows[0].get('device', '')} with {rows[0].get('torch_threads', '?')} torch threads.")
    if real:
        p = real["parts_s"]
        lines.append("")
        lines.append(f"Real-size estimate ({real['device']}, MindEye1 recipe: {real['recipe']}): "
                     f"**{real['seconds_per_image']:.0f} s per image** (prior {p['prior']:.0f} s, generation "
                     f"{p['generate']:.0f} s, selection {p['select']:.0f} s; one timed call per component, load "
                     f"{[round(x, 1) for x in real['load_avg']]}). MindEye2 reports about 12 s per image for its full "
                     "pipeline on a GPU (issue #13).")
    return "\n".join(lines)
