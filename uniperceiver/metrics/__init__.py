"""Metrics as pure functions, the lowest layer above the model: tasks and data import them, they
import nothing of the project but `errors`.

- classification: top-k accuracy, multi-view (video) accuracy;
- retrieval: Recall@K in both directions, tiled;
- glue: accuracy, F1, Matthews correlation, Pearson/Spearman;
- captions: BLEU, METEOR, ROUGE-L, CIDEr (pycocoevalcap), SPICE optional;
- vqa: the official VQA accuracy and answer normalisation.
"""

from uniperceiver.metrics._arrays import MetricError
from uniperceiver.metrics.classification import multiview_accuracy, topk_accuracy
from uniperceiver.metrics.glue import (
    GLUE_MAIN_METRIC,
    GLUE_TASKS,
    accuracy,
    f1_binary,
    glue_metrics,
    matthews_corrcoef,
    pearson_spearman,
)
from uniperceiver.metrics.retrieval import image_text_retrieval, retrieval_recall

__all__ = [
    "MetricError",
    "topk_accuracy",
    "multiview_accuracy",
    "retrieval_recall",
    "image_text_retrieval",
    "accuracy",
    "f1_binary",
    "matthews_corrcoef",
    "pearson_spearman",
    "glue_metrics",
    "GLUE_TASKS",
    "GLUE_MAIN_METRIC",
]
