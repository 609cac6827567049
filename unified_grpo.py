"""
Unified-GRPO: reconstruction RL on the model's own captions (paper 002, "UAE"), one file, one loop.

  torchrun unified_grpo.py                                # defaults: the shipped base, seed 0, runs/grpo/s0
  python unified_grpo.py --out runs/grpo/s0               # the same in one process
  python unified_grpo.py --seed 1 --out runs/grpo/s1
  python unified_grpo.py --reward und --out runs/grpo/und_s0         # the offline encoder's cosine (paper form)
  python unified_grpo.py --reward clip --clip_path /path/to/clip     # the paper's CLIP (a LOCAL folder)
  python unified_grpo.py --reward iou --ckpt data/v13                # where each object landed (a base that reads centres)
  python unified_grpo.py --reward iou_scene --beta 0.2 --lr 2e-5 --ckpt data/v13   # ... and the scene F1: the short form holds
  python unified_grpo.py --params all --out runs/grpo/all_s0         # the single-backbone case (UMM-2)
  python unified_grpo.py --shuffle_rewards --out runs/grpo/shuf_s0   # the control: each group's rewards permuted
  python unified_grpo.py --out runs/grpo/s0 --resume      # continue a killed run (same weights at the end)
  python unified_grpo.py --report runs/grpo               # median and spread over seeds, gains paired by seed

The method (paper sections 2.1-2.2 and its appendix), each step:
  1. sources  x: renders of random training scenes (never the eval set, never the Unified-Bench scenes)
  2. I2T      G captions per image from the understanding path, sampled at T = 1.0 (pi_phi_old):
                y^(i) ~ pi_phi_old( . | x),   <bos> <|vision_start|> [clean x] <|vision_end|> give the layout of the image .
  3. T2I      each caption redrawn by the FROZEN generation path p_theta (a deep copy of the base made
              at start, so training never moves the reward environment):
                x_hat^(i) ~ p_theta( . | y^(i)),   <bos> <think> y^(i) </think> <|vision_start|> -> flow sampling, CFG 4
              The caption goes in as the think plan: a caption of a scene is exactly the plan text
              pre-training paired with that scene's image (world.plan_text = world.caption), so this
              is the decoder's own in-distribution conditioning. The G redraws of one image share
              their starting noise, so within a group they differ only by their captions.
  4. reward   R_i = R(x, x_hat^(i)) = cos(f(x), f(x_hat^(i)))  (--reward und: the base's frozen
              understanding tower; clip: a local CLIP) or the exact scene F1 of the detector (--reward
              scene, the default: no real CLIP exists here, and the offline tower's cosine agrees with
              the exact match only weakly within a group -- correlation 0.29 -- where GRPO reads it;
              12 steps on it lowered the bench's caption F1, docs/LOG.md, 2026-11-25), or the matched-box
              IoU of source and redraw (--reward iou, rewards.matched_iou: where each object landed, the
              detail a caption's centres carry and the scene F1, keyed by 3x3 cell, cannot see), or
              their mean (--reward iou_scene, rewards.iou_and_scene: the IoU alone ranks a detailed caption
              with a wrong object above a right short one, so it buys detail with content)
  5. GRPO     A_i = (R_i - mean_k R_k) / std_k R_k                                    (paper 2.1)
              r_t^(i)(phi) = pi_phi(y_t | x, y_<t) / pi_phi_old(y_t | x, y_<t)
              J(phi) = 1/G sum_i 1/T_i sum_t [ min(r_t A_i, clip(r_t, 1-eps, 1+eps) A_i) - beta D_KL ]   (Eq. 1-2)
              D_KL per token by the k3 estimator against the frozen reference pi_ref (the base):
              D_KL = pi_ref/pi_phi - log(pi_ref/pi_phi) - 1
              mu inner optimiser steps on the same batch; on the first one phi = phi_old, so r_t = 1.
Which parameters move (--params):
  und   the understanding path only (und experts, text embeddings, lm_head, its final norm, the clean-
        image input projection): the paper's "fine-tune only the LLM, decoder frozen" (UMM-1). The
        decoder p_theta is the frozen copy.
  all   every parameter of the one backbone, and the decoder is the LIVE policy (the paper's UMM-2:
        x -pi_phi-> y -pi_phi-> x_hat). The loss is on caption tokens only, and no text token
        attends to a noisy image token (the mask), so the gen expert gets exactly zero gradient;
        what differs from `und` is that the reward is measured through the current model's decoder,
        whose conditioning (the caption's keys/values, from the und expert and shared embeddings)
        moves with training. GRPO on the image side would need a stochastic flow sampler (Flow-GRPO).
"""
import copy
import json
import os
import time

import numpy as np
import torch

import world
import model as M
import rewards as R
import runs
import evaluate
import pictures
from common import setup_dist, teardown_dist, ddp, all_sum, update, finite, atomic_torch_save, parse_args, check_model_dir

defaults = dict(
    ckpt="data/base", out="runs/grpo/s0", seed=0, resume=False, overwrite=False, report="", stop_after=0,
    # rollouts: G captions per image at T = 1 (paper), each redrawn by the frozen decoder
    images=16, G=4, temperature=1.0, max_caption=48, sample_steps=10, cfg=4.0, shift=3.0, shared_noise=True,
    reward="scene", clip_path="", shuffle_rewards=False,
    # GRPO (paper: G 4, beta 1e-6, lr 1e-6 at its scale; lr here chosen by measurement, docs/LOG.md)
    params="und", steps=30, mu=2, lr=5e-5, eps=0.2, beta=1e-6, clip=1.0, ckpt_every=5,
    # evaluation before / after: GenEval-style (eval_n prompts per tag x eval_k) and Unified-Bench
    eval_n=8, eval_k=2, bench_n=48, gen_batch=64,
)
choices = dict(reward=("und", "clip", "scene", "iou", "iou_scene"), params=("und", "all"))
ranges = dict(images=">= 1", G=">= 2", temperature="> 0", max_caption=">= 1", sample_steps=">= 1", cfg=">= 0",
              shift="> 0", steps=">= 1", mu=">= 1", lr="> 0", eps="0..1", beta=">= 0", clip="> 0", ckpt_every=">= 1",
              eval_n=">= 1", eval_k=">= 1", bench_n=">= 1", gen_batch=">= 1", stop_after=">= 0")


def shuffle_within_groups(r, rng):
    """The control run (--shuffle_rewards): each group's rewards [B, G] permuted among its own captions, so
    the rollouts, the update's size and the reward's spread are the run's and only which caption earned
    which reward is lost. A gain that remains is the evaluation's noise or the update's, not the reward's."""
    return np.take_along_axis(r, np.argsort(rng.random(r.shape), 1), 1)


def group_advantages(r):
    """A_i = (R_i - mean_k R_k) / std_k R_k over each group (rows of r [B, G]; population std).
    A group whose rewards are all equal carries no signal: its advantages are 0 (no 0/0)."""
    r = torch.as_tensor(r, dtype=torch.float32)
    mean, std = r.mean(1, keepdim=True), r.std(1, unbiased=False, keepdim=True)
    return torch.where(std > 1e-6, (r - mean) / std.clamp(min=1e-6), torch.zeros_like(r))


def grpo_loss(logp, logp_old, logp_ref, mask, A, eps, beta):
    """-J(phi) of Eq. 1-2 for a batch of trajectories (rows). logp, logp_old, logp_ref [N, L]:
    log pi(y_t | x, y_<t) of the sampled tokens under phi, phi_old, ref; mask [N, L] 1 on caption
    tokens; A [N] the group advantage of each row. Returns (loss, stats)."""
    r_t = torch.exp(logp - logp_old)                                       # r_t^(i)(phi)
    surr = torch.min(r_t * A[:, None], torch.clamp(r_t, 1 - eps, 1 + eps) * A[:, None])
    kl = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1                # k3: D_KL(pi_phi || pi_ref) >= 0
    l_t = surr - beta * kl                                                 # l_t^(i)(phi), Eq. 2
    T_i = mask.sum(1).clamp(min=1)
    J = ((l_t * mask).sum(1) / T_i).mean()                                 # 1/G sum_i 1/T_i sum_t, Eq. 1
    n = mask.sum().clamp(min=1)
    clipped = ((r_t < 1 - eps) | (r_t > 1 + eps)).float()
    return -J, dict(kl=((kl * mask).sum() / n).item(), clip_frac=((clipped * mask).sum() / n).item(),
                    ratio_max=(r_t * mask).max().item(), ratio_min=torch.where(mask > 0, r_t, torch.ones_like(r_t)).min().item())


def caption_batch(z, captions):
    """Packed batch of <bos> <vs> [clean x] <ve> question y <eos?>: the labels are the caption's
    tokens (y_t given x, y_<t), so text_logprobs gives log pi(y_t | x, y_<t) at the label positions."""
    q = [M.VE] + world.encode(evaluate.CAPTION_Q)
    return M.pack([[("text", [M.BOS, M.VS], 0), ("clean", z[i]), ("text", q, 0), ("text", y, 1.0)]
                   for i, y in enumerate(captions)], M.PAD, z.shape[-1], z.device)


def make_reward(a, base, ae, device):
    if a["reward"] == "scene":
        return R.scene_f1
    if a["reward"] == "iou":
        return R.matched_iou
    if a["reward"] == "iou_scene":
        return R.iou_and_scene
    if a["reward"] == "clip":
        return R.CLIPCosine(a["clip_path"], device)
    return R.UndCosine(base, ae, device)


def bench_encoders(a, base, ae, device, reward):
    """The Unified-Bench's encoders: the base's frozen tower always, CLIP when a path is given
    (scene F1 is always added by the bench)."""
    enc = dict(und=reward if isinstance(reward, R.UndCosine) else R.UndCosine(base, ae, device))
    if a["clip_path"]:
        enc["clip"] = reward if isinstance(reward, R.CLIPCosine) else R.CLIPCosine(a["clip_path"], device)
    return enc


def check(a, world_size):
    """What can be checked before any model work."""
    if a["images"] % world_size:
        raise ValueError(f"--images {a['images']} must be divisible by the number of processes ({world_size})")
    if a["reward"] == "clip" and not os.path.isdir(a["clip_path"]):
        raise FileNotFoundError(f"--reward clip needs --clip_path DIR, a local CLIP folder (got {a['clip_path']!r}); "
                                f"nothing is downloaded here: use --reward und or scene without one")
    if a["clip_path"]:
        check_model_dir(a["clip_path"], "--clip_path", "CLIP")
    if a["stop_after"] and a["stop_after"] >= a["steps"]:
        raise ValueError(f"--stop_after {a['stop_after']} must be < --steps {a['steps']} (it simulates a killed run)")


def label(c):
    return f"Unified-GRPO (reward {c['reward']}{', shuffled' if c.get('shuffle_rewards') else ''}, params {c['params']})"


def main(argv=None):
    a = parse_args(defaults, argv, __doc__, choices, ranges)
    if a["report"]:
        return report(a["report"])
    rank, world_size, local, device = setup_dist(cpu_threads=1)     # one thread per process (common.setup_dist)
    check(a, world_size)
    torch.manual_seed(a["seed"] + rank)
    policy, ae, meta = runs.load_umm(a["ckpt"], device)
    # the frozen copy of the base, made before anything trains: pi_ref of the KL term, the decoder
    # p_theta (params und) and the tower of the und reward / bench encoder
    base = copy.deepcopy(policy).eval().requires_grad_(False)
    reward = make_reward(a, base, ae, device)
    stop_after = a.pop("stop_after")       # how to run, not what: not in config.json (a --resume may drop it)
    log = runs.open_run(a, rank, "unified_grpo.py")
    start_file = os.path.join(a["out"], "start.pt")
    saved = runs.saved_rollouts(start_file, a, (), "unified_grpo.py") if a["resume"] else None

    # ---- before: GenEval-style eval and yes/no understanding (runs.begin), and Unified-Bench protocol 1
    eval_specs, ea, before = runs.begin(policy, ae, a, saved, rank, log, device)
    encoders = bench_encoders(a, base, ae, device, reward)
    bench = lambda m, d, name: evaluate.unified_bench(   # noqa: E731
        m, ae, a["bench_n"], encoders, device, a["sample_steps"], a["cfg"], a["shift"], seed=a["seed"], decoder=d,
        out_dir=os.path.join(a["out"], name), batch=a["gen_batch"], log=lambda s: print(f"{name}: {s}", flush=True))
    bench_before = None
    if rank == 0:
        bench_before = saved["bench"] if saved else bench(policy, None, "before")
        log.log(dict(phase="bench_before", **bench_before))
        if not saved:
            atomic_torch_save(dict(args=a, before=before, bench=bench_before), start_file)
    banned = {world.caption(s) for s in evaluate.bench_scenes(a["bench_n"])}   # never train on a bench scene

    # ---- which parameters GRPO moves (--params); the AE is frozen throughout
    raw = policy.train()
    trainable = runs.set_trainable(raw, a["params"])
    decoder = base if a["params"] == "und" else raw            # p_theta frozen (UMM-1) | the policy itself (UMM-2)
    pol = ddp(raw, local, device) if world_size > 1 else raw
    opt = torch.optim.AdamW(trainable, lr=a["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(a["seed"])      # each step draws its own streams below: resume needs no RNG state
    start = runs.load_state(a, rank, raw, opt, None, rng, log)
    per, G = a["images"] // world_size, a["G"]
    t_start = time.time()
    for step in range(start, a["steps"]):
        t0 = time.time()
        srng = np.random.default_rng([a["seed"], step, rank])
        gen = torch.Generator(device).manual_seed(int(srng.integers(2 ** 62)))
        # 1. sources x (training scenes, bench scenes excluded)
        scenes = []
        while len(scenes) < per:
            s = world.random_scene(srng, holdout="train")
            if world.caption(s) not in banned:
                scenes.append(s)
        x = np.stack([world.draw(s) for s in scenes])
        xs = np.repeat(x, G, 0)                                               # [per*G] group-major
        # 2. y^(i) ~ pi_phi_old(. | x), T = 1.0, G per image
        raw.eval()
        y, ended = evaluate.describe(raw, ae, xs, a["temperature"], a["max_caption"], gen)
        # a caption that ended is scored on its <eos> too (ending is a decision the policy makes)
        traj = [yi + [M.EOS] if e else yi for yi, e in zip(y, ended.tolist())]
        # 3. x_hat^(i) ~ p_theta(. | y^(i)); one starting noise per group
        x1 = torch.randn(per, M.N_IMG, raw.c.latent_ch, device=device, generator=gen)
        x1 = x1.repeat_interleave(G, 0) if a["shared_noise"] else torch.randn(per * G, M.N_IMG, raw.c.latent_ch,
                                                                             device=device, generator=gen)
        decoder.eval()
        x_hat = evaluate.redraw(decoder, ae, y, a["sample_steps"], a["cfg"], a["shift"], gen, x1)
        # 4. R_i = R(x, x_hat^(i)); the exact scene F1 and the caption's own F1 are logged either way
        r = np.asarray(reward(xs, x_hat), np.float32)
        finite(f"step {step + 1} rewards", r=r)
        sf = r if a["reward"] == "scene" else R.scene_f1(xs, x_hat)
        texts = [world.decode(yi) for yi in y]
        cap_f1 = np.array([world.caption_score(t, s) for t, s in zip(texts, [sc for sc in scenes for _ in range(G)])])
        # 5. A_i = (R_i - mean) / std within each group of G
        rg = r.reshape(per, G)
        if a["shuffle_rewards"]:                       # the control: same rewards, each group's permuted
            rg = shuffle_within_groups(rg, np.random.default_rng([a["seed"], step, rank]))
        A = group_advantages(rg).reshape(-1).to(device)
        with torch.no_grad():
            z = ae.encode(torch.as_tensor(xs, device=device))
            b = caption_batch(z, traj)
            mask = (b["labels"] != -100).float()
            logp_ref = M.text_logprobs(base, b)                              # log pi_ref(y_t | x, y_<t)
        raw.train()
        for k in range(a["mu"]):
            logp = M.text_logprobs(pol, b)                                    # log pi_phi(y_t | x, y_<t)
            if k == 0:
                logp_old = logp.detach()         # the first inner step: phi = phi_old, so r_t = 1 exactly
            loss, st = grpo_loss(logp, logp_old, logp_ref, mask, A, a["eps"], a["beta"])
            if k == 0:
                first = (st["ratio_min"], st["ratio_max"])                   # logged: the check that r_t = 1
            gn = update(opt, loss, trainable, a["clip"], f"step {step + 1} inner {k + 1}")   # backward, clip, check, step
        # metrics over all processes
        n_all = all_sum(len(r)).item()
        mean = lambda v: all_sum(float(np.sum(v))).item() / n_all            # noqa: E731
        rm = mean(r)
        rec = dict(phase="train", step=step + 1, reward=rm, reward_std=(mean(np.square(r - rm))) ** 0.5,
                   reward_group_std=mean(np.repeat(r.reshape(per, G).std(1), G)),
                   groups_with_spread=mean(np.repeat(r.reshape(per, G).std(1) > 1e-6, G)),
                   scene_f1=mean(sf), caption_f1=mean(cap_f1), caption_len=mean([len(t) for t in y]),
                   detail_share=mean([evaluate.detail_share(t) for t in texts]),
                   ended=mean(ended.cpu().numpy()), kl=all_sum(st["kl"]).item() / world_size,
                   clip_frac=all_sum(st["clip_frac"]).item() / world_size, loss=all_sum(loss.item()).item() / world_size,
                   gnorm=gn.item(), first_ratio=first, last_ratio=(st["ratio_min"], st["ratio_max"]),
                   seconds=time.time() - t0)
        log.log(rec, f"step {step + 1}/{a['steps']} R {rm:.3f} (std {rec['reward_std']:.3f}, in-group {rec['reward_group_std']:.3f}) "
                     f"scene F1 {rec['scene_f1']:.3f} caption F1 {rec['caption_f1']:.3f} len {rec['caption_len']:.1f} "
                     f"kl {rec['kl']:.2e} clip {rec['clip_frac']:.3f} gn {gn.item():.2f} {rec['seconds']:.0f}s")
        if rank == 0 and (step + 1 == a["steps"] or step == start):
            # source | reconstruction, the caption and its reward at the left (green: scene F1 = 1)
            k = min(len(y), 8)
            pictures.grid([[xs[i], x_hat[i]] for i in range(k)], os.path.join(a["out"], f"rollouts_step{step + 1}.png"),
                          [f"{world.decode(y[i])} (R {r[i]:.2f}, scene F1 {sf[i]:.2f})" for i in range(k)],
                          [[None, bool(sf[i] == 1)] for i in range(k)])
        if (step + 1) % a["ckpt_every"] == 0 or step + 1 == a["steps"]:
            runs.save_state(a, rank, step + 1, raw, opt, None, rng)
        if stop_after and step + 1 == stop_after:
            print(f"--stop_after {stop_after}: stopping (continue with --resume)", flush=True)
            pol = None          # the DDP wrapper goes before the process group (see common.teardown_dist)
            teardown_dist()
            return dict(policy=raw, base=base, stopped=True)

    # ---- after: Unified-Bench with the trained model's own decoder (protocol 1) and, as a diagnostic,
    # its captions redrawn by the frozen base decoder; then the GenEval-style eval and the run folder
    out = None
    if rank == 0:
        raw.eval()
        bench_after = bench(raw, None, "after")
        bench_after_base = bench(raw, base, "after_base_decoder")
        log.log(dict(phase="bench_after", **bench_after, base_decoder=bench_after_base))
        curves(a["out"])
        summary_extra = dict(bench_before=bench_before, bench_after=bench_after, bench_after_base_decoder=bench_after_base,
                             train_minutes=(time.time() - t_start) / 60)
        after = runs.finish(raw, ae, before, eval_specs, ea, device, a, "unified_grpo", log, **summary_extra)
        table = bench_table(bench_before, bench_after, bench_after_base)
        with open(os.path.join(a["out"], "summary.md"), "a") as f:
            f.write("\n" + table + "\n")
        print(table, flush=True)
        out = dict(policy=raw, base=base, after=after, bench_before=bench_before, bench_after=bench_after)
    pol = None              # the DDP wrapper goes before the process group (see common.teardown_dist)
    teardown_dist()
    return out


def bench_table(b0, b1, b1_base):
    keys = [k for k in b0 if k != "n"]
    return "\n".join(["| Unified-Bench (protocol 1) | before | after | after, base decoder |", "|---|---|---|---|"] +
                     [f"| {k} | {b0[k]:.3f} | {b1[k]:.3f} | {b1_base[k]:.3f} |" for k in keys])


def curves(out):
    """reward, exact scene F1 and caption length over training -> curves.png"""
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"phase": "train"' in l]
    xs = [r["step"] for r in recs]
    pictures.curve_png({k: (xs, [r[k] for r in recs]) for k in ("reward", "scene_f1", "caption_len", "detail_share", "caption_f1", "kl")},
                       os.path.join(out, "curves.png"), "unified-grpo")


def report(root):
    """runs.report's GenEval / understanding table, then the Unified-Bench metrics: median and
    half-range over seeds before and after, and the gain paired by seed."""
    runs.report(root, label)
    rows = {}
    for d in sorted(os.listdir(root)):
        f = os.path.join(root, d, "summary.json")
        if os.path.exists(f):
            s, c = json.load(open(f)), json.load(open(os.path.join(root, d, "config.json")))
            rows.setdefault(label(c), {})[c["seed"]] = s
    fmt = lambda v: f"{np.median(v):.3f} ± {(max(v) - min(v)) / 2:.3f}"  # noqa: E731
    lines = ["", "Unified-Bench protocol 1 (median ± half-range over seeds; gain paired by seed)", "",
             "| variant | metric | seeds | before | after | gain per seed | median gain |", "|---|---|---|---|---|---|---|"]
    for name, by_seed in rows.items():
        seeds = sorted(by_seed)
        keys = set.intersection(*[set(by_seed[s]["bench_before"]) for s in seeds]) - {"n"}
        for k in [k for k in by_seed[seeds[0]]["bench_before"] if k in keys]:
            b0 = [by_seed[s]["bench_before"][k] for s in seeds]
            b1 = [by_seed[s]["bench_after"][k] for s in seeds]
            g = [y - x for x, y in zip(b0, b1)]
            lines.append(f"| {name} | {k} | {len(seeds)} | {fmt(b0)} | {fmt(b1)} | "
                         f"{', '.join(f'{v:+.3f}' for v in g)} | {np.median(g):+.3f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(root, "report.md"), "a") as f:
        f.write(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
