"""Shared fixtures: tiny CSM checkpoints built by transformers (an implementation nobody here wrote)."""

from __future__ import annotations

import gc

import pytest
import torch

# Tiny models run one op at a time: OpenMP threads only fight over CI's two cores (measured: a tiny attention
# call took 16 ms with 2 threads and 0.05 ms with 1).
torch.set_num_threads(1)

TEXT_VOCAB = 264  # the tiny flavors' text vocabulary (256 bytes + specials)


def tiny_mimi_config():
    from transformers import MimiConfig

    return MimiConfig(
        hidden_size=32, num_filters=4, upsample_groups=32, codebook_dim=16, vector_quantization_hidden_dimension=16,
        num_hidden_layers=1, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
        num_quantizers=32, codebook_size=2048,
    )


def tiny_csm_config(tie_codebooks_embeddings: bool = False):
    """transformers CsmConfig with the same shapes as seseme's tiny flavors and csm-1b's RoPE scaling."""
    from transformers import CsmConfig

    backbone_rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 0.125, "high_freq_factor": 0.5,
                     "original_max_position_embeddings": 1024}
    depth_rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1 / 512, "high_freq_factor": 1 / 128,
                  "original_max_position_embeddings": 16}
    depth = dict(num_codebooks=32, backbone_hidden_size=64, vocab_size=2051, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=33,
                 rope_theta=500000, rope_scaling=depth_rope, initializer_range=0.1)
    return CsmConfig(
        num_codebooks=32, vocab_size=2051, text_vocab_size=TEXT_VOCAB, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        rope_theta=500000, rope_scaling=backbone_rope, depth_decoder_config=depth, codec_config=tiny_mimi_config().to_dict(),
        pad_token_id=262, bos_token_id=256, audio_token_id=260, audio_eos_token_id=261, initializer_range=0.1,
        tie_codebooks_embeddings=tie_codebooks_embeddings,
    )


def byte_level_tokenizer():
    """A real Hugging Face fast tokenizer (byte-level, no merges) with Llama-3's special token names."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|begin_of_text|>"], vocab["<|end_of_text|>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def fill_mimi_codebooks(codec_model, seed: int = 0) -> None:
    """Randomly initialised transformers Mimi has all-zero codebooks; give it usable ones."""
    g = torch.Generator().manual_seed(seed)
    for name, buf in codec_model.named_buffers():
        if name.endswith("embed_sum"):
            buf.copy_(torch.randn(buf.shape, generator=g))
        elif name.endswith("cluster_usage"):
            buf.fill_(1.0)


def make_transformers_model(seed: int = 0, tie_codebooks_embeddings: bool = False):
    from transformers import CsmForConditionalGeneration

    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(tiny_csm_config(tie_codebooks_embeddings)).eval()
    fill_mimi_codebooks(model.codec_model, seed)
    return model


@pytest.fixture(autouse=True)
def collector_as_it_was():
    """The server, batch and replica set-ups freeze the collector's heap (engine.collector): undone after each
    test, so one test's frozen objects are not kept for the whole session."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.fixture(scope="module")
def tts():
    """The tiny random model on the CPU, one per test module."""
    from seseme_cli.api import load_csm_1b_optimized

    return load_csm_1b_optimized("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """(transformers model, folder it was saved to in the transformers format, with tokenizer files)."""
    model = make_transformers_model(seed=0)
    folder = tmp_path_factory.mktemp("tiny-csm-transformers")
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return model, folder


def assert_allocates_nothing(step, repeats: int = 3, warm_up_on_side_stream: bool = False) -> None:
    """Warm step up once (on a side stream when a graph capture will follow, as capture wants), then run it
    `repeats` more times: the caching allocator must not be asked for any memory (a kernel path with its
    outputs and workspaces given allocates nothing)."""
    if warm_up_on_side_stream:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
    else:
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before, "the steady state allocated"


class FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are in: a disk that fills up."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        import errno
        import os

        if self.room < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def serve_in_thread(service, settings):
    """A real uvicorn server for `service` on a free loopback port, in a daemon thread: (server, thread, url)."""
    import threading
    import time

    from seseme_cli.server.app import create_app
    from seseme_cli.server.http import make_server

    server = make_server(create_app(service, settings), service, "127.0.0.1", 0, 5, log_level="warning",
                         access_log=False)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{server.port}"
