"""Frozen image encoders whose outputs become dataset fields (``prepare_data.py targets``).

Every encoder takes a batch of images ``(B, 3, H, W)`` float in [0, 1] and returns ``(B, *shape)``.
Weights always come from a local path; nothing is downloaded (``HF_HUB_OFFLINE=1`` holds).

==========================  ======  ===========  =====================================================
name                        field   shape        what MindEye computes (digest 1.4, 1.5, 6.2, 8.10)
==========================  ======  ===========  =====================================================
``clip-l14-mindeye1``       targets 257 x 768    OpenAI ViT-L/14: ``ln_post`` on all 257 tokens, then
                                                 ``@ proj``, all divided by the CLS token's L2 norm
                                                 (``Clipper(hidden_state=True, norm_embs=True)``); input
                                                 resized (shorter side 224, bicubic), centre-cropped,
                                                 CLIP mean/std
``bigg14-mindeye2``         targets 256 x 1664   OpenCLIP ViT-bigG/14: the 256 patch tokens after
                                                 ``ln_post``, no projection, no CLS, not normalised
                                                 (``FrozenOpenCLIPImageEmbedder(output_tokens=True,
                                                 only_tokens=True)``); resized to 224 (bicubic), then
                                                 ``(x + 1) / 2`` *on [0, 1] images* -- MindEye2's input-
                                                 range quirk, kept so targets match its checkpoints --
                                                 then CLIP mean/std
``sd-vae-mindeye1``         vae     4 x 64 x 64  SD VAE (``sd_image_var_autoenc.pth``) at 512 px
                                                 (bilinear, antialias): ``encode(2x - 1).latent_dist
                                                 .mode() * 0.18215``
``sd-vae-mindeye2``         vae     4 x 28 x 28  the same VAE at 224 px (MindEye2 trains on 224 px images)
``teacher``                 teacher N x F        a ConvNeXt feature map as tokens for SoftCont: any
                                                 ``torch.export`` program (``.pt2``) mapping normalised
                                                 ``(B, 3, S, S)`` (ImageNet mean, MindEye's std 0.228,
                                                 0.224, 0.225) to ``(B, N, F)`` or ``(B, F, h, w)``;
                                                 S = 224 (MindEye2) unless ``image_size``
==========================  ======  ===========  =====================================================

Deliberate differences: resizing uses torch's antialiased bicubic/bilinear (MindEye1's
torchvision tensor Resize had no antialias and saw 256-px images; MindEye2's kornia resize uses
its own antialias blur), so targets differ from the references' by interpolation detail only.

The real teacher (VICRegL ConvNeXt-XL, ``convnext_xlarge_alpha0.75_fullckpt.pth``) is exported
once with MindEye2's ``src/autoencoder/convnext.py``::

    net = ConvnextXL("convnext_xlarge_alpha0.75_fullckpt.pth").eval()
    wrapped = lambda x: net(x)[1]            # (B, 49, 512): maps_projector of the 7x7 map at 224 px
    ep = torch.export.export(Wrap(wrapped), (torch.randn(2, 3, 224, 224),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, "convnext_xl_teacher.pt2")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mindeye_dist.compat import ensure_torchvision_importable
from mindeye_dist.data.errors import DataError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEACHER_MEAN = (0.485, 0.456, 0.406)
TEACHER_STD = (0.228, 0.224, 0.225)  # MindEye's value (ImageNet's first std is 0.229), kept for faithfulness
VAE_SCALE = 0.18215  # SD1's latent scale, hard-coded by both MindEye versions
MINDEYE_VAE_CONFIG = {  # sd_image_var_autoenc.pth (MindEye1 train_autoencoder.py, MindEye2 Train.ipynb)
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 256,
}


@dataclass
class TargetSpec:
    """One target field to compute: which encoder, from which local weights."""

    encoder: str
    """Encoder name (see ENCODERS)."""
    weights: str
    """Local weights file or folder."""
    field: Optional[str] = None
    """Field to write; None: the encoder's default (targets, vae, teacher)."""
    batch_size: int = 32
    """Images per forward pass."""
    arch: Optional[str] = None
    """open_clip architecture override (default ViT-L-14-quickgelu / ViT-bigG-14)."""
    model_config: Optional[str] = None
    """open_clip model-config JSON (file or folder) to register, or a diffusers VAE config JSON for a .pth VAE."""
    image_size: Optional[int] = None
    """Teacher input size override (MindEye1's low-level teacher saw 512 px)."""
    device: str = "auto"
    """auto: cuda:LOCAL_RANK when available, else cpu."""
    replace: bool = False
    """Recompute a field the dataset already has."""


@dataclass
class Encoder:
    """A built encoder: ``fn`` maps (B, 3, H, W) [0, 1] -> (B, *shape) float32."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    description: str
    details: dict = field(default_factory=dict)


def _check_weights(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"--weights {path} does not exist; weights are read from local files only (no hub downloads)")


def resize_short_side_and_crop(x: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size): shorter side to ``size``, centre crop (torchvision's Resize+CenterCrop)."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, (nh, nw), mode=mode, align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top:top + size, left:left + size]


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------------------------
# CLIP (open_clip)


def _is_torchscript(path: str) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def load_clip_visual(spec: TargetSpec, default_arch: str, device: torch.device) -> torch.nn.Module:
    """The vision tower of an open_clip architecture with weights from ``spec.weights``: an open_clip
    checkpoint (``.safetensors``, ``.bin``: loaded with weights_only) or OpenAI's TorchScript
    archive (``ViT-L-14.pt``, the weights behind HF's openai/clip-vit-large-patch14)."""
    ensure_torchvision_importable()
    import open_clip

    _check_weights(spec.weights)
    if spec.model_config:
        open_clip.add_model_config(spec.model_config)
    arch = spec.arch or default_arch
    if arch not in open_clip.list_models():
        raise DataError(f"open_clip has no architecture {arch!r}; register its config with --model-config")
    if os.path.isdir(spec.weights):
        raise DataError(f"--weights {spec.weights} is a folder; give the checkpoint file (open_clip .safetensors/.bin, "
                        "or OpenAI's ViT-L-14.pt). Hugging Face transformers folders are not read")
    if _is_torchscript(spec.weights):
        model = open_clip.create_model(arch, pretrained=None)
        state = torch.jit.load(spec.weights, map_location="cpu").state_dict()
        for k in ("input_resolution", "context_length", "vocab_size"):
            state.pop(k, None)
        model.load_state_dict(state, strict=True)
    else:
        try:
            model = open_clip.create_model(arch, pretrained=spec.weights)
        except RuntimeError as err:
            raise DataError(f"--weights {spec.weights} does not fit open_clip architecture {arch!r} ({str(err)[:300]}); "
                            "pass the matching --arch") from err
    visual = model.visual
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False) or not hasattr(visual, "ln_post"):
        raise DataError(f"{arch}: only plain CLIP ViTs (ln_post over all tokens) give MindEye's token targets")
    del model  # the text tower is not needed
    return visual.eval().requires_grad_(False).to(device)


def _ln_post_tokens(visual: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N, W): every token after ``ln_post`` (captured by a hook; open_clip returns only
    the pooled CLS through ``proj``, or the patch tokens without it)."""
    out = {}
    hook = visual.ln_post.register_forward_hook(lambda _m, _i, o: out.__setitem__("tokens", o))
    try:
        visual(x)
    finally:
        hook.remove()
    return out["tokens"]


def clip_l14_mindeye1(spec: TargetSpec, device: torch.device) -> Encoder:
    visual = load_clip_visual(spec, "ViT-L-14-quickgelu", device)
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = _normalise(resize_short_side_and_crop(x, size), CLIP_MEAN, CLIP_STD)
        tokens = _ln_post_tokens(visual, x) @ visual.proj  # (B, 257, 768)
        return tokens / tokens[:, :1].norm(dim=-1, keepdim=True)  # MindEye1 norm_embs: all tokens / ||CLS||

    return Encoder(fn, "MindEye1 CLIP ViT-L/14 hidden tokens: ln_post(all tokens) @ proj / ||CLS||",
                   {"arch": spec.arch or "ViT-L-14-quickgelu", "input": f"[0,1], resize {size} bicubic + centre crop, CLIP mean/std"})


def bigg14_mindeye2(spec: TargetSpec, device: torch.device) -> Encoder:
    visual = load_clip_visual(spec, "ViT-bigG-14", device)
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, (size, size), mode="bicubic", align_corners=True, antialias=True)
        x = (x + 1.0) / 2.0  # MindEye2's quirk: the embedder maps [-1, 1] to [0, 1], but is fed [0, 1] images
        return _ln_post_tokens(visual, _normalise(x, CLIP_MEAN, CLIP_STD))[:, 1:]  # (B, 256, 1664), no CLS, no proj

    return Encoder(fn, "MindEye2 OpenCLIP ViT-bigG/14 patch tokens after ln_post (no CLS, no proj, not normalised)",
                   {"arch": spec.arch or "ViT-bigG-14", "input": f"[0,1] resized to {size} (bicubic), then (x+1)/2 (MindEye2's quirk), CLIP mean/std"})


# --------------------------------------------------------------------------------------------
# SD VAE (diffusers)


def load_vae(spec: TargetSpec, device: torch.device):
    """A diffusers AutoencoderKL: a ``save_pretrained`` folder, or a state-dict file such as MindEye's
    ``sd_image_var_autoenc.pth`` with MindEye's config (``model_config``: another config JSON).
    The file is re-saved as a diffusers folder and loaded through ``from_pretrained``, which
    renames the attention keys of checkpoints from older diffusers versions."""
    import json
    import tempfile

    ensure_torchvision_importable()
    from diffusers import AutoencoderKL

    _check_weights(spec.weights)
    if os.path.isdir(spec.weights):
        vae = AutoencoderKL.from_pretrained(spec.weights, local_files_only=True)
    else:
        if spec.weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(spec.weights)
        else:
            state = torch.load(spec.weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        config = dict(MINDEYE_VAE_CONFIG)
        if spec.model_config:
            with open(spec.model_config) as f:
                config = json.load(f)
        with tempfile.TemporaryDirectory(prefix="mindeye_vae_") as tmp:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({**config, "_class_name": "AutoencoderKL"}, f)
            torch.save(state, os.path.join(tmp, "diffusion_pytorch_model.bin"))
            vae = AutoencoderKL.from_pretrained(tmp, local_files_only=True, use_safetensors=False)
    return vae.eval().requires_grad_(False).to(device)


def _sd_vae(size: int, version: str):
    def build(spec: TargetSpec, device: torch.device) -> Encoder:
        vae = load_vae(spec, device)

        def fn(x: torch.Tensor) -> torch.Tensor:
            x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)
            return vae.encode(2 * x - 1).latent_dist.mode() * VAE_SCALE

        return Encoder(fn, f"{version} SD VAE latents at {size} px: encode(2x-1).latent_dist.mode() * {VAE_SCALE}", {"size": size})

    return build


# --------------------------------------------------------------------------------------------
# Low-level teacher (SoftCont)


def teacher(spec: TargetSpec, device: torch.device) -> Encoder:
    _check_weights(spec.weights)
    try:
        net = torch.export.load(spec.weights).module()
    except Exception as err:  # noqa: BLE001 - anything else is not a .pt2 program
        raise DataError(f"--weights {spec.weights} is not a torch.export program (.pt2): {type(err).__name__}: {str(err)[:200]}. "
                        "Export the teacher once (see mindeye_dist/data/encoders.py)") from err
    net = net.to(device)
    size = spec.image_size or 224

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = _normalise(F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True), TEACHER_MEAN, TEACHER_STD)
        try:
            out = net(x)
        except Exception as err:  # noqa: BLE001 - a guard of the exported program
            raise DataError(f"teacher {spec.weights} failed on a ({tuple(x.shape)}) batch ({str(err)[:200]}); export it with a "
                            "dynamic batch dimension and the input size given by --image-size") from err
        if out.ndim == 4:  # (B, F, h, w) feature map -> (B, h*w, F) tokens
            out = out.flatten(2).transpose(1, 2)
        if out.ndim != 3:
            raise DataError(f"teacher {spec.weights} returned shape {tuple(out.shape)}; expected (B, N, F) or (B, F, h, w)")
        return out

    return Encoder(fn, "low-level teacher feature tokens (SoftCont), torch.export program",
                   {"size": size, "input": "ImageNet mean, MindEye std (0.228, 0.224, 0.225)"})


ENCODERS: dict[str, tuple[str, Callable[[TargetSpec, torch.device], Encoder], str]] = {
    "clip-l14-mindeye1": ("targets", clip_l14_mindeye1,
                          "CLIP ViT-L/14 ln_post(all 257 tokens) @ proj / ||CLS|| (MindEye1); input resize 224 + centre crop, CLIP mean/std"),
    "bigg14-mindeye2": ("targets", bigg14_mindeye2,
                        "OpenCLIP ViT-bigG/14 256 patch tokens after ln_post, no CLS/proj/normalisation (MindEye2); "
                        "input [0,1] resized to 224, then (x+1)/2 as MindEye2 does, CLIP mean/std"),
    "sd-vae-mindeye1": ("vae", _sd_vae(512, "MindEye1"), "SD VAE encode(2x-1).latent_dist.mode() * 0.18215 at 512 px -> 4x64x64"),
    "sd-vae-mindeye2": ("vae", _sd_vae(224, "MindEye2"), "SD VAE encode(2x-1).latent_dist.mode() * 0.18215 at 224 px -> 4x28x28"),
    "teacher": ("teacher", teacher, "low-level teacher tokens (torch.export program), ImageNet mean, std (0.228, 0.224, 0.225)"),
}
"""name -> (default field, builder, what it computes)."""
