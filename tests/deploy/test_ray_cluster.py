"""deploy/ray/cluster.yaml through Ray's own `ray up` preparation and schema validation, and the commands
Ray would run from it: `docker run ... IMAGE bash` on every node, then setup and start commands inside the
container (as the image's unprivileged user), initialization commands on the host before that."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.docker import docker_start_cmds, with_docker_exec
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).parents[2]
CLUSTER = ROOT / "deploy" / "ray" / "cluster.yaml"
GPU_INSTANCE = re.compile(r"^(p\d|g\d)")  # AWS GPU instance families


def prepared() -> dict[str, Any]:
    """What `ray up` validates: the file merged with the provider's defaults (no cloud call)."""
    return prepare_config(yaml.safe_load(CLUSTER.read_text()))


def docker_config(config: dict[str, Any], node_type: str) -> dict[str, Any]:
    """The node type's docker settings over the cluster's, as Ray's autoscaler merges them."""
    return {**config["docker"], **config["available_node_types"][node_type].get("docker", {})}


def start_command(config: dict[str, Any], node_type: str) -> tuple[str, str]:
    """(image, the `docker run` Ray issues on a node of this type)."""
    role = "head" if node_type == config["head_node_type"] else "worker"
    docker = docker_config(config, node_type)
    image = docker.get(f"{role}_image", docker["image"])
    options = docker.get("run_options", []) + docker.get(f"{role}_run_options", [])
    command = docker_start_cmds(
        "ubuntu", image, config["file_mounts"], docker["container_name"], options, config["cluster_name"],
        "/home/nvkg", "docker",
    )  # fmt: skip
    return image, command


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines = (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_config_passes_rays_validation():
    validate_config(prepared())


def test_validation_refuses_an_unknown_field():
    config = prepared()
    config["setup_command"] = ["true"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def test_every_node_starts_bash_in_an_image_without_entrypoint():
    """Ray appends `bash` to `docker run`: an image ENTRYPOINT would get `bash` as its argument and exit."""
    config = prepared()
    for node_type in config["available_node_types"]:
        image, command = start_command(config, node_type)
        assert command.split()[-2:] == [image, "bash"], command
    assert "ENTRYPOINT" not in {name for name, _ in dockerfile_instructions()}


def test_gpu_nodes_run_the_gpu_image_with_gpus():
    config = prepared()
    for node_type, spec in config["available_node_types"].items():
        image, command = start_command(config, node_type)
        if GPU_INSTANCE.match(spec["node_config"]["InstanceType"]):
            assert image.endswith("-gpu") and "--gpus all" in command, node_type
        else:
            assert not image.endswith("-gpu") and "--gpus" not in command, node_type


def test_container_commands_need_no_root_and_the_host_mounts_shared():
    config = prepared()
    in_container = [
        *config["head_setup_commands"],
        *config["worker_setup_commands"],
        *config["head_start_ray_commands"],
        *config["worker_start_ray_commands"],
    ]
    container = config["docker"]["container_name"]
    for command in with_docker_exec(in_container, container_name=container, docker_cmd="docker"):
        assert command.startswith("docker exec") and "sudo" not in command and "mount " not in command, command
    on_host = " && ".join(config["initialization_commands"])
    assert "mount -t nfs4" in on_host and "/shared" in on_host
    assert "-v /shared:/shared" in config["docker"]["run_options"]


def test_the_launcher_finds_rsync_and_ssh_and_the_image_user_owns_shared():
    """Ray copies its bootstrap files into the head's container with rsync and the head's autoscaler
    reaches workers over ssh; the host hands /shared to the image's user (uid 1000)."""
    instructions = dockerfile_instructions()
    installs = " ".join(args for name, args in instructions if name == "RUN")
    assert "rsync" in installs and "openssh-client" in installs
    assert "--uid 1000 nvkg" in installs and ("USER", "nvkg") in instructions
    assert "sudo chown 1000:1000 /shared" in prepared()["initialization_commands"]
