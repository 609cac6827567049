"""
GenEval-style evaluation of a nanoUMM checkpoint on the fixed eval set (data/eval.jsonl).

  python evaluate.py                         # the shipped base, all 50 prompts x 12 tags, 4 images each
  python evaluate.py --n 10 --k 2            # quick
  python evaluate.py --ckpt runs/rwr/ckpt --out runs/rwr/eval

Reports, per tag and overall:
  gen_think   fraction of images the exact verifier accepts, think mode (the model plans in
              text and itself switches to the image with <|vision_start|>)
  gen_forced  the same with the image forced right after the prompt
  und         yes/no VQA accuracy on a correct render and a one-constraint negative of the same
              prompts (P("yes") > 0.5), i.e. understanding on the prompts generation is scored on
  switch      rate at which the model emits <|vision_start|> by itself in think mode
and writes summary.json and a sample grid (one row per tag) to --out.
"""
import json
import os
import time
from itertools import zip_longest

import numpy as np
import torch

import world
import model as M
from common import parse_args, atomic_write
from pretrain import eval_prompts

defaults = dict(ckpt="data/base", eval="data/eval.jsonl", out="runs/eval", n=50, k=4, batch=96,
                steps=25, cfg=4.0, shift=3.0, temperature=0.7, max_think=64, seed=0,
                modes="think,forced", und=True, grid_cols=8)


def gen_scores(model, ae, specs, mode, a, device):
    """Generate k images per spec; returns (correct [len(specs)*k] bool, switched, images, think texts)."""
    jobs = [s for s in specs for _ in range(a["k"])]
    g = torch.Generator(device).manual_seed(a["seed"])
    correct, switched, imgs, thinks = [], [], [], []
    for i in range(0, len(jobs), a["batch"]):
        chunk = jobs[i:i + a["batch"]]
        out = M.generate(model, [world.encode(s["prompt"]) for s in chunk], mode=mode, max_think=a["max_think"],
                         temperature=a["temperature"], generator=g, steps=a["steps"], cfg=a["cfg"], shift=a["shift"])
        im = ae.decode(out["z"], world.PALETTE).cpu().numpy()
        correct += [world.verify(s, x)["correct"] for s, x in zip(chunk, im)]
        switched += out["switched"].tolist()
        imgs += list(im)
        thinks += [world.decode(t) for t in out["think"]]
    return np.array(correct), np.array(switched), imgs, thinks


def und_scores(model, ae, specs, a, device):
    """VQA accuracy: for each spec, a correct render (answer yes) and a negative (answer no)."""
    rng = np.random.default_rng(a["seed"] + 1)
    imgs, truth, qs = [], [], []
    for s in specs:
        pos, _ = world.render(s, rng, holdout="any")
        neg, _, _ = world.negative(s, rng, holdout="any")
        imgs += [pos, neg]; truth += [True, False]; qs += [world.encode(world.vqa_question(s["prompt"]))] * 2
    yes = world.encode("yes")[0]
    p = []
    for i in range(0, len(imgs), a["batch"]):
        z = ae.encode(torch.as_tensor(np.stack(imgs[i:i + a["batch"]]), device=device))
        p += M.p_yes(model, z, qs[i:i + a["batch"]], yes).tolist()
    ok = (np.array(p) > 0.5) == np.array(truth)
    return ok.reshape(len(specs), 2).mean(1), np.array(p)


def grid(images, rows, cols, path):
    """PNG grid: one row per tag, `cols` samples each, 2x upscaled, 2px gaps."""
    from PIL import Image
    H = world.W * 2 + 2
    canvas = np.full((rows * H, cols * H, 3), 40, np.uint8)
    for r, row in enumerate(images):
        for c, im in enumerate(row[:cols]):
            canvas[r * H:r * H + H - 2, c * H:c * H + H - 2] = im.repeat(2, 0).repeat(2, 1)
    Image.fromarray(canvas).save(path)


@torch.no_grad()
def evaluate(model, ae, specs, a, device, out_dir=None, log=print):
    """Score a model on specs; returns the summary dict (also written to out_dir)."""
    model.eval()
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    tags = [t for t in world.TAGS if any(s["tag"] == t for s in specs)]
    res = {t: {} for t in tags}
    summary = dict(ckpt=a.get("ckpt"), n_prompts=len(specs), k=a["k"])
    for mode in [m for m in a["modes"].split(",") if m]:
        t0 = time.time()
        correct, switched, imgs, thinks = gen_scores(model, ae, specs, mode, a, device)
        per = correct.reshape(len(specs), a["k"]).mean(1)
        for t in tags:
            res[t][f"gen_{mode}"] = float(np.mean([p for p, s in zip(per, specs) if s["tag"] == t]))
        summary[f"gen_{mode}"] = float(np.mean([res[t][f"gen_{mode}"] for t in tags]))
        summary[f"images_per_s_{mode}"] = len(correct) / (time.time() - t0)
        if mode == "think":
            summary["switch_rate"] = float(switched.mean())
            summary["think_examples"] = [(specs[i // a["k"]]["prompt"], thinks[i]) for i in range(0, len(thinks), max(1, len(thinks) // 6))]
        if out_dir:
            rows = [[im for im, s in zip(imgs, [s for s in specs for _ in range(a["k"])]) if s["tag"] == t] for t in tags]
            grid(rows, len(tags), a["grid_cols"], os.path.join(out_dir, f"grid_{mode}.png"))
    if a["und"]:
        ok, _ = und_scores(model, ae, specs, a, device)
        for t in tags:
            res[t]["und"] = float(np.mean([o for o, s in zip(ok, specs) if s["tag"] == t]))
        summary["und"] = float(np.mean([res[t]["und"] for t in tags]))
    summary["per_tag"] = res
    cols = [c for c in ("gen_think", "gen_forced", "und") if c in summary]
    lines = [f"{'tag':15s} " + " ".join(f"{c:>10s}" for c in cols)]
    lines += [f"{t:15s} " + " ".join(f"{res[t][c]:10.3f}" for c in cols) for t in tags]
    lines += [f"{'overall':15s} " + " ".join(f"{summary[c]:10.3f}" for c in cols)]
    if "switch_rate" in summary:
        lines += [f"switch rate (think mode emits <|vision_start|> itself): {summary['switch_rate']:.3f}"]
    summary["table"] = "\n".join(lines)
    log(summary["table"])
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


# ----------------------------------------------------------------------------- shared by the methods
@torch.no_grad()
def rollouts(model, ae, specs, n, a, device, gen):
    """n think-mode generations per spec: returns dict of lists (think tokens, switched, images)."""
    jobs = [s for s in specs for _ in range(n)]
    out = dict(spec=[], think=[], switched=[], image=[])
    for i in range(0, len(jobs), a["gen_batch"]):
        chunk = jobs[i:i + a["gen_batch"]]
        g = M.generate(model, [world.encode(s["prompt"]) for s in chunk], mode="think", max_think=a["max_think"],
                       temperature=a["temperature"], generator=gen, steps=a["steps"], cfg=a["cfg"], shift=a["shift"])
        out["spec"] += chunk
        out["think"] += g["think"]
        out["switched"] += g["switched"].tolist()
        out["image"] += list(ae.decode(g["z"], world.PALETTE).cpu().numpy())
    return out


def candidates(per_tag, rng):
    """Up to per_tag distinct prompts of every tag, never an eval prompt (the pre-training rule),
    listed tag by tag: the pool for weakness mining and for training on random prompts."""
    banned = eval_prompts()
    cands = []
    for tag in world.TAGS:
        seen = set()
        for _ in range(50 * per_tag):
            s = world.sample_spec(tag, rng, holdout="any")
            if s["prompt"] not in banned and s["prompt"] not in seen:
                seen.add(s["prompt"]); cands.append(s)
            if len(seen) == per_tag:
                break
    return cands


def load_reuse(path, a, keys, script):
    """--reuse DIR: the rollouts an earlier run saved (path), checked to match this run on `keys`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no saved rollouts; --reuse needs the folder of an earlier {script} run "
                                f"with the same number of processes")
    saved = torch.load(path, weights_only=False)
    for k in keys:
        if saved["args"][k] != a[k]:
            raise ValueError(f"--reuse {a['reuse']}: it was made with --{k} {saved['args'][k]}, this run has "
                             f"--{k} {a[k]}; pass the same value or drop --reuse")
    return saved


def begin(model, ae, a, saved, rank, log, device):
    """The start of a method's run: the eval set and sampler settings, and on rank 0 the base's
    before-eval (before/), taken from `saved` when the run reuses an earlier one's rollouts.
    Returns (eval_specs, ea, before); before is None off rank 0."""
    eval_specs = pick(world.load_specs("data/eval.jsonl"), a["eval_n"])
    ea = dict(defaults, k=a["eval_k"], modes="think", seed=a["seed"])
    before = None
    if rank == 0:
        before = saved["before"] if saved else \
            evaluate(model, ae, eval_specs, ea, device, os.path.join(a["out"], "before"), log=lambda *_: None)
        log.log(dict(phase="before", gen_think=before["gen_think"], und=before["und"]),
                f"before: gen_think {before['gen_think']:.3f} und {before['und']:.3f}")
    return eval_specs, ea, before


def finish(model, ae, before, eval_specs, ea, device, a, method, log, **extra):
    """The end of a method's run folder: the post-trained checkpoint (ckpt.*), the same eval as
    before (after/), summary.json (before/after overall, understanding and per tag, plus `extra`)
    and summary.md (the per-tag table). Returns the after-eval."""
    model.eval()
    M.save_weights(os.path.join(a["out"], "ckpt"), model, ae, dict(method=method, base=a["ckpt"], args=a))
    after = evaluate(model, ae, eval_specs, ea, device, os.path.join(a["out"], "after"), log=lambda *_: None)
    tags = list(before["per_tag"])
    table = "\n".join(["| tag | before | after |", "|---|---|---|"] +
                      [f"| {t} | {before['per_tag'][t]['gen_think']:.3f} | {after['per_tag'][t]['gen_think']:.3f} |" for t in tags] +
                      [f"| overall | {before['gen_think']:.3f} | {after['gen_think']:.3f} |",
                       f"| understanding | {before['und']:.3f} | {after['und']:.3f} |"])
    summary = dict(before=before["gen_think"], after=after["gen_think"], und_before=before["und"], und_after=after["und"],
                   **extra, per_tag={t: (before["per_tag"][t]["gen_think"], after["per_tag"][t]["gen_think"]) for t in tags})
    atomic_write(os.path.join(a["out"], "summary.json"), json.dumps(summary, indent=1))
    atomic_write(os.path.join(a["out"], "summary.md"), table + "\n")
    log.log(dict(phase="after", gen_think=after["gen_think"], und=after["und"]), table)
    return after


def prompt_set(prompts, n, seed):
    """Training prompts: a prompt file, or "random" (n candidates per tag, never an eval prompt,
    drawn with seed); taken round-robin over tags, then the first n (0 = all), so a file listed
    tag by tag still gives every tag its share."""
    pool = candidates(n, np.random.default_rng(10_000 + seed)) if prompts == "random" else world.load_specs(prompts)
    by_tag = {}
    for s in pool:
        by_tag.setdefault(s["tag"], []).append(s)
    specs = [s for group in zip_longest(*by_tag.values()) for s in group if s is not None]
    return specs[:n] if n else specs


def report(root, label):
    """Median and half-range over seeds of every variant under root/*/summary.json, per
    tag and overall (label(config) names a run's variant; the base row is each seed's
    before-eval), the gain paired by seed, and the reward histograms. Writes root/report.md.
    Used by rwr.py and srum.py (`--report DIR`)."""
    runs = []
    for d in sorted(os.listdir(root)):
        f = os.path.join(root, d, "summary.json")
        if os.path.exists(f):
            s = json.load(open(f))
            c = json.load(open(os.path.join(root, d, "config.json")))
            runs.append((label(c), c["seed"], s))
    if not runs:
        raise FileNotFoundError(f"{root}: no */summary.json; run the method with --out {root}/NAME first")
    tags = list(runs[0][2]["per_tag"])
    rows = {"base": {}}
    for label, seed, s in runs:     # one base value per seed (its before-eval), then each variant
        rows["base"].setdefault(seed, dict({t: v[0] for t, v in s["per_tag"].items()}, overall=s["before"], und=s["und_before"]))
        rows.setdefault(label, {})[seed] = dict({t: v[1] for t, v in s["per_tag"].items()}, overall=s["after"], und=s["und_after"])
    cols = tags + ["overall", "und"]
    fmt = lambda v: f"{np.median(v):.3f} ± {(max(v) - min(v)) / 2:.3f}"  # noqa: E731
    lines = ["| variant | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for label, by_seed in rows.items():
        lines.append(f"| {label} | {len(by_seed)} | " + " | ".join(fmt([r[c] for r in by_seed.values()]) for c in cols) + " |")
    lines += ["", "median over seeds ± half the range; gen accuracy in think mode, und = yes/no VQA on the same prompts", ""]
    # paired by seed: each run's before-eval and after-eval draw the same eval images, so the
    # gain over the base of that seed is the less noisy number
    seeds = sorted(rows["base"])
    lines += ["| variant | " + " | ".join(f"s{k}" for k in seeds) + " | gain over base, per seed | median gain |",
              "|---" * (len(seeds) + 3) + "|"]
    for label, by_seed in rows.items():
        gains = [by_seed[k]["overall"] - rows["base"][k]["overall"] for k in seeds if k in by_seed]
        lines.append(f"| {label} | " + " | ".join(f"{by_seed[k]['overall']:.3f}" if k in by_seed else "" for k in seeds)
                     + " | " + ("" if label == "base" else ", ".join(f"{g:+.3f}" for g in gains))
                     + " | " + ("" if label == "base" else f"{np.median(gains):+.3f}") + " |")
    lines += ["", "| run | reward mean | bimodality | histogram (10 bins over [0, 1]) |", "|---|---|---|---|"]
    seen = set()      # variants trained on reused rollouts repeat their reward histogram: print it once
    for label, seed, s in runs:
        if (seed, tuple(s["hist"])) not in seen:
            seen.add((seed, tuple(s["hist"])))
            lines.append(f"| {label} s{seed} | {s['reward']['mean']:.3f} | {s['reward']['bimodality']:.2f} | {s['hist']} |")
    text = "\n".join(lines) + "\n"
    atomic_write(os.path.join(root, "report.md"), text)
    print(text)
    return rows


def pick(specs, n):
    """The first n specs of every tag (the eval file lists tags in blocks)."""
    out, seen = [], {}
    for s in specs:
        if seen.get(s["tag"], 0) < n:
            out.append(s); seen[s["tag"]] = seen.get(s["tag"], 0) + 1
    return out


def main(argv=None):
    a = parse_args(defaults, argv, __doc__)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, ae, meta = M.load_weights(a["ckpt"], device)
    if model is None:
        raise ValueError(f"{a['ckpt']}.json is an autoencoder-only checkpoint; pass a UMM checkpoint with --ckpt")
    specs = pick(world.load_specs(a["eval"]), a["n"])
    os.makedirs(a["out"], exist_ok=True)
    print(f"evaluating {a['ckpt']} (step {meta.get('step')}) on {len(specs)} prompts x {a['k']} images")
    return evaluate(model, ae, specs, a, device, a["out"])


if __name__ == "__main__":
    main()
