"""The engine of ``kdplug distill``: teacher (trained and cached, or loaded), students, the
distillation loop, held-out evaluation, ``results.json`` and the curves PNG.

All students train in lockstep: each step draws one batch, runs the teacher once, and gives the
same batch and the same teacher logits to every student (the CE baseline included), which start
from the same initial weights and use the same optimizer, learning-rate schedule and gradient
clipping. A method's ``train_s`` and tokens/s count only its own student's forward, loss,
backward and optimizer step; the shared teacher forward is reported separately.

Under ``torchrun`` each rank holds ``batch_size / world_size`` rows of every global batch; the
losses are normalised by the global target-token count (``num_items``) and multiplied by the
world size before DDP averages the gradients, which makes the update that of the one big batch.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

from ._distill_data import Batch, Tokenizer, TokenData, default_documents, read_data_file, text_digest
from ._distill_loss import shifted_kd_ce

CACHE_VERSION = 1
BASELINE = "ce"


@dataclasses.dataclass
class ModelShape:
    layers: int
    width: int
    heads: int
    dropout: float = 0.0


@dataclasses.dataclass
class Config:
    """Everything a run depends on (``results.json`` records it)."""
    methods: list[tuple[str, dict]]       # (method name, params); BASELINE has no params
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    lr_schedule: str = "cosine"
    student_warmup: int | None = None     # None: auto_warmup for a randomly initialised student, else 0
    auto_warmup: int = 150
    seed: int = 0
    temperature: float = 1.0
    kd_ratio: float = 1.0
    vocab_size: int = 1024
    teacher_shape: ModelShape = dataclasses.field(default_factory=lambda: ModelShape(4, 256, 4, 0.1))
    student_shape: ModelShape = dataclasses.field(default_factory=lambda: ModelShape(2, 128, 4, 0.0))
    teacher_steps: int = 600
    teacher_lr: float = 1e-3
    eval_every: int = 25
    max_eval_sequences: int = 96
    curve_sequences: int = 32
    quick: bool = False
    teacher_dir: str | None = None
    student_dir: str | None = None
    data: str | None = None
    text_field: str = "text"
    cache_dir: str | None = None
    retrain_teacher: bool = False
    device: str = "auto"
    backend: str = "auto"
    progress: bool = True


QUICK = dict(steps=12, batch_size=8, seq_len=32, vocab_size=320, teacher_steps=40, teacher_lr=3e-3, lr=3e-3, auto_warmup=6,
             teacher_shape=ModelShape(1, 48, 2, 0.0), student_shape=ModelShape(1, 24, 2, 0.0),
             eval_every=4, max_eval_sequences=16, curve_sequences=8)


# ---------------------------------------------------------------------------------------------
# Processes and devices
class Dist:
    def __init__(self, device_arg: str):
        import torch.distributed as dist
        self.dist = dist
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        if device_arg == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
            self.device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.enabled = self.world_size > 1
        self.owns_group = False
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            self.dist.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            self.dist.all_reduce(t)
        return t

    def close(self):
        if self.owns_group:
            self.dist.destroy_process_group()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def log(dist: Dist, message: str) -> None:
    if dist.main:
        print(message, file=sys.stderr, flush=True)


def _bar(dist: Dist, cfg: Config, total: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not (cfg.progress and dist.main), file=sys.stderr,
                dynamic_ncols=True, leave=True, mininterval=1.0)


# ---------------------------------------------------------------------------------------------
# Models
def gpt2(shape: ModelShape, vocab_size: int, seq_len: int, eos_id: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=vocab_size, n_positions=seq_len, n_embd=shape.width, n_layer=shape.layers,
                        n_head=shape.heads, resid_pdrop=shape.dropout, embd_pdrop=shape.dropout,
                        attn_pdrop=shape.dropout, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                        use_cache=False)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def _has_weights(directory: str) -> bool:
    names = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    return any(os.path.isfile(os.path.join(directory, n)) for n in names)


def load_model(directory: str, flag: str, seed: int, require_weights: bool):
    """A causal LM from a local HF directory: its weights, or (``--student`` only) a fresh model
    from its ``config.json``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if not os.path.isdir(directory):
        raise ValueError(f"{flag} {directory}: not a directory (a local Hugging Face model directory is expected)")
    try:
        if _has_weights(directory):
            return AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32), "pretrained"
        if require_weights:
            raise ValueError("no model.safetensors or pytorch_model.bin in it")
        config = AutoConfig.from_pretrained(directory)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config), "config (random init)"
    except ValueError as exc:
        raise ValueError(f"{flag} {directory}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - report any loader failure against the flag
        raise ValueError(f"{flag} {directory}: could not load a causal LM ({type(exc).__name__}: {exc})") from None


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def max_positions(model) -> int | None:
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def describe(model) -> str:
    c = model.config
    layers = getattr(c, "num_hidden_layers", getattr(c, "n_layer", "?"))
    width = getattr(c, "hidden_size", getattr(c, "n_embd", "?"))
    return f"{type(model).__name__.replace('LMHeadModel', '').replace('ForCausalLM', '')} {layers}x{width}"


def lr_lambda(steps: int, schedule: str = "cosine"):
    """Linear warmup over the first 5% of the steps, then cosine decay to 10% or constant."""
    warmup = max(1, steps // 20)

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def optimizer(model, lr: float, steps: int, schedule: str = "cosine"):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, schedule))


def _wrap(model, dist: Dist):
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)


def _logits(model, batch: Batch):
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def _global_counts(batch: Batch, dist: Dist) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(target tokens, sequences, input tokens) of the global batch."""
    counts = torch.tensor([int((batch.labels[:, 1:] != -100).sum()), batch.labels.shape[0],
                           int(batch.attention_mask.sum())], dtype=torch.int64, device=dist.device)
    dist.sum_(counts)
    return counts[0], counts[1], int(counts[2])


# ---------------------------------------------------------------------------------------------
# The default teacher (trained once, cached)
def cache_root(cfg: Config) -> str:
    if cfg.cache_dir:
        return cfg.cache_dir
    if os.environ.get("KDPLUG_CACHE_DIR"):
        return os.environ["KDPLUG_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kdplug")


def teacher_key(cfg: Config, digest: str) -> str:
    import transformers
    spec = dict(version=CACHE_VERSION, corpus=digest, vocab=cfg.vocab_size, seq_len=cfg.seq_len,
                shape=dataclasses.asdict(cfg.teacher_shape), steps=cfg.teacher_steps, lr=cfg.teacher_lr,
                batch=cfg.batch_size, seed=cfg.seed, transformers=transformers.__version__.split(".")[0])
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def train_lm(model, data: TokenData, cfg: Config, dist: Dist, steps: int, lr: float, desc: str,
             seed_offset: int = 1) -> list[float]:
    """Plain next-token training (the default teacher; the students' shared hard-label warm-up)."""
    model.to(dist.device).train()
    wrapped = _wrap(model, dist)
    opt, sched = optimizer(model, lr, steps)
    batches = data.sampler(cfg.batch_size, cfg.seed + seed_offset, dist.rank, dist.world_size)
    losses = []
    with _bar(dist, cfg, steps, desc) as bar:
        for step in range(steps):
            batch = next(batches).to(dist.device)
            tokens, sequences, _ = _global_counts(batch, dist)
            loss, _, ce = shifted_kd_ce(_logits(wrapped, batch), None, batch.labels, None, kd_ratio=0.0,
                                        num_tokens=tokens, num_sequences=sequences)
            (loss * dist.world_size).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(dist.sum_(ce.clone())))
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def lm_perplexity(model, rows: Batch, dist: Dist, chunk: int = 16) -> float:
    nll = torch.zeros(2, dtype=torch.float64, device=dist.device)
    for i in range(0, rows.input_ids.shape[0], chunk):
        b = rows.rows(i, i + chunk).to(dist.device)
        logits = _logits(model, b)[:, :-1]
        y = b.labels[:, 1:]
        nll[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum")
        nll[1] += (y != -100).sum()
    dist.sum_(nll)
    return float(torch.exp(nll[0] / nll[1].clamp_min(1)))


def default_teacher(cfg: Config, dist: Dist, layout: str, records, digest: str, timings: dict):
    """Tokenizer + teacher from the cache, or trained now and cached. Returns (tokenizer, teacher, data, info)."""
    root = cache_root(cfg)
    entry = os.path.join(root, f"teacher-{teacher_key(cfg, digest)}")
    hit = os.path.isfile(os.path.join(entry, "meta.json")) and not cfg.retrain_teacher
    t0 = time.perf_counter()
    if hit:
        tokenizer = Tokenizer.load_file(os.path.join(entry, "tokenizer.json"))
        from transformers import GPT2LMHeadModel
        teacher = GPT2LMHeadModel.from_pretrained(os.path.join(entry, "model")).to(dist.device).eval()
        with open(os.path.join(entry, "meta.json")) as f:
            meta = json.load(f)
        data = TokenData(layout, records, tokenizer, cfg.seq_len, cfg.max_eval_sequences)
        timings["tokenizer_s"] = 0.0
        timings["teacher_train_s"] = 0.0
        log(dist, f"kdplug distill: cached teacher {entry} (trained in {meta['train_s']:.0f} s, "
                  f"held-out perplexity {meta['perplexity']:.2f})")
        return tokenizer, teacher, data, dict(meta, cached=True, path=entry)

    log(dist, f"kdplug distill: training the default teacher once (cached in {entry})")
    staging = None
    if dist.main:
        os.makedirs(root, exist_ok=True)
        staging = tempfile.mkdtemp(prefix="staging-", dir=root)
        tokenizer = Tokenizer.train_bpe([r.prompt + r.text for r in records], cfg.vocab_size)
        tokenizer.save(os.path.join(staging, "tokenizer.json"))
    if dist.enabled:  # the other ranks load rank 0's tokenizer
        box = [staging]
        dist.dist.broadcast_object_list(box, src=0)
        staging = box[0]
        if not dist.main:
            tokenizer = Tokenizer.load_file(os.path.join(staging, "tokenizer.json"))
    timings["tokenizer_s"] = time.perf_counter() - t0
    data = TokenData(layout, records, tokenizer, cfg.seq_len, cfg.max_eval_sequences)
    teacher = gpt2(cfg.teacher_shape, tokenizer.vocab_size, cfg.seq_len, tokenizer.eos_id, cfg.seed)
    t1 = time.perf_counter()
    losses = train_lm(teacher, data, cfg, dist, cfg.teacher_steps, cfg.teacher_lr, "teacher")
    train_s = time.perf_counter() - t1
    timings["teacher_train_s"] = train_s
    ppl = _sharded_ppl(teacher, data.eval, dist)
    meta = dict(perplexity=ppl, train_s=train_s, steps=cfg.teacher_steps, final_train_loss=losses[-1],
                params=n_params(teacher), shape=dataclasses.asdict(cfg.teacher_shape), vocab_size=tokenizer.vocab_size,
                world_size=dist.world_size, tokens=data.total_tokens)
    if dist.main:
        teacher.save_pretrained(os.path.join(staging, "model"))
        with open(os.path.join(staging, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.isdir(entry):
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(staging, entry)
        except OSError:  # another run cached it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    log(dist, f"kdplug distill: teacher trained in {train_s:.0f} s, held-out perplexity {ppl:.2f}")
    return tokenizer, teacher, data, dict(meta, cached=False, path=entry)


def _shard(rows: Batch, dist: Dist) -> Batch:
    idx = torch.arange(dist.rank, rows.input_ids.shape[0], dist.world_size)
    return Batch(rows.input_ids[idx], rows.attention_mask[idx], rows.labels[idx])


def _sharded_ppl(model, rows: Batch, dist: Dist) -> float:
    return lm_perplexity(model, _shard(rows, dist), dist)


# ---------------------------------------------------------------------------------------------
# Students
@dataclasses.dataclass
class Student:
    name: str
    params: dict
    loss_fn: Any            # KDLoss, or None for the CE baseline
    kd_ratio: float
    model: Any
    wrapped: Any
    opt: Any
    sched: Any
    train_s: float = 0.0
    tokens: int = 0
    curve_steps: list = dataclasses.field(default_factory=list)
    curve_kl: list = dataclasses.field(default_factory=list)
    curve_own: list = dataclasses.field(default_factory=list)
    curve_train: list = dataclasses.field(default_factory=list)
    train_window: list = dataclasses.field(default_factory=list)
    final: dict | None = None

    @property
    def label(self) -> str:
        return "ce (hard labels)" if self.loss_fn is None else self.name

    def extra(self, rows: int, device) -> dict:
        if self.loss_fn is not None and getattr(self.loss_fn.recipe, "by", None) == "student_generated":
            # distill trains on teacher-written (or human) text only: no on-policy generation.
            return {"student_generated": torch.zeros(rows, dtype=torch.bool, device=device)}
        return {}


def build_loss(name: str, params: dict, cfg: Config):
    import kdplug
    params = dict(params)
    if name == "taid" and "total_steps" not in params:
        params["total_steps"] = cfg.steps  # TAID's linear floor reaches t_end at the last step
    return kdplug.get(name, temperature=cfg.temperature, backend=cfg.backend, **params)


# ---------------------------------------------------------------------------------------------
# Evaluation
class HeldOut:
    """This rank's share of the held-out rows with the teacher's logits, computed once."""

    def __init__(self, teacher, rows: Batch, curve_rows: int, dist: Dist, chunk: int = 16):
        import kdplug
        global_index = torch.arange(rows.input_ids.shape[0])
        mine = global_index[dist.rank::dist.world_size]
        self.rows = Batch(rows.input_ids[mine], rows.attention_mask[mine], rows.labels[mine]).to(dist.device)
        self.curve = int((mine < curve_rows).sum())  # the curve subset is a prefix of this shard
        self.chunk, self.dist = chunk, dist
        self.kl = kdplug.get("fkl", reduction="sum")
        with torch.no_grad():
            self.teacher_logits = [_logits(teacher, self.rows.rows(i, i + chunk))[:, :-1].float()
                                   for i in range(0, self.rows.input_ids.shape[0], chunk)]
        self.teacher_ppl = self._ppl_of_teacher()

    def _ppl_of_teacher(self) -> float:
        nll = torch.zeros(2, dtype=torch.float64, device=self.dist.device)
        for i, t in zip(range(0, self.rows.input_ids.shape[0], self.chunk), self.teacher_logits):
            y = self.rows.labels[i:i + self.chunk, 1:]
            nll[0] += F.cross_entropy(t.reshape(-1, t.shape[-1]), y.reshape(-1), reduction="sum")
            nll[1] += (y != -100).sum()
        self.dist.sum_(nll)
        return float(torch.exp(nll[0] / nll[1].clamp_min(1)))

    @torch.no_grad()
    def evaluate(self, student: Student, curve_only: bool) -> dict:
        model = student.model
        was_training = model.training
        model.eval()
        limit = self.curve if curve_only else self.rows.input_ids.shape[0]
        # kl_sum, nll_sum, agree, tokens, own_sum, own_weight
        sums = torch.zeros(6, dtype=torch.float64, device=self.dist.device)
        for i, t in zip(range(0, limit, self.chunk), self.teacher_logits):
            b = self.rows.rows(i, min(i + self.chunk, limit))
            t = t[: b.input_ids.shape[0]]
            s = _logits(model, b)[:, :-1]
            y = b.labels[:, 1:]
            m = y != -100
            n = m.sum()
            sums[0] += self.kl(s, t, mask=m)
            nll = F.cross_entropy(s.reshape(-1, s.shape[-1]).float(), y.reshape(-1), reduction="sum")
            sums[1] += nll
            sums[2] += ((s.argmax(-1) == t.argmax(-1)) & m).sum()
            sums[3] += n
            if student.loss_fn is None:
                sums[4] += nll
                sums[5] += n
            else:
                value = student.loss_fn(s, t, mask=m, **student.extra(b.input_ids.shape[0], s.device))
                weight = n if student.loss_fn.reduction == "mean" else b.input_ids.shape[0]
                sums[4] += value * weight
                sums[5] += weight
        self.dist.sum_(sums)
        if was_training:
            model.train()
        tokens = float(sums[3].clamp_min(1))
        return dict(kl=float(sums[0]) / tokens, perplexity=math.exp(float(sums[1]) / tokens),
                    top1_agreement=float(sums[2]) / tokens, own=float(sums[4]) / float(sums[5].clamp_min(1)),
                    tokens=int(sums[3]))


# ---------------------------------------------------------------------------------------------
def run(cfg: Config) -> dict[str, Any]:
    import kdplug
    from kdplug import _extension

    wall0 = time.perf_counter()
    dist = Dist(cfg.device)
    try:
        result = _run(cfg, dist, wall0, kdplug, _extension)
        # NB: no rank may tear the group down while another still finishes a collective (gloo
        # aborted a rank that way); not on the error path, where the other ranks may never arrive.
        dist.barrier()
        return result
    finally:
        dist.close()


def _run(cfg: Config, dist: Dist, wall0: float, kdplug, _extension) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    # -- data source
    if cfg.data:
        layout, records = read_data_file(cfg.data, cfg.text_field)
        corpus = dict(source=os.path.abspath(cfg.data), layout=layout, records=len(records))
    else:
        from ._distill_data import Record
        docs = default_documents(cfg.quick)
        layout, records = "stream", [Record(d) for d in docs]
        corpus = dict(source="pydoc_data.topics" + (" (every 8th topic: --quick)" if cfg.quick else ""),
                      layout=layout, documents=len(docs), bytes=sum(len(d.encode()) for d in docs))
    digest = text_digest([r.prompt + "\0" + r.text for r in records])

    # -- teacher and tokenizer
    if cfg.teacher_dir:
        tokenizer = Tokenizer.from_pretrained(cfg.teacher_dir)
        teacher, _ = load_model(cfg.teacher_dir, "--teacher", cfg.seed, require_weights=True)
        teacher.to(dist.device).eval()
        t0 = time.perf_counter()
        data = TokenData(layout, records, tokenizer, cfg.seq_len, cfg.max_eval_sequences)
        timings["tokenize_s"] = time.perf_counter() - t0
        teacher_info = dict(source=os.path.abspath(cfg.teacher_dir), cached=None, params=n_params(teacher))
    else:
        tokenizer, teacher, data, teacher_info = default_teacher(cfg, dist, layout, records, digest, timings)
    teacher.eval()
    limit = max_positions(teacher)
    if limit is not None and cfg.seq_len > limit:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the teacher's {limit} positions")

    # -- student (one initial model, copied for every method)
    if cfg.student_dir:
        base, student_source = load_model(cfg.student_dir, "--student", cfg.seed, require_weights=False)
    elif cfg.teacher_dir:
        from transformers import AutoModelForCausalLM
        config = copy.deepcopy(teacher.config)
        layers = getattr(config, "num_hidden_layers", None)
        if layers is None:
            raise ValueError("--teacher: cannot derive a default student from this config; pass --student")
        config.num_hidden_layers = max(1, layers // 2)
        torch.manual_seed(cfg.seed)
        base, student_source = AutoModelForCausalLM.from_config(config), "the teacher's config with half its layers"
    else:
        base = gpt2(cfg.student_shape, tokenizer.vocab_size, cfg.seq_len, tokenizer.eos_id, cfg.seed + 2)
        student_source = "GPT-2 config (random init)"
    vt, vs = teacher.get_output_embeddings().weight.shape[0], base.get_output_embeddings().weight.shape[0]
    if vt != vs:
        raise ValueError(f"--student: the student's vocabulary has {vs} entries but the teacher's has {vt}; "
                         "they must share a tokenizer (vocabulary padding/truncation is not supported yet)")
    limit = max_positions(base)
    if limit is not None and cfg.seq_len > limit:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the student's {limit} positions")
    base.to(dist.device)
    warmup = cfg.student_warmup
    if warmup is None:
        warmup = 0 if student_source == "pretrained" else cfg.auto_warmup
    if warmup:
        # Every student (the baseline too) starts from the same student trained on the hard labels
        # for a few steps, as the papers start from a fine-tuned ("SFT") student.
        log(dist, f"kdplug distill: warming the student up on the hard labels for {warmup} steps")
        t0 = time.perf_counter()
        train_lm(base, data, cfg, dist, warmup, cfg.lr, "student warm-up", seed_offset=4)
        timings["student_warmup_s"] = time.perf_counter() - t0

    students = []
    for name, params in cfg.methods:
        model = copy.deepcopy(base).train()
        loss_fn = None if name == BASELINE else build_loss(name, params, cfg)
        opt, sched = optimizer(model, cfg.lr, cfg.steps, cfg.lr_schedule)
        students.append(Student(name, dict(loss_fn.params) if loss_fn is not None else {}, loss_fn,
                                0.0 if loss_fn is None else cfg.kd_ratio, model, _wrap(model, dist), opt, sched))

    held_out = HeldOut(teacher, data.eval, cfg.curve_sequences, dist)
    start = {s.name: held_out.evaluate(s, curve_only=False) for s in students}
    for s in students:
        first = held_out.evaluate(s, curve_only=True)
        s.curve_steps.append(0)
        s.curve_kl.append(first["kl"])
        s.curve_own.append(first["own"])
    log(dist, f"kdplug distill: {len(students)} students ({', '.join(s.name for s in students)}), "
              f"{cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens on {dist.device}"
              + (f" x {dist.world_size} processes" if dist.enabled else ""))

    # -- the lockstep loop
    batches = data.sampler(cfg.batch_size, cfg.seed + 3, dist.rank, dist.world_size)
    teacher_s = eval_s = 0.0
    t_loop = time.perf_counter()
    with _bar(dist, cfg, cfg.steps, "distill") as bar:
        for step in range(1, cfg.steps + 1):
            batch = next(batches).to(dist.device)
            num_tokens, num_sequences, input_tokens = _global_counts(batch, dist)
            dist.sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                teacher_logits = _logits(teacher, batch)
            dist.sync()
            teacher_s += time.perf_counter() - t0
            for s in students:
                t0 = time.perf_counter()
                loss, kd, _ = shifted_kd_ce(_logits(s.wrapped, batch), teacher_logits, batch.labels, s.loss_fn,
                                            kd_ratio=s.kd_ratio, num_tokens=num_tokens, num_sequences=num_sequences,
                                            extra=s.extra(batch.input_ids.shape[0], dist.device))
                (loss * dist.world_size).backward()
                torch.nn.utils.clip_grad_norm_(s.model.parameters(), 1.0)
                s.opt.step()
                s.sched.step()
                s.opt.zero_grad(set_to_none=True)
                if s.loss_fn is not None:
                    s.loss_fn.step(kd * dist.world_size)  # kdplug averages it over the ranks
                dist.sync()
                s.train_s += time.perf_counter() - t0
                s.tokens += input_tokens
                s.train_window.append(loss.detach() * dist.world_size)
            bar.update(1)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                t0 = time.perf_counter()
                postfix = {}
                for s in students:
                    r = held_out.evaluate(s, curve_only=True)
                    if step == cfg.steps:
                        s.final = held_out.evaluate(s, curve_only=False)
                    s.curve_steps.append(step)
                    s.curve_kl.append(r["kl"])
                    s.curve_own.append(r["own"])
                    window = dist.sum_(torch.stack(s.train_window).double().mean().reshape(1)) / dist.world_size
                    s.curve_train.append((step, float(window)))
                    s.train_window = []
                    postfix[s.name] = f"{r['kl']:.3f}"
                eval_s += time.perf_counter() - t0
                bar.set_postfix_str("held-out KL(T||S): " + " ".join(f"{k} {v}" for k, v in postfix.items()))
    loop_s = time.perf_counter() - t_loop
    timings.update(teacher_forward_s=teacher_s, eval_s=eval_s, distill_loop_s=loop_s,
                   total_s=time.perf_counter() - wall0)

    # -- results
    import transformers
    backend = f"{cfg.backend} (compiled core {'loaded' if _extension.has_ops() else 'not loaded'})"
    rows = []
    for s in students:
        f = s.final
        own_name = "held-out cross-entropy" if s.loss_fn is None else f"{s.name} loss"
        if s.loss_fn is not None and s.loss_fn.schedule is not None:
            own_name += " (at the current schedule state)"
        row = dict(method=s.name, label=s.label, params=_jsonable(s.params), kd_ratio=s.kd_ratio,
                   kl_teacher_student=f["kl"], perplexity=f["perplexity"], top1_agreement=f["top1_agreement"],
                   own_divergence=dict(name=own_name, start=start[s.name]["own"], end=f["own"]),
                   train_s=s.train_s, tokens_per_s=s.tokens / max(s.train_s, 1e-9),
                   curves=dict(step=s.curve_steps, kl_teacher_student=s.curve_kl, own=s.curve_own,
                               train_loss=s.curve_train))
        if s.loss_fn is not None and s.loss_fn.schedule is not None:
            row["schedule"] = {k: float(v) for k, v in s.loss_fn.schedule.value().items()}
        rows.append(row)
    results = dict(
        kdplug_version=kdplug.__version__, torch_version=torch.__version__,
        transformers_version=transformers.__version__, kdplug_backend=backend,
        device=str(dist.device), world_size=dist.world_size, threads=torch.get_num_threads(),
        config=_jsonable(dataclasses.asdict(cfg)),
        corpus=dict(corpus, tokens=data.total_tokens, train_tokens=data.train_tokens,
                    held_out_sequences=int(data.eval.input_ids.shape[0]), held_out_tokens=data.eval_tokens,
                    vocab_size=tokenizer.vocab_size),
        teacher=dict(teacher_info, model=describe(teacher), params=n_params(teacher),
                     held_out_perplexity=held_out.teacher_ppl),
        student=dict(source=os.path.abspath(cfg.student_dir) if cfg.student_dir else "default", init=student_source,
                     warmup_steps=warmup,
                     model=describe(base), params=n_params(base)),
        methods=rows, timings=timings)
    return results


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    return repr(x)


# ---------------------------------------------------------------------------------------------
def plot_curves(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    colors = plt.get_cmap("tab10").colors
    dashes = ["-", "-.", ":"]
    k = 0
    for m in methods:
        c = m["curves"]
        if m["method"] == BASELINE:
            style = dict(color="black", lw=2.4, ls="--")
        else:
            style = dict(color=colors[k % 10], lw=1.6, ls=dashes[(k // 10) % 3])
            k += 1
        axes[0].plot(c["step"], c["kl_teacher_student"], label=m["label"], **style)
        own0 = c["own"][0] if c["own"][0] else 1.0
        axes[1].plot(c["step"], [v / own0 for v in c["own"]], **style)
        if c["train_loss"]:
            steps, values = zip(*c["train_loss"])
            axes[2].plot(steps, values, **style)
    axes[0].set(title="held-out KL(teacher || student)", xlabel="distillation step", yscale="log")
    axes[1].set(title="each method's own held-out loss / its value at step 0", xlabel="distillation step",
                yscale="log")
    axes[2].set(title="training loss (mean since the last point)", xlabel="distillation step", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=9, frameon=False)
    t = results["teacher"]
    cfg = results["config"]
    fig.suptitle(f"kdplug distill: {t['model']} teacher ({t['params'] / 1e6:.2f}M) -> "
                 f"{results['student']['model']} student ({results['student']['params'] / 1e6:.2f}M), "
                 f"{cfg['steps']} steps, T = {cfg['temperature']:g}, kd_ratio = {cfg['kd_ratio']:g}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
