"""report.html: one self-contained file (every image embedded as a PNG data URI, no external file,
script or style), to keep, copy or mail with its results.

Contents: a summary (model, data, when, how long); the seven metrics per class and their mean; per
class the score distributions of normal and defective test images with the predict threshold,
image and pixel ROC and precision-recall curves, and a per-defect-type table; overlays of the
highest- and lowest-scored test images with the ground-truth outline and a colour bar stating the
map's scale; the config. Plots with matplotlib (Agg). Everything user-provided (class, defect and
file names, config values) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import time

import numpy as np
from scipy import ndimage

from maskad_jax.engine import metrics as metrics_lib
from maskad_jax.engine.metrics import METRIC_NAMES


def _pyplot():
    """matplotlib's pyplot on the Agg backend, imported when a report is written (not with the package)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_CSS = """body{font-family:sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}td.c,th.c{text-align:left}
figure{display:inline-block;margin:4px;text-align:center;font-size:12px;vertical-align:top}
img.plot{width:300px}img.wide{width:560px}img.ex{width:230px}
pre{background:#f6f6f6;padding:1em;max-height:30em;overflow:auto}.summary td{text-align:left}"""
_E = html.escape


def _pct(v):
    return "n/a" if v is None or v != v else f"{100 * v:.1f}"  # NaN check


def _png(fig) -> str:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" src="{uri}" alt="{_E(alt, quote=True)}">'


def score_distribution(c: dict, name: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 2.8))
    s, y = np.asarray(c["scores"]), np.asarray(c["labels"])
    bins = np.linspace(s.min(), s.max() + 1e-12, 30)
    ax.hist(s[y == 0], bins=bins, alpha=0.6, label=f"normal ({int((y == 0).sum())})", color="tab:blue")
    ax.hist(s[y == 1], bins=bins, alpha=0.6, label=f"defective ({int((y == 1).sum())})", color="tab:red")
    if c["threshold"] is not None:
        ax.axvline(c["threshold"], color="k", ls="--", label="predict threshold")
    ax.set(xlabel="image score", ylabel="test images", title=f"{name}: image scores")
    ax.legend(fontsize=7)
    return _png(fig)


def curves(c: dict, name: str, kind: str) -> str:
    plt = _pyplot()
    pts = c[f"{kind}_curves"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(6, 2.8))
    if pts is None:
        for ax in (a, b):
            ax.text(0.5, 0.5, "undefined: one label only", ha="center")
    else:
        a.plot(pts["fpr"], pts["tpr"])
        a.plot([0, 1], [0, 1], color="0.7", lw=0.8)
        a.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{kind} ROC")
        b.plot(pts["recall"], pts["precision"])
        b.set(xlabel="recall", ylabel="precision", title=f"{kind} precision-recall", ylim=(0, 1.02))
    fig.suptitle(name, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def overlay_figure(ex: dict) -> str:
    """The test image, its anomaly map in colour (scaled to the class's lowest..highest map value,
    stated by the colour bar) and the ground-truth outline in white."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.2, 2.8))
    ax.imshow(np.clip(ex["image"], 0, 1))
    lo, hi = ex["scale"]
    im = ax.imshow(ex["map"], cmap="jet", alpha=0.45, vmin=lo, vmax=hi)
    gt = np.asarray(ex["mask"]).astype(bool)
    if gt.any():
        edge = gt & ~ndimage.binary_erosion(gt, iterations=1, border_value=0)
        outline = np.zeros(gt.shape + (4,))
        outline[edge] = (1, 1, 1, 1)
        ax.imshow(outline)
    ax.set_axis_off()
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("anomaly map (class scale)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return _png(fig)


def defect_table(c: dict) -> str:
    """Per defect type: images, mean score, share at or above the threshold, image AUROC against the
    class's normal images."""
    s, y, d, thr = np.asarray(c["scores"]), np.asarray(c["labels"]), np.asarray(c["defects"]), c["threshold"]
    rows = []
    for t in sorted(set(d.tolist()), key=lambda t: (t != "good", t)):
        sel = d == t
        above = "n/a" if thr is None else f"{100 * float(np.mean(s[sel] >= thr)):.1f}"
        auroc = (
            ""
            if t == "good" or not (y == 0).any()
            else _pct(metrics_lib.auroc(np.r_[s[y == 0], s[sel]], np.r_[np.zeros((y == 0).sum()), np.ones(sel.sum())]))
        )
        rows.append(
            f"<tr><td class=c>{_E(t)}</td><td>{int(sel.sum())}</td><td>{s[sel].mean():.4g}</td>"
            f"<td>{above}</td><td>{auroc}</td></tr>"
        )
    return (
        "<table><tr><th class=c>defect type</th><th>images</th><th>mean score</th><th>% at or above the "
        "threshold</th><th>I-AUROC vs good</th></tr>" + "".join(rows) + "</table>"
    )


def _summary(run: dict, result, workdir) -> str:
    b, r = run["model"].backbone, run["model"].reconstructor
    d, sc = run["data"], run["scoring"]
    items = [
        ("when", time.strftime("%Y-%m-%d %H:%M:%S")),
        ("workdir", workdir),
        (
            "data",
            f"{d.name} {d.config or ''} {d.manual_dir or ''}".strip() + f", {result.get('num_test_images', 0)} "
            f"test images at {d.image_size} px",
        ),
        (
            "model",
            f"{b.arch} ({b.weights}), reconstructor dim {r.embed_dim}, {r.encoder_depth}+{r.decoder_depth} "
            f"blocks, {run['train'].epochs} epochs",
        ),
        (
            "scoring",
            f"M_po {sc.mpo}, OT {sc.ot}, errors {sc.error_units}, combination {sc.combine}",
        ),
        (
            "time",
            ", ".join(
                ([f"training {result['train_seconds']:.0f} s"] if "train_seconds" in result else [])
                + [
                    f"total {result.get('total_seconds', 0):.0f} s",
                    f"test scoring {result.get('test_images_per_second', 0):.2f} images/s",
                ]
            ),
        ),
    ]
    return (
        "<table class=summary>"
        + "".join(f"<tr><th class=c>{_E(k)}</th><td>{_E(str(v))}</td></tr>" for k, v in items)
        + "</table>"
    )


def _metrics_table(result) -> str:
    head = "<tr><th class=c>class</th>" + "".join(f"<th>{_E(k)}</th>" for k in METRIC_NAMES) + "</tr>"
    rows = [
        "<tr><td class=c>" + _E(cls) + "</td>" + "".join(f"<td>{_pct(m[k])}</td>" for k in METRIC_NAMES) + "</tr>"
        for cls, m in result["per_class"].items()
    ]
    rows.append(
        "<tr><th class=c>mean</th>" + "".join(f"<th>{_pct(result['mean'][k])}</th>" for k in METRIC_NAMES) + "</tr>"
    )
    return "<table>" + head + "".join(rows) + "</table>"


def write_report(path: str, run: dict, result: dict, workdir: str) -> None:
    """report.html. run: {"data": DataSpec, "model": ModelSpec, "train": TrainSpec, "scoring": ScoringSpec,
    "protocol": eval.protocol, "config_json": the config as given} (common/specs.py)."""
    data = result.get("report_data") or {"classes": {}, "examples": [], "threshold_quantile": 0}
    sections = []
    for name, c in data["classes"].items():
        thr = "none (no calibration scores)" if c["threshold"] is None else f"{c['threshold']:.4g}"
        sections.append(
            f"<h3>{_E(name)}</h3><p>predict threshold {_E(thr)} (the {data['threshold_quantile']:g} quantile of "
            f"held-out normal training images' scores)</p>"
            + _img(score_distribution(c, name), f"{name} score distributions")
            + _img(curves(c, name, "image"), f"{name} image ROC and PR curves", "wide")
            + _img(curves(c, name, "pixel"), f"{name} pixel ROC and PR curves", "wide")
            + defect_table(c)
        )
    figs = []
    for ex in data["examples"]:
        caption = (
            f"{_E(ex['class'])} / {_E(ex['kind'])}<br>{_E(ex['file'])}<br>score {ex['score']:.4g}, "
            f"{'defective' if ex['label'] else 'normal'}"
        )
        figs.append(f"<figure>{_img(overlay_figure(ex), ex['file'], 'ex')}<figcaption>{caption}</figcaption></figure>")
    doc = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>maskad-jax report</title>
<style>{_CSS}</style></head><body>
<h1>maskad-jax report</h1>
{_summary(run, result, workdir)}
<h2>Metrics (%, protocol: {_E(str(run["protocol"]))}; definitions in docs/metrics.md)</h2>
{_metrics_table(result)}
<h2>Per class</h2>
{"".join(sections) or "<p>no per-class data</p>"}
<h2>Highest- and lowest-scored test images per class</h2>
<p>Colours: the anomaly map from the class's lowest to its highest value (colour bar);
white: the ground-truth outline.</p>
{"".join(figs) or "<p>none</p>"}
<h2>Config</h2><pre>{_E(run["config_json"])}</pre>
</body></html>"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)
