"""The Kubernetes part of the local node, without running it: kubelet config and flags, certificates,
the cgroup root on a fake hierarchy, and which nft tables the kubelet's clean-up may delete."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shim.errors import InvalidArgument
from shim.node import cgroups, kubelet_host, pki
from shim.node import kube_render as kr
from shim.node.layout import NodeLayout


def _kube(tmp_path: Path) -> kr.KubeLayout:
    return kr.KubeLayout(NodeLayout(tmp_path / "node"))


def test_kubelet_config_points_at_criu_shim_with_checkpoints_on_and_cgroup_v1_allowed(tmp_path: Path) -> None:
    kube = _kube(tmp_path)
    config = json.loads(kr.kubelet_config(kube, "unix:///run/criu-shim/x/cri.sock", "192.0.2.2", 10250))
    assert config["containerRuntimeEndpoint"] == config["imageServiceEndpoint"] == "unix:///run/criu-shim/x/cri.sock"
    assert config["featureGates"] == {"ContainerCheckpoint": True}
    assert config["failCgroupV1"] is False and config["cgroupDriver"] == "cgroupfs"
    assert config["cgroupRoot"] == f"/criu-shim-{kube.node.tag}"
    assert config["authentication"]["anonymous"]["enabled"] is False and config["readOnlyPort"] == 0
    assert "staticPodPath" not in config and "staticPodURL" not in config
    for key in ("podLogsDir", "volumePluginDir"):
        assert Path(config[key]).is_relative_to(kube.dir)


def test_kubelet_image_gc_is_off_unless_an_age_is_given(tmp_path: Path) -> None:
    kube = _kube(tmp_path)
    off = json.loads(kr.kubelet_config(kube, "unix:///x", "192.0.2.2", 10250))
    assert off["imageGCHighThresholdPercent"] == 100 and "imageMaximumGCAge" not in off
    on = json.loads(kr.kubelet_config(kube, "unix:///x", "192.0.2.2", 10250, "30s"))
    # The age rule alone: the disk thresholds stay off, so only images unused for 30 s go.
    assert on["imageMaximumGCAge"] == "30s" and on["imageMinimumGCAge"] == "1s"
    assert on["imageGCHighThresholdPercent"] == 100
    for bad in ("0s", "1s", "30", "-1m", "1d", "30s; rm"):
        with pytest.raises(InvalidArgument, match="a duration like 30s"):
            kr.kubelet_config(kube, "unix:///x", "192.0.2.2", 10250, bad)


def test_kubelet_flags_keep_its_root_short_and_its_data_under_dir(tmp_path: Path) -> None:
    kube = _kube(tmp_path / ("long-" * 30))
    argv = kr.kubelet_argv(Path("/bin/kubelet"), kube, "192.0.2.2")
    root = Path(argv[argv.index("--root-dir") + 1])
    assert root == kube.kubelet_root and len(str(root / "pod-resources" / "1234567890")) < 108
    assert kube.kubelet_checkpoints.is_relative_to(kube.node.dir)
    assert argv[argv.index("--hostname-override") + 1] == kube.node_name
    assert not [a for a in argv if "manifest" in a]


def test_kubeconfig_names_server_ca_and_client_certificate(tmp_path: Path) -> None:
    config = json.loads(kr.kubeconfig("https://127.0.0.1:6443", tmp_path / "ca.crt", tmp_path / "a.crt",
                                      tmp_path / "a.key", "admin"))
    assert config["clusters"][0]["cluster"] == {"server": "https://127.0.0.1:6443",
                                                "certificate-authority": str(tmp_path / "ca.crt")}
    assert config["users"][0]["user"]["client-key"] == str(tmp_path / "a.key")


def test_issued_certificates_chain_to_the_ca_and_keys_are_root_only(tmp_path: Path) -> None:
    ca = pki.create_ca(tmp_path, "test CA")
    leaf = pki.issue(ca, pki.CertPair(tmp_path / "k.crt", tmp_path / "k.key"), "system:node:n1",
                     organizations=("system:nodes",), server=True, client=True, dns=("n1",), ips=("127.0.0.1",))
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    cert = x509.load_pem_x509_certificate(leaf.cert.read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:n1"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:nodes"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["n1"]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    for path in (ca.key, leaf.key, ca.cert):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert pki.create_ca(tmp_path, "test CA").cert.read_bytes() == ca.cert.read_bytes()  # kept, not replaced


def test_cgroup_root_is_made_in_every_hierarchy_and_removed_bottom_up(tmp_path: Path) -> None:
    for name in ("memory", "cpuset", "pids"):
        (tmp_path / name).mkdir()
    (tmp_path / "cpu").symlink_to(tmp_path / "pids")  # cpu,cpuacct-style links are not hierarchies
    (tmp_path / "cpuset" / "cpuset.cpus").write_text("0-1\n")
    (tmp_path / "cpuset" / "cpuset.mems").write_text("0\n")
    made = cgroups.create_root("criu-shim-t", tmp_path)
    assert sorted(p.parent.name for p in made) == ["cpuset", "memory", "pids"]
    assert (tmp_path / "cpuset" / "criu-shim-t" / "cpuset.cpus").read_text() == "0-1\n"
    (tmp_path / "memory" / "criu-shim-t" / "kubepods" / "burstable").mkdir(parents=True)
    (tmp_path / "cpuset" / "criu-shim-t" / "cpuset.cpus").unlink()  # cgroupfs files vanish with the dir
    (tmp_path / "cpuset" / "criu-shim-t" / "cpuset.mems").unlink()
    removed = cgroups.remove_root("criu-shim-t", tmp_path)
    assert len(removed) == 3 and not list(tmp_path.glob("*/criu-shim-t"))


def test_only_tables_left_with_empty_base_chains_may_be_deleted() -> None:
    base = {"chain": {"family": "ip", "table": "nat", "name": "PREROUTING", "hook": "prerouting",
                      "policy": "accept"}}
    assert kubelet_host._only_empty_base_chains([{"table": {"name": "nat"}}])
    assert kubelet_host._only_empty_base_chains([{"table": {"name": "nat"}}, base])
    assert not kubelet_host._only_empty_base_chains([base, {"chain": {"name": "KUBE-OTHER"}}])
    assert not kubelet_host._only_empty_base_chains([base, {"rule": {"chain": "PREROUTING"}}])
    rule = {"chain": "INPUT", "handle": 7, "expr": [{"counter": None}, {"jump": {"target": "KUBE-FIREWALL"}}]}
    assert kubelet_host._jump_target(rule) == "KUBE-FIREWALL"


def test_node_up_refuses_a_bad_gc_age_with_the_same_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from shim import cli

    parser = cli.build_parser()
    assert parser.parse_args(["node", "up", "--dir", str(tmp_path), "--image-gc-max-age", "5m"]).image_gc_max_age == "5m"
    for bad in ("1s", "30", "1d"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["node", "up", "--dir", str(tmp_path), "--image-gc-max-age", bad])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"image GC age '{bad}': a duration like 30s, 5m or 1h" in err
    assert not list(tmp_path.iterdir())
