from setuptools import setup

# kernels/ and bench/ sit at the repo root but install as steerops.kernels and
# steerops.bench: top-level "kernels" and "bench" are taken on PyPI (run from the
# root, kernels/__init__.py hands the bare name to Hugging Face's `kernels`).
# The supported transformers range; .ci/run tests both ends (the lowest in a
# second environment). Raise the ceiling after the suite passes on a new release.
# The floor is the release CI tests, so the two cannot drift apart.
TRANSFORMERS_LOWEST = "4.48.3"
TRANSFORMERS = f"transformers>={TRANSFORMERS_LOWEST},<5.26"
# The oldest torch declared, with the triton it ships with (torch 2.10: triton 3.6):
# the whole suite was run on it (README, "Supported torch"); CI runs the newest
TORCH_LOWEST = "2.10.0"

setup(
    name="steerops",
    version="0.1.0",
    description="Fused Triton kernels for steering vectors and activation patching",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the layers (steerops/README: ops <- model <- sweeps <- app), and the two folders at
    # the root mapped into the package, in regular and editable installs alike
    packages=["steerops", "steerops.ops", "steerops.model", "steerops.sweeps", "steerops.app",
              "steerops.kernels", "steerops.bench"],
    package_dir={"steerops": "steerops", "steerops.kernels": "kernels", "steerops.bench": "bench"},
    install_requires=[f"torch>={TORCH_LOWEST}", "triton>=3.6", "numpy"],
    package_data={"steerops.bench": ["checkpoints/*.safetensors"]},
    entry_points={"console_scripts": ["steerops=steerops.app.cli:main"]},
    extras_require={
        "hf": [TRANSFORMERS, "safetensors", "tqdm", "matplotlib"],
        "bench": [TRANSFORMERS, "safetensors", "tqdm", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", TRANSFORMERS, "safetensors", "tqdm",
                 "matplotlib", "accelerate"],
    },
)
