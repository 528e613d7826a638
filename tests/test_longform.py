"""Long-form text: splitting, context carried from chunk to chunk, seamless joins; tiny model on the CPU, and
the real-size random model on a GPU."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from seseme_cli.cli import main as cli
from seseme_cli.api import load_csm_1b_optimized
from seseme_cli.ops.kernels import has_cuda_kernels
from seseme_cli.speech.longform import SpeechJob, max_chunk_chars, sentences, split_text
from seseme_cli.speech.request import SpeechRequest, Turn

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
PARAGRAPHS = (SAMPLES / "texts" / "paragraphs.txt").read_text()
FRAME = 1920
K = 32


# --- splitting --------------------------------------------------------------------------------------------------

def test_short_text_is_one_chunk_unchanged():
    assert split_text("  Hello   there.\n", 100) == ["Hello there."]
    assert split_text("", 100) == []


def test_paragraphs_split_at_sentence_ends():
    chunks = split_text(PARAGRAPHS, 105)
    assert len(chunks) > 3
    assert " ".join(chunks) == " ".join(PARAGRAPHS.split())  # nothing lost, nothing added
    assert all(len(c) <= 105 for c in chunks)
    # Chunks end at sentence ends; the two sentences longer than 105 characters are cut at a comma.
    assert sum(c[-1] == "," for c in chunks) == 2 and all(c[-1] in ".!?," for c in chunks)


def test_short_sentences_are_packed_and_lowercase_after_a_dot_does_not_split():
    text = "One. Two. Three. Mr. smith said e.g. this. Four!"
    assert split_text(text, 30) == ["One. Two. Three.", "Mr. smith said e.g. this.", "Four!"]


@pytest.mark.parametrize("text", [
    "Dr. Smith met Mr. Jones at noon.", "Take e.g. the apples and i.e. the pears.", "It costs 3.50 dollars today.",
    "J. R. R. Tolkien wrote it.", "The U.S. army arrived at 5 p.m. sharp."])
def test_abbreviations_decimals_and_initials_do_not_end_a_sentence(text):
    assert sentences(text) == [text]


def test_long_text_splits_in_linear_time_like_short_text():
    import time

    text = " ".join(f"Sentence number {i} is here, said Dr. Who at 3.5 p.m. today." for i in range(4000))  # 240 KB
    start = time.perf_counter()
    found = sentences(text)
    assert time.perf_counter() - start < 20  # pysbd alone: minutes
    assert len(found) == 4000 and found[1] == "Sentence number 1 is here, said Dr. Who at 3.5 p.m. today."


def test_sentence_ends_still_split():
    assert sentences("Hello there. How are you? Fine! Thanks.") == ["Hello there.", "How are you?", "Fine!", "Thanks."]


def test_long_sentence_splits_at_clauses_then_words():
    sentence = "first part, " * 6 + "and then a very long tail without any punctuation at all in it whatsoever."
    chunks = split_text(sentence, 40)
    assert " ".join(chunks) == sentence.strip()
    assert all(len(c) <= 40 for c in chunks)
    assert chunks[0].endswith(",")  # a clause boundary first
    word = "x" * 80
    assert split_text(f"Short. {word} end.", 20) == ["Short.", word, "end."]  # a word is never cut


def test_chunk_size_follows_chunk_ms():
    assert max_chunk_chars(10_000) > max_chunk_chars(5_000) >= 20


# --- the prompt of each chunk -----------------------------------------------------------------------------------

def test_each_chunk_is_prompted_with_the_previous_ones_and_the_oldest_are_dropped(tts):
    voice = Turn(1, "A voice.", torch.randint(0, 2048, (30, K)))
    job = SpeechJob(SpeechRequest.make(PARAGRAPHS, 0, max_audio_ms=10_000, seed=5), [voice], tts.prompts)
    window, spoken = tts.config.max_seq_len, []
    while (gen := job.next_generation()) is not None:
        tokens, mask = gen.tokens, gen.mask
        assert tokens.shape[0] + gen.max_frames <= window
        assert gen.max_frames == 10_000 // 80
        assert gen.seed == 5 + len(spoken)
        # The caller's voice turn always opens the prompt: its codes right after its text frames.
        n_text = len(tts.prompts.text_frames(voice.text, voice.speaker))
        assert torch.equal(tokens[n_text : n_text + 30, :K], voice.codes)
        audio_rows = tokens[mask[:, :K].any(dim=1), :K]
        if spoken:  # the last spoken chunk is in the prompt, as codes followed by an EOS frame
            assert torch.equal(audio_rows[-spoken[-1].shape[0] - 1 : -1], spoken[-1])
        codes = torch.randint(1, 2048, (400, K))  # long chunks, so the window fills up after a few
        spoken.append(codes)
        job.finish(codes)
    present = [any(torch.equal(tokens[i : i + 400, :K], c) for i in range(tokens.shape[0] - 399)) for c in spoken[:-1]]
    assert present[-1] and not present[0]  # the newest history stayed, the oldest was dropped
    assert len(spoken) == len(job.chunks) and job.truncated == len(spoken)


def test_a_chunk_says_how_much_of_its_prompt_the_cache_holds_from_the_chunk_before(tts):
    """`cached` frames of a chunk's prompt are what its row's cache took while the chunk before was generated
    (that prompt, then the frames fed back), less that chunk's last frame; 0 once the oldest history is dropped."""
    voice = Turn(1, "A voice.", torch.randint(0, 2048, (30, K)))
    job = SpeechJob(SpeechRequest.make(PARAGRAPHS, 0, max_audio_ms=10_000, seed=5), [voice], tts.prompts)
    previous, lengths, cached = None, [12, 0, 300, 400, 400, 400, 400, 400], []
    while (gen := job.next_generation()) is not None:
        cached.append(gen.cached)
        if previous is None:
            assert gen.cached == 0
        elif gen.cached:
            tokens, codes = previous
            fed = torch.cat([tokens, tts.prompts.audio_frames(codes).tokens[:-1]])  # the EOS frame is not fed
            assert gen.cached == len(fed) - 1 and torch.equal(gen.tokens[: gen.cached], fed[:-1])
            assert gen.prefill_rows == gen.tokens.shape[0] - gen.cached - 1
        codes = torch.randint(1, 2048, (lengths[min(len(cached) - 1, len(lengths) - 1)], K))
        previous = (gen.tokens, codes)
        job.finish(codes)
    # The short chunks (12, 0, 300 frames) keep every chunk before them; 400-frame chunks soon fill the window,
    # and a prompt that dropped the oldest chunk is never prefilled on top of one that kept it.
    assert all(cached[1:4]) and 0 in cached[4:], cached


def test_one_chunk_uses_the_plain_limits(tts):
    job = SpeechJob(SpeechRequest.make("Hello there.", max_audio_ms=30_000, seed=1), [], tts.prompts)
    gen = job.next_generation()
    assert gen.max_frames == 30_000 // 80 and len(job.chunks) == 1
    torch.testing.assert_close(gen.tokens, tts.build_prompt("Hello there.", 0)[0])


def test_prompt_fitting_is_linear_in_the_text_spoken(tts):
    # 200 KB of text used to take seconds per chunk late in the text (every prompt rebuilt from all history).
    import time

    text = " ".join(f"Sentence number {i} is here, said Dr. Who." for i in range(3000))
    job = SpeechJob(SpeechRequest.make(text, 0, max_audio_ms=10_000, seed=1), [], tts.prompts)
    assert len(job.chunks) > 1000
    codes = torch.randint(1, 2048, (40, K))
    times = []
    for i in range(len(job.chunks)):
        start = time.perf_counter()
        job.next_generation()
        job.finish(codes)
        times.append(time.perf_counter() - start)
    early, late = sorted(times[50:150])[50], sorted(times[-100:])[50]  # medians
    assert late < 5 * early + 1e-3, (early, late)


# --- generation ------------------------------------------------------------------------------------------------

def test_generate_long_text_is_seamless_and_repeatable(tts):
    audio = tts.generate(PARAGRAPHS, max_audio_length_ms=400, seed=3)
    codes = tts.last_codes
    chunks = split_text(PARAGRAPHS, max_chunk_chars(10_000))
    assert codes.shape == (len(chunks) * 5, K)  # random weights never stop: every chunk runs to its 5 frames
    assert audio.shape == (codes.shape[0] * FRAME,)
    torch.testing.assert_close(audio, tts.decode(codes))
    # Streaming repeats the codes and, concatenated, the samples (one Mimi state across chunk borders).
    streamed = torch.cat(list(tts.stream(PARAGRAPHS, max_audio_length_ms=400, seed=3)))
    assert torch.equal(tts.last_codes, codes)
    assert (streamed - audio).abs().max() <= 1e-5 * audio.abs().max()


def test_say_speaks_a_long_file_whole(tmp_path):
    out, codes_path = tmp_path / "story.wav", tmp_path / "story.npy"
    result = CliRunner().invoke(cli.app, [
        "say", "--file", str(SAMPLES / "texts" / "paragraphs.txt"), "-o", str(out), "--codes", str(codes_path),
        "--model", "tiny-random", "--device", "cpu", "--max-audio-ms", "160", "--seed", "2", "--chunk-ms", "20000"])
    assert result.exit_code == 0, result.output
    n_chunks = len(split_text(PARAGRAPHS, max_chunk_chars(20_000)))
    codes = np.load(codes_path)
    assert n_chunks > 2 and codes.shape == (2 * n_chunks, K)
    assert sf.info(out).frames == codes.shape[0] * FRAME
    assert "chunk limit" in result.stderr  # random weights never end a chunk: the user is told


# --- GPU: the real-size random model ----------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda_kernels(), reason="needs a GPU and the CUDA kernels")
def test_long_form_real_size_random_gpu():
    big = load_csm_1b_optimized("random", device="cuda")
    audio = big.generate(PARAGRAPHS, max_audio_length_ms=2000, seed=1)
    codes = big.last_codes
    n = len(split_text(PARAGRAPHS, max_chunk_chars(10_000)))
    assert codes.shape[0] <= n * 25 and codes.shape[0] >= n  # each chunk: 1..25 frames
    assert audio.shape == (codes.shape[0] * FRAME,) and torch.isfinite(audio).all()
    streamed = torch.cat(list(big.stream(PARAGRAPHS, max_audio_length_ms=2000, seed=1)))
    assert torch.equal(big.last_codes, codes)  # the engine is deterministic for a seed
    assert (streamed - audio).abs().max() <= 1e-3 * audio.abs().max()
