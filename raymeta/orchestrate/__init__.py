"""Orchestration: sweep files into grids of trials, run with Ray Tune (Ray imported lazily)."""
