"""F1-optimal thresholds from labelled images the user supplies (data.validation; thresholds.py).

Layout: <validation>/<class>/good/ holds good images, every other folder <validation>/<class>/<name>/
defective ones (searched recursively; no masks needed). A model of one class also takes good/ and
<defect>/ directly under <validation>. The test split is refused: thresholds chosen on it would make
its metrics a lie. The images are scored with the fit's scoring against their class's pool, and each
class with at least one defective image gets the threshold that maximises F1 on them.
"""

from __future__ import annotations

import os

import numpy as np

from maskad_jax.app.predict import EXTENSIONS
from maskad_jax.app.scored_files import Files, scored_batches
from maskad_jax.common import progress
from maskad_jax.common.errors import DataError
from maskad_jax.common.specs import DataSpec, ScoringSpec
from maskad_jax.engine.thresholds import f1_threshold
from maskad_jax.engine.trained_model import TrainedModel


def validation_images(folder: str, class_names, manual_dir: str = "") -> tuple[str, list, list, list]:
    """(root, relative paths, their pool indices, labels: 1 = defective) of the validation folder."""
    root = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(root):
        raise DataError(f"data.validation {root}: no such folder (<class>/good/ and <class>/<defect>/ images)")
    if manual_dir:
        md = os.path.realpath(os.path.expanduser(manual_dir))
        tests = [os.path.join(md, "test")] + [os.path.join(md, c, "test") for c in class_names]
        real = os.path.realpath(root)
        trains = [md, os.path.join(md, "train")] + [os.path.join(md, c, "train") for c in class_names]
        if any(real == t or real.startswith(t + os.sep) for t in trains[1:]) or real == md:
            raise DataError(
                f"data.validation {root} is or lies in the training images' folder (data.manual_dir): thresholds "
                f"chosen on the images the model was fitted on would be too low; give other labelled images"
            )
        if any(real == t or real.startswith(t + os.sep) or t.startswith(real + os.sep) for t in tests):
            raise DataError(
                f"data.validation {root} is or holds the dataset's test split: thresholds chosen on the test "
                f"images would make its metrics meaningless; give other labelled images"
            )
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    single = len(class_names) == 1 and "good" in subdirs
    per_class = {class_names[0]: root} if single else {d: os.path.join(root, d) for d in subdirs}
    unknown = sorted(set(per_class) - set(class_names))
    if unknown:
        raise DataError(
            f"data.validation {root}: folder(s) {unknown} name no class of the model ({', '.join(class_names)}); "
            f"lay it out as <class>/good/ and <class>/<defect>/"
        )
    rels, pools, labels = [], [], []
    for cls, cdir in per_class.items():
        k = list(class_names).index(cls)
        for kind in sorted(os.listdir(cdir)):
            kdir = os.path.join(cdir, kind)
            if not os.path.isdir(kdir):
                continue
            for d, _, files in os.walk(kdir):
                for f in sorted(files):
                    if f.lower().endswith(EXTENSIONS):
                        rels.append(os.path.relpath(os.path.join(d, f), root))
                        pools.append(k)
                        labels.append(int(kind != "good"))
    if not rels:
        raise DataError(
            f"data.validation {root}: no images ({', '.join(EXTENSIONS)}) in <class>/<good|defect>/ folders"
        )
    return root, rels, pools, labels


def validation_thresholds(sc: ScoringSpec, d: DataSpec, tm: TrainedModel, log=progress.log) -> dict:
    """{class: {"threshold", "f1", "good", "defective"}} for each class with defective validation
    images (log lines for the others); {} when data.validation is ""."""
    if not d.validation:
        return {}
    pools = tm.pools
    root, rels, pidx, labels = validation_images(d.validation, pools.class_names, d.manual_dir)
    pool_of, label_of, rows, scores = dict(zip(rels, pidx)), dict(zip(rels, labels)), [], {}
    files = Files(root, rels, np.asarray(pidx), "validation")
    for chunk, _, out in scored_batches(sc, d, tm, files, rows, log):
        for (rel, _), v in zip(chunk["entries"], np.asarray(out["score"]).tolist()):
            scores[rel] = max(scores.get(rel, -np.inf), v)  # with tiles, the maximum over them
    if rows:
        raise DataError(
            f"data.validation: {len(rows)} image(s) could not be read: {rows[0]['file']}: {rows[0]['error']}"
        )
    out = {}
    for k, cls in enumerate(pools.class_names):
        mine = [r for r in rels if pool_of[r] == k]
        y = np.asarray([label_of[r] for r in mine], int)
        if not y.any():
            if mine:
                log(f"validation: class {cls} has no defective images, so no F1 threshold (the quantile rule applies)")
            continue
        thr, f1 = f1_threshold([scores[r] for r in mine], y)
        out[cls] = {"threshold": thr, "f1": f1, "good": int((y == 0).sum()), "defective": int(y.sum())}
        log(
            f"validation: class {cls}: F1-optimal threshold {thr:.4g} (F1 {f1:.3f} on {out[cls]['good']} good, "
            f"{out[cls]['defective']} defective images)"
        )
    return out
