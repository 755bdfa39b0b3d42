"""The kit's fresh processes (nlora.testing.fresh_process), for the suite's other tests."""

from nlora.testing.fresh_process import *  # noqa: F401,F403
