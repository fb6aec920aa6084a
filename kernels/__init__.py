"""Triton kernels of bertfast (installed as ``bertfast.kernels``): ``@triton.jit`` code and plain
launcher functions, nothing else. Kernels know nothing of modules; the ops in ``bertfast.ops``
register them as their ``triton`` backend. No kernel has landed yet: every op reports
"no triton implementation of <op> yet" in ``bertfast info`` until its kernel issue lands.
"""
