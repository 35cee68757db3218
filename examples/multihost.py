"""Data-parallel training over several devices or hosts with JAX's own runtime.

One process per host; each calls ``jax.distributed.initialize`` before anything else,
then runs the same program. Every process simulates the same draws (they are a pure
function of the key), the batch of each step is sharded over all devices of all hosts,
and the parameters are replicated.

    # one machine, all its devices (GPUs, or CPU devices forced for a try-out):
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python examples/multihost.py
    # two hosts (run on each, with its own --process-id):
    python examples/multihost.py --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0

``--tiny`` runs a few steps (what the test suite does).
"""

import argparse

import jax


def main(tiny: bool = False, coordinator: str | None = None, num_processes: int = 1, process_id: int = 0):
    if num_processes > 1:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)

    import numpy as np
    import numpyro
    import numpyro.distributions as dist

    from numpyro_simformer import Simformer, TrainingConfig

    def model():
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([4]).to_event(1))
        numpyro.sample("x", dist.Normal(theta, 0.5).to_event(1))

    num_devices = jax.device_count()
    training = TrainingConfig(
        max_steps=50 if tiny else 20_000,
        batch_size=64 * num_devices if tiny else 256 * num_devices,  # a multiple of the devices
        data_parallel=True,
        steps_per_call=25 if tiny else 50,
        validation_interval=25 if tiny else 500,
    )
    sf = Simformer(model, num_simulations=500 if tiny else 100_000, training=training,
                   progress_bar=not tiny and jax.process_index() == 0)
    sf.fit(jax.random.key(0))
    posterior = sf.sample(jax.random.key(1), observed={"x": np.zeros(4)}, num_samples=100 if tiny else 2_000)
    if jax.process_index() == 0:
        print(f"{num_devices} devices on {jax.process_count()} processes; final validation loss "
              f"{sf.history.validation_loss[-1]:.4f}")
        print(posterior.posterior["theta"].mean(("chain", "draw")).values)
    return sf


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args()
    main(args.tiny, args.coordinator, args.num_processes, args.process_id)
