"""Semi-supervised segmentation by cross teaching between a CNN and a Transformer (Luo et al., MIDL 2022).

Image + mask sources and SSL4MIS's augmentation, its losses, per-volume metrics, and the jitted two-network step.
"""

from cass_jax.segmentation.augment import RandomGenerator, ResizeOnly
from cass_jax.segmentation.cross_teaching import (
    NETWORKS,
    CrossTeaching,
    CrossTeachingConfig,
    CrossTeachingState,
    Networks,
    build_networks,
    cross_teaching_step,
    evaluate,
    init,
    jit_train_step,
    network_variables,
    predict_labels,
    segmentation_losses,
    sgd_poly,
    supervised_step,
    train_step,
)
from cass_jax.segmentation.data import (
    ACDC_CLASS_NAMES,
    ACDC_STEM_PATTERN,
    SegmentationSource,
    acdc_splits,
    csv_pairs,
    folder_pairs,
    labeled_split,
    volume_groups,
)
from cass_jax.segmentation.evaluation import evaluate_volumes, segment_slices
from cass_jax.segmentation.loader import two_stream_iterator
from cass_jax.segmentation.losses import consistency_weight, cross_entropy, dice_loss, sigmoid_rampup
from cass_jax.segmentation.metrics import class_scores, mean_scores, structure_scores

__all__ = [
    "ACDC_CLASS_NAMES", "ACDC_STEM_PATTERN", "NETWORKS", "CrossTeaching", "CrossTeachingConfig",
    "CrossTeachingState", "Networks", "RandomGenerator", "ResizeOnly", "SegmentationSource", "acdc_splits",
    "build_networks", "class_scores", "consistency_weight", "cross_entropy", "cross_teaching_step", "csv_pairs",
    "dice_loss", "evaluate", "evaluate_volumes", "folder_pairs", "init", "jit_train_step", "labeled_split",
    "mean_scores", "network_variables", "predict_labels", "segment_slices",
    "segmentation_losses", "sgd_poly", "sigmoid_rampup", "structure_scores", "supervised_step", "train_step",
    "two_stream_iterator", "volume_groups",
]
