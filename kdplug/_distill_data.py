"""Data for ``kdplug distill``: the embedded corpus, its tokenizer, and batches.

Two layouts:

- **stream** (the default corpus and plain-text files): documents are joined with an
  end-of-text token into one token stream, cut into blocks of ``4 * seq_len`` tokens; every 10th
  block is held out. Training batches are windows of ``seq_len`` tokens at random offsets in the
  training blocks; the held-out set is the held-out blocks cut into consecutive windows.
- **records** (JSONL files): one sequence per line, truncated to ``seq_len`` and right-padded
  (padding and, for ``{"prompt", "completion"}`` records, the prompt get label -100, so only the
  completion is distilled); a sequence never attends to another record. Every 20th record is
  held out. A line is ``{"text": ...}`` (``--text-field`` names another key) or
  ``{"prompt": ..., "completion": ...}``.

Batches are drawn from a generator seeded by ``--seed``, identically on every rank; rank ``r`` of
``W`` takes rows ``[r * B / W, (r + 1) * B / W)`` of the global batch ``B``, so a DDP run sees the
same global batches as a single process.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

EOS = "<|endoftext|>"
HOLD_OUT_EVERY = 10        # stream layout: every 10th block is held out
RECORD_HOLD_OUT_EVERY = 20  # records layout: every 20th record


# ---------------------------------------------------------------------------------------------
# Text sources
def default_documents(quick: bool = False) -> list[str]:
    """CPython's help topics (``pydoc_data.topics``, ~465 KB of English), in sorted key order."""
    from pydoc_data.topics import topics
    keys = sorted(topics)
    if quick:
        keys = keys[::8]
    return [topics[k] for k in keys]


@dataclass
class Record:
    text: str
    prompt: str = ""


def read_data_file(path: str, text_field: str = "text") -> tuple[str, list[Record]]:
    """``("stream", [one record])`` for a text file, ``("records", [...])`` for JSONL."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data: no such file: {path}")
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if path.endswith((".jsonl", ".json")):
        records = []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--data {path}: line {number} is not JSON ({exc.msg})") from None
            if isinstance(obj, dict) and text_field in obj:
                records.append(Record(str(obj[text_field])))
            elif isinstance(obj, dict) and "prompt" in obj and "completion" in obj:
                records.append(Record(str(obj["completion"]), prompt=str(obj["prompt"])))
            else:
                keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"--data {path}: line {number} has no {text_field!r} field and is not a "
                                 f"{{'prompt', 'completion'}} record (it has: {keys}); pass --text-field")
        if len(records) < 2:
            raise ValueError(f"--data {path}: needs at least 2 records, found {len(records)}")
        return "records", records
    if not content.strip():
        raise ValueError(f"--data {path}: the file is empty")
    return "stream", [Record(content)]


def text_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Tokenizers
class Tokenizer:
    """The two operations distill needs, over HF ``tokenizers`` or a ``transformers`` tokenizer."""

    def __init__(self, backend, eos_id: int, vocab_size: int):
        self.backend, self.eos_id, self.vocab_size = backend, eos_id, vocab_size

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if hasattr(self.backend, "encode_batch"):              # tokenizers.Tokenizer
            return [e.ids for e in self.backend.encode_batch(texts)]
        return [self.backend(t, add_special_tokens=False)["input_ids"] for t in texts]

    @classmethod
    def train_bpe(cls, texts: list[str], vocab_size: int) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, tok.token_to_id(EOS), tok.get_vocab_size())

    @classmethod
    def load_file(cls, path: str) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        tok = HFTokenizer.from_file(path)
        return cls(tok, tok.token_to_id(EOS), tok.get_vocab_size())

    def save(self, path: str) -> None:
        self.backend.save(path)

    @classmethod
    def from_pretrained(cls, directory: str) -> "Tokenizer":
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(directory)
        except Exception as exc:
            raise ValueError(f"--teacher {directory}: could not load its tokenizer ({exc})") from None
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
        if eos is None:
            raise ValueError(f"--teacher {directory}: its tokenizer has no eos or pad token to separate documents")
        return cls(tok, int(eos), len(tok))


# ---------------------------------------------------------------------------------------------
# Token data and batches
@dataclass
class Batch:
    input_ids: torch.Tensor       # [b, L]
    attention_mask: torch.Tensor  # [b, L]
    labels: torch.Tensor          # [b, L], -100 = no loss (unshifted, HF convention)

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    def rows(self, start: int, stop: int) -> "Batch":
        return Batch(self.input_ids[start:stop], self.attention_mask[start:stop], self.labels[start:stop])


class TokenData:
    """Training sampler and held-out set over tokenized text (see the module docstring)."""

    def __init__(self, layout: str, records: list[Record], tokenizer: Tokenizer, seq_len: int,
                 max_eval_sequences: int):
        self.layout, self.seq_len = layout, seq_len
        eos = tokenizer.eos_id
        if layout == "stream":
            ids: list[int] = []
            for doc in tokenizer.encode_batch([r.text for r in records]):
                ids.extend(doc)
                ids.append(eos)
            stream = torch.tensor(ids, dtype=torch.long)
            block = 4 * seq_len
            n_blocks = len(stream) // block
            if n_blocks < HOLD_OUT_EVERY:
                raise ValueError(f"--data: {len(stream)} tokens are too few for --seq-len {seq_len} "
                                 f"(need at least {HOLD_OUT_EVERY * block})")
            blocks = stream[: n_blocks * block].view(n_blocks, block)
            held = torch.arange(n_blocks) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
            self.train_stream = torch.cat([blocks[~held].reshape(-1), stream[n_blocks * block:]])
            eval_rows = blocks[held].reshape(-1, seq_len)[:max_eval_sequences]
            self.eval = Batch(eval_rows, torch.ones_like(eval_rows), eval_rows.clone())
            self.total_tokens = len(stream)
            self.train_tokens = len(self.train_stream)
        else:
            prompts = tokenizer.encode_batch([r.prompt for r in records])
            texts = tokenizer.encode_batch([r.text for r in records])
            rows = [self._record_row(p, t, eos) for p, t in zip(prompts, texts)]
            held = [i % RECORD_HOLD_OUT_EVERY == RECORD_HOLD_OUT_EVERY - 1 for i in range(len(rows))]
            if not any(held):
                held[-1] = True
            train = [r for r, h in zip(rows, held) if not h]
            test = [r for r, h in zip(rows, held) if h][:max_eval_sequences]
            self.train_rows = Batch(*[torch.stack([r[i] for r in train]) for i in range(3)])
            self.eval = Batch(*[torch.stack([r[i] for r in test]) for i in range(3)])
            self.total_tokens = sum(len(p) + len(t) for p, t in zip(prompts, texts))
            self.train_tokens = int(self.train_rows.attention_mask.sum())
        self.eval_tokens = int((self.eval.labels[:, 1:] != -100).sum())

    def _record_row(self, prompt: list[int], text: list[int], eos: int):
        ids = (prompt + text + [eos])[: self.seq_len]
        labels = ([-100] * len(prompt) + text + [eos])[: self.seq_len]
        pad = self.seq_len - len(ids)
        mask = [1] * len(ids) + [0] * pad
        ids = ids + [eos] * pad
        labels = labels + [-100] * pad
        return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)

    def sampler(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        """Yields this rank's share of each global batch, forever."""
        if batch_size % world_size:
            raise ValueError(f"--batch-size {batch_size} must be divisible by the number of processes ({world_size})")
        g = torch.Generator().manual_seed(seed)
        lo, hi = rank * batch_size // world_size, (rank + 1) * batch_size // world_size
        while True:
            if self.layout == "stream":
                starts = torch.randint(0, len(self.train_stream) - self.seq_len, (batch_size,), generator=g)
                ids = torch.stack([self.train_stream[s: s + self.seq_len] for s in starts[lo:hi].tolist()])
                yield Batch(ids, torch.ones_like(ids), ids.clone())
            else:
                picks = torch.randint(0, self.train_rows.input_ids.shape[0], (batch_size,), generator=g)[lo:hi]
                yield Batch(self.train_rows.input_ids[picks], self.train_rows.attention_mask[picks],
                            self.train_rows.labels[picks])
