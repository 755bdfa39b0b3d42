"""Imported last where the libraries are loaded (conftest, the forkserver of fresh_process): their import-time
objects never become garbage, so out of the collector's sight, a full collection (each run's
accelerator.free_memory() makes two) no longer walks millions of them."""

import gc

gc.collect()
gc.freeze()
