"""The output directory of a reconstruction run, and reading it back.

    DIR/reconstruct_config.json    settings (a rerun must agree on the ones that change pictures)
    DIR/images/00012_seen.png      the ground-truth stimulus
    DIR/images/00012_blurry.png    the low-level reconstruction (when the model has a low-level head)
    DIR/images/00012_c03.png       candidate 3 (best_of of them)
    DIR/index.jsonl                one line per stimulus: id, seen, blurry, recon, candidates, scores
    DIR/grid.png                   seen | blurry | reconstruction rows for the first stimuli
    DIR/timing.json                seconds per phase, stimuli/s and candidates/s

While ranks work each appends finished stimuli to ``index.rank{R}.jsonl`` (after their PNGs are
written, flushed and fsynced); rank 0 merges the parts into ``index.jsonl`` at the end. A rerun
treats every stimulus listed in any of these files as done, so a killed run resumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

INDEX = "index.jsonl"
CONFIG = "reconstruct_config.json"
IMAGES = "images"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float [0, 1] -> (N, H, W, 3) uint8."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def image_name(row: int, kind: str) -> str:
    return f"{IMAGES}/{row:05d}_{kind}.png"


def index_part(rank: int) -> str:
    return f"index.rank{rank}.jsonl"


def _parse_lines(path: Path) -> Iterable[dict]:
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:  # a killed run's half-written last line: that batch is redone
            continue


def read_entries(out: Path) -> dict[int, dict]:
    """Every finished stimulus in ``out`` (merged index and rank parts), by row."""
    entries: dict[int, dict] = {}
    for path in [out / INDEX, *sorted(out.glob("index.rank*.jsonl"))]:
        for entry in _parse_lines(path):
            entries[int(entry["id"]["row"])] = entry
    return entries


def append_entries(out: Path, rank: int, entries: list[dict]) -> None:
    """Append finished stimuli durably (their PNGs were written first)."""
    with open(out / index_part(rank), "a") as f:
        for entry in entries:
            f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def merge_index(out: Path) -> list[dict]:
    """Rank 0 after every rank finished: parts -> index.jsonl (row order), parts removed."""
    entries = read_entries(out)
    ordered = [entries[r] for r in sorted(entries)]
    tmp = out / (INDEX + ".tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in ordered))
    os.replace(tmp, out / INDEX)
    for part in out.glob("index.rank*.jsonl"):
        part.unlink()
    return ordered


def read_index(out: str | os.PathLike) -> list[dict]:
    """index.jsonl of a finished run (FileNotFoundError naming the fix otherwise)."""
    path = Path(out) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run launchers/reconstruct.py --out {out} first (or let it finish; "
                                "the same command resumes)")
    return list(_parse_lines(path))


def _cell(path: Optional[Path], size: int) -> np.ndarray:
    from PIL import Image

    if path is None or not path.is_file():
        return np.full((size, size, 3), 255, dtype=np.uint8)
    return np.asarray(Image.fromarray(load_png(path)).resize((size, size), Image.BILINEAR))


def write_grid(out: Path, entries: list[dict], n: int = 12, cell: int = 128, pad: int = 4) -> Optional[Path]:
    """grid.png: rows seen | blurry (if any) | reconstruction, one column per stimulus, labelled."""
    from PIL import Image, ImageDraw

    entries = entries[:n]
    if not entries:
        return None
    rows = [("seen", "seen")] + ([("blurry", "blurry")] if any(e.get("blurry") for e in entries) else []) + [("recon", "recon")]
    label_w = 64
    width = label_w + len(entries) * (cell + pad) + pad
    height = len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (key, label) in enumerate(rows):
        y = pad + r * (cell + pad)
        draw.text((6, y + cell // 2 - 6), label, fill=(0, 0, 0))
        for c, entry in enumerate(entries):
            path = out / entry[key] if entry.get(key) else None
            canvas.paste(Image.fromarray(_cell(path, cell)), (label_w + pad + c * (cell + pad), y))
    target = out / "grid.png"
    canvas.save(target)
    return target


def load_pairs(out: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(seen (N, H, W, 3) uint8, recon (N, H', W', 3) uint8, entries) of a finished run, in row order.

    Each set keeps its own size (the metrics resize both to 256 x 256 first, as MindEye does).
    """
    out = Path(out)
    entries = read_index(out)
    if not entries:
        raise ValueError(f"{out / INDEX} lists no stimuli")
    stacked = []
    for key in ("seen", "recon"):
        images = [load_png(out / e[key]) for e in entries]
        if len({a.shape for a in images}) != 1:
            raise ValueError(f"{out}: the {key} images have different sizes ({sorted({a.shape for a in images})})")
        stacked.append(np.stack(images))
    return stacked[0], stacked[1], entries
