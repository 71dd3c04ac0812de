"""What CosyVoice3's frontend does differently from CosyVoice2's, as data for `Frontend`.

- The speech tokenizer is `speech_tokenizer_v3.onnx` (same input: Whisper's 128-bin log-mel of
  16 kHz audio; 25 tokens a second).
- The prompt mel has no `fmax` (read from `cosyvoice3.yaml`'s `feat_extractor`, as for
  CosyVoice2 where it is 8000).
- Every input holds `<|endofprompt|>` after a system text: "You are a helpful assistant." before
  a transcript, or alone (sft, cross-lingual), and "You are a helpful assistant. {instruction}"
  for an instruction.
- The text tokenizer gets `<|endofsystem|>` after CosyVoice2's special tokens. The release also
  adds ARPAbet and pinyin tokens ("[AA1]", "[ni3]", ...) after it; they are left out here because
  the text normaliser removes square brackets, so no request can reach them, and tokens added
  last change no other token's id.
"""

from __future__ import annotations

from worker.engines.cosyvoice.frontend import SPECIAL_TOKENS, FrontendSpec, PromptFormat

SYSTEM_PROMPT = "You are a helpful assistant."

COSYVOICE3 = FrontendSpec(
    speech_tokenizer="speech_tokenizer_v3.onnx",
    special_tokens=(*SPECIAL_TOKENS, "<|endofsystem|>"),
    prompt=PromptFormat(system=SYSTEM_PROMPT),
)
