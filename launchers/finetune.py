"""Fine-tune a pretrained (multi-subject) model on a new subject: MindEye2's 1-hour setting.

    python launchers/finetune.py --from runs/me2_pretrain --subject 1 --data data/subj01_1sess \
        --config launchers/configs/mindeye2_finetune_1sess.yaml run.dir=runs/me2_ft_subj01
    deepspeed launchers/finetune.py --ds_config ds_configs/zero2.json --from weights.safetensors --subject 1 \
        --data data/subj01_1sess --config launchers/configs/mindeye2_finetune_1sess.yaml run.dir=...

The source is a run directory (its best, else latest, checkpoint) or an export; its architecture is
kept, every weight but the subject adapters is loaded, and the new subject gets a fresh adapter
(the pretraining subjects' adapters are dropped). Everything else is train.py: the same flags,
key=value overrides, run directory, resume (run the same command again).
"""

import os
import sys
from pathlib import Path

_local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE") or 1)
if _local > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _local))

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from mindeye_dist.config import load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source", required=True, help="pretrained run directory or export (.safetensors)")
    parser.add_argument("--subject", required=True, help="the new subject (NSD number or the dataset's label)")
    parser.add_argument("--data", required=True, help="the new subject's dataset (e.g. its first session)")
    parser.add_argument("--config", default="launchers/configs/mindeye2_finetune_1sess.yaml", help="experiment YAML")
    parser.add_argument("--ds_config", "--ds-config", dest="ds_config", help="DeepSpeed JSON")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=200")
    args = parser.parse_args(argv)
    overrides = [*args.overrides, f"data.url={args.data}"] + ([f"run.ds_config={args.ds_config}"] if args.ds_config else [])
    from mindeye_dist.finetune import finetune_config
    from mindeye_dist.train import answer_errors, run

    config = Path(args.config)
    if not config.is_file() and (Path(__file__).resolve().parents[1] / config).is_file():
        config = Path(__file__).resolve().parents[1] / config
    return answer_errors(lambda: run(finetune_config(load_config(config, overrides), args.source, args.subject)))


if __name__ == "__main__":
    sys.exit(main())
