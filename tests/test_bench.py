"""The benchmarks' own logic, cheaply: bench/train.py's parts name real submodules of the models train.py
builds, and its backward timer keeps the structures it passes tensors through (idif.Latent is a named tuple).
The benchmarks themselves run outside the suite (`python bench/NAME.py --quick` is their smoke test)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import idif
import train

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_train():
    sys.path.insert(0, str(BENCH))  # bench/train.py imports bench/common.py
    try:
        spec = importlib.util.spec_from_file_location("bench_train", BENCH / "train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("method", ["mvad", "idif"])
def test_every_timed_part_is_a_submodule_of_the_model(bench_train, method):
    cfg = train.resolve(train.TrainConfig(method=method, image_size=96, batch_size=2, weights="none", device="cpu"))
    _, model, _ = train.build_model(cfg, 5, torch.device("cpu"))
    for _, _, names in bench_train.PARTS[method]:
        for name in names:
            assert isinstance(model.get_submodule(name), torch.nn.Module), name


def test_the_backward_timer_keeps_named_tuples_and_marks_their_tensors(bench_train):
    notes = []
    mu = torch.zeros(2, requires_grad=True)
    latent = idif.Latent(c=torch.zeros(2), mu=mu * 2, log_var=torch.zeros(2), f_c=mu * 3)
    noted = bench_train._note_tensors([latent, mu * 1], "part", notes, "cpu")
    assert isinstance(noted[0], idif.Latent) and noted[0]._fields == latent._fields
    assert torch.equal(noted[0].f_c, latent.f_c) and noted[0].log_var is latent.log_var  # no grad: untouched
    (noted[0].mu.sum() + noted[0].f_c.sum() + noted[1].sum()).backward()
    assert [label for _, label in notes] == ["part"] * 3  # one note per tensor that requires grad
    assert torch.equal(mu.grad, torch.full((2,), 6.0))
