import inspect
import itertools
import math
import textwrap
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lightning_losses.examples.causal_lm import CharVocab, TinyCausalLM
from lightning_losses.examples.text_corpus import (
    ALLOWED_CHARS,
    STDLIB_MODULES,
    CharLMDataModule,
    Document,
    EpochWindowSampler,
    PerplexityLogger,
    _documents,
    bigram_perplexity,
    char_vocab,
    eval_windows,
    normalize_text,
    split_documents,
    stdlib_documents,
    unigram_perplexity,
)
from lightning_losses.losses import NLLLoss
from lightning_losses.module import LossModule

SMALL = ["bisect", "copy", "fnmatch", "heapq", "shlex", "textwrap"]  # a small corpus for fast tests


def test_corpus_is_deterministic():
    modules = STDLIB_MODULES[::4]  # a quarter of the corpus keeps the test fast
    first = stdlib_documents(modules)
    _documents.cache_clear()
    again = stdlib_documents(list(reversed(modules)))  # the order given does not matter either
    assert first == again and first is not again and len(first) > 500


def test_corpus_is_printable_ascii_and_sized():
    first = stdlib_documents()
    text = "\n\n".join(doc.text for doc in first)
    assert set(text) <= set(ALLOWED_CHARS) and len(ALLOWED_CHARS) == 96
    assert 300_000 < len(text) < 2_000_000
    assert list(STDLIB_MODULES) == sorted(set(STDLIB_MODULES))
    modules = [doc.module for doc in first]
    assert modules == sorted(modules)  # module by module, in the fixed sorted order
    assert set(modules) == set(STDLIB_MODULES)  # every module contributed
    assert len({doc.text.split("\n", 1)[1] for doc in first}) == len(first)  # no repeated docstring
    for doc in first:
        assert doc.text.startswith(doc.name + "\n") and doc.name.startswith(doc.module)
        assert "\n\n\n" not in doc.text and doc.text == doc.text.strip()


def test_documents_match_the_imported_docstrings():
    """The docstrings read from source with ast are the ones Python attaches to the objects."""
    docs = {doc.name: doc.text for doc in stdlib_documents(["textwrap"])}
    for name in ("dedent", "indent", "TextWrapper", "TextWrapper.wrap"):
        obj = textwrap
        for part in name.split("."):
            obj = getattr(obj, part)
        expected = normalize_text(inspect.cleandoc(obj.__doc__))
        assert docs[f"textwrap.{name}"] == f"textwrap.{name}\n{expected}"
    assert "textwrap._wrap_chunks" not in docs and "textwrap.TextWrapper._split" not in docs  # private


def test_normalize_text_by_hand():
    assert normalize_text("na\u00efve\tcaf\u00e9") == "naive   cafe"
    assert normalize_text("\n\n  a  \r\n\n\n\nb\u2500\x0c\n\n") == "  a\n\nb"
    assert normalize_text("\u00df\u2014") == ""  # no ASCII decomposition: dropped
    assert normalize_text(ALLOWED_CHARS.strip("\n")) == ALLOWED_CHARS.strip("\n").rstrip()


def test_split_is_a_partition_by_module():
    docs = stdlib_documents()
    splits = split_documents(docs, 0.1, 0.1)
    modules = {name: {d.module for d in part} for name, part in splits.items()}
    assert not modules["train"] & modules["val"] and not modules["train"] & modules["test"]
    assert not modules["val"] & modules["test"]
    texts = {name: {d.text for d in part} for name, part in splits.items()}
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"]
    # every document once, each split in corpus order (module blocks stay contiguous)
    order = {doc: i for i, doc in enumerate(docs)}
    assert sorted(order[d] for part in splits.values() for d in part) == list(range(len(docs)))
    for part in splits.values():
        assert [order[d] for d in part] == sorted(order[d] for d in part)
        blocks = [d.module for i, d in enumerate(part) if i == 0 or part[i - 1].module != d.module]
        assert len(blocks) == len(set(blocks))
    total = sum(len(d.text) for d in docs)
    shares = {name: sum(len(d.text) for d in part) / total for name, part in splits.items()}
    assert abs(shares["val"] - 0.1) < 0.03 and abs(shares["test"] - 0.1) < 0.03
    assert len(modules["val"]) >= 5 and len(modules["test"]) >= 5  # spread over the alphabet


def test_split_rejects_bad_fractions_and_too_few_modules():
    docs = [Document("a", "a", "text"), Document("b", "b", "text")]
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 0.5, 0.5)
    with pytest.raises(ValueError, match="got no module"):
        split_documents(docs, 0.1, 0.1)


def test_unigram_and_bigram_perplexity_by_hand():
    vocab = CharVocab("ab")
    # train "aab": p(a) = 3/5, p(b) = 2/5 (add-one over 2 characters); eval "ab"
    assert unigram_perplexity("aab", "ab", vocab) == pytest.approx((0.6 * 0.4) ** -0.5)
    # a character never seen in training still gets 1 / (N + |C|)
    assert unigram_perplexity("aaa", "b", vocab) == pytest.approx(5.0)
    # train "aaab": n(a,a) = 2, n(a,b) = 1; p(a|a) = 3/5, p(b|a) = 2/5; eval pairs aa, ab
    assert bigram_perplexity("aaab", "aab", vocab) == pytest.approx((0.6 * 0.4) ** -0.5)
    # "b" never precedes anything: p(.|b) is uniform
    assert bigram_perplexity("aaab", "bb", vocab) == pytest.approx(2.0)


def test_count_baselines_against_a_counter_loop():
    vocab = CharVocab("abcd\n")
    gen = torch.Generator().manual_seed(0)
    train = "".join(vocab.chars[i] for i in torch.randint(0, 4, (300,), generator=gen))
    held = "".join(vocab.chars[i] for i in torch.randint(0, 5, (80,), generator=gen))
    uni, big, first = Counter(train), Counter(itertools.pairwise(train)), Counter(train[:-1])
    size = len(vocab.chars)
    nll = -sum(math.log((uni[c] + 1) / (len(train) + size)) for c in held) / len(held)
    assert unigram_perplexity(train, held, vocab) == pytest.approx(math.exp(nll), rel=1e-12)
    pairs = list(itertools.pairwise(held))
    nll = -sum(math.log((big[b, c] + 1) / (first[b] + size)) for b, c in pairs) / len(pairs)
    assert bigram_perplexity(train, held, vocab) == pytest.approx(math.exp(nll), rel=1e-12)


def test_eval_windows_score_every_token_but_the_first_once():
    for length, seq_len in [(2, 2), (10, 4), (11, 4), (100, 8), (5, 16)]:
        ids = torch.arange(1, length + 1)
        windows, mask = eval_windows(ids, seq_len)
        assert windows.shape[1] == mask.shape[1] == seq_len and mask.dtype == torch.bool
        scored = windows[:, 1:][mask[:, 1:]]  # what a shifted next-token loss scores
        assert scored.tolist() == ids[1:].tolist()
        assert (windows[~mask] == 0).all()
        torch.testing.assert_close(windows[1:, 0], windows[:-1, -1])  # each window starts where one ends
    with pytest.raises(ValueError, match="seq_len"):
        eval_windows(torch.arange(5), 1)


def small_dm(**kwargs) -> CharLMDataModule:
    args = {"seq_len": 32, "batch_size": 8, "train_windows": 24, "modules": SMALL, "torch_threads": None}
    dm = CharLMDataModule(**(args | kwargs))
    dm.setup("fit")
    return dm


def epoch_batches(dm: CharLMDataModule, epoch: int) -> torch.Tensor:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return torch.cat([batch["input_ids"] for batch in loader])


def test_datamodule_batches_shapes_and_seeding():
    dm = small_dm()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 32) and batch["input_ids"].dtype == torch.long
    assert batch["token_mask"].shape == (8, 32) and batch["token_mask"].dtype == torch.bool
    assert batch["token_mask"].all() and dm.vocab_size == len(char_vocab()) == 97
    windows = epoch_batches(dm, 0)
    assert windows.shape == (24, 32)
    for row in windows:  # every window is a substring of the training text
        assert dm.vocab.decode(row) in dm.texts["train"]
    assert torch.equal(epoch_batches(small_dm(), 0), windows)  # same seed, same epoch: same windows
    assert not torch.equal(epoch_batches(dm, 1), windows)  # a new epoch: new windows
    assert not torch.equal(epoch_batches(small_dm(seed=1), 0), windows)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(epoch_batches(small_dm(), 0), windows)


def test_datamodule_eval_covers_the_split_text():
    dm = small_dm(eval_chars=500)
    for stage, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        assert len(dm.texts[stage]) == 500
        batches = list(loader)
        ids = torch.cat([b["input_ids"] for b in batches])
        mask = torch.cat([b["token_mask"] for b in batches])
        assert dm.vocab.decode(ids[:, 1:][mask[:, 1:]]) == dm.texts[stage][1:]
        assert torch.equal(torch.cat([b["input_ids"] for b in loader]), ids)  # fixed windows
        expected = unigram_perplexity(dm.texts["train"], dm.texts[stage][1:], dm.vocab)
        assert dm.baselines[stage]["unigram_perplexity"] == pytest.approx(expected)
    assert {d.module for d in dm.documents["val"]}.isdisjoint(d.module for d in dm.documents["train"])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"seq_len": 1}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"eval_chars": 1}, "eval_chars"),
        ({"torch_threads": 0}, "torch_threads"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CharLMDataModule(**kwargs)


def test_sampler_needs_positive_sizes():
    with pytest.raises(ValueError, match="num_samples"):
        EpochWindowSampler(10, 0)


def brute_force_perplexity(model: torch.nn.Module, loader) -> float:
    """exp of the mean over every scored character of -log p(next char | the window before it)."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for batch in loader:
            ids, mask = batch["input_ids"], batch["token_mask"]
            log_p = torch.log_softmax(model(ids)["next_token_logits"].double(), -1)
            for row in range(len(ids)):
                for t in range(ids.shape[1] - 1):
                    if mask[row, t + 1]:
                        total -= log_p[row, t, ids[row, t + 1]]
                        count += 1
    return math.exp(total.item() / count)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fit_through_loss_module_lowers_val_loss_and_logs_perplexity(one_thread):
    torch.manual_seed(0)
    dm = CharLMDataModule(
        seq_len=32, batch_size=16, train_windows=16 * 100, modules=SMALL, eval_chars=700, torch_threads=None
    )
    model = TinyCausalLM(dm.vocab_size, d_model=32, num_layers=1, num_heads=2, max_len=32)
    module = LossModule(model, NLLLoss(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[PerplexityLogger()], num_sanity_val_steps=0,
    )  # fmt: skip
    dm.setup("fit")
    before = brute_force_perplexity(model, dm.val_dataloader())
    assert before > 50  # an untrained model: near uniform over 97 ids
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert after["val/perplexity"] == pytest.approx(math.exp(after["val/loss"]), rel=1e-5)
    assert after["val/loss"] < math.log(before) - 1.0
    assert after["val/perplexity"] < dm.baselines["val"]["unigram_perplexity"]  # 100 steps: 29.4 < 34.3
    # val/loss is the per-character mean over the whole val text (the last window is padded and shorter)
    reference = brute_force_perplexity(model, dm.val_dataloader())
    assert after["val/perplexity"] == pytest.approx(reference, rel=1e-4)
    assert after["val/unigram_perplexity"] == pytest.approx(dm.baselines["val"]["unigram_perplexity"])
    assert after["val/bigram_perplexity"] == pytest.approx(dm.baselines["val"]["bigram_perplexity"])
    tested = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert tested["test/perplexity"] == pytest.approx(math.exp(tested["test/loss"]), rel=1e-5)


def test_config_model_vocab_matches_the_datamodule():
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "lm_sft.yaml").read_text())
    data = config["data"]["init_args"]
    model = config["model"]["model"]["init_args"]
    assert model["vocab_size"] == CharLMDataModule().vocab_size
    assert model["max_len"] >= data["seq_len"]
    epochs, steps = config["trainer"]["max_epochs"], data["train_windows"] // data["batch_size"]
    assert config["model"]["lr_scheduler"]["init_args"]["total_steps"] == epochs * steps
