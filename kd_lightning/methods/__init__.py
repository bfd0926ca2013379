"""Methods that are more than a loss: DistillModule subclasses and their teacher statistics."""

from kd_lightning.methods.lelp import LELPLoss, LELPModule
from kd_lightning.methods.online_bdkd import OnlineBDKDModule

__all__ = ["LELPLoss", "LELPModule", "OnlineBDKDModule"]
