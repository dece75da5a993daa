"""Scale-up sweeps on Ray: model sizes x data sizes x seeds, LR per size by ASHA, then the report.

    python launchers/sweep.py --config launchers/configs/sweeps/smoke.yaml --out sweeps/smoke
    python launchers/sweep.py --config launchers/configs/sweeps/scaling_cpu.yaml --out sweeps/cpu   # make scaling-demo
    python launchers/sweep.py --config ... --out ... --dry-run          # trials, FLOPs, memory; nothing starts
    python launchers/sweep.py --config ... --out ... --address auto     # join a running cluster (ray start)
    python launchers/sweep.py --config ... --out ... --address ray://head:10001
    python launchers/sweep.py --config ... --out ... budget.samples=2000 lr.values=[1e-3,3e-3]

Without ``--address`` a local Ray is started on 127.0.0.1 (dashboard off unless ``dashboard:
true``, then on 127.0.0.1) and stopped at the end. Running the same command again resumes: finished
trials are not rerun, unfinished ones continue from their checkpoints. Then:

    python launchers/report.py SWEEP_DIR --out SWEEP_DIR/report
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindeye_dist.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="sweep YAML (launchers/configs/sweeps/*.yaml)")
    parser.add_argument("--out", required=True, help="sweep directory (results.jsonl, trials/, ray/); reused to resume")
    parser.add_argument("--address", help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT (default: start one)")
    parser.add_argument("--dry-run", action="store_true", help="print the trials, their FLOPs and memory per rank; "
                                                               "refuse trials that do not fit; start nothing")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the sweep YAML")
    args = parser.parse_args(argv)
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
    from mindeye_dist.ds_config import DSConfigError
    from mindeye_dist.sweep import load_sweep_config, run_sweep

    try:
        sweep = load_sweep_config(args.config, args.overrides)
        return run_sweep(sweep, args.out, address=args.address, dry_run=args.dry_run,
                         echo=lambda line: print(line, file=sys.stderr, flush=True))
    except (ConfigError, DSConfigError, DataError, MemoryError) as err:
        print(f"sweep: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
