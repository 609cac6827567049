"""pytest: without a GPU, Triton kernels run in Triton's CPU interpreter. The variable must be
set before Triton is first imported (triton.jit picks interpreted or compiled at decoration),
and test_all.py imports model.py -> kernels before test_kernels.py runs, so it is set here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
