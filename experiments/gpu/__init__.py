"""Measurements made on a GPU machine: `python -m experiments.gpu.fast_path`."""
