"""A batch that fails is retried so that only the rows that cannot be answered fail (batch_isolation)."""

import pytest
import torch

from surgvqa.inference.batch_isolation import run_isolated


def test_out_of_memory_halves_and_other_failures_go_row_by_row():
    batches, retries, failures = [], [], []

    def run(indices):
        batches.append(list(indices))
        if len(indices) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        if 5 in indices:
            raise ValueError("image 5 cannot be read")
        return [f"answer {index}" for index in indices]

    def failed(index, error):
        failures.append((index, type(error).__name__))
        return ""

    answers = run_isolated(run, list(range(8)), failed, retries.append)
    assert answers == [f"answer {index}" for index in range(5)] + ["", "answer 6", "answer 7"]
    assert batches[:3] == [list(range(8)), [0, 1, 2, 3], [0, 1]]
    assert failures == [(5, "ValueError")]
    assert retries[0] == "out of memory on a batch of 8; retrying as 4 + 4"
    assert any("ValueError: image 5 cannot be read" in line for line in retries)


def test_a_row_out_of_memory_alone_fails_alone_and_a_broken_device_stops_everything():
    failures = []
    answers = run_isolated(lambda indices: (_ for _ in ()).throw(torch.OutOfMemoryError("no memory")), [3],
                           lambda index, error: failures.append(index) or "", lambda line: None)
    assert answers == [""] and failures == [3]

    def broken(indices):
        raise torch.AcceleratorError("CUDA error: device-side assert triggered")

    with pytest.raises(torch.AcceleratorError):
        run_isolated(broken, [0, 1, 2], lambda index, error: "", lambda line: None)
