"""Train a small character-level GPT with splice on a synthetic corpus it generates itself.

Standalone (one process, the same global batch on one rank):

    python -m splice.examples.train_gpt

Under splice, four workers on two nodes (run each line in its own terminal):

    splice controller --world-size 4
    splice agent --controller 127.0.0.1:29400 --nproc 2 --node-id node-a -- python -m splice.examples.train_gpt
    splice agent --controller 127.0.0.1:29400 --nproc 2 --node-id node-b -- python -m splice.examples.train_gpt

Kill one worker mid-run (`kill -9 $(pgrep -f train_gpt | head -1)`) and the survivors
recover in place and keep training with world size 3. With `--device cuda` each worker
trains on its node's GPU of its index (its snapshots are then copied from the GPU into
the agent's shared memory beside training).

The corpus is made of sentences from a small seeded grammar (subject/verb agreement,
sums of small numbers, names that are repeated later in the sentence), so a model that
learns has a loss well below the corpus's unigram character entropy, which is printed
at the start. At the end rank 0 prints a text sample drawn from the trained model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import splice

# ---- data ----------------------------------------------------------------------------------

_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
_ADJS = ["red", "small", "old", "happy", "quiet", "green", "big", "lazy"]
_NOUNS = ["cat", "dog", "fox", "bird", "horse", "mouse", "frog", "owl"]
_VERBS = ["see", "chase", "like", "follow", "watch", "help"]
_PLACES = ["the park", "the river", "the forest", "the house", "the garden"]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
            "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
            "seventeen", "eighteen"]


def _noun_phrase(rng: random.Random) -> tuple[str, bool]:
    """A noun phrase and whether it is plural."""
    plural = rng.random() < 0.4
    noun = rng.choice(_NOUNS)
    noun = noun + ("es" if noun.endswith("x") else "s") if plural else noun
    det = rng.choice(["the", "some", "two"]) if plural else rng.choice(["the", "a"])
    return f"{det} {rng.choice(_ADJS)} {noun}", plural


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:  # agreement: "the red fox sees two small owls."
        subj, plural = _noun_phrase(rng)
        obj, _ = _noun_phrase(rng)
        verb = rng.choice(_VERBS)
        verb = verb if plural else verb + ("es" if verb.endswith(("ch", "sh")) else "s")
        return f"{subj} {verb} {obj}."
    if kind == 1:  # arithmetic in words: "three plus five is eight."
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{_NUMBERS[a]} plus {_NUMBERS[b]} is {_NUMBERS[a + b]}."
    if kind == 2:  # a name repeated later: "alice went to the park and alice sang."
        name = rng.choice(_NAMES)
        act = rng.choice(["sang", "slept", "ran", "read", "smiled"])
        return f"{name} went to {rng.choice(_PLACES)} and {name} {act}."
    a, b = rng.sample(_NAMES, 2)  # "bob gave carol a cat, so carol has a cat."
    obj = f"{rng.choice(['a', 'the'])} {rng.choice(_NOUNS)}"
    return f"{a} gave {b} {obj}, so {b} has {obj}."


def make_corpus(num_chars: int = 200_000, seed: int = 1234) -> str:
    """A deterministic text of at least `num_chars` characters from the grammar."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < num_chars:
        s = _sentence(rng)
        parts.append(s)
        size += len(s) + 1
    return "\n".join(parts) + "\n"


def unigram_entropy(text: str) -> float:
    """Entropy (nats per character) of the corpus's character frequencies."""
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log(c / n) for c in counts.values())


class CharDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Every window of `block_size + 1` characters: (input_ids, target_ids) shifted by one."""

    def __init__(self, block_size: int = 64, num_chars: int = 200_000, seed: int = 1234
                 ) -> None:
        self.text = make_corpus(num_chars, seed)
        self.chars = sorted(set(self.text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.data = torch.tensor([self.stoi[c] for c in self.text], dtype=torch.long)
        self.block_size = block_size

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> torch.Tensor:
        return torch.tensor([self.stoi[c] for c in s], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def __len__(self) -> int:
        return len(self.data) - self.block_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk = self.data[index:index + self.block_size + 1]
        return chunk[:-1], chunk[1:]


# ---- model ---------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int = 64, layers: int = 3, heads: int = 4,
                 dim: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(block_size, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied input and output embeddings
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, time, vocab) for token ids of shape (batch, time)."""
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} exceeds block size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, num_new: int, temperature: float = 0.8,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend `idx` (1-D ids) by `num_new` sampled tokens (greedy if temperature is 0)."""
        was_training = self.training
        self.eval()
        out = idx.clone()
        for _ in range(num_new):
            logits = self(out[-self.block_size:].unsqueeze(0))[0, -1]
            if temperature <= 0:
                nxt = logits.argmax().reshape(1)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            out = torch.cat([out, nxt])
        self.train(was_training)
        return out


def make_gpt(vocab_size: int, *, block_size: int = 64, layers: int = 3, heads: int = 4,
             dim: int = 128, dropout: float = 0.1, seed: int = 0) -> GPT:
    """The model, with identical initial weights for a given seed."""
    torch.manual_seed(seed)
    return GPT(vocab_size, block_size, layers, heads, dim, dropout)


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean next-character cross-entropy over the micro-batch (nats per character)."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# ---- training ------------------------------------------------------------------------------

def worker_device(name: str) -> torch.device:
    """`cpu`, or for `cuda` this worker's GPU: its index on the node (the N of
    SPLICE_WORKER_ID=node/N) modulo the GPUs visible to it."""
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" or not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: expected cpu, or cuda on a machine with a GPU")
    index = int(os.environ.get("SPLICE_WORKER_ID", "standalone/0").rsplit("/", 1)[1])
    return torch.device("cuda", index % torch.cuda.device_count())


def on_device(loss_fn: Callable[[nn.Module, Any], torch.Tensor], device: torch.device
              ) -> Callable[[nn.Module, Any], torch.Tensor]:
    """`loss_fn` with the micro-batch moved to `device` first."""
    def moved(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return loss_fn(model, tuple(t.to(device, non_blocking=True) for t in batch))
    return moved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--ddp", action="store_true", help="wrap the model in DDP")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--sample-chars", type=int, default=100,
                   help="characters rank 0 generates at the end (0: none)")
    p.add_argument("--result", help="write the final step's result as JSON to this file")
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda: each worker of a node takes the GPU of its index "
                        "on the node (modulo the GPUs it sees); snapshots are then copied "
                        "asynchronously from the GPU")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    session = splice.init()
    device = worker_device(args.device)
    dataset = CharDataset(block_size=args.block_size)
    model = make_gpt(dataset.vocab_size, block_size=args.block_size, layers=args.layers,
                     heads=args.heads, dim=args.dim, dropout=args.dropout, seed=0).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    loss_fn = lm_loss if device.type == "cpu" else on_device(lm_loss, device)
    session.register(model=model, optimizer=optimizer, dataset=dataset, loss_fn=loss_fn,
                     global_batch_size=args.global_batch, micro_batch_size=args.micro_batch,
                     seed=0, ddp=args.ddp)
    if session.rank == 0:
        nparams = sum(p.numel() for p in model.parameters())
        print(f"corpus {len(dataset.text)} chars, vocab {dataset.vocab_size}, "
              f"unigram entropy {unigram_entropy(dataset.text):.3f} nats/char; "
              f"model {nparams / 1e6:.2f} M params; world {session.world_size}", flush=True)

    def progress(r: splice.StepResult) -> None:  # type: ignore[name-defined]
        if session.rank == 0 and (r.step % args.log_every == 0 or r.step == args.steps - 1):
            print(f"step {r.step:5d}  loss {r.loss:.4f}  world {r.world_size}  "
                  f"epoch {r.epoch}  {r.step_time_s * 1e3:.1f} ms", flush=True)

    last = session.train(args.steps, on_step=progress)
    if session.rank == 0:
        if args.result and last is not None:
            with open(args.result, "w") as f:
                json.dump({"step": last.step, "loss": last.loss,
                           "world_size": last.world_size, "epoch": last.epoch,
                           "recoveries": session.recoveries}, f)
        if args.sample_chars > 0:
            prompt = dataset.encode("\n")
            g = torch.Generator().manual_seed(0)
            out = model.cpu().generate(prompt, args.sample_chars, temperature=0.8,
                                       generator=g)
            print("sample:\n" + dataset.decode(out[1:]), flush=True)
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
