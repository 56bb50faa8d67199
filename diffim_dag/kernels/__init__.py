"""Pure numerical kernels: arrays in, arrays out; no dask, no I/O."""
