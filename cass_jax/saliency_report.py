"""Saliency maps of saved classifiers written to disk: one PNG per image, model and method, side-by-side figures,
mask-overlap scores and the randomisation sanity check, for predict mode and for the pipeline's models.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from PIL import Image

from cass_jax import saliency
from cass_jax import saliency_figures as figures
from cass_jax.classifier import Classifier
from cass_jax.models import init_variables


def parse_methods(text: str | Sequence[str]) -> tuple[str, ...]:
    """Comma-separated saliency methods, checked before any model is loaded."""
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in saliency.METHODS]
    if unknown:
        raise ValueError(f"Unknown saliency method(s) {unknown}; choose from {', '.join(saliency.METHODS)}.")
    return tuple(names)


def file_stem(path: str) -> str:
    """A file-name-safe stem of an image path, for the PNGs named after it."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem) or "image"


def read_masks(folder: str | Path, image_paths: Sequence[str], size: int) -> np.ndarray | None:
    """Binary masks (B, size, size) for the images, from `folder/<image stem>.png` (nearest resize), or None.

    An image without a mask is an error naming the expected file, so scores never silently cover fewer images.
    """
    if not folder:
        return None
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"masks={str(folder)!r} is not a folder; give the folder of mask PNGs named like "
                                "the images.")
    masks = []
    for path in image_paths:
        candidates = [folder / f"{Path(path).stem}{suffix}" for suffix in (".png", ".PNG")]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"No mask for image {path}: expected {candidates[0]}.")
        with Image.open(found) as mask:
            resized = mask.convert("L").resize((size, size), Image.NEAREST)
        masks.append(np.asarray(resized) > 0)
    return np.stack(masks)


def short_names(classifiers: Sequence[Classifier]) -> list[str]:
    """Column labels that fit a figure: "cnn cass", adding protocol, then label fraction and seed, only where needed
    to tell models apart; the folder name for models without that information."""
    keys = (("arm", "init"), ("arm", "init", "protocol"), ("arm", "init", "protocol", "label_fraction", "seed"))
    for fields in keys:
        if all(all(f in c.info for f in fields) for c in classifiers):
            names = [" ".join(f"{c.info[f]:g}" if isinstance(c.info[f], float) else str(c.info[f]) for f in fields)
                     for c in classifiers]
            if len(set(names)) == len(names):
                return names
    names = [c.name for c in classifiers]
    return names if len(set(names)) == len(names) else [f"{i + 1}: {n}" for i, n in enumerate(names)]


def _model_maps(classifier: Classifier, images: Sequence[np.ndarray], methods: Sequence[str],
                seed: int, sanity_check: bool) -> tuple[dict[str, np.ndarray], dict[str, float], np.ndarray]:
    """One model's maps per applicable method (at its input size), its sanity-check figures, its inputs (uint8)."""
    resized = np.stack([classifier.resize(image) for image in images])
    inputs = classifier.preprocess(resized)
    targets = np.argmax(classifier.probabilities(inputs), axis=1)
    applicable = [m for m in methods if m in saliency.applicable_methods(classifier.model)]
    skipped = sorted(set(methods) - set(applicable))
    if skipped:
        logging.info("Saliency %s does not apply to %s; skipped.", skipped, classifier.name)
    # Integrated Gradients' black baseline is the black image under this model's normalisation.
    options = {"integrated_gradients": {"mean": classifier.mean, "std": classifier.std}}
    maps = {m: saliency.saliency_maps(classifier.model, classifier.variables, inputs, targets, m, **options.get(m, {}))
            for m in applicable}
    checks = {}
    if sanity_check and applicable:
        random_variables = init_variables(classifier.model, jax.random.PRNGKey(seed), classifier.image_size)
        checks = saliency.randomisation_check(classifier.model, classifier.variables, random_variables, inputs,
                                              targets, applicable, options)
    return maps, checks, resized


def write_saliency(config: Any, workdir: Path, classifiers: Sequence[Classifier], source: Any, predictions: Any,
                   methods: Sequence[str], writer: Any) -> dict[str, Any]:
    """Predict mode: maps of `config.saliency_images` predicted images, spread over the input, in workdir/saliency/."""
    chosen = spread_positions(len(predictions.paths), int(config.saliency_images))
    images = [source[int(predictions.positions[i])]["image"] for i in chosen]
    return saliency_report(workdir / "saliency", classifiers, images, [predictions.paths[i] for i in chosen],
                           methods or ("vanilla",), writer=writer, masks_folder=config.masks, seed=int(config.seed),
                           sanity_check=bool(config.saliency_sanity_check), write_pngs=True)


def saliency_report(out: Path, classifiers: Sequence[Classifier], images: Sequence[np.ndarray],
                    paths: Sequence[str], methods: Sequence[str], *, writer: Any = None, masks_folder: str = "",
                    seed: int = 0, sanity_check: bool = False, write_pngs: bool = True) -> dict[str, Any]:
    """Maps of every model for `images`; a comparison figure per method (rows: images; columns: input, models).

    Returns, per model and method, the mask scores (when masks are given) and the sanity-check correlations.
    """
    out.mkdir(parents=True, exist_ok=True)
    stems = [file_stem(p) for p in paths]
    report: dict[str, Any] = {"images": list(paths), "methods": list(methods), "models": {}}
    columns: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}
    display = None
    for classifier, name in zip(classifiers, short_names(classifiers)):
        maps, checks, resized = _model_maps(classifier, images, methods, seed, sanity_check)
        display = resized if display is None else display
        entry: dict[str, Any] = {"path": classifier.path, "folder": classifier.name}
        masks = read_masks(masks_folder, paths, classifier.image_size)
        for method, method_maps in maps.items():
            columns[method][name] = method_maps
            if write_pngs:
                for stem, image, saliency_map in zip(stems, resized, method_maps):
                    figures.write_saliency_png(out / classifier.name / method / f"{stem}.png", image, saliency_map)
            if masks is not None:
                scores = saliency.mask_scores(method_maps, masks)
                entry.setdefault("mask_scores", {})[method] = {
                    "mass_in_mask": scores["mean_mass_in_mask"], "pointing_game": scores["mean_pointing_game"]}
        if checks:
            entry["randomisation_rank_correlation"] = checks
            logging.info("Randomisation sanity check, %s (rank correlation, trained vs re-initialised; near 0 is "
                         "good): %s", classifier.name, {m: round(v, 3) for m, v in checks.items()})
        report["models"][name] = entry
    for method, by_model in columns.items():
        if not by_model:
            continue
        figure_path = out / f"comparison_{method}.png"
        figure = figures.write_comparison_png(figure_path, display, by_model, row_labels=stems)
        report.setdefault("figures", {})[method] = str(figure_path)
        if writer is not None:
            writer.write_images(0, {f"saliency/{method}": (figure.astype(np.float32) / 255.0)[None]})
    return report


def spread_positions(size: int, count: int) -> list[int]:
    """`count` positions spread evenly over a split of `size` (sorted by class, so several classes show)."""
    return sorted({int(p) for p in np.linspace(0, size - 1, min(count, size))})


def pipeline_saliency(out: Path, model_paths: Sequence[str], test_source: Any, count: int,
                      methods: Sequence[str], writer: Any = None) -> dict[str, Any] | None:
    """The pipeline's figure: `count` test images, spread over the split, through every kept model."""
    from cass_jax.classifier import load_classifier

    if not model_paths or count <= 0 or not methods:
        return None
    classifiers = [load_classifier(path) for path in model_paths]
    positions = spread_positions(len(test_source), count)
    images = [test_source[p]["image"] for p in positions]
    paths = [test_source.describe(int(test_source.rows[p])) for p in positions]
    return saliency_report(out, classifiers, images, paths, methods, writer=writer, write_pngs=False)
