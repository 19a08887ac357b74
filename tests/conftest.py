"""Suite-wide pytest settings.

Under pytest-xdist (`-n 2 --dist loadfile`, the README's test command) each test file is one unit
of work, so a file's module-scoped fixtures (a reference run, a trained checkpoint) are built once.
One exception: tests/engine/kernels/ goes to one worker as a whole, because its isolation test
checks the very process in which the Triton-interpreter modules' child processes were started
(tests/engine/kernels/conftest.py orders it after them).
"""
try:
    from xdist.scheduler import LoadFileScheduling
except ImportError:  # xdist absent: plain sequential pytest, nothing to schedule
    LoadFileScheduling = None

KEPT_TOGETHER = ("tests/engine/kernels/",)

if LoadFileScheduling is not None:

    class _FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            for folder in KEPT_TOGETHER:
                if nodeid.startswith(folder):
                    return folder
            return super()._split_scope(nodeid)

    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") == "loadfile":
            return _FileScheduling(config, log)
        return None  # any other --dist: xdist's own scheduler
