"""Installs the top-level folders as the ``terrabyte`` namespace (``terrabyte.pretrain``, ...).

The folders keep short names in the repository, as the design card asks, but never land in
site-packages under generic names such as ``kernels`` or ``launch``: ``package_dir`` maps each one
under ``terrabyte``. Works for ``pip install .`` and ``pip install -e .``.
"""
import platform

from setuptools import find_packages, setup

SUBPACKAGES = ["pretrain", "kernels", "data_pipeline", "launch", "configs"]

install_requires = [
    # torch is not pinned here on purpose: a GPU user keeps the build they already have, and on a
    # CPU-only machine the README/CI install the CPU wheel (torch==2.13.0) before this package.
    "torch>=2.4",
    # the private DeepSpeed APIs pretrain/ds_seams.py uses were checked (tests/unit/test_ds_seams.py) on 0.19
    "deepspeed>=0.19.4,<0.20",
    "einops>=0.8",
    "webdataset>=1.0",
    "zstandard>=0.22",
    "tensorboard>=2.16",
    "tqdm>=4.66",
    "pyyaml>=6.0",
    "numpy>=1.24",
    "safetensors>=0.4",
    # `shards build --dedup near`: MinHash signatures and the LSH index (2.0: the affine32 scheme)
    "datasketch>=2.0",
]
if platform.system() == "Linux":
    install_requires.append("triton>=3.0")

setup(
    name="terrabyte",
    version="0.2.0",
    description="Pretraining byte-level hierarchical (MEGABYTE-style) transformers at cluster scale",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[f"terrabyte.{name}{sub}" for name in SUBPACKAGES
              for sub in [""] + ["." + p for p in find_packages(where=name)]],
    package_dir={"terrabyte." + name: name for name in SUBPACKAGES},
    package_data={
        "terrabyte.configs": ["*.yaml"],
        "terrabyte.launch": ["slurm/*.sh"],
    },
    install_requires=install_requires,
    extras_require={
        "mpi": ["mpi4py>=3.1", "mpich"],
        "gpu": ["flash-attn"],
        # megabyte-pytorch: the peer `terrabyte bench model|quality` compare against (tests run both)
        "dev": ["pytest>=7", "pytest-timeout", "pytest-xdist>=3", "megabyte-pytorch==0.3.6", "hypothesis>=6"],
        # `terrabyte bench quality` draws its loss curves with matplotlib (and prints its table without
        # it), and trains its BPE baseline's tokenizer with Hugging Face tokenizers
        "bench": ["matplotlib>=3.7", "tokenizers>=0.19"],
        # `terrabyte eval --tasks` and the `terrabyte` model type of lm-evaluation-harness (its own
        # dependencies leave torch alone: pip keeps the installed build), and from_pretrained/push_to_hub
        # with a hub repository id
        "eval": ["lm-eval>=0.4.13,<0.5", "huggingface_hub>=0.23"],
    },
    entry_points={"console_scripts": ["terrabyte = terrabyte.launch.cli:main"]},
)
