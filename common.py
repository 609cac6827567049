"""Plumbing shared by the scripts (not methods): distributed setup, atomic files, run folders."""
import datetime
import gc
import json
import os
import time

import torch
import torch.distributed as dist


def setup_dist():
    """DDP is detected from torchrun's env. Returns (rank, world, local_rank, device)."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # a rank that waits longer than this in a collective raises instead of hanging (tests set it low)
        timeout = datetime.timedelta(seconds=float(os.environ.get("NANOUMM_DIST_TIMEOUT_S", 1800)))
        dist.init_process_group(backend, timeout=timeout)
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local = 0, 1, 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    return rank, world, local, device


def end_dist():
    """End torch.distributed at the end of a script (a no-op without it). Call it after the last
    collective, with every DistributedDataParallel wrapper already dropped (`model = None`).

    Why the order: gloo's ProcessGroup destructor joins its worker threads, and a worker may still
    hold the last collective -- done, but not yet let go -- whose tensor was made in Python (all_sum's);
    letting go of it takes the GIL. DDP's C++ Reducer owns the group too and frees it with the GIL
    held, so when the wrapper outlives destroy_process_group() (it used to go at the function's
    return), the Reducer is the last owner: the destructor waits on a worker that waits for the
    GIL, and the rank sits after its last step forever (no collective is pending, so no timeout
    fires). With the wrapper gone first, destroy_process_group() drops the last owner from Python,
    whose binding releases the GIL before the destructor runs."""
    if not dist.is_initialized():
        return
    gc.collect()                                     # a wrapper in a reference cycle goes now, not at exit
    if any(issubclass(type(o), torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects()):
        raise RuntimeError("end_dist: a DistributedDataParallel wrapper is still alive; drop every "
                           "reference to it first (its C++ Reducer would free the process group with "
                           "the GIL held, which can deadlock the exit)")
    dist.destroy_process_group()


def all_sum(x):
    """Sum a tensor (or float) over processes; identity without DDP."""
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    if dist.is_initialized():
        t = t.to("cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(t)
    return t.cpu()


def atomic_torch_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Logger:
    """Appends one JSON line per record to run_dir/metrics.jsonl and prints on rank 0."""

    def __init__(self, run_dir, rank=0):
        self.rank, self.path = rank, os.path.join(run_dir, "metrics.jsonl")
        self.t0 = time.time()
        if rank == 0:
            os.makedirs(run_dir, exist_ok=True)

    def log(self, rec, line=None):
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if line:
            print(line, flush=True)


def parse_args(defaults, argv=None, doc=""):
    """Typed overrides for a plain dict of defaults: `--key value` (bools: --flag / --flag 0)."""
    import argparse
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k, v in defaults.items():
        if isinstance(v, bool):
            p.add_argument(f"--{k}", type=lambda s: s.lower() not in ("0", "false", "no"), nargs="?", const=True, default=v)
        else:
            p.add_argument(f"--{k}", type=type(v) if v is not None else str, default=v)
    return vars(p.parse_args(argv))
