"""Audio duration of a response body, from its bytes and the stream headers.

Raw formats are counted from their byte length and `X-Sample-Rate`; containers are decoded
(WAV by its chunk layout, since a streamed WAV header carries no true length; FLAC, MP3 and
Ogg/Opus through libsndfile).
"""

from __future__ import annotations

import io
import struct

import soundfile

BYTES_PER_SAMPLE = {"pcm_f32le": 4, "pcm": 2}
OPENAI_PCM_RATE = 24000


class AudioDecodeError(ValueError):
    """A body that does not hold audio of the announced format."""


def audio_seconds(body: bytes, audio_format: str, headers: dict[str, str]) -> float:
    """Seconds of mono audio in `body`, sent in `audio_format` with these response headers.

    `headers` must have lower-case keys. Raises AudioDecodeError when the body cannot be
    audio of that format (an odd byte count for raw PCM, a broken container).
    """
    if audio_format in BYTES_PER_SAMPLE:
        width = BYTES_PER_SAMPLE[audio_format]
        rate = _header_rate(headers, default=OPENAI_PCM_RATE if audio_format == "pcm" else None)
        if len(body) % width:
            raise AudioDecodeError(f"{len(body)} bytes is not a whole number of samples")
        return len(body) / width / rate
    if audio_format == "wav":
        return _wav_seconds(body)
    try:
        info = soundfile.info(io.BytesIO(body))
        frames = info.frames
        if frames <= 0:
            data, rate = soundfile.read(io.BytesIO(body), dtype="float32", always_2d=True)
            return float(data.shape[0]) / float(rate)
        return float(frames) / float(info.samplerate)
    except (soundfile.LibsndfileError, RuntimeError) as e:
        raise AudioDecodeError(f"cannot decode {audio_format}: {e}") from e


def _header_rate(headers: dict[str, str], default: int | None) -> int:
    value = headers.get("x-sample-rate")
    if value is None:
        if default is None:
            raise AudioDecodeError("raw audio without an X-Sample-Rate header")
        return default
    try:
        rate = int(value)
    except ValueError as e:
        raise AudioDecodeError(f"bad X-Sample-Rate {value!r}") from e
    if rate <= 0:
        raise AudioDecodeError(f"bad X-Sample-Rate {value!r}")
    return rate


def _wav_seconds(body: bytes) -> float:
    """Duration from the fmt chunk and the bytes after the data chunk's header."""
    if len(body) < 12 or body[:4] != b"RIFF" or body[8:12] != b"WAVE":
        raise AudioDecodeError("not a RIFF/WAVE body")
    offset = 12
    byte_rate: int | None = None
    while offset + 8 <= len(body):
        chunk_id = body[offset : offset + 4]
        (size,) = struct.unpack_from("<I", body, offset + 4)
        if chunk_id == b"fmt " and offset + 20 <= len(body):
            (byte_rate,) = struct.unpack_from("<I", body, offset + 16)
        if chunk_id == b"data":
            if not byte_rate:
                raise AudioDecodeError("WAV data before a valid fmt chunk")
            return (len(body) - offset - 8) / byte_rate
        offset += 8 + size + (size & 1)
    raise AudioDecodeError("WAV body without a data chunk")
