"""
Reward-weighted regression on weakness-targeted prompts (paper 000: "Unified Text-Image
Generation with Weakness-Targeted Post-Training"), one file, one loop.

  python rwr.py --mine --ckpt data/base --overwrite      # weakness mining -> data/mmgw.jsonl (replaces it)
  torchrun rwr.py --prompts data/mmgw.jsonl              # RWR (defaults: multimodal, oracle soft reward)
  python rwr.py --weight_on image | text                 # which loss the reward weights
  python rwr.py --reward vqa_self | oracle_binary | vqa_qwen --qwen /path/to/Qwen2.5-VL
  python rwr.py --baseline sft | rejection               # w = 1 / keep only r >= --reject_at
  python rwr.py --prompts random                         # the control: randomly drawn prompts
  python rwr.py --reuse runs/rwr/s0_multimodal --weight_on image --out runs/rwr/s0_image
                                                         # same rollouts (and before-eval), other weighting
  python rwr.py --report runs/rwr                        # table over runs/rwr/*: median and spread over seeds
  python rwr.py --out runs/rwr/x --resume                # continue a killed run (its rollouts, rewards, before-eval
                                                         # and last training checkpoint are in the folder)

The method (offline, one round, as in the paper):
  1. rollouts   for every prompt c, N unified generations in think mode: the model writes its
                plan tau and itself emits <|vision_start|>, then draws x0 (KV cache, batched).
                Sampled from the model's own distribution: temperature 1 and no CFG (--cfg 1), so
                that w = 1 (SFT) is a fixed point in expectation and the reward does the moving.
                Rollouts drawn with CFG 4, trained on, then sampled with CFG 4 again get the
                guidance twice. Many rollouts, each seen a few times (all mined prompts x 16,
                ~2.6 passes): on 384 rollouts seen 12.5 times each SFT lost more (RESULTS, "RWR").
  2. rewards    r = R(c, x0) in [0, 1]  (default: the world's exact verifier, soft, the stand-in for
                the paper's strong external judge; --reward vqa_self asks a frozen copy of the base)
  3. weights    w = exp(beta * r), beta = 5, divided by the mean over all rollouts (a constant:
                it only fixes the loss scale so --lr means the same for every reward)
  4. regression on the rollouts, per sample i (design section 4):
                L = sum_i w_i^txt * CE(tau_i | c_i) / n_txt  +  mean_i w_i^img * ||v_theta(x_t, t | c, tau) - (eps - x0_i)||^2
                multimodal: w^txt = w^img = w;  image: w^img = w, no text loss;  text: w^txt = w, no image loss
Weakness mining keeps prompts the base gets right about half the time (K samples each, exact
verifier), spread over the tags, so the regression has both successes and failures to separate.
"""
import json
import os

import numpy as np
import torch

import world
import model as M
import rewards as R
import runs
import evaluate
import pictures
from kernels.loss import velocity_loss
from common import setup_dist, teardown_dist, ddp, all_sum, update, finite, atomic_torch_save, atomic_write, parse_args, \
    check_model_dir, refuse_ignored

defaults = dict(
    ckpt="data/base", prompts="data/mmgw.jsonl", out="runs/rwr", seed=0, resume=False, overwrite=False,
    # weakness mining
    mine=False, candidates=40, K=8, keep_lo=0.25, keep_hi=0.75, reuse="", report="",
    # rollouts and rewards
    n_prompts=0, N=16, reward="oracle_soft", qwen="", temperature=1.0, max_think=64, gen_batch=64,
    sample_steps=25, cfg=1.0, shift=3.0,
    # regression
    weight_on="multimodal", baseline="none", beta=5.0, reject_at=0.5,
    train_steps=150, batch=32, lr=5e-5, clip=1.0, t_shift=1.0, cfg_drop=0.1, ckpt_every=25, row_len=160,
    # evaluation before / after on the held-out eval set
    eval_n=20, eval_k=2, dtype="fp32",
)
choices = dict(weight_on=("multimodal", "image", "text"), baseline=("none", "sft", "rejection"),
               reward=("oracle_soft", "oracle_binary", "vqa_self", "vqa_qwen"), dtype=("fp32", "bf16"))
# beta <= 80: w = exp(beta r) with r in [0, 1] stays finite in fp32 (exp overflows past 88.7)
ranges = dict(candidates=">= 1", K=">= 1", keep_lo="0..1", keep_hi="0..1", n_prompts=">= 0", N=">= 1",
              temperature=">= 0", max_think=">= 1", gen_batch=">= 1", sample_steps=">= 1", cfg=">= 0", shift="> 0",
              beta="0..80", reject_at="0..1", train_steps=">= 1", batch=">= 1", lr="> 0", clip="> 0", t_shift="> 0",
              cfg_drop="0..1", ckpt_every=">= 1", row_len=">= 0", eval_n=">= 1", eval_k=">= 1")


def mine(model, ae, a, device):
    """Weakness mining: candidates per tag (never eval prompts), K samples each, keep the prompts
    whose exact-verifier success rate is within [keep_lo, keep_hi] (about half)."""
    cands = world.candidates(a["candidates"], np.random.default_rng(a["seed"]))
    gen = torch.Generator(device).manual_seed(a["seed"])
    # "fails about half the time" as the model is judged: evaluate.py's sampler (CFG, temperature)
    judged = dict(a, cfg=evaluate.defaults["cfg"], temperature=evaluate.defaults["temperature"])
    ro = evaluate.sample(model, ae, cands, a["K"], "think", judged, gen, a["gen_batch"], "mining")
    ok = R.oracle_binary(ro["spec"], ro["image"]).reshape(len(cands), a["K"]).mean(1)
    keep = [dict(s, base_success=float(p)) for s, p in zip(cands, ok) if a["keep_lo"] <= p <= a["keep_hi"]]
    tags = sorted({s["tag"] for s in keep})
    per = {t: float(np.mean([p for s, p in zip(cands, ok) if s["tag"] == t])) for t in world.TAGS
           if any(s["tag"] == t for s in cands)}
    print("base success per tag on the candidates:", json.dumps({t: round(v, 3) for t, v in per.items()}))
    if not keep:    # an empty file would replace a working one and fail every later run
        raise RuntimeError(f"mined 0 of {len(cands)} candidates (success in [{a['keep_lo']}, {a['keep_hi']}]); "
                           f"{a['prompts']} is left as it was: widen --keep_lo/--keep_hi or raise --candidates")
    atomic_write(a["prompts"], "\n".join(json.dumps(s) for s in keep) + "\n")
    print(f"mined {len(keep)} of {len(cands)} candidates (success in [{a['keep_lo']}, {a['keep_hi']}], "
          f"K={a['K']}) over {len(tags)} tags {tags} -> {a['prompts']}")
    return keep


def label(c):
    """A run's row in the --report table, from its config.json."""
    how = c["baseline"] if c["baseline"] != "none" else f"RWR {c['weight_on']}"
    return f"{how} ({c['reward']}, {os.path.basename(c['prompts'])})"


def check(a, world_size):
    """Every input that can be checked before the model loads (a bad one fails in seconds, not
    after a 480-image before-eval)."""
    if a["keep_lo"] > a["keep_hi"]:
        raise ValueError(f"--keep_lo {a['keep_lo']} > --keep_hi {a['keep_hi']}")
    if a["batch"] % world_size:
        raise ValueError(f"--batch {a['batch']} must be divisible by the number of processes ({world_size})")
    if a["mine"]:
        if os.path.exists(a["prompts"]) and not a["overwrite"]:
            raise FileExistsError(f"--mine would replace {a['prompts']}; pass --overwrite to replace it, or "
                                  f"--prompts NEW.jsonl to mine into another file")
        return None
    # the flags a baseline or reward does not read are refused, not recorded in config.json as if used
    refuse_ignored(a, defaults, f"--baseline {a['baseline']}",
                   dict(none=("reject_at",), sft=("beta", "reject_at"), rejection=("beta",))[a["baseline"]])
    if a["reward"] != "vqa_qwen":
        refuse_ignored(a, defaults, f"--reward {a['reward']}", ("qwen",))
    elif not os.path.isdir(a["qwen"]):
        raise FileNotFoundError(f"--reward vqa_qwen needs --qwen DIR, a local Qwen2.5-VL folder (got {a['qwen']!r})")
    else:
        check_model_dir(a["qwen"], "--qwen", "Qwen2.5-VL",
                        needs=(("tokenizer.json", "tokenizer_config.json"), "preprocessor_config.json"))
    # --prompts random: the control for mining, prompts drawn at random (same pool as the miner's);
    # --n_prompts 0: every prompt of the file, for random prompts as many as the mined file holds
    n = a["n_prompts"] or (len(world.load_specs(defaults["prompts"])) if a["prompts"] == "random" else 0)
    specs = world.prompt_set(a["prompts"], n, a["seed"])
    runs.check_prompts(specs, a, world_size)
    return specs


def main(argv=None):
    a = parse_args(defaults, argv, __doc__, choices, ranges)
    if a["report"]:
        return runs.report(a["report"], label)
    rank, world_size, local, device = setup_dist()
    specs = check(a, world_size)
    torch.manual_seed(a["seed"] + rank)
    policy, ae, meta = runs.load_umm(a["ckpt"], device)
    if a["mine"]:
        if rank == 0:
            mine(policy, ae, a, device)
        return teardown_dist()
    log = runs.open_run(a, rank, "rwr.py", "rollouts")

    # ---- before (the base on the held-out eval set) and 1. rollouts: every prompt's N unified
    # generations in think mode, this rank's share; or the saved ones of --reuse DIR / --resume
    saved, eval_specs, ea, before, ro, ro_per_s = runs.start(policy, ae, specs, a, rank, world_size, log, device,
                                                             "rollouts", "rwr.py")
    n_ro = len(ro["spec"])

    # ---- 2. rewards r in [0, 1], one convention: reward(specs, images)
    if saved and saved["args"]["reward"] == a["reward"]:
        r = saved["r"]
    else:
        if a["reward"] == "vqa_self":
            reward = R.SelfVQA(policy, ae, device)          # a frozen copy: training never moves the judge
        elif a["reward"] == "vqa_qwen":
            reward = R.QwenVQA(a["qwen"], device)
        else:
            reward = getattr(R, a["reward"])
        r = np.asarray(reward(ro["spec"], ro["image"]), np.float32)
    finite("rewards", r=r)
    if not saved:       # saved once, where they were made; variants point --reuse here, --resume reads them
        atomic_torch_save(dict(args=a, ro=ro, r=r, rollouts_per_s=ro_per_s, before=before),
                          runs.rollout_file(a["out"], rank, "rollouts"))
    stats = rollout_stats(ro, r, ro_per_s, a, rank, log)

    # ---- 3. weights: w = exp(beta * r) / mean  (sft: w = 1; rejection: w = 1[r >= reject_at])
    if a["baseline"] == "sft":
        w = np.ones_like(r)
    elif a["baseline"] == "rejection":
        w = (r >= a["reject_at"]).astype(np.float32)
        runs.nothing_to_train(all_sum(float(w.sum())).item(),
                              f"--baseline rejection: no rollout has a reward at or above --reject_at {a['reject_at']} "
                              f"(see reward_hist.png); lower it, reusing these rollouts: --reuse {a['out']} --out NEW")
    else:
        w = np.exp(a["beta"] * r)
    w = w / max(all_sum(float(w.sum())).item() / max(all_sum(n_ro).item(), 1), 1e-8)
    finite("weights", w=w)
    w_txt = w if a["weight_on"] in ("multimodal", "text") else np.zeros_like(w)
    w_img = w if a["weight_on"] in ("multimodal", "image") else np.zeros_like(w)

    # ---- 4. regression on the rollouts
    raw = policy.train()
    policy = ddp(raw, local, device) if world_size > 1 else raw
    opt = torch.optim.AdamW(raw.parameters(), lr=a["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(a["seed"] * world_size + rank)
    start = runs.load_state(a, rank, raw, opt, None, rng, log)        # --resume: the last training checkpoint
    z_all = ae.encode(torch.as_tensor(np.stack(ro["image"]), device=device))   # x0: the judged image, re-encoded
    per = a["batch"] // world_size
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=a["dtype"] == "bf16")
    for step in range(start, a["train_steps"]):
        idx = rng.choice(n_ro, per, replace=n_ro < per)
        # flow matching on the rollout images:  x_t = (1 - t) x0 + t eps,  t = shift(sigmoid(randn))
        x0 = z_all[torch.as_tensor(idx, device=device)]
        x_t, eps, t = M.noised(x0, a["t_shift"])
        x_t_cpu, t_list = x_t.cpu(), t.tolist()                  # one copy each, not one per sample
        samples = []
        for i, j in enumerate(idx):
            prompt = [M.BOS] + world.encode(ro["spec"][j]["prompt"]) + [M.THINK]
            # a forced switch (the row hit <eos> or max_think) stays in the context with no loss on it
            forced = [] if ro["switched"][j] else [("text", [M.VS], 0)]
            text, img = [("text", prompt, 0), ("text", ro["think"][j], float(w_txt[j]))], ("noise", x_t_cpu[i], t_list[i])
            if rng.random() < a["cfg_drop"]:
                # CFG dropout, as in pre-training: the image is learnt with no text (<bos> <|vision_start|>),
                # so CFG's unconditional branch follows the conditional one; the plan keeps its own row
                samples += [text, [("text", [M.BOS, M.VS], 0), img]]
            else:
                samples.append(text + forced + [img])
        b = M.pack(samples, M.PAD, x0.shape[-1], device, row_len=a["row_len"] or None)   # packed rows
        with amp:
            ce, v = M.token_losses(policy, b)
        # both terms are means over the batch's samples of w_i times sample i's loss: the text term
        # divides by every plan token of the batch (not only those with w > 0), so rejection's zeros
        # count as zeros in both terms and neither term is rescaled by the keep rate
        n_txt = all_sum(sum(len(ro["think"][j]) for j in idx)).item()
        loss_txt = (ce * b["lw"]).sum() / max(n_txt, 1) * world_size          # sum_i w_i CE_i / n_txt
        wi = torch.as_tensor(w_img[idx], device=device, dtype=torch.float32)
        # mean_i w_i ||v - (eps - x0_i)||^2: the fused Triton kernel on CUDA, its twin elsewhere
        loss_img = velocity_loss(v.view_as(x0), eps, x0, w=wi)
        loss = loss_txt + loss_img
        gn = update(opt, loss, raw.parameters(), a["clip"], f"step {step + 1}")   # backward, clip, finite check, step
        if (step + 1) % 25 == 0 or step == start or step + 1 == a["train_steps"]:
            log.log(dict(phase="train", step=step + 1, loss_txt=loss_txt.item() / world_size, loss_img=loss_img.item(),
                         gnorm=gn.item()),
                    f"step {step + 1}/{a['train_steps']} text {loss_txt.item() / world_size:.4f} image {loss_img.item():.4f} gn {gn.item():.2f}")
        if (step + 1) % a["ckpt_every"] == 0 or step + 1 == a["train_steps"]:
            runs.save_state(a, rank, step + 1, raw, opt, None, rng)

    # ---- after: the same eval, the run folder
    if rank == 0:
        runs.finish(raw, ae, before, eval_specs, ea, device, a, "rwr", log,
                    reward=stats, hist=R.histogram(r), rollouts_per_s=ro_per_s)
    policy = None          # the DDP wrapper goes before the process group (see common.teardown_dist)
    teardown_dist()


def rollout_stats(ro, r, ro_per_s, a, rank, log):
    """What the rollouts look like before training: reward statistics and histogram (also as PNG),
    the verifier's success, and how well the reward agrees with it; a grid of 8 prompts."""
    oracle = R.oracle_binary(ro["spec"], ro["image"])
    stats = R.reward_stats(r)
    corr = float(np.corrcoef(r, oracle)[0, 1]) if oracle.std() > 0 and r.std() > 0 else None
    log.log(dict(phase="rollouts", n=len(r), rollouts_per_s=ro_per_s, reward=stats, hist=R.histogram(r),
                 oracle_success=float(oracle.mean()), switch_rate=float(np.mean(ro["switched"])),
                 reward_vs_oracle_corr=corr),
            f"rollouts: {len(r)} ({ro_per_s:.1f}/s) | reward mean {stats['mean']:.3f} "
            f"bimodality {stats['bimodality']:.2f} | oracle success {oracle.mean():.3f}")
    if rank == 0:
        pictures.histogram_png(R.histogram(r), os.path.join(a["out"], "reward_hist.png"),
                               f"rwr rewards ({a['reward']}), {len(r)} rollouts")
        rows = [i * a["N"] for i in range(0, len(r) // a["N"], max(1, len(r) // a["N"] // 8))][:8]
        pictures.grid([ro["image"][i:i + a["N"]] for i in rows], os.path.join(a["out"], "rollouts.png"),
                      [f"{ro['spec'][i]['prompt']} (r: " + " ".join(f"{x:.2f}" for x in r[i:i + 8]) + ")" for i in rows],
                      [[bool(o) for o in oracle[i:i + a["N"]]] for i in rows], cols=8)
    return stats


if __name__ == "__main__":
    main()
