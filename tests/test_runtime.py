"""The node image under a real container runtime: podman runs the DaemonSet on two hosts.

The image is built from containers/Dockerfile with podman (on a debootstrapped bookworm,
with this machine's VPP tree as VPP_FROM=local, or FD.io's packages with
VPPMESH_IMAGE_VPP=fdio). Each host is a network namespace (`rtm-h1`, `rtm-h2`) whose
NIC eth0 (a veth) leads to the underlay namespace `rtm-ul`: a bridge with the hosts'
router and an address beyond it. On each host the containers of
containers/k8s/daemonset.yaml run as the manifest gives them (command, environment from
the ConfigMap and the downward API, mounts, privileges, host PID and network), each
hostPath under the host's own directory; only /var/run/netns is the machine's, where
podman makes the pods' namespaces. Pods are `podman run --network vppmesh` in the host's
network namespace, with podman's CNI backend reading the conflist install-cni.sh wrote.

Measured numbers go to BASE/report.json and are printed (pytest -s). Skipped with one
line naming what is missing: root, podman, runc, debootstrap, VPP, the CNI plugins.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from vppmesh.config import dump_mesh, parse_mesh
from vppmesh.ops.verify import classify_capture, read_pcap

pytestmark = [pytest.mark.runtime, pytest.mark.vpp, pytest.mark.root]
PREFIX = "rtm-"
BASE = Path("/var/tmp/vppmesh-rtm")
ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "containers" / "k8s"
BASE_IMAGE = "localhost/vppmesh-base:bookworm"
POD_IMAGE = "localhost/vppmesh-rtm-pod:test"
UNDERLAY_NS = f"{PREFIX}ul"
ROUTER = ipaddress.IPv4Interface("192.0.2.254/24")
HOST_ADDRESSES = ["192.0.2.101/24", "192.0.2.102/24"]
BEYOND = "203.0.113.7"  # an address beyond the hosts, behind their router
SERVICE_VIP = "10.96.0.10"  # a Service address the host's nftables DNATs (kube-proxy's job)
# The processes podman starts (conmon, runc) have a lower hard limit here than a shell.
NPROC = 32768
REPORT: dict[str, Any] = {}
# The operator's step 2 (docs/kubernetes.md): the Secret's placeholder becomes a real PSK.
PSK = base64.b64encode(os.urandom(32)).decode()


def sh(*args: str, check: bool = True, timeout: float = 120, env: dict[str, str] | None = None,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          env=env, input=input, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: exit {done.returncode}\n{done.stdout}\n"
                             f"{done.stderr}")
    return done


def missing() -> str | None:
    """What this machine lacks for the test, in one line, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, podman as root)"
    for tool, package in (("podman", "podman"), ("runc", "runc"), ("nsenter", "util-linux"),
                          ("nft", "nftables"), ("tcpdump", "tcpdump")):
        if shutil.which(tool) is None:
            return f"no {tool}: apt-get install {package} (make runtime-test does)"
    if not Path("/usr/lib/cni/host-local").exists():
        return "no CNI plugins: apt-get install containernetworking-plugins"
    if image_missing(BASE_IMAGE) and shutil.which("debootstrap") is None:
        return "no debootstrap (for the bookworm base image): apt-get install debootstrap"
    if os.environ.get("VPPMESH_IMAGE_VPP") != "fdio":
        from vppmesh.lab.testbed import TestbedError, find_vpp

        try:
            tree = find_vpp().resolve().parent.parent
        except TestbedError as exc:
            return str(exc)
        if tree != Path("/opt/vpp"):
            return (f"the VPP tree {tree} is not at /opt/vpp, the run path of its libraries; "
                    "set VPPMESH_IMAGE_VPP=fdio to install FD.io's packages instead")
    return None


def image_missing(name: str) -> bool:
    return shutil.which("podman") is None or \
        sh("podman", "image", "exists", name, check=False).returncode != 0


def manifest() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(DaemonSet pod spec, ConfigMap data, Secret stringData) from containers/k8s/."""
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())
            if d is not None]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    secret = next(d for d in docs if d["kind"] == "Secret")
    return ds["spec"]["template"]["spec"], cm["data"], secret["stringData"]


@dataclass
class Host:
    index: int
    node: str  # the Kubernetes node name (from the ConfigMap's mesh)

    @property
    def netns(self) -> str:
        return f"{PREFIX}h{self.index}"

    @property
    def root(self) -> Path:
        """Where this host's hostPath volumes live."""
        return BASE / f"h{self.index}"

    def path(self, host_path: str) -> Path:
        # The pods' namespaces are podman's, in the machine's /run/netns.
        if host_path in ("/var/run/netns", "/run/netns"):
            return Path("/run/netns")
        return self.root / host_path.lstrip("/")

    @property
    def conf(self) -> Path:
        return self.root / "containers.conf"

    def container(self, name: str) -> str:
        return f"{PREFIX}h{self.index}-{name}"

    def env(self) -> dict[str, str]:
        """podman on this host: its containers.conf (CNI directories, the wrapper's pid
        file)."""
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def podman(self, *args: str, check: bool = True, timeout: float = 120
               ) -> subprocess.CompletedProcess[str]:
        """podman as this host's runtime: in its network namespace, with its CNI config."""
        return sh("nsenter", f"--net=/run/netns/{self.netns}", "podman", *args, check=check,
                  timeout=timeout, env=self.env())

    def run(self, *args: str, check: bool = True, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.netns, *args, check=check, timeout=timeout)

    def vppctl(self, *args: str) -> str:
        return self.podman("exec", self.container("vpp"), "vppctl", "-s", "/run/vpp/cli.sock",
                           *args).stdout


def containers_conf(path: Path, net_dir: Path, bin_dir: Path, pid_file: Path | None = None
                    ) -> None:
    """podman's configuration; with `pid_file`, every podman process of the host (also
    the cleanup that runs DEL when a container stops) hands the CNI wrapper the host's
    agent pid file, which lives under the host's directory here."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], NPROC)
    env = f'env = ["VPPMESH_AGENT_PID_FILE={pid_file}"]\n' if pid_file else ""
    path.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        f'[engine]\nruntime = "runc"\n{env}'
        '[network]\nnetwork_backend = "cni"\n'
        f'cni_plugin_dirs = ["{bin_dir}", "/usr/lib/cni"]\n'
        f'network_config_dir = "{net_dir}"\n')


def build_images(image: str) -> None:
    env = {**os.environ, "CONTAINERS_CONF": str(BASE / "containers.conf")}
    if image_missing(BASE_IMAGE):
        rootfs = BASE / "rootfs"
        started = time.monotonic()
        sh("debootstrap", "--variant=minbase", "bookworm", str(rootfs), timeout=900)
        sh("sh", "-c", f"tar -C {rootfs} -c . | podman import - {BASE_IMAGE}", env=env,
           timeout=300)
        shutil.rmtree(rootfs)
        REPORT["base_image_seconds"] = round(time.monotonic() - started, 1)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    build = ["podman", "build", "--pull=never", "--network", "host",
             "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={NPROC}:{NPROC}",
             "--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
    if Path("/etc/ssl/certs/ca-certificates.crt").exists():
        build += ["--secret", "id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt"]
    if os.environ.get("VPPMESH_RUNTIME_NO_CACHE") == "1":
        build.append("--no-cache")
    node_build = [*build]
    if os.environ.get("VPPMESH_IMAGE_VPP") != "fdio":
        node_build += ["--build-arg", "VPP_FROM=local", "--build-context", "vpp=/opt/vpp"]
    started = time.monotonic()
    sh(*node_build, "-f", str(ROOT / "containers" / "Dockerfile"), "-t", image, str(ROOT),
       env=env, timeout=1800)
    REPORT["image_build_seconds"] = round(time.monotonic() - started, 1)
    REPORT["image_size_mb"] = round(int(sh("podman", "image", "inspect", "--format",
                                           "{{.Size}}", image, env=env).stdout) / 1e6)
    context = BASE / "pod-image"
    context.mkdir(exist_ok=True)
    (context / "Containerfile").write_text(
        f"FROM {BASE_IMAGE}\nRUN apt-get update && apt-get install -y --no-install-recommends "
        "iputils-ping iperf3 iproute2 && rm -rf /var/lib/apt/lists/*\n")
    if image_missing(POD_IMAGE):
        sh(*build, "-t", POD_IMAGE, str(context), env=env, timeout=900)


def underlay(hosts: list[Host]) -> None:
    sh("ip", "netns", "add", UNDERLAY_NS)
    ul = ["ip", "netns", "exec", UNDERLAY_NS]
    sh(*ul, "ip", "link", "set", "lo", "up")
    sh(*ul, "ip", "addr", "add", f"{BEYOND}/32", "dev", "lo")
    sh(*ul, "ip", "link", "add", "br0", "type", "bridge")
    sh(*ul, "ip", "addr", "add", str(ROUTER), "dev", "br0")
    sh(*ul, "ip", "link", "set", "br0", "up")
    for host, address in zip(hosts, HOST_ADDRESSES, strict=True):
        sh("ip", "netns", "add", host.netns)
        host.run("ip", "link", "set", "lo", "up")
        host.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name",
                 f"h{host.index}", "netns", UNDERLAY_NS)
        sh(*ul, "ip", "link", "set", f"h{host.index}", "master", "br0", "up")
        host.run("ip", "addr", "add", address, "dev", "eth0")
        host.run("ip", "link", "set", "eth0", "up")
        host.run("ip", "route", "add", "default", "via", str(ROUTER.ip))


def volume_args(host: Host, spec: dict[str, Any], container: dict[str, Any],
                config: dict[str, str], secret: dict[str, str]) -> list[str]:
    """`-v` options for the container's volumeMounts, from the manifest's volumes."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    args = []
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "hostPath" in volume:
            source = host.path(volume["hostPath"]["path"])
        elif "emptyDir" in volume:  # one per pod, shared by its containers
            source = host.root / "pod" / mount["name"]
        elif "configMap" in volume:
            source = host.root / "configmap" / mount["name"]
            items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in config]
            source.mkdir(parents=True, exist_ok=True)
            for item in items:
                if not (source / item["path"]).exists():
                    (source / item["path"]).write_text(config[item["key"]])
        elif "secret" in volume:
            if volume["secret"].get("optional"):
                continue  # not made here (metrics TLS)
            source = host.root / "secret" / mount["name"]
            source.mkdir(parents=True, exist_ok=True)
            for key, value in secret.items():
                (source / key).write_text(PSK if value.startswith("REPLACE-") else value)
                (source / key).chmod(volume["secret"]["defaultMode"])
        else:
            raise AssertionError(f"volume {mount['name']}: kind not handled here")
        source.mkdir(parents=True, exist_ok=True)
        options = ["ro"] if mount.get("readOnly") else []
        if mount.get("mountPropagation") == "HostToContainer":
            options.append("rslave")
        args += ["-v", f"{source}:{mount['mountPath']}" + (f":{','.join(options)}"
                                                          if options else "")]
    return args


def env_args(host: Host, container: dict[str, Any], config: dict[str, str]) -> list[str]:
    args = []
    for env in container.get("env", []):
        if "value" in env:
            value = env["value"]
        elif "fieldRef" in env["valueFrom"]:
            assert env["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
            value = host.node
        else:
            value = config[env["valueFrom"]["configMapKeyRef"]["key"]]
        args += ["-e", f"{env['name']}={value}"]
    return args


def run_container(host: Host, name: str, image: str, *, detach: bool = True,
                  spec: dict[str, Any] | None = None, extra: tuple[str, ...] = ()
                  ) -> subprocess.CompletedProcess[str]:
    """Run one container of the DaemonSet (or of `spec`) as the manifest describes it."""
    pod, config, secret = manifest()
    spec = spec or pod
    container = next(c for c in spec.get("initContainers", []) + spec["containers"]
                     if c["name"] == name)
    args = ["run", "--pull=never", "--name", host.container(name),
            f"--network=ns:/run/netns/{host.netns}"]
    if detach:
        args.append("-d")
    else:
        args.append("--rm")
    if spec.get("hostPID"):
        args.append("--pid=host")
    if container.get("securityContext", {}).get("privileged"):
        args.append("--privileged")
    args += env_args(host, container, config)
    args += volume_args(host, spec, container, config, secret)
    return host.podman(*args, image, *container["command"], *container.get("args", []),
                       *extra, timeout=300)


def image_of(spec: dict[str, Any]) -> str:
    return str(spec["containers"][0]["image"])


def wait(what: str, check: Any, timeout: float = 180.0, every: float = 1.0) -> float:
    """Seconds until check() is true; fails naming `what` after `timeout`."""
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except (AssertionError, subprocess.TimeoutExpired):
            pass
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def ready(host: Host) -> bool:
    return host.podman("exec", host.container("agent"), "/opt/vppmesh/share/ready.sh",
                       check=False).returncode == 0


def mesh_healthy(host: Host) -> bool:
    return host.podman("exec", host.container("agent"), "vppmesh", "status", "--mesh",
                       "/etc/vppmesh/config/mesh.yaml", "--node", host.node, "--api-socket",
                       "/run/vpp/api.sock", check=False).returncode == 0


def write_mesh(host: Host, mesh_text: str) -> None:
    """Update the ConfigMap as the kubelet does: the new file appears whole."""
    directory = host.root / "configmap" / "mesh-config"
    (directory / ".mesh.yaml.new").write_text(mesh_text)
    os.replace(directory / ".mesh.yaml.new", directory / "mesh.yaml")


def pod_address(host: Host, pod: str) -> str:
    out = host.podman("exec", pod, "ip", "-4", "-o", "addr", "show", "eth0").stdout
    match = re.search(r"inet (\S+)/32", out)
    assert match, out
    return match.group(1)


def ping(host: Host, pod: str, address: str, count: int = 3) -> subprocess.CompletedProcess[str]:
    return host.podman("exec", pod, "ping", "-c", str(count), "-i", "0.2", "-W", "2", address,
                       check=False, timeout=60)


def teardown() -> None:
    names = sh("podman", "ps", "-a", "--format", "{{.Names}}", check=False,
               env={**os.environ, "CONTAINERS_CONF": str(BASE / "containers.conf")}).stdout
    for index in (1, 2):
        host = Host(index, "")
        for name in names.split():
            if name.startswith(f"{PREFIX}h{index}-") and host.conf.exists():
                host.podman("rm", "-f", "-t", "0", name, check=False, timeout=120)
    for index in (1, 2):
        sh("ip", "netns", "del", f"{PREFIX}h{index}", check=False)
    sh("ip", "netns", "del", UNDERLAY_NS, check=False)
    for index in (1, 2):
        shutil.rmtree(BASE / f"h{index}", ignore_errors=True)


@dataclass
class Cluster:
    hosts: list[Host]
    image: str
    pods: dict[str, tuple[Host, str]]  # container name: (host, address)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    reason = missing()
    if reason:
        pytest.skip(reason)
    spec, config, _ = manifest()
    mesh = parse_mesh(yaml.safe_load(config["mesh.yaml"]), "ConfigMap vppmesh-config")
    hosts = [Host(i + 1, node.name) for i, node in enumerate(mesh.nodes[:2])]
    teardown()
    BASE.mkdir(parents=True, exist_ok=True)
    containers_conf(BASE / "containers.conf", BASE / "cni-none", BASE / "cni-none")
    image = image_of(spec)
    build_images(image)
    underlay(hosts)
    for host in hosts:
        host.root.mkdir(parents=True)
        containers_conf(host.conf, host.path("/etc/cni/net.d"), host.path("/opt/cni/bin"),
                        host.path("/run/vppmesh") / "agent.pid")
    try:
        started = time.monotonic()
        for host in hosts:
            run_container(host, "install-cni", image, detach=False)
            for name in ("vpp", "agent"):
                run_container(host, name, image)
        # Each node made its key: the operator reads every node's with node-key.sh and
        # puts them into the ConfigMap (the placeholders there are not these nodes' keys).
        keys = {}
        for host in hosts:
            wait(f"{host.node}'s key", lambda h=host: (h.path("/var/lib/vppmesh")
                                                       / "private.key").exists(), 60)
            out = host.podman("exec", host.container("agent"),
                              "/opt/vppmesh/share/node-key.sh").stdout.split()
            assert out[0] == host.node
            keys[out[0]] = out[1]
        document = yaml.safe_load(config["mesh.yaml"])
        for node in document["nodes"]:
            node["public_key"] = keys.get(node["name"], node["public_key"])
        document["nodes"] = [n for n in document["nodes"] if n["name"] in keys]
        published = time.monotonic()
        for host in hosts:
            write_mesh(host, dump_mesh(parse_mesh(document, "mesh")))
        for host in hosts:
            wait(f"{host.node} ready and its peers healthy",
                 lambda h=host: ready(h) and mesh_healthy(h), 240, 2)
        now = time.monotonic()
        REPORT["containers_start_to_mesh_up_seconds"] = round(now - started, 1)
        REPORT["keys_published_to_mesh_up_seconds"] = round(now - published, 1)
        yield Cluster(hosts, image, {})
    finally:
        (BASE / "report.json").write_text(json.dumps(REPORT, indent=2))
        print("\nruntime report:", json.dumps(REPORT))
        if os.environ.get("VPPMESH_RUNTIME_KEEP") != "1":
            teardown()


def start_pod(cluster: Cluster, host: Host, name: str) -> str:
    started = time.monotonic()
    host.podman("run", "-d", "--pull=never", "--name", host.container(name), "--network",
                "vppmesh", POD_IMAGE, "sleep", "infinity", timeout=180)
    REPORT.setdefault("pod_run_seconds", []).append(round(time.monotonic() - started, 2))
    address = pod_address(host, host.container(name))
    cluster.pods[host.container(name)] = (host, address)
    return address


def test_pods_get_addresses_from_their_nodes_pod_cidr(cluster: Cluster) -> None:
    _, config, _ = manifest()
    mesh = parse_mesh(yaml.safe_load(config["mesh.yaml"]), "ConfigMap")
    # podman alone, without a CNI network, for the ADD's share of `podman run`.
    host = cluster.hosts[0]
    started = time.monotonic()
    host.podman("run", "-d", "--pull=never", "--name", host.container("bare"), "--network",
                "none", POD_IMAGE, "sleep", "infinity")
    REPORT["pod_run_without_network_seconds"] = round(time.monotonic() - started, 2)
    host.podman("rm", "-f", "-t", "0", host.container("bare"))
    for host in cluster.hosts:
        for name in ("a", "b"):
            address = ipaddress.IPv4Address(start_pod(cluster, host, f"pod-{name}"))
            assert address in mesh.node(host.node).pod_cidr
            assert address != mesh.node(host.node).mesh_address
    log = (cluster.hosts[0].path("/var/log/vppmesh") / "cni.log").read_text()
    assert "ADD" in log


def test_pods_reach_each_other_across_hosts_encrypted(cluster: Cluster) -> None:
    h1, h2 = cluster.hosts
    a1 = h1.container("pod-a")
    far_host, far_address = next((h, a) for h, a in cluster.pods.values() if h is h2)
    done = ping(h1, a1, far_address, 20)
    assert done.returncode == 0, done.stdout
    REPORT["ping_across_hosts_ms"] = float(re.search(r"= [\d.]+/([\d.]+)/", done.stdout)[1])
    # iperf3 across the hosts while the underlay is recorded: nothing in clear.
    server = far_host.container("pod-a")
    h2.podman("exec", "-d", server, "iperf3", "-s", "-1")
    capture = BASE / "underlay.pcap"
    tcpdump = subprocess.Popen(["ip", "netns", "exec", UNDERLAY_NS, "tcpdump", "-i", "h1",
                                "-s", "128", "-w", str(capture), "-U", "-q"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        wait("iperf3 through the mesh", lambda: h1.podman(
            "exec", a1, "iperf3", "-c", far_address, "-t", "5", check=False,
            timeout=60).returncode == 0, 30, 1)
    finally:
        tcpdump.terminate()
        tcpdump.wait(10)
    _, config, _ = manifest()
    mesh = parse_mesh(yaml.safe_load(config["mesh.yaml"]), "ConfigMap")
    verdict = classify_capture(read_pcap(capture), mesh, "h1")
    assert verdict.esp_between_nodes > 1000 and verdict.pod_address_in_clear == 0, verdict
    h2.podman("exec", "-d", server, "iperf3", "-s", "-1")
    time.sleep(1)
    out = h1.podman("exec", a1, "iperf3", "-c", far_address, "-t", "5", "-J",
                    timeout=60).stdout
    REPORT["iperf3_across_hosts_mbit_s"] = round(
        json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6)
    # The agent proves it too, from inside its container (VPP's capture in the shared /tmp).
    verify = h1.podman("exec", h1.container("agent"), "vppmesh", "verify", "--capture",
                       "--mesh", "/etc/vppmesh/config/mesh.yaml", "--node", h1.node,
                       "--api-socket", "/run/vpp/api.sock", check=False, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_pods_reach_their_host_a_service_and_beyond(cluster: Cluster) -> None:
    h1, h2 = cluster.hosts
    a1 = h1.container("pod-a")
    own_host = HOST_ADDRESSES[0].split("/")[0]
    assert ping(h1, a1, own_host).returncode == 0, "pod -> its own host's address"
    assert ping(h1, a1, BEYOND).returncode == 0, "pod -> an address beyond the host"
    backend = next(a for h, a in cluster.pods.values() if h is h2)
    sh("ip", "netns", "exec", h1.netns, "nft", "-f", "-", input=(
        "table ip rtmsvc {\n chain prerouting {\n  type nat hook prerouting priority dstnat;\n"
        f"  ip daddr {SERVICE_VIP} dnat to {backend}\n }}\n}}\n"))
    done = ping(h1, a1, SERVICE_VIP)
    assert done.returncode == 0, f"pod -> Service VIP -> pod on the other node: {done.stdout}"
    REPORT["egress_paths"] = ["own host address", f"Service VIP {SERVICE_VIP} DNAT to a pod "
                              "on the other node", f"{BEYOND} beyond the host (masqueraded)"]


def test_vpp_restart_pods_keep_addresses_and_reach_each_other(cluster: Cluster) -> None:
    h1, h2 = cluster.hosts
    a1 = h1.container("pod-a")
    before = {n: pod_address(h, n) for n, (h, _) in cluster.pods.items() if h is h1}
    far = next(a for h, a in cluster.pods.values() if h is h2)
    started = time.monotonic()
    h1.podman("rm", "-f", "-t", "5", h1.container("vpp"))
    run_container(h1, "vpp", cluster.image)
    wait("pods across the hosts after VPP's restart",
         lambda: ping(h1, a1, far, 1).returncode == 0, 240, 1)
    REPORT["vpp_restart_to_pods_reachable_seconds"] = round(time.monotonic() - started, 1)
    after = {n: pod_address(h1, n) for n in before}
    assert after == before
    assert ping(h1, a1, HOST_ADDRESSES[0].split("/")[0]).returncode == 0


def underlay_ping(address: str) -> bool:
    """`address` answers a ping from the hosts' router (the underlay namespace)."""
    return sh("ip", "netns", "exec", UNDERLAY_NS, "ping", "-c", "1", "-W", "1", address,
              check=False, timeout=10).returncode == 0


def nic_taken(host: Host) -> bool:
    """VPP has the host's NIC: Linux knows it as eth0-nic (eth0 is then the host link)."""
    return host.run("ip", "link", "show", "eth0-nic", check=False).returncode == 0


def test_rolling_update_gives_the_host_its_uplink_back_and_the_new_pod_takes_it(
        cluster: Cluster) -> None:
    """A DaemonSet rolling update deletes the node's pod: the vpp and agent containers get
    SIGTERM together. VPP runs under `vppmesh vpp-run` (vpp.sh), which gives the host its
    NIC back as soon as VPP exits: the host answers ping on its own address, on its NIC,
    within 5 s of the SIGTERM (it can reach the API server and pull the next image). The
    replacement pod takes the NIC again and re-attaches the node's pods."""
    h1, h2 = cluster.hosts
    host, address = h2, HOST_ADDRESSES[1].split("/")[0]
    for h in (h1, h2):  # the earlier VPP restart's rekeys done: this one steps again
        settled(h)
    assert nic_taken(host) and underlay_ping(address)
    pods = {n: pod_address(h, n) for n, (h, _) in cluster.pods.items() if h is host}
    near = next(iter(pods))
    far = next(a for h, a in cluster.pods.values() if h is h1)
    pod, _, _ = manifest()
    grace = str(pod["terminationGracePeriodSeconds"])
    started = time.monotonic()
    stops = [subprocess.Popen(["nsenter", f"--net=/run/netns/{host.netns}", "podman", "stop",
                               "-t", grace, host.container(name)], env=host.env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name in ("vpp", "agent")]
    try:
        back = wait("the host answering on its own NIC",
                    lambda: not nic_taken(host) and underlay_ping(address), 5, 0.2)
    finally:
        for stop in stops:
            stop.wait(int(grace) + 30)
    REPORT["rolling_update_host_back_seconds"] = round(back, 2)
    addresses = host.run("ip", "-4", "-o", "addr", "show", "eth0").stdout
    assert HOST_ADDRESSES[1] in addresses
    assert host.run("ping", "-c", "1", "-W", "2", BEYOND, check=False).returncode == 0
    logs = {}
    for name in ("vpp", "agent"):
        done = host.podman("logs", host.container(name))
        logs[name] = done.stdout + done.stderr
    assert "vpp-run: VPP exited" in logs["vpp"], logs["vpp"]
    gave = [name for name, text in logs.items()
            if "uplink: linux link eth0" in text or "given back to Linux" in text]
    assert gave, logs  # vpp-run, or the agent when VPP went first (the lock: one of them)
    REPORT["rolling_update_nic_given_back_by"] = gave
    # The replacement pod: VPP takes the NIC again, the pods come back with their addresses.
    started = time.monotonic()
    for name in ("vpp", "agent"):
        host.podman("rm", "-f", "-t", "0", host.container(name))
    for name in ("vpp", "agent"):
        run_container(host, name, cluster.image)
    wait("pods across the hosts from the replacement pod",
         lambda: ping(host, near, far, 1).returncode == 0, 240, 1)
    REPORT["rolling_update_replacement_to_pods_reachable_seconds"] = round(
        time.monotonic() - started, 1)
    assert nic_taken(host) and underlay_ping(address)
    assert {n: pod_address(host, n) for n in pods} == pods
    wait(f"{host.node} ready", lambda: ready(host), 120, 1)


def settled(host: Host, quiet: float = 12.0, timeout: float = 120.0) -> None:
    """The host's SAs unchanged for `quiet` seconds (longer than rekey_grace): the agents
    have finished the rekeys and window slides an earlier VPP restart started."""
    deadline = time.monotonic() + timeout
    last = host.vppctl("show", "ipsec", "sa")
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = host.vppctl("show", "ipsec", "sa")
        if now == last:
            return
        last = now
    raise AssertionError(f"{host.node}: SAs still changing after {timeout:.0f} s")


def test_agent_restart_changes_nothing(cluster: Cluster) -> None:
    h1, h2 = cluster.hosts
    for host in (h2, h1):  # a slide still due would be the new agent's first change
        settled(host)
    before = h1.vppctl("show", "interface", "address")
    fib = h1.vppctl("show", "ip", "fib", "summary")
    h1.podman("rm", "-f", "-t", "5", h1.container("agent"))
    run_container(h1, "agent", cluster.image)
    wait("the agent ready again", lambda: ready(h1), 120, 1)
    wait("the agent's first pass", lambda: " change(s) " in h1.podman(
        "logs", h1.container("agent")).stdout, 120, 1)
    logs = h1.podman("logs", h1.container("agent")).stdout
    assert re.search(r": 0 change\(s\)", logs), logs
    assert h1.vppctl("show", "interface", "address") == before
    assert h1.vppctl("show", "ip", "fib", "summary") == fib
    far = next(a for h, a in cluster.pods.values() if h is h2)
    assert ping(h1, h1.container("pod-a"), far).returncode == 0


def kubelet_del(host: Host, container: str, netns: str) -> subprocess.CompletedProcess[str]:
    """DEL as a kubelet's runtime sends it: after the pod's namespace is gone."""
    conflist = json.loads(host.path("/etc/cni/net.d/10-vppmesh.conflist").read_text())
    conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"],
            **conflist["plugins"][0]}
    container_id = host.podman("inspect", "--format", "{{.Id}}", container).stdout.strip()
    env = {**host.env(), "CNI_COMMAND": "DEL", "CNI_CONTAINERID": container_id,
           "VPPMESH_AGENT_PID_FILE": str(host.path("/run/vppmesh") / "agent.pid"),
           "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
           "CNI_PATH": f"{host.path('/opt/cni/bin')}:/usr/lib/cni"}
    return sh("nsenter", f"--net=/run/netns/{host.netns}",
              str(host.path("/opt/cni/bin") / "vppmesh-cni"), env=env, check=False,
              input=json.dumps(conf))


def test_podman_rm_releases_addresses_and_vpp_interfaces(cluster: Cluster) -> None:
    # One pod first as a kubelet would: DEL once its namespace is gone, then the runtime's.
    name, (host, address) = next(iter(cluster.pods.items()))
    done = kubelet_del(host, name, f"/run/netns/{PREFIX}gone")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not host.path(f"/var/lib/cni/networks/vppmesh/{address}").exists()
    host.podman("rm", "-f", "-t", "0", name)
    del cluster.pods[name]
    for name, (host, address) in list(cluster.pods.items()):
        lease = host.path(f"/var/lib/cni/networks/vppmesh/{address}")
        assert lease.exists()
        host.podman("rm", "-f", "-t", "0", name)
        # podman's DEL may come from the container's cleanup process, just after rm.
        wait(f"{address} released after podman rm", lambda p=lease: not p.exists(), 30, 0.5)
        del cluster.pods[name]
    for host in cluster.hosts:
        assert "vpmc" not in host.vppctl("show", "interface")
        assert not list(host.path("/var/lib/cni/vppmesh").glob("*.json"))


def test_uninstall_leaves_no_conflist_plugin_or_taken_nic(cluster: Cluster) -> None:
    uninstall = yaml.safe_load((K8S / "uninstall" / "uninstall.yaml").read_text())
    spec = uninstall["spec"]["template"]["spec"]
    grace = str(manifest()[0]["terminationGracePeriodSeconds"])
    for host in cluster.hosts:
        assert host.path("/etc/cni/net.d/10-vppmesh.conflist").exists()
        # kubectl delete -f containers/k8s/: both containers get SIGTERM together and the
        # DaemonSet's grace period before SIGKILL, as the kubelet gives them.
        stops = [subprocess.Popen(["nsenter", f"--net=/run/netns/{host.netns}", "podman",
                                   "stop", "-t", grace, host.container(name)],
                                  env=host.env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
                 for name in ("agent", "vpp")]
        for stop in stops:
            stop.wait(int(grace) + 30)
        logs = {}
        for name in ("agent", "vpp"):
            done = host.podman("logs", host.container(name))
            logs[name] = (done.stdout + done.stderr)[-3000:]
        for name in ("agent", "vpp"):
            host.podman("rm", "-f", "-t", "0", host.container(name))
        # VPP's exit gave the NIC back already (vpp-run, or the agent when it saw VPP go
        # first): the kubelet can pull the uninstall DaemonSet's image.
        assert not nic_taken(host), logs
        assert host.run("ping", "-c", "1", "-W", "2", BEYOND, check=False).returncode == 0
        run_container(host, "uninstall", cluster.image, detach=False, spec=spec)
        assert not host.path("/etc/cni/net.d/10-vppmesh.conflist").exists()
        assert not list(host.path("/opt/cni/bin").iterdir())
        addresses = host.run("ip", "-4", "-o", "addr", "show", "eth0").stdout
        assert HOST_ADDRESSES[host.index - 1] in addresses
        assert host.run("nft", "list", "table", "ip", "vppmesh", check=False).returncode != 0
        assert host.run("ping", "-c", "1", "-W", "2", BEYOND, check=False).returncode == 0
