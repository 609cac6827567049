"""
SRUM: fine-grained self-rewarding for unified multimodal models (paper 001), one file, one loop.
The model's understanding (a frozen copy) judges the model's own generations, globally and region
by region, and the judgments weight the flow-matching loss token by token.

  python srum.py                                         # defaults: self judge, code reward map, lambda_c 0.5
  torchrun --nproc_per_node=2 srum.py                    # DDP, same global batch
  python srum.py --judge oracle                          # the ideal judge (exact verifier): the control
  python srum.py --reuse runs/srum/s0_full --lambda_c 0 --out runs/srum/s0_no_kl     # same candidates and judgments
  python srum.py --reuse ... --reward_level sample | --binary | --no_global | --baseline sft   # the paper's ablations
  python srum.py --reuse ... --reward_map paper          # Eq. 1 as written: R in [-1, 1], repulsion where negative
  python srum.py --reuse ... --context prompt            # the velocity trained on the prompt alone (the public code)
  python srum.py --rounds 3 --train_steps 450            # fresh candidates every 150 steps, judged by the same frozen copy
  python srum.py --report runs/srum                      # table over runs/srum/*: median and spread over seeds
  python srum.py --out runs/srum/x --resume              # continue a killed run from its last checkpoint

The method, step by step in main (design section 4, the paper's symbols): 1. candidates, N think-mode
generations per prompt from the model's own distribution (T 1, --cfg 1: rwr.py's reason); 2. boxes,
the 5 largest the detector (world.detect, the paper's SAM) finds; 3. judgment, a global score g (the
layout only) and a score s_i per box (strict) in [-1, 1] from the frozen copy, which pre-training taught
the paper's rubric (tables 7-8, world.judge_scores); 4. the reward map R per image token (reward_map:
the upstream code's, default, or Eq. 1's); 5. the regression on the prompt and the candidate's plan
(--context plan) or on the prompt alone (prompt, the public code's t2i format),
  L = L_r + lambda_c * L_ref (Eq. 3),  L_r = mean(R_k * (v_theta - (eps - x0_gt))^2) (Eq. 1),
  L_ref = mean((v_theta - (eps - x0_gt))^2) (Eq. 2),  x0_gt = the candidate itself (upstream),
in one pass of the fused kernel; AdamW (0.9, 0.95), eps 1e-15, constant LR 2.5e-5, clip 1 (table 6).
Ablations (paper figure 3): --reward_level sample (global only), --binary (the 0-1 reward), --lambda_c
0 (no KL term), --no_global, --baseline sft (R = 1, lambda_c 0: SFT on the same images).
"""
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import world
import model as M
import rewards as R
import runs
import evaluate
import pictures
from kernels.loss import velocity_loss
from common import setup_dist, teardown_dist, ddp, all_sum, update, finite, atomic_torch_save, parse_args, refuse_ignored

defaults = dict(
    ckpt="data/base", prompts="random", n_prompts=114, out="runs/srum", seed=0, reuse="", report="",
    resume=False, overwrite=False,
    # candidates
    N=16, temperature=1.0, max_think=64, gen_batch=64, sample_steps=25, cfg=1.0, shift=3.0,
    # judgment and reward map
    judge="self", judge_score="mean", top_k=5, reward_map="code", reward_level="region", binary=False,
    no_global=False, baseline="none",
    # regression
    context="plan", lambda_c=0.5, train_steps=150, rounds=1, batch=32, lr=2.5e-5, warmup=10, clip=1.0, t_shift=1.0, cfg_drop=0.1, ckpt_every=25, row_len=160,
    # evaluation before / after on the held-out eval set
    eval_n=20, eval_k=2, eval_modes="think,forced", dtype="fp32",
)
choices = dict(judge=("self", "oracle"), judge_score=("mean", "mode"), reward_map=("code", "paper"),
               reward_level=("region", "sample"), baseline=("none", "sft"), context=("plan", "prompt"),
               eval_modes=("think,forced", "think"), dtype=("fp32", "bf16"))
ranges = dict(n_prompts=">= 0", N=">= 1", temperature=">= 0", max_think=">= 1", gen_batch=">= 1", sample_steps=">= 1",
              cfg=">= 0", shift="> 0", top_k=">= 1", lambda_c=">= 0", train_steps=">= 1", rounds=">= 1", batch=">= 1", lr="> 0",
              warmup=">= 0", clip="> 0", t_shift="> 0", cfg_drop="0..1", ckpt_every=">= 1", row_len=">= 0", eval_n=">= 1", eval_k=">= 1")


def reward_map(g, regions, a):
    """Step 4: one candidate's reward over the 16 image tokens (row-major 4x4, area average of the
    64x64 pixel map, also returned for the grids), from its global score g and its [(box, s_i)]:
      code  (upstream, default):  R = 0.5;  R[box_i] = max(R, (s_i + 1) / 2);  R *= (g + 1) / 2
      paper (Eq. 1 as written):   R = 0;    R[box_i] = s_i (the lowest where boxes overlap);
                                  R *= alpha = (g + 1) / 2, so R in [-1, 1] and R < 0 repels
    The code never makes R < 0: the default follows the code, the paper's form is the switch."""
    if a["binary"]:                                   # the 0-1 reward: only the sign of each judgment
        g, regions = (1.0 if g > 0 else -1.0), [(b, 1.0 if s > 0 else -1.0) for b, s in regions]
    if a["reward_level"] == "sample":                 # one number for the whole image: the global one
        pix = np.full((world.W, world.W), (g + 1) / 2, np.float32)
    else:
        paper = a["reward_map"] == "paper"
        pix = np.full((world.W, world.W), 0.0 if paper else 0.5, np.float32)
        if paper:
            low = np.full((world.W, world.W), np.inf, np.float32)
        for (x0, y0, x1, y1), s in regions:
            if paper:
                low[y0:y1, x0:x1] = np.minimum(low[y0:y1, x0:x1], s)
            else:
                pix[y0:y1, x0:x1] = np.maximum(pix[y0:y1, x0:x1], (s + 1) / 2)
        if paper:
            pix = np.where(np.isinf(low), pix, low)
        if not a["no_global"]:
            pix = pix * (g + 1) / 2                     # R *= alpha: a wrong layout scales every region down
    s = int(np.sqrt(M.N_IMG))
    # area average onto the token grid: a token's weight is the mean reward of its own 16x16 pixels,
    # so a small box raises its token only as much as it covers it (upstream resizes bilinearly: at
    # 16x down that reads 4 pixels near each cell's centre, or, with antialias, bleeds into neighbours)
    tok = F.interpolate(torch.as_tensor(pix)[None, None], size=(s, s), mode="area")
    return tok.flatten().numpy(), pix


def label(c):
    """A run's row in the --report table, from its config.json."""
    ctx = f"context {c.get('context', 'plan')}"
    if c["baseline"] == "sft":
        return f"SFT ({c['prompts']}, {ctx})"
    parts = [f"judge {c['judge']}", ctx]
    parts += ["sample-level" if c["reward_level"] == "sample" else f"map {c['reward_map']}"]
    parts += ["0-1"] * c["binary"] + ["no global"] * c["no_global"] + [f"lambda_c {c['lambda_c']:g}"]
    return f"SRUM ({', '.join(parts)})"


def main(argv=None):
    a = parse_args(defaults, argv, __doc__, choices, ranges)
    if a["report"]:
        return runs.report(a["report"], label)
    rank, world_size, local, device = setup_dist()
    if a["batch"] % world_size:
        raise ValueError(f"--batch {a['batch']} must be divisible by the number of processes ({world_size})")
    # the flags a variant does not read are refused, not recorded in config.json as if used
    if a["baseline"] == "sft":              # R = 1 and no L_ref
        refuse_ignored(a, defaults, "--baseline sft", ("lambda_c", "reward_map", "reward_level", "binary", "no_global"))
    elif a["reward_level"] == "sample":     # one global number per image: no map, no global factor to drop
        refuse_ignored(a, defaults, "--reward_level sample", ("reward_map", "no_global"))
    if a["judge"] == "oracle":              # the verifier's own scores
        refuse_ignored(a, defaults, "--judge oracle", ("judge_score",))
    specs = world.prompt_set(a["prompts"], a["n_prompts"], a["seed"])
    runs.check_prompts(specs, a, world_size)
    torch.manual_seed(a["seed"] + rank)
    policy, ae, meta = runs.load_umm(a["ckpt"], device)
    log = runs.open_run(a, rank, "srum.py", "candidates")

    # ---- before (the base on the held-out eval set) and 1. candidates: N think-mode generations per
    # prompt, this rank's share; or the saved ones of --reuse DIR / --resume, with their judgments if
    # the judge is the same (the ablations differ only from step 4 on)
    saved, eval_specs, ea, before, ro, ro_per_s = runs.start(policy, ae, specs, a, rank, world_size, log, device,
                                                             "candidates", "srum.py")

    # ---- 2-3. boxes (the detector) and judgments (a frozen copy of the model, made before any step)
    frozen = R.SelfJudge(policy, ae, device, score=a["judge_score"], k=a["top_k"]) if a["judge"] == "self" else None
    def judge(ro):
        t1 = time.time()
        g, regions = frozen.judge(ro["spec"], ro["image"]) if frozen else R.oracle_judge(ro["spec"], ro["image"], k=a["top_k"])
        log.log(dict(phase="judge", seconds=time.time() - t1, queries=len(g) + sum(map(len, regions))),
                f"judged {len(g)} images and {sum(map(len, regions))} regions in {time.time() - t1:.0f}s")
        finite("judgments", g=g, s=[s for r in regions for _, s in r])
        return g, regions
    if saved and all(saved["args"][k] == a[k] for k in ("judge", "judge_score", "top_k")):
        g, regions = saved["g"], saved["regions"]
    else:
        g, regions = judge(ro)
    if not saved:      # saved once, where they were made; ablations point --reuse here, --resume reads them
        atomic_torch_save(dict(args=a, ro=ro, g=g, regions=regions, rollouts_per_s=ro_per_s, before=before),
                          runs.rollout_file(a["out"], rank, "candidates"))
    judge_rec, stats, correct = judge_vs_verifier(ro, g, regions, ro_per_s, a, log)

    # ---- 4. reward maps over the image tokens (sft: R = 1 and no L_ref)
    Rtok, lam, weights = weigh(ro, g, regions, correct, a, log, rank)
    judge_rec = dict(judge_rec, **weights)

    # ---- 5. the regression: L = mean(R * ||v - (eps - x0)||^2) + lambda_c * mean(||v - (eps - x0)||^2)
    raw = policy.train()
    policy = ddp(raw, local, device) if world_size > 1 else raw
    opt = torch.optim.AdamW(raw.parameters(), lr=a["lr"], betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, a["warmup"])))  # then constant
    rng = np.random.default_rng(a["seed"] * world_size + rank)
    start = runs.load_state(a, rank, raw, opt, sched, rng, log)       # --resume: the last training checkpoint
    z_all = ae.encode(torch.as_tensor(np.stack(ro["image"]), device=device))   # x0_gt: the candidate, re-encoded
    per, n_ro = a["batch"] // world_size, len(ro["spec"])
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=a["dtype"] == "bf16")
    per_round, rnd, by_round = -(-a["train_steps"] // a["rounds"]), 0, [dict(round=0, **weights)]
    for step in range(start, a["train_steps"]):
        if step // per_round != rnd:   # --rounds: fresh candidates from the policy as it is now, the same frozen judge
            rnd = step // per_round
            ro, g, regions = fresh_candidates(raw, ae, specs, rnd, judge, a, rank, world_size, log, device)
            ok = R.oracle_binary(ro["spec"], ro["image"])
            Rtok, lam, weights = weigh(ro, g, regions, ok, a, log, rank)
            by_round.append(dict(round=rnd, oracle_success=float(ok.mean()), **weights))
            z_all = ae.encode(torch.as_tensor(np.stack(ro["image"]), device=device))
            n_ro = len(ro["spec"])
            raw.train()
        idx = rng.choice(n_ro, per, replace=n_ro < per)
        # flow matching on the candidates: x_t = (1 - t) x0 + t eps, t = shift(sigmoid(randn))
        x0 = z_all[torch.as_tensor(idx, device=device)]
        x_t, eps, t = M.noised(x0, a["t_shift"])
        x_t_cpu, t_list = x_t.cpu(), t.tolist()
        samples = []
        for i, j in enumerate(idx):
            img = ("noise", x_t_cpu[i], t_list[i])
            if rng.random() < a["cfg_drop"]:   # CFG dropout, as in pre-training: <bos> <|vision_start|> [image]
                samples.append([("text", [M.BOS, M.VS], 0), img])
            elif a["context"] == "prompt":      # the public code's: the prompt alone, the t2i format
                samples.append([("text", [M.BOS] + world.encode(ro["spec"][j]["prompt"]) + [M.VS], 0), img])
            else:                               # plan: the candidate's own context, prompt, its plan, the switch
                prompt = [M.BOS] + world.encode(ro["spec"][j]["prompt"]) + [M.THINK]
                forced = [] if ro["switched"][j] else [M.VS]
                samples.append([("text", prompt + ro["think"][j] + forced, 0), img])
        b = M.pack(samples, M.PAD, x0.shape[-1], device, row_len=a["row_len"] or None)   # packed rows
        with amp:
            _, v = M.token_losses(policy, b)
        w = torch.as_tensor(Rtok[idx], device=device)                      # R per token [per, 16]
        # Eq. 3 in one pass of the fused kernel: w = R (Eq. 1), lam * L_ref (Eq. 2), x0_ref = x0_gt
        loss = velocity_loss(v.view_as(x0), eps, x0, w=w, lam=lam)
        gn = update(opt, loss, raw.parameters(), a["clip"], f"step {step + 1}")   # backward, clip, finite check, step
        sched.step()
        if (step + 1) % 25 == 0 or step == start or step + 1 == a["train_steps"]:
            log.log(dict(phase="train", step=step + 1, loss=loss.item(), gnorm=gn.item(), lr=sched.get_last_lr()[0]),
                    f"step {step + 1}/{a['train_steps']} loss {loss.item():.4f} gn {gn.item():.2f}")
        if (step + 1) % a["ckpt_every"] == 0 or step + 1 == a["train_steps"]:
            runs.save_state(a, rank, step + 1, raw, opt, sched, rng)

    # ---- after: the same eval, the run folder
    if rank == 0:
        runs.finish(raw, ae, before, eval_specs, ea, device, a, "srum", log, reward=stats, hist=R.histogram((g + 1) / 2),
                    rollouts_per_s=ro_per_s, judge=judge_rec, token_reward_mean=float(Rtok.mean()), rounds=by_round)
    policy = None          # the DDP wrapper goes before the process group (see common.teardown_dist)
    teardown_dist()


def weigh(ro, g, regions, correct, a, log, rank):
    """Step 4 for one set of candidates: the token weights R [n, 16] and lambda_c (sft: R = 1, no
    L_ref), and what they weigh: the map's contrast (a candidate's mean per-token weight in Eq. 3,
    R + lambda_c, right over wrong by the verifier; RWR's exp(5 r) spans up to e^5 = 148x, SFT 1x)
    and the share of tokens that repel: R < 0 (L_r alone) and R + lambda_c < 0 (Eq. 3 as a whole)."""
    maps = [reward_map(float(gi), ri, a) for gi, ri in zip(g, regions)]
    Rtok = np.stack([m[0] for m in maps]).astype(np.float32)             # [n_ro, 16]
    lam = a["lambda_c"]
    if a["baseline"] == "sft":
        Rtok, lam = np.ones_like(Rtok), 0.0
    runs.nothing_to_train(all_sum(float(np.abs(Rtok).sum())).item() + lam,
                          "the reward maps are 0 on every token and --lambda_c is 0 (e.g. every judgment g = -1 "
                          "scales each map to 0); give --lambda_c > 0")
    w_img, correct = Rtok.mean(1) + lam, np.asarray(correct, bool)
    right, wrong = (float(w_img[m].mean()) if m.any() else None for m in (correct, ~correct))
    rec = dict(weight_right=right, weight_wrong=wrong, contrast=right / wrong if right is not None and wrong else None,
               negative_R=float((Rtok < 0).mean()), negative_weight=float((Rtok + lam < 0).mean()))
    if rank == 0:
        draw_maps(ro, maps, Rtok, a, log)
        log.log(dict(phase="contrast", **rec),
                "map contrast: mean token weight %s on right candidates, %s on wrong ones: %sx; tokens with R < 0: %s, "
                "with R + lambda_c < 0: %s" % tuple(evaluate.fmt_p(rec[k]) for k in
                                                     ("weight_right", "weight_wrong", "contrast", "negative_R", "negative_weight")))
    return Rtok, lam, rec


def fresh_candidates(raw, ae, specs, rnd, judge, a, rank, world_size, log, device):
    """--rounds: round rnd's candidates, N per prompt drawn by the policy as it stands (this rank's
    share), and their judgments; saved as candidates_rRND, which --resume reads back."""
    f = runs.rollout_file(a["out"], rank, f"candidates_r{rnd}")
    if os.path.exists(f):
        c = torch.load(f, weights_only=False)
        return c["ro"], c["g"], c["regions"]
    raw.eval()
    ro = runs.draw_rollouts(raw, ae, specs, a, rank, world_size, device, f"round {rnd} candidates", rnd)
    g, regions = judge(ro)
    atomic_torch_save(dict(ro=ro, g=g, regions=regions), f)
    log.log(dict(phase="round", round=rnd, n=len(g)), f"round {rnd}: {len(g)} fresh candidates")
    return ro, g, regions


# ----------------------------------------------------------------------------- diagnostics (not the method)

def judge_vs_verifier(ro, g, regions, ro_per_s, a, log):
    """How well the judge agrees with the exact verifier on these very candidates (SRUM's premise:
    the model understands its images better than it draws them). Returns (record, reward stats)."""
    g_ideal, reg_ideal = (g, regions) if a["judge"] == "oracle" else R.oracle_judge(ro["spec"], ro["image"], k=a["top_k"])
    correct = R.oracle_binary(ro["spec"], ro["image"]).astype(np.float32)   # the verifier's verdict
    s_j = np.array([s for r in regions for _, s in r]); s_i = np.array([s for r in reg_ideal for _, s in r])
    corr = lambda x, y: float(np.corrcoef(x, y)[0, 1]) if len(x) > 1 and x.std() > 0 and y.std() > 0 else None  # noqa: E731
    stats = R.reward_stats((g + 1) / 2)
    rec = dict(g_vs_correct=corr(g, correct), g_vs_ideal=corr(g, g_ideal),
               region_vs_ideal=corr(s_j, s_i) if len(s_j) == len(s_i) else None,
               region_sign_acc=float(np.mean((s_j > 0) == (s_i > 0))) if len(s_j) == len(s_i) and len(s_j) else None)
    log.log(dict(phase="candidates", n=len(g), rollouts_per_s=ro_per_s, reward=stats, hist=R.histogram((g + 1) / 2),
                 oracle_success=float(correct.mean()), switch_rate=float(np.mean(ro["switched"])), judge=rec),
            f"candidates: {len(g)} ({ro_per_s:.1f}/s) | global reward mean {stats['mean']:.3f} | oracle success "
            f"{correct.mean():.3f} | judge vs verifier, corr: g {evaluate.fmt_p(rec['g_vs_correct'])}, regions "
            f"{evaluate.fmt_p(rec['region_vs_ideal'])}")
    pictures.histogram_png(R.histogram((g + 1) / 2), os.path.join(a["out"], "reward_hist.png"),
                           f"srum global reward (g + 1) / 2, judge {a['judge']}, {len(g)} candidates")
    return rec, stats, correct.astype(bool)


def draw_maps(ro, maps, Rtok, a, log):
    """What the maps look like: image | its pixel map | its token map, 8 candidates, each row
    labelled with its prompt and the image framed by the verifier's verdict."""
    def gray(m):    # [0, 1] -> black..white; the paper's map [-1, 1] -> black..white with 0 grey
        m = (m + 1) / 2 if a["reward_map"] == "paper" else m
        return np.repeat((np.clip(m, 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)
    s = world.W // int(np.sqrt(M.N_IMG))
    pick = np.linspace(0, len(maps) - 1, 8).astype(int)
    ok = R.oracle_binary([ro["spec"][i] for i in pick], [ro["image"][i] for i in pick])
    rows = [[ro["image"][i], gray(maps[i][1]), gray(np.kron(Rtok[i].reshape(world.W // s, -1), np.ones((s, s))))]
            for i in pick]
    pictures.grid(rows, os.path.join(a["out"], "reward_maps.png"), [ro["spec"][i]["prompt"] for i in pick],
                  [[bool(o), None, None] for o in ok])
    log.log(dict(phase="maps", token_reward_mean=float(Rtok.mean()), token_reward_std=float(Rtok.std()),
                 token_reward_min=float(Rtok.min())),
            f"reward maps: token mean {Rtok.mean():.3f} std {Rtok.std():.3f} min {Rtok.min():.3f} (grid: reward_maps.png)")


if __name__ == "__main__":
    main()
