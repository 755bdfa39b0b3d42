"""The kit's definition of the same run (nlora.testing.same_run), for the suite's other tests."""

from nlora.testing.same_run import *  # noqa: F401,F403
from nlora.testing.same_run import ADAPTER_ATOL, OUTLIER_ATOL, OUTLIER_SHARE, TIMING, outcome  # noqa: F401
