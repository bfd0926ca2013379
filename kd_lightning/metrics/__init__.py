"""torchmetrics Metrics: task metrics, calibration and representational alignment."""

from kd_lightning.metrics.alignment import RepresentationMoments, StreamingLinearCKA, StreamingProcrustes
from kd_lightning.metrics.task import class_probabilities, classification_metrics

__all__ = [
    "class_probabilities",
    "classification_metrics",
    "RepresentationMoments",
    "StreamingLinearCKA",
    "StreamingProcrustes",
]
