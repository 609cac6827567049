"""
IRG: interleaving reasoning generation (paper 003), one file, one loop. The model thinks, draws,
reflects on its own drawing, and draws again:
  <bos> P <think> T1 </think> <vs> [image1] <ve> <think> T2 </think> <vs> [image2]

  python irg.py                                   # IRGL stage 1 + stage 2 from data/base -> runs/irg
  python irg.py --out runs/irg/s1 --seed 1        # another seed
  python irg.py --out runs/irg/s0 --resume        # continue a killed run (same weights as uninterrupted)
  python irg.py --report runs/irg                 # median and spread over the seeds' runs -> runs/irg/report.md
  python irg.py --ckpt data/v13 --detail 1 --cfg_text2 2 --cfg_img 1.5   # a base that edits, in its edit format
  python evaluate.py --modes irg --ckpt runs/irg/s0/ckpt      # IRG inference alone on the eval set

Inference (model.irg_generate, the upstream eval script's settings): T1 at T 0.3; image1 with text CFG 4
on t in [0.4, 1]; image1 re-entered clean; T2 (what is wrong, then "redraw :" and the layout); image2
from three cached contexts (cond; think2 dropped; image1 dropped) nested as BAGEL does (cfg_combine).
IRGL's records, from the world, on training prompts of pre-training's image tags (no eval prompt, no
knowledge noun, no count of 5-6): initial (P, T1 = a scene's plan, its render) and improving (P, T1,
image1, T2, image2): self (image1 the base drew, judged by the verifier: right -> T2 "the image is
correct", image2 = image1; wrong -> T2 = world.reflection_text, image2 = the nearest render), flaw
(image1 = world.negative) and edit (image1 = image2's scene with one constraint broken, world.edit_flaw).
--detail 1 writes them in the edit format of a base that edits (pretrain.edit_sample, data/v13): an edit's
T2 names the flaw's 3x3 cell, and a self or edit record's plan is the detailed caption (each object's centre).
The six learning modes (upstream SFT/data/configs/train_toy_dataset_stage{1,2}.yaml; T1 / T2 include
their </think> <vs>; image1 is context, never a target; a self record's T1 is context only):
  | mode                   | sequence                                   | CE on        | MSE on | stage 1 | stage 2 |
  |------------------------|--------------------------------------------|--------------|--------|---------|---------|
  | initial_full           | P <think> T1 [noise]                       | T1           | image  | 1.0     | 1.0     |
  | initial_thinking_gen   | same                                       | -            | image  | 0.5     | -       |
  | initial_thinking_und   | P <think> T1                               | T1           | -      | 0.5     | -       |
  | improving_full         | P <think> T1 [img1] <ve> <think> T2 [noise] | T2 (+T1)    | image2 | 1.0     | 1.0     |
  | improving_thinking_gen | same                                       | -            | image2 | 0.5     | -       |
  | improving_thinking_und | P <think> T1 [img1] <ve> <think> T2        | T2           | -      | 0.5     | -       |
CFG dropout (--cfg_drop, text and image apart, as BAGEL) trains image2's two uncond contexts. Flow
matching: x_t = (1 - t) x0 + t eps, t = shift(sigmoid(randn)), v = eps - x0, --t_shift 1 (the base's;
upstream 4.0 changed 6% of a kept image's pixels, docs/LOG.md). Loss = mean CE over the CE tokens +
mean MSE over the noise tokens; AdamW (0.9, 0.95), constant LR after warmup, clip 1, both stages.
Run folder: config.json, metrics.jsonl, irgl.rank0.pt (data, base evals), before/, base_irg/,
stage1_irg/, stage2_irg/ (evaluate.evaluate_irg), data.png, ckpt.*, summary.json/md.
"""
import json
import os
import time

import numpy as np
import torch

import world
import model as M
import runs
import evaluate
import pictures
from common import setup_dist, teardown_dist, ddp, all_sum, update, atomic_torch_save, atomic_write, parse_args, Progress

defaults = dict(
    ckpt="data/base", out="runs/irg", seed=0, resume=False, overwrite=False, report="",
    # IRGL data: prompts per tag (training prompts only), self-drawn image1s per prompt, flaws and edits
    # per prompt, initial renders per prompt, candidate renders for "nearest to image1"
    n_prompts=24, N=1, n_flaw=1, n_edit=1, n_init=2, near=8, detail=False,
    # inference (upstream IRG eval script)
    temperature=0.3, max_think=80, sample_steps=25, cfg_text=4.0, cfg_text2=4.0, cfg_img=2.0, cfg_lo1=0.4, cfg_lo2=0.0, shift=3.0,
    gen_batch=60,
    # IRGL
    stage1_steps=300, stage2_steps=100, batch=16, lr=1e-4, warmup=10, clip=1.0, t_shift=1.0, cfg_drop=0.1, ckpt_every=25,
    # evaluation on the held-out eval set: eval_n prompts per tag, eval_k images each
    eval_n=10, eval_k=1, dtype="fp32",
)
choices = dict(dtype=("fp32", "bf16"))
ranges = dict(n_prompts=">= 1", N=">= 0", n_flaw=">= 0", n_edit=">= 0", n_init=">= 1", near=">= 1", temperature=">= 0",
              max_think=">= 1", sample_steps=">= 1", cfg_text=">= 0", cfg_text2=">= 0", cfg_img=">= 0", cfg_lo1="0..1",
              cfg_lo2="0..1", shift="> 0", gen_batch=">= 1", stage1_steps=">= 0", stage2_steps=">= 0", batch=">= 1", lr="> 0",
              warmup=">= 0", clip="> 0", t_shift="> 0", cfg_drop="0..1", ckpt_every=">= 1", eval_n=">= 1", eval_k=">= 1")
MODES = ("initial_full", "initial_thinking_gen", "initial_thinking_und",
         "improving_full", "improving_thinking_gen", "improving_thinking_und")
STAGE_WEIGHTS = {1: dict(initial_full=1.0, improving_full=1.0, initial_thinking_gen=0.5, improving_thinking_gen=0.5,
                         initial_thinking_und=0.5, improving_thinking_und=0.5),
                 2: dict(initial_full=1.0, improving_full=1.0)}
# settings that make the IRGL data and the base's evals: a --resume must match them (runs.saved_rollouts)
MADE_WITH = ("ckpt", "seed", "n_prompts", "N", "n_flaw", "n_edit", "n_init", "near", "detail", "temperature", "max_think",
             "sample_steps", "cfg_text", "cfg_text2", "cfg_img", "cfg_lo1", "cfg_lo2", "shift", "eval_n", "eval_k")


# ----------------------------------------------------------------------------- inference
# The interleaved inference lives in model.py's unified generation, beside model.generate, because
# evaluate.py runs it too (named here as well, for the tests and for readers of this file).
from model import cfg_combine, draw_first, img_uncond_ids, irg_generate  # noqa: E402,F401  (re-exported)


def sampler(a):
    """IRG inference's settings, from the flags (model.irg_generate)."""
    return {k: a[k] for k in ("temperature", "max_think", "sample_steps", "cfg_text", "cfg_text2", "cfg_img", "cfg_lo1", "cfg_lo2", "shift")}


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


def train_specs(a):
    """Training prompts: world.candidates (never an eval prompt) of pre-training's image tags, no
    held-out composition (those are for the eval, as in pre-training)."""
    pool = world.candidates(a["n_prompts"], np.random.default_rng(20_000 + a["seed"]))
    return [s for s in pool if s["tag"] in world.IMAGE_TAGS and not world.uses_heldout(s)]


def build_irgl(model, ae, specs, a, device, log):
    """The records the six modes read (see the docstring). Deterministic given a["seed"]."""
    rng = np.random.default_rng(30_000 + a["seed"])
    enc, d = world.encode, a["detail"]
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
            improving.append(dict(spec=s, t1=enc(world.plan_text(scene)) + end, t1_loss=True, img1=bad,
                                  t2=enc(world.reflection_text(s, v, scene)) + end, img2=fix, source="flaw", right1=False))
        for _ in range(a["n_edit"]):
            fix, scene = world.render(s, rng, holdout="train")
            edit = world.edit_flaw(s, scene, rng)
            if edit is not None:                    # --detail: think2 also names the flaw's 3x3 cell
                t2 = world.reflection_text(s, edit[0], scene, where=edit[2]["box"] if d else None, detail=d)
                improving.append(dict(spec=s, t1=enc(world.plan_text(scene)) + end, t1_loss=True, img1=edit[0],
                                      t2=enc(t2) + end, img2=fix, source="edit", right1=False))
    # self: image1 drawn by the model itself (IRG's steps 1-2), judged by the verifier
    jobs = [s for s in specs for _ in range(a["N"])]
    gen = torch.Generator(device).manual_seed(1000 + a["seed"])
    prog = Progress("self-drawn image1", len(jobs), log=print)
    for i in range(0, len(jobs), a["gen_batch"]):
        chunk = jobs[i:i + a["gen_batch"]]
        _, t1, sw1, _, img1, _ = draw_first(model, ae, [enc(s["prompt"]) for s in chunk], sampler(a), world.PALETTE, gen)
        for s, t, sw, im in zip(chunk, t1, sw1.tolist(), img1.cpu().numpy()):
            v = world.verify(s, im)
            if v["correct"]:                        # keep: think2 says so, image2 is image1
                t2, im2 = world.reflection_text(s, v, v["objects"], detail=d), im
            else:                                   # fix: what is wrong, the layout of the nearest render
                im2, scene = nearest_render(s, im, rng, a["near"])
                t2 = world.reflection_text(s, v, scene, detail=d)
            improving.append(dict(spec=s, t1=list(t) + ([] if sw else [M.VS]), t1_loss=False, img1=im,
                                  t2=enc(t2) + end, img2=im2, source="self", right1=bool(v["correct"])))
        prog(min(i + a["gen_batch"], len(jobs)))
    return initial, improving


def pick_modes(stage, n, rng):
    """The learning modes of n samples: stage 1 draws all six with the upstream weights, stage 2 the full ones only."""
    w = STAGE_WEIGHTS[stage]
    return rng.choice(list(w), n, p=np.array(list(w.values())) / sum(w.values()))


def mode_sample(mode, rec, z, rng, a, vae=True):
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
        return head + [*M.reentry(z["img1"], vae), ("text", [M.VE, M.THINK], 0), ("text", rec["t2"], ce2)], False
    drop_text, drop_img = rng.random() < a["cfg_drop"], rng.random() < a["cfg_drop"]
    t1 = rec["t1"][:-1] if rec["t1"][-1] == M.VS else rec["t1"]
    if drop_img and drop_text:                      # both dropped: the initial context
        segs = head
    elif drop_img:                                  # img-uncond: all the text, no image1
        segs = [("text", P, 0), ("text", t1, ce1), ("text", [M.THINK], 0), ("text", rec["t2"], ce2)]
    elif drop_text:                                 # text-uncond: through image1, think2 dropped
        segs = head + [*M.reentry(z["img1"], vae), ("text", [M.VE, M.VS], 0)]
    else:
        segs = head + [*M.reentry(z["img1"], vae), ("text", [M.VE, M.THINK], 0), ("text", rec["t2"], ce2)]
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
    if a["N"] + a["n_flaw"] + a["n_edit"] == 0:
        raise ValueError("--N 0 --n_flaw 0 --n_edit 0: no improving record (the three improving modes, half of "
                         "IRGL's samples, read one); give one of them a count")
    specs = train_specs(a)
    runs.check_prompts(specs, a, world_size)
    torch.manual_seed(a["seed"] + rank)
    model, ae, meta = runs.load_umm(a["ckpt"], device)
    log = runs.open_run(a, rank, "irg.py")
    data_file = os.path.join(a["out"], f"irgl.rank{rank}.pt")
    saved = runs.saved_rollouts(data_file, a, MADE_WITH, "irg.py") if a["resume"] else None

    # ---- before: the base, single pass (think mode, evaluate.py's sampler) and IRG inference
    eval_specs, ea, before = runs.begin(model, ae, a, saved, rank, log, device)
    ia = dict(ea, **sampler(a), batch=a["gen_batch"])
    base_irg = (saved or {}).get("base_irg")
    if rank == 0 and base_irg is None:
        base_irg = irg_eval(model, ae, eval_specs, ia, device, a, "base_irg", log)

    # ---- IRGL data: initial records (renders) and improving records (flaws, edits, the model's own image1s)
    t0 = time.time()
    if saved:
        initial, improving = saved["initial"], saved["improving"]
    else:
        initial, improving = build_irgl(model, ae, specs[rank::world_size], a, device, log)
        atomic_torch_save(dict(args=a, initial=initial, improving=improving, before=before, base_irg=base_irg),
                          data_file)
    if all_sum(float(not improving)).item():     # every rank stops, not only the one without records
        raise RuntimeError(f"IRGL data: a process has no improving record (its {len(specs[rank::world_size])} prompts "
                           f"gave no flaw the verifier sees and --N is {a['N']}); raise --n_prompts, --n_flaw or --N")
    selfs = [r for r in improving if r["source"] == "self"]
    right = float(np.mean([r["right1"] for r in selfs])) if selfs else None
    log.log(dict(phase="data", initial=len(initial), improving=len(improving), self=len(selfs), self_right=right,
                 seconds=time.time() - t0),
            f"IRGL data: {len(initial)} initial, {len(improving)} improving ({len(selfs)} self-drawn, "
            f"{evaluate.fmt_p(right)} of them right) in {time.time() - t0:.0f}s")
    if rank == 0:
        draw_data(initial, improving, os.path.join(a["out"], "data.png"))
    # the images, encoded once: x0 of the MSE targets and the clean image1s
    enc = lambda imgs: ae.encode(torch.as_tensor(np.stack(imgs), device=device)).cpu()  # noqa: E731
    z_init = enc([r["img"] for r in initial])
    z_img1, z_img2 = enc([r["img1"] for r in improving]), enc([r["img2"] for r in improving])

    # ---- IRGL: stage 1 (six modes), stage 2 (full trajectories only)
    raw = model.train()
    model = ddp(raw, local, device) if world_size > 1 else raw
    params = list(raw.parameters())
    opt = torch.optim.AdamW(params, lr=a["lr"], betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, a["warmup"])))  # then constant
    rng = np.random.default_rng(a["seed"] * world_size + rank)
    start = runs.load_state(a, rank, raw, opt, sched, rng, log)
    s1, total = a["stage1_steps"], a["stage1_steps"] + a["stage2_steps"]
    per = a["batch"] // world_size
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=a["dtype"] == "bf16")
    stage1, t_train, n_train = None, 0.0, 0
    for step in range(start, total + 1):
        if step == s1 and s1 > 0 and rank == 0:      # the end of stage 1 (also reached by a resume at it)
            stage1 = stage_eval(raw, ae, eval_specs, ia, device, a, "stage1_irg", log)
        if step == total:
            break
        stage = 1 if step < s1 else 2
        t_step = time.time()
        samples, x0s = [], []
        for mode in pick_modes(stage, per, rng):
            if mode.startswith("initial"):
                j = int(rng.integers(len(initial)))
                segs, img = mode_sample(mode, initial[j], None, rng, a)
                x0 = z_init[j]
            else:
                j = int(rng.integers(len(improving)))
                segs, img = mode_sample(mode, improving[j], dict(img1=z_img1[j]), rng, a, raw.c.vae_reentry)
                x0 = z_img2[j]
            samples.append(segs)
            x0s.append(x0 if img else None)
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
        loss_img = ((v.view_as(x0) - (eps - x0)) ** 2).mean() if has else v.sum() * 0   # ||v_theta - (eps - x0)||^2
        gn = update(opt, loss_txt + loss_img, params, a["clip"], f"step {step + 1}")   # backward, clip, finite check, step
        sched.step()
        t_train, n_train = t_train + time.time() - t_step, n_train + 1
        if (step + 1) % 25 == 0 or step == start or step + 1 in (s1, total):
            log.log(dict(phase="train", step=step + 1, stage=stage, loss_txt=loss_txt.item() / world_size,
                         loss_img=loss_img.item(), gnorm=gn.item(), lr=sched.get_last_lr()[0], s_per_step=t_train / n_train),
                    f"step {step + 1}/{total} (stage {stage}) text {loss_txt.item() / world_size:.4f} "
                    f"image {loss_img.item():.4f} gn {gn.item():.2f} ({t_train / n_train:.2f} s/step)")
        if (step + 1) % a["ckpt_every"] == 0 or step + 1 in (s1, total):
            runs.save_state(a, rank, step + 1, raw, opt, sched, rng)

    # ---- after: IRG inference after stages 1 + 2, the checkpoint, summary
    if rank == 0:
        raw.eval()
        M.save_weights(os.path.join(a["out"], "ckpt"), raw, ae, dict(method="irg", base=a["ckpt"], args=a))
        if stage1 is None and s1 > 0:
            stage1 = stage_eval(raw, ae, eval_specs, ia, device, a, "stage1_irg", log)
        final = irg_eval(raw, ae, eval_specs, ia, device, a, "stage2_irg", log) if a["stage2_steps"] else None
        write_summary(a, before, base_irg, stage1, final, log)
    model = None            # the DDP wrapper goes before the process group (see common.teardown_dist)
    teardown_dist()


def stage_eval(raw, ae, specs, ia, device, a, name, log):
    """The IRG eval at the end of stage 1, saved so that a resumed run does not redo it (its weights are gone)."""
    f = os.path.join(a["out"], name, "summary.json")
    if a["resume"] and os.path.exists(f):      # only this run's own: a fresh run never reads one it finds
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
                 seconds=time.time() - t0),
            f"{name}: image1 {res['image1']:.3f} image2 {res['image2']:.3f} fix {evaluate.fmt_p(res['fix'])} "
            f"break {evaluate.fmt_p(res['break'])}; think2 calls image1 right for {evaluate.fmt_p(res['ok_if_right'])} "
            f"of the right, {evaluate.fmt_p(res['ok_if_wrong'])} of the wrong; critic AUROC {evaluate.fmt_p(res['critic_auroc'])} "
            f"({time.time() - t0:.0f}s)")
    return res


EVALS = (("base, IRG inference", "base_irg"), ("IRGL stage 1", "stage1_irg"), ("IRGL stages 1+2", "stage2_irg"))


def write_summary(a, before, base_irg, stage1, final, log):
    rows = [("base, single pass (think)", before["gen_think"], None, None, None,
             {t: (v["gen_think"], None) for t, v in before["per_tag"].items()}, None)]
    for (name, _), r in zip(EVALS, (base_irg, stage1, final)):
        if r is not None:
            rows.append((name, r["image1"], r["image2"], r["fix"], r["break"], r["per_tag"], r.get("critic_auroc")))
    summary = {name: dict(image1=i1, image2=i2, fix=fx, brk=bk, per_tag=pt, critic_auroc=au)
               for name, i1, i2, fx, bk, pt, au in rows}
    atomic_write(os.path.join(a["out"], "summary.json"), json.dumps(dict(seed=a["seed"], rows=summary), indent=1))
    tags = list(before["per_tag"])
    f = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
    table = ["| | " + " | ".join(tags) + " | overall | fix | break |", "|---" * (len(tags) + 4) + "|"]
    for name, i1, i2, fx, bk, pt, _ in rows:
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
    fmt = lambda v: f"{np.median(v):.3f} ± {(max(v) - min(v)) / 2:.3f}" if v else ""  # noqa: E731
    names = list(runs_[0]["rows"])
    tags = list(runs_[0]["rows"][names[0]]["per_tag"])
    lines = [f"{len(runs_)} seeds ({', '.join(str(r['seed']) for r in runs_)}); median ± half the range", "",
             "| | overall | fix | break | critic AUROC | per seed |", "|---|---|---|---|---|---|"]
    for n in names:
        rs = [r["rows"][n] for r in runs_ if n in r["rows"]]
        col = lambda key: [r[key] for r in rs if r.get(key) is not None]  # noqa: E731
        for k, which in ((0, "image1"), (1, "image2")):
            if col(which):
                lines.append(f"| {n}: {which} | {fmt(col(which))} | " + (" | ".join(fmt(col(key)) for key in ("fix", "brk", "critic_auroc"))
                             if k else " | | ") + f" | {', '.join(f'{v:.3f}' for v in col(which))} |")
    lines += ["", "| | " + " | ".join(tags) + " |", "|---" * (len(tags) + 1) + "|"]
    for n in names:
        for k, which in ((0, "image1"), (1, "image2")):
            per = [r["rows"][n]["per_tag"] for r in runs_ if n in r["rows"]]
            if per and per[0][tags[0]][k] is not None:
                lines.append(f"| {n}: {which} | " + " | ".join(fmt([p[t][k] for p in per]) for t in tags) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write(os.path.join(root, "report.md"), text)
    print(text)
    return runs_


def run_dirs(root):
    """The finished irg.py runs under root (an evaluate.py folder beside them has a summary.json without rows)."""
    dirs = [os.path.join(root, d) for d in sorted(os.listdir(root)) if os.path.exists(os.path.join(root, d, "summary.json"))]
    return [d for d in dirs if "rows" in json.load(open(os.path.join(d, "summary.json")))]


def draw_data(initial, improving, path):
    """What IRGL trains on: 8 improving records, image1 | image2 labelled with think2, and verdicts."""
    pick = np.linspace(0, len(improving) - 1, min(8, len(improving))).astype(int)
    rows = [[improving[i]["img1"], improving[i]["img2"]] for i in pick]
    labels = [f"[{improving[i]['source']}] {improving[i]['spec']['prompt']} -> {world.decode(improving[i]['t2'])}" for i in pick]
    ok = [[bool(improving[i]["right1"]), True] for i in pick]
    pictures.grid(rows, path, labels, ok)


if __name__ == "__main__":
    main()
