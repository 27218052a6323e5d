"""genevolve_jax: training tool-orchestrated image-generation agents (GenEvolve) in JAX/Flax NNX."""
from setuptools import find_packages, setup

# The transformers releases the parity tests passed against (2026-12-07): 5.23.0 (one skip, the video
# layout test: transformers 5.10-5.24 wrap a video in an extra vision_start/vision_end pair) and 5.25.0.
# Below 5.23 the oracle disagrees with what the package follows: 5.19/5.20 drop an RGBA image's alpha
# instead of compositing it onto white, and before 5.23 a prompt whose image pads do not match its
# images fails with StopIteration, not ValueError; before 5.4 the PIL Qwen2-VL image processor that the
# tiny renderer uses is missing. The core takes the same range, so a user's run gets no untested release.
# Kept current by .ci/transformers_range: when a new release passes it, raise the upper bound here.
TRANSFORMERS = "transformers>=5.23,<5.26"

CORE = [
    "jax>=0.7",
    "flax>=0.12.8",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "grain>=0.2.10",
    "tensorstore>=0.1.70",
    "numpy>=1.26",
    "ml_dtypes>=0.4",
    "safetensors>=0.4",
    TRANSFORMERS,
    "tokenizers>=0.21",
    "pillow>=10",
    "rich>=13",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "bm25s>=0.2",
    "httpx>=0.27",
]

# torch is never pinned here: CPU machines install torch==2.13.0 first (see README), GPU hosts keep
# their CUDA build. torchvision is deliberately absent: PyPI's build breaks the CPU torch.
TORCH = ["torch>=2.4"]
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27"]
# Experiment tracking (logging.wandb). Light enough for the test extra (measured 2026-12-02 on the
# 2-core dev box: wandb 0.31.0 + 11 small dependencies, 21 MB of wheels, 6 s to install, 71 MB on disk).
WANDB = ["wandb>=0.19.10"]   # reinit="create_new"
# The pure-Python modules that SGLang's request, protocol and multimodal-processing code imports, so
# that tests/rollout/test_sglang_contract.py checks our client against the released wheel on CPU.
# sglang itself is installed with --no-deps (README's test command): its declared dependencies pull
# CUDA builds of torch. Pins: the versions tested with sglang 0.5.23 (2026-12-02; orjson and ipython,
# which sglang imports at module level, added 2026-12-07 once CI ran in a fresh virtual environment).
# There is no `sglang` extra: sglang 0.5.23 pins transformers 5.19.0, outside TRANSFORMERS; its server
# runs in its own environment on the CUDA machine (launch/sglang_server.sh).
SGLANG_CONTRACT = ["pybase64==1.5.1", "msgspec==0.23.0", "pyzmq==27.3.0", "aiohttp==3.14.5", "dill==0.4.1",
                   "apache-tvm-ffi==0.1.11", "sentencepiece==0.2.3", "compressed-tensors==0.20.1", "gguf==0.19.0",
                   "partial-json-parser==0.2.1.1.post7", "einops==0.8.2", "orjson==3.13.0", "ipython==9.19.1"]
RENDER = TORCH + ["diffusers>=0.36", "accelerate>=1.0"] + SERVE
# peft: the oracle of the LoRA export (tests/models/test_peft_io.py). peft 0.22.0 into an environment
# with the test extra adds accelerate 1.16.0 and nothing else (torch and transformers unchanged; pip
# install --dry-run, 2026-12-07).
# TRANSFORMERS is repeated here (it is in CORE too) to show where the test extra's range comes from.
TEST = TORCH + SERVE + [TRANSFORMERS, "pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "diffusers>=0.36",
                        "matplotlib>=3.8", "pyarrow>=14", "openai>=1.0", "peft>=0.22"] + WANDB + SGLANG_CONTRACT
EVAL = ["pyarrow>=14", "matplotlib>=3.8"]

setup(
    name="genevolve_jax",
    version="0.1.0",
    description="GenEvolve-style tool-orchestrated image-generation agents: SFT, GRPO and "
                "Visual Experience Distillation in JAX/Flax NNX",
    python_requires=">=3.11",   # transformers 5.23 (TRANSFORMERS' lower bound) and sglang 0.5.23 need 3.11
    packages=find_packages(include=["genevolve_jax", "genevolve_jax.*", "configs"]),
    package_data={"genevolve_jax": ["agent/skills/*.md", "data/demo_corpus/*", "data/demo_corpus/images/*"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require={
        "test": TEST,
        "render": RENDER,
        "serve": SERVE,
        "eval": EVAL,
        "wandb": WANDB,
    },
    entry_points={"console_scripts": ["genevolve=genevolve_jax.cli:main"]},
)
