"""`mode=pipeline`: CASS pretraining (or a finished one reused), then every downstream run, then the table.

Each arm is linear-probed and fine-tuned at every label fraction and seed, tested on the test split,
and the two fine-tuned arms are also ensembled (mean of their test probabilities). The tables go to
`results.md` and `results.json` in the workdir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np
from absl import logging

from cass_jax import finetune
from cass_jax import metrics as metrics_lib

CASS_INITS = ("cass", "cass_raw")


def ensure_pretrained(config: ml_collections.ConfigDict, workdir: str | Path) -> dict | None:
    """The workdir's pretraining exports: reused when present, else pretrained now.

    None when pretraining halted early (`halt_after_steps`): rerun the same command to continue it.
    """
    from cass_jax.pretrain import pretrain, read_exports

    exports = read_exports(workdir)
    if exports is not None:
        logging.info("Reusing the finished CASS pretraining in %s", Path(workdir) / "export")
        return exports
    return pretrain(config, workdir)


def ensemble_records(records: Sequence[Mapping[str, Any]], multi_label: bool) -> list[dict[str, Any]]:
    """Mean of the CNN's and the ViT's fine-tuned test probabilities, per (init, label fraction, seed)."""
    fine_tuned = {(r["arm"], r["init"], r["label_fraction"], r["seed"]): r
                  for r in records if r["protocol"] == "finetune"}
    ensembles = []
    for (arm, init, fraction, seed), cnn in fine_tuned.items():
        vit = fine_tuned.get(("vit", init, fraction, seed))
        if arm != "cnn" or vit is None:
            continue
        if not np.array_equal(cnn["test_labels"], vit["test_labels"]):
            raise ValueError(f"The cnn and vit runs ({init}, fraction {fraction}, seed {seed}) saw different "
                             "test labels; they must be evaluated on the same test split to be ensembled.")
        mean_probabilities = (cnn["test_probabilities"] + vit["test_probabilities"]) / 2.0
        ensembles.append({
            "arm": "ensemble", "method": cnn["method"], "protocol": "finetune", "init": init, "model": f"{cnn['model']}+{vit['model']}",
            "label_fraction": fraction, "seed": seed,
            "test_metrics": metrics_lib.classification_metrics(cnn["test_labels"], mean_probabilities, multi_label),
            "test_probabilities": mean_probabilities, "test_labels": cnn["test_labels"],
        })
    return ensembles


def write_pipeline_saliency(config: ml_collections.ConfigDict, workdir: Path, records: Sequence[Mapping[str, Any]],
                            test_source: Any) -> dict[str, Any] | None:
    """Saliency figure of the first test images through each arm's kept fine-tuned model at the largest fraction."""
    from cass_jax import saliency_report
    from cass_jax.reporting import create_writer

    d = config.downstream
    methods = saliency_report.parse_methods(d.saliency)
    kept = [r for r in records if r.get("classifier") and r["protocol"] == "finetune"]
    if not kept or not methods:
        return None
    largest = max(r["label_fraction"] for r in kept)
    models = [r["classifier"] for r in kept if r["label_fraction"] == largest]
    writer = create_writer(workdir / "saliency")
    report = saliency_report.pipeline_saliency(workdir / "saliency", models, test_source, int(d.saliency_images),
                                               methods, writer)
    writer.flush()
    logging.info("Saliency figures of %d test images: %s", d.saliency_images, workdir / "saliency")
    return report


def run_pipeline(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any] | None:
    """Pretrain (or reuse), probe and fine-tune both arms at every label fraction and seed, write the table.

    Returns the results dict written to results.json, or None when pretraining halted early.
    """
    finetune.check_downstream_config(config)
    workdir = Path(workdir).absolute()
    d = config.downstream
    needs_cass = any(init in CASS_INITS for init in finetune.parse_inits(d.init))
    if needs_cass and not d.pretrain_workdir and ensure_pretrained(config, workdir) is None:
        logging.info("Pretraining halted before the end (halt_after_steps); rerun to continue it, then the "
                     "downstream runs start.")
        return None
    splits = finetune.load_downstream_data(config)
    multi_label = bool(splits.multi_label)
    records = finetune.run_settings(config, workdir, d.arms, d.protocols, splits)
    finetune.write_models_index(workdir, records)
    write_pipeline_saliency(config, workdir, records, splits.test)
    if d.ensemble:
        records += ensemble_records(records, multi_label)
    return finetune.write_results(workdir, records, multi_label, splits.class_names)
