"""The diffusion generators with tiny randomly initialised diffusers models saved as pipeline folders:
Versatile Diffusion (image_unet + vae + scheduler) and Stable unCLIP img2img (with a tiny CLIP text
encoder and a hand-written tokenizer vocabulary), end to end through reconstruct() on the ridge
brain (no training needed), best-of-k by a tiny open_clip encoder, and unCLIP checked against
diffusers' own ``StableUnCLIPImg2ImgPipeline.__call__``."""

import json

import pytest
import torch

from mindeye_dist.reconstruct import ReconstructConfig, reconstruct
from mindeye_dist.reconstruct import output as O

TOKENS, DIM = 5, 16  # a tiny ViT (28 px, 14-px patches): CLS + 2x2 patches, 16-d projection
TINY_VIT = {"embed_dim": DIM, "quick_gelu": True,
            "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "patch_size": 14, "head_width": 16},
            "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}}


def _unet(**kw):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=4, **kw)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny synthetic dataset with 5 x 16 targets, the two pipeline folders and a tiny CLIP."""
    import open_clip
    from diffusers import DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, VersatileDiffusionImageVariationPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from mindeye_dist.data import build_synthetic_dataset

    root = tmp_path_factory.mktemp("diffusers")
    build_synthetic_dataset("tiny", str(root / "data"), seed=2, progress=False, n_tokens=TOKENS, token_dim=DIM, n_train=96,
                            n_test=8)
    torch.manual_seed(0)
    VersatileDiffusionImageVariationPipeline(image_feature_extractor=None, image_encoder=None,
                                             image_unet=_unet(cross_attention_dim=DIM), vae=_vae(),
                                             scheduler=DDIMScheduler()).save_pretrained(root / "vd")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate("abc")}}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1))
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=DIM)
    with torch.no_grad():  # statistics of some embedding distribution, as a trained unCLIP ships
        normalizer.mean.copy_(torch.randn(1, DIM) * 0.5)
        normalizer.std.copy_(torch.rand(1, DIM) + 0.5)
    StableUnCLIPImg2ImgPipeline(
        feature_extractor=None, image_encoder=None, image_normalizer=normalizer,
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), tokenizer=tokenizer, text_encoder=text,
        unet=_unet(cross_attention_dim=32, class_embed_type="projection", projection_class_embeddings_input_dim=2 * DIM),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                prediction_type="v_prediction", set_alpha_to_one=False, clip_sample=False),
        vae=_vae()).save_pretrained(root / "unclip")
    (root / "tiny-vit-recon.json").write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(str(root / "tiny-vit-recon.json"))
    torch.save(open_clip.create_model("tiny-vit-recon").state_dict(), root / "clip.bin")
    return root


def _cfg(world, out, **kw):
    base = dict(out=str(out), brain="ridge", data_url=str(world / "data"), generator="versatile-diffusion",
                weights=str(world / "vd"), best_of=2, generator_steps=4, limit=4, batch_size=2, progress=False,
                clip_weights=str(world / "clip.bin"), clip_arch="tiny-vit-recon",
                clip_model_config=str(world / "tiny-vit-recon.json"))
    return ReconstructConfig(**{**base, **kw})


def test_versatile_diffusion_end_to_end_with_best_of_k(world, tmp_path):
    summary = reconstruct(_cfg(world, tmp_path / "vd"))
    entries = O.read_index(tmp_path / "vd")
    assert len(entries) == 4 and summary["generator"]["name"] == "versatile-diffusion"
    assert summary["generator"]["scheduler"] == "UniPCMultistepScheduler"  # MindEye1 swaps UniPC in
    assert summary["generator"]["img2img_input"] == "clip"  # MindEye1's CLIP-normalised blurry image
    seen, recon, _ = O.load_pairs(tmp_path / "vd")
    assert recon.shape[1:] == (16, 16, 3)  # UNet sample 8 x VAE factor 2
    for e in entries:
        assert len(e["scores"]) == 2 and e["recon"] == e["candidates"][max(range(2), key=e["scores"].__getitem__)]
        assert (tmp_path / "vd" / e["blurry"]).is_file()  # the tiny VAE decoded the ridge's latent prediction


def test_img2img_strength_zero_is_the_blurry_image_and_one_ignores_it(world, tmp_path):
    zero = reconstruct(_cfg(world, tmp_path / "s0", img2img_strength=0.0))
    for e in O.read_index(zero["out"]):
        assert len(e["candidates"]) == 1
        assert (tmp_path / "s0" / e["recon"]).read_bytes() == (tmp_path / "s0" / e["blurry"]).read_bytes()
    from mindeye_dist.reconstruct.generators import VersatileDiffusionGenerator

    gen = VersatileDiffusionGenerator.from_folder(str(world / "vd"), steps=4, guidance=3.5, img2img_input="standard",
                                                  device=torch.device("cpu"), dtype=torch.float32)
    tokens = torch.randn(2, TOKENS, DIM)
    init_a, init_b = torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16)

    def run(init, strength):
        return gen.generate(tokens, init, strength, torch.Generator().manual_seed(0))

    assert torch.equal(run(init_a, 1.0), run(init_b, 1.0))  # strength 1: the init image plays no part
    assert not torch.allclose(run(init_a, 0.5), run(init_b, 0.5))


def test_unclip_generator_equals_the_diffusers_pipeline_call(world):
    """From noise (strength 1) our loop is the pipeline's: same draws, same embeddings, same steps."""
    from diffusers import StableUnCLIPImg2ImgPipeline

    from mindeye_dist.reconstruct.generators import UnCLIPGenerator

    gen = UnCLIPGenerator.from_folder(str(world / "unclip"), steps=3, guidance=5.0, noise_level=100,
                                      img2img_input="standard", device=torch.device("cpu"), dtype=torch.float32)
    tokens = torch.randn(2, TOKENS, DIM)
    ours = gen.generate(tokens, None, 1.0, torch.Generator().manual_seed(3))
    pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(str(world / "unclip"), feature_extractor=None, image_encoder=None,
                                                       local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    # __call__ reads the image encoder's dtype even when given image_embeds; a tiny one is enough.
    pipe.register_modules(image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, image_size=14, patch_size=7,
        projection_dim=DIM)))
    pooled = tokens[:, 0] / tokens[:, 0].norm(dim=-1, keepdim=True) * gen.embed_norm
    theirs = pipe(prompt=[""] * 2, image_embeds=pooled, num_inference_steps=3, guidance_scale=5.0, noise_level=100,
                  height=16, width=16, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_unclip_end_to_end_mindeye2_style(world, tmp_path):
    summary = reconstruct(_cfg(world, tmp_path / "u", generator="unclip", weights=str(world / "unclip"), best_of=1,
                               img2img_strength=1.0, sampler="ddim", blurry_blend=0.25))
    assert summary["generator"]["name"] == "unclip" and summary["finished"] == 4
    assert summary["generator"]["guidance"] == 5.0  # MindEye2's CFG by default
