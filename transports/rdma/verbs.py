"""The RDMA I/O shell: pyverbs resources around the sans-I/O ``ChannelCore``.

Per connection: device context, PD, a completion channel + one CQ, an RC QP, and the
MRs of ``plan.registration_plan`` (recv buffers: LOCAL_WRITE; send slots; optionally the
app's ring mapping). Setup runs over a TCP side channel (``setup.RdmaSetup``) that stays
open for GOAWAY and to notice a dead peer.

Completions: pyverbs does not expose the completion channel's fd, so it is found as the
one ``anon_inode:[infinibandevent]`` fd that creating the channel added to
/proc/self/fd (the daemon is single-threaded; anything else is refused with a clear
error). It is made non-blocking and given to the loop's ``add_reader``; on a wake-up we
ack the event, poll the CQ until empty, re-arm (``req_notify``) and poll once more, so a
completion that lands between the last poll and the re-arm is not missed.

Untested here (no RDMA device on the development machine): see docs/RDMA.md.
pyverbs is imported on first use only.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Literal

from mrpcd.marshal.records import GOAWAY, FrameDecoder, RecordError
from mrpcd.transports.handshake import DONE, FAILED, HandshakeError, copy_services, make_goaway, parse_goaway

from .channel import ChannelCore, ProtocolError
from .drain import DrainWaiters
from .plan import ACCESS_LOCAL_WRITE, plan_message, registration_plan
from .setup import ConnParams, RdmaSetup

__all__ = ["RdmaConfig", "RdmaPeerConnection", "PeerGoaway", "connect", "serve", "load_pyverbs"]

log = logging.getLogger("mrpcd.transports.rdma")
DEFAULT_MAX_RECORD = 16 << 20
CLOSE_TIMEOUT = 5.0
SEND_WR_BASE = 1 << 32  # wr_id >= this: send slot (wr_id - base); below: receive buffer index
MTU_ENUM = {256: 1, 512: 2, 1024: 3, 2048: 4, 4096: 5}


class PeerGoaway(ConnectionError):
    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


@dataclass(frozen=True)
class RdmaConfig:
    device: str | None = None   # None: the first device
    port: int = 1
    gid_index: int = 0
    recv_buffers: int = 64
    buf_size: int = 8192
    send_slots: int = 64
    max_inline: int = 128
    max_sge: int = 4


def load_pyverbs() -> Any:
    """Import the pyverbs modules we use; ImportError says how to install them."""
    try:
        import pyverbs.addr as addr
        import pyverbs.cq as cq
        import pyverbs.device as device
        import pyverbs.enums as e
        import pyverbs.mr as mr
        import pyverbs.pd as pd
        import pyverbs.qp as qp
        import pyverbs.wr as wr
    except Exception as exc:
        raise ImportError(f"transport: rdma needs pyverbs ({exc}); see docs/RDMA.md, 'Installing pyverbs'") from exc
    ns = type("pyverbs", (), {})()
    for name, mod in dict(addr=addr, cq=cq, device=device, e=e, mr=mr, pd=pd, qp=qp, wr=wr).items():
        setattr(ns, name, mod)
    assert e.IBV_ACCESS_LOCAL_WRITE == ACCESS_LOCAL_WRITE, "pyverbs access flags differ from plan.py's"
    return ns


def gid_to_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def gid_to_str(raw: bytes) -> str:
    h = raw.hex()
    return ":".join(h[i:i + 4] for i in range(0, 32, 4))


def _fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


class _Verbs:
    """The pyverbs objects of one connection, up to INIT with receives posted."""

    def __init__(self, cfg: RdmaConfig, ring: Any = None) -> None:
        pv = self.pv = load_pyverbs()
        e = pv.e
        self.cfg = cfg
        name = cfg.device
        if name is None:
            devs = pv.device.get_device_list()
            if not devs:
                raise ConnectionError("no RDMA device found (see docs/RDMA.md)")
            name = devs[0].name.decode() if isinstance(devs[0].name, bytes) else devs[0].name
        self.ctx = pv.device.Context(name=name)
        dattr = self.ctx.query_device()
        pattr = self.ctx.query_port(cfg.port)
        self.gid = gid_to_bytes(self.ctx.query_gid(cfg.port, cfg.gid_index).gid)
        self.lid = pattr.lid
        self.mtu = {v: k for k, v in MTU_ENUM.items()}.get(int(pattr.active_mtu), 1024)
        self.max_msg = int(pattr.max_msg_sz)
        self.max_sge = max(1, min(cfg.max_sge, dattr.max_sge))
        self.pd = pv.pd.PD(self.ctx)
        before = _fds()
        self.channel = pv.cq.CompChannel(self.ctx)
        new = [fd for fd in _fds() - before if "infinibandevent" in os.readlink(f"/proc/self/fd/{fd}")]
        if len(new) != 1:
            raise ConnectionError(f"cannot find the completion channel's fd (candidates {new})")
        self.fd = new[0]
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        depth = cfg.recv_buffers + cfg.send_slots
        self.cq = pv.cq.CQ(self.ctx, depth, None, self.channel, 0)
        self.cq.req_notify()
        self.mrs: dict[str, Any] = {}
        for region in registration_plan(recv_buffers=cfg.recv_buffers, buf_size=cfg.buf_size,
                                        send_slots=cfg.send_slots, ring_size=len(ring) if ring is not None else None):
            if region.name == "ring":
                import ctypes
                addr = ctypes.addressof(ctypes.c_char.from_buffer(ring))
                self.mrs["ring"] = pv.mr.MR(self.pd, region.length, region.access, address=addr)
                self.ring = ring
            else:
                self.mrs[region.name] = pv.mr.MR(self.pd, region.length, region.access)
        cap = pv.qp.QPCap(max_send_wr=cfg.send_slots, max_recv_wr=cfg.recv_buffers,
                          max_send_sge=self.max_sge, max_recv_sge=1, max_inline_data=cfg.max_inline)
        init = pv.qp.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap, sq_sig_all=0)
        attr = pv.qp.QPAttr(qp_state=e.IBV_QPS_INIT)
        attr.qp_access_flags = ACCESS_LOCAL_WRITE  # peers get no remote access
        attr.port_num = cfg.port
        self.qp = pv.qp.QP(self.pd, init, attr)
        self.max_inline = init.cap.max_inline_data if hasattr(init, "cap") else cfg.max_inline
        self.psn = random.getrandbits(24)
        for i in range(cfg.recv_buffers):
            self.post_recv(i)

    def params(self) -> ConnParams:
        return ConnParams(self.qp.qp_num, self.psn, self.gid, self.lid, self.mtu,
                          self.cfg.recv_buffers, self.cfg.buf_size, self.max_msg)

    def post_recv(self, i: int) -> None:
        pv, recv = self.pv, self.mrs["recv"]
        sge = pv.wr.SGE(recv.buf + i * self.cfg.buf_size, self.cfg.buf_size, recv.lkey)
        self.qp.post_recv(pv.wr.RecvWR(wr_id=i, num_sge=1, sg=[sge]))

    def to_rts(self, peer: ConnParams) -> None:
        pv, e, cfg = self.pv, self.pv.e, self.cfg
        attr = pv.qp.QPAttr(qp_state=e.IBV_QPS_RTR)
        attr.path_mtu = MTU_ENUM[min(self.mtu, peer.mtu)]
        attr.dest_qp_num = peer.qpn
        attr.rq_psn = peer.psn
        attr.max_dest_rd_atomic = 1
        attr.min_rnr_timer = 12
        gr = pv.addr.GlobalRoute(dgid=pv.addr.GID(gid_to_str(peer.gid)), sgid_index=cfg.gid_index)
        attr.ah_attr = pv.addr.AHAttr(gr=gr, is_global=1, dlid=peer.lid, port_num=cfg.port)
        self.qp.to_rtr(attr)
        attr.sq_psn = self.psn
        attr.timeout = 14
        attr.retry_cnt = 7
        attr.rnr_retry = 7
        attr.max_rd_atomic = 1
        self.qp.to_rts(attr)

    def close(self) -> None:
        for obj in [self.qp, *self.mrs.values(), self.cq, self.channel, self.pd, self.ctx]:
            try:
                obj.close()
            except Exception:
                pass


class RdmaPeerConnection:
    """One daemon-to-daemon RDMA connection; the public surface of tcp.PeerConnection."""

    def __init__(self, role: str, verbs: _Verbs, peer_params: ConnParams, peer_hello: dict,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_record: int) -> None:
        self.role = role
        self.peer_hello = peer_hello
        self.peer = _peername(writer)
        self.closed = False
        self.established = True
        self._v = verbs
        self._reader, self._writer = reader, writer
        cfg = verbs.cfg
        self.core = ChannelCore(recv_buffers=cfg.recv_buffers, peer_recv_buffers=peer_params.recv_buffers,
                                peer_buf_size=min(peer_params.buf_size, cfg.buf_size),
                                max_msg=min(verbs.max_msg, peer_params.max_msg), max_sge=verbs.max_sge,
                                max_inline=verbs.max_inline, max_record=max_record)
        self._free_slots = list(range(cfg.send_slots))
        self._on_records: Callable | None = None
        self._on_close: Callable | None = None
        self._held: list = []
        self._paused = False
        self._close_exc: BaseException | None = None
        self._finished = False
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(verbs.fd, self._on_cq_event)
        self._side_task = self._loop.create_task(self._watch_side_channel())
        self._close_timer: asyncio.TimerHandle | None = None
        self._drainers = DrainWaiters()

    def __repr__(self) -> str:
        return f"<RdmaPeerConnection {self.role} peer={self.peer} {'closed' if self.closed else 'open'}>"

    # ------------------------------------------------------------------ public API
    def send(self, record: Any) -> None:
        if self.closed:
            raise ConnectionError(f"connection to {self.peer} is closed")
        self.core.send_records([record])
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._pump)

    def send_batch(self, records: list, count: int = -1, nbytes: int = -1) -> None:
        """As PeerConnection.send_batch (the session passes how many records the buffers
        hold and their total length; the channel counts for itself)."""
        if self.closed:
            raise ConnectionError(f"connection to {self.peer} is closed")
        self.core.send_records(records)
        self._pump()

    def flush(self) -> None:
        self._pump()

    def write_backlog(self) -> int:
        """Bytes queued for the peer and not yet posted (waiting for credits or send slots)."""
        return int(self.core.queued_bytes)

    def set_handlers(self, on_records: Callable, on_close: Callable) -> None:
        self._on_records, self._on_close = on_records, on_close
        if self._held and not self._paused:
            held, self._held = self._held, []
            on_records(held)
        if self._finished:
            self._report_close()

    def pause_reading(self) -> None:
        self._paused = True
        self.core.hold_credits(True)  # the peer runs out of credits and stops

    def resume_reading(self) -> None:
        self._paused = False
        self.core.hold_credits(False)
        if self._held and self._on_records is not None:
            held, self._held = self._held, []
            self._on_records(held)
        self._pump()

    def drain(self) -> "asyncio.Future[None]":
        """Completes once the bytes queued for the peer (waiting for its credits) are down
        to the low-water mark; fails if the connection ends first."""
        if self.closed and not self._finished:
            self._drainers.fail(f"connection to {self.peer} is closed")
        return self._drainers.park(self._loop.create_future(), int(self.core.queued_bytes))

    def close(self, reason: str | None = None) -> None:
        """Stop accepting sends; finish queued ones (≤ CLOSE_TIMEOUT s), GOAWAY, tear down."""
        if self.closed:
            return
        self.closed = True
        self._goaway: str | Literal[False] | None = reason  # False (_fail): no GOAWAY at all
        self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self._finish, None)
        self._maybe_finish()

    def abort(self) -> None:
        self.closed = True
        self._finish(None)

    def stats(self) -> dict:
        c = self.core
        return {"records_in": c.records_in, "records_out": c.records_out, "messages_in": c.messages_in,
                "messages_out": c.messages_out, "queued_bytes": c.queued_bytes,
                "send_credits": c.credits.send_credits}

    # ------------------------------------------------------------------ internals
    def _pump(self) -> None:
        self._flush_scheduled = False
        if self._finished or self.core.error is not None:
            return
        v, pv = self._v, self._v.pv
        e = pv.e
        slot_size = v.cfg.buf_size
        try:
            for msg in self.core.poll(len(self._free_slots)):
                slot = self._free_slots.pop()
                base = slot * slot_size
                sges, copies = plan_message(base, msg.segments, slot_size=slot_size,
                                            max_sge=v.max_sge, max_msg=self.core.msg_limit)
                send_mr = v.mrs["send"]
                send_mr.write(msg.header, len(msg.header), base)
                for off, seg in copies:
                    data = bytes(seg.view())
                    send_mr.write(data, len(data), off)
                sg = [pv.wr.SGE(v.mrs[s.region].buf + s.offset, s.length, v.mrs[s.region].lkey) for s in sges]
                flags = e.IBV_SEND_SIGNALED | (e.IBV_SEND_INLINE if msg.inline else 0)
                v.qp.post_send(pv.wr.SendWR(wr_id=SEND_WR_BASE + slot, opcode=e.IBV_WR_SEND,
                                            num_sge=len(sg), sg=sg, send_flags=flags))
        except Exception as exc:
            self._fail(ConnectionError(f"RDMA send to {self.peer} failed: {exc}"))
            return
        self._drainers.update(int(self.core.queued_bytes))

    def _on_cq_event(self) -> None:
        v = self._v
        try:
            v.channel.get_cq_event(v.cq)
            v.cq.ack_events(1)
        except Exception:
            pass  # spurious wake-up (non-blocking fd): poll anyway
        try:
            self._poll_cq()
            v.cq.req_notify()
            self._poll_cq()  # a completion between the last poll and the re-arm
        except ProtocolError as exc:
            if exc.records:
                self._deliver(exc.records)
            self._fail(exc, goaway=str(exc))
            return
        except Exception as exc:
            self._fail(ConnectionError(f"RDMA completion handling for {self.peer} failed: {exc}"))
            return
        self._pump()
        self._maybe_finish()

    def _poll_cq(self) -> None:
        v, e = self._v, self._v.pv.e
        while not self._finished:
            n, wcs = v.cq.poll(num_entries=32)
            if n <= 0:
                return
            batch: list = []
            for wc in wcs[:n]:
                if wc.status != e.IBV_WC_SUCCESS:
                    raise ConnectionError(f"work completion error {wc.status} (vendor {wc.vendor_err})")
                if wc.wr_id >= SEND_WR_BASE:
                    self._free_slots.append(wc.wr_id - SEND_WR_BASE)
                    continue
                i = wc.wr_id
                data = v.mrs["recv"].read(wc.byte_len, i * v.cfg.buf_size)
                try:
                    batch += self.core.on_message(data)
                except ProtocolError as exc:
                    exc.records = batch + exc.records
                    raise
                v.post_recv(i)
                self.core.reposted()
            if batch:
                self._deliver(batch)

    def _deliver(self, records: list) -> None:
        if self._paused or self._on_records is None:
            self._held.extend(records)
            return
        try:
            self._on_records(records)
        except Exception:
            log.exception("on_records handler failed")

    async def _watch_side_channel(self) -> None:
        dec = FrameDecoder()
        try:
            while True:
                data = await self._reader.read(4096)
                if not data:
                    self._fail(ConnectionError(f"control connection to {self.peer} closed without GOAWAY"))
                    return
                for rec in dec.feed(data):
                    if rec.kind == GOAWAY:
                        details = parse_goaway(rec)
                        msg = f"peer {self.peer} closed the connection" + (f": {details}" if details else "")
                        self._fail(PeerGoaway(msg, details), goaway=None, send=False)
                        return
        except asyncio.CancelledError:
            raise
        except (RecordError, OSError) as exc:
            self._fail(ConnectionError(f"control connection to {self.peer} failed: {exc}"))

    def _fail(self, exc: BaseException, goaway: str | None = None, send: bool = True) -> None:
        if self._finished:
            return
        self.closed = True
        self._close_exc = exc
        self._goaway = goaway if send else False
        self._finish(None)

    def _maybe_finish(self) -> None:
        if self.closed and not self._finished and not self.core.queued_bytes \
                and len(self._free_slots) == self._v.cfg.send_slots:
            self._finish(None)

    def _finish(self, _: Any) -> None:
        if self._finished:
            return
        self._finished = True
        self._drainers.fail(f"connection to {self.peer} lost")
        if self._close_timer is not None:
            self._close_timer.cancel()
        try:
            self._loop.remove_reader(self._v.fd)
        except Exception:
            pass
        if getattr(self, "_goaway", None) is not False:
            try:
                self._writer.write(make_goaway(getattr(self, "_goaway", None)))
            except Exception:
                pass
        self._writer.close()
        if self._side_task is not asyncio.current_task():
            self._side_task.cancel()
        self._v.close()
        self._report_close()

    def _report_close(self) -> None:
        cb, self._on_close = self._on_close, None
        if cb is not None:
            try:
                cb(self._close_exc)
            except Exception:
                log.exception("on_close handler failed")


def _peername(writer: asyncio.StreamWriter) -> str:
    addr = writer.get_extra_info("peername")
    if isinstance(addr, tuple):
        host = str(addr[0])
        return (f"[{host}]" if ":" in host else host) + f":{addr[1]}"
    return "?"


async def _read_records(reader: asyncio.StreamReader, dec: FrameDecoder, pending: list[Any]) -> Any:
    while not pending:
        data = await reader.read(4096)
        if not data:
            raise ConnectionError("control connection closed during the RDMA setup")
        pending.extend(dec.feed(data))
    return pending.pop(0)


async def _run_setup(role: str, services: dict[str, str], reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, cfg: RdmaConfig, ring: Any) -> tuple[_Verbs, ConnParams, dict]:
    """The QP in RTS, the peer's parameters and its HELLO."""
    st = RdmaSetup(role, services)
    dec = FrameDecoder()
    pending: list[Any] = []
    verbs = _Verbs(cfg, ring) if role == "client" else None
    try:
        writer.writelines(st.start(verbs.params() if verbs else None))
        while st.state not in (DONE, FAILED):
            writer.writelines(st.receive(await _read_records(reader, dec, pending)))
            if st.need_local:
                verbs = _Verbs(cfg, ring)
                assert st.peer_params is not None  # need_local: the client's parameters came
                verbs.to_rts(st.peer_params)
                writer.writelines(st.local_ready(verbs.params()))
            elif role == "client" and st.peer_params is not None and st.state != FAILED:
                assert verbs is not None  # the client made its QP before its HELLO
                verbs.to_rts(st.peer_params)
                writer.writelines(st.client_rts())
        await writer.drain()
        if st.state == FAILED:
            raise st.error or HandshakeError("RDMA setup failed")
        # DONE: the client made its QP at start, the server at need_local; both have the peer's
        # parameters (before its READY / our RTS) and its HELLO (the first step)
        assert verbs is not None and st.peer_params is not None and st.peer_hello is not None
        return verbs, st.peer_params, st.peer_hello
    except BaseException as exc:
        if verbs is not None:
            verbs.close()
        if st.state not in (DONE, FAILED) and not isinstance(exc, asyncio.CancelledError):
            try:
                writer.writelines(st.fail(f"RDMA setup failed: {exc}"))
            except Exception:
                pass
        raise


async def connect(host: str, port: int, services: dict[str, str], *, max_record: int = DEFAULT_MAX_RECORD,
                  timeout: float = 5.0, config: RdmaConfig | None = None, ring: Any = None) -> RdmaPeerConnection:
    """Like tcp.connect: TCP side channel to host:port, handshake + RDMA setup, RC QP in RTS."""
    cfg = config or RdmaConfig()
    where = f"{host}:{port}"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        raise ConnectionError(f"cannot connect to mrpcd at {where}: TCP connect timed out after {timeout:g} s") from None
    except OSError as exc:
        raise ConnectionError(f"cannot connect to mrpcd at {where}: {exc.strerror or exc}") from exc
    try:
        verbs, peer_params, peer_hello = await asyncio.wait_for(_run_setup("client", copy_services(services), reader, writer, cfg, ring), timeout)
    except asyncio.TimeoutError:
        writer.close()
        raise ConnectionError(f"cannot connect to mrpcd at {where}: no RDMA setup within {timeout:g} s") from None
    except HandshakeError as exc:
        writer.close()
        raise HandshakeError(f"mrpcd at {where} refused the connection: {exc}" if getattr(exc, "remote", False)
                             else f"RDMA setup with mrpcd at {where} failed: {exc}") from None
    except Exception as exc:
        writer.close()
        raise ConnectionError(f"cannot connect to mrpcd at {where} over RDMA: {exc}") from exc
    return RdmaPeerConnection("client", verbs, peer_params, peer_hello, reader, writer, max_record)


async def serve(host: str, port: int, services_for: Callable[[], dict[str, str]],
                on_connection: Callable[[RdmaPeerConnection], None], *, max_record: int = DEFAULT_MAX_RECORD,
                handshake_timeout: float = 10.0, on_handshake_error: Callable[[str, Exception], None] | None = None,
                config: RdmaConfig | None = None, ring: Any = None,
                admit: Callable[[Any], str | None] | None = None) -> asyncio.AbstractServer:
    """Like tcp.serve: the TCP listener is the side channel; each accepted peer gets an RC QP.
    ``admit`` as in tcp.serve: a refused peer's side channel is closed before any setup."""
    cfg = config or RdmaConfig()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if admit is not None and admit(writer.transport) is not None:
            writer.close()
            return
        peer = _peername(writer)
        try:
            verbs, peer_params, peer_hello = await asyncio.wait_for(
                _run_setup("server", services_for(), reader, writer, cfg, ring), handshake_timeout)
        except Exception as exc:
            log.warning("RDMA setup with %s failed: %s", peer, exc)
            writer.close()
            if on_handshake_error is not None:
                try:
                    on_handshake_error(peer, exc)
                except Exception:
                    log.exception("on_handshake_error callback failed")
            return
        on_connection(RdmaPeerConnection("server", verbs, peer_params, peer_hello, reader, writer, max_record))

    return await asyncio.start_server(handle, host, port, reuse_address=True)
