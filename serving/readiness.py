"""The transformer's readiness, tied to its predictor's: ready while the predictor's model is ready
and declares the tensors the transformer sends. Torch-free.

KServe asks a model's `healthy()` on every inference request too, so the answer is cached for a
short time and probed by one caller at a time; a hop that finds the predictor unreachable drops
the cache so the next caller probes at once.
"""
from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("flywheel.serving")


def _tensors(declared: list[dict]) -> list[tuple]:
    return [(t.get("name"), str(t.get("datatype")).upper(), [int(d) for d in t.get("shape", [])]) for t in declared]


class PredictorReadiness:
    """Probes the predictor behind a hop.

    Args:
        hop: The connection to the predictor.
        expected_inputs: The tensors the transformer sends, as v2 metadata (`contract.input_types`).
        ttl: Seconds an answer is reused.
    """

    def __init__(self, hop, expected_inputs: list[dict], ttl: float = 0.5):
        self.hop, self.expected, self.ttl = hop, _tensors(expected_inputs), ttl
        self._ready, self._until, self._contract_ok = False, 0.0, False
        self._lock: asyncio.Lock | None = None

    async def check(self) -> bool:
        if time.monotonic() < self._until:
            return self._ready
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if time.monotonic() >= self._until:
                self._ready = await self._probe()
                self._until = time.monotonic() + self.ttl
        return self._ready

    def lost(self) -> None:
        """The predictor could not be reached: not ready until a probe says otherwise."""
        self._ready, self._until, self._contract_ok = False, 0.0, False

    async def _probe(self) -> bool:
        if not await self.hop.ready():
            return False
        if not self._contract_ok:
            self._contract_ok = await self._contract()
        return self._contract_ok

    async def _contract(self) -> bool:
        """Whether the predictor declares exactly the inputs the transformer sends."""
        try:
            declared = _tensors((await self.hop.metadata()).get("inputs", []))
        except Exception as err:
            log.warning("cannot read the predictor's metadata: %s", err)
            return False
        if declared != self.expected:
            log.error("the predictor declares inputs %s, this transformer sends %s: not ready", declared, self.expected)
            return False
        return True
