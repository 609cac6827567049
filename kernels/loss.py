"""Reward-weighted flow-matching velocity loss (every method's image loss).

  L = mean(w * (v - (eps - x0))^2) + lam * mean((v - (eps - x0_ref))^2)

v, eps, x0, x0_ref: [B, T, C]; w: None (=1), [B] (per sample) or [B, T] (per token);
means are over all B*T*C elements. x0_ref defaults to x0.

`velocity_loss` is the entry point: the fused Triton kernel when kernels.use_triton(v)
(kernels.USE_TRITON and v on CUDA or TRITON_INTERPRET=1), else the twin below.
"""
import torch

import kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: only the twin runs (see kernels/__init__.py)
    from kernels import _notriton as triton
    tl = triton


def velocity_loss_ref(v, eps, x0, w=None, x0_ref=None, lam=0.0):
    """PyTorch twin (also the CPU path)."""
    u = eps - x0                                     # flow-matching target, t=1 is noise
    err = (v.float() - u.float()) ** 2
    if w is not None:
        w = w.float()
        err = err * (w[:, None, None] if w.dim() == 1 else w[:, :, None])
    loss = err.mean()
    if lam:
        u_ref = u if x0_ref is None else eps - x0_ref
        loss = loss + lam * ((v.float() - u_ref.float()) ** 2).mean()
    return loss


# ----------------------------------------------------------------------------------------
# Fused Triton kernel: loss AND dL/dv in one pass over the data (Liger's trick).
#
# Per element (all in fp32):   d = v - (eps - x0)        d_ref = v - (eps - x0_ref)
#   loss term  w*d^2 + lam*d_ref^2              dL/dv = 2/N * (w*d + lam*d_ref)
# The gradient is written in the forward (in v's dtype) while the inputs are in registers;
# backward only rescales it by grad_output. Bytes (bf16, no x0_ref): read v, eps, x0, write
# grad = 8 B/element, vs ~14 B for separate forward and backward passes.
# Reduction is deterministic: each program writes its partial sum to its own slot, then one
# program sums the slots in a fixed order (no atomics), so reruns are bit-identical.
# Note: the twin rounds eps - x0 to the input dtype before upcasting; the kernel keeps it in
# fp32 (more accurate; the two agree within bf16 tolerance).
LOSS_BLOCK = 4096      # elements per program
LOSS_WARPS = 8         # -> 16 elements = two 16 B loads per tensor per thread
SUM_BLOCK = 4096       # partial sums reduced per step by the single final program
SCALE_PROGRAMS = 1024  # backward rescale: programs striding over the gradient


@triton.jit
def _vloss_fwd_kernel(V, EPS, X0, XREF, W, GRAD, PART, N, C, TC, grad_scale, lam,
                      W_MODE: tl.constexpr,      # 0: no w, 1: w[B] per sample, 2: w[B,T] per token
                      HAS_REF: tl.constexpr, HAS_LAM: tl.constexpr, STORE_GRAD: tl.constexpr,
                      INT64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(EPS + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X0 + offs, mask=mask, other=0.0).to(tl.float32)
    d = v - (e - x)
    if W_MODE == 1:
        wd = tl.load(W + offs // TC, mask=mask, other=0.0).to(tl.float32) * d
    elif W_MODE == 2:
        wd = tl.load(W + offs // C, mask=mask, other=0.0).to(tl.float32) * d
    else:
        wd = d
    if HAS_LAM:
        if HAS_REF:
            dr = v - (e - tl.load(XREF + offs, mask=mask, other=0.0).to(tl.float32))
        else:
            dr = d                                   # x0_ref = x0: not read a second time
        g = wd + lam * dr
        acc = wd * d + lam * dr * dr
    else:
        g = wd
        acc = wd * d
    tl.store(PART + pid, tl.sum(acc, axis=0))       # masked lanes hold 0
    if STORE_GRAD:
        tl.store(GRAD + offs, (g * grad_scale).to(GRAD.dtype.element_ty), mask=mask)


@triton.jit
def _sum_partials_kernel(PART, OUT, n, scale, BLOCK: tl.constexpr):
    """OUT = scale * sum(PART[:n]), fixed order: one program, BLOCK lanes, then a tree."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(PART + offs, mask=offs < n, other=0.0)
    tl.store(OUT, tl.sum(acc, axis=0) * scale)


@triton.jit
def _scale_grad_kernel(GRAD, GO, N, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """GRAD *= grad_output, in place; nearly free (an early exit) when grad_output == 1, the
    usual case of loss.backward(). Reading the scalar on the device avoids a host sync."""
    go = tl.load(GO).to(tl.float32)
    if go != 1.0:
        for blk in range(tl.program_id(0), tl.cdiv(N, BLOCK), tl.num_programs(0)):
            if INT64:
                offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            else:
                offs = blk * BLOCK + tl.arange(0, BLOCK)
            mask = offs < N
            g = tl.load(GRAD + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(GRAD + offs, (g * go).to(GRAD.dtype.element_ty), mask=mask)


def _flat(t, like):
    if t.shape != like.shape:
        t = t.expand_as(like)
    return t.contiguous()


def velocity_loss_fwd(v, eps, x0, w=None, x0_ref=None, lam=0.0, need_grad=True):
    """Launch the fused kernel. Returns (loss fp32 scalar, dL/dv in v's dtype or None)."""
    lam = float(lam)
    if lam == 0.0:
        x0_ref = None                                # the twin ignores x0_ref when lam == 0
    v = v.contiguous()
    eps, x0 = _flat(eps, v), _flat(x0, v)
    xref = _flat(x0_ref, v) if x0_ref is not None else v   # dummy pointer when absent
    n = v.numel()
    w_mode, C, TC = 0, 1, 1
    if w is not None:
        if not w.is_floating_point():
            w = w.float()
        w = w.contiguous()
        w_mode = 1 if w.dim() == 1 else 2
        C = v.shape[-1]
        TC = n // w.shape[0]
    wt = w if w is not None else v
    nprog = triton.cdiv(n, LOSS_BLOCK)
    part = torch.empty(nprog, device=v.device, dtype=torch.float32)
    grad = torch.empty_like(v) if need_grad else v   # v is only a dummy pointer then
    int64 = n + LOSS_BLOCK >= 2 ** 31
    _vloss_fwd_kernel[(nprog,)](
        v, eps, x0, xref, wt, grad, part, n, C, TC, 2.0 / n, lam,
        W_MODE=w_mode, HAS_REF=x0_ref is not None, HAS_LAM=lam != 0.0, STORE_GRAD=need_grad,
        INT64=int64, BLOCK=LOSS_BLOCK, num_warps=LOSS_WARPS)
    loss = torch.empty((), device=v.device, dtype=torch.float32)
    _sum_partials_kernel[(1,)](part, loss, nprog, 1.0 / n, BLOCK=SUM_BLOCK, num_warps=8)
    return loss, (grad if need_grad else None)


class VelocityLossFunction(torch.autograd.Function):
    """Gradients flow to v only; eps, x0, w, x0_ref are constants (targets and rewards)."""

    @staticmethod
    def forward(ctx, v, eps, x0, w, x0_ref, lam):
        loss, grad = velocity_loss_fwd(v, eps, x0, w, x0_ref, lam, need_grad=ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None
        if ctx.used:  # the stored gradient was rescaled in place by the first backward
            raise RuntimeError("velocity_loss: backward twice through one forward is not supported")
        ctx.used = True
        go = grad_output.detach().float().contiguous().reshape(())
        n = grad.numel()
        grid = (min(triton.cdiv(n, LOSS_BLOCK), SCALE_PROGRAMS),)
        _scale_grad_kernel[grid](grad, go, n, INT64=n + LOSS_BLOCK >= 2 ** 31, BLOCK=LOSS_BLOCK,
                                 num_warps=LOSS_WARPS)
        return grad, None, None, None, None, None


def velocity_loss(v, eps, x0, w=None, x0_ref=None, lam=0.0):
    """Fused Triton kernel when kernels.use_triton(v), else the twin; same arguments/result."""
    if kernels.use_triton(v):
        return VelocityLossFunction.apply(v, eps, x0, w, x0_ref, lam)
    return velocity_loss_ref(v, eps, x0, w, x0_ref, lam)
