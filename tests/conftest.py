"""Test-session settings: one thread per worker (pytest-xdist runs one worker per core).

Tiny tensors dominate these tests, and on a 2-core machine multi-threaded kernels on
them stall each other; one thread per process is faster and steadier.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import torch  # noqa: E402

torch.set_num_threads(1)
