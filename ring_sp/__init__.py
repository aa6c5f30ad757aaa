"""ring_sp: exact ring attention (sequence parallelism) for Megatron-core and DeepSpeed."""

from ring_sp.attention import attention_kernel, document_plan, ring_attention, ring_attention_simulated
from ring_sp.documents import document_positions
from ring_sp.layout import LAYOUTS, local_positions
from ring_sp.options import RingOptions
from ring_sp.sharding import merge, shard, split, unshard

__all__ = [
    "LAYOUTS",
    "RingOptions",
    "attention_kernel",
    "document_plan",
    "document_positions",
    "local_positions",
    "merge",
    "ring_attention",
    "ring_attention_simulated",
    "shard",
    "split",
    "unshard",
]
__version__ = "0.1.0"
