from .base import Method
from .registry import register


@register
class IncLoRA(Method):
    name = "inc-lora"
    description = "a fresh LoRA adapter per task; earlier adapters frozen and summed; no penalty"
