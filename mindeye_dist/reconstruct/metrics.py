"""The eight reconstruction metrics every MindEye paper reports, computed as MindEye computes them.

Source: MindEye1 ``src/Reconstruction_Metrics.py`` and MindEye2 ``src/final_evaluations.ipynb``
(identical logic). Ground truth and reconstructions are clamped to [0, 1] and resized to
256 x 256, then per metric (all resizes bilinear without antialiasing, as torchvision <= 0.16 did
on tensors, which both references ran):

=========  ==========================================  ======  ===============================
metric     features                                    resize  score
=========  ==========================================  ======  ===============================
pixcorr    the pixels (RGB, flattened)                 425     mean Pearson r per image
ssim       ``skimage.color.rgb2gray``                  425     mean ``structural_similarity``
alexnet2   AlexNet ``features.4`` (IMAGENET1K_V1)      256     2-way identification
alexnet5   AlexNet ``features.11``                     256     2-way identification
inception  InceptionV3 ``avgpool`` (IMAGENET1K_V1)     342     2-way identification
clip       CLIP ViT-L/14 ``encode_image``              224     2-way identification
effnet     EfficientNet-B1 ``avgpool`` (IMAGENET1K_V2) 255     mean correlation distance (lower)
swav       SwAV ResNet-50 ``avgpool``                  224     mean correlation distance (lower)
=========  ==========================================  ======  ===============================

ImageNet mean/std for the torchvision networks, CLIP's for CLIP. Two-way identification: with
``r[i, j] = corr(real_i, recon_j)``, reconstruction j scores the share of the N - 1 other
images i with ``r[i, j] < r[j, j]``; averaged over j (chance 0.5, every distractor used).

SSIM arguments are MindEye's: ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1.0`` on the 425 x 425 gray images. The references also pass ``multichannel=True``;
scikit-image 0.22 (MindEye2's pin, whose numbers fill the published comparison tables) ignores
that argument, so the published score is the 2-D SSIM of the gray image, which is what we compute.
(A scikit-image that still honoured it would treat the 425 image columns as channels.)

Feature networks come from local weights (:func:`build_feature_networks`): torchvision
constructors with ``weights=None`` plus ``load_state_dict``, open_clip for CLIP. Deliberate
differences: CLIP runs in fp32 on CPU (OpenAI's ``clip.load`` ran it in fp16 on GPU), and with
``weights="random"`` the networks are randomly initialised (tests and the synthetic demo only;
such numbers compare rows of one table, never with papers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

METRICS = ("pixcorr", "ssim", "alexnet2", "alexnet5", "inception", "clip", "effnet", "swav")
LABELS = {"pixcorr": "PixCorr", "ssim": "SSIM", "alexnet2": "AlexNet(2)", "alexnet5": "AlexNet(5)",
          "inception": "InceptionV3", "clip": "CLIP", "effnet": "EffNet-B", "swav": "SwAV"}
LOWER_IS_BETTER = ("effnet", "swav")
PREPARE_SIZE = 256
PIXEL_SIZE = 425
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# metric -> (network, layer, score)
METRIC_FEATURES = {
    "alexnet2": ("alexnet", "features.4", "two_way"), "alexnet5": ("alexnet", "features.11", "two_way"),
    "inception": ("inception", "avgpool", "two_way"), "clip": ("clip", "final", "two_way"),
    "effnet": ("effnet", "avgpool", "distance"), "swav": ("swav", "avgpool", "distance"),
}
NETWORKS = ("alexnet", "inception", "clip", "effnet", "swav")
NETWORK_FILES = {
    "alexnet": ("alexnet.pth", "alexnet-owt-7be5be79.pth"),
    "inception": ("inception_v3.pth", "inception_v3_google-0cc3c7bd.pth"),
    "effnet": ("efficientnet_b1.pth", "efficientnet_b1-c27df63c.pth"),
    "swav": ("swav_resnet50.pth", "swav_800ep_pretrain.pth.tar"),
    "clip": ("clip_vit_l14.pt", "ViT-L-14.pt", "clip_vit_l14.safetensors", "clip_vit_l14.bin"),
}
"""Accepted file names in ``--metrics-weights DIR``: ours, or the file names torch hub / OpenAI use."""
NETWORK_WEIGHTS = {
    "alexnet": "torchvision alexnet IMAGENET1K_V1 state dict", "inception": "torchvision inception_v3 IMAGENET1K_V1",
    "effnet": "torchvision efficientnet_b1 IMAGENET1K_V2 (MindEye's DEFAULT)",
    "swav": "SwAV ResNet-50 (facebookresearch/swav, 800 epochs), loaded into torchvision resnet50",
    "clip": "OpenAI CLIP ViT-L/14 (TorchScript .pt or an open_clip checkpoint)",
}
NETWORK_SIZES = {"alexnet": 256, "inception": 342, "clip": 224, "effnet": 255, "swav": 224}


# --------------------------------------------------------------------------------------------
# Images


def as_float_images(images) -> torch.Tensor:
    """(N, H, W, 3) uint8 or (N, 3, H, W) float -> (N, 3, H, W) float32 in [0, 1] (clamped)."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 255.0
    return x.float().clamp(0, 1)


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """torchvision ``Resize(size)`` on tensors as MindEye ran it: bilinear, no antialias; an int
    sets the shorter side (the other keeps the aspect ratio, truncated), a pair sets both."""
    h, w = x.shape[-2:]
    if isinstance(size, int):
        size = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if tuple(size) == (h, w):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=False)


def prepare(images) -> torch.Tensor:
    """Both references' first step: clamp to [0, 1], ``Resize((256, 256))``."""
    return resize(as_float_images(images), (PREPARE_SIZE, PREPARE_SIZE))


# --------------------------------------------------------------------------------------------
# Scores


def pixcorr(seen: torch.Tensor, recon: torch.Tensor) -> float:
    """Mean per-image Pearson r of the flattened RGB pixels at 425 px (inputs already :func:`prepare`\\ d)."""
    a = resize(seen, PIXEL_SIZE).flatten(1).double()
    b = resize(recon, PIXEL_SIZE).flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    return float(r.mean())


def ssim(seen: torch.Tensor, recon: torch.Tensor) -> float:
    """Mean scikit-image SSIM of the 425-px gray images with MindEye's arguments."""
    from mindeye_dist.compat import require

    require("skimage", "recon", "the SSIM reconstruction metric")
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    gray_seen = rgb2gray(resize(seen, PIXEL_SIZE).permute(0, 2, 3, 1).numpy())
    gray_recon = rgb2gray(resize(recon, PIXEL_SIZE).permute(0, 2, 3, 1).numpy())
    scores = [structural_similarity(rec, im, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
              for im, rec in zip(gray_seen, gray_recon)]
    return float(np.mean(scores))


TIE_TOLERANCE = 1e-12
"""Correlations closer than this count as tied in two-way identification (float64 rounding)."""


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Rows to zero mean and unit norm (float64), so a dot product is a Pearson correlation."""
    x = x.double()
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True)


def two_way_identification(real: torch.Tensor, recon: torch.Tensor, chunk: int = 64) -> float:
    """MindEye's 2-way identification of (N, F) features (N >= 2); see the module docstring.

    ``r[i, j] = corr(real_i, recon_j)``; recon j succeeds against distractor i when
    ``r[i, j] < r[j, j]``; successes over all N - 1 distractors, averaged over j. A NaN
    correlation (a constant feature row) never succeeds, as with ``np.corrcoef``.
    """
    real, recon = real.flatten(1), recon.flatten(1)
    n = real.shape[0]
    if n < 2 or recon.shape[0] != n:
        raise ValueError(f"two-way identification needs N >= 2 paired rows, got {n} and {recon.shape[0]}")
    r = torch.empty(n, n, dtype=torch.float64)
    for i in range(0, n, chunk):  # float64 in chunks: AlexNet(2) features are 184,512-d per image
        zi = _standardise(real[i:i + chunk])
        for j in range(0, n, chunk):
            r[i:i + chunk, j:j + chunk] = zi @ _standardise(recon[j:j + chunk]).T
    congruent = torch.diagonal(r)
    # Per reconstruction j; the diagonal never counts. A tie is no success: correlations equal in
    # exact arithmetic (e.g. -1/3 twice) can come out an ulp apart depending on the CPU's kernels.
    successes = (r < congruent[None, :] - TIE_TOLERANCE).sum(0)
    return float(successes.double().mean() / (n - 1))


def correlation_distance(real: torch.Tensor, recon: torch.Tensor) -> float:
    """Mean ``scipy.spatial.distance.correlation`` (1 - Pearson r) of paired (N, F) features."""
    from scipy.spatial.distance import correlation

    a, b = real.flatten(1).double().numpy(), recon.flatten(1).double().numpy()
    return float(np.mean([correlation(a[i], b[i]) for i in range(len(a))]))


# --------------------------------------------------------------------------------------------
# Feature networks


@dataclass
class FeatureNetwork:
    name: str
    """alexnet, inception, clip, effnet or swav."""
    description: str
    """What it is and where its weights came from."""
    size: int
    """MindEye's resize for this network."""
    extract: Callable[[torch.Tensor], dict]
    """(B, 3, size, size) normalised -> {layer: (B, ...)}."""
    mean: Optional[tuple] = IMAGENET_MEAN
    """Normalisation (None: the extractor takes [0, 1] images)."""
    std: Optional[tuple] = IMAGENET_STD
    device: torch.device = torch.device("cpu")

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 32) -> dict[str, torch.Tensor]:
        """Prepared (N, 3, 256, 256) images -> {layer: (N, F) float32 CPU}."""
        out: dict[str, list] = {}
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else _null()
        for i in range(0, len(images), batch_size):
            x = resize(images[i:i + batch_size], self.size)
            if self.mean is not None:
                x = (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)
            with autocast:
                feats = self.extract(x.to(self.device))
            for k, v in feats.items():
                out.setdefault(k, []).append(v.float().flatten(1).cpu())
        return {k: torch.cat(v) for k, v in out.items()}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _load_state(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _torchvision_network(name: str, path: Optional[str], device: torch.device, seed: int) -> FeatureNetwork:
    from mindeye_dist.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from torchvision import models
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(seed)
    nodes = {"alexnet": ["features.4", "features.11"]}.get(name, ["avgpool"])
    if name == "alexnet":
        model = models.alexnet(weights=None)
    elif name == "inception":  # the pretrained weights come with transform_input=True (torchvision sets it)
        model = models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    elif name == "effnet":
        model = models.efficientnet_b1(weights=None)
    else:
        model = models.resnet50(weights=None)
    if path is not None:
        state = _load_state(path)
        if name == "swav":  # SwAV's hub loader: strip DDP's "module.", drop the projection head, fc unused
            state = {k.removeprefix("module."): v for k, v in state.items()}
            state = {k: v for k, v in state.items() if k in model.state_dict()}
            missing = [k for k in model.state_dict() if k not in state and not k.startswith("fc.")]
            if missing:
                raise ValueError(f"{path} is not a SwAV ResNet-50 checkpoint (missing {missing[:3]})")
            model.load_state_dict(state, strict=False)
        else:
            model.load_state_dict(state, strict=True)
    extractor = create_feature_extractor(model.eval(), return_nodes=nodes).to(device).eval().requires_grad_(False)
    origin = f"weights {path}" if path else f"random init (seed {seed}; not comparable with papers)"
    return FeatureNetwork(name, f"{NETWORK_WEIGHTS[name].split(' (')[0]}: {origin}", NETWORK_SIZES[name], extractor,
                          device=device)


def _clip_network(path: Optional[str], device: torch.device, seed: int, arch: Optional[str],
                  model_config: Optional[str]) -> FeatureNetwork:
    from mindeye_dist.data.encoders import TargetSpec, load_clip_visual

    if path is None:  # random init of the architecture
        import open_clip

        if model_config:
            open_clip.add_model_config(model_config)
        torch.manual_seed(seed)
        visual = open_clip.create_model(arch or "ViT-L-14-quickgelu", pretrained=None).visual.eval().to(device)
        origin = f"random init (seed {seed}; not comparable with papers)"
    else:
        visual = load_clip_visual(TargetSpec(encoder="clip-metric", weights=path, arch=arch, model_config=model_config),
                                  "ViT-L-14-quickgelu", device)
        origin = f"weights {path}"
    visual.requires_grad_(False)
    return FeatureNetwork("clip", f"CLIP {arch or 'ViT-L/14'} encode_image: {origin}", NETWORK_SIZES["clip"],
                          lambda x: {"final": visual(x)}, CLIP_MEAN, CLIP_STD, device)


def synthetic_clip_network(renderer) -> FeatureNetwork:
    """The synthetic world's CLIP (its target map; needs no weights), MindEye's CLIP resize."""
    return FeatureNetwork("clip", "the synthetic subject's target map (its CLIP: image -> latent -> targets)",
                          NETWORK_SIZES["clip"], lambda x: {"final": renderer.encode(x.cpu())}, None, None)


def _find(weights_dir: str, name: str) -> Optional[str]:
    return next((os.path.join(weights_dir, f) for f in NETWORK_FILES[name] if os.path.isfile(os.path.join(weights_dir, f))), None)


def build_feature_networks(weights: Optional[str], device: torch.device | str = "cpu", *, networks=None, renderer=None,
                           clip_arch: Optional[str] = None, clip_model_config: Optional[str] = None,
                           seed: int = 0) -> dict[str, FeatureNetwork | str]:
    """Each network, or the reason it is not available.

    ``weights``: a directory (files named as :data:`NETWORK_FILES`), ``"random"`` (random init), or
    None. ``networks``: the subset to build (others: "not requested"). ``renderer``: a synthetic
    subject's renderer, whose target map is the CLIP network when no CLIP weights are given.
    """
    device = torch.device(device)
    wanted = tuple(networks) if networks else NETWORKS
    unknown = sorted(set(wanted) - set(NETWORKS))
    if unknown:
        raise ValueError(f"--metrics-networks {','.join(unknown)}: unknown; choose from {','.join(NETWORKS)}")
    if weights not in (None, "random") and not os.path.isdir(weights):
        raise FileNotFoundError(f"--metrics-weights {weights} is not a directory (or 'random')")
    out: dict[str, FeatureNetwork | str] = {}
    for name in NETWORKS:
        if name not in wanted:
            out[name] = f"not requested (--metrics-networks {','.join(wanted)})"
            continue
        path = _find(weights, name) if weights not in (None, "random") else None
        if name == "clip" and renderer is not None and path is None:
            out[name] = synthetic_clip_network(renderer)
        elif path is None and weights != "random":
            where = f"{weights}/" if weights else "a --metrics-weights DIR with "
            out[name] = (f"no pretrained weights: needs {where}{' or '.join(NETWORK_FILES[name])} "
                         f"({NETWORK_WEIGHTS[name]}); nothing is downloaded")
        elif name == "clip":
            out[name] = _clip_network(path, device, seed, clip_arch, clip_model_config)
        else:
            out[name] = _torchvision_network(name, path, device, seed)
    return out


# --------------------------------------------------------------------------------------------


def reconstruction_metrics(seen, recon, networks: Optional[dict] = None, batch_size: int = 32) -> dict:
    """The eight metrics for paired images (uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1]).

    Returns ``{metric: float or None, "not_computed": {metric: reason}, "feature_networks":
    {network: description}, "lower_is_better": [...], "n": N}``.
    """
    seen_p, recon_p = prepare(seen), prepare(recon)
    if seen_p.shape[0] != recon_p.shape[0]:
        raise ValueError(f"{seen_p.shape[0]} seen images but {recon_p.shape[0]} reconstructions")
    result: dict = {"n": int(seen_p.shape[0]), "pixcorr": pixcorr(seen_p, recon_p), "ssim": ssim(seen_p, recon_p)}
    not_computed: dict[str, str] = {}
    described: dict[str, str] = {}
    networks = networks or {}
    cache: dict[str, tuple[dict, dict]] = {}
    for metric, (net_name, layer, score) in METRIC_FEATURES.items():
        net = networks.get(net_name, "no feature network given")
        if isinstance(net, str):
            result[metric], not_computed[metric] = None, net
            continue
        if net_name not in cache:
            cache[net_name] = (net.features(seen_p, batch_size), net.features(recon_p, batch_size))
            described[net_name] = net.description
        real, fake = (feats[layer] for feats in cache[net_name])
        result[metric] = two_way_identification(real, fake) if score == "two_way" else correlation_distance(real, fake)
    result.update(not_computed=not_computed, feature_networks=described, lower_is_better=list(LOWER_IS_BETTER))
    return result
