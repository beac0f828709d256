"""The flow's resubmission policy on its own: no Prefect server, no Slurm (the flow tests run it for real)."""

from cluster.resubmission import Outcome, ResubmissionPolicy
from training.config import Span
from training.guard import Divergence

FAILED = Outcome("failed", "node 0: exit 1")


def test_completed_is_done_requeue_resubmits_at_once_cancelled_stops():
    policy = ResubmissionPolicy(max_resubmits=3, backoff_seconds=5)
    assert policy.decide(Outcome("completed", "exit 0"), 0, 100).action == "done"
    requeue = policy.decide(Outcome("requeue", "stopped with a checkpoint"), 0, 40)
    assert (requeue.action, requeue.wait_s) == ("resubmit", 0)
    stop = policy.decide(Outcome("cancelled", "job 7 was cancelled (CANCELLED by 0)"), 40, 60)
    assert (
        stop.action == "stop"
        and stop.message.startswith("job 7 was cancelled")
        and "at step 60" in stop.message
    )
    assert policy.failures == 0  # none of these is a failure


def test_failures_back_off_exponentially_up_to_the_cap():
    policy = ResubmissionPolicy(max_resubmits=2, backoff_seconds=5)
    first = policy.decide(FAILED, 0, 10)
    second = policy.decide(FAILED, 10, 20)
    assert [(d.action, d.wait_s) for d in (first, second)] == [("resubmit", 5), ("resubmit", 10)]
    assert "from step 20" in second.message and "failure 2 of at most 3" in second.message
    third = policy.decide(FAILED, 20, 30)
    assert third.action == "stop" and "gave up after 3 failed submissions" in third.message
    assert "node 0: exit 1" in third.message and "at step 30" in third.message


def test_two_failures_in_a_row_without_progress_are_a_crash_loop():
    policy = ResubmissionPolicy(max_resubmits=10, backoff_seconds=0)
    assert policy.decide(FAILED, 0, 0).action == "resubmit"
    loop = policy.decide(FAILED, 0, 0)
    assert loop.action == "stop" and loop.message.startswith("crash loop at step 0")


def test_a_failure_after_progress_is_not_a_crash_loop():
    policy = ResubmissionPolicy(max_resubmits=10, backoff_seconds=0)
    assert policy.decide(FAILED, 0, 0).action == "resubmit"
    assert (
        policy.decide(FAILED, 0, 50).action == "resubmit"
    )  # no new checkpoint... then one: progress
    assert policy.decide(FAILED, 50, 100).action == "resubmit"
    # failing again where the last failure left it, without a step of progress: the loop is caught
    assert policy.decide(FAILED, 100, 100).action == "stop"


def test_divergence_is_rolled_back_until_the_cap_then_stops_naming_steps_and_data():
    policy = ResubmissionPolicy(max_resubmits=0, backoff_seconds=5, max_rollbacks=2)
    verdict = Divergence((700, 760), Span(700, 761), ("loss spike",))
    first = policy.decide(Outcome("diverged", "exit 3"), 500, 750, verdict)
    assert (first.action, first.wait_s) == (
        "rollback",
        0,
    ) and "rollback 1 of at most 2" in first.message
    assert policy.decide(Outcome("diverged", "exit 3"), 500, 750, verdict).action == "rollback"
    stop = policy.decide(Outcome("diverged", "exit 3"), 500, 750, verdict)
    assert stop.action == "stop" and stop.message == (
        "diverged at steps [700, 760] (data batches 700:761: loss spike) after 2 rollbacks; not resubmitted"
    )
    assert (
        policy.failures == 0
    )  # divergence is not a failure: it does not count towards max_resubmits


def test_rollbacks_of_an_earlier_flow_run_count():
    policy = ResubmissionPolicy(max_resubmits=3, backoff_seconds=0, max_rollbacks=1, rollbacks=1)
    assert (
        policy.decide(
            Outcome("diverged", "exit 3"), 0, 10, Divergence((5, 9), Span(5, 10), ())
        ).action
        == "stop"
    )
