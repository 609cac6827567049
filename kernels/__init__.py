"""Triton kernels with PyTorch reference twins.

One switch: `kernels.USE_TRITON` (default: True exactly when CUDA is available and
the env var NANOUMM_KERNELS is not "0"). model.py and every training script call
`attention(...)` / `velocity_loss(...)` from here; those dispatch to the Triton code or
to the twin. Tests flip the switch on CPU with TRITON_INTERPRET=1.
Import them from their modules: `from kernels.attention import attention`,
`from kernels.loss import velocity_loss` (not re-exported here: a function named
`attention` would shadow the submodule kernels.attention).

Dispatch rule (read at every call, so tests can flip it):
    Triton  iff  kernels.USE_TRITON and Triton is importable
                 and (the first tensor is on CUDA or TRITON_INTERPRET=1)
    twin    otherwise (the CPU path, and any machine without Triton, e.g. macOS).
"""
import os
import torch

USE_TRITON = torch.cuda.is_available() and os.environ.get("NANOUMM_KERNELS", "1") != "0"

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # no Triton on this machine: the twins are the only path
    HAS_TRITON = False


def interpreting():
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def use_triton(t):
    """The dispatch rule above, for a tensor t."""
    return USE_TRITON and HAS_TRITON and (t.is_cuda or interpreting())

