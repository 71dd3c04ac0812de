"""Texts to synthesize: a pool of repeated phrases (cache hits) and unique texts (misses)."""

from __future__ import annotations

import random
from enum import StrEnum

PHRASES: tuple[str, ...] = (
    "Your order has shipped and will arrive on Tuesday.",
    "Please hold while we connect you to the next available agent.",
    "The meeting has been moved to three o'clock this afternoon.",
    "Thank you for calling. How can I help you today?",
    "Turn left at the next intersection, then continue for two hundred meters.",
    "Your verification code has been sent to the phone number on file.",
    "The weather tomorrow will be mostly sunny with a light breeze.",
    "We could not process your payment. Please check your card details.",
    "Welcome back. You have three new messages.",
    "The train to the city center departs from platform four.",
    "Remember to save your work before closing the application.",
    "Your appointment is confirmed for Monday morning at nine.",
    "The library closes early on public holidays.",
    "Press one for billing, or press two for technical support.",
    "A new software update is ready to install.",
    "Dinner is served in the main hall from six until nine.",
    "The package was left at the front door as requested.",
    "Your subscription renews automatically at the end of the month.",
    "Please fasten your seat belt and return your seat to the upright position.",
    "The museum offers free guided tours every Saturday.",
    "Battery is low. Please connect the charger.",
    "Your table for two is ready. Please follow me.",
    "This call may be recorded for quality and training purposes.",
    "The store will open at ten o'clock tomorrow morning.",
)


class TextMode(StrEnum):
    REPEAT = "repeat"  # only phrases from the pool: cache hits once each phrase was seen
    UNIQUE = "unique"  # every text differs: cache misses
    MIX = "mix"  # a share of pool phrases, the rest unique


class TextSource:
    """Yields the text of each request of one target.

    Unique texts carry `run_id` and a counter, so they differ across levels, targets and runs
    while staying about as long as the pool's phrases (so hit and miss audio compare fairly).
    """

    def __init__(
        self,
        mode: TextMode,
        *,
        run_id: str,
        pool_size: int,
        repeat_ratio: float,
        seed: int,
    ) -> None:
        if not 1 <= pool_size <= len(PHRASES):
            raise ValueError(f"pool_size must be between 1 and {len(PHRASES)}")
        if not 0.0 <= repeat_ratio <= 1.0:
            raise ValueError("repeat_ratio must be between 0 and 1")
        self.mode = mode
        self.run_id = run_id
        self.pool = PHRASES[:pool_size]
        self.repeat_ratio = repeat_ratio
        self._random = random.Random(seed)
        self._counter = 0

    def next_text(self) -> str:
        if self.mode is TextMode.REPEAT:
            return self._random.choice(self.pool)
        if self.mode is TextMode.MIX and self._random.random() < self.repeat_ratio:
            return self._random.choice(self.pool)
        self._counter += 1
        phrase = self._random.choice(self.pool)
        return f"{phrase} Reference {self.run_id} {self._counter}."
