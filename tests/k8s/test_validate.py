"""make k8s-validate: every overlay is valid, and the validator does catch what is not."""

from __future__ import annotations

import copy

import pytest

from k8s.render import Object, RenderError, one, render, render_topics
from k8s.validate import lint_dockerfiles, main, problems


def test_every_overlay_renders_valid_objects_and_the_dockerfiles_lint(capsys) -> None:
    assert main() == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "prod: 33 objects, 0 problems" in out and "topics: 2 objects, 0 problems" in out
    assert "promtool check and test adapter queries: ok" in out
    assert "prod: promtool check rules: ok" in out and "prod: promtool test rules: ok" in out


def test_every_rendered_object_has_a_schema(objects: list[Object]) -> None:
    assert all(list(problems(o)) == [] for o in objects)
    assert {o["kind"] for o in objects} >= {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def mutated(objects: list[Object], kind: str, name: str, change) -> Object:
    obj = copy.deepcopy(one(objects, kind, name))
    change(obj)
    return obj


@pytest.mark.parametrize(
    ("kind", "name", "change", "expected"),
    [
        (
            "Deployment",
            "decision",
            lambda o: o["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="x"),
            "'imagePullPolicyy' was unexpected",
        ),
        (
            "HorizontalPodAutoscaler",
            "decision",
            lambda o: o["spec"].update(minReplicas="three"),
            "spec/minReplicas",
        ),
        (
            "ServiceMonitor",
            "decision",
            lambda o: o["spec"]["endpoints"][0].update(prot="metrics-0"),
            "'prot' was unexpected",
        ),
        (
            "PrometheusRule",
            "decision",
            lambda o: o["spec"]["groups"][0]["rules"][0].update(expression="up"),
            "'expression' was unexpected",
        ),
        (
            "KafkaTopic",
            "market-data",
            lambda o: o["spec"].update(partitions="12"),
            "spec/partitions: '12' is not of type 'integer'",
        ),
        (
            "KafkaTopic",
            "market-data",
            lambda o: o["metadata"]["labels"].pop("strimzi.io/cluster"),
            "'strimzi.io/cluster' is a required property",
        ),
        (
            "ClusterImagePolicy",
            "decision-service-images",
            lambda o: o["spec"]["authorities"][0]["keyless"].update(identity="x"),
            "'identity' was unexpected",
        ),
        (
            "ClusterImagePolicy",
            "decision-service-images",
            lambda o: o["metadata"].update(namespace="decision"),
            "'namespace' was unexpected",
        ),
    ],
)
def test_the_validator_names_what_is_wrong(
    rendered, kind: str, name: str, change, expected: str
) -> None:
    objects = render_topics() if kind == "KafkaTopic" else rendered["prod"]
    found = list(problems(mutated(objects, kind, name, change)))
    assert len(found) == 1 and expected in found[0], found


def test_a_kind_without_a_schema_is_an_error_not_a_pass() -> None:
    thing = {"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "x"}}
    assert list(problems(thing)) == ["no schema for example.com/v1 Thing in Kubernetes 1.37.0"]


def test_kustomize_errors_are_reported(tmp_path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(RenderError, match=r"missing\.yaml"):
        render(tmp_path)


def test_hadolint_findings_fail_the_lint(tmp_path, monkeypatch) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "bad.Dockerfile").write_text("FROM python\nRUN cd /tmp && echo hi\n")
    monkeypatch.setattr("k8s.validate.K8S_DIR", tmp_path)
    found = lint_dockerfiles()
    assert any("DL3006" in line for line in found), found  # untagged base image
