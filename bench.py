"""GPU benchmark of the Triton kernels (kernels/) against PyTorch, and the training step.

    python bench.py --step           # the pre-training step (CPU or CUDA), see bench_step
    python bench.py                  # the kernels (several minutes: torch.compile and Flex compile)
    python bench.py --quick          # fewer sizes
    python bench.py --only loss      # or --only attn
    python bench.py --tune           # also sweep a few tile configs (prints, does not change them)

Loss: fused Triton forward+backward vs the eager twin vs torch.compile(twin), bf16 [B, T, C]
with C = 64, B = 64, per-sample w. GB/s counts the bytes the fused kernel must move (read v,
eps, x0, w; write grad: ~8 B/element) for every column, so the columns compare times; "copy"
is a device-to-device copy's bandwidth (bytes read + written), the ceiling.

Attention: Triton vs SDPA with a dense boolean mask vs compiled FlexAttention (mask_mod of the
same rule, create_block_mask), bf16, d = 128, H = 16, Hkv = 16 and 4 (GQA), rows of packed
samples (text + clean image + text + noise image, spans of 256..1024 tokens, unaligned).
TFLOP/s counts only allowed query-key pairs: 4*d*pairs per head forward, 2.5x that backward.
Tile plans and Flex block masks are built once per layout, outside the timings (like the model:
one plan per batch, shared by every layer); their build time is printed.

Before timing, the Triton outputs are checked against the twin on the GPU (bf16 tolerances).
Without CUDA it prints "needs CUDA" and exits 0. Paste the tables into RESULTS.md.
"""
import argparse
import sys
import time

import torch
import torch.nn.functional as F


def bench(fn, grad_to_none=None):
    """Median ms (triton's do_bench: events, L2 flushed before every call)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def bench_graph(fn, grad_to_none=None):
    """Median ms of fn replayed from a CUDA graph: GPU time without the host's launch and
    autograd overhead (which a training step hides behind the GPU's queue). L2 is not
    flushed: inputs under ~40 MB (N <= 2^22 here) partly stay in L2. Falls back to bench()."""
    from triton.testing import do_bench_cudagraph
    try:
        return do_bench_cudagraph(fn, rep=100, grad_to_none=grad_to_none, return_mode="median")
    except Exception as ex:  # noqa: BLE001
        print(f"  (CUDA graph capture failed: {type(ex).__name__}; timing without graphs)")
        return bench(fn, grad_to_none)


def copy_bandwidth():
    x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() / ms / 1e6          # GB/s, read + write


# ----------------------------------------------------------------------------- loss
def bench_loss(quick, tune):
    import kernels.loss as kl
    print("\n## Fused velocity loss (fwd + bwd), bf16, w per sample\n")
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write)\n")
    B, C = 64, 64
    exps = [20, 24] if quick else list(range(20, 27))
    compiled = torch.compile(kl.velocity_loss_ref)
    rows = []
    for i, e in enumerate(exps):
        N = 2 ** e
        T = N // (B * C)
        g = torch.Generator(device="cuda").manual_seed(e)
        mk = lambda: torch.randn(B, T, C, device="cuda", generator=g).to(torch.bfloat16)  # noqa: E731
        v, eps, x0 = mk().requires_grad_(), mk(), mk()
        w = torch.rand(B, device="cuda", generator=g)
        if i == 0:
            check_loss(kl, v, eps, x0, w)
        step = lambda f: f(v, eps, x0, w).backward()  # noqa: E731
        step(compiled)
        t_fused = bench_graph(lambda: step(kl.velocity_loss), grad_to_none=[v])
        t_eager = bench_graph(lambda: step(kl.velocity_loss_ref), grad_to_none=[v])
        t_comp = bench_graph(lambda: step(compiled), grad_to_none=[v])
        t_kernel = bench(lambda: kl.velocity_loss_fwd(v, eps, x0, w))
        nbytes = N * 2 * 4 + w.numel() * 4
        gbs = lambda ms, nbytes=nbytes: nbytes / ms / 1e6  # noqa: E731
        rows.append((e, B, T, C, t_fused, t_kernel, t_eager, t_comp, gbs))
        if tune and e == 24:
            tune_loss(kl, v, eps, x0, w, nbytes, bw)
    print("| N | shape | fused fwd+bwd ms | GB/s | % of copy | eager ms | compile ms | fused vs compile "
          "| kernel only ms (L2 flushed) | GB/s | % of copy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for e, B_, T, C_, tf, tk, te, tc, gbs in rows:
        print(f"| 2^{e} | {B_}x{T}x{C_} | {tf:.4f} | {gbs(tf):.0f} | {100 * gbs(tf) / bw:.0f}% "
              f"| {te:.4f} ({gbs(te):.0f} GB/s) | {tc:.4f} ({gbs(tc):.0f} GB/s) | {tc / tf:.2f}x "
              f"| {tk:.4f} | {gbs(tk):.0f} | {100 * gbs(tk) / bw:.0f}% |")
    print("\nfwd+bwd columns: loss + loss.backward() replayed from a CUDA graph (GPU time; small N "
          "partly in L2). GB/s = the fused kernel's bytes (8 B/element + w) / time, for every "
          "column. 'kernel only' = velocity_loss_fwd (forward kernel + final sum), do_bench.")


def check_loss(kl, v, eps, x0, w):
    import kernels
    kernels.USE_TRITON = True
    vv = v.detach().clone().requires_grad_()
    loss = kl.velocity_loss(vv, eps, x0, w)
    loss.backward()
    vr = v.detach().float().requires_grad_()
    ref = kl.velocity_loss_ref(vr, eps.float(), x0.float(), w)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=5e-3, rtol=5e-2)
    torch.testing.assert_close(vv.grad.float(), vr.grad, atol=5e-3, rtol=5e-2)
    print("loss check vs twin: ok")


def tune_loss(kl, v, eps, x0, w, nbytes, bw):
    print("\ntune (2^24): BLOCK, num_warps -> velocity_loss_fwd ms, GB/s; forward kernel alone")
    keep = kl.LOSS_BLOCK, kl.LOSS_WARPS
    n = v.numel()
    grad, out = torch.empty_like(v), torch.empty((), device="cuda")
    for blk in (2048, 4096, 8192):
        for nw in (4, 8):
            kl.LOSS_BLOCK, kl.LOSS_WARPS = blk, nw
            ms = bench(lambda: kl.velocity_loss_fwd(v, eps, x0, w))
            nprog = triton_cdiv(n, blk)
            part = torch.empty(nprog, device="cuda")
            ms_k = bench(lambda: kl._vloss_fwd_kernel[(nprog,)](
                v, eps, x0, v, w, grad, part, n, 64, n // w.numel(), 2.0 / n, 0.0, W_MODE=1,
                HAS_REF=False, HAS_LAM=False, STORE_GRAD=True, INT64=False, BLOCK=blk, num_warps=nw))
            ms_s = bench(lambda: kl._sum_partials_kernel[(1,)](part, out, nprog, 1.0, BLOCK=kl.SUM_BLOCK,
                                                               num_warps=8))
            print(f"  {blk:6d} {nw:3d}  {ms:.4f} ms  {nbytes / ms / 1e6:.0f} GB/s  {100 * nbytes / ms / 1e6 / bw:.0f}%"
                  f"   kernel alone {ms_k:.4f} ms {100 * nbytes / ms_k / 1e6 / bw:.0f}%, sum {ms_s:.4f} ms")
    kl.LOSS_BLOCK, kl.LOSS_WARPS = keep
    print()


def triton_cdiv(a, b):
    return -(-a // b)


# ----------------------------------------------------------------------------- attention
def packed_layout(B, S, seed=0, align=1):
    """Rows of packed samples: text (32..255), clean image span, 8 text tokens, noise image
    span (each 256, 576 or 1024 tokens), until S; the remainder is padding (its own sample).
    align > 1 rounds every span start up to a multiple of align (the tile-alignment advice)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    sizes = (256, 576, 1024)
    sample, split, kind = (torch.zeros(B, S, dtype=torch.int32) for _ in range(3))
    for b in range(B):
        pos, s, sp = 0, 0, 0
        while True:
            img = sizes[r(0, 3)]
            spans = [(0, r(32, 256)), (1, img), (0, 8), (2, img)]
            need = sum(n for _, n in spans) + 4 * align
            if pos + need > S:
                break
            for k, n in spans:
                if k > 0 and align > 1:          # pad the text before an image to a tile edge
                    pad = -(pos) % align
                    sample[b, pos:pos + pad], split[b, pos:pos + pad], kind[b, pos:pos + pad] = s, sp - 1, 0
                    pos += pad
                sample[b, pos:pos + n], split[b, pos:pos + n], kind[b, pos:pos + n] = s, sp, k
                pos, sp = pos + n, sp + 1
            s += 1
        sample[b, pos:], split[b, pos:], kind[b, pos:] = s, sp, 0
    idx = torch.arange(S, dtype=torch.int32).expand(B, S).contiguous()
    return tuple(t.cuda() for t in (sample, split, kind, idx))


def flex_mask(meta, B, S):
    from torch.nn.attention.flex_attention import create_block_mask
    sm, sp, kd, ix = meta

    def mask_mod(b, h, q, k):
        same = sp[b, q] == sp[b, k]
        allow = (ix[b, q] >= ix[b, k]) | (same & (kd[b, q] > 0))
        allow = allow & ((kd[b, k] != 2) | same)
        return allow & (sm[b, q] == sm[b, k])
    return create_block_mask(mask_mod, B, None, S, S, device="cuda")


def check_attention(q, k, v, meta, attention, attention_ref):
    """Triton vs the twin on the GPU: o within bf16 tolerance of the fp32 twin; gradients
    within 2x the bf16 twin's own error + atol (flash-attn's criterion, see test_kernels.py)."""
    do = torch.randn_like(q)

    def run(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        o = fn(*xs, meta)
        o.backward(do.to(o.dtype))
        return [o.detach()] + [x.grad for x in xs]
    out = run(attention, q, k, v)
    twin = run(attention_ref, q, k, v)
    ref = run(attention_ref, q.float(), k.float(), v.float())
    for name, a, t, r in zip(("o", "dq", "dk", "dv"), out, twin, ref):
        assert torch.isfinite(a).all(), name
        err, err_twin = (a.float() - r).abs().max().item(), (t.float() - r).abs().max().item()
        if name == "o":
            torch.testing.assert_close(a.float(), r, atol=5e-3, rtol=5e-2)
        assert err <= 2 * err_twin + 5e-3, (name, err, err_twin)
        print(f"  {name}: max err {err:.2e} (bf16 twin {err_twin:.2e})")
    print("attention check vs twin: ok")


def bench_attn(quick, tune):
    import kernels
    import kernels.attention as ka
    kernels.USE_TRITON = True
    print("\n## Block-sparse flash attention, bf16, d = 128, H = 16\n")
    try:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    except Exception as ex:  # noqa: BLE001
        print(f"FlexAttention unavailable: {ex!r}")
        flex = None
    H, D = 16, 128
    Ss = [4096, 8192] if quick else [2048, 4096, 8192, 16384]
    hkvs = [16, 4]
    rows = []
    for si, S in enumerate(Ss):
        B = max(1, 16384 // S)                   # 16k tokens per batch at every S
        meta = packed_layout(B, S, seed=S)
        mask = ka.allowed_mask(meta, meta)
        pairs = mask.sum().item()
        density = pairs / (B * S * S)
        warm = packed_layout(1, 256)                         # compile the planner first
        for key in ("fwd", "dq", "dkdv"):
            ka._plan(warm, *(ka.CONFIGS or ka._configs(D, torch.bfloat16))[key][:2], key == "dkdv")
        ka._PLANS.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for key in ("fwd", "dq", "dkdv"):
            BM, BN = (ka.CONFIGS or ka._configs(D, torch.bfloat16))[key][:2]
            ka._plan(meta, BM, BN, key == "dkdv")
        torch.cuda.synchronize()
        t_plan = (time.perf_counter() - t0) * 1e3
        cfg = (ka.CONFIGS or ka._configs(D, torch.bfloat16))["fwd"]
        cls = ka.tile_classes(meta, cfg[0], cfg[1])
        n_part, n_full = (cls == ka.PARTIAL).sum().item(), (cls == ka.FULL).sum().item()
        t_bm = None
        if flex is not None:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            bm = flex_mask(meta, B, S)
            torch.cuda.synchronize()
            t_bm = (time.perf_counter() - t0) * 1e3
        cls_al = ka.tile_classes(packed_layout(B, S, seed=S, align=cfg[0]), cfg[0], cfg[1])
        print(f"S={S} B={B}: allowed pairs {density:.1%} of S^2; fwd tiles {tuple(cfg[:2])}: "
              f"{n_full} full, {n_part} partial, {cls.numel() - n_full - n_part} empty "
              f"({(cls_al == ka.PARTIAL).sum().item()} partial if spans were aligned to {cfg[0]}); "
              f"plan {t_plan:.1f} ms" + (f", flex block mask {t_bm:.1f} ms" if t_bm else ""))
        for hkv in hkvs:
            g = torch.Generator(device="cuda").manual_seed(S + hkv)
            mk = lambda h: torch.randn(B, h, S, D, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
            q, k, v = mk(H), mk(hkv), mk(hkv)
            do = torch.randn_like(q)
            if si == 0 and hkv == hkvs[-1]:
                sub = (t[:1] for t in meta)
                check_attention(q[:1], k[:1], v[:1], tuple(sub), ka.attention, ka.attention_ref)
            flops = 4 * D * pairs * H
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            res = {}

            def fb(fn):
                return lambda: fn(qg, kg, vg).backward(do)
            impls = [("triton", lambda a, b, c: ka.attention(a, b, c, meta))]
            rep = H // hkv
            ke, ve = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            ke_g, ve_g = ke.clone().requires_grad_(), ve.clone().requires_grad_()
            sdpa_mask = mask[:, None]
            impls.append(("sdpa dense mask", None))
            if flex is not None:
                impls.append(("flex (compiled)", lambda a, b, c: flex(a, b, c, block_mask=bm,
                                                                     enable_gqa=hkv != H)))
            for name, fn in impls:
                try:
                    if name == "sdpa dense mask":    # k/v expanded outside the timing
                        f_fwd = lambda: F.scaled_dot_product_attention(q, ke, ve, attn_mask=sdpa_mask)  # noqa: E731
                        f_fb = lambda: F.scaled_dot_product_attention(  # noqa: E731
                            qg, ke_g, ve_g, attn_mask=sdpa_mask).backward(do)
                        gtn = [qg, ke_g, ve_g]
                    else:
                        f_fwd, f_fb, gtn = (lambda fn=fn: fn(q, k, v)), fb(fn), [qg, kg, vg]
                    f_fwd()
                    f_fb()
                    t_f = bench(f_fwd)
                    t_fb = bench(f_fb, grad_to_none=gtn)
                    res[name] = (t_f, t_fb)
                except Exception as ex:  # noqa: BLE001
                    print(f"  {name} S={S} Hkv={hkv}: failed: {type(ex).__name__}: {str(ex)[:200]}")
                    res[name] = None
                torch.cuda.empty_cache()
            rows.append((S, B, hkv, density, flops, res))
            if tune and hkv == hkvs[-1] and S == Ss[-1]:
                tune_attn(ka, q, k, v, do, meta, flops)
            del q, k, v, qg, kg, vg, ke, ve, ke_g, ve_g, do
            torch.cuda.empty_cache()
    print("\n| S | B | H/Hkv | density | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | bwd ms | bwd TFLOP/s "
          "| fwd vs flex | bwd vs flex |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for S, B, hkv, density, flops, res in rows:
        fl = res.get("flex (compiled)")
        for name, r in res.items():
            if r is None:
                print(f"| {S} | {B} | {H}/{hkv} | {density:.1%} | {name} | failed | | | | | | |")
                continue
            t_f, t_fb = r
            t_b = t_fb - t_f
            vs = (f"{fl[0] / t_f:.2f}x", f"{(fl[1] - fl[0]) / t_b:.2f}x") if fl else ("", "")
            print(f"| {S} | {B} | {H}/{hkv} | {density:.1%} | {name} | {t_f:.3f} | {flops / t_f / 1e9:.0f} "
                  f"| {t_fb:.3f} | {t_b:.3f} | {2.5 * flops / t_b / 1e9:.0f} | {vs[0]} | {vs[1]} |")
    print("\nratios vs flex: flex time / this time (>1 = faster than Flex); bwd = (fwd+bwd) - fwd.")


def tune_attn(ka, q, k, v, do, meta, flops):
    """Sweep a few tile configs (BM, BN, num_warps, num_stages) at the largest shape."""
    S, hkv = q.shape[2], k.shape[1]
    print(f"\ntune attention S={S} Hkv={hkv}: config -> ms, TFLOP/s")
    keep = ka.CONFIGS
    base = ka._configs(q.shape[-1], q.dtype)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    for fwd in [(64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 8, 3), (64, 32, 4, 3),
                (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 8, 3)]:
        ka.CONFIGS = dict(base, fwd=fwd)
        try:
            ms = bench(lambda: ka.attention(q, k, v, meta))
            print(f"  fwd {fwd}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s")
        except Exception as ex:  # noqa: BLE001
            print(f"  fwd {fwd}: failed {type(ex).__name__}: {str(ex)[:120]}")
    d0 = base["dq"]
    k0 = base["dkdv"]
    for dq, dkdv in [(d0, k0), ((64, 64, 4, 4), k0), ((64, 32, 4, 3), k0), ((64, 128, 8, 3), k0),
                     ((128, 64, 8, 3), k0), ((64, 64, 8, 3), k0),
                     (d0, (64, 64, 4, 4)), (d0, (32, 64, 4, 3)), (d0, (64, 128, 8, 3)),
                     (d0, (128, 64, 8, 3)), (d0, (64, 64, 8, 3)), (d0, (128, 128, 8, 2))]:
        ka.CONFIGS = dict(base, dq=dq, dkdv=dkdv)
        try:
            o = ka.attention(qg, kg, vg, meta)
            ms = bench(lambda: o.backward(do, retain_graph=True), grad_to_none=[qg, kg, vg])
            print(f"  bwd dq {dq} dkdv {dkdv}: {ms:.3f} ms {2.5 * flops / ms / 1e9:.0f} TFLOP/s")
        except Exception as ex:  # noqa: BLE001
            print(f"  bwd dq {dq} dkdv {dkdv}: failed {type(ex).__name__}: {str(ex)[:120]}")
    ka.CONFIGS = keep
    print()


# ----------------------------------------------------------------------------- training step
# The one-sample-per-row step, kept as the baseline (and as the reference test_pack.py checks
# the packed forward against): routing gathers and scatters around every op, rope tables and the
# mask rebuilt in every layer, separate q/k/v matmuls.

class OldRouter:
    def __init__(self, kind):
        import model as M
        flat = kind.reshape(-1)
        self.shape = kind.shape
        self.gen = M.on_gen(flat).nonzero().squeeze(1)
        self.und = (~M.on_gen(flat)).nonzero().squeeze(1)

    def __call__(self, fn_und, fn_gen, x):
        xf = x.reshape(-1, *x.shape[2:])
        outs = []
        for fn, ix in ((fn_und, self.und), (fn_gen, self.gen)):
            outs.append((ix, fn(xf[ix]) if len(ix) else None))
        ref = next(o for ix, o in outs if o is not None)
        ref = ref if isinstance(ref, tuple) else (ref,)
        res = [r.new_empty(xf.shape[0], *r.shape[1:]) for r in ref]
        for ix, o in outs:
            if o is None:
                continue
            for r, oo in zip(res, o if isinstance(o, tuple) else (o,)):
                r[ix] = oo
        res = [r.reshape(*self.shape, *r.shape[1:]) for r in res]
        return res[0] if len(res) == 1 else tuple(res)


def old_rope(x, pos, base):
    hd = x.shape[-1]
    inv = base ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = pos.float()[..., None] * inv
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).type_as(x)


def old_qkv(e, x):
    h = e.norm1(x)
    q = e.q_norm(e.q(h).unflatten(-1, (-1, e.hd)))
    k = e.k_norm(e.k(h).unflatten(-1, (-1, e.hd)))
    return q, k, e.v(h).unflatten(-1, (-1, e.hd))


def old_forward(m, b, heads=False):
    """MoT.forward as it was (no cache): returns h [B,L,d], or (logits, velocity) row-major."""
    import model as M
    from kernels.attention import attention
    c, kind = m.c, b["kind"]
    lat, ipos = b["lat"], b["ipos"]
    x = m.tok_emb(b["ids"])
    img = kind != M.TEXT
    if img.any():
        pe = m.latent_pos[ipos]
        xu = m.vae2llm_und(lat) + pe
        xg = m.vae2llm(lat) + pe + m.time_embedder(M.timestep_embedding(b["t"].reshape(-1), c.d)).view(*kind.shape, -1)
        x = torch.where((kind == M.CLEAN)[..., None], xu.to(x.dtype), x)
        x = torch.where(M.on_gen(kind)[..., None], xg.to(x.dtype), x)
    route = OldRouter(kind)
    meta = (b["sample"], b["split"], kind, b["idx"])
    for i in range(c.n_layer):
        eu, eg = m.und[i], m.gen[i]
        q, k, v = route(lambda t: old_qkv(eu, t), lambda t: old_qkv(eg, t), x)
        q, k = old_rope(q, b["pos"], c.rope_base), old_rope(k, b["pos"], c.rope_base)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = attention(q, k, v, meta)
        y = y.transpose(1, 2).flatten(2)
        x = x + route(eu.o, eg.o, y)
        x = x + route(eu.mlp, eg.mlp, x)
    h = route(m.norm, m.norm_gen, x)
    if heads:
        return m.logits(h[b["labels"] != -100]), m.velocity(h[kind == M.NOISE])
    return h


class OldStep(torch.nn.Module):
    """Wraps a MoT so that calling it runs old_forward (for token_losses)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, b, heads=False):
        return old_forward(self.m, b, heads)


class Plain(torch.nn.Module):
    """A plain dense transformer of the same width and depth: one Expert per layer (same norms,
    q/k/v/o, QK-norm, SwiGLU), rope, the same attention and mask, the same two heads; no
    routing. The yardstick for what the MoT's two experts cost per token."""

    def __init__(self, c):
        super().__init__()
        import model as M
        self.c = c
        self.tok_emb = torch.nn.Embedding(c.vocab_size, c.d)
        self.vae2llm = torch.nn.Linear(c.latent_ch, c.d)
        self.register_buffer("latent_pos", M.sincos_2d(c.n_img, c.d), persistent=False)
        self.blocks = torch.nn.ModuleList(M.Expert(c) for _ in range(c.n_layer))
        self.norm = M.RMSNorm(c.d)
        self.lm_head = torch.nn.Linear(c.d, c.vocab_size, bias=False)
        self.llm2vae = torch.nn.Linear(c.d, c.latent_ch)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.02)

    def forward(self, b, heads=True):
        import model as M
        from kernels.attention import allowed_mask
        c, kind = self.c, b["kind"]
        H, Hkv = c.n_head, c.n_kv_head
        x = self.tok_emb(b["ids"])
        x = torch.where((kind != M.TEXT)[..., None], self.vae2llm(b["lat"]) + self.latent_pos[b["ipos"]], x)
        cos, sin = M.rope_cos_sin(b["pos"], c.d // H, c.rope_base)
        meta = (b["sample"], b["split"], kind, b["idx"])
        mask = allowed_mask(meta, meta)[:, None]
        for blk in self.blocks:
            qkv = blk.qkv(x)
            qk = M.rope(qkv[:, :, :H + Hkv], cos, sin)
            q, k, v = (t.transpose(1, 2) for t in (qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv:]))
            k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + blk.o(y.transpose(1, 2).flatten(2))
            x = x + blk.mlp(x)
        h = self.norm(x).flatten(0, 1)
        return self.lm_head(h[b["lab_idx"]]), self.llm2vae(h[b["gen_idx"]]).float()


def step_loss(model, b):
    """The pre-training loss of pretrain.py (one process): global token means."""
    import model as M
    from kernels.loss import velocity_loss
    ce, v = M.token_losses(model, b)
    loss = (ce * b["lw"]).sum() / max(int((b["lw"] > 0).sum()), 1)
    if v.shape[0]:
        loss = loss + velocity_loss(v.view_as(b["x0"]), b["eps"], b["x0"])
    return loss


def bench_step(args):
    """Times one pre-training step (forward + backward of pretrain.py's loss, no optimizer) on
    real batches of pretrain.make_batch, every variant on the same samples, interleaved batch
    by batch (a shared machine's noise hits all variants alike); median over the batches.
      gathered   rows of one sample (right-padded), the gather-scatter forward (OldStep)
      padded     rows of one sample, the fused forward
      packed     rows of --row_len holding many samples (first-fit decreasing), fused forward
      +compile   the same under torch.compile (compile time excluded: warm-up batches)
      plain      the dense transformer above (same width/depth/attention) on the packed rows
    Real tokens/s counts tokens of samples, not pads; events = torch.profiler events of one step."""
    import numpy as np
    import model as M
    import pretrain as P
    import world
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base, ae, _ = M.load_weights(args.ckpt, dev) if args.ckpt else (None, None, None)
    cfg = base.c if base is not None else M.config_for(args.depth, len(world.VOCAB))
    mot = base if base is not None else M.MoT(cfg).to(dev)
    if ae is None:
        ae = M.PaletteAE(w=16).to(dev)
    mot.train()
    plain = Plain(cfg).to(dev)
    banned = world.eval_prompts()

    def batch(step, row_len):
        b = P.make_batch(args.seed, step, 0, args.batch, banned, 0.1, 1.0, cfg.latent_ch, row_len)
        return P.to_device(b, ae, dev)
    n_warm = args.warm
    steps = list(range(n_warm + args.n))
    data = {"rows": [batch(s, None) for s in steps], "packed": [batch(s, args.row_len) for s in steps]}
    comp = dict(dynamic=True) if args.dynamic else {}
    variants = [("gathered (padded)", OldStep(mot), "rows"),
                ("padded, fused fwd", mot, "rows"),
                ("packed", mot, "packed"),
                ("packed + compile", torch.compile(mot, **comp), "packed"),
                ("plain, packed", plain, "packed"),
                ("plain, packed + compile", torch.compile(plain, **comp), "packed")]
    if args.no_compile:
        variants = [v for v in variants if "compile" not in v[0]]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def one(model, b):
        model.zero_grad(set_to_none=True)
        step_loss(model, b).backward()
    times = {name: [] for name, _, _ in variants}
    t_compile, failed = {}, {}
    for j in range(len(steps)):
        for name, model, key in list(variants):
            b = data[key][j]
            sync()
            t0 = time.perf_counter()
            try:
                one(model, b)
            except Exception as e:      # a compiler failure costs its row, not the other rows' numbers
                if "compile" not in name:
                    raise
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                variants.remove((name, model, key)); times.pop(name)
                continue
            sync()
            dt = time.perf_counter() - t0
            if j >= n_warm:
                times[name].append(dt)
            elif "compile" in name:
                t_compile[name] = t_compile.get(name, 0.0) + dt
    events = {}
    for name, model, key in variants:
        from torch.profiler import profile, ProfilerActivity
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with profile(activities=acts) as prof:
            one(model, data[key][-1])
            sync()
        events[name] = len(prof.events())
    real = [int((b["sample"] >= 0).sum()) for b in data["rows"][n_warm:]]
    n_real = float(np.sum(real))
    print(f"\n## Pre-training step (forward + backward), {dev}, depth {cfg.n_layer} d {cfg.d}, batch {args.batch}, "
          f"fp32, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    for key in data:
        bb = data[key][n_warm:]
        frac = n_real / sum(b["sample"].numel() for b in bb)
        shapes = sorted({tuple(b["sample"].shape) for b in bb})
        print(f"{key}: real-token fraction {frac:.3f} (B x L: {', '.join(f'{s[0]}x{s[1]}' for s in shapes)})")
    for name, err in failed.items():
        print(f"{name}: FAILED ({err}); the row is left out")
    if t_compile:
        print("compile + warm-up (first %d batches): " % n_warm +
              ", ".join(f"{k} {v:.0f} s" for k, v in t_compile.items()))
    med = {k: float(np.sum(v)) / len(v) for k, v in times.items()}   # mean: the same batches for all
    per_step = n_real / len(real)
    t0 = med[variants[0][0]]
    print(f"\nmean over {args.n} batches ({per_step:.0f} real tokens per step)\n")
    print("| variant | ms / step | real tokens/s | vs gathered | profiler events / step |")
    print("|---|---|---|---|---|")
    for name, _, _ in variants:
        print(f"| {name} | {1e3 * med[name]:.0f} | {per_step / med[name]:.0f} | {t0 / med[name]:.2f}x | {events[name]} |")
    for mo, pl in (("packed", "plain, packed"), ("packed + compile", "plain, packed + compile")):
        if mo in med and pl in med:
            print(f"MoT / plain time per real token ({mo}): {med[mo] / med[pl]:.2f}")
    if "packed + compile" in med:
        print(f"MoT packed + compile vs plain eager: {med['packed + compile'] / med['plain, packed']:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument("--only", choices=["loss", "attn"], help="run one benchmark")
    ap.add_argument("--tune", action="store_true", help="also sweep a few tile configs")
    ap.add_argument("--step", action="store_true", help="time the pre-training step (CPU or CUDA)")
    ap.add_argument("--ckpt", default="data/base", help="--step: weights (and AE) to time; '' = random init")
    ap.add_argument("--depth", type=int, default=6, help="--step without --ckpt: model depth")
    ap.add_argument("--batch", type=int, default=32, help="--step: samples per step")
    ap.add_argument("--row_len", type=int, default=160, help="--step: packed row length")
    ap.add_argument("--n", type=int, default=8, help="--step: timed batches")
    ap.add_argument("--warm", type=int, default=3, help="--step: untimed warm-up batches (compiles)")
    ap.add_argument("--seed", type=int, default=0, help="--step: data seed")
    ap.add_argument("--dynamic", type=int, default=1, help="--step: torch.compile(dynamic=True)")
    ap.add_argument("--no_compile", action="store_true", help="--step: skip the compiled variants")
    ap.add_argument("--threads", type=int, default=0, help="--step: torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.step:
        if args.threads:
            torch.set_num_threads(args.threads)
        bench_step(args)
        return 0
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    import triton
    torch.manual_seed(0)
    p = torch.cuda.get_device_properties(0)
    print(f"# nanoUMM kernels: {p.name}, {p.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    if args.only in (None, "loss"):
        bench_loss(args.quick, args.tune)
    if args.only in (None, "attn"):
        bench_attn(args.quick, args.tune)
    return 0


if __name__ == "__main__":
    sys.exit(main())
