"""Plumbing shared by the scripts (not methods): distributed setup, atomic files, run folders."""
import datetime
import gc
import json
import os
import time

import torch
import torch.distributed as dist


def setup_dist(cpu_threads=None):
    """DDP is detected from torchrun's env. Returns (rank, world, local_rank, device).
    cpu_threads: on the CPU, the intra-op threads unless OMP_NUM_THREADS says otherwise (irg.py and
    unified_grpo.py ask for 1: on the busy 2-core machine a unified_grpo step ran 10-20x and an irg
    sampler forward 23x slower with two threads, the threads spinning on occupied cores)."""
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
        if cpu_threads and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(cpu_threads)
    return rank, world, local, device


def teardown_dist():
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
        raise RuntimeError("teardown_dist: a DistributedDataParallel wrapper is still alive; drop every "
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
    """Appends one JSON line per record to run_dir/metrics.jsonl and prints on rank 0.
    A resumed run does not write a record twice: records of a phase the file already holds
    (before, rollouts, ...) are printed only, and resume_at(step) drops the records of steps
    after the checkpoint it continues from (they are replayed)."""

    def __init__(self, run_dir, rank=0, resume=False):
        """resume: the run continues, its log with it (the phases it holds are not written again);
        else a log already there belongs to a run being replaced (claim_run_dir allowed it) and goes."""
        self.rank, self.path = rank, os.path.join(run_dir, "metrics.jsonl")
        self.t0 = time.time()
        self.seen = set()
        if rank == 0:
            os.makedirs(run_dir, exist_ok=True)
            if resume and os.path.exists(self.path):
                self.seen = {json.loads(l).get("phase") for l in open(self.path) if l.strip()} - {None, "train"}
            elif not resume and os.path.exists(self.path):
                os.remove(self.path)

    def resume_at(self, step):
        """Keep the records of the first `step` steps (records' "step" counts steps done)."""
        if self.rank != 0 or not os.path.exists(self.path):
            return
        keep = [l for l in open(self.path) if l.strip() and json.loads(l).get("step", -1) <= step]
        atomic_write(self.path, "".join(keep))

    def log(self, rec, line=None):
        if self.rank != 0:
            return
        if rec.get("phase") not in self.seen:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if line:
            print(line, flush=True)


class Progress:
    """One line per `every` seconds: done/total, rate and ETA (long phases are not silent)."""

    def __init__(self, what, total, log=print, every=15.0):
        self.what, self.total, self.log, self.every = what, total, log, every
        self.t0 = self.last = time.time()

    def __call__(self, done):
        now = time.time()
        if now - self.last >= self.every and done < self.total:
            rate = done / (now - self.t0)
            self.log(f"  {self.what}: {done}/{self.total} ({rate:.1f}/s, eta {(self.total - done) / max(rate, 1e-9):.0f} s)")
            self.last = now


# what a run folder holds that a later call reads back as the run's own (--resume, --report, the IRG
# stage evals, pretrain's own pool): replacing the run (--overwrite) removes all of it first, the
# summary and config.json before the rest, so a replacement killed at any point leaves nothing of the
# old run that a --resume or --report would take for the new one's
RUN_FILES = ("summary.json", "summary.md", "config.json", "metrics.jsonl", "state.pt", "*.rank*.pt", "start.pt",
             "own.npz", "ckpt.safetensors", "ckpt.json", "*.tmp", "*.png")
RUN_EVALS = ("before", "after", "after_base_decoder", "base_irg", "stage1_irg", "stage2_irg")


def run_files(out):
    """The files and eval folders of the run in `out` that --overwrite removes (RUN_FILES, RUN_EVALS)."""
    import glob
    files = [f for pat in RUN_FILES for f in sorted(glob.glob(os.path.join(glob.escape(out), pat)))]
    return list(dict.fromkeys(files)), [d for d in (os.path.join(out, e) for e in RUN_EVALS) if os.path.isdir(d)]


def claim_run_dir(out, resume, overwrite, script, inputs=(), fix=None):
    """A run folder that already holds a run is written into only when told: --resume continues
    it, --overwrite starts again there, after removing the old run (run_files). Anything else raises
    before any work starts. inputs: files (or checkpoints, without extension) this call reads: an
    --overwrite that would remove one is refused; fix: the way out to name instead of --resume / --overwrite (evaluate.py offers neither)."""
    held = [f for f in ("config.json", "metrics.jsonl", "state.pt", "ckpt.json") if os.path.exists(os.path.join(out, f))]
    if dist.is_initialized():
        dist.barrier()          # every rank has looked before rank 0 writes its config: all agree
    if held and not (resume or overwrite):
        raise FileExistsError(f"{out} already holds a run ({', '.join(held)}); " + (fix or
                              "continue it with --resume, start it again with --overwrite, or pass another --out")
                              + f" ({script})")
    if held and overwrite and not resume:
        files, evals = run_files(out)
        gone = {os.path.abspath(f) for f in files}
        for p in inputs:
            if p and {os.path.abspath(p + e) for e in ("", ".json", ".safetensors")} & gone:
                raise ValueError(f"--overwrite {out} would remove {p}, which this call reads; copy it elsewhere "
                                 f"first or pass another --out ({script})")
        if not dist.is_initialized() or dist.get_rank() == 0:
            import shutil
            for f in files:
                os.remove(f)
            for d in evals:
                shutil.rmtree(d)
        if dist.is_initialized():
            dist.barrier()      # the old run is gone on every rank before any rank writes the new one


def check_model_dir(path, flag, what, needs=()):
    """A local Hugging Face model folder given by `flag`, checked before any work: it exists and
    holds config.json, its weights and `needs` (file names; a tuple: any one of them), so an empty or
    half-copied folder fails in a second, not minutes later inside the library."""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path!r}: no such folder; pass a local {what} folder (nothing is downloaded "
                                f"here: copy one, e.g. with `huggingface-cli download ... --local-dir DIR`)")
    names = set(os.listdir(path))
    alts = [n if isinstance(n, tuple) else (n,) for n in ("config.json",) + tuple(needs)]
    missing = [" or ".join(n) for n in alts if not names & set(n)]
    if not any(n.endswith((".safetensors", ".bin", ".index.json")) for n in names):
        missing.append("its weights (*.safetensors or *.bin)")
    if missing:
        raise FileNotFoundError(f"{flag} {path}: the {what} folder lacks {', '.join(missing)}; copy the whole "
                                f"model folder there")


def refuse_ignored(a, defaults, when, flags):
    """Refuse flags that the chosen variant does not read when they are set: config.json records every
    flag, so a run would be listed (and --report labelled) as if it had used them."""
    set_ = [k for k in flags if a[k] != defaults[k]]
    if set_:
        raise ValueError(f"{when} does not use " + ", ".join(f"--{k} {a[k]}" for k in set_) +
                         f": drop {'it' if len(set_) == 1 else 'them'} (the run would record "
                         f"{'it' if len(set_) == 1 else 'them'} as if used)")


def ddp(model, local, device):
    """Wrap for DDP (the caller keeps the raw module for saving and the optimiser).
    find_unused_parameters: a small per-rank batch may hold no clean image or no noise image,
    and the method scripts train one expert only."""
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if device != "cpu" else None,
                                                     find_unused_parameters=True)


def finite(where, **named):
    """Stop at once on a non-finite number: raises FloatingPointError naming where (e.g. "step 12")
    and the quantity (a loss, a gradient norm, rewards, weights), before anything is written from it."""
    import numpy as np
    for name, x in named.items():
        arr = x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise FloatingPointError(
                f"{where}: {name} is not finite ({bad} of {arr.size} values are nan/inf); the run stops "
                f"here and writes no checkpoint from it. Causes seen: a learning rate or --beta too large, "
                f"a reward model that returned nan (a broken checkpoint), fp16 overflow")


def update(opt, loss, params, clip, where):
    """One optimiser update: backward, clip the gradient norm, stop at once on a non-finite loss or
    norm (before the step, so no nan reaches the weights), step. Returns the gradient norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(params, clip)
    finite(where, loss=loss, grad_norm=gn)
    opt.step()
    return gn


class _Parser(__import__("argparse").ArgumentParser):
    def error(self, message):           # a ValueError the caller (or a test) can read, not a bare exit
        raise ValueError(f"{self.prog}: {message} (see --help)")


def _strict_bool(s):
    v = str(s).lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    import argparse
    raise argparse.ArgumentTypeError(f"expected 1/0/true/false/yes/no, got {s!r}")


def _in_range(v, spec):
    """spec: "> a", ">= a", "a..b" (inclusive), "a..<b" (b excluded: where b itself trains nothing)."""
    if ".." in spec:
        lo, hi = spec.split("..")
        if hi.startswith("<"):
            return float(lo) <= v < float(hi[1:])
        return float(lo) <= v <= float(hi)
    op, x = spec.split()
    return v > float(x) if op == ">" else v >= float(x)


def parse_args(defaults, argv=None, doc="", choices=None, ranges=None):
    """Typed overrides for a plain dict of defaults, every flag checked before any work starts.
        --key value          typed as the default (None -> str)
        --flag / --flag 0    booleans: 1/0/true/false/yes/no, nothing else
        choices {key: (allowed, ...)}     ranges {key: "> 0" | ">= 1" | "0..1" | "0..<1"}
    No prefix abbreviations (--lambda is not --lambda_c). Bad values raise ValueError naming the flag."""
    p = _Parser(description=doc, formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
                allow_abbrev=False)
    choices, ranges = choices or {}, ranges or {}
    for k in list(choices) + list(ranges):
        assert k in defaults, f"choices/ranges name --{k}, which has no default"
    for k, v in defaults.items():
        if isinstance(v, bool):
            p.add_argument(f"--{k}", type=_strict_bool, nargs="?", const=True, default=v)
        else:
            p.add_argument(f"--{k}", type=type(v) if v is not None else str, default=v)
    a = vars(p.parse_args(argv))
    for k, ok in choices.items():
        if a[k] not in ok:
            raise ValueError(f"--{k} {a[k]!r}: use one of {tuple(ok)}")
    for k, spec in ranges.items():
        if not _in_range(a[k], spec):
            raise ValueError(f"--{k} {a[k]}: must be {spec}")
    return a
