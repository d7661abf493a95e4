"""What every spec shares: unknown keys are errors (a typo is never a silently missing setting)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
