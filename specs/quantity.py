"""Kubernetes resource quantities (cpu, memory) checked when config loads, not when a cluster
rejects the pod: `8GB` or `lots` fail here with the key that holds them."""
from __future__ import annotations

import importlib.util
import re
from decimal import ROUND_CEILING, Decimal
from functools import cache
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator

# The CRDs' own pattern for a quantity (PyTorchJob/InferenceService `resources.limits`, from
# k8s.io/apimachinery/pkg/api/resource/quantity.go): parse_quantity alone also takes "1_000",
# " 1" and "1e3Mi", which the API server refuses.
QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
                      r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
MEBIBYTE = Decimal(1 << 20)


@cache
def _parse_quantity():
    """kubernetes.utils.quantity.parse_quantity (kubernetes==30.1.0). Loaded from its own file when
    it can be: `import kubernetes` imports the whole API client first (~0.4 s), and every KFP task
    re-validates its specs in a fresh process."""
    found = importlib.util.find_spec("kubernetes")
    module_file = Path(next(iter(found.submodule_search_locations or []), "")) / "utils" / "quantity.py" \
        if found else None
    if module_file and module_file.is_file():
        spec = importlib.util.spec_from_file_location("_flywheel_k8s_quantity", module_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.parse_quantity
    from kubernetes.utils.quantity import parse_quantity

    return parse_quantity


def parse(value: str) -> Decimal:
    """The quantity's value in base units (cores, bytes); ValueError with an example when it is not one."""
    text = str(value)
    if not QUANTITY.match(text):
        hint = ""
        if re.fullmatch(r"[0-9.]+[KMGTPE]B", text, flags=re.IGNORECASE):
            hint = f" (Kubernetes has no 'B' suffix: {text[:-2]}{text[-2].upper()}i or {text[:-2]}{text[-2].upper()})"
        raise ValueError(f"not a Kubernetes quantity: {text!r}{hint}; e.g. 512Mi or 8Gi (memory), 500m or 2 (cpu)")
    return _parse_quantity()(text)


def format_cpu(cores: Decimal) -> str:
    """Cores as Kubernetes writes them, rounded up to the millicore: 1.5 -> '1500m', 2 -> '2'."""
    milli = int((cores * 1000).to_integral_value(ROUND_CEILING))
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def format_memory(size: Decimal) -> str:
    """Bytes rounded up to the mebibyte: '1908Mi', or whole gibibytes as '32Gi'."""
    mebi = int((size / MEBIBYTE).to_integral_value(ROUND_CEILING))
    return f"{mebi // 1024}Gi" if mebi % 1024 == 0 else f"{mebi}Mi"


def _number_as_text(value):
    # `cpu: 2` in YAML is an int; Kubernetes takes it as the quantity "2".
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _cpu(value: str) -> str:
    if parse(value) < Decimal("0.001"):
        raise ValueError(f"cpu {value!r} is less than 1m (a thousandth of a core), the smallest Kubernetes allows")
    return value


def _memory(value: str) -> str:
    amount = parse(value)
    if amount < MEBIBYTE:
        example = f"{value}Gi or {value}Mi" if str(value).isdigit() else "512Mi or 8Gi"
        raise ValueError(f"memory {value!r} is {amount:f} bytes, less than 1Mi; e.g. {example}")
    return value


Cpu = Annotated[str, BeforeValidator(_number_as_text), AfterValidator(_cpu)]
Memory = Annotated[str, BeforeValidator(_number_as_text), AfterValidator(_memory)]
