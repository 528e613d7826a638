"""Find and read CSM weights in their real formats, renamed to seseme's parameter names.

`--model` accepts: a Hugging Face model id (default sesame/csm-1b, through the normal HF cache); a local
transformers-format folder (config.json with model_type "csm" + *.safetensors + tokenizer files); a local
original-format checkpoint (ckpt.pt, or the original model.safetensors + config.json, torchtune names, plus
moshi's Mimi weights file); `random` (CSM-1B shapes, seeded random weights); `tiny-random` (for tests).
Checkpoints are never executed: safetensors, or torch.load(weights_only=True).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from seseme_cli.model import config as cfgs
from seseme_cli.model.config import DEFAULT_MODEL  # noqa: F401 - re-exported: the API takes it from here
from seseme_cli.errors import InputError, SesemeError, WeightsNotFound
from seseme_cli.model.reference import CsmModel
from seseme_cli.model.tokenizer import ByteTokenizer, HFTokenizer, has_tokenizer_files

RANDOM_MODELS = ("random", "tiny-random")
# Original-format checkpoints need moshi's Mimi weights and the Llama-3.2 tokenizer from the HF hub.
MIMI_REPO, MIMI_FILE = "kyutai/moshiko-pytorch-bf16", "tokenizer-e351c8d8-checkpoint125.safetensors"
LLAMA_TOKENIZER_REPO = "meta-llama/Llama-3.2-1B"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


@dataclass
class Checkpoint:
    config: cfgs.CsmConfig
    weights: dict[str, torch.Tensor] | None  # seseme names; None = random weights from `seed`
    tokenizer: object
    make_codec: Callable[[str], object]  # device -> MimiCodec
    description: str
    seed: int = 0

    @property
    def is_random(self) -> bool:
        return self.weights is None


# --- name mapping -------------------------------------------------------------------------------------

_HF_LAYER = {
    "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.o_proj", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.down", "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
}
_HF_TOP = {
    "embed_text_tokens.weight": "text_embed.weight",
    "backbone_model.embed_tokens.embed_audio_tokens.weight": "audio_embed.weight",
    "depth_decoder.model.embed_tokens.weight": "depth_audio_embed.weight",
    "lm_head.weight": "c0_head.weight",
    "depth_decoder.model.inputs_embeds_projector.weight": "projection.weight",
    "depth_decoder.codebooks_head.weight": "audio_head",
    "backbone_model.norm.weight": "backbone.norm.weight",
    "depth_decoder.model.norm.weight": "depth.norm.weight",
}
_TT_LAYER = {
    "attn.q_proj": "attn.q_proj", "attn.k_proj": "attn.k_proj", "attn.v_proj": "attn.v_proj",
    "attn.output_proj": "attn.o_proj", "mlp.w1": "mlp.gate", "mlp.w3": "mlp.up", "mlp.w2": "mlp.down",
    "sa_norm.scale": "attn_norm.weight", "mlp_norm.scale": "mlp_norm.weight",
}
_TT_TOP = {
    "text_embeddings.weight": "text_embed.weight", "audio_embeddings.weight": "audio_embed.weight",
    "codebook0_head.weight": "c0_head.weight", "projection.weight": "projection.weight",
    "audio_head": "audio_head", "backbone.norm.scale": "backbone.norm.weight", "decoder.norm.scale": "depth.norm.weight",
}


def rename_transformers(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """transformers CsmForConditionalGeneration names -> (seseme weights, codec weights without `codec_model.`)."""
    weights, codec, unknown = {}, {}, []
    layer = re.compile(r"(backbone_model|depth_decoder\.model)\.layers\.(\d+)\.(.+)\.weight$")
    for name, tensor in state.items():
        if name.startswith("codec_model."):
            codec[name[len("codec_model."):]] = tensor
        elif name in _HF_TOP:
            weights[_HF_TOP[name]] = tensor
        elif (m := layer.match(name)) and m.group(3) in _HF_LAYER:
            part = "backbone" if m.group(1) == "backbone_model" else "depth"
            weights[f"{part}.layers.{m.group(2)}.{_HF_LAYER[m.group(3)]}.weight"] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise SesemeError(f"unexpected tensors {', '.join(unknown[:5])}")
    # tie_codebooks_embeddings: a checkpoint may store the shared audio table once, under either name.
    for name, twin in (("audio_embed.weight", "depth_audio_embed.weight"), ("depth_audio_embed.weight", "audio_embed.weight")):
        if name not in weights and twin in weights:
            weights[name] = weights[twin]
    return weights, codec


def interleaved_to_halves(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """torchtune rotates pairs (2j, 2j+1) of each head, we rotate (j, j + hd/2): within each head, new row j =
    old row 2j and new row hd/2 + j = old row 2j+1. Applied to q and k alike, q.k is unchanged."""
    rows, cols = w.shape
    head_dim = rows // num_heads
    return w.view(num_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _permute_if_fits(w: torch.Tensor, tcfg: cfgs.TransformerConfig, num_heads: int) -> torch.Tensor:
    # A wrongly shaped q/k is left as stored: check_weights then names it and its shape, where the
    # permutation would fail with a bare view error.
    if w.dim() != 2 or w.shape != (num_heads * tcfg.head_dim, tcfg.dim):
        return w
    return interleaved_to_halves(w, num_heads)


def rename_original(state: dict[str, torch.Tensor], config: cfgs.CsmConfig) -> dict[str, torch.Tensor]:
    """Original SesameAILabs/csm (torchtune) names -> seseme weights, q/k rows permuted to our RoPE layout."""
    weights, unknown = {}, []
    layer = re.compile(r"(backbone|decoder)\.layers\.(\d+)\.(.+?)(\.weight)?$")
    for name, tensor in state.items():
        name = name.removeprefix("_orig_mod.").removeprefix("model.")
        if name in _TT_TOP:
            weights[_TT_TOP[name]] = tensor
            continue
        m = layer.match(name)
        if not m or m.group(3) not in _TT_LAYER:
            if "cache" not in name:  # torchtune may save KV caches / causal masks: not weights
                unknown.append(name)
            continue
        part, tcfg = ("backbone", config.backbone) if m.group(1) == "backbone" else ("depth", config.depth)
        target = _TT_LAYER[m.group(3)]
        if target in ("attn.q_proj", "attn.k_proj"):
            tensor = _permute_if_fits(tensor, tcfg, tcfg.num_heads if target == "attn.q_proj" else tcfg.num_kv_heads)
        suffix = "" if target.endswith(".weight") else ".weight"
        weights[f"{part}.layers.{m.group(2)}.{target}{suffix}"] = tensor
    if unknown:
        raise SesemeError(f"unexpected tensors {', '.join(unknown[:5])} (not CSM's original format)")
    if "audio_embed.weight" in weights:  # the original decoder embeds codes with the backbone's table
        weights["depth_audio_embed.weight"] = weights["audio_embed.weight"]
    return weights


def check_weights(weights: dict[str, torch.Tensor], config: cfgs.CsmConfig) -> None:
    """Raise SesemeError naming the first few missing, unexpected and wrongly shaped tensors (seseme names).

    Checked here, where the file's name is known, rather than left to load_state_dict: its size-mismatch
    error is a page-long RuntimeError that names no file."""
    with torch.device("meta"):  # shapes only: no memory; ~50 ms at CSM-1B's size
        expected = {name: tuple(p.shape) for name, p in CsmModel(config).state_dict().items()}
    problems = [f"{name} has shape {tuple(w.shape)}, expected {expected[name]}"
                for name, w in weights.items() if name in expected and tuple(w.shape) != expected[name]]
    problems += [f"{name} is missing" for name in expected if name not in weights]
    problems += [f"{name} is not used by the model" for name in weights if name not in expected]
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise SesemeError(f"the checkpoint does not fit the model: {'; '.join(problems[:4])}{more}")


# --- readers --------------------------------------------------------------------------------------------
# Each reader turns whatever a bad file causes into one InputError line naming the file: the file is the
# user's to fix, and a JSONDecodeError or UnpicklingError traceback would not say which one or why.

def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _a(value: object) -> str:
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


@contextmanager
def _in(source: Path | str):
    """Problems found in a file's contents (config fields, tensor names and shapes) are raised by code that
    does not know the file; here they get its name in front."""
    try:
        yield
    except SesemeError as err:
        raise InputError(f"{source}: {err}") from None


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as err:  # SafetensorError (garbage, truncated), OSError; the library has no common base
            raise InputError(f"cannot read {f} as safetensors: {_first_line(err)}") from None
    return state


def _unpickler_reason(err: Exception) -> str:
    # torch's refusal is a page of advice on loading the file unsafely; the useful part names the object.
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    return f"it pickles {found.group(1)}" if found else _first_line(err)


def read_torch_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    # torch.save writes a zip archive; anything else (truncated, or not a checkpoint at all) would fail inside
    # torch.load with a message about mmap or pickle opcodes.
    if not zipfile.is_zipfile(path):
        raise InputError(f"cannot read {path}: not a PyTorch checkpoint (no zip archive as torch.save writes; truncated?)")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise InputError(f"cannot read {path}: it holds Python objects besides tensors, and seseme never executes "
                         f"a checkpoint ({_unpickler_reason(err)})") from None
    except Exception as err:
        raise InputError(f"cannot read {path} as a weights-only checkpoint: {_first_line(err)}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a training checkpoint
        state = state["model"]
    return _named_tensors(state, path)


def _named_tensors(state: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise InputError(f"{path} holds {_a(state)}, expected a state dict {{name: tensor}}")
    bad = [f"{key!r} is {_a(value)}" for key, value in state.items()
           if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise InputError(f"{path} is not a state dict {{name: tensor}}: {', '.join(bad[:3])}")
    return state


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix in TORCH_SUFFIXES:
        return read_torch_checkpoint(path)
    if path.suffix == ".safetensors":
        return read_safetensors([path])
    raise InputError(f"{path} is not a checkpoint file (expected .safetensors, {', '.join(TORCH_SUFFIXES)}, "
                     f"or a model folder)")


def _describe(files: list[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{files[0].parent}/*.safetensors"


def _codec_from_transformers(codec_config: dict, codec_state: dict):
    def make(device):
        from seseme_cli.audio.codec import MimiCodec

        return MimiCodec.from_transformers(codec_config, codec_state, device=device)

    return make


def load_transformers_folder(folder: Path) -> Checkpoint:
    config_file = folder / "config.json"
    config_json = cfgs.read_config_json(config_file)
    with _in(config_file):
        config = cfgs.from_transformers_config(config_json)
        codec_config = cfgs.transformers_codec_config(config_json)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsNotFound(f"{folder} has a config.json but no *.safetensors weights")
    state = read_safetensors(files)
    with _in(_describe(files)):
        weights, codec_state = rename_transformers(state)
        check_weights(weights, config)
    if not codec_state:
        raise WeightsNotFound(f"{folder} holds no codec_model.* (Mimi) weights")
    if not has_tokenizer_files(folder):
        raise WeightsNotFound(f"{folder} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return Checkpoint(
        config=config,
        weights=weights,
        tokenizer=HFTokenizer(folder),
        make_codec=_codec_from_transformers(codec_config, codec_state),
        description=f"{folder} (transformers format)",
    )


def _find_mimi_file(folder: Path) -> Path:
    local = [folder / MIMI_FILE, *sorted(folder.glob("*mimi*.safetensors"))]
    for path in local:
        if path.exists():
            return path
    return Path(hub_file(MIMI_REPO, MIMI_FILE, "the Mimi codec weights for an original-format checkpoint"))


def _original_tokenizer(folder: Path):
    if has_tokenizer_files(folder):
        return HFTokenizer(folder)
    return HFTokenizer(hub_folder(LLAMA_TOKENIZER_REPO, ["tokenizer*", "special_tokens_map.json"], "the Llama-3.2 tokenizer"))


def _original_state(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The stored tensors of an original-format checkpoint (a file, or a folder) and where they came from."""
    if path.is_file():
        return _read_weights_file(path), str(path)
    if (path / "ckpt.pt").exists():
        return read_torch_checkpoint(path / "ckpt.pt"), str(path / "ckpt.pt")
    files = [f for f in sorted(path.glob("*.safetensors")) if "mimi" not in f.name and f.name != MIMI_FILE]
    if not files:
        raise WeightsNotFound(f"{path} holds no CSM weights (ckpt.pt, or *.safetensors besides Mimi's)")
    return read_safetensors(files), _describe(files)


def load_original(path: Path) -> Checkpoint:
    folder = path if path.is_dir() else path.parent
    config_file = folder / "config.json"
    config_json = cfgs.read_config_json(config_file) if config_file.exists() else {}
    with _in(config_file):
        config = cfgs.from_original_config(config_json)
    state, source = _original_state(path)
    with _in(source):
        weights = rename_original(state, config)
        check_weights(weights, config)
    mimi_file = _find_mimi_file(folder)

    def make_codec(device):
        from seseme_cli.audio.codec import MimiCodec

        return MimiCodec.from_moshi_file(mimi_file, num_codebooks=config.num_codebooks, device=device)

    return Checkpoint(config, weights, _original_tokenizer(folder), make_codec, f"{path} (original format)")


def load_random(name: str, seed: int = 0) -> Checkpoint:
    config = cfgs.tiny() if name == "tiny-random" else cfgs.csm_1b()
    size = "tiny" if name == "tiny-random" else "full"

    def make_codec(device):
        from seseme_cli.audio.codec import MimiCodec

        return MimiCodec.random(size, seed=seed, num_codebooks=config.num_codebooks, device=device)

    return Checkpoint(config, None, ByteTokenizer(), make_codec, f"{name} (RANDOM WEIGHTS: the audio is noise, not speech)", seed)


# --- Hugging Face hub -----------------------------------------------------------------------------------

def _hub_error(repo: str, what: str, err: Exception) -> WeightsNotFound:
    return WeightsNotFound(
        f"{what} ({repo}) is not in the Hugging Face cache and could not be downloaded "
        f"({type(err).__name__}). Online: accept the model's licence on huggingface.co/{repo}, run "
        f"`huggingface-cli login`, and retry; offline: pass --model PATH to a local checkpoint, or --model random "
        f"to run the pipeline with random weights"
    )


def hub_folder(repo: str, patterns: list[str], what: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as err:
        raise _hub_error(repo, what, err) from None


def hub_file(repo: str, filename: str, what: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, local_files_only=True)
    except Exception:
        pass
    try:
        return hf_hub_download(repo, filename)
    except Exception as err:
        raise _hub_error(repo, what, err) from None


def _is_original(folder: Path) -> bool:
    if (folder / "ckpt.pt").exists():
        return True
    config_file = folder / "config.json"
    return config_file.exists() and "backbone_flavor" in cfgs.read_config_json(config_file)


def load_checkpoint(model: str = DEFAULT_MODEL, seed: int = 0) -> Checkpoint:
    """Resolve a `--model` value and read it (weights stay on the CPU)."""
    if model in RANDOM_MODELS:
        return load_random(model, seed)
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file():
            return load_original(path)
        if (path / "config.json").exists() and not _is_original(path):
            return load_transformers_folder(path)
        if _is_original(path) or any(path.glob("*.safetensors")):
            return load_original(path)
        raise InputError(f"{path} holds no CSM checkpoint (no config.json, ckpt.pt or *.safetensors)")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise InputError(f"unknown model {model!r}: not a local path, a Hugging Face id (owner/name), 'random' or 'tiny-random'")
    folder = hub_folder(model, ["*.json", "*.safetensors", "tokenizer*"], f"model {model}")
    return load_checkpoint(str(folder), seed)
