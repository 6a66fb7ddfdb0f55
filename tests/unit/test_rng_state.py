"""RNGState and Counters: restore every stream exactly, through torch.save / torch.load(weights_only)."""

import io
import random

import numpy as np
import pytest
import torch

from bigbatch.checkpoint.stateful import Counters, RNGState, Stateful


def draw() -> list:
    """One value from every global stream, including the cached-gaussian paths of python and numpy."""
    values = [random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
              float(np.random.standard_normal()), torch.rand(3).tolist()]
    if torch.cuda.is_available():
        values.append(torch.rand(3, device="cuda").tolist())
    return values


def through_disk(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_rng_state_round_trips_every_stream_through_weights_only_load():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draw()  # one gaussian each leaves the pair's second one cached (gauss_next / has_gauss set)
    saved = through_disk(RNGState().state_dict())
    assert saved["python"]["gauss_next"] is not None and saved["numpy"]["has_gauss"] == 1
    expected = draw()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)  # any other state
    RNGState().load_state_dict(saved)
    assert draw() == expected


def test_rng_state_is_stateful_and_weights_only_safe_types():
    state = RNGState().state_dict()
    assert isinstance(RNGState(), Stateful)
    assert isinstance(state["python"]["internal"], torch.Tensor)
    assert isinstance(state["numpy"]["keys"], torch.Tensor)


def test_counters_round_trip_with_named_counters():
    counters = Counters(step=7, samples=896, epoch=1, tokens=10)
    counters.add("skipped", 0)
    counters.tokens += 5
    counters.add("tokens")  # idempotent: keeps 15
    counters.skipped += 2.5
    restored = Counters()
    restored.load_state_dict(through_disk(counters.state_dict()))
    assert restored == counters
    assert (restored.step, restored.samples, restored.epoch, restored.tokens, restored.skipped) == \
        (7, 896, 1, 15, 2.5)


@pytest.mark.parametrize("name", ["step", "add", "_hidden", "not-an-identifier"])
def test_counters_reject_reserved_names(name):
    with pytest.raises(ValueError, match="reserved"):
        Counters().add(name)


def test_counters_reject_non_numbers():
    counters = Counters(tokens=1)
    counters.tokens = "many"
    with pytest.raises(TypeError, match="tokens"):
        counters.state_dict()
