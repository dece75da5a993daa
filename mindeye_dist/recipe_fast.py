"""The recipe study's fast mode: the real ``Trainer.step`` on a family member's arrays held in memory.

Through the launcher a tuning-member variant takes 20-45 minutes on this 2-core machine, most of
it reading shards; this feeds the same trainer (DeepSpeed engine, MindEye loss, BiMixCo ->
SoftCLIP) batches drawn in-process from the generator's arrays (one random repetition per
stimulus, z-scored with the train statistics, as the loader does), validates on the member's val
rows (repetitions averaged, 300-way capped at the split) ~10 times, and prints the best and last
validation top-1 next to ridge (alpha chosen on val) and the Bayes ceiling of the same rows. One
process, one thread; retrieval objective unless the variant turns the prior on. ::

    python -m mindeye_dist.recipe_fast tune-a 20 base= lr3=optim.max_lr=3e-3 \
        w1024=model.hidden_dim=1024,model.n_blocks=1

Arguments: member, epochs (passes over the distinct training stimuli), then NAME=overrides
(comma-separated key=value on top of launchers/configs/study/retrieval_base.yaml; env BASE to use
another YAML). Never run it on held-out members: they are for the final table only
(launchers/recipe_table.py).
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mindeye_dist.data.family import get_member
from mindeye_dist.data.synthetic import SyntheticSubject
from mindeye_dist.data.writer import carve_validation
from mindeye_dist.evaluate import retrieval_accuracy, ridge_baseline
from mindeye_dist.config import load_config
from mindeye_dist.trainer import ModelDims, Trainer
from mindeye_dist.data.batch import Batch
from mindeye_dist.distributed import init_distributed
for k in ("RANK","WORLD_SIZE","LOCAL_RANK","MASTER_ADDR","MASTER_PORT","LOCAL_WORLD_SIZE"): os.environ.pop(k, None)
torch.set_num_threads(int(os.environ.get("NT", "1")))
BASE = os.environ.get("BASE", str(Path(__file__).resolve().parents[1] / "launchers/configs/study/retrieval_base.yaml"))
CACHE = Path(os.environ.get("RECIPE_FAST_CACHE", "/tmp/recipe_fast"))
CACHE.mkdir(parents=True, exist_ok=True)
name = sys.argv[1]; epochs = float(sys.argv[2]); variants = sys.argv[3:]
m = get_member(name)
if m.role == "held-out":
    sys.exit(f"{name} is a held-out member: the final table only (launchers/recipe_table.py)")
s = SyntheticSubject(m.spec, m.seed)
tr, va = carve_validation(m.spec.n_train, 0.1, m.seed)
z = s.latents("train"); X = s.voxels("train", z, np.arange(m.spec.n_train)).astype(np.float32)
mu = X[tr].reshape(-1, X.shape[-1]).mean(0); sd = X[tr].reshape(-1, X.shape[-1]).std(0) + 1e-6
Xz = (X - mu) / sd; T = s.targets(z).astype(np.float32)
Xva = Xz[va].mean(1); Tva = T[va]
way = min(300, len(va))
ceil = s.retrieval_ceiling("train", rows=va, loops=10, way=way)
cache = CACHE / f"ridge_{name}.json"
if os.path.exists(cache): rid = json.load(open(cache))
else:
    r = ridge_baseline(Xz[tr].mean(1), T[tr].reshape(len(tr), -1), Xva, Tva.reshape(len(va), -1), way=way, loops=10, seed=0)
    rid = {"image": r.val_metrics["image_top1"], "brain": r.val_metrics["brain_top1"]}; json.dump(rid, open(cache, "w"))
print(f"{name}: n_train={len(tr)} ridge {rid['image']:.3f}/{rid['brain']:.3f} ceiling {ceil['image_top1']:.3f}/{ceil['brain_top1']:.3f}", flush=True)
init_distributed()
for v in variants:
    label, _, ov = v.partition("=")
    ov = [o for o in ov.split(",") if o]
    cfg0 = load_config(BASE, [f"data.url=/tmp/x"] + ov)
    B = cfg0.train.micro_batch_size * cfg0.train.grad_accum_steps
    steps = max(1, int(epochs * len(tr) / B))
    cfg = load_config(BASE, [f"data.url=/tmp/x", f"train.max_steps={steps}"] + ov)
    torch.manual_seed(0); rng = np.random.default_rng(0)
    t = Trainer(cfg, ModelDims(n_voxels=X.shape[-1], n_tokens=T.shape[1], token_dim=T.shape[2]))
    mode = cfg.data.train_reps
    if getattr(t.model, "ridge_skip", None) is not None:
        from mindeye_dist.models.ridge_skip import fit_ridge_skip
        info = fit_ridge_skip(t.model.ridge_skip, (Xz[tr].mean(1), T[tr], Xva, Tva))
        print(f"  {label:10s} ridge skip {info}", flush=True)
    def draw():
        rows = tr[rng.integers(0, len(tr), cfg.train.micro_batch_size)]
        if mode == "mean": x = Xz[rows].mean(1)
        else: x = Xz[rows, rng.integers(0, X.shape[1], len(rows))]
        return Batch(torch.from_numpy(x), torch.from_numpy(T[rows]), None, None, torch.zeros(len(rows), dtype=torch.long), torch.from_numpy(rows))
    every = max(1, steps // 10); best = (-1, -1, 0); t0 = time.time(); hist = []; ridge_va = None
    for st in range(0, steps + 1):
        if st:
            t.step([draw() for _ in range(cfg.train.grad_accum_steps)])
        if st % every == 0 or st == steps:
            t.engine.module.eval()
            skip = getattr(t.model, "ridge_skip", None)
            with torch.no_grad():
                if skip is None:
                    pred = t.model(torch.from_numpy(Xva), 0).projector.float()
                else:
                    from mindeye_dist.models.ridge_skip import validate_blend
                    choice = validate_blend(skip, lambda: (t.model(torch.from_numpy(Xva), 0).projector.float(),
                                                           torch.from_numpy(Tva)), way=way, loops=10, seed=0, ridge=ridge_va)
                    ridge_va, beta, pred = choice.ridge, choice.beta, choice.preds
            t.engine.module.train()
            r = retrieval_accuracy(pred.numpy(), Tva, way=way, loops=10, seed=0)
            if skip is not None: print(f"    step {st} beta {beta}", flush=True)
            hist.append((st, round(r["image_top1"], 3), round(r["brain_top1"], 3)))
            if r["image_top1"] + r["brain_top1"] > best[0] + best[1]: best = (r["image_top1"], r["brain_top1"], st)
    print(f"  {label:10s} steps={steps} best {best[0]:.3f}/{best[1]:.3f}@{best[2]} last {hist[-1][1]:.3f}/{hist[-1][2]:.3f} "
          f"÷ceil {best[0]/ceil['image_top1']:.2f}/{best[1]/ceil['brain_top1']:.2f} {time.time()-t0:.0f}s  {hist}", flush=True)
