"""Audio formats on the wire: names, content types, output sample rates and stream headers."""

from __future__ import annotations

from enum import StrEnum


class AudioFormat(StrEnum):
    PCM_F32LE = "pcm_f32le"  # raw little-endian float32, the seed service's stream
    PCM = "pcm"  # raw little-endian int16 at 24 kHz, as OpenAI documents it
    WAV = "wav"  # 16-bit PCM with a streaming header (unknown length)
    FLAC = "flac"
    MP3 = "mp3"
    OPUS = "opus"  # Ogg/Opus


CONTENT_TYPES: dict[AudioFormat, str] = {
    AudioFormat.PCM_F32LE: "application/octet-stream",
    AudioFormat.PCM: "audio/pcm",
    AudioFormat.WAV: "audio/wav",
    AudioFormat.FLAC: "audio/flac",
    AudioFormat.MP3: "audio/mpeg",
    AudioFormat.OPUS: "audio/ogg",
}

OPENAI_PCM_SAMPLE_RATE = 24000
OPUS_SAMPLE_RATES = (8000, 12000, 16000, 24000, 48000)

# Response headers that describe the audio in a stream.
SAMPLE_RATE_HEADER = "X-Sample-Rate"
FORMAT_HEADER = "X-Audio-Format"
CHANNELS_HEADER = "X-Audio-Channels"
SAMPLE_FORMAT_HEADER = "X-Sample-Format"

SAMPLE_FORMATS: dict[AudioFormat, str] = {
    AudioFormat.PCM_F32LE: "f32le",
    AudioFormat.PCM: "s16le",
    AudioFormat.WAV: "s16le",
    AudioFormat.FLAC: "s16",
    AudioFormat.MP3: "compressed",
    AudioFormat.OPUS: "compressed",
}


def output_sample_rate(audio_format: AudioFormat, engine_sample_rate: int) -> int:
    """The rate a stream of this format is sent at, given the engine's native rate.

    `pcm` is always 24 kHz (what OpenAI clients assume); Ogg/Opus only takes a few rates;
    every other format keeps the engine's rate.
    """
    if audio_format is AudioFormat.PCM:
        return OPENAI_PCM_SAMPLE_RATE
    if audio_format is AudioFormat.OPUS and engine_sample_rate not in OPUS_SAMPLE_RATES:
        return OPENAI_PCM_SAMPLE_RATE
    return engine_sample_rate


def stream_headers(audio_format: AudioFormat, sample_rate: int) -> dict[str, str]:
    return {
        "Content-Type": CONTENT_TYPES[audio_format],
        SAMPLE_RATE_HEADER: str(sample_rate),
        FORMAT_HEADER: audio_format.value,
        CHANNELS_HEADER: "1",
        SAMPLE_FORMAT_HEADER: SAMPLE_FORMATS[audio_format],
    }
