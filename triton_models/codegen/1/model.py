"""Stand-in code-generation models for Triton's Python backend: `codegen` and `codegen_stream`.

One file serves both models and every version (the other `model.py` files are symlinks to
this one); it branches on the model's transaction policy and on `args["model_version"]`.
The weights are random, so the generated "code" is meaningless. What is real is the shape of
the work: a hidden state per sequence, one D x D matrix read per decode step (memory-bound,
so decoding a batch of 8 costs far less than 8 batches of 1), and an argmax over a small
vocabulary of code-ish tokens. See triton_models/README.md for the interface.

Arithmetic is exact, so outputs are bit-identical whatever the batch they are decoded in
and whatever BLAS kernel runs: activations are integers in [-127, 127], weights integers in
[-wmax, wmax], all stored as float32, and wmax is chosen so that every dot product stays
below 2**24, where float32 represents every integer exactly. The non-linearity is a table
of tanh indexed by the rounded, scaled accumulator (a quantised tanh).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

# The helper modules live next to the real file; the other models' model.py are links to it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefix_cache import DEFAULTS as PREFIX_DEFAULTS
from prefix_cache import CacheMetrics, Prefill, PrefixSettings
from resident_memory import hold_declared
from stream_scheduler import Stream, StreamScheduler

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tests, bench/batching.py): Decoder only
    pb_utils = None

VOCAB = (
    "def ", "return ", "for ", " in ", "if ", "else", "while ", "import ", "class ", "lambda ",
    "(", ")", ":", ",", ".", "[", "]", " = ", " == ", " + ", " - ", " * ", " < ", " > ",
    "\n", "    ", "x", "y", "i", "n", "s", "self", "result", "items", "value", "key",
    "range", "len", "print", "append", "None", "True", "False", "0", "1", "2", "# ", "'",
)  # fmt: skip

H_MAX = 127  # activations are integers in [-H_MAX, H_MAX]
EXACT = 1 << 24  # float32 represents every integer below this exactly
LUT_STEPS = 64  # table entries per unit of the tanh argument
LUT_RANGE = 4  # the table covers tanh(x) for |x| <= LUT_RANGE; beyond it, saturates

DEFAULTS = {
    "tokens": "24",
    "max_tokens": "256",
    "hidden_size": "2048",
    "load_seconds": "0.5",
    "seed": "20240607",
    "max_active": "",  # codegen_stream only; empty: max_batch_size (or 8)
    **PREFIX_DEFAULTS,
}


class RequestError(ValueError):
    """A problem with one request: answered with an error, the rest of the batch goes on."""


class Decoder:
    """The random 'language model' of one model version."""

    def __init__(self, hidden_size: int, max_positions: int, seed: int, version: int) -> None:
        d = hidden_size
        if d < 16:
            raise ValueError(f"hidden_size must be at least 16, got {d}")
        # Largest weight magnitude that keeps every dot product an exact float32 integer.
        wmax = min(31, (EXACT - 1) // (d * H_MAX))
        if wmax < 1:
            raise ValueError(f"hidden_size {d} is too large for exact float32 decoding")
        self.hidden_size = d
        self.max_positions = max_positions
        rng = np.random.default_rng([seed, version])
        self.w = rng.integers(-wmax, wmax + 1, size=(d, d), dtype=np.int16).astype(np.float32)
        self.proj = rng.integers(-wmax, wmax + 1, size=(d, len(VOCAB)), dtype=np.int16).astype(
            np.float32
        )
        # Token and position embeddings, added in units of the tanh argument.
        self.tok_emb = (rng.standard_normal((len(VOCAB) + 1, d)) * 0.5).astype(np.float32)
        self.pos_emb = (rng.standard_normal((max_positions, d)) * 0.25).astype(np.float32)
        # Scale the accumulator so that its typical size maps to |x| around 1.5.
        w_std = float(np.sqrt(wmax * (wmax + 1) / 3.0))
        acc_std = np.sqrt(d) * 0.75 * H_MAX * w_std
        self.acc_scale = np.float32(1.5 / acc_std)
        idx = np.arange(-LUT_RANGE * LUT_STEPS, LUT_RANGE * LUT_STEPS + 1)
        self.lut = np.rint(H_MAX * np.tanh(idx / LUT_STEPS)).astype(np.float32)
        self.bos = len(VOCAB)  # the extra token embedding row: "start of sequence"

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.w, self.proj, self.tok_emb, self.pos_emb, self.lut))

    def start(self, prompt: bytes) -> np.ndarray:
        """The initial hidden state of a prompt: the same bytes always give the same state."""
        seed = int.from_bytes(hashlib.sha256(prompt).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        return rng.integers(-H_MAX, H_MAX + 1, size=self.hidden_size).astype(np.float32)

    def step(
        self, h: np.ndarray, prev: np.ndarray, pos: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """One decode step for a batch: hidden states (b, D), previous tokens and positions (b,).

        Returns the new hidden states and the next token of each row.
        """
        acc = h @ self.w  # the memory-bound part: reads all of W once per step
        x = acc * self.acc_scale
        x = x + self.tok_emb[prev]
        x = x + self.pos_emb[np.minimum(pos, self.max_positions - 1)]
        idx = np.clip(np.rint(x * np.float32(LUT_STEPS)), -LUT_RANGE * LUT_STEPS,
                      LUT_RANGE * LUT_STEPS).astype(np.intp)  # fmt: skip
        h = self.lut[idx + LUT_RANGE * LUT_STEPS]
        tokens = np.argmax(h @ self.proj, axis=1)
        return h, tokens

    def generate(self, prompts: list[bytes], counts: list[int]) -> list[np.ndarray]:
        """Decodes all prompts together; row i stops after counts[i] tokens."""
        n = len(prompts)
        if n == 0:
            return []
        h = np.stack([self.start(p) for p in prompts])
        prev = np.full(n, self.bos, dtype=np.intp)
        want = np.asarray(counts)
        out = np.zeros((n, int(want.max())), dtype=np.int32)
        alive = np.arange(n)
        for s in range(out.shape[1]):
            alive = alive[want[alive] > s]
            if len(alive) == n:
                h, prev = self.step(h, prev, np.full(n, s))
                out[:, s] = prev
            else:
                h_a, prev_a = self.step(h[alive], prev[alive], np.full(len(alive), s))
                h[alive] = h_a
                prev[alive] = prev_a
                out[alive, s] = prev_a
        return [out[i, : counts[i]] for i in range(n)]


def detokenize(token_ids: np.ndarray) -> str:
    return "".join(VOCAB[int(t)] for t in token_ids)


def _param(config: dict, key: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value != "" else DEFAULTS[key]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.logger = pb_utils.Logger
        self.name = args["model_name"]
        self.version = int(args["model_version"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.default_tokens = int(_param(config, "tokens"))
        self.max_tokens = int(_param(config, "max_tokens"))
        if not 1 <= self.default_tokens <= self.max_tokens:
            raise ValueError("parameters need 1 <= tokens <= max_tokens")
        hidden = int(_param(config, "hidden_size"))
        seed = int(_param(config, "seed"))
        started = time.monotonic()
        self.decoder = Decoder(hidden, self.max_tokens, seed, self.version)
        # Stands in for reading a large checkpoint; the weights above take well under a second.
        load_seconds = float(_param(config, "load_seconds"))
        time.sleep(max(0.0, load_seconds - (time.monotonic() - started)))
        prefix = PrefixSettings.from_parameters(lambda key: _param(config, key))
        self.prefill = Prefill(prefix, CacheMetrics(pb_utils, self.name, self.version))
        self.scheduler = None
        if self.decoupled:
            max_active = _param(config, "max_active") or str(config.get("max_batch_size") or 8)
            self.scheduler = StreamScheduler(self.decoder, VOCAB, int(max_active), self.logger)
        self.ballast = hold_declared(config, self._warn)  # last: tops up all of the above
        self.logger.log_info(
            f"{self.name} v{self.version}: hidden_size={hidden} weights={self.decoder.nbytes} "
            f"bytes decoupled={self.decoupled} prefill "
            f"{self.prefill.seconds_per_block * 1e6:.1f} us per {prefix.block_bytes}-byte block, "
            f"cache {prefix.cache_blocks} blocks, ballast {len(self.ballast)} bytes, loaded in "
            f"{time.monotonic() - started:.2f}s"
        )

    def _warn(self, message: str) -> None:
        self.logger.log_warn(f"{self.name} v{self.version}: {message}")

    def _parse(self, request) -> tuple[list[bytes], list[int]]:
        prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT")
        if prompt is None:
            raise RequestError("input PROMPT is required")
        prompts = [p if isinstance(p, bytes) else str(p).encode() for p in
                   prompt.as_numpy().reshape(-1)]  # fmt: skip
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RequestError("PROMPT must not be empty")
        max_tokens = pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS")
        if max_tokens is None:
            counts = [self.default_tokens] * len(prompts)
        else:
            values = max_tokens.as_numpy().reshape(-1).astype(np.int64)
            if len(values) == 1:
                values = np.repeat(values, len(prompts))
            if len(values) != len(prompts):
                raise RequestError("MAX_TOKENS needs one value per PROMPT row")
            if (values <= 0).any():
                raise RequestError(f"MAX_TOKENS must be positive, got {values.min()}")
            counts = [int(min(v, self.max_tokens)) for v in values]
        return prompts, counts

    def execute(self, requests):
        if self.decoupled:
            return self._execute_stream(requests)
        parsed: list[tuple[list[bytes], list[int]] | RequestError] = []
        for request in requests:
            try:
                parsed.append(self._parse(request))
            except RequestError as e:
                parsed.append(e)
        prompts = [p for item in parsed if not isinstance(item, RequestError) for p in item[0]]
        counts = [c for item in parsed if not isinstance(item, RequestError) for c in item[1]]
        time.sleep(self.prefill.admit(prompts))  # the prompts' uncached part, then decode
        generated = iter(self.decoder.generate(prompts, counts))
        responses = []
        for item in parsed:
            if isinstance(item, RequestError):
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(str(item), pb_utils.TritonError.INVALID_ARG)
                    )
                )
                continue
            rows = [next(generated) for _ in item[0]]
            width = max(len(r) for r in rows)
            ids = np.full((len(rows), width), -1, dtype=np.int32)  # -1 pads shorter rows
            for i, r in enumerate(rows):
                ids[i, : len(r)] = r
            text = np.array([[detokenize(r).encode()] for r in rows], dtype=np.object_)
            responses.append(
                pb_utils.InferenceResponse(
                    [pb_utils.Tensor("TEXT", text), pb_utils.Tensor("TOKEN_IDS", ids)]
                )
            )
        return responses

    def _execute_stream(self, requests):
        sequences = []
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompts, counts = self._parse(request)
                if len(set(counts)) != 1:
                    raise RequestError("all PROMPT rows of one request need the same MAX_TOKENS")
            except RequestError as e:
                sender.send(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
                    ),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
                continue
            rows = len(prompts)
            sequences.append(
                Stream(
                    sender=sender,
                    rows=rows,
                    count=counts[0],
                    h=np.stack([self.decoder.start(p) for p in prompts]),
                    prefill_s=self.prefill.admit(prompts),
                    prev=np.full(rows, self.decoder.bos, dtype=np.intp),
                )
            )
        # Returns once the decoder has room for more, so Triton's queue (and its queue policy)
        # holds what the decoder cannot take yet.
        self.scheduler.submit(sequences)
        return None

    def finalize(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
