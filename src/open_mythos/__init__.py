"""open-mythos: a Recurrent-Depth Transformer (looped MoE language model) in PyTorch."""

from .cache import KVCache
from .config import MythosConfig
from .model import OpenMythos
from .tokenizer import ByteTokenizer, MythosTokenizer
from .variants import (VARIANTS, count_parameters, mythos_1b, mythos_1t, mythos_3b, mythos_10b,
                       mythos_50b, mythos_100b, mythos_500b)

__version__ = "0.1.0"
__all__ = [
    "ByteTokenizer", "KVCache", "MythosConfig", "MythosTokenizer", "OpenMythos", "VARIANTS",
    "count_parameters", "mythos_1b", "mythos_3b", "mythos_10b", "mythos_50b", "mythos_100b",
    "mythos_500b", "mythos_1t",
]
