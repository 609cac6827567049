"""
The shapes world: a procedural stand-in for "photos" in which every claim about
an image can be checked exactly, the way GenEval checks real models with a
detector. One file holds everything that knows what the world looks like:

  vocabulary + tokenizer   a closed word-level vocabulary (every text the world writes)
  prompt grammar           GenEval-format specs for 12 tags (GenEval's six + six harder)
  renderer                 render(spec) -> a random 64x64 image that satisfies it exactly
  detector + verifier      detect(img) -> objects; verify(spec, img) -> correct/soft/per-object verdicts
  text formats             captions (the think-mode plan), VQA, judge prompts, reflections
  splits                   held-out (colour, shape) pairs and (shape, relation, shape) triples

Needs only numpy + pillow. Everything random takes a numpy Generator `rng`.

  python world.py --write_eval            # writes data/eval.jsonl (600 fixed prompts)
  python world.py --demo demo.png         # a grid of renders, one column per tag
"""
import argparse
import json
import os
import re
from collections import Counter
from itertools import zip_longest

import numpy as np

# -----------------------------------------------------------------------------
# the world's vocabulary of things

W = 64  # canvas side; 32 is too fragile for an exact verifier under blur (design.md s.2)
COLORS = {
    "red": (220, 40, 40), "orange": (240, 140, 30), "yellow": (235, 215, 40),
    "green": (40, 190, 60), "cyan": (40, 200, 210), "blue": (50, 90, 230),
    "purple": (150, 60, 200), "white": (235, 235, 235),
}
PALETTE = np.array([(0, 0, 0)] + list(COLORS.values()), dtype=np.uint8)  # index 0 = background
SHAPES = ["square", "circle", "triangle", "cross", "bar"]  # bar = 2:1 horizontal rectangle
PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles",
           "cross": "crosses", "bar": "bars"}
SIZES = {"small": (9, 12), "large": (17, 21)}  # bounding size in px (a bar's width; its height is half)
SIZE_SPLIT = 14  # detected max(w, h) <= 14 is small (core boxes do not grow under blur)
RELATIONS = ["left of", "right of", "above", "below"]
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above",
            "left": "right", "right": "left", "top": "bottom", "bottom": "top",
            "small": "large", "large": "small"}
REGIONS = ["left", "right", "top", "bottom"]  # halves of the canvas
GRID = [["top left", "top", "top right"], ["left", "center", "right"],
        ["bottom left", "bottom", "bottom right"]]  # 3x3 cells used by captions
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr",
        "size", "counting_hard", "color_count", "color_region", "text", "knowledge"]
IMAGE_TAGS = [t for t in TAGS if t not in ("knowledge", "counting_hard")]   # the tags pre-training draws images of
GAP = 3         # min background px between objects: survives blur sigma 1 without merging
NUMBER_GAP = 7  # a number keeps further away than the digit grouping reach (6 px)

# knowledge: nouns whose look is learnt only from text facts ("a tomato is a red circle ."),
# never from an image. Distinct (colour, shape) pairs, none of them held out.
ALIASES = {
    "tomato": ("red", "circle"), "lemon": ("yellow", "circle"), "plum": ("purple", "circle"),
    "snowball": ("white", "circle"), "brick": ("red", "bar"), "pool": ("cyan", "bar"),
    "butter": ("yellow", "square"), "sapphire": ("blue", "square"),
    "cone": ("orange", "triangle"), "tree": ("green", "triangle"),
    "hospital": ("red", "cross"), "pharmacy": ("green", "cross"),
}

def fact_text(noun):
    color, shape = ALIASES[noun]
    return f"a {noun} is {_a(color)} {color} {shape} ."

def _a(word):
    return "an" if word[0] in "aeiou" else "a"

# -----------------------------------------------------------------------------
# splits: compositions that no pre-training image ever shows (text is fine)

def _pick_held_pairs(seed=0, n=8):
    # 8 of the 40 (colour, shape) pairs = 20%. At most one per colour and two per shape,
    # so every colour keeps 4 shapes and every shape keeps >= 6 colours to learn from;
    # alias pairs stay in, since the knowledge tag must be drawable in training.
    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    while True:
        held = {pairs[i] for i in rng.choice(len(pairs), n, replace=False)}
        per_color, per_shape = Counter(c for c, _ in held), Counter(s for _, s in held)
        if not held & set(ALIASES.values()) and max(per_color.values()) == 1 \
                and max(per_shape.values()) <= 2:
            return frozenset(held)

def _pick_held_triples(seed=1, n=8):
    # 20% of the (A, relation, B) triples with A != B. "A left of B" and "B right of A" are
    # the same picture (GenEval's rule is antisymmetric), so a triple is held with its
    # inverse: 8 of 40 canonical triples -> 16 of 80. Same-shape triples are never held:
    # holding (square, left of, square) would forbid every side-by-side counting image.
    # One held triple per unordered shape pair, so each pair still has an axis to train on.
    rng = np.random.default_rng(seed)
    canon = [(a, r, b) for a in SHAPES for b in SHAPES if a != b for r in ("left of", "above")]
    while True:
        held = [canon[i] for i in rng.choice(len(canon), n, replace=False)]
        if len({frozenset((a, b)) for a, _, b in held}) == n:
            return frozenset(held + [(b, OPPOSITE[r], a) for a, r, b in held])

HELD_PAIRS = _pick_held_pairs()
HELD_TRIPLES = _pick_held_triples()
HELDOUT_TAGS = ["colors", "position", "color_attr", "color_count", "color_region"]

# -----------------------------------------------------------------------------
# tokenizer: closed word-level vocabulary

SPECIALS = ["<pad>", "<bos>", "<eos>", "<think>", "</think>", "<|vision_start|>", "<|vision_end|>"]
_FIXED_WORDS = """a an and answer at colors correct counts does figure for from give half image in
is judge layout no number objects of or photo please prompt redraw region score show the there
this to whole yes wrong missing extra object color count position shape size center""".split()
_words = set(_FIXED_WORDS) | set(COLORS) | set(SHAPES) | set(PLURALS.values()) \
    | set(COUNT_WORDS.values()) | set(ALIASES) | set(SIZES) | set(REGIONS) \
    | {w for r in RELATIONS for w in r.split()} | {w for row in GRID for p in row for w in p.split()}
VOCAB = SPECIALS + sorted(_words | {str(i) for i in range(100)} | set('"?.,:-'))
STOI = {w: i for i, w in enumerate(VOCAB)}
_TOKEN_RE = re.compile(r"<[^>]+>|[a-z]+|\d+|[^\sa-z\d]")

def tokenize(text):
    return _TOKEN_RE.findall(text.lower())

def encode(text, where=""):
    ids = []
    for tok in tokenize(text):
        if tok not in STOI:
            at = f"{where}: " if where else ""
            raise ValueError(f"{at}word {tok!r} is outside the vocabulary. The vocabulary is closed: "
                             f"see world.VOCAB ({len(VOCAB)} tokens); use one of its words "
                             f"(colours {', '.join(COLORS)}; shapes {', '.join(SHAPES)}; "
                             f"numbers 0-99) / check spelling.")
        ids.append(STOI[tok])
    return ids

def decode(ids):
    return " ".join(VOCAB[int(i)] for i in ids)

# -----------------------------------------------------------------------------
# GenEval's relation rule (geneval/evaluation/evaluate_images.py, relative_position):
# offset between bbox centres, shrunk toward 0 by margin*(dim_A + dim_B) per axis,
# then divided by the *unshrunk* offset length; "left of" holds when that normalised
# x component is < -0.5, etc. Both "left of" and "above" can hold at once (diagonals).

def relations(box_a, box_b, margin=0.1, thresh=0.5):
    """Set of relations that box A has to box B. Boxes are (x0, y0, x1, y1), y grows down."""
    a, b = np.asarray(box_a, float), np.asarray(box_b, float)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - margin * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -thresh: rels.add("left of")
    if dx > thresh: rels.add("right of")
    if dy < -thresh: rels.add("above")
    if dy > thresh: rels.add("below")
    return rels

def in_region(box, region):
    # an object is in a half when its bbox centre is; the renderer keeps the whole box
    # inside the half, so the centre is >= 4.5 px clear of the midline (blur-proof)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return {"left": cx < W / 2, "right": cx > W / 2, "top": cy < W / 2, "bottom": cy > W / 2}[region]

# -----------------------------------------------------------------------------
# drawing: exact pixel masks, no anti-aliasing

def shape_mask(shape, w, h):
    """Bool [h, w] mask of a shape that fills its box exactly (every row/col touched)."""
    x = np.arange(w)[None, :] + 0.5
    y = np.arange(h)[:, None] + 0.5
    if shape in ("square", "bar"):
        return np.ones((h, w), bool)
    if shape == "circle":
        return ((x - w / 2) / (w / 2)) ** 2 + ((y - h / 2) / (h / 2)) ** 2 <= 1
    if shape == "triangle":  # apex up; (y + 0.5) so the apex row has a pixel
        return np.abs(x - w / 2) <= (y + 0.5) / h * w / 2
    if shape == "cross":  # arm thickness ~1/3, parity matched so arms are centred
        tw, th = w // 3 + (w - w // 3) % 2, h // 3 + (h - h // 3) % 2
        m = np.zeros((h, w), bool)
        m[(h - th) // 2:(h - th) // 2 + th, :] = True
        m[:, (w - tw) // 2:(w - tw) // 2 + tw] = True
        return m
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")

def shape_dims(shape, s):
    return (s, s // 2) if shape == "bar" else (s, s)

# 7-segment digits in a 9x17 cell, stroke 3. Every segment spans to the cell edge, so
# segments overlap at joints and each digit is one 4-connected component.
DIGIT_W, DIGIT_H, DIGIT_GAP = 9, 17, 4  # a 4 px gap keeps digits apart up to blur sigma 1.4
_SEGS = {"a": (0, 3, 0, 9), "b": (0, 10, 6, 9), "c": (7, 17, 6, 9), "d": (14, 17, 0, 9),
         "e": (7, 17, 0, 3), "f": (0, 10, 0, 3), "g": (7, 10, 0, 9)}  # rows y0:y1, cols x0:x1
_DIGITS = {"0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg",
           "5": "acdfg", "6": "acdefg", "7": "abc", "8": "abcdefg", "9": "abcdfg"}
_SEG_PROBE = {"a": (3, 6, 0, 3), "b": (6, 9, 3, 7), "c": (6, 9, 10, 14), "d": (3, 6, 14, 17),
              "e": (0, 3, 10, 14), "f": (0, 3, 3, 7), "g": (3, 6, 7, 10)}  # stroke middles x0,x1,y0,y1
_PATTERN_TO_DIGIT = {"".join(sorted(v)): k for k, v in _DIGITS.items()}

def number_mask(text):
    """Bool mask of a 0-99 number in 7-segment digits: glyphs cropped to their pixels (a "1"
    is 3 px wide) and joined with DIGIT_GAP px, so digit spacing never depends on the digit."""
    glyphs = []
    for ch in text:
        g = np.zeros((DIGIT_H, DIGIT_W), bool)
        for seg in _DIGITS[ch]:
            y0, y1, x0, x1 = _SEGS[seg]
            g[y0:y1, x0:x1] = True
        cols = np.nonzero(g.any(0))[0]
        glyphs += [g[:, cols[0]:cols[-1] + 1], np.zeros((DIGIT_H, DIGIT_GAP), bool)]
    return np.concatenate(glyphs[:-1], axis=1)

def draw(scene):
    """Scene (list of object dicts) -> uint8 image [64, 64, 3]."""
    img = np.zeros((W, W, 3), np.uint8)
    for o in scene:
        x0, y0, x1, y1 = o["box"]
        m = number_mask(o["text"]) if o["shape"] == "number" else shape_mask(o["shape"], x1 - x0, y1 - y0)
        assert m.shape == (y1 - y0, x1 - x0), f"box {o['box']} does not fit {o['shape']}"
        img[y0:y1, x0:x1][m] = COLORS[o["color"]]
    return img

def blur(img, sigma):
    """Separable Gaussian blur (reflect padding), the robustness test's degradation."""
    r = max(1, int(3 * sigma + 0.5))
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    f = img.astype(np.float32)
    for axis in (0, 1):
        pad = [(r, r) if a == axis else (0, 0) for a in range(f.ndim)]
        p = np.pad(f, pad, mode="reflect")
        n = f.shape[axis]
        f = sum(k[i] * np.take(p, np.arange(i, i + n), axis=axis) for i in range(2 * r + 1))
    return np.clip(np.rint(f), 0, 255).astype(np.uint8) if img.dtype == np.uint8 else f

def downup(img, phase=0, smooth=True):
    """2x2 average-pool then 2x upsample (bilinear if smooth, else blocky nearest): what a
    decoder working at half resolution does to edges. phase (py, px) in {0,1}^2 (or one int
    for both) shifts the pooling grid."""
    f = img.astype(np.float32)
    py, px = (phase, phase) if np.isscalar(phase) else phase
    if py or px:
        f = np.pad(f, [(py, 2 - py), (px, 2 - px)] + [(0, 0)] * (f.ndim - 2), mode="edge")
    h, w = f.shape[0] // 2 * 2, f.shape[1] // 2 * 2
    s = f[:h, :w].reshape(h // 2, 2, w // 2, 2, *f.shape[2:]).mean((1, 3))
    for axis in (0, 1):
        if smooth:  # half-pixel centres: out[2k] = .75 s[k] + .25 s[k-1], out[2k+1] = .75 s[k] + .25 s[k+1]
            prev = np.concatenate([np.take(s, [0], axis), np.take(s, np.arange(s.shape[axis] - 1), axis)], axis)
            nxt = np.concatenate([np.take(s, np.arange(1, s.shape[axis]), axis), np.take(s, [-1], axis)], axis)
            s = np.stack([0.75 * s + 0.25 * prev, 0.75 * s + 0.25 * nxt], axis + 1)
            s = s.reshape(s.shape[:axis] + (-1,) + s.shape[axis + 2:])
        else:
            s = s.repeat(2, axis)
    if py or px:
        s = s[py:py + img.shape[0], px:px + img.shape[1]]
    return np.clip(np.rint(s), 0, 255).astype(np.uint8) if img.dtype == np.uint8 else s

# -----------------------------------------------------------------------------
# prompt grammar: specs in GenEval's format

def sample_spec(tag, rng, holdout="train"):
    """A random spec of `tag`. holdout: "train" never needs a held pair/triple, "heldout"
    always does (for the tags that can), "any" is unrestricted."""
    assert holdout in ("train", "heldout", "any"), holdout
    for _ in range(10000):
        spec = _sample_spec(tag, rng)
        held = uses_heldout(spec)
        if holdout == "train" and held:
            continue
        if holdout == "heldout" and tag in HELDOUT_TAGS and not held:
            continue
        return spec
    raise RuntimeError(f"could not sample a {tag} spec with holdout={holdout}")

def _sample_spec(tag, rng):
    pick = lambda xs: _pick(rng, xs)
    two = lambda xs: [xs[i] for i in rng.choice(len(xs), 2, replace=False)]
    colors, inc, exc = list(COLORS), [], []
    if tag == "single_object":
        s = pick(SHAPES)
        prompt, inc = f"a photo of a {s}", [{"class": s, "count": 1}]
    elif tag == "two_object":
        a, b = two(SHAPES)
        prompt, inc = f"a photo of a {a} and a {b}", [{"class": a, "count": 1}, {"class": b, "count": 1}]
    elif tag in ("counting", "counting_hard", "color_count"):
        s, n = pick(SHAPES), int(rng.integers(5, 7) if tag == "counting_hard" else rng.integers(2, 5))
        inc, exc = [{"class": s, "count": n}], [{"class": s, "count": n + 1}]  # GenEval: exactly n
        if tag == "color_count":
            c = pick(colors)
            inc[0]["color"] = c
            prompt = f"a photo of {COUNT_WORDS[n]} {c} {PLURALS[s]}"
        else:
            prompt = f"a photo of {COUNT_WORDS[n]} {PLURALS[s]}"
    elif tag == "colors":
        s, c = pick(SHAPES), pick(colors)
        prompt, inc = f"a photo of {_a(c)} {c} {s}", [{"class": s, "count": 1, "color": c}]
    elif tag == "position":  # GenEval order: the anchor B is item 0, A carries [relation, 0]
        a, b = two(SHAPES)
        rel = pick(RELATIONS)
        prompt = f"a photo of a {a} {rel} a {b}"
        inc = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}]
    elif tag == "color_attr":
        (a, b), (c1, c2) = two(SHAPES), two(colors)
        prompt = f"a photo of {_a(c1)} {c1} {a} and {_a(c2)} {c2} {b}"
        inc = [{"class": a, "count": 1, "color": c1}, {"class": b, "count": 1, "color": c2}]
    elif tag == "size":  # the two shapes may be equal: "a large circle and a small circle"
        a, b = pick(SHAPES), pick(SHAPES)
        s1 = pick(list(SIZES))
        s2 = OPPOSITE[s1]
        prompt = f"a photo of a {s1} {a} and a {s2} {b}"
        inc = [{"class": a, "count": 1, "size": s1}, {"class": b, "count": 1, "size": s2}]
    elif tag == "color_region":
        s, c, r = pick(SHAPES), pick(colors), pick(REGIONS)
        prompt = f"a photo of {_a(c)} {c} {s} in the {r} half"
        inc = [{"class": s, "count": 1, "color": c, "region": r}]
    elif tag == "text":
        n = str(int(rng.integers(100)))
        prompt, inc = f"a photo of the number {n}", [{"class": "number", "count": 1, "text": n}]
    elif tag == "knowledge":
        noun = pick(sorted(ALIASES))
        c, s = ALIASES[noun]
        prompt, inc = f"a photo of a {noun}", [{"class": s, "count": 1, "color": c}]
    else:
        raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")
    return {"tag": tag, "prompt": prompt, "include": inc, "exclude": exc}

def uses_heldout(spec):
    """Does the spec ask for a held-out (colour, shape) pair or (shape, relation, shape) triple?"""
    inc = spec["include"]
    if any((it.get("color"), it["class"]) in HELD_PAIRS for it in inc):
        return True
    return any((it["class"], it["position"][0], inc[it["position"][1]]["class"]) in HELD_TRIPLES
               for it in inc if "position" in it)

# -----------------------------------------------------------------------------
# renderer: a random scene that satisfies a spec exactly

def _colors_for(shape, holdout):
    return [c for c in COLORS if holdout != "train" or (c, shape) not in HELD_PAIRS]

def _layout(protos, rng, holdout, rels=(), tries=300):
    """Place objects. protos: dicts with shape/color/size/text and optional region;
    rels: (i, relation, j) that must hold between objects i and j. Returns a scene or None."""
    p_large = 0.5 if len(protos) <= 3 else 0.3 if len(protos) == 4 else 0.15  # crowded -> smaller
    for _ in range(tries):
        scene = []
        for p in protos:
            o = {"shape": p["shape"], "color": p["color"], "size": p.get("size")}
            if p["shape"] == "number":
                o["text"], o["size"] = p["text"], None
                h, w = number_mask(p["text"]).shape
            else:
                o["size"] = o["size"] or ("large" if rng.random() < p_large else "small")
                w, h = shape_dims(p["shape"], int(rng.integers(SIZES[o["size"]][0], SIZES[o["size"]][1] + 1)))
            xlo, xhi, ylo, yhi = 1, W - 1 - w, 1, W - 1 - h  # 1 px border keeps blur symmetric
            region = p.get("region")
            if region == "left": xhi = W // 2 - w
            if region == "right": xlo = W // 2
            if region == "top": yhi = W // 2 - h
            if region == "bottom": ylo = W // 2
            for _ in range(60):
                x0, y0 = int(rng.integers(xlo, xhi + 1)), int(rng.integers(ylo, yhi + 1))
                box = (x0, y0, x0 + w, y0 + h)
                if all(_gap(box, q["box"]) >= (NUMBER_GAP if "number" in (o["shape"], q["shape"]) else GAP)
                       for q in scene):
                    break
            else:
                break  # no room: start the scene over (sizes are redrawn too)
            o["box"] = box
            scene.append(o)
        if len(scene) < len(protos):
            continue
        # a strict margin for requested relations, so blur (which moves box edges ~1 px)
        # never flips them under the exact GenEval rule
        if not all(r in relations(scene[i]["box"], scene[j]["box"], 0.15, 0.6) for i, r, j in rels):
            continue
        if holdout == "train" and _has_held_triple(scene):
            continue
        return scene
    return None

def _gap(a, b):
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])

def _has_held_triple(scene):
    # a loose rule (margin 0.05, thresh 0.45): borderline arrangements count as held too
    return any((a["shape"], r, b["shape"]) in HELD_TRIPLES
               for a in scene for b in scene if a is not b
               for r in relations(a["box"], b["box"], 0.05, 0.45))

def render(spec, rng, holdout="train"):
    """-> (img uint8 [64, 64, 3], scene) with the scene satisfying `spec` exactly.
    holdout="train": no object uses a held pair and no two objects form a held triple."""
    if holdout == "train" and uses_heldout(spec):
        raise ValueError(f"spec {spec['prompt']!r} needs a held-out composition; render it with holdout='any'")
    protos, owner = [], []
    for i, it in enumerate(spec["include"]):
        for _ in range(it["count"]):
            p = {"shape": it["class"], "size": it.get("size"), "region": it.get("region"),
                 "text": it.get("text"), "color": it.get("color")}
            owner.append(i)
            protos.append(p)
    rels = [(a, it["position"][0], b) for i, it in enumerate(spec["include"]) if "position" in it
            for a in range(len(protos)) if owner[a] == i
            for b in range(len(protos)) if owner[b] == it["position"][1]]
    for _ in range(50):
        for p in protos:
            if p["color"] is None or p.get("_random"):
                p["color"], p["_random"] = _pick(rng, _colors_for(p["shape"], holdout)), True
        scene = _layout(protos, rng, holdout, rels)
        if scene is not None:
            return draw(scene), scene
    raise RuntimeError(f"could not render {spec['prompt']!r}")

def _pick(rng, xs):
    return xs[int(rng.integers(len(xs)))]

def random_scene(rng, holdout="train"):
    """1-4 random objects, sometimes (1 in 8) one of them a number."""
    while True:
        protos = []
        for k in range(int(rng.integers(1, 5))):
            if k == 0 and rng.random() < 0.125:
                protos.append({"shape": "number", "text": str(int(rng.integers(100))),
                               "color": _pick(rng, list(COLORS))})
            else:
                s = _pick(rng, SHAPES)
                protos.append({"shape": s, "color": _pick(rng, _colors_for(s, holdout))})
        scene = _layout(protos, rng, holdout)
        if scene is not None:
            return scene

def negative(spec, rng, holdout="any"):
    """-> (img, kind, scene): a render that breaks exactly one constraint of `spec`."""
    inc = spec["include"]
    kinds = ["extra object", "shape swap"] if inc[0]["class"] != "number" else ["extra object", "wrong digit"]
    if len(inc) > 1 or inc[0]["count"] == 1: kinds.append("missing object")
    if spec["tag"] in ("single_object", "counting", "counting_hard", "color_count"): kinds.append("count")
    if any("color" in it for it in inc): kinds.append("wrong color")
    if any("position" in it for it in inc): kinds.append("reversed relation")
    if len(inc) > 1 and inc[0].get("color", 0) != inc[1].get("color", 0): kinds.append("swapped colors")
    if any("size" in it for it in inc):
        kinds.append("wrong size")
        if inc[0]["class"] != inc[1]["class"]: kinds.append("swapped sizes")
    if any("region" in it for it in inc): kinds.append("wrong region")
    for _ in range(100):  # holdout="train": retry until the broken spec is itself trainable
        kind, bad = _pick(rng, kinds), json.loads(json.dumps(spec))  # deep copy
        _break(kind, bad["include"], rng)
        bad["exclude"] = []
        if holdout != "train" or not uses_heldout(bad):
            break
    else:
        raise ValueError(f"no trainable negative for {spec['prompt']!r}")
    if not bad["include"]:
        return np.zeros((W, W, 3), np.uint8), kind, []
    img, scene = render(bad, rng, holdout)
    return img, kind, scene

def _break(kind, items, rng):
    """Edit include items in place so that they contradict the original in one way."""
    i = int(rng.integers(len(items)))
    if kind == "extra object":  # a shape no item asks for
        s = _pick(rng, [s for s in SHAPES if s not in {it["class"] for it in items}])
        items.append({"class": s, "count": 1})
    elif kind == "shape swap":
        items[i]["class"] = _pick(rng, [s for s in SHAPES if s not in {it["class"] for it in items}])
    elif kind == "missing object":
        del items[i]
        for it in items: it.pop("position", None)
    elif kind == "count":
        n = items[0]["count"]
        items[0]["count"] = n + 1 if n == 1 or rng.random() < 0.5 else n - 1
    elif kind == "wrong color":
        it = _pick(rng, [it for it in items if "color" in it])
        it["color"] = _pick(rng, [c for c in COLORS if c != it["color"]])
    elif kind == "reversed relation":
        it = _pick(rng, [it for it in items if "position" in it])
        it["position"][0] = OPPOSITE[it["position"][0]]
    elif kind == "swapped colors":
        items[0]["color"], items[1]["color"] = items[1]["color"], items[0]["color"]
    elif kind == "wrong size":  # both the same size
        items[i]["size"] = items[1 - i]["size"]
    elif kind == "swapped sizes":
        items[0]["size"], items[1]["size"] = items[1]["size"], items[0]["size"]
    elif kind == "wrong region":
        items[0]["region"] = OPPOSITE[items[0]["region"]]
    elif kind == "wrong digit":  # change one digit
        t = items[0]["text"]
        k = int(rng.integers(len(t)))
        d = _pick(rng, [d for d in "0123456789" if d != t[k] and not (k == 0 and len(t) > 1 and d == "0")])
        items[0]["text"] = t[:k] + d + t[k + 1:]

# -----------------------------------------------------------------------------
# detector: threshold -> connected components -> colour vote -> shape by template IoU

FG_THRESH = 72  # max channel; a 3 px gap between objects stays background up to blur sigma 1.4
MIN_AREA = 12   # smaller components are noise
_PAL_N = PALETTE[1:].astype(np.float32) / PALETTE[1:].max(1, keepdims=True)  # max-normalised hues
_GRID_N = 16    # component masks are compared to templates on a 16x16 grid

def _components(fg):
    """4-connected components by run-length union-find (fast in numpy + a short Python loop).
    Returns per-run (y, x0, x1, label) arrays and the number of components."""
    p = np.zeros((W, W + 2), np.int8)
    p[:, 1:-1] = fg
    d = np.diff(p, axis=1)
    ry, rx0 = np.nonzero(d == 1)
    rx1 = np.nonzero(d == -1)[1]
    starts = np.searchsorted(ry, np.arange(W + 1)).tolist()
    x0s, x1s = rx0.tolist(), rx1.tolist()
    parent = list(range(len(x0s)))  # union-find; a parent always has a smaller index

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for y in range(1, W):  # merge runs of row y-1 and row y that overlap in x (4-connected)
        i, ie, j, je = starts[y - 1], starts[y], starts[y], starts[y + 1]
        while i < ie and j < je:
            if x0s[i] < x1s[j] and x0s[j] < x1s[i]:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if x1s[i] < x1s[j]: i += 1
            else: j += 1
    lab, ids = [], {}
    for i, par in enumerate(parent):  # parents precede children: one pass resolves all roots
        root = i if par == i else parent[par]
        parent[i] = root
        lab.append(ids.setdefault(root, len(ids)))
    return ry, rx0, rx1, np.array(lab, np.int64), len(ids)

def _to_grid(mask):  # nearest-pixel resample to 16x16, index tables cached per size
    h, w = mask.shape
    if (h, w) not in _GRID_IDX:
        r = ((np.arange(_GRID_N) + 0.5) * h / _GRID_N).astype(int)
        c = ((np.arange(_GRID_N) + 0.5) * w / _GRID_N).astype(int)
        _GRID_IDX[h, w] = (r[:, None] * w + c[None, :]).reshape(-1)
    return mask.reshape(-1)[_GRID_IDX[h, w]]
_GRID_IDX = {}

def _core(values, labels, k):
    """Bool image of each component's core: value > REL_THRESH * the component's peak. Blur
    spreads an object into a halo of dimmer pixels; cutting at a fraction of the peak (not at
    a fixed level) gives back the drawn extent for every colour, so boxes, sizes and shapes
    are blur-invariant. sigma 1: a pixel just outside an edge keeps 0.31 of the peak (off), a
    square's corner pixel 0.48 (on), a 3 px stroke's centre 0.87 (on).
    values: [H, W] max channel; labels: [H, W] component id, -1 for background."""
    on = labels >= 0
    peak = np.zeros(k, np.float32)
    np.maximum.at(peak, labels[on], values[on])
    m = on & (values > REL_THRESH * peak[labels])
    # prune spurs (pixels with < 2 of 4 neighbours): one stray edge pixel would otherwise
    # grow the box by 1 px and skew size, aspect and template IoU. (Components never touch,
    # so neighbour counts never mix two objects.)
    p = np.zeros((m.shape[0] + 2, m.shape[1] + 2), np.int8)
    p[1:-1, 1:-1] = m
    pruned = m & (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] >= 2)
    alive = np.bincount(labels[pruned], minlength=k) > 0
    return pruned | (m & ~alive[labels])  # a component pruning would erase keeps its pixels

def _template_core(values):  # one object alone on a canvas -> its tight core mask
    m = _core(values, np.where(values > FG_THRESH, 0, -1), 1)
    ys, xs = np.nonzero(m)
    return m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]

def _make_templates():
    # Each shape at every size 9-25 px: clean, blurred (sigma 0.7/1/1.4) and passed through a
    # half-resolution bottleneck (downup, 4 grid phases, smooth and blocky), then cut by
    # _core() as detect() does: blur still fills a cross's inner corners and rounds a
    # triangle's apex. Sizes below 9 are left out on purpose: a blurred 7 px square *is*
    # a 9 px circle. Compared on a 16x16 grid, among templates of about the same size.
    rows, labels, dims = [], [], []
    for si, name in enumerate(SHAPES):
        for s in range(9, 26):
            m = shape_mask(name, *shape_dims(name, s))
            p = np.pad(m * 220.0, 4)
            variants = [_template_core(p)] + [_template_core(blur(p, sigma)) for sigma in (0.7, 1.0, 1.4)] + \
                [_template_core(downup(p, (py, px), smooth)) for py in (0, 1) for px in (0, 1) for smooth in (True, False)]
            for f in variants:
                rows.append(_to_grid(f))
                labels.append(si)
                dims.append(f.shape[::-1])
    return np.array(rows, np.float32), np.array(labels), np.array(dims)
REL_THRESH = 0.42
_TEMPLATES, _TEMPLATE_SHAPE, _TEMPLATE_DIMS = _make_templates()
_T_AREA = _TEMPLATES.sum(1)
_IS_BAR = _TEMPLATE_SHAPE == SHAPES.index("bar")
_ELIGIBLE = {}  # (w, h) -> (indices, templates, areas) it may be compared with
UNKNOWN_IOU = 0.75  # below this best template IoU the blob is "unknown" (never matches a request)

def _classify(mask):
    """Shape of a core mask -> (shape, iou): best IoU among the templates whose box is within
    1 px of the mask's (so aspect counts: a bar is never compared with a square); sizes no
    template has (model outputs) compare with every template of the same aspect family."""
    h, w = mask.shape
    if (w, h) not in _ELIGIBLE:
        near = np.abs(_TEMPLATE_DIMS - (w, h)).max(1) <= 1
        idx = np.nonzero(near if near.any() else _IS_BAR == (w / h > 1.5))[0]  # odd sizes: by aspect
        _ELIGIBLE[w, h] = idx, _TEMPLATES[idx], _T_AREA[idx]
    idx, T, area = _ELIGIBLE[w, h]
    g = _to_grid(mask).astype(np.float32)
    inter = T @ g
    iou = inter / (area + g.sum() - inter)
    k = int(iou.argmax())
    iou, k = iou[k], idx[k]
    return (SHAPES[_TEMPLATE_SHAPE[k]] if iou >= UNKNOWN_IOU else "unknown"), float(iou)

def _read_digit(v):
    """7-segment reading of a digit's values in its core box (peak = 1): a segment is on when
    the mean over the middle of its stroke (away from the joints) is over half the peak.
    Means, not single pixels, so a 1 px shift of the box (blur, half-res decoders) or blur's
    halo beside a lit stroke does not flip a segment."""
    h, w = v.shape
    if w / h < 0.4:  # a lone vertical stroke
        return "1"
    sx, sy = w / DIGIT_W, h / DIGIT_H
    on = "".join(s for s, (x0, x1, y0, y1) in _SEG_PROBE.items()
                 if v[int(y0 * sy + 0.5):max(int(y0 * sy + 0.5) + 1, int(y1 * sy + 0.5)),
                      int(x0 * sx + 0.5):max(int(x0 * sx + 0.5) + 1, int(x1 * sx + 0.5))].mean() > 0.5)
    return _PATTERN_TO_DIGIT.get(on)

def detect(img):
    """-> list of objects {box, area, color, shape, size, text}. Numbers have shape "number",
    size None and text the digits read (None if unreadable); unreadable blobs have shape
    "unknown". Foreground = max channel > FG_THRESH, split into 4-connected components
    (4- not 8-connectivity: diagonal touches never merge neighbours); components under
    MIN_AREA px are noise. Boxes are (x0, y0, x1, y1), end-exclusive, of each core mask."""
    img = np.asarray(img)
    assert img.shape == (W, W, 3), f"detect expects a {W}x{W} RGB image, got {img.shape}"
    mx = np.maximum(np.maximum(img[..., 0], img[..., 1]), img[..., 2])
    fg = mx > FG_THRESH
    ry, rx0, rx1, lab, k = _components(fg)
    if k == 0:
        return []
    lens = rx1 - rx0
    area = np.bincount(lab, weights=lens, minlength=k)
    # colour: every foreground pixel votes for the nearest max-normalised palette hue,
    # so blur toward the black background (which scales all channels) keeps its vote
    pix_lab = np.repeat(lab, lens)
    px = img[fg].astype(np.float32) / mx[fg][:, None]
    hue = (px @ (2 * _PAL_N.T) - (_PAL_N ** 2).sum(1)).argmax(1)  # = argmin squared distance
    votes = np.bincount(pix_lab * 8 + hue, minlength=k * 8).reshape(k, 8)
    labimg = np.full((W, W), -1, np.int32)
    labimg[fg] = pix_lab
    core = _core(mx, labimg, k)
    cy, cx = np.nonzero(core)
    cl = labimg[cy, cx]
    x0 = np.full(k, W); np.minimum.at(x0, cl, cx)
    y0 = np.full(k, W); np.minimum.at(y0, cl, cy)
    x1 = np.zeros(k, int); np.maximum.at(x1, cl, cx + 1)
    y1 = np.zeros(k, int); np.maximum.at(y1, cl, cy + 1)
    objs, digits = [], []
    color_names = list(COLORS)
    for c in np.nonzero(area >= MIN_AREA)[0]:
        box = (int(x0[c]), int(y0[c]), int(x1[c]), int(y1[c]))
        sl = (slice(box[1], box[3]), slice(box[0], box[2]))
        mask = core[sl] & (labimg[sl] == c)
        o = {"box": box, "area": int(area[c]), "color": color_names[int(votes[c].argmax())]}
        w, h = box[2] - box[0], box[3] - box[1]
        if w / h < 0.66:  # tall: a 7-segment digit (every shape is square or wide)
            v = np.where(labimg[sl] == c, mx[sl], 0).astype(np.float32)
            o.update(shape="number", size=None, text=_read_digit(v / v.max()))
            digits.append(o)
        else:
            o.update(shape=_classify(mask)[0], size="small" if max(w, h) <= SIZE_SPLIT else "large")
            objs.append(o)
    # group digits left to right into numbers: same colour, shared rows, gap <= 6 px
    numbers = []
    for o in sorted(digits, key=lambda o: o["box"][0]):
        for n in numbers:
            b = n["box"]
            if n["color"] == o["color"] and 0 <= o["box"][0] - b[2] <= 6 and \
                    min(b[3], o["box"][3]) - max(b[1], o["box"][1]) > 0.5 * (o["box"][3] - o["box"][1]):
                n["box"] = (b[0], min(b[1], o["box"][1]), o["box"][2], max(b[3], o["box"][3]))
                n["area"] += o["area"]
                n["text"] = n["text"] + o["text"] if n["text"] is not None and o["text"] is not None else None
                break
        else:
            numbers.append(o)
    return objs + numbers

# -----------------------------------------------------------------------------
# verifier: GenEval's clause logic on detected objects + a strict no-extra-objects rule

PROBLEMS = {"color": "the color is wrong", "count": "the count is wrong",
            "position": "the position is wrong", "shape": "the shape is wrong",
            "missing": "an object is missing", "extra": "there is an extra object",
            "size": "the size is wrong", "text": "the number is wrong",
            "region": "the region is wrong", "ok": "the image is correct"}

def _satisfies(o, it, key):
    if key == "region":
        return in_region(o["box"], it["region"])
    return o.get(key) == it[key]

def verify(spec, img):
    """-> dict(correct, soft, objects, region_map, checks, problem).
    Each detected object is assigned to at most one include item: first to items it fully
    satisfies (class + colour/size/region/text), then to items of its class it gets wrong.
    Atomic checks: per item its count, each attribute, its position; GenEval's excludes;
    and "extra": every detected object must belong to some item (against reward hacking
    by drawing everything). soft = fraction of checks passed."""
    return verify_objects(spec, detect(img))

def verify_objects(spec, objs):
    """verify's clause logic on a given object list (detect's format; plan_verdict passes a plan's)."""
    items = spec["include"]
    owner, got = [None] * len(objs), [[] for _ in items]
    attrs = [[k for k in ("color", "size", "text", "region") if k in it] for it in items]
    full = lambda o, i: o["shape"] == items[i]["class"] and all(_satisfies(o, items[i], k) for k in attrs[i])
    for strict in (True, False):
        for i, it in enumerate(items):
            for k, o in enumerate(objs):
                if owner[k] is None and len(got[i]) < it["count"] and (full(o, i) if strict else o["shape"] == it["class"]):
                    owner[k] = i
                    got[i].append(k)
    checks, kinds, pos_ok = [], [], [True] * len(items)
    def check(kind, i, ok):
        checks.append((f"{kind}:{i}" if i is not None else kind, bool(ok)))
        kinds.append(kind)
    for i, it in enumerate(items):
        found = [objs[k] for k in got[i]]
        check("count" if it["count"] > 1 else "presence", i, len(found) == it["count"])
        for key in attrs[i]:
            check(key, i, found and all(_satisfies(o, it, key) for o in found))
        if "position" in it:
            rel, j = it["position"]
            anchors = [objs[k] for k in got[j]]
            pos_ok[i] = bool(found and anchors and all(rel in relations(o["box"], a["box"]) for o in found for a in anchors))
            check("position", i, pos_ok[i])
    for e, ex in enumerate(spec.get("exclude", [])):
        check("exclude", e, sum(o["shape"] == ex["class"] for o in objs) < ex["count"])
    check("extra", None, all(ow is not None for ow in owner))
    region_map = np.zeros((W, W), np.int8)
    for k, o in enumerate(objs):
        i = owner[k]
        o["item"] = i
        o["verdict"] = 1 if i is not None and full(o, i) and pos_ok[i] else -1
    for v in (1, -1):  # wrong objects painted last so they win where boxes overlap
        for o in objs:
            if o["verdict"] == v:
                x0, y0, x1, y1 = o["box"]
                region_map[y0:y1, x0:x1] = v
    correct = all(ok for _, ok in checks)
    problem = "ok"
    for (name, ok), kind in zip(checks, kinds):
        if not ok:
            problem = {"presence": "shape" if None in owner else "missing", "exclude": "count"}.get(kind, kind)
            break
    return {"correct": correct, "soft": sum(ok for _, ok in checks) / len(checks), "objects": objs,
            "region_map": region_map, "checks": checks, "problem": PROBLEMS[problem]}

# -----------------------------------------------------------------------------
# text formats: captions (= think-mode plans), VQA, judge prompts, reflections

def _cell(box):
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(2, int(cy * 3 / W)), min(2, int(cx * 3 / W)), cy, cx

def caption(scene, detail=False):
    """Complete enough to redraw: every object's size, colour, shape and 3x3 cell, in
    reading order (cell row, cell column, then exact centre). detail: each chunk also ends
    with the object's centre in pixels, "x y" (0-63, rounded): what a decoder can use to
    place it exactly and the short form leaves out (Unified-GRPO's richer caption)."""
    parts = []
    for o in sorted(scene, key=lambda o: _cell(o["box"])):
        r, c, cy, cx = _cell(o["box"])
        at = f"at the {GRID[r][c]}" + (f" {int(cx + 0.5)} {int(cy + 0.5)}" if detail else "")
        if o["shape"] == "number":
            parts.append(f"the number {o['text']} in {o['color']} {at}")
        else:
            parts.append(f"a {o['size']} {o['color']} {o['shape']} {at}")
    return " , ".join(parts) + " ."

plan_text = caption

_POS_NAMES = {p for row in GRID for p in row}

def split_centre(words):
    """A caption chunk's words -> (its words without the centre, the detailed form's (x, y) or None):
    the detailed form ends a chunk with two numbers ("... at the top 31 9")."""
    if len(words) > 2 and words[-1].isdigit() and words[-2].isdigit():
        return words[:-2], (int(words[-2]), int(words[-1]))
    return words, None


def parse_caption(text):
    """Best-effort inverse of caption(): list of {shape, color, size, pos, text, centre} for every
    chunk that parses (malformed chunks are skipped), or None if none does. centre: the detailed
    form's (x, y) in pixels, None for a short chunk."""
    out = []
    for chunk in text.strip().rstrip(".").split(","):
        t, centre = split_centre(chunk.split())
        if len(t) >= 7 and t[:2] == ["the", "number"] and t[3] == "in" and t[5:7] == ["at", "the"]:
            o = {"shape": "number", "color": t[4], "size": None, "pos": " ".join(t[7:]), "text": t[2]}
        elif len(t) >= 6 and t[0] == "a" and t[4:6] == ["at", "the"]:
            o = {"shape": t[3], "color": t[2], "size": t[1], "pos": " ".join(t[6:]), "text": None}
        else:
            continue
        if o["color"] in COLORS and o["pos"] in _POS_NAMES and (
                o["shape"] == "number" and o["text"].isdigit() or o["shape"] in SHAPES and o["size"] in SIZES):
            out.append(dict(o, centre=centre))
    return out or None

def caption_key(o):
    r, c, _, _ = _cell(o["box"])
    return (o["shape"], o["color"], o.get("size"), GRID[r][c], o.get("text"))

def caption_score(text, scene):
    """F1 between the objects a caption names and the scene's objects (exact tuples)."""
    parsed = parse_caption(text) or []
    got = Counter((o["shape"], o["color"], o["size"], o["pos"], o["text"]) for o in parsed)
    want = Counter(caption_key(o) for o in scene)
    denom = sum(got.values()) + sum(want.values())
    return 2 * sum((got & want).values()) / denom if denom else 1.0

def vqa_question(prompt):
    return f'does this figure show " {prompt} " ? please answer yes or no .'

def global_judge_prompt(prompt):  # SRUM Table 7 (global layout reward), in the world's words: the layout only
    return f'judge the layout of the whole image for the prompt " {prompt} " . give a score from - 1 to 1 .'

def region_judge_prompt(prompt, box):  # SRUM Table 8 (per-region reward), one region per query
    x0, y0, x1, y1 = (min(W - 1, max(0, int(v))) for v in box)
    return f'judge the region {x0} {y0} {x1} {y1} for the prompt " {prompt} " . give a score from - 1 to 1 .'

SCORE_GRID = (-1.0, -0.5, 0.0, 0.5, 1.0)

def format_score(s):
    s = min(SCORE_GRID, key=lambda g: abs(g - s))
    return {-1.0: "-1", -0.5: "-0.5", 0.0: "0", 0.5: "0.5", 1.0: "1"}[s]

def score_text(s):
    return f"score : {format_score(s)}"

def parse_score(text):
    """Reads "score : -0.5" (also as decoded tokens "score : - 0 . 5"); None if absent."""
    m = re.search(r"score:(-?\d+(?:\.\d+)?)", text.replace(" ", ""))
    return max(-1.0, min(1.0, float(m.group(1)))) if m else None

def judge_scores(spec, img):
    """The ideal judge on SRUM's rubric (paper tables 7-8, on the 5-point SCORE_GRID):
    (g, [(box, s_i)] for the 5 largest detected objects).
    g, the global score, judges the layout only (table 7), from the spec's spatial clauses (a relation
    "left of", a region "in the top half"):
       1     every spatial clause holds                    (perfect alignment with the spatial intent)
       0.5   some hold, some do not                        (mostly correct layout, minor flaws)
      -0.5   none holds, its objects all drawn             (incorrect layout: the paper's reversed relation, -0.7)
      -1     none holds, an object it places is missing    (fundamentally contradicts the intent)
       0     the prompt has no spatial clause              (neutral: nothing to arrange)
    s_i, a region's score, on the strict scale (table 8):
       1     the object is what its prompt item asks for, where it asks (full marks only beyond doubt)
      -0.5   an object of an asked class with a wrong colour, size, digit, region or place (severe flaw)
      -1     an object no item asks for (an extra or excluded one: it contradicts the prompt)"""
    v = verify(spec, img)
    layout = [(name, ok) for name, ok in v["checks"] if name.split(":")[0] in ("position", "region")]
    if not layout:
        g = 0.0
    elif all(ok for _, ok in layout):
        g = 1.0
    elif any(ok for _, ok in layout):
        g = 0.5
    else:   # -1 when an item a failed clause places (or, for a relation, its anchor) has no object at all
        placed = {int(n.split(":")[1]) for n, _ in layout}
        placed |= {spec["include"][i]["position"][1] for i in placed if "position" in spec["include"][i]}
        missing = {i for i, it in enumerate(spec["include"]) if sum(o.get("item") == i for o in v["objects"]) == 0}
        g = -1.0 if placed & missing else -0.5
    top = sorted(v["objects"], key=lambda o: -o["area"])[:5]
    return g, [(o["box"], 1.0 if o["verdict"] == 1 else -0.5 if o["item"] is not None else -1.0) for o in top]

def plan_objects(text):
    """The objects a plan (caption) names, as detect would report them had the plan been drawn at its
    cells' centres: each box centred in its 3x3 cell, at the middle of its size's range (a number's
    digits at their cell width). Text after </think> is ignored; unparsable chunks are dropped."""
    objs = []
    for o in parse_caption(text.split("</think>")[0]) or []:
        r, c = next((i, row.index(o["pos"])) for i, row in enumerate(GRID) if o["pos"] in row)
        cx, cy = (c + 0.5) * W / 3, (r + 0.5) * W / 3
        if o["shape"] == "number":
            w, h = len(o["text"]) * (DIGIT_W + DIGIT_GAP) - DIGIT_GAP, DIGIT_H
        else:
            w, h = shape_dims(o["shape"], sum(SIZES[o["size"]]) // 2)
        x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
        objs.append({"box": (x0, y0, x0 + w, y0 + h), "area": w * h, "color": o["color"], "shape": o["shape"],
                     "size": o["size"], "text": o["text"]})
    return objs

def plan_verdict(spec, text):
    """Is a think-mode plan right for spec, before anything is drawn? verify's clause logic on the
    plan's objects (plan_objects). The grid is coarser than pixels, so one case reads wrong although
    some drawing of the plan could pass: two objects in one cell have no relation between them. A
    middle-column (row) object leans into the half the spec asks for, since its cell spans the midline
    and the plan leaves the half to the drawing. Renders' own plans pass 97-98.5% (position, 200 specs
    per tag) and 100% (every other tag) of the time; world.negative's scenes' plans fail 100% (color_region:
    94%, a wrong half in the middle column is the drawing's to decide)."""
    objs = plan_objects(text)
    lean = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}
    for it in spec["include"]:
        if "region" in it:
            dx, dy = lean[it["region"]]
            for o in objs:
                r, c, _, _ = _cell(o["box"])
                sx, sy = W // 12 * dx * (c == 1), W // 12 * dy * (r == 1)
                x0, y0, x1, y1 = o["box"]
                o["box"] = (x0 + sx, y0 + sy, x1 + sx, y1 + sy)
    return verify_objects(spec, objs)

def edit_flaw(spec, scene, rng):
    """A one-constraint flaw made by editing the target scene itself (the kinds of world.negative
    that leave the layout in place: wrong colour, shape swap, swapped colours, missing object), so
    that image1 and image2 differ in that one thing only: the "keep what is right" of IRG, exactly.
    Returns (the flawed image, its scene, the object edited as it was in scene), or None when no
    edit gives a flaw the verifier sees."""
    boxed = ("square", "circle", "triangle", "cross")            # the shapes that fill the same square box
    for _ in range(20):
        bad = [dict(o) for o in scene]
        k = int(rng.integers(len(bad)))
        o = bad[k]
        kind = ["wrong color", "shape swap", "swapped colors", "missing object"][int(rng.integers(4))]
        if kind == "wrong color":
            o["color"] = _pick(rng, [c for c in _colors_for(o["shape"], "train") if c != o["color"]]
                               if o["shape"] != "number" else [c for c in COLORS if c != o["color"]])
        elif kind == "shape swap" and o["shape"] in boxed:
            o["shape"] = _pick(rng, [x for x in boxed if x != o["shape"] and o["color"] in _colors_for(x, "train")])
        elif kind == "swapped colors" and len(bad) > 1:
            j = int(rng.integers(len(bad)))
            o["color"], bad[j]["color"] = bad[j]["color"], o["color"]
        elif kind == "missing object":
            del bad[k]
        else:
            continue
        if _has_held_triple(bad) or any(b["shape"] != "number" and b["color"] not in _colors_for(b["shape"], "train")
                                        for b in bad):
            continue
        img = draw(bad)
        if not verify(spec, img)["correct"]:
            return img, bad, scene[k]
    return None


REDRAW = "redraw :"     # think2's words before its plan (model.redraw_plan reads the plan after them)


def reflection_text(spec, img_or_verdict, target_scene, where=None, detail=False):
    """IRG's reflection (think2): what is wrong, then the plan to redraw. where: the box of the one
    object an in-place edit changes; the reflection then also names its 3x3 cell ("the color is
    wrong at the top left . redraw : ..."), so image2 can copy image1 and change only that place.
    detail: the plan is the detailed caption (each object's centre in pixels), so an object the edit
    adds or redraws has its place to the pixel, and the plan of a kept image is image1's own."""
    v = img_or_verdict if isinstance(img_or_verdict, dict) else verify(spec, img_or_verdict)
    at = "" if where is None or v["correct"] else " at the " + GRID[_cell(where)[0]][_cell(where)[1]]
    return f"{v['problem']}{at} . {REDRAW} {caption(target_scene, detail)}"

# -----------------------------------------------------------------------------
# prompt files

MAX_PROMPT = 64     # tokens: the world's own prompts have at most 10; a method's packed row (160 tokens)
                    # holds <bos> prompt <think>, a 64-token plan, <vs> and 16 image tokens

def load_specs(path, training=False):
    """Read a JSONL prompt file (UTF-8, with or without a byte-order mark); every bad line raises
    ValueError naming path:line and the fix: bad JSON, missing keys, an unknown tag or word, a prompt
    longer than MAX_PROMPT tokens, include items the verifier cannot check, a prompt whose text asks
    for other objects than its include (_check_text). training: the file is a method's training
    prompts, and an eval prompt (eval_prompts) in it is refused: training on it leaks the test set."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such prompt file (write one with `python world.py --write_eval`)")
    banned = eval_prompts() if training else set()
    specs = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                spec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: bad JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(spec, dict):
                raise ValueError(f"{where}: a line must be a JSON object with keys prompt, tag, include")
            for key in ("prompt", "tag", "include"):
                if key not in spec:
                    raise ValueError(f"{where}: missing key {key!r}; a line needs prompt, tag and include "
                                     f'(e.g. {{"tag": "colors", "prompt": "a photo of a red square", '
                                     f'"include": [{{"class": "square", "count": 1, "color": "red"}}]}})')
            if spec["tag"] not in TAGS:
                raise ValueError(f"{where}: unknown tag {spec['tag']!r}; use one of {TAGS}")
            p = spec["prompt"]
            if not isinstance(p, str) or len(p) > 16 * MAX_PROMPT or len(tokenize(p)) > MAX_PROMPT:
                what = f"a {type(p).__name__}" if not isinstance(p, str) else f"{len(tokenize(p))} tokens ({len(p)} characters)"
                raise ValueError(f"{where}: the prompt is {what}; a prompt is a string of at most {MAX_PROMPT} tokens "
                                 f"(the world's own have at most 10): shorten it")
            encode(p, where)
            spec.setdefault("exclude", [])
            _check_items(spec, where)
            _check_text(spec, where)
            if p in banned:
                raise ValueError(f"{where}: {p!r} is an eval prompt (data/eval.jsonl); training on it leaks the test "
                                 f"set into the run's after-eval: remove the line, or draw training prompts with "
                                 f"--prompts random (or rwr.py --mine), which never hold one")
            specs.append(spec)
    return specs

def _check_items(spec, where):
    inc = spec["include"]
    if not isinstance(inc, list) or not inc:
        raise ValueError(f"{where}: include must be a non-empty list of items like {{\"class\": \"circle\", \"count\": 1}}")
    for name, items in (("include", inc), ("exclude", spec["exclude"])):
        for i, it in enumerate(items):
            bad = lambda msg: ValueError(f"{where}: {name}[{i}]: {msg}")
            if not isinstance(it, dict) or "class" not in it or "count" not in it:
                raise bad('each item needs "class" and "count"')
            if it["class"] not in SHAPES + ["number"]:
                raise bad(f"unknown class {it['class']!r}; use one of {SHAPES + ['number']}")
            if not isinstance(it["count"], int) or it["count"] < 1:
                raise bad(f"count must be a positive integer, got {it['count']!r}")
            if "color" in it and it["color"] not in COLORS:
                raise bad(f"unknown colour {it['color']!r}; use one of {list(COLORS)}")
            if "size" in it and it["size"] not in SIZES:
                raise bad(f"unknown size {it['size']!r}; use small or large")
            if "region" in it and it["region"] not in REGIONS:
                raise bad(f"unknown region {it['region']!r}; use one of {REGIONS}")
            if "text" in it and not (isinstance(it["text"], str) and it["text"].isdigit() and int(it["text"]) < 100):
                raise bad(f"text must be a number 0-99 as a string, got {it['text']!r}")
            if "position" in it:
                p = it["position"]
                if not (isinstance(p, list) and len(p) == 2 and p[0] in RELATIONS and p[1] in range(len(inc)) and p[1] != i):
                    raise bad(f"position must be [relation, index of another include item], relation one of {RELATIONS}")

_COUNT_OF = {"a": 1, "an": 1, "one": 1, "the": 1, **{w: n for n, w in COUNT_WORDS.items()}}
_SHAPE_OF = {**{x: x for x in SHAPES}, **{p: x for x, p in PLURALS.items()}}

def prompt_objects(prompt):
    """What a prompt's text asks for, read with the grammar sample_spec writes ("a photo of" [count]
    [size] [colour] shape ["in the R half"], objects joined by "and" or a relation; a knowledge noun
    names its colour and shape; "the number N"): ([(class, count, colour, size, region, text)] per
    object, None where the text says nothing; [(object i, relation, object j)]). A count word or
    attribute that no shape follows gives an object of class None (the text names no shape for it)."""
    toks, objs, rels, cur, rel, i = tokenize(prompt), [], [], {}, None, 0
    while i < len(toks):
        t, two = toks[i], " ".join(toks[i:i + 2])
        if two in RELATIONS or t in RELATIONS:
            rel = (len(objs) - 1, two if two in RELATIONS else t)
            i += 2 if two in RELATIONS else 1
            continue
        if toks[i:i + 2] == ["in", "the"] and toks[i + 2:i + 3] and toks[i + 2] in REGIONS and toks[i + 3:i + 4] == ["half"]:
            if objs:
                objs[-1]["region"] = toks[i + 2]
            i += 4
            continue
        if t in ("photo", "image", "figure"):
            cur = {}
        elif t in _COUNT_OF:
            cur["count"] = _COUNT_OF[t]
        elif t in SIZES:
            cur["size"] = t
        elif t in COLORS:
            cur["color"] = t
        elif t in _SHAPE_OF or t in ALIASES or t == "number":
            o = dict(cls=_SHAPE_OF.get(t), count=cur.get("count", None if t in PLURALS.values() else 1),
                     color=cur.get("color"), size=cur.get("size"), region=None, text=None)
            if t in ALIASES:
                o["color"], o["cls"] = ALIASES[t] if o["color"] is None else (None, None)
            if t == "number":
                o["cls"] = "number"
                if toks[i + 1:i + 2] and toks[i + 1].isdigit():
                    o["text"] = toks[i + 1]
                    i += 1
            objs.append(o)
            if rel is not None:
                rels.append((rel[0], rel[1], len(objs) - 1))
                rel = None
            cur = {}
        i += 1
    if any(k in cur for k in ("color", "size")):
        objs.append(dict(cls=None, count=cur.get("count"), color=cur.get("color"), size=cur.get("size"), region=None,
                         text=None))
    keys = [tuple(o[k] for k in ("cls", "count", "color", "size", "region", "text")) for o in objs]
    return keys, [(keys[a], r, keys[b]) for a, r, b in rels if a >= 0]

def _check_text(spec, where):
    """A prompt's text and its include ask for the same objects (class, count, colour, size, region,
    number) and relations: the model reads the text, the verifier scores the include, so a line whose
    two disagree (e.g. "a red square" over a blue circle) scores every image against another prompt."""
    said, said_rel = prompt_objects(spec["prompt"])
    inc = spec["include"]
    asked = [(it["class"], it["count"], it.get("color"), it.get("size"), it.get("region"), it.get("text")) for it in inc]
    asked_rel = [(asked[i], it["position"][0], asked[it["position"][1]]) for i, it in enumerate(inc) if "position" in it]
    if Counter(said) != Counter(asked) or Counter(said_rel) != Counter(asked_rel):
        show = lambda k: " ".join(str(x) for x in (k[1], k[3], k[2], k[0] or "(no shape)", k[4] and f"in the {k[4]} half",  # noqa: E731
                                                     k[5]) if x is not None)
        show_all = lambda ks, rs: "; ".join([show(k) for k in ks] + [f"{show(a)} {r} {show(b)}" for a, r, b in rs]) or "nothing"  # noqa: E731
        raise ValueError(f"{where}: the prompt {spec['prompt']!r} asks for {show_all(said, said_rel)}, its include for "
                         f"{show_all(asked, asked_rel)}: the model reads the prompt and the verifier scores the "
                         f"include, so make the two agree (fix the prompt or the include)")

# -----------------------------------------------------------------------------
# prompt sets: the eval split and the training prompts the methods draw

def eval_prompts():
    """Eval prompts that training must not draw: those of tags whose prompt space is at least 4x
    the eval set's share of it. Small spaces (single_object has 5 prompts, size about 50) cannot
    be held out -- as GenEval's "a photo of a cat" is no secret to any real model; there the
    held-out (colour, shape) pairs and (shape, relation, shape) triples test generalisation."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "eval.jsonl")
    if not os.path.exists(path):
        return set()
    by_tag = {}
    for s in load_specs(path):
        by_tag.setdefault(s["tag"], set()).add(s["prompt"])
    rng = np.random.default_rng(0)
    space = {t: len({sample_spec(t, rng, holdout="any")["prompt"] for _ in range(2000)}) for t in by_tag}
    return {p for t, ps in by_tag.items() if space[t] >= 4 * len(ps) for p in ps}


def candidates(per_tag, rng):
    """Up to per_tag distinct prompts of every tag, never an eval prompt (the pre-training rule),
    listed tag by tag: the pool for weakness mining and for training on random prompts."""
    banned = eval_prompts()
    cands = []
    for tag in TAGS:
        seen = set()
        for _ in range(50 * per_tag):
            s = sample_spec(tag, rng, holdout="any")
            if s["prompt"] not in banned and s["prompt"] not in seen:
                seen.add(s["prompt"]); cands.append(s)
            if len(seen) == per_tag:
                break
    return cands


# The tags whose prompts compose objects, attributes, relations and numbers, as T2I-CompBench's
# categories do (colour / binding, spatial, numeracy, complex): SRUM's paper trains on that
# benchmark's training split. Left out: single_object (nothing to compose) and the three tags
# where the model's own samples are almost never right (counting_hard and knowledge, whose
# images generation never trains on, and text), so its judgments have nothing to rank.
COMPOSITIONAL = ["two_object", "counting", "colors", "position", "color_attr", "size", "color_count", "color_region"]


def prompt_set(prompts, n, seed):
    """Training prompts: a prompt file, "random" (n candidates per tag, never an eval prompt,
    drawn with seed) or "compositional" (the same, COMPOSITIONAL tags only); taken round-robin
    over tags, then the first n (0 = all), so a file listed tag by tag still gives every tag its share."""
    if prompts in ("random", "compositional"):
        pool = candidates(n, np.random.default_rng(10_000 + seed))
        pool = [s for s in pool if prompts == "random" or s["tag"] in COMPOSITIONAL]
    else:
        pool = load_specs(prompts, training=True)
    if not pool:
        raise ValueError(f"{prompts}: the prompt file holds no prompts; pass a file with at least one line "
                         f"(e.g. data/mmgw.jsonl) or --prompts random")
    by_tag = {}
    for s in pool:
        by_tag.setdefault(s["tag"], []).append(s)
    specs = [s for group in zip_longest(*by_tag.values()) for s in group if s is not None]
    return specs[:n] if n else specs


def pick(specs, n):
    """The first n specs of every tag (the eval file lists tags in blocks)."""
    out, seen = [], {}
    for s in specs:
        if seen.get(s["tag"], 0) < n:
            out.append(s); seen[s["tag"]] = seen.get(s["tag"], 0) + 1
    return out


def write_eval(path="data/eval.jsonl", n_per_tag=50, seed=1234):
    """The fixed eval set: n_per_tag prompts per tag drawn with holdout="any" (so held-out
    compositions appear at their natural rate, flagged "heldout"). Distinct prompts where the
    tag has that many; tags with fewer (single_object has 5) cycle through all of them."""
    rng = np.random.default_rng(seed)
    lines = []
    for tag in TAGS:
        seen = {}
        for _ in range(20000):
            spec = sample_spec(tag, rng, "any")
            seen.setdefault(spec["prompt"], spec)
            if len(seen) == n_per_tag:
                break
        distinct = list(seen.values())
        for k in range(n_per_tag):
            spec = dict(distinct[k % len(distinct)])
            spec["heldout"] = uses_heldout(spec)
            lines.append(json.dumps(spec))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path

def demo(path, rows=4, seed=0):
    """A grid: one column per tag (in TAGS order), `rows` renders each, 2x upscaled."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    cell = 2 * W + 4
    grid = np.full((rows * cell, len(TAGS) * cell, 3), 40, np.uint8)
    for c, tag in enumerate(TAGS):
        for r in range(rows):
            spec = sample_spec(tag, rng, "any")
            img, _ = render(spec, rng, "any")
            grid[r * cell + 2:r * cell + 2 + 2 * W, c * cell + 2:c * cell + 2 + 2 * W] = img.repeat(2, 0).repeat(2, 1)
            print(f"row {r} col {c} [{tag}] {spec['prompt']}")
    Image.fromarray(grid).save(path)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write_eval", nargs="?", const="data/eval.jsonl", help="write the fixed eval set")
    ap.add_argument("--demo", help="write a PNG grid of renders, one column per tag")
    args = ap.parse_args()
    if args.write_eval:
        print("wrote", write_eval(args.write_eval))
    if args.demo:
        demo(args.demo)
    if not (args.write_eval or args.demo):
        ap.print_help()
