"""Dispatch on `config.mode`: the one entry point main.py (or another program) calls."""

from pathlib import Path

import ml_collections

MODES = ("pretrain", "finetune", "linear_probe", "pipeline", "predict", "segmentation", "segment")


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> object:
    """Runs the experiment `config` describes, writing everything under `workdir`."""
    from cass_jax.reporting import quiet_library_logs

    quiet_library_logs()
    if config.mode == "pretrain":
        from cass_jax.pretrain import pretrain
        return pretrain(config, workdir)
    if config.mode in ("finetune", "linear_probe"):
        from cass_jax import finetune
        return finetune.run(config, workdir)
    if config.mode == "pipeline":
        from cass_jax.pipeline import run_pipeline
        return run_pipeline(config, workdir)
    if config.mode == "predict":
        from cass_jax.inference import run_predict
        return run_predict(config, workdir)
    if config.mode == "segmentation":
        from cass_jax.segmentation.train import run_segmentation
        return run_segmentation(config, workdir)
    if config.mode == "segment":
        from cass_jax.segmentation.predict import run_segment
        return run_segment(config, workdir)
    raise ValueError(f"Unknown config.mode={config.mode!r}; use one of {', '.join(MODES)}.")
