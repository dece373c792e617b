"""The Helm chart, rendered by Helm's own engine (helm-python-sdk, the Helm v4 Go SDK).

No cluster runs here: each rendered manifest is validated against the OpenAPI
schemas of the Kubernetes releases the chart supports (kubernetes-validate), the behaviour
that matters is asserted on the rendered objects, and the rendered Job's
container is executed with the installed console script against the suite's
PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from runner.errors import exit_codes
from runner.settings import variables

from .conftest import ROOT, RUNNER, RUNNER_PASSWORD, RUNNER_ROLE, run_runner, runner_env, version_rows

CHART = ROOT / "helm" / "migration-runner"
PARENT = ROOT / "examples" / "helm-parent"
EXAMPLE = ROOT / "examples" / "basic"
EXIT_CODES_FILE = CHART / "files" / "exit-codes.json"
# The newest Kubernetes release whose schemas kubernetes-validate ships.
KUBE_VERSION = kubernetes_validate.latest_version()


def kube_floor() -> str:
    """The oldest Kubernetes release the chart claims: Chart.yaml's kubeVersion, ">=X.Y.Z-0"."""
    constraint = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    match = re.fullmatch(r">=\s*v?(\d+)\.(\d+)\.(\d+)(-0)?", constraint.strip())
    assert match, f"kubeVersion {constraint!r} is not a plain floor"
    return ".".join(match.group(1, 2, 3))


def kube_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


KUBE_FLOOR = kube_floor()
# Every rendered object is validated (strict) against each of these, from the floor the chart claims (native
# sidecars are on by default from 1.29) to the newest.
KUBE_VERSIONS = sorted({KUBE_FLOOR, "1.31.0", "1.33.0", "1.35.0", KUBE_VERSION}, key=kube_key)
# What Kubernetes requires of the names of Jobs, Pods, Services... and of label values: an RFC 1123 label.
RFC1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
URL = "postgresql://app:s3cret@db.example.internal:5432/app"
BASE = {"database": {"url": URL}}
CONTAINER = "migration-runner"

helm.disable_logging()


# -- helpers ------------------------------------------------------------------
def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def render(values: dict | None = None, chart: Path = CHART, name: str = "shop", namespace: str = "prod",
           tests: bool = False) -> list[dict]:
    """Every object the chart renders with these values (on top of BASE for our chart); the
    `helm test` pods only with tests=True (as `helm template --skip-tests` otherwise)."""
    if chart == CHART:
        values = deep_merge(BASE, values or {})
    with helm.Chart.load(chart) as loaded:
        rendered = loaded.render(values or {}, name=name, namespace=namespace)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml") and (tests or "/templates/tests/" not in path):
            docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def validate(doc: dict) -> None:
    """Strictly valid on every Kubernetes release the chart supports, under an RFC 1123 name."""
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} on Kubernetes {version}: {e}") from None
    assert RFC1123_LABEL.fullmatch(doc["metadata"]["name"]), doc["metadata"]["name"]


def notes(values: dict | None = None) -> str:
    with helm.Chart.load(CHART) as loaded:
        rendered = loaded.render(deep_merge(BASE, values or {}), name="shop", namespace="prod")
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def only(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, (kind, [d["kind"] for d in docs])
    return found[0]


def kinds(docs: list[dict]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def component(doc: dict) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def pre_job(docs: list[dict]) -> dict:
    """The migration Job (the post Job, postUpgrade.enabled, aside)."""
    jobs = [d for d in docs if d["kind"] == "Job" and component(d) == "migration"]
    assert len(jobs) == 1, [(d["kind"], d["metadata"]["name"]) for d in docs]
    return jobs[0]


def post_job(docs: list[dict]) -> dict:
    jobs = [d for d in docs if d["kind"] == "Job" and component(d) == "post-migration"]
    assert len(jobs) == 1, [(d["kind"], d["metadata"]["name"]) for d in docs]
    return jobs[0]


def pod_spec(docs: list[dict], job: dict | None = None) -> dict:
    return (job or pre_job(docs))["spec"]["template"]["spec"]


def container(docs: list[dict], job: dict | None = None) -> dict:
    (c,) = [c for c in pod_spec(docs, job)["containers"] if c["name"] == CONTAINER]
    return c


def mounted(docs: list[dict], kind: str, pod: dict | None = None) -> dict:
    """The Secret or ConfigMap of this kind that the pod (the Job's by default) mounts."""
    pod = pod or pod_spec(docs)
    field, key = {"Secret": ("secret", "secretName"), "ConfigMap": ("configMap", "name")}[kind]
    (name,) = [v[field][key] for v in pod["volumes"] if field in v]
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def annotations(doc: dict) -> dict:
    return doc["metadata"].get("annotations") or {}


def render_error(values: dict, chart_values_base: dict | None = BASE) -> str:
    values = deep_merge(chart_values_base or {}, values)
    with helm.Chart.load(CHART) as loaded, pytest.raises(helm.HelmError) as caught:
        loaded.render(values, name="shop", namespace="prod")
    return str(caught.value)


def fatal_codes() -> set[int]:
    """Exit codes a retry cannot fix, from the runner's own table (1, a bug, included)."""
    return {row["code"] for row in exit_codes() if not row["retryable"] and row["code"] != 0}


# Value combinations rendered and validated: each mode with each URL source,
# and the main options around them.
COMBINATIONS = {
    f"{mode}-{source}": {"mode": mode, **values}
    for mode in ("hook", "argocd", "job")
    for source, values in {
        "url": {},
        "existingSecret": {"database": {"url": "", "existingSecret": "db", "existingSecretKey": "DATABASE_URL"}},
        "configMap": {"migrations": {"source": "configMap",
                                     "files": {"alembic.ini": "[alembic]\n", "migrations/env.py": "# env\n"}}},
    }.items()
} | {
    "existingConfigMap": {"migrations": {"source": "configMap", "existingConfigMap": "shop-migrations",
                                         "existingConfigMapItems": [{"key": "alembic.ini", "path": "alembic.ini"}]}},
    "volume": {"migrations": {"source": "volume", "mountPath": "/srv/migrations",
                              "volume": {"persistentVolumeClaim": {"claimName": "migrations", "readOnly": True}}}},
    "all-config": {"config": {"waitTimeout": 30, "lockTimeout": 600.5, "lockKey": "9223372036854775807",
                              "baselineRevision": "0001", "verifyBaseline": True, "allowMultipleHeads": True, "versionTable": "versions",
                              "history": True, "historySchema": "audit",
                              "fastPath": False,
                              "versionTableSchema": "app", "applicationName": "shop-migrations",
                              "connectionCheckInterval": 0, "statementTimeout": 120, "ddlLockTimeout": 5,
                              "ddlLockRetries": 3, "terminationLog": "/tmp/summary.json",
                              "logFormat": "text", "logLevel": "DEBUG", "progressInterval": 30,
                              "alembicSection": "app", "alembicXArgs": "tenant=acme region=eu",
                              "allowAhead": "never", "quitUrls": ["http://127.0.0.1:15020/quitquitquit"],
                              "passwordCommand": "aws rds generate-db-auth-token --hostname db.example.internal "
                                                 "--port 5432 --username app --region eu-west-1",
                              "passwordCommandTimeout": 10},
                   "database": {"url": "postgresql://app@db.example.internal:5432/app?sslmode=require"}},
    "scheduling": {"nodeSelector": {"kubernetes.io/os": "linux"},
                   "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "batch", "effect": "NoSchedule"}],
                   "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                       "nodeSelectorTerms": [{"matchExpressions": [
                           {"key": "pool", "operator": "In", "values": ["batch"]}]}]}}},
                   "imagePullSecrets": [{"name": "regcred"}], "priorityClassName": "low",
                   "podAnnotations": {"example.com/team": "db"}, "podLabels": {"team": "db"},
                   "job": {"annotations": {"example.com/owner": "db"}, "labels": {"tier": "migrations"}}},
    "otel": {"otel": {"endpoint": "http://otel-collector.observability:4318", "protocol": "http/protobuf",
                      "headersSecret": {"name": "otel-auth", "key": "headers"}, "flushTimeout": 2.5},
             "postUpgrade": {"enabled": True}, "verifyCronJob": {"enabled": True}},
    "env": {"extraEnv": [{"name": "PGSSLMODE", "value": "require"},
                         {"name": "TZ", "valueFrom": {"configMapKeyRef": {"name": "tz", "key": "tz"}}}],
            "envFrom": [{"secretRef": {"name": "pg-certs"}}]},
    "digest": {"image": {"repository": "example/runner", "digest": "sha256:" + "a" * 64, "pullPolicy": "Always"}},
    "no-serviceaccount": {"serviceAccount": {"create": False, "name": "migrator"}},
    "no-extras": {"disableIstioSidecar": False, "job": {"podFailurePolicy": False, "activeDeadlineSeconds": None},
                  "resources": {}},
    "job-disabled": {"job": {"enabled": False}},
    "overrides": {"fullnameOverride": "db-migrate", "command": ["/opt/venv/bin/migration-runner"], "args": []},
    "odd-names": {"fullnameOverride": "Shop_DB.Migrate-", "mode": "job", "job": {"nameSuffixOverride": "v1-2"}},
    "camel-name": {"nameOverride": "dbMigrations", "migrations": {"source": "configMap", "files": {"alembic.ini": ""}}},
    "extensions": {
        "commonLabels": {"team": "db"}, "commonAnnotations": {"example.com/owner": "db"},
        "image": {"registry": "registry.example.com", "repository": "shop/migrations", "tag": "1.4.0"},
        "global": {"imagePullSecrets": ["global-regcred", {"name": "regcred"}]},
        "imagePullSecrets": [{"name": "regcred"}],
        "automountServiceAccountToken": True, "terminationGracePeriodSeconds": 120,
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "{{ .Release.Name }}"}}}],
        "extraVolumes": [{"name": "pg-ca", "secret": {"secretName": "pg-ca"}}],
        "extraVolumeMounts": [{"name": "pg-ca", "mountPath": "/etc/pg-ca", "readOnly": True}],
        "extraEnvFrom": [{"configMapRef": {"name": "pg-settings"}}],
        "initContainers": [{"name": "cloud-sql-proxy", "restartPolicy": "Always",
                            "image": "gcr.io/cloud-sql-connectors/cloud-sql-proxy:2.14.0",
                            "args": ["--port=5432", "project:region:instance"]}],
        "networkPolicy": {"enabled": True, "extraEgress": [{"ports": [{"port": 443, "protocol": "TCP"}]}]},
    },
    "sidecars": {"sidecars": [{"name": "istio-proxy", "image": "istio/proxyv2:1.24.0"}],
                 "config": {"quitUrls": "http://127.0.0.1:15020/quitquitquit"}, "mode": "job",
                 "networkPolicy": {"enabled": True, "databasePort": 6432,
                                   "databasePeers": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}},
    "openshift": {"global": {"compatibility": {"openshift": {"adaptSecurityContext": "force"}}}},
    "verify-cronjob": {"verifyCronJob": {"enabled": True, "timeZone": "Europe/Berlin"},
                       "migrations": {"source": "configMap", "files": {"alembic.ini": "[alembic]\n"}}},
} | {
    # Both Jobs of an expand/contract release (#23), with everything that runs beside them.
    f"post-{mode}": {"mode": mode, "config": {"target": "expand@head"},
                     "postUpgrade": {"enabled": True, "target": "heads"},
                     "migrations": {"source": "configMap", "files": {"alembic.ini": "[alembic]\n"}},
                     "networkPolicy": {"enabled": True}, "verifyCronJob": {"enabled": True}}
    for mode in ("hook", "argocd", "job")
}


# -- lint and validation ------------------------------------------------------
def lint_problems(path: Path, values: dict | None = None, **options) -> list:
    report = helm.lint(path, values, strict=True, **options)
    return report["errors"] + [m for m in report["messages"] if m["severity"] >= 2]


def test_lint_is_clean():
    assert lint_problems(CHART) == []
    for name in ("hook-url", "job-configMap", "argocd-existingSecret", "scheduling", "extensions", "sidecars",
                 "openshift", "odd-names", "verify-cronjob", "post-hook", "post-argocd", "post-job"):
        assert lint_problems(CHART, deep_merge(BASE, COMBINATIONS[name])) == [], name
    assert lint_problems(PARENT, with_subcharts=True) == []
    # The oldest Kubernetes the chart claims (kubeVersion) and the newest.
    for version in ("v" + KUBE_FLOOR, "v" + KUBE_VERSION):
        assert lint_problems(CHART, BASE, kube_version=version) == [], version


def test_kubernetes_version_is_current():
    major, minor = (int(part) for part in KUBE_VERSION.split(".")[:2])
    # podFailurePolicy is GA from 1.31; the schemas must know it.
    assert (major, minor) >= (1, 31), KUBE_VERSION


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_every_rendered_manifest_validates(name):
    """Every object, the helm test pod included, on every supported Kubernetes, under an RFC 1123 name."""
    docs = render(COMBINATIONS[name], tests=True)
    assert docs
    for doc in docs:
        validate(doc)
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] in ("migration-runner", "app", "db-migrations")
        assert RFC1123_LABEL.fullmatch(doc["metadata"]["labels"]["app.kubernetes.io/name"])
    if COMBINATIONS[name].get("job", {}).get("enabled", True):
        assert "Job" in kinds(docs)
    if COMBINATIONS[name].get("postUpgrade", {}).get("enabled"):
        assert kinds(docs).count("Job") == 2 and post_job(docs) and pre_job(docs)


def test_validation_catches_a_broken_manifest():
    """The validator is not a no-op: a Job with an unknown field fails."""
    job = only(render(), "Job")
    job["spec"]["template"]["spec"]["containers"][0]["bogusField"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBE_VERSION, strict=True)


# -- modes ----------------------------------------------------------------------
def test_hook_mode_runs_the_job_as_a_pre_install_pre_upgrade_hook_after_its_secret():
    docs = render({"hook": {"weight": 5}})
    # Two Secrets: the Job's own hook copy, and the ordinary one for the application's pods.
    assert kinds(docs) == ["Job", "Secret", "Secret", "ServiceAccount"]
    job = only(docs, "Job")
    assert annotations(job) == {"helm.sh/hook": "pre-install,pre-upgrade", "helm.sh/hook-weight": "5",
                                "helm.sh/hook-delete-policy": "before-hook-creation,hook-succeeded",
                                "helm.sh/hook-output-log-policy": "hook-failed"}
    assert job["metadata"]["name"] == "shop-migration-runner"
    assert "ttlSecondsAfterFinished" not in job["spec"]
    # A pre-install hook runs before ordinary resources exist: what the Job needs is a hook with a lower weight.
    for needed in (annotations(mounted(docs, "Secret")), annotations(only(docs, "ServiceAccount"))):
        assert needed["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert int(needed["helm.sh/hook-weight"]) < int(annotations(job)["helm.sh/hook-weight"])
        # Deleted only with the Job: a failed Job keeps the Secret it needs to be retried and debugged.
        assert "hook-failed" not in needed["helm.sh/hook-delete-policy"]


def test_hook_mode_configmap_is_a_hook_before_the_job():
    docs = render(COMBINATIONS["hook-configMap"])
    config_map = mounted(docs, "ConfigMap")
    assert annotations(config_map)["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(annotations(config_map)["helm.sh/hook-weight"]) < int(annotations(only(docs, "Job"))["helm.sh/hook-weight"])


def test_argocd_mode_is_a_presync_hook_in_a_later_wave_than_its_secret():
    docs = render({"mode": "argocd", "argocd": {"syncWave": 3}})
    job, secret, account = only(docs, "Job"), mounted(docs, "Secret"), only(docs, "ServiceAccount")
    assert annotations(job) == {"argocd.argoproj.io/hook": "PreSync", "argocd.argoproj.io/sync-wave": "3",
                                "argocd.argoproj.io/hook-delete-policy": "BeforeHookCreation"}
    for needed in (secret, account):
        # PreSync runs before the Sync phase: an ordinary Secret would not exist yet.
        assert annotations(needed)["argocd.argoproj.io/hook"] == "PreSync"
        assert int(annotations(needed)["argocd.argoproj.io/sync-wave"]) < 3
    assert not any(key.startswith("helm.sh/") for doc in docs for key in annotations(doc))


def test_job_mode_is_a_plain_job_with_a_hashed_name_and_a_ttl():
    docs = render({"mode": "job", "job": {"ttlSecondsAfterFinished": 600}})
    job = only(docs, "Job")
    assert re.fullmatch(r"shop-migration-runner-[0-9a-f]{8}", job["metadata"]["name"]), job["metadata"]["name"]
    assert job["spec"]["ttlSecondsAfterFinished"] == 600
    for doc in docs:
        assert not any(key.startswith(("helm.sh/hook", "argocd.argoproj.io/")) for key in annotations(doc)), doc


def job_name(values: dict) -> str:
    return only(render(deep_merge({"mode": "job"}, values)), "Job")["metadata"]["name"]


def test_job_name_hash_follows_the_image_and_settings():
    first = job_name({"image": {"tag": "1.0.0"}})
    assert first == job_name({"image": {"tag": "1.0.0"}})  # stable: re-applying the same release is a no-op
    changed = {
        "tag": job_name({"image": {"tag": "1.0.1"}}),
        "repository": job_name({"image": {"tag": "1.0.0", "repository": "example/other"}}),
        "digest": job_name({"image": {"tag": "1.0.0", "digest": "sha256:" + "b" * 64}}),
        "setting": job_name({"image": {"tag": "1.0.0"}, "config": {"lockTimeout": 30}}),
        "url": job_name({"image": {"tag": "1.0.0"}, "database": {"url": URL + "2"}}),
    }
    assert first not in changed.values(), changed
    assert len(set(changed.values())) == len(changed), changed
    # Names stay valid (63 characters, for the job-name label) even with a long release name.
    long = only(render({"mode": "job", "fullnameOverride": "x" * 70}), "Job")["metadata"]["name"]
    # (the cut full name ends with a hash of the whole one, then the Job's own hash)
    assert len(long) <= 63 and re.fullmatch(r"x+-[0-9a-f]{8}-[0-9a-f]{8}", long), long


# -- the URL as a mounted Secret -----------------------------------------------------
def secret_volume(docs: list[dict]) -> tuple[dict, dict]:
    c = container(docs)
    path = env_of(c)["DATABASE_URL_FILE"]
    (mount,) = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == mount["name"])
    return volume["secret"], {"mount": mount, "file": path[len(mount["mountPath"].rstrip("/")) + 1:]}


def test_url_reaches_the_runner_as_a_file_from_the_rendered_secret():
    docs = render()
    c = container(docs)
    assert "DATABASE_URL" not in env_of(c)
    assert URL not in json.dumps(only(docs, "Job"))
    secret = mounted(docs, "Secret")
    assert base64.b64decode(secret["data"]["url"]).decode() == URL
    volume, where = secret_volume(docs)
    assert volume["secretName"] == secret["metadata"]["name"]
    assert [item["path"] for item in volume["items"]] == [where["file"]]
    assert volume["items"][0]["key"] == "url"
    assert where["mount"]["readOnly"] is True


def test_url_from_an_existing_secret():
    docs = render(COMBINATIONS["hook-existingSecret"])
    assert "Secret" not in kinds(docs)
    volume, _ = secret_volume(docs)
    assert volume["secretName"] == "db"
    assert volume["items"][0]["key"] == "DATABASE_URL"


def test_job_disabled_renders_an_ordinary_secret_for_init_containers():
    docs = render({"job": {"enabled": False}})
    assert kinds(docs) == ["Secret"]
    assert annotations(only(docs, "Secret")) == {}


# -- the Job spec -------------------------------------------------------------------
def test_job_spec_and_restricted_security_context():
    docs = render({"job": {"backoffLimit": 2, "activeDeadlineSeconds": 900},
                   "resources": {"limits": {"memory": "300Mi"}}})
    job = only(docs, "Job")
    spec, pod, c = job["spec"], pod_spec(docs), container(docs)
    assert spec["backoffLimit"] == 2 and spec["activeDeadlineSeconds"] == 900
    assert pod["restartPolicy"] == "Never"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["resources"]["limits"] == {"memory": "300Mi"}  # Helm merges maps with the defaults
    # The restricted Pod Security Standard.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not sc.get("privileged")
    # The root filesystem is read-only, so /tmp is an emptyDir.
    (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    # Its own ServiceAccount, with no token.
    account = only(docs, "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    assert account["automountServiceAccountToken"] is False
    # Labels per Helm's conventions.
    labels = job["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == "shop"
    assert labels["app.kubernetes.io/managed-by"] == "Helm"
    assert labels["helm.sh/chart"] == "migration-runner-0.3.0"


def test_istio_sidecar_is_kept_out_by_default():
    template = only(render(), "Job")["spec"]["template"]["metadata"]
    assert template["annotations"]["sidecar.istio.io/inject"] == "false"
    assert template["labels"]["sidecar.istio.io/inject"] == "false"
    template = only(render({"disableIstioSidecar": False}), "Job")["spec"]["template"]["metadata"]
    assert "sidecar.istio.io/inject" not in (template.get("annotations") or {})
    assert "sidecar.istio.io/inject" not in template["labels"]


def test_scheduling_and_metadata_pass_through():
    values = COMBINATIONS["scheduling"]
    docs = render(values)
    job, pod = only(docs, "Job"), pod_spec(docs)
    for key in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets", "priorityClassName"):
        assert pod[key] == values[key], key
    assert job["spec"]["template"]["metadata"]["annotations"]["example.com/team"] == "db"
    assert job["spec"]["template"]["metadata"]["labels"]["team"] == "db"
    assert annotations(job)["example.com/owner"] == "db"
    assert job["metadata"]["labels"]["tier"] == "migrations"


def test_image_reference():
    assert container(render())["image"] == "migration-runner:0.1.0"  # the chart's appVersion
    assert container(render({"image": {"repository": "example/r", "tag": "2"}}))["image"] == "example/r:2"
    c = container(render(COMBINATIONS["digest"]))
    assert c["image"] == "example/runner@sha256:" + "a" * 64 and c["imagePullPolicy"] == "Always"


# -- podFailurePolicy from the runner's exit-code table -----------------------------------
def test_committed_exit_code_table_is_the_runners():
    assert json.loads(EXIT_CODES_FILE.read_text()) == exit_codes(), \
        "helm/migration-runner/files/exit-codes.json is stale: run helm/update-exit-codes.sh"


def test_pod_failure_policy_fails_at_once_on_codes_a_retry_cannot_fix():
    docs = render()
    rules = only(docs, "Job")["spec"]["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert len(fail) == 1
    on = fail[0]["onExitCodes"]
    assert on["operator"] == "In" and on["containerName"] == container(docs)["name"] == CONTAINER
    assert set(on["values"]) == fatal_codes()
    assert on["values"] == sorted(on["values"]) and 0 not in on["values"] and len(on["values"]) <= 255
    # The failures that the issue names as unfixable by a retry, and the ones a retry can fix.
    by_name = {row["name"]: row["code"] for row in exit_codes()}
    for name in ("ConfigError", "MultipleHeads", "LegacyDatabase", "RevisionFailed", "DatabaseAhead"):
        assert by_name[name] in on["values"], name
    for name in ("DatabaseUnreachable", "LockTimeout"):
        assert by_name[name] not in on["values"], name
    # status is required by the schemas of Kubernetes 1.26 to 1.34 (kubeconform and other CI checks).
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules


def test_pod_failure_policy_is_read_from_the_file(tmp_path):
    """Changing the table changes the policy: nothing is copied into the template."""
    chart = tmp_path / "migration-runner"
    shutil.copytree(CHART, chart)
    table = exit_codes() + [{"code": 42, "name": "Test", "meaning": "test", "retryable": False},
                            {"code": 43, "name": "Test2", "meaning": "test", "retryable": True}]
    (chart / "files" / "exit-codes.json").write_text(json.dumps(table))
    rules = only(render(BASE, chart=chart), "Job")["spec"]["podFailurePolicy"]["rules"]
    assert set(rules[0]["onExitCodes"]["values"]) == fatal_codes() | {42}
    (chart / "files" / "exit-codes.json").unlink()
    with helm.Chart.load(chart) as loaded, pytest.raises(helm.HelmError, match="exit-codes.json"):
        loaded.render(BASE, name="shop", namespace="prod")


def test_pod_failure_policy_can_be_turned_off():
    assert "podFailurePolicy" not in only(render({"job": {"podFailurePolicy": False}}), "Job")["spec"]


def test_notes_name_the_fatal_codes():
    text = notes()
    assert "shop-migration-runner" in text
    assert " ".join(str(c) for c in sorted(fatal_codes())) in text


# -- runner settings --------------------------------------------------------------------
def test_every_runner_variable_is_settable_from_values():
    values = deep_merge(COMBINATIONS["all-config"], {"migrations": {"alembicConfig": "/app/db/alembic.ini"}})
    env = env_of(container(render(values)))
    # The URL only ever comes as a file; `lint` runs in CI, not in the cluster; the scratch database's URL
    # holds a password, so it comes from the user's own Secret through extraEnv (the README shows how).
    # FLASK_APP is the application image's own setting, as for the `flask` command.
    wanted = {name for name, _, _ in variables()} - {"DATABASE_URL", "MIGRATE_LINT_EXCLUDE",
                                                     "MIGRATE_SCRATCH_DATABASE_URL", "FLASK_APP"}
    # At most one source of a rotating password: the file in a rendering of its own.
    env |= env_of(container(render({"database": {"url": "postgresql://app@db.example.internal/app",
                                                 "passwordFile": "/vault/secrets/db-password"}})))
    # A fleet's, from its own rendering; Kubernetes sets JOB_COMPLETION_INDEX in an Indexed Job's pods.
    env |= env_of(container(render(FLEET)))
    wanted.discard("JOB_COMPLETION_INDEX")
    env |= env_of(container(render(COMBINATIONS["otel"])))  # only with an OpenTelemetry endpoint
    assert wanted <= set(env), wanted - set(env)
    assert env["MIGRATE_WAIT_TIMEOUT"] == "30"
    assert env["MIGRATE_LOCK_TIMEOUT"] == "600.5"
    assert env["MIGRATE_LOCK_KEY"] == "9223372036854775807"
    assert (env["ALEMBIC_SECTION"], env["ALEMBIC_X_ARGS"]) == ("app", "tenant=acme region=eu")
    assert env["MIGRATE_ALLOW_MULTIPLE_HEADS"] == "true"
    assert env["MIGRATE_FAST_PATH"] == "false"
    assert env["MIGRATE_CONNECTION_CHECK_INTERVAL"] == "0"
    assert env["MIGRATE_BASELINE_REVISION"] == "0001"
    assert env["MIGRATE_VERIFY_BASELINE"] == "true"
    assert (env["MIGRATE_HISTORY"], env["MIGRATE_HISTORY_SCHEMA"]) == ("true", "audit")
    assert env["MIGRATE_DDL_LOCK_RETRIES"] == "3"
    assert env["MIGRATE_ALLOW_AHEAD"] == "never"
    # The image is recorded with the lineage, so that an older image's exit 8 can name it.
    assert env["MIGRATE_IMAGE"] == container(render(values))["image"]
    assert env["ALEMBIC_CONFIG"] == "/app/db/alembic.ini"
    # An integer lock key given as a number is rendered as an integer, not 1e+06.
    assert env_of(container(render({"config": {"lockKey": 1000000}})))["MIGRATE_LOCK_KEY"] == "1000000"


def test_unset_settings_leave_the_runner_defaults():
    env = env_of(container(render()))
    assert set(env) == {"DATABASE_URL_FILE", "MIGRATE_IMAGE", "MIGRATE_LOG_FORMAT", "MIGRATE_LOG_LEVEL", "MIGRATE_TARGET"}
    assert env["MIGRATE_TARGET"] == "heads"
    assert "ALEMBIC_CONFIG" not in env  # the image's own ALEMBIC_CONFIG applies


def test_otel_values_reach_every_runner_with_the_pods_identity():
    docs = render(COMBINATIONS["otel"])
    cron = only(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    jobs = [c for c in (container(docs), container(docs, post_job(docs)))]
    jobs += [c for c in cron["containers"] if c["name"] == CONTAINER]
    assert len(jobs) == 3
    for c in jobs:
        env = {e["name"]: e for e in c["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.observability:4318"
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"]["value"] == "http/protobuf"
        assert env["MIGRATE_OTEL_FLUSH_TIMEOUT"]["value"] == "2.5"
        # The headers (a collector's token) come from the user's Secret, never from values.
        assert env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"] == {"secretKeyRef": {"name": "otel-auth", "key": "headers"}}
        assert env["K8S_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["K8S_NAMESPACE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        assert env["K8S_JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['job-name']"
        assert env["OTEL_RESOURCE_ATTRIBUTES"]["value"] == (
            "k8s.pod.name=$(K8S_POD_NAME),k8s.namespace.name=$(K8S_NAMESPACE_NAME),k8s.job.name=$(K8S_JOB_NAME)")
        # Kubernetes expands $(VAR) only from variables defined before it.
        names = [e["name"] for e in c["env"]]
        assert max(names.index(n) for n in ("K8S_POD_NAME", "K8S_NAMESPACE_NAME", "K8S_JOB_NAME")) < \
            names.index("OTEL_RESOURCE_ATTRIBUTES")
    # A headers Secret is optional; no endpoint renders none of it.
    env = env_of(container(render({"otel": {"endpoint": "http://collector:4318"}})))
    assert "OTEL_EXPORTER_OTLP_HEADERS" not in env and "OTEL_EXPORTER_OTLP_PROTOCOL" not in env
    assert not [n for n in env_of(container(render({"otel": {"headersSecret": {"name": "x"}}}))) if "OTEL" in n]


def test_extra_env_and_env_from():
    values = COMBINATIONS["env"]
    c = container(render(values))
    assert c["env"][-2:] == values["extraEnv"]
    assert c["envFrom"] == values["envFrom"]


def test_migrations_from_values_are_mounted_from_a_configmap():
    values = COMBINATIONS["job-configMap"]
    docs = render(values)
    config_map, pod, c = only(docs, "ConfigMap"), pod_spec(docs), container(docs)
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/migrations"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])["configMap"]
    assert volume["name"] == config_map["metadata"]["name"]
    files = {item["path"]: config_map["data"][item["key"]] for item in volume["items"]}
    assert files == values["migrations"]["files"]
    assert env_of(c)["ALEMBIC_CONFIG"] == "/migrations/alembic.ini"


def test_migrations_from_a_volume():
    docs = render(COMBINATIONS["volume"])
    c = container(docs)
    assert env_of(c)["ALEMBIC_CONFIG"] == "/srv/migrations/alembic.ini"
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/srv/migrations"]
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"] == {"claimName": "migrations", "readOnly": True}


# -- bad values ----------------------------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    ({"bogus": 1}, "additional properties 'bogus' not allowed"),
    ({"database": {"urll": URL}}, "additional properties 'urll' not allowed"),
    ({"config": {"waitTimeout": "soon"}}, "/config/waitTimeout"),
    ({"job": {"backoffLimit": "3"}}, "/job/backoffLimit"),
    ({"mode": "helm"}, "/mode"),
    ({"config": {"logFormat": "xml"}}, "/config/logFormat"),
    ({"database": {"url": "mysql://u@h/db"}}, "/database/url"),
    ({"database": {"passwordFile": "vault/db-password"}}, "/database/passwordFile"),
    ({"config": {"passwordCommandTimeout": 0}}, "/config/passwordCommandTimeout"),
])
def test_schema_refuses_bad_values(values, message):
    assert message in render_error(values)
    with helm.Chart.load(CHART) as loaded, pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        loaded.validate_schema(deep_merge(BASE, values))


@pytest.mark.parametrize("values, message", [
    ({"database": {"url": ""}}, "set database.existingSecret"),
    ({"database": {"url": "", "existingSecret": "db", "existingSecretKey": ""}}, "database.existingSecretKey is empty"),
    ({"extraEnv": [{"name": "DATABASE_URL", "value": URL}]}, "extraEnv must not set DATABASE_URL"),
    ({"database": {"url": "postgresql://app@db/app", "passwordFile": "/vault/db"}, "config": {"passwordCommand": "x"}},
     "database.passwordFile and config.passwordCommand are both set"),
    ({"database": {"passwordFile": "/vault/db"}}, "database.url holds a password"),
    ({"config": {"passwordCommand": "gcloud sql generate-login-token"}}, "database.url holds a password"),
    ({"migrations": {"source": "configMap"}}, "neither migrations.files nor migrations.existingConfigMap"),
    ({"migrations": {"source": "configMap", "files": {"env.py": ""}}}, "no \"alembic.ini\""),
    ({"migrations": {"source": "volume"}}, "migrations.volume is empty"),
])
def test_templates_refuse_values_that_cannot_work(values, message):
    assert message in render_error(values)


def test_defaults_alone_ask_for_a_database():
    assert "set database.existingSecret" in render_error({}, chart_values_base=None)


# -- the init container template and the example parent chart ---------------------------
def test_parent_chart_runs_the_runner_as_an_init_container():
    docs = render(chart=PARENT)
    assert kinds(docs) == ["Deployment"]  # the subchart's Job is off, the Secret exists already
    for doc in render(chart=PARENT, tests=True):
        validate(doc)
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["name"] == CONTAINER and init["image"] == "example/app-migrations:1.0.0"
    assert init["args"] == ["upgrade"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    env = env_of(init)
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in init["volumeMounts"]:
        assert mount["name"] in volumes
    (secret,) = [v["secret"] for v in volumes.values() if "secret" in v]
    assert secret["secretName"] == "app-database"
    assert env["DATABASE_URL_FILE"].endswith("/url")


def test_parent_chart_with_the_hook_job_waits_for_the_heads_in_its_pods():
    docs = render({"migrationRunner": {"job": {"enabled": True}}}, chart=PARENT)
    assert sorted(kinds(docs)) == ["Deployment", "Job", "ServiceAccount"]
    for doc in render({"migrationRunner": {"job": {"enabled": True}}}, chart=PARENT, tests=True):
        validate(doc)
    job = only(docs, "Job")
    assert "pre-install" in job["metadata"]["annotations"]["helm.sh/hook"]
    (init,) = only(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"]
    assert init["name"] == "wait-for-migrations" and init["args"] == ["wait"]
    assert env_of(init)["DATABASE_URL_FILE"].endswith("/url")


def test_parent_chart_can_override_the_init_containers_command(tmp_path):
    parent = tmp_path / "helm-parent"
    shutil.copytree(PARENT, parent, symlinks=False)
    (parent / "templates" / "deployment.yaml").unlink()
    (parent / "templates" / "pod.yaml").write_text("""\
apiVersion: v1
kind: Pod
metadata:
  name: {{ .Release.Name }}-wait
  labels:
    app.kubernetes.io/name: app
spec:
  initContainers:
    {{- include "migration-runner.initContainer" (dict "chart" (index .Subcharts "migrationRunner") "name" "wait-for-heads" "args" (list "wait") "command" (list "/opt/venv/bin/migration-runner")) | nindent 4 }}
  containers:
    - name: app
      image: example/app:1.0.0
  volumes:
    {{- include "migration-runner.volumes" (dict "chart" (index .Subcharts "migrationRunner")) | nindent 4 }}
""")
    docs = render({"migrationRunner": {"config": {"waitTimeout": 5}}}, chart=parent, tests=True)
    (pod,) = [d for d in docs if d["kind"] == "Pod" and d["metadata"]["name"] == "shop-wait"]
    validate(pod)
    (init,) = pod["spec"]["initContainers"]
    assert init["name"] == "wait-for-heads"
    assert init["command"] == ["/opt/venv/bin/migration-runner"] and init["args"] == ["wait"]
    assert env_of(init)["MIGRATE_WAIT_TIMEOUT"] == "5"


# -- executing what the chart renders -------------------------------------------------------
def dockerfile_facts() -> dict:
    """ENTRYPOINT, WORKDIR and ALEMBIC_CONFIG of the image, read from the Dockerfile."""
    text = (ROOT / "Dockerfile").read_text()
    entrypoint = json.loads(re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)[-1])
    workdir = re.findall(r"^WORKDIR\s+(\S+)\s*$", text, re.M)[-1]
    alembic_config = re.findall(r"\bALEMBIC_CONFIG=(\S+)", text)[-1]
    return {"entrypoint": entrypoint, "workdir": workdir, "alembic_config": alembic_config}


def materialize(docs: list[dict], root: Path, job: dict | None = None) -> dict[str, Path]:
    """Write every volume the Job's container mounts under root; return mountPath -> local dir."""
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    volumes = {v["name"]: v for v in pod_spec(docs, job)["volumes"]}
    paths = {}
    for mount in container(docs, job)["volumeMounts"]:
        volume = volumes[mount["name"]]
        local = root / mount["mountPath"].strip("/")
        local.mkdir(parents=True, exist_ok=True)
        if "secret" in volume:
            secret = by_name[("Secret", volume["secret"]["secretName"])]
            for item in volume["secret"]["items"]:
                (local / item["path"]).write_bytes(base64.b64decode(secret["data"][item["key"]]))
        elif "configMap" in volume:
            config_map = by_name[("ConfigMap", volume["configMap"]["name"])]
            for item in volume["configMap"]["items"]:
                target = local / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(config_map["data"][item["key"]])
        else:
            assert "emptyDir" in volume, volume
        paths[mount["mountPath"].rstrip("/")] = local
    return paths


def remap(value: str, paths: dict[str, Path]) -> str:
    for mount in sorted(paths, key=len, reverse=True):
        if value == mount or value.startswith(mount + "/"):
            return str(paths[mount]) + value[len(mount):]
    return value


def run_rendered_job(docs: list[dict], root: Path, image_dirs: dict[str, Path], job: dict | None = None):
    """Run the rendered container (the migration Job's, or job's) the way the kubelet would, with the console
    script as the image."""
    image = dockerfile_facts()
    c = container(docs, job)
    paths = materialize(docs, root, job) | {k.rstrip("/"): v for k, v in image_dirs.items()}
    env = {k: v for k, v in runner_env().items() if not k.startswith("MIGRATE_")}
    env["ALEMBIC_CONFIG"] = remap(image["alembic_config"], paths)  # the image's ENV
    for item in c["env"]:
        assert "value" in item, item
        env[item["name"]] = remap(item["value"], paths)
    command = c.get("command") or image["entrypoint"]
    assert Path(command[0]).name == "migration-runner", command
    args = c.get("args", [])
    workdir = remap(c.get("workingDir", image["workdir"]), paths)
    result = run_runner(env, *args, cwd=Path(workdir))
    assert Path(RUNNER).name == "migration-runner"
    return result, env


def example_files() -> dict[str, str]:
    return {str(p.relative_to(EXAMPLE)): p.read_text() for p in sorted(EXAMPLE.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.parametrize("mode", ["hook", "job"])
@pytest.mark.parametrize("source", ["image", "configMap"])
def test_rendered_job_migrates_the_database_to_heads(database_url, tmp_path, mode, source):
    values = {"mode": mode, "database": {"url": database_url},
              "config": {"waitTimeout": 10, "lockTimeout": 30, "applicationName": "helm-test"}}
    if source == "configMap":
        values["migrations"] = {"source": "configMap", "files": example_files()}
    docs = render(values)
    for doc in docs:
        validate(doc)
    # The image's migrations (WORKDIR /app) are the example project.
    result, env = run_rendered_job(docs, tmp_path / "root", {dockerfile_facts()["workdir"]: EXAMPLE})
    assert result.returncode == 0, result
    assert version_rows(database_url) == ["0003"]
    assert "DATABASE_URL" not in env and Path(env["DATABASE_URL_FILE"]).read_text() == database_url
    if source == "configMap":
        assert env["ALEMBIC_CONFIG"] == str(tmp_path / "root" / "migrations" / "alembic.ini")
    else:
        assert env["ALEMBIC_CONFIG"] == str(EXAMPLE / "alembic.ini")
    assert result.records[-1]["level"] in ("info", "INFO"), result.records[-1]
    password = database_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    assert password not in result.output
    # A second run of the same Job is a no-op that succeeds.
    again, _ = run_rendered_job(docs, tmp_path / "again", {dockerfile_facts()["workdir"]: EXAMPLE})
    assert again.returncode == 0, again
    assert version_rows(database_url) == ["0003"]


@pytest.mark.parametrize("source", ["passwordFile", "passwordCommand"])
def test_rendered_job_takes_a_rotating_password_from_a_file_or_a_command(postgres, database, tmp_path, source):
    """The URL without a password; each login reads database.passwordFile or runs config.passwordCommand."""
    bare = postgres.url(database, RUNNER_ROLE, "").replace(":@", "@")
    values = {"database": {"url": bare}, "config": {"waitTimeout": 10}}
    if source == "passwordFile":
        # A volume shared with what rotates the file (a Vault agent), pre-filled where the pod's volume lands.
        values["database"]["passwordFile"] = "/vault/secrets/db-password"
        values["extraVolumes"] = [{"name": "vault-secrets", "emptyDir": {"medium": "Memory"}}]
        values["extraVolumeMounts"] = [{"name": "vault-secrets", "mountPath": "/vault/secrets", "readOnly": True}]
        secret = tmp_path / "root" / "vault" / "secrets" / "db-password"
    else:  # a token CLI, as the README's examples run one: each call prints the password
        secret = tmp_path / "db-password"
        # Through env(1): a command starting with this checkout's path would be taken for a path in the pod
        # (by remap) when the checkout is under /tmp, where the Job mounts an emptyDir.
        values["config"]["passwordCommand"] = (f"env {sys.executable} -c 'import sys; print(open(sys.argv[1])"
                                               f".read().strip())' {secret}")
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text(RUNNER_PASSWORD + "\n")
    docs = render(values)
    for doc in docs:
        validate(doc)
    result, env = run_rendered_job(docs, tmp_path / "root", {dockerfile_facts()["workdir"]: EXAMPLE})
    assert result.returncode == 0, result
    assert version_rows(postgres.url(database, RUNNER_ROLE, RUNNER_PASSWORD)) == ["0003"]
    assert {"passwordFile": "DATABASE_PASSWORD_FILE", "passwordCommand": "MIGRATE_PASSWORD_COMMAND"}[source] in env
    assert RUNNER_PASSWORD not in result.output


def test_rendered_job_fails_at_once_on_a_configuration_error(database_url, tmp_path):
    """A wrong ALEMBIC_CONFIG exits with a code the podFailurePolicy fails the Job on."""
    docs = render({"database": {"url": database_url}, "migrations": {"alembicConfig": "/app/nope.ini"}})
    result, _ = run_rendered_job(docs, tmp_path / "root", {"/app": EXAMPLE})
    rules = only(docs, "Job")["spec"]["podFailurePolicy"]["rules"]
    assert result.returncode != 0
    assert result.returncode in rules[0]["onExitCodes"]["values"], result
    assert version_rows(database_url) == []


# -- documentation ------------------------------------------------------------------------------
def values_table_module():
    import runpy
    return runpy.run_path(str(ROOT / "helm" / "values-table.py"), run_name="values_table")


def leaf_paths(value, prefix=""):
    if isinstance(value, dict) and value:
        for key, child in value.items():
            yield from leaf_paths(child, f"{prefix}{key}.")
    else:
        yield prefix.rstrip(".")


def test_every_value_has_a_comment_and_a_row_in_the_readme():
    module = values_table_module()
    rows = module["documented"]()
    paths = [path for path, _, _ in rows]
    assert len(paths) == len(set(paths))
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for leaf in leaf_paths(defaults):
        assert any(leaf == p or leaf.startswith(p + ".") for p in paths), f"{leaf} has no '# --' comment"
    readme = (CHART / "README.md").read_text()
    assert readme == module["readme_with_table"](readme), "chart README's table is stale: run helm/values-table.py"
    for path in paths:
        assert f"| `{path}` |" in readme
    # The schema knows every value, and nothing else, at the top level.
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(defaults) <= set(schema["properties"]) and schema["additionalProperties"] is False


def test_readme_explains_installation_and_failure_per_mode():
    readme = (CHART / "README.md").read_text()
    for needle in ("helm upgrade --install", "argoproj.io/v1alpha1", "--timeout", "| `hook` (default)", "| `argocd` |",
                   "| `job` |", "migration-runner.initContainer"):
        assert needle in readme, needle


# -- the same, inside the built image (when buildah can build it here) --------------------------
@pytest.fixture(scope="module")
def runner_image():
    from . import image

    reason = image.buildah_available()
    if reason:
        pytest.skip(reason)
    return image.build_runner_image()


def inside(root: Path, path: str) -> Path:
    """path within a container rootfs at root, resolving the rootfs's own symlinks (/var/run -> /run)."""
    current = root
    for part in Path(path).relative_to("/").parts:
        candidate = current / part
        if candidate.is_symlink():
            target = Path(candidate.readlink())
            candidate = inside(root, str(target)) if target.is_absolute() else current / target
        current = candidate
    return current


@pytest.mark.slow
def test_rendered_job_migrates_inside_the_image(runner_image, database_url, tmp_path):
    """The rendered container in the real image: its user, read-only root, mounts, env, entrypoint."""
    from . import image

    values = {"mode": "job", "database": {"url": database_url}, "config": {"waitTimeout": 10},
              "migrations": {"source": "configMap", "files": example_files()}}
    docs = render(values)
    c, pod = container(docs), pod_spec(docs)
    local = materialize(docs, tmp_path / "root")
    for path in [tmp_path / "root", *(tmp_path / "root").rglob("*")]:
        path.chmod(0o1777 if path.is_dir() else 0o444)  # what the kubelet's fsGroup/defaultMode would allow
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    with image.Container(runner_image) as box:
        extra = ["--user", f"{sc['runAsUser']}:{sc['runAsGroup']}"]
        for mount in c["volumeMounts"]:
            inside(box.mountpoint, mount["mountPath"]).mkdir(parents=True, exist_ok=True)
            mode = "ro" if mount.get("readOnly") else "rw"
            extra += ["-v", f"{local[mount['mountPath'].rstrip('/')]}:{mount['mountPath']}:{mode}"]
        command = (c.get("command") or box.entrypoint()) + c.get("args", [])
        env = {item["name"]: item["value"] for item in c["env"]}
        with image.read_only_rootfs(box):
            proc = box.run(command, env=env, extra=extra, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert version_rows(database_url) == ["0003"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def downgrade_options() -> dict:
    """The --set options of the chart README's downgrade recipe, read from it."""
    readme = (CHART / "README.md").read_text()
    recipe = re.search(r"helm template shop .*?> downgrade\.yaml", readme.split("## Rollbacks", 1)[1], re.S).group(0)
    values = {}
    for option in re.findall(r"--set '?([^ ']+)'?", recipe):
        key, value = option.split("=", 1)
        if value.startswith("{"):
            value = value.strip("{}").split(",")
        elif value in ("true", "false"):
            value = value == "true"
        node = values
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return values


@pytest.mark.parametrize("service_account", [{}, {"name": "migrator"}, {"create": False, "name": "migrator"}])
def test_the_documented_downgrade_job_renders_as_ordinary_resources_with_its_own_name(service_account):
    """Chart README "Rollbacks": the newer release's values, mode job, a fullnameOverride, args downgrade."""
    newer = {"image": {"repository": "registry.example/app", "tag": "2.0"}, "serviceAccount": service_account}
    release = set()
    for mode in ("hook", "argocd", "job"):
        release |= {(d["kind"], d["metadata"]["name"]) for d in render(deep_merge(newer, {"mode": mode}), tests=True)}
    options = downgrade_options()
    assert options["mode"] == "job" and options["fullnameOverride"] == "shop-downgrade"
    assert options["args"] == ["downgrade", "0004"]
    docs = render(deep_merge(newer, options))
    for doc in docs:
        validate(doc)
        assert not any(key.startswith(("helm.sh/hook", "argocd.argoproj.io")) for key in annotations(doc)), doc
        # kubectl delete -f downgrade.yaml deletes each of these: none may be the release's.
        assert (doc["kind"], doc["metadata"]["name"]) not in release, doc["metadata"]
    job = only(docs, "Job")
    assert container(docs)["args"] == ["downgrade", "0004"]
    assert env_of(container(docs))["MIGRATE_IMAGE"] == "registry.example/app:2.0"
    assert job["spec"]["podFailurePolicy"]
    assert kinds(docs) == ["Job", "Secret"]
    assert pod_spec(docs)["serviceAccountName"] == service_account.get("name", "default")


def test_the_image_is_recorded_only_when_it_holds_the_migrations():
    assert "MIGRATE_IMAGE" in env_of(container(render()))
    assert "MIGRATE_IMAGE" not in env_of(container(render(COMBINATIONS["volume"])))


# -- names, hashes and the Secret the application's pods mount (issue #13) ------------------------------
def parent_with_alias(tmp_path: Path, alias: str) -> Path:
    """The example parent chart with another dependency alias."""
    parent = tmp_path / "parent"
    shutil.copytree(PARENT, parent, symlinks=False)
    for path in [parent / "Chart.yaml", parent / "values.yaml", *(parent / "templates").glob("*.yaml")]:
        path.write_text(path.read_text().replace("migrationRunner", alias))
    return parent


@pytest.mark.parametrize("alias", ["migrationRunner", "DB_migrationRunner"])
@pytest.mark.parametrize("mode", ["hook", "argocd", "job"])
def test_every_name_is_rfc_1123_under_an_alias(tmp_path, alias, mode):
    """Helm makes .Chart.Name the alias: camelCase must not reach a resource name."""
    parent = parent_with_alias(tmp_path, alias)
    values = {alias: {"mode": mode, "job": {"enabled": True}, "networkPolicy": {"enabled": True},
                      "database": {"existingSecret": "", "url": URL},
                      "migrations": {"source": "configMap", "files": {"alembic.ini": "[alembic]\n"}}}}
    docs = render(values, chart=parent, tests=True)
    assert "Job" in kinds(docs)
    for doc in docs:
        validate(doc)
        assert not re.search("[A-Z_]", doc["metadata"]["name"]), doc["metadata"]["name"]
    assert only(docs, "Job")["metadata"]["name"].startswith("shop-")


def test_parent_chart_validates_with_its_condition_on_and_off():
    for enabled in (True, False):
        docs = render({"migrationRunner": {"enabled": enabled}}, chart=PARENT, tests=True)
        for doc in docs:
            validate(doc)
        assert ("initContainers" in only(docs, "Deployment")["spec"]["template"]["spec"]) is enabled


def test_names_stay_valid_whatever_the_overrides():
    for values in ({"fullnameOverride": "Shop_DB.Migrate-"}, {"nameOverride": "MigrationRunner"},
                   {"fullnameOverride": "x" * 80, "mode": "job"}, {"fullnameOverride": "-" + "y" * 70 + "-"},
                   {"fullnameOverride": "a" * 61 + "_b", "mode": "job", "job": {"nameSuffixOverride": "v1"}}):
        docs = render(deep_merge(values, {"networkPolicy": {"enabled": True},
                                          "migrations": {"source": "configMap", "files": {"alembic.ini": ""}}}),
                      tests=True)
        names = [d["metadata"]["name"] for d in docs]
        for name in names:
            assert RFC1123_LABEL.fullmatch(name), (values, name)
        assert len(set((d["kind"], d["metadata"]["name"]) for d in docs)) == len(docs), names
    assert "MigrationRunner" not in json.dumps(render({"nameOverride": "MigrationRunner"}))
    assert only(render({"nameOverride": "MigrationRunner"}), "Job")["metadata"]["name"] == "shop-migration-runner"
    assert "nameOverride has no letter" in render_error({"nameOverride": "__"})


# Every setting of the Job's pod: a Job's pod template is immutable, so each must change the name in mode job.
POD_SETTINGS = {
    "tolerations": {"tolerations": [{"key": "k", "operator": "Exists"}]},
    "nodeSelector": {"nodeSelector": {"pool": "batch"}},
    "affinity": {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "preference": {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]}}]}}},
    "podLabels": {"podLabels": {"team": "db"}},
    "podAnnotations": {"podAnnotations": {"example.com/x": "y"}},
    "imagePullSecrets": {"imagePullSecrets": [{"name": "regcred"}]},
    "global.imagePullSecrets": {"global": {"imagePullSecrets": ["regcred"]}},
    "podSecurityContext": {"podSecurityContext": {"fsGroup": 20002}},
    "priorityClassName": {"priorityClassName": "low"},
    "serviceAccount.name": {"serviceAccount": {"name": "migrator"}},
    "disableIstioSidecar": {"disableIstioSidecar": False},
    "tmpSizeLimit": {"tmpSizeLimit": "128Mi"},
    "job.podFailurePolicy": {"job": {"podFailurePolicy": False}},
    "job.backoffLimit": {"job": {"backoffLimit": 1}},
    "job.activeDeadlineSeconds": {"job": {"activeDeadlineSeconds": 60}},
    "resources": {"resources": {"limits": {"memory": "1Gi"}}},
    "extraEnv": {"extraEnv": [{"name": "TZ", "value": "UTC"}]},
    "initContainers": {"initContainers": [{"name": "proxy", "image": "proxy:1", "restartPolicy": "Always"}]},
    "sidecars": {"sidecars": [{"name": "proxy", "image": "proxy:1"}]},
    "extraVolumes": {"extraVolumes": [{"name": "ca", "secret": {"secretName": "ca"}}],
                     "extraVolumeMounts": [{"name": "ca", "mountPath": "/ca"}]},
    "automountServiceAccountToken": {"automountServiceAccountToken": True},
    "terminationGracePeriodSeconds": {"terminationGracePeriodSeconds": 5},
    "topologySpreadConstraints": {"topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}]},
    "commonLabels": {"commonLabels": {"team": "db"}},
    "image.registry": {"image": {"registry": "registry.example.com"}},
    "openshift": {"global": {"compatibility": {"openshift": {"adaptSecurityContext": "force"}}}},
    "config.quitUrls": {"config": {"quitUrls": "http://127.0.0.1:15020/quitquitquit"}},
    "migrations.files": {"migrations": {"source": "configMap", "files": {"alembic.ini": "[alembic]\n"}}},
    "database host": {"database": {"url": URL.replace("db.example.internal", "db2.example.internal")}},
}


def test_job_mode_name_changes_with_every_setting_of_the_job_and_never_with_a_secret():
    base = job_name({})
    names = {setting: job_name(values) for setting, values in POD_SETTINGS.items()}
    unchanged = [setting for setting, name in names.items() if name == base]
    assert not unchanged, f"these settings change the Job's spec but not its name: {unchanged}"
    # The name never depends on a secret: anyone who can list Jobs could test password guesses against it.
    for url in (URL.replace("s3cret", "0ther"), URL.replace("app:s3cret", "admin:0ther"),
                URL.replace("s3cret", "s3/cr@t")):
        assert job_name({"database": {"url": url}}) == base, url
    assert job_name({"database": {"url": URL + "?sslmode=require&password=x"}}) == \
        job_name({"database": {"url": URL.replace("s3cret", "y") + "?sslmode=require&password=y"}})
    # job.nameSuffixOverride: GitLab's escape hatch, a fixed suffix instead of the hash.
    assert job_name({"job": {"nameSuffixOverride": "v1-4-0"}}) == "shop-migration-runner-v1-4-0"
    # Hook modes keep a fixed name: Helm and Argo CD delete the old Job first.
    assert only(render({"tolerations": [{"key": "k", "operator": "Exists"}]}), "Job")["metadata"]["name"] == \
        "shop-migration-runner"


@pytest.mark.parametrize("mode", ["hook", "argocd", "job"])
@pytest.mark.parametrize("source", ["image", "configMap"])
def test_application_pods_never_mount_a_hook_deleted_secret_or_configmap(mode, source):
    """The parent's wait container still finds its Secret (and ConfigMap) after the hook Job succeeded."""
    values = {"migrationRunner": {"mode": mode, "job": {"enabled": True},
                                  "database": {"existingSecret": "", "url": URL}}}
    if source == "configMap":
        values["migrationRunner"]["migrations"] = {"source": "configMap", "files": {"alembic.ini": "[alembic]\n"}}
    docs = render(values, chart=PARENT, tests=True)
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    pods = [only(docs, "Deployment")["spec"]["template"]["spec"]]
    pods += [d["spec"] for d in docs if d["kind"] == "Pod"]  # the helm test pod runs after the hooks too
    (init,) = pods[0]["initContainers"]
    assert init["name"] == "wait-for-migrations"
    for pod in pods:
        for kind in ("Secret", "ConfigMap") if source == "configMap" else ("Secret",):
            found = mounted(docs, kind, pod)
            assert not any(k.startswith(("helm.sh/hook", "argocd.argoproj.io/hook")) for k in annotations(found)), \
                (kind, found["metadata"])
    # The Job itself mounts what exists before it runs: in the hook modes a hook with a lower weight.
    job_secret = mounted(docs, "Secret")
    if mode == "job":
        assert annotations(job_secret) == {}
    else:
        assert annotations(job_secret), job_secret["metadata"]
        assert by_name[("Secret", job_secret["metadata"]["name"])]["data"]["url"] == \
            base64.b64encode(URL.encode()).decode()


def test_wait_container_takes_the_callers_name_and_args(tmp_path):
    parent = tmp_path / "helm-parent"
    shutil.copytree(PARENT, parent, symlinks=False)
    deployment = parent / "templates" / "deployment.yaml"
    deployment.write_text(deployment.read_text().replace(
        '"migration-runner.waitContainer" (dict "chart" $runner)',
        '"migration-runner.waitContainer" (dict "chart" $runner "name" "schema-ready" "args" (list "check"))'))
    docs = render({"migrationRunner": {"job": {"enabled": True}}}, chart=parent)
    (init,) = only(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"]
    assert (init["name"], init["args"]) == ("schema-ready", ["check"])


# -- values schema ---------------------------------------------------------------------------------
def test_schema_accepts_a_parents_condition_and_refuses_unknown_keys():
    with helm.Chart.load(CHART) as loaded:
        loaded.validate_schema(deep_merge(BASE, {"enabled": False}))
        with pytest.raises(helm.HelmValuesError, match="'enabled2' not allowed"):
            loaded.validate_schema(deep_merge(BASE, {"enabled2": False}))
    assert only(render({"enabled": True}), "Job")


@pytest.mark.parametrize("values, message", [
    ({"hook": {"deletePolicy": "hook-succeeded"}}, "/hook/deletePolicy"),
    ({"hook": {"deletePolicy": ""}}, "/hook/deletePolicy"),
    ({"serviceAccount": {"name": "Migrator"}}, "/serviceAccount/name"),
    ({"job": {"nameSuffixOverride": ["v1"]}}, "/job/nameSuffixOverride"),
    ({"config": {"quitUrls": "127.0.0.1:15020"}}, "/config/quitUrls"),
    ({"sidecars": [{"image": "x"}]}, "/sidecars/0"),
    ({"global": {"compatibility": {"openshift": {"adaptSecurityContext": "yes"}}}}, "adaptSecurityContext"),
])
def test_schema_refuses_bad_new_values(values, message):
    assert message in render_error(values)


def test_schema_has_a_description_for_every_value_and_is_current():
    module = values_table_module()
    schema_text = (CHART / "values.schema.json").read_text()
    assert schema_text == module["schema_text"](schema_text), "run helm/values-table.py"
    schema = json.loads(schema_text)
    for path, _, _ in module["documented"]():
        node = schema
        for key in path.split("."):
            node = node["properties"][key]
        assert node.get("description"), path


# -- extension points ------------------------------------------------------------------------------
def test_extension_points_reach_the_pod():
    values = COMBINATIONS["extensions"]
    docs = render(values, tests=True)
    job, pod, c = only(docs, "Job"), pod_spec(docs), container(docs)
    assert c["image"] == "registry.example.com/shop/migrations:1.4.0"
    assert env_of(c)["MIGRATE_IMAGE"] == c["image"]
    assert container(render(deep_merge(values, {"global": {"imageRegistry": "mirror.example"}})))["image"] == \
        "mirror.example/shop/migrations:1.4.0"
    assert pod["imagePullSecrets"] == [{"name": "global-regcred"}, {"name": "regcred"}]
    assert pod["automountServiceAccountToken"] is True and pod["terminationGracePeriodSeconds"] == 120
    assert pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"] == {"app.kubernetes.io/instance": "shop"}
    assert {"name": "pg-ca", "secret": {"secretName": "pg-ca"}} in pod["volumes"]
    assert {"name": "pg-ca", "mountPath": "/etc/pg-ca", "readOnly": True} in c["volumeMounts"]
    assert c["envFrom"] == [{"configMapRef": {"name": "pg-settings"}}]
    # The native sidecar comes before the runner, and the runner is the only ordinary container.
    assert [i["name"] for i in pod["initContainers"]] == ["cloud-sql-proxy"]
    assert pod["initContainers"][0]["restartPolicy"] == "Always"
    assert [x["name"] for x in pod["containers"]] == [CONTAINER]
    for doc in docs:
        assert doc["metadata"]["labels"]["team"] == "db", doc["kind"]
        assert annotations(doc)["example.com/owner"] == "db", doc["kind"]
    assert job["spec"]["template"]["metadata"]["labels"]["team"] == "db"
    # The hook annotations win over commonAnnotations.
    assert annotations(job)["helm.sh/hook"] == "pre-install,pre-upgrade"


def test_sidecars_stop_through_the_quit_urls():
    values = COMBINATIONS["sidecars"]
    docs = render(values)
    pod = pod_spec(docs)
    assert [x["name"] for x in pod["containers"]] == [CONTAINER, "istio-proxy"]
    assert env_of(container(docs))["MIGRATE_QUIT_URLS"] == "http://127.0.0.1:15020/quitquitquit"
    urls = ["http://127.0.0.1:15020/quitquitquit", "http://127.0.0.1:9091/quitquitquit"]
    assert env_of(container(render({"config": {"quitUrls": urls}})))["MIGRATE_QUIT_URLS"] == ",".join(urls)
    assert "MIGRATE_QUIT_URLS" not in env_of(container(render()))
    assert "config.quitUrls is empty" in notes({"sidecars": values["sidecars"]})
    assert "http://127.0.0.1:15020/quitquitquit" in notes(values)


def test_openshift_drops_the_fixed_uid_and_gid():
    for docs in (render(COMBINATIONS["openshift"], tests=True),):
        for spec in [pod_spec(docs)] + [d["spec"] for d in docs if d["kind"] == "Pod"]:
            for sc in [spec["securityContext"]] + [x["securityContext"] for x in spec["containers"]]:
                assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(sc), sc
                assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container(render())["securityContext"]["runAsUser"] == 10001  # "auto" off OpenShift


def selects(policy: dict, labels: dict) -> bool:
    """Whether the NetworkPolicy's podSelector selects a pod with these labels."""
    selector = policy["spec"]["podSelector"]
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


@pytest.mark.parametrize("mode", ["hook", "argocd", "job"])
def test_network_policy_allows_dns_and_the_database_only(mode):
    docs = render({"mode": mode, "networkPolicy": {"enabled": True, "databasePort": 6432}})
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert len(policies) == (1 if mode == "job" else 2)
    template_labels = only(docs, "Job")["spec"]["template"]["metadata"]["labels"]
    for policy in policies:
        validate(policy)
        assert selects(policy, template_labels)
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in policy["spec"]
        ports = sorted((p["port"], p["protocol"]) for rule in policy["spec"]["egress"] for p in rule["ports"])
        assert ports == [(53, "TCP"), (53, "UDP"), (6432, "TCP")]
    (ordinary,) = [p for p in policies if not annotations(p)]
    assert ordinary["metadata"]["name"] == "shop-migration-runner-pods"
    if mode != "job":
        (hook,) = [p for p in policies if annotations(p)]
        assert hook["metadata"]["name"] == "shop-migration-runner"  # chart 0.2.0's hook: replaced, never adopted
        if mode == "hook":
            assert int(annotations(hook)["helm.sh/hook-weight"]) < \
                int(annotations(only(docs, "Job"))["helm.sh/hook-weight"])
        else:
            assert annotations(hook)["argocd.argoproj.io/hook"] == "PreSync"
    assert "NetworkPolicy" not in kinds(render({"mode": mode}))


def test_helm_test_pod_checks_the_heads_with_the_ordinary_secret():
    docs = render(tests=True)
    (pod,) = [d for d in docs if d["kind"] == "Pod"]
    validate(pod)
    assert annotations(pod)["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    assert c["args"] == ["check"] and c["image"] == container(docs)["image"]
    assert not any(k.startswith("helm.sh/hook") for k in annotations(mounted(docs, "Secret", pod["spec"])))
    assert "Pod" not in kinds(render({"mode": "job"}, tests=True))
    assert "Pod" not in kinds(render({"tests": {"enabled": False}}, tests=True))


def test_notes_are_true_for_the_settings():
    assert "fail the Job at once" not in notes({"job": {"podFailurePolicy": False}})
    assert "job.podFailurePolicy is off" in notes({"job": {"podFailurePolicy": False}})
    assert "helm test" in notes() and "helm test" not in notes({"tests": {"enabled": False}})
    assert "--timeout" not in notes({"mode": "job", "job": {"activeDeadlineSeconds": None}})
    assert "logs are gone" in notes({"hook": {"deletePolicy": "before-hook-creation,hook-succeeded,hook-failed"}})


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for key in ("maintainers", "kubeVersion", "description", "keywords"):
        assert chart.get(key), key
    # No invented address: home, sources and icon wait for the project's public one.
    assert not {"home", "sources", "icon"} & set(chart)


def test_readme_has_a_section_per_deployment_tool_and_proxy():
    readme = (CHART / "README.md").read_text()
    for needle in ("### Helm hooks", "`--wait` and `--atomic`", "### Argo CD", "### Flux", "HelmRelease",
                   "disableHooks", "### Plain kubectl", "### Istio with sidecars", "### Istio native sidecars",
                   "### Cloud SQL Auth Proxy, as a native sidecar", "restartPolicy: Always",
                   "### Cloud SQL Auth Proxy without native sidecars", "quitquitquit", "**OpenShift**",
                   "STRICT", "created by the same release"):
        assert needle in readme, needle


@pytest.mark.parametrize("heading", ["### Helm hooks", "### Argo CD (mode", "### Istio with sidecars",
                                     "### Cloud SQL Auth Proxy, as a native sidecar",
                                     "### Cloud SQL Auth Proxy without native sidecars"])
def test_readme_values_render_valid_manifests(heading):
    """The values the README shows for each tool and proxy render objects valid on every supported Kubernetes."""
    readme = (CHART / "README.md").read_text()
    section = readme.split(heading, 1)[1]
    values = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    docs = render(values, tests=True)
    for doc in docs:
        validate(doc)
    assert "Job" in kinds(docs)


def test_readme_proven_baseline_values_set_both_variables():
    """Chart README "A legacy database": the scratch URL comes from the user's Secret, never from a value."""
    readme = (CHART / "README.md").read_text()
    section = readme.split("### A legacy database: the baseline, proven first", 1)[1]
    values = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    docs = render(values)
    for doc in docs:
        validate(doc)
    env = {item["name"]: item for item in container(docs)["env"]}
    assert env["MIGRATE_VERIFY_BASELINE"]["value"] == "true"
    assert env["MIGRATE_BASELINE_REVISION"]["value"] == "0007"
    assert env["MIGRATE_SCRATCH_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "shop-scratch-db",
                                                                                "key": "url"}


# -- review findings: quit URLs, YAML-typed names, upgrades from 0.1.0, nulls, long names -------------------------
QUIT = "http://127.0.0.1:15020/quitquitquit"


@pytest.mark.parametrize("job_enabled", [True, False])
def test_quit_urls_reach_only_the_migration_jobs_runner(job_enabled):
    """The runner POSTs them as every command exits: an application pod's init or wait container, or the helm
    test pod, would stop the pod's own proxy."""
    docs = render({"config": {"quitUrls": QUIT}}, tests=True)
    assert env_of(container(docs))["MIGRATE_QUIT_URLS"] == QUIT
    (pod,) = [d for d in docs if d["kind"] == "Pod"]
    (check,) = pod["spec"]["containers"]
    assert "MIGRATE_QUIT_URLS" not in env_of(check)
    docs = render({"migrationRunner": {"job": {"enabled": job_enabled}, "config": {"quitUrls": [QUIT]}}},
                  chart=PARENT, tests=True)
    (init,) = only(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"]
    assert init["name"] == ("wait-for-migrations" if job_enabled else CONTAINER)
    assert "MIGRATE_QUIT_URLS" not in env_of(init)
    if job_enabled:
        assert env_of(container(docs))["MIGRATE_QUIT_URLS"] == QUIT
    for doc in docs:
        if doc["kind"] in ("Deployment", "Pod"):
            spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                assert "MIGRATE_QUIT_URLS" not in env_of(c), (doc["kind"], c["name"])


@pytest.mark.parametrize("release", ["123", "1e3", "0x1f", "on", "no", "null", "true", "0755", "1-2"])
def test_release_names_that_read_as_other_yaml_types_stay_strings(release):
    values = {"networkPolicy": {"enabled": True}, "migrations": {"source": "configMap", "files": {"alembic.ini": ""}}}
    for mode in ("hook", "job"):
        docs = render(deep_merge(values, {"mode": mode}), name=release, tests=True)
        for doc in docs:
            validate(doc)
            assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == release, doc["metadata"]
        assert only(docs, "Job")["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] == release
        for policy in [d for d in docs if d["kind"] == "NetworkPolicy"]:
            assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == release
    for doc in render({"nameOverride": "123", "fullnameOverride": "456"}, name=release, tests=True):
        validate(doc)
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "123"
    docs = render({"migrationRunner": {"job": {"enabled": True}, "database": {"existingSecret": "", "url": URL}}},
                  chart=PARENT, name=release, tests=True)
    for doc in docs:
        validate(doc)
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == release, doc["metadata"]


# The names chart 0.1.0 gave the Secret and ConfigMap rendered from values: hooks in modes hook and argocd.
OLD_HOOK_NAMES = {("Secret", "shop-migration-runner-database"), ("ConfigMap", "shop-migration-runner-migrations")}


@pytest.mark.parametrize("mode", ["hook", "argocd", "job"])
def test_an_upgrade_from_chart_0_1_0_never_meets_a_leftover_hook_under_an_ordinary_name(mode):
    """A hook Secret or ConfigMap that 0.1.0 left behind is replaced by the new hook copy (before-hook-creation);
    no ordinary resource takes its name, which would fail `helm upgrade` with "invalid ownership metadata"."""
    values = {"mode": mode, "migrations": {"source": "configMap", "files": {"alembic.ini": "[alembic]\n"}}}
    docs = render(values, tests=True)
    ordinary = {(d["kind"], d["metadata"]["name"]) for d in docs
                if not any(k.startswith(("helm.sh/hook", "argocd.argoproj.io/hook")) for k in annotations(d))}
    assert not ordinary & OLD_HOOK_NAMES, ordinary
    assert {("Secret", "shop-migration-runner-db-url"), ("ConfigMap", "shop-migration-runner-migration-files")} <= ordinary
    job_mounts = {("Secret", mounted(docs, "Secret")["metadata"]["name"]),
                  ("ConfigMap", mounted(docs, "ConfigMap")["metadata"]["name"])}
    if mode == "job":
        assert job_mounts <= ordinary
    else:
        assert job_mounts == OLD_HOOK_NAMES
        for kind in ("Secret", "ConfigMap"):
            assert "before-hook-creation" in annotations(mounted(docs, kind)).get(
                "helm.sh/hook-delete-policy", "before-hook-creation")
            assert annotations(mounted(docs, kind)).get("argocd.argoproj.io/hook-delete-policy",
                                                        "BeforeHookCreation") == "BeforeHookCreation"
    for pod in [d["spec"] for d in docs if d["kind"] == "Pod"]:
        assert {(k, mounted(docs, k, pod)["metadata"]["name"]) for k in ("Secret", "ConfigMap")} <= ordinary
    # The application's pods (the parent's init or wait container) mount the ordinary ones.
    for job_enabled in (True, False):
        parent_values = {"migrationRunner": {"mode": mode, "job": {"enabled": job_enabled},
                                             "database": {"existingSecret": "", "url": URL}, **values}}
        parent_docs = render(parent_values, chart=PARENT)
        pod = only(parent_docs, "Deployment")["spec"]["template"]["spec"]
        assert {(k, mounted(parent_docs, k, pod)["metadata"]["name"]) for k in ("Secret", "ConfigMap")} == \
            {("Secret", "shop-migration-runner-db-url"), ("ConfigMap", "shop-migration-runner-migration-files")}


def test_the_chart_version_says_the_names_changed():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == "0.3.0"
    parent = yaml.safe_load((PARENT / "Chart.yaml").read_text())
    (dependency,) = [d for d in parent["dependencies"] if d["name"] == "migration-runner"]
    assert dependency["version"] == chart["version"]
    assert (PARENT / "charts" / "migration-runner" / "Chart.yaml").read_text() == (CHART / "Chart.yaml").read_text()
    readme = (CHART / "README.md").read_text()
    assert f"version: {chart['version']}" in readme
    assert "<fullname>-db-url" in readme and "invalid ownership metadata" in readme
    lock = PARENT / "Chart.lock"
    assert not lock.exists() or "0.1.0" not in lock.read_text()


def test_helm_test_pod_has_the_jobs_init_containers_but_not_its_sidecars():
    values = deep_merge(COMBINATIONS["extensions"], {"sidecars": [{"name": "istio-proxy", "image": "istio/proxyv2:1"}],
                                                     "config": {"quitUrls": QUIT}})
    docs = render(values, tests=True)
    (pod,) = [d for d in docs if d["kind"] == "Pod"]
    validate(pod)
    assert pod["spec"]["initContainers"] == pod_spec(docs)["initContainers"]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["check"]
    assert "MIGRATE_QUIT_URLS" not in env_of(pod["spec"]["containers"][0])
    readme = (CHART / "README.md").read_text()
    for heading in ("**helm test**", "### Cloud SQL Auth Proxy, as a native sidecar",
                    "### Cloud SQL Auth Proxy without native sidecars"):
        section = readme.split(heading, 1)[1].split("\n#", 1)[0]
        assert "tests.enabled" in section, heading


@pytest.mark.parametrize("values, check", [
    ({"mode": "job", "job": {"nameSuffixOverride": "1.4.0"}},
     lambda docs: only(docs, "Job")["metadata"]["name"] == "shop-migration-runner-1-4-0"),
    ({"mode": "job", "job": {"nameSuffixOverride": 140}},
     lambda docs: only(docs, "Job")["metadata"]["name"] == "shop-migration-runner-140"),
    ({"mode": "job", "job": {"nameSuffixOverride": 20240101}},
     lambda docs: only(docs, "Job")["metadata"]["name"] == "shop-migration-runner-20240101"),
    ({"mode": "job", "job": {"nameSuffixOverride": 1.4}},
     lambda docs: only(docs, "Job")["metadata"]["name"] == "shop-migration-runner-1-4"),
    ({"mode": "argocd", "argocd": {"syncWave": "-1"}},
     lambda docs: annotations(only(docs, "Job"))["argocd.argoproj.io/sync-wave"] == "-1"
     and annotations(only(docs, "ServiceAccount"))["argocd.argoproj.io/sync-wave"] == "-2"),
    ({"hook": {"weight": "-1"}},
     lambda docs: annotations(only(docs, "Job"))["helm.sh/hook-weight"] == "-1"
     and annotations(only(docs, "ServiceAccount"))["helm.sh/hook-weight"] == "-2"),
    ({"hook": {"events": "pre-install, pre-upgrade"}},
     lambda docs: annotations(only(docs, "Job"))["helm.sh/hook"] == "pre-install,pre-upgrade"
     and annotations(only(docs, "ServiceAccount"))["helm.sh/hook"] == "pre-install,pre-upgrade"),
    *[({"database": {"url": URL.replace("postgresql://", scheme)}}, lambda docs: True)
      for scheme in ("postgresql+psycopg2://", "postgresql+asyncpg://", "postgresql+pg8000://",
                     "postgresql+psycopg_async://", "postgres://", "postgresql+psycopg://")],
    ({"image": {"tag": 20240101}}, lambda docs: container(docs)["image"] == "migration-runner:20240101"),
    ({"image": {"tag": 2.5}}, lambda docs: container(docs)["image"] == "migration-runner:2.5"),
])
def test_schema_accepts_plausible_values(values, check):
    with helm.Chart.load(CHART) as loaded:
        loaded.validate_schema(deep_merge(BASE, values))
    docs = render(values, tests=True)
    for doc in docs:
        validate(doc)
    assert check(docs), values


def test_the_schema_accepts_every_driver_the_runner_accepts():
    from runner.settings import DRIVERS
    for scheme in DRIVERS:
        docs = render({"database": {"url": URL.replace("postgresql://", scheme + "://")}})
        assert only(docs, "Job")


def test_null_never_turns_into_a_dangerous_default():
    # automountServiceAccountToken: null would let Kubernetes mount the token.
    docs = render({"automountServiceAccountToken": None, "serviceAccount": {"automountServiceAccountToken": None}},
                  tests=True)
    assert pod_spec(docs)["automountServiceAccountToken"] is False
    assert only(docs, "Pod")["spec"]["automountServiceAccountToken"] is False
    assert only(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    # A NetworkPolicy port of null would open every TCP port.
    for policy in [d for d in render({"networkPolicy": {"enabled": True, "databasePort": None}})
                   if d["kind"] == "NetworkPolicy"]:
        validate(policy)
        ports = sorted((p["port"], p["protocol"]) for rule in policy["spec"]["egress"] for p in rule["ports"])
        assert ports == [(53, "TCP"), (53, "UDP"), (5432, "TCP")]
    # Whole objects set to null are refused by the schema, naming the key (not a nil pointer in a template).
    for key in ("config", "tests", "hook", "serviceAccount", "job", "networkPolicy", "image", "migrations"):
        message = render_error({key: None})
        assert f"missing property '{key}'" in message and "nil pointer" not in message, message


def long_names(values: dict, name: str = "shop") -> set[tuple[str, str]]:
    docs = render(deep_merge(values, {"networkPolicy": {"enabled": True},
                                      "migrations": {"source": "configMap", "files": {"alembic.ini": ""}}}),
                  name=name, tests=True)
    for doc in docs:
        validate(doc)
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


def test_names_cut_to_63_characters_keep_a_hash_of_the_whole_name(tmp_path):
    for mode in ("hook", "job"):
        a = long_names({"mode": mode, "fullnameOverride": "a" * 70 + "-one"})
        b = long_names({"mode": mode, "fullnameOverride": "a" * 70 + "-two"})
        assert not a & b, a & b
    # Two aliases of the chart in one parent under a long release name (Helm allows 53 characters).
    parent = tmp_path / "parent"
    shutil.copytree(PARENT, parent, symlinks=False)
    chart_yaml = yaml.safe_load((parent / "Chart.yaml").read_text())
    chart_yaml["dependencies"].append(dict(chart_yaml["dependencies"][0], alias="migrationRunnerTwo",
                                           condition="migrationRunnerTwo.enabled"))
    (parent / "Chart.yaml").write_text(yaml.safe_dump(chart_yaml))
    release = "r" * 53
    runner = {"job": {"enabled": True}, "database": {"existingSecret": "", "url": URL}}
    docs = render({"migrationRunner": runner, "migrationRunnerTwo": runner}, chart=parent, name=release, tests=True)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), names
    assert len([n for n in names if n[0] == "Job"]) == 2
    for doc in docs:
        validate(doc)
    # A name that fits is not touched.
    assert ("Job", "shop-migration-runner") in long_names({})


def test_job_name_hash_ignores_every_query_parameter_that_may_hold_a_secret():
    base = job_name({})
    for query in ("?pass%77ord={}", "?sslmode=require&pass%77ord={}", "?PASSWORD={}", "?sslpassword={}",
                  "?passfile=/tmp/{}", "?x={}", "?%70assword={}&sslmode=require"):
        one = job_name({"database": {"url": URL + query.format("guess1")}})
        two = job_name({"database": {"url": URL + query.format("guess2")}})
        assert one == two, query
    # The known-safe parameters still make distinct runs distinct.
    assert job_name({"database": {"url": URL + "?sslmode=require"}}) != \
        job_name({"database": {"url": URL + "?sslmode=disable"}})
    assert job_name({"database": {"url": URL + "?sslmode=require&pass%77ord=x"}}) == \
        job_name({"database": {"url": URL + "?sslmode=require"}})
    assert job_name({"database": {"url": URL}}) == base
    # An unencoded "?" in the password keeps no part of it.
    assert job_name({"database": {"url": URL.replace("s3cret", "s3?cret")}}) == \
        job_name({"database": {"url": URL.replace("s3cret", "s4?cret")}})


# -- verifyCronJob: `migration-runner verify` on a schedule ------------------------------------------------
HOOK_PREFIXES = ("helm.sh/hook", "argocd.argoproj.io/hook", "argocd.argoproj.io/sync-wave")


def verify_docs(values: dict | None = None, **options) -> list[dict]:
    return render(deep_merge({"verifyCronJob": {"enabled": True}}, values or {}), **options)


def cron_pod(cron_job: dict) -> dict:
    return cron_job["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def cron_container(cron_job: dict) -> dict:
    (c,) = [c for c in cron_pod(cron_job)["containers"] if c["name"] == CONTAINER]
    return c


def is_hook(doc: dict) -> bool:
    return any(key.startswith(HOOK_PREFIXES) for key in annotations(doc))


@pytest.mark.parametrize("mode", ["hook", "argocd", "job"])
def test_verify_cronjob_is_off_by_default(mode):
    assert "CronJob" not in kinds(render({"mode": mode}, tests=True))
    assert "CronJob" not in kinds(render({"mode": mode, "job": {"enabled": False}}, tests=True))


VERIFY_SOURCES = {
    "url": {},
    "existingSecret": {"database": {"url": "", "existingSecret": "db", "existingSecretKey": "DATABASE_URL"}},
    "configMap": {"migrations": {"source": "configMap", "files": {"alembic.ini": "[alembic]\n"}}},
    "existingConfigMap": {"migrations": {"source": "configMap", "existingConfigMap": "shop-migrations"}},
}


@pytest.mark.parametrize("job_enabled", [True, False])
@pytest.mark.parametrize("source", sorted(VERIFY_SOURCES))
@pytest.mark.parametrize("mode", ["hook", "argocd", "job"])
def test_verify_cronjob_is_an_ordinary_resource_that_mounts_ordinary_resources(mode, source, job_enabled):
    """One valid CronJob running `verify`, with no hook annotation, whose pod mounts the Secret and ConfigMap that
    live as long as the release (rendered in the same release as ordinary resources, or the user's own), never the
    Job's hook copies, which Helm and Argo CD delete after the hook."""
    values = deep_merge(VERIFY_SOURCES[source], {"mode": mode, "job": {"enabled": job_enabled}})
    docs = verify_docs(values, tests=True)
    cron_job = only(docs, "CronJob")
    validate(cron_job)
    assert len(cron_job["metadata"]["name"]) <= 52
    assert cron_job["apiVersion"] == "batch/v1"
    assert cron_job["metadata"]["name"] == "shop-migration-runner-verify"
    assert not is_hook(cron_job) and not annotations(cron_job)
    for labels in (cron_job["metadata"]["labels"], cron_job["spec"]["jobTemplate"]["metadata"]["labels"],
                   cron_job["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]):
        assert labels["app.kubernetes.io/component"] == "verify"
        assert labels["app.kubernetes.io/name"] == "migration-runner"
        assert labels["app.kubernetes.io/instance"] == "shop"
    assert cron_job["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    pod, c = cron_pod(cron_job), cron_container(cron_job)
    assert c["args"] == ["verify"]
    assert pod["restartPolicy"] == "Never"
    # The migration Job's podFailurePolicy, with a small backoffLimit for the retryable codes.
    assert cron_job["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 2
    assert cron_job["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    ordinary = {(d["kind"], d["metadata"]["name"]) for d in docs if not is_hook(d)}
    (secret,) = [v["secret"] for v in pod["volumes"] if "secret" in v]
    if source == "existingSecret":
        assert (secret["secretName"], secret["items"][0]["key"]) == ("db", "DATABASE_URL")
    else:
        assert ("Secret", secret["secretName"]) in ordinary
        assert mounted(docs, "Secret", pod)["metadata"]["name"] == "shop-migration-runner-db-url"
    config_maps = [v["configMap"] for v in pod["volumes"] if "configMap" in v]
    if source == "configMap":
        assert ("ConfigMap", config_maps[0]["name"]) in ordinary
        assert not is_hook(mounted(docs, "ConfigMap", pod))
    elif source == "existingConfigMap":
        assert [m["name"] for m in config_maps] == ["shop-migrations"]
    else:
        assert config_maps == []
    # Its ServiceAccount exists as an ordinary resource, is one the user manages, or is the namespace's default.
    account = pod.get("serviceAccountName")
    if account is not None:
        assert ("ServiceAccount", account) in ordinary
    else:
        assert mode != "job" or not job_enabled
    for doc in docs:
        validate(doc)


def test_verify_cronjob_pod_is_the_jobs_pod():
    """Everything that makes the Job's pod reach the database reaches the CronJob's pod: in mode job, where both
    mount the same ordinary resources, the pods differ only in the component label and the runner's args."""
    values = deep_merge(COMBINATIONS["extensions"], {
        "mode": "job", "sidecars": [{"name": "istio-proxy", "image": "istio/proxyv2:1.24.0"}],
        "config": {"quitUrls": QUIT}, "migrations": {"source": "configMap", "files": {"alembic.ini": ""}},
        "podAnnotations": {"example.com/team": "db"}, "nodeSelector": {"pool": "batch"},
        "global": {"compatibility": {"openshift": {"adaptSecurityContext": "force"}}}})
    docs = verify_docs(values)
    job_template = only(docs, "Job")["spec"]["template"]
    cron_template = only(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]
    validate(only(docs, "CronJob"))
    assert cron_template["metadata"]["labels"] == dict(job_template["metadata"]["labels"],
                                                       **{"app.kubernetes.io/component": "verify"})
    assert cron_template["metadata"]["annotations"] == job_template["metadata"]["annotations"]
    job_pod, cron_pod_spec = json.loads(json.dumps(job_template["spec"])), cron_template["spec"]
    (runner,) = [c for c in job_pod["containers"] if c["name"] == CONTAINER]
    runner["args"] = ["verify"]
    assert cron_pod_spec == job_pod
    assert [c["name"] for c in cron_pod_spec["containers"]] == [CONTAINER, "istio-proxy"]
    assert [c["name"] for c in cron_pod_spec["initContainers"]] == ["cloud-sql-proxy"]
    assert "runAsUser" not in cron_pod_spec["securityContext"]  # OpenShift's adaptation too


def test_verify_cronjob_in_hook_mode_differs_from_the_job_only_in_what_outlives_the_hook():
    values = {"migrations": {"source": "configMap", "files": {"alembic.ini": ""}},
              "initContainers": [{"name": "proxy", "image": "proxy:1", "restartPolicy": "Always"}]}
    docs = verify_docs(values)
    job_pod, pod = pod_spec(docs), cron_pod(only(docs, "CronJob"))
    assert is_hook(mounted(docs, "Secret")) and is_hook(mounted(docs, "ConfigMap"))
    assert not is_hook(mounted(docs, "Secret", pod)) and not is_hook(mounted(docs, "ConfigMap", pod))
    # The chart's ServiceAccount is a hook, deleted after the Job: the namespace's default one instead.
    assert is_hook(only(docs, "ServiceAccount")) and "serviceAccountName" not in pod
    assert cron_pod(only(verify_docs(deep_merge(values, {"serviceAccount": {"create": False, "name": "migrator"}})),
                             "CronJob"))["serviceAccountName"] == "migrator"
    for key in ("initContainers", "securityContext", "automountServiceAccountToken", "restartPolicy"):
        assert pod[key] == job_pod[key], key
    assert cron_container(only(docs, "CronJob"))["image"] == container(docs)["image"]
    assert cron_container(only(docs, "CronJob"))["env"] == container(docs)["env"]


def test_verify_cronjob_honours_schedule_suspend_time_zone_and_limits():
    spec = only(verify_docs(), "CronJob")["spec"]
    assert spec["schedule"] == "17 3 * * *" and spec["suspend"] is False and "timeZone" not in spec
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 600
    cron_job = only(verify_docs({"verifyCronJob": {
        "schedule": "*/30 * * * *", "suspend": True, "timeZone": "Europe/Berlin", "concurrencyPolicy": "Replace",
        "successfulJobsHistoryLimit": 2, "failedJobsHistoryLimit": 5, "backoffLimit": 1,
        "activeDeadlineSeconds": None}}), "CronJob")
    validate(cron_job)
    spec = cron_job["spec"]
    assert (spec["schedule"], spec["suspend"], spec["timeZone"], spec["concurrencyPolicy"]) == \
        ("*/30 * * * *", True, "Europe/Berlin", "Replace")
    assert (spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == (2, 5)
    assert spec["jobTemplate"]["spec"]["backoffLimit"] == 1
    assert "activeDeadlineSeconds" not in spec["jobTemplate"]["spec"]


def test_verify_cronjob_gets_the_quit_urls_exactly_where_the_job_does():
    """Its runner is its pod's last work, as in the Job: the quit URLs stop the sidecars so that each run completes.
    Without config.quitUrls nothing is set, sidecars or not."""
    sidecars = [{"name": "cloud-sql-proxy", "image": "gcr.io/cloud-sql-connectors/cloud-sql-proxy:2.14.0"}]
    for values in ({}, {"sidecars": sidecars}, {"job": {"enabled": False}, "sidecars": sidecars}):
        assert "MIGRATE_QUIT_URLS" not in env_of(cron_container(only(verify_docs(values), "CronJob"))), values
    for values in ({"sidecars": sidecars}, {"job": {"enabled": False}, "sidecars": sidecars},
                   {"disableIstioSidecar": False}):  # Istio's injected proxy: README "Istio with sidecars"
        docs = verify_docs(deep_merge(values, {"config": {"quitUrls": QUIT}}), tests=True)
        assert env_of(cron_container(only(docs, "CronJob")))["MIGRATE_QUIT_URLS"] == QUIT, values
        # Still never in the helm test pod.
        for pod in [d for d in docs if d["kind"] == "Pod"]:
            assert "MIGRATE_QUIT_URLS" not in env_of(pod["spec"]["containers"][0])


def test_verify_cronjob_name_stays_valid_and_distinct_when_long():
    names = set()
    for values in ({"fullnameOverride": "a" * 70 + "-one"}, {"fullnameOverride": "a" * 70 + "-two"},
                   {"fullnameOverride": "Shop_DB.Migrate-"}, {"nameOverride": "dbMigrations"}):
        cron_job = only(verify_docs(values), "CronJob")
        validate(cron_job)
        name = cron_job["metadata"]["name"]
        assert len(name) <= 52 and name.endswith("-verify"), name  # the CronJob limit: Jobs get 11 more
        names.add(name)
    assert len(names) == 4, names
    assert "shop-db-migrate-verify" in names
    assert only(verify_docs({"fullnameOverride": "x" * 45}), "CronJob")["metadata"]["name"] == "x" * 45 + "-verify"


@pytest.mark.parametrize("values, message", [
    ({"verifyCronJob": {"enabled": True, "bogus": 1}}, "additional properties 'bogus' not allowed"),
    ({"verifyCronJob": {"concurrencyPolicy": "Never"}}, "/verifyCronJob/concurrencyPolicy"),
    ({"verifyCronJob": {"schedule": ""}}, "/verifyCronJob/schedule"),
    ({"verifyCronJob": {"timeZone": "Europe Berlin"}}, "/verifyCronJob/timeZone"),
    ({"verifyCronJob": {"backoffLimit": -1}}, "/verifyCronJob/backoffLimit"),
    ({"verifyCronJob": None}, "missing property 'verifyCronJob'"),
])
def test_schema_refuses_bad_verify_cronjob_values(values, message):
    assert message in render_error(values)


def test_verify_cronjob_in_the_notes_and_the_readme():
    assert "CronJob" not in notes()
    text = notes({"verifyCronJob": {"enabled": True}, "job": {"enabled": False}})
    assert "shop-migration-runner-verify" in text and "exit 10" in text
    readme = (CHART / "README.md").read_text()
    section = readme.split("## Drift checks on a schedule", 1)[1].split("\n## ", 1)[0]
    for needle in ("verifyCronJob.enabled", "exit 10", "termination message", "ordinary", "quitUrls"):
        assert needle in section, needle
    values = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    cron_job = only(render(values), "CronJob")
    validate(cron_job)
    assert cron_job["spec"]["timeZone"] == "Europe/Berlin"


# -- issue #23: config.target, the post Job (expand/contract), and the audit's findings -------------------------
MODES = ["hook", "argocd", "job"]
EXPAND = {"config": {"target": "expand@head"}, "postUpgrade": {"enabled": True, "target": "heads"}}
HOOK_EVENT_KEYS = ("helm.sh/hook", "argocd.argoproj.io/hook")


def secret_source(docs: list[dict], pod: dict) -> dict:
    """The Secret volume holding the URL (not an extraVolumes one)."""
    (volume,) = [v["secret"] for v in pod["volumes"] if v["name"] == "migration-runner-database"]
    return volume


def hook_phases(doc: dict) -> set[str]:
    """The phases a resource is created in: its Helm hook events or Argo CD hook phases; {"release"} when ordinary."""
    found = set()
    for key in HOOK_EVENT_KEYS:
        found |= {part.strip() for part in annotations(doc).get(key, "").split(",") if part.strip()}
    return found or {"release"}


@pytest.mark.parametrize("mode", MODES)
def test_post_job_is_off_by_default(mode):
    for values in ({"mode": mode}, {"mode": mode, "postUpgrade": {"target": "contract@head"}}):
        docs = render(values, tests=True)
        assert [component(d) for d in docs if d["kind"] == "Job"] == ["migration"]
        assert "-post" not in json.dumps([d["metadata"]["name"] for d in docs])
    # The post Job comes with the migration Job: none with job.enabled false (init containers migrate).
    assert "Job" not in kinds(render({"mode": mode, "job": {"enabled": False}, "postUpgrade": {"enabled": True}}))


@pytest.mark.parametrize("source", ["url", "existingSecret", "configMap"])
@pytest.mark.parametrize("mode", MODES)
def test_both_jobs_render_validate_and_run_their_own_target(mode, source):
    """The pre Job runs config.target, the post Job postUpgrade.target: both valid on every supported Kubernetes,
    the post Job a post-install,post-upgrade hook, a PostSync hook, or a plain Job, with a name of its own."""
    values = deep_merge(deep_merge(VERIFY_SOURCES[source], EXPAND), {"mode": mode, "verifyCronJob": {"enabled": True}})
    docs = render(values, tests=True)
    for doc in docs:
        validate(doc)
    pre, post = pre_job(docs), post_job(docs)
    assert env_of(container(docs, pre))["MIGRATE_TARGET"] == "expand@head"
    assert env_of(container(docs, post))["MIGRATE_TARGET"] == "heads"
    assert pre["metadata"]["name"] != post["metadata"]["name"]
    assert post["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "post-migration"
    if mode == "hook":
        assert post["metadata"]["name"] == "shop-migration-runner-post"
        assert annotations(post) == {"helm.sh/hook": "post-install,post-upgrade", "helm.sh/hook-weight": "0",
                                     "helm.sh/hook-delete-policy": "before-hook-creation,hook-succeeded",
                                     "helm.sh/hook-output-log-policy": "hook-failed"}
    elif mode == "argocd":
        assert post["metadata"]["name"] == "shop-migration-runner-post"
        assert annotations(post) == {"argocd.argoproj.io/hook": "PostSync", "argocd.argoproj.io/sync-wave": "0",
                                     "argocd.argoproj.io/hook-delete-policy": "BeforeHookCreation"}
    else:
        assert re.fullmatch(r"shop-migration-runner-post-[0-9a-f]{8}", post["metadata"]["name"])
        assert annotations(post) == {} and post["spec"]["ttlSecondsAfterFinished"] == 86400
    # Its own podFailurePolicy, the same rules as the pre Job's, and its own termination message.
    assert post["spec"]["podFailurePolicy"] == pre["spec"]["podFailurePolicy"]
    assert post["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["containerName"] == CONTAINER
    assert container(docs, post)["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert post["spec"]["backoffLimit"] == pre["spec"]["backoffLimit"]
    # The application's pods answer for config.target (they start between the Jobs); what runs between
    # releases (the verify CronJob, the helm test pod) for postUpgrade.target.
    assert env_of(cron_container(only(docs, "CronJob")))["MIGRATE_TARGET"] == "heads"
    for pod in [d for d in docs if d["kind"] == "Pod"]:
        assert env_of(pod["spec"]["containers"][0])["MIGRATE_TARGET"] == "heads"


@pytest.mark.parametrize("mode", MODES)
def test_post_job_pod_is_the_pre_jobs_pod(mode):
    """One pod template: the post Job's pod differs from the pre Job's only in its component label, its target
    and, in modes hook and argocd, in mounting the ordinary Secret and ConfigMap instead of the pre Job's copies."""
    values = deep_merge(COMBINATIONS["extensions"], deep_merge(EXPAND, {
        "mode": mode, "sidecars": [{"name": "istio-proxy", "image": "istio/proxyv2:1.24.0"}],
        "config": {"quitUrls": QUIT}, "migrations": {"source": "configMap", "files": {"alembic.ini": ""}},
        "nodeSelector": {"pool": "batch"}, "job": {"backoffLimit": 1, "activeDeadlineSeconds": 99}}))
    docs = render(values)
    pre, post = pre_job(docs), post_job(docs)
    validate(post)
    pre_template, post_template = json.loads(json.dumps(pre["spec"]["template"])), post["spec"]["template"]
    pre_template["metadata"]["labels"]["app.kubernetes.io/component"] = "post-migration"
    (runner,) = [c for c in pre_template["spec"]["containers"] if c["name"] == CONTAINER]
    for item in runner["env"]:
        if item["name"] == "MIGRATE_TARGET":
            item["value"] = "heads"
    for volume in pre_template["spec"]["volumes"]:
        if volume["name"] == "migration-runner-database":
            volume["secret"]["secretName"] = secret_source(docs, pod_spec(docs, post))["secretName"]
        if "configMap" in volume:
            volume["configMap"]["name"] = mounted(docs, "ConfigMap", pod_spec(docs, post))["metadata"]["name"]
    assert post_template == pre_template
    assert {k: v for k, v in post["spec"].items() if k != "template"} == \
        {k: v for k, v in pre["spec"].items() if k != "template"}
    assert env_of(container(docs, post))["MIGRATE_QUIT_URLS"] == QUIT
    assert post["metadata"]["labels"]["team"] == "db" and annotations(post)["example.com/owner"] == "db"


@pytest.mark.parametrize("mode", MODES)
def test_post_job_has_what_it_needs_when_it_runs(mode):
    """Secret, ConfigMap and ServiceAccount exist in the post Job's phase and outlive it: the ordinary Secret and
    ConfigMap, and the chart's ServiceAccount, a hook of the post events too (created again before the post Job,
    after hook-succeeded deleted it with the pre hooks), with a lower weight or sync wave."""
    values = deep_merge(EXPAND, {"mode": mode, "migrations": {"source": "configMap", "files": {"alembic.ini": ""}}})
    docs = render(values)
    post = post_job(docs)
    pod = pod_spec(docs, post)
    account = only(docs, "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    for kind in ("Secret", "ConfigMap"):
        assert hook_phases(mounted(docs, kind, pod)) == {"release"}, kind
    assert hook_phases(post) <= hook_phases(account) | {"release"} or hook_phases(account) == {"release"}
    if mode == "hook":
        assert hook_phases(account) == {"pre-install", "pre-upgrade", "post-install", "post-upgrade"}
        for job in (pre_job(docs), post):
            assert int(annotations(account)["helm.sh/hook-weight"]) < int(annotations(job)["helm.sh/hook-weight"])
            assert hook_phases(job) <= hook_phases(account)
        # The pre Job's copies stay pre hooks: the post Job never mounts them.
        assert hook_phases(mounted(docs, "Secret")) == {"pre-install", "pre-upgrade"}
    elif mode == "argocd":
        assert hook_phases(account) == {"PreSync", "PostSync"}
        for job in (pre_job(docs), post):
            assert int(annotations(account)["argocd.argoproj.io/sync-wave"]) < \
                int(annotations(job)["argocd.argoproj.io/sync-wave"])
    else:
        assert hook_phases(account) == {"release"}
    # Without the post Job the ServiceAccount is the pre Job's alone, as before.
    without = only(render({"mode": mode}), "ServiceAccount")
    assert hook_phases(without) == {"hook": {"pre-install", "pre-upgrade"}, "argocd": {"PreSync"},
                                    "job": {"release"}}[mode]
    # serviceAccount.create false: both Jobs run as serviceAccount.name.
    docs = render(deep_merge(values, {"serviceAccount": {"create": False, "name": "migrator"}}))
    assert "ServiceAccount" not in kinds(docs)
    assert pod_spec(docs, post_job(docs))["serviceAccountName"] == pod_spec(docs)["serviceAccountName"] == "migrator"


def test_post_job_names_stay_valid_distinct_and_follow_its_spec():
    for mode in MODES:
        names = set()
        for values in ({"fullnameOverride": "a" * 70 + "-one"}, {"fullnameOverride": "a" * 70 + "-two"},
                       {"fullnameOverride": "Shop_DB.Migrate-"}, {"nameOverride": "dbMigrations"},
                       {"job": {"nameSuffixOverride": "x" * 30}}):
            docs = render(deep_merge(deep_merge(EXPAND, values), {"mode": mode}), tests=True)
            for doc in docs:
                validate(doc)
            assert len({(d["kind"], d["metadata"]["name"]) for d in docs}) == len(docs)
            name = post_job(docs)["metadata"]["name"]
            assert len(name) <= 63 and "-post" in name, name
            names.add(name)
        assert len(names) == 5, names
    # Mode job: the post Job's name is a hash of its own spec; the pre Job's does not move with postUpgrade.target.
    def names(values):
        docs = render(deep_merge(deep_merge(EXPAND, {"mode": "job"}), values))
        return pre_job(docs)["metadata"]["name"], post_job(docs)["metadata"]["name"]
    base = names({})
    other_post = names({"postUpgrade": {"target": "contract@head"}})
    other_pre = names({"config": {"target": "heads"}})
    assert other_post[0] == base[0] and other_post[1] != base[1]
    assert other_pre[0] != base[0]
    assert names({"job": {"nameSuffixOverride": "1.4.0"}}) == ("shop-migration-runner-1-4-0",
                                                                 "shop-migration-runner-post-1-4-0")


@pytest.mark.parametrize("values, message", [
    ({"postUpgrade": {"enabled": "yes"}}, "/postUpgrade/enabled"),
    ({"postUpgrade": {"target": ""}}, "/postUpgrade/target"),
    ({"postUpgrade": {"target": "expand@head contract@head"}}, "/postUpgrade/target"),
    ({"postUpgrade": {"enabled": True, "bogus": 1}}, "additional properties 'bogus' not allowed"),
    ({"postUpgrade": None}, "missing property 'postUpgrade'"),
    ({"config": {"target": ""}}, "/config/target"),
    ({"hook": {"outputLogPolicy": "always"}}, "/hook/outputLogPolicy"),
])
def test_schema_refuses_bad_target_and_post_job_values(values, message):
    assert message in render_error(values)


@pytest.mark.parametrize("values", [
    {"postUpgrade": {"enabled": True}},
    {"postUpgrade": {"enabled": True, "target": "contract@head"}, "config": {"target": "expand@head"}},
    {"postUpgrade": {"enabled": False, "target": "0007"}, "config": {"target": "0005"}},
    {"hook": {"outputLogPolicy": "hook-succeeded,hook-failed"}},
    {"hook": {"outputLogPolicy": ""}},
])
def test_schema_accepts_target_and_post_job_values(values):
    with helm.Chart.load(CHART) as loaded:
        loaded.validate_schema(deep_merge(BASE, values))
    for doc in render(values, tests=True):
        validate(doc)


def test_rendered_pre_and_post_jobs_migrate_the_database(database_url, tmp_path):
    """The two rendered Jobs, one after the other, against the suite's PostgreSQL: each exits 0 with its own
    MIGRATE_TARGET, the post Job with the ordinary Secret and ConfigMap, and the database ends at the heads."""
    values = deep_merge(EXPAND, {"database": {"url": database_url}, "config": {"target": "heads", "waitTimeout": 10},
                                 "migrations": {"source": "configMap", "files": example_files()}})
    docs = render(values)
    for doc in docs:
        validate(doc)
    pre, post = pre_job(docs), post_job(docs)
    assert is_hook(mounted(docs, "Secret", pod_spec(docs, pre))) and not is_hook(mounted(docs, "Secret", pod_spec(docs, post)))
    result, env = run_rendered_job(docs, tmp_path / "pre", {"/app": EXAMPLE}, job=pre)
    assert result.returncode == 0, result
    assert env["MIGRATE_TARGET"] == "heads"
    assert version_rows(database_url) == ["0003"]
    result, env = run_rendered_job(docs, tmp_path / "post", {"/app": EXAMPLE}, job=post)
    assert result.returncode == 0, result
    assert env["MIGRATE_TARGET"] == "heads" and Path(env["DATABASE_URL_FILE"]).read_text() == database_url
    assert version_rows(database_url) == ["0003"]


# Finding 1: kubeVersion claimed only where the manifests validate.
def test_kube_version_floor_is_where_every_manifest_validates():
    """Chart.yaml's floor is the oldest release of the tests' matrix, every object of both Jobs' releases
    validates on every minor release from it to the newest, and not one release below it (the Job's
    podFailurePolicy with DisruptionTarget, native sidecars): the chart claims no release it cannot run on."""
    assert KUBE_VERSIONS[0] == KUBE_FLOOR and KUBE_VERSIONS[-1] == KUBE_VERSION
    assert kube_key(KUBE_FLOOR) >= (1, 29), KUBE_FLOOR
    major, floor_minor, _ = kube_key(KUBE_FLOOR)
    docs = render(deep_merge(COMBINATIONS["post-hook"], COMBINATIONS["extensions"]), tests=True)
    for minor in range(floor_minor, kube_key(KUBE_VERSION)[1] + 1):
        for doc in docs:
            kubernetes_validate.validate(doc, f"{major}.{minor}.0", strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pre_job(docs), f"{major}.{floor_minor - 1}.0", strict=True)
    # The README says the same floor.
    readme = (CHART / "README.md").read_text()
    assert f"Kubernetes {major}.{floor_minor} or later" in readme


# Finding 2: two migrations.files paths that make the same ConfigMap key.
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("paths", [("a/b.py", "a__b.py"), ("versions/0001 init.py", "versions/0001__init.py"),
                                   ("x/y/z.py", "x__y/z.py")])
def test_colliding_migration_file_keys_fail_naming_both(mode, paths):
    files = {"alembic.ini": "[alembic]\n", paths[0]: "# one\n", paths[1]: "# two\n"}
    for job in (True, False):
        message = render_error({"mode": mode, "job": {"enabled": job},
                                "migrations": {"source": "configMap", "files": files}})
        assert f'"{paths[0]}"' in message and f'"{paths[1]}"' in message, message
        assert "same ConfigMap key" in message or "both become the ConfigMap key" in message, message


def test_distinct_migration_file_keys_render_each_file_once():
    files = {"alembic.ini": "[alembic]\n", "migrations/env.py": "# env\n", "migrations/versions/0001_a.py": "# a\n",
             "migrations/versions/0001-a.py": "# dash\n", "a_b.py": "# underscore\n"}
    docs = render({"mode": "job", "migrations": {"source": "configMap", "files": files}})
    config_map = only(docs, "ConfigMap")
    assert len(config_map["data"]) == len(files)
    volume = next(v["configMap"] for v in pod_spec(docs)["volumes"] if "configMap" in v)
    assert {item["path"]: config_map["data"][item["key"]] for item in volume["items"]} == files


# Finding 3: the NetworkPolicy covers every pod the chart runs, for as long as each runs.
def chart_pods(docs: list[dict]) -> list[tuple[str, dict, dict]]:
    """(what, pod labels, the object that creates the pod) of every pod the chart runs."""
    pods = []
    for doc in docs:
        if doc["kind"] == "Job":
            pods.append((f"Job {doc['metadata']['name']}", doc["spec"]["template"]["metadata"]["labels"], doc))
        elif doc["kind"] == "CronJob":
            pods.append(("CronJob", doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"], doc))
        elif doc["kind"] == "Pod":
            pods.append(("helm test pod", doc["metadata"]["labels"], doc))
    return pods


def lifetime_covers(policy: dict, creator: dict) -> bool:
    """The policy exists when the pod runs: an ordinary resource covers any pod but a pre-install hook's (which runs
    before ordinary resources exist); a hook covers the pods of hooks in its phases with a higher weight or wave."""
    policy_phases, creator_phases = hook_phases(policy), hook_phases(creator)
    pre = {"pre-install", "PreSync"}
    if policy_phases == {"release"}:
        return not (creator_phases & pre)
    if not creator_phases <= policy_phases:
        return False
    for key in ("helm.sh/hook-weight", "argocd.argoproj.io/sync-wave"):
        if key in annotations(policy):
            return int(annotations(policy)[key]) < int(annotations(creator).get(key, "0"))
    return False


@pytest.mark.parametrize("job_enabled", [True, False])
@pytest.mark.parametrize("post", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_network_policy_covers_every_pod_the_chart_runs(mode, post, job_enabled):
    values = {"mode": mode, "job": {"enabled": job_enabled}, "networkPolicy": {"enabled": True},
              "verifyCronJob": {"enabled": True}, "postUpgrade": {"enabled": post}}
    docs = render(values, tests=True)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policies
    pods = chart_pods(docs)
    expected = 1 + (mode == "hook") + (job_enabled and 1 + post)  # CronJob, test pod, pre Job, post Job
    assert len(pods) == expected, [what for what, _, _ in pods]
    for what, labels, creator in pods:
        covering = [p for p in policies if selects(p, labels) and lifetime_covers(p, creator)]
        assert covering, (what, [(p["metadata"]["name"], annotations(p)) for p in policies])
    for policy in policies:
        validate(policy)
    # Not the application's own pods (the parent chart's), which share neither name nor component.
    parent = render({"migrationRunner": {"job": {"enabled": job_enabled}, "networkPolicy": {"enabled": True},
                                         "database": {"existingSecret": "", "url": URL}}}, chart=PARENT)
    deployment_labels = only(parent, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not any(selects(p, deployment_labels) for p in parent if p["kind"] == "NetworkPolicy")


# Finding 4: a drained node is not a failed drift check.
def test_verify_cronjob_has_the_generated_pod_failure_policy():
    docs = verify_docs()
    spec = only(docs, "CronJob")["spec"]["jobTemplate"]["spec"]
    validate(only(docs, "CronJob"))
    rules = spec["podFailurePolicy"]["rules"]
    assert rules == only(docs, "Job")["spec"]["podFailurePolicy"]["rules"]
    (fail,) = [r for r in rules if r["action"] == "FailJob"]
    assert set(fail["onExitCodes"]["values"]) == fatal_codes()
    by_name = {row["name"]: row["code"] for row in exit_codes()}
    for name in ("SchemaDrift", "DatabaseAhead", "ConfigError"):
        assert by_name[name] in fail["onExitCodes"]["values"], name
    for name in ("DatabaseUnreachable", "PendingRevisions"):
        assert by_name[name] not in fail["onExitCodes"]["values"], name
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert 1 <= spec["backoffLimit"] <= 3
    assert cron_pod(only(docs, "CronJob"))["restartPolicy"] == "Never"  # what podFailurePolicy requires
    # Without the Job (init containers migrate), and with the policy turned off.
    assert only(verify_docs({"job": {"enabled": False}}), "CronJob")["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]
    assert "podFailurePolicy" not in only(verify_docs({"job": {"podFailurePolicy": False}}),
                                          "CronJob")["spec"]["jobTemplate"]["spec"]


# Finding 5: the runner's UID reads the URL without fsGroup.
def every_runner_pod(docs: list[dict]) -> list[tuple[str, dict]]:
    pods = [(what, creator["spec"]["template"]["spec"] if creator["kind"] == "Job" else
             cron_pod(creator) if creator["kind"] == "CronJob" else creator["spec"]) for what, _, creator in
            chart_pods(docs)]
    pods += [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in docs if d["kind"] == "Deployment"]
    return pods


@pytest.mark.parametrize("security", [{}, {"podSecurityContext": {"fsGroup": None}},
                                      {"global": {"compatibility": {"openshift": {"adaptSecurityContext": "force"}}}}])
def test_secret_file_is_readable_by_the_runner_without_fs_group(security):
    """A Secret volume's files belong to root (and to fsGroup, when set): the mode must let any UID read."""
    values = deep_merge(deep_merge(EXPAND, security), {"verifyCronJob": {"enabled": True}})
    docs = render(values, tests=True)
    if security:  # the chart's own pods run without fsGroup
        for what, pod in every_runner_pod(docs):
            assert "fsGroup" not in pod.get("securityContext", {}), what
    docs += render({"migrationRunner": {"job": {"enabled": True}, "database": {"existingSecret": "", "url": URL}}},
                   chart=PARENT)
    pods = every_runner_pod(docs)
    # pre Job, post Job, test pod, CronJob; the parent's Job and Deployment (its wait container's volumes)
    assert len(pods) == 6, [what for what, _ in pods]
    for what, pod in pods:
        secret = secret_source(docs, pod)
        mode = secret.get("defaultMode", 0o644)
        for item in secret.get("items", []):
            mode = item.get("mode", mode)
        assert mode & 0o004, (what, oct(mode))  # "other": whatever the runner's UID and groups
        assert not mode & 0o222, (what, oct(mode))  # and never writable
    for doc in docs:
        validate(doc)


# Finding 6: a failed hook prints the runner's summary in helm's own output.
def test_hooks_print_their_logs_when_they_fail():
    docs = render(EXPAND, tests=True)
    for doc in [pre_job(docs), post_job(docs), only(docs, "Pod")]:
        assert annotations(doc)["helm.sh/hook-output-log-policy"] == "hook-failed", doc["metadata"]["name"]
    # Never on the resources that are not Jobs or Pods (Helm prints only those), nor outside mode hook.
    for doc in docs:
        if doc["kind"] not in ("Job", "Pod"):
            assert "helm.sh/hook-output-log-policy" not in annotations(doc), doc["kind"]
    for mode in ("argocd", "job"):
        assert not any("helm.sh/hook-output-log-policy" in annotations(d)
                       for d in render(deep_merge(EXPAND, {"mode": mode}), tests=True))
    always = render(deep_merge(EXPAND, {"hook": {"outputLogPolicy": "hook-succeeded,hook-failed"}}))
    assert annotations(post_job(always))["helm.sh/hook-output-log-policy"] == "hook-succeeded,hook-failed"
    never = render(deep_merge(EXPAND, {"hook": {"outputLogPolicy": ""}}), tests=True)
    assert not any("helm.sh/hook-output-log-policy" in annotations(d) for d in never)
    # The runner's summary is its last log line, which is what Helm prints of the Job's pods.
    readme = (CHART / "README.md").read_text()
    assert "hook.outputLogPolicy" in readme and "Helm 3.18" in readme


# Finding 7 and the expand/contract release: the chart README.
def test_readme_documents_requirements_and_ttl_deleted_jobs():
    readme = (CHART / "README.md").read_text()
    requirements = readme.split("## Requirements", 1)[1].split("\n## ", 1)[0]
    for needle in ("Helm 3.18 or later", "Helm 4", f"Kubernetes {KUBE_FLOOR.rsplit('.', 1)[0]} or later",
                   "hook-output-log-policy"):
        assert needle in requirements, needle
    ttl = readme.split("### A Job its TTL deleted", 1)[1].split("\n## ", 1)[0]
    for needle in ("job.ttlSecondsAfterFinished", "**`helm upgrade`**", "creates it", "**Flux**",
                   "driftDetection", "mode `hook`"):
        assert needle in ttl, needle


def test_readme_expand_contract_release():
    readme = (CHART / "README.md").read_text()
    section = readme.split("## Expand and contract", 1)[1].split("\n## ", 1)[0]
    for needle in ("config.target", "postUpgrade.target", "expand@head", "branch_labels", "0005", "0006",
                   "--wait", "PostSync", "post-upgrade", "helm rollback", "allowAhead", "downgrade,0004",
                   "templates/post-job.yaml", "--show-only"):
        assert needle in section, needle
    values = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    for mode in MODES:
        docs = render(deep_merge(values, {"mode": mode}), tests=True)
        for doc in docs:
            validate(doc)
        assert env_of(container(docs, pre_job(docs)))["MIGRATE_TARGET"] == "expand@head"
        assert env_of(container(docs, post_job(docs)))["MIGRATE_TARGET"] == "heads"
        # Each head the one of its labelled branch: the runner needs no MIGRATE_ALLOW_MULTIPLE_HEADS for them.
        assert "MIGRATE_ALLOW_MULTIPLE_HEADS" not in env_of(container(docs))
    # The template the mode-job recipe applies on its own holds the post Job alone.
    with helm.Chart.load(CHART) as loaded:
        rendered = loaded.render(deep_merge(BASE, deep_merge(values, {"mode": "job"})), name="shop", namespace="shop")
    (post_text,) = [text for path, text in rendered.items() if path.endswith("templates/post-job.yaml")]
    (doc,) = [d for d in yaml.safe_load_all(post_text) if d]
    assert doc["kind"] == "Job" and component(doc) == "post-migration"
    # The notes say what orders the post Job in each mode.
    assert "--wait" in notes(deep_merge(values, {"mode": "hook"}))
    assert "PostSync" in notes(deep_merge(values, {"mode": "argocd"}))
    assert "rolled out" in notes(deep_merge(values, {"mode": "job"}))
    assert "post Job" not in notes()


# -- fleets (fleet.*) -------------------------------------------------------------------
FLEET = {"database": {"url": None}, "fleet": {"enabled": True, "targetsSecret": {"name": "tenants", "key": "list"},
                                              "shards": 3, "concurrency": 6, "canary": 2}}


@pytest.mark.parametrize("mode", ["hook", "argocd", "job"])
def test_fleet_renders_one_indexed_job_valid_on_every_supported_kubernetes(mode):
    docs = render(deep_merge(FLEET, {"mode": mode}), tests=True)
    for doc in docs:
        validate(doc)
    job = pre_job(docs)
    assert kinds(docs).count("Job") == 1 and "Secret" not in kinds(docs)  # no URL to render into one
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert spec["backoffLimitPerIndex"] == 3 and "backoffLimit" not in spec
    fail_index, ignore = spec["podFailurePolicy"]["rules"]
    assert fail_index["action"] == "FailIndex" and set(fail_index["onExitCodes"]["values"]) == fatal_codes()
    assert 13 in fail_index["onExitCodes"]["values"] and ignore["action"] == "Ignore"
    env = env_of(container(docs, job))
    assert env["DATABASE_URLS_FILE"] == "/etc/migration-runner/database/targets" and "DATABASE_URL_FILE" not in env
    assert (env["MIGRATE_FLEET_SHARDS"], env["MIGRATE_FLEET_CONCURRENCY"], env["MIGRATE_FLEET_CANARY"]) == \
        ("3", "6", "2")
    volume = next(v for v in pod_spec(docs, job)["volumes"] if v["name"] == "migration-runner-database")
    assert volume["secret"] == {"secretName": "tenants", "defaultMode": 0o444,
                                "items": [{"key": "list", "path": "targets"}]}
    if mode == "hook":
        assert annotations(job)["helm.sh/hook"] == "pre-install,pre-upgrade"


def test_fleet_refuses_values_that_cannot_work():
    no_secret = deep_merge(FLEET, {"fleet": {"targetsSecret": {"name": ""}}})
    assert "fleet.targetsSecret.name" in render_error(no_secret)
    assert "verifyCronJob" in render_error(deep_merge(FLEET, {"verifyCronJob": {"enabled": True}}))
    assert "postUpgrade" in render_error(deep_merge(FLEET, {"postUpgrade": {"enabled": True}}))
    # Without fleet.enabled a database is still required.
    assert "database.url" in render_error({"database": {"url": None}})


def test_rendered_fleet_job_migrates_every_target_across_its_indexes(postgres, tmp_path):
    names = [f"fleet_{index}_{tmp_path.name[-8:].lower()}" for index in range(4)]
    urls = []
    for name in names:
        postgres.create_database(name, RUNNER_ROLE)
        urls.append(postgres.url(name, RUNNER_ROLE, RUNNER_PASSWORD))
    docs = render(deep_merge(FLEET, {"fleet": {"shards": 2, "canary": 0},
                                     "config": {"waitTimeout": 10, "lockTimeout": 30}}))
    # The Secret the chart's user creates, and the index Kubernetes gives each pod.
    listing = "# tenants\n" + "\n".join(urls) + "\n"
    docs.append({"kind": "Secret", "metadata": {"name": "tenants"},
                 "data": {"list": base64.b64encode(listing.encode()).decode()}})
    job = pre_job(docs)
    seen = []
    for index in range(2):
        container(docs, job)["env"] = [e for e in container(docs, job)["env"] if e["name"] != "JOB_COMPLETION_INDEX"]
        container(docs, job)["env"].append({"name": "JOB_COMPLETION_INDEX", "value": str(index)})
        result, env = run_rendered_job(docs, tmp_path / f"root{index}", {dockerfile_facts()["workdir"]: EXAMPLE}, job)
        assert result.returncode == 0, result
        seen += [row["target"].rsplit("/", 1)[1] for row in result.last["targets"]]
    assert sorted(seen) == sorted(names)
    assert all(version_rows(url) == ["0003"] for url in urls)
