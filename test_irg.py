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
            h, _ = full(m, [("text", ctx, 0), *M.reentry(zc), ("text", tail, 0)])
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
                assert next_greedy(m, [("text", ctx, 0), *M.reentry(zc), ("text", tail, 0)]) == tok
                tail = tail + [tok]
            if tail[-1] != M.VS:
                tail = tail + [M.VS]
            cond = [("text", ctx, 0), *M.reentry(zc), ("text", tail, 0)]
            text_unc = [("text", ctx, 0), *M.reentry(zc), ("text", [M.VE, M.VS], 0)]
            img_unc = [("text", irg.img_uncond_ids(p, t1, out["think2"][r]), 0)]
            x = x2_all[r].clone()                              # image2: three fields, BAGEL's nesting
            for i in range(s["sample_steps"]):
                t, dt = ts[i], ts[i] - ts[i + 1]
                v = irg.cfg_combine(v_full(m, cond, x, t), v_full(m, text_unc, x, t), v_full(m, img_unc, x, t),
                                    s["cfg_text2"], s["cfg_img"])
                x = x - v * dt
            assert torch.allclose(x, out["z2"][r], atol=1e-4), (x - out["z2"][r]).abs().max()


def test_critic_p_is_the_uncached_probability():
    """p_ok (model.critic_p) = P(think2 begins with ok_ids | through image1), recomputed uncached token by
    token, and scoring it leaves the sampled think2 and image2 as they were without it."""
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
    plain = run({})
    assert plain["p_ok"] is None and plain["think2"] == off["think2"] and np.array_equal(plain["img2"], off["img2"])


def test_cfg_combine_is_bagels_nesting():
    vc, vt, vi = torch.randn(3, 2, 16, 32).unbind(0)
    v = irg.cfg_combine(vc, vt, vi, 4.0, 2.0)
    assert torch.allclose(v, vi + 2.0 * (vt + 4.0 * (vc - vt) - vi), atol=1e-6)
    assert torch.allclose(irg.cfg_combine(vc, vt, vi, 4.0, 1.0), vt + 4.0 * (vc - vt), atol=1e-6)
    assert torch.allclose(irg.cfg_combine(vc, vt, vi, 1.0, 1.0), vc, atol=1e-6)


def trajectory(m):
    """A packed full trajectory: P T1 [img1 VAE] [img1 clean] <ve> <think> T2 </think> <vs> [img2 noise]."""
    P = [M.BOS] + world.encode("a photo of a red circle") + [M.THINK]
    T1 = world.encode("a small red circle at the center .") + [M.END_THINK, M.VS]
    T2 = world.encode("the color is wrong . redraw : a small red circle at the center .") + [M.END_THINK, M.VS]
    g = torch.Generator().manual_seed(1)
    z1, x2 = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    return lambda z1=z1, x2=x2: [("text", P + T1, 0), *M.reentry(z1), ("text", [M.VE, M.THINK], 0),
                                 ("text", T2, 1.0), ("noise", x2, 0.7)], len(P + T1), len(T2)


def test_image2_sees_image1_and_think2_and_nothing_sees_image2():
    m, _ = tiny_pair()
    segs, n_ctx, n_t2 = trajectory(m)
    b = M.pack([segs()], M.PAD, 32)
    meta = (b["sample"], b["split"], b["kind"], b["idx"])
    allow = allowed_mask(meta, meta)[0]
    kind = b["kind"][0]
    noise, clean, vae = kind == M.NOISE, kind == M.CLEAN, kind == M.VAE
    t2 = torch.zeros_like(noise)
    t2[n_ctx + 32 + 2:n_ctx + 32 + 2 + n_t2] = True
    assert noise.sum() == 16 and clean.sum() == 16 and vae.sum() == 16 and t2.sum() == n_t2
    assert allow[noise][:, clean].all() and allow[noise][:, vae].all() and allow[noise][:, t2].all() \
        and allow[noise][:, :n_ctx].all()
    assert allow[t2][:, vae].all() and allow[t2][:, clean].all()          # think2 reads image1 both ways
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
        assert torch.equal(b["lat"][b["kind"] == M.CLEAN], z1) and torch.equal(b["lat"][b["kind"] == M.VAE], z1)
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


def test_stage2_draws_only_full_trajectories():
    rng = np.random.default_rng(0)
    m2 = irg.pick_modes(2, 4000, rng)
    assert set(m2) == {"initial_full", "improving_full"}
    m1 = irg.pick_modes(1, 40000, rng)
    assert set(m1) == set(irg.MODES)
    freq = {k: float(np.mean(m1 == k)) for k in irg.MODES}    # upstream weights 1, 1, .5, .5, .5, .5 (sum 4)
    for k in irg.MODES:
        assert abs(freq[k] - irg.STAGE_WEIGHTS[1][k] / 4) < 0.01


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
    quick = QUICK
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
    # the weights moved, and --report reads both runs
    m0, _, _ = M.load_weights(tiny_ckpt)
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(m0.state_dict().values(), ma.state_dict().values()))
    rows = irg.main(["--report", str(tmp_path / "runs")])
    assert len(rows) == 2 and (tmp_path / "runs" / "report.md").exists()
    # a finished folder is not overwritten by accident
    with pytest.raises(FileExistsError, match="--resume"):
        irg.main(["--ckpt", tiny_ckpt, "--out", str(a_dir)] + quick)


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
    # --irg_best2: a second first image per prompt and its critic score; best2 is the higher-scored
    # image's accuracy (mean over tags, one prompt per tag here), from the per-image results saved beside them
    evaluate.main(["--ckpt", tiny_ckpt, "--modes", "irg", "--n", "1", "--k", "1", "--sample_steps", "2", "--irg_max_think", "4",
                   "--und", "0", "--irg_best2", "1", "--out", str(tmp_path / "b")])
    s = json.load(open(tmp_path / "b" / "irg" / "summary.json"))
    im = {k: np.array(v) for k, v in s["per_image"].items()}
    assert all(len(v) == 12 for v in im.values()) and not np.array_equal(im["p_ok"], im["p_okb"])
    assert s["best2"] == pytest.approx(np.where(im["p_okb"] > im["p_ok"], im["ok1b"], im["ok1"]).mean())
    assert np.mean(list(s["best2_per_tag"].values())) == pytest.approx(s["best2"])
    w = ~im["ok1"]                          # the wrong image1s: IRG's redraw against the fresh first image
    assert s["n_wrong1"] == w.sum() and s["fix_fresh"] == pytest.approx(im["ok1b"][w].mean())
    assert 0 <= s["plan_repeats"] <= 1          # every image1 of the random model is wrong
    pl = s["plans"]                             # the wrong image1s, split by whether think1's plan was right
    assert pl["right_plan"]["n"] + pl["wrong_plan"]["n"] == s["n_wrong1"] and 0 <= pl["plan1_right"] <= 1
    with pytest.raises(ValueError, match="think, forced, irg"):
        evaluate.main(["--ckpt", tiny_ckpt, "--modes", "reflect"])


def test_irgl_records_in_the_edit_format_name_the_cell_and_plan_in_detail():
    """irg.py --detail 1: an edit record's think2 names the 3x3 cell of the object its image1 broke, and
    its plan is the detailed caption of image2's scene; --detail 0 (the default) writes the records as
    before: no cell, the short plan, the same images."""
    import irg
    a = dict(irg.defaults, n_prompts=12, N=0, n_flaw=0, n_edit=1, n_init=1)
    specs = irg.train_specs(a)[:6]
    _, short = irg.build_irgl(None, None, specs, a, "cpu", print)
    _, det = irg.build_irgl(None, None, specs, dict(a, detail=True), "cpu", print)
    assert len(short) == len(det) >= 3
    key = lambda o: (o["shape"], o["color"], tuple(o["box"]))                     # noqa: E731
    for r0, r1 in zip(short, det):
        assert np.array_equal(r0["img1"], r1["img1"]) and np.array_equal(r0["img2"], r1["img2"])
        t0, t1 = world.decode(r0["t2"][:-2]), world.decode(r1["t2"][:-2])
        problem = world.verify(r1["spec"], r1["img1"])["problem"]
        assert t0.startswith(problem + " . " + world.REDRAW) and t1.startswith(problem + " at the "), (t0, t1)
        cell = t1[len(problem + " at the "):].split(" . ")[0]
        o1, o2 = world.detect(r1["img1"]), world.detect(r1["img2"])
        changed = [o for o in o2 if key(o) not in set(map(key, o1))] + [o for o in o1 if key(o) not in set(map(key, o2))]
        assert cell in {world.GRID[world._cell(o["box"])[0]][world._cell(o["box"])[1]] for o in changed}, (t1, changed)
        plan0, plan1 = (world.parse_caption(t.split(world.REDRAW)[1]) for t in (t0, t1))
        assert all(o["centre"] is None for o in plan0) and all(o["centre"] is not None for o in plan1)
        assert world.caption_score(t1.split(world.REDRAW)[1], o2) == 1.0       # the plan is image2's layout


def test_plan_split_by_hand():
    import evaluate
    T, F = True, False
    ok1 = np.array([T, F, F, F, F, F])
    ok2 = np.array([T, T, F, F, T, F])
    okb = np.array([T, F, T, F, F, T])
    pl1 = np.array([T, T, T, F, F, F])            # images 1-2: right plans badly drawn; 3-5: wrong plans
    pl2 = np.array([T, T, T, F, T, F])
    plb = np.array([T, T, T, F, F, T])
    p = evaluate.plan_split(ok1, ok2, okb, pl1, pl2, plb)
    assert p["plan1_right"] == pytest.approx(0.5) and p["image1_if_plan_right"] == pytest.approx(1 / 3)
    assert p["image1_if_plan_wrong"] == 0.0
    assert p["right_plan"] == dict(n=2, fix_redraw=0.5, replan_right=1.0, fix_fresh=0.5, fresh_plan_right=1.0)
    assert p["wrong_plan"] == pytest.approx(dict(n=3, fix_redraw=1 / 3, replan_right=1 / 3, fix_fresh=1 / 3, fresh_plan_right=1 / 3))
    # without best2 the fresh draw's columns are absent
    q = evaluate.plan_split(ok1, ok2, np.array([], bool), pl1, pl2, np.array([], bool))
    assert q["wrong_plan"]["fix_fresh"] is None and q["wrong_plan"]["fresh_plan_right"] is None



def test_second_given_equals_irg_generates_own_image2():
    """model.second_given teacher-forces think1, image1 and think2 into the contexts irg_generate samples
    them in: given irg_generate's own three (greedy text), it draws the same image2 from the same noise."""
    m, ae = tiny_pair()
    prompts = [world.encode("a photo of a red circle"), world.encode("a photo of two blue squares and a cross")]
    s = dict(temperature=0.0, max_think=5, sample_steps=3, cfg_text=4.0, cfg_text2=2.0, cfg_img=2.0, cfg_lo1=0.4, shift=3.0)
    out = irg.irg_generate(m, ae, prompts, s, world.PALETTE, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    torch.randn(2, 16, 32, generator=g)                  # image1's noise: greedy text draws nothing else
    img2 = M.second_given(m, ae, prompts, out["think1"], out["img1"], out["think2"], s, world.PALETTE, g)
    assert np.array_equal(img2, out["img2"])


def test_evaluate_py_detail_and_edits(tiny_ckpt, tmp_path):
    """evaluate.py --detail / --edits run end to end and report rates in [0, 1] over what they drew."""
    import evaluate
    s = evaluate.main(["--ckpt", tiny_ckpt, "--modes", "", "--und", "0", "--detail", "4", "--edits", "1", "--sample_steps", "2",
                       "--irg_max_think", "4", "--out", str(tmp_path)])
    d, e = s["detail"], s["edits"]
    assert d["n"] == 4 and all(0 <= d[k] <= 1 for k in ("iou_short", "iou_detailed", "f1_short"))
    assert d["detail_share_t1"] is None or 0 <= d["detail_share_t1"] <= 1       # a random model's captions may not parse
    assert d["centre_slope"] is None or np.isfinite(d["centre_slope"])
    assert e["n_kept"] == len(world.IMAGE_TAGS) and 0 < e["n_flawed"] <= e["n_kept"]
    assert all(0 <= e[k] <= 1 for k in ("kept_changed", "fixed", "fixed_rest_kept", "fresh_right"))
    assert json.load(open(tmp_path / "summary.json"))["edits"] == e


def test_outside_flaw_spares_every_object_the_flaw_changed_and_sees_the_rest():
    """evaluate.outside_flaw: the target and image1 itself change nothing outside the flaw, for every kind
    world.edit_flaw makes (a colour swap changes two objects: both are the flaw's); moving an object the
    flaw did not touch is seen, also when image2's own box for the edited object is spared (own_box); an
    added object drawn a few pixels off the target's box is the edit, not a change to the rest. flaw_kind
    names each kind."""
    import evaluate
    rng, seen, n_off = np.random.default_rng(3), set(), 0
    for _ in range(200):
        spec = world.sample_spec(["two_object", "colors", "counting", "color_attr"][len(seen) % 4], rng, holdout="train")
        img, scene = world.render(spec, rng, holdout="train")
        e = world.edit_flaw(spec, scene, rng)
        if e is None:
            continue
        bad, bad_scene, edited = e
        kind = evaluate.flaw_kind(scene, bad_scene)
        seen.add(kind)
        assert evaluate.outside_flaw(img, bad, img, edited, own_box=False) == 0         # the fix changes only the flaw
        assert evaluate.outside_flaw(bad, bad, img, edited, own_box=False) == 0
        if kind == "missing object":              # the added object drawn 3 px off the target's box: still the edit
            b = edited["box"]
            dx = 3 if b[2] + 3 <= world.W else -3
            off = world.draw(list(bad_scene) + [dict(edited, box=(b[0] + dx, b[1], b[2] + dx, b[3]))])
            if not any(max(b[0], o["box"][0] - 4) < min(b[2], o["box"][2] + 4) and max(b[1], o["box"][1] - 4) <
                       min(b[3], o["box"][3] + 4) for o in bad_scene):        # no other object within 4 px of it
                assert evaluate.outside_flaw(off, bad, img, edited) == 0
                assert evaluate.outside_flaw(off, bad, img, edited, own_box=False) > 0
                n_off += 1
        others = [o for o in scene if o["box"] != edited["box"] and
                  (bad != img)[o["box"][1]:o["box"][3], o["box"][0]:o["box"][2]].sum() == 0]
        if others:                                # blank an object the flaw left alone: seen outside the flaw
            o = others[0]
            moved = img.copy()
            moved[o["box"][1]:o["box"][3], o["box"][0]:o["box"][2]] = img[0, 0]
            if (moved != img).any(-1).mean() > 0.01:
                assert evaluate.outside_flaw(moved, bad, img, edited, own_box=False) > 0.01
                assert evaluate.outside_flaw(moved, bad, img, edited) > 0.01
    assert seen == {"missing object", "swapped colors", "wrong color", "shape swap"} and n_off > 0


def test_centre_slope_follows_moved_renders_and_ignores_identical_ones():
    """evaluate.nudge_x moves every written x centre and nothing else; centre_slope reads 1 on renders drawn
    where the nudged captions say (each object moved by the captions' difference) and 0 on the same render twice."""
    import evaluate
    rng = np.random.default_rng(3)
    scenes = []
    while len(scenes) < 20:
        sc = world.random_scene(rng, holdout="train")
        if all(3 <= o["box"][0] and o["box"][2] <= world.W - 3 for o in sc):   # room to move 3 px either way
            scenes.append(sc)
    for sc in scenes:
        cap = world.caption(sc, detail=True)
        moved = world.parse_caption(evaluate.nudge_x(cap, 3))
        assert [(o["centre"][0] - 3, o["centre"][1], o["pos"]) for o in moved] == \
            [(o["centre"][0], o["centre"][1], o["pos"]) for o in world.parse_caption(cap)]
    assert world.parse_caption(evaluate.nudge_x("a small red circle at the top left 1 9 .", -5))[0]["centre"] == (0, 9)
    shift = lambda sc, dx: [dict(o, box=(o["box"][0] + dx, o["box"][1], o["box"][2] + dx, o["box"][3])) for o in sc]  # noqa: E731
    left, right = [world.draw(shift(sc, -3)) for sc in scenes], [world.draw(shift(sc, 3)) for sc in scenes]
    assert evaluate.centre_slope(left, right, 6) == pytest.approx(1.0)
    assert evaluate.centre_slope(left, left, 6) == 0.0
    assert evaluate.centre_slope([np.zeros((world.W, world.W, 3), np.uint8)], [left[0]], 6) is None
