"""Emulated faulty weight-stationary systolic-array accelerator (torch + numpy).

Fault-map types (`ArrayConfig`, `Fault`, `FaultMap`) live in the torch-free
`accelerator.faults` and import eagerly; everything that needs torch is loaded on
first attribute access, so `planner` can use the fault types without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from accelerator.faults import NUMBER_FORMATS, SITES, ArrayConfig, DenseFaults, Fault, FaultMap, NumberFormat

# public name -> submodule that defines it (imported lazily: these need torch)
_LAZY: dict[str, str] = {}

__all__ = ["NUMBER_FORMATS", "SITES", "ArrayConfig", "DenseFaults", "Fault", "FaultMap", "NumberFormat", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'accelerator' has no attribute {name!r}")
