"""Scale-up sweeps on Ray Tune: model sizes x data sizes x seeds, the learning rate per size by
ASHA, every trial a Ray Train job whose workers call ``mindeye_dist.train.run``.

    sweep = load_sweep_config("launchers/configs/sweeps/smoke.yaml", ["budget.samples=2000"])
    run_sweep(sweep, "sweeps/smoke", address=None)          # same call again resumes

``config`` is the typed sweep config, ``plan`` turns it into trials with matched schedules,
FLOPs and memory (``--dry-run``), ``runner`` runs them on Ray and writes ``results.jsonl``.
"""

from mindeye_dist.sweep.config import SweepConfig, load_sweep_config
from mindeye_dist.sweep.runner import run_sweep

__all__ = ["SweepConfig", "load_sweep_config", "run_sweep"]
