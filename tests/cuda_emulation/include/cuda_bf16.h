// Stands in for CUDA's <cuda_bf16.h> when tests/cuda_emulation/build.py compiles csrc/cuda on the host.
#pragma once
#include "../emu.h"
