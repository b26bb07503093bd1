"""Property-based tests (hypothesis): every packer/unpacker round-trips exactly on arbitrary inputs, and every reader
fed truncated, bit-flipped or random bytes raises a clear UserError — never another exception, never a hang."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from converters import gguf as G
from converters import gptq as Q
from converters.gguf_meta import open_gguf
from lrqat_export.app.cli import main
from lrqat_export.core.errors import UserError
from lrqat_export.core.intckpt import load_intckpt

FUZZ = settings(deadline=None, max_examples=50, database=None, derandomize=bool(os.environ.get("CI")),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

READERS = settings(FUZZ, max_examples=30)  # each example copies and parses a checkpoint directory


@contextlib.contextmanager
def watchdog(seconds: int = 20):
    """A reader that loops on hostile input fails the test instead of hanging it."""
    def fire(*_):
        raise TimeoutError(f"reader did not return within {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --- packers / unpackers ---------------------------------------------------------------------------------------------
@st.composite
def gptq_codes(draw):
    bits = draw(st.sampled_from(Q.BITS))
    rows, n = draw(st.integers(1, 4)), 32 * draw(st.integers(1, 4))
    q = draw(hnp.arrays(np.uint8, (rows, n), elements=st.integers(0, (1 << bits) - 1)))
    return bits, q


@FUZZ
@given(gptq_codes())
def test_gptq_pack_then_unpack_is_the_identity(bq):
    bits, q = bq
    words = Q.pack_codes(q, bits)
    assert words.dtype == np.int32 and words.shape == (q.shape[0], q.shape[1] * bits // 32)
    np.testing.assert_array_equal(Q.unpack_codes(words, bits), q)


@FUZZ
@given(st.sampled_from(Q.BITS), st.integers(1, 3), st.integers(1, 4), st.data())
def test_gptq_unpack_then_pack_is_the_identity_on_any_words(bits, rows, groups, data):
    """Every bit pattern is a valid packing: unpacking arbitrary int32 words and packing again gives them back."""
    w = groups * bits  # 32 codes of b bits fill b words
    words = data.draw(hnp.arrays(np.int32, (rows, w)))
    np.testing.assert_array_equal(Q.pack_codes(Q.unpack_codes(words, bits), bits), words)


@FUZZ
@given(gptq_codes(), st.sampled_from([-1, "over"]))
def test_gptq_pack_refuses_out_of_range_codes(bq, bad):
    bits, q = bq
    q = q.astype(np.int16)
    q[0, 0] = -1 if bad == -1 else 1 << bits
    with pytest.raises(UserError, match=rf"{bits}-bit codes expected in \[0, {(1 << bits) - 1}\]"):
        Q.pack_codes(q, bits)


@FUZZ
@given(st.sampled_from(Q.BITS), hnp.arrays(np.int32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=7)))
def test_gptq_unpack_of_any_shape_is_exact_or_a_clear_error(bits, words):
    try:
        out = Q.unpack_codes(words, bits)
    except UserError as e:
        assert "unpack_codes: expected 2-D 32-bit words" in str(e) and (words.ndim != 2 or words.shape[1] * 32 % bits)
    else:
        assert out.shape == (words.shape[0], words.shape[1] * 32 // bits)


GGUF_RANGES = {QT.Q4_0: (-8, 7), QT.Q5_0: (-16, 15), QT.Q8_0: (-128, 127), QT.Q4_1: (-8, 7), QT.Q5_1: (-16, 15)}
finite_f16 = st.floats(min_value=-60000, max_value=60000, allow_nan=False, width=16)


@st.composite
def gguf_blocks(draw):
    qtype = draw(st.sampled_from(list(GGUF_RANGES)))
    lo, hi = GGUF_RANGES[qtype]
    rows, nb = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    codes = draw(hnp.arrays(np.int8, (rows, 32 * nb), elements=st.integers(lo, hi)))
    d = draw(hnp.arrays(np.float16, (rows, nb), elements=finite_f16))
    m = draw(hnp.arrays(np.float16, (rows, nb), elements=finite_f16)) if qtype in (QT.Q4_1, QT.Q5_1) else None
    return qtype, codes, d, m


@FUZZ
@given(gguf_blocks())
def test_gguf_blocks_decode_in_gguf_py_to_exactly_d_times_code_plus_m(blk):
    """Our block packer against the reference decoder (gguf-py, llama.cpp's own Python package): every element
    decodes to d·c (symmetric) or d·(c + o) + m (Q4_1/Q5_1), for any codes and fp16 fields."""
    qtype, codes, d, m = blk
    packed = G.pack_blocks(codes, d, m, qtype)
    assert packed.shape == G.byte_shape(codes.shape, qtype)
    got = gguf.quants.dequantize(packed, qtype).reshape(codes.shape)
    dd = np.repeat(d.astype(np.float32), 32, axis=1)
    if m is None:
        want = dd * codes.astype(np.float32)
    else:
        want = dd * (codes.astype(np.float32) + G.OFFSET[qtype]) + np.repeat(m.astype(np.float32), 32, axis=1)
    np.testing.assert_array_equal(got, want)


@FUZZ
@given(gguf_blocks(), st.booleans())
def test_gguf_pack_refuses_codes_outside_the_type(blk, low):
    qtype, codes, d, m = blk
    lo, hi = GGUF_RANGES[qtype]
    if (low and lo == -128) or (not low and hi == 127):
        return  # int8 holds no Q8_0 code outside [-128, 127]
    codes = codes.astype(np.int16)
    codes[-1, -1] = lo - 1 if low else hi + 1
    with pytest.raises(ValueError, match=rf"{qtype.name}: codes must lie in \[{lo}, {hi}\]"):
        G.pack_blocks(codes, d, m, qtype)


# --- readers: GGUF ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    assert main(["ptq", "--model", str(tiny_llama), "--out", str(root / "ck"), "--preset", "q4_1"]) == 0
    assert main(["export", "gguf", str(root / "ck"), "--out", str(root / "m.gguf")]) == 0
    assert main(["export", "gptq", str(root / "ck"), "--out", str(root / "gptq")]) == 0
    return {"ck": root / "ck", "gguf": root / "m.gguf", "gptq": root / "gptq"}


def _read_gguf(path: Path):
    with watchdog():
        r = open_gguf(path)
        return {t.name: bytes(t.data.tobytes()) for t in r.tensors}, {k: f.parts[-1].tobytes() for k, f in r.fields.items()}


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from([b"", b"GGUF", b"GGUF\x03\x00\x00\x00"]))
def test_gguf_reader_on_random_bytes_raises_a_clear_error(tmp_path_factory, blob, prefix):
    p = tmp_path_factory.mktemp("g") / "x.gguf"
    p.write_bytes(prefix + blob)
    with pytest.raises(UserError, match=r"GGUF .*x\.gguf: "):
        _read_gguf(p)


@FUZZ
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.sampled_from([1, 2, 3, 4]), st.binary(max_size=512))
def test_gguf_reader_on_hostile_headers_raises_a_clear_error(tmp_path_factory, n_tensors, n_kv, version, tail):
    """Header counts up to 2^64 − 1 must not make the reader allocate or loop: they are checked against the size."""
    p = tmp_path_factory.mktemp("g") / "h.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + tail)
    try:
        _read_gguf(p)
    except UserError:
        return
    assert n_tensors == 0  # only an empty file can be valid here


@FUZZ
@given(st.data())
def test_gguf_reader_on_a_truncated_file_errors_or_reads_every_tensor_intact(files, tmp_path_factory, data):
    full = files["gguf"].read_bytes()
    ref_tensors, _ = _read_gguf(files["gguf"])
    cut = data.draw(st.integers(0, len(full) - 1))
    p = tmp_path_factory.mktemp("g") / "t.gguf"
    p.write_bytes(full[:cut])
    try:
        tensors, _ = _read_gguf(p)
    except UserError as e:
        assert "t.gguf" in str(e)
    else:  # only the trailing alignment padding was cut
        assert tensors == ref_tensors


@FUZZ
@given(st.data())
def test_gguf_reader_on_a_bit_flipped_header_never_fails_unclearly(files, tmp_path_factory, data):
    """Flip bytes in the metadata/tensor-info region: the file either fails with a UserError or still parses."""
    full = bytearray(files["gguf"].read_bytes())
    r = gguf.GGUFReader(files["gguf"])
    header_end = min(int(t.data_offset) for t in r.tensors)
    for _ in range(data.draw(st.integers(1, 4))):
        full[data.draw(st.integers(4, header_end - 1))] = data.draw(st.integers(0, 255))
    p = tmp_path_factory.mktemp("g") / "f.gguf"
    p.write_bytes(bytes(full))
    try:
        _read_gguf(p)
    except UserError:
        pass


# --- readers: IntCheckpoint, GPTQ, train state -----------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


def _clone(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    return Path(shutil.copytree(src, dst))


@READERS
@given(st.data())
def test_intckpt_reader_on_corrupted_tensors_raises_a_clear_error(files, tmp_path_factory, data):
    d = _clone(files["ck"], tmp_path_factory.mktemp("c") / "ck")
    st_file = d / "model.safetensors"
    full = st_file.read_bytes()
    how = data.draw(st.sampled_from(["truncate", "random", "header"]))
    if how == "truncate":
        st_file.write_bytes(full[: data.draw(st.integers(0, len(full) - 1))])
    elif how == "random":
        st_file.write_bytes(data.draw(st.binary(max_size=1024)))
    else:  # a plausible length prefix and a hostile JSON header
        hdr = json.dumps(data.draw(json_values)).encode()
        st_file.write_bytes(struct.pack("<Q", len(hdr)) + hdr + full[8 + struct.unpack("<Q", full[:8])[0]:])
    with watchdog(), pytest.raises(UserError, match="IntCheckpoint"):
        load_intckpt(d)


@READERS
@given(st.data())
def test_intckpt_reader_on_a_hostile_manifest_raises_a_clear_error(files, tmp_path_factory, data):
    d = _clone(files["ck"], tmp_path_factory.mktemp("c") / "ck")
    man = json.loads((d / "lrqat_manifest.json").read_text())
    how = data.draw(st.sampled_from(["bytes", "json", "field"]))
    if how == "bytes":
        (d / "lrqat_manifest.json").write_bytes(data.draw(st.binary(max_size=256)))
    elif how == "json":
        (d / "lrqat_manifest.json").write_text(json.dumps(data.draw(json_values)))
    else:  # one field of a real manifest replaced by an arbitrary JSON value
        key = data.draw(st.sampled_from(["spec", "quantized_layers", "format_version", "format"]))
        value = data.draw(json_values)
        if key == "spec" and isinstance(value, dict):
            value = {**man["spec"], **value}
        if value == man[key]:
            return
        man[key] = value
        (d / "lrqat_manifest.json").write_text(json.dumps(man))
    with watchdog(), pytest.raises(UserError):
        load_intckpt(d)


@READERS
@given(st.data())
def test_gptq_reader_on_corrupted_files_raises_a_clear_error(files, tmp_path_factory, data):
    d = _clone(files["gptq"], tmp_path_factory.mktemp("q") / "gptq")
    how = data.draw(st.sampled_from(["truncate", "random", "config", "drop", "dtype"]))
    stf = d / "model.safetensors"
    if how == "truncate":
        full = stf.read_bytes()
        stf.write_bytes(full[: data.draw(st.integers(0, len(full) - 1))])
    elif how == "random":
        stf.write_bytes(data.draw(st.binary(max_size=1024)))
    elif how == "config":
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"] = data.draw(json_values)
        (d / "config.json").write_text(json.dumps(cfg))
    else:
        from safetensors.torch import load_file, save_file

        t = load_file(str(stf))
        key = data.draw(st.sampled_from(sorted(k for k in t if k.endswith(tuple(Q.LAYER_TENSORS)))))
        if how == "drop":
            del t[key]
        else:
            t[key] = t[key].float() if t[key].dtype != t[key].float().dtype else t[key].half()
        save_file(t, str(stf))
    with watchdog(), pytest.raises(UserError, match="GPTQ"):
        Q.read_gptq(d)


@pytest.fixture(scope="module")
def finished_run(tiny_llama, tmp_path_factory):
    """A prepared tiny model and a one-step training run with a checkpoint (built once for all examples)."""
    import torch

    from lrqat_export.core.data import text_windows
    from lrqat_export.core.models import load_model
    from lrqat_export.methods.lrqat import prepare
    from lrqat_export.methods.common import MethodOptions
    from lrqat_export.core.quant import PRESETS
    from lrqat_export.train.config import TrainConfig
    from lrqat_export.train.loop import train

    model, tok, _ = load_model(str(tiny_llama))
    torch.manual_seed(0)
    prepare(model, PRESETS["q4_0"], MethodOptions(rank=2, alpha=1.0, phi="int8"))
    windows, cfg = text_windows(tok, ["pydoc"], 32, 4, "w"), TrainConfig(steps=1, batch_size=2, objective="ce")
    run = tmp_path_factory.mktemp("run") / "run"
    train(model, windows, cfg, run, progress=False)
    return model, windows, cfg, run


@READERS
@given(st.sampled_from(["optim.pt", "trainable.safetensors", "state.json"]), st.binary(max_size=512))
def test_train_state_reader_on_corrupted_files_raises_a_clear_error(finished_run, tmp_path_factory, name, blob):
    from lrqat_export.train.state import latest_checkpoint
    from lrqat_export.train.loop import train

    model, windows, cfg, src = finished_run
    run = _clone(src, tmp_path_factory.mktemp("r") / "run")
    (latest_checkpoint(run) / name).write_bytes(blob)
    with watchdog(), pytest.raises(UserError, match="--resume: checkpoint .* (is corrupted|is unreadable)"):
        train(model, windows, cfg, run, resume=True, progress=False)
