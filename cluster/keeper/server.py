"""The keeper's data port: store chunks (forwarding them down the pipeline) and serve them.

A `PutChunk` is checked against its block checksums, then written locally while it is sent on
to the next keeper of the placement, concurrently. The reply lists every keeper whose copy is
durable, so the writer learns exactly which copies exist; a failed downstream keeper is listed
as failed rather than failing the whole write.
"""

from __future__ import annotations

import dataclasses
import logging

import trio

from cluster import messages as m
from cluster.auth import Credentials
from cluster.errors import DfsError, InvalidArgument
from cluster.keeper.chunkstore import ChunkStore, check_ids
from cluster.protocol import PAYLOADS, SLOWEST_TRANSFER_BYTES_PER_S, Payload
from cluster.rpc import ConnectionPool

log = logging.getLogger(__name__)

# A forward to the next keeper of a chain fails after io_timeout_s per keeper left in the chain
# plus the time to send the bytes at the slowest allowed rate: a keeper cut off (silent, not
# refusing) is reported as failed while the writer still waits, so the writer blames it.


class KeeperServer:
    def __init__(
        self,
        store: ChunkStore,
        credentials: Credentials,
        addr: str = "",
        *,
        io_timeout_s: float = 10.0,
    ) -> None:
        self.store = store
        self.io_timeout_s = io_timeout_s
        self.credentials = credentials
        self.addr = addr  # set once the listening port is known
        self.peers = ConnectionPool("keeper", credentials)
        # Chunks stored or deleted since the last heartbeat (the heartbeat task drains these).
        self.added: list[list[int]] = []
        self.removed: list[list[int]] = []

    async def handle(
        self, msg: m.Message, payload: bytearray, peer: str
    ) -> tuple[m.Message, Payload]:
        if isinstance(msg, m.PutChunk | m.PatchChunk):
            reply = await self.put_chunk(msg, payload)
            PAYLOADS.give(payload)  # stored and forwarded: no view of it is left
            return reply, b""
        if isinstance(msg, m.ReadChunk):
            return await self.read_chunk(msg)
        if isinstance(msg, m.SyncChunks):
            await self.store.sync(_pairs(msg.chunks))
            return m.OkReply(), b""
        raise InvalidArgument(f"a keeper does not serve {type(msg).__name__}")

    async def put_chunk(self, msg: m.PutChunk | m.PatchChunk, data: bytearray) -> m.PutChunkReply:
        """Store a whole chunk or a patch here while sending it down the rest of the chain."""
        check_ids(msg.chunk_id, msg.version)
        downstream: list[m.PutChunkReply] = []

        async def forward() -> None:
            try:
                sending = len(data) / SLOWEST_TRANSFER_BYTES_PER_S
                with trio.fail_after(self.io_timeout_s * len(msg.forward) + sending):
                    reply, _ = await self.peers.call(
                        msg.forward[0],
                        dataclasses.replace(msg, forward=msg.forward[1:]),
                        m.PutChunkReply,
                        data,
                    )
                downstream.append(reply)
            except (DfsError, trio.TooSlowError) as exc:
                log.warning(
                    "forwarding chunk %d to %s failed: %s",
                    msg.chunk_id,
                    msg.forward[0],
                    exc or "timeout",
                )
                self.peers.drop(msg.forward[0])
                downstream.append(m.PutChunkReply(stored=[], failed=list(msg.forward)))

        local_error: DfsError | None = None
        async with trio.open_nursery() as nursery:
            if msg.forward:
                nursery.start_soon(forward)
            try:
                if isinstance(msg, m.PatchChunk):
                    await self.store.patch(
                        msg.chunk_id,
                        msg.base_version,
                        msg.version,
                        msg.length_bytes,
                        msg.checksums,
                        msg.blocks,
                        data,
                        sync=msg.sync,
                    )
                else:
                    await self.store.write(
                        msg.chunk_id, msg.version, data, msg.checksums, sync=msg.sync
                    )
            except DfsError as exc:
                local_error = exc  # raised outside the nursery, as itself, not in a group
        if local_error is not None:
            raise local_error
        self.added.append([msg.chunk_id, msg.version])
        stored, failed = [self.addr], []
        for reply in downstream:
            stored += reply.stored
            failed += reply.failed
        return m.PutChunkReply(stored=stored, failed=failed)

    async def read_chunk(self, msg: m.ReadChunk) -> tuple[m.Message, Payload]:
        chunk, region = await self.store.open_read(
            msg.chunk_id, msg.version, msg.offset_bytes, msg.length_bytes
        )
        reply = m.ReadChunkReply(
            length_bytes=chunk.length, first_block=chunk.first_block, checksums=chunk.checksums
        )
        return reply, region  # sent straight from the file, then closed (serve.py)

    async def delete(self, chunk_id: int, version: int) -> None:
        try:
            if await self.store.delete(chunk_id, version):
                self.removed.append([chunk_id, version])
        except (OSError, DfsError) as exc:
            log.warning("deleting chunk %d v%d failed: %s", chunk_id, version, exc)


def _pairs(chunks: list[list[int]]) -> list[tuple[int, int]]:
    """[[chunk_id, version], ...] from the wire, each checked."""
    pairs = []
    for pair in chunks:
        if len(pair) != 2 or not all(isinstance(x, int) for x in pair):
            raise InvalidArgument("chunks must be [chunk_id, version] pairs")
        check_ids(pair[0], pair[1])
        pairs.append((pair[0], pair[1]))
    return pairs
