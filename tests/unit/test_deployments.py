"""The deployments' parameters: each pretrain deployment of prefect.yaml is a run the flow accepts and its GPUs
hold, and flows.serve serves the same ones plus the demo. The deployments run for real: tests/e2e."""

import json

import pytest
from helpers import REPO


@pytest.mark.parametrize("size", ["124m", "350m", "774m", "1558m"])
def test_each_pretrain_deployment_is_a_valid_run_that_fits_its_gpus(size):
    """What `prefect deploy --all` registers for each GPT-2 size: parameters the flow accepts, its preset's data,
    and a global batch that the job's GPUs split evenly within an 80 GB GPU's memory (an H100)."""
    import jsonschema
    import yaml

    from flows.params import PretrainParams
    from training.config import load_config
    from training.memory import GB, estimate

    deployments = {
        d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    }
    d = deployments[f"pretrain-{size}"]
    assert (
        d["entrypoint"] == "flows/pretrain.py:pretrain" and d["work_pool"]["name"] == "gpt2-slurm"
    )
    raw = json.loads(
        json.dumps(d["parameters"]["params"]).replace("{{ $GPT2_STORE }}", "s3://bucket/gpt2")
    )
    jsonschema.validate(
        raw, PretrainParams.model_json_schema()
    )  # as Prefect checks a run's parameters
    p = PretrainParams(**raw)
    assert p.preset == f"gpt2-{size}" and p.executor == "slurm" and p.run_name == f"gpt2-{size}"
    cfg = load_config(p.preset)
    gpus = p.slurm.nodes * p.slurm.gpus_per_node
    assert cfg.train.total_batch_tokens % (cfg.train.micro_batch * cfg.train.seq_len * gpus) == 0
    assert estimate(cfg, world_size=gpus).total / GB <= 80
    assert (p.prepare_source or cfg.data.source).startswith("hf:HuggingFaceFW/fineweb")


def test_served_deployments_are_prefect_yaml_s_plus_the_demos():
    import yaml

    from flows.serve import deployments

    declared = {
        d["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    }
    served = {d.name: d for d in deployments("slurm", "s3://bucket/gpt2")}
    assert set(served) == declared | {
        "demo",
        "demo-sweep",
    }  # the demos: served, never on a work pool
    assert served["demo-sweep"].parameters["params"]["run"]["store"] == "s3://bucket/gpt2"
    assert served["pretrain-1558m"].parameters["params"]["preset"] == "gpt2-1558m"
