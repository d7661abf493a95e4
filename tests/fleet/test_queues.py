"""Kueue objects per cluster: held to the vendored CRDs, matched to the cluster's GPU pool, able to
admit one training job; and the namespace quota sized to what runs at once."""
from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest

import crds
from fleet import monitor, queues
from specs.quantity import parse
from tests.fleet.conftest import contexts

CRD_OF = {"ResourceFlavor": queues.RESOURCEFLAVORS, "ClusterQueue": queues.CLUSTERQUEUES,
          "LocalQueue": queues.LOCALQUEUES}


def kueue_objects(ctx) -> list[dict]:
    return queues.platform_objects(ctx) + queues.objects(ctx)


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def with_training(ctx, **changes):
    """The context with training changed (e.g. workers=99), config otherwise as committed."""
    return dataclasses.replace(ctx, training=ctx.training.model_copy(update=changes))


def with_queue(ctx, **changes):
    fleet = ctx.fleet.model_copy(update={"queue": ctx.fleet.queue.model_copy(update=changes)})
    return dataclasses.replace(ctx, fleet=fleet)


def cel_problems(cq: dict) -> list[str]:
    """The ClusterQueue CRD's CEL rules (x-kubernetes-validations), which jsonschema does not run."""
    spec, problems = cq["spec"], []
    for i, group in enumerate(spec["resourceGroups"]):
        for flavor in group["flavors"]:
            if [r["name"] for r in flavor["resources"]] != group["coveredResources"]:
                problems.append(f"resourceGroups[{i}]: flavor {flavor['name']} resources != coveredResources")
    borrowing = [r for g in spec["resourceGroups"] for f in g["flavors"] for r in f["resources"]
                 if "borrowingLimit" in r]
    if borrowing and not spec.get("cohortName"):
        problems.append("borrowingLimit must be nil when cohort is empty")
    return problems


def test_every_kueue_object_holds_to_its_vendored_crd(training_ctx):
    objs = kueue_objects(training_ctx)
    assert sorted(o["kind"] for o in objs) == ["ClusterQueue", "LocalQueue", "ResourceFlavor", "ResourceFlavor"]
    for obj in objs:
        assert obj["apiVersion"] == queues.API_VERSION
        assert crds.schema_problems(obj, CRD_OF[obj["kind"]], queues.VERSION) == [], obj["metadata"]["name"]
        assert obj["metadata"]["labels"] == training_ctx.labels
    assert cel_problems(by_kind(objs, "ClusterQueue")[0]) == []


@pytest.mark.parametrize("kind", sorted(CRD_OF))
def test_a_planted_unknown_field_fails_the_crd(kind):
    obj = by_kind(kueue_objects(contexts("prod")[0]), kind)[0]
    obj["spec"]["cohort"] = "flywheel"  # v1beta1's name: v1beta2 calls it cohortName
    assert any("unknown field 'cohort'" in p for p in crds.schema_problems(obj, CRD_OF[kind], queues.VERSION))


def test_cel_check_catches_borrowing_without_a_cohort():
    cq = by_kind(queues.platform_objects(contexts("prod")[0]), "ClusterQueue")[0]
    del cq["spec"]["cohortName"]
    assert cel_problems(cq) == ["borrowingLimit must be nil when cohort is empty"]
    no_cohort = by_kind(queues.platform_objects(with_queue(contexts("prod")[0], cohort="")), "ClusterQueue")[0]
    assert "cohortName" not in no_cohort["spec"] and cel_problems(no_cohort) == []


def test_gpu_flavor_matches_the_clusters_pool(training_ctx):
    pool, objs = training_ctx.cluster.gpu, queues.platform_objects(training_ctx)
    flavors = {f["metadata"]["name"]: f for f in by_kind(objs, "ResourceFlavor")}
    cq = by_kind(objs, "ClusterQueue")[0]["spec"]
    gpu_group = next(g for g in cq["resourceGroups"] if g["coveredResources"] == [pool.resource])
    (gpu_flavor,) = gpu_group["flavors"]
    flavor = flavors[gpu_flavor["name"]]["spec"]  # the queue names a flavor that is rendered
    assert flavor["nodeLabels"] == {**training_ctx.cluster.node_selector, "nvidia.com/gpu.product": pool.product}
    assert flavor.get("tolerations", []) == [t.model_dump(exclude_none=True) for t in training_ctx.cluster.tolerations]
    assert gpu_flavor["resources"] == [{"name": pool.resource, "nominalQuota": str(pool.quota),
                                        "borrowingLimit": str(training_ctx.fleet.queue.borrowing_limit_gpus)}]
    assert {f["name"] for g in cq["resourceGroups"] for f in g["flavors"]} <= set(flavors)
    assert cq["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": training_ctx.namespace}}
    assert cq["cohortName"] == training_ctx.fleet.queue.cohort


def test_flavor_names_say_product_and_slice():
    assert queues.flavor_name("NVIDIA-A100-SXM4-80GB", "nvidia.com/gpu") == "a100-80gb"
    assert queues.flavor_name("NVIDIA-A100-SXM4-40GB", "nvidia.com/mig-1g.5gb") == "a100-40gb-mig-1g-5gb"
    assert queues.flavor_name("NVIDIA-H100-PCIe", "nvidia.com/gpu") == "h100"


def test_the_queue_covers_what_a_training_job_asks_and_admits_one(training_ctx):
    t, queue, pool = training_ctx.training, training_ctx.fleet.queue, training_ctx.cluster.gpu
    cq = by_kind(queues.platform_objects(training_ctx), "ClusterQueue")[0]["spec"]
    covered = {r for g in cq["resourceGroups"] for r in g["coveredResources"]}
    asked = {"cpu", "memory"} | ({t.resources.gpu.resource} if t.resources.gpu.count else set())
    assert asked <= covered  # an uncovered resource makes Kueue refuse the job for good
    assert t.workers * parse(t.resources.cpu) <= parse(queue.cpu)
    assert t.workers * parse(t.resources.memory) <= parse(queue.memory)
    assert t.workers * t.resources.gpu.count <= pool.quota + queue.borrowing_limit_gpus
    assert queues.admitted_jobs(training_ctx) >= 1


@pytest.mark.parametrize(("change", "keys"), [
    ({"workers": 16}, ["training.workers x training.resources.gpu.count", "fleet.clusters[].gpu.quota",
                       "fleet.queue.borrowing_limit_gpus"]),
    ({"resources": {"cpu": "64", "memory": "8Gi", "gpu": {"count": 1, "resource": "nvidia.com/gpu",
                                                          "product": "NVIDIA-A100-SXM4-80GB"}}},
     ["training.resources.cpu", "fleet.queue.cpu"]),
    ({"resources": {"cpu": "1", "memory": "8Gi", "gpu": {"count": 1, "resource": "nvidia.com/mig-1g.5gb"}}},
     ["training.resources.gpu.resource", "fleet.clusters[].gpu.resource"]),
    ({"resources": {"cpu": "1", "memory": "8Gi", "gpu": {"count": 1, "product": "NVIDIA-H100-80GB-HBM3"}}},
     ["training.resources.gpu.product", "fleet.clusters[].gpu.product"]),
])
def test_a_job_the_queue_could_never_admit_is_a_config_error(change, keys):
    from specs.training import Resources
    if "resources" in change:
        change = {"resources": Resources.model_validate(change["resources"])}
    ctx = with_training(contexts("prod")[0], **change)
    with pytest.raises(queues.QueueConfigError) as err:
        queues.platform_objects(ctx)
    assert "config/prod.yaml, cluster 'prod-eu-a'" in str(err.value)
    for key in keys:
        assert key in str(err.value)


def test_queue_disabled_renders_no_kueue_objects():
    ctx = with_queue(contexts("staging")[0], enabled=False)
    assert queues.platform_objects(ctx) == [] and queues.objects(ctx) == []


def test_local_queue_points_at_the_envs_cluster_queue(fleet_ctx):
    (lq,) = queues.objects(fleet_ctx)
    assert lq["metadata"]["name"] == queues.LOCAL_QUEUE and lq["metadata"]["namespace"] == fleet_ctx.namespace
    assert lq["spec"] == {"clusterQueue": f"flywheel-{fleet_ctx.env}"}


# -- the namespace quota ---------------------------------------------------------------------


def test_quota_admits_one_training_run_serving_and_the_monitor_at_once(training_ctx):
    hard, t, s = queues.namespace_quota(training_ctx), training_ctx.training, training_ctx.serving
    replicas = max(s.max_replicas, training_ctx.cluster.predictor_replicas or 0)
    # A lower bound computed apart from the module: one job, serving's model containers, and the
    # monitor's containers as fleet/monitor.py renders them.
    (deployment,) = [o for o in monitor.objects(training_ctx) if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    monitor_pods = deployment["spec"]["replicas"]
    limits = [c["resources"]["limits"] for c in pod["containers"]]
    cpu = (t.workers * parse(t.resources.cpu) + 2 * replicas * parse(s.cpu)
           + monitor_pods * sum(parse(lim["cpu"]) for lim in limits))
    memory = (t.workers * parse(t.resources.memory) + 2 * replicas * parse(s.memory)
              + monitor_pods * sum(parse(lim["memory"]) for lim in limits))
    assert parse(hard["requests.cpu"]) >= cpu and parse(hard["limits.cpu"]) == parse(hard["requests.cpu"])
    assert parse(hard["requests.memory"]) >= memory
    assert int(hard["pods"]) >= t.workers + replicas + monitor_pods
    assert int(hard[f"requests.{t.resources.gpu.resource}"]) >= t.workers * t.resources.gpu.count
    assert hard["services.loadbalancers"] == hard["services.nodeports"] == "0"


def test_quota_gpus_are_what_the_cluster_queue_admits(training_ctx):
    hard, pool = queues.namespace_quota(training_ctx), training_ctx.cluster.gpu
    assert hard[f"requests.{pool.resource}"] == str(pool.quota + training_ctx.fleet.queue.borrowing_limit_gpus)
    if pool.resource != "nvidia.com/gpu":
        assert hard["requests.nvidia.com/gpu"] == "0"  # a MIG env may not take whole GPUs


def test_quota_training_is_bounded_by_the_queue_not_by_every_trial():
    ctx = contexts("prod")[0]  # 4 trials at once x 4 workers x 1 GPU; the queue admits 8 + 4 GPUs
    assert queues.concurrent_jobs(ctx) == 4 and queues.admitted_jobs(ctx) == 3
    training = queues.quota_parts(ctx)[0]
    assert training.pods == 12 and training.cpu == 12 * Decimal(8)
    unqueued = queues.quota_parts(with_queue(ctx, enabled=False))[0]
    assert unqueued.pods == 16  # without Kueue every trial's pods run (today's sizing)


def test_a_cluster_without_training_gets_no_training_quota():
    ctx = contexts("prod")[0]
    serving_only = dataclasses.replace(ctx, cluster=ctx.cluster.model_copy(update={"runs": ["serving"]}))
    hard = queues.namespace_quota(serving_only)
    assert hard["requests.nvidia.com/gpu"] == "0" and queues.platform_objects(serving_only) == []
    assert parse(hard["requests.cpu"]) < parse(queues.namespace_quota(ctx)["requests.cpu"])


def test_quota_summary_is_one_line_with_the_numbers(training_ctx):
    line, hard = queues.quota_summary(training_ctx), queues.namespace_quota(training_ctx)
    assert "\n" not in line and hard["requests.cpu"] in line and f"{hard['pods']} pods" in line
    assert "admitted job(s)" in line and "monitor" in line


def test_quota_counts_the_task_pods_config_asks_for():
    ctx = contexts("prod")[0]
    bigger = dataclasses.replace(ctx, kfp_task_cpu="4", kfp_task_memory="16Gi")
    assert parse(queues.namespace_quota(bigger)["requests.cpu"]) > parse(queues.namespace_quota(ctx)["requests.cpu"])
    assert "4/16Gi" in queues.quota_summary(bigger)


def test_a_shadow_challenger_is_counted_as_a_second_serving_part():
    # Given dev (Standard mode, where a challenger can serve) with and without evaluation.shadow
    from pipelines.config import load_settings
    from pipelines.fleet_context import fleet_contexts

    plain = fleet_contexts(load_settings("dev"))[0]
    shadow = fleet_contexts(load_settings("dev", overrides={"evaluation": {"shadow": {"rows": 100}}}))[0]
    assert (plain.shadow, shadow.shadow) == (False, True)
    # Then the quota grows by exactly the champion's serving part: the challenger's pods are admitted
    (serving,) = [p for p in queues.quota_parts(plain) if p.what.startswith("serving")]
    before, after = queues.namespace_quota(plain), queues.namespace_quota(shadow)
    assert parse(after["requests.cpu"]) - parse(before["requests.cpu"]) == serving.cpu
    assert parse(after["requests.memory"]) - parse(before["requests.memory"]) == serving.memory
    assert int(after["pods"]) - int(before["pods"]) == serving.pods
    assert "shadow challenger" in queues.quota_summary(shadow)
    assert "shadow challenger" not in queues.quota_summary(plain)
