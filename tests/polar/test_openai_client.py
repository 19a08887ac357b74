"""polar/openai_client.py's retry wait (the rest of the client runs against a real server in test_sample*)."""
import random

from polar.openai_client import backoff_delay


def test_backoff_delay_stays_under_its_cap_however_many_attempts():
    """base * 2 ** (attempt - 1) overflowed a float from attempt 1025 on (OverflowError ended a run given
    --max-retries past 1024 against a flaky endpoint): every wait stays a draw below the cap."""
    rng = random.Random(0)
    for attempt in (1, 2, 30, 1025, 5000):
        assert 0 <= backoff_delay(attempt, 0.5, 60.0, rng) <= 60.0
    assert backoff_delay(2000, 0.5, 60.0, rng, retry_after=30.0) >= 30.0  # Retry-After stays the floor
    assert backoff_delay(1, 0.5, 60.0, rng) <= 0.5  # the first retry's ceiling is the base
