"""Experiment configs: ``--config configs/<name>.py[:variant]``."""
