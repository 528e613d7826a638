"""`seseme tune` and its cache. CPU: the cache's key, validation and failure modes (files written here), the
candidate lists, the engine hook, and the CLI without a GPU. GPU (cuda): a quick sweep on the tiny model."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from typer.testing import CliRunner

from seseme_cli.cli import main as cli

from seseme_cli.tools import tune

from seseme_cli.tools import tune_cases

from seseme_cli.engine import tuning
from seseme_cli.model.config import csm_1b
from seseme_cli.ops.kernels import has_cuda_kernels
from seseme_cli.ops import attention as A
from seseme_cli.ops.linear_config import LinearConfig, config_error, default_config

KEY = {"gpu": "NVIDIA H100 80GB HBM3", "sms": 132, "cuda_torch": "12.8", "cuda_kernels": None, "kernels": "0.1.0",
       "tuning_version": tuning.KERNEL_TUNING_VERSION}
MMA = LinearConfig("mma", warps=4, rows=1, split_k=8, unroll=8, stages=3)
RESULTS = [
    {"op": "linear", "shape": [32, 2048, 8192, False], "params": {"config": MMA}, "default_us": 20.0, "tuned_us": 18.0},
    {"op": "linear", "shape": [1, 3072, 2048, 0], "params": {}, "default_us": 5.0, "tuned_us": 5.0},
    {"op": "attention", "shape": [8, 32, 8, 64, 2048], "params": {"num_splits": 8, "threads": 64}},
    {"op": "rope", "shape": [1, 32, 8, 64], "params": {"threads": 128}},
    {"op": "sampling", "shape": [1, 2051], "params": {"threads": 256}},
]


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("SESEME_TUNING", raising=False)
    # Pretend to be on a GPU with this key, so that load_tuning runs its file logic on the CPU.
    monkeypatch.setattr(tuning, "device_key", lambda device=None: dict(KEY))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tuning, "BUILTIN_DIR", tmp_path / "builtin")  # no shipped table unless a test writes one
    tuning._loaded.clear()
    yield tmp_path / "seseme"
    tuning._loaded.clear()


def load(caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="seseme"):
        return tuning.load_tuning("cuda")


def test_cache_dir_and_name(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.cache_dir() == tmp_path / "seseme"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning.cache_dir() == tmp_path / "home" / ".cache" / "seseme"
    name = tuning.cache_path(KEY).name
    assert name.startswith("tune-nvidia-h100-80gb-hbm3-") and name.endswith(".json")
    for field, value in (("sms", 114), ("cuda_torch", "12.4"), ("cuda_kernels", "12.8"), ("kernels", "0.2.0"),
                         ("tuning_version", 99), ("gpu", "NVIDIA H200")):
        assert tuning.cache_path({**KEY, field: value}).name != name, field


def test_round_trip_and_lookup(cache_home, caplog):
    path = tuning.save_tuning(KEY, RESULTS)
    assert path.parent == cache_home and not list(cache_home.glob(".*.part"))
    t = load(caplog)
    assert t is not None and t.path == path and len(t) == 4  # the default winner is not an entry
    assert str(path) in caplog.text and "kernel tuning from" in caplog.text
    assert tuning.tuned_config(t, "linear", 32, 2048, 8192, False) == {"config": MMA}
    assert tuning.tuned_config(t, "linear", 32, 2048, 8192, True) == {}
    assert tuning.tuned_config(t, "linear", 1, 3072, 2048, False) == {}
    assert tuning.tuned_config(t, "attention", 8, 32, 8, 64, 2048) == {"num_splits": 8, "threads": 64}
    assert tuning.tuned_config(t, "sampling", 1, 2051) == {"threads": 256}
    assert tuning.tuned_config(None, "sampling", 1, 2051) == {}
    assert tuning.load_tuning("cuda") is t  # read once per process


def test_no_cache_uses_defaults(cache_home, caplog):
    assert load(caplog) is None
    assert "built-in defaults" in caplog.text and not any(r.levelno >= logging.WARNING for r in caplog.records)
    assert tuning.load_tuning("cpu") is None


def test_off_switch(cache_home, caplog, monkeypatch):
    tuning.save_tuning(KEY, RESULTS)
    monkeypatch.setenv("SESEME_TUNING", "off")
    assert load(caplog) is None and "built-in kernel defaults" in caplog.text


@pytest.mark.parametrize("content", [
    "{not json",
    "",
    "[]",
    json.dumps({"format": "something else", "entries": []}),
    json.dumps({"format": "seseme-tune", "key": KEY, "entries": [{"op": "linear"}]}),
    json.dumps({"format": "seseme-tune", "key": KEY, "entries": [{"op": "gemm", "shape": [1, 2], "params": {}}]}),
    json.dumps({"format": "seseme-tune", "key": KEY, "entries": [{"op": "linear", "shape": [1, 8, 8, 0],
                                                                   "params": {"config": {"kernel": "gemv", "bogus": 1}}}]}),
    # a config the kernels reject at that shape (gemv takes n <= 8)
    json.dumps({"format": "seseme-tune", "key": KEY, "entries": [{"op": "linear", "shape": [32, 2048, 2048, 0],
                                                                   "params": {"config": {"kernel": "gemv"}}}]}),
    # more splits than the engine's workspace holds, threads out of range, keys_per_iter not allowed
    json.dumps({"format": "seseme-tune", "key": KEY, "entries": [{"op": "attention", "shape": [1, 32, 8, 64, 33],
                                                                   "params": {"num_splits": 2}}]}),
    json.dumps({"format": "seseme-tune", "key": KEY, "entries": [{"op": "rope", "shape": [1, 32, 8, 64],
                                                                   "params": {"threads": 33}}]}),
    json.dumps({"format": "seseme-tune", "key": KEY, "entries": [{"op": "attention", "shape": [1, 32, 8, 64, 2048],
                                                                   "params": {"keys_per_iter": 16}}]}),
    json.dumps({"format": "seseme-tune", "key": KEY, "entries": [{"op": "sampling", "shape": [1, "x"],
                                                                   "params": {}}]}),
])
def test_corrupt_cache_is_ignored_with_a_warning(cache_home, caplog, content):
    cache_home.mkdir(parents=True)
    tuning.cache_path(KEY).write_text(content)
    assert load(caplog) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ignoring kernel tuning" in warnings[0].getMessage()


def test_stale_cache_is_ignored_with_a_warning(cache_home, caplog):
    # A file at our name whose key is another setup's (e.g. copied from another machine) ...
    cache_home.mkdir(parents=True)
    other = {**KEY, "kernels": "0.0.9"}
    tuning.cache_path(KEY).write_text(json.dumps(tuning.Tuning.to_json(other, RESULTS)))
    assert load(caplog) is None
    assert "ignoring kernel tuning" in caplog.text and "0.0.9" in caplog.text
    # ... and only files of older versions for this GPU.
    tuning.cache_path(KEY).unlink()
    tuning.save_tuning(other, RESULTS)
    tuning._loaded.clear()
    assert load(caplog) is None
    assert "stale" in caplog.text and any(r.levelno == logging.WARNING for r in caplog.records)


def write_builtin(key):
    path = tuning.builtin_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tuning.Tuning.to_json(key, RESULTS)))
    return path


def test_builtin_table_without_a_cache_of_our_own(cache_home, caplog):
    # Measured with another CUDA and package version: still this GPU model's table.
    path = write_builtin({**KEY, "cuda_torch": "13.0", "kernels": "0.0.9"})
    t = load(caplog)
    assert t is not None and t.path == path and len(t) == 4
    assert "built-in table" in caplog.text and not any(r.levelno >= logging.WARNING for r in caplog.records)
    assert tuning.tuned_config(t, "attention", 8, 32, 8, 64, 2048) == {"num_splits": 8, "threads": 64}
    # A cache of this machine's own wins over it.
    own = tuning.save_tuning(KEY, RESULTS[:1])
    tuning._loaded.clear()
    assert load(caplog).path == own


def test_builtin_table_with_a_stale_cache_of_our_own(cache_home, caplog):
    # After an upgrade the old cache no longer matches: the built-in table runs, and the user hears why once.
    tuning.save_tuning({**KEY, "kernels": "0.0.9"}, RESULTS)
    path = write_builtin(KEY)
    t = load(caplog)
    assert t is not None and t.path == path and "built-in table" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "stale" in warnings[0] and "seseme tune" in warnings[0]


@pytest.mark.parametrize("field, value", [("sms", 114), ("tuning_version", tuning.KERNEL_TUNING_VERSION + 1)])
def test_builtin_table_of_another_setup_is_ignored(cache_home, caplog, field, value):
    write_builtin({**KEY, field: value})
    assert load(caplog) is None
    assert "ignoring kernel tuning" in caplog.text and "built-in defaults" in caplog.text


def test_builtin_off_switch(cache_home, caplog, monkeypatch):
    write_builtin(KEY)
    monkeypatch.setenv("SESEME_TUNING", "off")
    assert load(caplog) is None


def test_shipped_tables_are_valid_for_this_version():
    shipped = sorted((tuning.BUILTIN_DIR).glob("*.json"))
    assert shipped, "no built-in tables in the package"
    for path in shipped:
        t = tuning.read_tuning(path, None)  # parses and validates every entry against the kernels' rules
        assert t.key["tuning_version"] == tuning.KERNEL_TUNING_VERSION, path.name
        assert path == tuning.builtin_path(t.key) and len(t) > 0


def test_linear_candidates_are_valid_and_start_with_the_default():
    for n, m, k, swiglu in [(1, 3072, 2048, False), (2, 8192, 1024, True), (8, 2051, 1024, False),
                            (32, 2048, 8192, False), (64, 8192, 2048, True)]:
        cands = tune_cases.linear_candidates(n, m, k, swiglu)
        assert cands[0] == {} and len(cands) > 20
        configs = [c["config"] for c in cands[1:]]
        assert len(set(configs)) == len(configs)
        assert all(config_error(c, n, m, k, swiglu) is None for c in configs)
        default = default_config(n, m, k, swiglu, split_ok=True)
        assert default not in configs  # the default runs as {} (exactly what the engine runs untuned), once
        assert any(c.kernel == "torch" for c in configs + [default]) == (not swiglu)
        assert any(c.kernel == "gemv" for c in configs) == (n <= 8)
        assert any(c.kernel == "mma" for c in configs)


def test_tune_case_never_picks_a_slower_or_failing_candidate(monkeypatch):
    # Fake timings (no GPU): each candidate's "graph" is its time in us.
    times = {0: 10.0, 1: 9.95, 2: 5.0, 3: 8.0, 4: 12.0}
    monkeypatch.setattr(tune, "_capture", lambda case, params, calls: times[params["i"]] if params else times[0])
    monkeypatch.setattr(tune, "_replay_us", lambda graph, calls: graph)

    def case(ok):
        cands = [{}] + [{"i": i} for i in range(1, 5)]
        return tune_cases.Case("x", (1,), "x", cands, lambda p, i: None, lambda p: ok(p.get("i", 0)))

    r = tune.tune_case(case(lambda i: i != 2))  # the fastest fails its check: the next one wins
    assert r.params == {"i": 3} and r.tuned_us == 8.0 and r.default_us == 10.0 and r.rejected == 1
    times[3] = 9.95  # within 1% of the default: noise, the default stays
    r = tune.tune_case(case(lambda i: i != 2))
    assert r.params == {} and r.tuned_us == r.default_us == 10.0
    with pytest.raises(RuntimeError, match="default fails"):
        tune.tune_case(case(lambda i: i != 0))


def test_attention_and_threads_candidates_fit_the_engine():
    for S, H, Hkv in [(2048, 32, 8), (33, 8, 2)]:
        cands = tune_cases.attention_candidates(H, Hkv, S)
        assert cands[0] == {} and len(cands) > 4
        for p in cands[1:]:
            tuning._validate("attention", (1, H, Hkv, 64, S), p)  # raises if the engine could not run it
        assert max(p.get("num_splits", 1) for p in cands) == A.max_num_splits(S)
    assert tune_cases.threads_candidates(256)[1:] == [{"threads": t} for t in (32, 64, 128, 256)]
    for H, Hkv in [(8, 2), (32, 8), (6, 2), (4, 4)]:
        cands = tune_cases.short_attention_candidates(H, Hkv)
        assert cands[0] == {} and len(cands) == len({tuple(sorted(p.items())) for p in cands}) > 4
        for p in cands[1:]:
            tuning._validate("short_attention", (1, H, Hkv, 128, 33), p)
    for bad in ({"heads_per_block": 3}, {"threads": 512}, {"num_splits": 2}):
        with pytest.raises(ValueError):
            tuning._validate("short_attention", (1, 8, 2, 128, 33), bad)


def test_frame_cases_cover_every_linear_call():
    from seseme_cli.engine.frame import linear_shapes

    cfg = csm_1b()
    specs = tune_cases.frame_cases(cfg, [1])
    linear = {shape for op, shape, _, _ in specs if op == "linear"}
    expected = {(n, m, k, int(sw)) for n, m, k, sw in linear_shapes(cfg, 1)}
    assert linear == expected and len(linear) == 15
    assert {op for op, *_ in specs} == {"linear", "attention", "short_attention", "rope", "sampling"}
    ops = {(op, s) for op, s, *_ in specs}
    assert ("attention", (1, 32, 8, 64, 2048)) in ops and ("rope", (1, 32, 8, 64)) in ops  # backbone
    assert ("attention", (2, 8, 2, 128, 33)) in ops and ("rope", (2, 8, 2, 128)) in ops  # depth step 0
    # the one-token depth steps run the fused kernel, not rope + attention
    assert ("short_attention", (1, 8, 2, 128, 33)) in ops and ("attention", (1, 8, 2, 128, 33)) not in ops
    big = {shape[0] for op, shape, *_ in tune_cases.frame_cases(cfg, [1, 8, 32, 64])}
    assert max(big) == 64  # depth step 0 at batch 64 has 128 rows: the reference runs, nothing to tune


def test_engine_runs_the_same_with_a_tuning_on_cpu(monkeypatch):
    # On the CPU the ops run their references, which check the tuned arguments and ignore them: the frames must
    # be the same, and the split-K workspace is sized for the tuned configs.
    from seseme_cli.engine import Engine, runner
    from seseme_cli.ops.linear_config import linear_workspace_bytes
    from test_engine import models, prompt

    ref, model = models("tiny-random", "cpu", torch.float32)
    cfg = model.cfg
    bb, dd = cfg.backbone, cfg.depth
    split = LinearConfig("mma", warps=1, rows=1, split_k=4, unroll=8, stages=2)
    params = {("linear", (1, bb.dim, bb.ffn_dim, 0)): {"config": split},
              ("attention", (1, bb.num_heads, bb.num_kv_heads, bb.head_dim, bb.max_seq_len)): {"num_splits": 2},
              ("rope", (2, dd.num_heads, dd.num_kv_heads, dd.head_dim)): {"threads": 64},
              ("sampling", (1, cfg.audio_vocab_size)): {"threads": 128}}
    monkeypatch.setattr(runner, "load_tuning", lambda device: tuning.Tuning(params))
    engine = Engine(model, max_batch=1, use_graphs=False)
    assert engine.buf.linear_workspace.numel() >= linear_workspace_bytes(1, bb.dim, bb.ffn_dim, False, split)
    monkeypatch.setattr(runner, "load_tuning", lambda device: None)
    plain = Engine(ref, max_batch=1, use_graphs=False)
    tokens, mask = prompt(1, 9)
    for e in (engine, plain):
        e.set_row(0, tokens, mask, temperature=0.9, topk=50, seed=3)
    for _ in range(3):
        assert torch.equal(engine.step(1).clone(), plain.step(1).clone())


def test_cli_without_gpu_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(tune, "has_cuda_kernels", lambda: False)
    result = CliRunner().invoke(cli.app, ["tune", "--quick"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: seseme tune needs a CUDA GPU"), result.output
    assert "Traceback" not in result.output


def test_cli_bad_arguments():
    for args in (["--batch-sizes", "1,x"], ["--batch-sizes", "0"], ["--json", "/no/such/dir/t.json"]):
        result = CliRunner().invoke(cli.app, ["tune", *args])
        assert result.exit_code == 2 and result.output.startswith("error: "), (args, result.output)


def test_report_tables():
    r = tune.Result("linear", (1, 3072, 2048, 0), "backbone qkv", {"config": MMA}, 10.0, 8.0, 100, 3)
    d = tune.Result("sampling", (1, 2051), "top-k sampling", {}, 3.0, 3.0, 6, 0)
    tables = tune.tables([r, d])
    assert len(tables) == 2 and "1.25x" in str(tables[0].columns[4]._cells)
    assert tune.describe({"config": MMA}) == "mma w4 r1 split8 st3" and tune.describe({}) == "default"
    assert json.loads(json.dumps(tuning.Tuning.to_json(KEY, [r.to_dict()])))["entries"][0]["params"]["config"]["split_k"] == 8


# --- GPU ----------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda_kernels(), reason="needs a GPU and the CUDA kernels")
def test_quick_sweep_on_the_tiny_model(tmp_path, monkeypatch):
    from seseme_cli.model.config import tiny

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    results = tune.run(tiny(), [1])
    assert results and all(r.tuned_us <= r.default_us for r in results)
    assert all(r.candidates > r.rejected for r in results)
    key = tuning.device_key()
    path = tuning.save_tuning(key, [r.to_dict() for r in results])
    t = tuning.read_tuning(path, key)  # every stored entry passes the engine's validation
    assert len(t) == sum(1 for r in results if r.params)
