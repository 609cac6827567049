"""
GenEval-style evaluation of a nanoUMM checkpoint on the fixed eval set (data/eval.jsonl).

  python evaluate.py                         # the shipped base, all 50 prompts x 12 tags, 4 images each
  python evaluate.py --n 10 --k 2            # quick
  python evaluate.py --ckpt runs/rwr/ckpt --out runs/rwr/eval
  python evaluate.py --unified 32 --modes "" --und 0      # Unified-Bench protocol 1 only (paper 002)
  python evaluate.py --unified 32 --clip /path/to/clip    # ... also scored under a local CLIP
  python evaluate.py --modes irg             # IRG inference (paper 003): think1, image1, think2, image2
  python evaluate.py --auroc 20 --modes "" --und 0    # does the model's understanding judge its own images?
  python evaluate.py --ckpt data/v13 --auroc 40 --auroc_drawer data/base --modes "" --und 0   # ... another's images
  python evaluate.py --captions 400 --modes "" --und 0 # greedy captions of fresh renders: exact and F1
  python evaluate.py --detail 200 --modes "" --und 0   # redraws from short vs detailed captions (matched-box IoU)
  python evaluate.py --edits 10 --modes "" --und 0     # image2 under a given reflection: kept pixels, fixed flaws

Reports, per tag and overall:
  gen_think   fraction of images the exact verifier accepts, think mode (the model plans in
              text and itself switches to the image with <|vision_start|>)
  gen_forced  the same with the image forced right after the prompt
  und         yes/no VQA accuracy on a correct render and a one-constraint negative of the same
              prompts (P("yes") > 0.5), i.e. understanding on the prompts generation is scored on
  switch      rate at which the model emits <|vision_start|> by itself in think mode
and writes summary.json and a sample grid (one row per tag) to --out.

With --modes irg (evaluate_irg): accuracy of image1 and of image2 per tag, the fix rate
P(image2 right | image1 wrong), the break rate P(image2 wrong | image1 right), and a grid
prompt | think1 | image1 | think2 | image2 (--out/irg: summary.json, grid_irg.png).

Unified-Bench protocol 1 (paper 002, section 2.3; `unified_bench`, flag --unified N): N fixed
source renders (random training-distribution scenes from a fixed seed, a stream no method trains
on) -> the model's own greedy caption -> the model's own image from that caption -> similarity of
source and reconstruction under each encoder (rewards.UndCosine of the BASE, so every checkpoint
is measured by the same f; rewards.CLIPCosine with --clip) and the exact scene F1
(rewards.scene_f1). Also the caption's exact match and F1 against the source scene.
"""
import json
import os
import time

import numpy as np
import torch

import world
import model as M
import pictures
from common import parse_args, Progress, check_model_dir, claim_run_dir

defaults = dict(ckpt="data/base", eval="data/eval.jsonl", out="runs/eval", n=50, k=4, batch=96,
                sample_steps=25, cfg=4.0, shift=3.0, temperature=0.7, max_think=64, seed=0,
                modes="think,forced", und=True, grid_cols=8, irg_max_think=80, unified=0, unified_steps=10,
                encoder="data/base", clip="", auroc=0, auroc_drawer="", captions=0, detail=0, edits=0, irg_cfg_text2=4.0, irg_cfg_img=2.0, irg_best2=False)
# IRG inference (--modes irg), the upstream IRG eval script's settings (design.md section 4): --irg_max_think
# (80, as irg.py) bounds each think; --irg_cfg_text2 / --irg_cfg_img: image2's guidance, as irg.py's --cfg_text2 /
# --cfg_img; --irg_best2 1: the control, a second independent think1 + image1 per prompt, the critic's pick
irg_defaults = dict(temperature=0.3, cfg_text=4.0, cfg_lo1=0.4)
ranges = dict(n=">= 1", k=">= 1", batch=">= 1", sample_steps=">= 1", cfg=">= 0", shift="> 0", temperature=">= 0",
              max_think=">= 1", grid_cols=">= 1", irg_max_think=">= 1", unified=">= 0", unified_steps=">= 1",
              auroc=">= 0", captions=">= 0", detail=">= 0", edits=">= 0", irg_cfg_text2=">= 0",
              irg_cfg_img=">= 0")


@torch.no_grad()
def sample(model, ae, specs, n, mode, a, gen, batch, what):
    """n generations per spec in `mode` (think / forced; temperature, max_think, sample_steps, cfg,
    shift from a), `batch` at a time, with progress: dict of lists (spec, think tokens, switched,
    image). What the evals score and what the methods train on (runs.start, rwr's mining)."""
    jobs = [s for s in specs for _ in range(n)]
    out = dict(spec=[], think=[], switched=[], image=[])
    prog = Progress(what, len(jobs))           # long phases are not silent: progress with an ETA
    for i in range(0, len(jobs), batch):
        prog(i)
        chunk = jobs[i:i + batch]
        g = M.generate(model, [world.encode(s["prompt"]) for s in chunk], mode=mode, max_think=a["max_think"],
                       temperature=a["temperature"], generator=gen, steps=a["sample_steps"], cfg=a["cfg"], shift=a["shift"])
        out["spec"] += chunk
        out["think"] += g["think"]
        out["switched"] += g["switched"].tolist()
        out["image"] += list(ae.decode(g["z"], world.PALETTE).cpu().numpy())
    return out


def gen_scores(model, ae, specs, mode, a, device):
    """Generate k images per spec; returns (correct [len(specs)*k] bool, switched, images, think texts)."""
    g = torch.Generator(device).manual_seed(a["seed"])
    out = sample(model, ae, specs, a["k"], mode, a, g, a["batch"], f"eval {mode} images")
    correct = [world.verify(s, x)["correct"] for s, x in zip(out["spec"], out["image"])]
    return np.array(correct), np.array(out["switched"]), out["image"], [world.decode(t) for t in out["think"]]


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
            pictures.sample_grid(specs, a["k"], imgs, correct, os.path.join(out_dir, f"grid_{mode}.png"), a["grid_cols"])
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


def fmt_p(x):
    """A rate or score for a log line, "n/a" where there is none."""
    return "n/a" if x is None else f"{x:.3f}"


@torch.no_grad()
def evaluate_irg(model, ae, specs, a, device, out_dir=None, log=print):
    """IRG inference (model.irg_generate) on specs, k images each; a: the sampler settings (irg.sampler)
    plus k, batch, seed and best2. Per tag and overall (mean over tags, as evaluate): accuracy of image1
    and image2; over all images: fix = P(image2 right | image1 wrong), break = P(image2 wrong | image1
    right); the reflection as a critic: AUROC of P(think2 begins "the image is correct") against the
    verifier; the plan split (plan_split). best2, the control: a second, independent think1 + image1 per
    prompt and the one of the two first images that critic scores higher (a second sample, no reflection).
    Writes summary.json and grid_irg.png (first prompt of every tag) to out_dir."""
    model.eval()
    jobs = [s for s in specs for _ in range(a["k"])]
    g = torch.Generator(device).manual_seed(a["seed"])
    a = dict(a, ok_ids=world.encode(world.PROBLEMS["ok"]))
    redraw, best2 = world.encode(world.REDRAW), bool(a.get("best2"))
    plan_ok = lambda s, t: world.plan_verdict(s, world.decode(t))["correct"]      # noqa: E731
    rec = []                # one dict per image, in job order
    t0, prog = time.time(), Progress("eval irg", len(jobs))
    for i in range(0, len(jobs), a["batch"]):
        prog(i)
        chunk = jobs[i:i + a["batch"]]
        prompts = [world.encode(s["prompt"]) for s in chunk]
        out = M.irg_generate(model, ae, prompts, a, world.PALETTE, g)
        for s, t1, t2, x1, x2, p in zip(chunk, out["think1"], out["think2"], out["img1"], out["img2"], out["p_ok"].tolist()):
            plan2 = M.redraw_plan(t2, redraw)
            rec.append(dict(ok1=world.verify(s, x1)["correct"], ok2=world.verify(s, x2)["correct"], p_ok=p,
                            plan1=plan_ok(s, t1), plan2=plan_ok(s, plan2), same=plan2 == M.redraw_plan(t1, redraw),
                            think1=world.decode(t1), think2=world.decode(t2), img1=x1, img2=x2))
        if best2:           # think1 + image1 drawn again from scratch, read by the same critic after <ve> <think>
            cache, t1b, _, _, img1b, _ = M.draw_first(model, ae, prompts, a, world.PALETTE, g)
            M.append_text(model, cache, torch.full((len(chunk), 1), M.VE, device=device))
            p_b = M.critic_p(model, cache, M.append_text(model, cache, torch.full((len(chunk), 1), M.THINK, device=device)),
                             a["ok_ids"])
            for d, s, t, x, p in zip(rec[-len(chunk):], chunk, t1b, img1b.cpu().numpy(), p_b.tolist()):
                d.update(ok1b=world.verify(s, x)["correct"], p_okb=p, planb=plan_ok(s, t))
    col = lambda k: np.array([d[k] for d in rec]) if rec and k in rec[0] else np.zeros(0, bool)  # noqa: E731
    m = lambda x, w: float(x[w].mean()) if w.any() else None                                    # noqa: E731
    ok1, ok2, ok1b = col("ok1"), col("ok2"), col("ok1b")
    tags = [t for t in world.TAGS if any(s["tag"] == t for s in specs)]
    tag_of, prompt_of = np.array([s["tag"] for s in jobs]), np.array([s["prompt"] for s in jobs])
    mean_tags = lambda ok: float(np.mean([ok[tag_of == t].mean() for t in tags]))  # noqa: E731
    says_ok = np.array([d["think2"].startswith(world.PROBLEMS["ok"]) for d in rec])
    res = dict(image1=mean_tags(ok1), image2=mean_tags(ok2), fix=m(ok2, ~ok1), n_wrong1=int((~ok1).sum()),
               **{"break": m(~ok2, ok1)}, n_right1=int(ok1.sum()), n=len(jobs), per_s=len(jobs) / (time.time() - t0),
               per_tag={t: (float(ok1[tag_of == t].mean()), float(ok2[tag_of == t].mean())) for t in tags},
               per_prompt={p: (float(ok1[prompt_of == p].mean()), float(ok2[prompt_of == p].mean()))
                           for p in dict.fromkeys(prompt_of.tolist())},
               # how often think2 calls image1 right, given the verifier; the critic's AUROC; the redraw plan = think1's
               ok_if_right=m(says_ok, ok1), ok_if_wrong=m(says_ok, ~ok1), critic_auroc=auroc(col("p_ok"), ok1),
               plan_repeats=m(col("same"), ~ok1),
               plans=plan_split(ok1, ok2, ok1b, col("plan1"), col("plan2"), col("planb")),
               per_image={k: col(k).tolist() for k in ("ok1", "ok2", "p_ok", "plan1", "plan2", "ok1b", "p_okb", "planb")
                          if k in rec[0]},
               examples=[dict(prompt=jobs[i]["prompt"], think1=rec[i]["think1"], think2=rec[i]["think2"],
                              right1=bool(ok1[i]), right2=bool(ok2[i])) for i in range(0, len(jobs), max(1, len(jobs) // 12))])
    if best2:
        best = np.where(col("p_okb") > col("p_ok"), ok1b, ok1)
        res.update(image1b=mean_tags(ok1b), best2=mean_tags(best), best2_per_tag={t: float(best[tag_of == t].mean()) for t in tags},
                   fix_fresh=m(ok1b, ~ok1), break_fresh=m(~ok1b, ok1))
    pl = res["plans"]
    lines = [f"{'tag':15s} {'image1':>8s} {'image2':>8s}"] + [f"{t:15s} {v[0]:8.3f} {v[1]:8.3f}" for t, v in res["per_tag"].items()]
    lines += [f"{'overall':15s} {res['image1']:8.3f} {res['image2']:8.3f}",
              f"fix (image2 right | image1 wrong) {fmt_p(res['fix'])}, break (image2 wrong | image1 right) {fmt_p(res['break'])}",
              f"think2 says image1 is right: {fmt_p(res['ok_if_right'])} of the right ones, {fmt_p(res['ok_if_wrong'])} of "
              f"the wrong ones; critic AUROC {fmt_p(res['critic_auroc'])}; of the wrong image1s, think2's redraw plan "
              f"repeats think1's for {fmt_p(res['plan_repeats'])}",
              f"plans (world.plan_verdict): think1 right {pl['plan1_right']:.3f}; image1 right {fmt_p(pl['image1_if_plan_right'])} "
              f"where it is, {fmt_p(pl['image1_if_plan_wrong'])} where it is not; of the wrong image1s, {pl['right_plan']['n']} "
              f"drew a right plan (fixed {fmt_p(pl['right_plan']['fix_redraw'])}) and {pl['wrong_plan']['n']} a wrong one "
              f"(the redraw's plan right {fmt_p(pl['wrong_plan']['replan_right'])}, fixed {fmt_p(pl['wrong_plan']['fix_redraw'])})"]
    if best2:
        lines.append(f"control, two independent first images ({res['image1']:.3f}, {res['image1b']:.3f}), the higher-scored "
                     f"one (best2): {res['best2']:.3f}; of the wrong image1s the redraw fixes {fmt_p(res['fix'])}, a fresh "
                     f"first image {fmt_p(res['fix_fresh'])}; of the right ones wrong {fmt_p(res['break'])} / {fmt_p(res['break_fresh'])}")
    res["table"] = "\n".join(lines)
    log(res["table"])
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        rows = [next(i for i, s in enumerate(jobs) if s["tag"] == t) for t in tags]
        pictures.irg_grid([(f"[{jobs[i]['tag']}] {jobs[i]['prompt']}", rec[i]["think1"], rec[i]["img1"], bool(ok1[i]), rec[i]["think2"],
                   rec[i]["img2"], bool(ok2[i])) for i in rows], os.path.join(out_dir, "grid_irg.png"))
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(res, f, indent=1)
    return res


def plan_split(ok1, ok2, ok1b, pl1, pl2, plb):
    """A wrong image1 is a bad drawing of a right plan or a drawing of a wrong plan; only the first can
    be fixed by re-drawing the same plan, only the second needs a new one. ok*: the images' verdicts;
    pl1 / pl2 / plb: think1's, the redraw's and best2's plans right (ok1b, plb empty without best2)."""
    m = lambda x, w: float(x[w].mean()) if w.any() else None       # noqa: E731
    out = dict(plan1_right=float(pl1.mean()), image1_if_plan_right=m(ok1, pl1), image1_if_plan_wrong=m(ok1, ~pl1))
    for name, w in (("right_plan", ~ok1 & pl1), ("wrong_plan", ~ok1 & ~pl1)):
        out[name] = dict(n=int(w.sum()), fix_redraw=m(ok2, w), replan_right=m(pl2, w),
                         fix_fresh=m(ok1b, w) if ok1b.size else None, fresh_plan_right=m(plb, w) if plb.size else None)
    return out


# ----------------------------------------------------------------------------- Unified-Bench (paper 002)

CAPTION_Q = "give the layout of the image ."     # pre-training's caption task (pretrain.py)
BENCH_SEED = 20251                                # the fixed bench scenes: one stream, same for every run


def bench_scenes(n, seed=BENCH_SEED):
    """The bench's source scenes: random training-distribution scenes from a fixed seed."""
    rng = np.random.default_rng(seed)
    return [world.random_scene(rng, holdout="train") for _ in range(n)]


@torch.no_grad()
def describe(model, ae, images, temperature=1.0, max_new=48, generator=None):
    """Image -> text (I2T), KV-cached: `<bos> <|vision_start|> [clean x] <|vision_end|> give the
    layout of the image .` then decode to <eos>. Returns token lists without the <eos> and
    ended [B] bool (False: cut at max_new)."""
    dev = next(model.parameters()).device
    z = ae.encode(torch.as_tensor(np.asarray(images), device=dev))
    B = len(z)
    cache, _ = M.prefill(model, [[M.BOS, M.VS]] * B, dev)
    M.append_image(model, cache, z)
    logits = M.append_text(model, cache, torch.tensor([[M.VE] + world.encode(CAPTION_Q)] * B, device=dev))
    toks, ended = M.decode_text(model, cache, logits, {M.EOS}, max_new, temperature, generator)
    return [t[:-1] if e else t for t, e in zip(toks, ended.tolist())], ended


@torch.no_grad()
def redraw(model, ae, captions, steps=10, cfg=4.0, shift=3.0, generator=None, x1=None):
    """Text -> image (T2I) reading a caption as the think plan it was pre-trained on:
    `<bos> <think> caption </think> <|vision_start|>` (a caption is exactly world.plan_text of its
    scene) -> flow sampling with text CFG (uncond `<bos> <|vision_start|>`). x1: the starting noise
    (a group shares one, so its reconstructions differ only by their captions). uint8 images."""
    dev = next(model.parameters()).device
    cache, _ = M.prefill(model, [[M.BOS, M.THINK] + list(c) + [M.END_THINK, M.VS] for c in captions], dev)
    uncond, _ = M.prefill(model, [[M.BOS, M.VS]] * len(captions), dev)
    z = M.sample_image(model, cache, uncond, steps=steps, cfg=cfg, shift=shift, generator=generator, x1=x1)
    return ae.decode(z, world.PALETTE).cpu().numpy()


@torch.no_grad()
def unified_bench(model, ae, n, encoders, device, steps=10, cfg=4.0, shift=3.0, seed=0, decoder=None,
                  out_dir=None, batch=64, log=print):
    """Unified-Bench protocol 1: source x -> own greedy caption y -> own image x_hat (`decoder`,
    default the model itself) -> scores. encoders: {name: reward(src, rec)} (pairs convention);
    scene F1 is always added. Returns dict(name -> mean score, caption_f1, caption_exact (the short form
    exactly right, centres dropped), caption_len, caption_detail (the share of chunks with a centre)) and writes grid_unified.png (source | reconstruction, caption at the left)."""
    from rewards import scene_f1
    model.eval()
    scenes = bench_scenes(n)
    src = np.stack([world.draw(s) for s in scenes])
    g = torch.Generator(device).manual_seed(seed)
    caps, rec = [], []
    for i in range(0, n, batch):
        c, _ = describe(model, ae, src[i:i + batch], temperature=0.0)
        caps += c
        rec.append(redraw(decoder or model, ae, c, steps, cfg, shift, g))
    rec = np.concatenate(rec)
    texts = [world.decode(c) for c in caps]
    res = {name: float(np.mean(f(src, rec))) for name, f in encoders.items()}
    sf = scene_f1(src, rec)
    # the caption's objects against the scene's, pooled over the bench: does it name fewer (recall) or wrong ones?
    from collections import Counter
    got = [Counter((o["shape"], o["color"], o["size"], o["pos"], o["text"]) for o in (world.parse_caption(t) or []))
           for t in texts]
    want = [Counter(world.caption_key(o) for o in s) for s in scenes]
    tp = sum(sum((g_ & w).values()) for g_, w in zip(got, want))
    res.update(scene_f1=float(sf.mean()),
               caption_precision=tp / max(1, sum(sum(g_.values()) for g_ in got)),
               caption_recall=tp / max(1, sum(sum(w.values()) for w in want)),
               caption_f1=float(np.mean([world.caption_score(t, s) for t, s in zip(texts, scenes)])),
               caption_exact=float(np.mean([short_form(t) == world.caption(s) for t, s in zip(texts, scenes)])),
               caption_len=float(np.mean([len(c) for c in caps])),
               caption_detail=float(np.mean([detail_share(t) for t in texts])), n=n)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        k = min(n, 12)
        pictures.grid([[src[i], rec[i]] for i in range(k)], os.path.join(out_dir, "grid_unified.png"),
             [f"{texts[i]} (scene F1 {sf[i]:.2f})" for i in range(k)], [[None, bool(sf[i] == 1)] for i in range(k)])
    log("unified bench: " + " ".join(f"{k} {v:.3f}" for k, v in res.items() if k != "n"))
    return res


CAPTION_SEED = 8675309                            # --captions: fresh scenes, another stream than the bench's


@torch.no_grad()
def caption_eval(model, ae, n, device, seed=CAPTION_SEED, batch=128, log=print):
    """Greedy captions of n fresh renders of random scenes (1-4 objects, 1 in 8 holding a number;
    pre-training's caption distribution, never these draws) against world.caption of the scene:
    exact match and object F1, overall, by object count, and for scenes that hold a number."""
    model.eval()
    rng = np.random.default_rng(seed)
    scenes = [world.random_scene(rng, holdout="train") for _ in range(n)]
    src = np.stack([world.draw(s) for s in scenes])
    texts = []
    for i in range(0, n, batch):
        texts += [world.decode(c) for c in describe(model, ae, src[i:i + batch], temperature=0.0)[0]]
    exact = np.array([t == world.caption(s) for t, s in zip(texts, scenes)])
    f1 = np.array([world.caption_score(t, s) for t, s in zip(texts, scenes)])
    groups = {f"{k} object{'s' * (k > 1)}": np.array([len(s) == k for s in scenes]) for k in range(1, 5)}
    groups["with a number"] = np.array([any(o["shape"] == "number" for o in s) for s in scenes])
    res = dict(n=n, exact=float(exact.mean()), f1=float(f1.mean()),
               groups={g: dict(n=int(m.sum()), exact=float(exact[m].mean()) if m.any() else None,
                               f1=float(f1[m].mean()) if m.any() else None) for g, m in groups.items()})
    log(f"captions of {n} fresh renders: exact {res['exact']:.3f}, object F1 {res['f1']:.3f}; " +
        ", ".join(f"{g} (n {v['n']}) exact {v['exact']:.2f}" for g, v in res["groups"].items() if v["n"]))
    return res


DETAIL_SEED = 5551212                             # --detail / --edits: fresh scenes and prompts of their own


@torch.no_grad()
def detail_eval(model, ae, n, device, seed=DETAIL_SEED, batch=64, log=print):
    """Can the decoder use detail the short caption leaves out? n fresh renders of random scenes, each
    redrawn (redraw, Unified-GRPO's context, one shared noise per scene) from its short caption and from
    its detailed one (world.caption(detail=True): every object's centre in pixels), scored by the
    matched-box IoU and the exact scene F1 (rewards.matched_iou, scene_f1); and how much detail the
    model's own captions carry: the share of caption chunks that end in a centre, sampled at T = 1 and
    greedy (describe), with the greedy caption's exact match of the short form; and whether the decoder reads
    the centres at all: redrawn from detailed captions with every x moved by -NUDGE and +NUDGE px (the cell
    words kept, the same noise), how far its objects move per px (centre_slope: 1 follows, 0 ignores), and
    how much the flow loss rises with the centres moved (centre_loss_gap, relative; 0: the numbers are unread).
    A redraw's matched IoU can rise with a decoder that only learned not to be confused by the numbers."""
    import rewards as R
    model.eval()
    rng, g = np.random.default_rng(seed), torch.Generator(device).manual_seed(seed)
    scenes = [world.random_scene(rng, holdout="train") for _ in range(n)]
    src = np.stack([world.draw(sc) for sc in scenes])
    def cap(sc, form):                  # form False: short, True: detailed, an int: detailed with x moved by it
        return world.caption(sc, form) if isinstance(form, bool) else nudge_x(world.caption(sc, True), form)
    rec, own = {False: [], True: [], NUDGE: [], -NUDGE: []}, {0.0: [], 1.0: []}
    for i in range(0, n, batch):
        x1 = torch.randn(len(src[i:i + batch]), model.c.n_img, model.c.latent_ch, device=device, generator=g)
        for form in rec:            # the same noise for all four forms
            rec[form] += list(redraw(model, ae, [world.encode(cap(sc, form)) for sc in scenes[i:i + batch]], generator=g, x1=x1))
        for temp in own:
            own[temp] += [world.decode(c) for c in describe(model, ae, src[i:i + batch], temp, 64, g)[0]]
    # the same question on the network, before any sampling: the flow loss at t = LOSS_T on the sources' own
    # latents, given their detailed captions against the nudged ones (a loss that reads the centres rises)
    loss = {form: 0.0 for form in (True, NUDGE, -NUDGE)}
    for i in range(0, n, batch):
        z0 = ae.encode(torch.from_numpy(src[i:i + batch]).to(device))
        eps = torch.randn(z0.shape, device=device, generator=g)
        for form in loss:
            cache, _ = M.prefill(model, [[M.BOS, M.THINK] + world.encode(cap(sc, form)) + [M.END_THINK, M.VS]
                                         for sc in scenes[i:i + batch]], device)
            v = M.noise_velocity(model, cache, (1 - LOSS_T) * z0 + LOSS_T * eps, LOSS_T)
            loss[form] += float(((v - (eps - z0)) ** 2).mean(dim=(1, 2)).sum()) / n
    def pooled_share(texts):            # detail_share over all chunks; None where no caption names an object
        chunks = [o["centre"] is not None for t in texts for o in world.parse_caption(t) or []]
        return float(np.mean(chunks)) if chunks else None
    res = dict(n=n, iou_short=float(R.matched_iou(src, rec[False]).mean()), iou_detailed=float(R.matched_iou(src, rec[True]).mean()),
               f1_short=float(R.scene_f1(src, rec[False]).mean()), f1_detailed=float(R.scene_f1(src, rec[True]).mean()),
               centre_slope=centre_slope(rec[-NUDGE], rec[NUDGE], 2 * NUDGE),
               centre_loss_gap=(loss[NUDGE] + loss[-NUDGE]) / (2 * loss[True]) - 1,
               detail_share_t1=pooled_share(own[1.0]), detail_share_greedy=pooled_share(own[0.0]),
               greedy_short_exact=float(np.mean([t == world.caption(sc) for t, sc in zip(own[0.0], scenes)])))
    log(f"detail on {n} fresh scenes: redraw IoU from short captions {res['iou_short']:.3f}, from detailed ones "
        f"{res['iou_detailed']:.3f} (scene F1 {res['f1_short']:.3f} / {res['f1_detailed']:.3f}); objects move "
        f"{fmt_p(res['centre_slope'])} px per px of their caption's x, and the flow loss at t = {LOSS_T} is "
        f"{100 * res['centre_loss_gap']:+.1f}% with the x moved; own captions' chunks "
        f"with a centre: {fmt_p(res['detail_share_t1'])} at T = 1, {fmt_p(res['detail_share_greedy'])} greedy; greedy = the "
        f"short caption {res['greedy_short_exact']:.3f}")
    return res


NUDGE = 5       # px: detail_eval moves every written x centre by -NUDGE and +NUDGE
LOSS_T = 0.8    # the noise level of detail_eval's loss gap: where the layout is still being decided


def short_form(caption):
    """A caption with each chunk's centre ("... at the top 31 9") dropped: the short form its detailed form
    adds to, so a detailed caption is exactly right when its short form is (the centres are scored apart)."""
    return " , ".join(" ".join(world.split_centre(c.split())[0]) for c in caption.rstrip(" .").split(" , ")) + " ."


def detail_share(caption):
    """The share of a caption's parsed chunks in the detailed form (with a centre); 0 when none parses."""
    objs = world.parse_caption(caption) or []
    return sum(o["centre"] is not None for o in objs) / len(objs) if objs else 0.0


def nudge_x(caption, dx):
    """A detailed caption with every object's x centre moved by dx px (kept inside the image) and its cell
    words kept: a decoder that reads the numbers moves its objects with them, one that does not draws the same."""
    chunks = []
    for c in caption.rstrip(" .").split(" , "):
        t, centre = world.split_centre(c.split())
        if centre is not None:
            t = t + [str(min(max(centre[0] + dx, 0), world.W - 1)), str(centre[1])]
        chunks.append(" ".join(t))
    return " , ".join(chunks) + " ."


def centre_slope(a, b, dx):
    """How far the objects in images b sit from the same objects in images a, in x, per px of dx (the
    captions' difference): per object found exactly once by (shape, colour) in both images of a pair, the
    mean of (x_b - x_a) / dx; 1 follows the caption, 0 ignores it. None if no object is found in both."""
    def centres(img):
        objs = world.detect(img)
        keys = [(o["shape"], o["color"]) for o in objs]
        return {k: (o["box"][0] + o["box"][2]) / 2 for k, o in zip(keys, objs) if keys.count(k) == 1}
    moved = []
    for x, y in zip(a, b):
        ca, cb = centres(x), centres(y)
        moved += [(cb[k] - ca[k]) / dx for k in ca if k in cb]
    return float(np.mean(moved)) if moved else None


@torch.no_grad()
def edit_eval(model, ae, n, s, device, seed=DETAIL_SEED, batch=64, log=print):
    """Does image2 edit image1 in place? n fresh prompts per image tag, each rendered (image1 = image2's
    target) and drawn by IRG's image2 sampler (s: irg_generate's settings) under a given reflection
    (model.second_given): kept, a right image1 with think2 "the image is correct . redraw : <its plan>"
    (the share of its pixels image2 changes); flawed, image1 = the render with one constraint broken in
    place (world.edit_flaw) and think2 the verifier's reflection naming what and where (is image2 right,
    and right with the rest kept: < 1% of the pixels outside the flaw changed, outside_flaw), split by the
    flaw's kind (flaw_kind); against a fresh first image of the same prompt (model.draw_first, IRG's sampler)."""
    model.eval()
    rng, g = np.random.default_rng(seed + 1), torch.Generator(device).manual_seed(seed + 1)
    enc, end = world.encode, [M.END_THINK, M.VS]
    jobs = []                                   # (spec, think1, image1, think2, target, edited box or None)
    for tag in world.IMAGE_TAGS:
        for _ in range(n):
            spec = world.sample_spec(tag, rng, holdout="train")
            img, scene = world.render(spec, rng, holdout="train")
            t1 = enc(world.plan_text(scene)) + end
            jobs.append((spec, t1, img, enc(world.reflection_text(spec, world.verify(spec, img), scene, detail=True)) + end, img, None, None))
            e = world.edit_flaw(spec, scene, rng)
            if e is not None:
                jobs.append((spec, t1, e[0], enc(world.reflection_text(spec, e[0], scene, where=e[2]["box"], detail=True)) + end, img,
                             e[2], flaw_kind(scene, e[1])))
    out2, fresh = [], []
    for i in range(0, len(jobs), batch):
        c = jobs[i:i + batch]
        prompts = [enc(j[0]["prompt"]) for j in c]
        out2 += list(M.second_given(model, ae, prompts, [j[1] for j in c], np.stack([j[2] for j in c]), [j[3] for j in c], s,
                                    world.PALETTE, g))
        fresh += list(M.draw_first(model, ae, prompts, s, world.PALETTE, g)[4].cpu().numpy())
    changed, fixed, rest, fresh_ok, kept, kinds = [], [], [], [], [], []
    for (spec, _, img1, _, target, edited, kind), im2, fr in zip(jobs, out2, fresh):
        if edited is None:
            changed.append(float((im2 != img1).any(-1).mean()))
            kept.append(world.verify(spec, im2)["correct"])
        else:
            fixed.append(world.verify(spec, im2)["correct"])
            rest.append(outside_flaw(im2, img1, target, edited) < 0.01)
            fresh_ok.append(world.verify(spec, fr)["correct"])
            kinds.append(kind)
    fixed, rest, kinds = np.array(fixed, bool), np.array(rest, bool), np.array(kinds)
    by_kind = {k: dict(n=int((kinds == k).sum()), fixed=float(fixed[kinds == k].mean()),
                       fixed_rest_kept=float((fixed & rest)[kinds == k].mean())) for k in sorted(set(kinds))}
    res = dict(n_kept=len(changed), kept_changed=float(np.mean(changed)), kept_under_1pct=float(np.mean(np.array(changed) < 0.01)),
               kept_right=float(np.mean(kept)), n_flawed=int(fixed.size), fixed=float(fixed.mean()),
               fixed_rest_kept=float((fixed & rest).mean()), rest_kept=float(rest.mean()), fresh_right=float(np.mean(fresh_ok)),
               by_kind=by_kind)
    log(f"edits: a right image1 told it is correct: image2 changes {res['kept_changed']:.4f} of its pixels (under 1% for "
        f"{res['kept_under_1pct']:.3f}, right {res['kept_right']:.3f}; n {res['n_kept']}); a one-flaw image1 told what and "
        f"where: image2 right {res['fixed']:.3f}, right with the rest kept {res['fixed_rest_kept']:.3f}; a fresh draw right "
        f"{res['fresh_right']:.3f} (n {res['n_flawed']}); by kind, right / right with the rest kept: "
        + ", ".join(f"{k} {v['fixed']:.2f} / {v['fixed_rest_kept']:.2f} (n {v['n']})" for k, v in by_kind.items()))
    return res


def flaw_kind(scene, bad_scene):
    """Which edit world.edit_flaw made: an object removed, two objects' colours swapped, or one object's
    colour or shape changed."""
    if len(bad_scene) != len(scene):
        return "missing object"
    diff = [(a, b) for a, b in zip(scene, bad_scene) if a != b]
    if len(diff) > 1:
        return "swapped colors"
    return "wrong color" if diff[0][0]["color"] != diff[0][1]["color"] else "shape swap"


def outside_flaw(im2, img1, target, edited, own_box=True):
    """The share of image2's pixels that differ from image1 outside the flaw: outside the edited object's
    box (edited: the object as the target has it) and every pixel where image1 and the target differ (both
    objects of a colour swap), each grown by one pixel. own_box: the flaw also covers the box of the object
    image2 draws for it (world.detect's nearest one of its colour and shape): the edit may place the object
    it adds or redraws a few pixels off the target's box (the decoder's placement, not a change to the
    rest). What image1 had right and image2 should keep, to the pixel."""
    flaw, box = (img1 != target).any(-1), edited["box"]
    boxes = [box]
    if own_box:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        same = [o["box"] for o in world.detect(im2) if o["color"] == edited["color"] and o["shape"] == edited["shape"]]
        if same:
            boxes.append(min(same, key=lambda b: ((b[0] + b[2]) / 2 - cx) ** 2 + ((b[1] + b[3]) / 2 - cy) ** 2))
    for b in boxes:
        x0, y0, x1, y1 = (int(v) for v in b)
        flaw[y0:y1, x0:x1] = True
    pad, (h, w) = np.pad(flaw, 1), flaw.shape       # one pixel of margin: the decoder's edge may move by one
    grown = np.any([pad[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
    return float(((im2 != img1).any(-1) & ~grown).mean())


# ----------------------------------------------------------------------------- self-judgment

def auroc(scores, labels):
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative (ties count one half), by ranks (Mann-Whitney). None when one class is empty."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels, bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if not n1 or not n0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for v in np.unique(s):                       # ties share their mean rank
        m = s == v
        ranks[m] = ranks[m].mean()
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


@torch.no_grad()
def self_judgment(model, ae, n, a, device, seed=4321, drawer=None):
    """How well the model's own understanding separates its correct from its wrong generations
    (SRUM's premise). A fresh prompt set (n per tag, drawn with another
    seed than data/eval.jsonl), one think-mode image each with evaluate.py's sampler, labelled by
    the exact verifier; then the AUROC of the self VQAScore (P(yes)) and of the self-judge's lowest
    score (global or region, rewards.SelfJudge) against those labels, and how often the judge's scores
    equal the rubric's (world.judge_scores) on the same images and boxes. drawer (model, ae), --auroc_drawer:
    the images are another checkpoint's, so two judges can be compared on one image set (an AUROC on own
    images moves with how hard the drawer's wrong images are to see, not only with the judge)."""
    import rewards as R
    rng = np.random.default_rng(seed)
    specs = [world.sample_spec(t, rng, holdout="any") for t in world.TAGS for _ in range(n)]
    dm, dae = drawer or (model, ae)
    correct, _, imgs, _ = gen_scores(dm, dae, specs, "think", dict(a, k=1), device)
    vqa = R.SelfVQA(model, ae, device)(specs, imgs)
    g, regions = R.SelfJudge(model, ae, device).judge(specs, imgs)
    # the rubric's own scores on the same images and boxes (world.judge_scores, SRUM tables 7-8)
    ideal = [world.judge_scores(s, im) for s, im in zip(specs, imgs)]
    g_i = np.array([x for x, _ in ideal], np.float32)
    s_j = np.array([x for r in regions for _, x in r], np.float32)
    s_i = np.array([x for _, r in ideal for _, x in r], np.float32)     # the same boxes: detect, largest 5
    grid = lambda x: np.array([float(world.format_score(v)) for v in x])  # noqa: E731
    # the worst a judge says of an image: its global score or its lowest region score
    lowest = lambda gs, regs: [min([x] + [v for _, v in r]) for x, r in zip(gs, regs)]  # noqa: E731
    res = dict(n=len(specs), correct_rate=float(np.mean(correct)), mean_p_yes=float(np.mean(vqa)), auroc_vqa=auroc(vqa, correct),
               auroc_judge=auroc(lowest(g, regions), correct),
               auroc_rubric=auroc(lowest(g_i, [r for _, r in ideal]), correct),   # the rubric's own ceiling
               global_agree=float(np.mean(grid(g) == g_i)),
               region_agree=float(np.mean(grid(s_j) == s_i)) if len(s_j) == len(s_i) and len(s_j) else None)
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"self-judgment on {len(specs)} fresh think-mode images{' of --auroc_drawer' if drawer else ''} ({res['correct_rate']:.3f} correct): "
          f"AUROC self VQAScore {fmt(res['auroc_vqa'])}, self-judge (lowest of global and region scores) "
          f"{fmt(res['auroc_judge'])} (the rubric's own scores: {fmt(res['auroc_rubric'])}); the judge's scores "
          f"on the rubric's grid equal the rubric's: global {fmt(res['global_agree'])}, regions {fmt(res['region_agree'])}")
    return res


def main(argv=None):
    a = parse_args(defaults, argv, __doc__, ranges=ranges)
    for m in a["modes"].split(","):
        if m not in ("think", "forced", "irg", ""):
            raise ValueError(f"--modes {a['modes']!r}: a comma list of think, forced, irg")
    # a method's run folder holds its own after-eval as summary.json: never replaced from here
    claim_run_dir(a["out"], False, False, "evaluate.py", fix="its summary.json is the run's own: pass another --out "
                  f"(e.g. {os.path.join(a['out'], 'eval')})")
    if a["auroc_drawer"]:                    # checked before the eval, not after it
        if not a["auroc"]:
            raise ValueError(f"--auroc_drawer {a['auroc_drawer']} draws the images of --auroc N: pass --auroc too (e.g. --auroc 40)")
        M.check_checkpoint(a["auroc_drawer"], "--auroc_drawer")
    if a["unified"]:                         # the bench's encoders, checked before the eval, not after it
        M.check_checkpoint(a["encoder"], "--encoder")
        if a["clip"]:
            check_model_dir(a["clip"], "--clip", "CLIP")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    specs = world.pick(world.load_specs(a["eval"]), a["n"])
    model, ae, meta = M.load_weights(a["ckpt"], device)
    if model is None:
        raise ValueError(f"{a['ckpt']}.json is an autoencoder-only checkpoint; pass a UMM checkpoint with --ckpt")
    os.makedirs(a["out"], exist_ok=True)
    print(f"evaluating {a['ckpt']} (step {meta.get('step')}) on {len(specs)} prompts x {a['k']} images")
    if "irg" in a["modes"].split(","):       # the IRG sampler's own settings (not --temperature etc.)
        evaluate_irg(model, ae, specs, dict(a, **irg_defaults, max_think=a["irg_max_think"], cfg_text2=a["irg_cfg_text2"],
                                            cfg_img=a["irg_cfg_img"], best2=a["irg_best2"]), device, os.path.join(a["out"], "irg"))
    summary = evaluate(model, ae, specs, dict(a, modes=a["modes"].replace("irg", "")), device, a["out"])
    if a["unified"]:
        import rewards as R
        base, base_ae, _ = M.load_weights(a["encoder"], device, flag="--encoder")   # f: the BASE's tower, whatever is evaluated
        enc = dict(und=R.UndCosine(base, base_ae, device))
        if a["clip"]:
            enc["clip"] = R.CLIPCosine(a["clip"], device)
        summary["unified"] = unified_bench(model, ae, a["unified"], enc, device, steps=a["unified_steps"], cfg=a["cfg"],
                                           shift=a["shift"], seed=a["seed"], out_dir=a["out"])
    if a["auroc"]:
        drawer = M.load_weights(a["auroc_drawer"], device, flag="--auroc_drawer")[:2] if a["auroc_drawer"] else None
        summary["self_judgment"] = self_judgment(model, ae, a["auroc"], a, device, drawer=drawer)
    if a["captions"]:
        summary["captions"] = caption_eval(model, ae, a["captions"], device)
    if a["detail"]:
        summary["detail"] = detail_eval(model, ae, a["detail"], device)
    if a["edits"]:
        summary["edits"] = edit_eval(model, ae, a["edits"], dict(a, **irg_defaults, max_think=a["irg_max_think"],
                                                                 cfg_text2=a["irg_cfg_text2"], cfg_img=a["irg_cfg_img"]), device)
    if a["unified"] or a["auroc"] or a["captions"] or a["detail"] or a["edits"]:
        with open(os.path.join(a["out"], "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
