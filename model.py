"""
nanoUMM model: a minimal BAGEL-style Mixture-of-Transformers (MoT) unified model.

One transformer reads and writes text autoregressively and generates images by flow
matching in the latent space of a tiny frozen autoencoder (the VAE analog).

Conventions (upstream BAGEL; flipping any of them silently breaks generation):
  flow matching   x_t = (1 - t) * x0 + t * eps,  t = 1 is pure noise,  target v = eps - x0
  training t      t = sigmoid(randn), then shift t = s*t / (1 + (s-1)*t)
  sampler         ts = shift(linspace(1, 0, N+1));  x <- x - v * (t_i - t_{i+1})
  MoT routing     every layer holds two experts: `und` (text and clean-image tokens, the ViT
                  analog) and `gen` (autoencoder latents: noisy ones, and a re-entered image's
                  clean ones at t = 0); routing is by token kind, not learned; one shared
                  global attention over all tokens.
  attention mask  causal text / bidirectional clean and noise image splits; nothing outside
                  a noise split sees it (kernels/attention.py has the rule).
  re-entry        an image that re-enters a generation context (IRG's image1) goes in twice,
                  as BAGEL's does: its clean latents at t = 0 through the gen expert (VAE
                  tokens), then through the und expert (ViT tokens); understanding reads the
                  und tokens alone (Config.vae_reentry False: und tokens only, for bases
                  trained before the VAE tokens).
  positions       1-D RoPE; a whole image shares one position id; a 2-D sin-cos table is
                  added to image tokens.
"""
import copy
import json
import math
import os
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import numpy as np

import kernels
from kernels.attention import allowed_mask, attention, attention_ref

TEXT, CLEAN, NOISE, VAE = 0, 1, 2, 3  # token kinds (VAE: a re-entered image's clean latents, gen expert)


def on_gen(kind):
    """Which tokens the gen expert runs (every autoencoder latent: noisy, and VAE at t = 0); kind: an
    int tensor or array of token kinds; the rest (text, clean image, pads) is the und expert's."""
    return (kind == NOISE) | (kind == VAE)

PAD, BOS, EOS, THINK, END_THINK, VS, VE = range(7)  # special ids: world.SPECIALS, same order


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    vocab_size: int = 512
    n_layer: int = 8
    d: int = 256
    n_head: int = 4
    n_kv_head: int = 2
    mlp_hidden: int = 704
    latent_ch: int = 32      # autoencoder latent channels (one token per 16x16 pixels)
    n_img: int = 16          # image tokens per 64x64 image (4x4 grid)
    rope_base: float = 10000.0
    vae_reentry: bool = True # a re-entered image's VAE tokens (BAGEL); False: bases trained before them (v1-v5)


def config_for(depth, vocab_size):
    """The one scale dial: depth sets width (32 per layer), heads (64-dim where possible), GQA 2:1."""
    d = 32 * depth
    n_head = max(2, d // 64)
    return Config(vocab_size=vocab_size, n_layer=depth, d=d, n_head=n_head,
                  n_kv_head=max(1, n_head // 2), mlp_hidden=int(2.75 * d) // 32 * 32)


# ----------------------------------------------------------------------------- autoencoder

class PaletteAE(nn.Module):
    """Frozen-VAE analog: 64x64x3 -> 8x8x8 latent (8x down, like BAGEL's VAE) -> 2x2 patches ->
    16 tokens of 32 dims (one token per 16x16 pixels); the decoder predicts per-pixel palette
    logits. Renders use only 9 colours (black + 8), so decoding is a classification: crisp
    images that the verifier reads exactly. `lat_mean/lat_std` (set after AE training) make
    the tokens unit-variance for the flow. A stride-16 AE (4x4 latent) learns far slower: small
    shapes blur into blobs (measured: 44% verifier pass after 3k GPU steps).
    """

    def __init__(self, C=8, w=32, n_colors=9, p=2):
        super().__init__()
        def block(c): return nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(8, c), nn.SiLU())
        def down(i, o): return nn.Sequential(nn.Conv2d(i, o, 4, 2, 1), nn.GroupNorm(8, o), nn.SiLU())
        def up(i, o): return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                           nn.Conv2d(i, o, 3, 1, 1), nn.GroupNorm(8, o), nn.SiLU())
        self.enc = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1), nn.SiLU(), down(w, w), down(w, 2 * w),
                                 down(2 * w, 2 * w), block(2 * w), nn.Conv2d(2 * w, C, 1))
        self.dec = nn.Sequential(nn.Conv2d(C, 2 * w, 1), nn.SiLU(), block(2 * w), up(2 * w, 2 * w),
                                 up(2 * w, w), up(w, w), nn.Conv2d(w, n_colors, 3, 1, 1))
        self.C, self.p = C, p
        self.register_buffer("lat_mean", torch.zeros(C * p * p))
        self.register_buffer("lat_std", torch.ones(C * p * p))

    def encode(self, img):
        """img uint8 [B,64,64,3] -> normalised latent tokens [B,16,C*p*p] (row-major 4x4 grid)."""
        x = img.permute(0, 3, 1, 2).float() / 127.5 - 1
        z = self.enc(x)
        z = F.layer_norm(z.transpose(1, 3), (self.C,)).transpose(1, 3)  # fixed scale: latent noise means something
        z = rearrange(z, "b c (h p) (w q) -> b (h w) (p q c)", p=self.p, q=self.p)   # 2x2 patches -> tokens
        return (z - self.lat_mean) / self.lat_std

    def latent_map(self, z):
        """tokens [B,N,C*p*p] -> un-normalised latent map [B,C,H,W]."""
        z = z * self.lat_std + self.lat_mean
        s = int(math.isqrt(z.shape[1]))
        return rearrange(z, "b (h w) (p q c) -> b c (h p) (w q)", h=s, p=self.p, q=self.p)

    def logits(self, z):
        """latent tokens [B,16,C*p*p] -> palette logits [B,9,64,64]."""
        return self.dec(self.latent_map(z))

    def decode(self, z, palette):
        """latent tokens -> uint8 images [B,64,64,3] through the palette (world.PALETTE)."""
        idx = self.logits(z.float()).argmax(1)
        return torch.as_tensor(palette, device=idx.device)[idx]


# ----------------------------------------------------------------------------- transformer

class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.w, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.w.to(x.dtype), self.eps)  # same dtype: the fused kernel


class Expert(nn.Module):
    """One expert's share of a layer: both norms, q/k/v/o, the QK-norms and the SwiGLU MLP."""

    def __init__(self, c):
        super().__init__()
        hd = c.d // c.n_head
        self.norm1, self.norm2 = RMSNorm(c.d), RMSNorm(c.d)
        self.q = nn.Linear(c.d, c.n_head * hd, bias=False)
        self.k = nn.Linear(c.d, c.n_kv_head * hd, bias=False)
        self.v = nn.Linear(c.d, c.n_kv_head * hd, bias=False)
        self.o = nn.Linear(c.n_head * hd, c.d, bias=False)
        self.q_norm, self.k_norm = RMSNorm(hd), RMSNorm(hd)
        self.up = nn.Linear(c.d, 2 * c.mlp_hidden, bias=False)
        self.down = nn.Linear(c.mlp_hidden, c.d, bias=False)
        self.hd, self.n_q, self.n_kv = hd, c.n_head, c.n_kv_head

    def qkv(self, x):
        """[n, d] -> [n, H + 2*Hkv, hd]: q, k, v heads side by side (q, k QK-normed), from one
        matmul over the three weights (one op instead of three; the weights stay separate)."""
        w = torch.cat([self.q.weight, self.k.weight, self.v.weight])
        h = F.linear(self.norm1(x), w)
        q, k, v = h.unflatten(-1, (-1, self.hd)).split([self.n_q, self.n_kv, self.n_kv], -2)
        return torch.cat([self.q_norm(q), self.k_norm(k), v], -2)

    def mlp(self, x):
        a, b = self.up(self.norm2(x)).chunk(2, -1)
        return self.down(F.silu(a) * b)


class Permute(torch.autograd.Function):
    """x[perm] along dim 0, perm a permutation with inverse inv. Autograd's backward of
    indexing is a scatter-add (zeros + index_add, atomics on CUDA); for a permutation it is
    just the gather g[inv]."""

    @staticmethod
    def forward(ctx, x, perm, inv):
        ctx.save_for_backward(inv)
        return x[perm]

    @staticmethod
    def backward(ctx, g):
        inv, = ctx.saved_tensors
        return g[inv], None, None


class Router:
    """Hard routing by token kind, set up once per forward. The flat tokens are permuted so
    that understanding tokens (text, clean image, pads) come first and generation tokens
    after, the clean VAE tokens (kind VAE) before the noisy ones: the residual stream lives in
    that sorted order, each expert runs one matmul per op over its contiguous block (a slice,
    no gather/scatter per op), and only attention needs the [B, L] row layout (one gather in,
    one gather out per layer).
      und, vae, gen: flat indices of the three kinds; gen in the order the noise segments were
                given (pack precomputes them on the CPU: b["und_idx"], b["vae_idx"], b["gen_idx"];
                without them, e.g. in the KV-cached inference paths, they are found here).
    Sorted position j holds flat token order[j]; flat token p sits at sorted position inv[p]."""

    def __init__(self, b):
        kind = b["kind"]
        self.shape = kind.shape
        if "gen_idx" in b:
            und, vae, gen = b["und_idx"], b["vae_idx"], b["gen_idx"]
        else:
            flat = kind.reshape(-1)
            und, vae, gen = (~on_gen(flat)).nonzero().squeeze(1), (flat == VAE).nonzero().squeeze(1), \
                (flat == NOISE).nonzero().squeeze(1)
        self.n_und, self.n_vae = und.shape[0], vae.shape[0]   # shapes, not tensors: no sync, and
        self.order = torch.cat([und, vae, gen])               # torch.compile sees (dynamic) sizes
        self.inv = torch.empty_like(self.order)
        self.inv[self.order] = torch.arange(len(self.order), device=self.order.device)

    def sort(self, x):
        """[B, L, ...] row layout -> [N, ...] sorted layout."""
        return Permute.apply(x.flatten(0, 1), self.order, self.inv)

    def rows(self, xs):
        """[N, ...] sorted layout -> [B, L, ...] row layout."""
        return Permute.apply(xs, self.inv, self.order).unflatten(0, self.shape)

    def __call__(self, fn_und, fn_gen, xs):
        """fn_und on the understanding block, fn_gen on the generation block of xs [N, ...]."""
        return torch.cat([fn_und(xs[:self.n_und]), fn_gen(xs[self.n_und:])])


def rope_cos_sin(pos, hd, base):
    """cos, sin [..., 1, hd/2] of 1-D RoPE at positions pos [...] (an image shares one id);
    computed once per forward and shared by every layer."""
    inv = base ** (-torch.arange(0, hd, 2, device=pos.device, dtype=torch.float32) / hd)
    ang = pos.float()[..., None, None] * inv
    return ang.cos(), ang.sin()


def rope(x, cos, sin):
    """Rotate x [..., heads, hd] by the tables of rope_cos_sin (in fp32, like the old rope)."""
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).type_as(x)


def sincos_2d(n, d):
    """2-D sin-cos table [n, d] for an sqrt(n) x sqrt(n) token grid (added to image tokens)."""
    s = int(math.isqrt(n))
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    om = 1.0 / 10000 ** (torch.arange(d // 4) / (d // 4))
    parts = [f(c.flatten()[:, None].float() * om) for c in (yy, xx) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, 1)


def timestep_embedding(t, d):
    """Sinusoidal features of t in [0, 1] (scaled by 1000 like DiT/BAGEL)."""
    half = d // 2
    f = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    a = 1000 * t.float()[:, None] * f
    return torch.cat([a.cos(), a.sin()], 1)


class MoT(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.tok_emb = nn.Embedding(c.vocab_size, c.d)
        self.vae2llm_und = nn.Linear(c.latent_ch, c.d)    # clean image latents in (understanding)
        self.vae2llm = nn.Linear(c.latent_ch, c.d)        # noisy latents in (generation)
        self.time_embedder = nn.Sequential(nn.Linear(c.d, c.d), nn.SiLU(), nn.Linear(c.d, c.d))
        self.register_buffer("latent_pos", sincos_2d(c.n_img, c.d), persistent=False)
        self.und = nn.ModuleList(Expert(c) for _ in range(c.n_layer))
        self.gen = nn.ModuleList(Expert(c) for _ in range(c.n_layer))
        self.norm, self.norm_gen = RMSNorm(c.d), RMSNorm(c.d)
        self.lm_head = nn.Linear(c.d, c.vocab_size, bias=False)
        self.llm2vae = nn.Linear(c.d, c.latent_ch)
        self.apply(self._init)
        nn.init.zeros_(self.llm2vae.weight)                # zero-init velocity head (BAGEL)
        nn.init.zeros_(self.llm2vae.bias)
        for e in list(self.und) + list(self.gen):          # small residual branches at init
            nn.init.normal_(e.o.weight, std=0.02 / math.sqrt(2 * c.n_layer))
            nn.init.normal_(e.down.weight, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, b, cache=None, write=False, heads=False):
        """b: a packed batch (see `pack`). Returns final hidden states [B,L,d] (each token
        through its own expert's final norm), or with `heads` the pair (text logits at the
        label positions [N_lab,V], row-major; velocity at the noise tokens [N_noise,C], in
        the order of b["gen_idx"] = the order the noise segments were given) -- inside
        forward so that DDP sees every parameter. With `cache`, the new tokens attend to the
        cached ones as well; `write` appends their keys/values (noisy tokens are never written).
        Layout (see Router): the residual stream is [N, d] with understanding tokens first and
        generation tokens after; attention gathers it into rows and back."""
        c, kind = self.c, b["kind"]
        H, Hkv = c.n_head, c.n_kv_head
        route = Router(b)
        n = route.n_und
        # inputs: text embeddings (und block), clean latents on CLEAN tokens (und expert's
        # input projection), latents + 2-D table + time embedding (gen block: t = 0 on VAE tokens)
        x = self.tok_emb(b["ids"])
        xu = self.vae2llm_und(b["lat"]) + self.latent_pos[b["ipos"]]
        x = torch.where((kind == CLEAN)[..., None], xu.to(x.dtype), x)
        xs = route.sort(x)
        g = route.order[n:]
        lat_g, ipos_g, t_g = b["lat"].flatten(0, 1)[g], b["ipos"].reshape(-1)[g], b["t"].reshape(-1)[g]
        xg = self.vae2llm(lat_g) + self.latent_pos[ipos_g] + self.time_embedder(timestep_embedding(t_g, c.d))
        xs = torch.cat([xs[:n], xg.to(xs.dtype)])
        cos, sin = rope_cos_sin(b["pos"], c.d // H, c.rope_base)     # once, not per layer
        meta = (b["sample"], b["split"], kind, b["idx"])
        fast = cache is None and not kernels.use_triton(xs)
        if fast:      # the CPU twin: the dense mask once per forward, not once per layer
            mask = allowed_mask(meta, meta)[:, None]
        for i in range(c.n_layer):
            eu, eg = self.und[i], self.gen[i]
            qkv = route.rows(route(eu.qkv, eg.qkv, xs))                  # [B, L, H+2Hkv, hd]
            qk = rope(qkv[:, :, :H + Hkv], cos, sin)                      # q and k in one go
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv:]
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B,H,L,hd]
            if fast:
                if H != Hkv:
                    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            elif cache is None:
                y = attention(q, k, v, meta)
            else:
                kc, vc = cache.kv[i] if cache.kv[i] is not None else (k[:, :, :0], v[:, :, :0])
                y = attention_ref(q, torch.cat([kc, k], 2), torch.cat([vc, v], 2),
                                  meta, cache.cat_meta(meta))
                if write:
                    cache.kv[i] = (torch.cat([kc, k], 2), torch.cat([vc, v], 2))
            y = route.sort(y.transpose(1, 2).flatten(2))
            xs = xs + route(eu.o, eg.o, y)
            xs = xs + route(eu.mlp, eg.mlp, xs)
        if cache is not None and write:
            cache.append_meta(meta)
        hs = route(self.norm, self.norm_gen, xs)
        if heads:
            lab = b["lab_idx"] if "lab_idx" in b else (b["labels"].reshape(-1) != -100).nonzero().squeeze(1)
            return self.logits(hs[route.inv[lab]]), self.velocity(hs[n + route.n_vae:])
        return route.rows(hs)

    def logits(self, h):
        return self.lm_head(h)

    def velocity(self, h):
        return self.llm2vae(h).float()


# ----------------------------------------------------------------------------- packing

def pack(samples, pad_id, C, device="cpu", dtype=torch.float32, row_len=None):
    """Pack a batch. A sample is a list of segments:
        ("text",  ids, w)        w: loss weight on predicting these ids (float or list), 0 = none
        ("clean", z)             z [n_img, C]: a clean image entering as context (und expert)
        ("vae", z)               z [n_img, C]: a clean image's VAE tokens, t = 0 (gen expert); a
                                 re-entered image is reentry(z) = [("vae", z), ("clean", z)]
        ("noise", x_t, t)        x_t [n_img, C]: a noisy latent at time t (gen expert)
    An image may also be given as an int `slot` (an index into an image batch the caller
    encodes later): its latents stay 0 and b["slot"] marks the positions (-1 elsewhere);
    training fills them on the device (pretrain.py), so workers can pack without the AE.
    A noise split does not advance the rope position (nothing after it sees it), a clean
    or VAE split takes one position for all its tokens, each text token takes one.

    row_len None: one row per sample, right-padded to the longest (every sample has
    b["sample"] 0; inference relies on this layout).
    row_len int: rows of exactly row_len tokens, each holding as many samples as fit
    (first-fit decreasing: about 0.93 of the tokens are real for a pre-training batch of 32
    at row_len 128..192, against 0.48 one per row). A sample keeps its own rope positions
    (from 0) and splits; b["sample"] is its index in `samples`, and the mask lets tokens
    attend only within their sample, so each sample computes exactly what it would alone.

    Returns a dict of [B, L] tensors, plus flat indices into the B*L tokens (row-major):
      und_idx  understanding tokens (text, clean, pads), ascending
      vae_idx  VAE tokens (clean latents on the gen expert), ascending
      gen_idx  noise tokens in the order their segments were given (sample by sample)
      lab_idx  tokens that carry a text label, ascending (= b["labels"] != -100)
    The velocity of forward(heads=True) / token_losses follows gen_idx, i.e. the given order,
    which is how callers align targets. One row per sample, b["kind"] == NOISE selects the
    same tokens in the same order; with row_len it is row-major, NOT the given order: use
    b["gen_idx"] (h.flatten(0, 1)[b["gen_idx"]]) to pick noise tokens in the given order."""
    lens = [sum(len(seg[1]) if seg[0] == "text" else C_img(seg[1]) for seg in segs) for segs in samples]
    if row_len is None:
        rows, L = [[i] for i in range(len(samples))], max(lens)
    else:
        if max(lens) > row_len:
            i = int(np.argmax(lens))
            raise ValueError(f"pack: sample {i} has {lens[i]} tokens, more than the row length {row_len}; "
                             f"raise the row length (--row_len / row_len=) to at least {lens[i]}")
        rows, L = fit_rows(lens, row_len), row_len
    B = len(rows)
    # numpy while filling (many tiny slices; pack runs in the data workers), torch at the end
    ids = np.full((B, L), pad_id, np.int64)
    kind, pos, ipos = (np.zeros((B, L), np.int64) for _ in range(3))
    split, slot, labels, sample = (np.full((B, L), v, np.int64) for v in (-1, -1, -100, -1))
    t, lw = np.zeros((B, L), np.float32), np.zeros((B, L), np.float32)
    lat = torch.zeros(B, L, C, dtype=dtype)
    gen = [[] for _ in samples]
    for r, members in enumerate(rows):
        n, si = 0, 0                                        # token index, split id in the row
        for i in members:
            s0, p = n, 0                                    # sample start, rope position
            for seg in samples[i]:
                if seg[0] == "text":
                    k = len(seg[1])
                    w = np.broadcast_to(np.asarray(seg[2], np.float32), (k,))
                    ids[r, n:n + k] = seg[1]
                    kind[r, n:n + k] = TEXT
                    split[r, n:n + k] = si
                    pos[r, n:n + k] = np.arange(p, p + k)
                    # the label of the previous token is this one, when the previous is text
                    ok = w != 0
                    if k and (n == s0 or kind[r, n - 1] != TEXT):
                        ok = ok.copy()
                        ok[0] = False
                    prev = np.arange(n - 1, n + k - 1)[ok]
                    labels[r, prev] = ids[r, n:n + k][ok]
                    lw[r, prev] = w[ok]
                    n, p = n + k, p + k
                else:
                    kd = {"clean": CLEAN, "vae": VAE, "noise": NOISE}[seg[0]]
                    k = C_img(seg[1])
                    kind[r, n:n + k] = kd
                    split[r, n:n + k] = si
                    pos[r, n:n + k] = p
                    ipos[r, n:n + k] = np.arange(k)
                    if kd == NOISE:
                        t[r, n:n + k] = float(seg[2])
                        gen[i].append(np.arange(r * L + n, r * L + n + k))
                    if isinstance(seg[1], int):
                        slot[r, n:n + k] = seg[1]
                    else:
                        lat[r, n:n + k] = seg[1].detach().to("cpu", dtype)
                    n, p = n + k, p + (0 if kd == NOISE else 1)
                si += 1
            sample[r, s0:n] = 0 if row_len is None else i   # pads keep -1: invisible
    gen = np.concatenate([a for g in gen for a in g]) if any(gen) else np.zeros(0, np.int64)
    flat = kind.reshape(-1)
    b = dict(ids=ids, kind=kind, split=split, pos=pos, ipos=ipos, t=t, labels=labels, lw=lw,
             sample=sample, slot=slot, idx=np.broadcast_to(np.arange(L), (B, L)).copy(),
             und_idx=np.flatnonzero(~on_gen(flat)), vae_idx=np.flatnonzero(flat == VAE), gen_idx=gen,
             lab_idx=np.flatnonzero(labels.reshape(-1) != -100))
    b = {k: torch.from_numpy(v) for k, v in b.items()}
    b["lat"] = lat
    return {k: v.to(device) for k, v in b.items()}


def reentry(z, vae=True):
    """The segments of an image re-entering a generation context, as BAGEL enters it: its VAE
    tokens (clean, t = 0, gen expert), which a second image can copy from, then its ViT-analog
    tokens (und expert), which the text after it reads. vae False (Config.vae_reentry of a base
    trained before the VAE tokens): the und tokens alone, as that base learned it."""
    return [("vae", z), ("clean", z)] if vae else [("clean", z)]


def fit_rows(lens, row_len):
    """First-fit decreasing bin packing of sample lengths into rows of row_len: lists of sample
    indices per row (ascending within a row). Longest first, each into the first row with
    room; ties keep the given order, so the layout is a pure function of the lengths."""
    rows, free = [], []
    for i in sorted(range(len(lens)), key=lambda i: -lens[i]):
        for r in range(len(rows)):
            if free[r] >= lens[i]:
                rows[r].append(i)
                free[r] -= lens[i]
                break
        else:
            rows.append([i])
            free.append(row_len - lens[i])
    return [sorted(r) for r in rows]


N_IMG = 16


def C_img(x):
    """Number of tokens of an image segment: a latent tensor's rows, or N_IMG for a slot."""
    return N_IMG if isinstance(x, int) else x.shape[0]


# ----------------------------------------------------------------------------- losses & scoring

def token_losses(model, b):
    """Unreduced per-token losses: text cross-entropy at label positions [B,L] (0 elsewhere)
    and the predicted velocity at noise tokens [N_noise, C], in the order of b["gen_idx"]
    (the order the noise segments were given; callers form the MSE)."""
    logits, v = model(b, heads=True)
    labels = b["labels"]
    lab = b["lab_idx"] if "lab_idx" in b else (labels.reshape(-1) != -100).nonzero().squeeze(1)
    ce = F.cross_entropy(logits.float(), labels.reshape(-1)[lab], reduction="none")
    ce = torch.zeros(labels.numel(), device=v.device).index_copy(0, lab, ce)
    return ce.view(labels.shape), v


def text_logprobs(model, b):
    """log p(label) at every label position [B,L] (0 elsewhere): GRPO's per-token log-probs
    (differentiable; wrap in torch.no_grad() for the old/reference policy)."""
    return -token_losses(model, b)[0]


@torch.no_grad()
def p_yes(model, z, question_ids, yes_id):
    """VQAScore: softmax probability of "yes" at the first answer position of
    `<bos> <|vision_start|> [clean image z] <|vision_end|> question`, from a raw forward
    pass (not generate scores). z [B,n_img,C]; question_ids: list of id lists."""
    samples = [[("text", [BOS, VS], 0), ("clean", z[i]), ("text", [VE] + list(q), 0)]
               for i, q in enumerate(question_ids)]
    b = pack(samples, PAD, model.c.latent_ch, z.device)
    h = model(b)
    last = (b["sample"] == 0).long().sum(1) - 1
    logits = model.logits(h[torch.arange(len(samples), device=z.device), last]).float()
    return torch.softmax(logits, -1)[:, yes_id]


# ----------------------------------------------------------------------------- inference: KV cache

class Cache:
    """Keys/values per layer plus the metadata of the cached tokens (for the mask), the next
    rope position per row, the next token index and the next split id."""

    def __init__(self, n_layer, B, device):
        self.kv = [None] * n_layer
        self.meta = None
        self.pos = torch.zeros(B, dtype=torch.long, device=device)
        self.next_idx, self.next_split = 0, 0

    def cat_meta(self, new):
        return new if self.meta is None else tuple(torch.cat([a, b], 1) for a, b in zip(self.meta, new))

    def append_meta(self, new):
        self.meta = self.cat_meta(new)


def step_batch(cache, kind, n, B, device, ids=None, lat=None, t=None, live=None, C=32):
    """Inputs for n new tokens per row continuing `cache`. live [B] bool: rows whose tokens are
    real; dead rows get sample -1 (invisible to everything, including their own row)."""
    live = torch.ones(B, dtype=torch.bool, device=device) if live is None else live
    sample = torch.where(live, 0, -1)[:, None].expand(B, n)
    idx = (cache.next_idx + torch.arange(n, device=device)).expand(B, n)
    if kind == TEXT:
        pos = cache.pos[:, None] + torch.arange(n, device=device)
        split = (cache.next_split + torch.arange(n, device=device)).expand(B, n)
    else:
        pos = cache.pos[:, None].expand(B, n)
        split = torch.full((B, n), cache.next_split, device=device)
    b = dict(ids=ids if ids is not None else torch.zeros(B, n, dtype=torch.long, device=device),
             kind=torch.full((B, n), kind, device=device), split=split.contiguous(), pos=pos.contiguous(),
             ipos=(torch.arange(n, device=device).expand(B, n) if kind != TEXT else torch.zeros(B, n, dtype=torch.long, device=device)).contiguous(),
             t=(t if t is not None else torch.zeros(B, n, device=device)),
             lat=lat if lat is not None else torch.zeros(B, n, C, device=device),
             sample=sample.contiguous(), idx=idx.contiguous())
    return b, live


def advance(cache, kind, n, live):
    """Book-keeping after writing n tokens of `kind` into the cache."""
    cache.next_idx += n
    if kind == TEXT:
        cache.pos += n * live.long()
        cache.next_split += n
    else:
        cache.pos += live.long()                          # a clean image takes one position
        cache.next_split += 1


@torch.no_grad()
def prefill(model, seqs, device):
    """Run a batch of token-id prompts (variable length) into a fresh cache. Right-padded
    rows: the pad tokens get sample -1 and do not advance the row's rope position."""
    B = len(seqs)
    L = max(len(s) for s in seqs)
    cache = Cache(model.c.n_layer, B, device)
    ids = torch.zeros(B, L, dtype=torch.long, device=device)
    live = torch.zeros(B, L, dtype=torch.bool, device=device)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, device=device)
        live[i, :len(s)] = True
    b, _ = step_batch(cache, TEXT, L, B, device, ids=ids, C=model.c.latent_ch)
    b["sample"] = torch.where(live, 0, -1)
    b["pos"] = (live.long().cumsum(1) - 1).clamp(min=0)
    h = model(b, cache, write=True)
    cache.next_idx += L
    cache.next_split += L
    cache.pos = live.long().sum(1)
    last = h[torch.arange(B, device=device), live.long().sum(1) - 1]
    return cache, model.logits(last).float()


@torch.no_grad()
def append_text(model, cache, ids, live=None):
    """Append token ids [B,n] to the cache; returns logits of the last one [B,V]."""
    B, n = ids.shape
    b, live = step_batch(cache, TEXT, n, B, ids.device, ids=ids, live=live, C=model.c.latent_ch)
    h = model(b, cache, write=True)
    advance(cache, TEXT, n, live)
    return model.logits(h[:, -1]).float()


@torch.no_grad()
def append_image(model, cache, z, live=None, kind=CLEAN):
    """Enter an image as clean context: z [B,n_img,C], as und tokens (kind CLEAN, what understanding
    reads) or as VAE tokens (kind VAE, t = 0 on the gen expert)."""
    B, n, _ = z.shape
    b, live = step_batch(cache, kind, n, B, z.device, lat=z, live=live, C=model.c.latent_ch)
    h = model(b, cache, write=True)
    advance(cache, kind, n, live)
    return h


def reenter_image(model, cache, z, live=None):
    """Re-enter a finished image into a generation context (`reentry`): VAE tokens, then und tokens."""
    if model.c.vae_reentry:
        append_image(model, cache, z, live, kind=VAE)
    return append_image(model, cache, z, live)


def sample_token(logits, temperature=1.0, generator=None):
    if temperature <= 0:
        return logits.argmax(-1)
    p = torch.softmax(logits / temperature, -1)
    return torch.multinomial(p, 1, generator=generator).squeeze(1)


@torch.no_grad()
def decode_text(model, cache, logits, stop_ids, max_new, temperature=1.0, generator=None, live=None):
    """KV-cached decoding until each row emits a token in stop_ids (the stop token is written
    to the cache too) or max_new tokens. Returns (list of token lists incl. stop, stopped [B])."""
    B = logits.shape[0]
    dev = logits.device
    live = torch.ones(B, dtype=torch.bool, device=dev) if live is None else live.clone()
    out = [[] for _ in range(B)]
    stopped = torch.zeros(B, dtype=torch.bool, device=dev)
    stop = torch.tensor(sorted(stop_ids), device=dev)
    for _ in range(max_new):
        if not live.any():
            break
        tok = sample_token(logits, temperature, generator)
        toks = tok.tolist()                                # one host copy per step, not one per row
        for i in live.nonzero().flatten().tolist():
            out[i].append(toks[i])
        logits = append_text(model, cache, tok[:, None], live)
        hit = live & torch.isin(tok, stop)
        stopped |= hit
        live &= ~hit
    return out, stopped


def shift_t(t, s):
    """Timestep shift t -> s*t / (1 + (s-1)*t): s > 1 spends more steps near noise."""
    return s * t / (1 + (s - 1) * t)


def noised(x0, s=1.0):
    """Flow matching's training input for clean latents x0 [B,n,C] (global torch RNG):
        t = shift(sigmoid(randn)),   x_t = (1 - t) x0 + t eps,   target v = eps - x0.
    Returns (x_t, eps, t [B])."""
    eps = torch.randn_like(x0)
    t = shift_t(torch.sigmoid(torch.randn(len(x0), device=x0.device)), s)
    return (1 - t[:, None, None]) * x0 + t[:, None, None] * eps, eps, t


@torch.no_grad()
def sample_image(model, cache, uncond=None, steps=25, cfg=4.0, cfg_interval=(0.0, 1.0),
                 cfg_renorm=0.0, shift=3.0, generator=None, live=None, x1=None):
    """Euler sampler from t=1 (noise) to t=0 over a cached context. Only the n_img noisy tokens
    run at each step; they are never written to the cache. CFG on text: `uncond` is a cache of
    the same rows with the text dropped (`<bos> <|vision_start|>`).
        v = v_u + cfg * (v_c - v_u)   for t in cfg_interval, else v_c
        cfg_renorm > 0: rescale v to at most renorm * |v_c| (BAGEL's cfg_renorm, global)
    Returns the clean latent x0 [B,n_img,C]."""
    c = model.c
    B = cache.pos.shape[0]
    dev = cache.pos.device
    x = torch.randn(B, c.n_img, c.latent_ch, device=dev, generator=generator) if x1 is None else x1.clone()
    ts = shift_t(torch.linspace(1, 0, steps + 1), shift).tolist()   # on the host: no sync per step
    for i in range(steps):
        t, dt = ts[i], ts[i] - ts[i + 1]
        tt = torch.full((B, c.n_img), t, device=dev)
        b, _ = step_batch(cache, NOISE, c.n_img, B, dev, lat=x, t=tt, live=live, C=c.latent_ch)
        v = model.velocity(model(b, cache))
        if uncond is not None and cfg != 1.0 and cfg_interval[0] <= t <= cfg_interval[1]:
            bu, _ = step_batch(uncond, NOISE, c.n_img, B, dev, lat=x, t=tt, live=live, C=c.latent_ch)
            vu = model.velocity(model(bu, uncond))
            vc = v
            v = vu + cfg * (vc - vu)
            if cfg_renorm > 0:
                nc, n = vc.norm(dim=(1, 2), keepdim=True), v.norm(dim=(1, 2), keepdim=True)
                v = v * (cfg_renorm * nc / (n + 1e-8)).clamp(max=1.0)
        x = x - v * dt                                    # v = eps - x0: step toward the data
    return x


# ----------------------------------------------------------------------------- checkpoint I/O

def _sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(path, model, ae, meta):
    """Atomic: `path`.safetensors (bf16 MoT weights, fp32 AE weights; model may be None for an
    AE-only checkpoint) + `path`.json (config, run meta and the sha256 of the weights file, so
    corrupted bytes are caught at load). Both are written whole under temp names before either is
    renamed, so at every moment one whole pair exists: the old one, or (killed between the two
    renames) the new weights beside the new .json still under its temp name, which load_weights
    recognises by its sha256 and renames into place. A non-finite weight raises instead of being
    written: a checkpoint is never worse than the one it would replace."""
    from safetensors.torch import save_file
    sd = {f"ae.{k}": v.detach().float().contiguous() for k, v in ae.state_dict().items()}
    js = dict(meta, ae=dict(C=ae.C, w=ae.enc[0].out_channels, p=ae.p))
    if model is not None:
        sd.update({f"umm.{k}": v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()})
        js["config"] = asdict(model.c)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"{path}: not saved, {len(bad)} tensors hold nan/inf (first: {bad[0]}); "
                                 f"the previous checkpoint there (if any) is kept")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path + ".safetensors.tmp")
    js["sha256"] = _sha256(path + ".safetensors.tmp")
    with open(path + ".json.tmp", "w") as f:
        json.dump(js, f, indent=1)
    os.replace(path + ".safetensors.tmp", path + ".safetensors")
    os.replace(path + ".json.tmp", path + ".json")


def _settle(path):
    """Finish a save that was killed between its two renames: the new weights are in place, the new
    .json whole beside them as .json.tmp (the weights' .tmp is gone). The .tmp is renamed into place
    only when the sha256 it records is the weights file's, so a stale or broken one is never taken."""
    tmp = path + ".json.tmp"
    if not os.path.exists(tmp) or os.path.exists(path + ".safetensors.tmp") or not os.path.exists(path + ".safetensors"):
        return
    try:
        with open(tmp) as f:
            sha = json.load(f).get("sha256")
    except (OSError, ValueError):
        return
    if sha and sha == _sha256(path + ".safetensors"):
        try:
            os.replace(tmp, path + ".json")
        except FileNotFoundError:       # another process loading the same checkpoint settled it first
            pass


def _header(path):
    """{name: shape} from the safetensors header of `path`.safetensors (its first 8 + n bytes), read
    without loading a tensor."""
    f = path + ".safetensors"
    size = os.path.getsize(f)
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        head = fh.read(n) if 8 <= size and n <= size - 8 else b""
    try:
        h = json.loads(head)
        return {k: list(v["shape"]) for k, v in h.items() if k != "__metadata__"}
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"{f}: unreadable (no safetensors header); the file is truncated or not a safetensors "
                         f"file: restore it or re-save the checkpoint") from None


def _check_config(path, meta, shapes):
    """The .json's config and AE sizes, checked against the weights file's header before anything is
    built: each value of its type and positive, and each the size the weights have, so a .json that
    asks for thousands of layers or a width of 10^6 is refused in a millisecond instead of being
    allocated (the weights file bounds the model to what it holds)."""
    j = f"{path}.json"
    ae = meta.get("ae")
    if not isinstance(ae, dict) or sorted(ae) != ["C", "p", "w"]:
        raise ValueError(f"{j}: \"ae\" must hold the autoencoder's C, w and p (got {ae!r}); re-save the checkpoint")
    cfg, kinds = meta.get("config"), {f.name: f.type for f in fields(Config)}
    if cfg is not None and not isinstance(cfg, dict):
        raise ValueError(f"{j}: \"config\" must be an object of {list(kinds)}, got {cfg!r}")
    unknown = [k for k in cfg or {} if k not in kinds]
    if unknown:
        raise ValueError(f"{j}: unknown config key {unknown[0]!r}; a config holds {list(kinds)}")
    flags = [k for k in cfg or {} if kinds[k] in (bool, "bool")]
    for k in flags:
        if not isinstance(cfg[k], bool):
            raise ValueError(f"{j}: {k} {cfg[k]!r} must be true or false; the .json is damaged: restore it or "
                             f"re-save the checkpoint")
    for k, v, real in [(f"ae.{k}", v, False) for k, v in ae.items()] + \
            [(k, v, kinds[k] in (float, "float")) for k, v in (cfg or {}).items() if k not in flags]:
        ok = isinstance(v, (float, int) if real else int) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or v <= 0:
            raise ValueError(f"{j}: {k} {v!r} must be a positive {'number' if real else 'whole number'}; the .json "
                             f"is damaged: restore it or re-save the checkpoint")
    sizes = dict(w=("ae.enc.0.weight", 0), C=("ae.enc.6.weight", 0))
    have = {k: shapes[n][i] for k, (n, i) in sizes.items() if n in shapes}
    if "ae.lat_mean" in shapes and "C" in have:
        have["p"] = math.isqrt(shapes["ae.lat_mean"][0] // have["C"])
    bad = [k for k in ("w", "C", "p") if have.get(k) != ae[k]]
    if bad:
        raise ValueError(f"{path}: the autoencoder weights do not fit {j}: " +
                         ", ".join(f"{k} {ae[k]} there, {have.get(k)} in the weights" for k in bad) +
                         "; the .json and .safetensors come from different runs")
    if cfg is None:
        return
    c = dict(asdict(Config()), **cfg)
    if c["n_img"] != N_IMG:
        raise ValueError(f"{j}: n_img {c['n_img']}: this code draws {N_IMG} image tokens per image (model.N_IMG)")
    u = lambda name, i: shapes[f"umm.{name}"][i] if f"umm.{name}" in shapes else None  # noqa: E731
    hd = u("und.0.q_norm.w", 0)
    layers = 0
    while f"umm.und.{layers}.q.weight" in shapes:
        layers += 1
    have = dict(vocab_size=u("tok_emb.weight", 0), d=u("tok_emb.weight", 1), n_layer=layers,
                mlp_hidden=u("und.0.down.weight", 1), latent_ch=u("vae2llm.weight", 1),
                n_head=u("und.0.q.weight", 0) // hd if hd else None, n_kv_head=u("und.0.k.weight", 0) // hd if hd else None)
    bad = [k for k in have if have[k] != c[k]]
    if bad:
        more = f" (missing (e.g. und.{layers}.q.weight))" if c["n_layer"] > layers else \
            (f" (unexpected (e.g. und.{c['n_layer']}.q.weight))" if c["n_layer"] < layers else "")
        raise ValueError(f"{path}: the MoT weights do not fit the config in {j}: " +
                         ", ".join(f"{k} {c[k]} there, {have[k]} in the weights" for k in bad) + more +
                         "; the .json and .safetensors come from different runs, or the code changed the model")


def check_checkpoint(path, flag="--ckpt"):
    """Everything load_weights checks before it reads a tensor, for a script to run before any work
    (e.g. evaluate.py's --encoder): the files are there (a save killed between its two renames is
    finished here, _settle), the JSON parses, the weights' sha256 is the recorded one, the config fits
    the weights' header. `flag`: the flag that named the path, for the hints. Returns the meta."""
    if os.path.isdir(path):
        hint = f" (it holds {os.path.join(path, 'ckpt')}.*: pass {flag} {os.path.join(path, 'ckpt')})" \
            if os.path.exists(os.path.join(path, "ckpt.json")) else ""
        raise FileNotFoundError(f"checkpoint {path} is a folder{hint}; pass the checkpoint path without extension, "
                                f"e.g. data/base or runs/NAME/ckpt")
    _settle(path)
    for ext in (".safetensors", ".json"):
        if not os.path.exists(path + ext):
            raise FileNotFoundError(
                f"checkpoint {path + ext} not found: pass {flag} with the path of a checkpoint "
                f"(without extension), e.g. data/base, or train one with `python pretrain.py`")
    try:
        with open(path + ".json") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}.json: broken JSON ({e.msg}, line {e.lineno}); the checkpoint's config is "
                         f"unreadable: restore it (git checkout {path}.json) or re-save the checkpoint") from None
    if meta.get("sha256") and _sha256(path + ".safetensors") != meta["sha256"]:
        raise ValueError(f"{path}.safetensors: corrupted (its sha256 differs from the one {path}.json recorded "
                         f"at save); restore the file (git checkout / a copy) or re-save the checkpoint")
    _check_config(path, meta, _header(path))
    return meta


def load_weights(path, device="cpu", dtype=torch.float32, flag="--ckpt"):
    """Load (model, ae, meta) saved by save_weights. `path` without extension; `flag`: the flag that
    named it, for the hints. Every failure names the file and the fix: missing, a run folder instead
    of a checkpoint, broken JSON, truncated or corrupted weights (sha256), a config that does not fit
    the weights' header (checked before anything is built: check_checkpoint), non-finite tensors."""
    from safetensors.torch import load_file
    meta = check_checkpoint(path, flag)
    try:
        sd = load_file(path + ".safetensors")
    except Exception as e:      # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"{path}.safetensors: unreadable ({type(e).__name__}: {e}); the file is truncated or "
                         f"not a safetensors file: restore it or re-save the checkpoint") from None
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}.safetensors: {len(bad)} tensors hold nan/inf (first: {bad[0]}); this checkpoint "
                         f"came from a diverged run: load an earlier one")
    ae = PaletteAE(meta["ae"]["C"], meta["ae"]["w"], p=meta["ae"]["p"])
    _load_checked(ae, {k[3:]: v.float() for k, v in sd.items() if k.startswith("ae.")}, path, "autoencoder")
    model = None
    if "config" in meta:
        model = MoT(Config(**meta["config"]))
        _load_checked(model, {k[4:]: v.to(dtype) for k, v in sd.items() if k.startswith("umm.")}, path, "MoT")
        model = model.to(device)
    return model, ae.to(device), meta


def _load_checked(module, sd, path, what):
    """load_state_dict with a short message: how many keys are missing / unexpected / misshapen."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    shape = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or extra or shape:
        ex = lambda ks: f" (e.g. {ks[0]})" if ks else ""  # noqa: E731
        raise ValueError(f"{path}: the {what} weights do not fit the config in {path}.json: {len(missing)} missing"
                         f"{ex(missing)}, {len(extra)} unexpected{ex(extra)}, {len(shape)} of another shape{ex(shape)}; "
                         f"the .json and .safetensors come from different runs, or the code changed the model")
    module.load_state_dict(sd)


# ----------------------------------------------------------------------------- unified generation

@torch.no_grad()
def generate(model, prompts, mode="think", max_think=64, temperature=1.0, generator=None, **img_kw):
    """Text -> image with the model in charge of the switch. prompts: list of id lists (the
    prompt's words, no specials).
      think:  <bos> prompt <think> ... the model decodes its plan and itself emits
              </think> <|vision_start|>, which switches to image generation. A row that emits
              <eos> or runs out of max_think tokens is forced to switch (switched=False).
      forced: <bos> prompt <|vision_start|> -> image right after the prompt.
    CFG's unconditional branch is <bos> <|vision_start|> (all text dropped, as in training).
    Returns dict(think=[token lists], switched=[B] bool, z=[B,n_img,C] latents, cache=context
    cache, with the image not yet in it: append_image re-enters it for interleaved use)."""
    dev = next(model.parameters()).device
    B = len(prompts)
    if mode == "think":
        cache, logits = prefill(model, [[BOS] + list(p) + [THINK] for p in prompts], dev)
        toks, _ = decode_text(model, cache, logits, {VS, EOS}, max_think, temperature, generator)
        switched = force_switch(model, cache, toks)
    elif mode == "forced":
        cache, _ = prefill(model, [[BOS] + list(p) + [VS] for p in prompts], dev)
        toks, switched = [[] for _ in prompts], torch.zeros(B, dtype=torch.bool, device=dev)
    else:
        raise ValueError(f"mode must be 'think' or 'forced', got {mode!r}")
    uncond, _ = prefill(model, [[BOS, VS]] * B, dev)
    z = sample_image(model, cache, uncond, generator=generator, **img_kw)
    return dict(think=toks, switched=switched, z=z, cache=cache)


# ----------------------------------------------------------------------------- interleaved generation (IRG, paper 003)

def fork(cache):
    """A copy of a KV cache that can grow on its own (appends concatenate: tensors are shared, not mutated)."""
    c = copy.copy(cache)
    c.kv, c.pos = list(cache.kv), cache.pos.clone()
    return c


def cfg_combine(v_c, v_tu, v_iu, cfg_text, cfg_img):
    """Text and image CFG, nested as BAGEL's _forward_flow (modeling/bagel/bagel.py, cfg_renorm off):
        v_text = v_tu + cfg_text * (v_c - v_tu)
        v      = v_iu + cfg_img  * (v_text - v_iu)
             = v_iu + cfg_img * (v_tu - v_iu) + cfg_img * cfg_text * (v_c - v_tu)
    (the text term is scaled by cfg_img too). cfg_img 1 leaves plain text CFG."""
    v_text = v_tu + cfg_text * (v_c - v_tu)
    return v_iu + cfg_img * (v_text - v_iu)


def noise_velocity(model, cache, x, t):
    """v_theta(x_t, t | cached context) at the n_img noisy tokens (never written to the cache)."""
    B, n, C = x.shape
    b, _ = step_batch(cache, NOISE, n, B, x.device, lat=x, t=torch.full((B, n), t, device=x.device), C=C)
    return model.velocity(model(b, cache))


def force_text(model, cache, seqs):
    """Teacher-force ragged token lists into the cache, one column at a time as decode_text writes
    its samples (a row that has ended is not live)."""
    dev = cache.pos.device
    for j in range(max(len(x) for x in seqs)):
        live = torch.tensor([len(x) > j for x in seqs], device=dev)
        append_text(model, cache, torch.tensor([[x[j] if len(x) > j else PAD] for x in seqs], device=dev), live)


def force_switch(model, cache, toks):
    """Rows that stopped without <|vision_start|> (hit <eos> or the length cap) are switched by force."""
    sw = torch.tensor([len(t) > 0 and t[-1] == VS for t in toks], device=cache.pos.device)
    if not sw.all():
        append_text(model, cache, torch.full((len(toks), 1), VS, device=cache.pos.device), live=~sw)
    return sw


@torch.no_grad()
def draw_first(model, ae, prompts, s, palette, generator=None):
    """Steps 1-3: think1, image1 (text CFG, interval [cfg_lo1, 1]), image1 decoded and re-entered clean.
    Returns (cache through image1, think1 tokens, switched, image1 latents z1, image1 pixels, re-entered latents)."""
    # think mode as `generate` runs it; its unconditional context <bos> <|vision_start|> is the
    # "system prompt only" of the upstream script
    g = generate(model, prompts, "think", s["max_think"], s["temperature"], generator, steps=s["sample_steps"],
                 cfg=s["cfg_text"], cfg_interval=(s["cfg_lo1"], 1.0), shift=s["shift"])
    cache, t1, sw1, z1 = g["cache"], g["think"], g["switched"], g["z"]
    img1 = ae.decode(z1, palette)
    zc = ae.encode(img1)                                          # re-entered as the AE reads it, not the raw latent
    reenter_image(model, cache, zc)
    return cache, t1, sw1, z1, img1, zc


@torch.no_grad()
def irg_generate(model, ae, prompts, s, palette, generator=None):
    """The whole IRG pipeline, batched and KV-cached. prompts: list of id lists; s: the sampler
    settings (temperature, max_think, sample_steps, cfg_text, cfg_img, cfg_lo1, shift) and optionally
    cfg_text2 (image2's text CFG where it differs from image1's) and ok_ids (score the reflection as a
    critic: P(think2 begins with them), critic_p). palette: the AE's decoding palette.
    Returns dict(think1, think2 (token lists), switched1, switched2, z1, z2, img1, img2 (uint8 numpy),
    p_ok [B] or None)."""
    dev = next(model.parameters()).device
    B = len(prompts)
    cache, t1, sw1, z1, img1, zc = draw_first(model, ae, prompts, s, palette, generator)
    # step 4: think2 after <|vision_end|> <think>; the text-uncond context forks off before <think>
    append_text(model, cache, torch.full((B, 1), VE, device=dev))
    text_unc = fork(cache)
    logits = append_text(model, cache, torch.full((B, 1), THINK, device=dev))
    p_ok = critic_p(model, cache, logits, s["ok_ids"]) if s.get("ok_ids") else None
    t2, _ = decode_text(model, cache, logits, {VS, EOS}, s["max_think"], s["temperature"], generator)
    sw2 = force_switch(model, cache, t2)
    append_text(model, text_unc, torch.full((B, 1), VS, device=dev))
    x = draw_second(model, cache, text_unc, prompts, t1, t2, s, generator)
    img2 = ae.decode(x, palette)
    return dict(think1=t1, think2=t2, switched1=sw1, switched2=sw2, z1=z1, z2=x,
                img1=img1.cpu().numpy(), img2=img2.cpu().numpy(), p_ok=None if p_ok is None else p_ok.cpu().numpy())


@torch.no_grad()
def draw_second(model, cache, text_unc, prompts, t1, t2, s, generator=None):
    """Step 5: image2's latents, Euler from t = 1 (noise) to 0 with three fields per step: cond (cache,
    through think2 and its <vs>), text-uncond (text_unc, through image1 then <ve> <vs>) and img-uncond
    (all the text, no image), combined as BAGEL does (cfg_combine)."""
    dev, c, B = cache.pos.device, model.c, len(prompts)
    x = torch.randn(B, c.n_img, c.latent_ch, device=dev, generator=generator)
    # the img-uncond context: all the text, no image (image1 dropped with its <vs> ... <ve>)
    img_unc, _ = prefill(model, [img_uncond_ids(p, a, b) for p, a, b in zip(prompts, t1, t2)], dev)
    ts = shift_t(torch.linspace(1, 0, s["sample_steps"] + 1), s["shift"]).tolist()
    ct2 = s.get("cfg_text2", s["cfg_text"])                       # image2's text CFG (default: image1's)
    guided = ct2 != 1.0 or s["cfg_img"] != 1.0
    for i in range(s["sample_steps"]):
        t, dt = ts[i], ts[i] - ts[i + 1]
        v = noise_velocity(model, cache, x, t)
        if guided and t >= s.get("cfg_lo2", 0.0):
            v = cfg_combine(v, noise_velocity(model, text_unc, x, t), noise_velocity(model, img_unc, x, t), ct2, s["cfg_img"])
        x = x - v * dt                                            # v = eps - x0: step toward the data
    return x


@torch.no_grad()
def second_given(model, ae, prompts, t1, img1, t2, s, palette, generator=None):
    """image2 for a given think1, image1 (pixels) and think2 (id lists; a missing closing <vs> is
    added, as a forced switch), teacher-forced into the contexts irg_generate samples them in: what the
    drawer does with a given reflection (evaluate.edit_eval). Returns image2's pixels (uint8 numpy)."""
    dev, B = next(model.parameters()).device, len(prompts)
    t1, t2 = ([list(t) + ([] if t and t[-1] == VS else [VS]) for t in ts] for ts in (t1, t2))
    cache, _ = prefill(model, [[BOS] + list(p) + [THINK] + t for p, t in zip(prompts, t1)], dev)
    reenter_image(model, cache, ae.encode(torch.as_tensor(np.asarray(img1), device=dev)))
    append_text(model, cache, torch.full((B, 1), VE, device=dev))
    text_unc = fork(cache)
    append_text(model, text_unc, torch.full((B, 1), VS, device=dev))
    append_text(model, cache, torch.full((B, 1), THINK, device=dev))
    force_text(model, cache, t2)
    return ae.decode(draw_second(model, cache, text_unc, prompts, t1, t2, s, generator), palette).cpu().numpy()


@torch.no_grad()
def critic_p(model, cache, logits, ids):
    """The reflection as a scored critic: P(think2 begins with ids | everything through image1), at
    temperature 1 (ids: "the image is correct"); logits: the next-token logits after <think>. Scored on
    a fork of the cache, which it leaves as it was."""
    c, lp = fork(cache), torch.zeros(logits.shape[0], device=logits.device)
    for j, tok in enumerate(ids):
        lp += torch.log_softmax(logits.float(), -1)[:, tok]
        if j + 1 < len(ids):
            logits = append_text(model, c, torch.full((logits.shape[0], 1), tok, device=logits.device))
    return lp.exp()


def redraw_plan(t2, marker):
    """The plan a think2 writes after `marker` (the ids of "redraw :"), closed by </think> <|vision_start|>
    as a think1 is; all of think2 where the marker is missing."""
    t = list(t2)
    at = [i for i in range(len(t) - len(marker) + 1) if t[i:i + len(marker)] == list(marker)] if marker else []
    t = t[at[-1] + len(marker):] if at else t
    while t and t[-1] in (VS, EOS, END_THINK):
        t = t[:-1]
    return t + [END_THINK, VS]


def img_uncond_ids(p, t1, t2):
    """<bos> P <think> T1 </think> <think> T2 </think> <vs>: the context with image1 (and its <vs>) removed."""
    t1 = t1[:-1] if t1 and t1[-1] == VS else t1
    t2 = t2 if t2 and t2[-1] == VS else list(t2) + [VS]
    return [BOS] + list(p) + [THINK] + list(t1) + [THINK] + list(t2)
