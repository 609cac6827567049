"""Triton kernels vs their PyTorch twins, on CPU through Triton's interpreter.

    python -m pytest -q test_kernels.py          # ~1 min on 2 CPU cores

TRITON_INTERPRET=1 is set before Triton is imported (setdefault: on a GPU machine
`TRITON_INTERPRET=0 python -m pytest test_kernels.py` runs the same tests compiled, on CUDA).
Tolerances (Liger's): fp32 atol 1e-5 rtol 5e-4; bf16 atol 5e-3 rtol 5e-2. bf16 results are
compared with the twin in fp32 on the same (bf16-representable) inputs, the exact answer,
for the output and every gradient. (The attention forward keeps o in fp32 for the backward's
delta = rowsum(o * do): from the bf16-rounded o, dq/dk missed rtol 5e-2 on ~0.1% of entries,
as the bf16 twin itself does; flash-attn's "2x the bf16 twin's error" criterion is checked too.)
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
import kernels.attention as attn  # noqa: E402
from kernels.attention import EMPTY, FULL, PARTIAL, allowed_mask, attention, attention_ref  # noqa: E402
from kernels.loss import velocity_loss, velocity_loss_ref  # noqa: E402

DEV = "cuda" if (not kernels.interpreting() and torch.cuda.is_available()) else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=5e-4), torch.bfloat16: dict(atol=5e-3, rtol=5e-2)}


SMALL_TILES = dict(fwd=(32, 16, 4, 2), dq=(32, 16, 4, 2), dkdv=(16, 32, 4, 2))  # many tiles at small L


@pytest.fixture(autouse=True)
def triton_on(monkeypatch):
    monkeypatch.setattr(kernels, "USE_TRITON", True)
    monkeypatch.setattr(attn, "CONFIGS", SMALL_TILES)   # what the interpreter uses anyway
    attn._PLANS.clear()


# ---------------------------------------------------------------- velocity loss
def _loss_inputs(shape, dtype, w_mode, ref, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T, C = shape
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    v, eps, x0 = mk(B, T, C), mk(B, T, C), mk(B, T, C)
    w = {None: None, "sample": torch.rand(B, generator=g), "token": torch.rand(B, T, generator=g)}[w_mode]
    w = None if w is None else w.to(DEV)
    return v, eps, x0, w, (mk(B, T, C) if ref else None)


def _loss_and_grad(fn, v, eps, x0, w, x0_ref, lam, g):
    v = v.detach().clone().requires_grad_()
    loss = fn(v, eps, x0, w, x0_ref, lam)
    (loss * g).backward()
    return loss.detach(), v.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_mode", [None, "sample", "token"])
@pytest.mark.parametrize("ref,lam", [(False, 0.0), (False, 0.5), (True, 0.5), (True, 0.0)])
@pytest.mark.parametrize("shape", [(3, 7, 13), (2, 45, 130)])   # 2nd: several programs
def test_loss_matches_twin(dtype, w_mode, ref, lam, shape):
    v, eps, x0, w, x0_ref = _loss_inputs(shape, dtype, w_mode, ref)
    g = torch.tensor(-1.7, device=DEV)                              # random upstream gradient
    loss, grad = _loss_and_grad(velocity_loss, v, eps, x0, w, x0_ref, lam, g)
    # reference: the twin on fp32 copies (bf16: the exact answer for these inputs)
    up = lambda t: None if t is None else t.float()  # noqa: E731
    loss_ref, grad_ref = _loss_and_grad(velocity_loss_ref, up(v), up(eps), up(x0), w, up(x0_ref), lam, g)
    assert grad.dtype == v.dtype and loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_ref, **TOL[dtype])
    torch.testing.assert_close(grad.float(), grad_ref, **TOL[dtype])
    if dtype == torch.bfloat16:                                    # and the bf16 twin as is
        loss_tw, grad_tw = _loss_and_grad(velocity_loss_ref, v, eps, x0, w, x0_ref, lam, g)
        torch.testing.assert_close(loss, loss_tw, **TOL[dtype])
        torch.testing.assert_close(grad.float(), grad_tw.float(), **TOL[dtype])


def test_loss_deterministic_and_unit_grad():
    v, eps, x0, w, x0_ref = _loss_inputs((4, 33, 129), torch.float32, "token", True, seed=1)
    a = _loss_and_grad(velocity_loss, v, eps, x0, w, x0_ref, 0.3, 1.0)   # grad_output == 1
    b = _loss_and_grad(velocity_loss, v, eps, x0, w, x0_ref, 0.3, 1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])        # bit-identical reruns
    r = _loss_and_grad(velocity_loss_ref, v, eps, x0, w, x0_ref, 0.3, 1.0)
    torch.testing.assert_close(a[0], r[0], **TOL[torch.float32])
    torch.testing.assert_close(a[1], r[1], **TOL[torch.float32])


def test_loss_without_grad_and_twin_switch(monkeypatch):
    v, eps, x0, w, _ = _loss_inputs((3, 7, 13), torch.float32, "sample", False)
    with torch.no_grad():
        fused = velocity_loss(v, eps, x0, w)
    torch.testing.assert_close(fused, velocity_loss_ref(v, eps, x0, w), **TOL[torch.float32])
    monkeypatch.setattr(kernels, "USE_TRITON", False)                # the switch is read per call
    assert torch.equal(velocity_loss(v, eps, x0, w), velocity_loss_ref(v, eps, x0, w))


# ---------------------------------------------------------------- attention
def packed_meta(B, L, seed=0, text=(2, 9), image=(3, 12), pad=5):
    """Rows of packed samples: text, a re-entered image (VAE kind 3, then clean kind 1), 2 text tokens,
    noise image (kind 2), repeated, spans of random (unaligned) lengths; the last `pad` tokens are
    padding (their own sample). Returns (sample, split, kind, idx), each [B, L] int64."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    sample, split, kind = (torch.zeros(B, L, dtype=torch.long) for _ in range(3))
    for b in range(B):
        pos, s, sp, end = 0, 0, 0, L - pad
        while pos < end:
            for k, n in ((0, r(*text)), (3, r(*image)), (1, r(*image)), (0, 2), (2, r(*image))):
                n = min(n, end - pos)
                if n <= 0:
                    break
                sample[b, pos:pos + n], split[b, pos:pos + n], kind[b, pos:pos + n] = s, sp, k
                pos, sp = pos + n, sp + 1
            s += 1
        sample[b, end:], split[b, end:], kind[b, end:] = s, sp, 0
    idx = torch.arange(L).expand(B, L).contiguous()
    return tuple(t.to(DEV) for t in (sample, split, kind, idx))


def _attn_and_grads(fn, q, k, v, meta, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v, meta)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# the last six: random packings of other lengths (bf16 gradients at Liger's tolerance on each)
@pytest.mark.parametrize("L,H,Hkv,D", [(37, 4, 2, 32), (70, 2, 2, 16), (70, 4, 2, 16)] +
                         [(L, 4, 2, 16) for L in range(53, 59)])
def test_attention_matches_twin(dtype, L, H, Hkv, D):
    B = 2
    meta = packed_meta(B, L, seed=L + H)
    g = torch.Generator().manual_seed(L * H + D)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    q = mk(B, L, H, D).transpose(1, 2)                 # strided, as model.py's heads would be
    k, v, do = mk(B, Hkv, L, D), mk(B, Hkv, L, D), mk(B, H, L, D)
    out = _attn_and_grads(attention, q, k, v, meta, do)
    ref = _attn_and_grads(attention_ref, q.float(), k.float(), v.float(), meta, do.float())
    twin = _attn_and_grads(attention_ref, q, k, v, meta, do)        # the twin in the same dtype
    assert all(torch.isfinite(t).all() for t in out)
    for name, a, b, t in zip(("o", "dq", "dk", "dv"), out, ref, twin):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), b, **TOL[dtype], msg=lambda m: f"{name}: {m}")
        if dtype != torch.float32:  # and flash-attn's: at most 2x the bf16 twin's own error
            err, err_twin = (a.float() - b).abs().max().item(), (t.float() - b).abs().max().item()
            assert err <= 2 * err_twin + TOL[dtype]["atol"], (name, err, err_twin)


@pytest.mark.skipif(DEV != "cuda", reason="GPU tile configs; the CPU runs cover the same code")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_attention_default_tiles_gpu(monkeypatch, dtype, D):
    monkeypatch.setattr(attn, "CONFIGS", None)
    B, H, Hkv, L = 2, 4, 2, 333
    meta = packed_meta(B, L, seed=D, image=(20, 90))
    q, do = (torch.randn(B, H, L, D, device=DEV, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(B, Hkv, L, D, device=DEV, dtype=dtype) for _ in range(2))
    out = _attn_and_grads(attention, q, k, v, meta, do)
    ref = _attn_and_grads(attention_ref, q.float(), k.float(), v.float(), meta, do.float())
    twin = _attn_and_grads(attention_ref, q, k, v, meta, do)
    torch.testing.assert_close(out[0].float(), ref[0], atol=5e-3, rtol=5e-2)
    # compiled, p is rounded to bf16/fp16 for the tensor-core dots (as in FlashAttention), which
    # the interpreter's fp32 path does not do: gradients are held to flash-attn's criterion here
    for name, a, b, t in zip(("dq", "dk", "dv"), out[1:], ref[1:], twin[1:]):
        err, err_twin = (a.float() - b).abs().max().item(), (t.float() - b).abs().max().item()
        assert err <= 2 * err_twin + 5e-3, (name, err, err_twin)


def test_attention_deterministic():
    B, H, L, D = 1, 2, 70, 16
    meta = packed_meta(B, L, seed=3)
    q, k, v, do = (torch.randn(B, H, L, D, device=DEV) for _ in range(4))
    a = _attn_and_grads(attention, q, k, v, meta, do)
    b = _attn_and_grads(attention, q, k, v, meta, do)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_attention_rows_without_keys_are_zero(monkeypatch):
    """The rule always allows the diagonal, so force it: drop every k-tile of q-tile 0."""
    orig = attn._plan

    def plan(meta, BM, BN, transpose):
        m32, (idx, cnt) = orig(meta, BM, BN, transpose)
        if not transpose:
            cnt = cnt.clone()
            cnt[:, 0] = 0
        return m32, (idx, cnt)

    monkeypatch.setattr(attn, "_plan", plan)
    B, H, L, D = 1, 2, 40, 16
    meta = packed_meta(B, L, seed=4)
    q, k, v, do = (torch.randn(B, H, L, D, device=DEV) for _ in range(4))
    o, dq, dk, dv = _attn_and_grads(attention, q, k, v, meta, do)
    BM = attn.CONFIGS["fwd"][0]
    assert all(torch.isfinite(t).all() for t in (o, dq, dk, dv))
    assert (o[:, :, :BM] == 0).all() and (dq[:, :, :BM] == 0).all()
    assert (o[:, :, BM:] != 0).any()


def test_attention_twin_switch(monkeypatch):
    monkeypatch.setattr(kernels, "USE_TRITON", False)
    meta = packed_meta(1, 20)
    q, k, v = (torch.randn(1, 2, 20, 16, device=DEV) for _ in range(3))
    assert torch.equal(attention(q, k, v, meta), attention_ref(q, k, v, meta))


@pytest.mark.parametrize("BM,BN", [(16, 16), (32, 16), (16, 32), (64, 64)])
def test_tile_classifier(BM, BN):
    B, L = 3, 150
    meta = packed_meta(B, L, seed=BM + BN, image=(5, 40))
    cls = attn.tile_classes(meta, BM, BN).cpu()
    n_mt, n_nt = -(-L // BM), -(-L // BN)
    assert cls.shape == (B, n_mt, n_nt)
    dense = torch.zeros(B, n_mt * BM, n_nt * BN, dtype=torch.bool)
    valid = torch.zeros_like(dense)
    dense[:, :L, :L] = allowed_mask(meta, meta).cpu()
    valid[:, :L, :] = True                     # padded q rows don't count; padded k cols are "not allowed"
    tiles = lambda t: t.view(B, n_mt, BM, n_nt, BN).transpose(2, 3).flatten(3)  # noqa: E731
    n_allow, n_valid = tiles(dense).sum(-1), tiles(valid).sum(-1)
    want = torch.where(n_allow == 0, EMPTY, torch.where(n_allow == n_valid, FULL, PARTIAL)).to(torch.int8)
    assert torch.equal(cls, want)
    if max(BM, BN) <= 32:                      # small tiles on this layout see all three labels
        assert {EMPTY, PARTIAL, FULL} <= set(cls.unique().tolist())
    # lists: FULL tiles first, then PARTIAL, each ascending
    idx, cnt = attn.tile_lists(cls)
    for b in range(B):
        for i in range(n_mt):
            nf, na = cnt[b, i].tolist()
            full = (cls[b, i] == FULL).nonzero().flatten().tolist()
            part = (cls[b, i] == PARTIAL).nonzero().flatten().tolist()
            assert idx[b, i, :na].tolist() == full + part and nf == len(full)


def test_plan_cache():
    meta = packed_meta(1, 50)
    a = attn._plan(meta, 16, 16, False)
    assert attn._plan(meta, 16, 16, False)[1] is a[1]           # every layer reuses it
    meta[2][0, :10] = 1                                         # in-place edit: new plan
    assert attn._plan(meta, 16, 16, False)[1] is not a[1]


# ----------------------------------------------------------------------------- integration

def test_model_and_training_step_same_with_kernels_on_and_off(monkeypatch):
    """model.py's attention and pretrain.py's image loss go through the kernels behind one switch
    (kernels.USE_TRITON): outputs and every parameter gradient agree (fp32 tolerances)."""
    import model as M
    from kernels.loss import velocity_loss
    torch.manual_seed(0)
    m = M.MoT(M.config_for(2, 40))
    torch.nn.init.normal_(m.llm2vae.weight, std=0.1)
    g = torch.Generator().manual_seed(1)
    z = lambda: torch.randn(16, 32, generator=g)
    samples = [[("text", [1, 5, 7, 9], 1.0), ("clean", z()), ("text", [6, 11, 12], 1.0), ("noise", z(), 0.4)],
               [("text", [1, 13, 14, 15, 16, 5], 1.0), ("noise", z(), 0.7)],
               [("text", [1, 20, 21], 1.0)]]
    b = M.pack(samples, M.PAD, 32)
    eps, x0 = torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, 32, generator=g)
    w = torch.tensor([0.5, 2.0])                                   # per-sample reward weights

    def step(on):
        monkeypatch.setattr(kernels, "USE_TRITON", on)
        m.zero_grad()
        h = m(b)
        ce, v = M.token_losses(m, b)
        loss = (ce * b["lw"]).sum() / b["lw"].gt(0).sum() + velocity_loss(v.view(2, 16, 32), eps, x0, w=w, lam=0.5)
        loss.backward()
        return h.detach(), loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    h0, l0, g0 = step(False)
    h1, l1, g1 = step(True)
    tol = TOL[torch.float32]
    torch.testing.assert_close(h1, h0, **tol)
    torch.testing.assert_close(l1, l0, **tol)
    assert g0.keys() == g1.keys() and len(g0) > 20
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], **tol, msg=k)
