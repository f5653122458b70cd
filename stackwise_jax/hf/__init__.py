"""Hugging Face interop (design §12): a causal rack exports as a transformers Llama directory
(`llama.export_hf`), a Llama-family directory imports as the trunk new stacks grow on
(`llama.read_pretrained`, `ProgressiveRackBuilder.from_pretrained`), and lm-evaluation-harness
scores a run through our own forward and sampler (`harness`). transformers and lm-eval are the
`hf` extra; export and import need only safetensors and json."""
