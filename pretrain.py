"""
Pre-training of the nanoUMM base model from scratch on the shapes world.

Two stages, one file:
  --stage ae   the palette autoencoder (the frozen-VAE analog) on world renders
  --stage umm  the MoT on the task mixture below, the autoencoder frozen

Launch (the commands behind the shipped base: RESULTS.md "The shipped base" and docs/LOG.md):
  python pretrain.py --stage ae  --out runs/ae
  python pretrain.py --stage umm --ae runs/ae/ckpt --out runs/base
  torchrun --nproc_per_node=2 pretrain.py --stage umm ...      (DDP; same global batch)
  ... --resume                                                  (continue runs/base exactly)
  ... --init_from data/base                                     (continue from committed weights)
  ... --row_len 160     rows of 160 tokens, each holding as many samples as fit (default;
                        0 = one sample per row, right-padded: about half the tokens are pads)

Task mixture (design section 3). Each sample is a list of segments for model.pack:
  t2i       <bos> prompt <|vision_start|> [noise image]                 (CFG dropout: text dropped)
  think     <bos> prompt <think> plan </think> <|vision_start|> [noise image]
  caption   <bos> <|vision_start|> [clean] <|vision_end|> give the layout of the image . caption <eos>
  vqa       <bos> <|vision_start|> [clean] <|vision_end|> does this figure show " p " ? ... yes|no <eos>
  judge     ... [clean] ... global judge prompt  score : g <eos>        (SRUM table 7 format)
  region    ... [clean] ... region judge prompt  score : s_i <eos>      (SRUM table 8 format)
  reflect   <bos> prompt <think> plan </think> <vs> [clean flawed] <ve> <think> fix </think> <vs> [noise fixed]
  edit      as reflect, image2 = image1 kept (right) or with its one flaw undone in place (wrong); think2
            names what and where, then the detailed plan ("the color is wrong at the top left . redraw :
            a small red square at the top left 9 11 , ...")
  redraw    <bos> <think> caption </think> <|vision_start|> [noise image]   (Unified-GRPO's redraw context;
            half of the captions detailed, with each object's centre in pixels: world.caption(detail=True))
  fact      <bos> a tomato is a red circle . <eos>                      (text only: knowledge)
--own_n N: before training, the starting model draws N think-mode images of training prompts
(evaluate.py's sampler; saved as OUT/own.npz, reused on --resume); then a share --own_frac of
the vqa / judge / region samples reads one of these instead of a render or a negative, with the
answer the exact verifier gives on it. The judge learns on the kind of image it will judge: the
model's own samples, not only clean renders.
--own_reflect F: a share F of the reflect samples shows one of these images as image1, and think2 is the
verifier's reflection on it (IRG: the critic in think2 learns on the model's own drawings, the images
IRG's inference reflects on; otherwise image1 is a render or a render's negative).
Images of knowledge prompts and of counts 5-6 never appear (held out to test transfer), nor
do held-out (colour, shape) pairs or (shape, relation, shape) triples, nor eval prompts.
--caption_detail F: a share F of the caption samples writes the detailed form, so a caption sampled at
T = 1 sometimes carries the detail a decoder can use (Unified-GRPO's room to grow).
--und_transfer: the vqa / judge / region samples draw their prompts from all twelve tags, so the
understanding side sees knowledge nouns and counts 5-6 (the judge can then read them); t2i, think
and reflect still never draw them, so generation's transfer test stays a test.
"""
import json
import math
import os
import signal
import time

# the world's detector uses numpy matmuls: one BLAS thread per data worker, else 15 workers x
# 16 BLAS threads thrash a 16-core GPU host (set before numpy loads)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np
import torch
import torch.nn.functional as F

import world
import model as M
from kernels.loss import velocity_loss
from common import setup_dist, teardown_dist, ddp, all_sum, finite, claim_run_dir, atomic_torch_save, Logger, parse_args, \
    refuse_ignored

defaults = dict(
    stage="umm", out="runs/base", ae="runs/ae/ckpt", init_from="", resume=False, overwrite=False,
    depth=8, batch=128, steps=20000, lr=3e-4, warmup=300, cooldown=0.2, wd=0.0, clip=1.0,
    ema=0.999, t_shift=1.0, cfg_drop=0.1, dtype="bf16", workers=2, seed=0, row_len=160, mix="",
    log_every=50, ckpt_every=1000, eval_every=0, eval_n=8, minutes=0.0, max_minutes=0.0, stop_after=0, dump_grads="",
    own_n=0, own_frac=0.5, own_batch=256, own_reflect=0.0, und_transfer=False, caption_detail=0.0,
    ae_init="", ae_steps=3000, ae_minutes=0.0, ae_batch=32, ae_width=16, ae_lr=2e-3, ae_noise=0.2,
)
choices = dict(stage=("ae", "umm"), dtype=("fp32", "bf16"))
ranges = dict(depth=">= 1", batch=">= 1", steps=">= 1", lr="> 0", warmup=">= 1", cooldown="0..1", wd=">= 0", clip="> 0",
              ema="0..<1", t_shift="> 0", cfg_drop="0..1", workers=">= 0", log_every=">= 1", ckpt_every=">= 1",
              eval_every=">= 0", eval_n=">= 1", minutes=">= 0", max_minutes=">= 0", stop_after=">= 0", ae_steps=">= 1",
              own_n=">= 0", own_frac="0..1", own_reflect="0..1", caption_detail="0..1", own_batch=">= 1", ae_minutes=">= 0", ae_batch=">= 1", ae_width=">= 8", ae_lr="> 0", ae_noise=">= 0")
MIX = dict(t2i=0.24, think=0.2, caption=0.1, vqa=0.16, judge=0.07, region=0.07, reflect=0.1, fact=0.06,
           edit=0.0, redraw=0.0)     # weight 0: the default stream is the one the shipped base trained on
REDRAW_DETAIL = 0.5                  # the share of redraw samples whose caption is the detailed form


# flags of the machine and of the launch, free to change when a run is continued; every other flag
# (the model, the data stream, the schedule) is the run's own, read back from OUT/ckpt.json
LAUNCH_FLAGS = ("out", "resume", "overwrite", "workers", "max_minutes", "stop_after", "log_every", "ckpt_every",
                 "eval_every", "eval_n", "dump_grads", "own_batch", "minutes", "steps")


def resumed_args(a):
    """--resume continues the run as it was launched: its own flags (--init_from, --ae, --seed,
    --mix, --batch, --own_n, ...) come from OUT/ckpt.json, so `--out RUN --resume` alone is
    enough; passing one with another value raises (that would be a different run). --steps has
    its own check (main)."""
    path = os.path.join(a["out"], "ckpt.json")
    if not os.path.exists(path):
        return a                                # main names the missing state.pt
    with open(path) as f:
        saved = json.load(f).get("args", {})
    for k, v in saved.items():
        if k in LAUNCH_FLAGS or k not in defaults:
            continue
        if a[k] != defaults[k] and a[k] != v:
            raise ValueError(f"--resume {a['out']}: the run was launched with --{k} {v!r}, this call asks "
                             f"--{k} {a[k]!r}; drop --{k} to continue the run, or start a new one from its "
                             f"weights: --init_from {a['out']}/ckpt --out NEW")
        a[k] = v
    return a


def parse_mix(text):
    """--mix "vqa=0.3,judge=0.1": task weights that replace MIX's (unnamed tasks keep theirs; 0 drops
    a task); "" = MIX. Checked before any work (main calls it)."""
    mix = dict(MIX)
    for part in [s for s in text.split(",") if s.strip()]:
        k, _, v = part.partition("=")
        k = k.strip()
        if k not in MIX:
            raise ValueError(f"--mix {text!r}: unknown task {k!r}; tasks are {list(MIX)}")
        try:
            mix[k] = float(v)
        except ValueError:
            raise ValueError(f"--mix {text!r}: {k}={v!r} is not a number") from None
        if mix[k] < 0:
            raise ValueError(f"--mix {text!r}: {k} must be >= 0")
    if sum(mix.values()) <= 0:
        raise ValueError(f"--mix {text!r}: every task weight is 0")
    return mix




# ----------------------------------------------------------------------------- data

def train_spec(rng, banned, tags=world.IMAGE_TAGS):
    """A prompt spec for an image-bearing task: training compositions only, never an eval prompt."""
    while True:
        spec = world.sample_spec(tags[rng.integers(len(tags))], rng, holdout="train")
        if spec["prompt"] not in banned:
            return spec


def make_sample(task, rng, banned, own=None, und_transfer=False, caption_detail=0.0):
    """One sample as segments; images are still uint8 arrays: "img_clean" (read by understanding),
    "img_context" (re-entered for a second image), "img_noise".
    own: the pool of the model's own images (dict specs, images, frac, reflect) or None.
    und_transfer: vqa / judge / region also ask about images of the two transfer tags (knowledge
    nouns, counts 5-6); the generation tasks (t2i, think, reflect) still never draw them."""
    enc = world.encode
    if task == "fact":
        noun = sorted(world.ALIASES)[rng.integers(len(world.ALIASES))]
        return [("text", [M.BOS] + enc(world.fact_text(noun)) + [M.EOS], 1.0)]
    if task == "caption":
        scene = world.random_scene(rng, holdout="train")
        detail = caption_detail > 0 and rng.random() < caption_detail
        return [("text", [M.BOS, M.VS], 0), ("img_clean", world.draw(scene)),
                ("text", [M.VE] + enc("give the layout of the image ."), 0),
                ("text", enc(world.caption(scene, detail)) + [M.EOS], 1.0)]
    if task == "redraw":        # a caption drawn as Unified-GRPO's frozen decoder reads it (evaluate.redraw)
        scene = world.random_scene(rng, holdout="train")
        cap = world.caption(scene, rng.random() < REDRAW_DETAIL)
        return [("text", [M.BOS, M.THINK] + enc(cap) + [M.END_THINK, M.VS], 0), ("img_noise", world.draw(scene))]
    und = task in ("vqa", "judge", "region")
    spec = train_spec(rng, banned, world.TAGS if und and und_transfer else world.IMAGE_TAGS)
    if task in ("t2i", "think"):
        img, scene = world.render(spec, rng, holdout="train")
        if task == "t2i":
            return [("text", [M.BOS] + enc(spec["prompt"]), 0), ("text", [M.VS], 0), ("img_noise", img)]
        return [("text", [M.BOS] + enc(spec["prompt"]) + [M.THINK], 0),
                ("text", enc(world.plan_text(scene)) + [M.END_THINK, M.VS], 1.0), ("img_noise", img)]
    if und:
        if own is not None and own["frac"] > 0 and rng.random() < own["frac"]:   # one of the model's own images
            j = int(rng.integers(len(own["specs"])))
            spec, img = own["specs"][j], own["images"][j]
        elif rng.random() < 0.5:
            img, _ = world.render(spec, rng, holdout="train")
        else:
            img, _, _ = world.negative(spec, rng, holdout="train")
        head = [("text", [M.BOS, M.VS], 0), ("img_clean", img)]
        if task == "vqa":
            ok = world.verify(spec, img)["correct"]
            return head + [("text", [M.VE] + enc(world.vqa_question(spec["prompt"])), 0),
                           ("text", enc("yes" if ok else "no") + [M.EOS], 1.0)]
        g, regions = world.judge_scores(spec, img)
        if task == "judge" or not regions:
            q, s = world.global_judge_prompt(spec["prompt"]), g
        else:
            box, s = regions[rng.integers(len(regions))]
            q = world.region_judge_prompt(spec["prompt"], box)
        return head + [("text", [M.VE] + enc(q), 0), ("text", enc("score : " + world.format_score(s)) + [M.EOS], 1.0)]
    if task == "reflect":
        # --own_reflect: image1 is one of the model's own drawings, so think2 learns to criticise the kind of
        # image IRG's inference shows it (renders and their negatives are all it sees otherwise)
        mine = own is not None and own.get("reflect", 0) > 0 and rng.random() < own["reflect"]
        if mine:
            j = int(rng.integers(len(own["specs"])))
            spec, flawed = own["specs"][j], own["images"][j]
        target, scene = world.render(spec, rng, holdout="train")
        if not mine:
            flawed = target if rng.random() < 0.25 else world.negative(spec, rng, holdout="train")[0]
        fix = world.reflection_text(spec, flawed, scene)      # the verifier's verdict on image1, then the plan
        return reflect_segments(spec, scene, flawed, fix, target)
    if task == "edit":
        return edit_sample(spec, rng, own)
    raise ValueError(task)


def edit_sample(spec, rng, own):
    """IRG's edit in place: image2 copies image1 and changes only its flaw. A right image1 (a render, or
    with --own_reflect one of the model's own right drawings) is kept as it is, think2 "the image is
    correct . redraw : <its layout>"; one of the model's own wrong drawings gets the verifier's problem and
    a render of the prompt as image2; a wrong render is the target scene with one constraint broken in
    place (world.edit_flaw), image2 the target, think2 the problem and its 3x3 cell, then the plan. The plan
    is the detailed caption: image2 has each object's place to the pixel (an added object's too), so a
    kept object can stay where image1 has it and the edit is one change, not a guess at a position."""
    if own is not None and own.get("reflect", 0) > 0 and rng.random() < own["reflect"]:
        j = int(rng.integers(len(own["specs"])))
        spec, img1 = own["specs"][j], own["images"][j]
        v = world.verify(spec, img1)
        if v["correct"]:
            return reflect_segments(spec, v["objects"], img1, world.reflection_text(spec, v, v["objects"], detail=True), img1)
        # a wrong drawing of its own has no layout to edit in place, so image2 is a render of the prompt (a
        # redraw); think2 still says what the verifier finds. Were only the right ones shown, every own image
        # in an edit would be "correct", and think2, IRG's critic, would learn that the model's drawings are right
        target, scene = world.render(spec, rng, holdout="train")
        return reflect_segments(spec, scene, img1, world.reflection_text(spec, v, scene, detail=True), target)
    img2, scene = world.render(spec, rng, holdout="train")
    edit = world.edit_flaw(spec, scene, rng) if rng.random() < 2 / 3 else None
    if edit is None:                                    # kept: image2 is image1, to the pixel
        return reflect_segments(spec, scene, img2, world.reflection_text(spec, img2, scene, detail=True), img2)
    img1, _, edited = edit
    return reflect_segments(spec, scene, img1, world.reflection_text(spec, img1, scene, where=edited["box"], detail=True), img2)


def reflect_segments(spec, scene, img1, think2, img2):
    """The reflect / edit sequence: <bos> P <think> plan <vs> [img1 clean] <ve> <think> think2 <vs> [img2 noise]."""
    enc = world.encode
    return [("text", [M.BOS] + enc(spec["prompt"]) + [M.THINK], 0), ("text", enc(world.plan_text(scene)) + [M.END_THINK, M.VS], 1.0),
            ("img_context", img1), ("text", [M.VE, M.THINK], 0), ("text", enc(think2) + [M.END_THINK, M.VS], 1.0),
            ("img_noise", img2)]


def make_batch(seed, step, lo, hi, banned, cfg_drop, t_shift, C, row_len=None, mix=None, own=None, und_transfer=False,
               caption_detail=0.0):
    """Samples lo..hi of the global batch of `step`, packed (on a CPU worker) into rows of
    row_len tokens holding many samples each (None: one sample per row). Each sample has
    its own RNG seeded by (seed, step, index), so the global batch is the same for any number
    of processes and a resumed run sees exactly the data an uninterrupted one would.
    Images stay uint8 (encoded on the device); per noise image this draws
        t = shift(sigmoid(randn)),  t -> s*t / (1 + (s-1)*t)     and   eps ~ N(0, I)
    CFG dropout: with prob cfg_drop a t2i or redraw sample keeps only <bos> <|vision_start|>."""
    mix = mix or MIX
    tasks, probs = list(mix), np.array(list(mix.values()))
    samples, images, eps, noise_slots, names = [], [], [], [], []
    for i in range(lo, hi):
        rng = np.random.default_rng([seed, step, i])
        task = tasks[rng.choice(len(tasks), p=probs / probs.sum())]
        segs = []
        for seg in make_sample(task, rng, banned, own, und_transfer, caption_detail):
            if seg[0].startswith("img"):
                images.append(seg[1])
                if seg[0] == "img_clean":           # read by understanding: und tokens
                    segs.append(("clean", len(images) - 1))
                    continue
                if seg[0] == "img_context":         # re-entered for a second image: VAE and und tokens
                    segs += M.reentry(len(images) - 1)
                    continue
                t = float(1 / (1 + np.exp(-rng.standard_normal())))
                t = t_shift * t / (1 + (t_shift - 1) * t)
                if task in ("t2i", "redraw") and rng.random() < cfg_drop:
                    segs = [("text", [M.BOS, M.VS], 0)]       # unconditional: the text is dropped
                segs.append(("noise", len(images) - 1, t))
                eps.append(torch.from_numpy(rng.standard_normal((M.N_IMG, C)).astype(np.float32)))
                noise_slots.append(len(images) - 1)
            else:
                segs.append(seg)
        samples.append(segs); names.append(task)
    b = M.pack(samples, M.PAD, C, row_len=row_len)
    b["images"] = torch.from_numpy(np.stack(images)) if images else torch.zeros(0, world.W, world.W, 3, dtype=torch.uint8)
    # eps per image slot (zeros for clean-only slots): the noise tokens gather theirs by slot
    b["eps_img"] = torch.zeros(len(images), M.N_IMG, C)
    if eps:
        b["eps_img"][noise_slots] = torch.stack(eps)
    b["tasks"] = names
    return b


def one_thread(_):
    """DataLoader workers pack with many tiny torch ops: one thread each, no oversubscription."""
    torch.set_num_threads(1)


class Stream(torch.utils.data.IterableDataset):
    """Yields this rank's share of each global batch, steps start..; worker w takes steps
    start+w, start+w+W, ... (DataLoader interleaves workers in order, so order is kept)."""

    def __init__(self, a, start, lo, hi, C, own=None):
        self.a, self.start, self.lo, self.hi, self.C, self.own = a, start, lo, hi, C, own

    def __iter__(self):
        wi = torch.utils.data.get_worker_info()
        k, n = (wi.id, wi.num_workers) if wi else (0, 1)
        banned, mix = world.eval_prompts(), parse_mix(self.a["mix"])
        step = self.start + k
        while True:
            yield make_batch(self.a["seed"], step, self.lo, self.hi, banned, self.a["cfg_drop"], self.a["t_shift"], self.C,
                             self.a["row_len"] or None, mix, self.own, self.a["und_transfer"],
                             self.a["caption_detail"])
            step += n


def own_pool(umm, ae, a, device, rank):
    """The model's own think-mode images of --own_n training prompts (evaluate.py's sampler and
    settings, so they look like what evaluate.py --auroc judges), drawn once by rank 0 and kept
    in OUT/own.npz: --resume reads the same pool. The labels are not stored: each sample asks the
    verifier about its image (as for renders)."""
    import evaluate
    path = os.path.join(a["out"], "own.npz")
    if rank == 0 and not (a["resume"] and os.path.exists(path)):   # a fresh or --overwrite run draws its own
        rng = np.random.default_rng([a["seed"], 7919])
        banned = world.eval_prompts()
        specs = [train_spec(rng, banned) for _ in range(a["own_n"])]
        gen = torch.Generator(device).manual_seed(a["seed"])
        umm.eval()
        with torch.no_grad():
            out = evaluate.sample(umm, ae, specs, 1, "think", evaluate.defaults, gen, a["own_batch"], "own pool")
        umm.train()
        ok = np.mean([world.verify(s, x)["correct"] for s, x in zip(out["spec"], out["image"])])
        print(f"own pool: {len(specs)} think-mode images, {ok:.3f} correct by the verifier", flush=True)
        tmp = path + ".tmp.npz"                     # atomic: a killed run never leaves half a pool
        np.savez(tmp, images=np.stack(out["image"]).astype(np.uint8), specs=np.array(json.dumps(out["spec"])),
                 correct_rate=np.array(ok))
        os.replace(tmp, path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    f = np.load(path)
    if len(f["images"]) != a["own_n"]:
        raise ValueError(f"{path} holds {len(f['images'])} images, --own_n asks {a['own_n']}; it belongs to another "
                         f"run: start this one with --overwrite (it draws a new pool) or another --out")
    return dict(images=f["images"], specs=json.loads(str(f["specs"])), frac=a["own_frac"], reflect=a["own_reflect"])


def to_device(b, ae, device):
    """Fill the image positions: x0 = AE(image)[slot, ipos]; on noise tokens
        x_t = (1 - t) * x0 + t * eps     and the target  u = eps - x0   (t = 1 is pure noise)."""
    tasks = b.pop("tasks")
    b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
    b["tasks"] = tasks
    img = b["slot"] >= 0
    if img.any():
        with torch.no_grad():
            z = ae.encode(b["images"])                          # [n_images, n_img, C]
        b["lat"][img] = z[b["slot"][img], b["ipos"][img]]
        # noise tokens in the order of gen_idx (the order the model returns velocities in)
        g, flat = b["gen_idx"], b["lat"].view(-1, b["lat"].shape[-1])
        x0n = flat[g]                                           # just filled: the clean latents
        eps = b["eps_img"][b["slot"].view(-1)[g], b["ipos"].view(-1)[g]]
        t = b["t"].view(-1)[g][:, None]
        flat[g] = (1 - t) * x0n + t * eps                      # the target is u = eps - x0
        b["x0"], b["eps"] = x0n.view(-1, M.N_IMG, x0n.shape[-1]), eps.view(-1, M.N_IMG, x0n.shape[-1])
    else:
        b["x0"] = b["eps"] = None
    return b


# ----------------------------------------------------------------------------- stage 1: autoencoder

def palette_index(img):
    """uint8 [...,3] renders -> palette indices (renders use exactly the palette colours)."""
    d = ((img[..., None, :].astype(np.int32) - world.PALETTE.astype(np.int32)) ** 2).sum(-1)
    return d.argmin(-1)


def ae_data(rng, n):
    imgs = []
    for _ in range(n):
        if rng.random() < 0.5:
            imgs.append(world.draw(world.random_scene(rng, holdout="any")))
        else:
            imgs.append(world.render(world.sample_spec(world.TAGS[rng.integers(len(world.TAGS))], rng, holdout="any"), rng, holdout="any")[0])
    imgs = np.stack(imgs)
    return torch.from_numpy(imgs), torch.from_numpy(palette_index(imgs))


class AEStream(torch.utils.data.IterableDataset):
    """Batches of renders and their palette indices; worker w draws from its own seed."""

    def __init__(self, seed, n):
        self.seed, self.n = seed, n

    def __iter__(self):
        wi = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, wi.id if wi else 0])
        while True:
            yield ae_data(rng, self.n)


@torch.no_grad()
def ae_pass_rate(ae, device, n=240, seed=123):
    """Fraction of reconstructions of spec renders that the exact verifier still accepts."""
    rng = np.random.default_rng(seed)
    specs = [world.sample_spec(world.TAGS[i % len(world.TAGS)], rng, holdout="any") for i in range(n)]
    imgs = np.stack([world.render(s, rng, holdout="any")[0] for s in specs])
    rec = ae.decode(ae.encode(torch.as_tensor(imgs, device=device)), world.PALETTE).cpu().numpy()
    return float(np.mean([world.verify(s, r)["correct"] for s, r in zip(specs, rec)]))


def train_ae(a, device, log):
    torch.manual_seed(a["seed"])
    ae = M.PaletteAE(8, a["ae_width"]).to(device)
    if a["ae_init"]:                           # continue an autoencoder (fresh optimizer, same latent layout)
        ae = M.load_weights(a["ae_init"], device, flag="--ae_init")[1]
        ae.lat_mean.zero_(); ae.lat_std.fill_(1.0)   # re-measured at the end
    opt = torch.optim.AdamW(ae.parameters(), lr=a["ae_lr"], weight_decay=0.0)
    it = iter(torch.utils.data.DataLoader(AEStream(a["seed"], a["ae_batch"]), batch_size=None,
                                          num_workers=a["workers"], worker_init_fn=one_thread))
    weight = torch.tensor([0.3] + [1.0] * 8, device=device)   # background is ~90% of pixels
    step, t0 = 0, time.time()
    while step < a["ae_steps"]:
        if a["ae_minutes"] and step == 50:     # size the cosine schedule from the measured speed
            a["ae_steps"] = int(50 / (time.time() - t0) * 60 * a["ae_minutes"])
            log.log(dict(stage="ae", ae_steps_set=a["ae_steps"]), f"--ae_minutes: --ae_steps {a['ae_steps']}")
        x, idx = (t.to(device) for t in next(it))
        z = ae.encode(x)
        z = z + a["ae_noise"] * torch.randn_like(z)             # robust to imperfect flow samples
        loss = F.cross_entropy(ae.logits(z), idx, weight=weight)
        lr = a["ae_lr"] * min(1, (step + 1) / 100) * (0.5 * (1 + math.cos(math.pi * step / a["ae_steps"])))
        for gp in opt.param_groups:
            gp["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % a["log_every"] == 0 or step == a["ae_steps"] - 1:
            log.log(dict(stage="ae", step=step, loss=loss.item()), f"ae step {step} loss {loss.item():.4f}")
        step += 1
    with torch.no_grad():                                       # unit-variance latents for the flow
        imgs, _ = ae_data(np.random.default_rng(7), 1024)
        z = torch.cat([ae.encode(imgs[i:i + 256].to(device)) for i in range(0, 1024, 256)])
        ae.lat_mean.copy_(z.mean((0, 1)))
        ae.lat_std.copy_(z.std((0, 1)))
    rate = ae_pass_rate(ae, device)
    log.log(dict(stage="ae", verifier_pass=rate), f"ae reconstructions pass the verifier: {rate:.3f}")
    return ae, rate


# ----------------------------------------------------------------------------- stage 2: the UMM

def main(argv=None):
    a = parse_args(defaults, argv, __doc__, choices, ranges)
    if a["resume"]:
        a = resumed_args(a)
    parse_mix(a["mix"])
    if a["own_reflect"] and not a["own_n"]:
        raise ValueError(f"--own_reflect {a['own_reflect']} shows the model's own images, and there are none: "
                         f"add --own_n N (e.g. --own_n 2048) to draw them, or drop --own_reflect")
    if not a["own_n"]:              # no pool of the model's own images: nothing for --own_frac to mix in
        refuse_ignored(a, defaults, "--own_n 0", ("own_frac",))
    rank, world_size, local, device = setup_dist()
    if a["batch"] % world_size:
        raise ValueError(f"--batch {a['batch']} must be divisible by the number of processes ({world_size})")
    # a folder that holds a run is continued (--resume) or replaced (--overwrite), never silently
    claim_run_dir(a["out"], a["resume"], a["overwrite"], "pretrain.py",
                  inputs=(a["ae_init"],) if a["stage"] == "ae" else (a["init_from"] or a["ae"],))
    log = Logger(a["out"], rank, resume=a["resume"])
    # SIGTERM (a scheduler's or a user's `kill`, forwarded to every rank by torchrun) ends the run
    # after the step in flight, with a checkpoint: continue it with --resume
    term = []
    signal.signal(signal.SIGTERM, lambda *_: term.append(1))
    if a["stage"] == "ae":
        ae, rate = train_ae(a, device, log)
        if rank == 0:
            M.save_weights(os.path.join(a["out"], "ckpt"), None, ae, dict(stage="ae", ae_verifier_pass=rate, args=a))
        teardown_dist()
        return

    # ---- model, frozen AE, optimiser
    torch.manual_seed(a["seed"])
    cfg = M.config_for(a["depth"], len(world.VOCAB))
    if a["init_from"]:
        umm, ae, meta0 = M.load_weights(a["init_from"], device, flag="--init_from")
        umm.c.vae_reentry = True     # pre-training re-enters images as BAGEL does, whatever the base did before
        cfg = umm.c
    else:
        _, ae, _ = M.load_weights(a["ae"], device, flag="--ae")
        umm = M.MoT(cfg).to(device)
    ae.requires_grad_(False).eval()
    ema = {k: v.detach().clone().float() for k, v in umm.state_dict().items()}
    raw = umm
    if world_size > 1:
        umm = ddp(umm, local, device)
    opt = torch.optim.AdamW(raw.parameters(), lr=a["lr"], betas=(0.9, 0.95), weight_decay=a["wd"], eps=1e-8)
    step = start = 0
    state_path = os.path.join(a["out"], "state.pt")
    if a["resume"]:
        if not os.path.exists(state_path):
            raise FileNotFoundError(f"--resume: {state_path} not found; drop --resume to start fresh "
                                    f"or pass --out with the run folder to continue")
        st = torch.load(state_path, map_location=device, weights_only=False)
        raw.load_state_dict(st["model"]); opt.load_state_dict(st["opt"]); ema = st["ema"]
        step = start = st["step"]
        saved_steps = st.get("steps", a["steps"])       # the saved schedule (e.g. sized by --minutes)
        if a["steps"] not in (saved_steps, defaults["steps"]):
            raise ValueError(f"--resume {a['out']}: the run's schedule is --steps {saved_steps} (its LR cooldown "
                             f"depends on it), this call asks --steps {a['steps']}; drop --steps to continue it, or "
                             f"start a new run from its weights: --init_from {a['out']}/ckpt --steps N --out NEW")
        if a["steps"] != saved_steps:
            print(f"--resume: continuing the run's schedule of {saved_steps} steps from step {step}", flush=True)
        a["steps"] = saved_steps
        log.resume_at(step)                             # the log's records of replayed steps go
        a["minutes"] = 0.0
        torch.set_rng_state(st["rng"].cpu())           # map_location moved it; the RNG state lives on the CPU
    own = own_pool(raw, ae, a, device, rank) if a["own_n"] else None
    n_params = sum(p.numel() for p in raw.parameters())
    log.log(dict(config=vars(cfg) if hasattr(cfg, "__dict__") else str(cfg), params=n_params, args=a),
            f"MoT {n_params / 1e6:.2f}M params, world {world_size}, device {device}, start step {step}")

    # ---- data: this rank's slice of the global batch
    per = a["batch"] // world_size                  # divisible: checked at the start of main
    loader = torch.utils.data.DataLoader(Stream(a, step, rank * per, (rank + 1) * per, cfg.latent_ch, own),
                                         batch_size=None, num_workers=a["workers"], worker_init_fn=one_thread,
                                         prefetch_factor=4 if a["workers"] else None, persistent_workers=False)
    it = iter(loader)
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=a["dtype"] == "bf16")
    t0, tok_count, last, wait = time.time(), 0, {}, 0.0
    while step < a["steps"]:
        # LR: linear warmup, constant, linear cooldown over the last `cooldown` fraction (WSD)
        frac = step / a["steps"]
        warm = min(1, (step + 1) / a["warmup"])
        cool = min(1, (1 - frac) / a["cooldown"]) if a["cooldown"] else 1
        lr = a["lr"] * warm * cool
        for gp in opt.param_groups:
            gp["lr"] = lr
        t_wait = time.time()
        b = to_device(next(it), ae, device)
        wait += time.time() - t_wait                                  # time spent waiting for data
        with amp:
            ce, v = M.token_losses(umm, b)
        # global means: local sums over global counts, times world (DDP averages gradients)
        n_lab = all_sum((b["lw"] > 0).sum()).item()
        n_img = all_sum(v.shape[0]).item()
        loss_text = (ce * b["lw"]).sum() / max(n_lab, 1) * world_size
        if v.shape[0]:   # mean((v - (eps - x0))^2): the fused Triton kernel on CUDA, its twin elsewhere
            loss_img = velocity_loss(v.view_as(b["x0"]), b["eps"], b["x0"]) * v.shape[0] / n_img * world_size
        else:
            loss_img = v.sum() * 0
        loss = loss_text + loss_img
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a["dump_grads"] and step == start and rank == 0:         # tests: DDP grads == 1-process grads
            torch.save({k: p.grad.clone() for k, p in raw.named_parameters() if p.grad is not None}, a["dump_grads"])
        gn = torch.nn.utils.clip_grad_norm_(raw.parameters(), a["clip"])
        finite(f"step {step + 1}", loss=loss, grad_norm=gn)      # before the update: no nan reaches a checkpoint
        opt.step()
        with torch.no_grad():                                     # EMA of the weights (DiT)
            ev, pv = list(ema.values()), [p.float() for p in raw.state_dict().values()]
            torch._foreach_mul_(ev, a["ema"])
            torch._foreach_add_(ev, pv, alpha=1 - a["ema"])
        step += 1
        if a["minutes"] and step == start + 20:
            t20 = time.time()
        if a["minutes"] and step == start + 120:
            # --minutes: size the run (and so its LR schedule) from the speed of steps 20..120;
            # the log records the resulting --steps, which reproduces the run without --minutes
            rate = 100 / (time.time() - t20)
            a["steps"] = int(all_sum(start + 120 + rate * (60 * a["minutes"] - (time.time() - t0))).item() / world_size)
            log.log(dict(steps_set=a["steps"], steps_per_s=rate),
                    f"--minutes {a['minutes']}: {rate:.1f} steps/s -> --steps {a['steps']}")
        tok_count += int((b["sample"] >= 0).sum())
        # per-task losses for the progress line, averaged over the last 10 steps before it
        if (step - 1) % a["log_every"] >= a["log_every"] - 10 or step == a["steps"]:
            with torch.no_grad():
                # the sample of each token (packed rows: b["sample"]; one per row: the row)
                sid = b["sample"].clamp(min=0) if a["row_len"] else \
                    torch.arange(len(b["tasks"]), device=ce.device)[:, None].expand_as(ce)
                for task in set(b["tasks"]):
                    of = torch.tensor([t == task for t in b["tasks"]], device=ce.device)
                    m = (b["lw"] > 0) & of[sid]
                    if m.any():
                        last.setdefault(task, []).append(ce[m].mean().item())
                last.setdefault("img", []).append(all_sum(loss_img.detach()).item() / world_size)
        if step % a["log_every"] == 0 or step == a["steps"]:
            el = time.time() - t0
            tps = tok_count * world_size / el
            eta = el / max(step - start, 1) * (a["steps"] - step)
            last = {k: sum(v) / len(v) for k, v in last.items()}
            rec = dict(step=step, loss=all_sum(loss.detach()).item() / world_size, lr=lr, gnorm=gn.item(), tok_s=tps,
                       elapsed=el, data_wait=wait / el, **{f"loss_{k}": v for k, v in last.items()})
            log.log(rec, f"step {step}/{a['steps']} loss {rec['loss']:.3f} | " +
                    " ".join(f"{k} {v:.3f}" for k, v in sorted(last.items())) +
                    f" | lr {lr:.2e} gn {gn.item():.2f} | {tps:.0f} tok/s, {100 * wait / el:.0f}% waiting for data"
                    f" | eta {eta / 60:.1f} min")
            last = {}
        stop = (a["max_minutes"] and time.time() - t0 > 60 * a["max_minutes"]) or \
            (a["stop_after"] and step - start >= a["stop_after"]) or bool(term)
        stop = all_sum(float(bool(stop))).item() > 0                   # every rank stops together
        if rank == 0 and a["eval_every"] and (step % a["eval_every"] == 0 or step == a["steps"]):
            curve_point(ema, ae, cfg, step, a, device, log)               # the learning curve
        if rank == 0 and (step % a["ckpt_every"] == 0 or step == a["steps"] or stop):
            save(raw, ae, ema, opt, step, a, cfg)
        if stop:
            why = "SIGTERM" if term else "--max_minutes / --stop_after"
            log.log(dict(stopped_at=step), f"stopping at step {step} ({why}); continue with --resume")
            break
    umm = None                 # the DDP wrapper goes before the process group (see common.teardown_dist)
    teardown_dist()
    return raw, ema


def curve_point(ema, ae, cfg, step, a, device, log):
    """Quick eval of the EMA weights (eval_n prompts per tag, 2 images, think mode + VQA)."""
    import evaluate
    m = M.MoT(cfg).to(device)
    m.load_state_dict(ema)
    specs = world.pick(world.load_specs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "eval.jsonl")), a["eval_n"])
    ea = dict(evaluate.defaults, k=2, modes="think", batch=256)
    s = evaluate.evaluate(m, ae, specs, ea, device, log=lambda *_: None)
    rec = dict(step=step, curve=True, gen_think=s["gen_think"], und=s["und"], switch_rate=s["switch_rate"],
               per_tag={t: v["gen_think"] for t, v in s["per_tag"].items()},
               und_tag={t: v["und"] for t, v in s["per_tag"].items()})
    log.log(rec, f"eval @ {step}: gen_think {s['gen_think']:.3f} und {s['und']:.3f} switch {s['switch_rate']:.3f}")


def save(raw, ae, ema, opt, step, a, cfg):
    """Atomic checkpoints: ckpt.{safetensors,json} = bf16 EMA weights + config (what evaluate.py
    and the methods load); state.pt = raw weights, EMA, optimizer and RNG (for --resume)."""
    ema_model = M.MoT(cfg)
    ema_model.load_state_dict({k: v for k, v in ema.items()})
    M.save_weights(os.path.join(a["out"], "ckpt"), ema_model, ae, dict(stage="umm", step=step, args=a))
    atomic_torch_save(dict(model=raw.state_dict(), ema=ema, opt=opt.state_dict(), step=step, steps=a["steps"],
                           rng=torch.get_rng_state()), os.path.join(a["out"], "state.pt"))


if __name__ == "__main__":
    main()
