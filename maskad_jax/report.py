"""report.html: per-class metrics and their mean, the config, run time, and example overlays.

Everything user-provided (class names, file names, config values) is HTML-escaped; images are
referenced by relative paths inside the workdir.
"""
from __future__ import annotations

import html
import time

from maskad_jax.metrics import METRIC_NAMES

_CSS = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eee}td.c{text-align:left}
figure{display:inline-block;margin:4px;text-align:center;font-size:12px}img{width:160px;height:160px}
pre{background:#f6f6f6;padding:1em;max-height:30em;overflow:auto}"""


def _pct(v):
    return "n/a" if v != v else f"{100 * v:.1f}"  # NaN check


def write_report(path: str, config, result: dict, workdir: str) -> None:
    e = html.escape
    rows = []
    for cls, m in result["per_class"].items():
        rows.append("<tr><td class=c>" + e(cls) + "</td>" + "".join(f"<td>{_pct(m[k])}</td>" for k in METRIC_NAMES) + "</tr>")
    rows.append("<tr><th>mean</th>" + "".join(f"<th>{_pct(result['mean'][k])}</th>" for k in METRIC_NAMES) + "</tr>")
    head = "<tr><th>class</th>" + "".join(f"<th>{e(k)}</th>" for k in METRIC_NAMES) + "</tr>"
    figs = []
    for ex in result.get("examples", []):
        caption = f"{ex['class']} / {ex['kind']}<br>{ex['file']}<br>score {ex['score']:.4g}, " \
                  f"{'defective' if ex['label'] else 'normal'}"
        figs.append(f'<figure><img src="{e(ex["png"], quote=True)}" alt="{e(ex["file"], quote=True)}">'
                    f"<figcaption>{e(caption).replace('&lt;br&gt;', '<br>')}</figcaption></figure>")
    timing = []
    if "train_seconds" in result:
        timing.append(f"training {result['train_seconds']:.0f} s")
    timing.append(f"total {result.get('total_seconds', 0):.0f} s")
    timing.append(f"test scoring {result.get('test_images_per_second', 0):.2f} images/s "
                  f"({result.get('num_test_images', 0)} images)")
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>maskad-jax report</title>
<style>{_CSS}</style></head><body>
<h1>maskad-jax report</h1>
<p>{e(time.strftime('%Y-%m-%d %H:%M:%S'))} &middot; workdir {e(workdir)} &middot; {e(', '.join(timing))}</p>
<h2>Metrics (%, protocol: {e(str(config.eval.protocol))}; definitions in docs/metrics.md)</h2>
<table>{head}{''.join(rows)}</table>
<h2>Highest- and lowest-scored test images per class</h2>
{''.join(figs) or '<p>none</p>'}
<h2>Config</h2><pre>{e(config.to_json_best_effort(indent=2))}</pre>
</body></html>"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)
