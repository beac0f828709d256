"""Tracker credentials held out of the environment while flow runs of this process need them kept out."""

from tracking.credentials import _Held


def test_credentials_stay_out_until_the_last_of_several_flow_runs_ends():
    env = {"WANDB_API_KEY": "k", "MLFLOW_TRACKING_TOKEN": "t", "PATH": "/bin"}
    held = _Held()
    first = held.enter(env)  # a sweep's first trial
    second = held.enter(env)  # its second, at the same time: it gets them too
    assert first == second == {"WANDB_API_KEY": "k", "MLFLOW_TRACKING_TOKEN": "t"}
    assert env == {"PATH": "/bin"}  # out of what the jobs inherit
    held.leave(env)
    assert env == {"PATH": "/bin"}  # the second still runs jobs
    held.leave(env)
    assert env == {"WANDB_API_KEY": "k", "MLFLOW_TRACKING_TOKEN": "t", "PATH": "/bin"}
    assert held.enter({"PATH": "/bin"}) == {}  # nothing left over for a later flow run
