"""The deploy step patches the model it rolls out, not the placement GitOps gave the cluster."""
from deployment.rollout import patch_body


def test_the_deploy_patch_keeps_the_clusters_placement_and_changes_the_model():
    live = {"metadata": {"annotations": {"flywheel/model-version": "3"}},
            "spec": {"predictor": {"serviceAccountName": "flywheel-serving", "nodeSelector": {"pool": "ml"},
                                   "tolerations": [{"key": "gpu", "operator": "Exists"}], "minReplicas": 2,
                                   "containers": [{"name": "kserve-container", "args": ["--model_dir=a"]}]}}}
    desired = {"metadata": {"annotations": {"flywheel/model-version": "4"}},
               "spec": {"predictor": {"minReplicas": 2,
                                      "containers": [{"name": "kserve-container", "args": ["--model_dir=b"]}]}}}
    body = patch_body(live, desired)
    predictor = body["spec"]["predictor"]
    assert predictor["containers"][0]["args"] == ["--model_dir=b"]
    assert not {"serviceAccountName", "nodeSelector", "tolerations"} & set(predictor)  # untouched, not deleted
    assert body["metadata"]["annotations"] == {"flywheel/model-version": "4"}


def test_other_fields_the_render_drops_are_still_removed():
    live = {"spec": {"predictor": {"logger": {"mode": "all"}, "containers": []}}}
    desired = {"spec": {"predictor": {"containers": []}}}
    assert patch_body(live, desired)["spec"]["predictor"] == {"logger": None}
