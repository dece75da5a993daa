"""Train MindEye: one script for the deepspeed launcher, torchrun, SLURM and a plain process.

Launch commands (see README for the demo and a full walkthrough):

One process (CPU or one GPU)::

    python launchers/train.py --config launchers/configs/demo.yaml data.url=demo_out/data run.dir=runs/demo

One node, every local accelerator (on a CPU-only host name the rank count: DeepSpeed counts
NUMA nodes as CPU "accelerators")::

    deepspeed --num_accelerators 2 launchers/train.py --ds_config ds_configs/zero2.json \
        --config launchers/configs/demo.yaml data.url=demo_out/data run.dir=runs/demo
    torchrun --standalone --nproc_per_node 2 launchers/train.py --ds_config ds_configs/zero2.json \
        --config launchers/configs/demo.yaml

Several nodes (a hostfile like ``cluster/hostfile.example``: ``node1 slots=8`` per line; SLURM
batch scripts that build it are in ``cluster/slurm/``)::

    deepspeed --hostfile cluster/hostfile --num_nodes 4 --num_gpus 8 launchers/train.py \
        --ds_config ds_configs/zero2.json --config launchers/configs/mindeye1.yaml \
        data.url=s3://bucket/nsd/subj01 run.dir=/shared/runs/me1
    srun torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 \
        launchers/train.py --ds_config ds_configs/zero2.json --config ...

Without ``--config`` the run uses ``launchers/configs/default.yaml``, the recipe for a new dataset
(``recipe: auto``: width, batch and schedule derived from ``data.url``'s meta.json)::

    deepspeed --num_accelerators 2 launchers/train.py data.url=/data/mylab/subj01 run.dir=runs/subj01

Running the same command again with the same ``run.dir`` resumes from ``checkpoints/latest``.
Dotted ``key=value`` arguments override the YAML (``model.hidden_dim=512 train.max_steps=200``).
"""

import argparse
import os
import sys
from pathlib import Path

# Before torch is imported: on CPU hosts every rank would start one OpenMP thread per core, so
# two ranks on two cores (plus loader workers) oversubscribe and steps run up to 30x slower.
# The launchers export the node-local rank count (torchrun LOCAL_WORLD_SIZE, deepspeed LOCAL_SIZE).
_local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE") or 1)
if _local > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _local))

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindeye_dist.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent / "configs" / "default.yaml"),
                        help="experiment YAML (default: launchers/configs/default.yaml, the recipe for a new "
                             "dataset, derived from data.url's meta.json)")
    parser.add_argument("--ds_config", "--ds-config", dest="ds_config", help="DeepSpeed JSON (ZeRO stage, offload, communication)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # appended by deepspeed
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=200")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.ds_config:
        overrides.append(f"run.ds_config={args.ds_config}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from mindeye_dist.train import answer_errors, run

    return answer_errors(lambda: run(cfg))


if __name__ == "__main__":
    sys.exit(main())
