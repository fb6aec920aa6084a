"""Kernel tests: run by tests/test_triton_interpreted.py in a process of their own with
TRITON_INTERPRET=1 (on CPU tensors), or directly on a GPU machine. tests/conftest.py leaves this
folder out of a plain CPU run."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
