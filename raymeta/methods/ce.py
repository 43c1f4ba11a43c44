"""Cross-entropy on the noisy labels: the baseline, with nothing to learn about the noise."""

from raymeta.methods.base import Method


class CrossEntropy(Method):
    name = "ce"
