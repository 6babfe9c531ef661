"""adaface_jax.train.state: a state built outside the training loop can be donated whole."""
import jax
import numpy as np

from adaface_jax.train.state import create_train_state


def test_state_built_outside_the_loop_can_be_donated():
    """create_train_state gives each counter its own buffer, so donating the whole state works."""
    import optax

    params = {"w": jax.numpy.ones((3,))}
    state = create_train_state(params, {}, None, optax.sgd(0.1), jax.random.PRNGKey(0))
    pointers = [x.unsafe_buffer_pointer() for x in (state.step, state.skipped_in_row, state.skipped_total)]
    assert len(set(pointers)) == 3

    def step(s):
        return s.replace(step=s.step + 1, skipped_total=s.skipped_total + 2)

    out = jax.jit(step, donate_argnums=0)(state)
    assert int(out.step) == 1 and int(out.skipped_total) == 2 and int(out.skipped_in_row) == 0
    np.testing.assert_array_equal(out.params["w"], np.ones(3))
