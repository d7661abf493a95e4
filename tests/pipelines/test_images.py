"""`make image ENV=<env>`'s Python half (pipelines/images.py): pinning a pushed digest into
config/<env>.yaml by a one-line edit, and refusing to render an env whose digest is the placeholder."""
import json
import shutil

import pytest

from pipelines.config import ConfigError, load_settings
from pipelines.images import PLACEHOLDER_DIGEST, PinError, _cli, build_args, image_problems, pin, pinned_text
from tests.support import CONFIG_DIR

DIGEST = "sha256:" + "3f" * 32


@pytest.fixture
def config_dir(tmp_path):
    """A copy of the project's config/, to pin into."""
    shutil.copytree(CONFIG_DIR, tmp_path / "config")
    return tmp_path / "config"


def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    old, new = before.splitlines(keepends=True), after.splitlines(keepends=True)
    assert len(old) == len(new), "a line was added or removed"
    return [(a, b) for a, b in zip(old, new) if a != b]


def test_prod_renders_nothing_while_its_digest_is_the_placeholder():
    settings = load_settings("prod")
    assert settings.image.digest == PLACEHOLDER_DIGEST and settings.image.require_digest
    assert image_problems(settings, "config/prod.yaml") == [
        "config/prod.yaml: image.digest is the all-zero placeholder (sha256:000...) and "
        "image.require_digest is true; build and pin it: make image ENV=prod"]


def test_envs_that_run_a_tag_have_no_image_problem():
    for env in ("dev", "staging", "local"):
        assert image_problems(load_settings(env), f"config/{env}.yaml") == [], env


def test_pinning_prod_changes_its_digest_line_and_no_other_byte(config_dir):
    # Given prod's file with the placeholder
    file = config_dir / "prod.yaml"
    before = file.read_text()
    # When a pushed digest is pinned
    assert pin(file, DIGEST) is True
    after = file.read_text()
    # Then exactly the digest line changed, its indentation kept, and the env now renders that digest
    assert changed_lines(before, after) == [(f"  digest: {PLACEHOLDER_DIGEST}\n", f"  digest: {DIGEST}\n")]
    settings = load_settings("prod", config_dir)
    assert settings.image.ref == f"ghcr.io/flywheel-ml/flywheel@{DIGEST}"
    assert image_problems(settings, config_dir / "prod.yaml") == []
    # And pinning the same digest again leaves the file alone
    assert pin(file, DIGEST) is False and file.read_text() == after


def test_make_images_pin_step_reads_buildx_metadata(config_dir, tmp_path, capsys):
    # Given the file `docker buildx build --metadata-file` writes after a push
    metadata = tmp_path / "image-prod.json"
    metadata.write_text(json.dumps({"containerimage.digest": DIGEST, "image.name": "ghcr.io/flywheel-ml/flywheel:0.1"}))
    # When `python -m pipelines.images pin` runs on it, then `check`
    assert _cli(["pin", "--env", "prod", "--config-dir", str(config_dir), "--metadata", str(metadata)]) == 0
    assert _cli(["check", "--env", "prod", "--config-dir", str(config_dir)]) == 0
    # Then the env's file holds the digest
    assert load_settings("prod", config_dir).image.digest == DIGEST
    assert f"@{DIGEST}" in capsys.readouterr().out


def test_check_fails_for_the_placeholder_naming_the_file(config_dir, capsys):
    assert _cli(["check", "--env", "prod", "--config-dir", str(config_dir)]) == 1
    out = capsys.readouterr().out
    assert "prod.yaml: image.digest is the all-zero placeholder" in out and "make image ENV=prod" in out


@pytest.mark.parametrize("content, why", [
    ("", "no such file"), ("{not json", "not JSON"), ('{"containerimage.digest": "sha256:abc"}', "is not sha256"),
    ('{"image.name": "x"}', "containerimage.digest: None")])
def test_bad_buildx_metadata_pins_nothing(config_dir, tmp_path, capsys, content, why):
    metadata = tmp_path / "metadata.json"
    if content:
        metadata.write_text(content)
    before = (config_dir / "prod.yaml").read_text()
    assert _cli(["pin", "--env", "prod", "--config-dir", str(config_dir), "--metadata", str(metadata)]) == 1
    assert why in capsys.readouterr().err and (config_dir / "prod.yaml").read_text() == before


def test_a_digest_that_is_not_sha256_hex_is_refused():
    with pytest.raises(PinError, match=r"prod.yaml: image.digest: 'sha256:ABC' is not"):
        pinned_text("image:\n  tag: x\n", "sha256:ABC", source="config/prod.yaml")


def test_pinning_adds_a_digest_line_to_an_image_block_without_one():
    text = "# staging\nnamespace: s\nimage:  # ours\n    tag: \"0.1.0\"   # the release\nkfp:\n  digest: keep\n"
    new = pinned_text(text, DIGEST)
    assert new == ("# staging\nnamespace: s\nimage:  # ours\n    digest: " + DIGEST
                   + "\n    tag: \"0.1.0\"   # the release\nkfp:\n  digest: keep\n")


def test_only_the_image_blocks_own_digest_key_is_edited():
    # A nested `digest:` deeper in the image block and another block's `digest:` are not image.digest
    text = ("image:\n  tag: t\n  extra:\n    digest: nested\n  digest: null  # pinned by make image\n"
            "kfp:\n  digest: other\n")
    new = pinned_text(text, DIGEST)
    assert changed_lines(text, new) == [("  digest: null  # pinned by make image\n",
                                         f"  digest: {DIGEST}  # pinned by make image\n")]


def test_a_flow_style_image_mapping_is_refused_rather_than_rewritten():
    with pytest.raises(PinError, match="config/x.yaml: image: write it as a block mapping"):
        pinned_text("image: {tag: t}\n", DIGEST, source="config/x.yaml")


def test_crlf_files_keep_their_line_endings():
    text = "image:\r\n  tag: t\r\n  digest: " + PLACEHOLDER_DIGEST + "\r\n"
    assert pinned_text(text, DIGEST) == "image:\r\n  tag: t\r\n  digest: " + DIGEST + "\r\n"


def test_require_digest_without_a_digest_does_not_load(config_dir):
    file = config_dir / "staging.yaml"
    file.write_text(file.read_text().replace("image:\n", "image:\n  require_digest: true\n", 1))
    with pytest.raises(ConfigError, match=r"staging.yaml: image: image.require_digest is true but image.digest "
                                          r"is not set"):
        load_settings("staging", config_dir)


def test_a_placeholder_in_an_env_that_does_not_require_a_digest_is_still_refused(config_dir):
    # The placeholder wins over the tag in Image.ref, so it would render an image no registry holds
    file = config_dir / "staging.yaml"
    file.write_text(file.read_text().replace("image:\n", f"image:\n  digest: {PLACEHOLDER_DIGEST}\n", 1))
    (problem,) = image_problems(load_settings("staging", config_dir), "config/staging.yaml")
    assert problem.startswith("config/staging.yaml: image.digest is the all-zero placeholder (sha256:000...)")
    assert "make image ENV=staging" in problem


def test_gpu_envs_build_cuda_torch_and_the_embedded_env_cpu_torch():
    prod = build_args(load_settings("prod"))
    assert prod[:2] == ["--tag", "ghcr.io/flywheel-ml/flywheel:0.1.0"]
    assert any(arg.startswith("TORCH_INDEX=https://download.pytorch.org/whl/cu") for arg in prod)
    assert not any("TORCH_INDEX" in arg for arg in build_args(load_settings("local")))
