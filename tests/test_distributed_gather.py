"""Rank discovery, all_gather_with_grad and gathered contrastive negatives on real gloo groups.

Gradient convention under test: with gathered negatives every rank's gradient w.r.t. its local
features is W x the gradient of the global-batch loss (the gather's backward sums over ranks);
data-parallel averaging of parameter gradients divides the W back out.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mindeye_dist import distributed as mdist
from mindeye_dist.losses import ContrastiveLoss, bimixco_loss, draw_mixup, info_nce_loss, soft_clip_loss

WORLD = 2
LOCAL_BATCH = 3
MODES = ("infonce", "bimixco", "softclip")
TEMPERATURE = 0.05  # larger than training's 0.006 so gradients are not vanishingly small


def _global_inputs():
    g = torch.Generator().manual_seed(1234)
    preds = torch.randn(WORLD * LOCAL_BATCH, 4, 5, generator=g)  # (N, tokens, dim)
    targets = torch.randn(WORLD * LOCAL_BATCH, 4, 5, generator=g)
    return preds, targets


def _rank_labels(rank):
    return draw_mixup(LOCAL_BATCH, prob=1.0, generator=torch.Generator().manual_seed(100 + rank)).soft_labels()


def _global_loss(mode, preds, targets):
    if mode == "infonce":
        return info_nce_loss(preds, targets, TEMPERATURE)
    if mode == "softclip":
        return soft_clip_loss(preds, targets, TEMPERATURE)
    labels = torch.block_diag(*[_rank_labels(r) for r in range(WORLD)])  # mixup never crosses ranks
    return bimixco_loss(preds, targets, TEMPERATURE, labels)


def _rank_results(rank, world):
    """Losses and gradients of this rank's shard for every mode and flag combination."""
    preds, targets = _global_inputs()
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    out = {}
    for mode in MODES:
        for gather, local_loss in ((True, False), (True, True), (False, False)):
            p = preds[rows].clone().requires_grad_(True)
            t = targets[rows].clone().requires_grad_(True)
            labels = _rank_labels(rank) if mode == "bimixco" else None
            loss = ContrastiveLoss(gather_negatives=gather, local_loss=local_loss)(p, t, TEMPERATURE, mode, labels)
            loss.backward()
            out[(mode, gather, local_loss)] = (loss.detach(), p.grad, t.grad)
    # The gather itself: rank r weights the gathered tensor by (r + 1) * w, so the gradient of a
    # shard is sum_r (r + 1) * w[shard] = 3 * w[shard] for two ranks.
    x = torch.arange(LOCAL_BATCH * 2, dtype=torch.float32).reshape(LOCAL_BATCH, 2) + 10 * rank
    x.requires_grad_(True)
    gathered = mdist.all_gather_with_grad(x)
    w = torch.linspace(-1, 1, gathered.numel()).reshape(gathered.shape)
    (gathered * w * (rank + 1)).sum().backward()
    out["gather"] = (gathered.detach(), x.grad)
    out["env"] = (mdist.get_rank(), mdist.get_world_size(), mdist.get_local_rank(), mdist.is_distributed())
    return out


def _worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env:// from the variables above, as the launchers do
    try:
        torch.save(_rank_results(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _global_grads(mode):
    preds, targets = _global_inputs()
    preds.requires_grad_(True)
    targets.requires_grad_(True)
    loss = _global_loss(mode, preds, targets)
    loss.backward()
    return loss.detach(), preds.grad, targets.grad


# ---------------------------------------------------------------------------------------------


def test_env_discovery_without_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (mdist.get_rank(), mdist.get_world_size(), mdist.get_local_rank(), mdist.is_distributed()) == (0, 1, 0, False)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (mdist.get_rank(), mdist.get_world_size(), mdist.get_local_rank(), mdist.is_distributed()) == (5, 8, 1, True)
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(ValueError, match="RANK='zero'"):
        mdist.get_rank()


@pytest.fixture
def single_rank_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("local_loss", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_gathered_equals_per_rank_on_one_rank(single_rank_group, mode, local_loss):
    assert mdist.is_initialized() and mdist.get_world_size() == 1 and mdist.get_rank() == 0
    preds, targets = _global_inputs()
    labels = None
    if mode == "bimixco":
        labels = draw_mixup(len(preds), prob=1.0, generator=torch.Generator().manual_seed(3)).soft_labels()
    results = []
    for gather in (False, True):
        p, t = preds.clone().requires_grad_(True), targets.clone().requires_grad_(True)
        loss = ContrastiveLoss(gather_negatives=gather, local_loss=local_loss)(p, t, TEMPERATURE, mode, labels)
        loss.backward()
        results.append((loss.detach(), p.grad, t.grad))
    for per_rank, gathered in zip(*results):
        assert torch.allclose(per_rank, gathered, atol=1e-6)


@pytest.mark.distributed
def test_two_rank_gather_matches_global_batch(tmp_path):
    mp.spawn(_worker, args=(WORLD, mdist.free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    preds, targets = _global_inputs()

    for rank, res in enumerate(ranks):
        assert res["env"] == (rank, WORLD, rank, True)
        gathered, grad = res["gather"]
        own = gathered[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH, 0]
        assert torch.equal(own, 2 * torch.arange(LOCAL_BATCH) + 10.0 * rank)  # rank order
        w = torch.linspace(-1, 1, gathered.numel()).reshape(gathered.shape)
        assert torch.allclose(grad, 3 * w[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH])

    for mode in MODES:
        loss, preds_grad, targets_grad = _global_grads(mode)
        local_share = []
        for rank, res in enumerate(ranks):
            rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            full = res[(mode, True, False)]
            assert torch.allclose(full[0], loss, atol=1e-5), (mode, rank)  # every rank reports the global loss
            for gathered_result in (full, res[(mode, True, True)]):
                assert torch.allclose(gathered_result[1], WORLD * preds_grad[rows], atol=1e-5), (mode, rank)
                assert torch.allclose(gathered_result[2], WORLD * targets_grad[rows], atol=1e-5), (mode, rank)
            local_share.append(res[(mode, True, True)][0])
            # Per-rank negatives (the references): the loss of the local batch alone.
            expected_local = _global_loss(mode, preds[rows], targets[rows]) if mode != "bimixco" else bimixco_loss(
                preds[rows], targets[rows], TEMPERATURE, _rank_labels(rank))
            assert torch.allclose(res[(mode, False, False)][0], expected_local, atol=1e-5), (mode, rank)
        assert torch.allclose(torch.stack(local_share).mean(), loss, atol=1e-5), mode  # local_loss: mean = global
