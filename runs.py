"""
The plumbing the method scripts share (rwr.py, srum.py, unified_grpo.py, irg.py): plain
functions, no framework. Each method's main() reads as its paper's steps and calls these
around them:

  load_umm          a UMM checkpoint (model.load_weights checks every file; this refuses AE-only ones)
  open_run          the run folder: refuses a folder that holds a run unless --resume (same config and
                    process count) or --overwrite (the old run's files go first), checks --reuse DIR,
                    writes config.json (+ world_size), returns the metrics log (resumed: replayed records dropped)
  check_prompts     before any model work: a share of the prompts per process, the longest sample fits --row_len
  start             what every run does before its method's own steps: the saved rollouts of --reuse DIR
                    or --resume (saved_rollouts: checked to match this run on every setting that made
                    them), the before-eval (begin), and else fresh rollouts (evaluate.sample: batched,
                    KV-cached think-mode generations, with progress and an ETA)
  finish            the post-trained checkpoint, the same eval after, summary.json/md
  save_state / load_state   mid-training checkpoints (weights, optimiser, schedule, RNG) for --resume
  report            --report DIR: median and spread over seeds, gain paired by seed
Grids and the reward histogram PNG are drawn by evaluate.py (it draws every picture).
"""
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist

import world
import model as M
import evaluate
from common import all_sum, atomic_torch_save, atomic_write, claim_run_dir, Logger

# the settings that make a method's rollouts and its before-eval: a reused or resumed run must
# match them all, else its before/after and its training data would come from different settings
MADE_WITH = ("ckpt", "prompts", "n_prompts", "N", "seed", "temperature", "max_think", "sample_steps", "cfg",
             "shift", "eval_n", "eval_k")
# flags that say how to run, not what: they may differ between a run and its --resume
HOW = ("resume", "overwrite", "report", "out")


def load_umm(path, device):
    """(model, ae, meta) of a UMM checkpoint; the AE is frozen."""
    model, ae, meta = M.load_weights(path, device)
    if model is None:
        raise ValueError(f"{path}.json is an autoencoder-only checkpoint; pass a UMM checkpoint with --ckpt "
                         f"(e.g. data/base)")
    ae.requires_grad_(False).eval()
    return model, ae, meta


def processes():
    """The number of processes of this launch (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def open_run(a, rank, script, what=None):
    """The run folder a["out"]. A folder that already holds a run is not written into unless
    --resume (continue it: the config and the number of processes must match) or --overwrite
    (start again: the old run's files go first, common.claim_run_dir). With --reuse DIR, DIR's
    saved `what` (rollouts, candidates) is checked here, before anything is written, so a refused
    --reuse leaves no config.json behind to refuse its retry. Returns the Logger."""
    out, cfg_path = a["out"], os.path.join(a["out"], "config.json")
    world_size = processes()
    if a.get("reuse") and what:
        saved_rollouts(rollout_file(a["reuse"], rank, what), a, MADE_WITH, script)
    if a.get("resume"):
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"--resume: {cfg_path} not found; there is no run to continue in {out} "
                                    f"(drop --resume to start one)")
        old = json.load(open(cfg_path))
        diff = [k for k in a if k not in HOW and old.get(k) != a[k]]
        if diff:
            raise ValueError(f"--resume {out}: the run was started with " +
                             ", ".join(f"--{k} {old.get(k)}" for k in diff) + "; this call has " +
                             ", ".join(f"--{k} {a[k]}" for k in diff) + ": pass the same values (or drop them)")
        check_processes(old, out, "--resume")
    claim_run_dir(out, a.get("resume"), a.get("overwrite"), script,
                  inputs=(a.get("ckpt"), rollout_file(a["reuse"], rank, what) if a.get("reuse") and what else None))
    log = Logger(out, rank, resume=a.get("resume"))      # --overwrite: a new run does not append to the old log
    if rank == 0 and not a.get("resume"):
        # world_size: each process draws and resumes its own share (its prompts, its RNG streams)
        atomic_write(cfg_path, json.dumps(dict(a, world_size=world_size), indent=1))
    return log


def check_processes(cfg, d, how):
    """A run continued (--resume) or whose rollouts are reused (--reuse) runs on as many processes as
    made it (config.json's world_size): each process holds its own share of the prompts and its own
    RNG streams, so another count would train on part of the data or resume its ranks at different steps."""
    made, now = cfg.get("world_size"), processes()
    if made is not None and made != now:
        raise ValueError(f"{how} {d}: the run was made by {made} processes, this call has {now}; launch it as "
                         f"it was (torchrun --nproc_per_node={made}, or python for 1), or start a new --out")


def saved_rollouts(path, a, keys, script):
    """The rollouts (+ rewards, before-eval) an earlier run saved at `path`, checked to match this
    run on `keys` (--reuse: another run's folder; --resume: this run's own). None if a resumed run
    was killed before it saved them (they are made again, deterministically)."""
    if not os.path.exists(path):
        if a.get("resume") and not a.get("reuse"):
            return None
        raise FileNotFoundError(f"{path}: no saved rollouts; --reuse needs the folder of an earlier {script} run "
                                f"with the same number of processes")
    cfg = os.path.join(os.path.dirname(path), "config.json")
    if a.get("reuse") and os.path.exists(cfg):
        check_processes(json.load(open(cfg)), a["reuse"], "--reuse")
    saved = torch.load(path, weights_only=False)
    for k in keys:
        made = saved["args"].get(k)
        if made != a[k]:
            how = f"--reuse {a['reuse']}" if a.get("reuse") else f"--resume {a['out']}"
            raise ValueError(f"{how}: it was made with --{k} {made}, this run has --{k} {a[k]}; pass the same value"
                             + (" or drop --reuse" if a.get("reuse") else " or start a new --out"))
    return saved


def check_prompts(specs, a, world_size):
    """Before any model work: every process gets a share of the training prompts (a process with none
    trains on nothing), and with --row_len the longest sample a method packs (<bos> prompt <think>,
    up to --max_think plan tokens, a forced <|vision_start|>, the image) fits one row, so a long prompt
    fails here and not at the first training step, after the rollouts and the before-eval."""
    if len(specs) < world_size:
        raise ValueError(f"{len(specs)} training prompts for {world_size} processes: a process without one would "
                         f"train on nothing; pass more prompts (--n_prompts, --prompts) or use fewer processes")
    if a.get("row_len"):
        longest = max(specs, key=lambda s: len(world.encode(s["prompt"])))
        n_prompt = len(world.encode(longest["prompt"]))
        n = 3 + n_prompt + a["max_think"] + M.N_IMG
        if n > a["row_len"]:
            raise ValueError(f"--row_len {a['row_len']}: a training sample can take {n} tokens (the prompt "
                             f"{longest['prompt']!r} has {n_prompt}, --max_think {a['max_think']}, {M.N_IMG} image "
                             f"tokens, 3 specials); raise --row_len to {n}, or lower --max_think")


def nothing_to_train(weight_sum, why):
    """Refuse a run whose training weights are all 0 (weight_sum over every process): it would take its
    steps on nothing and save the base's weights as its result."""
    if weight_sum == 0:
        raise ValueError(f"{why}: every training weight is 0, so nothing would train")


def rollout_file(d, rank, what):
    return os.path.join(d, f"{what}.rank{rank}.pt")


def start(model, ae, specs, a, rank, world_size, log, device, what, script):
    """The start of a method run. --reuse DIR: the rollouts (and before-eval) of an earlier run
    with the same base, prompts, seed, sampler and process count, so variants that differ only
    later see the same data; --resume: this run's own, if it got that far. Then the before-eval
    (rank 0), and, unless saved, this rank's share of the prompts' rollouts (N each, think mode:
    the model writes its plan and itself switches to the image).
    Returns (saved or None, eval_specs, ea, before, ro, rollouts_per_s)."""
    saved = saved_rollouts(rollout_file(a["reuse"] or a["out"], rank, what), a, MADE_WITH, script) \
        if a["reuse"] or a["resume"] else None
    eval_specs, ea, before = begin(model, ae, a, saved, rank, log, device)
    if saved:
        return saved, eval_specs, ea, before, saved["ro"], saved["rollouts_per_s"]
    t0 = time.time()
    ro = draw_rollouts(model, ae, specs, a, rank, world_size, device, what)
    return None, eval_specs, ea, before, ro, all_sum(len(ro["spec"])).item() / (time.time() - t0)


def draw_rollouts(model, ae, specs, a, rank, world_size, device, what, rnd=0):
    """This rank's share of the prompts, N think-mode generations each, from a generator seeded by
    (seed, rank, round): the rollouts of runs.start (round 0) and of srum.py's later --rounds."""
    gen = torch.Generator(device).manual_seed(1000 + a["seed"] * world_size + rank + 7919 * rnd)
    with torch.no_grad():
        return evaluate.sample(model, ae, specs[rank::world_size], a["N"], "think", a, gen, a["gen_batch"], what)


def eval_settings(a):
    """The before/after eval of a method run: its first eval_n prompts per tag, eval_k images each,
    think mode (and the forced switch where the method has --eval_modes think,forced), evaluate.py's sampler."""
    return world.pick(world.load_specs("data/eval.jsonl"), a["eval_n"]), \
        dict(evaluate.defaults, k=a["eval_k"], modes=a.get("eval_modes", "think"), seed=a["seed"])


def begin(model, ae, a, saved, rank, log, device):
    """The start of a method's run: the eval set and sampler settings, and on rank 0 the base's
    before-eval (before/), taken from `saved` when the run reuses (or resumes) one.
    Returns (eval_specs, ea, before); before is None off rank 0."""
    eval_specs, ea = eval_settings(a)
    before = None
    if rank == 0:
        if saved and saved.get("before"):
            before = saved["before"]
        else:
            print(f"before-eval: {len(eval_specs)} prompts x {ea['k']} images ...", flush=True)
            before = evaluate.evaluate(model, ae, eval_specs, ea, device, os.path.join(a["out"], "before"),
                                       log=lambda *_: None)
        log.log(dict(phase="before", gen_think=before["gen_think"], und=before["und"]),
                f"before: gen_think {before['gen_think']:.3f} und {before['und']:.3f}")
    return eval_specs, ea, before


def state_path(a, rank):
    return os.path.join(a["out"], f"state.rank{rank}.pt")


def save_state(a, rank, step, model, opt, sched, rng):
    """Mid-training checkpoint of this rank (atomic): fp32 weights, optimiser, LR schedule,
    torch and numpy RNG states: a resumed run continues exactly
    where this one stood."""
    atomic_torch_save(dict(step=step, model=model.state_dict(), opt=opt.state_dict(),
                           sched=sched.state_dict() if sched is not None else None,
                           torch_rng=torch.get_rng_state(), np_rng=rng.bit_generator.state),
                      state_path(a, rank))


def load_state(a, rank, model, opt, sched, rng, log):
    """--resume: restore the last mid-training checkpoint (if any); returns the step to start at.
    metrics.jsonl keeps the records of steps before it, so no step is logged twice."""
    if not (a.get("resume") and os.path.exists(state_path(a, rank))):
        return 0
    st = torch.load(state_path(a, rank), weights_only=False)
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    if sched is not None:
        sched.load_state_dict(st["sched"])
    torch.set_rng_state(st["torch_rng"])
    rng.bit_generator.state = st["np_rng"]
    log.resume_at(st["step"])
    print(f"resumed {a['out']} at training step {st['step']}", flush=True)
    return st["step"]


GEN_ONLY = ("gen.", "norm_gen.", "vae2llm.", "time_embedder.", "llm2vae.")   # what only noisy image tokens run


def set_trainable(model, params):
    """--params: "all" moves every parameter; "und" freezes the generation path (gen experts, their
    norms, the latent projections in and out, the time embedder), so only the understanding path and
    what it computes for the context moves. Returns the trainable parameters."""
    for n, p in model.named_parameters():
        p.requires_grad_(params == "all" or not n.startswith(GEN_ONLY))
    return [p for p in model.parameters() if p.requires_grad]


def finish(model, ae, before, eval_specs, ea, device, a, method, log, **extra):
    """The end of a method's run folder: the post-trained checkpoint (ckpt.*), the same eval as
    before (after/), summary.json (before/after overall, understanding and per tag, plus `extra`)
    and summary.md (the per-tag table). Returns the after-eval."""
    model.eval()
    M.save_weights(os.path.join(a["out"], "ckpt"), model, ae, dict(method=method, base=a["ckpt"], args=a))
    print(f"after-eval: {len(eval_specs)} prompts x {ea['k']} images ...", flush=True)
    after = evaluate.evaluate(model, ae, eval_specs, ea, device, os.path.join(a["out"], "after"), log=lambda *_: None)
    tags = list(before["per_tag"])
    table = "\n".join(["| tag | before | after |", "|---|---|---|"] +
                      [f"| {t} | {before['per_tag'][t]['gen_think']:.3f} | {after['per_tag'][t]['gen_think']:.3f} |" for t in tags] +
                      [f"| overall | {before['gen_think']:.3f} | {after['gen_think']:.3f} |",
                       f"| understanding | {before['und']:.3f} | {after['und']:.3f} |"])
    summary = dict(before=before["gen_think"], after=after["gen_think"], und_before=before["und"], und_after=after["und"],
                   **extra, per_tag={t: (before["per_tag"][t]["gen_think"], after["per_tag"][t]["gen_think"]) for t in tags})
    if "gen_forced" in before and "gen_forced" in after:      # the second row: the forced switch (no plan)
        table += f"\n| forced switch | {before['gen_forced']:.3f} | {after['gen_forced']:.3f} |"
        summary.update(forced_before=before["gen_forced"], forced_after=after["gen_forced"],
                       per_tag_forced={t: (before["per_tag"][t]["gen_forced"], after["per_tag"][t]["gen_forced"]) for t in tags})
    atomic_write(os.path.join(a["out"], "summary.json"), json.dumps(summary, indent=1))
    atomic_write(os.path.join(a["out"], "summary.md"), table + "\n")
    log.log(dict(phase="after", gen_think=after["gen_think"], und=after["und"]), table)
    return after


def report(root, label):
    """Median and half-range over seeds of every variant under root/*/summary.json, per
    tag and overall (label(config) names a run's variant; the base row is each seed's
    before-eval), the gain paired by seed, and the reward histograms. Writes root/report.md.
    Runs that never finished (a config.json and no summary.json) are listed, not skipped silently."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--report {root}: no such folder; pass the folder that holds the runs (e.g. runs/rwr)")
    runs, unfinished = [], []
    for d in sorted(os.listdir(root)):
        f = os.path.join(root, d, "summary.json")
        if os.path.exists(f):
            s = json.load(open(f))
            c = json.load(open(os.path.join(root, d, "config.json")))
            runs.append((label(c), c["seed"], s))
        elif os.path.exists(os.path.join(root, d, "config.json")):
            unfinished.append(d)
    if not runs:
        raise FileNotFoundError(f"{root}: no */summary.json; run the method with --out {root}/NAME first"
                                + (f" (unfinished: {unfinished}; finish them with --resume)" if unfinished else ""))
    tags = list(runs[0][2]["per_tag"])
    rows = {"base": {}}
    for name, seed, s in runs:     # one base value per seed (its before-eval), then each variant
        rows["base"].setdefault(seed, dict({t: v[0] for t, v in s["per_tag"].items()}, overall=s["before"], und=s["und_before"]))
        rows.setdefault(name, {})[seed] = dict({t: v[1] for t, v in s["per_tag"].items()}, overall=s["after"], und=s["und_after"])
    cols = tags + ["overall", "und"]
    fmt = lambda v: f"{np.median(v):.3f} ± {(max(v) - min(v)) / 2:.3f}"  # noqa: E731
    lines = ["| variant | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, by_seed in rows.items():
        lines.append(f"| {name} | {len(by_seed)} | " + " | ".join(fmt([r[c] for r in by_seed.values()]) for c in cols) + " |")
    lines += ["", "median over seeds ± half the range; gen accuracy in think mode, und = yes/no VQA on the same prompts", ""]
    # paired by seed: each run's before-eval and after-eval draw the same eval images, so the
    # gain over the base of that seed is the less noisy number
    seeds = sorted(rows["base"])
    for name, seed, s in runs:   # the forced-switch row, where every run of a variant measured it
        if "forced_after" in s:
            rows["base"][seed].setdefault("forced", s["forced_before"])
            rows[name][seed]["forced"] = s["forced_after"]
    for col, what in (("overall", "think mode"), ("forced", "forced switch")):
        have = {n: r for n, r in rows.items() if all(col in v for v in r.values()) and n != "base"}
        if not have:
            continue
        lines += [f"{what}: overall per seed, gains paired by seed", "",
                  "| variant | " + " | ".join(f"s{k}" for k in seeds) + " | gain over base, per seed | median gain |",
                  "|---" * (len(seeds) + 3) + "|"]
        for name, by_seed in [("base", rows["base"])] + list(have.items()):
            gains = [by_seed[k][col] - rows["base"][k][col] for k in seeds if k in by_seed]
            lines.append(f"| {name} | " + " | ".join(f"{by_seed[k][col]:.3f}" if k in by_seed else "" for k in seeds)
                         + " | " + ("" if name == "base" else ", ".join(f"{g:+.3f}" for g in gains))
                         + " | " + ("" if name == "base" else f"{np.median(gains):+.3f}") + " |")
        lines += [""]
    if all("hist" in s for _, _, s in runs):
        lines += ["", "| run | reward mean | bimodality | histogram (10 bins over [0, 1]) |", "|---|---|---|---|"]
        seen = set()      # variants trained on reused rollouts repeat their reward histogram: print it once
        for name, seed, s in runs:
            if (seed, tuple(s["hist"])) not in seen:
                seen.add((seed, tuple(s["hist"])))
                lines.append(f"| {name} s{seed} | {s['reward']['mean']:.3f} | {s['reward']['bimodality']:.2f} | {s['hist']} |")
    if unfinished:
        lines += ["", f"unfinished runs (no summary.json; `--resume` finishes them): {', '.join(unfinished)}"]
    text = "\n".join(lines) + "\n"
    atomic_write(os.path.join(root, "report.md"), text)
    print(text)
    return rows
