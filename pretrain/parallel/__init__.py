"""Parallel layouts of the model, applied from outside it: the rank layout, pipeline layers, Ulysses
sequence parallelism and tensor-parallel (AutoTP) specs."""
