"""bigtrain: distributed pretraining of Llama-style GPTs with megatron-core blocks inside DeepSpeed."""
import warnings

__version__ = "0.1.0"

# megatron-core announces at import that optional fused kernels (Apex, Transformer Engine) are absent;
# bigtrain uses its own PyTorch paths (SDPA attention, torch RMSNorm), so these say nothing useful.
warnings.filterwarnings("ignore", message=r".*(Apex is not installed|Transformer Engine and Apex are not installed)")
