"""raymeta: meta-learning methods for learning with noisy labels, run as experiments at scale."""

__version__ = "0.1.0"
