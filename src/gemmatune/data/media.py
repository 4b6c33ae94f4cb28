"""Image and audio parts of chat rows: checking the files, reading them, and turning a batch's parts into the
tensors a multimodal model takes (the model's own processor computes them).

A row's user turn may hold parts next to its text, in the layout of the Gemma 3n processor and the OpenAI/HF
chat conventions: `{"type": "text", "text": ...}`, `{"type": "image", "path": ...}`,
`{"type": "audio", "path": ...}`, paths relative to the data file. The processor decides how many soft tokens a
part gets (its `replace_image_token` / `replace_audio_token`): Gemma 3n gives every image and every clip the same
count, Gemma 4 counts them per part from the image's size and the clip's length. data.py checks every file once
before the model loads (`check_media_file`); the collator reads them again per batch, so no decoded media sits in
memory.

Audio: WAV (PCM, any channel count, averaged to mono) at the feature extractor's 16 kHz; we do not resample,
since a quiet linear resampler would change what the model hears. A clip may last at most 30 s: Gemma 3n's
processor gives every clip 188 soft tokens, which cover 30 s (Gemma 4's 750 at most cover the same 30 s).
"""

from __future__ import annotations

import wave
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gemmatune.errors import GemmatuneError
from gemmatune.models import MEDIA_TOKEN_ATTRS

KINDS = ("image", "audio")
SAMPLE_RATE = 16_000
MAX_AUDIO_SECONDS = 30.0


@dataclass(frozen=True)
class Part:
    kind: str  # image | audio
    path: str  # absolute


class _PartInputs(Mapping):
    """The processor's inputs for one part, computed on first read: Gemma 3n's processor writes every part the same
    way and never reads them (no image decoded twice), Gemma 4's counts the part's soft tokens from them."""

    def __init__(self, compute):
        self._compute, self._value = compute, None

    def _inputs(self) -> Mapping:
        if self._value is None:
            self._value = self._compute()
        return self._value

    def __getitem__(self, key):
        return self._inputs()[key]

    def __iter__(self):
        return iter(self._inputs())

    def __len__(self):
        return len(self._inputs())


@dataclass(frozen=True)
class MediaTokens:
    """How a model's processor writes image and audio parts into the token stream."""

    processor: object
    ids: frozenset  # ids of the markers and soft tokens: never a label

    def text_for(self, part: Part) -> str:
        """The text that stands for `part` (begin marker, its soft tokens, end marker), written by the processor
        itself, so the count always equals what the model's tower puts there."""
        proc = self.processor
        if part.kind == "image":
            inputs = _PartInputs(lambda: proc.image_processor([read_image(part.path)], return_tensors="np"))
            return proc.replace_image_token(inputs, 0)
        # Alone, as the collator computes each clip's features (see _clip_features).
        inputs = _PartInputs(lambda: proc.feature_extractor([read_audio(part.path)], sampling_rate=SAMPLE_RATE,
                                                            return_tensors="np"))
        return proc.replace_audio_token(inputs, 0)


def media_tokens(processor) -> MediaTokens:
    """The markers and soft tokens of a Gemma 3n- or Gemma 4-style processor: its tokenizer names them."""
    tok = processor.tokenizer
    ids = frozenset(tok.convert_tokens_to_ids(getattr(tok, name)) for name in MEDIA_TOKEN_ATTRS)
    return MediaTokens(processor, ids)


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
    """The model inputs for `parts` in order, computed by the model's own processor: for the images what its image
    processor returns and the model takes (`pixel_values`; Gemma 4 adds each patch's `image_position_ids`), for the
    audio clips `input_features` and `input_features_mask`."""
    out: dict = {}
    images = [read_image(p.path) for p in parts if p.kind == "image"]
    clips = [read_audio(p.path) for p in parts if p.kind == "audio"]
    if images:
        # The processor lists what the model takes; Gemma 4's per-image soft-token counts are for the text only.
        taken = set(processor.model_input_names) - set(getattr(processor, "unused_input_names", ()))
        computed = processor.image_processor(images, return_tensors="pt")
        out.update({k: v for k, v in computed.items() if k in taken})
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
        out.update(token_types(out["input_ids"], self.processor))
        return out


def token_types(input_ids, processor) -> dict:
    """`mm_token_type_ids` (0 text, 1 image, 2 video, 3 audio soft token) where the processor says the model takes
    them: Gemma 4 models with `use_bidirectional_attention: vision` let an image's soft tokens see each other only
    through them, so a batch without them would train on a causal view the model never runs with."""
    import torch

    if "mm_token_type_ids" not in processor.model_input_names:
        return {}
    return {"mm_token_type_ids": torch.tensor(processor.create_mm_token_type_ids(input_ids.tolist()))}
