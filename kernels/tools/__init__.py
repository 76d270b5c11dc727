"""Tools around the kernels, never imported by the attention paths: ``bench`` (``terrabyte bench
attention``), ``gpu_check`` (the GPU check: correctness, then the benchmark), ``aot`` (compile every
kernel variant for a GPU this machine does not have)."""
