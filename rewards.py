"""
nanoUMM rewards. One calling convention for every reward:

    reward(specs, images) -> np.ndarray float32 [N]

specs: a list of N prompt specs (world.py dicts with "prompt"); images: uint8 [N,64,64,3]
(an array, a list of arrays, or a CPU tensor). A reward is a plain function with that
signature, or a small object built once (it holds a model) whose __call__ has it:

    oracle_soft      fraction of the exact verifier's atomic checks passed (dense, in [0,1])
    oracle_binary    1.0 if the verifier says correct else 0.0 (GenEval's per-image score)
    SelfVQA(m, ae)   VQAScore from the unified model's own understanding (a frozen copy)
    QwenVQA(path)    VQAScore from a real Qwen2.5-VL loaded from a local folder (paper 000's
                     QwenVQAScore used Qwen2.5-VL-7B-Instruct)
    SelfJudge(m, ae) SRUM's self-judgment (paper 001): the model's own global score g in [-1, 1],
                     as a reward (g + 1) / 2; `.judge()` also scores each detected region
    oracle_judge     the same two levels from the exact verifier (world.judge_scores): the
                     ideal judge, the control for SelfJudge

VQAScore (upstream t2v_metrics): ask `Does this figure show "{prompt}"? Please answer Yes or
No.` about the image and take the softmax probability of the "Yes" token at the first answer
position, from one raw forward pass (not `generate` scores, which logits processors alter).
Paper 000 credits its bimodal shape (clear high / low clusters) for RWR's gains:
`reward_stats` reports the bimodality coefficient so a run can check that before training.

Reconstruction rewards (Unified-GRPO, paper 002) compare two images, so for them the
convention is PAIRS:

    reward(src_images, rec_images) -> np.ndarray float32 [N]      R(x, x_hat) for each pair

both uint8 [N,64,64,3] (same forms as above). The paper's R = cos(f(x), f(x_hat)) with a frozen
image encoder f (CLIP there):

    scene_f1         the exact check: F1 between the objects world.detect finds in x and in x_hat,
                     matched on (shape, colour, size, 3x3 grid cell, digits) -- the gold reward
    matched_iou      where each object went: the detected objects matched on (shape, colour, size,
                     digits) by box IoU, mean IoU over the larger count (the detail scene_f1 cannot see)
    UndCosine(m, ae) the offline encoder: cos of the frozen base's understanding state of each image
                     (see the class for why this feature), no downloads, no extra training
    CLIPCosine(path) cos of CLIP image embeddings from a real CLIP read from a LOCAL folder
                     (CLIPModel or CLIPVisionModelWithProjection; tested on a tiny random one)
"""
import copy
import inspect
import json
import os

import numpy as np
import torch

import model as M
import world
from common import Progress


def as_images(images, n):
    """uint8 [n,64,64,3] numpy from an array, a list of arrays or a (CPU/GPU) tensor; n = len(specs)
    (checked: a silent zip() truncation would misalign rewards and rollouts)."""
    if torch.is_tensor(images):
        images = images.detach().cpu().numpy()
    imgs = np.stack([np.asarray(im) for im in images]) if len(images) else np.zeros((0, world.W, world.W, 3))
    assert len(imgs) == n, f"{n} specs but {len(imgs)} images"
    return imgs.astype(np.uint8, copy=False)


# ----------------------------------------------------------------------------- oracle (exact verifier)

def oracle_soft(specs, images):
    """Fraction of atomic checks passed (count, colour, position, ..., no extra objects)."""
    imgs = as_images(images, len(specs))
    return np.array([world.verify(s, im)["soft"] for s, im in zip(specs, imgs)], np.float32)


def oracle_binary(specs, images):
    """1.0 where every check passes (GenEval's `correct`), else 0.0."""
    imgs = as_images(images, len(specs))
    return np.array([world.verify(s, im)["correct"] for s, im in zip(specs, imgs)], np.float32)


# ----------------------------------------------------------------------------- self-judgment

class SelfVQA:
    """VQAScore asked of the unified model itself: P("yes") after
    `<bos> <|vision_start|> [image] <|vision_end|> does this figure show " p " ? ...` (model.p_yes,
    the format pre-training taught). The judge is a frozen deep copy taken at construction,
    so optimising the policy never moves its own reward (SRUM's frozen-judge rule)."""

    def __init__(self, model, ae, device="cpu", batch=128):
        model = getattr(model, "module", model)            # unwrap DDP if given the wrapper
        self.model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        self.ae = copy.deepcopy(ae).to(device).eval().requires_grad_(False)
        self.device, self.batch = device, batch
        self.yes_id = world.STOI["yes"]                    # the world's vocabulary is lower-case

    @torch.no_grad()
    def __call__(self, specs, images):
        imgs, out = as_images(images, len(specs)), []
        for i in range(0, len(specs), self.batch):
            z = self.ae.encode(torch.as_tensor(imgs[i:i + self.batch], device=self.device))
            q = [world.encode(world.vqa_question(s["prompt"])) for s in specs[i:i + self.batch]]
            out += M.p_yes(self.model, z, q, self.yes_id).float().cpu().tolist()
        return np.array(out, np.float32)


# ----------------------------------------------------------------------------- SRUM's judge

def top_regions(img, k=5):
    """The detector's boxes (world.detect, the analog of the paper's SAM proposals), largest k by area."""
    return [o["box"] for o in sorted(world.detect(img), key=lambda o: -o["area"])[:k]]


def oracle_judge(specs, images, k=5):
    """The ideal judge: (g [N] in [-1, 1], [[(box, s_i)] per image]) from the exact verifier."""
    out = [world.judge_scores(s, im) for s, im in zip(specs, as_images(images, len(specs)))]
    return np.array([g for g, _ in out], np.float32), [regs[:k] for _, regs in out]


class SelfJudge:
    """SRUM's self-judgment (paper 001, tables 7-8 in the world's words: world.global_judge_prompt
    and world.region_judge_prompt), asked of a frozen deep copy of the model (the judge never moves
    with the policy). Pre-training taught the answer `score : x <eos>` with x on the grid
    (-1, -0.5, 0, 0.5, 1) (world.SCORE_GRID). The paper parses the number its judge generates;
    here the judge's log-likelihood of each of the 5 completions is computed in one packed
    forward and the score is
        score = sum_x softmax(log p(x))_x * x   (--judge_score mean: the expected score; continuous,
                                                 the paper's judge writes continuous numbers)
        score = argmax_x log p(x)               (mode: what greedy decoding of the grid answer reads)
    judge(specs, images) -> (g [N], [[(box, s_i)] per image]) with the detector's top-k boxes;
    __call__(specs, images) -> (g + 1) / 2, the shared reward convention (sample level)."""

    def __init__(self, model, ae, device="cpu", batch=64, score="mean", k=5):
        if score not in ("mean", "mode"):
            raise ValueError(f"SelfJudge score={score!r}: use 'mean' or 'mode'")
        model = getattr(model, "module", model)
        self.model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        self.ae = copy.deepcopy(ae).to(device).eval().requires_grad_(False)
        self.device, self.batch, self.score, self.k = device, batch, score, k
        self.grid = np.array(world.SCORE_GRID, np.float32)
        self.answers = [world.encode(world.score_text(x)) + [M.EOS] for x in world.SCORE_GRID]

    @torch.no_grad()
    def scores(self, z, questions):
        """z [Q, n_img, C] latents, questions: Q id lists -> Q scores in [-1, 1]."""
        out, prog = [], Progress("judging", len(questions))
        for i in range(0, len(questions), self.batch):
            prog(i)
            zs, qs = z[i:i + self.batch], questions[i:i + self.batch]
            samples = [[("text", [M.BOS, M.VS], 0), ("clean", zs[j]), ("text", [M.VE] + list(q), 0), ("text", ans, 1.0)]
                       for j, q in enumerate(qs) for ans in self.answers]
            b = M.pack(samples, M.PAD, self.model.c.latent_ch, self.device)
            lp = M.text_logprobs(self.model, b).sum(1).view(len(qs), len(self.answers)).float()
            if self.score == "mode":
                out += self.grid[lp.argmax(1).cpu().numpy()].tolist()
            else:
                out += (torch.softmax(lp, 1).cpu().numpy() @ self.grid).tolist()
        return np.array(out, np.float32)

    def judge(self, specs, images):
        imgs = as_images(images, len(specs))
        z = torch.cat([self.ae.encode(torch.as_tensor(imgs[i:i + 256], device=self.device))
                       for i in range(0, len(imgs), 256)])
        boxes = [top_regions(im, self.k) for im in imgs]
        # one flat list of questions: the global one of every image, then each of its regions
        qz, qs = [], []
        for n, (s, bx) in enumerate(zip(specs, boxes)):
            for q in [world.global_judge_prompt(s["prompt"])] + [world.region_judge_prompt(s["prompt"], b) for b in bx]:
                qz.append(n); qs.append(world.encode(q))
        sc = self.scores(z[torch.as_tensor(qz, device=self.device)], qs)
        g, regions, at = np.zeros(len(specs), np.float32), [], 0
        for n, bx in enumerate(boxes):
            g[n] = sc[at]
            regions.append([(b, float(x)) for b, x in zip(bx, sc[at + 1:at + 1 + len(bx)])])
            at += 1 + len(bx)
        return g, regions

    def __call__(self, specs, images):
        return (self.judge(specs, images)[0] + 1) / 2


# ----------------------------------------------------------------------------- Qwen2.5-VL VQAScore

class QwenVQA:
    """VQAScore from a real Qwen2.5-VL read from a LOCAL folder (nothing is downloaded).

    The "Yes" token: `tokenizer.encode("Yes", add_special_tokens=False)`, which must be one
    token -- capital Y, no leading space, because the answer starts a fresh line right after
    the generation prompt `<|im_start|>assistant\\n` (t2v_metrics' answer template "Yes").
    The softmax runs over the model's whole output vocabulary (lm_head rows), as upstream.

    Why not AutoProcessor: in transformers 5.x the Qwen2.5-VL processor cannot be built
    without torchvision (its video processor requires it), which this repo does not need.
    So the processor's two halves are loaded (AutoTokenizer, AutoImageProcessor) and the one
    thing the processor adds for an image is done here: `<|image_pad|>` is repeated once per
    merged patch (t*h*w / merge^2) and marked in mm_token_type_ids (the model's 3-D RoPE
    needs it). test_rewards.py checks this against the upstream processor, token for token.

    Images are upsampled 64 -> `size` px with nearest (crisp edges; 224 = 8x28 px gives
    8x8 = 64 visual tokens). Batches are left-padded, so position -1 is every row's
    answer position."""

    QUESTION = 'Does this figure show "{}"? Please answer Yes or No.'
    IMAGE_PAD = "<|image_pad|>"

    def __init__(self, path, device="cpu", dtype=torch.float32, batch=8, size=224):
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"QwenVQA: no model folder at {path!r}. Nothing is downloaded here: copy a local "
                f"Qwen2.5-VL checkpoint there (config.json, *.safetensors, tokenizer.json, "
                f"preprocessor_config.json), e.g. on a machine with internet "
                f"`huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir {path}`, "
                f"or use SelfVQA / oracle_soft instead")
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=dtype, local_files_only=True).to(device).eval().requires_grad_(False)
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.img_proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.tok.padding_side = "left"                     # last position = answer position
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        if self.tok.chat_template is None:                 # older folders keep it for the processor only
            with open(os.path.join(path, "chat_template.json")) as f:
                self.tok.chat_template = json.load(f)["chat_template"]
        yes = self.tok.encode("Yes", add_special_tokens=False)
        assert len(yes) == 1, f'"Yes" is {len(yes)} tokens in this tokenizer; VQAScore needs one'
        self.yes_id = yes[0]
        self.pad_id = self.tok.convert_tokens_to_ids(self.IMAGE_PAD)
        assert self.pad_id == self.model.config.image_token_id, "tokenizer and model disagree on <|image_pad|>"
        # transformers 5.x positions image tokens by mm_token_type_ids; 4.x finds them itself
        self.typed = "mm_token_type_ids" in inspect.signature(self.model.forward).parameters
        self.device, self.dtype, self.batch, self.size = device, dtype, batch, size

    def prompt(self, text):
        """The chat-formatted question, one `<|image_pad|>` placeholder, generation prompt on."""
        msgs = [{"role": "user", "content": [{"type": "image"},
                                              {"type": "text", "text": self.QUESTION.format(text)}]}]
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def inputs(self, specs, images):
        """Model inputs for one batch, exactly what Qwen2_5_VLProcessor would produce."""
        from PIL import Image
        pils = [Image.fromarray(im).resize((self.size, self.size), Image.NEAREST) for im in images]
        px = self.img_proc(images=pils, return_tensors="pt")
        n_tok = (px["image_grid_thw"].prod(-1) // self.img_proc.merge_size ** 2).tolist()
        texts = [self.prompt(s["prompt"]).replace(self.IMAGE_PAD, self.IMAGE_PAD * n, 1)
                 for s, n in zip(specs, n_tok)]
        b = dict(self.tok(texts, padding=True, return_tensors="pt"))
        if self.typed:
            b["mm_token_type_ids"] = (b["input_ids"] == self.pad_id).long()   # 1 = image token
        b["pixel_values"] = px["pixel_values"].to(self.dtype)
        b["image_grid_thw"] = px["image_grid_thw"]
        return {k: v.to(self.device) for k, v in b.items()}

    @torch.no_grad()
    def __call__(self, specs, images):
        imgs, out = as_images(images, len(specs)), []
        for i in range(0, len(specs), self.batch):
            b = self.inputs(specs[i:i + self.batch], imgs[i:i + self.batch])
            logits = self.model(**b).logits[:, -1].float()  # first answer position (left-padded)
            out += torch.softmax(logits, -1)[:, self.yes_id].cpu().tolist()
        return np.array(out, np.float32)


# ----------------------------------------------------------------------------- reconstruction rewards (paper 002)
# convention: reward(src_images, rec_images) -> float32 [N], one value per (x, x_hat) pair

def scene_f1(src_images, rec_images):
    """Exact scene match: F1 between the multisets of detected objects of x and x_hat, each object
    keyed (shape, colour, size, grid cell, digits) -- the caption's own vocabulary (world.caption_key),
    so a reconstruction scores 1 exactly when a perfect caption of it would equal the source's.
    Two empty canvases match (1.0)."""
    from collections import Counter
    src, rec = as_images(src_images, len(src_images)), as_images(rec_images, len(src_images))
    out = []
    for a, b in zip(src, rec):
        ka, kb = Counter(map(world.caption_key, world.detect(a))), Counter(map(world.caption_key, world.detect(b)))
        n = sum(ka.values()) + sum(kb.values())
        out.append(2 * sum((ka & kb).values()) / n if n else 1.0)
    return np.array(out, np.float32)


def box_iou(a, b):
    """IoU of two (x0, y0, x1, y1) boxes (x1, y1 exclusive)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0, w) * max(0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matched_iou(src_images, rec_images):
    """Where the redraw put each object, which scene_f1 (keyed by 3x3 cell) cannot see: the objects
    world.detect finds in x and in x_hat are matched within the same (shape, colour, size, digits),
    greedily by box IoU, and the score is the sum of the matched IoUs over the larger object count
    (a missing or an extra object counts 0). 1 only when every object is redrawn in its exact box;
    two empty canvases match (1.0)."""
    src, rec = as_images(src_images, len(src_images)), as_images(rec_images, len(src_images))
    key = lambda o: (o["shape"], o["color"], o.get("size"), o.get("text"))  # noqa: E731
    out = []
    for a, b in zip(src, rec):
        oa, ob = world.detect(a), world.detect(b)
        if not oa and not ob:
            out.append(1.0)
            continue
        pairs = sorted(((box_iou(x["box"], y["box"]), i, j) for i, x in enumerate(oa) for j, y in enumerate(ob)
                        if key(x) == key(y)), reverse=True)
        used_a, used_b, total = set(), set(), 0.0
        for iou, i, j in pairs:
            if iou > 0 and i not in used_a and j not in used_b:
                used_a.add(i); used_b.add(j); total += iou
        out.append(total / max(len(oa), len(ob)))
    return np.array(out, np.float32)


def iou_and_scene(src_images, rec_images):
    """(matched_iou + scene_f1) / 2: where each object landed, and whether every object is the right one.
    The IoU alone prizes detail over content: a detailed caption with one object misnamed redraws to IoU
    0.38 against a right short caption's 0.24 (v13, 48 scenes x 4 redraws), so a group holding both forms
    pushes the captioner towards detail at the cost of a wrong object. The exact scene F1 ranks them the
    other way (0.51 against 0.77); their mean ranks right above misnamed in either form, and detailed
    above short when both are right (docs/LOG.md, 2026-12-08)."""
    return ((matched_iou(src_images, rec_images) + scene_f1(src_images, rec_images)) / 2).astype(np.float32)


class UndCosine:
    """The offline frozen encoder f: the base model's own understanding tower (BAGEL reads images
    for understanding through a ViT; here the und expert reading the AE's clean tokens plays that
    role). f(x) = the final hidden state at the last token of the captioning prompt
        <bos> <|vision_start|> [clean x] <|vision_end|> give the layout of the image .
    i.e. the state from which the model starts to describe the layout -- minus its mean over 256
    fixed training renders (centering: every state shares a large common direction, which makes raw
    cosines all ~0.9). Measured on the shipped base (24 renders x 4 own captions, each redrawn):
    this feature's cosine correlates 0.39 with scene_f1 overall and 0.29 within groups (what GRPO
    uses); the mean over the clean image tokens 0.35 / 0.15, the flattened AE latent 0.41 / -0.01.
    A frozen deep copy of the model given here (the base): training never moves the reward."""

    def __init__(self, model, ae, device="cpu", batch=128, n_ref=256):
        model = getattr(model, "module", model)
        self.model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        self.ae = copy.deepcopy(ae).to(device).eval().requires_grad_(False)
        self.device, self.batch = device, batch
        self.q = [M.VE] + world.encode("give the layout of the image .")
        rng = np.random.default_rng(12345)
        self.mu = 0.0
        self.mu = self.features(np.stack([world.draw(world.random_scene(rng)) for _ in range(n_ref)])).mean(0)

    @torch.no_grad()
    def features(self, images):
        imgs, out = as_images(images, len(images)), []
        for i in range(0, len(imgs), self.batch):
            z = self.ae.encode(torch.as_tensor(imgs[i:i + self.batch], device=self.device))
            b = M.pack([[("text", [M.BOS, M.VS], 0), ("clean", zi), ("text", self.q, 0)] for zi in z],
                       M.PAD, self.model.c.latent_ch, self.device)
            out.append(self.model(b)[:, -1].float())       # every row has the same length: -1 is the last token
        return torch.cat(out) - self.mu

    def __call__(self, src_images, rec_images):
        fa, fb = self.features(src_images), self.features(rec_images)
        return torch.cosine_similarity(fa, fb, dim=-1).cpu().numpy().astype(np.float32)


class CLIPCosine:
    """The paper's reward: cos(f_CLIP(x), f_CLIP(x_hat)) with a real CLIP read from a LOCAL folder
    (nothing is downloaded). Either a CLIPModel or a CLIPVisionModelWithProjection folder; both
    hold vision_model + visual_projection, whose output (the projected pooled state) is CLIP's
    image embedding. Preprocessing as CLIPImageProcessor does for a square image: resize to the
    model's image_size (nearest: the renders' edges stay crisp; 64 -> 224 in the real model), scale
    to [0, 1], normalise with the folder's image_mean / image_std (preprocessor_config.json),
    else OpenAI CLIP's."""

    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, path, device="cpu", batch=64):
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"CLIPCosine: no model folder at {path!r}. Nothing is downloaded here: copy a local CLIP "
                f"(config.json + *.safetensors), e.g. on a machine with internet `huggingface-cli download "
                f"openai/clip-vit-large-patch14 --local-dir {path}`, or use --reward und / scene")
        from transformers import AutoConfig, CLIPModel, CLIPVisionModelWithProjection
        kind = AutoConfig.from_pretrained(path, local_files_only=True).model_type
        cls = CLIPModel if kind == "clip" else CLIPVisionModelWithProjection
        self.model = cls.from_pretrained(path, local_files_only=True).to(device).eval().requires_grad_(False)
        vc = self.model.config.vision_config if kind == "clip" else self.model.config
        self.size = vc.image_size
        mean, std = self.MEAN, self.STD
        pp = os.path.join(path, "preprocessor_config.json")
        if os.path.exists(pp):
            cfg = json.load(open(pp))
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.device, self.batch = device, batch

    @torch.no_grad()
    def features(self, images):
        imgs, out = as_images(images, len(images)), []
        for i in range(0, len(imgs), self.batch):
            x = torch.as_tensor(imgs[i:i + self.batch], device=self.device).permute(0, 3, 1, 2).float() / 255
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="nearest")
            pooled = self.model.vision_model(pixel_values=(x - self.mean) / self.std).pooler_output
            out.append(self.model.visual_projection(pooled).float())
        return torch.cat(out)

    def __call__(self, src_images, rec_images):
        fa, fb = self.features(src_images), self.features(rec_images)
        return torch.cosine_similarity(fa, fb, dim=-1).cpu().numpy().astype(np.float32)


# ----------------------------------------------------------------------------- distribution checks

def reward_stats(r):
    """mean, std, skew, kurtosis and the bimodality coefficient BC = (skew^2 + 1) / kurtosis
    (population moments; kurtosis not excess). BC is 1 for two equal spikes, 5/9 for a
    uniform, 1/3 for a Gaussian; above 5/9 hints at two clusters (paper 000: a bimodal
    reward gives RWR a sharper signal). A constant reward has no shape: BC reported 0."""
    r = np.asarray(r, np.float64)
    mean, std = float(r.mean()), float(r.std())
    if std < 1e-12:
        return dict(mean=mean, std=std, skew=0.0, kurtosis=0.0, bimodality=0.0)
    x = (r - mean) / std
    skew, kurt = float((x ** 3).mean()), float((x ** 4).mean())
    return dict(mean=mean, std=std, skew=skew, kurtosis=kurt, bimodality=(skew ** 2 + 1) / kurt)


def histogram(r, bins=10):
    """Counts of rewards in `bins` equal bins over [0, 1] (values outside are clipped in)."""
    return np.histogram(np.clip(np.asarray(r, np.float64), 0, 1), bins=bins, range=(0, 1))[0].tolist()
