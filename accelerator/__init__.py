"""Emulated faulty weight-stationary systolic-array accelerator (torch + numpy).

Fault-map types (`ArrayConfig`, `Fault`, `FaultMap`, and `bypass_faulty_pes` /
`bypass_pes`, the map of a chip deployed with PEs bypassed) live in the torch-free
`accelerator.faults` and import eagerly; everything that needs torch is loaded on
first attribute access, so `planner` can use the fault types without torch.

Public API (torch-dependent, lazily loaded):

* ``systolic_matmul(x, w, array, faults)`` -> int64 (B, O): the exact reference;
  ``fast_matmul`` the same result on the fast path.
* ``calibrate(model, x)`` stores static activation scales (``<layer>.act_scale``);
  ``on_array(model, array, faults=None, *, ber=0.0, protect=(), seed=None)`` a copy
  running int8 on the faulty array; ``set_faults(model, faults)`` swaps maps;
  ``to_float(model)`` back to a plain model.
* ``train``, ``fault_aware_train``, ``evaluate``, ``accuracy``, ``layer_sensitivity``;
  ``device="cuda"`` runs them on a GPU (same integers on the array; models come back
  where they were given). An ``on_array`` model moved with ``.to("cuda")`` runs there.
* ``cycles(model, array, input_shape, batch)``, ``protected_cycles``, ``tmr_penalty``.
* ``build_model(arch, input_shape, num_classes)``, ``load_model``, ``save_model``,
  ``load_dataset(name, path=None, seed=0)`` -> ``Dataset``.
* ``QUANTIZERS`` / ``quantizer(fmt)``: the number-format extension point.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from accelerator.faults import (
    BYPASS_POLICIES,
    NUMBER_FORMATS,
    SITES,
    ArrayConfig,
    DenseFaults,
    Fault,
    FaultMap,
    NumberFormat,
    bypass_faulty_pes,
    bypass_pes,
    bypassed_pes,
)

if TYPE_CHECKING:  # the real signatures for mypy and editors; at run time `__getattr__` imports them
    from accelerator.cost import TMR_FACTOR, cycles, protected_cycles, tmr_penalty
    from accelerator.data import Dataset, NpyHeader, load_dataset, npz_arrays
    from accelerator.fast import fast_matmul
    from accelerator.layers import (
        ArrayConv2d,
        ArrayLinear,
        array_layers,
        calibrate,
        lowered_layers,
        on_array,
        set_faults,
        to_float,
        uncalibrated_layers,
    )
    from accelerator.pruning import dead_weight_mask, prune_dead_pes
    from accelerator.quant import QUANTIZERS, Quantizer, quantizer
    from accelerator.systolic import systolic_matmul
    from accelerator.training import accuracy, bounded_accuracy, evaluate, fault_aware_train, layer_sensitivity, train
    from accelerator.zoo import ARCHS, build_model, load_model, read_state_dict, save_model, weights_file_bytes

# public name -> submodule that defines it (imported lazily: these need torch)
_LAZY: dict[str, str] = {
    "prune_dead_pes": "accelerator.pruning",
    "dead_weight_mask": "accelerator.pruning",
    "systolic_matmul": "accelerator.systolic",
    "fast_matmul": "accelerator.fast",
    "QUANTIZERS": "accelerator.quant",
    "Quantizer": "accelerator.quant",
    "quantizer": "accelerator.quant",
    "on_array": "accelerator.layers",
    "set_faults": "accelerator.layers",
    "to_float": "accelerator.layers",
    "calibrate": "accelerator.layers",
    "uncalibrated_layers": "accelerator.layers",
    "lowered_layers": "accelerator.layers",
    "array_layers": "accelerator.layers",
    "ArrayLinear": "accelerator.layers",
    "ArrayConv2d": "accelerator.layers",
    "evaluate": "accelerator.training",
    "bounded_accuracy": "accelerator.training",
    "accuracy": "accelerator.training",
    "train": "accelerator.training",
    "fault_aware_train": "accelerator.training",
    "layer_sensitivity": "accelerator.training",
    "cycles": "accelerator.cost",
    "protected_cycles": "accelerator.cost",
    "tmr_penalty": "accelerator.cost",
    "TMR_FACTOR": "accelerator.cost",
    "build_model": "accelerator.zoo",
    "load_model": "accelerator.zoo",
    "save_model": "accelerator.zoo",
    "read_state_dict": "accelerator.zoo",
    "weights_file_bytes": "accelerator.zoo",
    "ARCHS": "accelerator.zoo",
    "Dataset": "accelerator.data",
    "load_dataset": "accelerator.data",
    "npz_arrays": "accelerator.data",
    "NpyHeader": "accelerator.data",
}

__all__ = [  # explicit, so that type checkers see the lazy names as re-exported too
    "ARCHS",
    "ArrayConfig",
    "ArrayConv2d",
    "ArrayLinear",
    "BYPASS_POLICIES",
    "Dataset",
    "DenseFaults",
    "Fault",
    "FaultMap",
    "NUMBER_FORMATS",
    "NpyHeader",
    "NumberFormat",
    "QUANTIZERS",
    "Quantizer",
    "SITES",
    "TMR_FACTOR",
    "accuracy",
    "array_layers",
    "bounded_accuracy",
    "build_model",
    "bypass_faulty_pes",
    "bypass_pes",
    "bypassed_pes",
    "calibrate",
    "cycles",
    "dead_weight_mask",
    "evaluate",
    "fast_matmul",
    "fault_aware_train",
    "layer_sensitivity",
    "load_dataset",
    "load_model",
    "lowered_layers",
    "npz_arrays",
    "on_array",
    "protected_cycles",
    "prune_dead_pes",
    "quantizer",
    "read_state_dict",
    "save_model",
    "set_faults",
    "systolic_matmul",
    "tmr_penalty",
    "to_float",
    "train",
    "uncalibrated_layers",
    "weights_file_bytes",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'accelerator' has no attribute {name!r}")
