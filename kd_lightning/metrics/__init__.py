"""torchmetrics Metrics: task metrics, calibration and representational alignment."""

from kd_lightning.metrics.alignment import CrossLayerCKA, RepresentationMoments, StreamingLinearCKA, StreamingProcrustes
from kd_lightning.metrics.calibration import ReliabilityBins, ReliabilityCurve
from kd_lightning.metrics.retrieval import RecallAtK, retrieval_metrics
from kd_lightning.metrics.task import class_probabilities, classification_metrics

__all__ = [
    "CrossLayerCKA",
    "RecallAtK",
    "ReliabilityBins",
    "ReliabilityCurve",
    "class_probabilities",
    "classification_metrics",
    "RepresentationMoments",
    "StreamingLinearCKA",
    "StreamingProcrustes",
    "retrieval_metrics",
]
