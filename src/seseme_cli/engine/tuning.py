"""Tuned launch parameters: the JSON cache that `seseme tune` writes and the engine reads at start-up.

A cache holds, per op and exact shape, the keyword arguments that op was fastest with on one GPU (a
LinearConfig for the linear layers; num_splits / threads / keys_per_iter for attention; heads_per_block /
threads for the fused short-cache attention; threads for RoPE and sampling). The engine asks `tuned_config(tuning, op, *shape)` at each op call of a frame and splats the answer
into the call; an empty dict means "the op's built-in default". Shapes:

    linear     (n, m, k, swiglu)    m = output columns (f for swiglu), as default_config takes them
    attention  (n, heads, kv_heads, head_dim, cache_len)
    short_attention  (n, heads, kv_heads, head_dim, cache_len)   the depth decoder's fused one-token steps
    rope       (n, heads, kv_heads, head_dim)
    sampling   (n, vocab)

The cache is only valid for the GPU, the CUDA versions and the kernels it was measured with, so its file name
carries a hash of those (`device_key`). A file that cannot be read, does not match its key, or holds a
parameter the kernels would reject is ignored with a warning: tuning is an optimisation, never a reason to
fail. SESEME_TUNING=off ignores every cache (to time the defaults); SESEME_TUNING=PATH reads that file.

Without a cache of its own, a GPU model we have measured gets the built-in table shipped in `tunings/` (a
`seseme tune` result from such a GPU, chosen by GPU model, SM count and tuning version only: the configs are
valid whatever the CUDA version, and only their speed could differ).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch

from seseme_cli.ops.kernels import kernels_module
from seseme_cli.ops import attention as A
from seseme_cli.ops.linear_config import LinearConfig, as_config, config_error
from seseme_cli.ops.sampling import MAX_THREADS as SAMPLE_MAX_THREADS
from seseme_cli.ops.short_attention import SHORT_MAX_THREADS

log = logging.getLogger("seseme")

# Bump when the meaning of a parameter or the set of candidates changes without a kernel version bump:
# caches made before are then stale.
KERNEL_TUNING_VERSION = 1
FORMAT = "seseme-tune"
SHAPE_ARITY = {"linear": 4, "attention": 5, "short_attention": 5, "rope": 4, "sampling": 2}


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/seseme, else ~/.cache/seseme (platformdirs is not a dependency)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "seseme"


def device_key(device: torch.device | str | int | None = None) -> dict:
    """What a cache is valid for: GPU model, SM count, torch's and the kernels' CUDA, kernel versions."""
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    module = kernels_module()
    return {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "cuda_torch": torch.version.cuda,
        "cuda_kernels": getattr(module, "cuda_version", None),  # the module's own runtime, when it reports it
        "kernels": getattr(module, "version", None),
        "tuning_version": KERNEL_TUNING_VERSION,
    }


def _slug(gpu: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "gpu"


BUILTIN_DIR = Path(__file__).parent / "tunings"
BUILTIN_MATCH = ("gpu", "sms", "tuning_version")  # what a built-in table must share with this setup


def builtin_path(key: dict) -> Path:
    return BUILTIN_DIR / f"{_slug(key['gpu'])}.json"


def read_builtin(path: Path, key: dict) -> Tuning:
    """A shipped table, if it was measured on this GPU model (ValueError otherwise, as read_tuning)."""
    found = read_tuning(path, None)
    theirs = found.key if isinstance(found.key, dict) else {}
    if any(theirs.get(field) != key.get(field) for field in BUILTIN_MATCH):
        raise ValueError(f"made for {_describe(theirs)}, this is {_describe(key)}")
    return found


def cache_path(key: dict) -> Path:
    """tune-<gpu>-<hash of the whole key>.json in cache_dir(): one file per GPU model and software stack."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"tune-{_slug(key['gpu'])}-{digest}.json"


class Tuning:
    """A loaded cache: {(op, shape): kwargs}; `path` and `key` say where it came from."""

    def __init__(self, params: dict[tuple, dict], key: dict | None = None, path: Path | None = None):
        self.params = params
        self.key = key
        self.path = path

    def __len__(self) -> int:
        return len(self.params)

    def get(self, op: str, *shape) -> dict:
        found = self.params.get((op, _norm_shape(shape)))
        return dict(found) if found else {}

    # --- JSON -----------------------------------------------------------------------------------------------

    @staticmethod
    def to_json(key: dict, results: list[dict]) -> dict:
        """The file content for `results` (dicts with op, shape, params and any timings)."""
        entries = []
        for r in results:
            params = dict(r["params"])
            if isinstance(params.get("config"), LinearConfig):
                params["config"] = asdict(params["config"])
            entries.append({**r, "shape": list(_norm_shape(r["shape"])), "params": params})
        return {"format": FORMAT, "key": key, "entries": entries}

    @classmethod
    def from_json(cls, data: dict, key: dict | None = None, path: Path | None = None) -> "Tuning":
        """Parse and validate; ValueError naming the first problem (the caller ignores the whole file then:
        a file with one bad entry was not written by this version of `seseme tune`)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
            raise ValueError(f"not a {FORMAT} file")
        if key is not None and data.get("key") != key:
            raise ValueError(f"made for {_describe(data.get('key'))}, this is {_describe(key)}")
        params = {}
        for i, entry in enumerate(data["entries"]):
            try:
                op, shape, kwargs = entry["op"], _norm_shape(entry["shape"]), dict(entry["params"])
                if SHAPE_ARITY.get(op) != len(shape):
                    raise ValueError(f"unknown op {op!r} or shape {list(shape)}")
                if "config" in kwargs:
                    kwargs["config"] = as_config(kwargs["config"])
                _validate(op, shape, kwargs)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"entry {i}: {e}") from None
            if kwargs:
                params[(op, shape)] = kwargs
        return cls(params, data.get("key"), path)


def _norm_shape(shape) -> tuple[int, ...]:
    # bools (swiglu) are stored as 0/1 so that keys from JSON and from the engine compare equal
    if not all(isinstance(s, (int, bool)) for s in shape):
        raise ValueError(f"shape {shape!r} must hold integers")
    return tuple(int(s) for s in shape)


def _validate(op: str, shape: tuple[int, ...], kwargs: dict) -> None:
    """ValueError unless the op accepts these parameters at this shape *inside the engine*: a parameter the
    op would reject would otherwise fail the engine's graph capture."""
    allowed = {"linear": {"config"}, "attention": {"num_splits", "threads", "keys_per_iter"},
               "short_attention": {"heads_per_block", "threads"}, "rope": {"threads"}, "sampling": {"threads"}}[op]
    if set(kwargs) - allowed:
        raise ValueError(f"{op}: unknown parameters {sorted(set(kwargs) - allowed)}")
    if op == "linear":
        n, m, k, swiglu = shape
        err = config_error(kwargs["config"], n, m, k, bool(swiglu)) if "config" in kwargs else None
        if err:
            raise ValueError(f"linear {list(shape)}: {err}")
        return
    threads = kwargs.get("threads")
    most = {"attention": A.ATTENTION_MAX_THREADS, "short_attention": SHORT_MAX_THREADS, "rope": A.ROPE_MAX_THREADS,
            "sampling": SAMPLE_MAX_THREADS}[op]
    A.check_threads(op, threads, most)
    if op == "short_attention":
        n, heads, kv_heads, hd, cache_len = shape
        per_block = kwargs.get("heads_per_block")
        if per_block is not None and (not isinstance(per_block, int) or isinstance(per_block, bool) or per_block < 1
                                      or heads % kv_heads or (heads // kv_heads) % per_block):
            raise ValueError(f"short_attention {list(shape)}: heads_per_block {per_block!r} does not divide the "
                             "query heads per KV head")
    if op == "attention":
        n, heads, kv_heads, hd, cache_len = shape
        splits, keys = kwargs.get("num_splits"), kwargs.get("keys_per_iter")
        # The engine's split-KV workspace holds max_num_splits(cache_len) splits: never ask for more.
        if splits is not None and (not isinstance(splits, int) or not 1 <= splits <= A.max_num_splits(cache_len)):
            raise ValueError(f"attention {list(shape)}: num_splits {splits!r} not in [1, {A.max_num_splits(cache_len)}]")
        if keys is not None and (keys not in A.KEYS_PER_ITER or heads % kv_heads
                                 or keys > A.max_keys_per_iter(heads, kv_heads)):
            raise ValueError(f"attention {list(shape)}: keys_per_iter {keys!r} not allowed")


def _describe(key) -> str:
    if not isinstance(key, dict):
        return "an unknown setup"
    return (f"{key.get('gpu')} ({key.get('sms')} SMs), CUDA {key.get('cuda_torch')}/{key.get('cuda_kernels')}, "
            f"kernels {key.get('kernels')} tuning v{key.get('tuning_version')}")


def tuned_config(tuning: Tuning | None, op: str, *shape) -> dict:
    """The keyword arguments to give `op` at this shape: {} (the op's defaults) without a tuning or entry."""
    return {} if tuning is None else tuning.get(op, *shape)


# --- files ----------------------------------------------------------------------------------------------------

def read_tuning(path: Path, key: dict | None) -> Tuning:
    """Read and validate one cache file; ValueError (with the reason) when it is unusable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable ({getattr(e, 'strerror', None) or e})") from None
    return Tuning.from_json(data, key, Path(path))


def save_tuning(key: dict, results: list[dict], path: Path | None = None) -> Path:
    """Write the cache atomically (temp file + rename), so a crash never leaves half a file to warn about."""
    path = Path(path or cache_path(key))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_text(json.dumps(Tuning.to_json(key, results), indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


_loaded: dict[tuple, Tuning | None] = {}  # one read (and one log line) per file version per process


def load_tuning(device: torch.device | str | None = None) -> Tuning | None:
    """The cache for this GPU, or None (built-in defaults). Logs which one; never raises."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    setting = os.environ.get("SESEME_TUNING", "").strip()
    if setting.lower() in ("0", "off", "none", "no", "false"):
        return _once(("off",), lambda: None, "SESEME_TUNING=%s: built-in kernel defaults", setting)
    try:
        key = device_key(device)
    except RuntimeError as e:  # no usable device: the engine will say so itself
        log.debug("no tuning: %s", e)
        return None
    path = Path(setting).expanduser() if setting else cache_path(key)
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        # Caches of this GPU made for other CUDA or kernel versions: said once, whatever is used instead.
        stale = sorted(p.name for p in cache_dir().glob(f"tune-{_slug(key['gpu'])}-*.json") if p != path)
        if stale:
            _once(("stale", path), lambda: None, "ignoring stale kernel tuning %s (made for other CUDA or kernel "
                  "versions); run `seseme tune` to tune this setup", ", ".join(stale), level=logging.WARNING)
        builtin = builtin_path(key)
        if not setting and builtin.is_file():
            return _once(("builtin", str(builtin)), lambda: read_builtin(builtin, key), "kernel tuning: the built-in "
                         "table for %s (%s); `seseme tune` measures this machine", key["gpu"], builtin, on_error=builtin)
        if stale:
            return None
        return _once(("none", path), lambda: None, "no kernel tuning for %s at %s: built-in defaults (run `seseme "
                     "tune`)", key["gpu"], path)
    return _once((str(path), stamp), lambda: read_tuning(path, None if setting else key),
                 "kernel tuning from %s", path, on_error=path)


def _once(memo: tuple, make, message: str, *args, level: int = logging.INFO, on_error: Path | None = None):
    if memo in _loaded:
        return _loaded[memo]
    try:
        value = make()
    except ValueError as e:
        log.warning("ignoring kernel tuning %s: %s; using built-in defaults", on_error, e)
        value = None
    else:
        log.log(level, message + (f" ({len(value)} tuned shapes)" if value is not None else ""), *args)
    _loaded[memo] = value
    return value
