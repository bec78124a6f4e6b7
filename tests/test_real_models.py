"""The real trained stories260K model and the real Llama-2 tokenizer, against independent references:
transformers' PyTorch Llama, llama2.c's golden output, and sentencepiece ids recorded by llama2.c."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import meditron_jax
from meditron_jax.data.vocabulary import CHATML_TOKENS, MEDITRON_EXTRA_TOKENS, Tokenizer
from meditron_jax.infer.generate import generate_ids

from .hf_utils import hf_logits


@pytest.fixture(scope="module")
def stories(shared_data):
    return meditron_jax.load(shared_data / "stories260K_hf")


@pytest.fixture(scope="module")
def stories_hf(shared_data):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(
        str(shared_data / "stories260K_hf"), dtype=torch.float32
    ).eval()


def test_stories260k_logits_match_transformers(stories, stories_hf):
    ids = stories.tokenizer.encode("Once upon a time, there was a little girl named Lily.")
    tokens = np.array([ids, ids[::-1]])
    ours = stories.logits(tokens)
    assert ours.dtype == np.float32 and ours.shape == (2, len(ids), 512)
    assert np.abs(ours - hf_logits(stories_hf, tokens)).max() <= 1e-4


@pytest.mark.slow
def test_stories260k_greedy_continuation_matches_transformers(stories, stories_hf):
    prompt = stories.tokenizer.encode("Once upon a time")
    with torch.no_grad():
        ref = stories_hf.generate(
            torch.tensor([prompt]), max_new_tokens=60, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    ours = generate_ids(stories.config, stories.params, [prompt], max_new_tokens=60, eos_id=-1)[0]
    assert ours == ref


@pytest.mark.slow
def test_stories260k_matches_llama2c_golden(stories, shared_data):
    golden = (shared_data / "goldens" / "stories260K_expected_greedy_200.txt").read_text()
    # run.c -t 0 -n 200 from BOS: 200 greedy tokens, printed without BOS.
    out = generate_ids(stories.config, stories.params, [[1]], max_new_tokens=200, eos_id=-1)[0]
    assert stories.tokenizer.decode(out) == golden


@pytest.mark.slow
def test_generate_batch_of_text_prompts(stories):
    outs = stories.generate(["Once upon a time", "Lily"], max_new_tokens=20)
    alone = stories.generate(["Lily"], max_new_tokens=20)
    assert outs[0].startswith(", there was a little girl named Lily")
    assert outs[1] == alone[0]  # padding in a batch changes nothing
    sampled = stories.generate(["Once upon a time"] * 2, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=1)
    assert sampled != [outs[0], outs[0]]
    assert sampled == stories.generate(["Once upon a time"] * 2, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=1)


def test_api_errors(stories, tmp_path):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
        stories.logits([[1, 600]])
    with pytest.raises(TypeError, match="takes a list of prompts"):
        stories.generate("Once upon a time")
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        stories.generate(["Once"], max_new_tokens=600)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        meditron_jax.load(tmp_path / "nope")


def test_llama2_tokenizer_goldens(shared_data):
    tok = Tokenizer(shared_data / "llama2_tokenizer" / "tokenizer.model")
    cases = json.loads((shared_data / "goldens" / "llama2_tokenizer_expected_ids.json").read_text())["cases"]
    assert len(cases) == 5
    for case in cases:
        assert tok.encode(case["prompt"], bos=True) == case["expected_ids"], case["prompt"]
        assert tok.decode(case["expected_ids"]) == case["prompt"]
    assert tok.seqio_vocabulary.vocab_size == 32000
    for case in cases:  # SeqIO's own loading of the same model file encodes alike (without BOS)
        assert tok.seqio_vocabulary.encode(case["prompt"]) == case["expected_ids"][1:], case["prompt"]


def test_the_tokenizer_does_not_import_tensorflow(shared_data):
    """Generation and evaluation tokenize without SeqIO, whose import costs TensorFlow's (~9 s a process)."""
    code = (
        "import sys; from meditron_jax.data.vocabulary import Tokenizer; "
        f"t = Tokenizer.from_dir({str(shared_data / 'stories260K_hf')!r}); "
        "assert t.decode(t.encode('Once upon a time')) == 'Once upon a time'; "
        "print(sorted(m for m in ('tensorflow', 'seqio') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_meditron_added_tokens(shared_data):
    tok = Tokenizer(shared_data / "llama2_tokenizer" / "tokenizer.model", extra_tokens=MEDITRON_EXTRA_TOKENS)
    assert tok.vocab_size == 32017
    ids = tok.encode("see [bib_ref] Smith [/bib_ref] here", bos=False)
    assert ids.count(32000 + MEDITRON_EXTRA_TOKENS.index("[bib_ref]")) == 1
    assert ids.count(32000 + MEDITRON_EXTRA_TOKENS.index("[/bib_ref]")) == 1
    assert tok.decode(ids) == "see [bib_ref] Smith [/bib_ref] here"
    chat = Tokenizer(
        shared_data / "llama2_tokenizer" / "tokenizer.model", extra_tokens=MEDITRON_EXTRA_TOKENS + CHATML_TOKENS
    )
    text = "<|im_start|>question\nWhat is 2+2?<|im_end|>\n<|im_start|>answer\n"
    chat_ids = chat.encode(text, bos=False)
    assert chat_ids[0] == 32017 and chat_ids.count(32018) == 1 and chat.decode(chat_ids) == text
    with pytest.raises(ValueError, match="outside the vocabulary of 32017"):
        tok.decode([32017])
