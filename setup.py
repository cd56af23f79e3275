from setuptools import find_packages, setup

setup(
    name="bigtrain",
    version="0.1.0",
    description="Distributed pretraining of Llama-style GPTs: megatron-core blocks in a DeepSpeed engine, "
                "WebDataset data, SLURM requeue, Hugging Face conversion",
    packages=find_packages(include=["bigtrain", "bigtrain.*"]),
    # the lm-eval tasks shipped with `bigtrain lm-eval`: YAML templates and their local data
    package_data={"bigtrain.eval": ["lm_eval_tasks/*.yaml", "lm_eval_tasks/*.jsonl"]},
    python_requires=">=3.10",
    # Bounds are what the tests run. The private APIs of DeepSpeed and submitit are touched in one fenced module
    # each (bigtrain/parallel/deepspeed_fence.py, bigtrain/launch/submitit_fence.py), which refuse any other
    # version at start-up; megatron-core's in bigtrain/parallel/cpu_shims.py.
    install_requires=[
        "torch>=2.11,<2.14",            # CPU tests: 2.13; the GPU benchmarks: 2.11
        "megatron-core>=0.16.1,<0.17",  # 0.17+ needs Python 3.12
        "deepspeed==0.19.8",
        "webdataset>=1.0,<1.1",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "submitit==1.5.4",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "transformers>=5.0,<6",         # the export writes transformers 5's config (rope_parameters, dtype)
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "xxhash>=3.0",   # checkpoint file and shard member checksums (xxh3)
        "pyarrow>=14",        # .parquet inputs of `bigtrain shards` (bigtrain/data/inputs.py)
        "zstandard>=0.22",    # .zst inputs of `bigtrain shards` (streamed)
        "urllib3>=2,<3",  # http(s):// shards (bigtrain/data/remote.py)
        "boto3>=1.28",    # s3:// shards; honours AWS_ENDPOINT_URL (botocore >= 1.31)
        "matplotlib>=3.8",  # `bigtrain plot` (Agg canvas, no display): plotting a run needs no extra
    ],
    extras_require={
        # `bigtrain convert from-hf --gguf-file`: transformers dequantises GGUF weights with these
        "gguf": ["gguf>=0.10", "accelerate>=1.0"],
        # `bigtrain lm-eval` (lm-evaluation-harness on an exported model) and `bigtrain plot`
        "eval": ["lm-eval==0.4.13", "matplotlib>=3.8"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "gguf>=0.10", "accelerate>=1.0", "lm-eval==0.4.13",
                 "matplotlib>=3.8", "moto[server]>=5.0"],  # moto: a real S3 server on 127.0.0.1 (test_remote.py)
    },
    entry_points={"console_scripts": ["bigtrain=bigtrain.cli:main"]},
)
