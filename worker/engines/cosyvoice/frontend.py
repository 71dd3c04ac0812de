"""Turning text and prompt recordings into model inputs, for CosyVoice2 and CosyVoice3.

A prompt recording becomes a `VoicePrompt` once: speech tokens (ONNX speech tokenizer), a speaker
embedding (ONNX CAM++), and the prompt mel, trimmed so that mel frames are exactly
`token_mel_ratio` times the tokens. `VoicePrompt.to_bytes`/`from_bytes` let a registered voice be
stored and reused without recomputing anything.

The two models differ only in data, given as a `FrontendSpec`: the speech tokenizer's file, the
special tokens added to the text tokenizer, and the `PromptFormat` (what text goes before the
request's text in each mode). The prompt mel's settings (CosyVoice3 has no `fmax`) come from
the model's yaml.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import soxr
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from contract.errors import ErrorCode, ServiceError
from worker.engines.cosyvoice.config import MelConfig, ModelDirError
from worker.engines.cosyvoice.features import kaldi_fbank, prompt_mel, whisper_log_mel
from worker.engines.cosyvoice.text import normalize

SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|endofprompt|>", "[breath]", "<strong>", "</strong>",
    "[noise]", "[laughter]", "[cough]", "[clucking]", "[accent]", "[quick_breath]",
    "<laughter>", "</laughter>", "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]",
)
END_OF_PROMPT = "<|endofprompt|>"
PROMPT_MIN_SECONDS = 0.5
PROMPT_MAX_SECONDS = 30.0
SILENCE_RMS = 1e-3
VOICE_FORMAT = 1


@dataclass(frozen=True)
class VoicePrompt:
    """Everything a request needs from a prompt recording, computed once.

    `speech_tokens` [1, P] int32, `embedding` [1, D] float32, `mel` [1, 2P, 80] float32.
    `text` is the transcript ("" when unknown, as in cross-lingual use).
    """

    text: str
    speech_tokens: torch.Tensor
    embedding: torch.Tensor
    mel: torch.Tensor
    model_version: str = ""

    def to_bytes(self) -> bytes:
        """A self-describing binary form (npz) for storage, e.g. in Redis."""
        meta = {"format": VOICE_FORMAT, "text": self.text, "model_version": self.model_version}
        buffer = io.BytesIO()
        np.savez(
            buffer,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            speech_tokens=self.speech_tokens.cpu().numpy().astype(np.int32),
            embedding=self.embedding.cpu().float().numpy(),
            mel=self.mel.cpu().float().numpy(),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> VoicePrompt:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                meta = json.loads(npz["meta"].tobytes().decode())
                if meta.get("format") != VOICE_FORMAT:
                    raise ValueError(f"unknown voice format {meta.get('format')!r}")
                return cls(
                    text=str(meta["text"]),
                    speech_tokens=torch.from_numpy(npz["speech_tokens"]),
                    embedding=torch.from_numpy(npz["embedding"]),
                    mel=torch.from_numpy(npz["mel"]),
                    model_version=str(meta.get("model_version", "")),
                )
        except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
            raise ServiceError(ErrorCode.INVALID_REQUEST, "Stored voice data is unreadable.") from e


@dataclass(frozen=True)
class PromptFormat:
    """The text put before a request's text, per mode (normalised, then tokenised on its own).

    `system` is empty for CosyVoice2. CosyVoice3 was trained with a system text and
    `<|endofprompt|>` in every input: "{system}<|endofprompt|>" before a transcript or, with no
    transcript (sft, cross-lingual), alone; "{system} {instruction}<|endofprompt|>" for an
    instruction. CosyVoice2 marks only an instruction's end.
    """

    system: str = ""

    def instruct(self, instruction: str) -> str:
        head = f"{self.system} " if self.system else ""
        return head + normalize(instruction) + END_OF_PROMPT

    def zero_shot(self, transcript: str) -> str:
        return self._head() + normalize(transcript)

    def plain(self) -> str:
        """Sft and cross-lingual: no transcript, no instruction."""
        return self._head()

    def _head(self) -> str:
        return self.system + END_OF_PROMPT if self.system else ""


@dataclass(frozen=True)
class FrontendSpec:
    """What a model's frontend reads and adds: its speech tokenizer's file, the special tokens
    its text tokenizer gets on top of `CosyVoice-BlankEN` (in this order: their ids follow the
    tokenizer's own), and its prompt format."""

    speech_tokenizer: str
    special_tokens: tuple[str, ...]
    prompt: PromptFormat


COSYVOICE2 = FrontendSpec("speech_tokenizer_v2.onnx", SPECIAL_TOKENS, PromptFormat())


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelDirError(f"{path} is not a loadable ONNX model: {e!r}") from e


class Frontend:
    """Text to token ids and prompt recordings to `VoicePrompt`s for one model directory;
    `mel` and `token_mel_ratio` come from its yaml, `spec` says which model it is."""

    def __init__(self, model_dir: Path, mel: MelConfig, token_mel_ratio: int,
                 onnx_threads: int = 1, spec: FrontendSpec = COSYVOICE2) -> None:
        self.mel = mel
        self.token_mel_ratio = token_mel_ratio
        self.spec = spec
        blank = model_dir / "CosyVoice-BlankEN"
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(blank))
        except Exception as e:
            raise ModelDirError(f"{blank} holds no loadable tokenizer: {e!r}") from e
        tokenizer.add_special_tokens(
            {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
             "additional_special_tokens": list(spec.special_tokens)}
        )
        self.tokenizer: PreTrainedTokenizerBase = tokenizer
        self.campplus = _session(model_dir / "campplus.onnx", onnx_threads)
        self.speech_tokenizer = _session(model_dir / spec.speech_tokenizer, onnx_threads)

    @property
    def prompt(self) -> PromptFormat:
        return self.spec.prompt

    def token_id(self, token: str) -> int:
        """The id of one special token (e.g. `<|endofprompt|>`, 151646 in a release)."""
        found = self.tokenizer.convert_tokens_to_ids(token)
        if not isinstance(found, int) or found == self.tokenizer.unk_token_id:
            raise ModelDirError(f"the text tokenizer has no {token}")
        return found

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer([text], return_tensors=None)["input_ids"][0]
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    @staticmethod
    def check_prompt(audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono float32 of a usable prompt; 4xx `ServiceError` for one that is not."""
        wav = np.asarray(audio, dtype=np.float32)
        if wav.ndim == 2:
            wav = wav.mean(axis=1)
        if wav.ndim != 1 or not np.all(np.isfinite(wav)) or sample_rate <= 0:
            raise ServiceError(ErrorCode.PROMPT_NOT_AUDIO, "Prompt audio is not a mono signal.")
        seconds = wav.size / sample_rate
        if seconds < PROMPT_MIN_SECONDS:
            raise ServiceError(
                ErrorCode.PROMPT_TOO_SHORT,
                f"Prompt audio lasts {seconds:.2f} s; at least {PROMPT_MIN_SECONDS} s is needed.",
            )
        if seconds > PROMPT_MAX_SECONDS:
            raise ServiceError(
                ErrorCode.PROMPT_TOO_LONG,
                f"Prompt audio lasts {seconds:.1f} s; at most {PROMPT_MAX_SECONDS:.0f} s is taken.",
            )
        if float(np.sqrt(np.mean(wav.astype(np.float64) ** 2))) < SILENCE_RMS:
            raise ServiceError(ErrorCode.PROMPT_SILENT, "Prompt audio is silent.")
        return wav

    def speech_tokens(self, wav16k: np.ndarray) -> torch.Tensor:
        feat = whisper_log_mel(torch.from_numpy(wav16k)).unsqueeze(0).numpy()
        inputs = self.speech_tokenizer.get_inputs()
        out = self.speech_tokenizer.run(
            None,
            {inputs[0].name: feat, inputs[1].name: np.array([feat.shape[2]], dtype=np.int32)},
        )[0]
        return torch.tensor(np.asarray(out).reshape(1, -1), dtype=torch.int32)

    def speaker_embedding(self, wav16k: np.ndarray) -> torch.Tensor:
        feat = kaldi_fbank(torch.from_numpy(wav16k))
        feat = feat - feat.mean(dim=0, keepdim=True)
        name = self.campplus.get_inputs()[0].name
        out = self.campplus.run(None, {name: feat.unsqueeze(0).numpy()})[0]
        return torch.tensor(np.asarray(out, dtype=np.float32).reshape(1, -1))

    def voice_prompt(self, audio: np.ndarray, sample_rate: int, text: str) -> VoicePrompt:
        """Features of a prompt recording at any sample rate (it is resampled, never rejected)."""
        wav = self.check_prompt(audio, sample_rate)
        wav16k = soxr.resample(wav, sample_rate, 16000).astype(np.float32)
        target = self.mel.sampling_rate
        wav_mel = soxr.resample(wav, sample_rate, target).astype(np.float32)
        mel = prompt_mel(torch.from_numpy(wav_mel), self.mel).unsqueeze(0)
        tokens = self.speech_tokens(wav16k)
        ratio = self.token_mel_ratio
        n = min(mel.size(1) // ratio, tokens.size(1))
        if n == 0:
            raise ServiceError(ErrorCode.PROMPT_TOO_SHORT, "Prompt audio yields no speech tokens.")
        return VoicePrompt(
            text=text,
            speech_tokens=tokens[:, :n],
            embedding=self.speaker_embedding(wav16k),
            mel=mel[:, : ratio * n].contiguous(),
        )
