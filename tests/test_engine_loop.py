"""The engine loop (add_request / step / abort) on the tiny random model on the CPU: continuous batching, aborts,
failures that stay with their request, decoded audio per request, and the same codes through every front end."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from seseme_cli.cli import main as cli
from seseme_cli.engine.handle import ABORTED, FAILED, FINISHED
from seseme_cli.engine.loop import QueueFull
from seseme_cli.errors import InputError
from seseme_cli.speech.request import SpeechRequest, Turn

K = 32
PARAGRAPHS = ("The first paragraph has a few sentences. It goes on for a while, as paragraphs do. "
              "Then the second one starts here. It also says a thing or two, and ends.")


def req(text, ms, seed):
    return SpeechRequest.make(text, 0, max_audio_ms=ms, seed=seed)


def engine_for(tts, batch, **options):
    return tts.speech_engine(batch, decode_audio=options.pop("decode_audio", False), **options)


def codes_alone(tts, request):
    engine = engine_for(tts, 1)
    handle = engine.add_request(request)
    engine.drain()
    engine.close()
    return handle.codes


def test_finished_rows_are_refilled_at_once_and_batching_does_not_change_results(tts):
    requests = [req("A long one.", 1600, 1), req("Short.", 160, 2), req("Short too.", 240, 3), req("And short.", 160, 4)]
    engine = engine_for(tts, 2)
    handles = [engine.add_request(r) for r in requests]
    order = []
    engine.drain(lambda out: order.extend(handles.index(h) for h in out.finished))
    engine.close()
    # Requests 1..3 went through row 1 while request 0 was still generating on row 0.
    assert order == [1, 2, 3, 0]
    assert [h.codes.shape[0] for h in handles] == [20, 2, 3, 2]  # random weights never stop: each runs to its limit
    for request, handle in zip(requests, handles):  # each row samples with its own seed and counters
        assert torch.equal(handle.codes, codes_alone(tts, request))


def test_requests_join_mid_flight_and_an_abort_leaves_the_others_unchanged(tts):
    a, b, c = req("First voice here.", 1200, 11), req("Second voice here.", 1200, 12), req("Third one.", 800, 13)
    engine = engine_for(tts, 4)
    ha = engine.add_request(a)
    for _ in range(3):
        engine.step()
    hb = engine.add_request(b)  # joins while a generates
    hx = engine.add_request(req("To be aborted.", 4000, 14))
    for _ in range(4):
        engine.step()
    assert hx.frames > 0 and not hx.done
    engine.abort(hx)
    out = engine.step()
    assert hx.status == ABORTED and hx in out.finished or hx.done
    assert engine.active_rows == 2  # the aborted row is free at once
    hc = engine.add_request(c)  # takes a free row
    engine.drain()
    engine.close()
    assert hx.status == ABORTED and hx.codes is None
    assert [h.status for h in (ha, hb, hc)] == [FINISHED] * 3
    for request, handle in ((a, ha), (b, hb), (c, hc)):
        assert torch.equal(handle.codes, codes_alone(tts, request))


def test_abort_of_a_waiting_request_and_the_waiting_limit(tts):
    engine = engine_for(tts, 1, max_waiting=2)
    running = engine.add_request(req("Running.", 800, 1))
    engine.step()
    waiting = engine.add_request(req("Waiting.", 800, 2))
    engine.add_request(req("Also waiting.", 800, 3))
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        engine.add_request(req("One too many.", 800, 4))
    engine.abort(waiting)
    engine.step()
    assert waiting.status == ABORTED and waiting.frames == 0
    engine.drain()
    engine.close()
    assert running.status == FINISHED


def test_a_bad_request_fails_alone(tts):
    huge = Turn(1, "Too long.", torch.randint(1, 2048, (2100, K)))  # more frames than the context window
    engine = engine_for(tts, 2)
    good = engine.add_request(req("Fine.", 400, 1))
    bad = engine.add_request(SpeechRequest.make("Hello.", 0, [huge], seed=2))
    engine.drain()
    engine.close()
    assert good.status == FINISHED and good.codes.shape[0] == 5
    assert bad.status == FAILED and "context window" in bad.error
    with pytest.raises(InputError, match="context window"):
        bad.raise_for_status()


def test_idle_rows_are_parked_before_they_run_out_of_cache(tts):
    # A long generation on row 2 runs rows 0..3 (bucket 4): rows 0, 1 and 3 sit idle and advance too, so they
    # must be re-parked before their positions pass the end of the KV cache (made short here).
    engine = engine_for(tts, 4)
    engine.window = 16
    handles = [engine.add_request(r) for r in (req("One.", 80, 1), req("Two.", 80, 2), req("Three is long.", 3200, 3))]
    idle = []
    engine.drain(lambda out: idle.extend(engine.positions[r] for r in (0, 1, 3)))
    engine.close()
    assert [h.status for h in handles] == [FINISHED] * 3 and handles[2].codes.shape[0] == 40
    assert idle and max(idle) <= 16  # without parking they would reach 40


def test_each_request_gets_its_own_audio_while_rows_are_refilled(tts):
    # Short requests and a long-form one share two rows; every request's decoded audio equals a one-shot decode
    # of its codes (audio slots start over for a new request and go on across a long text's chunks).
    requests = [req("Short.", 240, 1), req(PARAGRAPHS, 160, 2), req("Another short one.", 400, 3), req("Last.", 160, 4)]
    engine = engine_for(tts, 2, decode_audio=True)
    handles = [engine.add_request(r) for r in requests]
    engine.drain()
    engine.close()
    assert handles[1].chunks_total > 1 and handles[1].codes.shape[0] == 2 * handles[1].chunks_total  # in chunks
    for handle in handles:
        codes = handle.codes.masked_fill(handle.codes >= 2048, 0)  # specials decode as code 0
        full = tts.codec.decode(codes.T).cpu()
        samples = torch.from_numpy(handle.audio())
        assert samples.shape == full.shape and (samples - full).abs().max() <= 1e-5 * full.abs().max()


def test_the_loop_makes_no_reference_cycles_per_step_so_the_collector_may_run_rarely(tts):
    """engine.collector makes the young generation's collections rare after set-up: right only while steps leave
    no cyclic garbage behind. With the collector off for whole requests (audio, a long text's chunks, an abort),
    a request of 25 frames leaves as much as one of 2 (moshi's streaming reset makes a cycle or two per request,
    freed when the collector next runs); the objects a step creates are all freed by reference counting."""
    import gc

    engine = engine_for(tts, 2, decode_audio=True)
    engine.add_request(req("Warm up first.", 160, 9))
    engine.drain()  # first-use caches (prompts, decoder buffers) are made before the count starts

    def garbage_of(requests, abort_last=False):
        gc.collect()
        gc.disable()
        try:
            handles = [engine.add_request(r) for r in requests]
            if abort_last:
                for _ in range(4):
                    engine.step()
                engine.abort(handles[-1])
            engine.drain()
            return gc.collect(), [h.status for h in handles]
        finally:
            gc.enable()

    try:
        short = garbage_of([req("Short.", 160, 1), req("Also short.", 160, 2)])
        long = garbage_of([req("A long one.", 2000, 3), req("Also long.", 2000, 4)])
        chunked = garbage_of([req(PARAGRAPHS, 160, 5), req("Another one that runs long.", 2000, 6)], abort_last=True)
    finally:
        engine.close()
    assert short[1] == long[1] == [FINISHED, FINISHED] and chunked[1] == [FINISHED, ABORTED]
    assert long[0] == short[0] < 50 and chunked[0] < 50


def test_the_collector_after_set_up_is_frozen_with_a_larger_young_generation():
    import gc

    from seseme_cli.engine.collector import YOUNG_GENERATION, freeze_after_setup

    older = gc.get_threshold()[1:]
    freeze_after_setup()
    assert gc.get_freeze_count() > 1000 and gc.get_threshold() == (YOUNG_GENERATION, *older)


def test_say_batch_and_the_api_give_the_same_codes(tts, tmp_path):
    text, seed, ms = "The same request three ways.", 9, 640
    api = tts.generate_codes(text, 0, max_audio_length_ms=ms, seed=seed)
    result = CliRunner().invoke(cli.app, ["say", text, "-o", str(tmp_path / "say.wav"), "--codes",
                                          str(tmp_path / "say.npy"), "--model", "tiny-random", "--device", "cpu",
                                          "--max-audio-ms", str(ms), "--seed", str(seed)])
    assert result.exit_code == 0, result.output
    lines = [{"id": "other", "text": "Something else entirely.", "max_audio_ms": 1200, "seed": 1},
             {"id": "same", "text": text, "max_audio_ms": ms, "seed": seed}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = CliRunner().invoke(cli.app, ["batch", str(src), "--out-dir", str(tmp_path / "out"), "--model", "tiny-random",
                                          "--device", "cpu", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    import soundfile as sf

    said = np.load(tmp_path / "say.npy")
    assert np.array_equal(said, api.numpy())
    # batch writes audio, not codes: the same codes decode to the same samples as say's file, up to one 16-bit step
    # (Mimi decodes it in a batch of several slots there; other codes would differ everywhere)
    a, _ = sf.read(tmp_path / "say.wav", dtype="int16")
    b, _ = sf.read(tmp_path / "out" / "same.wav", dtype="int16")
    assert a.shape == b.shape == (said.shape[0] * 1920,)
    assert np.abs(a.astype(np.int32) - b).max() <= 1


def test_a_failed_step_fails_every_request_in_it_and_the_loop_runs_on(tts, monkeypatch):
    engine = engine_for(tts, 2, decode_audio=True, audio_slots=2)
    handles = [engine.add_request(req("One.", 800, 1)), engine.add_request(req("Two.", 800, 2))]
    engine.step()
    step = engine.runner.step

    def broken(n):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(engine.runner, "step", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.step()
    monkeypatch.setattr(engine.runner, "step", step)
    assert all(h.status == FAILED and "illegal memory access" in h.error for h in handles)
    # Rows, decoder slots and prompts were all handed back: two new requests run as if alone.
    again = [engine.add_request(req("One.", 800, 1)), engine.add_request(req("Two.", 800, 2))]
    engine.drain()
    engine.close()
    assert [h.status for h in again] == [FINISHED, FINISHED]
    for handle, request in zip(again, (req("One.", 800, 1), req("Two.", 800, 2))):
        assert torch.equal(handle.codes, codes_alone(tts, request))


def test_a_burst_of_arrivals_is_admitted_over_several_steps_while_rows_generate(tts):
    """The prefill budget: a busy engine takes new prompts up to ~prefill_rows_per_step rows a step (the running
    row would otherwise wait for one long prefill); the codes are the same as alone."""
    requests = [req(f"Request number {i} arrives in a burst.", 400, 20 + i) for i in range(3)]
    engine = engine_for(tts, 4, prefill_rows_per_step=1)
    running = engine.add_request(req("Already generating.", 1600, 19))
    engine.step()
    handles = [engine.add_request(r) for r in requests]
    admitted_at = {}
    for step in range(12):
        engine.step()
        for i, h in enumerate(handles):
            if h.started is not None:
                admitted_at.setdefault(i, step)
    engine.drain()
    engine.close()
    assert sorted(admitted_at.values()) == sorted(set(admitted_at.values())), admitted_at  # one per step
    assert len(admitted_at) == 3
    for request, handle in zip(requests, handles):
        assert torch.equal(handle.codes, codes_alone(tts, request))
    assert running.status == FINISHED


def test_the_prefill_budget_is_not_overshot_and_counts_the_rows_already_queued(tts):
    """Two prompts that together pass the budget go in two steps (one more prompt would take the prefill past its
    captured graphs); a step whose prefill already holds rows (here a parked row's next prompt, queued by
    `_start_generation`) takes no prompt that would pass it either. The codes are the same as alone."""
    from seseme_cli.speech.longform import SpeechJob

    requests = [req(f"Burst request {i} of equal length.", 400, 30 + i) for i in range(3)]
    engine = engine_for(tts, 4)
    rows = SpeechJob(requests[0], (), engine.prompts).next_generation().tokens.shape[0] - 1
    engine.prefill_rows_per_step = 2 * rows - 1
    running = engine.add_request(req("Already generating.", 1600, 29))
    engine.step()
    handles = [engine.add_request(r) for r in requests]
    engine.step()
    assert [h.started is not None for h in handles] == [True, False, False]  # the second would pass the budget
    assert handles[1].prepared is not None  # its prompt is kept for the next step, not built again
    queued = (rows + 1, engine.K + 1)  # `rows` prefill rows already queued for this step (row 3 is free, stays so)
    engine._pending[3] = (3, torch.zeros(queued, dtype=torch.long), torch.ones(queued, dtype=torch.bool), 0.0, 1, 0)
    engine.step()
    assert [h.started is not None for h in handles] == [True, False, False]
    engine.step()
    assert [h.started is not None for h in handles] == [True, True, False]
    engine.drain()
    engine.close()
    for request, handle in zip(requests, handles):
        assert handle.status == FINISHED and torch.equal(handle.codes, codes_alone(tts, request))
    assert running.status == FINISHED


def test_a_listeners_audio_comes_in_chunks_that_grow_to_chunk_frames(tts):
    """A listener's (low_latency) audio pieces are 1, 1, 2, 4, 8, 8, ... frames while it runs alone (each chunk is
    as long as the audio already sent, so it can arrive before that has played out); a request nobody listens to gets
    8-frame pieces. Either way the audio equals a one-shot decode of the codes."""
    engine = engine_for(tts, 2, decode_audio=True, chunk_frames=8)
    request = SpeechRequest.make("A listener waits for the first audio.", 0, max_audio_ms=2400, seed=5)
    listener = engine.add_request(request, low_latency=True)
    engine.drain()
    background = engine.add_request(request)
    engine.drain()
    engine.close()
    frame = 1920
    for handle, sizes in ((listener, [1, 1, 2, 4, 8]), (background, [8, 8])):
        pieces = [len(p) // frame for p in handle.pieces]
        assert handle.frames >= 16, handle.frames  # long enough to see the schedule
        assert pieces[: len(sizes)] == sizes, pieces
        assert all(n == 8 for n in pieces[len(sizes):-1]), pieces
        codes = handle.codes.masked_fill(handle.codes >= 2048, 0)
        full = tts.codec.decode(codes.T).cpu()
        samples = torch.from_numpy(handle.audio())
        assert samples.shape == full.shape and (samples - full).abs().max() <= 1e-5 * full.abs().max()


def test_listeners_at_different_phases_still_get_growing_chunks_and_their_own_audio(tts):
    """Rounds take every request's new frames whenever some request is due; a listener that joins three frames
    after another is due at other steps, so rounds come at nearly every step. What each listener is handed still
    follows its own schedule, not one piece per round: a chunk goes once at least 1, 1, 2, 4, 8, 8, ... frames
    are decoded (as many as were sent before it; a round may bring more), the rest at the end; and it is its own
    audio."""
    engine = engine_for(tts, 2, decode_audio=True, chunk_frames=8)
    early = engine.add_request(SpeechRequest.make("The first listener.", 0, max_audio_ms=2400, seed=5),
                               low_latency=True)
    for _ in range(3):
        engine.step()
    late = engine.add_request(SpeechRequest.make("The second listener.", 0, max_audio_ms=2000, seed=6),
                              low_latency=True)
    engine.drain()
    engine.close()
    frame = 1920
    for handle in (early, late):
        pieces = [len(p) // frame for p in handle.pieces]
        sent = np.cumsum([0, *pieces])
        assert pieces[0] == 1 and all(n >= min(8, sent[i]) for i, n in enumerate(pieces[:-1]) if i), pieces
        assert sum(pieces) == handle.frames >= 20 and len(pieces) <= handle.frames // 8 + 4, pieces
        codes = handle.codes.masked_fill(handle.codes >= 2048, 0)
        full = tts.codec.decode(codes.T).cpu()
        samples = torch.from_numpy(handle.audio())
        assert samples.shape == full.shape and (samples - full).abs().max() <= 1e-5 * full.abs().max()


def test_long_texts_next_chunks_that_come_due_together_are_prefilled_over_several_steps(tts):
    """Two long texts admitted together reach their chunk limits in the same step; with a budget of one prefill
    row their next prompts go one per step (a cohort of continuations once made a prefill of tens of thousands of
    rows that stalled every stream), the row that waits keeps running without keeping its frames, and the codes
    are the same as alone."""
    requests = [SpeechRequest.make(PARAGRAPHS, 0, max_audio_ms=400, seed=40 + i) for i in range(2)]
    engine = engine_for(tts, 2, prefill_rows_per_step=1)
    started, step = [], [0]
    start_generation = engine._start_generation

    def recording(row, state, gen):
        started.append((step[0], row))
        return start_generation(row, state, gen)

    engine._start_generation = recording
    handles = [engine.add_request(r) for r in requests]
    while any(h.status not in (FINISHED, FAILED, ABORTED) for h in handles):
        engine.step()
        step[0] += 1
    engine.close()
    continuations = started[2:]
    assert continuations, "the texts were expected to need more than one chunk"
    steps = [s for s, _ in continuations]
    assert len(steps) == len(set(steps)), started  # never two next chunks in one step
    for request, handle in zip(requests, handles):
        assert handle.status == FINISHED and torch.equal(handle.codes, codes_alone(tts, request))


@pytest.mark.parametrize("newcomers", [False, True])
def test_a_long_texts_next_chunk_prefills_only_what_its_row_does_not_hold(tts, newcomers):
    """A next chunk's prompt is mostly the row's own cache (the previous prompt and the frames fed back): only the
    rest is prefilled, and the codes are those of prefilling every chunk's whole prompt. `newcomers`: a new
    listener arrives at every step, so frames are read in the step that made them, and a chunk's last frame is
    not fed back before its next chunk's prefill (without them it is, by the one-step lag)."""
    long = SpeechRequest.make(PARAGRAPHS, 0, max_audio_ms=400, seed=7, chunk_ms=3000)
    results = {}
    for resume in (True, False):
        engine = engine_for(tts, 3)
        engine.resume_chunks = resume
        prefilled = []
        set_rows = engine.runner.set_rows

        def recording(requests):
            set_rows(requests)
            for r in requests:
                start, frames = (r[6] if len(r) > 6 else 0), r[1].shape[0]
                if r[0] == 0 and frames > 1:  # row 0's chunk prompts, and its cache after them (last layer)
                    prefilled.append((start, frames, top.k_cache[0, : start + frames - 1].clone()))

        top = engine.runner.weights.backbone.layers[-1]
        for layer in engine.runner.weights.backbone.layers:  # no slot keeps a value from an earlier run
            layer.k_cache.normal_(0, 10)
            layer.v_cache.normal_(0, 10)
        engine.runner.set_rows = recording
        try:
            handle, others = engine.add_request(long, low_latency=True), []
            while handle.status not in (FINISHED, FAILED, ABORTED):
                if newcomers and not engine.queue_depth:
                    others.append(engine.add_request(req("Hi.", 80, len(others)), low_latency=True))
                engine.step()
            engine.drain()
            engine.close()
        finally:
            del engine.runner.set_rows  # the runner is the fixture's, shared by the module's tests
        assert handle.status == FINISHED and all(h.status == FINISHED for h in others)
        assert len(others) > 10 if newcomers else not others
        results[resume] = (handle.codes, prefilled)
    (resumed, prompts_resumed), (whole, prompts_whole) = results[True], results[False]
    assert torch.equal(resumed, whole)
    assert len(prompts_resumed) == len(prompts_whole) >= 3  # the long text's chunks
    assert prompts_resumed[0][:2] == prompts_whole[0][:2] and prompts_resumed[0][0] == 0  # the first: all of it
    for (start, frames, cache), (_, frames_whole, cache_whole) in zip(prompts_resumed[1:], prompts_whole[1:]):
        assert start > 0 and start + frames == frames_whole and frames < frames_whole / 2
        # What the next frame attends to: the same keys, written by frame steps and the prefill or by the prefill
        torch.testing.assert_close(cache, cache_whole, rtol=1e-4, atol=1e-5)
