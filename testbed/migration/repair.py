"""TCP_REPAIR: dump a live TCP connection's state and rebuild it in another namespace.

The kernel's repair mode (what CRIU uses) lets a process read and write a connection's
innards: sequence numbers of both queues, the queues' bytes, the negotiated options and the
window. A socket in repair mode sends nothing: closing it sends neither FIN nor RST, and a
socket built in repair mode connects without a SYN. Python's socket module lacks the names,
so the numbers are declared here (include/uapi/linux/tcp.h).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import asdict, dataclass

from testbed.kernel.sockq import (receive_queue_bytes, send_queue_bytes,  # noqa: F401
                                  unsent_bytes)

SOL_TCP = socket.IPPROTO_TCP
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_REPAIR_ON, TCP_REPAIR_OFF = 1, 0
TCP_RECV_QUEUE, TCP_SEND_QUEUE = 1, 2
IP_FREEBIND = 15
# tcp_repair_opt codes (TCPOPT_*) and tcp_info option bits (TCPI_OPT_*)
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4

# struct tcp_repair_window { u32 snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup; }
WINDOW = struct.Struct("=5I")
WINDOW_FIELDS = ("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup")
OPT = struct.Struct("=II")  # struct tcp_repair_opt { u32 opt_code, opt_val; }


class RepairError(OSError):
    pass


@dataclass
class TcpState:
    """Everything needed to rebuild one established connection (no payload bytes)."""
    local: tuple  # (ip, port)
    remote: tuple
    snd_seq: int  # write_seq: the sequence number after the last byte in the send queue
    rcv_seq: int  # rcv_nxt: after the last byte in the receive queue
    outq_len: int  # bytes in the send queue (sent-unacked + unsent)
    unsent_len: int  # of which not yet sent
    inq_len: int  # bytes received and not read by the application
    mss: int
    snd_wscale: int
    rcv_wscale: int
    sack: bool
    timestamps: bool
    tsval: int
    window: dict  # WINDOW_FIELDS -> int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["local"], d["remote"] = list(self.local), list(self.remote)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TcpState":
        d = dict(d)
        d["local"], d["remote"] = tuple(d["local"]), tuple(d["remote"])
        return cls(**d)


def pack_window(w: dict) -> bytes:
    return WINDOW.pack(*(int(w[k]) & 0xFFFFFFFF for k in WINDOW_FIELDS))


def unpack_window(b: bytes) -> dict:
    return dict(zip(WINDOW_FIELDS, WINDOW.unpack(b)))


def pack_options(st: TcpState) -> bytes:
    """The tcp_repair_opt array for TCP_REPAIR_OPTIONS (as CRIU builds it)."""
    opts = [(TCPOPT_MSS, st.mss)]
    if st.snd_wscale or st.rcv_wscale:
        opts.append((TCPOPT_WINDOW, st.snd_wscale | (st.rcv_wscale << 16)))
    if st.sack:
        opts.append((TCPOPT_SACK_PERM, 0))
    if st.timestamps:
        opts.append((TCPOPT_TIMESTAMP, 0))
    return b"".join(OPT.pack(c, v) for c, v in opts)


def _u32(sock: socket.socket, opt: int) -> int:
    return struct.unpack("=I", sock.getsockopt(SOL_TCP, opt, 4))[0]


def repair(sock: socket.socket, on: bool) -> None:
    sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON if on else TCP_REPAIR_OFF)


def _peek(sock: socket.socket, n: int) -> bytes:
    if n <= 0:
        return b""
    data = sock.recv(n, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    if len(data) != n:
        raise RepairError(f"queue peek returned {len(data)} of {n} bytes")
    return data


def dump(sock: socket.socket) -> tuple:
    """Put sock in repair mode (it stays there: it will send nothing more) and return
    (TcpState, send queue bytes, receive queue bytes)."""
    outq, unsent, inq = send_queue_bytes(sock), unsent_bytes(sock), receive_queue_bytes(sock)
    info = sock.getsockopt(SOL_TCP, socket.TCP_INFO, 8)
    options, wscale = info[5], info[6]
    mss = sock.getsockopt(SOL_TCP, socket.TCP_MAXSEG)
    repair(sock, True)
    try:
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        snd_seq = _u32(sock, TCP_QUEUE_SEQ)
        sendq = _peek(sock, outq)
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        rcv_seq = _u32(sock, TCP_QUEUE_SEQ)
        recvq = _peek(sock, inq)
        window = unpack_window(sock.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, WINDOW.size))
        tsval = _u32(sock, TCP_TIMESTAMP)
        st = TcpState(local=sock.getsockname(), remote=sock.getpeername(), snd_seq=snd_seq,
                      rcv_seq=rcv_seq, outq_len=outq, unsent_len=unsent, inq_len=inq, mss=mss,
                      snd_wscale=wscale & 0xF, rcv_wscale=wscale >> 4,
                      sack=bool(options & TCPI_OPT_SACK),
                      timestamps=bool(options & TCPI_OPT_TIMESTAMPS), tsval=tsval,
                      window=window)
    except BaseException:
        repair(sock, False)
        raise
    return st, sendq, recvq


def restore(st: TcpState, sendq: bytes, recvq: bytes) -> socket.socket:
    """Build the connection st describes in this thread's namespace and leave repair mode.

    The local address need not be configured yet (IP_FREEBIND), but it must be by the time
    the peer's packets arrive. No SYN is sent; leaving repair mode sends one window probe."""
    if len(sendq) != st.outq_len or len(recvq) != st.inq_len:
        raise RepairError("queue lengths do not match the dumped state")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        repair(s, True)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sent_part = st.outq_len - st.unsent_len
        # restoring a queue by writing it advances its sequence number: start before it
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ,
                     struct.pack("=I", (st.snd_seq - st.unsent_len - sent_part) & 0xFFFFFFFF))
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ,
                     struct.pack("=I", (st.rcv_seq - st.inq_len) & 0xFFFFFFFF))
        s.bind(tuple(st.local))
        s.connect(tuple(st.remote))  # repair mode: straight to ESTABLISHED, no SYN
        s.setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, pack_options(st))
        if st.timestamps:
            s.setsockopt(SOL_TCP, TCP_TIMESTAMP, struct.pack("=I", st.tsval & 0xFFFFFFFF))
        if recvq:
            s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            s.sendall(recvq)
        if sent_part:
            s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            s.sendall(sendq[:sent_part])
        s.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, pack_window(st.window))
        repair(s, False)
        if st.unsent_len:
            s.sendall(sendq[sent_part:])
    except BaseException:
        s.close()
        raise
    return s
