"""How the champion is served (KServe)."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from specs.base import Strict


class ServingSpec(Strict):
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 1
    canary_percent: Annotated[int, Field(ge=0, le=100)] = 0
    cpu: str = "1"
    memory: str = "1Gi"

    @model_validator(mode="after")
    def _replicas(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError("serving.max_replicas must be >= serving.min_replicas")
        return self
