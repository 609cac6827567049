"""Plumbing shared by the scripts (not methods): distributed setup, atomic files, run folders."""
import datetime
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
