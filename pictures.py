"""
The pictures every run writes: sample grids (a row per prompt, each image framed green or red by the
exact verifier's verdict), IRG's five-column grid, the reward histogram and training curves (PNG).
"""
import numpy as np

import world


def _font():
    from PIL import ImageFont
    return ImageFont.load_default()


def grid(rows, path, labels=None, verdicts=None, cols=None):
    """PNG grid: one row of images per entry of `rows` (uint8 [64,64,3] each, 2x upscaled), the
    row's text (e.g. its prompt, wrapped) at its left when `labels` is given, and around each
    image a green (verifier accepts) or red (rejects) border when `verdicts` (per row, per image:
    True / False / None = no border) is given."""
    from PIL import Image, ImageDraw
    import textwrap
    cols = cols or max(len(r) for r in rows)
    S, B = world.W * 2, 3                                     # image side, border width
    cell = S + 2 * B + 4
    lw = 260 if labels else 0
    canvas = Image.new("RGB", (lw + cols * cell, len(rows) * cell), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        if labels:
            draw.multiline_text((4, r * cell + 4), "\n".join(textwrap.wrap(str(labels[r]), 40)[:9]),
                                fill=(230, 230, 230), font=_font())
        for c, im in enumerate(row[:cols]):
            x, y = lw + c * cell + 2, r * cell + 2
            v = verdicts[r][c] if verdicts else None
            if v is not None:
                draw.rectangle([x, y, x + S + 2 * B - 1, y + S + 2 * B - 1], fill=(40, 200, 60) if v else (220, 40, 40))
            canvas.paste(Image.fromarray(np.asarray(im, np.uint8).repeat(2, 0).repeat(2, 1)), (x + B, y + B))
    canvas.save(path)


def histogram_png(counts, path, title=""):
    """A bar chart of a histogram over [0, 1] (10 bins: rwr/srum's reward histograms), as PNG."""
    from PIL import Image, ImageDraw
    n, W, H, pad = len(counts), 320, 180, 24
    im = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(im)
    top = max(max(counts), 1)
    bw = (W - 2 * pad) / n
    for i, c in enumerate(counts):
        h = (H - 2 * pad) * c / top
        d.rectangle([pad + i * bw + 1, H - pad - h, pad + (i + 1) * bw - 1, H - pad], fill=(60, 110, 200))
        d.text((pad + i * bw + 2, H - pad - h - 11), str(c), fill=(0, 0, 0), font=_font())
    d.line([pad, H - pad, W - pad, H - pad], fill=(0, 0, 0))
    d.text((pad, H - pad + 4), "0", fill=(0, 0, 0), font=_font())
    d.text((W - pad - 6, H - pad + 4), "1", fill=(0, 0, 0), font=_font())
    d.text((pad, 4), title, fill=(0, 0, 0), font=_font())
    im.save(path)


def sample_grid(specs, k, imgs, correct, path, cols):
    """The eval's grid: the first prompt of every tag, its k images with the verifier's verdicts."""
    rows, labels, ok = [], [], []
    for t in [t for t in world.TAGS if any(s["tag"] == t for s in specs)]:
        i = next(n for n, s in enumerate(specs) if s["tag"] == t)
        rows.append(imgs[i * k:(i + 1) * k]); ok.append([bool(c) for c in correct[i * k:(i + 1) * k]])
        labels.append(f"[{t}] {specs[i]['prompt']}")
    grid(rows, path, labels, ok, min(cols, k))


def irg_grid(rows, path):
    """One row per entry (prompt, think1, image1, ok1, think2, image2, ok2): the texts wrapped in their
    columns, the images 2x with the verifier's verdict as a green / red border."""
    from PIL import Image, ImageDraw
    import textwrap
    S, B, TW = world.W * 2, 3, 300
    cell = S + 2 * B + 4
    H = max(cell, 110)
    widths = [200, TW, cell, TW, cell]
    canvas = Image.new("RGB", (sum(widths), len(rows) * H), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for r, (prompt, t1, i1, ok1, t2, i2, ok2) in enumerate(rows):
        x = 0
        for w, item in zip(widths, [prompt, t1, (i1, ok1), t2, (i2, ok2)]):
            y = r * H + 2
            if isinstance(item, str):
                draw.multiline_text((x + 4, y + 2), "\n".join(textwrap.wrap(item, w // 6 - 2)[:9]), fill=(230, 230, 230),
                                    font=_font())
            else:
                im, ok = item
                draw.rectangle([x + 2, y, x + 2 + S + 2 * B - 1, y + S + 2 * B - 1], fill=(40, 200, 60) if ok else (220, 40, 40))
                canvas.paste(Image.fromarray(np.asarray(im, np.uint8).repeat(2, 0).repeat(2, 1)), (x + 2 + B, y + B))
            x += w
    canvas.save(path)


def curve_png(series, path, title=""):
    """Line plots, one panel per entry of series {name: (xs, ys)}, stacked (training curves)."""
    from PIL import Image, ImageDraw
    W, H, pad = 420, 150, 30
    im = Image.new("RGB", (W, H * len(series)), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for p, (name, (xs, ys)) in enumerate(series.items()):
        top = p * H
        lo, hi = (min(ys), max(ys)) if ys else (0, 1)
        hi = hi if hi > lo else lo + 1e-6
        x_hi = max(max(xs), 1) if xs else 1
        pts = [(pad + (W - 2 * pad) * x / x_hi, top + H - pad - (H - 2 * pad) * (y - lo) / (hi - lo)) for x, y in zip(xs, ys)]
        d.line([pad, top + H - pad, W - pad, top + H - pad], fill=(0, 0, 0))
        if len(pts) > 1:
            d.line(pts, fill=(60, 110, 200), width=2)
        d.text((pad, top + 4), f"{title + ': ' if title else ''}{name}: {lo:.3f} .. {hi:.3f}", fill=(0, 0, 0), font=_font())
        d.text((W - pad - 40, top + H - pad + 4), f"step {x_hi}", fill=(0, 0, 0), font=_font())
    im.save(path)
