"""The kit's model rebuilt from saved adapters alone (nlora.testing.lora_reference), for the suite's other tests."""

from nlora.testing.lora_reference import *  # noqa: F401,F403
