"""The log-likelihood scorer against transformers' PyTorch Llama on the real stories260K model.

Tolerance 1e-4 absolute on summed log-probs: both sides run float32; the reference log-softmax is
computed independently in torch, and sums of up to ~20 terms of float32 round-off stay far below it.
"""

import pytest
import torch
import transformers

import meditron_jax
from meditron_jax.eval import loglik
from meditron_jax.eval.loglik import LoglikScorer, length_buckets


@pytest.fixture(scope="module")
def models(shared_data):
    path = shared_data / "stories260K_hf"
    ours = meditron_jax.load(path)
    ref = transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return ours, ref


def _reference(ref, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(ref(ids).logits.float()[0], dim=-1)
    total, greedy = 0.0, True
    for j, tok in enumerate(cont):
        row = logp[len(ctx) + j - 1]
        total += float(row[tok])
        greedy &= int(row.argmax()) == tok
    return total, greedy


def test_loglik_matches_transformers(models):
    ours, ref = models
    tok = ours.tokenizer
    pairs = [
        ("Once upon a time", " there was a little girl"),
        ("Lily wanted to play", " with her ball."),
        ("The answer is:", " yes"),
        ("Tom", " and Sue went to the park to play on the swings. They had a lot of fun"),
        ("One day, a cat", " zzz qqq"),
    ]
    requests = []
    for c, x in pairs:
        ctx = tok.encode(c, bos=True)
        whole = tok.encode(c + x, bos=True)
        assert whole[: len(ctx)] == ctx
        requests.append((ctx, whole[len(ctx) :]))
    # batch 2 over 5 requests of mixed lengths: padded rows and a partly empty batch are exercised
    scorer = LoglikScorer(ours.config, ours.params, batch_size=2)
    got = scorer.score(requests)
    for (ctx, cont), res in zip(requests, got, strict=True):
        want, greedy = _reference(ref, ctx, cont)
        assert abs(res.logprob - want) < 1e-4, (res.logprob, want)
        assert res.is_greedy == greedy
        assert res.truncated == 0
    # one bucket (32) for all of them: one compiled shape
    assert scorer.shapes_compiled == {(2, 32)}
    # the greedy flag is really exercised both ways: the model's own greedy continuation is greedy
    ctx = tok.encode("Once upon a time", bos=True)
    ids = torch.tensor([ctx])
    greedy_tok = []
    with torch.no_grad():
        for _ in range(4):
            nxt = int(ref(ids).logits[0, -1].argmax())
            greedy_tok.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert scorer.score([(ctx, greedy_tok)])[0].is_greedy
    assert not got[4].is_greedy


def test_loglik_left_truncates_and_counts(models):
    ours, ref = models
    scorer = LoglikScorer(ours.config, ours.params, batch_size=1, max_length=16, buckets=(8, 16))
    ctx = ours.tokenizer.encode("Once upon a time there was a little girl named Lily who liked to play", bos=True)
    cont = ours.tokenizer.encode(" outside", bos=False)
    res = scorer.score([(ctx, cont)])[0]
    full = ctx + cont
    kept = full[len(full) - 17 :]  # 16 inputs + the last target
    assert res.truncated == len(full) - 17 > 0
    want, _ = _reference(ref, kept[: -len(cont)], cont)
    assert abs(res.logprob - want) < 1e-4


def test_logits_in_chunks_of_positions_match_transformers(models, monkeypatch):
    """The head runs on chunks of positions, skipping chunks without continuation tokens. Chunks of 8 here:
    a continuation across a chunk boundary, chunks before every continuation (skipped), a bucket of 60 (not
    a multiple of 8: padded) and an unused row of the batch."""
    monkeypatch.setattr(loglik, "POSITION_CHUNK", 8)
    monkeypatch.setattr(loglik, "WHOLE_BATCH_BYTES", 0)
    ours, ref = models
    tok = ours.tokenizer
    long_ctx = tok.encode("Once upon a time there was a little girl named Lily who liked to play outside", bos=True)
    pairs = [
        (long_ctx, tok.encode(" with her friends in the big green park", bos=False)),
        (tok.encode("Lily wanted to play", bos=True), tok.encode(" with her ball.", bos=False)),
    ]
    assert len(long_ctx) > 8 and len(pairs[0][0]) % 8 + len(pairs[0][1]) > 8  # crosses a boundary
    scorer = LoglikScorer(ours.config, ours.params, batch_size=3, max_length=60, buckets=(60,))
    for (ctx, cont), got in zip(pairs, scorer.score(pairs), strict=True):
        want, greedy = _reference(ref, ctx, cont)
        assert abs(got.logprob - want) < 1e-4 and got.is_greedy == greedy


def test_length_buckets():
    assert length_buckets(512) == (32, 64, 128, 256, 512)
    assert length_buckets(100) == (32, 64, 100)
