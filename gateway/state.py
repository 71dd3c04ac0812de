"""The objects one gateway app shares between its routes, built at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from gateway.cache import AudioCache
from gateway.metrics import GatewayMetrics
from gateway.service import SpeechService
from gateway.settings import GatewaySettings
from gateway.voices import VoiceStore
from gateway.workers import WorkerDirectory


@dataclass
class GatewayState:
    settings: GatewaySettings
    metrics: GatewayMetrics
    cache: AudioCache
    directory: WorkerDirectory
    voices: VoiceStore
    speech: SpeechService


def gateway_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state
