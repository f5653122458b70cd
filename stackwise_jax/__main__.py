from stackwise_jax.cli import entry

entry()
