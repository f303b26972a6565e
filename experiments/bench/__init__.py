"""Benchmarks: the train step against PyTorch, the trainer against its step, the cost of
ghost batch norm, of the noise scale and of the input pipeline, batch scaling and the
communication of the data-parallel step."""
