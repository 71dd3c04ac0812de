"""The upstream CosyVoice2 implementation (PyPI `cosyvoice2-eu`), importable beside this project.

Upstream hard-imports packages it does not need for inference (torchaudio, hydra through
`matcha.utils`, TensorRT helpers); `install_shims` stands in for them, so the reference can run in
tests (parity) and benchmarks (side-by-side figures). Never used by the service itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
import warnings
from pathlib import Path
from typing import Any


def available() -> bool:
    return importlib.util.find_spec("cosyvoice") is not None


def install_shims() -> None:
    """Idempotent: module stand-ins for what upstream imports but inference never calls."""
    if "cosyvoice.utils.file_utils" not in sys.modules:
        fu = types.ModuleType("cosyvoice.utils.file_utils")
        fu.logging = logging  # type: ignore[attr-defined]
        fu.convert_onnx_to_trt = None  # type: ignore[attr-defined]
        fu.export_cosyvoice2_vllm = None  # type: ignore[attr-defined]
        sys.modules["cosyvoice.utils.file_utils"] = fu
    if "matcha.utils" not in sys.modules:
        spec = importlib.util.find_spec("matcha")
        if spec is None or spec.origin is None:
            raise ImportError("the upstream package (cosyvoice2-eu) is not installed")
        mu = types.ModuleType("matcha.utils")
        mu.__path__ = [str(Path(spec.origin).parent / "utils")]
        sys.modules["matcha.utils"] = mu
        importlib.import_module("matcha").utils = mu
        pl = types.ModuleType("matcha.utils.pylogger")
        pl.get_pylogger = logging.getLogger  # type: ignore[attr-defined]
        sys.modules["matcha.utils.pylogger"] = pl
        importlib.import_module("matcha.utils.audio")


def load_configs(model_dir: Path) -> dict[str, Any]:
    """Upstream's own modules (`llm`, `flow`, `hift`, `feat_extractor`, ...) from the yaml."""
    install_shims()
    from hyperpyyaml import load_hyperpyyaml

    # Upstream's own deprecation warnings are not this project's to fix.
    with warnings.catch_warnings(), (model_dir / "cosyvoice2.yaml").open() as f:
        warnings.simplefilter("ignore")
        configs: dict[str, Any] = load_hyperpyyaml(
            f, overrides={"qwen_pretrain_path": str(model_dir / "CosyVoice-BlankEN")}
        )
    return configs
