"""Where the kernel tests run. By default (and in CI) on the CPU, where conftest's
TRITON_INTERPRET=1 makes Triton interpret the real kernel code; on a GPU with
``PROXY_KERNEL_DEVICE=cuda TRITON_INTERPRET=0`` (what benchmarks/gpu_check/ runs there).
Inputs are drawn on the CPU from seeded generators and then moved, so both see the same numbers."""

import os

import torch

DEVICE = torch.device(os.environ.get("PROXY_KERNEL_DEVICE", "cpu"))
