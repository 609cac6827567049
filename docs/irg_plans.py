"""
The tables of RESULTS.md "IRG on v4, session 11", from the summary.json files evaluate.py writes
(`--modes irg`: the plan split, `plans` and `per_image`; `--irg_replan N`: `replan_probe`).

  python docs/irg_plans.py split DIR...     # per eval: think1's plans, fix rates by right / wrong plan
  python docs/irg_plans.py tags DIR...      # wrong image1s per tag (right plan / wrong plan), pooled over DIRs
  python docs/irg_plans.py replan DIR...    # wrong plans per tag group: the redraw's plan right, a fresh think1 right
  python docs/irg_plans.py nouns DIR...     # knowledge prompts, nouns IRGL held out (irg.HELD_NOUNS) vs trained
  python docs/irg_plans.py probe DIR...     # evaluate.py --irg_replan: flags and right redraw plans, per tag

DIR is an evaluate.py --out folder (its irg/summary.json, or for probe its summary.json), of an eval on
all 600 prompts (--n 50 --k 1), whose per-image order is world.pick(eval set, 50).
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import world  # noqa: E402
import irg  # noqa: E402


def load(d):
    s = json.load(open(os.path.join(d, "irg", "summary.json")))
    if "plans" not in s or "plan1" not in s["per_image"]:
        raise SystemExit(f"{d}: made before evaluate.py split by plans (session 11); run its eval again")
    return s, {k: np.array(v) for k, v in s["per_image"].items() if v is not None}


def eval_tags(n):
    specs = world.pick(world.load_specs("data/eval.jsonl"), 50)
    if len(specs) != n:
        raise SystemExit(f"{n} images in that eval: these tables need one of all 600 prompts x 1 image "
                         f"(evaluate.py --modes irg --n 50 --k 1)")
    return specs, np.array([s["tag"] for s in specs])


def f(x):
    return "-" if x is None else f"{x:.3f}"


def split(dirs):
    for d in dirs:
        s, _ = load(d)
        p, r, w = s["plans"], s["plans"]["right_plan"], s["plans"]["wrong_plan"]
        print(f"{os.path.basename(d):22s} plan1 right {f(p['plan1_right'])} | image1 right where it is {f(p['image1_if_plan_right'])}, "
              f"where not {f(p['image1_if_plan_wrong'])} | right plan: n {r['n']}, fixed by the redraw {f(r['fix_redraw'])}, "
              f"fresh {f(r['fix_fresh'])} | wrong plan: n {w['n']}, redraw plan right {f(w['replan_right'])}, fixed {f(w['fix_redraw'])}; "
              f"fresh plan right {f(w['fresh_plan_right'])}, fixed {f(w['fix_fresh'])} | plan repeats {f(s['plan_repeats'])}")


def tags(dirs):
    count = {}
    for d in dirs:
        _, im = load(d)
        _, tag = eval_tags(len(im["ok1"]))
        for t in dict.fromkeys(tag):
            m = (tag == t) & ~im["ok1"]
            c = count.setdefault(t, [0, 0, 0])
            c[0] += int((m & im["plan1"]).sum()); c[1] += int((m & ~im["plan1"]).sum()); c[2] += int((tag == t).sum())
    print("tag: wrong image1s of a right plan / of a wrong plan / images, over", len(dirs), "evals")
    for t, c in count.items():
        print(f"  {t:14s} {c[0]:4d} {c[1]:4d} {c[2]:5d}")
    print(f"  {'all':14s} {sum(c[0] for c in count.values()):4d} {sum(c[1] for c in count.values()):4d}")


def replan(dirs):
    for d in dirs:
        _, im = load(d)
        _, tag = eval_tags(len(im["ok1"]))
        out = []
        for name, m in (("image tags", ~np.isin(tag, ["knowledge", "counting_hard"])), ("knowledge", tag == "knowledge"),
                        ("counting_hard", tag == "counting_hard")):
            w = m & ~im["plan1"]
            out.append(f"{name}: {w.sum()} wrong plans, the redraw's right {im['plan2'][w].sum()}, a fresh think1 right {im['planb'][w].sum()}")
        print(f"{os.path.basename(d):22s}", " | ".join(out))


def nouns(dirs):
    for d in dirs:
        _, im = load(d)
        specs, _ = eval_tags(len(im["ok1"]))
        noun = np.array([s["prompt"].split()[-1] if s["tag"] == "knowledge" else "" for s in specs])
        sel = np.where(im["p_ok2"] > im["p_ok"], im["ok2"], im["ok1"])
        best2 = np.where(im["p_okb"] > im["p_ok"], im["ok1b"], im["ok1"])
        out = []
        for name, m in (("held", np.isin(noun, irg.HELD_NOUNS)), ("trained", (noun != "") & ~np.isin(noun, irg.HELD_NOUNS))):
            w = m & ~im["plan1"]
            out.append(f"{name} ({m.sum()}): image1 {im['ok1'][m].mean():.2f} image2 {im['ok2'][m].mean():.2f} select {sel[m].mean():.2f} "
                       f"best2 {best2[m].mean():.2f}, the redraw's plan right for {im['plan2'][w].sum()} of {w.sum()} wrong plans")
        print(f"{os.path.basename(d):22s}", " | ".join(out))


def probe(dirs):
    for d in dirs:
        p = json.load(open(os.path.join(d, "summary.json")))["replan_probe"]
        print(f"{os.path.basename(d):16s} n {p['n']} flags {p['flagged']:.3f} right {p['replan_right']:.3f} |",
              " ".join(f"{t}:{v['flagged']:.2f}/{v['replan_right']:.2f}" for t, v in p["per_tag"].items()))


if __name__ == "__main__":
    cmds = dict(split=split, tags=tags, replan=replan, nouns=nouns, probe=probe)
    if len(sys.argv) < 3 or sys.argv[1] not in cmds:
        raise SystemExit(f"usage: python docs/irg_plans.py {{{','.join(cmds)}}} DIR...  (see the docstring)")
    cmds[sys.argv[1]](sys.argv[2:])
