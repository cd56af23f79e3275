"""bigtrain: distributed pretraining of Llama-style GPTs with megatron-core blocks inside DeepSpeed."""
__version__ = "0.1.0"
