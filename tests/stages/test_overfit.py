"""The overfit gate's checks on the way: answers checked every `check_every` steps, training ending at the first pass."""

from types import SimpleNamespace

from transformers import TrainerControl

from surgvqa.stages.overfit import AnswerCheck, PassEarly, recent_loss


class ModeRecordingModel:
    def __init__(self):
        self.training = True
        self.modes_seen_by_checks: list[bool] = []

    def eval(self):
        self.training = False
        return self

    def train(self, mode: bool = True):
        self.training = mode
        return self


def run_logged_steps(losses_by_step: dict[int, float], matches: list[float], max_steps: int, check_every: int = 100):
    """Feed PassEarly one logged loss per step in ``losses_by_step`` until it stops training; what it saw and did."""
    model = ModeRecordingModel()
    answers = iter(matches)

    def check(trained):
        trained.modes_seen_by_checks.append(trained.training)
        return AnswerCheck(match=next(answers), mismatches=[])

    early = PassEarly(check, check_every, loss_threshold=2.0, min_match=0.9)
    state = SimpleNamespace(global_step=0, max_steps=max_steps, log_history=[])
    control = TrainerControl()
    stopped_at = None
    for step, loss in sorted(losses_by_step.items()):
        state.global_step = step
        state.log_history.append({"step": step, "loss": loss})
        early.on_log(None, state, control, logs={"loss": loss}, model=model)
        if control.should_training_stop:
            stopped_at = step
            break
    return early, model, stopped_at


def test_training_stops_at_the_first_check_that_passes_and_the_model_trains_again_after_each_check():
    losses = {step: (9.0 if step <= 100 else 0.1) for step in range(50, 1001, 50)}
    early, model, stopped_at = run_logged_steps(losses, matches=[0.5, 0.8, 0.95], max_steps=1000)
    # Step 200: the window of the last three losses (9, 0.1, 0.1) is still above the threshold: no answers asked.
    assert early.checks == [(300, 0.5), (400, 0.8), (500, 0.95)]
    assert stopped_at == 500 and early.passed is not None and early.passed.match == 0.95
    assert model.modes_seen_by_checks == [False, False, False]  # answered in eval mode
    assert model.training  # and handed back to training


def test_a_gate_that_never_passes_on_the_way_runs_to_max_steps_and_leaves_the_last_check_to_the_end():
    losses = {step: 0.1 for step in range(100, 601, 100)}
    early, _, stopped_at = run_logged_steps(losses, matches=[0.5] * 10, max_steps=600, check_every=200)
    assert stopped_at is None and early.passed is None
    assert early.checks == [(200, 0.5), (400, 0.5)]  # step 600 is the gate's own final check


def test_the_loss_criterion_is_the_mean_of_the_last_three_logged_losses():
    assert recent_loss([(1, 10.0), (2, 3.0), (3, 2.0), (4, 0.5)]) == (3.0 + 2.0 + 0.5) / 3
    losses = {100: 5.0, 200: 0.5, 300: 0.1}  # at step 300 the window's mean is 1.87: answers checked
    early, _, _ = run_logged_steps(losses, matches=[0.95], max_steps=1000)
    assert early.checks == [(300, 0.95)]
    losses = {100: 9.0, 200: 0.1, 300: 0.1}  # the last loss as low, but the window's mean 3.07: not yet
    early, _, _ = run_logged_steps(losses, matches=[0.95], max_steps=1000)
    assert early.checks == []
