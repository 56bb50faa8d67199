"""Pipeline stages: each takes exposures and a frozen config and calls the pure kernels."""
