"""Tiny random Hugging Face models for tests, built on disk in seconds without any network.

Each model is a real ``save_pretrained`` directory (config, safetensors weights, fast tokenizer)
that loads through ``transformers.pipeline(task, model=dir)``. Weights are random but
deterministic (torch is seeded), tokenizers are trained with the ``tokenizers`` library on
a small built-in corpus (BPE) or built from it directly (WordPiece).

    >>> path = build_text_model("text-classification", tmp_path)
    >>> transformers.pipeline("text-classification", model=str(path))("hello")

The GPT-2 tokenizer deliberately has no pad token (like distilgpt2): set
``pipe.tokenizer.pad_token_id = pipe.model.config.eos_token_id`` before batching with it.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import string
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

import pipeq.core.validation

#: Every task whose inputs the producer treats as text has a tiny model here (the assert at
#: the end of this module fails when the producer gains a text task without a builder).
TEXT_TASKS: tuple[str, ...] = tuple(sorted(pipeq.core.validation.TEXT_TASKS))

SEED = 1234
# Larger than BERT/GPT-2's 0.02 so the random logits are peaked: argmax labels and greedy tokens
# then do not flip on float noise (batched vs unbatched, CPU vs GPU).
INIT_RANGE = 0.4
MAX_POSITIONS = 512
_DONE_MARKER = ".tiny-model-complete"

GPT2_EOS = "<|endoftext|>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

SENTIMENT_LABELS = {0: "negative", 1: "neutral", 2: "positive"}
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
NLI_LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}

CORPUS: tuple[str, ...] = (
    "hi there, hello world!",
    "Hello, my name is Alice and I live in Paris.",
    "Bob works in London with Carol and Dave.",
    "My name is Sarah and I live in Berlin.",
    "John Smith flew from New York to Tokyo last week.",
    "The quick brown fox jumps over the lazy dog.",
    "I love this movie, it was wonderful and fun.",
    "I hate waiting in the rain; this is terrible.",
    "The food was okay, nothing special.",
    "What a fantastic, great, amazing day!",
    "This is the worst service I have ever had.",
    "This example is positive.",
    "This example is negative.",
    "This example is about sports, politics, travel or cooking.",
    "The team won the football match on Sunday.",
    "The parliament voted on the new budget today.",
    "Paris is the capital of France, Berlin of Germany, Rome of Italy.",
    "Once upon a time there was a little robot who wanted to learn.",
    "Queues, workers and batches: the pipeline runs jobs on a GPU.",
    "Numbers like 1, 2, 3, 42 and 2024 appear in text too.",
    "She said: don't panic, and smiled.",
    "A tiny model is fast to build and easy to test.",
    "The cat sat on the mat. The dog sat on the log.",
    "We are going to the beach tomorrow if the weather is nice.",
)


def build_text_model(task: str, root: pathlib.Path) -> pathlib.Path:
    """Builds (or reuses if already built in root/<task>) a tiny model dir for task; returns it.

    Idempotent and safe to call concurrently: a finished build is marked by a marker file.
    """
    if task not in _BUILDERS:
        raise ValueError(f"unknown task {task!r}; expected one of {TEXT_TASKS}")
    return build_once(task, root, _BUILDERS[task])


def build_once(task: str, root: pathlib.Path, builder: Callable[[pathlib.Path], None]
               ) -> pathlib.Path:
    """Run ``builder`` into ``root/<task>`` once; later calls reuse the finished directory.

    Idempotent and safe to call concurrently: a finished build is marked by a marker file.
    """
    root = pathlib.Path(root)
    target = root / task
    if (target / _DONE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename into place, so that a half-written directory is never
    # seen and concurrent builders (e.g. pytest-xdist workers) do not clobber each other.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{task}-", dir=root))
    try:
        builder(tmp)
        (tmp / _DONE_MARKER).write_text("ok\n")
        # mkdtemp/safetensors make 0700/0600 entries; let other users (a container) read them.
        tmp.chmod(0o755)
        for child in tmp.iterdir():
            child.chmod(0o644)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _DONE_MARKER).is_file():  # a stale partial dir, not a concurrent build
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- tokenizers -----------------------------------------------------------------------------


def _gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE, only ``<|endoftext|>`` as bos/eos/unk, no pad token (like distilgpt2)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=400,
        special_tokens=[GPT2_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=GPT2_EOS,
        eos_token=GPT2_EOS,
        unk_token=GPT2_EOS,
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def _bert_vocab() -> dict[str, int]:
    """WordPiece vocab built directly, in a fixed order: the corpus' words, and every ASCII
    character standalone and as a ``##`` continuation (so any ASCII word still tokenizes).

    ``tokenizers``' WordPieceTrainer is not deterministic across processes (its ``##`` alphabet
    comes out of a hash map), which would shuffle token ids and therefore the model's outputs.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: set[str] = set()
    for line in CORPUS:
        pieces = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
        words.update(piece for piece, _ in pieces)
    chars = sorted(
        {c for word in words for c in word}
        | set(string.ascii_lowercase + string.digits + string.punctuation)
    )
    tokens = [*BERT_SPECIALS, *chars, *(f"##{c}" for c in chars), *sorted(words - set(chars))]
    return {token: i for i, token in enumerate(tokens)}


def _bert_tokenizer() -> PreTrainedTokenizerFast:
    """Lower-casing WordPiece with [PAD] [UNK] [CLS] [SEP] [MASK], BERT's pair template."""
    pad, unk, cls, sep, mask = BERT_SPECIALS
    vocab = _bert_vocab()
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A:0 {sep}:0",
        pair=f"{cls} $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    tok.add_special_tokens(list(BERT_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        unk_token=unk,
        cls_token=cls,
        sep_token=sep,
        mask_token=mask,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        clean_up_tokenization_spaces=True,
    )


# --- models ---------------------------------------------------------------------------------


def _bert_config(tok: PreTrainedTokenizerFast, **extra: Any) -> BertConfig:
    return BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=MAX_POSITIONS,
        type_vocab_size=2,
        initializer_range=INIT_RANGE,
        pad_token_id=tok.pad_token_id,
        **extra,
    )


def _labels(id2label: dict[int, str]) -> dict[str, Any]:
    return {"id2label": dict(id2label), "label2id": {v: k for k, v in id2label.items()}}


def _save(model: PreTrainedModel, tok: PreTrainedTokenizerFast, path: pathlib.Path) -> None:
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)


def _build_gpt2(path: pathlib.Path) -> None:
    tok = _gpt2_tokenizer()
    eos = tok.eos_token_id
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=MAX_POSITIONS,
        n_embd=32,
        n_layer=2,
        n_head=2,
        initializer_range=INIT_RANGE,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config)
    # Only the token ids; do_sample/max_new_tokens stay unset so the pipeline's own defaults apply.
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos)
    _save(model, tok, path)


def build_generation_model(root: pathlib.Path, arch: str = "llama", *, layers: int = 2,
                           hidden: int = 32) -> pathlib.Path:
    """A tiny causal LM for text-generation beside the GPT-2 one: ``arch`` "llama" (rotary
    positions, RMSNorm, grouped-query attention, SwiGLU) or "gpt2"; ``layers``/``hidden``
    size it (the generation benchmark uses a 4-layer, 256-wide one so that a decoding step
    costs something on a CPU). Built once per (arch, size) under ``root``."""
    if arch not in ("llama", "gpt2"):
        raise ValueError(f"unknown arch {arch!r}; expected llama or gpt2")
    return build_once(f"text-generation-{arch}-{layers}x{hidden}", root,
                      lambda path: _build_causal_lm(path, arch, layers, hidden))


def _build_causal_lm(path: pathlib.Path, arch: str, layers: int, hidden: int) -> None:
    tok = _gpt2_tokenizer()
    eos = tok.eos_token_id
    config: Any
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=MAX_POSITIONS, initializer_range=INIT_RANGE,
            bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False,
        )
        model_class: type[PreTrainedModel] = LlamaForCausalLM
    else:
        config = GPT2Config(vocab_size=len(tok), n_positions=MAX_POSITIONS, n_embd=hidden,
                            n_layer=layers, n_head=4, initializer_range=INIT_RANGE,
                            bos_token_id=eos, eos_token_id=eos)
        model_class = GPT2LMHeadModel
    torch.manual_seed(SEED)
    model = model_class(config)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos)
    _save(model, tok, path)


def _build_bert(path: pathlib.Path, cls: type[PreTrainedModel], **extra: Any) -> None:
    tok = _bert_tokenizer()
    torch.manual_seed(SEED)
    _save(cls(_bert_config(tok, **extra)), tok, path)


_BUILDERS: dict[str, Any] = {
    "text-generation": _build_gpt2,
    "feature-extraction": lambda p: _build_bert(p, BertModel),
    "text-classification": lambda p: _build_bert(
        p,
        BertForSequenceClassification,
        problem_type="single_label_classification",
        **_labels(SENTIMENT_LABELS),
    ),
    "token-classification": lambda p: _build_bert(
        p, BertForTokenClassification, **_labels(NER_LABELS)
    ),
    "fill-mask": lambda p: _build_bert(p, BertForMaskedLM),
    "zero-shot-classification": lambda p: _build_bert(
        p, BertForSequenceClassification, **_labels(NLI_LABELS)
    ),
}
assert set(_BUILDERS) == set(TEXT_TASKS)


# --- a Llama-style generation model (streaming tests) -----------------------------------------

LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")


def _llama_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE (``▁`` marks spaces, a space is prepended to the text, the
    decoder strips it again), ``<s>`` prepended to every prompt, no pad token: decoding a
    sequence's tokens alone drops its leading space, the classic trap of streamed text."""
    unk, bos, eos = LLAMA_SPECIALS
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = BpeTrainer(vocab_size=300, special_tokens=list(LLAMA_SPECIALS),
                         initial_alphabet=sorted(set("".join(CORPUS)) | {"\u2581"}),
                         show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
        model_max_length=MAX_POSITIONS, padding_side="left", clean_up_tokenization_spaces=False)


def _build_llama(path: pathlib.Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _llama_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=MAX_POSITIONS,
        initializer_range=INIT_RANGE, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id)
    _save(model, tok, path)


def build_llama_model(root: pathlib.Path) -> pathlib.Path:
    """A tiny random Llama-style text-generation model (built once in ``root``)."""
    return build_once("text-generation-llama", root, _build_llama)
