"""Lightning Callbacks: export, loss schedules, alignment logging."""

from kd_lightning.callbacks.export import ExportHF

__all__ = ["ExportHF"]
