"""Commands of ``python -m kd_lightning`` beside LightningCLI's own."""
