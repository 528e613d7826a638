"""RowAudio: Mimi decoding of the engine loop's requests round by round gives each request the samples of a
one-shot decode of its kept codes (tiny random Mimi on the CPU; `seseme batch` runs it on the GPU in test_batch)."""

import numpy as np
import pytest
import torch

from seseme_cli.audio.codec import MimiCodec
from seseme_cli.audio.rows import RowAudio, bucket_for, slot_buckets

K, FRAME = 32, 1920


class Work:  # a request only matters to RowAudio by identity
    def __init__(self, name):
        self.name = name


class Collect:
    """The pieces each work was handed, and what its end callback said."""

    def __init__(self):
        self.pieces, self.ended = {}, {}

    def on_piece(self, work, samples):
        self.pieces.setdefault(work, []).append(samples)

    def ender(self, work):
        return lambda special: self.ended.setdefault(work, (joined(self.pieces.get(work, [])), special))


def joined(pieces):
    return torch.from_numpy(np.concatenate(pieces)) if pieces else torch.zeros(0)


def random_frames(k, n, seed):
    return np.random.default_rng(seed).integers(0, 2048, (k, n, K))


def feed(audio, collect, kept, frames, rows, fresh):
    """One round: note each work's kept frames, hand the round over, end the works that do not go on."""
    for slot, work, n, _ in rows:
        kept[work].append(frames[:n, slot])
    audio.round(frames, rows, fresh)
    for slot, work, n, goes_on in rows:
        if not goes_on:
            audio.end(work, collect.ender(work))


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("row_frames_per_call,pcm", [(2048, False), (3, False), (7, False), (3, True)])
def test_rounds_give_each_request_its_one_shot_decode(row_frames_per_call, pcm, device):
    codec = MimiCodec.random("tiny", seed=2, device=device)
    # On a GPU the one-shot and the streaming decode run different convolution algorithms (TF32 by default).
    tolerance = 1e-5 if device == "cpu" else 2e-3
    a, b, c = Work("a"), Work("b"), Work("c")
    collect, kept = Collect(), {a: [], b: [], c: []}
    audio = RowAudio(codec, 3, collect.on_piece, row_frames_per_call=row_frames_per_call, pcm16=pcm)
    # (row, work, kept, goes_on) per round of 4 frames; slot 2 stays idle (zeros), rows 0..1 run.
    rounds = [
        ([(0, a, 4, True), (1, b, 4, True)], {0, 1}),
        ([(0, a, 2, True), (1, b, 3, False)], set()),  # a's first chunk ends at EOS, its next chunk goes on
        ([(0, a, 4, True), (1, c, 4, True)], {1}),  # c starts on row 1: its slot starts over
        ([(0, a, 1, False), (1, c, 0, True)], set()),  # c's chunk ends on the round's first frame
        ([(1, c, 3, False)], set()),
    ]
    for i, (rows, fresh) in enumerate(rounds):
        frames = random_frames(4, 2, seed=i)
        if i == 0:
            frames[1, 0, 5] = 2050  # a special id in a kept frame of a: decoded as 0, counted
        if i == 1:
            frames[3, 1, 0] = 2049  # one in a frame b does not keep: neither counted nor decoded into b
        feed(audio, collect, kept, frames, rows, fresh)
    audio.close()
    got = collect.ended
    for work, special in [(a, 1), (b, 0), (c, 0)]:
        codes = torch.from_numpy(np.concatenate(kept[work]))
        codes[codes >= 2048] = 0
        full = codec.decode(codes.T).cpu()
        samples, count = got[work]
        assert samples.shape == full.shape == (codes.shape[0] * FRAME,)
        if pcm:  # 16-bit samples of the same decode: floor(x * 32768), so within one step of the scaled floats
            assert samples.dtype == torch.int16
            full = (full * 32768).clamp(-32768, 32767)
            tolerance += 1.0 / float(full.abs().max())
        assert (samples.float() - full).abs().max() <= tolerance * full.abs().max(), work.name
        assert count == special


def test_slot_buckets():
    assert slot_buckets(1) == [1]
    assert slot_buckets(3) == [1, 3]
    assert slot_buckets(576) == [1, 4, 16, 64, 128, 192, 256, 320, 384, 448, 512, 576]
    assert slot_buckets(150) == [1, 4, 16, 64, 128, 150]
    assert [bucket_for(slot_buckets(576), n) for n in (1, 2, 5, 64, 65, 129, 300, 513, 576)] == [
        1, 4, 16, 64, 128, 192, 320, 576, 576]


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_rounds_of_different_slot_buckets_share_the_slots_state(device):
    """A round decodes only the slots up to its highest one (bucket 1, 4, 16, ...): a request that goes on
    through rounds of different buckets still gets its one-shot decode, and slots outside a round's bucket keep
    their state."""
    codec = MimiCodec.random("tiny", seed=4, device=device)
    tolerance = 1e-5 if device == "cpu" else 2e-3
    a, b, c = Work("a"), Work("b"), Work("c")
    collect, kept = Collect(), {a: [], b: [], c: []}
    audio = RowAudio(codec, 20, collect.on_piece)
    assert audio.buckets == [1, 4, 16, 20]
    # (width of the round, [(slot, work, kept, goes_on)], fresh)
    rounds = [
        (1, [(0, a, 3, True)], {0}),  # bucket 1
        (18, [(0, a, 2, True), (17, b, 3, True)], {17}),  # bucket 20: slot 17 starts
        (1, [(0, a, 3, True)], set()),  # bucket 1 again: b's slot 17 is not decoded and keeps its state
        (6, [(0, a, 1, False), (5, c, 3, True)], {5}),  # bucket 16
        (18, [(5, c, 2, False), (17, b, 3, False)], set()),  # a's slot is outside the round: ended, not fed
    ]
    for i, (width, rows, fresh) in enumerate(rounds):
        feed(audio, collect, kept, random_frames(3, width, seed=10 + i), rows, fresh)
    audio.close()
    for work in (a, b, c):
        codes = torch.from_numpy(np.concatenate(kept[work]))
        full = codec.decode(codes.T).cpu()
        samples, _ = collect.ended[work]
        assert samples.shape == full.shape, work.name
        assert (samples - full).abs().max() <= tolerance * full.abs().max(), work.name


def test_discarded_and_empty_requests():
    codec = MimiCodec.random("tiny", seed=3)
    a, b = Work("a"), Work("b")
    collect = Collect()
    audio = RowAudio(codec, 2, collect.on_piece)
    audio.round(random_frames(2, 2, seed=0), [(0, a, 2, True), (1, b, 0, False)], {0, 1})
    audio.end(b, collect.ender(b))  # ended on its first frame: no audio, and its end still comes
    audio.sync()
    assert list(collect.pieces) == [a] and len(collect.pieces[a][0]) == 2 * FRAME
    assert collect.ended[b][0].numel() == 0 and collect.ended[b][1] == 0
    audio.close()


def test_an_error_in_the_thread_reaches_the_caller():
    codec = MimiCodec.random("tiny", seed=3)

    def broken(work, samples):
        raise RuntimeError("disk on fire")

    audio = RowAudio(codec, 1, broken)
    audio.round(random_frames(1, 1, seed=0), [(0, Work("a"), 1, False)], {0})
    with pytest.raises(RuntimeError, match="disk on fire"):
        audio.sync()
    with pytest.raises(RuntimeError, match="disk on fire"):
        audio.close()
