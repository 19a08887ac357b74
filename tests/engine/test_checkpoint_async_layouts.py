"""checkpoint.async_save at the pipeline layouts (2 stages, and 2 stages of 2 interleaved chunks each,
whose checkpoint holds one model state per chunk): the background save's files equal the synchronous
save's, a run resumed from it trains the uninterrupted run's steps, and the end of the run waits for the save.
The comparisons are tests/engine/test_checkpoint_async.py's (DP2 and TP2 there), run in a module of
their own so that pytest-xdist gives these slower runs to another worker: one launch for both layouts'
synchronous and background runs, one for both resumes."""
from __future__ import annotations

from tests.engine import test_checkpoint_async as dp_tp

LAYOUTS = {"pp2": ["parallel.pp=2"], "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2"]}
# collected here, with this module's fixtures
test_the_same_files = dp_tp.test_a_background_save_writes_what_a_synchronous_one_writes
test_the_same_resume = dp_tp.test_a_background_save_resumes_as_the_uninterrupted_run_goes_on
test_the_end_waits = dp_tp.test_the_end_of_the_run_waits_for_the_pending_save

launched, sync_and_async, resumed = dp_tp.layout_fixtures(LAYOUTS)
