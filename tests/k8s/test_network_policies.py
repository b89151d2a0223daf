"""The network policies allow exactly the intended flows: each rendered policy is turned
into (from, to, port) triples over the namespace's workloads and compared, whole, with
the list of flows the service needs (k8s/base/network-policies.yaml names them)."""

from __future__ import annotations

import copy

from k8s.render import Object, find, one

WORKLOADS = ("decision", "model-secondary", "model-challenger", "feature-cache")

MONITORING = "ns:kubernetes.io/metadata.name=monitoring"
DNS = "ns:kubernetes.io/metadata.name=kube-system/pods:k8s-app=kube-dns"
EXPECTED = {
    # Ingress.
    ("ns:decision.example.com/caller=true", "decision", "TCP/50051"),
    ("ns:kubernetes.io/metadata.name=oncall", "decision", "TCP/50052"),
    (MONITORING, "decision", "TCP/9464-9465"),
    (MONITORING, "decision", "TCP/8082"),
    ("decision", "model-secondary", "TCP/7070"),
    ("decision", "model-challenger", "TCP/7070"),
    (MONITORING, "model-secondary", "TCP/8082"),
    (MONITORING, "model-challenger", "TCP/8082"),
    (MONITORING, "feature-cache", "TCP/9480"),
    # Egress.
    *((w, DNS, port) for w in WORKLOADS for port in ("UDP/53", "TCP/53")),
    ("decision", "model-secondary", "TCP/7070"),
    ("decision", "model-challenger", "TCP/7070"),
    ("decision", "ns:kubernetes.io/metadata.name=redis", "TCP/6379"),
    ("decision", "ns:kubernetes.io/metadata.name=postgres", "TCP/5432"),
    (
        "decision",
        "ns:kubernetes.io/metadata.name=observability"
        "/pods:app.kubernetes.io/name=opentelemetry-collector",
        "TCP/4317",
    ),
    ("feature-cache", "ns:kubernetes.io/metadata.name=kafka", "TCP/9092"),
    ("feature-cache", "ns:kubernetes.io/metadata.name=redis", "TCP/6379"),
}


def pod_labels(objects: list[Object], workload: str) -> dict[str, str]:
    labels: dict[str, str] = one(objects, "Deployment", workload)["spec"]["template"]["metadata"][
        "labels"
    ]
    return labels


def selected(objects: list[Object], selector: dict[str, object]) -> list[str]:
    """The workloads of this namespace a pod selector matches."""
    wanted = dict(selector.get("matchLabels", {}))  # type: ignore[call-overload]
    assert set(selector) <= {"matchLabels"}, "only matchLabels is read here"
    return [w for w in WORKLOADS if wanted.items() <= pod_labels(objects, w).items()]


def labels_text(selector: dict[str, object]) -> str:
    labels = dict(selector.get("matchLabels", {}))  # type: ignore[call-overload]
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def peers(objects: list[Object], rule_peers: list[Object]) -> list[str]:
    """Each peer in words: a workload of this namespace by name, others by selector."""
    found = []
    for peer in rule_peers:
        assert "ipBlock" not in peer, "no flow is by address"
        if "namespaceSelector" not in peer:
            found.extend(selected(objects, peer["podSelector"]))
            continue
        text = f"ns:{labels_text(peer['namespaceSelector'])}"
        if "podSelector" in peer:
            text += f"/pods:{labels_text(peer['podSelector'])}"
        found.append(text)
    return found


def port_texts(rule: Object) -> list[str]:
    assert rule.get("ports"), "every rule names its ports"
    return [
        f"{p['protocol']}/{p['port']}" + (f"-{p['endPort']}" if "endPort" in p else "")
        for p in rule["ports"]
    ]


def flows(objects: list[Object]) -> set[tuple[str, str, str]]:
    found = set()
    for policy in find(objects, "NetworkPolicy"):
        targets = selected(objects, policy["spec"]["podSelector"])
        for rule in policy["spec"].get("ingress", []):
            for source in peers(objects, rule["from"]):
                found |= {(source, t, port) for t in targets for port in port_texts(rule)}
        for rule in policy["spec"].get("egress", []):
            for destination in peers(objects, rule["to"]):
                found |= {(t, destination, port) for t in targets for port in port_texts(rule)}
    return found


def test_the_policies_allow_exactly_the_intended_flows(objects: list[Object]) -> None:
    found = flows(objects)
    assert found - EXPECTED == set(), "allowed but not intended"
    assert EXPECTED - found == set(), "intended but not allowed"


def test_everything_else_is_denied_both_ways(objects: list[Object]) -> None:
    deny = one(objects, "NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {} and sorted(deny["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny and "egress" not in deny


def test_a_widened_rule_is_caught(objects: list[Object]) -> None:
    widened = copy.deepcopy(objects)
    policy = one(widened, "NetworkPolicy", "model-server")
    policy["spec"]["ingress"][0]["from"] = [{"podSelector": {}}]  # any pod of the namespace
    assert ("feature-cache", "model-secondary", "TCP/7070") in flows(widened) - EXPECTED
