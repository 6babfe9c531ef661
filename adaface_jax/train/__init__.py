"""Training: ``TrainState``, the optimizer of the original, the jitted step and the loop.

Layout of the trainable parameters (the export to PyTorch relies on it)::

    state.params      = {'backbone': <IResNet params>, 'head': {'kernel': (512, C_padded)}}
    state.batch_stats = <IResNet batch_stats>
    state.head_state  = AdaFaceState(batch_mean, batch_std)   (EmptyState for ArcFace/CosFace)

``C_padded`` is the class count rounded up to a multiple of the device count; columns
``>= num_classes`` are masked out of the softmax and dropped at export (see ``state.num_classes``).
"""
from adaface_jax.train.optimizer import decay_mask, lr_schedule, make_optimizer
from adaface_jax.train.state import TrainState, create_train_state
from adaface_jax.train.step import StepConfig, make_train_step

__all__ = ["TrainState", "create_train_state", "decay_mask", "lr_schedule", "make_optimizer", "StepConfig",
           "make_train_step"]
