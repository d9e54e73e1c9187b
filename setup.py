from setuptools import find_packages, setup

# torch is installed first, from its own pin, by the Makefile (`pip install torch==2.13.0`), so that
# nothing below can pull a different build. The range here only says which torch we work with.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "pillow==13.0.0",
    "numpy==2.4.6",
    "jinja2==3.1.6",
    "tqdm==4.70.1",
    "xxhash==4.1.0",
    "rpyc==6.0.2",
    "pyzmq==27.3.0",
    "aiohttp==3.14.5",
    "uvloop==0.23.0",
    "pydantic==2.14.3",
    "prometheus-client==0.26.0",
    "llguidance==1.9.1",  # structured outputs (common/grammar.py; why not xgrammar: docs/protocol.md)
    "av==18.1.0",  # PyAV: video decoding (common/video.py)
]

TEST_REQUIRES = [
    "pytest==9.2.0",
    "pytest-timeout==2.4.0",
    "requests==2.34.2",
    "ruff==0.17.6",
    "codespell==2.4.3",  # the spelling check on identifiers and docs (STYLE.md)
    "openai==3.54.0",
    "hypothesis==6.170.17",  # property tests (processor grids, fuzzing)
    # Triton kernels are checked against their torch twins under TRITON_INTERPRET=1. On CUDA, torch
    # brings the triton build it was compiled with; this pin is only for the CPU test environment.
    "triton==3.9.0",
]

BENCH_REQUIRES = ["matplotlib==3.11.2"]  # the plot in docs/performance.png

setup(
    name="lightvlm",
    version="0.1.0",
    description="A LightLLM-style serving engine for vision-language models",
    python_requires=">=3.10",
    packages=find_packages(include=["lightvlm", "lightvlm.*"]),
    package_data={"lightvlm.models": ["demo_corpus.txt"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES, "bench": BENCH_REQUIRES},
)
