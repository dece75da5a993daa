"""Reconstruction in the synthetic world: the renderer, launchers/reconstruct.py end to end on a
tiny trained run (contract, determinism, resume, controls), evaluate.py --recon, the TensorBoard grid.

The two-rank run is in the slow tier: ``pytest -m slow tests/test_reconstruct.py``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mindeye_dist.data.render import SyntheticRenderer
from mindeye_dist.data.synthetic import SyntheticSubject
from mindeye_dist.errors import ConfigError
from mindeye_dist.reconstruct import ReconstructConfig, reconstruct
from mindeye_dist.reconstruct import metrics as M
from mindeye_dist.reconstruct import output as O

REPO = Path(__file__).resolve().parents[1]


def _launcher(name):
    """A launcher module by path (launchers/ is not a package; keeps sys.path untouched)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"launcher_{name}", REPO / "launchers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def subject():
    s = SyntheticSubject("tiny", 3)
    return s, SyntheticRenderer(s)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run (prior and low-level head on) on a tiny synthetic dataset."""
    from mindeye_dist.data import build_synthetic_dataset

    root = tmp_path_factory.mktemp("recon")
    data = root / "data"
    build_synthetic_dataset("tiny", str(data), seed=5, progress=False)
    run = root / "run"
    proc = subprocess.run([sys.executable, str(REPO / "launchers/train.py"), "--config", str(REPO / "launchers/configs/tiny.yaml"),
                           f"data.url={data}", f"run.dir={run}", "train.max_steps=6", "checkpoint.every_steps=6"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, run


def _cfg(out, run, **kw):
    base = dict(out=str(out), run=str(run), sampler="ddim", steps=10, best_of=3, limit=10, batch_size=4, progress=False)
    return ReconstructConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------ renderer


def test_renderer_inverts_every_map_of_the_subject(subject):
    s, r = subject
    z = torch.as_tensor(s.latents("test")[:20])
    images = torch.from_numpy(s.images(z.numpy())).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(r.targets(z), torch.as_tensor(s.targets(z.numpy())), atol=1e-10)  # torch == numpy maps
    assert (r.image_latents(images) - z).abs().max() < 0.1  # uint8 rounding only
    assert (r.vae_latents(torch.as_tensor(s.vae(z.numpy()))) - z).abs().max() < 0.1
    assert (r.token_latents(torch.as_tensor(s.targets(z.numpy()))) - z).norm(dim=1).median() < 0.05
    assert torch.allclose(r.encode(images), torch.as_tensor(s.targets(z.numpy())).float(), atol=0.05)  # the world's CLIP
    assert torch.equal(r.render(z), images)  # the renderer is the subject's image map


def test_better_tokens_give_better_pictures_and_true_tokens_beat_shuffled(subject):
    s, r = subject
    z = torch.as_tensor(s.latents("test")[:16])
    seen = torch.from_numpy(s.images(z.numpy())).permute(0, 3, 1, 2).float() / 255
    tokens = torch.as_tensor(s.targets(z.numpy())).float()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(tokens.shape, generator=g) * tokens.std()
    errors = [((r.generate(tokens + level * noise) - seen) ** 2).mean().item() for level in (0.0, 0.1, 0.3, 1.0)]
    assert errors == sorted(errors) and errors[0] < 1e-3  # monotone in the prediction error

    true = M.reconstruction_metrics(seen, r.generate(tokens), {"clip": M.synthetic_clip_network(r)})
    shuffled = M.reconstruction_metrics(seen, r.generate(tokens[torch.roll(torch.arange(16), 1)]),
                                        {"clip": M.synthetic_clip_network(r)})
    assert true["pixcorr"] > 0.9 > 0.3 > shuffled["pixcorr"]
    assert true["ssim"] > shuffled["ssim"]
    assert true["clip"] > 0.95 and shuffled["clip"] < 0.8


def test_img2img_strength_moves_from_the_init_image_to_the_tokens(subject):
    s, r = subject
    z = torch.as_tensor(s.latents("test")[:6])
    tokens = torch.as_tensor(s.targets(z.numpy())).float()
    init = r.render(torch.zeros_like(z))  # a grey "blurry" image
    target = r.render(z)
    dist = [((r.generate(tokens, init, strength) - target) ** 2).mean().item() for strength in (0.0, 0.5, 1.0)]
    assert dist[0] > dist[1] > dist[2]
    assert torch.equal(r.generate(tokens, init, 0.0), init)


# ------------------------------------------------------------------------------------------ the run


def test_reconstruct_contract_determinism_and_resume(trained, tmp_path):
    data, run = trained
    out = tmp_path / "rec"
    summary = reconstruct(_cfg(out, run))
    entries = O.read_index(out)
    assert [e["id"]["row"] for e in entries] == list(range(10)) and summary["finished"] == 10
    for e in entries:
        assert set(e) >= {"id", "seen", "recon", "blurry", "candidates", "scores"}
        assert e["id"]["split"] == "test" and e["id"]["index"] == e["id"]["row"]
        assert all((out / p).is_file() for p in [e["seen"], e["blurry"], *e["candidates"]])
        assert len(e["candidates"]) == 3 and e["recon"] == e["candidates"][int(np.argmax(e["scores"]))]
    seen, recon, _ = O.load_pairs(out)
    assert seen.shape == recon.shape == (10, 32, 32, 3)
    from mindeye_dist.data import build_eval_loader, read_meta
    from mindeye_dist.config import DataConfig

    truth = next(iter(build_eval_loader(DataConfig(url=str(data)), "test", 10, meta=read_meta(str(data)))))
    assert np.array_equal(seen, truth.images.numpy())  # the seen images are the split's, in row order
    assert (out / "grid.png").is_file() and json.loads((out / "timing.json").read_text())["phases_s"]["prior"] > 0

    # An interrupted run: the last batch (rows 8, 9) never reached the index. The rerun redoes only it,
    # and the pictures are the same bytes (batches are seeded by their index, not by who ran them).
    before = {p: (out / p).read_bytes() for e in entries[8:] for p in e["candidates"]}
    (out / O.INDEX).write_text("".join(json.dumps(e) + "\n" for e in entries[:8]))
    for p in before:
        (out / p).unlink()
    again = reconstruct(_cfg(out, run))
    assert again["done_before"] == 8 and again["timing"]["stimuli"] == 2 and again["finished"] == 10
    assert all((out / p).read_bytes() == b for p, b in before.items())
    assert reconstruct(_cfg(out, run))["timing"]["stimuli"] == 0  # finished: nothing to do

    with pytest.raises(ConfigError, match="other settings.*best_of"):
        reconstruct(_cfg(out, run, best_of=2))
    assert reconstruct(_cfg(out, run, best_of=1, overwrite=True))["finished"] == 10
    assert all(len(e["candidates"]) == 1 and e["scores"] is None for e in O.read_index(out))


def test_shuffled_control_and_the_ridge_floor(trained, tmp_path):
    data, run = trained
    shuffled = reconstruct(_cfg(tmp_path / "shuf", run, shuffle_brain=True, best_of=1, limit=8))
    rows = [(e["id"]["row"], e["brain_row"]) for e in O.read_index(shuffled["out"])]
    assert all(row != src for row, src in rows) and sorted(src for _, src in rows) == list(range(8))
    ridge = reconstruct(ReconstructConfig(out=str(tmp_path / "ridge"), brain="ridge", data_url=str(data), best_of=2,
                                          limit=8, progress=False))
    assert ridge["brain"]["kind"] == "ridge" and ridge["brain"]["alpha_vae"] is not None
    assert all(e["blurry"] and len(e["candidates"]) == 2 for e in O.read_index(ridge["out"]))


def test_evaluate_cli_adds_recon_metrics_to_the_run_json(trained, tmp_path):
    data, run = trained
    out = tmp_path / "rec"
    reconstruct(_cfg(out, run, best_of=1))
    metrics = tmp_path / "m.json"
    rc = _launcher("evaluate").main(["--run", str(run), "--recon", str(out), "--way", "16", "--loops", "2", "--out", str(metrics)])
    assert rc == 0
    res = json.loads(metrics.read_text())
    assert 0 <= res["retrieval"]["image_top1"] <= 1  # the retrieval contract is intact
    rec = res["recon"]
    assert set(M.METRICS) <= set(rec) and rec["n"] == 10
    assert -1 <= rec["pixcorr"] <= 1 and 0 <= rec["ssim"] <= 1 and 0 <= rec["clip"] <= 1  # CLIP = the world's target map
    assert "target map" in rec["feature_networks"]["clip"]
    for metric in ("alexnet2", "alexnet5", "inception", "effnet", "swav"):
        assert rec[metric] is None and "--metrics-weights" in rec["not_computed"][metric]
    report = (out / "report.md").read_text()
    assert "| PixCorr↑ |" in report and "grid.png" in report and (out / "report.html").is_file()


def test_bad_inputs_fail_with_the_fix(trained, tmp_path):
    _, run = trained
    main = _launcher("reconstruct").main
    assert main(["--out", str(tmp_path / "x"), "--run", str(run), "--generator", "versatile-diffusion"]) == 2
    assert _launcher("evaluate").main(["--recon", str(tmp_path / "missing")]) == 2  # no index.jsonl: says how to make it
    with pytest.raises(ConfigError, match="--weights"):
        ReconstructConfig(out="x", run="r", generator="unclip")
    with pytest.raises(ConfigError, match="--steps applies to --sampler ddim"):
        ReconstructConfig(out="x", run="r", steps=20)
    with pytest.raises(ConfigError, match="--best-of 3 .* --clip-weights"):
        from mindeye_dist.reconstruct.scoring import build_candidate_encoder

        build_candidate_encoder(ReconstructConfig(out="x", run="r", best_of=3), torch.device("cpu"))


def test_demo_step_reconstructs_ours_and_both_floors(trained, tmp_path):
    import argparse

    data, run = trained
    args = argparse.Namespace(recon_n=6, recon_best_of=2, metrics_weights=None, data_url=str(data))
    res = _launcher("demo").reconstruct_step(args, tmp_path, run, "test")
    assert set(res["metrics"]) == {"mindeye_dist (ours)", "shuffled-brain control", "ridge baseline"}
    for row in res["metrics"].values():
        assert row["n"] == 6 and row["alexnet2"] is not None and row["clip"] is not None  # random AlexNet, the world's CLIP
        assert row["inception"] is None and "skipped in the CPU demo" in row["not_computed"]["inception"]
    report = (tmp_path / "recon" / "report.md").read_text()
    assert "| shuffled-brain control |" in report and "model/grid.png" in report


def test_reconstruction_grid_for_tensorboard(trained):
    data, run = trained
    from mindeye_dist.data import build_eval_loader, read_meta
    from mindeye_dist.evaluate import load_run_model
    from mindeye_dist.reconstruct import image_models_for, reconstruction_grid

    model, cfg, meta, _ = load_run_model(str(run))
    batch = next(iter(build_eval_loader(cfg.data, "val", 8, meta=meta)))
    generator, decoder = image_models_for(read_meta(str(data)))
    model.train()
    grid = reconstruction_grid(model, batch, generator, decoder, n=5, cell=16, pad=2)
    assert model.training  # restored
    assert grid.dtype == np.uint8 and grid.shape == (3 * 16 + 2 * 2, 5 * 16 + 4 * 2, 3)  # seen | blurry | recon
    assert not np.array_equal(grid[:16], grid[-16:])
    seen_only = reconstruction_grid(model, batch, None, None, n=2, cell=16, pad=2)
    assert seen_only.shape == (16, 2 * 16 + 2, 3)
    # a bf16 run's weights (validation of bf16 training draws this grid): same layout, close pictures
    import copy

    import torch

    low = copy.deepcopy(model).to(torch.bfloat16)
    grid_bf16 = reconstruction_grid(low, batch, generator, decoder, n=5, cell=16, pad=2)
    assert grid_bf16.shape == grid.shape
    assert np.abs(grid_bf16[:16].astype(int) - grid[:16].astype(int)).max() == 0  # the seen row is the data


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_split_the_stimuli_and_match_one_rank(trained, tmp_path):
    """``torchrun --nproc_per_node 2``: each rank takes half the batches; pictures equal a 1-rank run."""
    from mindeye_dist.distributed import free_port

    _, run = trained
    args = ["--run-dir", str(run), "--sampler", "ddim", "--steps", "10", "--best-of", "2", "--limit", "10", "--batch-size", "2",
            "--no-progress"]
    one = reconstruct(_cfg(tmp_path / "one", run, best_of=2, batch_size=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(REPO / "launchers/reconstruct.py"), "--out", str(tmp_path / "two"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    timing = json.loads((tmp_path / "two" / "timing.json").read_text())
    assert timing["ranks"] == 2 and timing["stimuli"] == 10
    a, b = O.read_index(one["out"]), O.read_index(tmp_path / "two")
    assert [e["recon"] for e in a] == [e["recon"] for e in b]
    for e in a:
        assert all((Path(one["out"]) / p).read_bytes() == (tmp_path / "two" / p).read_bytes() for p in e["candidates"])
