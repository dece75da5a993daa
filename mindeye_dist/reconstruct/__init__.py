"""Reconstruction: brain -> prior samples -> generator -> picture, and the eight MindEye metrics.

    from mindeye_dist.reconstruct import ReconstructConfig, reconstruct, evaluate_recon_dir
    summary = reconstruct(ReconstructConfig(out="recon", run="run_dir", generator="synthetic"))
    metrics = evaluate_recon_dir("recon", weights="/weights/metrics")   # recon.{pixcorr, ...}

Modules: ``config`` (ReconstructConfig), ``brain`` (run model or ridge -> tokens, retrieval
embedding, low-level latent), ``generators`` (synthetic renderer, Versatile Diffusion, Stable
unCLIP; low-level decoders), ``scoring`` (best-of-k), ``pipeline`` (the run over a split, on every
rank), ``output`` (directory layout, grid), ``metrics`` (the eight metrics and feature networks),
``report`` (metrics of a directory, markdown/HTML), ``tensorboard`` (the training-time grid).
"""

from mindeye_dist.reconstruct.config import GENERATORS, ReconstructConfig
from mindeye_dist.reconstruct.metrics import LABELS, LOWER_IS_BETTER, METRICS, build_feature_networks, \
    reconstruction_metrics, two_way_identification
from mindeye_dist.reconstruct.pipeline import reconstruct, reconstruct_batch
from mindeye_dist.reconstruct.report import evaluate_recon_dir, metrics_table, write_report
from mindeye_dist.reconstruct.tensorboard import image_models_for, reconstruction_grid

__all__ = [
    "GENERATORS", "LABELS", "LOWER_IS_BETTER", "METRICS", "ReconstructConfig", "build_feature_networks",
    "evaluate_recon_dir", "image_models_for", "metrics_table", "reconstruct", "reconstruct_batch",
    "reconstruction_grid", "reconstruction_metrics", "two_way_identification", "write_report",
]
