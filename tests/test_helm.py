"""The Helm chart, rendered by Helm's own engine (helm-python-sdk, the Helm v4 Go SDK).

No cluster runs here: each rendered manifest is validated against the OpenAPI
schemas of a current Kubernetes release (kubernetes-validate), the behaviour
that matters is asserted on the rendered objects, and the rendered Job's
container is executed with the installed console script against the suite's
PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from runner.errors import exit_codes
from runner.settings import variables

from .conftest import ROOT, RUNNER, run_runner, runner_env, version_rows

CHART = ROOT / "helm" / "migration-runner"
PARENT = ROOT / "examples" / "helm-parent"
EXAMPLE = ROOT / "examples" / "basic"
EXIT_CODES_FILE = CHART / "files" / "exit-codes.json"
# The newest Kubernetes release whose schemas kubernetes-validate ships.
KUBE_VERSION = kubernetes_validate.latest_version()
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


def render(values: dict | None = None, chart: Path = CHART, name: str = "shop", namespace: str = "prod") -> list[dict]:
    """Every object the chart renders with these values (on top of BASE for our chart)."""
    if chart == CHART:
        values = deep_merge(BASE, values or {})
    with helm.Chart.load(chart) as loaded:
        rendered = loaded.render(values or {}, name=name, namespace=namespace)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


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


def pod_spec(docs: list[dict]) -> dict:
    return only(docs, "Job")["spec"]["template"]["spec"]


def container(docs: list[dict]) -> dict:
    (c,) = pod_spec(docs)["containers"]
    return c


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
                              "baselineRevision": "0001", "allowMultipleHeads": True, "versionTable": "versions",
                              "versionTableSchema": "app", "applicationName": "shop-migrations",
                              "connectionCheckInterval": 0, "statementTimeout": 120, "ddlLockTimeout": 5,
                              "ddlLockRetries": 3, "terminationLog": "/tmp/summary.json",
                              "logFormat": "text", "logLevel": "DEBUG", "progressInterval": 30,
                              "alembicSection": "app", "alembicXArgs": "tenant=acme region=eu",
                              "allowAhead": "never"}},
    "scheduling": {"nodeSelector": {"kubernetes.io/os": "linux"},
                   "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "batch", "effect": "NoSchedule"}],
                   "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                       "nodeSelectorTerms": [{"matchExpressions": [
                           {"key": "pool", "operator": "In", "values": ["batch"]}]}]}}},
                   "imagePullSecrets": [{"name": "regcred"}], "priorityClassName": "low",
                   "podAnnotations": {"example.com/team": "db"}, "podLabels": {"team": "db"},
                   "job": {"annotations": {"example.com/owner": "db"}, "labels": {"tier": "migrations"}}},
    "env": {"extraEnv": [{"name": "PGSSLMODE", "value": "require"},
                         {"name": "TZ", "valueFrom": {"configMapKeyRef": {"name": "tz", "key": "tz"}}}],
            "envFrom": [{"secretRef": {"name": "pg-certs"}}]},
    "digest": {"image": {"repository": "example/runner", "digest": "sha256:" + "a" * 64, "pullPolicy": "Always"}},
    "no-serviceaccount": {"serviceAccount": {"create": False, "name": "migrator"}},
    "no-extras": {"disableIstioSidecar": False, "job": {"podFailurePolicy": False, "activeDeadlineSeconds": None},
                  "resources": {}},
    "job-disabled": {"job": {"enabled": False}},
    "overrides": {"fullnameOverride": "db-migrate", "command": ["/opt/venv/bin/migration-runner"], "args": []},
}


# -- lint and validation ------------------------------------------------------
def lint_problems(path: Path, values: dict | None = None, **options) -> list:
    report = helm.lint(path, values, strict=True, **options)
    return report["errors"] + [m for m in report["messages"] if m["severity"] >= 2]


def test_lint_is_clean():
    assert lint_problems(CHART) == []
    for name in ("hook-url", "job-configMap", "argocd-existingSecret", "scheduling"):
        assert lint_problems(CHART, deep_merge(BASE, COMBINATIONS[name])) == [], name
    assert lint_problems(PARENT, with_subcharts=True) == []


def test_kubernetes_version_is_current():
    major, minor = (int(part) for part in KUBE_VERSION.split(".")[:2])
    # podFailurePolicy is GA from 1.31; the schemas must know it.
    assert (major, minor) >= (1, 31), KUBE_VERSION


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_every_rendered_manifest_validates(name):
    docs = render(COMBINATIONS[name])
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] in ("migration-runner", "app")
    if COMBINATIONS[name].get("job", {}).get("enabled", True):
        assert "Job" in kinds(docs)


def test_validation_catches_a_broken_manifest():
    """The validator is not a no-op: a Job with an unknown field fails."""
    job = only(render(), "Job")
    job["spec"]["template"]["spec"]["containers"][0]["bogusField"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBE_VERSION, strict=True)


# -- modes ----------------------------------------------------------------------
def test_hook_mode_runs_the_job_as_a_pre_install_pre_upgrade_hook_after_its_secret():
    docs = render({"hook": {"weight": 5}})
    assert kinds(docs) == ["Job", "Secret", "ServiceAccount"]
    job = only(docs, "Job")
    assert annotations(job) == {"helm.sh/hook": "pre-install,pre-upgrade", "helm.sh/hook-weight": "5",
                                "helm.sh/hook-delete-policy": "before-hook-creation,hook-succeeded"}
    assert job["metadata"]["name"] == "shop-migration-runner"
    assert "ttlSecondsAfterFinished" not in job["spec"]
    # A pre-install hook runs before ordinary resources exist: what the Job needs is a hook with a lower weight.
    for kind in ("Secret", "ServiceAccount"):
        needed = annotations(only(docs, kind))
        assert needed["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert int(needed["helm.sh/hook-weight"]) < int(annotations(job)["helm.sh/hook-weight"])
        # Deleted only with the Job: a failed Job keeps the Secret it needs to be retried and debugged.
        assert "hook-failed" not in needed["helm.sh/hook-delete-policy"]


def test_hook_mode_configmap_is_a_hook_before_the_job():
    docs = render(COMBINATIONS["hook-configMap"])
    config_map = only(docs, "ConfigMap")
    assert annotations(config_map)["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(annotations(config_map)["helm.sh/hook-weight"]) < int(annotations(only(docs, "Job"))["helm.sh/hook-weight"])


def test_argocd_mode_is_a_presync_hook_in_a_later_wave_than_its_secret():
    docs = render({"mode": "argocd", "argocd": {"syncWave": 3}})
    job, secret, account = only(docs, "Job"), only(docs, "Secret"), only(docs, "ServiceAccount")
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
    assert len(long) <= 63 and re.fullmatch(r"x+-[0-9a-f]{8}", long), long


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
    secret = only(docs, "Secret")
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
    assert labels["helm.sh/chart"] == "migration-runner-0.1.0"


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
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules


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
    wanted = {name for name, _, _ in variables()} - {"DATABASE_URL"}  # the URL only ever comes as a file
    assert wanted <= set(env), wanted - set(env)
    assert env["MIGRATE_WAIT_TIMEOUT"] == "30"
    assert env["MIGRATE_LOCK_TIMEOUT"] == "600.5"
    assert env["MIGRATE_LOCK_KEY"] == "9223372036854775807"
    assert (env["ALEMBIC_SECTION"], env["ALEMBIC_X_ARGS"]) == ("app", "tenant=acme region=eu")
    assert env["MIGRATE_ALLOW_MULTIPLE_HEADS"] == "true"
    assert env["MIGRATE_CONNECTION_CHECK_INTERVAL"] == "0"
    assert env["MIGRATE_BASELINE_REVISION"] == "0001"
    assert env["MIGRATE_DDL_LOCK_RETRIES"] == "3"
    assert env["MIGRATE_ALLOW_AHEAD"] == "never"
    # The image is recorded with the lineage, so that an older image's exit 8 can name it.
    assert env["MIGRATE_IMAGE"] == container(render(values))["image"]
    assert env["ALEMBIC_CONFIG"] == "/app/db/alembic.ini"
    # An integer lock key given as a number is rendered as an integer, not 1e+06.
    assert env_of(container(render({"config": {"lockKey": 1000000}})))["MIGRATE_LOCK_KEY"] == "1000000"


def test_unset_settings_leave_the_runner_defaults():
    env = env_of(container(render()))
    assert set(env) == {"DATABASE_URL_FILE", "MIGRATE_IMAGE", "MIGRATE_LOG_FORMAT", "MIGRATE_LOG_LEVEL"}
    assert "ALEMBIC_CONFIG" not in env  # the image's own ALEMBIC_CONFIG applies


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
])
def test_schema_refuses_bad_values(values, message):
    assert message in render_error(values)
    with helm.Chart.load(CHART) as loaded, pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        loaded.validate_schema(deep_merge(BASE, values))


@pytest.mark.parametrize("values, message", [
    ({"database": {"url": ""}}, "set database.existingSecret"),
    ({"database": {"url": "", "existingSecret": "db", "existingSecretKey": ""}}, "database.existingSecretKey is empty"),
    ({"extraEnv": [{"name": "DATABASE_URL", "value": URL}]}, "extraEnv must not set DATABASE_URL"),
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
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
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
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
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
    docs = render({"migrationRunner": {"config": {"waitTimeout": 5}}}, chart=parent)
    pod = only(docs, "Pod")
    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
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


def materialize(docs: list[dict], root: Path) -> dict[str, Path]:
    """Write every volume the Job's container mounts under root; return mountPath -> local dir."""
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    paths = {}
    for mount in container(docs)["volumeMounts"]:
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


def run_rendered_job(docs: list[dict], root: Path, image_dirs: dict[str, Path]):
    """Run the rendered container the way the kubelet would, with the console script as the image."""
    image = dockerfile_facts()
    c = container(docs)
    paths = materialize(docs, root) | {k.rstrip("/"): v for k, v in image_dirs.items()}
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
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
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


def test_the_documented_downgrade_job_renders_as_ordinary_resources_with_its_own_name():
    """Chart README "Rollbacks": the newer release's values, mode job, a fullnameOverride, args downgrade."""
    newer = {"image": {"repository": "registry.example/app", "tag": "2.0"}}
    release = {(d["kind"], d["metadata"]["name"]) for d in render(newer)}
    for mode in ("hook", "job"):
        release |= {(d["kind"], d["metadata"]["name"]) for d in render(deep_merge(newer, {"mode": mode}))}
    docs = render(deep_merge(newer, {"mode": "job", "fullnameOverride": "shop-downgrade",
                                     "args": ["downgrade", "0004"]}))
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        assert not any(key.startswith(("helm.sh/hook", "argocd.argoproj.io")) for key in annotations(doc)), doc
        assert (doc["kind"], doc["metadata"]["name"]) not in release  # deleting it leaves the release alone
    job = only(docs, "Job")
    assert container(docs)["args"] == ["downgrade", "0004"]
    assert env_of(container(docs))["MIGRATE_IMAGE"] == "registry.example/app:2.0"
    assert job["spec"]["podFailurePolicy"]
    assert {"Secret", "ServiceAccount"} <= set(kinds(docs))


def test_the_image_is_recorded_only_when_it_holds_the_migrations():
    assert "MIGRATE_IMAGE" in env_of(container(render()))
    assert "MIGRATE_IMAGE" not in env_of(container(render(COMBINATIONS["volume"])))
