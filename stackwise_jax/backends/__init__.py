"""Optional backends beyond JAX. Each module imports its framework itself, so importing
`stackwise_jax` never needs them: `stackwise_jax.backends.torch_nvfp4` is the PyTorch shim for
NVFP4 and for exporting stacks to torch."""
