"""The engine's kernel prefill (engine/prefill.py) against the reference prefill: the model's backbone over each
prompt, eager PyTorch (what Engine.set_rows ran before).

CPU: the same code path with the ops' PyTorch references, tiny model, fp32: caches and greedy frames equal.
GPU (cuda): the real kernels on CSM-1B-shaped random weights in bf16, within bf16 tolerances.
"""

from __future__ import annotations

import copy

import pytest
import torch

from seseme_cli.model.checkpoints import load_checkpoint
from seseme_cli.engine import Engine
from seseme_cli.engine.prefill import GRAPH_ROWS, Prefill, pack_prompts
from seseme_cli.api import build_model
from seseme_cli.model.reference import generate_frames
from seseme_cli.ops.kernels import has_cuda_kernels

K, VOCAB = 32, 2051
SENTINEL = 7.0  # what every cache slot holds before a prefill: slots it must not write keep it
cuda = pytest.mark.cuda
needs_kernels = pytest.mark.skipif(not has_cuda_kernels(), reason="needs a GPU and the CUDA kernels")


def prompt(seed: int, n_text: int, n_audio: int = 0):
    """n_text text frames, then n_audio audio frames (32 codes each), as a context segment holds them."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n_text + n_audio, K + 1, dtype=torch.long)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    tokens[:n_text, -1] = torch.randint(0, 256, (n_text,), generator=g)
    mask[:n_text, -1] = True
    tokens[n_text:, :K] = torch.randint(0, VOCAB, (n_audio, K), generator=g)
    mask[n_text:, :K] = True
    return tokens, mask


class ReferencePrefill:
    """Engine.prefill as it was: model.backbone over each request's prompt (1, T-1 frames) into its cache row.
    Reads the requests themselves, not the packed Prompts, so a packing mistake cannot hide in both paths."""

    def __init__(self, model, requests):
        self.model, self.requests = model, requests

    def __call__(self, prompts):
        model, dev = self.model, self.model.c0_head.weight.device
        dtype, last = model.c0_head.weight.dtype, []
        for row, tokens, mask, *_ in self.requests:
            x = model.embed_frames(tokens[None].to(dev), mask[None].to(dev)).to(dtype)
            T = tokens.shape[0]
            if T > 1:
                positions = torch.arange(T - 1, device=dev)[None]
                model.backbone(x[:, :-1], positions, cache_rows=torch.tensor([row], device=dev), kv_len=T - 1)
            last.append(x[0, -1])
        return torch.stack(last)


def fill_caches(engine, value: float = SENTINEL) -> None:
    for layer in engine.weights.backbone.layers:
        layer.k_cache.fill_(value)
        layer.v_cache.fill_(value)


def tiny_engines(max_batch: int):
    """(independent reference model, and two engines, each on its own copy of the same weights)."""
    ref = build_model(load_checkpoint("tiny-random", seed=7), torch.device("cpu"), torch.float32)
    return ref, *(Engine(copy.deepcopy(ref), max_batch, use_graphs=False) for _ in range(2))


def prefill_both(requests, chunk_rows: int, max_batch: int):
    ref, engine, expected = tiny_engines(max_batch)
    engine.prefill = Prefill(engine.model, engine.weights.backbone, engine.tuning, engine.buf.linear_workspace,
                             chunk_rows)
    expected.prefill = ReferencePrefill(expected.model, requests)
    for e in (engine, expected):
        fill_caches(e)
        e.set_rows(requests)
    return ref, engine, expected


def assert_caches_match(engine, expected, requests, max_batch: int) -> None:
    """Used slots (0..T-2 of each request's row, every layer) equal the reference's; every other slot untouched."""
    used = {row: tokens.shape[0] - 1 for row, tokens, *_ in requests}
    for layer, ref_layer in zip(engine.weights.backbone.layers, expected.weights.backbone.layers):
        for cache, ref_cache in ((layer.k_cache, ref_layer.k_cache), (layer.v_cache, ref_layer.v_cache)):
            for row in range(max_batch):
                n = used.get(row, 0)
                assert not (ref_cache[row, :n] == SENTINEL).any()  # the reference did write them
                torch.testing.assert_close(cache[row, :n], ref_cache[row, :n], rtol=1e-5, atol=1e-5)
                assert (cache[row, n:] == SENTINEL).all(), f"row {row}: a slot at or after position {n} was written"


def assert_state_matches(engine, expected, requests) -> None:
    rows = torch.tensor([r[0] for r in requests])
    a, b = engine.buf, expected.buf
    torch.testing.assert_close(a.backbone.h[rows], b.backbone.h[rows], rtol=0, atol=0)
    for name in ("positions", "lengths", "temperature", "topk", "seeds", "counters"):
        assert torch.equal(getattr(a, name)[rows], getattr(b, name)[rows]), name
    assert torch.equal(a.positions[rows], torch.tensor([r[1].shape[0] - 1 for r in requests]))


def greedy_frames(engine, n_rows: int, frames: int = 3) -> torch.Tensor:
    return torch.stack([engine.step(n_rows)[:n_rows].clone() for _ in range(frames)], dim=1)  # (rows, frames, K)


# Rows in a scrambled order; one one-frame prompt among them.
SEVERAL = [(2, *prompt(1, 5, 9)), (0, *prompt(2, 9)), (3, *prompt(3, 1)), (1, *prompt(4, 3, 3))]


@pytest.mark.parametrize("chunk_rows", [4, 256], ids=["prompts-span-chunks", "one-chunk"])
def test_several_prompts_prefilled_together_equal_the_reference_cpu(chunk_rows):
    max_batch = 5  # row 4 stays unused: its cache must stay untouched
    requests = [(row, t, m, 0.0, 50, 10 + row) for row, t, m in SEVERAL]
    ref, engine, expected = prefill_both(requests, chunk_rows, max_batch)
    assert_caches_match(engine, expected, requests, max_batch)
    assert_state_matches(engine, expected, requests)

    got, want = greedy_frames(engine, 4), greedy_frames(expected, 4)
    assert torch.equal(got, want)
    for row, tokens, mask, *_ in requests:  # and the whole chain against the plain reference model
        ref.setup_caches(1)
        frames = generate_frames(ref, tokens, mask, 3, temperature=0.0, topk=1)
        assert torch.equal(got[row, : len(frames)], frames)


def test_a_prompt_many_chunks_long_equals_the_reference_cpu():
    requests = [(0, *prompt(5, 12, 40), 0.0, 1, 0)]  # 51 rows in chunks of 8 (the last one 3 rows)
    ref, engine, expected = prefill_both(requests, 8, 1)
    assert_caches_match(engine, expected, requests, 1)
    assert torch.equal(greedy_frames(engine, 1), greedy_frames(expected, 1))


def test_a_one_frame_prompt_prefills_nothing_cpu():
    requests = [(1, *prompt(6, 1), 0.0, 1, 3)]
    ref, engine, expected = prefill_both(requests, 4, 2)
    assert_caches_match(engine, expected, requests, 2)  # nothing written anywhere
    assert_state_matches(engine, expected, requests)
    assert int(engine.buf.lengths[1]) == 1
    ref.setup_caches(1)
    frames = generate_frames(ref, requests[0][1], requests[0][2], 2, temperature=0.0, topk=1)
    assert torch.equal(greedy_frames(engine, 2, 2)[1, : len(frames)], frames)


def test_set_rows_sets_each_rows_sampling_state_cpu():
    _, engine, _ = tiny_engines(3)
    engine.set_rows([(row, *prompt(20 + row, 2), 0.9, 50, row) for row in range(3)])
    greedy_frames(engine, 3, 2)  # counters and positions move on
    requests = [(2, *prompt(9, 6), 0.7, 20, 123), (0, *prompt(10, 1), 0.0, 20, 5)]
    engine.set_rows(requests)
    b, rows = engine.buf, torch.tensor([2, 0])
    assert b.positions[rows].tolist() == [5, 0] and b.lengths[rows].tolist() == [6, 1]
    assert b.temperature[rows].tolist() == pytest.approx([0.7, 0.0])
    assert b.topk[rows].tolist() == [20, 1]  # temperature <= 0: greedy
    assert b.seeds[rows].tolist() == [123, 5] and b.counters[rows].tolist() == [0, 0]
    assert b.positions[1] == 3 and b.counters[1] == 2  # row 1, not restarted, keeps going


def test_a_prompt_prefilled_after_the_frames_its_row_holds_equals_the_whole_prompt_cpu():
    """set_rows with `start`: the prompt's rows go to positions start.. and attend to the slots before, which it
    keeps (a long text's next chunk after its row's earlier ones); same caches and state as the whole prompt at
    once, with another request beside it in the same prefill."""
    _, engine, expected = tiny_engines(2)
    tokens, mask = prompt(11, 9, 14)
    other = (1, *prompt(12, 5), 0.9, 50, 4)
    for e in (engine, expected):
        fill_caches(e)
    engine.set_rows([(0, tokens[:10], mask[:10], 0.8, 30, 3)])  # a first part, its last frame prefilled later
    engine.set_rows([(0, tokens[9:], mask[9:], 0.8, 30, 3, 9), other])
    expected.set_rows([(0, tokens, mask, 0.8, 30, 3), other])
    assert_caches_match(engine, expected, [(0, tokens), (1, other[1])], 2)
    assert_state_matches(engine, expected, [(0, tokens, mask), other])
    window = engine.cfg.max_seq_len
    with pytest.raises(ValueError, match="from position 5"):
        engine.set_rows([(0, *prompt(8, window - 4), 0.9, 50, 0, 5)])
    with pytest.raises(ValueError, match="from position -1"):
        engine.set_rows([(0, tokens, mask, 0.9, 50, 0, -1)])


def test_set_rows_rejects_what_the_kernels_would_get_wrong():
    _, engine, _ = tiny_engines(2)
    t, m = prompt(7, 3)
    with pytest.raises(ValueError, match="distinct"):
        engine.set_rows([(0, t, m, 0.9, 50, 0), (0, t, m, 0.9, 50, 1)])
    with pytest.raises(ValueError, match="distinct and in"):
        engine.set_rows([(2, t, m, 0.9, 50, 0)])
    window = engine.cfg.max_seq_len
    with pytest.raises(ValueError, match="context window"):
        engine.set_rows([(0, *prompt(8, window + 1), 0.9, 50, 0)])
    with pytest.raises(ValueError, match="context window"):
        engine.set_rows([(0, t[:0], m[:0], 0.9, 50, 0)])
    with pytest.raises(ValueError, match=r"\(T, 33\)"):
        engine.set_rows([(0, t, m[:, :-1], 0.9, 50, 0)])


# --- GPU: real kernels, CSM-1B shapes -----------------------------------------------------------------------

class Record:
    """Teacher hook: keeps every codebook's logits and sampled codes; forces `forced` (K, b) when given."""

    def __init__(self, forced: torch.Tensor | None = None):
        self.forced, self.logits, self.sampled = forced, [], []

    def __call__(self, i: int, logits: torch.Tensor, sampled: torch.Tensor) -> None:
        self.logits.append(logits.float().clone())
        self.sampled.append(sampled.clone())
        if self.forced is not None:
            sampled.copy_(self.forced[i])


def run_frames(engine, requests, frames: int, forced=None):
    """set_rows, then `frames` eager frames: (codes (frames, K, b), logits (frames, K, b, vocab))."""
    engine.set_rows(requests)
    codes, logits = [], []
    for f in range(frames):
        rec = Record(None if forced is None else forced[f])
        engine.step_teacher_forced(len(requests), rec)
        codes.append(torch.stack(rec.sampled))
        logits.append(torch.stack(rec.logits))
    return torch.stack(codes), torch.stack(logits)


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def gpu_engine():
    model = build_model(load_checkpoint("random", seed=7), torch.device("cuda"), torch.bfloat16)
    return Engine(model, max_batch=4, use_graphs=False)  # its model runs the reference prefill on the same weights


# 40 frames (the time-to-first-frame case), 300 (more than a default chunk, and > 64 rows: cuBLAS), 1 and 9.
GPU_REQUESTS = [(0, *prompt(11, 30, 10), 0.0, 1, 0), (1, *prompt(12, 20, 280), 0.0, 1, 1),
                (2, *prompt(13, 1), 0.0, 1, 2), (3, *prompt(14, 9), 0.0, 1, 3)]


@cuda
@needs_kernels
@pytest.mark.parametrize("chunk_rows, n_requests", [(256, 1), (256, 4), (48, 4), (7, 4)],
                         ids=["ttff-prompt", "default-chunks", "mma-sized-chunks", "gemv-sized-chunks"])
def test_kernel_prefill_close_to_reference_gpu(gpu_engine, chunk_rows, n_requests):
    engine, requests, frames = gpu_engine, GPU_REQUESTS[:n_requests], 2
    kernel_prefill = default = engine.prefill
    if chunk_rows != default.chunk_rows:
        kernel_prefill = Prefill(engine.model, engine.weights.backbone, engine.tuning, engine.buf.linear_workspace,
                                 chunk_rows)
    try:
        engine.prefill = ReferencePrefill(engine.model, requests)
        codes_ref, logits_ref = run_frames(engine, requests, frames)  # greedy, after the reference prefill
        caches_ref = [(l.k_cache.clone(), l.v_cache.clone()) for l in engine.weights.backbone.layers]
        engine.prefill = kernel_prefill
        codes, logits = run_frames(engine, requests, frames, forced=codes_ref)  # the same earlier codes
    finally:
        engine.prefill = default
    caches = [(l.k_cache, l.v_cache) for l in engine.weights.backbone.layers]

    kv_errors = [rel_err(c[row, : t.shape[0] - 1], r[row, : t.shape[0] - 1])
                 for row, t, *_ in requests if t.shape[0] > 1 for pair, ref_pair in zip(caches, caches_ref)
                 for c, r in zip(pair, ref_pair)]
    logit_errors = [rel_err(logits[f, k, b], logits_ref[f, k, b]) for f in range(frames) for k in range(K)
                    for b in range(len(requests))]
    # Greedy codes equal the reference's, except where the reference's own top two are a near-tie.
    differ = (codes != codes_ref).nonzero().tolist()
    gaps = [float(logits_ref[f, k, b, codes_ref[f, k, b]] - logits_ref[f, k, b, codes[f, k, b]])
            / float(logits_ref[f, k, b].std()) for f, k, b in differ]
    print(f"chunk {chunk_rows}, {n_requests} prompts: KV relative error max {max(kv_errors):.2e}; logits relative "
          f"error max {max(logit_errors):.2e}, mean {sum(logit_errors) / len(logit_errors):.2e}; greedy codes "
          f"differing {len(differ)}/{codes.numel()}, reference top-2 gaps there (logit stds) "
          f"{[round(g, 4) for g in gaps]}")
    assert max(kv_errors) < 2e-2  # bf16: the kernels round once in fp32 where the reference rounds each op
    assert max(logit_errors) < 2e-2  # the engine-vs-reference bound of tests/test_engine.py
    assert all(g < 0.05 for g in gaps)


@pytest.fixture(scope="module")
def graphed_engine():
    model = build_model(load_checkpoint("random", seed=7), torch.device("cuda"), torch.bfloat16)
    return Engine(model, max_batch=3, use_graphs=True)


@cuda
@needs_kernels
@pytest.mark.parametrize("frames", [(2,), (9,), (40,), (66,), (257,), (258,), (3, 17, 40), (1, 6), (90, 1, 100)])
def test_a_steps_prompts_replay_a_graph_close_to_the_eager_prefill_gpu(graphed_engine, frames):
    """The prompts of one step, up to a chunk of prefill rows in all (256 for this engine), replay the graph of
    the next size in GRAPH_ROWS, padded with copies of the last prefill row: the same K/V in each row's slots
    0..T-2 as the eager prefill, the same last-frame embeddings, and no other slot written (258 frames: 257 rows,
    eager). The K/V bound is the bf16 one of the prefill's parity test above: padded, the graph runs its linear
    layers at another row count than the eager prefill, whose tuned split-K sums in another order."""
    engine = graphed_engine
    requests = [(row, *prompt(31 + row, min(T, 12), max(0, T - 12)), 0.0, 1, 0) for row, T in enumerate(frames)]
    prompts = pack_prompts(requests, K, engine.max_batch, engine.cfg.max_seq_len, "cuda")
    prefill, rows = engine.prefill, sum(frames) - len(frames)
    assert sorted(prefill.graphs) == [r for r in GRAPH_ROWS if r <= prefill.chunk_rows]
    assert (prefill._graph_for(prompts) is not None) == (rows <= prefill.chunk_rows)
    graphs, results = prefill.graphs, []
    with torch.inference_mode():  # as Engine.set_rows runs it
        for use in ({}, graphs):
            prefill.graphs = use
            fill_caches(engine)
            out = prefill(prompts).clone()
            torch.cuda.synchronize()
            results.append((out, [(l.k_cache.clone(), l.v_cache.clone()) for l in engine.weights.backbone.layers]))
    prefill.graphs = graphs
    (eager, eager_caches), (graphed, graphed_caches) = results
    assert graphed.shape == eager.shape == (len(frames), engine.cfg.backbone.dim)
    torch.testing.assert_close(graphed, eager, rtol=1e-2, atol=1e-2)  # the last frames' embeddings, not a pad's
    for (k, v), (k_ref, v_ref) in zip(graphed_caches, eager_caches):
        for cache, ref in ((k, k_ref), (v, v_ref)):
            untouched = torch.ones(cache.shape[:2], dtype=torch.bool, device=cache.device)
            for row, T in enumerate(frames):
                if T > 1:
                    assert rel_err(cache[row, : T - 1], ref[row, : T - 1]) < 2e-2
                untouched[row, : T - 1] = False
            assert (cache[untouched] == SENTINEL).all()  # padding rows wrote nothing but their rows' own slots


@cuda
@needs_kernels
@pytest.mark.parametrize("split", [1, 39, 200])
def test_a_prompt_prefilled_after_the_frames_its_row_holds_is_close_to_the_whole_prompt_gpu(graphed_engine, split):
    """A long text's next chunk: the prompt from cache position `split` on, after the row's slots before it were
    written by an earlier prefill, replays the graph (another request beside it) and attends to those slots: the
    K/V and the first step's input as the whole prompt prefilled at once, nothing after them written."""
    engine = graphed_engine
    tokens, mask = prompt(41, 20, 230)
    other = (2, *prompt(42, 7), 0.0, 1, 0)
    results = []
    with torch.inference_mode():
        for parts in ([(0, tokens, mask, 0.0, 1, 0)],
                      [(0, tokens[: split + 1], mask[: split + 1], 0.0, 1, 0),
                       (0, tokens[split:], mask[split:], 0.0, 1, 0, split)]):
            fill_caches(engine)
            for part in parts[:-1]:
                engine.set_rows([part])
            engine.set_rows([parts[-1], other])
            torch.cuda.synchronize()
            results.append((engine.buf.backbone.h[[0, 2]].clone(), engine.buf.positions[[0, 2]].clone(),
                            [(l.k_cache.clone(), l.v_cache.clone()) for l in engine.weights.backbone.layers]))
    (h, positions, caches), (h_ref, positions_ref, caches_ref) = results[1], results[0]
    assert torch.equal(positions, positions_ref) and positions.tolist() == [tokens.shape[0] - 1, 6]
    torch.testing.assert_close(h, h_ref, rtol=1e-2, atol=1e-2)
    n = tokens.shape[0] - 1
    for pair, ref_pair in zip(caches, caches_ref):
        for cache, ref in zip(pair, ref_pair):
            assert rel_err(cache[0, :n], ref[0, :n]) < 2e-2 and rel_err(cache[2, :6], ref[2, :6]) < 2e-2
            assert (cache[0, n:] == SENTINEL).all() and (cache[1] == SENTINEL).all()
