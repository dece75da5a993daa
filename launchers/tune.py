"""Tuning mode: search a better configuration for one dataset within a stated budget.

    python launchers/tune.py --data URL --out tune_out --budget-min 60
    python launchers/tune.py --data URL --out tune_out --budget-min 30 --trials 16 --steps 400 \
        space.width=[256,512] space.lr=[3e-4,3e-3]
    python launchers/tune.py ... --address auto          # on a running Ray cluster (GPU workers: --gpus-per-worker 1)
    deepspeed launchers/train.py --ds_config ds_configs/zero2.json --config tune_out/best.yaml   # train the winner

ASHA over learning rate, temperature, width, dropout and mixup on the validation split (never
test), starting from the recipe for a new dataset (launchers/configs/demo.yaml). The same
command resumes a search whose driver was killed.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindeye_dist.config import ConfigError, apply_overrides, from_dict  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset URL (local path or s3://)")
    p.add_argument("--out", required=True, help="tuning directory (best.yaml, tuning.json, trials/, ray/)")
    p.add_argument("--config", default="launchers/configs/demo.yaml", help="experiment YAML the search starts from")
    p.add_argument("--ds-config", default="ds_configs/zero2.json", help="DeepSpeed JSON of every trial")
    p.add_argument("--budget-min", type=float, required=True, help="wall-clock budget of the search in minutes")
    p.add_argument("--trials", type=int, default=24, help="most trials to sample (ASHA stops the weak early)")
    p.add_argument("--steps", type=int, help="optimizer steps of a trial that survives every rung (default: the config's)")
    p.add_argument("--workers", type=int, default=2, help="ranks per trial")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=1, help="trials at once")
    p.add_argument("--address", help="Ray cluster to join (default: start a local one on 127.0.0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="space.KEY=[low,high] (space.width=[256,512]) or base experiment "
                                                "overrides as base.KEY=VALUE (base.train.micro_batch_size=64)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray Train gives a trial's workers 60 s to start; three trials' ranks starting together on an
    # oversubscribed CPU host took longer (a trial failed with WorkerGroupStartupTimeoutError and
    # the sweep stalled). The local Ray inherits this; a joined cluster keeps its own setting.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables; we print one line per event
    if not args.address:
        # Before Ray is imported (it reads this once): the local Ray this command starts runs in
        # Ray's single-host mode, which keeps GCS, raylet and workers on 127.0.0.1.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from mindeye_dist.data.errors import DataError
    from mindeye_dist.sweep.config import BaseSpec, ResourceSpec
    from mindeye_dist.sweep.tuning import TuneSpace, run_tuning

    try:
        space = from_dict(TuneSpace, apply_overrides({}, [o[len("space."):] for o in args.overrides
                                                          if o.startswith("space.")]), prefix="space")
        base_overrides = [o[len("base."):] for o in args.overrides if o.startswith("base.")]
        stray = [o for o in args.overrides if not o.startswith(("space.", "base."))]
        if stray:
            raise ConfigError(f"overrides {stray} must start with space. or base.")
        base = BaseSpec(config=args.config, ds_config=args.ds_config, overrides=base_overrides)
        resources = ResourceSpec(workers_per_trial=args.workers, cpus_per_worker=args.cpus_per_worker,
                                 gpus_per_worker=args.gpus_per_worker, concurrency=args.concurrency)
        run_tuning(args.data, args.out, base=base, space=space, trials=args.trials, budget_min=args.budget_min,
                   steps=args.steps, resources=resources, address=args.address, seed=args.seed,
                   echo=lambda line: print(line, file=sys.stderr, flush=True))
    except (ConfigError, DataError) as err:
        print(f"tune: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
