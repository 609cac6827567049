"""pytest: without a GPU, Triton kernels run in Triton's CPU interpreter. The variable must be
set before Triton is first imported (triton.jit picks interpreted or compiled at decoration),
and test_all.py imports model.py -> kernels before test_kernels.py runs, so it is set here.

One intra-op thread: the tests run tiny models, whose small matmuls only pay for OpenMP's
thread hand-offs. Measured on this 2-core machine with other work running: a tiny rwr.py run
took 2.7 s with one thread and 47 s with two (the threads spin waiting for each other).
Subprocesses (pretrain.py under torchrun) inherit OMP_NUM_THREADS."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random UMM checkpoint (depth 2, the world's vocabulary) for end-to-end method runs."""
    import model as M
    import world
    d = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    M.save_weights(str(d / "ck"), M.MoT(M.config_for(2, len(world.VOCAB))), M.PaletteAE(w=16), dict(step=0))
    return str(d / "ck")
