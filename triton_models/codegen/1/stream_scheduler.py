"""Continuous batching for codegen_stream: one decode thread for every active sequence.

Part of the stand-in code-generation models (see model.py, next to this file).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tests): Stream only
    pb_utils = None


@dataclass
class Stream:
    """One request of codegen_stream being decoded (possibly several prompt rows)."""

    sender: object
    rows: int
    count: int
    h: np.ndarray
    prev: np.ndarray
    pos: int = 0
    prefill_s: float = 0.0  # its uncached prompt bytes, run before its first step


class StreamScheduler:
    """Continuous batching for codegen_stream.

    `execute` hands each request to this scheduler and returns; one thread decodes every
    active sequence together, one step at a time, and sends each its token per step. New
    sequences join at the next step; finished ones leave. `submit` blocks while
    `max_active` sequences are active or waiting, which keeps the rest in Triton's queue.
    """

    def __init__(self, decoder, vocab: tuple[str, ...], max_active: int, logger) -> None:
        self.decoder = decoder
        self.pieces = [piece.encode() for piece in vocab]
        self.max_active = max(1, max_active)
        self.logger = logger
        self.cv = threading.Condition()
        self.pending: list[Stream] = []
        self.active: list[Stream] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self.thread.start()

    def submit(self, sequences: list[Stream]) -> None:
        with self.cv:
            self.pending.extend(sequences)
            self.cv.notify_all()
            while not self.stopping and len(self.active) + len(self.pending) >= self.max_active:
                self.cv.wait()

    def stop(self, drain_seconds: float = 30.0) -> None:
        deadline = time.monotonic() + drain_seconds
        with self.cv:
            while (self.active or self.pending) and time.monotonic() < deadline:
                self.cv.wait(timeout=0.1)
            self.stopping = True
            self.cv.notify_all()
        self.thread.join(timeout=5)
        for seq in self.active + self.pending:
            self._fail(seq, "model is unloading", pb_utils.TritonError.UNAVAILABLE)

    def _fail(self, seq: Stream, message: str, code) -> None:
        try:
            seq.sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        except Exception as e:  # the client may be gone already
            self.logger.log_warn(f"codegen_stream: could not send error: {e}")

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.active and not self.pending:
                    self.cv.wait()
                if self.stopping:
                    return
                joined = self.pending[: self.max_active - len(self.active)]
                del self.pending[: len(joined)]
                self.active.extend(joined)
                batch = list(self.active)
            # The joiners' prefill before their first step; it stalls the running sequences
            # too, as a prefill does on a real server.
            time.sleep(sum(s.prefill_s for s in joined))
            try:
                finished = self._step(batch)
            except Exception as e:
                self.logger.log_error(f"codegen_stream: decode step failed: {e}")
                finished = batch
                for seq in batch:
                    self._fail(seq, f"decode failed: {e}", pb_utils.TritonError.INTERNAL)
            if finished:
                with self.cv:
                    done = {id(s) for s in finished}
                    self.active = [s for s in self.active if id(s) not in done]
                    self.cv.notify_all()

    def _step(self, batch: list[Stream]) -> list[Stream]:
        finished = []
        live = []
        for seq in batch:
            if _cancelled(seq.sender):
                self.logger.log_info(
                    f"codegen_stream: request cancelled after {seq.pos} of {seq.count} tokens"
                )
                self._fail(seq, "request cancelled", pb_utils.TritonError.CANCELLED)
                finished.append(seq)
            else:
                live.append(seq)
        if not live:
            return finished
        h = np.concatenate([s.h for s in live])
        prev = np.concatenate([s.prev for s in live])
        pos = np.concatenate([np.full(s.rows, s.pos) for s in live])
        h, tokens = self.decoder.step(h, prev, pos)
        at = 0
        for seq in live:
            seq.h, seq.prev = h[at : at + seq.rows], tokens[at : at + seq.rows]
            at += seq.rows
            seq.pos += 1
            last = seq.pos >= seq.count
            ids = seq.prev.astype(np.int32).reshape(-1, 1)
            text = np.array([[self.pieces[int(t)]] for t in seq.prev], dtype=np.object_)
            response = pb_utils.InferenceResponse(
                [pb_utils.Tensor("TOKEN_ID", ids), pb_utils.Tensor("TEXT", text)]
            )
            seq.sender.send(
                response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last else 0
            )
            if last:
                finished.append(seq)
        return finished


def _cancelled(sender) -> bool:
    is_cancelled = getattr(sender, "is_cancelled", None)
    try:
        return bool(is_cancelled()) if is_cancelled else False
    except Exception:
        return False
