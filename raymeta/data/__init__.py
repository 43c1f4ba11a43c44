"""Data: datasets by name, label noise, the meta split, and device-resident batches.

Knows nothing of models, methods or Ray.
"""
