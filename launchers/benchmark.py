"""Performance harness: training throughput and FLOP/s vs the measured matmul peak, a
reference-style loop, the loader (local vs S3) and ZeRO memory per rank, in one run.

    python launchers/benchmark.py                                   # full run (~10 min on 2 CPU cores)
    python launchers/benchmark.py --quick --json bench.json         # ~1 min
    python launchers/benchmark.py --preset demo --preset mindeye1-bp --micro-batch-sizes 32,128 \\
        --sections train,peak --markdown BENCH.md
    python launchers/benchmark.py --sections mindeye1 --json me1.json      # ours vs the references at MindEye1 size
    python launchers/benchmark.py --gpu-check --json gpu.json               # GPU readiness (launchers/gpu_check.sh)
    python launchers/benchmark.py --gpu-check --device cpu --quick          # its CPU test: CUDA parts skipped

Presets: model preset names, ``mindeye1-bp`` (MindEye1 backbone + projector, prior and low-level
off), or ``NAME:key=value,...`` with model overrides; the last one is the "large" preset (profiled).
Results: JSON (``--json``) with the headline ratios at the top level, markdown tables
(``--markdown``, also printed). See ``mindeye_dist/benchmark.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mindeye_dist  # noqa: E402,F401  (torchvision shim first)
from mindeye_dist.benchmark import SECTIONS, BenchmarkOptions, format_markdown, run_benchmark  # noqa: E402


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    d = BenchmarkOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", default=None, help=f"training preset (repeatable; default {' '.join(d.presets)})")
    p.add_argument("--micro-batch-sizes", type=_ints, default=d.micro_batch_sizes, help=f"comma-separated (default {','.join(map(str, d.micro_batch_sizes))})")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed steps per configuration; the median is reported")
    p.add_argument("--json", default=None, help="write the result JSON here")
    p.add_argument("--markdown", default=None, help="write the markdown tables here")
    p.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="training dtype (fp32 on CPU, bf16 on GPU)")
    p.add_argument("--ds-config", default=d.ds_config, help="DeepSpeed JSON for the training section")
    p.add_argument("--reference-steps", type=int, default=None, help=f"timed reference steps (default {d.reference_steps})")
    p.add_argument("--memory-preset", default=None, help=f"preset of the ZeRO memory runs (default {d.memory_preset})")
    p.add_argument("--wait-for-idle", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for the 1-minute load average to drop below 0.8")
    p.add_argument("--host-memory", choices=("auto", "reuse", "system"), default=d.host_memory,
                   help="host allocator as train.host_memory (default auto: on CPU, freed memory is kept for the next step)")
    p.add_argument("--work-dir", default=None, help="keep the generated datasets here and reuse them (default: temp dir)")
    p.add_argument("--mindeye1-hidden", type=int, default=None,
                   help="backbone width of the MindEye1-size comparison (default: the widest of 4096/2048/1024/512 that fits)")
    p.add_argument("--mindeye1-rounds", type=int, default=d.mindeye1_rounds, help="alternations of ours and the reference")
    p.add_argument("--matmul-n", type=int, default=None,
                   help=f"size of the peak-FLOP/s matmul (default {d.matmul_n}; bf16 on a CPU without bf16 units needs ~1024)")
    p.add_argument("--gpu-check", action="store_true",
                   help="GPU readiness instead of the benchmark: bf16 MFU at mindeye1, fused optimizer, NCCL, ZeRO-3 memory")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="--gpu-check's device")
    args = p.parse_args(argv)
    if args.gpu_check:
        return _gpu_check(args)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    opts = BenchmarkOptions(micro_batch_sizes=args.micro_batch_sizes, repeats=args.repeats, quick=args.quick,
                            sections=sections, precision=args.precision, ds_config=args.ds_config, work_dir=args.work_dir,
                            wait_for_idle_s=args.wait_for_idle, host_memory=args.host_memory,
                            command="python launchers/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.quick:
        opts = opts.apply_quick()
    # Explicit flags win over --quick's sizes.
    explicit = {}
    if args.preset:
        explicit["presets"] = args.preset
    if "--micro-batch-sizes" in (sys.argv if argv is None else argv):
        explicit["micro_batch_sizes"] = args.micro_batch_sizes
    if "--repeats" in (sys.argv if argv is None else argv):
        explicit["repeats"] = args.repeats
    if args.reference_steps is not None:
        explicit["reference_steps"] = args.reference_steps
    if args.memory_preset:
        explicit["memory_preset"] = args.memory_preset
    if "--sections" in (sys.argv if argv is None else argv):
        explicit["sections"] = sections
    explicit.update(mindeye1_hidden=args.mindeye1_hidden, mindeye1_rounds=args.mindeye1_rounds)
    if args.matmul_n:
        explicit["matmul_n"] = args.matmul_n
    import dataclasses

    opts = dataclasses.replace(opts, **explicit)
    result = run_benchmark(opts)
    text = format_markdown(result)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


def _gpu_check(args) -> int:
    from mindeye_dist.bench.gpu import GpuCheckOptions, format_markdown as gpu_markdown, run_gpu_check

    result = run_gpu_check(GpuCheckOptions(device=args.device, quick=args.quick))
    text = gpu_markdown(result)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    failed = [k for k in ("environment", "optimizer", "nccl", "mfu", "zero3") if result[k]["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
