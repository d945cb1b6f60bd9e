"""Model helpers that need no model download: device/dtype rules and model path resolution."""

from __future__ import annotations

import os

import pytest
import torch

from rapidun.errors import RapidunError
from rapidun.io import stable_hash
from rapidun.models import fingerprint, resolve_device, resolve_dtype, resolve_model_path


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_resolve_device_cuda_missing():
    with pytest.raises(RapidunError, match="CUDA is not available"):
        resolve_device("cuda:1")


def test_resolve_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(RapidunError) as ei:
        resolve_dtype("float8", cpu)
    assert "float8" in str(ei.value) and "'float32'" in str(ei.value)


def test_resolve_model_path_local_folder(tmp_path):
    for n in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / n).write_text("{}", encoding="utf-8")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize(
    ("present", "missing"),
    [
        (["config.json", "tokenizer.json"], r"no weights \(\*\.safetensors"),
        (["config.json", "pytorch_model.bin"], "no tokenizer"),
        (["model.safetensors", "vocab.json"], r"no config\.json"),
    ],
)
def test_resolve_model_path_names_the_missing_files(tmp_path, present, missing):
    for n in present:
        (tmp_path / n).write_text("{}", encoding="utf-8")
    with pytest.raises(RapidunError, match=missing):
        resolve_model_path(str(tmp_path))


def test_resolve_model_path_refuses_a_file(tmp_path):
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(RapidunError, match="is a file"):
        resolve_model_path(str(tmp_path / "m.bin"))


def test_uncached_hub_id_fails_fast_without_network_even_without_offline_flag(monkeypatch):
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_net(*a, **k):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_net)
    with pytest.raises(RapidunError, match="cannot be reached"):
        resolve_model_path("some-org/not-cached-model-xyz")


def test_resolve_model_path_folder_without_config(tmp_path):
    with pytest.raises(RapidunError, match=r"config\.json"):
        resolve_model_path(str(tmp_path))


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "a/b/c"])
def test_resolve_model_path_missing_local(name):
    with pytest.raises(RapidunError, match="does not exist"):
        resolve_model_path(name)


def test_resolve_model_path_offline_uncached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RapidunError, match="HF_HUB_OFFLINE"):
        resolve_model_path("nobody-xyz/not-a-real-model-123")


def test_fingerprint(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}', encoding="utf-8")
    (tmp_path / "model.safetensors").write_bytes(b"0" * 10)
    f1 = fingerprint(str(tmp_path))
    assert f1 == fingerprint(str(tmp_path))
    (tmp_path / "config.json").write_text('{"a": 2}', encoding="utf-8")
    assert fingerprint(str(tmp_path)) != f1
    assert fingerprint("org/model") == fingerprint("org/model") != fingerprint("org/other")


def test_fingerprint_sees_same_size_content_change_and_mtime(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}', encoding="utf-8")
    w = tmp_path / "model.safetensors"
    size = 2 << 20  # 2 MiB: larger than the 16 sampled 64 KiB chunks together
    data = bytearray(b"\x01" * size)
    w.write_bytes(data)
    st = w.stat()
    f1 = fingerprint(str(tmp_path))
    assert fingerprint(str(tmp_path)) == f1  # nothing changed: stable

    def rewrite(b: bytes) -> None:
        w.write_bytes(b)
        os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))  # only the content differs
        assert w.stat().st_size == st.st_size and w.stat().st_mtime_ns == st.st_mtime_ns

    changed = bytearray(data)
    changed[size * 8 // 16 + 100] = 2  # inside the 9th sampled chunk, far from the start
    rewrite(bytes(changed))
    f2 = fingerprint(str(tmp_path))
    assert f2 != f1
    rewrite(bytes(data))  # back to the original bytes (and mtime): the original fingerprint
    assert fingerprint(str(tmp_path)) == f1
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, newer mtime
    assert fingerprint(str(tmp_path)) not in (f1, f2)
    (tmp_path / "rapidun_converted.json").write_text("{}", encoding="utf-8")  # the conversion marker is ignored
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint(str(tmp_path)) == f1


def test_fingerprint_of_non_folder_is_the_hub_id_hash(tmp_path):
    assert fingerprint("org/model") == fingerprint("org/model") == stable_hash({"hub": "org/model"})
    assert fingerprint("org/model") != fingerprint("org/model2")
    f = tmp_path / "weights.bin"  # a file, not a folder: hashed as a name too
    f.write_bytes(b"x")
    assert fingerprint(str(f)) == stable_hash({"hub": str(f)})
    assert fingerprint(str(tmp_path / "missing")) == stable_hash({"hub": str(tmp_path / "missing")})
