"""Hostile torch files: pickles that try to run code, zips that lie about their members.

Each case is a real file built here (with `pickle`, a pickle assembler or a zip writer
that can lie), run through the real CLI in an interpreter where `import torch` fails,
and must be refused with one line, exit 2, nothing written, the source untouched and
its payload never run: every payload tries to create a marker file.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from conftest import CliResult, assert_clean_failure, snapshot, temporaries
from shardkit.errors import BadInputError
from shardkit.format.torch_pickle import load as load_pickle

#: Runs shardkit with torch unimportable: the reader must never need it.
WITHOUT_TORCH = (
    "import runpy, sys\n"
    "sys.modules['torch'] = None\n"
    "sys.argv[0] = 'shardkit'\n"
    "runpy.run_module('shardkit', run_name='__main__', alter_sys=True)\n"
)


def run_without_torch(*args: object) -> CliResult:
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200"})
    return CliResult(done.returncode, done.stdout, done.stderr)


# ---------------------------------------------------------------------- building hostile files


class Gadget:
    """pickle.dumps of this runs `call(*args)` on load (what `__reduce__` is for)."""

    def __init__(self, call: object, args: tuple[object, ...]) -> None:
        self.call, self.args = call, args

    def __reduce__(self):  # noqa: ANN204
        return (self.call, self.args)


class ReduceExGadget:
    """The same through `__reduce_ex__`, which pickle asks first."""

    def __init__(self, call: object, args: tuple[object, ...]) -> None:
        self.call, self.args = call, args

    def __reduce_ex__(self, protocol):  # noqa: ANN001, ANN204
        return (self.call, self.args)


def touch(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def op_str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def op_int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value) if value < 2**31 else b"\x8a\x09" + value.to_bytes(9, "little")


def op_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def tensor_pickle(tensors: dict[str, tuple[str, int, int, tuple[int, ...], tuple[int, ...]]],
                  storage_type: str = "FloatStorage") -> bytes:
    """The data.pkl torch writes, by hand: name -> (storage key, numel, offset, shape, stride)."""
    body = b""
    for name, (key, numel, offset, shape, stride) in tensors.items():
        pid = op_tuple([op_str("storage"), op_global("torch", storage_type), op_str(key), op_str("cpu"), op_int(numel)])
        args = op_tuple([
            pid + b"Q", op_int(offset), op_tuple([op_int(d) for d in shape]), op_tuple([op_int(s) for s in stride]),
            b"\x89", op_global("collections", "OrderedDict") + b")R",
        ])
        body += op_str(name) + op_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"
    return b"\x80\x02}(" + body + b"u."


def zip_file(members: list[tuple[str, bytes]], *, method: int = 0, size_for: dict[str, int] | None = None,
             compressed: bytes | None = None) -> bytes:
    """A zip written field by field, so a test can make it lie (a size, a method)."""
    out, central = b"", b""
    for name, data in members:
        raw_name = name.encode()
        stored = compressed if (compressed is not None and name.endswith("data.pkl")) else data
        declared = (size_for or {}).get(name, len(stored))
        member_method = method if name.endswith("data.pkl") else 0
        crc = zlib.crc32(data)
        local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, member_method, 0, 0, crc, len(stored), len(data),
                            len(raw_name), 0)
        uncompressed = declared if member_method == 0 else len(data)
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, member_method, 0, 0, crc,
                               declared, uncompressed, len(raw_name), 0, 0, 0, 0, 0, len(out)) + raw_name
        out += local + raw_name + stored
    count = len(members)
    return out + central + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, len(central), len(out), 0)


def torch_zip(pkl: bytes, storages: dict[str, bytes] | None = None, **lies: object) -> bytes:
    members = [("archive/data.pkl", pkl), ("archive/byteorder", b"little")]
    members += [(f"archive/data/{k}", v) for k, v in (storages or {}).items()]
    members += [("archive/version", b"3\n")]
    return zip_file(members, **lies)  # type: ignore[arg-type]


def exploit(marker: Path, **kwargs: object) -> bytes:
    return pickle.dumps({"weight": Gadget(os.system, (f"touch {marker}",))}, **kwargs)  # type: ignore[arg-type]


def hidden_behind_memo(marker: Path) -> bytes:
    """'os' and 'system' stored in the memo under an allowed-looking path, fetched back
    and joined by STACK_GLOBAL: the name check must see through the memo."""
    return (b"\x80\x04" + b"\x8c\x0bcollections\x94" + b"\x8c\x02os\x94" + b"\x8c\x06system\x94"
            + b"h\x01h\x02\x93" + b"\x8c" + bytes([len(f"touch {marker}")]) + f"touch {marker}".encode() + b"\x85R.")


def reduce_on_a_string(marker: Path) -> bytes:
    """REDUCE whose callable is a memoized string, not a global: nothing to call."""
    return b"\x80\x02" + op_str(f"touch {marker}") + b"q\x00h\x00\x85R."


def inst(marker: Path) -> bytes:
    return b"\x80\x02(" + op_str(f"touch {marker}") + b"ios\nsystem\n."


def build_gadget(marker: Path) -> bytes:
    """BUILD on a rebuilt tensor (a `__setstate__` gadget)."""
    tensor = tensor_pickle({"w": ("0", 4, 0, (4,), (1,))})[3:-2]  # name, REDUCE without the dict
    return b"\x80\x02" + tensor + b"}" + op_str("__class__") + op_str(touch(marker)) + b"sb."


def storage(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(n % 256)


def good_pickle() -> bytes:
    return tensor_pickle({"w": ("0", 4, 0, (4,), (1,))})


def overlapping_members(marker: Path) -> bytes:
    """data/0 claims to run over the next member's header: the shape of a zip bomb."""
    return torch_zip(exploit(marker), {"0": storage(16), "1": storage(16)}, size_for={"archive/data/0": 100})


def deflate_bomb(marker: Path) -> bytes:
    """A data.pkl that inflates to 100 MB from about 100 kB."""
    huge = b"N0" * (50 * 1024 * 1024)
    return torch_zip(huge, method=8, compressed=zlib.compress(huge, 9)[2:-4])


def never_stops() -> bytes:
    """More opcodes than any state dict needs (NONE, POP for ever), then no STOP."""
    return b"\x80\x02" + b"N0" * 2_000_001


CASES = {
    # pickles that run code
    "os.system-via-REDUCE": (lambda m: torch_zip(exploit(m, protocol=2)), "global posix.system"),
    "STACK_GLOBAL-protocol-4": (lambda m: torch_zip(exploit(m, protocol=4)), "global posix.system"),
    "builtins.eval": (lambda m: torch_zip(pickle.dumps(Gadget(eval, (touch(m),)), protocol=4)), "global builtins.eval"),
    "builtins.exec": (lambda m: torch_zip(pickle.dumps(Gadget(exec, (touch(m),)), protocol=4)), "global builtins.exec"),
    "builtins.eval-protocol-2": (lambda m: torch_zip(pickle.dumps(Gadget(eval, (touch(m),)), protocol=2)),
                                 "global __builtin__.eval"),
    "__reduce_ex__-subprocess": (
        lambda m: torch_zip(pickle.dumps(ReduceExGadget(subprocess.call, (["touch", str(m)],)), protocol=4)),
        "global subprocess.call"),
    "global-behind-memo": (lambda m: torch_zip(hidden_behind_memo(m)), "global os.system"),
    "REDUCE-on-a-memo-string": (lambda m: torch_zip(reduce_on_a_string(m)), "calls a str value (REDUCE)"),
    "torch.load": (lambda m: torch_zip(b"\x80\x02" + op_global("torch", "load") + op_tuple([op_str(str(m))]) + b"R."),
                   "global torch.load"),
    "torch.utils.collect_env.run": (
        lambda m: torch_zip(b"\x80\x02" + op_global("torch.utils.collect_env", "run")
                            + op_tuple([op_str(f"touch {m}")]) + b"R."),
        "global torch.utils.collect_env.run"),
    "INST-opcode": (lambda m: torch_zip(inst(m)), "pickle opcode INST"),
    "OBJ-opcode": (lambda m: torch_zip(b"\x80\x02(" + op_global("os", "system") + op_str(f"touch {m}") + b"o."),
                   "global os.system"),
    "NEWOBJ-opcode": (lambda m: torch_zip(b"\x80\x02" + op_global("collections", "OrderedDict") + b")\x81."),
                      "pickle opcode NEWOBJ"),
    "BUILD-on-a-tensor": (lambda m: torch_zip(build_gadget(m), {"0": storage(16)}), "sets the state of a TensorRef"),
    "unknown-opcode": (lambda m: torch_zip(b"\x80\x02\xff."), "pickle opcode unknown (0xff)"),
    "never-stops": (lambda m: torch_zip(never_stops()), "runs more than 4,000,000 opcodes"),
    "no-STOP": (lambda m: torch_zip(b"\x80\x02}"), "pickle ends before its STOP"),
    "truncated-opcode": (lambda m: torch_zip(b"\x80\x02X\xff\xff\x00\x00ab"), "pickle ends inside an opcode"),
    # zips that lie
    "compressed-member": (lambda m: torch_zip(exploit(m), method=8, compressed=zlib.compress(exploit(m))[2:-4]),
                          "is compressed (method 8)"),
    "deflate-bomb": (lambda m: deflate_bomb(m), "is compressed (method 8)"),
    "overlapping-members": (overlapping_members, "overlap; refused"),
    "member-past-the-end": (lambda m: torch_zip(exploit(m), {"0": storage(16)}, size_for={"archive/data/0": 2**31}),
                            "runs past the zip's data"),
    "not-a-torch-name": (lambda m: zip_file([("archive/data.pkl", exploit(m)), ("archive/../../evil", b"x")]),
                         "is not one torch writes"),
    "storage-smaller-than-tensor": (lambda m: torch_zip(tensor_pickle({"w": ("0", 4, 0, (8,), (1,))}),
                                                        {"0": storage(16)}), "reaches byte 32 of a 16-byte storage"),
    "storage-smaller-than-declared": (lambda m: torch_zip(tensor_pickle({"w": ("0", 100, 0, (4,), (1,))}),
                                                          {"0": storage(16)}), "holds 16 bytes but declares 400"),
    "size-overflows": (lambda m: torch_zip(tensor_pickle({"w": ("0", 4, 0, (2**62, 2**62), (1, 1))}),
                                           {"0": storage(16)}), "overflows 64 bits"),
    "offset-overflows": (lambda m: torch_zip(tensor_pickle({"w": ("0", 4, 2**62, (4,), (1,))}), {"0": storage(16)}),
                         "of a 16-byte storage"),
    "missing-storage": (lambda m: torch_zip(good_pickle()), "storage data/0 is not in the zip"),
    "big-endian": (lambda m: zip_file([("archive/data.pkl", good_pickle()), ("archive/byteorder", b"big"),
                                       ("archive/data/0", storage(16))]), "big-endian"),
    "not-a-state-dict": (lambda m: torch_zip(pickle.dumps([1, 2], protocol=2)), "holds a list, not a state dict"),
    # not a zip at all
    "bare-pickle": (lambda m: exploit(m), "not a zip-based torch checkpoint"),
    "truncated-zip": (lambda m: torch_zip(exploit(m))[:-30], "no end-of-central-directory record"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_torch_file_is_refused_and_never_run(tmp_path: Path, case: str) -> None:
    build, message = CASES[case]
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "source"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(build(marker))
    before = snapshot(tmp_path)
    result = run_without_torch("merge", folder / "pytorch_model.bin", "-o", tmp_path / "out.safetensors")
    assert_clean_failure(result, 2, message)
    assert str(folder / "pytorch_model.bin") in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists() and temporaries(tmp_path) == []
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["os.system-via-REDUCE", "builtins.eval", "__reduce_ex__-subprocess"])
def test_the_payloads_are_real(tmp_path: Path, case: str) -> None:
    """What the refusals above protect from: pickle.loads of the same data.pkl runs it."""
    import zipfile

    marker = tmp_path / "payload-ran"
    path = tmp_path / "model.bin"
    path.write_bytes(CASES[case][0](marker))
    with zipfile.ZipFile(path) as archive:
        pickle.loads(archive.read("archive/data.pkl"))  # noqa: S301 - the point of the test
    assert marker.exists()


def test_the_deflate_bomb_is_refused_without_inflating(tmp_path: Path) -> None:
    from test_hostile import peak_rss_mb_of_cli

    path = tmp_path / "bomb.bin"
    path.write_bytes(deflate_bomb(tmp_path / "marker"))
    assert path.stat().st_size < 2_000_000
    rss, completed = peak_rss_mb_of_cli("inspect", path)
    assert completed.returncode == 2 and "is compressed" in completed.stderr, completed.stderr
    assert rss < 150, f"peak RSS {rss:.0f} MB refusing a zip bomb"


def test_a_legacy_torch_file_is_refused_saying_so(tmp_path: Path) -> None:
    import torch

    torch.save({"w": torch.ones(3)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    result = run_without_torch("inspect", tmp_path / "old.pt")
    assert_clean_failure(result, 2, "legacy pre-1.6 torch.save file")


def test_a_real_torch_file_converts_with_torch_unimportable(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    weight = torch.randn(5, 3)
    torch.save({"w": weight.t(), "b": torch.arange(4, dtype=torch.int64)}, tmp_path / "model.pt")
    result = run_without_torch("merge", tmp_path / "model.pt", "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.stderr
    loaded = load_file(tmp_path / "out.safetensors")
    assert torch.equal(loaded["w"], weight.t()) and torch.equal(loaded["b"], torch.arange(4))


def test_the_pickle_reader_bounds_memory() -> None:
    big = b"\x80\x02B" + struct.pack("<I", 100_000) + bytes(100_000) + b"."
    with pytest.raises(BadInputError, match="builds more than 10,000 bytes"):
        load_pickle(big, "x", max_memory=10_000)
    assert load_pickle(big, "x") == bytes(100_000)
