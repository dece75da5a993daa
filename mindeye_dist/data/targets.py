"""Targets precomputed once: run a frozen encoder over a dataset's images, add its output as a field.

    meta = add_targets("data/subj01", TargetSpec("clip-l14-mindeye1", "/weights/ViT-L-14.pt"))

Encoders and what each computes: ``encoders.py``. The training loop reads ``targets.npy`` (CLIP
tokens, ``Batch.targets``) and ``vae.npy`` (``Batch.vae``), the names the CLIP and VAE encoders
write by default; ``teacher.npy`` (SoftCont teacher tokens) is new.

Each shard is rewritten whole with the new member added to every sample (placed atomically,
same name), so a dataset stays readable throughout. Ranks of a ``torchrun``/``deepspeed``
launch share the work: rank r takes shards r, r + W, r + 2W, ... of the dataset's shard list.
A shard is finished when its marker file ``.targets-FIELD-SHARD.json`` (written right after
the shard is placed) carries this run's fingerprint (encoder, weights file, options); a rerun
skips finished shards, and a shard placed but not yet marked is simply recomputed. After a
barrier, rank 0 checks every marker, writes ``meta.json`` (the field, new shard sizes and
digests, and ``n_tokens``/``token_dim`` for ``targets``) and removes the markers. Nothing else
changes in ``meta.json`` until then. bf16 autocast on GPU, fp32 on CPU; stored as float16.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from mindeye_dist.data import shard_io as S
from mindeye_dist.data.encoders import ENCODERS, Encoder, TargetSpec
from mindeye_dist.data.errors import DataError
from mindeye_dist.data.meta import DatasetMeta, read_meta
from mindeye_dist.data.storage import Storage

__all__ = ["ENCODERS", "TargetSpec", "add_targets", "parse_target_specs"]

_FP16_MAX = float(np.finfo(np.float16).max)
LOADER_FIELDS = ("voxels", "targets", "images", "vae", "teacher")
"""Field names today's training loader understands in a split's ``fields`` list."""
_IMAGE_KEYS = ("png", "jpg", "jpeg")


def parse_target_specs(text: Optional[str], batch_size: int = 32) -> list[TargetSpec]:
    """``none`` or ``ENCODER=WEIGHTS[,ENCODER=WEIGHTS...]`` (the ``--targets`` option)."""
    if text is None or text.strip().lower() in ("", "none"):
        return []
    specs = []
    for part in text.split(","):
        name, sep, weights = part.partition("=")
        if not sep or name.strip() not in ENCODERS or not weights.strip():
            raise DataError(f"--targets {text!r}: {part!r} is not ENCODER=WEIGHTS with ENCODER one of {', '.join(sorted(ENCODERS))}")
        specs.append(TargetSpec(encoder=name.strip(), weights=weights.strip(), batch_size=batch_size))
    return specs


def _fingerprint(spec: TargetSpec, field: str) -> str:
    st = os.stat(spec.weights)
    return S.fingerprint({"encoder": spec.encoder, "field": field, "weights": os.path.abspath(spec.weights),
                          "weights_size": st.st_size, "weights_mtime": st.st_mtime_ns, "arch": spec.arch,
                          "model_config": spec.model_config, "image_size": spec.image_size})


def _marker(field: str, shard: str) -> str:
    return f".targets-{field}-{shard}.json"


def _dist() -> tuple[int, int, bool]:
    """(rank, world, whether we created the process group): gloo only for barriers."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size(), False) if dist.is_initialized() else (0, 1, False)
    from datetime import timedelta

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if not torch.cuda.is_available():  # ranks of one node share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("MINDEYE_DIST_TIMEOUT_S", 1800))))
    return dist.get_rank(), dist.get_world_size(), True


def _device(spec: TargetSpec) -> torch.device:
    if spec.device != "auto":
        return torch.device(spec.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _images(batch: list[dict], where: str) -> torch.Tensor:
    """(B, 3, H, W) float32 in [0, 1] from the samples' image members."""
    arrays = []
    for s in batch:
        key = next((k for k in _IMAGE_KEYS if k in s), None)
        if key is None:
            raise DataError(f"{where}: sample {s['__key__']} has no image (png/jpg); targets are computed from the images")
        arrays.append(S.decode_image(s[key]))
    if len({a.shape for a in arrays}) != 1:
        raise DataError(f"{where}: images of different sizes in one batch ({sorted({a.shape for a in arrays})}); re-import with a fixed image size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def _encode(encoder: Encoder, images: torch.Tensor, device: torch.device, where: str) -> np.ndarray:
    x = images.to(device)
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = encoder.fn(x)
    else:
        out = encoder.fn(x)
    out = out.float().cpu().numpy()
    if not np.all(np.isfinite(out)) or np.abs(out).max() > _FP16_MAX:
        raise DataError(f"{where}: encoder output is not finite or exceeds float16; check the weights")
    return out.astype(np.float16)


def _with_field(samples: Iterable[dict], encoder: Encoder, key: str, spec: TargetSpec, device: torch.device,
                where: str, shapes: set, bar) -> Iterator[dict]:
    """The shard's samples with ``key`` added (or replaced), computed ``spec.batch_size`` at a time."""
    batch: list[dict] = []

    def flush() -> Iterator[dict]:
        out = _encode(encoder, _images(batch, where), device, where)
        shapes.add(tuple(out.shape[1:]))
        for s, value in zip(batch, out):
            yield {**s, key: S.npy_bytes(value)}
        bar.update(len(batch))
        batch.clear()

    for s in samples:
        batch.append(s)
        if len(batch) == spec.batch_size:
            yield from flush()
    if batch:
        yield from flush()


def _process_shard(storage: Storage, name: str, start: int, encoder: Encoder, key: str, spec: TargetSpec,
                   device: torch.device, bar) -> dict:
    shapes: set = set()
    where = storage.child(name)
    rec = S.write_shard(storage, name, _with_field(S.read_shard(storage, name), encoder, key, spec, device, where, shapes, bar), start)
    return {"bytes": rec.bytes, "sha256": rec.sha256, "count": rec.count, "shape": list(next(iter(shapes)))}


def _shard_list(meta: DatasetMeta) -> list[tuple[str, int]]:
    out = []
    for split in meta.splits.values():
        start = 0
        for sh in split.shards:
            out.append((sh.name, start))
            start += sh.count
    return out


def _run_rank(storage: Storage, meta: DatasetMeta, spec: TargetSpec, field: str, fp: str, rank: int, world: int,
              progress: bool) -> None:
    from tqdm import tqdm

    mine = _shard_list(meta)[rank::world]
    todo = [(n, st) for n, st in mine if _marker_fp(storage, field, n) != fp]
    if not todo:
        return
    device = _device(spec)
    encoder = ENCODERS[spec.encoder][1](spec, device)
    counts = {sh.name: sh.count for s in meta.splits.values() for sh in s.shards}
    desc = f"{field} [{spec.encoder}]" + (f" rank {rank}/{world}" if world > 1 else "")
    with tqdm(total=sum(counts[n] for n, _ in todo), desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        for name, start in todo:
            info = _process_shard(storage, name, start, encoder, f"{field}.npy", spec, device, bar)
            storage.write_bytes(_marker(field, name), json.dumps({"fingerprint": fp, **info}).encode())


def _marker_fp(storage: Storage, field: str, shard: str) -> Optional[str]:
    return _read_marker(storage, field, shard).get("fingerprint")


def _read_marker(storage: Storage, field: str, shard: str) -> dict:
    name = _marker(field, shard)
    if not storage.exists(name):
        return {}
    try:
        return json.loads(storage.read_bytes(name))
    except json.JSONDecodeError:
        return {}


def _finish(storage: Storage, meta: DatasetMeta, field: str, fp: str, encoder_info: dict) -> None:
    """Rank 0 after the barrier: every shard marked -> meta.json with the field -> markers removed."""
    raw = json.loads(json.dumps(meta.raw))
    shape = None
    for split in raw["splits"].values():
        for sh in split["shards"]:
            m = _read_marker(storage, field, sh["name"])
            if m.get("fingerprint") != fp:
                raise DataError(f"shard {storage.child(sh['name'])} has no finished {field!r} field; a rank failed. "
                                "Rerun the same command to finish it")
            if m["count"] != sh["count"]:
                raise DataError(f"shard {storage.child(sh['name'])} now holds {m['count']} samples, meta.json says {sh['count']}")
            sh["bytes"], sh["sha256"], shape = m["bytes"], m["sha256"], m["shape"]
        # The loader requires every name in a split's "fields" to be one it knows (pipeline._REQUIRED);
        # other fields are listed apart until it reads member keys from meta.json's "fields".
        listed = split["fields"] if field in LOADER_FIELDS else split.setdefault("extra_fields", [])
        if field not in listed:
            listed.append(field)
    raw["fields"][field] = {"key": f"{field}.npy", "dtype": "float16", "shape": shape, "encoder": {**encoder_info, "fingerprint": fp}}
    if field == "targets":
        raw["n_tokens"], raw["token_dim"] = int(shape[0]), int(shape[-1])
    S.write_meta(storage, raw)
    S.remove_partials(storage)  # every rank is done: whatever partial files remain are a killed run's
    for split in raw["splits"].values():
        for sh in split["shards"]:
            storage.remove(_marker(field, sh["name"]))


def add_targets(data_url: str, spec: TargetSpec, *, s3_endpoint: Optional[str] = None, progress: bool = True) -> DatasetMeta:
    """Compute ``spec``'s field for every sample of the dataset at ``data_url`` (see the module
    docstring). Call it on every rank of a launch, or in one process."""
    if spec.encoder not in ENCODERS:
        raise DataError(f"--encoder {spec.encoder!r} is not one of {', '.join(sorted(ENCODERS))}")
    if spec.batch_size < 1:
        raise DataError(f"--batch-size {spec.batch_size} must be >= 1")
    if not os.path.exists(spec.weights):
        raise DataError(f"--weights {spec.weights} does not exist; weights are read from local files only (no hub downloads)")
    field = spec.field or ENCODERS[spec.encoder][0]
    if not field.isidentifier() or field in ("voxels", "images", "ids", "json", "png"):
        raise DataError(f"--field {field!r} is not a valid new field name")
    meta = read_meta(data_url, s3_endpoint)
    storage = Storage(meta.url, meta.s3_endpoint)
    fp = _fingerprint(spec, field)
    have = meta.raw["fields"].get(field)
    if have is not None and have.get("encoder", {}).get("fingerprint") == fp and not spec.replace:
        return meta  # this exact field is already there
    if have is not None and not spec.replace:
        made_by = have.get("encoder", {}).get("name", "another source")
        raise DataError(f"{meta.url} already has field {field!r} (from {made_by}); pass --replace to recompute it, "
                        "or --field to write another name")
    rank, world, own = _dist()
    try:
        _run_rank(storage, meta, spec, field, fp, rank, world, progress)
        if world > 1:
            torch.distributed.barrier()
        if rank == 0:
            _finish(storage, meta, field, fp, {"name": spec.encoder, "computes": ENCODERS[spec.encoder][2],
                                               "weights": os.path.basename(spec.weights), "arch": spec.arch,
                                               "image_size": spec.image_size})
        if world > 1:
            torch.distributed.barrier()
    finally:
        if own:
            torch.distributed.destroy_process_group()
    return read_meta(meta.url, meta.s3_endpoint)
