"""
IRG: interleaving reasoning generation (paper 003), one file, one loop. The model thinks, draws,
reflects on its own drawing, and draws again:

  <bos> prompt <think> think1 </think> <|vision_start|> [image1] <|vision_end|>
        <think> think2 </think> <|vision_start|> [image2]

  python irg.py                                   # IRGL stage 1 + stage 2 from data/base -> runs/irg (~20 min, 2 CPU cores)
  python irg.py --out runs/irg/s1 --seed 1        # another seed
  python irg.py --out runs/irg/s0 --resume        # continue a killed run (same weights as uninterrupted)
  python irg.py --report runs/irg                 # median and spread over the seeds' runs -> runs/irg/report.md
  python evaluate.py --modes irg --ckpt runs/irg/s0/ckpt      # IRG inference alone on the eval set

Inference (irg_generate; the upstream IRG eval script's settings, design.md section 4):
  1. think1   sampled at T 0.3 over the KV cache until the model itself emits <|vision_start|>
  2. image1   Euler sampler, text CFG 4 on t in [0.4, 1], shift 3; the text-uncond context is the
              "system prompt only": here <bos> <|vision_start|>, the unconditional context pre-training taught
  3. re-entry image1 is decoded to pixels, re-encoded by the frozen AE (upstream: VAE, and the ViT,
              which this model does not have) and appended to the cache as a clean split (und expert)
  4. think2   <|vision_end|> <think> ... sampled: what is wrong and the layout to redraw
  5. image2   three velocity fields per Euler step, each over its own cached context:
                cond        <bos> P <think> T1 </think> <vs> [image1] <ve> <think> T2 </think> <vs>
                text-uncond <bos> P <think> T1 </think> <vs> [image1] <ve> <vs>       (think2 dropped)
                img-uncond  <bos> P <think> T1 </think> <think> T2 </think> <vs>      (image1 dropped)
              combined as BAGEL does (cfg_combine), text CFG 4 and image CFG 2 on t in [0, 1] (upstream's;
              --cfg_text2 sets image2's text CFG apart from image1's. Measured on v3 (RESULTS.md, "IRG on
              v3, session 8"): --cfg_text2 2 --cfg_img 1 draws image2 better than upstream's 4 / 2, with the
              model's own reflection and with the verifier's (evaluate.py --irg_oracle))
  Only image2's noisy tokens run at each step; they never enter a cache.
  --keep (an inference option; off = upstream, which always redraws): where think2 begins "the image
  is correct", image2 is image1, as IRGL's keep records teach: a right image is not put at risk.
  --keep_p TAU: the same, decided by the critic's probability P(think2 begins "the image is correct")
  (model.critic_p) >= TAU instead of by the sampled think2. Every eval reports that probability's AUROC
  against the verifier (critic_auroc): how well the reflection judges image1.
  --select (an option of ours, not upstream's): the critic rereads the redrawn image2 in image1's place
  (model.critic_reread) and image2 is whichever of the two images it scores higher, so a redraw that
  broke a right image can be taken back. Without it, every eval reports what it would give (select).
  --fresh2 (an ablation of ours): image2 is drawn as image1 was, from P and the plan think2 writes after
  "redraw :" (model.redraw_plan), with image1 and the problem out of its context.

IRGL (training). Data from the world, on training prompts only (world.candidates never draws an eval
prompt). --tags image (default): knowledge and counts 5-6 are left out as in pre-training, where their
images test transfer; --tags all: every tag, as RWR's mined prompts (a knowledge record's think1 is the
plan that names the noun's colour and shape, its image a render); --hold_nouns: with --tags all, half the
knowledge nouns (HELD_NOUNS) stay out, so the eval tells trained nouns from nouns known only as text:
  initial records    (P, think1 = world.plan_text(scene), image = a render of that scene)
  improving records  (P, think1, image1, think2, image2) from two sources:
     self    image1 the model itself drew (steps 1-2 above, on the base), judged by the exact verifier;
             right: think2 = "the image is correct . redraw : <its own layout>", image2 = image1 (keep);
             wrong: think2 = world.reflection_text (what is wrong . redraw : <target layout>),
                    image2 = the render of the prompt nearest to image1 in pixels among --near renders
                    (fixes the flaw, keeps what it can of the rest); --fix_from self (ours): where another
                    of the model's --N draws of the prompt passed the verifier, image2 is that draw and
                    think2 redraws its layout, so image2's targets are images the drawer itself makes
     flaw    image1 = world.negative (a render that breaks exactly one constraint), think1 = the
             plan of image2, image2 = the render nearest to image1 among --near, think2 = its reflection;
             --flaw_plan drawn (ours; flaw and edit records): think1 = the plan image1 was drawn from,
             with no loss, as at inference, where a wrong plan is drawn faithfully (first_plan)
     edit    image2 = a render, image1 = the same scene with one constraint broken in place (edit_flaw:
             wrong colour, shape swap, swapped colours, missing object), think2 = its reflection: the
             pair differs in that one thing only, which is what "fix it, keep the rest" means
             (world.negative re-lays the whole scene out, so its nearest render still moves things)
The six learning modes (upstream SFT/data/configs/train_toy_dataset_stage{1,2}.yaml; losses as in
upstream's MultiThinkInterleaveT2IDataset: a part carries a loss or is context). Sequences, then
what carries a loss (CE = text cross-entropy, MSE = flow-matching velocity loss):

  | mode                       | record    | sequence                                         | CE on          | MSE on | stage-1 weight | stage 2 |
  |----------------------------|-----------|--------------------------------------------------|----------------|--------|----------------|---------|
  | initial_full               | initial   | P <think> T1 </think> <vs> [img noise]           | T1             | image  | 1.0            | 1.0     |
  | initial_thinking_gen       | initial   | same                                             | -              | image  | 0.5            | -       |
  | initial_thinking_und       | initial   | P <think> T1 </think> <vs>                       | T1             | -      | 0.5            | -       |
  | improving_full             | improving | P <think> T1 </think> <vs> [img1 clean] <ve>     | T2 (+ T1 if    | image2 | 1.0            | 1.0     |
  |                            |           |   <think> T2 </think> <vs> [img2 noise]          | world's plan)  |        |                |         |
  | improving_thinking_gen     | improving | same                                             | -              | image2 | 0.5            | -       |
  | improving_thinking_und     | improving | P <think> T1 </think> <vs> [img1 clean] <ve>     | T2             | -      | 0.5            | -       |
  |                            |           |   <think> T2 </think> <vs>                       |                |        |                |         |

  "T1" / "T2" include their closing </think> <|vision_start|> (the model must learn to switch).
  image1 is never a generation target in the improving modes (it is often wrong on purpose); it
  enters clean, as at inference. T1 of a self record is the model's own sample: context only.
  CFG dropout (image-loss samples, --cfg_drop each, independently, as BAGEL drops text and image
  conditions): initial -> <bos> <vs> [noise]; improving -> think2 dropped (the text-uncond context
  above) and/or image1 dropped (the img-uncond context), so inference's contexts are trained ones.
  Stage 1 samples the six modes with the weights above; stage 2 only the two full modes.
  Flow matching: x_t = (1 - t) x0 + t eps, t = shift(sigmoid(randn)) with shift --t_shift, target
  v = eps - x0. Upstream trains at shift 4.0; the default here is 1.0, the base's pre-training shift:
  at 4.0 (median t 0.8) image2 kept the layout of a right image1 but changed 6% of its pixels and
  broke half of the right images it was told to keep (RESULTS.md, "IRG"): copying is low-t detail.
  Losses: mean CE over the batch's CE tokens + mean MSE over its noise tokens (image_loss; --img2_w
  weighs image2's MSE apart from image1's, 1 = upstream).
  AdamW (0.9, 0.95), constant LR after a short warmup, grad clip 1, one optimiser through both stages.
  --params und (default all): the generation path (gen experts, latent projections, time embedder) stays
  the base's (runs.set_trainable, as unified_grpo.py's): IRGL then moves only what reads and writes text
  and the context the drawer reads.
  --anchor LAMBDA (0 = off; ours): + LAMBDA * || v_theta - v_base ||^2 at image2's noise tokens, v_base
  from a frozen copy of the base on the same input: the drawer as the base drew it, whatever the text
  losses move in the context it reads.
  --ema DECAY (0 = off): the evals and the checkpoint read an exponential moving average of the weights
  (runs.ema_step), which averages the noise of IRGL's small batches (RESULTS.md, "IRG on v2, session 7":
  on seed 0 at lr 1e-4 it cut what IRGL costs image1 from 0.08 to 0.05, not to zero).

The run folder: config.json, metrics.jsonl, irgl.rank0.pt (the data and the base's evals, for
--resume), before/ (the base, single pass, think mode: evaluate.py), base_irg/, stage1_irg/ and
stage2_irg/ (IRG inference on the eval set: accuracy of image1 and image2 per tag, fix and break
rates, grid prompt | think1 | image1 | think2 | image2), data.png (IRGL samples), ckpt.*, summary.json/md.
"""
import copy
import json
import os
import time

import numpy as np
import torch

import world
import model as M
import runs
import evaluate
from common import setup_dist, teardown_dist, ddp, all_sum, update, atomic_torch_save, atomic_write, parse_args, Progress

defaults = dict(
    ckpt="data/base", out="runs/irg", seed=0, resume=False, overwrite=False, report="",
    # IRGL data: prompts per tag (training prompts only), self-drawn image1s per prompt, flaws per prompt,
    # initial renders per prompt, candidate renders for "nearest to image1"
    n_prompts=24, N=1, n_flaw=1, n_edit=1, n_init=2, near=8, tags="image", hold_nouns=False, fix_from="render",
    flaw_plan="target",   # think1 of flaw / edit records: the fix's plan, or "drawn": image1's own (first_plan)
    # inference (upstream IRG eval script)
    temperature=0.3, max_think=80, sample_steps=25, cfg_text=4.0, cfg_text2=4.0, cfg_img=2.0, cfg_lo1=0.4, cfg_lo2=0.0, shift=3.0,
    keep=False,         # a think2 of "the image is correct ..." keeps image1 as image2 (off: always redraw, upstream)
    keep_p=0.0,         # > 0: keep image1 where P(think2 begins "the image is correct") >= keep_p (model.critic_p)
    select=False,       # image2 = the image (image1 or the redraw) the critic scores higher (model.critic_reread)
    fresh2=False,       # ablation: image2 drawn from P + think2's redraw plan alone, image1 out of its context
    gen_batch=60,
    # IRGL
    stage1_steps=300, stage2_steps=100, batch=16, lr=1e-4, warmup=10, clip=1.0, t_shift=1.0, cfg_drop=0.1, img2_w=1.0,
    ckpt_every=25, ema=0.0, params="all",
    anchor=0.0,         # > 0: image2's velocity held to the frozen base's on the same input (ours: keeps the drawer)
    # evaluation on the held-out eval set: eval_n prompts per tag, eval_k images each
    eval_n=10, eval_k=1, dtype="fp32",
)
choices = dict(dtype=("fp32", "bf16"), tags=("image", "all"), params=("all", "und"), fix_from=("render", "self"),
               flaw_plan=("target", "drawn"))
ranges = dict(n_prompts=">= 1", N=">= 0", n_flaw=">= 0", n_edit=">= 0", n_init=">= 1", near=">= 1", temperature=">= 0",
              max_think=">= 1", sample_steps=">= 1", cfg_text=">= 0", cfg_text2=">= 0", cfg_img=">= 0", cfg_lo1="0..1", cfg_lo2="0..1", shift="> 0", keep_p="0..1",
              gen_batch=">= 1", stage1_steps=">= 0", stage2_steps=">= 0", batch=">= 1", lr="> 0", warmup=">= 0",
              clip="> 0", t_shift="> 0", cfg_drop="0..1", img2_w=">= 0", ckpt_every=">= 1", eval_n=">= 1", eval_k=">= 1", ema="0..1", anchor=">= 0")
MODES = ("initial_full", "initial_thinking_gen", "initial_thinking_und",
         "improving_full", "improving_thinking_gen", "improving_thinking_und")
STAGE_WEIGHTS = {1: dict(initial_full=1.0, improving_full=1.0, initial_thinking_gen=0.5, improving_thinking_gen=0.5,
                         initial_thinking_und=0.5, improving_thinking_und=0.5),
                 2: dict(initial_full=1.0, improving_full=1.0)}
# settings that make the IRGL data and the base's evals: a --resume must match them (runs.saved_rollouts)
MADE_WITH = ("ckpt", "seed", "n_prompts", "tags", "hold_nouns", "fix_from", "flaw_plan", "N", "n_flaw", "n_edit", "n_init", "near", "temperature", "max_think", "sample_steps",
             "cfg_text", "cfg_text2", "cfg_img", "cfg_lo1", "cfg_lo2", "shift", "keep", "keep_p", "select", "fresh2", "eval_n", "eval_k")
IMAGE_TAGS = [t for t in world.TAGS if t not in ("knowledge", "counting_hard")]   # pre-training's image tags


# ----------------------------------------------------------------------------- inference
# The interleaved inference (steps 1-5 above) lives in model.py's unified generation, beside
# model.generate, because evaluate.py runs it too: M.irg_generate, M.draw_first, M.cfg_combine,
# M.img_uncond_ids (named here as well, for the tests and for readers of this file).
from model import cfg_combine, draw_first, img_uncond_ids, irg_generate  # noqa: E402,F401  (re-exported)


def sampler(a):
    s = {k: a[k] for k in ("temperature", "max_think", "sample_steps", "cfg_text", "cfg_text2", "cfg_img", "cfg_lo1", "cfg_lo2", "shift")}
    ok = world.encode(world.PROBLEMS["ok"])
    return dict(s, keep_ids=ok if a["keep"] else None, ok_ids=ok, keep_p=a["keep_p"], select=a["select"],
                fresh2=world.encode(world.REDRAW) if a["fresh2"] else None)


# ----------------------------------------------------------------------------- IRGL data

def nearest_render(spec, img, rng, n):
    """Of n renders of spec (training compositions), the one nearest to img in pixels: the fix that
    keeps what it can of the rest (positions, colours and sizes of what was right)."""
    best = None
    for _ in range(n):
        r, scene = world.render(spec, rng, holdout="train")
        d = np.abs(r.astype(np.int16) - np.asarray(img, np.int16)).sum()
        if best is None or d < best[0]:
            best = (d, r, scene)
    return best[1], best[2]


def edit_flaw(spec, scene, rng):
    """A one-constraint flaw made by editing the target scene itself (the kinds of world.negative
    that leave the layout in place: wrong colour, shape swap, swapped colours, missing object), so
    that image1 and image2 differ in that one thing only: the "keep what is right" of IRG, exactly.
    Returns (the flawed image, its scene), or None when no edit gives a flaw the verifier sees."""
    boxed = ("square", "circle", "triangle", "cross")            # the shapes that fill the same square box
    for _ in range(20):
        bad = [dict(o) for o in scene]
        k = int(rng.integers(len(bad)))
        o = bad[k]
        kind = ["wrong color", "shape swap", "swapped colors", "missing object"][int(rng.integers(4))]
        if kind == "wrong color":
            o["color"] = world._pick(rng, [c for c in world._colors_for(o["shape"], "train") if c != o["color"]]
                                     if o["shape"] != "number" else [c for c in world.COLORS if c != o["color"]])
        elif kind == "shape swap" and o["shape"] in boxed:
            o["shape"] = world._pick(rng, [x for x in boxed if x != o["shape"] and o["color"] in world._colors_for(x, "train")])
        elif kind == "swapped colors" and len(bad) > 1:
            j = int(rng.integers(len(bad)))
            o["color"], bad[j]["color"] = bad[j]["color"], o["color"]
        elif kind == "missing object":
            del bad[k]
        else:
            continue
        if world._has_held_triple(bad) or any(b["shape"] != "number" and b["color"] not in world._colors_for(b["shape"], "train")
                                              for b in bad):
            continue
        img = world.draw(bad)
        if not world.verify(spec, img)["correct"]:
            return img, bad
    return None


def train_specs(a):
    """Training prompts: world.candidates (never an eval prompt), no held-out composition (those are
    for the eval, as in pre-training). --tags image: pre-training's image tags only; --tags all: also
    knowledge and counting_hard, the tags whose images pre-training never drew (RWR's mined prompts
    reach them too)."""
    pool = world.candidates(a["n_prompts"], np.random.default_rng(20_000 + a["seed"]))
    tags = IMAGE_TAGS if a["tags"] == "image" else world.TAGS
    held = HELD_NOUNS if a["hold_nouns"] else ()
    return [s for s in pool if s["tag"] in tags and not world.uses_heldout(s) and s["prompt"].split()[-1] not in held]


# --hold_nouns: knowledge nouns IRGL never trains on (every second one), so that the eval's knowledge
# prompts split into nouns trained on and nouns whose look only pre-training's text facts give
HELD_NOUNS = tuple(sorted(world.ALIASES)[1::2])


def build_irgl(model, ae, specs, a, device, log):
    """The records the six modes read (see the docstring). Deterministic given a["seed"]."""
    rng = np.random.default_rng(30_000 + a["seed"])
    enc = world.encode
    end = [M.END_THINK, M.VS]
    initial, improving = [], []
    for s in specs:
        for _ in range(a["n_init"]):
            img, scene = world.render(s, rng, holdout="train")
            initial.append(dict(spec=s, t1=enc(world.plan_text(scene)) + end, img=img))
        for _ in range(a["n_flaw"]):
            bad, kind, bad_scene = world.negative(s, rng, holdout="train")
            v = world.verify(s, bad)
            if v["correct"]:                        # a negative the verifier cannot tell: not a flaw to name
                continue
            fix, scene = nearest_render(s, bad, rng, a["near"])
            improving.append(dict(spec=s, **first_plan(scene, bad_scene, a), img1=bad,
                                  t2=enc(world.reflection_text(s, v, scene)) + end, img2=fix, source="flaw",
                                  right1=False))
        for _ in range(a["n_edit"]):
            fix, scene = world.render(s, rng, holdout="train")
            edit = edit_flaw(s, scene, rng)
            if edit is not None:
                improving.append(dict(spec=s, **first_plan(scene, edit[1], a), img1=edit[0],
                                      t2=enc(world.reflection_text(s, edit[0], scene)) + end, img2=fix, source="edit",
                                      right1=False))
    # self: image1 drawn by the model itself (IRG's steps 1-2), judged by the verifier
    jobs = [s for s in specs for _ in range(a["N"])]
    gen = torch.Generator(device).manual_seed(1000 + a["seed"])
    prog = Progress("self-drawn image1", len(jobs), log=print)
    drawn = []                                      # (spec, think1, switched, image1, verdict), N per prompt in a row
    for i in range(0, len(jobs), a["gen_batch"]):
        chunk = jobs[i:i + a["gen_batch"]]
        _, t1, sw1, _, img1, _ = draw_first(model, ae, [enc(s["prompt"]) for s in chunk], sampler(a), world.PALETTE, gen)
        drawn += [(s, t, sw, im, world.verify(s, im)) for s, t, sw, im in zip(chunk, t1, sw1.tolist(), img1.cpu().numpy())]
        prog(min(i + a["gen_batch"], len(jobs)))
    for i, (s, t, sw, im, v) in enumerate(drawn):
        # --fix_from self: the fix is another of the model's own draws of this prompt that the verifier passed
        right = [d for d in drawn[i - i % a["N"]:i - i % a["N"] + a["N"]] if d[4]["correct"]] if a["fix_from"] == "self" else []
        if v["correct"]:                            # keep: think2 says so, image2 is image1
            t2, im2 = world.reflection_text(s, v, v["objects"]), im
        elif right:                                 # fix: what is wrong, the layout the model drew right, that image
            d = right[int(rng.integers(len(right)))]
            t2, im2 = world.reflection_text(s, v, d[4]["objects"]), d[3]
        else:                                       # fix: what is wrong, the layout of the nearest render
            im2, scene = nearest_render(s, im, rng, a["near"])
            t2 = world.reflection_text(s, v, scene)
        improving.append(dict(spec=s, t1=list(t) + ([] if sw else [M.VS]), t1_loss=False, img1=im,
                              t2=enc(t2) + end, img2=im2, source="self", right1=bool(v["correct"]),
                              fix_self=bool(right) and not v["correct"]))
    return initial, improving


def first_plan(target, drawn, a):
    """Think1 of a flaw / edit record. --flaw_plan target (the default): the plan of the fix, trained (a
    right plan, badly drawn). --flaw_plan drawn (ours): the plan image1 was drawn from, context only (a
    wrong plan is not taught). The model draws its plan faithfully: on v4 not one image1 of a wrong plan
    was right (RESULTS.md, "IRG on v4, session 11"), so at inference a wrong image1 of a wrong plan is what
    the reflection must re-plan, and with target think1 it never sees one."""
    if a["flaw_plan"] == "drawn" and drawn:         # an empty negative (its only object missing) has no plan to show
        return dict(t1=world.encode(world.plan_text(drawn)) + [M.END_THINK, M.VS], t1_loss=False)
    return dict(t1=world.encode(world.plan_text(target)) + [M.END_THINK, M.VS], t1_loss=True)


def pick_modes(stage, n, rng):
    """The learning modes of n samples: stage 1 draws all six with the upstream weights, stage 2 the full ones only."""
    w = STAGE_WEIGHTS[stage]
    return rng.choice(list(w), n, p=np.array(list(w.values())) / sum(w.values()))


def mode_sample(mode, rec, z, rng, a):
    """One training sample (segments for model.pack) of `mode` from record `rec`; z: its encoded
    images (x_t, eps, t and x0 of the image that carries the MSE are filled by the caller: the
    noise segment is a placeholder ("noise", None, None)). Returns (segments, has_image_loss)."""
    P = [M.BOS] + world.encode(rec["spec"]["prompt"]) + [M.THINK]
    if mode.startswith("initial"):
        ce1 = 1.0 if mode in ("initial_full", "initial_thinking_und") else 0.0
        if mode == "initial_thinking_und":
            return [("text", P, 0), ("text", rec["t1"], ce1)], False
        if rng.random() < a["cfg_drop"]:            # CFG dropout: <bos> <vs> [noise], as pre-training
            return [("text", [M.BOS, M.VS], 0), ("noise", None, None)], True
        return [("text", P, 0), ("text", rec["t1"], ce1), ("noise", None, None)], True
    ce2 = 1.0 if mode in ("improving_full", "improving_thinking_und") else 0.0
    ce1 = 1.0 if mode == "improving_full" and rec["t1_loss"] else 0.0
    head = [("text", P, 0), ("text", rec["t1"], ce1)]
    if mode == "improving_thinking_und":
        return head + [("clean", z["img1"]), ("text", [M.VE, M.THINK], 0), ("text", rec["t2"], ce2)], False
    drop_text, drop_img = rng.random() < a["cfg_drop"], rng.random() < a["cfg_drop"]
    t1 = rec["t1"][:-1] if rec["t1"][-1] == M.VS else rec["t1"]
    if drop_img and drop_text:                      # both dropped: the initial context
        segs = head
    elif drop_img:                                  # img-uncond: all the text, no image1
        segs = [("text", P, 0), ("text", t1, ce1), ("text", [M.THINK], 0), ("text", rec["t2"], ce2)]
    elif drop_text:                                 # text-uncond: through image1, think2 dropped
        segs = head + [("clean", z["img1"]), ("text", [M.VE, M.VS], 0)]
    else:
        segs = head + [("clean", z["img1"]), ("text", [M.VE, M.THINK], 0), ("text", rec["t2"], ce2)]
    return segs + [("noise", None, None)], True


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    a = parse_args(defaults, argv, __doc__, choices, ranges)
    if a["report"]:
        return report(a["report"])
    rank, world_size, local, device = setup_dist(cpu_threads=1)     # one thread per process (common.setup_dist)
    if a["batch"] % world_size:
        raise ValueError(f"--batch {a['batch']} must be divisible by the number of processes ({world_size})")
    if a["stage1_steps"] + a["stage2_steps"] == 0:
        raise ValueError("--stage1_steps 0 and --stage2_steps 0: nothing to train; give one of them steps")
    specs = train_specs(a)
    torch.manual_seed(a["seed"] + rank)
    model, ae, meta = runs.load_umm(a["ckpt"], device)
    log = runs.open_run(a, rank, "irg.py")
    data_file = os.path.join(a["out"], f"irgl.rank{rank}.pt")
    saved = runs.saved_rollouts(data_file, a, MADE_WITH, "irg.py", added=dict(flaw_plan="target")) if a["resume"] else None

    # ---- before: the base, single pass (think mode, evaluate.py's sampler) and IRG inference
    eval_specs, ea, before = runs.begin(model, ae, a, saved, rank, log, device)
    ia = dict(ea, **sampler(a), batch=a["gen_batch"])
    base_irg = (saved or {}).get("base_irg")
    if rank == 0 and base_irg is None:
        base_irg = irg_eval(model, ae, eval_specs, ia, device, a, "base_irg", log)

    # ---- IRGL data: initial records (renders) and improving records (flaws + the model's own image1s)
    t0 = time.time()
    if saved:
        initial, improving = saved["initial"], saved["improving"]
    else:
        initial, improving = build_irgl(model, ae, specs[rank::world_size], a, device, log)
        atomic_torch_save(dict(args=a, initial=initial, improving=improving, before=before, base_irg=base_irg),
                          data_file)
    selfs = [r for r in improving if r["source"] == "self"]
    log.log(dict(phase="data", initial=len(initial), improving=len(improving), self=len(selfs),
                 self_right=float(np.mean([r["right1"] for r in selfs])) if selfs else None, seconds=time.time() - t0),
            f"IRGL data: {len(initial)} initial, {len(improving)} improving ({len(selfs)} self-drawn, "
            f"{np.mean([r['right1'] for r in selfs]) if selfs else float('nan'):.3f} of them right, "
            f"{sum(r.get('fix_self', False) for r in selfs)} fixed by the model's own draw) in {time.time() - t0:.0f}s")
    if rank == 0:
        draw_data(initial, improving, os.path.join(a["out"], "data.png"))
    # the images, encoded once: x0 of the MSE targets and the clean image1s
    enc = lambda imgs: ae.encode(torch.as_tensor(np.stack(imgs), device=device)).cpu()  # noqa: E731
    z_init = enc([r["img"] for r in initial])
    z_img1, z_img2 = enc([r["img1"] for r in improving]), enc([r["img2"] for r in improving])

    # ---- IRGL: stage 1 (six modes), stage 2 (full trajectories only)
    # --anchor: a frozen copy of the base (taken before a resume loads the run's weights)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if a["anchor"] else None
    raw = model.train()
    model = ddp(raw, local, device) if world_size > 1 else raw
    trainable = runs.set_trainable(raw, a["params"])   # --params und: the drawer's own weights stay the base's
    opt = torch.optim.AdamW(trainable, lr=a["lr"], betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, a["warmup"])))  # then constant
    rng = np.random.default_rng(a["seed"] * world_size + rank)
    ema = runs.ema_init(raw, a["ema"])          # --ema: the weights the evals read and the checkpoint holds
    start = runs.load_state(a, rank, raw, opt, sched, rng, log, ema)
    s1, total = a["stage1_steps"], a["stage1_steps"] + a["stage2_steps"]
    per = a["batch"] // world_size
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=a["dtype"] == "bf16")
    stage1, t_train, n_train = None, 0.0, 0
    for step in range(start, total + 1):
        if step == s1 and s1 > 0 and rank == 0:      # the end of stage 1 (also reached by a resume at it)
            runs.ema_swap(raw, ema)
            stage1 = stage_eval(raw, ae, eval_specs, ia, device, a, "stage1_irg", log)
            runs.ema_swap(raw, ema)
        if step == total:
            break
        stage = 1 if step < s1 else 2
        t_step = time.time()
        modes = pick_modes(stage, per, rng)
        samples, x0s, w_img = [], [], []
        for mode in modes:
            if mode.startswith("initial"):
                j = int(rng.integers(len(initial)))
                segs, img = mode_sample(mode, initial[j], None, rng, a)
                x0 = z_init[j]
            else:
                j = int(rng.integers(len(improving)))
                segs, img = mode_sample(mode, improving[j], dict(img1=z_img1[j]), rng, a)
                x0 = z_img2[j]
            samples.append(segs)
            x0s.append(x0 if img else None)
            w_img.append(1.0 if mode.startswith("initial") else a["img2_w"])
        # flow matching on the samples that carry an image loss: x_t = (1 - t) x0 + t eps, t = shift(sigmoid(randn))
        has = [i for i, x in enumerate(x0s) if x is not None]
        x0 = torch.stack([x0s[i] for i in has]).to(device) if has else torch.zeros(0, M.N_IMG, raw.c.latent_ch, device=device)
        x_t, eps, t = M.noised(x0, a["t_shift"])
        for k, i in enumerate(has):
            samples[i][-1] = ("noise", x_t[k].cpu(), float(t[k]))
        b = M.pack(samples, M.PAD, raw.c.latent_ch, device)
        with amp:
            ce, v = M.token_losses(model, b)
        n_ce = all_sum(float((b["lw"] > 0).sum())).item()
        loss_txt = (ce * b["lw"]).sum() / max(n_ce, 1) * world_size      # mean CE over the batch's CE tokens
        loss_img = image_loss(v.view_as(x0), eps, x0, [w_img[i] for i in has]) if has else v.sum() * 0
        loss = loss_txt + loss_img
        # --anchor: image2's drawer as the base drew it. At image2's noise tokens (improving modes) the
        # velocity is pulled to the frozen base's on the same packed input,
        #   L_anchor = || v_theta(x_t, t | ctx) - v_base(x_t, t | ctx) ||^2,
        # meant to undo, where image2 reads it, what the text losses move in its context (session 8: fix
        # 0.43 -> 0.31, break 0.16 -> 0.27 with the verifier's reflection). Measured (RESULTS.md, session 9):
        # it stays ~0.002 and does not hold the drawer at the eval's contexts.
        anc = [k for k, i in enumerate(has) if modes[i].startswith("improving")] if ref is not None else []
        loss_anchor = v.sum() * 0
        if anc:
            with torch.no_grad(), amp:
                v_ref = M.token_losses(ref, b)[1].view_as(x0)
            loss_anchor = ((v.view_as(x0)[anc] - v_ref[anc].float()) ** 2).mean()
            loss = loss + a["anchor"] * loss_anchor
        gn = update(opt, loss, trainable, a["clip"], f"step {step + 1}")   # backward, clip, finite check, step
        sched.step()
        runs.ema_step(ema, raw, a["ema"])
        t_train, n_train = t_train + time.time() - t_step, n_train + 1
        if (step + 1) % 25 == 0 or step == start or step + 1 in (s1, total):
            log.log(dict(phase="train", step=step + 1, stage=stage, loss_txt=loss_txt.item() / world_size,
                         loss_img=loss_img.item(), loss_anchor=loss_anchor.item(), gnorm=gn.item(), lr=sched.get_last_lr()[0], s_per_step=t_train / n_train),
                    f"step {step + 1}/{total} (stage {stage}) text {loss_txt.item() / world_size:.4f} "
                    f"image {loss_img.item():.4f}" + (f" anchor {loss_anchor.item():.5f}" if ref is not None else "")
                    + f" gn {gn.item():.2f} ({t_train / n_train:.2f} s/step)")
        if (step + 1) % a["ckpt_every"] == 0 or step + 1 in (s1, total):
            runs.save_state(a, rank, step + 1, raw, opt, sched, rng, ema)

    # ---- after: IRG inference after stages 1 + 2, the checkpoint, summary (the EMA weights with --ema)
    runs.ema_swap(raw, ema)
    if rank == 0:
        raw.eval()
        M.save_weights(os.path.join(a["out"], "ckpt"), raw, ae, dict(method="irg", base=a["ckpt"], args=a))
        if stage1 is None and s1 > 0:
            stage1 = stage_eval(raw, ae, eval_specs, ia, device, a, "stage1_irg", log)
        final = irg_eval(raw, ae, eval_specs, ia, device, a, "stage2_irg", log) if a["stage2_steps"] else None
        write_summary(a, before, base_irg, stage1, final, log)
    model = None            # the DDP wrapper goes before the process group (see common.teardown_dist)
    teardown_dist()


def image_loss(v, eps, x0, w):
    """Flow matching's MSE, v against eps - x0, averaged over the noise tokens; w: a weight per sample
    (1 for image1's targets, --img2_w for image2's; all 1 is the plain mean). With --img2_w 0 image2 is
    never a target: IRGL then trains image2's drawer only through what the text losses change."""
    mse = (v - (eps - x0)) ** 2
    if all(x == 1.0 for x in w):
        return mse.mean()
    return (mse.mean((1, 2)) * torch.tensor(w, device=v.device, dtype=mse.dtype)).mean()


def stage_eval(raw, ae, specs, ia, device, a, name, log):
    """The IRG eval at the end of stage 1, saved so that a resumed run does not redo it (its weights are gone)."""
    f = os.path.join(a["out"], name, "summary.json")
    if os.path.exists(f):
        return json.load(open(f))
    was = raw.training
    res = irg_eval(raw.eval(), ae, specs, ia, device, a, name, log)
    raw.train(was)
    return res


def irg_eval(model, ae, specs, ia, device, a, name, log):
    """IRG inference on the eval set (evaluate.evaluate_irg), into the run folder's `name`/."""
    t0 = time.time()
    res = evaluate.evaluate_irg(model, ae, specs, ia, device, os.path.join(a["out"], name), log=lambda *_: None)
    log.log(dict(phase=name, image1=res["image1"], image2=res["image2"], fix=res["fix"], brk=res["break"],
                 ok_if_right=res["ok_if_right"], ok_if_wrong=res["ok_if_wrong"], critic_auroc=res["critic_auroc"],
                 kept=res["kept"], seconds=time.time() - t0),
            f"{name}: image1 {res['image1']:.3f} image2 {res['image2']:.3f} fix {evaluate.fmt_p(res['fix'])} "
            f"break {evaluate.fmt_p(res['break'])}; think2 calls image1 right for {evaluate.fmt_p(res['ok_if_right'])} "
            f"of the right, {evaluate.fmt_p(res['ok_if_wrong'])} of the wrong; critic AUROC {evaluate.fmt_p(res['critic_auroc'])} "
            f"({time.time() - t0:.0f}s)")
    return res


def write_summary(a, before, base_irg, stage1, final, log):
    rows = [("base, single pass (think)", before["gen_think"], None, None, None,
             {t: (v["gen_think"], None) for t, v in before["per_tag"].items()})]
    for name, r in (("base, IRG inference", base_irg), ("IRGL stage 1", stage1), ("IRGL stages 1+2", final)):
        if r is not None:
            rows.append((name, r["image1"], r["image2"], r["fix"], r["break"], r["per_tag"]))
    summary = {name: dict(image1=i1, image2=i2, fix=fx, brk=bk, per_tag=pt) for name, i1, i2, fx, bk, pt in rows}
    for name, r in (("base, IRG inference", base_irg), ("IRGL stage 1", stage1), ("IRGL stages 1+2", final)):
        if r is not None:       # the reflection as a critic (evaluate.evaluate_irg): AUROC of P("the image is correct"),
            summary[name]["critic_auroc"] = r.get("critic_auroc")      # and the image2 --select would give
            summary[name]["select"] = r.get("select")
    atomic_write(os.path.join(a["out"], "summary.json"), json.dumps(dict(seed=a["seed"], rows=summary), indent=1))
    tags = list(before["per_tag"])
    f = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
    table = ["| | " + " | ".join(tags) + " | overall | fix | break |", "|---" * (len(tags) + 4) + "|"]
    for name, i1, i2, fx, bk, pt in rows:
        for k, which in ((0, "image1"), (1, "image2")):
            if (i1, i2)[k] is None:
                continue
            table.append(f"| {name}: {which} | " + " | ".join(f(pt[t][k]) for t in tags) + f" | {f((i1, i2)[k])} | "
                         + (f"{f(fx)} | {f(bk)} |" if k else " | |"))
    text = "\n".join(table) + "\n"
    atomic_write(os.path.join(a["out"], "summary.md"), text)
    log.log(dict(phase="summary"), text)


def report(root):
    """Median and half-range over seeds of every row of root/*/summary.json -> root/report.md."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--report {root}: no such folder; pass the folder that holds the runs (e.g. runs/irg)")
    runs_ = [json.load(open(os.path.join(d, "summary.json"))) for d in run_dirs(root)]
    if not runs_:
        raise FileNotFoundError(f"{root}: no */summary.json; run `python irg.py --out {root}/s0` first")
    fmt = lambda v: f"{np.median(v):.3f} ± {(max(v) - min(v)) / 2:.3f}"  # noqa: E731
    names = list(runs_[0]["rows"])
    tags = list(runs_[0]["rows"][names[0]]["per_tag"])
    lines = [f"{len(runs_)} seeds ({', '.join(str(r['seed']) for r in runs_)}); median ± half the range", "",
             "| | overall | fix | break | critic AUROC | select | per seed |", "|---|---|---|---|---|---|---|"]
    for n in names:
        for k, which in ((0, "image1"), (1, "image2")):
            vals = [r["rows"][n][which] for r in runs_ if n in r["rows"] and r["rows"][n][which] is not None]
            if vals:
                fx = [r["rows"][n]["fix"] for r in runs_ if n in r["rows"] and r["rows"][n]["fix"] is not None]
                bk = [r["rows"][n]["brk"] for r in runs_ if n in r["rows"] and r["rows"][n]["brk"] is not None]
                au, sel = ([r["rows"][n][key] for r in runs_ if n in r["rows"] and r["rows"][n].get(key) is not None]
                           for key in ("critic_auroc", "select"))
                lines.append(f"| {n}: {which} | {fmt(vals)} | {fmt(fx) if k and fx else ''} | {fmt(bk) if k and bk else ''} | "
                             f"{fmt(au) if k and au else ''} | {fmt(sel) if k and sel else ''} | {', '.join(f'{v:.3f}' for v in vals)} |")
    lines += ["", "| | " + " | ".join(tags) + " |", "|---" * (len(tags) + 1) + "|"]
    for n in names:
        for k, which in ((0, "image1"), (1, "image2")):
            per = [r["rows"][n]["per_tag"] for r in runs_ if n in r["rows"]]
            if per and per[0][tags[0]][k] is not None:
                lines.append(f"| {n}: {which} | " + " | ".join(fmt([p[t][k] for p in per]) for t in tags) + " |")
    lines += held_noun_table(root)
    text = "\n".join(lines) + "\n"
    atomic_write(os.path.join(root, "report.md"), text)
    print(text)
    return runs_


def run_dirs(root):
    """The finished irg.py runs under root (an evaluate.py folder beside them has a summary.json without rows)."""
    dirs = [os.path.join(root, d) for d in sorted(os.listdir(root)) if os.path.exists(os.path.join(root, d, "summary.json"))]
    return [d for d in dirs if "rows" in json.load(open(os.path.join(d, "summary.json")))]


def held_noun_table(root):
    """Runs made with --hold_nouns: knowledge accuracy on the nouns IRGL trained on against the nouns it
    never saw (HELD_NOUNS), from the IRG evals' per-prompt results. Lines for report.md ([] otherwise)."""
    dirs = run_dirs(root)
    if not dirs or not all(json.load(open(os.path.join(d, "config.json"))).get("hold_nouns") for d in dirs):
        return []
    out = ["", "knowledge (--hold_nouns): nouns IRGL trained on / nouns it never saw; median ± half the range", "",
           "| | trained nouns | held-out nouns |", "|---|---|---|"]
    for name, sub in (("base, IRG inference", "base_irg"), ("IRGL stage 1", "stage1_irg"), ("IRGL stages 1+2", "stage2_irg")):
        for k, which in ((0, "image1"), (1, "image2")):
            acc = {True: [], False: []}
            for d in dirs:
                per = json.load(open(os.path.join(d, sub, "summary.json")))["per_prompt"]
                for held in (True, False):
                    v = [r[k] for p, r in per.items() if p.split()[-1] in world.ALIASES and (p.split()[-1] in HELD_NOUNS) == held]
                    if v:                           # an eval too small to ask for every noun may miss a group
                        acc[held].append(float(np.mean(v)))
            f = lambda v: f"{np.median(v):.3f} ± {(max(v) - min(v)) / 2:.3f}" if v else "n/a"  # noqa: E731
            out.append(f"| {name}: {which} | {f(acc[False])} | {f(acc[True])} |")
    return out


def draw_data(initial, improving, path):
    """What IRGL trains on: 8 improving records, image1 | image2 labelled with think2, and verdicts."""
    pick = np.linspace(0, len(improving) - 1, min(8, len(improving))).astype(int)
    rows = [[improving[i]["img1"], improving[i]["img2"]] for i in pick]
    labels = [f"[{improving[i]['source']}] {improving[i]['spec']['prompt']} -> {world.decode(improving[i]['t2'])}" for i in pick]
    ok = [[bool(improving[i]["right1"]), True] for i in pick]
    evaluate.grid(rows, path, labels, ok)


if __name__ == "__main__":
    main()
