"""Brain to picture: the reconstruction run (``launchers/reconstruct.py``) and the training-time grid.

Per batch of stimuli (:func:`reconstruct_batch`)::

    voxels -> brain.decode -> backbone tokens, retrieval embedding, low-level latent
    low-level latent -> VAE decoder -> blurry image                              (B, 3, H, W)
    backbone tokens, each repeated best_of times -> prior samples                (B*k, T, D)
        [MindEye1 targets: each sample divided by its CLS token's norm]
    samples (+ blurry image at img2img strength) -> generator -> candidates      (B, k, 3, H', W')
    candidates -> image encoder -> cosine with the retrieval embedding -> keep the best

:func:`reconstruct` runs that over a split on every rank of a ``torchrun``/``deepspeed`` launch:
the split's stimuli are cut into fixed batches (``batch_size``), batch j is seeded by
``seed * 1_000_003 + j`` and the unfinished batches are dealt round-robin to the ranks, so the
pictures do not depend on the number of ranks or on where an interrupted run stopped. bf16
autocast on GPU, fp32 on CPU. See ``output.py`` for the directory layout.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from mindeye_dist.errors import ConfigError
from mindeye_dist.reconstruct import output as O
from mindeye_dist.reconstruct.config import ReconstructConfig
from mindeye_dist.reconstruct.scoring import candidate_scores


class PhaseTimer:
    """Seconds per phase (device-synchronised, so GPU work is charged to the phase that queued it)."""

    def __init__(self, device: Optional[torch.device] = None):
        self.device, self.seconds = device, {}

    @contextmanager
    def __call__(self, phase: str):
        sync = self.device is not None and self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        yield
        if sync:
            torch.cuda.synchronize(self.device)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t


@dataclass
class BatchResult:
    blurry: Optional[torch.Tensor]
    """(B, 3, H, W) low-level reconstructions in [0, 1], or None."""
    candidates: torch.Tensor
    """(B, k, 3, H', W') in [0, 1]."""
    scores: Optional[torch.Tensor]
    """(B, k) cosine with the retrieval embedding (None when k = 1)."""
    chosen: torch.Tensor
    """(B,) index of the kept candidate."""


def cls_normalised(targets: Optional[np.ndarray], tol: float = 1e-2) -> bool:
    """Do the targets follow MindEye1's convention (every token divided by token 0's norm)?"""
    if targets is None or targets.ndim != 3 or targets.shape[1] < 2:
        return False
    return bool(np.all(np.abs(np.linalg.norm(targets[:, 0].astype(np.float64), axis=-1) - 1.0) < tol))


def reconstruct_batch(brain, generator, decoder, encoder, voxels: torch.Tensor, subject: torch.Tensor, *, best_of: int,
                      strength: float, sampler: str, steps: Optional[int], guidance: float, cls_norm: bool,
                      torch_generator: torch.Generator, blurry_blend: float = 0.0,
                      timer: Optional[PhaseTimer] = None) -> BatchResult:
    """One batch of stimuli, brain to picture (see the module docstring)."""
    timer = timer or PhaseTimer()
    with timer("brain"):
        outs = brain.decode(voxels, subject)
    blurry = None
    if outs.lowlevel is not None:
        with timer("lowlevel"):
            blurry = decoder.decode(outs.lowlevel.float()).float().cpu()
    b = voxels.shape[0]
    if strength == 0.0:  # MindEye1: strength 0 outputs the low-level image itself
        if blurry is None:
            raise ConfigError("--img2img-strength 0 outputs the blurry image, but the model has no low-level head")
        return BatchResult(blurry, blurry.clamp(0, 1)[:, None], None, torch.zeros(b, dtype=torch.long))
    k = best_of
    with timer("prior"):
        tokens = brain.sample_tokens(outs.condition.repeat_interleave(k, 0), torch_generator, sampler, steps, guidance)
        if cls_norm:  # MindEye1 re-normalises every sample by its CLS token (utils.reconstruction)
            tokens = tokens / (tokens[:, :1].norm(dim=-1, keepdim=True) + 1e-6)
    init = blurry.clamp(0, 1).repeat_interleave(k, 0) if blurry is not None and strength < 1.0 else None
    with timer("generate"):
        images = generator.generate(tokens.float(), init, strength, torch_generator).float().cpu()
    candidates = images.reshape(b, k, *images.shape[1:])
    if blurry_blend > 0 and blurry is not None:  # MindEye2's "enhanced" evaluation: 0.75 recon + 0.25 blurry
        low = F.interpolate(blurry.clamp(0, 1), images.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
        candidates = (1 - blurry_blend) * candidates + blurry_blend * low[:, None]
    scores, chosen = None, torch.zeros(b, dtype=torch.long)
    if k > 1:
        with timer("select"):
            emb = encoder(candidates.flatten(0, 1))
            scores = candidate_scores(emb.reshape(b, k, *emb.shape[1:]), outs.retrieval).cpu()
            chosen = scores.argmax(dim=1)
    return BatchResult(blurry, candidates, scores, chosen)


# --------------------------------------------------------------------------------------------
# The run over a split


def _distributed(device_opt: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world, device, whether we own a process group): a group only when WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from mindeye_dist.distributed import init_distributed

        rank, world, device = init_distributed()
        return rank, world, (torch.device(device_opt) if device_opt != "auto" else device), True
    if device_opt != "auto":
        return 0, 1, torch.device(device_opt), False
    return 0, 1, torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"), False


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _derangement(n: int, seed: int) -> np.ndarray:
    """brain_rows[i] != i for every i (n >= 2): a cyclic shift along a seeded random order."""
    order = np.random.default_rng([seed, 7]).permutation(n)
    rows = np.empty(n, dtype=np.int64)
    rows[order] = np.roll(order, -1)
    return rows


def _load_brain(cfg: ReconstructConfig, device: torch.device):
    """(brain, data config, dataset meta, checkpoint tag)."""
    from mindeye_dist.config import DataConfig
    from mindeye_dist.data import read_meta
    from mindeye_dist.reconstruct.brain import ModelBrain, RidgeBrain

    if cfg.brain == "model":
        from mindeye_dist.evaluate import load_run_model

        model, run_cfg, meta, tag = load_run_model(cfg.run, cfg.checkpoint, cfg.data_url)
        return ModelBrain(model.to(device), device), run_cfg.data, meta, tag
    if cfg.run:
        from mindeye_dist.config import load_config

        data_cfg = load_config(Path(cfg.run) / "config.yaml", [f"data.url={cfg.data_url}"] if cfg.data_url else []).data
    else:
        data_cfg = DataConfig(url=cfg.data_url)
    return RidgeBrain.fit(data_cfg, device, seed=cfg.seed), data_cfg, read_meta(data_cfg.url, data_cfg.s3_endpoint or None), None


def _start(out: Path, cfg: ReconstructConfig, meta, tag: Optional[str], rank: int, world: int) -> None:
    """Refuse to mix settings in one ``out`` (checked on every rank before anyone writes)."""
    want = {**cfg.fingerprint(), "checkpoint_tag": tag}  # the resolved tag: a run trained further is new
    path = out / O.CONFIG
    have = json.loads(path.read_text())["fingerprint"] if path.is_file() else None
    if have is not None and have != want and not cfg.overwrite:
        diff = sorted(k for k in want if have.get(k) != want[k])
        raise ConfigError(f"{out} holds reconstructions made with other settings ({', '.join(diff)}); use another --out, "
                          "or --overwrite to start over")
    _barrier(world)
    if rank == 0:
        if have is not None and (have != want or cfg.overwrite):
            for name in (O.IMAGES, O.INDEX, "grid.png", "timing.json"):
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            for part in out.glob("index.rank*.jsonl"):
                part.unlink()
        (out / O.IMAGES).mkdir(parents=True, exist_ok=True)
        record = {"fingerprint": want, "extra": cfg.extra, "dataset": {"url": meta.url, "source": meta.raw.get("source")}}
        path.write_text(json.dumps(record, indent=2) + "\n")
    _barrier(world)


def _write_batch(out: Path, rows: list[int], data: dict, brain_rows: np.ndarray, split: str, res: BatchResult) -> list[dict]:
    """PNGs of a batch, then its index entries (returned, appended by the caller)."""
    entries = []
    blurry = None if res.blurry is None else O.to_uint8(res.blurry)
    for i, row in enumerate(rows):
        names = {"seen": O.image_name(row, "seen")}
        O.save_png(out / names["seen"], data["images"][row])
        if blurry is not None:
            names["blurry"] = O.image_name(row, "blurry")
            O.save_png(out / names["blurry"], blurry[i])
        cands = O.to_uint8(res.candidates[i])
        cand_names = [O.image_name(row, f"c{c:02d}") for c in range(len(cands))]
        for name, image in zip(cand_names, cands):
            O.save_png(out / name, image)
        src = int(brain_rows[row])
        entries.append({
            "id": {"split": split, "row": row, "subject": int(data["subject"][row]), "index": int(data["index"][row])},
            **names, "blurry": names.get("blurry"), "recon": cand_names[int(res.chosen[i])], "candidates": cand_names,
            "chosen": int(res.chosen[i]), "scores": None if res.scores is None else [round(float(s), 6) for s in res.scores[i]],
            "brain_row": src,
        })
    return entries


def reconstruct(cfg: ReconstructConfig) -> dict:
    """Reconstruct ``cfg.split`` into ``cfg.out`` on this rank's share; returns rank 0's summary."""
    rank, world, device, own_group = _distributed(cfg.device)
    failed = True
    try:
        summary = _run(cfg, rank, world, device)
        failed = False
        return summary
    finally:
        if own_group:
            from mindeye_dist.distributed import teardown_distributed

            teardown_distributed(failed=failed)


def _run(cfg: ReconstructConfig, rank: int, world: int, device: torch.device) -> dict:
    from tqdm import tqdm

    from mindeye_dist.reconstruct.brain import split_fields
    from mindeye_dist.reconstruct.generators import build_generator
    from mindeye_dist.reconstruct.scoring import build_candidate_encoder

    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    brain, data_cfg, meta, tag = _load_brain(cfg, device)
    _start(out, cfg, meta, tag, rank, world)
    data = split_fields(data_cfg, cfg.split, cfg.limit)
    if data["images"] is None:
        raise ConfigError(f"split {cfg.split!r} of {meta.url} has no images: the seen stimuli are needed for the grid "
                          "and the metrics (import the dataset with {split}_images.npy)")
    n = len(data["voxels"])
    brain_rows = _derangement(n, cfg.seed) if cfg.shuffle_brain and n > 1 else np.arange(n)
    batches = [list(range(s, min(n, s + cfg.batch_size))) for s in range(0, n, cfg.batch_size)]
    done = O.read_entries(out)
    _barrier(world)  # every rank has read the same finished set before anyone appends to it
    todo = [j for j, rows in enumerate(batches) if not all(r in done for r in rows)]
    mine = todo[rank::world]
    generator, decoder = build_generator(cfg, device, meta)
    renderer = getattr(generator, "renderer", None)
    encoder = build_candidate_encoder(cfg, device, renderer)
    cls_norm = cls_normalised(data["targets"])
    timer = PhaseTimer(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    total = sum(len(batches[j]) for j in mine)
    bar = tqdm(total=total, desc=f"reconstruct [{cfg.generator}]" + (f" rank {rank}/{world}" if world > 1 else ""),
               unit="img", disable=not cfg.progress or rank != 0, file=sys.stderr)
    t_work = time.perf_counter()
    for j in mine:
        rows = batches[j]
        src = brain_rows[rows]
        gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + j)
        with autocast:
            res = reconstruct_batch(brain, generator, decoder, encoder, torch.from_numpy(data["voxels"][src]),
                                    torch.from_numpy(data["subject"][src]), best_of=cfg.best_of,
                                    strength=cfg.img2img_strength, sampler=cfg.sampler, steps=cfg.steps,
                                    guidance=cfg.guidance, cls_norm=cls_norm, torch_generator=gen,
                                    blurry_blend=cfg.blurry_blend, timer=timer)
        with timer("write"):
            O.append_entries(out, rank, _write_batch(out, rows, data, brain_rows, cfg.split, res))
        bar.update(len(rows))
        bar.set_postfix(cand_per_s=f"{bar.n * res.candidates.shape[1] / max(time.perf_counter() - t_work, 1e-9):.2f}",
                        refresh=False)
    bar.close()
    k = 1 if cfg.img2img_strength == 0 else cfg.best_of
    part = {"rank": rank, "stimuli": total, "candidates": total * k, "work_s": time.perf_counter() - t_work,
            "phases_s": timer.seconds}
    (out / f"timing.rank{rank}.json").write_text(json.dumps(part) + "\n")
    _barrier(world)
    summary = {}
    if rank == 0:
        entries = O.merge_index(out)
        grid = O.write_grid(out, entries, cfg.grid_n)
        timing = _merge_timing(out, time.perf_counter() - t_start)
        summary = {"out": str(out), "n": n, "finished": len(entries), "done_before": len(done), "checkpoint": tag,
                   "index": str(out / O.INDEX), "grid": None if grid is None else str(grid), "timing": timing,
                   "generator": generator.describe(), "brain": brain.describe(), "cls_normalised": cls_norm,
                   "config": asdict(cfg), "world_size": world, "device": str(device)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _barrier(world)
    return summary


def _merge_timing(out: Path, wall_s: float) -> dict:
    parts = []
    for path in sorted(out.glob("timing.rank*.json")):
        parts.append(json.loads(path.read_text()))
        path.unlink()
    phases: dict[str, float] = {}
    for p in parts:
        for k, v in p["phases_s"].items():
            phases[k] = phases.get(k, 0.0) + v
    stimuli, candidates = sum(p["stimuli"] for p in parts), sum(p["candidates"] for p in parts)
    work_s = max((p["work_s"] for p in parts), default=0.0)
    busy = sum(phases.values()) or 1.0
    timing = {"stimuli": stimuli, "candidates": candidates, "ranks": len(parts), "work_s": work_s, "wall_s": wall_s,
              "stimuli_per_s": stimuli / work_s if work_s > 0 else None,
              "candidates_per_s": candidates / work_s if work_s > 0 else None,
              "phases_s": phases, "phase_share": {k: v / busy for k, v in phases.items()}}
    (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    return timing
