"""The Kubernetes manifests of docs/launching.md: every YAML block parses; the scripts and programs they run exist; the
flags they hand to `main.py` parse and are those of the launch script each T9k DeepSpeedJob names, with the paths
moved to the job's volume; no job starts more ranks per pod than the pod has GPUs; the download job fetches every
model and dataset the jobs read.

A DeepSpeedJob (TensorStack T9k, batch.tensorstack.dev/v1beta1) runs `deepspeed` itself on the program of
`spec.config.run.python`, `spec.config.slotsPerWorker` ranks in each of `spec.worker.replicas` pods; the manifests
name the script they stand for in the annotation `deepspeed-chat/script` (relative to the step folder, the
container's workingDir). The image holds the repository at /workspace.
"""
import re
from pathlib import Path, PurePosixPath

import pytest
import test_launch_scripts
import yaml

from conftest import REPO

launch, parse_program_flags = test_launch_scripts.launch, test_launch_scripts.parse_program_flags
launcher_double = test_launch_scripts.launcher_double  # the fixture: `deepspeed` records its arguments

DOCS = REPO / "docs" / "launching.md"
IMAGE_REPO = PurePosixPath("/workspace")
SCRIPT_ANNOTATION = "deepspeed-chat/script"
ASSETS = "/t9k/mnt/assets"
# Flags whose values are paths: on the job's volume in a manifest, relative or hub names in a script.
PATH_FLAGS = {"data_path", "model_name_or_path", "actor_model_name_or_path", "critic_model_name_or_path",
              "output_dir", "tensorboard_path", "local_rank"}
STEP_OUTPUTS = {"step1_supervised_finetuning": "actor-models", "step2_reward_model_finetuning": "reward-models",
                "step3_rlhf_finetuning": "step3-models"}


def manifests() -> list[dict]:
    blocks = re.findall(r"^```yaml\n(.*?)^```", DOCS.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    return [document for block in blocks for document in yaml.safe_load_all(block) if document is not None]


def deepspeed_jobs() -> list[dict]:
    return [m for m in manifests() if m["kind"] == "DeepSpeedJob"]


def containers(manifest: dict) -> list[dict]:
    """Every container of every pod template in the manifest."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "containers" in node:
                found.extend(node["containers"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(manifest)
    return found


def training_container(job: dict) -> dict:
    """T9k's rule: the container named `worker`, else the first."""
    pods = job["spec"]["worker"]["template"]["spec"]["containers"]
    return next((c for c in pods if c["name"] == "worker"), pods[0])


def in_repo(image_path: str) -> Path:
    """Where a path of the image (under /workspace) is in this checkout."""
    return REPO / PurePosixPath(image_path).relative_to(IMAGE_REPO)


def gpus(container: dict) -> int:
    resources = container.get("resources", {})
    limit = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
    request = resources.get("requests", {}).get("nvidia.com/gpu")
    assert request is None or int(request) == limit, "a GPU request must equal its limit"
    return limit


def job_id(job: dict) -> str:
    return job["metadata"]["name"]


def test_every_yaml_block_of_the_docs_is_a_manifest():
    found = manifests()
    assert all({"apiVersion", "kind", "metadata"} <= set(m) and m["metadata"].get("name") for m in found)
    kinds = [m["kind"] for m in found]
    assert kinds.count("DeepSpeedJob") == 9 and "Job" in kinds and "PyTorchJob" in kinds
    assert {job_id(job) for job in deepspeed_jobs()} == {f"step{step}-{topology}" for step in (1, 2, 3)
                                                          for topology in ("single-gpu", "single-node", "multi-node")}


def test_every_script_a_manifest_runs_exists():
    for manifest in manifests():
        for container in containers(manifest):
            workdir = in_repo(container.get("workingDir", str(IMAGE_REPO)))
            words = " ".join(str(word) for key in ("command", "args") for word in container.get(key, []))
            for script in re.findall(r"\S*training_scripts/\S+\.sh", words):
                assert (workdir / script).is_file(), f"{manifest['metadata']['name']}: {script} not in {workdir}"


@pytest.mark.parametrize("job", deepspeed_jobs(), ids=job_id)
def test_deepspeed_job_runs_its_scripts_flags(job, launcher_double, tmp_path):
    from training.utils.config import flag_values

    assert job["apiVersion"] == "batch.tensorstack.dev/v1beta1"
    config, worker = job["spec"]["config"], training_container(job)
    (kind,) = config["run"]  # python, module or exec: exactly one
    assert kind == "python"
    program, *flags = config["run"]["python"]
    assert all(isinstance(word, str) for word in [program, *flags]), "run.python is a list of strings: quote numbers"
    step = in_repo(worker["workingDir"])
    assert step.parent == REPO / "training" and (step / program).is_file()
    # T9k passes --local_rank (spec.config.localRank, default true)
    here = flag_values(parse_program_flags(step.name, program, flags + ["--local_rank", "0"], job_id(job)))

    # ranks per pod: one per GPU at most
    slots, replicas = config.get("slotsPerWorker", 1), job["spec"]["worker"].get("replicas", 1)
    assert 1 <= slots <= gpus(worker), f"{job_id(job)}: slotsPerWorker {slots} > the pod's nvidia.com/gpu"
    assert here.get("inference_tp_size", 1) <= slots

    # the script it stands for: same values, paths aside
    script = step / job["metadata"]["annotations"][SCRIPT_ANNOTATION]
    assert script.is_file()
    topology = next(part for part in script.parts if part in ("single_gpu", "single_node", "multi_node"))
    assert (replicas == 1) if topology != "multi_node" else (replicas >= 2)
    assert slots == 1 if topology == "single_gpu" else slots > 1
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=8\nworker-1 slots=8\n")
    (run,) = launch(script, [], launcher_double, tmp_path, HOSTFILE=str(hostfile))
    scripted = flag_values(parse_program_flags(step.name, run[run.index(program)], run[run.index(program) + 1:],
                                               str(script)))
    differences = {flag: (here.get(flag), value) for flag, value in scripted.items()
                   if flag not in PATH_FLAGS and here.get(flag) != value}
    assert not differences, f"{job_id(job)}: flag: (manifest, {script.name}) {differences}"
    assert len(here["data_path"]) == len(scripted["data_path"])
    for local, name in zip(here["data_path"], scripted["data_path"]):
        assert local == f"{ASSETS}/datasets/{name}", "datasets where the download job puts them, by name"
    if "model_name_or_path" in scripted:
        assert here["model_name_or_path"] == f"{ASSETS}/models/{scripted['model_name_or_path']}"

    # outputs in DeepSpeed-Chat's layout: <output>/actor-models/<size>, reward-models/<size>, step3-models/<size>
    output = PurePosixPath(here["output_dir"])
    assert output.parent.name == STEP_OUTPUTS[step.name] and here["tensorboard_path"] == here["output_dir"]


def test_step3_jobs_train_the_step1_and_step2_outputs_of_their_topology():
    jobs = {job_id(job): job for job in deepspeed_jobs()}
    for topology in ("single-gpu", "single-node", "multi-node"):
        def flags(step, topology=topology):
            words = jobs[f"step{step}-{topology}"]["spec"]["config"]["run"]["python"]
            return {word: words[i + 1] for i, word in enumerate(words[:-1]) if word.startswith("--")}

        output = PurePosixPath(flags(1)["--output_dir"]).parent.parent
        assert flags(3)["--actor_model_name_or_path"] == flags(1)["--output_dir"]
        assert flags(3)["--critic_model_name_or_path"] == flags(2)["--output_dir"]
        assert all(PurePosixPath(flags(step)["--output_dir"]).parent.parent == output for step in (1, 2, 3))
        assert re.fullmatch(r"\d+(\.\d+)?[mb]", PurePosixPath(flags(1)["--output_dir"]).name)  # actor-models/1.3b


def test_the_download_job_fetches_every_model_and_dataset_the_jobs_read():
    (job,) = [m for m in manifests() if m["kind"] == "Job"]
    (container,) = containers(job)
    command = container["command"]
    assert command[:2] == ["python", "applications/download_assets.py"]
    assert (in_repo(container["workingDir"]) / command[1]).is_file()
    from applications import download_assets
    from training.utils.config import parse_config

    parse = getattr(download_assets, "parse_args", None) or (lambda argv: parse_config(download_assets.AssetsConfig,
                                                                                          argv))
    try:
        assets = parse(command[2:])
    except SystemExit as exit_:
        pytest.fail(f"download_assets.py rejects {command[2:]} (exit {exit_.code})")
    assert assets.output == ASSETS
    read = [word for job in deepspeed_jobs() for word in job["spec"]["config"]["run"]["python"]
            if word.startswith(f"{ASSETS}/")]
    models = {word.removeprefix(f"{ASSETS}/models/") for word in read if word.startswith(f"{ASSETS}/models/")}
    datasets = {word.removeprefix(f"{ASSETS}/datasets/") for word in read if word.startswith(f"{ASSETS}/datasets/")}
    assert models and models <= set(assets.models) and datasets and datasets <= set(assets.datasets)
