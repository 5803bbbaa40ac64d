"""A character-level language-modelling corpus from text that ships with Python: standard-library docstrings.

- :func:`stdlib_documents`: the docstrings of a fixed, sorted list of pure-Python standard-library modules
  (the module, its public classes and functions, and their public methods and ``__init__``), read from the
  source files with :mod:`ast` (nothing is imported, so nothing a running program patched leaks in), in
  source order, each normalised by :func:`normalize_text` to the printable-ASCII set :data:`ALLOWED_CHARS`,
  exact duplicates dropped: 852 KB (2,842 docstrings of 138 modules) on Python 3.11.7. The text depends only
  on the Python release's source files, not on the machine; docstrings change between Python versions.
- :func:`split_documents`: train/val/test by whole modules (contiguous blocks of documents; no document and
  no module in two splits).
- :func:`unigram_perplexity` / :func:`bigram_perplexity`: add-one-smoothed count baselines.
- :class:`CharLMDataModule`: random training windows, fixed evaluation windows,
  ``{"input_ids": [B, T] long, "token_mask": [B, T] bool}``.
- :class:`PerplexityLogger`: logs ``val/perplexity`` = exp(``val/loss``) (and ``test/``) beside the baselines.
"""

from __future__ import annotations

import ast
import math
import os
import re
import unicodedata
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_losses.examples.causal_lm import CharVocab

__all__ = [
    "ALLOWED_CHARS",
    "STDLIB_MODULES",
    "CharLMDataModule",
    "Document",
    "EpochWindowSampler",
    "PerplexityLogger",
    "WindowDataset",
    "bigram_perplexity",
    "char_vocab",
    "eval_windows",
    "normalize_text",
    "split_documents",
    "stdlib_documents",
    "unigram_perplexity",
]

#: Newline and the 95 printable ASCII characters (space to ``~``): the vocabulary is these plus padding (97).
ALLOWED_CHARS = "\n" + "".join(chr(code) for code in range(32, 127))

#: Pure-Python standard-library modules of Python 3.11 (no C-only module: those have no source to read).
STDLIB_MODULES: tuple[str, ...] = tuple(
    sorted(
        """
        abc argparse ast asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.queues
        asyncio.streams asyncio.tasks base64 bdb bisect bz2 calendar cmd codecs codeop collections colorsys
        configparser contextlib copy copyreg csv dataclasses datetime difflib dis doctest email.feedparser
        email.header email.message email.policy email.utils enum filecmp fileinput fnmatch fractions ftplib
        functools getopt gettext glob graphlib gzip heapq hmac html.parser http.client http.cookiejar
        http.server imaplib inspect ipaddress json json.decoder json.encoder keyword linecache locale
        logging logging.config logging.handlers lzma mailbox mimetypes modulefinder multiprocessing.pool
        netrc numbers opcode operator optparse os pathlib pdb pickle pickletools pkgutil platform plistlib
        poplib posixpath pprint profile pstats py_compile pyclbr queue quopri random re reprlib runpy sched
        secrets selectors shelve shlex shutil smtplib socket socketserver ssl stat statistics string
        subprocess symtable sysconfig tabnanny tarfile tempfile textwrap threading timeit tokenize trace
        traceback types typing unittest.case unittest.mock urllib.parse urllib.request uuid warnings wave
        weakref webbrowser xml.dom.minidom xml.etree.ElementTree xmlrpc.client xmlrpc.server zipapp zipfile
        """.split()  # noqa: SIM905 - a word list reads better than 138 quoted strings
    )
)

_ALLOWED = frozenset(ALLOWED_CHARS)
_BLANK_RUNS = re.compile(r"\n{3,}")


class Document(NamedTuple):
    """One docstring: ``module`` it comes from, dotted ``name`` and normalised ``text`` (name line first)."""

    module: str
    name: str
    text: str


def char_vocab() -> CharVocab:
    """The vocabulary of the corpus: padding (id 0) and :data:`ALLOWED_CHARS` (ids 1-96).

    >>> vocab = char_vocab()
    >>> len(vocab), vocab.encode("a\\n~")
    (97, [67, 1, 96])
    """
    return CharVocab(ALLOWED_CHARS)


def normalize_text(text: str) -> str:
    """Map ``text`` onto :data:`ALLOWED_CHARS`: NFKD (accents split off), tabs → 4 spaces, other
    characters dropped, trailing spaces stripped, at most one blank line in a row, no outer blank lines.

    >>> normalize_text("Caf\\u00e9  \\n\\n\\n\\tx\\u2500y ")
    'Cafe\\n\\n    xy'
    """
    text = unicodedata.normalize("NFKD", text).replace("\r\n", "\n")
    text = "".join(c for c in text if c in _ALLOWED or c == "\t").expandtabs(4)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip("\n")


def _module_path(module: str) -> Path:
    root = Path(os.__file__).parent  # the standard library's directory (os is always a source file)
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"standard-library module {module!r} has no source file under {root}")


def _module_documents(module: str) -> list[Document]:
    tree = ast.parse(_module_path(module).read_text(encoding="utf-8"))
    found: list[Document] = []

    def visit(node: ast.AST, name: str, depth: int) -> None:
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc:
            found.append(Document(module, name, doc))
        if depth == 2:  # module → class/function → method
            return
        for child in node.body:  # type: ignore[attr-defined]
            definition = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            if definition and (not child.name.startswith("_") or child.name == "__init__"):
                visit(child, f"{name}.{child.name}", depth + 1)

    visit(tree, module, 0)
    return found


@lru_cache(maxsize=4)
def _documents(modules: tuple[str, ...], min_chars: int) -> tuple[Document, ...]:
    seen: set[str] = set()
    documents = []
    for module in modules:
        for raw in _module_documents(module):
            body = normalize_text(raw.text)
            if len(body) < min_chars or body in seen:
                continue
            seen.add(body)
            documents.append(Document(raw.module, raw.name, f"{raw.name}\n{body}"))
    return tuple(documents)


def stdlib_documents(modules: Sequence[str] | None = None, min_chars: int = 20) -> list[Document]:
    """The docstrings of ``modules`` (default :data:`STDLIB_MODULES`), module by module in sorted order,
    each in source order; every text is ``"<dotted name>\\n<normalised docstring>"``.

    Docstrings shorter than ``min_chars`` after :func:`normalize_text`, and exact repeats of an earlier
    docstring, are dropped (so no text is in two splits). Cached per process.

    >>> docs = stdlib_documents(["bisect"])
    >>> docs[0].name, docs[1].text.splitlines()[0]
    ('bisect', 'bisect.insort_right')
    """
    modules = STDLIB_MODULES if modules is None else tuple(sorted(set(modules)))
    if not modules:
        raise ValueError("`modules` must name at least one module")
    return list(_documents(modules, min_chars))


def split_documents(
    documents: Sequence[Document], val_fraction: float = 0.1, test_fraction: float = 0.1
) -> dict[str, list[Document]]:
    """Split by whole modules, each module's documents a contiguous block, no module in two splits.

    Modules are taken in the order of ``documents``; each goes to the split furthest below its share of
    the characters so far (``1 - val - test``, ``val_fraction``, ``test_fraction``; ties: train, val,
    test), so the splits interleave over the alphabet and end near their shares.

    >>> docs = [Document(m, m, "x" * 10) for m in "abcdefghij"]
    >>> {k: [d.module for d in v] for k, v in split_documents(docs, 0.2, 0.1).items()}
    {'train': ['a', 'b', 'd', 'e', 'g', 'h', 'j'], 'val': ['c', 'i'], 'test': ['f']}
    """
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"`val_fraction` and `test_fraction` must be in (0, 1) with a sum below 1, "
            f"got {val_fraction} and {test_fraction}"
        )
    blocks: dict[str, list[Document]] = {}
    for doc in documents:
        blocks.setdefault(doc.module, []).append(doc)
    shares = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    splits: dict[str, list[Document]] = {name: [] for name in shares}
    sizes = dict.fromkeys(shares, 0)
    total = 0
    for block in blocks.values():
        total += sum(len(doc.text) for doc in block)
        name = max(shares, key=lambda s: shares[s] * total - sizes[s])  # first of equal deficits wins
        splits[name].extend(block)
        sizes[name] += sum(len(doc.text) for doc in block)
    empty = [name for name, docs in splits.items() if not docs]
    if empty:
        raise ValueError(f"splits {empty} got no module; use more modules (got {len(blocks)})")
    return splits


def _join(documents: Sequence[Document]) -> str:
    return "\n\n".join(doc.text for doc in documents)


def _counts(ids: Tensor, size: int) -> Tensor:
    return torch.bincount(ids, minlength=size).to(torch.float64)


def unigram_perplexity(train_text: str, eval_text: str, vocab: CharVocab) -> float:
    r"""Perplexity of add-one-smoothed character frequencies of ``train_text`` on ``eval_text``.

    .. math:: p(c) = \frac{n(c) + 1}{N + |C|}, \qquad
        \mathrm{PPL} = \exp\Big(-\frac{1}{M}\sum_{j=1}^{M}\log p(e_j)\Big)

    over the vocabulary's characters :math:`C` (padding excluded), :math:`N` training characters and the
    :math:`M` characters of ``eval_text``.

    >>> round(unigram_perplexity("aab", "ab", CharVocab("ab")), 4)  # 1 / sqrt(3/5 * 2/5)
    2.0412
    """
    if not eval_text:
        raise ValueError("`eval_text` must not be empty")
    size = len(vocab)
    counts = _counts(torch.tensor(vocab.encode(train_text), dtype=torch.long), size)[1:]
    log_p = torch.log((counts + 1) / (counts.sum() + len(counts)))
    ids = torch.tensor(vocab.encode(eval_text), dtype=torch.long) - 1
    return math.exp(-log_p[ids].mean().item())


def bigram_perplexity(train_text: str, eval_text: str, vocab: CharVocab) -> float:
    r"""Perplexity of an add-one-smoothed character bigram model of ``train_text`` on ``eval_text``.

    .. math:: p(c \mid b) = \frac{n(b, c) + 1}{n(b, \cdot) + |C|}

    scoring ``eval_text[1:]``, each character given the one before it (:math:`n(b, \cdot)` counts the
    training bigrams that start with :math:`b`).

    >>> round(bigram_perplexity("aaab", "aab", CharVocab("ab")), 4)  # 1 / sqrt(3/5 * 2/5)
    2.0412
    """
    if len(eval_text) < 2:
        raise ValueError(f"`eval_text` needs at least 2 characters, got {len(eval_text)}")
    size = len(vocab)
    train = torch.tensor(vocab.encode(train_text), dtype=torch.long)
    pairs = _counts(train[:-1] * size + train[1:], size * size).reshape(size, size)[1:, 1:]
    log_p = torch.log((pairs + 1) / (pairs.sum(1, keepdim=True) + pairs.shape[1]))
    ids = torch.tensor(vocab.encode(eval_text), dtype=torch.long) - 1
    return math.exp(-log_p[ids[:-1], ids[1:]].mean().item())


def eval_windows(ids: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Windows ``[W, seq_len]`` of ``ids [N]`` with stride ``seq_len - 1`` and their ``token_mask``.

    Consecutive windows share one token, so under a next-token loss (which scores positions ``1..T-1`` of
    each window) every token but the first is scored exactly once; the last window is padded with 0 and
    masked.

    >>> ids, mask = eval_windows(torch.arange(1, 8), 3)
    >>> ids.tolist(), mask.sum().item()
    ([[1, 2, 3], [3, 4, 5], [5, 6, 7]], 9)
    """
    if ids.ndim != 1 or len(ids) < 2:
        raise ValueError(f"`ids` must be 1-D with at least 2 tokens, got shape {tuple(ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"`seq_len` must be at least 2, got {seq_len}")
    count = math.ceil((len(ids) - 1) / (seq_len - 1))
    padded = torch.zeros(count * (seq_len - 1) + 1, dtype=ids.dtype)
    padded[: len(ids)] = ids
    mask = torch.zeros(len(padded), dtype=torch.bool)
    mask[: len(ids)] = True
    return padded.unfold(0, seq_len, seq_len - 1), mask.unfold(0, seq_len, seq_len - 1)


class WindowDataset(Dataset):
    """``ids[start : start + seq_len]`` for every possible ``start`` (the index), all tokens valid."""

    def __init__(self, ids: Tensor, seq_len: int) -> None:
        if ids.ndim != 1 or len(ids) < seq_len:
            raise ValueError(
                f"`ids` must be 1-D with at least `seq_len` = {seq_len} tokens, got shape {tuple(ids.shape)}"
            )
        self.ids, self.seq_len = ids, seq_len

    def __len__(self) -> int:
        return len(self.ids) - self.seq_len + 1

    def __getitem__(self, start: int) -> dict[str, Tensor]:
        window = self.ids[start : start + self.seq_len]
        return {"input_ids": window, "token_mask": torch.ones(self.seq_len, dtype=torch.bool)}


class EpochWindowSampler(Sampler[int]):
    """``num_samples`` random window starts in ``[0, num_starts)`` (with replacement), drawn from a
    generator seeded with ``(seed, epoch)``: the same windows for the same epoch, new ones each epoch.

    Lightning calls :meth:`set_epoch` before each training epoch; each pass also advances the epoch by one
    itself (so a sampler wrapped for DDP, whose ``set_epoch`` is not forwarded, still changes windows).

    >>> sampler = EpochWindowSampler(100, 3, seed=0)
    >>> first = list(sampler); second = list(sampler)
    >>> sampler.set_epoch(0)
    >>> list(sampler) == first != second
    True
    """

    def __init__(self, num_starts: int, num_samples: int, seed: int = 0) -> None:
        if num_starts < 1 or num_samples < 1:
            raise ValueError(
                f"`num_starts` and `num_samples` must be positive, got {num_starts}, {num_samples}"
            )
        self.num_starts, self.num_samples, self.seed, self.epoch = num_starts, num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        yield from torch.randint(self.num_starts, (self.num_samples,), generator=generator).tolist()


class CharLMDataModule(pl.LightningDataModule):
    """Standard-library docstrings for a character-level causal LM; batches
    ``{"input_ids": [B, T] long, "token_mask": [B, T] bool}`` (ids of :func:`char_vocab`).

    Training: ``train_windows`` random windows of ``seq_len`` characters of the training text per epoch
    (:class:`EpochWindowSampler`: deterministic from ``seed`` and the epoch, independent of the global
    RNG). Validation/test: fixed windows of the whole val/test text (:func:`eval_windows`), so under
    ``nll`` every character but the first is scored once and ``val/loss`` is the per-character NLL of the
    text. ``baselines[stage]`` holds the unigram and bigram perplexities (trained on the training text) of
    those same characters.

    Args:
        seq_len: ``T``, characters per window (≤ the model's ``max_len``).
        batch_size: windows per batch (evaluation uses the same).
        train_windows: training windows per epoch.
        val_fraction / test_fraction: shares of the characters held out (whole modules,
            :func:`split_documents`).
        eval_chars: keep only the first ``eval_chars`` characters of the val/test texts (None: all).
        modules: the standard-library modules (None: :data:`STDLIB_MODULES`).
        seed: the training windows' seed.
        torch_threads: ``torch.set_num_threads`` in ``setup`` (process-wide; ``None`` leaves it).
        num_workers: DataLoader workers.

    >>> dm = CharLMDataModule(seq_len=16, batch_size=4, train_windows=8, torch_threads=None)
    >>> dm.setup("fit")
    >>> batch = next(iter(dm.train_dataloader()))
    >>> batch["input_ids"].shape, batch["token_mask"].dtype, dm.vocab_size
    (torch.Size([4, 16]), torch.bool, 97)
    """

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 32,
        train_windows: int = 3200,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        eval_chars: int | None = None,
        modules: list[str] | None = None,
        seed: int = 0,
        torch_threads: int | None = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"`seq_len` must be at least 2, got {seq_len}")
        if batch_size < 1 or train_windows < 1:
            raise ValueError(
                f"`batch_size` and `train_windows` must be positive, got {batch_size}, {train_windows}"
            )
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"`val_fraction` and `test_fraction` must be in (0, 1) with a sum below 1, "
                f"got {val_fraction} and {test_fraction}"
            )
        if eval_chars is not None and eval_chars < 2:
            raise ValueError(f"`eval_chars` must be at least 2 or None, got {eval_chars}")
        if torch_threads is not None and torch_threads < 1:
            raise ValueError(f"`torch_threads` must be positive or None, got {torch_threads}")
        self.save_hyperparameters()
        self.seq_len, self.batch_size, self.train_windows = seq_len, batch_size, train_windows
        self.val_fraction, self.test_fraction, self.eval_chars = val_fraction, test_fraction, eval_chars
        self.modules, self.seed = modules, seed
        self.torch_threads, self.num_workers = torch_threads, num_workers
        self.vocab = char_vocab()
        self.vocab_size = len(self.vocab)

    def setup(self, stage: str | None = None) -> None:
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)
        if hasattr(self, "texts"):
            return
        splits = split_documents(stdlib_documents(self.modules), self.val_fraction, self.test_fraction)
        self.documents = splits
        self.texts = {name: _join(docs) for name, docs in splits.items()}
        for name in ("val", "test"):
            self.texts[name] = self.texts[name][: self.eval_chars]
        self.ids = {name: torch.tensor(self.vocab.encode(t)) for name, t in self.texts.items()}
        if len(self.ids["train"]) < self.seq_len:
            raise ValueError(
                f"the training text has {len(self.ids['train'])} characters, fewer than "
                f"`seq_len` = {self.seq_len}"
            )
        train = self.texts["train"]
        self.baselines = {  # scored on the characters the model scores: all but the first
            name: {
                "unigram_perplexity": unigram_perplexity(train, self.texts[name][1:], self.vocab),
                "bigram_perplexity": bigram_perplexity(train, self.texts[name], self.vocab),
            }
            for name in ("val", "test")
        }
        self.train_set = WindowDataset(self.ids["train"], self.seq_len)
        self.val_set, self.test_set = (
            _EvalDataset(*eval_windows(self.ids[name], self.seq_len)) for name in ("val", "test")
        )

    def _loader(self, dataset: Dataset, sampler: Sampler | None = None) -> DataLoader:
        kwargs: dict[str, Any] = {"persistent_workers": True} if self.num_workers > 0 else {}
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers, **kwargs
        )

    def train_dataloader(self) -> DataLoader:
        sampler = EpochWindowSampler(len(self.train_set), self.train_windows, self.seed)
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)


class _EvalDataset(Dataset):
    def __init__(self, input_ids: Tensor, token_mask: Tensor) -> None:
        self.input_ids, self.token_mask = input_ids, token_mask

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "token_mask": self.token_mask[index]}


class PerplexityLogger(pl.Callback):
    """Log ``<stage>/perplexity`` = exp(``<stage>/loss``) for val and test, and the datamodule's
    ``baselines[stage]`` (e.g. ``val/unigram_perplexity``) beside it; print the baselines when fitting starts.

    The loss must be a per-token mean (``nll``): ``LossModule`` weighs each batch's ``loss`` by its number
    of scored tokens, so the epoch value is the NLL per token over the whole split, and its exp the
    perplexity (synced over DDP ranks like ``val/loss``).
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for stage, values in getattr(trainer.datamodule, "baselines", {}).items():
            shown = ", ".join(f"{key} {value:.3f}" for key, value in values.items())
            rank_zero_info(f"{stage} baselines: {shown}")

    def _log(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss_logger = getattr(pl_module, "loss_logger", None)
        if loss_logger is None or "loss" not in loss_logger[stage]:
            return
        aggregator = loss_logger[stage]
        pl_module.log(f"{stage}/perplexity", torch.exp(aggregator["loss"].compute()), prog_bar=stage == "val")
        for key, value in getattr(trainer.datamodule, "baselines", {}).get(stage, {}).items():
            pl_module.log(f"{stage}/{key}", float(value))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log("test", trainer, pl_module)
