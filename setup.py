from setuptools import find_packages, setup

setup(
    name="bigtrain",
    version="0.1.0",
    description="Distributed pretraining of Llama-style GPTs: megatron-core blocks in a DeepSpeed engine, "
                "WebDataset data, SLURM requeue, Hugging Face conversion",
    packages=find_packages(include=["bigtrain", "bigtrain.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        # megatron-core 0.17+ needs Python 3.12; 0.16.x is what bigtrain is tested against
        "megatron-core>=0.16.1,<0.17",
        "deepspeed==0.19.8",
        "webdataset>=0.2.100",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "submitit>=1.5.2",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "transformers>=4.45",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "psutil>=5.9",
        "xxhash>=3.0",   # checkpoint file and shard member checksums (xxh3)
    ],
    extras_require={
        # `bigtrain convert from-hf --gguf-file`: transformers dequantises GGUF weights with these
        "gguf": ["gguf>=0.10", "accelerate>=1.0"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "gguf>=0.10", "accelerate>=1.0"],
    },
    entry_points={"console_scripts": ["bigtrain=bigtrain.cli:main"]},
)
