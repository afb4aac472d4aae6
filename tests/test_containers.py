"""containers/: the node image, the Kubernetes manifests and the CNI install, checked offline.

Every manifest is validated against the official Kubernetes JSON schemas (strict: unknown
fields fail) that kubernetes-validate ships; then the references between them are checked:
what the DaemonSet uses exists, the mounts the plugin and agent need are there, and the
conflist is one the plugin accepts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from vppmesh.cni.models import PLUGIN_TYPE, SUPPORTED_VERSIONS, parse_netconf
from vppmesh.config import parse_mesh

ROOT = Path(__file__).resolve().parent.parent
CONTAINERS = ROOT / "containers"
K8S = CONTAINERS / "k8s"
KUBERNETES_VERSION = "1.30"


def kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def documents(directory: Path = K8S) -> list[dict[str, Any]]:
    """What `kubectl apply -k DIRECTORY` deploys: the kustomization's resources."""
    docs = []
    for name in kustomization(directory)["resources"]:
        docs += [d for d in yaml.safe_load_all((directory / name).read_text()) if d is not None]
    return docs


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    return one("DaemonSet")["spec"]["template"]["spec"]


def container(name: str) -> dict[str, Any]:
    spec = pod_spec()
    for c in spec.get("initContainers", []) + spec["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name}")


def mounts(name: str) -> dict[str, str]:
    """{mountPath: volume name} of one container."""
    return {m["mountPath"]: m["name"] for m in container(name).get("volumeMounts", [])}


def volumes() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec()["volumes"]}


def conflist() -> dict[str, Any]:
    return json.loads((CONTAINERS / "10-vppmesh.conflist").read_text())


def uninstall_documents() -> list[dict[str, Any]]:
    return documents(K8S / "uninstall")


def image_references(docs: list[dict[str, Any]]) -> list[str]:
    """Every container's image in the documents' pod templates."""
    found = []
    for doc in docs:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        found += [c["image"] for c in spec.get("initContainers", []) + spec.get("containers", [])]
    return found


@pytest.mark.parametrize("directory", [K8S, K8S / "uninstall"], ids=["k8s", "uninstall"])
def test_kustomization_deploys_every_manifest_and_names_the_one_image(directory: Path) -> None:
    """`kubectl apply -k` takes every manifest of the directory (a file left out would
    silently not be deployed), and the node image is set in one place: every image
    reference is the kustomization's `images` entry, whose tag is vppmesh's version, the
    same for the install and the uninstall."""
    kustom = kustomization(directory)
    manifests = sorted(p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustom["resources"]) == manifests
    (image,) = kustom["images"]
    references = image_references(documents(directory))
    assert references and {r.rsplit(":", 1)[0] for r in references} == {image["name"]}
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert image["newTag"] == version
    assert kustomization(K8S)["images"] == kustom["images"]


@pytest.mark.parametrize("directory", [K8S, K8S / "uninstall"], ids=["k8s", "uninstall"])
def test_one_image_override_moves_every_reference(directory: Path, tmp_path: Path) -> None:
    """What the docs tell the operator to do (set the kustomization's image) reaches every
    container that kubectl then applies: rendered with kubectl's own kustomize."""
    import shutil

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (its built-in kustomize) is not installed")
    copy = tmp_path / "k"
    shutil.copytree(directory, copy)
    kustom = kustomization(copy)
    kustom["images"][0].update(newName="registry.example.com/mesh/node", newTag="9.9.9")
    (copy / "kustomization.yaml").write_text(yaml.safe_dump(kustom))
    done = subprocess.run([kubectl, "kustomize", str(copy)], capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d is not None]
    assert len(rendered) == len(documents(directory))
    references = image_references(rendered)
    assert references and set(references) == {"registry.example.com/mesh/node:9.9.9"}


def test_every_manifest_is_valid_kubernetes() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (test extra) is not installed")
    docs = documents()
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ConfigMap", "Secret", "DaemonSet"}
    for doc in docs + uninstall_documents():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_catches_a_misspelled_field() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    broken = one("DaemonSet")
    broken["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_no_api_access_because_no_code_uses_the_kubernetes_api() -> None:
    """The account has no role and the pods no token; nothing in vppmesh or the scripts
    reaches for the API (a client library, the in-cluster token, the API's paths)."""
    account = one("ServiceAccount", pod_spec()["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert pod_spec()["automountServiceAccountToken"] is False
    code = [p for p in (ROOT / "vppmesh").rglob("*.py")] + list(CONTAINERS.glob("*.sh"))
    for path in code:
        text = path.read_text()
        for needle in ("import kubernetes", "serviceaccount/token", "/api/v1/",
                       "KUBERNETES_SERVICE_HOST"):
            assert needle not in text, f"{path.name} uses the Kubernetes API ({needle})"


def test_daemonset_references_exist_in_its_namespace() -> None:
    ds = one("DaemonSet")
    namespace = ds["metadata"]["namespace"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= \
        ds["spec"]["template"]["metadata"]["labels"].items()
    for name, volume in volumes().items():
        if "configMap" in volume:
            cm = one("ConfigMap", volume["configMap"]["name"])
            assert cm["metadata"]["namespace"] == namespace
            for item in volume["configMap"].get("items", []):
                assert item["key"] in cm["data"], f"volume {name}: no key {item['key']}"
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] & 0o077 == 0  # keys stay private
            if volume["secret"].get("optional"):
                continue  # made by the operator when wanted (metrics TLS)
            secret = one("Secret", volume["secret"]["secretName"])
            assert secret["metadata"]["namespace"] == namespace
    for c in pod_spec().get("initContainers", []) + pod_spec()["containers"]:
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                assert ref["key"] in one("ConfigMap", ref["name"])["data"]
        for mount in c.get("volumeMounts", []):
            assert mount["name"] in volumes(), f"{c['name']}: no volume {mount['name']}"
        assert c["image"] == container("agent")["image"]  # one image for all of it


def test_node_privileges_and_mounts() -> None:
    spec = pod_spec()
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    vols = volumes()

    def host_path(container_name: str, mount_path: str) -> str:
        return str(vols[mounts(container_name)[mount_path]]["hostPath"]["path"])

    for name in ("vpp", "agent"):
        assert container(name)["securityContext"]["privileged"] is True
        assert host_path(name, "/run/vpp") == "/run/vpp"
        assert host_path(name, "/run/vppmesh") == "/run/vppmesh"
    assert host_path("install-cni", "/host/etc/cni/net.d") == "/etc/cni/net.d"
    assert host_path("install-cni", "/host/opt/cni/bin") == "/opt/cni/bin"
    # The plugin runs in the agent's mount namespace: it needs the runtime's paths there.
    assert host_path("agent", "/opt/cni/bin") == "/opt/cni/bin"
    assert host_path("agent", "/var/lib/cni") == "/var/lib/cni"
    netns = next(m for m in container("agent")["volumeMounts"]
                 if m["mountPath"] == "/var/run/netns")
    assert netns["mountPropagation"] == "HostToContainer"


def test_agent_reattaches_the_conflists_pods_and_exposes_its_metrics_port() -> None:
    """agent.sh gives `up --watch` the plugin's stateDir and a metrics port, and the
    DaemonSet exposes that port (and says so to Prometheus)."""
    script = (CONTAINERS / "agent.sh").read_text()
    (plugin,) = conflist()["plugins"]
    assert f"--cni-state-dir {plugin['stateDir']}" in script
    port = int(script.split('--metrics "${VPPMESH_METRICS:-:')[1].split("}")[0])
    (exposed,) = container("agent")["ports"]
    assert exposed["containerPort"] == exposed["hostPort"] == port
    annotations = yaml.safe_load((K8S / "daemonset.yaml").read_text()
                                 )["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)


def test_agent_script_uses_only_options_that_up_has() -> None:
    """Every --option agent.sh passes exists on `vppmesh up` (a rename fails here, not
    on a node), and the metrics TLS files it looks for are where the Secret is mounted."""
    import re

    import typer

    from vppmesh.cli import app

    script = (CONTAINERS / "agent.sh").read_text()
    command = typer.main.get_command(app).commands["up"]  # type: ignore[attr-defined]
    known = {opt for param in command.params for opt in param.opts}
    used = set(re.findall(r"(--[a-z][a-z0-9-]+)", script))
    assert used and used <= known, used - known
    tls_dir = script.split('VPPMESH_METRICS_TLS_DIR:-')[1].split("}")[0]
    mount = next(m for m in container("agent")["volumeMounts"] if m["name"] == "metrics-tls")
    assert mount["mountPath"] == tls_dir


def test_conflist_is_accepted_by_the_plugin_and_matches_the_mounts() -> None:
    conf = conflist()
    assert conf["cniVersion"] in SUPPORTED_VERSIONS
    (plugin,) = conf["plugins"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert plugin["type"] == PLUGIN_TYPE and scripts[PLUGIN_TYPE] == "vppmesh.cni:main"
    netconf = parse_netconf(json.dumps(
        {"cniVersion": conf["cniVersion"], "name": conf["name"], **plugin}).encode())
    agent = mounts("agent")
    assert str(netconf.api_socket.parent) in agent
    assert str(netconf.mesh.parent) in agent  # type: ignore[union-attr]
    assert any(str(netconf.state_dir).startswith(p) for p in agent)
    assert str(netconf.log_file.parent) in agent  # type: ignore[union-attr]
    assert netconf.ipam is not None and netconf.ipam.type == "host-local"
    assert "__NODE_NAME__" in plugin["node"]  # filled in per node by install-cni.sh


def test_configmap_mesh_is_valid_and_its_psk_is_the_secret() -> None:
    cm = one("ConfigMap", "vppmesh-config")
    mesh = parse_mesh(yaml.safe_load(cm["data"]["mesh.yaml"]), "ConfigMap vppmesh-config")
    assert mesh.settings.psk_file is not None
    psk_dir = str(mesh.settings.psk_file.parent)
    psk_volume = volumes()[mounts("agent")[psk_dir]]
    secret = one("Secret", psk_volume["secret"]["secretName"])
    assert mesh.settings.psk_file.name in secret["stringData"]
    assert conflist()["plugins"][0]["mesh"] == \
        f"{next(p for p, v in mounts('agent').items() if v == 'mesh-config')}/mesh.yaml"


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, value) of containers/Dockerfile, continuation lines joined."""
    parser_module = pytest.importorskip(
        "dockerfile_parse", reason="dockerfile-parse (test extra) is not installed")
    parser = parser_module.DockerfileParser(path=str(CONTAINERS / "Dockerfile"))
    return [(i["instruction"], i["value"]) for i in parser.structure
            if i["instruction"] != "COMMENT"]


def test_image_and_quick_start_pin_the_vpp_release_vppmesh_accepts() -> None:
    """The image cannot pick up a VPP release the agent refuses (compat.TESTED_RELEASES is
    the one source of truth): the Dockerfile's pin and the README's apt-get line name it."""
    import re

    from vppmesh.dataplane.vpp import compat

    args = dict(v.split("=", 1) for i, v in dockerfile() if i == "ARG" and "=" in v)
    pinned = args.get("VPP_VERSION", "")
    assert pinned, "VPP_VERSION must pin a release (empty takes FD.io's newest)"
    assert compat.release(pinned) == compat.TESTED_RELEASES[-1], pinned
    readme = (ROOT / "README.md").read_text()
    versions = set(re.findall(r"\b(?:vpp|libvppinfra|vpp-[a-z-]+)=(\S+)", readme))
    assert versions == {pinned}, versions


def test_benchmarks_are_not_installed_and_the_license_is_shipped() -> None:
    """The wheel holds vppmesh only (pyproject's find is namespace-aware, as setuptools
    runs it; no top-level `benchmarks` in site-packages), and the
    license pyproject.toml declares is in the repository."""
    from setuptools import find_namespace_packages

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_namespace_packages(where=str(ROOT), include=include)
    assert "vppmesh" in packages and "vppmesh.cni" in packages
    assert not [p for p in packages if not p.startswith("vppmesh")], packages
    assert project["project"]["license"] == "Apache-2.0"
    for name in project["project"]["license-files"]:
        text = (ROOT / name).read_text()
        assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_dockerfile_installs_vpp_from_fdio_or_a_local_tree_and_vppmesh_with_pip() -> None:
    steps = dockerfile()
    args = dict(v.split("=", 1) for i, v in steps if i == "ARG" and "=" in v)
    assert args["BASE_IMAGE"] == "debian:bookworm-slim"  # its python3 is 3.11
    assert args["VPP_FROM"] == "fdio" and args["FDIO_REPO"] == "https://packagecloud.io/fdio/release"
    stages: dict[str, list[str]] = {}
    current = ""
    for instruction, value in steps:
        if instruction == "FROM":
            current = value.split(" AS ")[-1] if " AS " in value else value
            stages[current] = []
        elif current:
            stages[current].append(value)
    # The last stage builds on the VPP stage VPP_FROM names: both must exist.
    final = next(v for i, v in reversed(steps) if i == "FROM")
    assert final == "vpp-${VPP_FROM}" and {"vpp-fdio", "vpp-local"} <= set(stages)
    fdio = " ".join(stages["vpp-fdio"])
    assert "${FDIO_REPO}/gpgkey" in fdio and "${FDIO_REPO}/debian/ bookworm main" in fdio
    for package in ("vpp${VPP_VERSION", "vpp-plugin-core", "vpp-plugin-dpdk",
                    "vpp-crypto-engines", "vpp-drivers"):  # 26.06 splits the last two off
        assert package in fdio
    local = " ".join(stages["vpp-local"])
    assert "--from=vpp . /opt/vpp" in local  # the build context named vpp, never the repo
    base = " ".join(stages["base"])
    for package in ("containernetworking-plugins", "python3-venv", "iproute2", "ethtool",
                    "util-linux", "nftables", "iputils-ping"):
        assert package in base
    runs = " ".join(v for i, v in steps if i == "RUN")
    assert "/opt/vppmesh/bin/pip install --no-cache-dir /src" in runs
    # Every COPY source exists, and pip gets what pyproject.toml builds from.
    copied: dict[str, str] = {}
    for instruction, value in steps:
        if instruction == "COPY" and not value.startswith("--from"):
            *sources, target = value.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                copied[source] = target
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"],
              *(p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]
                ["include"])}
    assert {src for src, dst in copied.items() if dst.startswith("/src")} >= needed
    # Every script the DaemonSet runs is put where its command expects it.
    for c in pod_spec().get("initContainers", []) + pod_spec()["containers"]:
        command = Path(c["command"][0])
        assert copied.get(f"containers/{command.name}") == f"{command.parent}/", command
        assert os.access(CONTAINERS / command.name, os.X_OK), f"{command.name} not executable"
    assert copied["containers/cni-wrapper.sh"] == copied["containers/10-vppmesh.conflist"]
    ignored = (CONTAINERS / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


@pytest.mark.parametrize("script", sorted(p.name for p in CONTAINERS.glob("*.sh")))
def test_shell_scripts_parse(script: str) -> None:
    done = subprocess.run(["sh", "-n", str(CONTAINERS / script)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr


def wrapper(tmp_path: Path, command: str, stdin: str, **env: str
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(CONTAINERS / "cni-wrapper.sh")], input=stdin,
                          capture_output=True, text=True, check=False, timeout=60,
                          env={"PATH": os.environ["PATH"], "CNI_COMMAND": command,
                               "VPPMESH_AGENT_PID_FILE": str(tmp_path / "agent.pid"), **env})


def test_wrapper_without_agent_asks_to_try_again(tmp_path: Path) -> None:
    done = wrapper(tmp_path, "ADD", '{"cniVersion": "1.0.0", "name": "vppmesh"}')
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["code"] == 11 and error["cniVersion"] == "1.0.0"
    (tmp_path / "agent.pid").write_text("999999999\n")  # a dead process
    assert json.loads(wrapper(tmp_path, "DEL", "{}").stdout)["code"] == 11
    version = wrapper(tmp_path, "VERSION", '{"cniVersion": "0.4.0"}')
    assert version.returncode == 0
    assert json.loads(version.stdout) == {"cniVersion": "0.4.0",
                                          "supportedVersions": list(SUPPORTED_VERSIONS)}


@pytest.mark.root
def test_wrapper_enters_the_agent_and_runs_the_plugin(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("entering another process's mount namespace needs root")
    (tmp_path / "agent.pid").write_text(f"{os.getpid()}\n")
    plugin = Path(sys.executable).parent / "vppmesh-cni"
    if not plugin.exists():
        pytest.skip("the vppmesh-cni console script is not installed (pip install -e .)")
    done = wrapper(tmp_path, "ADD", '{"cniVersion": "1.0.0", "name": "x", "mtu": 1,'
                   ' "meshTable": 1, "ipam": {}}', VPPMESH_CNI_BIN=str(plugin),
                   CNI_CONTAINERID="c1", CNI_NETNS="/proc/self/ns/net", CNI_IFNAME="eth0",
                   CNI_PATH="/opt/cni/bin")
    error = json.loads(done.stdout)
    assert done.returncode == 1
    assert error["code"] == 7 and "mtu" in error["msg"]  # the plugin itself answered


def size_bytes(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    number = text.rstrip("KMGi")
    return int(number) * units.get(text[len(number):], 1)


def test_vpp_resources_fit_the_configmaps_profile() -> None:
    """The default profile needs no hugepages, and the vpp container's memory covers
    VPP's heap, buffers and stats segment; a hugepage profile would need hugepages-2Mi."""
    from vppmesh.dataplane.startup import load_profile

    name = one("ConfigMap", "vppmesh-config")["data"]["vpp_profile"]
    profile = load_profile(name)
    assert profile.page_size == "4k" and not profile.dpdk_devices and not profile.devices
    resources = container("vpp")["resources"]
    assert not any(k.startswith("hugepages") for k in resources.get("limits", {}))
    assert "/dev/hugepages" not in mounts("vpp")
    needed = (size_bytes(profile.main_heap_size) + profile.buffers_per_numa * 2304
              + size_bytes(profile.statseg_size))
    assert size_bytes(resources["limits"]["memory"]) > needed
    assert size_bytes(resources["requests"]["memory"]) <= size_bytes(resources["limits"]["memory"])
    assert float(resources["requests"]["cpu"]) >= 1 + profile.workers  # the threads poll


def test_vpp_sees_pod_namespaces_and_shares_its_capture_directory_with_the_agent() -> None:
    vols = volumes()
    for name in ("vpp", "agent"):
        netns = next(m for m in container(name)["volumeMounts"] if m["name"] == "netns")
        assert netns["mountPath"] == "/var/run/netns"
        assert netns["mountPropagation"] == "HostToContainer"  # pods made after the start
    from vppmesh.ops.verify import PCAP_DIR

    assert mounts("vpp")[str(PCAP_DIR)] == mounts("agent")[str(PCAP_DIR)]
    assert "emptyDir" in vols[mounts("vpp")[str(PCAP_DIR)]]


def test_agent_takes_the_uplink_the_configmap_names_and_checks_readiness_for_real() -> None:
    env = {e["name"]: e["valueFrom"]["configMapKeyRef"]["key"]
           for e in container("agent")["env"] if "configMapKeyRef" in e.get("valueFrom", {})}
    script = (CONTAINERS / "agent.sh").read_text()
    data = one("ConfigMap", "vppmesh-config")["data"]
    for variable, key in env.items():
        assert f"${{{variable}" in script and key in data
    assert data["uplink_driver"] == "af_packet"
    assert "--take-uplink" in script and "--uplink-driver" in script
    probe = container("agent")["readinessProbe"]["exec"]["command"]
    assert probe == ["/opt/vppmesh/share/ready.sh"]
    assert "STATUS" in (CONTAINERS / "ready.sh").read_text()


def test_uninstall_undoes_what_the_daemonset_installed_on_the_same_host_paths() -> None:
    (ds,) = uninstall_documents()
    spec = ds["spec"]["template"]["spec"]
    (step,) = spec["initContainers"]
    assert step["command"] == [*container("install-cni")["command"], "uninstall"]
    assert step["image"] == container("agent")["image"] and spec["hostNetwork"] is True
    theirs = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    ours = {v["name"]: v.get("hostPath", {}).get("path") for v in pod_spec()["volumes"]}
    used = {m["mountPath"]: theirs[m["name"]] for m in step["volumeMounts"]}
    for c in ("install-cni", "agent"):
        for path, volume in mounts(c).items():
            if path in used:
                assert used[path] == ours[volume], path
    assert {"/host/opt/cni/bin", "/host/etc/cni/net.d", "/var/lib/vppmesh"} <= set(used)


def test_af_xdp_has_the_hosts_bpf_filesystem() -> None:
    """VPP's libxdp pins its XDP program in bpffs: the vpp container sees the host's."""
    bpffs = volumes()[mounts("vpp")["/sys/fs/bpf"]]
    assert bpffs["hostPath"]["path"] == "/sys/fs/bpf"
    mount = next(m for m in container("vpp")["volumeMounts"] if m["mountPath"] == "/sys/fs/bpf")
    assert mount.get("mountPropagation") == "HostToContainer"


def run_vpp_script(tmp_path: Path, profile_file: str) -> str:
    """containers/vpp.sh with the manifest's environment; `vpp` is a stand-in that prints
    the startup.conf it is given, `vppmesh` this checkout's."""
    done = vpp_script(tmp_path, profile_file)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def vpp_script(tmp_path: Path, profile_file: str,
               vpp: str = '[ "$1" = -c ] && cat "$2"') -> subprocess.CompletedProcess[str]:
    """containers/vpp.sh run with `vpp` (the stand-in's shell text) and a state directory
    of its own (tmp_path/state, never the machine's /var/lib/vppmesh)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "vpp").write_text(f"#!/bin/sh\n{vpp}\n")
    (bin_dir / "vppmesh").write_text(f'#!/bin/sh\nexec {sys.executable} -m vppmesh "$@"\n')
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    env = {e["name"]: e.get("value") for e in container("vpp")["env"]}
    data = one("ConfigMap", "vppmesh-config")["data"]
    mounted = Path(str(env["VPPMESH_PROFILE_FILE"]))
    profile_dir = tmp_path / "vpp-profile"
    profile_dir.mkdir()
    (profile_dir / mounted.name).write_text(profile_file)
    done = subprocess.run(
        ["sh", str(CONTAINERS / "vpp.sh")], capture_output=True, text=True, check=False,
        timeout=120, cwd=ROOT,
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
             "VPPMESH_PROFILE": data["vpp_profile"],
             "VPPMESH_PROFILE_FILE": str(profile_dir / mounted.name),
             "VPPMESH_VPP_RUNTIME_DIR": str(tmp_path / "run-vpp"),
             "VPPMESH_STARTUP_CONF": str(tmp_path / "run" / "startup.conf"),
             "VPPMESH_STATE_DIR": str(tmp_path / "state")})
    return done


def test_vpp_profile_comes_from_the_configmap_without_rebuilding_the_image(
        tmp_path: Path) -> None:
    """The ConfigMap's `vpp_profile.yaml`, mounted where the vpp container's
    VPPMESH_PROFILE_FILE says, is the profile VPP starts with (a PCI address changed there
    reaches startup.conf); left empty, the named `vpp_profile` is."""
    mount = next(m for m in container("vpp")["volumeMounts"] if m["name"] == "vpp-profile")
    volume = volumes()["vpp-profile"]["configMap"]
    env = {e["name"]: e.get("value") for e in container("vpp")["env"]}
    (item,) = volume["items"]
    assert env["VPPMESH_PROFILE_FILE"] == f"{mount['mountPath']}/{item['path']}"
    assert volume["name"] == "vppmesh-config" and volume["optional"] is True
    data = one("ConfigMap", "vppmesh-config")["data"]
    assert data[item["key"]] == ""  # the default: the named profile

    default = run_vpp_script(tmp_path / "a", data[item["key"]])
    assert "main-core" not in default and "dev pci/" not in default  # small-node
    own = yaml.safe_load((ROOT / "vpp-startup" / "xl710-avf.yaml").read_text())
    own["devices"][0]["id"] = "pci/0000:5e:02.1"
    # Rendered on the node itself, the profile is checked against it: this machine's
    # cores, and 4K pages (it has no hugepages).
    own.update(main_core=0, workers=1, corelist_workers="1", page_size="4k")
    own["devices"][0]["queues"] = 1
    conf = run_vpp_script(tmp_path / "b", yaml.safe_dump(own))
    assert "dev pci/0000:5e:02.1 {" in conf and "0000:3b:02.0" not in conf


def test_vpp_runs_under_the_guard_that_gives_the_nic_back_when_it_exits(
        tmp_path: Path) -> None:
    """vpp.sh starts VPP under `vppmesh vpp-run`: when VPP exits (here by itself, with
    status 5), the NICs saved in the node's state directory (the agent's: the same
    hostPath, mounted in the vpp container too) are looked at and given back, and the
    container's status is VPP's. An avf record stands for the NIC: release_all reads it
    and leaves Linux alone, so this runs anywhere."""
    from vppmesh.host import uplink

    state = tmp_path / "state"
    state.mkdir()
    uplink.state_file(state, "ens1f0").write_text(uplink.SavedUplink(
        spec=uplink.UplinkSpec(interface="ens1f0", driver="avf", vpp_interface="uplink0"),
        ifname="ens1f0", mac="3c:fd:fe:12:34:56", mtu=1500, up=True, promisc=False,
        addresses=[], routes=[], nic_name=uplink.nic_name("ens1f0"), host_link="veth",
    ).model_dump_json())
    done = vpp_script(tmp_path, "", vpp='[ "$1" = -c ] && [ -s "$2" ] && exit 5')
    assert done.returncode == 5, done.stdout + done.stderr
    assert "vpp-run: VPP exited (status 5)" in done.stderr, done.stderr
    assert "ens1f0 stays bound to VPP's avf driver" in done.stderr
    # The vpp container sees the agent's state directory, where the takeover is saved.
    vols = volumes()
    assert vols[mounts("vpp")["/var/lib/vppmesh"]]["hostPath"]["path"] == \
        vols[mounts("agent")["/var/lib/vppmesh"]]["hostPath"]["path"] == "/var/lib/vppmesh"
    script = (CONTAINERS / "vpp.sh").read_text()
    assert "VPPMESH_STATE_DIR:-/var/lib/vppmesh" in script
    # VPP's SIGTERM grace (then vpp-run kills it) fits in the pod's.
    from vppmesh.host.vpprun import KILL_AFTER_SECONDS

    assert pod_spec()["terminationGracePeriodSeconds"] > KILL_AFTER_SECONDS + 5
