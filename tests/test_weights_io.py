"""The torch-free weight readers, the converter CLI and their errors."""
import collections
import os
import pickle

import numpy as np
import pytest

from maskad_jax import weights as W
from maskad_jax.convert_weights import main as convert_main
from maskad_jax.safetensors_reader import load_safetensors
from maskad_jax.torch_pickle import CheckpointFormatError, UnsafePickleError, load_pth


def _torch():
    from conftest import torch_or_skip
    return torch_or_skip()


def _sample_state(torch):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return collections.OrderedDict([
        ("a.weight", torch.randn(4, 3, 3, 3, generator=g)),
        ("b.half", torch.randn(7, generator=g).half()),
        ("c.bf16", torch.randn(3, 2, generator=g).bfloat16()),
        ("d.count", torch.tensor(12345678901, dtype=torch.int64)),
        ("e.view", base[1:4, ::2]),  # a strided view sharing a storage with f
        ("f.base", base),
        ("g.transposed", torch.randn(3, 5, generator=g).t()),
        ("h.empty", torch.zeros(0, 3)),
        ("i.bool", torch.tensor([True, False, True])),
    ])


@pytest.mark.parametrize("legacy", [False, True])
def test_pth_reader_equals_torch_load(tmp_path, legacy):
    torch = _torch()
    state = _sample_state(torch)
    path = str(tmp_path / "w.pth")
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    ours = load_pth(path)
    assert list(ours) == list(ref)
    for k in ref:
        r = ref[k].float().numpy() if ref[k].dtype == torch.bfloat16 else ref[k].numpy()
        assert ours[k].dtype == r.dtype, k
        assert ours[k].shape == r.shape, k
        np.testing.assert_array_equal(ours[k], r, err_msg=k)


def test_packaged_lite0_file_reads_like_torch_load():
    torch = _torch()
    path = W.packaged_lite0_path()
    ref = torch.load(path, map_location="cpu", weights_only=True)
    ours = load_pth(path)
    assert list(ours) == list(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k].numpy())


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if ever called


@pytest.mark.parametrize("legacy", [False, True])
def test_foreign_global_is_refused_and_never_runs(tmp_path, legacy):
    torch = _torch()
    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "evil.pth")
    torch.save({"w": torch.ones(2), "x": _Payload(marker)}, path, _use_new_zipfile_serialization=not legacy)
    assert not os.path.exists(marker)
    with pytest.raises(UnsafePickleError, match=r"io\.open"):
        load_pth(path)
    assert not os.path.exists(marker)


def test_plain_pickle_with_os_system_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(UnsafePickleError, match="system"):
        load_pth(path)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file_gives_a_clear_error(tmp_path, legacy):
    torch = _torch()
    path = tmp_path / "w.pth"
    torch.save({"w": torch.randn(100, 100)}, str(path), _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="cut.pth"):
        load_pth(cut)


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.pth"
    p.write_text("hello")
    with pytest.raises(CheckpointFormatError, match="notes.pth"):
        load_pth(p)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pth(tmp_path / "nope.pth")


def test_safetensors_reader_equals_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    tensors = {"conv_stem.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
               "bn1.num_batches_tracked": np.array(3, np.int64),
               "x.half": rng.normal(size=(5,)).astype(np.float16)}
    path = str(tmp_path / "m.safetensors")
    st.save_file(tensors, path)
    ours = load_safetensors(path)
    ref = st.load_file(path)
    assert set(ours) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k])
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_safetensors(path)


def _lukemelas_to_timm(state, arch_name):
    """Rename a lukemelas state dict to timm's names (the inverse of our timm mapping, written out here)."""
    from maskad_jax import efficientnet_arch as ea
    arch = ea.get_arch(arch_name)
    where, count = {}, collections.Counter()
    for i, b in enumerate(arch.blocks):
        where[i] = (b.stage, count[b.stage], b.expand_ratio != 1)
        count[b.stage] += 1
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] in top:
            out[f"{top[parts[0]]}.{parts[1]}"] = v
            continue
        s, j, expand = where[int(parts[1])]
        mod = parts[2]
        table = ({"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
                  "_bn2": "bn3"} if expand else
                 {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
                  "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"})
        out[f"blocks.{s}.{j}.{table[mod]}.{parts[3]}"] = v
    return out


def test_timm_names_map_to_the_same_variables(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    state = load_pth(W.packaged_lite0_path())
    timm_state = {k: np.ascontiguousarray(v) for k, v in _lukemelas_to_timm(state, "efficientnet-lite0").items()}
    path = str(tmp_path / "efficientnet_lite0.safetensors")
    st.save_file(timm_state, path)
    a = W.load_backbone_variables("efficientnet-lite0", "packaged")
    b = W.load_backbone_variables("efficientnet-lite0", path)
    import jax
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_converter_cli_writes_orbax_and_refuses_overwrite(tmp_path, capsys):
    import jax
    dst = tmp_path / "lite0"
    src = W.packaged_lite0_path()
    assert convert_main([src, str(dst), "--arch", "efficientnet-lite0"]) == 0
    assert "missing keys: none" in capsys.readouterr().out
    restored = W.load_backbone_variables("efficientnet-lite0", str(dst))
    direct = W.load_backbone_variables("efficientnet-lite0", "packaged")
    for x, y in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(direct)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert convert_main([src, str(dst), "--arch", "efficientnet-lite0"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(W.WeightsError, match="efficientnet-lite0.*efficientnet-b0"):
        W.load_backbone_variables("efficientnet-b0", str(dst))


def test_wrong_architecture_is_refused_with_a_guess(tmp_path, capsys):
    rc = convert_main([W.packaged_lite0_path(), str(tmp_path / "x"), "--arch", "efficientnet-b4"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "do not fit efficientnet-b4" in err and "looks like efficientnet-lite0" in err
    assert "shape mismatch" in err
    assert not (tmp_path / "x").exists()


def test_missing_b4_file_says_where_to_get_it():
    with pytest.raises(FileNotFoundError, match=r"(?s)efficientnet-b4-6ed6700e.pth.*convert_weights"):
        W.load_backbone_variables("efficientnet-b4", "/no/such/efficientnet-b4.pth")
