"""Parts of the one-run benchmark harness (``mindeye_dist.benchmark`` puts them together).

- :mod:`~mindeye_dist.bench.common`: configs, models and synthetic batches per preset, step timing.
- :mod:`~mindeye_dist.bench.training`: training throughput and FLOP/s of the real step, the
  real-loader data-wait share, a torch.profiler breakdown and "what-if" engine variants.
- :mod:`~mindeye_dist.bench.reference`: a MindEye-reference-style loop (frozen CLIP encoder run on
  every batch, plain torch AdamW) on the same model.
- :mod:`~mindeye_dist.bench.data`: loader samples/s and MB/s, local vs loopback S3, at NSD sizes.
- :mod:`~mindeye_dist.bench.memory`: model-state RSS per rank at ZeRO 0-3 with 2 ranks vs estimate.
- :mod:`~mindeye_dist.bench.report`: the markdown tables.
"""
