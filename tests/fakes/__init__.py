"""Test doubles for what cannot run here, each checked against the real contract. Each fake server
faces exactly one gateway, over real HTTP, with that system's own client on the other side:

    kube_api_server.py   the Kubernetes API (PyTorchJobs, TrainJobs, pods and logs, InferenceServices,
                         Deployments)    <- gateways/kube_api.py
                         made of kube_core.py (server, routes, CRD-schema checks), kube_operators.py,
                         kube_pytorchjobs.py, kube_trainjobs.py, kube_inferenceservices.py,
                         kube_isvc_controllers.py and json_patch.py
    kfp_api_server.py    the KFP v2beta1 API                                   <- gateways/kfp_api.py
                         made of kfp_core.py (server, routes, auth, error shapes), kfp_contract.py
                         (request checks against kfp_server_api), kfp_pipelines.py, kfp_runs.py and
                         kfp_recurring_runs.py

MLflow needs no fake: tests run the real MLflow on a SQLite file (gateways/mlflow_api.py).
Stand-ins for the pipeline catalog, not for a server: tiny_pipeline.py, tiny_registry.py (what
submit and schedule publish to the fake KFP API), monitor_pipeline.py (the monitoring check's ops
under kfp.local without a registry).
"""
