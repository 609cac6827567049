"""Tests of irg.py (IRG inference and IRGL): `python -m pytest -q test_irg.py` (CPU, about a minute).

  - the cached two-image inference equals a full recompute (uncached forward over the packed sequence)
  - image2's noise tokens see image1's clean tokens and think2; nothing sees image2's noise
  - each of the six learning modes puts its losses exactly where the docstring's table says
  - stage 2 draws only the full trajectories
  - an end-to-end tiny run; a killed run resumed ends with the same weights; --report; bad flags
"""
import json

import numpy as np
import pytest
import torch

import model as M
import world
import irg
from kernels.attention import allowed_mask


def tiny_pair(seed=0):
    torch.manual_seed(seed)
    m = M.MoT(M.config_for(2, len(world.VOCAB)))
    torch.nn.init.normal_(m.llm2vae.weight, std=0.1)     # a zero-init head would hide bugs
    ae = M.PaletteAE(w=16)
    return m.eval(), ae.eval()


def full(m, segs):
    """Uncached forward over one packed row: (hidden [L, d], batch)."""
    b = M.pack([segs], M.PAD, m.c.latent_ch)
    return m(b)[0], b


def v_full(m, segs_ctx, x, t):
    """Velocity at the noise tokens of context + [noise x at t], recomputed from scratch."""
    h, b = full(m, segs_ctx + [("noise", x, t)])
    return m.velocity(h[b["kind"][0] == M.NOISE])


def critic_logp_full(m, ae, p, t1, img, ok):
    """log P(think2 begins with ok | <bos> P <think> T1 <vs> [img] <ve> <think>), recomputed uncached token by token."""
    ctx = [M.BOS] + p + [M.THINK] + t1
    ctx = ctx if ctx[-1] == M.VS else ctx + [M.VS]
    zc = ae.encode(torch.as_tensor(img[None]))[0]
    tail, lp = [M.VE, M.THINK], 0.0
    for tok in ok:
        with torch.no_grad():
            h, _ = full(m, [("text", ctx, 0), ("clean", zc), ("text", tail, 0)])
            lp += float(torch.log_softmax(m.logits(h[-1]).float(), -1)[tok])
        tail = tail + [tok]
    return lp


def next_greedy(m, segs):
    h, _ = full(m, segs)
    return int(m.logits(h[-1]).argmax())


def test_cached_irg_equals_full_recompute():
    m, ae = tiny_pair()
    prompts = [world.encode("a photo of a red circle"), world.encode("a photo of two blue squares and a cross")]
    # image2's text CFG (cfg_text2) differs from image1's: each image must use its own
    s = dict(temperature=0.0, max_think=5, sample_steps=3, cfg_text=4.0, cfg_text2=2.0, cfg_img=2.0, cfg_lo1=0.4, shift=3.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = irg.irg_generate(m, ae, prompts, s, world.PALETTE, g)
        # greedy text: the generator is only used for the two initial noises, in this order
        g = torch.Generator().manual_seed(0)
        x1_all = torch.randn(2, 16, 32, generator=g)
        x2_all = torch.randn(2, 16, 32, generator=g)
        ts = M.shift_t(torch.linspace(1, 0, s["sample_steps"] + 1), s["shift"]).tolist()
        for r, p in enumerate(prompts):
            t1 = out["think1"][r]
            ctx = [M.BOS] + p + [M.THINK]
            for tok in t1:                                     # think1: each token is the uncached argmax
                assert next_greedy(m, [("text", ctx, 0)]) == tok
                ctx = ctx + [tok]
            if ctx[-1] != M.VS:
                ctx = ctx + [M.VS]                             # the forced switch
            x = x1_all[r].clone()                              # image1: text CFG on t in [0.4, 1]
            for i in range(s["sample_steps"]):
                t, dt = ts[i], ts[i] - ts[i + 1]
                v = v_full(m, [("text", ctx, 0)], x, t)
                if 0.4 <= t <= 1.0:
                    vu = v_full(m, [("text", [M.BOS, M.VS], 0)], x, t)
                    v = vu + s["cfg_text"] * (v - vu)
                x = x - v * dt
            assert torch.allclose(x, out["z1"][r], atol=1e-4), (x - out["z1"][r]).abs().max()
            zc = ae.encode(ae.decode(out["z1"][r:r + 1], world.PALETTE))[0]   # re-entered clean
            tail = [M.VE, M.THINK]
            for tok in out["think2"][r]:                       # think2 sees image1 clean
                assert next_greedy(m, [("text", ctx, 0), ("clean", zc), ("text", tail, 0)]) == tok
                tail = tail + [tok]
            if tail[-1] != M.VS:
                tail = tail + [M.VS]
            cond = [("text", ctx, 0), ("clean", zc), ("text", tail, 0)]
            text_unc = [("text", ctx, 0), ("clean", zc), ("text", [M.VE, M.VS], 0)]
            img_unc = [("text", irg.img_uncond_ids(p, t1, out["think2"][r]), 0)]
            x = x2_all[r].clone()                              # image2: three fields, BAGEL's nesting
            for i in range(s["sample_steps"]):
                t, dt = ts[i], ts[i] - ts[i + 1]
                v = irg.cfg_combine(v_full(m, cond, x, t), v_full(m, text_unc, x, t), v_full(m, img_unc, x, t),
                                    s["cfg_text2"], s["cfg_img"])
                x = x - v * dt
            assert torch.allclose(x, out["z2"][r], atol=1e-4), (x - out["z2"][r]).abs().max()


def test_keep_copies_image1_exactly_where_think2_says_so():
    """--keep: a think2 that begins with keep_ids keeps image1 as image2; other rows are the redraw
    they would have been without the option (keep is applied after sampling: same RNG stream)."""
    m, ae = tiny_pair()
    s = dict(irg.defaults, sample_steps=2, max_think=4, temperature=1.0)
    prompts = [world.encode("a red circle"), world.encode("two blue squares"), world.encode("a green cross")]
    run = lambda keep: M.irg_generate(m, ae, prompts, dict(irg.sampler(s), keep_ids=keep), world.PALETTE,  # noqa: E731
                                      torch.Generator().manual_seed(3))
    off = run(None)
    assert not off["kept"].any()
    first = list(off["think2"][0][:1])
    on = run(first)
    want = np.array([list(t[:1]) == first for t in off["think2"]])
    assert (on["kept"] == want).all() and want[0]
    for i in range(len(prompts)):
        assert np.array_equal(on["img1"][i], off["img1"][i])
        assert np.array_equal(on["img2"][i], on["img1"][i] if want[i] else off["img2"][i])


def test_forced_think2_equals_the_same_tokens_sampled_and_the_oracle_is_the_verifiers_verdict(tiny_ckpt, tmp_path):
    """think2_fn (evaluate --irg_oracle) teacher-forces think2: given the tokens greedy decoding wrote,
    image2 is the same to the bit; and the oracle's think2 says "correct" exactly where the verifier does."""
    m, ae = tiny_pair()
    prompts = [world.encode("a photo of a red circle"), world.encode("a photo of two blue squares")]
    s = dict(irg.defaults, sample_steps=2, max_think=6, temperature=0.0)
    run = lambda extra: M.irg_generate(m, ae, prompts, dict(irg.sampler(s), **extra), world.PALETTE,  # noqa: E731
                                       torch.Generator().manual_seed(1))
    free = run({})
    forced = run(dict(think2_fn=lambda imgs: [t if t[-1] == M.VS else t + [M.VS] for t in free["think2"]]))
    assert torch.equal(forced["z2"], free["z2"])          # (a row the cap stopped gets the forced switch's <vs> either way)
    assert np.array_equal(forced["img1"], free["img1"])
    other = run(dict(think2_fn=lambda imgs: [world.encode("the color is wrong . redraw : a large red circle at the center .")
                                             + [M.END_THINK, M.VS]] * len(imgs)))
    assert world.decode(other["think2"][0]).startswith("the color is wrong") and not torch.equal(other["z2"], free["z2"])
    import evaluate
    evaluate.main(["--ckpt", tiny_ckpt, "--modes", "irg", "--n", "2", "--k", "1", "--sample_steps", "2", "--irg_max_think", "4",
                   "--und", "0", "--irg_oracle", "1", "--out", str(tmp_path)])
    r = json.load(open(tmp_path / "irg" / "summary.json"))
    assert r["ok_if_wrong"] == 0.0 and r["ok_if_right"] in (None, 1.0)


def test_critic_p_is_the_uncached_probability_and_keep_p_keeps_exactly_above_it():
    """p_ok (model.critic_p) = P(think2 begins with ok_ids | through image1), recomputed uncached token by
    token; keep_p keeps image1 exactly where p_ok >= keep_p and leaves the other rows' redraws as they were."""
    m, ae = tiny_pair()
    prompts = [world.encode("a photo of a red circle"), world.encode("a photo of two blue squares"), world.encode("a green cross")]
    ok = world.encode(world.PROBLEMS["ok"])
    s = dict(irg.defaults, sample_steps=2, max_think=5, temperature=0.0)
    run = lambda extra: M.irg_generate(m, ae, prompts, dict(irg.sampler(s), **extra), world.PALETTE,  # noqa: E731
                                       torch.Generator().manual_seed(2))
    off = run(dict(ok_ids=ok))
    for r, p in enumerate(prompts):
        lp = critic_logp_full(m, ae, p, off["think1"][r], off["img1"][r], ok)
        assert abs(lp - np.log(off["p_ok"][r])) < 1e-3, (lp, np.log(off["p_ok"][r]))     # log: p is ~1e-8 here
    tau = float(np.median(off["p_ok"]))
    on = run(dict(ok_ids=ok, keep_p=tau))
    want = off["p_ok"] >= tau
    assert (on["kept"] == want).all() and want.any() and not want.all()
    for i in range(len(prompts)):
        assert np.array_equal(on["img2"][i], on["img1"][i] if want[i] else off["img2"][i])
    with pytest.raises(ValueError, match="keep_p needs ok_ids"):
        M.irg_generate(m, ae, prompts, dict(irg.sampler(s), ok_ids=None, keep_p=0.5), world.PALETTE)


def test_critic_reread_scores_image2_in_image1s_place_and_select_returns_the_higher_scored():
    """p_ok2 (model.critic_reread) is the critic on the redrawn image2 put where image1 was, recomputed
    uncached; reread on image1 itself it is p_ok; select returns image1 exactly where p_ok >= p_ok2."""
    m, ae = tiny_pair(1)
    prompts = [world.encode("a photo of a red circle"), world.encode("a photo of two blue squares"),
               world.encode("a green cross"), world.encode("a photo of a yellow triangle")]
    ok = world.encode(world.PROBLEMS["ok"])
    s = dict(irg.defaults, sample_steps=2, max_think=5, temperature=0.0)
    run = lambda extra: M.irg_generate(m, ae, prompts, dict(irg.sampler(s), ok_ids=ok, **extra), world.PALETTE,  # noqa: E731
                                       torch.Generator().manual_seed(3))
    off = run({})
    assert not off["kept"].any()
    again = M.critic_reread(m, ae, prompts, off["think1"], torch.as_tensor(off["img1"]), ok).numpy()
    assert np.allclose(np.log(again), np.log(off["p_ok"]), atol=1e-3)
    for r, p in enumerate(prompts):
        lp = critic_logp_full(m, ae, p, off["think1"][r], off["img2"][r], ok)
        assert abs(lp - np.log(off["p_ok2"][r])) < 1e-3, (lp, np.log(off["p_ok2"][r]))
    on = run(dict(select=True))
    back = off["p_ok"] >= off["p_ok2"]
    assert back.any() and not back.all(), (off["p_ok"], off["p_ok2"])
    for i in range(len(prompts)):
        assert np.array_equal(on["img2"][i], off["img1"][i] if back[i] else off["img2"][i])
    with pytest.raises(ValueError, match="select needs ok_ids"):
        M.irg_generate(m, ae, prompts, dict(irg.sampler(s), ok_ids=None, select=True), world.PALETTE)


def test_fresh2_draws_image2_from_the_prompt_and_the_redraw_plan_alone():
    """--fresh2: image2 is image1's sampler (text CFG on [cfg_lo1, 1], <bos> <vs> uncond) run on
    <bos> P <think> + the plan after "redraw :", from the same noise the IRG redraw would start from."""
    m, ae = tiny_pair(2)
    prompts = [world.encode("a photo of a red circle"), world.encode("a photo of two blue squares")]
    marker = world.encode("redraw :")
    s = dict(irg.defaults, sample_steps=3, max_think=6, temperature=0.0)
    out = M.irg_generate(m, ae, prompts, dict(irg.sampler(s), fresh2=marker), world.PALETTE, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    torch.randn(2, 16, 32, generator=g)                        # image1's noise, then image2's
    x2 = torch.randn(2, 16, 32, generator=g)
    for r, p in enumerate(prompts):
        plan = M.redraw_plan(out["think2"][r], marker)
        ctx, _ = M.prefill(m, [[M.BOS] + p + [M.THINK] + plan], "cpu")
        unc, _ = M.prefill(m, [[M.BOS, M.VS]], "cpu")
        want = M.sample_image(m, ctx, unc, 3, s["cfg_text"], (s["cfg_lo1"], 1.0), shift=s["shift"], x1=x2[r:r + 1])
        assert torch.allclose(torch.as_tensor(out["z2"][r]), want[0], atol=1e-4)
    # the plan: what follows the last "redraw :", closed as a think1 is; all of think2 without the marker
    t = world.encode("the count is wrong . redraw : a small red circle at the top .")
    assert M.redraw_plan(t + [M.END_THINK, M.VS], marker) == world.encode("a small red circle at the top .") + [M.END_THINK, M.VS]
    assert M.redraw_plan(world.encode("a red circle") + [M.EOS], marker) == world.encode("a red circle") + [M.END_THINK, M.VS]
    assert M.redraw_plan(world.encode("a red circle"), []) == world.encode("a red circle") + [M.END_THINK, M.VS]


def test_pick_accuracy_counts_only_pairs_that_differ():
    import evaluate
    ok_a, ok_b = [1, 0, 1, 1, 0], [0, 1, 1, 0, 0]          # pairs 0, 1 and 3 differ
    p_a, p_b = [0.9, 0.8, 0.1, 0.5, 0.3], [0.2, 0.3, 0.9, 0.5, 0.1]
    assert evaluate.pick_accuracy(p_a, p_b, ok_a, ok_b) == pytest.approx((1 + 0 + 0.5) / 3)
    assert evaluate.pick_accuracy(p_a, p_b, ok_a, ok_a) is None


def test_cfg_combine_is_bagels_nesting():
    vc, vt, vi = torch.randn(3, 2, 16, 32).unbind(0)
    v = irg.cfg_combine(vc, vt, vi, 4.0, 2.0)
    assert torch.allclose(v, vi + 2.0 * (vt + 4.0 * (vc - vt) - vi), atol=1e-6)
    assert torch.allclose(irg.cfg_combine(vc, vt, vi, 4.0, 1.0), vt + 4.0 * (vc - vt), atol=1e-6)
    assert torch.allclose(irg.cfg_combine(vc, vt, vi, 1.0, 1.0), vc, atol=1e-6)


def trajectory(m):
    """A packed full trajectory: P T1 [img1 clean] <ve> <think> T2 </think> <vs> [img2 noise]."""
    P = [M.BOS] + world.encode("a photo of a red circle") + [M.THINK]
    T1 = world.encode("a small red circle at the center .") + [M.END_THINK, M.VS]
    T2 = world.encode("the color is wrong . redraw : a small red circle at the center .") + [M.END_THINK, M.VS]
    g = torch.Generator().manual_seed(1)
    z1, x2 = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    return lambda z1=z1, x2=x2: [("text", P + T1, 0), ("clean", z1), ("text", [M.VE, M.THINK], 0),
                                 ("text", T2, 1.0), ("noise", x2, 0.7)], len(P + T1), len(T2)


def test_image2_sees_image1_and_think2_and_nothing_sees_image2():
    m, _ = tiny_pair()
    segs, n_ctx, n_t2 = trajectory(m)
    b = M.pack([segs()], M.PAD, 32)
    meta = (b["sample"], b["split"], b["kind"], b["idx"])
    allow = allowed_mask(meta, meta)[0]
    kind = b["kind"][0]
    noise, clean = kind == M.NOISE, kind == M.CLEAN
    t2 = torch.zeros_like(noise)
    t2[n_ctx + 16 + 2:n_ctx + 16 + 2 + n_t2] = True
    assert noise.sum() == 16 and clean.sum() == 16 and t2.sum() == n_t2
    assert allow[noise][:, clean].all() and allow[noise][:, t2].all() and allow[noise][:, :n_ctx].all()
    assert not allow[~noise][:, noise].any()                  # nothing outside image2's split sees it
    # and by perturbation, through the whole network: image2's velocity moves with image1 and with
    # think2; no other token's state moves with image2's noise
    with torch.no_grad():
        h, b = full(m, segs())
        g = torch.Generator().manual_seed(5)
        h_img1, _ = full(m, segs(z1=torch.randn(16, 32, generator=g)))
        h_x2, _ = full(m, segs(x2=torch.randn(16, 32, generator=g)))
        other = segs()
        other[3] = ("text", world.encode("the count is wrong . redraw : a large blue square at the top .")[:n_t2 - 2]
                    + [M.END_THINK, M.VS], 1.0)
        h_t2, b2 = full(m, other)
    nz = b["kind"][0] == M.NOISE
    assert not torch.allclose(h_img1[nz], h[nz]) and not torch.allclose(h_t2[b2["kind"][0] == M.NOISE], h[nz])
    assert torch.allclose(h_x2[~nz], h[~nz], atol=1e-6) and not torch.allclose(h_x2[nz], h[nz])


def records():
    spec = dict(tag="colors", prompt="a photo of a red circle", include=[dict({"class": "circle", "count": 1, "color": "red"})])
    enc = world.encode
    end = [M.END_THINK, M.VS]
    init = dict(spec=spec, t1=enc("a small red circle at the center .") + end, img=None)
    imp = dict(spec=spec, t1=enc("a small blue circle at the top .") + end, t1_loss=False, img1=None,
               t2=enc("the color is wrong . redraw : a small red circle at the center .") + end, img2=None)
    return init, imp


@pytest.mark.parametrize("mode", irg.MODES)
@pytest.mark.parametrize("t1_loss", [False, True])
def test_each_mode_puts_its_losses_where_it_claims(mode, t1_loss):
    init, imp = records()
    imp["t1_loss"] = t1_loss
    a = dict(irg.defaults, cfg_drop=0.0)
    z1 = torch.randn(16, 32)
    rec = init if mode.startswith("initial") else imp
    segs, img = irg.mode_sample(mode, rec, dict(img1=z1), np.random.default_rng(0), a)
    # the table of the docstring: (CE tokens, image loss, image1 enters clean)
    want_ce = dict(initial_full=init["t1"], initial_thinking_gen=[], initial_thinking_und=init["t1"],
                   improving_full=(imp["t1"] if t1_loss else []) + imp["t2"], improving_thinking_gen=[],
                   improving_thinking_und=imp["t2"])[mode]
    want_img = mode in ("initial_full", "initial_thinking_gen", "improving_full", "improving_thinking_gen")
    assert img == want_img and (segs[-1][0] == "noise") == want_img
    if want_img:
        segs[-1] = ("noise", torch.randn(16, 32), 0.5)
    b = M.pack([segs], M.PAD, 32)
    assert b["labels"][b["lw"] > 0].tolist() == want_ce
    assert ((b["kind"] == M.CLEAN).sum() == 16) == mode.startswith("improving")
    assert ((b["kind"] == M.NOISE).sum() == 16) == want_img
    if mode.startswith("improving"):                   # image1 is context: it enters clean, exactly z1
        assert torch.equal(b["lat"][b["kind"] == M.CLEAN], z1)
        ids = b["ids"][0].tolist()
        assert ids[:len(imp["t1"]) + 8] == [M.BOS] + world.encode(imp["spec"]["prompt"]) + [M.THINK] + imp["t1"]


def test_cfg_dropout_gives_the_inference_uncond_contexts():
    init, imp = records()
    z1 = torch.randn(16, 32)

    class Rng:                                          # drop_text, drop_img in this order
        def __init__(self, xs): self.xs = list(xs)
        def random(self): return self.xs.pop(0)
    a = dict(irg.defaults, cfg_drop=0.5)
    segs, _ = irg.mode_sample("initial_full", init, None, Rng([0.0]), a)
    assert segs[0] == ("text", [M.BOS, M.VS], 0) and segs[1][0] == "noise"
    P = [M.BOS] + world.encode(imp["spec"]["prompt"]) + [M.THINK]
    segs, _ = irg.mode_sample("improving_thinking_gen", imp, dict(img1=z1), Rng([0.0, 0.9]), a)   # think2 dropped
    b = M.pack([segs[:-1]], M.PAD, 32)
    assert b["ids"][0].tolist()[-2:] == [M.VE, M.VS] and (b["kind"] == M.CLEAN).sum() == 16
    segs, _ = irg.mode_sample("improving_thinking_gen", imp, dict(img1=z1), Rng([0.9, 0.0]), a)   # image1 dropped
    b = M.pack([segs[:-1]], M.PAD, 32)
    assert b["ids"][0].tolist() == irg.img_uncond_ids(P[1:-1], imp["t1"], imp["t2"]) and (b["kind"] == M.CLEAN).sum() == 0


def test_image_loss_weighs_image2_apart():
    torch.manual_seed(0)
    v, eps, x0 = torch.randn(3, 16, 4), torch.randn(3, 16, 4), torch.randn(3, 16, 4)
    per = ((v - (eps - x0)) ** 2).mean((1, 2))
    assert torch.allclose(irg.image_loss(v, eps, x0, [1.0, 1.0, 1.0]), per.mean())
    assert torch.allclose(irg.image_loss(v, eps, x0, [1.0, 0.0, 1.0]), (per[0] + per[2]) / 3)
    v.requires_grad_(True)
    irg.image_loss(v, eps, x0, [1.0, 0.0, 0.5]).backward()
    assert v.grad[1].abs().max() == 0 and v.grad[0].abs().min() > 0      # a weight-0 sample gets no gradient


def test_stage2_draws_only_full_trajectories():
    rng = np.random.default_rng(0)
    m2 = irg.pick_modes(2, 4000, rng)
    assert set(m2) == {"initial_full", "improving_full"}
    m1 = irg.pick_modes(1, 40000, rng)
    assert set(m1) == set(irg.MODES)
    freq = {k: float(np.mean(m1 == k)) for k in irg.MODES}    # upstream weights 1, 1, .5, .5, .5, .5 (sum 4)
    for k in irg.MODES:
        assert abs(freq[k] - irg.STAGE_WEIGHTS[1][k] / 4) < 0.01


def test_tags_all_reaches_knowledge_and_counting_hard_and_never_an_eval_prompt():
    a = dict(irg.defaults, n_prompts=6)
    image, every = irg.train_specs(dict(a, tags="image")), irg.train_specs(dict(a, tags="all"))
    assert {s["tag"] for s in image} == set(irg.IMAGE_TAGS)
    assert {s["tag"] for s in every} == set(world.TAGS)
    assert [s for s in every if s["tag"] in irg.IMAGE_TAGS] == image          # the image tags' prompts are unchanged
    assert not {s["prompt"] for s in every} & world.eval_prompts()
    held = irg.train_specs(dict(a, tags="all", hold_nouns=True))
    nouns = lambda ss: {s["prompt"].split()[-1] for s in ss if s["tag"] == "knowledge"}  # noqa: E731
    assert nouns(held) == nouns(every) - set(irg.HELD_NOUNS) and len(irg.HELD_NOUNS) == len(world.ALIASES) // 2
    assert [s for s in held if s["tag"] != "knowledge"] == [s for s in every if s["tag"] != "knowledge"]
    # a knowledge record's think1 names what the noun looks like, and its render is right
    rng = np.random.default_rng(0)
    for s in [s for s in every if s["tag"] in ("knowledge", "counting_hard")]:
        img, scene = world.render(s, rng, holdout="train")
        assert world.verify(s, img)["correct"]
        if s["tag"] == "knowledge":
            color, shape = world.ALIASES[s["prompt"].split()[-1]]
            assert f"{color} {shape}" in world.plan_text(scene)


def test_fix_from_self_makes_image2_another_of_the_models_own_right_draws(monkeypatch):
    """--fix_from self: a wrong self-drawn image1 whose prompt has a right draw among its N gets that
    draw as image2 and its layout as think2's redraw; a prompt with none falls back to the nearest render."""
    a = dict(irg.defaults, n_prompts=2, tags="image", N=4, n_flaw=0, n_edit=0, n_init=1, near=2, gen_batch=3)
    specs = irg.train_specs(a)[:3]
    rng = np.random.default_rng(5)
    renders = [world.render(s, rng, holdout="train")[0] for s in specs]
    blank = np.zeros_like(renders[0])

    def fake_draw(model, ae, prompts, smp, palette, gen):   # the next chunk of images below
        return None, [[M.VS]] * len(prompts), torch.ones(len(prompts), dtype=torch.bool), None, torch.as_tensor(np.stack(imgs.pop(0))), None
    # draw j of prompt i is right when j is odd, except for the last prompt, which has no right draw
    order = [(i, j) for i in range(len(specs)) for j in range(a["N"])]
    want_right = [j % 2 == 1 and i < len(specs) - 1 for i, j in order]
    imgs = [[renders[i] if r else blank for (i, _), r in zip(order[k:k + 3], want_right[k:k + 3])] for k in range(0, len(order), 3)]
    monkeypatch.setattr(irg, "draw_first", fake_draw)
    _, improving = irg.build_irgl(None, None, specs, dict(a, fix_from="self"), "cpu", print)
    assert [r["right1"] for r in improving] == want_right
    for (i, j), r in zip(order, improving):
        if r["right1"]:
            assert r["img2"] is r["img1"] and not r["fix_self"]
        elif i < len(specs) - 1:        # fixed by the model's own right draw of the same prompt
            assert r["fix_self"] and np.array_equal(r["img2"], renders[i])
            assert world.decode(r["t2"]).split(" . redraw : ")[1].startswith(world.caption(world.verify(specs[i], renders[i])["objects"]))
        else:                           # no right draw of this prompt: the nearest render
            assert not r["fix_self"] and world.verify(specs[i], r["img2"])["correct"] and not np.array_equal(r["img2"], blank)


def test_report_splits_knowledge_into_trained_and_held_nouns(tmp_path):
    held, trained = irg.HELD_NOUNS[0], next(n for n in sorted(world.ALIASES) if n not in irg.HELD_NOUNS)
    for seed, (h, t) in enumerate([(0.0, 1.0), (0.5, 1.0)]):
        d = tmp_path / f"s{seed}"
        for sub in ("base_irg", "stage1_irg", "stage2_irg"):
            (d / sub).mkdir(parents=True)
            per = {f"a photo of a {held}": [h, h], f"a photo of a {trained}": [t, t], "a photo of a circle": [0.0, 0.0]}
            (d / sub / "summary.json").write_text(json.dumps(dict(per_prompt=per)))
        (d / "config.json").write_text(json.dumps(dict(hold_nouns=True)))
        row = dict(image1=0.5, image2=0.5, fix=None, brk=None, per_tag={"knowledge": [0.5, 0.5]})
        (d / "summary.json").write_text(json.dumps(dict(seed=seed, rows={"IRGL stages 1+2": row})))
    (tmp_path / "oracle_s0").mkdir()                    # an evaluate.py folder beside the runs: not a run, skipped
    (tmp_path / "oracle_s0" / "summary.json").write_text(json.dumps(dict(gen_think=0.5)))
    irg.report(str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("2 seeds (0, 1)")
    assert "| IRGL stages 1+2: image2 | 1.000 ± 0.000 | 0.250 ± 0.250 |" in text     # trained | held: median, half-range
    (tmp_path / "s1" / "config.json").write_text(json.dumps(dict(hold_nouns=False)))
    irg.report(str(tmp_path))
    assert "held-out nouns" not in (tmp_path / "report.md").read_text()


QUICK = ["--n_prompts", "1", "--N", "1", "--n_flaw", "1", "--n_init", "1", "--near", "2", "--batch", "4",
         "--eval_n", "1", "--eval_k", "1", "--sample_steps", "2", "--max_think", "4", "--ckpt_every", "1",
         "--stage1_steps", "3", "--stage2_steps", "2"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    m, ae = tiny_pair()
    M.save_weights(str(d / "ck"), m, ae, dict(step=0))
    return str(d / "ck")


def test_end_to_end_resume_equals_uninterrupted_and_report(tiny_ckpt, tmp_path, monkeypatch):
    import runs
    a_dir, b_dir = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    quick = QUICK + ["--ema", "0.5", "--anchor", "1"]     # the EMA's weights and --anchor's frozen base, too, resume exactly
    irg.main(["--ckpt", tiny_ckpt, "--out", str(a_dir)] + quick)
    s = json.load(open(a_dir / "summary.json"))
    assert set(s["rows"]) == {"base, single pass (think)", "base, IRG inference", "IRGL stage 1", "IRGL stages 1+2"}
    for f in ("data.png", "base_irg/grid_irg.png", "stage1_irg/summary.json", "stage2_irg/grid_irg.png", "ckpt.json",
              "summary.md", "before/grid_think.png"):
        assert (a_dir / f).exists(), f
    # kill the same run right after its checkpoint at step 4 (stage 2), then --resume it
    real = runs.save_state

    def save_then_die(a, rank, step, *rest):
        real(a, rank, step, *rest)
        if step == 4:
            raise KeyboardInterrupt("killed")
    monkeypatch.setattr(runs, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        irg.main(["--ckpt", tiny_ckpt, "--out", str(b_dir)] + quick)
    monkeypatch.setattr(runs, "save_state", real)
    assert not (b_dir / "summary.json").exists()
    irg.main(["--ckpt", tiny_ckpt, "--out", str(b_dir), "--resume"] + quick)
    ma, _, _ = M.load_weights(str(a_dir / "ckpt"))
    mb, _, _ = M.load_weights(str(b_dir / "ckpt"))
    for (k, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(pa, pb), k
    assert json.load(open(b_dir / "summary.json")) == s
    steps = [json.loads(l)["step"] for l in open(b_dir / "metrics.jsonl") if '"train"' in l]
    assert steps == sorted(set(steps))                       # no step logged twice
    # --anchor: at step 1 the weights are the base's, so image2's velocity is the frozen base's exactly;
    # afterwards they differ (the base was copied before the resumed run loaded its own weights)
    anchor = {r["step"]: r["loss_anchor"] for r in map(json.loads, open(a_dir / "metrics.jsonl")) if r.get("phase") == "train"}
    assert anchor[1] == 0.0 and max(anchor.values()) > 0, anchor
    assert [r["loss_anchor"] for r in map(json.loads, open(b_dir / "metrics.jsonl")) if r.get("phase") == "train"][-1] == anchor[5]
    # the weights moved, and --report reads both runs
    m0, _, _ = M.load_weights(tiny_ckpt)
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(m0.state_dict().values(), ma.state_dict().values()))
    rows = irg.main(["--report", str(tmp_path / "runs")])
    assert len(rows) == 2 and (tmp_path / "runs" / "report.md").exists()
    # a finished folder is not overwritten by accident
    with pytest.raises(FileExistsError, match="--resume"):
        irg.main(["--ckpt", tiny_ckpt, "--out", str(a_dir)] + quick)


def test_params_und_leaves_the_drawer_as_it_was(tiny_ckpt, tmp_path):
    import runs
    irg.main(["--ckpt", tiny_ckpt, "--out", str(tmp_path / "u"), "--params", "und"] + QUICK)
    m0, _, _ = M.load_weights(tiny_ckpt)
    m1, _, _ = M.load_weights(str(tmp_path / "u" / "ckpt"))
    moved = {k for (k, p0), p1 in zip(m0.state_dict().items(), m1.state_dict().values()) if not torch.equal(p0, p1)}
    assert moved and not any(k.startswith(runs.GEN_ONLY) for k in moved)
    assert any(k.startswith(runs.GEN_ONLY) for k in m0.state_dict())       # there was a drawer to leave alone


@pytest.mark.parametrize("args,msg", [
    (["--cfg_lo1", "2"], "--cfg_lo1 2.0: must be 0..1"),
    (["--stage1_steps", "-1"], "--stage1_steps -1: must be >= 0"),
    (["--dtype", "fp16"], "--dtype 'fp16': use one of"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--stage1", "3"], "unrecognized arguments: --stage1 3"),
    (["--stage1_steps", "0", "--stage2_steps", "0"], "nothing to train"),
])
def test_bad_flag_fails_before_model_work(args, msg, tmp_path):
    # the checkpoint does not exist: a flag error must come first, before anything loads or is written
    with pytest.raises(ValueError) as e:
        irg.main(["--ckpt", str(tmp_path / "nothere"), "--out", str(tmp_path / "o")] + args)
    assert msg in str(e.value)
    assert not (tmp_path / "o").exists()


def test_evaluate_py_irg_mode(tiny_ckpt, tmp_path):
    import evaluate
    evaluate.main(["--ckpt", tiny_ckpt, "--modes", "irg", "--n", "1", "--k", "1", "--sample_steps", "2", "--irg_max_think", "4",
                   "--und", "0", "--out", str(tmp_path)])
    s = json.load(open(tmp_path / "irg" / "summary.json"))
    assert (tmp_path / "irg" / "grid_irg.png").exists() and s["n"] == 12
    assert set(s["per_tag"]) == set(world.TAGS) and 0 <= s["image1"] <= 1 and 0 <= s["image2"] <= 1
    # --irg_best2: a second first image per prompt and its critic score; best2 and select are the higher-scored
    # images' accuracy (mean over tags, one prompt per tag here), from the per-image results saved beside them
    evaluate.main(["--ckpt", tiny_ckpt, "--modes", "irg", "--n", "1", "--k", "1", "--sample_steps", "2", "--irg_max_think", "4",
                   "--und", "0", "--irg_best2", "1", "--out", str(tmp_path / "b")])
    s = json.load(open(tmp_path / "b" / "irg" / "summary.json"))
    im = {k: np.array(v) for k, v in s["per_image"].items()}
    assert all(len(v) == 12 for v in im.values()) and not np.array_equal(im["p_ok"], im["p_okb"])
    assert s["best2"] == pytest.approx(np.where(im["p_okb"] > im["p_ok"], im["ok1b"], im["ok1"]).mean())
    assert np.mean([v["best2"] for v in s["per_tag_picks"].values()]) == pytest.approx(s["best2"])
    assert s["select"] == pytest.approx(np.where(im["p_ok2"] > im["p_ok"], im["ok2"], im["ok1"]).mean())
    w = ~im["ok1"] & ~im["kept"]           # the wrong image1s IRG redrew: its redraw against the fresh first image
    assert s["redrawn_wrong"] == w.sum() and s["fix_fresh"] == pytest.approx(im["ok1b"][w].mean())
    assert 0 <= s["plan_repeats"] <= 1          # every image1 of the random model is wrong and redrawn
    pl = s["plans"]                             # the wrong image1s redrawn, split by whether think1's plan was right
    assert pl["right_plan"]["n"] + pl["wrong_plan"]["n"] == s["redrawn_wrong"] and 0 <= pl["plan1_right"] <= 1
    with pytest.raises(ValueError, match="think, forced, irg"):
        evaluate.main(["--ckpt", tiny_ckpt, "--modes", "reflect"])


def test_plan_split_by_hand():
    import evaluate
    T, F = True, False
    ok1 = np.array([T, F, F, F, F, F])
    ok2 = np.array([T, T, F, F, T, F])
    okb = np.array([T, F, T, F, F, T])
    pl1 = np.array([T, T, T, F, F, F])            # images 1-2: right plans badly drawn; 3-5: wrong plans
    pl2 = np.array([T, T, T, F, T, F])
    plb = np.array([T, T, T, F, F, T])
    redrawn = np.array([T, T, T, T, T, F])        # image 5 was kept
    p = evaluate.plan_split(ok1, ok2, okb, pl1, pl2, plb, redrawn)
    assert p["plan1_right"] == pytest.approx(0.5) and p["image1_if_plan_right"] == pytest.approx(1 / 3)
    assert p["image1_if_plan_wrong"] == 0.0
    assert p["right_plan"] == dict(n=2, fix_redraw=0.5, replan_right=1.0, fix_fresh=0.5, fresh_plan_right=1.0)
    assert p["wrong_plan"] == dict(n=2, fix_redraw=0.5, replan_right=0.5, fix_fresh=0.0, fresh_plan_right=0.0)
    # without best2 the fresh draw's columns are absent
    q = evaluate.plan_split(ok1, ok2, np.array([], bool), pl1, pl2, np.array([], bool), redrawn)
    assert q["wrong_plan"]["fix_fresh"] is None and q["wrong_plan"]["fresh_plan_right"] is None


def test_flaw_plan_drawn_shows_the_plan_image1_was_drawn_from():
    """--flaw_plan drawn: a flaw / edit record's think1 is the layout of image1's own scene, untrained, and
    think2 redraws image2's (a different, right) layout; target (the default): think1 is image2's plan, trained."""
    a = dict(irg.defaults, n_prompts=2, tags="image", N=0, n_flaw=1, n_edit=1, n_init=1, near=2)
    specs = irg.train_specs(a)[:6]
    recs = {fp: irg.build_irgl(None, None, specs, dict(a, flaw_plan=fp), "cpu", print)[1] for fp in ("target", "drawn")}
    assert [r["source"] for r in recs["target"]] == [r["source"] for r in recs["drawn"]] and len(recs["drawn"]) >= 6
    plan = lambda ids: world.decode(ids).split(" </think>")[0]                 # noqa: E731
    redraw = lambda r: world.decode(r["t2"]).split(" . redraw : ")[1].split(" </think>")[0]   # noqa: E731
    n_drawn = 0
    for t, d in zip(recs["target"], recs["drawn"]):
        assert np.array_equal(t["img1"], d["img1"]) and np.array_equal(t["img2"], d["img2"]) and t["t2"] == d["t2"]
        fix_plan = world.caption(world.verify(t["spec"], t["img2"])["objects"])
        assert t["t1_loss"] and plan(t["t1"]) == redraw(t) == fix_plan
        assert not world.verify(d["spec"], d["img1"])["correct"] and world.verify(d["spec"], d["img2"])["correct"]
        if d["t1_loss"]:                    # an empty negative: no plan to show, the target's kept
            assert d["t1"] == t["t1"] and not world.detect(d["img1"])
            continue
        n_drawn += 1
        # image1 is a render of think1's plan: the detected objects are the plan's, the plan is wrong
        assert plan(d["t1"]) == world.caption(world.detect(d["img1"])) != redraw(d)
        assert not world.plan_verdict(d["spec"], plan(d["t1"]))["correct"] and world.plan_verdict(d["spec"], redraw(d))["correct"]
    assert n_drawn >= 4
    # the modes read it: no loss on a drawn think1 even in improving_full
    segs, _ = irg.mode_sample("improving_full", next(r for r in recs["drawn"] if not r["t1_loss"]), dict(img1=None), np.random.default_rng(0),
                              dict(a, cfg_drop=0.0))
    assert segs[1] == ("text", next(r for r in recs["drawn"] if not r["t1_loss"])["t1"], 0.0)


def test_replan_probe_scores_the_redraw_plan(tiny_ckpt, tmp_path, monkeypatch):
    """evaluate.py --irg_replan: think1 is a negative's plan and image1 its render; the probe reads think2's
    flag and whether its redraw plan is right. With think2 faked: a right plan scores 1, think1's plan 0."""
    import evaluate
    model, ae, _ = M.load_weights(tiny_ckpt, "cpu")
    rng = np.random.default_rng(3)
    specs = [world.sample_spec("two_object", rng) for _ in range(5)]     # a negative of two objects is never empty
    a = dict(evaluate.defaults, **evaluate.irg_defaults, max_think=8, batch=2, seed=0)
    seen = []

    def fake(right):
        def decode(model_, cache, logits, stop, max_new, temperature, g):
            rows = []
            for _ in range(logits.shape[0]):
                s, k = specs[len(seen)], len(seen)
                plan = world.plan_text(world.render(s, np.random.default_rng(k))[1]) if right else "a small red circle at the top ."
                seen.append(k)
                rows.append(world.encode(f"an object is missing . redraw : {plan}") + [M.VS])
            return rows, None
        return decode
    monkeypatch.setattr(M, "decode_text", fake(True))
    r = evaluate.replan_probe(model, ae, specs, a, "cpu")
    assert r["n"] == 5 and r["flagged"] == 1.0 and r["replan_right"] == 1.0
    seen.clear()
    monkeypatch.setattr(M, "decode_text", fake(False))
    assert evaluate.replan_probe(model, ae, specs, a, "cpu")["replan_right"] == 0.0
    monkeypatch.undo()
    # the real sampler, through the CLI: one prompt per tag, the summary beside the eval
    evaluate.main(["--ckpt", tiny_ckpt, "--modes", "", "--und", "0", "--irg_replan", "1", "--irg_max_think", "4", "--out", str(tmp_path)])
    p = json.load(open(tmp_path / "summary.json"))["replan_probe"]
    assert 1 <= p["n"] <= 12 and 0 <= p["flagged"] <= 1 and 0 <= p["replan_right"] <= 1 and sum(v["n"] for v in p["per_tag"].values()) == p["n"]
