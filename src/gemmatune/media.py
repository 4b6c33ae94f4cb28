"""Image and audio parts of chat rows: checking the files, reading them, and turning a batch's parts into the
tensors a multimodal model takes (the model's own processor computes them).

A row's user turn may hold parts next to its text, in the layout of the Gemma 3n processor and the OpenAI/HF
chat conventions: `{"type": "text", "text": ...}`, `{"type": "image", "path": ...}`,
`{"type": "audio", "path": ...}`, paths relative to the data file. data.py checks every file once before the
model loads (`check_media_file`); the collator reads them again per batch, so no decoded media sits in memory.

Audio: WAV (PCM, any channel count, averaged to mono) at the feature extractor's 16 kHz; we do not resample,
since a quiet linear resampler would change what the model hears. A clip may last at most 30 s: Gemma 3n's
processor gives every clip 188 soft tokens, which cover 30 s.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gemmatune.errors import GemmatuneError

KINDS = ("image", "audio")
SAMPLE_RATE = 16_000
MAX_AUDIO_SECONDS = 30.0


@dataclass(frozen=True)
class Part:
    kind: str  # image | audio
    path: str  # absolute


@dataclass(frozen=True)
class MediaTokens:
    """How a model's processor writes image and audio parts into the token stream."""

    text: dict  # kind -> the text that stands for one part (begin marker, soft tokens, end marker)
    ids: frozenset  # ids of those markers and soft tokens: never a label


def media_tokens(processor) -> MediaTokens:
    """From a Gemma 3n-style processor: each image is `full_image_sequence` (256 soft tokens in E2B/E4B), each
    audio clip `full_audio_sequence` (188)."""
    tok = processor.tokenizer
    text = {"image": processor.full_image_sequence, "audio": processor.full_audio_sequence}
    names = ("image_token", "boi_token", "eoi_token", "audio_token", "boa_token", "eoa_token")
    ids = frozenset(tok.convert_tokens_to_ids(getattr(tok, name)) for name in names)
    return MediaTokens(text, ids)


def check_media_file(kind: str, path: Path, where: str) -> None:
    """Raise GemmatuneError naming `where` (file and line) when `path` is missing, unreadable, of the wrong kind,
    or (audio) not 16 kHz or longer than 30 s."""
    if not path.is_file():
        raise GemmatuneError(f"{where}: {kind} file {path} not found")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise GemmatuneError(f"{where}: {kind} file {path} cannot be read ({exc.strerror})") from None
    if kind == "image":
        _check_image(path, where)
    else:
        _check_audio(path, where)


def _check_image(path: Path, where: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise GemmatuneError(f"{where}: image file {path} is not a readable image ({exc})") from None


def _wav_info(path: Path, where: str) -> tuple[int, int, int, int]:
    """(channels, sample width in bytes, rate, frames) of a PCM WAV file."""
    try:
        with wave.open(str(path), "rb") as w:
            return w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
    except (wave.Error, EOFError) as exc:
        raise GemmatuneError(f"{where}: audio file {path} is not a PCM WAV file ({exc}); convert it, e.g. "
                             f"sox in.mp3 -r 16000 out.wav") from None


def _check_audio(path: Path, where: str) -> None:
    _, width, rate, frames = _wav_info(path, where)
    if width not in (1, 2, 4):
        raise GemmatuneError(f"{where}: audio file {path} has {8 * width}-bit samples; use 8, 16 or 32-bit PCM")
    if rate != SAMPLE_RATE:
        raise GemmatuneError(f"{where}: audio file {path} is sampled at {rate} Hz; the model hears {SAMPLE_RATE} Hz: "
                             f"resample it, e.g. sox in.wav -r {SAMPLE_RATE} out.wav")
    if frames / rate > MAX_AUDIO_SECONDS:
        raise GemmatuneError(f"{where}: audio file {path} lasts {frames / rate:.1f} s; at most "
                             f"{MAX_AUDIO_SECONDS:.0f} s fit the model's audio soft tokens: cut it")
    if frames == 0:
        raise GemmatuneError(f"{where}: audio file {path} holds no samples")


def read_audio(path: str) -> np.ndarray:
    """A checked WAV file as float32 mono samples in [-1, 1]."""
    with wave.open(path, "rb") as w:
        channels, width, frames = w.getnchannels(), w.getsampwidth(), w.getnframes()
        raw = w.readframes(frames)
    if width == 1:  # 8-bit WAV is unsigned
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128) / 128
    else:
        dtype = {2: np.int16, 4: np.int32}[width]
        samples = np.frombuffer(raw, dtype=dtype).astype(np.float32) / float(np.iinfo(dtype).max)
    return samples.reshape(-1, channels).mean(axis=1)


def read_image(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    """Float samples in [-1, 1] as a 16-bit mono WAV file (examples and tests make their audio with it)."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def media_features(parts: list[Part], processor) -> dict:
    """The model inputs for `parts` in order: `pixel_values` for the images, `input_features` and
    `input_features_mask` for the audio clips, computed by the model's own processor."""
    out: dict = {}
    images = [read_image(p.path) for p in parts if p.kind == "image"]
    clips = [read_audio(p.path) for p in parts if p.kind == "audio"]
    if images:
        out["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    if clips:
        out["input_features"], out["input_features_mask"] = _clip_features(clips, processor.feature_extractor)
    return out


def _clip_features(clips: list[np.ndarray], extractor):
    """Log-mel features of each clip computed alone, then padded to the longest (mask False on the padding).

    Not one call for the batch: the feature extractor pads the waveforms to the longest clip first, and then a
    shorter clip gets a few more valid frames than it has alone, so its soft tokens (and the loss) would depend
    on which clips share its batch."""
    import torch

    feats = [extractor([c], sampling_rate=SAMPLE_RATE, return_tensors="pt") for c in clips]
    width = max(f["input_features"].shape[1] for f in feats)
    features = torch.zeros((len(clips), width, feats[0]["input_features"].shape[2]))
    mask = torch.zeros((len(clips), width), dtype=torch.bool)
    for i, f in enumerate(feats):
        n = f["input_features"].shape[1]
        features[i, :n] = f["input_features"][0]
        mask[i, :n] = f["input_features_mask"][0].bool()
    return features, mask


class MediaCollator:
    """Wraps a text collator (padding or packing): the ids and labels are batched by it, and the image and audio
    parts of the batch's examples, in example order (the order their soft tokens appear in the batch), become
    the processor's tensors. The model fills its soft tokens with them in that same order."""

    def __init__(self, text_collator, processor):
        self.text = text_collator
        self.processor = processor

    def __call__(self, batch: list[dict]) -> dict:
        out = self.text(batch)
        parts = [part for b in batch for part in b.get("media", ())]
        out.update(media_features(parts, self.processor))
        return out
