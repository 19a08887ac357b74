"""Shared fixtures: one small real reward model (an engine checkpoint written by the engine), the
scorer loaded from it, "each item alone" rewards, and a live server on loopback; a second model
with dynamic RoPE within 256 positions, for the limits the model's positions set."""
import contextlib
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, ROOT)

PY = sys.executable


def _make_checkpoint(run, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    subprocess.run([PY, "-m", "tests.polar.serve.make_checkpoint", str(run), *map(str, args)], cwd=ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    return str(run)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    return _make_checkpoint(tmp_path_factory.mktemp("serve_run"))


@pytest.fixture(scope="session")
def scorer(checkpoint_dir):
    warnings.filterwarnings("ignore")
    from engine.inference import RewardScorer

    return RewardScorer.load(checkpoint_dir)


DYNAMIC_POSITIONS = 256


@pytest.fixture(scope="session")
def dynamic_checkpoint_dir(tmp_path_factory):
    return _make_checkpoint(tmp_path_factory.mktemp("serve_run_dynamic"), 2, 64, 4, 2, 176, 260, DYNAMIC_POSITIONS)


@pytest.fixture(scope="session")
def dynamic_scorer(dynamic_checkpoint_dir):
    warnings.filterwarnings("ignore")
    from engine.inference import RewardScorer

    return RewardScorer.load(dynamic_checkpoint_dir)


@pytest.fixture(scope="session")
def tokenizer():
    from polar.tokenizer import ByteTokenizer

    return ByteTokenizer()


def _alone(scorer, tokenizer):
    from engine.packing import collate
    from polar.serve.grouping import ServeGroup

    def score(ids_list):
        out = []
        for ids in ids_list:
            g = ServeGroup(prefix=ids[:-1], candidates=[ids[-1:]], items=[0])
            out.append(scorer.score(collate([[g]], len(ids), tokenizer.pad_id))[0])
        return np.array(out, dtype=np.float32)

    return score


@pytest.fixture(scope="session")
def alone(scorer, tokenizer):
    """ids -> the reward of that one item scored as its own sequence (no batching, no sharing)."""
    return _alone(scorer, tokenizer)


@pytest.fixture(scope="session")
def alone_dynamic(dynamic_scorer, tokenizer):
    return _alone(dynamic_scorer, tokenizer)


@contextlib.contextmanager
def live_server(scorer, tokenizer, *, batcher_kw=None, score=None, **settings):
    """The app on uvicorn in a thread, on a free loopback port; yields (base_url, service).
    `score` replaces the scorer's forward (to slow it down or make it fail)."""
    from polar.serve.app import ServeSettings, Service
    from polar.serve.batcher import Batcher
    from polar.serve.metrics import Metrics
    from polar.serve.server import serve_in_thread

    metrics = Metrics()
    kw = dict(max_wait_s=0.005, max_batch_tokens=4096, row_tokens=1024, max_positions=scorer.max_positions)
    kw.update(batcher_kw or {})
    batcher = Batcher(score or scorer.score, tokenizer.pad_id, metrics=metrics, **kw)
    service = Service(tokenizer, batcher, ServeSettings(**settings), metrics)
    with serve_in_thread(service) as url:
        yield url, service


def served(content: str) -> str:
    """An already formatted text as POLAR's client sends /classify and /pooling: ending with the
    reward token, at which the reward is read."""
    return f"<|reward|>{content}[UNUSED_TOKEN_130]"
