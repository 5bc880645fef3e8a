"""Framed reads and writes on a libp2p stream: the length-prefixed frames of specs/00-conventions.md.

The adapter moves bytes only; :class:`p2pcompute.core.codec.FrameDecoder` decides what a frame is and
refuses an over-limit length prefix before its body is read. Callers put the timeouts around it.
"""

from __future__ import annotations

from collections import deque

from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF

from p2pcompute.core.codec import MAX_FRAME_SIZE, FrameDecoder, encode_frame

__all__ = ["FramedStream"]

READ_CHUNK = 64 * 1024


class FramedStream:
    """Length-prefixed frames over an ``INetStream`` (reads bounded by the frame limit)."""

    def __init__(self, stream: INetStream, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self.stream = stream
        self._max = max_frame_size
        self._decoder = FrameDecoder(max_frame_size)
        self._ready: deque[bytes] = deque()

    async def send(self, payload: bytes) -> None:
        await self.stream.write(encode_frame(payload, self._max))

    async def receive(self) -> bytes | None:
        """The next frame, or ``None`` at a clean end of stream. Raises ``FramingError`` on a bad one."""
        while not self._ready:
            try:
                data = await self.stream.read(READ_CHUNK)
            except StreamEOF:
                data = b""
            if not data:
                self._decoder.close()  # raises truncated_frame if the stream stopped inside a frame
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()
