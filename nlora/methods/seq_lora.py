from .base import Method
from .registry import register


@register
class SeqLoRA(Method):
    name = "seq-lora"
    description = "one LoRA adapter trained on every task in turn (the forgetting baseline)"
    adapter_layout = "snapshot"
