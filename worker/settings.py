"""The worker's settings: one class, read from `WORKER_*` environment variables.

A misspelt variable fails start-up: besides pydantic's `extra="forbid"`, every `WORKER_*`
variable in the environment must name a field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "WORKER_"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    # Address Hypercorn binds.
    host: str = "127.0.0.1"
    # Port Hypercorn binds.
    port: int = Field(default=8001, ge=0, le=65535)
    # Engine name from the registry in worker.engines (one engine per worker).
    engine: str = "piper"
    # Engine-specific options as a JSON object, passed to the engine's factory as keywords
    # after the common ones below (e.g. {"gain": 1.2} for piper).
    engine_options: dict[str, Any] = Field(default_factory=dict)
    # Directory of extra voices for the engine (piper: <name>.onnx + <name>.onnx.json).
    voices_dir: Path | None = None
    # Directory of the engine's model files (engines that need one, e.g. cosyvoice).
    model_dir: Path | None = None
    # Device the engine runs on, for engines that choose ("cpu", "cuda", "cuda:1").
    device: str | None = None
    # Compute threads for the engine (piper: ONNX Runtime intra-op threads); unset = all
    # cores this process may use.
    threads: int | None = Field(default=None, ge=1)
    # Syntheses that may run at once.
    max_concurrency: int = Field(default=2, ge=1)
    # Requests that may wait for a slot; one more is refused at once with 503 busy.
    max_queue: int = Field(default=4, ge=0)
    # Longest a request waits in the queue before it is refused with 503 busy.
    queue_timeout_s: float = Field(default=10.0, gt=0)
    # Deadline for a whole request, queue wait included; past it the stream is aborted.
    request_deadline_s: float = Field(default=300.0, gt=0)
    # On SIGTERM: how long streams in progress may go on before they are cut, in seconds (no new
    # connection is accepted meanwhile); Kubernetes sets it to the request deadline.
    shutdown_grace_s: float = Field(default=5.0, gt=0)
    # Seconds a refused client is told to wait (Retry-After).
    retry_after_s: int = Field(default=1, ge=0)
    # Longest accepted text, in characters after normalization.
    max_text_chars: int = Field(default=4096, ge=1)
    # Largest accepted request body, in bytes (prompt audio travels base64 in it).
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # Bring every voice to one loudness (ITU-R BS.1770) with a look-ahead peak limiter.
    loudness: bool = True
    # Integrated loudness every voice is brought to, in LUFS.
    loudness_target_lufs: float = Field(default=-18.0, ge=-70.0, le=-5.0)
    # Highest sample level after the loudness gain, in dBFS (the limiter keeps peaks under it).
    peak_ceiling_dbfs: float = Field(default=-1.0, ge=-20.0, le=0.0)
    # Log level of the root logger.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "WARNING"
    # One JSON object per log line instead of plain text.
    log_json: bool = False

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_environment(cls, data: Any) -> Any:
        known = {f"{ENV_PREFIX}{name}".upper() for name in cls.model_fields}
        unknown = sorted(
            key
            for key in os.environ
            if key.upper().startswith(ENV_PREFIX) and key.upper() not in known
        )
        if unknown:
            raise ValueError(f"Unknown worker settings in the environment: {', '.join(unknown)}")
        return data

    def engine_kwargs(self) -> dict[str, Any]:
        """Keywords for the engine factory: the common options that are set, then engine_options."""
        common: dict[str, Any] = {
            "voices_dir": self.voices_dir,
            "model_dir": self.model_dir,
            "device": self.device,
            "threads": self.threads,
        }
        return {key: value for key, value in common.items() if value is not None} | dict(
            self.engine_options
        )
