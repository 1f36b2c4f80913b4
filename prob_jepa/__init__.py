"""prob-jepa: I-JEPA with probabilistic predictor heads on the JIN backbone (``../shared/DESIGN.md``).

``prob_jepa.load_run(run_dir)`` gives back a finished run's trained model and the config it trained with.
"""
from .run_io import load_run

__all__ = ["load_run"]
