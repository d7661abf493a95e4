"""The champion's InferenceService as the tree holds it (same builder as `flywheel deploy`), its
ServiceAccount, PodDisruptionBudget and the bootstrap model URI.

- The object is `deployment.inferenceservice.render` of the env's DeploySpec (steady state, no
  canary) with this cluster's Placement: `predictor_replicas`, node selector, tolerations,
  topology spread over nodes and zones from 2 replicas, and ServiceAccount `flywheel-serving`
  (no API token) so Istio policies can name the serving pods' identity
  (`cluster.local/ns/<namespace>/sa/flywheel-serving`). It is validated like a deploy's.
- Who owns what: Flux creates it; the deploy step owns every later update (it patches the model
  URI and version on the live object). `kustomize.toolkit.fluxcd.io/ssa: IfNotPresent` makes
  Flux create the object when missing and never patch it back (Flux docs, Kustomization
  "Controlling the apply behavior of resources":
  https://fluxcd.io/flux/components/kustomize/kustomizations/#controlling-the-apply-behavior-of-resources).
- The model URI is a kustomize-replaceable value: ConfigMap `flywheel-model` (data.storageUri,
  data.modelVersion; `config.kubernetes.io/local-config: "true"`, so kustomize drops it from the
  output) feeds `replacements(ctx)`, which copy it into every place the builder writes it: the
  `--model_dir`/`--model_version` args of each container and the `flywheel/model-uri`/
  `flywheel/model-version` annotations. The builder's containers load the model themselves
  (ModelServer `--model_dir`), so the object has no `storageUri` field.
- PodDisruptionBudget (policy/v1), one per component, `minAvailable: 1`, only from 2 replicas: with
  one replica it would block every node drain (the only pod could never be evicted) without
  keeping anything up; with scale to zero (Knative, min 0) there may be no pod to protect and
  the autoscaler brings one back on demand. Per component (the `component` label KServe sets), so
  evictions cannot take every predictor while transformers stay up.
"""
from __future__ import annotations

from kubernetes import client as k8s

from deployment.inferenceservice import (
    MODEL_URI,
    MODEL_VERSION,
    Placement,
    ServedModel,
    isvc_name,
    render,
    to_dict,
    validate_inferenceservice,
)
from fleet.context import MODEL_URI_PLACEHOLDER, FleetContext
from gateways.kube_api import serialize

FEATURE: str | None = None
SCOPE = "cluster"

SERVICE_ACCOUNT = "flywheel-serving"
MODEL_CONFIG = "flywheel-model"  # the local-config ConfigMap the replacements read
MODEL_VERSION_PLACEHOLDER = "unversioned"  # deployment.deployers.UNVERSIONED: a model named by URI alone
FLUX_SSA = "kustomize.toolkit.fluxcd.io/ssa"
LOCAL_CONFIG = "config.kubernetes.io/local-config"
ISVC_POD_LABEL, COMPONENT_POD_LABEL = "serving.kserve.io/inferenceservice", "component"
# ConfigMap key -> (the builder's arg flag, annotation) that carry it on the InferenceService
MODEL_FIELDS = {"storageUri": ("--model_dir", MODEL_URI), "modelVersion": ("--model_version", MODEL_VERSION)}


def min_replicas(ctx: FleetContext) -> int:
    """The predictor's minimum on this cluster: the cluster's override, else the env's."""
    override = ctx.cluster.predictor_replicas
    return ctx.serving.min_replicas if override is None else override


def placement(ctx: FleetContext) -> Placement:
    tolerations = tuple(k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect)
                        for t in ctx.cluster.serving_tolerations)
    return Placement(service_account=SERVICE_ACCOUNT, node_selector=dict(ctx.cluster.serving_node_selector),
                     tolerations=tolerations, min_replicas=ctx.cluster.predictor_replicas,
                     spread=min_replicas(ctx) >= 2)


def inference_service(ctx: FleetContext) -> dict:
    """The validated InferenceService of this cluster, with the placeholder model."""
    spec = ctx.deploy
    obj = to_dict(render(spec.serving, image=spec.image, namespace=ctx.namespace, env=ctx.env,
                         model=ServedModel(spec.model_name, MODEL_VERSION_PLACEHOLDER, MODEL_URI_PLACEHOLDER),
                         object_store_endpoint=spec.object_store_endpoint, canary=False,
                         decision_threshold=spec.decision_threshold, placement=placement(ctx)))
    obj["metadata"]["labels"] = {**obj["metadata"]["labels"], **ctx.labels}
    obj["metadata"]["annotations"][FLUX_SSA] = "IfNotPresent"
    return validate_inferenceservice(obj)


def _meta(ctx: FleetContext, name: str, annotations: dict | None = None) -> k8s.V1ObjectMeta:
    return k8s.V1ObjectMeta(name=name, namespace=ctx.namespace, labels=dict(ctx.labels), annotations=annotations)


def _budgets(ctx: FleetContext, isvc: dict) -> list[dict]:
    if min_replicas(ctx) < 2:
        return []
    name = isvc["metadata"]["name"]
    return [serialize(k8s.V1PodDisruptionBudget(
        api_version="policy/v1", kind="PodDisruptionBudget", metadata=_meta(ctx, f"{name}-{component}"),
        spec=k8s.V1PodDisruptionBudgetSpec(min_available=1, selector=k8s.V1LabelSelector(
            match_labels={ISVC_POD_LABEL: name, COMPONENT_POD_LABEL: component}))))
        for component in ("predictor", "transformer") if isvc["spec"].get(component)]


def objects(ctx: FleetContext) -> list[dict]:
    """ServiceAccount, model ConfigMap (local-config), InferenceService and its budgets."""
    if not ctx.runs("serving"):
        return []
    isvc = inference_service(ctx)
    account = serialize(k8s.V1ServiceAccount(api_version="v1", kind="ServiceAccount",
                                             metadata=_meta(ctx, SERVICE_ACCOUNT),
                                             automount_service_account_token=False))
    model = serialize(k8s.V1ConfigMap(api_version="v1", kind="ConfigMap",
                                      metadata=_meta(ctx, MODEL_CONFIG, {LOCAL_CONFIG: "true"}),
                                      data={"storageUri": MODEL_URI_PLACEHOLDER,
                                            "modelVersion": MODEL_VERSION_PLACEHOLDER}))
    return [account, model, isvc, *_budgets(ctx, isvc)]


def platform_objects(ctx: FleetContext) -> list[dict]:
    return []


def _field_paths(isvc: dict, flag: str, annotation: str) -> list[str]:
    """Where the builder wrote the value after `flag`: each container's args index, and the annotation."""
    paths = []
    for component in ("predictor", "transformer"):
        for container in (isvc["spec"].get(component) or {}).get("containers") or []:
            args = container.get("args") or []
            if flag in args:
                paths.append(f"spec.{component}.containers.[name={container['name']}].args.{args.index(flag) + 1}")
    return [*paths, f"metadata.annotations.{annotation}"]  # no "." in the key: kustomize splits paths on dots


def replacements(ctx: FleetContext) -> list[dict]:
    """Kustomize `replacements` entries the cluster's kustomization carries (the model URI and version)."""
    if not ctx.runs("serving"):
        return []
    isvc = inference_service(ctx)
    select = {"group": "serving.kserve.io", "version": "v1beta1", "kind": "InferenceService",
              "name": isvc_name(ctx.deploy.model_name)}
    return [{"source": {"kind": "ConfigMap", "name": MODEL_CONFIG, "fieldPath": f"data.{key}"},
             "targets": [{"select": dict(select), "fieldPaths": _field_paths(isvc, flag, annotation)}]}
            for key, (flag, annotation) in MODEL_FIELDS.items()]
