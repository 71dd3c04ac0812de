"""Complete files from streamed audio: true lengths in WAV and FLAC headers.

A stream's header is written before its length is known: WAV says 0xFFFFFFFF for its sizes,
FLAC's STREAMINFO says "total samples unknown". Once the whole body is known (a cache entry, a
batch item), `complete_file` states the real lengths, so that readers which need a length up
front (`soundfile.read`, many players) read it. Other formats are returned unchanged: raw PCM
has no header, MP3 streams are constant bitrate and Ogg/Opus pages carry their own positions.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile

from contract.audio import AudioFormat

_FLAC_MAGIC = b"fLaC"
_FLAC_TOTAL_SAMPLES = slice(18, 26)  # the 8 bytes whose low 36 bits are STREAMINFO's total
_DECODE_BLOCK = 1 << 16


def complete_file(body: bytes, audio_format: AudioFormat) -> bytes:
    """`body` with its header's lengths made true (WAV, FLAC); anything else as it is.

    A body that is not the format it claims is returned unchanged: completing headers never
    turns a response into an error.
    """
    if audio_format is AudioFormat.WAV:
        return complete_wav(body)
    if audio_format is AudioFormat.FLAC:
        return complete_flac(body)
    return body


def complete_wav(body: bytes) -> bytes:
    """Set the RIFF size and the `data` chunk's size to what `body` holds."""
    if len(body) < 12 or body[:4] != b"RIFF" or body[8:12] != b"WAVE":
        return body
    patched = bytearray(body)
    patched[4:8] = struct.pack("<I", min(len(body) - 8, 0xFFFFFFFF))
    offset = 12
    while offset + 8 <= len(body):
        chunk_id = body[offset : offset + 4]
        (size,) = struct.unpack_from("<I", body, offset + 4)
        if chunk_id == b"data":
            data_size = len(body) - offset - 8
            patched[offset + 4 : offset + 8] = struct.pack("<I", min(data_size, 0xFFFFFFFF))
            return bytes(patched)
        offset += 8 + size + (size & 1)
    return body


def flac_total_samples(body: bytes) -> int | None:
    """STREAMINFO's total samples (0: unknown), or None when `body` is not FLAC."""
    if len(body) < 42 or body[:4] != _FLAC_MAGIC or body[4] & 0x7F != 0:
        return None
    return int.from_bytes(body[_FLAC_TOTAL_SAMPLES], "big") & ((1 << 36) - 1)


def complete_flac(body: bytes) -> bytes:
    """Re-encode a streamed FLAC (lossless: the same samples) into a file whose STREAMINFO
    has its totals (sample count, frame sizes, MD5); a complete one is returned as it is."""
    if flac_total_samples(body) != 0:
        return body
    try:
        with soundfile.SoundFile(io.BytesIO(body)) as source:
            # With no total in STREAMINFO, soundfile's seek after each read fails at the end
            # of the stream (losing the last block); read it as the stream it is instead.
            source.seekable = lambda: False
            rate, channels = source.samplerate, source.channels
            pieces = []
            while True:
                piece = source.read(_DECODE_BLOCK, dtype="int16", always_2d=True)
                if not len(piece):
                    break
                pieces.append(piece)
    except (soundfile.LibsndfileError, RuntimeError):
        return body
    samples = np.concatenate(pieces) if pieces else np.zeros((0, channels), dtype=np.int16)
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="FLAC", subtype="PCM_16")
    return out.getvalue()
