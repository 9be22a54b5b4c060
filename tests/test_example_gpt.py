"""The character-level GPT example: data set, model and a short one-rank training run."""

from __future__ import annotations

import torch

import splice
from splice.examples.train_gpt import CharDataset, lm_loss, make_corpus, make_gpt, unigram_entropy


def test_corpus_and_dataset_are_deterministic() -> None:
    assert make_corpus(5_000, seed=7) == make_corpus(5_000, seed=7)
    assert make_corpus(5_000, seed=7) != make_corpus(5_000, seed=8)
    a = CharDataset(block_size=16, num_chars=5_000)
    b = CharDataset(block_size=16, num_chars=5_000)
    assert len(a) == len(b) > 0
    assert a.chars == b.chars
    for i in (0, 1, 123, len(a) - 1):
        x, y = a[i]
        assert x.shape == y.shape == (16,)
        assert x.dtype == y.dtype == torch.long
        assert torch.equal(x[1:], y[:-1])  # targets are the inputs shifted by one
        bx, by = b[i]
        assert torch.equal(x, bx) and torch.equal(y, by)
    assert a.decode(a.encode("alice sang.\n")) == "alice sang.\n"
    assert 2.0 < unigram_entropy(a.text) < 4.0


def test_model_shapes_and_causality() -> None:
    model = make_gpt(30, block_size=16, layers=1, heads=2, dim=32, dropout=0.0, seed=0)
    model.eval()
    idx = torch.randint(0, 30, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 30)
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 30
    # Positions before the change must not see it.
    assert torch.allclose(model(changed)[:, :10], logits[:, :10], atol=1e-5)
    out = model.generate(idx[0, :4], 5, temperature=0.0)
    assert out.shape == (9,)


def test_short_standalone_run_learns(monkeypatch) -> None:
    monkeypatch.delenv("SPLICE_AGENT_SOCKET", raising=False)
    torch.set_num_threads(1)
    dataset = CharDataset(block_size=32, num_chars=20_000)
    model = make_gpt(dataset.vocab_size, block_size=32, layers=1, heads=2, dim=64, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    session = splice.init()
    try:
        assert session.rank == 0 and session.world_size == 1
        session.register(model=model, optimizer=optimizer, dataset=dataset, loss_fn=lm_loss,
                         global_batch_size=16, micro_batch_size=8, seed=0)
        losses: list[float] = []
        last = session.train(20, on_step=lambda r: losses.append(r.loss))
    finally:
        session.close()
    assert last is not None and last.step == 19
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
