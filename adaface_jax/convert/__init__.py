"""PyTorch <-> Flax conversion of AdaFace checkpoints (key mapping in ``mapping.py``)."""
from adaface_jax.convert.convert import (CheckpointMismatchError, convert_checkpoint, export_state_dict,
                                         extract_state_dict, load_any, load_converted, save_converted,
                                         state_dict_to_variables, to_torch_state_dict)
from adaface_jax.convert.safe_load import CheckpointReadError, UnsafeCheckpointError, read_torch_checkpoint

__all__ = [
    "CheckpointMismatchError", "CheckpointReadError", "UnsafeCheckpointError", "convert_checkpoint",
    "export_state_dict", "extract_state_dict", "load_any", "load_converted", "read_torch_checkpoint",
    "save_converted", "state_dict_to_variables", "to_torch_state_dict",
]
