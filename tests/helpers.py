"""Settings shared by tests that need a fitted Simformer, not a trained one."""

from numpyro_simformer import NetworkConfig, TrainingConfig

# A network trained for 10 steps on 100 simulations: for contracts (shapes, names, errors),
# never for accuracy.
TINY = dict(
    num_simulations=100,
    network=NetworkConfig(width=8, num_layers=1, num_heads=1, mlp_width=8),
    training=TrainingConfig(max_steps=10, steps_per_call=5, validation_interval=5),
    progress_bar=False,
)
