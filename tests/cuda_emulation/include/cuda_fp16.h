// Stands in for CUDA's <cuda_fp16.h> when tests/cuda_emulation/build.py compiles csrc/cuda on the host.
#pragma once
#include "../emu.h"
