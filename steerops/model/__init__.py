"""The model integration: a Hugging Face model's blocks and sites (the residual
stream and its components), decode offsets, steering during forward and generate,
caching activations and gradients, prompt inputs and metrics, steering vectors.
Imports ``steerops.ops``; never the sweeps or the application."""
