"""The eight reconstruction metrics against independent computations on fixed images and features."""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from mindeye_dist.reconstruct import metrics as M


def _images(n=5, size=64, seed=0):
    """Smooth random images (N, 3, size, size) in [0, 1]: blobs, so resizing keeps structure."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, (size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def test_resize_is_torchvision_resize_without_antialias():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = _images(2, 100)
    for size in (256, 425, 224, (256, 256)):
        want = TF.resize(x, size, interpolation=InterpolationMode.BILINEAR, antialias=False)
        assert torch.allclose(M.resize(x, size), want, atol=1e-6)
    wide = torch.rand(1, 3, 50, 80)
    assert M.resize(wide, 425).shape[-2:] == TF.resize(wide, 425, antialias=False).shape[-2:] == (425, 680)


def test_pixcorr_is_numpys_corrcoef_per_image_and_hits_known_values():
    seen, recon = M.prepare(_images(4, seed=1)), M.prepare(_images(4, seed=2))
    a = M.resize(seen, 425).reshape(4, -1).numpy().astype(np.float64)
    b = M.resize(recon, 425).reshape(4, -1).numpy().astype(np.float64)
    want = np.mean([np.corrcoef(a[i], b[i])[0, 1] for i in range(4)])  # MindEye's loop
    assert M.pixcorr(seen, recon) == pytest.approx(want, abs=1e-9)
    assert M.pixcorr(seen, seen) == pytest.approx(1.0, abs=1e-12)
    assert M.pixcorr(seen, 1.0 - seen) == pytest.approx(-1.0, abs=1e-12)  # an affine map with negative slope
    assert M.pixcorr(seen, 0.5 * seen + 0.25) == pytest.approx(1.0, abs=1e-12)


def _ssim_by_hand(x, y):
    """Wang et al. 2004 with an 11-tap Gaussian (sigma 1.5), population covariances, 5-px border dropped."""
    f = lambda im: ndimage.gaussian_filter(im, 1.5, truncate=3.5, mode="reflect")  # noqa: E731
    ux, uy = f(x), f(y)
    vx, vy, vxy = f(x * x) - ux * ux, f(y * y) - uy * uy, f(x * y) - ux * uy
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s[5:-5, 5:-5].mean()


def test_ssim_matches_a_hand_computation_on_gray_images():
    seen, recon = M.prepare(_images(3, seed=3)), M.prepare(_images(3, seed=4))
    weights = np.array([0.2125, 0.7154, 0.0721])  # skimage rgb2gray (ITU-R BT.709)
    gray = lambda t: np.einsum("nchw,c->nhw", M.resize(t, 425).numpy().astype(np.float64), weights)  # noqa: E731
    want = np.mean([_ssim_by_hand(r, s) for s, r in zip(gray(seen), gray(recon))])
    assert M.ssim(seen, recon) == pytest.approx(want, abs=1e-4)  # skimage filters float32 images in float32
    assert M.ssim(seen, seen) == pytest.approx(1.0, abs=1e-6)
    assert M.ssim(seen, recon) < 0.9


def _mindeye_two_way(reals, preds):
    """MindEye's two_way_identification, verbatim in numpy (Reconstruction_Metrics.py)."""
    r = np.corrcoef(reals, preds)
    r = r[:len(reals), len(reals):]
    congruents = np.diag(r)
    success = r < congruents
    return np.mean(np.sum(success, 0)) / (len(reals) - 1)


def test_two_way_identification_on_hand_made_features():
    real = torch.eye(4) + 0.01 * torch.arange(16.0).reshape(4, 4)
    assert M.two_way_identification(real, real) == 1.0  # every reconstruction is its own best match
    onehot = torch.eye(4)  # distinct rows correlate -1/3 with each other
    # Each reconstruction is another image exactly: that distractor correlates 1 > -1/3 and the
    # rest tie with the congruent -1/3 (a tie is no success), so nothing is identified.
    assert M.two_way_identification(onehot, onehot[[1, 2, 3, 0]]) == 0.0
    # recon 0 = image 0 beats all 3 distractors; recons 1-3 are v = (1, 1, 1, -3), which correlates
    # v_k / 3 with image k: recons 1 and 2 (congruent 1/3) beat only image 3 (-1), recon 3 (congruent -1)
    # beats none. Mean over recons: (3 + 1 + 1 + 0) / (4 * 3).
    recon = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 1, -3], [1.0, 1, 1, -3], [1.0, 1, 1, -3]])
    assert M.two_way_identification(onehot, recon) == pytest.approx(5 / 12)
    assert _mindeye_two_way(onehot.numpy(), recon.numpy()) == pytest.approx(5 / 12)


@pytest.mark.parametrize("seed", [0, 1])
def test_two_way_identification_matches_mindeye_on_random_features(seed):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(37, 500, generator=g)
    recon = 0.6 * real + torch.randn(37, 500, generator=g)
    got = M.two_way_identification(real, recon, chunk=8)  # chunks must not change the answer
    assert got == pytest.approx(_mindeye_two_way(real.numpy().astype(np.float64), recon.numpy().astype(np.float64)))
    assert 0.9 < got <= 1.0


def test_correlation_distance_is_one_minus_pearson():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g)
    want = np.mean([1 - np.corrcoef(a[i].numpy(), b[i].numpy())[0, 1] for i in range(6)])
    assert M.correlation_distance(a, b) == pytest.approx(want, abs=1e-9)
    assert M.correlation_distance(a, a) == pytest.approx(0.0, abs=1e-12)


def test_without_weights_the_network_metrics_are_not_computed_with_reasons():
    seen, recon = _images(4, seed=6), _images(4, seed=7)
    nets = M.build_feature_networks(None)
    res = M.reconstruction_metrics(seen, recon, nets)
    assert res["n"] == 4 and res["pixcorr"] is not None and res["ssim"] is not None
    for metric in ("alexnet2", "alexnet5", "inception", "clip", "effnet", "swav"):
        assert res[metric] is None
        assert "--metrics-weights" in res["not_computed"][metric] and "nothing is downloaded" in res["not_computed"][metric]
    assert "alexnet-owt-7be5be79.pth" in res["not_computed"]["alexnet2"]
    assert res["lower_is_better"] == ["effnet", "swav"]
    json.dumps(res)  # JSON-ready
    with pytest.raises(ValueError, match="unknown"):
        M.build_feature_networks("random", networks=["vgg"])


@pytest.mark.slow  # ~25 s of CPU: builds, saves and runs EfficientNet-B1 and ResNet-50 (pytest -m slow tests/test_recon_metrics.py)
def test_weights_dir_loads_torchvision_and_swav_checkpoints_and_matches_a_direct_forward(tmp_path):
    """EfficientNet-B1 from a state dict, SwAV as the hub checkpoint (module. prefix, projection
    head, no fc): the metric equals the same networks run by hand on MindEye's preprocessing."""
    from torchvision.models import efficientnet_b1, resnet50

    torch.manual_seed(0)
    eff, res50 = efficientnet_b1(weights=None).eval(), resnet50(weights=None).eval()
    torch.save({k: v.half() for k, v in eff.state_dict().items()}, tmp_path / "efficientnet_b1-c27df63c.pth")
    swav = {f"module.{k}": v.half() for k, v in res50.state_dict().items() if not k.startswith("fc.")}
    swav["module.projection_head.0.weight"] = torch.zeros(8, 2048)
    swav["module.prototypes.weight"] = torch.zeros(3, 8)
    torch.save(swav, tmp_path / "swav_800ep_pretrain.pth.tar")
    nets = M.build_feature_networks(str(tmp_path), networks=["effnet", "swav"])
    assert "not requested" in nets["alexnet"] and "weights" in nets["effnet"].description
    seen, recon = _images(2, 64, seed=8), _images(2, 64, seed=9)
    res = M.reconstruction_metrics(seen, recon, nets)

    def by_hand(model, size, x):
        x = M.resize(M.prepare(x), size)
        x = (x - torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(M.IMAGENET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            feats = torch.flatten(model.avgpool(model.features(x) if hasattr(model, "features") else
                                                torch.nn.Sequential(*list(model.children())[:-2])(x)), 1)
        return feats.double().numpy()

    for name, model, size in (("effnet", eff.half().float(), 255), ("swav", res50.half().float(), 224)):
        a, b = by_hand(model, size, seen), by_hand(model, size, recon)
        want = np.mean([1 - np.corrcoef(a[i], b[i])[0, 1] for i in range(2)])
        assert res[name] == pytest.approx(want, abs=1e-4), name
    assert res["alexnet2"] is None and "not requested" in res["not_computed"]["alexnet2"]


def test_random_init_alexnet_layers_and_clip_from_an_open_clip_checkpoint(tmp_path):
    import open_clip

    config = {"embed_dim": 16, "quick_gelu": True,
              "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 56, "head_width": 16},
              "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "metric-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / "metric-tiny-clip.json"))
    torch.manual_seed(1)
    clip = open_clip.create_model("metric-tiny-clip").eval()
    torch.save(clip.state_dict(), tmp_path / "clip_vit_l14.bin")
    nets = M.build_feature_networks(str(tmp_path), networks=["clip"], clip_arch="metric-tiny-clip")
    seen, recon = _images(4, seed=10), _images(4, seed=11)
    feats = nets["clip"].features(M.prepare(seen))["final"]
    with torch.no_grad():  # open_clip's own encode_image on CLIP-normalised 224-px input
        x = M.resize(M.prepare(seen), 224)
        x = (x - torch.tensor(M.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(M.CLIP_STD).view(1, 3, 1, 1)
        assert torch.allclose(feats, clip.encode_image(x), atol=1e-5)
    assert M.reconstruction_metrics(seen, seen, nets)["clip"] == 1.0

    alex = M.build_feature_networks("random", networks=["alexnet"])["alexnet"]
    assert "random init" in alex.description
    out = alex.features(M.prepare(seen[:2]))
    assert out["features.4"].shape == (2, 192 * 31 * 31) and out["features.11"].shape == (2, 256 * 15 * 15)
