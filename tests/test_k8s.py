"""deploy/k8s/values.yaml through dagster-k8s's own code, without a cluster: the run launcher config the chart
renders from our values is valid against K8sRunLauncher's schema, the instance's dagster.yaml it renders loads
with d2m's batched event log storage on the chart's PostgreSQL, and the Job it builds for a d2m run asks for
exactly one GPU, takes the S3 Secret's variables and runs the run worker command."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from dagster import AssetKey
from dagster._config import process_config, resolve_to_config_type
from dagster._core.code_pointer import ModuleCodePointer
from dagster._core.instance.config import dagster_instance_config
from dagster._core.launcher import LaunchRunContext
from dagster._core.origin import DEFAULT_DAGSTER_ENTRY_POINT, JobPythonOrigin, RepositoryPythonOrigin
from dagster._core.storage.event_log import EventLogStorage
from dagster._core.test_utils import create_run_for_test, instance_for_test
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import ConfigurableClassData, deserialize_value
from dagster_k8s import K8sRunLauncher

from conftest import REPO
from d2m_assets.storage import BATCH_ENV, BATCH_SIZE, BatchedPostgresEventLogStorage

VALUES = yaml.safe_load((REPO / "deploy" / "k8s" / "values.yaml").read_text())
IMAGE_PYTHON = "/opt/d2m/.venv/bin/python"  # deploy/k8s/Dockerfile
RELEASE = {"name": "dagster", "namespace": "d2m", "dagster_home": "/opt/dagster/dagster_home", "service_account": "dagster",
           "instance_config_map": "dagster-instance", "pg_secret": "dagster-postgresql-secret"}


def chart_run_launcher_config(values: dict) -> dict:
    """What the chart's `dagsterYaml.runLauncher.k8s` template renders from these values (the keys we use)."""
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    config = {"load_incluster_config": k8s["loadInclusterConfig"], "job_namespace": k8s.get("jobNamespace", RELEASE["namespace"]),
              "image_pull_policy": k8s["imagePullPolicy"], "service_account_name": RELEASE["service_account"],
              "dagster_home": RELEASE["dagster_home"], "instance_config_map": RELEASE["instance_config_map"],
              "postgres_password_secret": RELEASE["pg_secret"]}
    if k8s.get("envSecrets"):
        config["env_secrets"] = [s["name"] for s in k8s["envSecrets"]]
    for key, out in (("envVars", "env_vars"), ("volumeMounts", "volume_mounts"), ("volumes", "volumes"),
                     ("resources", "resources")):
        if k8s.get(key):
            config[out] = k8s[key]
    if k8s.get("failPodOnRunFailure"):
        config["fail_pod_on_run_failure"] = True
    run_k8s = k8s.get("runK8sConfig", {})
    names = {"containerConfig": "container_config", "podSpecConfig": "pod_spec_config", "jobSpecConfig": "job_spec_config",
             "podTemplateSpecMetadata": "pod_template_spec_metadata", "jobMetadata": "job_metadata"}
    if run_k8s:
        config["run_k8s_config"] = {names[k]: v for k, v in run_k8s.items()}
    return config


def chart_postgres_config(values: dict) -> dict:
    """What the chart's `dagsterYaml.postgresql.config` renders (chart defaults: port 5432, no params): the
    PostgreSQL connection of its run, schedule and event log storages."""
    pg = values["postgresql"]
    host = f"{RELEASE['name']}-postgresql" if pg["enabled"] else pg["postgresqlHost"]
    config = {"username": pg["postgresqlUsername"], "password": {"env": "DAGSTER_PG_PASSWORD"}, "hostname": host,
              "db_name": pg["postgresqlDatabase"], "port": pg.get("service", {}).get("port", 5432),
              "params": pg.get("postgresqlParams", {})}
    if pg.get("postgresqlScheme"):
        config["scheme"] = pg["postgresqlScheme"]
    return {"postgres_db": config}


def chart_instance_settings(values: dict) -> dict:
    """The daemon settings the chart renders into dagster.yaml: the queued run coordinator (its config left
    out when its values are empty), concurrency (only when enabled), run monitoring, run retries, and the
    run launcher."""
    daemon, conc = values["dagsterDaemon"], values["concurrency"]
    monitoring = daemon["runMonitoring"]
    assert daemon["runCoordinator"] == {"enabled": True, "type": "QueuedRunCoordinator"}  # the case read here
    settings = {
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator"},
        "run_monitoring": {"enabled": monitoring["enabled"], "start_timeout_seconds": monitoring["startTimeoutSeconds"],
                           "poll_interval_seconds": monitoring["pollIntervalSeconds"],
                           "max_resume_run_attempts": monitoring["maxResumeRunAttempts"]},
        "run_retries": {"enabled": daemon["runRetries"]["enabled"], "max_retries": daemon["runRetries"]["maxRetries"]},
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": chart_run_launcher_config(values)},
    }
    if conc.get("enabled"):
        settings["concurrency"] = {
            "runs": {"max_concurrent_runs": conc["runs"]["maxConcurrentRuns"]},
            "pools": {"default_limit": conc["pools"]["defaultLimit"], "granularity": conc["pools"]["granularity"]}}
    return settings


def chart_dagster_yaml(values: dict) -> str:
    """The instance ConfigMap's dagster.yaml as `configmap-instance.yaml` writes it, for the keys we use: the
    chart's own PostgreSQL storages, the settings above, then `additionalInstanceConfig` appended as YAML
    (so a key given there appears twice, the chart's first)."""
    pg = chart_postgres_config(values)
    sections = [{"schedule_storage": {"module": "dagster_postgres.schedule_storage", "class": "PostgresScheduleStorage",
                                      "config": pg}},
                {"run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage", "config": pg}},
                {"event_log_storage": {"module": "dagster_postgres.event_log", "class": "PostgresEventLogStorage",
                                       "config": pg}},
                chart_instance_settings(values), values.get("additionalInstanceConfig") or {}]
    return "".join(yaml.safe_dump(section, sort_keys=False) for section in sections if section)


class RecordedBatchApi:
    """Where dagster-k8s hands the Job it built (instead of a cluster's API server)."""

    def __init__(self) -> None:
        self.jobs: list = []

    def create_namespaced_job(self, body, namespace: str, **_) -> None:
        self.jobs.append((namespace, body))


KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: none, user: {token: none}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""


def test_launcher_config_is_valid_against_dagster_k8s_schema() -> None:
    config = chart_run_launcher_config(VALUES)
    result = process_config(resolve_to_config_type(K8sRunLauncher.config_type()), config)
    assert result.success, [e.message for e in result.errors]
    assert chart_instance_settings(VALUES)["concurrency"]["pools"] == {"default_limit": 8, "granularity": "run"}


def test_instance_stores_events_with_d2m_batched_storage_on_the_charts_postgresql(tmp_path: Path, monkeypatch) -> None:
    text = chart_dagster_yaml(VALUES)
    assert text.count("event_log_storage:") == 2  # the chart's, then ours
    (tmp_path / "dagster.yaml").write_text(text)
    config, _ = dagster_instance_config(str(tmp_path))  # Dagster's own loading and validation of dagster.yaml
    storage = config["event_log_storage"]
    assert (storage["module"], storage["class"]) == ("d2m_assets.storage", "BatchedPostgresEventLogStorage")
    assert storage["config"] == config["run_storage"]["config"] == chart_postgres_config(VALUES)  # the same database
    assert storage["config"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}  # from the chart's Secret

    # as a pod loads it: the class found by name, its config checked against its schema, the password from the env
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "from-secret")
    monkeypatch.setenv(BATCH_ENV, "")  # unset now, and as before once the test is over (the storage sets it)
    monkeypatch.delenv(BATCH_ENV)
    offline = storage["config"] | {"should_autocreate_tables": False}  # no server here: build, do not connect
    loaded = ConfigurableClassData(storage["module"], storage["class"], yaml.safe_dump(offline)).rehydrate(EventLogStorage)
    assert type(loaded) is BatchedPostgresEventLogStorage
    assert loaded.postgres_url == "postgresql+psycopg2://dagster:from-secret@dagster-postgresql:5432/dagster"
    assert loaded._engine.dialect.driver == "psycopg2"  # noqa: SLF001 (the driver the image ships)
    assert os.environ[BATCH_ENV] == str(BATCH_SIZE)  # the pod's runs and backfills batch their planned events

    # every pod that loads the instance runs d2m's image, which holds that class
    user_code = VALUES["dagster-user-deployments"]["deployments"][0]["image"]
    assert VALUES["dagsterDaemon"]["image"] == VALUES["dagsterWebserver"]["image"] == user_code


def test_pod_of_a_d2m_run_asks_one_gpu_takes_the_secret_and_runs_the_run_worker(tmp_path: Path) -> None:
    (tmp_path / "kubeconfig").write_text(KUBECONFIG)
    config = chart_run_launcher_config(VALUES) | {"load_incluster_config": False, "kubeconfig_file": str(tmp_path / "kubeconfig")}
    api = RecordedBatchApi()
    launcher = K8sRunLauncher(**process_config(resolve_to_config_type(K8sRunLauncher.config_type()), config).value,
                              k8s_client_batch_api=api)
    user_code = VALUES["dagster-user-deployments"]["deployments"][0]
    image = f"{user_code['image']['repository']}:{user_code['image']['tag']}"
    origin = JobPythonOrigin("__ASSET_JOB", RepositoryPythonOrigin(  # as the chart's `dagster api grpc` reports it
        IMAGE_PYTHON, ModuleCodePointer("d2m_assets", "defs", working_directory=None), container_image=image,
        entry_point=DEFAULT_DAGSTER_ENTRY_POINT))
    with instance_for_test(temp_dir=str(tmp_path)) as instance:
        launcher.register_instance(instance)
        run = create_run_for_test(instance, job_name="__ASSET_JOB", job_code_origin=origin,
                                  asset_selection=frozenset({AssetKey("shard_metadata")}), tags={"dagster/partition": "00000"})
        launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))

    ((namespace, job),) = api.jobs
    assert namespace == RELEASE["namespace"]
    pod = job.spec.template.spec
    (container,) = pod.containers
    assert not pod.init_containers
    assert container.image == image
    assert container.resources.limits["nvidia.com/gpu"] == "1"  # exactly one GPU for the run's pod
    assert "nvidia.com/gpu" not in (container.resources.requests or {})
    assert [t.key for t in pod.tolerations] == ["nvidia.com/gpu"]
    assert [e.secret_ref.name for e in container.env_from if e.secret_ref] == ["d2m-s3"]
    env = {e.name: e.value for e in container.env}
    assert env["D2M_CONFIG"] == "/etc/d2m/d2m.yml" and env["DAGSTER_HOME"] == RELEASE["dagster_home"]
    (password,) = [e.value_from.secret_key_ref for e in container.env if e.name == "DAGSTER_PG_PASSWORD"]
    assert password.name == RELEASE["pg_secret"]  # the instance's storages read it from the chart's Secret
    assert {m.mount_path for m in container.volume_mounts} >= {"/etc/d2m", "/weights"}
    assert container.args[:3] == ["dagster", "api", "execute_run"]
    args = deserialize_value(container.args[3], ExecuteRunArgs)
    assert args.run_id == run.run_id and args.job_origin.repository_origin.code_pointer.module == "d2m_assets"
    assert job.spec.backoff_limit == 0 and job.spec.ttl_seconds_after_finished == 86400
    print({"pod": {"image": container.image, "args": container.args[:3], "limits": container.resources.limits,
                   "requests": container.resources.requests, "env_from": [e.secret_ref.name for e in container.env_from],
                   "tolerations": [t.key for t in pod.tolerations]}})

