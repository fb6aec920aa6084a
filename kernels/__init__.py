"""Triton kernels of bertfast (installed as ``bertfast.kernels``): ``@triton.jit`` code and plain
launcher functions, one file per kernel family, nothing else. Kernels know nothing of modules; the
ops in ``bertfast.ops`` register them as their ``triton`` backend. ``rng`` holds the counter-based
random bits every kernel with dropout or sampling shares; ``aot`` how a family lists its launches
for the static report (``bertfast static-report``).
"""
