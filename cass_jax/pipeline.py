"""`mode=pipeline`: self-supervised pretraining (or a finished one reused), then every downstream run, then the table.

Each arm is linear-probed and fine-tuned at every label fraction and seed, tested on the test split,
and the two fine-tuned arms are also ensembled (mean of their test probabilities). With `config.methods`, several
methods are pretrained (each in `<workdir>/pretrain/<method>/`) and compared with the same arms without
self-supervision. The tables go to `results.md` and `results.json` in the workdir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np
from absl import logging

from cass_jax import finetune
from cass_jax import metrics as metrics_lib
from cass_jax import pretrain as pretrain_lib
from cass_jax.pretrain import TITLES

BASELINE_INIT = "arm_init"  # the comparison's arms without self-supervision: config.<arm>.init (ImageNet or random)


def ensure_pretrained(config: ml_collections.ConfigDict, workdir: str | Path) -> dict | None:
    """The workdir's pretraining exports: reused when present, else pretrained now.

    None when pretraining halted early (`halt_after_steps`): rerun the same command to continue it.
    An export of another method than `config.method` is an error, not silently reused.
    """
    name = pretrain_lib.method_name(config)
    exports = pretrain_lib.read_exports(workdir)
    if exports is None:
        return pretrain_lib.pretrain(config, workdir)
    exported = pretrain_lib.exported_method(exports)
    if exported != name:
        raise ValueError(f"{Path(workdir) / 'export'} holds a {exported} pretraining, not config.method={name!r}; "
                         "use another workdir, or config.methods to compare methods.")
    logging.info("Reusing the finished %s pretraining in %s", TITLES[name], Path(workdir) / "export")
    return exports


def pipeline_methods(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The methods `config.methods` compares, in order: "cass,dino" from the command line (which ml_collections
    may hand over as ("cass,dino",)) or a sequence of names; () when unset (then only `config.method` runs).

    A one-backbone method may name its arm, "dino:cnn" or "barlow_twins:vit", overriding config.<method>.arm, so
    one comparison can pretrain DINO on both arms ("cass,dino:cnn,dino:vit").
    """
    value = config.get("methods", ())
    parts = [value] if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(name.strip() for part in parts for name in part.split(",") if name.strip()))
    unknown = [name for name in names if split_method_entry(name)[0] not in pretrain_lib.METHODS]
    if unknown:
        raise ValueError(f"config.methods names {', '.join(map(repr, unknown))}; "
                         f"use some of {', '.join(pretrain_lib.METHODS)} (DINO and Barlow Twins optionally with "
                         "an arm: dino:cnn, dino:vit).")
    for name in names:
        method, arm = split_method_entry(name)
        if arm and (method == "cass" or arm not in finetune.ARMS):
            raise ValueError(f"config.methods entry {name!r}: " + (
                "CASS pretrains both arms together; write plain 'cass'." if method == "cass"
                else f"the arm must be one of {', '.join(finetune.ARMS)}."))
    return names


def split_method_entry(entry: str) -> tuple[str, str]:
    """"dino:cnn" -> ("dino", "cnn"); "cass" -> ("cass", "")."""
    method, _, arm = entry.partition(":")
    return method.strip(), arm.strip()


def entry_title(entry: str) -> str:
    """"dino:cnn" -> "DINO (cnn)", for log lines and errors."""
    method, arm = split_method_entry(entry)
    return TITLES[method] + (f" ({arm})" if arm else "")


def method_config(config: ml_collections.ConfigDict, entry: str) -> ml_collections.ConfigDict:
    """A copy of `config` that pretrains the method of `entry` (its recipe from the config's `<method>` block,
    on the entry's arm when it names one)."""
    method, arm = split_method_entry(entry)
    copy = config.copy_and_resolve_references()
    copy.method = method
    if arm:
        copy[method].arm = arm
    return copy


def pretraining_roots(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Path]:
    """Where each compared method's pretraining lives: `<root>/pretrain/<method>/` (`dino_cnn/` for "dino:cnn"),
    the root being `downstream.pretrain_workdir` when set (exports read, never written) else the workdir; without
    `config.methods`, `config.method`'s pretraining in the root itself (`<root>/export`, the one-method layout)."""
    root = Path(config.downstream.pretrain_workdir or workdir)
    methods = pipeline_methods(config)
    if not methods:
        return {pretrain_lib.method_name(config): root}
    return {entry: root / "pretrain" / "_".join(filter(None, split_method_entry(entry))) for entry in methods}


def comparison_arm_inits(config: ml_collections.ConfigDict, workdir: Path,
                         roots: Mapping[str, Path]) -> list[tuple[str, finetune.ArmInit]]:
    """The comparison's downstream starting points, per arm: each method's export of it (for each pretrained
    init in `downstream.init`), then the arm without self-supervision (`arm_init`, unless
    downstream.evaluate_baseline is False, and any other init listed).

    A method that exported only some arms (DINO: one, Barlow Twins: one) is evaluated on those.
    """
    d = config.downstream
    inits = finetune.parse_inits(d.init)
    pretrained = [init for init in inits if init in finetune.PRETRAINED_INITS]
    baselines = list(dict.fromkeys([BASELINE_INIT] * bool(d.get("evaluate_baseline", True))
                                   + [init for init in inits if init not in pretrained]))
    exported = {method: pretrain_lib.read_exports(root) for method, root in roots.items()} if pretrained else {}
    for method, arms in exported.items():
        if arms is None:
            raise FileNotFoundError(f"No finished {entry_title(method)} pretraining in {roots[method]} "
                                    "(export/arms.json); leave downstream.pretrain_workdir empty to pretrain it in "
                                    "this workdir.")
        skipped = [arm for arm in d.arms if arm not in arms]
        if skipped:
            logging.info("%s exported %s; its downstream runs leave out %s.", entry_title(method), ", ".join(arms),
                         ", ".join(skipped))
    arm_inits = []
    for arm in d.arms:
        arm_inits += [(arm, finetune.pretrained_init(config, arm, init, roots[method]))
                      for method, arms in exported.items() if arm in arms for init in pretrained]
        arm_inits += [(arm, finetune.resolve_init(config, arm, init, workdir)) for init in baselines]
    return arm_inits


def pretrain_all(config: ml_collections.ConfigDict, roots: Mapping[str, Path]) -> bool:
    """Pretrains (or reuses) each method in its folder; False when one halted early (rerun to continue)."""
    for method, root in roots.items():
        if ensure_pretrained(method_config(config, method), root) is None:
            logging.info("%s pretraining halted before the end (halt_after_steps); rerun to continue it, then "
                         "the downstream runs start.", entry_title(method))
            return False
    return True


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
    """Pretrain (or reuse) every method, probe and fine-tune the arms at every label fraction and seed, write
    the tables.

    Returns the results dict written to results.json, or None when pretraining halted early.
    """
    finetune.check_downstream_config(config)
    workdir = Path(workdir).absolute()
    d = config.downstream
    comparing = bool(pipeline_methods(config))
    roots = pretraining_roots(config, workdir)
    uses_exports = any(init in finetune.PRETRAINED_INITS for init in finetune.parse_inits(d.init))
    if uses_exports and not d.pretrain_workdir and not pretrain_all(config, roots):
        return None
    splits = finetune.load_downstream_data(config)
    multi_label = bool(splits.multi_label)
    if comparing:
        records = finetune.run_arm_inits(config, workdir, comparison_arm_inits(config, workdir, roots),
                                         d.protocols, splits)
    else:
        records = finetune.run_settings(config, workdir, d.arms, d.protocols, splits)
    finetune.write_models_index(workdir, records)
    write_pipeline_saliency(config, workdir, records, splits.test)
    if d.ensemble:
        records += ensemble_records(records, multi_label)
    timings = [pretrain_lib.read_pretraining_record(root) for root in roots.values()] if uses_exports else []
    return finetune.write_results(workdir, records, multi_label, splits.class_names,
                                  [timing for timing in timings if timing is not None])
