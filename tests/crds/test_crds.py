"""The CRD copies in crds/ are the upstream files they claim to be: crds/upstream.yaml names each
one's project, version, commit, URL and sha256, and the copies are held to those hashes here, on
every run (fetching upstream cannot run here, so a copy is compared with what was recorded when
it was downloaded)."""
import hashlib
import re

import yaml

import crds

MANIFEST = yaml.safe_load(crds.UPSTREAM_MANIFEST.read_text())


def test_every_crd_copy_is_recorded_with_its_source():
    copies = {p.name for p in crds.PACKAGED_CRD_DIR.glob("*.yaml")} - {crds.UPSTREAM_MANIFEST.name}
    assert set(MANIFEST) == copies, "crds/upstream.yaml must name exactly the CRD copies beside it"
    assert {crds.PYTORCHJOB, crds.INFERENCESERVICE} <= copies
    for name, source in MANIFEST.items():
        assert set(source) == {"project", "version", "commit", "url", "sha256"}, name
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", source["version"]), name  # Istio's tags carry no "v"
        assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]), name
        # The URL pins the recorded version (a tag, never a branch) and ends in the copy's file name
        assert source["url"].startswith("https://raw.githubusercontent.com/"), name
        assert f"/{source['version']}/" in source["url"] and source["url"].endswith(f"/{name}"), name


def test_each_copy_is_byte_for_byte_the_recorded_upstream_file():
    for name, source in MANIFEST.items():
        digest = hashlib.sha256((crds.PACKAGED_CRD_DIR / name).read_bytes()).hexdigest()
        assert digest == source["sha256"], (f"crds/{name} differs from {source['project']} {source['version']} "
                                            f"({source['url']}): download it again, or record the new source")


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # the 2 MB KServe CRD: C parser when there
    """Reads a bare `=` scalar as a string (prometheus-operator's AlertmanagerConfig enum; yaml/pyyaml#89)."""


_Loader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def test_each_copy_defines_the_resource_it_is_named_after():
    """A `<group>_<plural>.yaml` copy is that one CRD; a copy kept under upstream's own name (a
    bundle such as Istio's crd-all.gen.yaml, Argo CD's applicationset-crd.yaml) holds only CRDs."""
    for name in MANIFEST:
        docs = [d for d in yaml.load_all((crds.PACKAGED_CRD_DIR / name).read_text(), Loader=_Loader) if d]
        assert docs and all(d["kind"] == "CustomResourceDefinition" for d in docs), name
        named = [f"{d['spec']['group']}_{d['spec']['names']['plural']}.yaml" for d in docs]
        if "_" in name:
            assert named == [name]
        else:
            assert MANIFEST[name]["url"].endswith(f"/{name}"), f"{name}: not <group>_<plural>.yaml nor upstream's name"
