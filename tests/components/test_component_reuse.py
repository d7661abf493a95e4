"""Components are reusable: `flywheel compile` writes each op as its own YAML that another team's
pipeline loads with `kfp.components.load_component_from_file`, described input by input."""
import pytest
import yaml
from kfp import compiler, dsl
from kfp.components import load_component_from_file

from components import ops
from pipelines.catalog import compile_components
from pipelines.config import load_settings


@pytest.fixture(scope="module")
def component_files(tmp_path_factory):
    return compile_components(load_settings("dev"), tmp_path_factory.mktemp("components"))


def test_every_op_is_written_as_a_component_yaml_in_the_env_image(component_files):
    # Given the dev environment's component files
    assert set(component_files) == set(ops())
    image = load_settings("dev").image.ref
    for name, path in component_files.items():
        spec = yaml.safe_load(path.read_text())
        # Then each holds one executor running the env's image, without a pip install at start
        (executor,) = spec["deploymentSpec"]["executors"].values()
        assert executor["container"]["image"] == image, name
        assert "pip install" not in " ".join(executor["container"]["command"]), name


def test_every_input_and_output_is_described_in_the_ir(component_files):
    # Given every op's compiled component
    for name, path in component_files.items():
        (component,) = yaml.safe_load(path.read_text())["components"].values()
        for side in ("inputDefinitions", "outputDefinitions"):
            for kind in ("parameters", "artifacts"):
                for field, definition in component.get(side, {}).get(kind, {}).items():
                    # Then the Kubeflow UI has a description for each of them (from Args:/Returns:)
                    assert definition.get("description", "").strip(), f"{name}: {side}.{kind}.{field} undescribed"


def test_a_foreign_pipeline_loads_and_compiles_our_components(component_files, tmp_path):
    # Given another team's pipeline built from two of our component files
    ingest = load_component_from_file(str(component_files["ingest"]))
    validate = load_component_from_file(str(component_files["validate"]))
    assert set(ingest.component_spec.inputs) == {"dataset_spec"}

    @dsl.pipeline(name="another-team")
    def foreign(dataset_spec: dict, suite: dict):
        snapshot = ingest(dataset_spec=dataset_spec)
        validate(dataset=snapshot.outputs["dataset"], suite=suite)

    # When it is compiled
    out = tmp_path / "foreign.yaml"
    compiler.Compiler().compile(foreign, str(out))
    # Then our components are in it, wired artifact to artifact
    spec = yaml.safe_load(out.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"ingest-op", "validate-op"}
    source = tasks["validate-op"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]
    assert source == {"outputArtifactKey": "dataset", "producerTask": "ingest-op"}
