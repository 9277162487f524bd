"""A few test images of a dataset written as PNG files, to try --mode=predict on.

The demo's synthetic images exist only inside the prepared dataset; train_and_eval on it writes
<workdir>/samples/ (one normal and one defective test image per class, as the dataset stores them),
so the README's predict command runs as written:

    python run.py --config=configs/demo.py --workdir=runs/demo --mode=predict --config.predict.input=runs/demo/samples
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from maskad_jax.app.overlay import unique_names
from maskad_jax.data.splits import SplitData


def export_samples(data: SplitData, out_dir: str, per_label: int = 1) -> list[str]:
    """Write per_label normal and per_label defective test images of every class; their paths."""
    os.makedirs(out_dir, exist_ok=True)
    picks = []
    for cid in sorted(set(data.class_ids.tolist())):
        for label in (0, 1):
            idx = np.nonzero((data.class_ids == cid) & (data.labels == label))[0]
            picks += [int(i) for i in idx[:per_label]]
    names = unique_names([data.file_names[i] for i in picks], ".png")
    paths = []
    for i, name in zip(picks, names):
        record = data.source[int(data.indices[i])]
        path = os.path.join(out_dir, name)
        Image.fromarray(np.asarray(record["image"])).save(path)
        paths.append(path)
    return paths
