"""Moved: runs.py was split by what it held (kept as a re-export shim only).

* ``pinpoint.batching``: Batch, pad_id (was pad_id_of), make_batch, take_last;
* ``pinpoint.recording``: Recording, record, body_forward, select_rows;
* ``pinpoint.incremental``: SuffixRunner, prefix_cache, expand_cache, cache_kwarg, first_difference,
  mlp_step, tail_from_mid, run_blocks, logits_match, check_pre_norm_residual, memory_budget, chunk_size;
* ``pinpoint.progress``: progress.
"""
# moved to batching/recording/incremental/progress; kept until tests/test_locate.py switches (its two
# `from pinpoint.runs import SuffixRunner`); nothing in python/ imports runs any more
from .batching import Batch, make_batch, take_last  # noqa: F401
from .batching import pad_id as pad_id_of  # noqa: F401
from .incremental import (  # noqa: F401
    SuffixRunner, cache_kwarg, check_pre_norm_residual, chunk_size, expand_cache, first_difference, logits_match,
    memory_budget, mlp_step, prefix_cache, run_blocks, tail_from_mid,
)
from .progress import progress  # noqa: F401
from .recording import Recording, body_forward, record, select_rows  # noqa: F401
