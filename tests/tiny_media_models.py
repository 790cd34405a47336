"""Tiny random image and audio models for tests, built on disk in seconds without any network.

Each model is a real ``save_pretrained`` directory (config, safetensors weights, and the image
processor, feature extractor and tokenizer the pipeline needs) that loads offline through
``transformers.pipeline(task, model=dir)``. No backbone needs pretrained weights from the hub
(no timm): every architecture is built from its own config class with random weights, seeded.

    >>> path = build_media_model("image-classification", tmp_path)
    >>> transformers.pipeline("image-classification", model=str(path))(pil_image)

Also here: deterministic test inputs (``sample_image``, ``sample_audio``, ``wav_bytes``).
"""

from __future__ import annotations

import io
import json
import math
import pathlib
from typing import Any

import numpy as np
import torch
from PIL import Image
from tiny_models import build_once
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    PreTrainedTokenizerFast,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessorPil,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2ForSequenceClassification,
    YolosConfig,
    YolosForObjectDetection,
    YolosImageProcessorPil,
)

MEDIA_TASKS: tuple[str, ...] = (
    "image-classification",
    "image-segmentation",
    "object-detection",
    "zero-shot-image-classification",
    "audio-classification",
    "automatic-speech-recognition",
)

SEED = 4321
# Larger than the usual 0.02 so that random logits are peaked: argmax labels, CTC tokens and
# mask pixels then do not flip on float noise (batched vs unbatched).
INIT_RANGE = 0.4
SAMPLING_RATE = 16_000
_DONE_MARKER = ".tiny-model-complete"

IMAGE_LABELS = {0: "cat", 1: "dog", 2: "bird", 3: "fish"}
SEGMENT_LABELS = {0: "background", 1: "sky", 2: "road"}
DETECTION_LABELS = {0: "person", 1: "car", 2: "tree"}
AUDIO_LABELS = {0: "speech", 1: "music", 2: "noise"}
CTC_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"abcdefghijklmnopqrstuvwxyz'"]
CLIP_CORPUS = (
    "a photo of a cat", "a photo of a dog", "a photo of a bird", "a red car on a road",
    "a picture of the sky", "a tree in a field", "This is a photo of something.",
)


def build_media_model(task: str, root: pathlib.Path) -> pathlib.Path:
    """Build (or reuse, if already built in root/<task>) a tiny model dir for ``task``.

    Idempotent and safe to call concurrently: a finished build is marked by a marker file.
    """
    if task not in _BUILDERS:
        raise ValueError(f"unknown task {task!r}; expected one of {MEDIA_TASKS}")

    def seeded(tmp: pathlib.Path) -> None:
        torch.manual_seed(SEED)
        _BUILDERS[task](tmp)

    return build_once(task, root, seeded)


# --- inputs ---------------------------------------------------------------------------------


def sample_image(width: int = 40, height: int = 30, seed: int = 0, mode: str = "RGB"
                 ) -> Image.Image:
    """A deterministic picture: smooth gradients plus a few blocks (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = [
        (127 + 120 * np.sin(x / (3 + seed % 5) + c) * np.cos(y / (4 + c))).astype(np.uint8)
        for c in range(3)
    ]
    pixels = np.stack(channels, axis=-1)
    for _ in range(3):
        x0, y0 = rng.integers(0, max(1, width - 8)), rng.integers(0, max(1, height - 8))
        pixels[y0:y0 + 8, x0:x0 + 8] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    """``image`` encoded as a file (PNG, JPEG ...)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def sample_audio(seconds: float = 0.5, seed: int = 0, rate: int = SAMPLING_RATE) -> np.ndarray:
    """A deterministic mono float32 waveform: two tones plus a little noise, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * math.pi * (220 + 40 * seed) * t) + 0.3 * np.sin(2 * math.pi * 660 * t)
    wave += 0.05 * rng.standard_normal(t.shape)
    return np.clip(wave, -1, 1).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = SAMPLING_RATE, subtype: str = "FLOAT",
              fmt: str = "WAV") -> bytes:
    """``samples`` written as an audio file (32-bit float WAV by default: lossless)."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


# --- builders -------------------------------------------------------------------------------


def _labels(id2label: dict[int, str]) -> dict[str, Any]:
    return {"id2label": dict(id2label), "label2id": {v: k for k, v in id2label.items()}}


def _save(model: Any, path: pathlib.Path, *processors_: Any) -> None:
    model.eval()
    model.save_pretrained(path)
    for processor in processors_:
        processor.save_pretrained(path)


def _vit_processor(size: int = 32) -> ViTImageProcessorPil:
    return ViTImageProcessorPil(size={"height": size, "width": size})


def _build_vit(path: pathlib.Path) -> None:
    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=37, initializer_range=INIT_RANGE,
        **_labels(IMAGE_LABELS),
    )
    _save(ViTForImageClassification(config), path, _vit_processor())


def _build_segformer(path: pathlib.Path) -> None:
    config = SegformerConfig(
        num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
        hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
        mlp_ratios=[2, 2], decoder_hidden_size=16, initializer_range=INIT_RANGE,
        **_labels(SEGMENT_LABELS),
    )
    processor = SegformerImageProcessorPil(size={"height": 32, "width": 32})
    _save(SegformerForSemanticSegmentation(config), path, processor)


def _build_yolos(path: pathlib.Path) -> None:
    config = YolosConfig(
        image_size=[32, 32], patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=37, num_detection_tokens=6,
        initializer_range=INIT_RANGE, **_labels(DETECTION_LABELS),
    )
    processor = YolosImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 64})
    _save(YolosForObjectDetection(config), path, processor)


def _clip_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with CLIP's specials; pads with the end-of-text token like CLIP does."""
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=300, special_tokens=[bos, eos], show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CLIP_CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.token_to_id(bos)),
                                                  (eos, tok.token_to_id(eos))],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   pad_token=eos, unk_token=eos, model_max_length=32)


def _build_clip(path: pathlib.Path) -> None:
    tok = _clip_tokenizer()
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 32,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
              "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16,
                        initializer_factor=INIT_RANGE * 50)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32},
                                      crop_size={"height": 32, "width": 32})
    _save(CLIPModel(config), path, processor, tok)


def _wav2vec2_config(**extra: Any) -> Wav2Vec2Config:
    # feat_extract_norm="layer" means the feature extractor returns an attention mask, so a
    # padded (batched) input gives the same result as the input alone.
    return Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True, initializer_range=INIT_RANGE,
        mask_time_prob=0.0, layerdrop=0.0, **extra,
    )


def _feature_extractor() -> Wav2Vec2FeatureExtractor:
    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLING_RATE,
                                    padding_value=0.0, do_normalize=True,
                                    return_attention_mask=True)


def _build_wav2vec2_classifier(path: pathlib.Path) -> None:
    config = _wav2vec2_config(classifier_proj_size=16, use_weighted_layer_sum=False,
                              **_labels(AUDIO_LABELS))
    _save(Wav2Vec2ForSequenceClassification(config), path, _feature_extractor())


def _build_wav2vec2_ctc(path: pathlib.Path) -> None:
    vocab = path / "vocab.json"
    vocab.write_text(json.dumps({token: i for i, token in enumerate(CTC_VOCAB)}))
    tok = Wav2Vec2CTCTokenizer(str(vocab), unk_token="<unk>", pad_token="<pad>",
                               word_delimiter_token="|")
    config = _wav2vec2_config(vocab_size=len(CTC_VOCAB), pad_token_id=tok.pad_token_id,
                              ctc_loss_reduction="mean")
    _save(Wav2Vec2ForCTC(config), path, _feature_extractor(), tok)


_BUILDERS: dict[str, Any] = {
    "image-classification": _build_vit,
    "image-segmentation": _build_segformer,
    "object-detection": _build_yolos,
    "zero-shot-image-classification": _build_clip,
    "audio-classification": _build_wav2vec2_classifier,
    "automatic-speech-recognition": _build_wav2vec2_ctc,
}
assert set(_BUILDERS) == set(MEDIA_TASKS)
