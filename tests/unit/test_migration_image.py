"""Migration image and TCP_REPAIR structs: encode/decode, refusal of bad images, packing."""

import io
import struct
import types

import pytest

from testbed.errors import SpecError
from testbed.migration import repair, state
from testbed.migration.state import Image, StateError


def _image(n: int = 3 * state.SLICE + 17) -> Image:
    return Image(tcp={"snd_seq": 1, "local": ["10.1.0.100", 9200]},
                 app={"offset": 12345, "rate_mbit": 2.0},
                 parts={"sendq": b"abc", "recvq": b"", "image": bytes(range(256)) * (n // 256)
                        + b"x" * (n % 256)})


def _reader(blob: bytes):
    f = io.BytesIO(blob)
    return f.readinto


def test_round_trip_whole_and_streamed():
    img = _image()
    blob = img.encode()
    for got in (state.decode(blob), state.read(_reader(blob))):
        assert got.tcp == img.tcp and got.app == img.app
        assert {k: bytes(v) for k, v in got.parts.items()} == img.parts


def test_layout_prefix_and_trailer():
    img = Image({"a": 1}, {"b": 2}, {"image": b"\x01\x02"})
    blob = img.encode()
    magic, hdr_len, body_len = struct.unpack(">8sIQ", blob[:20])
    assert magic == b"TBMIG\x00\x02\x00" and body_len == 2
    assert len(blob) == 20 + hdr_len + 2 + 32
    import hashlib

    assert blob[-32:] == hashlib.sha256(blob[:-32]).digest()


@pytest.mark.parametrize("where", [0, 5, 25, 100, 2 * state.SLICE, -40, -1])
def test_corrupt_byte_refused(where):
    blob = bytearray(_image().encode())
    blob[where] ^= 0x01
    with pytest.raises(StateError):
        state.decode(bytes(blob))
    with pytest.raises(StateError):
        state.read(_reader(bytes(blob)))


@pytest.mark.parametrize("keep", [0, 10, 19, 60, state.SLICE, -33, -1])
def test_truncated_refused(keep):
    blob = _image().encode()
    cut = blob[:keep] if keep >= 0 else blob[:len(blob) + keep]
    with pytest.raises(StateError, match="truncated|magic"):
        state.decode(cut)
    with pytest.raises(StateError, match="truncated|magic"):
        state.read(_reader(cut))


def test_oversized_and_bad_magic_refused():
    blob = _image(100).encode()
    with pytest.raises(StateError, match="oversized"):
        state.decode(blob + b"\0")
    with pytest.raises(StateError, match="oversized"):
        state.read(_reader(blob + b"\0"))
    with pytest.raises(StateError, match="magic"):
        state.decode(b"XXXXXXXX" + blob[8:])


def test_window_struct_packing_golden():
    w = {"snd_wl1": 1, "snd_wnd": 0x10000, "max_window": 0xFFFFFFFF, "rcv_wnd": 65535,
         "rcv_wup": 0x01020304}
    b = repair.pack_window(w)
    assert len(b) == 20  # struct tcp_repair_window: five u32
    assert b == struct.pack("=IIIII", 1, 0x10000, 0xFFFFFFFF, 65535, 0x01020304)
    assert repair.unpack_window(b) == w


def test_repair_options_packing_golden():
    st = repair.TcpState(local=("10.1.0.100", 9200), remote=("10.1.0.1", 40000), snd_seq=5,
                         rcv_seq=6, outq_len=0, unsent_len=0, inq_len=0, mss=1448,
                         snd_wscale=7, rcv_wscale=9, sack=True, timestamps=True, tsval=1,
                         window={k: 0 for k in repair.WINDOW_FIELDS})
    b = repair.pack_options(st)
    assert b == struct.pack("=8I", 2, 1448, 3, 7 | (9 << 16), 4, 0, 8, 0)
    st2 = repair.TcpState.from_dict(st.to_dict())
    assert st2 == st
    st2.sack = st2.timestamps = False
    st2.snd_wscale = st2.rcv_wscale = 0
    assert repair.pack_options(st2) == struct.pack("=II", 2, 1448)


def test_restore_checks_queue_lengths():
    st = repair.TcpState(local=("10.1.0.100", 9200), remote=("10.1.0.1", 40000), snd_seq=5,
                         rcv_seq=6, outq_len=3, unsent_len=0, inq_len=0, mss=1448,
                         snd_wscale=0, rcv_wscale=0, sack=False, timestamps=False, tsval=0,
                         window={k: 0 for k in repair.WINDOW_FIELDS})
    with pytest.raises(repair.RepairError):
        repair.restore(st, b"ab", b"")


def test_bad_parameters_refused_before_anything():
    from testbed.migration.controller import MigrationController
    from topologies import gmpls_dr

    for kw in ({"image_mb": 0}, {"rate_mbit": -1}, {"buffer_s": "30"}, {"burst_s": -1}):
        with pytest.raises(SpecError):
            MigrationController(None, gmpls_dr, **kw)
    with pytest.raises(SpecError, match="lacks SERVICE_MAC"):
        MigrationController(None, types.SimpleNamespace(SERVICE_IP="10.1.0.100/24"))
    with pytest.raises(SpecError, match="public_mbit"):
        gmpls_dr.build(public_mbit=0)


def test_streamer_cli_refuses_bad_sizes(tmp_path):
    from testbed.migration import streamer

    assert streamer.main(["serve", "--port", "1", "--image-mb", "0", "--ctl",
                          str(tmp_path / "c"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "c").exists()


def test_images_back_to_back_on_one_stream():
    a, b = _image(100), Image({}, {"kind": "final"}, {"data": b"z" * 4096})
    r = _reader(a.encode() + b.encode())
    assert state.read(r, eof=False).app == a.app
    got = state.read(r)  # the last one: EOF must follow
    assert got.app == {"kind": "final"} and bytes(got.parts["data"]) == b"z" * 4096
    with pytest.raises(StateError, match="oversized"):
        state.read(_reader(a.encode() + b.encode()))
