"""PyTorch <-> Flax conversion of AdaFace checkpoints: the key mapping (``mapping.py``), safe reading
(``safe_load.py``), the converted directory and the export to a PyTorch state_dict (``convert.py``).
Reading weights of any kind is ``adaface_jax.weights.load_weights``."""
from adaface_jax.convert.convert import (CheckpointMismatchError, convert_checkpoint, export_state_dict,
                                         extract_state_dict, map_torch_file, save_converted, state_dict_to_variables,
                                         to_torch_state_dict)
from adaface_jax.convert.safe_load import CheckpointReadError, UnsafeCheckpointError, read_torch_checkpoint

__all__ = [
    "CheckpointMismatchError", "CheckpointReadError", "UnsafeCheckpointError", "convert_checkpoint",
    "export_state_dict", "extract_state_dict", "map_torch_file", "read_torch_checkpoint", "save_converted",
    "state_dict_to_variables", "to_torch_state_dict",
]
