"""Audio of the engine's requests while they generate: Mimi in streaming mode with one batch slot per request
being decoded, fed every audio round of the engine loop, in a worker thread on its own CUDA stream.

Decoding finished requests afterwards serialises it behind generation: when many requests end together (the
usual case in a batch of short ones) the GPU sits on the decode alone. Fed round by round, decoding runs beside
the next frames instead. Mimi is causal, so a row's samples only depend on the frames fed to its slot so far,
which gives the same samples as a one-shot decode of each request's codes if every slot is fed exactly its
request's frames:
- a slot that starts a new request is reset first (moshi's per-slot reset mask);
- a round holds a different number of frames per slot (`kept`); past its kept frames a slot whose request goes
  on is masked (the round is decoded in segments; moshi's exec mask leaves a masked slot's state as it was), and a
  slot whose request ended is fed padding (it is reset before it is used again).

A round decodes only the first `bucket` slots, the smallest of a few sizes (1, 4, 16, 64, 128, then every 64)
that holds every slot of the round: a frame of Mimi for all 576 slots of a 512-row engine costs ~14.6 ms on the
H200, for one slot ~2 ms, and the engine hands out the lowest free slot first, so a lightly loaded engine decodes
few slots. A bucket runs on views of the first rows of every streaming-state tensor (`_sliced_states`): the same
memory, so the slots' state carries over whatever bucket decodes them next; slots outside the bucket are left as
they were, which is what the exec mask would have done to them.

The decoder is a copy of the codec's model that shares its weights (its streaming state must not collide with
the codec's other users: context encoding, `say --stream`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import threading
import warnings

import numpy as np
import torch

from seseme_cli.audio.files import pcm16_on_device
from seseme_cli.audio.mimi_attention import MimiAttention
from seseme_cli.audio.mimi_attention import wanted as mimi_attention_wanted

log = logging.getLogger("seseme")

ROW_FRAMES_PER_CALL = 2048  # slots x frames per eager Mimi call (activation memory: ~2.4 MB each on the H100, ~5 GB)
GRAPH_MAX_FRAMES = 32  # rounds up to this long replay the one-frame graph; longer ones decode in eager calls


SLOT_STEP = 64  # from 128 slots on, the buckets are this many slots apart


def slot_buckets(slots: int) -> list[int]:
    """The slot counts a round may decode: 1, 4, 16, 64, 128, then every SLOT_STEP more, and all of them. Small
    steps where a frame's cost is mostly fixed (launches); from 128 slots it grows in proportion to the slots
    (H100: 3.74 ms at 128, 5.76 at 256, 9.84 at 512, BENCHMARKS.md run 18a), so buckets that doubled there made
    a round of 300 slots pay for 512."""
    sizes, size = [], 1
    while size < slots:
        sizes.append(size)
        size = size * 4 if size < 64 else size * 2 if size < 128 else size + SLOT_STEP
    return [*sizes, slots]


def bucket_for(sizes: list[int], n: int) -> int:
    return next(size for size in sizes if size >= n)


def _sliced_states(model, n: int) -> dict:
    """module -> a copy of its streaming state whose tensors are views of the first n batch rows of the original's
    (in-place updates through the copy land in the original). Python-side counters (offset_cpu) are not shared:
    only weights-per-step modules read them, and Mimi has none."""
    from moshi.modules.transformer import RingKVCache

    def rows(t, dim=0):
        return t.narrow(dim, 0, n)

    sliced = {}
    for module in model.modules():
        state = getattr(module, "_streaming_state", None)
        if state is None:
            continue
        full, view = state.batch_size, copy.copy(state)
        view.batch_size = n
        for name, value in vars(state).items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == full:
                setattr(view, name, rows(value))
            elif isinstance(value, RingKVCache):
                cache = copy.copy(value)
                cache.cache = rows(value.cache, 1)  # (2, batch, heads, capacity, dim)
                if value.respect_exec_mask:
                    cache.end_offset = rows(value.end_offset)
                setattr(view, name, cache)
        sliced[module] = view
    return sliced


@contextlib.contextmanager
def _installed(sliced: dict):
    """Run the model on the sliced states (None: on its own)."""
    if sliced is None:
        yield
        return
    saved = {module: module._streaming_state for module in sliced}
    try:
        for module, view in sliced.items():
            module._streaming_state = view
        yield
    finally:
        for module, state in saved.items():
            module._streaming_state = state


class RowAudio:
    """`round(...)` for each audio round, `end(work, callback)` after a request's last round (the callback gets
    how many special ids were decoded as code 0, in this thread, after every piece of the request was
    delivered), and `close()` at the end. Each round's samples go to `on_piece(work, samples)`: 1-D float32
    numpy, or int16 with pcm16=True (converted on the device for all slots at once: half the bytes to copy, and
    nothing left for a WAV or PCM writer to convert). Calls return at once; the work runs in order in a thread.
    An error in the thread is raised by the next call."""

    def __init__(self, codec, slots: int, on_piece, row_frames_per_call: int = ROW_FRAMES_PER_CALL,
                 pcm16: bool = False):
        self.codec, self.slots, self.on_piece, self.pcm16 = codec, slots, on_piece, pcm16
        # Rounds of the engine loop are a few frames: warming up (and sizing calls) for more only costs memory.
        self.frames_per_call = max(1, min(row_frames_per_call // slots, GRAPH_MAX_FRAMES))
        self.buckets = slot_buckets(slots)
        self.graphed = False  # set by the thread: the one-frame decode is a CUDA graph
        self.items: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.special: dict[int, int] = {}  # id(work) -> special ids so far (the thread's)
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="seseme-row-audio", daemon=True)
        self.thread.start()
        self._ready.wait()
        self._raise()

    # --- the engine loop's side --------------------------------------------------------------------------------

    def round(self, frames: np.ndarray, rows, fresh) -> None:
        """frames (k, n, K): the round's codes for slots 0..n-1; rows: [(slot, work, kept, goes_on)] for the slots
        that have frames (the first `kept` are the work's; goes_on: the work has more frames to come); fresh: slots
        whose work starts with this round."""
        self._put(("round", frames, list(rows), set(fresh)))

    def end(self, work, callback) -> None:
        self._put(("end", work, callback))

    def sync(self) -> None:
        """Wait until everything queued so far is done (every callback called)."""
        done = threading.Event()
        self._put(("end", None, lambda _: done.set()))
        while not done.wait(0.1):
            self._raise()
        self._raise()

    @property
    def backlog(self) -> int:
        """Rounds queued and not decoded yet."""
        return self.items.qsize()

    def close(self) -> None:
        self.items.put(None)
        self.thread.join()
        self._raise()

    def _put(self, item) -> None:
        self._raise()
        self.items.put(item)

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    # --- the thread ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with streaming_decoder(self.codec, self.slots, self.frames_per_call) as (decode, self.graphed):
                self._ready.set()
                while (item := self.items.get()) is not None:
                    if item[0] == "round":
                        self._round(decode, *item[1:])
                    else:
                        _, work, callback = item
                        callback(self.special.pop(id(work), 0))
        except BaseException as e:  # a bug or out of memory: surfaced by the engine loop's next call
            self.error = e
            self._ready.set()
            with contextlib.suppress(queue.Empty):  # let close() find its end marker
                while self.items.get_nowait() is not None:
                    pass
    def _round(self, decode, frames: np.ndarray, rows, fresh: set[int]) -> None:
        k, n, K = frames.shape
        m = bucket_for(self.buckets, n)
        card, size = self.codec.cardinality, self.codec.frame_size
        codes = np.zeros((m, K, k), dtype=np.int64)
        codes[:n] = frames.transpose(1, 2, 0)
        special = codes >= card
        if special.any():  # CSM's special ids are not codec codes (random weights sample them): decode them as 0
            for row, work, kept, _ in rows:
                count = int(special[row, :, :kept].sum())
                if count:
                    self.special[id(work)] = self.special.get(id(work), 0) + count
            codes[special] = 0
        device = self.codec.device
        codes = torch.from_numpy(codes).to(device)
        reset = None
        if fresh:
            reset = torch.zeros(self.slots, dtype=torch.bool)
            reset[sorted(fresh)] = True
            reset = reset.to(device)
        # Segment borders: where a row that goes on stops keeping frames; from there its slot is masked.
        stops = sorted({kept for _, _, kept, goes_on in rows if goes_on and kept < k})
        audio = torch.empty(m, k * size, device=device)
        bounds = [0, *[s for s in stops if s > 0], k]
        for a, b in zip(bounds, bounds[1:]):
            run = None
            masked = [row for row, _, kept, goes_on in rows if goes_on and kept <= a]
            if masked:
                run = torch.ones(m, dtype=torch.bool)
                run[masked] = False
                run = run.to(device)
            for start in range(a, b, self.frames_per_call):
                end = min(start + self.frames_per_call, b)
                audio[:, start * size : end * size] = decode(codes[:, :, start:end], reset, run)
                reset = None
        audio = audio[:n]
        if self.pcm16:
            audio = pcm16_on_device(audio)
        audio = audio.cpu().numpy()
        for row, work, kept, _ in rows:
            if kept:  # a copy: a view would keep the whole round's audio alive as long as any of its requests
                self.on_piece(work, audio[row, : kept * size].copy())


@contextlib.contextmanager
def streaming_decoder(codec, slots: int, frames_per_call: int):
    """(decode, graphed): decode(codes (m, K, f) long on the device with m one of slot_buckets(slots), reset
    (slots,) bool or None, run (m,) bool or None) -> audio (m, f * frame_size) on the device, on a copy of the
    codec's model streaming `slots` slots; valid in the calling thread while the context is open. graphed: the
    one-frame decodes are CUDA graphs (then decode.kernel_attention says whether their attention is
    ops.masked_attention's kernel)."""
    from moshi.utils.compile import no_compile

    model = _sharing_weights(codec.model)
    stream = torch.cuda.Stream(codec.device) if codec.device.type == "cuda" else None
    device_ctx = torch.cuda.device(codec.device) if stream is not None else contextlib.nullcontext()
    # no_compile: moshi would torch.compile its RoPE for every new frame count (seconds each). Entered by this
    # thread for the whole run, before any other codec user, because moshi's switch is one global flag.
    with device_ctx, (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()), \
            torch.inference_mode(), no_compile(), model.streaming(slots):
        states = [m._streaming_state for m in model.modules() if getattr(m, "_streaming_state", None) is not None]
        for state in states:  # moshi would capture its own CUDA graphs on first use: not in this thread
            for name in ("graphed_tr_enc", "graphed_tr_dec", "graphed_encoder", "graphed_decoder"):
                if getattr(state, name, None) is not None:
                    getattr(state, name).disable = True
        sliced = {m: _sliced_states(model, m) if m < slots else None for m in slot_buckets(slots)}

        def decode(codes, reset, run):
            if reset is not None:
                model.reset_streaming(reset)
            m = codes.shape[0]
            if run is not None:
                for state in states:
                    state.exec_mask[:m].copy_(run)
            with _installed(sliced[m]):
                audio = model.decode(codes)[:, 0]
            if run is not None:
                for state in states:
                    state.exec_mask.fill_(True)
            return audio

        # Warm up at a round's shape (cuDNN/cuBLAS handles and kernel modules load on first use), then start
        # every slot over: that cost belongs to set-up, not to the first round.
        decode(torch.zeros(slots, codec.num_codebooks, frames_per_call, dtype=torch.long, device=codec.device),
               None, None)
        model.reset_streaming()
        graphed = _GraphedDecode.capture(model, states, sliced, codec.num_codebooks, stream)
        if graphed is None:
            yield decode, False
            return

        def decode_graphed(codes, reset, run):
            if codes.shape[-1] > GRAPH_MAX_FRAMES:  # a long round: one eager call beats many replays
                return decode(codes, reset, run)
            return graphed.decode(codes, reset, run)

        decode_graphed.kernel_attention = graphed.kernel_attention

        yield decode_graphed, True


class _GraphedDecode:
    """One frame of the batched streaming decode for each slot bucket, and the masked reset of all slots, as CUDA
    graphs over the slots' state: an eager decode is hundreds of small kernels launched from Python (milliseconds
    of host time holding the GIL the engine loop needs), a replay is one launch. Right only because every state
    update on this path is in place (audio.stream's docstring lists them for moshi 0.2.13); a model with replicate
    padding stays eager."""

    def __init__(self, model, states, sliced: dict, num_codebooks: int, stream):
        device, buckets = stream.device, list(sliced)
        slots = buckets[-1]
        # The graphs' inputs: bucket m reads the first m rows.
        self.codes = torch.zeros(slots, num_codebooks, 1, dtype=torch.long, device=device)
        self.run = torch.ones(slots, dtype=torch.bool, device=device)
        self.reset_mask = torch.zeros(slots, dtype=torch.bool, device=device)
        self.frames, self.audio, self.reset = {}, {}, torch.cuda.CUDAGraph()
        # Mimi's attention on our kernel inside the graphs (audio.mimi_attention); eager decodes keep PyTorch's.
        attention = MimiAttention() if mimi_attention_wanted() else contextlib.nullcontext()
        pool = None
        for m in reversed(buckets):  # the largest first: the others' activations fit in its memory pool
            graph = torch.cuda.CUDAGraph()
            with _installed(sliced[m]), _tf32_matmuls(), attention:
                model.decode(self.codes[:m])  # warm-up at this shape (cuDNN picks its algorithms outside capture)
                # thread_local: the engine thread launches its own graphs meanwhile
                with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    for state in states:
                        state.exec_mask[:m].copy_(self.run[:m])
                    self.audio[m] = model.decode(self.codes[:m])[:, 0]
                    for state in states:
                        state.exec_mask.fill_(True)
            self.frames[m], pool = graph, graph.pool()
        self.kernel_attention = getattr(attention, "calls", 0) > 0  # Mimi's attention runs on ops.masked_attention
        with torch.cuda.graph(self.reset, pool=pool, stream=stream, capture_error_mode="thread_local"):
            model.reset_streaming(self.reset_mask)

    @classmethod
    def capture(cls, model, states, sliced: dict, num_codebooks: int, stream):
        """The graphs, or None on a CPU or when capture fails (said once)."""
        if stream is None:
            return None
        from moshi.modules.conv import StreamingConv1d

        if any(isinstance(m, StreamingConv1d) and m.pad_mode == "replicate" for m in model.decoder.modules()):
            return None
        try:
            graphed = cls(model, states, sliced, num_codebooks, stream)
        except RuntimeError as e:  # torch's capture errors, out of memory
            log.warning("Mimi decodes the batch rows eagerly (no CUDA graph): %s", str(e).splitlines()[0])
            return None
        finally:
            model.reset_streaming()  # the warm-ups fed frames to the slots
        return graphed

    def decode(self, codes, reset, run):
        if reset is not None:
            self.reset_mask.copy_(reset)
            self.reset.replay()
        m = codes.shape[0]
        if run is not None:
            self.run[:m].copy_(run)
        graph, audio = self.frames[m], self.audio[m]
        size = audio.shape[-1]
        out = torch.empty(m, codes.shape[-1] * size, device=codes.device)
        for i in range(codes.shape[-1]):
            self.codes[:m].copy_(codes[:, :, i : i + 1])
            graph.replay()
            out[:, i * size : (i + 1) * size].copy_(audio)
        if run is not None:
            self.run.fill_(True)
        return out


@contextlib.contextmanager
def _tf32_matmuls():
    """TF32 for the fp32 matmuls captured meanwhile (the decoder transformer; cuDNN's convolutions use TF32 by
    default already): 9% off a 576-slot frame on the H200 at 82 dB SNR to fp32 (BENCHMARKS.md run 12,
    scripts/mimi_probe.py). The switch is global, so it is only on while the graphs are captured, before the engine
    steps."""
    matmul = torch.backends.cuda.matmul
    with warnings.catch_warnings():  # newer torch prefers fp32_precision and says so
        warnings.simplefilter("ignore")
        before, matmul.allow_tf32 = matmul.allow_tf32, True
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            matmul.allow_tf32 = before


def _sharing_weights(model):
    """A deep copy of a (non-streaming) torch module that shares its parameters and buffers with the original."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)
