"""Fused temperature + top-k + Philox sampling: the reference against published Philox answers and exact
softmax probabilities on CPU; the kernel against the reference, draw for draw, on GPU."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_allocates_nothing
from seseme_cli.ops.kernels import has_cuda_kernels, kernels_module
from seseme_cli.ops.sampling import (
    MAX_VOCAB,
    _kernel_applies,
    philox4x32_10_ref,
    philox_uniform_ref,
    race_pick_ref,
    sample_topk_philox,
    sample_topk_philox_ref,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# Random123's tests/kat_vectors, "philox4x32 10" lines: counter (4 words), key (2 words) -> output (4 words).
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_python(counter, key):
    """Philox4x32-10 with Python's unbounded ints, written from the paper: an independent check of the
    16-bit-split arithmetic in the torch reference."""
    c, (k0, k1) = list(counter), key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) % 2**32, (k1 + 0xBB67AE85) % 2**32
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 % 2**32, (p0 >> 32) ^ c[3] ^ k1, p0 % 2**32]
    return tuple(c)


def settings(n, temperature, topk, seed=0, counter=0, device="cpu"):
    """Per-row tensors from scalars or lists."""
    def full(v, dtype):
        t = torch.tensor(v, dtype=dtype) if isinstance(v, (list, tuple)) else torch.full((n,), v, dtype=dtype)
        return t.to(device)
    return (full(temperature, torch.float32), full(topk, torch.int32), full(seed, torch.int64),
            full(counter, torch.int64))


def softmax_topk(logits_row, temperature, k):
    """Exact (float64) probabilities of sampling.py's rule: softmax(l / T) over the entries >= k-th largest."""
    x = logits_row.double()
    kth = torch.sort(x, descending=True).values[min(k, x.numel()) - 1] if k > 0 else x.min()
    p = torch.softmax(x / temperature, dim=0)
    p = torch.where(x >= kth, p, torch.zeros_like(p))
    return p / p.sum()


def chi_square(counts, probs):
    expected = probs * counts.sum()
    support = expected > 0
    assert counts[~support].sum() == 0, "a draw landed outside the kept set"
    return (((counts[support] - expected[support]) ** 2) / expected[support]).sum().item(), int(support.sum()) - 1


# ---------------------------------------------------------------------------------------------- CPU: Philox


@pytest.mark.parametrize("counter,key,expect", PHILOX_KAT)
def test_philox_known_answers(counter, key, expect):
    got = philox4x32_10_ref(tuple(torch.tensor(c) for c in counter), tuple(torch.tensor(k) for k in key))
    assert tuple(int(w) for w in got) == expect
    assert philox_python(counter, key) == expect


def test_philox_matches_bigint_on_random_words():
    g = torch.Generator().manual_seed(1)
    words = torch.randint(0, 2**32, (6, 4096), generator=g, dtype=torch.int64)
    words[:, :4] = torch.tensor([0, 1, 2**32 - 1, 2**31]).unsqueeze(0)  # the edges of the 16-bit split
    got = torch.stack(philox4x32_10_ref(tuple(words[:4]), tuple(words[4:])))
    for j in range(0, 4096, 97):
        col = [int(w) for w in words[:, j]]
        assert tuple(int(w) for w in got[:, j]) == philox_python(col[:4], col[4:])


def test_uniform_layout():
    # Entry i of a row: word i % 4 of Philox(counter=(i // 4, codebook, ctr lo, ctr hi), key=(seed lo, seed hi)).
    seeds = torch.tensor([0x123456789ABCDEF0, -3, 7], dtype=torch.int64)  # high halves and a negative seed
    counters = torch.tensor([5, 2**32 + 9, -1], dtype=torch.int64)
    vocab, codebook = 11, 31
    u = philox_uniform_ref(seeds, counters, codebook, vocab)
    assert u.shape == (3, vocab) and u.dtype == torch.float32
    for r in range(3):
        s, c = int(seeds[r]) % 2**64, int(counters[r]) % 2**64
        for i in range(vocab):
            word = philox_python((i // 4, codebook, c % 2**32, c >> 32), (s % 2**32, s >> 32))[i % 4]
            assert u[r, i].item() == ((word >> 8) + 1) * 2.0**-24
    assert ((u > 0) & (u <= 1)).all()


def test_streams_differ_by_seed_counter_codebook():
    base = philox_uniform_ref(torch.tensor([1]), torch.tensor([10]), 0, 2051)
    others = [
        philox_uniform_ref(torch.tensor([2]), torch.tensor([10]), 0, 2051),
        philox_uniform_ref(torch.tensor([1 + 2**32]), torch.tensor([10]), 0, 2051),  # seed's high half counts
        philox_uniform_ref(torch.tensor([1]), torch.tensor([11]), 0, 2051),
        philox_uniform_ref(torch.tensor([1]), torch.tensor([10 + 2**32]), 0, 2051),  # counter's high half too
        philox_uniform_ref(torch.tensor([1]), torch.tensor([10]), 1, 2051),
    ]
    for other in others:
        assert (other != base).float().mean() > 0.99
    # and within a row the 2051 draws are distinct 24-bit numbers (up to a few birthday collisions)
    assert base.unique().numel() > 2040


# ---------------------------------------------------------------------------------------------- CPU: sampling


def test_greedy_is_argmax_with_first_index_ties():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 300, generator=g)
    logits[0, [5, 17, 200]] = 9.0  # exact ties at the max: the first index wins
    logits[1, :] = -2.0  # all equal: index 0
    logits[2, :] = -logits[2].abs() - 1
    logits[2, 3], logits[2, 1] = -0.0, 0.0  # -0 and +0 are equal: the first one wins
    temperature, topk, seeds, counters = settings(6, [0.0, -1.0, 0.0, 1.0, 0.7, 0.0], [50, 50, 1, 1, 1, 0])
    got = sample_topk_philox_ref(logits, temperature, topk, seeds, counters, 0)
    assert got.tolist() == logits.argmax(dim=-1).tolist()
    assert got[0].item() == 5 and got[1].item() == 0 and got[2].item() == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_samples_stay_in_topk_with_ties(dtype):
    # Logits quantised to a few levels, so the k-th largest is tied with many others: all ties stay in.
    g = torch.Generator().manual_seed(3)
    n, vocab = 512, 64
    logits = torch.randint(-3, 4, (n, vocab), generator=g).to(dtype) * 0.5
    ks = torch.randint(2, 20, (n,), generator=g, dtype=torch.int32)
    temperature, _, seeds, counters = settings(n, 1.3, 0)
    counters = torch.arange(n, dtype=torch.int64)
    got = sample_topk_philox_ref(logits, temperature, ks, seeds, counters, 4)
    for r in range(n):
        kth = torch.sort(logits[r].float(), descending=True).values[ks[r] - 1]
        assert logits[r, got[r]].float() >= kth
    # the tied entries at the k-th value are reachable, not only the strictly larger ones
    at_kth = [logits[r, got[r]].float() == torch.sort(logits[r].float(), descending=True).values[ks[r] - 1]
              for r in range(n)]
    assert sum(at_kth) > n // 10


@pytest.mark.parametrize("temperature,k", [(1.0, 8), (0.7, 5), (1.5, 16), (0.9, 50), (2.0, 0)])
def test_frequencies_match_softmax_over_topk(temperature, k):
    # One row of logits drawn under many frame counters: the empirical frequencies must match
    # softmax(l / T) restricted to the top k. The draws are deterministic, so the bound cannot flake; it is a
    # chi-square quantile far in the tail (p ~ 1e-6), and a slightly wrong distribution exceeds it by far.
    vocab, draws = 40, 40000
    g = torch.Generator().manual_seed(int(temperature * 100) + k)
    row = torch.randn(vocab, generator=g) * 1.5
    row[7] = row[9] = row.max() + 0.25  # a tie at the top
    logits = row.unsqueeze(0).expand(draws, vocab)
    temp, topk, seeds, _ = settings(draws, temperature, k, seed=1234)
    counters = torch.arange(draws, dtype=torch.int64) * 3 + 2**33  # large counters, use both halves
    got = sample_topk_philox_ref(logits, temp, topk, seeds, counters, 17)
    counts = torch.bincount(got, minlength=vocab).double()

    probs = softmax_topk(row, temperature, k)
    stat, dof = chi_square(counts, probs)
    bound = dof + 7 * math.sqrt(2 * dof) + 10  # ~ the 1e-6 upper quantile for these dof
    assert stat < bound, (stat, bound)
    # Meaningful: the same counts against a temperature 15% off, or without the top-k cut, fail clearly.
    wrong_t, _ = chi_square(counts, softmax_topk(row, temperature * 1.15, k))
    assert wrong_t > 3 * bound, wrong_t
    if 0 < k < vocab:
        assert (counts[probs == 0] == 0).all()


def test_distribution_matches_sampling_py():
    # The original rule (seseme_cli.model.reference.sample_topk: torch RNG, multinomial-free race) and ours draw
    # from the same distribution: compare both histograms with a two-sample chi-square.
    from seseme_cli.model.reference import sample_topk

    vocab, draws, temperature, k = 30, 40000, 0.8, 10
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(5))
    logits = row.unsqueeze(0).expand(draws, vocab).contiguous()
    temp, topk, seeds, _ = settings(draws, temperature, k, seed=99)
    ours = sample_topk_philox_ref(logits, temp, topk, seeds, torch.arange(draws, dtype=torch.int64), 0)
    theirs = sample_topk(logits, temperature, k, torch.Generator().manual_seed(6))
    a = torch.bincount(ours, minlength=vocab).double()
    b = torch.bincount(theirs, minlength=vocab).double()
    support = (a + b) > 0
    stat = (((a - b) ** 2)[support] / (a + b)[support]).sum().item()
    dof = int(support.sum()) - 1
    assert dof == k - 1
    assert stat < dof + 7 * math.sqrt(2 * dof) + 10


def test_batch_position_does_not_matter():
    g = torch.Generator().manual_seed(7)
    n, vocab = 33, 2051
    logits = torch.randn(n, vocab, generator=g).bfloat16()
    temperature = torch.rand(n, generator=g) + 0.5
    temperature[::5] = 0
    topk = torch.randint(0, 100, (n,), generator=g, dtype=torch.int32)
    seeds = torch.randint(-2**62, 2**62, (n,), generator=g)
    counters = torch.randint(0, 2**40, (n,), generator=g)
    full = sample_topk_philox_ref(logits, temperature, topk, seeds, counters, 3)
    perm = torch.randperm(n, generator=g)
    permuted = sample_topk_philox_ref(logits[perm], temperature[perm], topk[perm], seeds[perm], counters[perm], 3)
    assert torch.equal(permuted, full[perm])
    for r in (0, 6, 32):  # a row alone gives its batched result
        one = sample_topk_philox_ref(logits[r:r + 1], temperature[r:r + 1], topk[r:r + 1], seeds[r:r + 1],
                                     counters[r:r + 1], 3)
        assert one.item() == full[r].item()


def test_topk_edge_values_keep_everything():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 100, generator=g).repeat(5, 1)
    temperature, _, seeds, counters = settings(20, 1.0, 0, seed=3, counter=4)
    keep_all = [torch.full((4,), k, dtype=torch.int32) for k in (0, -5, 100, 101, 2**31 - 1)]
    results = [sample_topk_philox_ref(logits[:4], temperature[:4], k, seeds[:4], counters[:4], 0) for k in keep_all]
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_race_edges_with_chosen_uniforms():
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0, -1.0]] * 4)
    temperature, topk, _, _ = settings(4, 1.0, [2, 2, 3, 0])
    u = torch.full((4, 5), 0.5)
    u[0, 4] = 1.0  # E = 0 (infinite key) on an entry outside the top 2: ignored
    u[1, 3] = 1.0  # E = 0 inside the top 2: wins
    u[2, 2] = 1.0  # the top 3 includes index 2
    u[3, [2, 4]] = 1.0  # two infinite keys: the first index wins
    assert race_pick_ref(logits, temperature, topk, u).tolist() == [1, 3, 2, 2]
    # equal finite keys (same logit, same U): the first index wins
    assert race_pick_ref(logits[:1], temperature[:1], topk[:1], torch.full((1, 5), 0.5)).item() == 1


def test_dispatch_on_cpu_uses_reference_and_fills_out():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(5, 2051, generator=g).half()
    temperature, topk, seeds, counters = settings(5, [0.0, 0.9, 1.5, 0.9, 1.0], [50, 50, 2, 2051, 1], seed=11)
    out = torch.full((5,), -7, dtype=torch.int64)
    got = sample_topk_philox(logits, temperature, topk, seeds, counters, 2, out)
    assert got is out
    assert torch.equal(out, sample_topk_philox_ref(logits, temperature, topk, seeds, counters, 2))
    assert not _kernel_applies(logits, temperature, topk, seeds, counters, out)
    assert sample_topk_philox(logits[:0], temperature[:0], topk[:0], seeds[:0], counters[:0], 0).shape == (0,)


def test_readable_errors():
    logits = torch.randn(3, 10)
    t, k, s, c = settings(3, 1.0, 5)
    with pytest.raises(ValueError, match="logits must be"):
        sample_topk_philox(logits[0], t, k, s, c, 0)
    with pytest.raises(ValueError, match="temperature must be"):
        sample_topk_philox(logits, t.double(), k, s, c, 0)
    with pytest.raises(ValueError, match="topk must be"):
        sample_topk_philox(logits, t, k.long(), s, c, 0)
    with pytest.raises(ValueError, match="seeds must be"):
        sample_topk_philox(logits, t, k, s[:2], c, 0)
    with pytest.raises(ValueError, match="counters must be"):
        sample_topk_philox(logits, t, k, s, c.int(), 0)
    with pytest.raises(ValueError, match="out must be"):
        sample_topk_philox(logits, t, k, s, c, 0, torch.empty(3, dtype=torch.int32))
    for bad in (-1, 2**32, 1.0, True):
        with pytest.raises(ValueError, match="codebook"):
            sample_topk_philox(logits, t, k, s, c, bad)
    for bad in (0, 16, 48 + 1, 2048, True):
        with pytest.raises(ValueError, match="threads"):
            sample_topk_philox(logits, t, k, s, c, 0, threads=bad)
    sample_topk_philox(logits, t, k, s, c, 0, threads=96)  # any multiple of 32 up to 1024 is fine


def test_reference_writes_the_picked_embedding_rows():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 37, generator=g)
    temperature, topk, seeds, counters = settings(4, [0.0, 0.9, 1.2, 0.9], [1, 5, 0, 37], seed=5)
    table = torch.randn(37, 24, generator=g).bfloat16()
    buffer = torch.full((9, 24), float("nan"), dtype=torch.bfloat16)
    embed_out = buffer[1:9:2]  # strided rows: only these may change
    picked = sample_topk_philox(logits, temperature, topk, seeds, counters, 3, embed_table=table, embed_out=embed_out)
    assert torch.equal(picked, sample_topk_philox_ref(logits, temperature, topk, seeds, counters, 3))
    assert torch.equal(embed_out, table[picked]) and buffer[0::2].isnan().all()


def test_embedding_argument_errors():
    logits = torch.randn(3, 10)
    t, k, s, c = settings(3, 1.0, 5)
    table, out = torch.randn(10, 8), torch.empty(3, 8)
    for kwargs in (dict(embed_table=table), dict(embed_out=out), dict(embed_table=table[:9], embed_out=out),
                   dict(embed_table=table, embed_out=out[:2]), dict(embed_table=table, embed_out=out.double()),
                   dict(embed_table=table[:, :4], embed_out=out)):
        with pytest.raises(ValueError, match="embed"):
            sample_topk_philox(logits, t, k, s, c, 0, **kwargs)


def test_binding_checks_arguments():
    # The binding's own checks run before any launch, so they can be exercised without a GPU.
    k = kernels_module()
    if k is None or not hasattr(k, "sample_topk_philox"):
        pytest.skip("kernels module not built")
    ok = dict(out=8, logits=8, rows=1, vocab=10, row_stride=10, temperature=8, topk=8, seeds=8, counters=8,
              codebook=0, dtype=0, threads=0, stream=0)
    for key, bad, msg in (("vocab", MAX_VOCAB + 1, "vocab"), ("vocab", 0, "vocab"), ("row_stride", 9, "row_stride"),
                          ("codebook", 2**32, "codebook"), ("threads", 48, "threads"), ("dtype", 7, "dtype code"),
                          ("seeds", 12, "seeds"), ("out", 0, "non-null")):
        with pytest.raises(ValueError, match=msg):
            k.sample_topk_philox(**{**ok, key: bad})
    embed = dict(embed_table=16, embed_out=16, embed_row_bytes=32, embed_out_stride_bytes=32)
    for key, bad, msg in (("embed_out", 0, "multiples of 16"), ("embed_row_bytes", 24, "multiples of 16"),
                          ("embed_out_stride_bytes", 40, "multiples of 16"), ("embed_table", 24, "embed_table"),
                          ("embed_out", 8, "embed_out")):
        with pytest.raises(ValueError, match=msg):
            k.sample_topk_philox(**ok, **{**embed, key: bad})


# ---------------------------------------------------------------------------------------------- GPU

cuda = pytest.mark.skipif(not has_cuda_kernels(), reason="needs a GPU and the CUDA-built kernels")


def make_case(n, vocab, dtype, seed, ties=False):
    """Random logits and per-row settings mixing greedy rows, every top-k edge and several temperatures."""
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: ties at the top (greedy) and at the k-th value (top-k)
        logits = torch.randint(-4, 5, (n, vocab), generator=g).float() * 0.75
    else:
        logits = torch.randn(n, vocab, generator=g) * 3
    temps = torch.tensor([0.0, 0.9, 1.5, 0.9, 1.0, 0.3])
    ks = torch.tensor([1, 2, 50, vocab, vocab + 7, 0, 3, 20], dtype=torch.int32)
    temperature = temps[torch.randint(0, len(temps), (n,), generator=g)]
    topk = ks[torch.randint(0, len(ks), (n,), generator=g)]
    seeds = torch.randint(-2**63, 2**63 - 1, (n,), generator=g)
    counters = torch.randint(0, 2**34, (n,), generator=g)
    to = lambda t: t.to("cuda")  # noqa: E731
    return to(logits.to(dtype)), to(temperature), to(topk), to(seeds), to(counters)


def assert_equal_or_near_tie(got, ref, logits, temperature, topk, seeds, counters, codebook):
    """Kernel and reference compute the race keys with the same fp32 operations, but the reference's logf is
    torch's kernel and the kernel's is compiled by us, which may differ by an ulp; a row may then pick a
    different winner only if its two best race keys are within that rounding. Such a row must have both
    picks inside the kept set and float64 race keys within ~1e-5 relative; greedy rows must always agree, and
    so must all but a tiny fraction of rows."""
    got, ref = got.cpu(), ref.cpu()
    bad = (got != ref).nonzero().flatten().tolist()
    assert len(bad) <= max(1, got.numel() // 100), f"{len(bad)} of {got.numel()} rows differ"
    if not bad:
        return
    lf = logits.float().cpu().double()
    u = philox_uniform_ref(seeds, counters, codebook, logits.shape[1]).cpu().double()
    for r in bad:
        t, k = temperature[r].item(), topk[r].item()
        assert t > 0 and k != 1, f"greedy row {r} differs: {got[r]} vs {ref[r]}"
        k = logits.shape[1] if k <= 0 or k >= logits.shape[1] else k
        kth = torch.sort(lf[r], descending=True).values[k - 1]
        keys = lf[r] / t - torch.log(-torch.log(u[r]))
        a, b = got[r].item(), ref[r].item()
        assert 0 <= a < logits.shape[1] and lf[r, a] >= kth, f"row {r}: pick {a} outside the top {k}"
        scale = 1 + abs(keys[b].item())
        assert abs(keys[a].item() - keys[b].item()) <= 1e-5 * scale, (r, a, b, keys[a].item(), keys[b].item())


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [2051, 2048, 7, 1])
@pytest.mark.parametrize("n", [1, 3, 64, 128])
def test_kernel_matches_reference(n, vocab, dtype, ties):
    case = make_case(n, vocab, dtype, seed=n * 7919 + vocab + 3 * ties, ties=ties)
    for codebook in (0, 31):
        out = torch.full((n,), -(2**62), dtype=torch.int64, device="cuda")  # poisoned: every row must be written
        assert _kernel_applies(*case, out)
        sample_topk_philox(*case, codebook, out)
        ref = sample_topk_philox_ref(*case, codebook)
        assert ((out >= 0) & (out < vocab)).all()
        assert_equal_or_near_tie(out, ref, *case, codebook)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("threads", [None, 32, 64, 256, 544, 1024])
def test_kernel_threads_do_not_change_results(threads):
    case = make_case(64, 2051, torch.bfloat16, seed=12)
    ref = sample_topk_philox_ref(*case, 5)
    out = sample_topk_philox(*case, 5, threads=threads)
    assert_equal_or_near_tie(out, ref, *case, 5)
    assert torch.equal(out, sample_topk_philox(*case, 5))  # and the kernel's own results are identical


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_topk_selection_exhaustive(dtype):
    # Every k from 1 to V on one tie-heavy row and one all-distinct row: the kept set must be exactly the
    # reference's. With U = 1 impossible to force here, check it through the race: with temperature huge the
    # race is nearly uniform over the kept set, so over many counters every kept entry (and no other) is hit.
    vocab = 37
    g = torch.Generator().manual_seed(13)
    rows = [torch.randint(-2, 3, (vocab,), generator=g).float(), torch.randperm(vocab, generator=g).float() - 18]
    for row in rows:
        n = vocab * 1000  # 1000 draws per k: a kept entry is missed with probability < 37 * e^-27
        logits = row.to(dtype).unsqueeze(0).expand(n, vocab).to("cuda")
        topk = torch.arange(n, dtype=torch.int32, device="cuda") % vocab + 1
        temperature = torch.full((n,), 1e4, device="cuda")
        seeds = torch.full((n,), 5, dtype=torch.int64, device="cuda")
        counters = torch.arange(n, dtype=torch.int64, device="cuda")
        out = sample_topk_philox(logits, temperature, topk, seeds, counters, 0)
        ref = sample_topk_philox_ref(logits, temperature, topk, seeds, counters, 0)
        assert_equal_or_near_tie(out, ref, logits, temperature, topk, seeds, counters, 0)
        rf = row.to(dtype).float()
        for k in range(2, vocab + 1):
            picks = out[topk == k].unique().cpu()
            kept = (rf >= torch.sort(rf, descending=True).values[k - 1]).nonzero().flatten()
            assert torch.equal(picks, kept), k


@pytest.mark.cuda
@cuda
def test_kernel_strided_rows_and_max_vocab():
    # Rows of a larger buffer (row stride > V), and the largest vocabulary the kernel takes; one more goes
    # to the reference.
    n = 5
    big, temperature, topk, seeds, counters = make_case(n, 3000, torch.bfloat16, seed=14)
    logits = big[:, 100:2151]
    assert logits.stride(0) == 3000 and _kernel_applies(logits, temperature, topk, seeds, counters, None)
    assert_equal_or_near_tie(sample_topk_philox(logits, temperature, topk, seeds, counters, 1),
                             sample_topk_philox_ref(logits, temperature, topk, seeds, counters, 1),
                             logits, temperature, topk, seeds, counters, 1)
    for vocab in (MAX_VOCAB, MAX_VOCAB + 1):
        case = make_case(n, vocab, torch.float32, seed=vocab)
        assert _kernel_applies(*case, None) == (vocab <= MAX_VOCAB)
        assert_equal_or_near_tie(sample_topk_philox(*case, 9), sample_topk_philox_ref(*case, 9), *case, 9)


@pytest.mark.cuda
@cuda
def test_kernel_extreme_logits():
    # -inf entries (masked vocab), huge logits with a tiny temperature (keys overflow to inf), -0 vs +0.
    n, vocab = 6, 2051
    logits, temperature, topk, seeds, counters = make_case(n, vocab, torch.float32, seed=15)
    logits[0, 100:] = float("-inf")
    logits[1, :] = float("-inf")
    logits[1, 7] = 0.0
    logits[2] *= 1e30
    logits[3, :] = 0.0
    logits[3, ::2] = -0.0
    temperature[:] = torch.tensor([1.0, 1.0, 1e-30, 1.0, 0.0, 0.5], device="cuda")
    topk[:] = torch.tensor([50, 3, 10, 5, 1, 2051], dtype=torch.int32, device="cuda")
    out = sample_topk_philox(logits, temperature, topk, seeds, counters, 0)
    ref = sample_topk_philox_ref(logits, temperature, topk, seeds, counters, 0)
    assert_equal_or_near_tie(out, ref, logits, temperature, topk, seeds, counters, 0)
    assert out[0].item() < 100 and out[1].item() == 7


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, dim", [(1, 1024), (3, 8), (64, 24), (130, 1000)])
def test_kernel_writes_the_picked_embedding_rows(n, dim, dtype):
    vocab = 2051
    case = make_case(n, vocab, dtype, seed=n + dim)
    table = torch.randn(vocab, dim, device="cuda").to(dtype)
    buffer = torch.full((2 * n + 1, dim), float("nan"), device="cuda", dtype=dtype)
    embed_out = buffer[1::2]  # strided rows; the rows between must stay untouched
    out = torch.full((n,), -1, dtype=torch.int64, device="cuda")
    assert _kernel_applies(*case, out, table, embed_out)
    sample_topk_philox(*case, 30, out, embed_table=table, embed_out=embed_out)
    plain = sample_topk_philox(*case, 30)
    assert torch.equal(out, plain)  # the embedding does not change the draw
    assert_equal_or_near_tie(out, sample_topk_philox_ref(*case, 30), *case, 30)
    assert torch.equal(embed_out, table[out]) and buffer[0::2].isnan().all()


@pytest.mark.cuda
@cuda
def test_kernel_embedding_rows_not_in_16_byte_words_go_to_the_reference():
    case = make_case(5, 2051, torch.bfloat16, seed=1)
    table = torch.randn(2051, 12, device="cuda").bfloat16()  # 24-byte rows
    embed_out = torch.empty(5, 12, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(5, dtype=torch.int64, device="cuda")
    assert not _kernel_applies(*case, out, table, embed_out)
    sample_topk_philox(*case, 4, out, embed_table=table, embed_out=embed_out)
    assert torch.equal(embed_out, table[out])


@pytest.mark.cuda
@cuda
def test_kernel_cuda_graph_replay_and_no_allocations():
    n, vocab = 16, 2051
    logits, temperature, topk, seeds, counters = make_case(n, vocab, torch.bfloat16, seed=16)
    temperature.fill_(0.9)
    topk.fill_(50)
    out = torch.full((n,), -1, dtype=torch.int64, device="cuda")
    # No allocation at all on the kernel path with out given (not even from the caching allocator).
    assert_allocates_nothing(lambda: sample_topk_philox(logits, temperature, topk, seeds, counters, 7, out))

    graph = torch.cuda.CUDAGraph()
    out.fill_(-1)
    with torch.cuda.graph(graph):
        sample_topk_philox(logits, temperature, topk, seeds, counters, 7, out)
    first = []
    for _ in range(2):  # replaying with the same counters gives the same draws: the graph advances nothing
        out.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        first.append(out.clone())
    assert torch.equal(first[0], first[1])
    assert_equal_or_near_tie(first[0], sample_topk_philox_ref(logits, temperature, topk, seeds, counters, 7),
                             logits, temperature, topk, seeds, counters, 7)

    counters += 1  # what the engine does once per frame, in place
    logits.copy_(torch.randn_like(logits.float()).bfloat16())
    graph.replay()
    torch.cuda.synchronize()
    assert_equal_or_near_tie(out, sample_topk_philox_ref(logits, temperature, topk, seeds, counters, 7),
                             logits, temperature, topk, seeds, counters, 7)
    assert not torch.equal(out, first[0])
