"""The project's images: what `make image ENV=<env>` builds, and the digest it pins in config.

Two Dockerfiles at the repository root build from one `constraints.txt`:

* `Dockerfile`: the pipeline image. Every KFP task and training pod runs it (and the serving pods
  while config names one image per env); CPU torch by default, CUDA torch for an env that trains
  on NVIDIA GPUs (`--build-arg TORCH_INDEX=...`, see `build_args`).
* `Dockerfile.serving`: the serving image (predictor, transformer, monitor service): CPU torch,
  and only the distributions `requirements-serving.txt` names.

`config/<env>.yaml`'s `image.digest` is what an env runs (`Image.ref` prefers it to the tag). An env
with `image.require_digest: true` (prod) must not render with the all-zero placeholder: that is
`image_problems`, which `flywheel render` asks before writing anything.

    python -m pipelines.images build-args --env prod           # the tag and build args for buildx
    python -m pipelines.images pin --env prod --metadata FILE  # buildx's --metadata-file output
    python -m pipelines.images pin --env prod --digest sha256:<64 hex>
    python -m pipelines.images check --env prod                # exit 1 with the problems, if any
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from pipelines.config import CONFIG_DIR, Settings, load_settings

PLACEHOLDER_DIGEST = "sha256:" + "0" * 64  # what a fresh checkout carries until `make image` pins it
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# PyTorch's CUDA wheel index for the same torch version constraints.txt pins (+cpu there). Bump it
# with torch: https://pytorch.org/get-started/locally/ lists the CUDA builds of each release.
CUDA_TORCH_INDEX = "https://download.pytorch.org/whl/cu126"
# buildx --metadata-file writes the pushed image's digest under this key:
# https://docs.docker.com/reference/cli/docker/buildx/build/#metadata-file
METADATA_DIGEST_KEY = "containerimage.digest"

_TOP_IMAGE = re.compile(r"^image:[ \t]*(#.*)?$")  # the block form `image:` (a flow mapping is refused)
_DIGEST_LINE = re.compile(r"^(?P<indent>[ \t]+)digest:(?P<gap>[ \t]*)(?P<value>[^#\s]*)(?P<rest>[ \t]*(#.*)?)$")


class PinError(ValueError):
    """The digest cannot be written: the message names the file, the key and why."""


def image_problems(settings: Settings, config_file: Path | str) -> list[str]:
    """One line per reason the env's image reference must not be rendered.

    Args:
        settings: The env's validated settings.
        config_file: The file that holds the env's `image` block (config/<env>.yaml), named in each line.

    Returns:
        Problems naming the file and key, e.g. ``config/prod.yaml: image.digest: ...; build and pin it:
        make image ENV=prod``; empty when the image may be rendered.
    """
    image, env = settings.image, settings.env
    fix = f"build and pin it: make image ENV={env}"
    if image.digest == PLACEHOLDER_DIGEST:
        why = ("is the all-zero placeholder (sha256:000...) and image.require_digest is true"
               if image.require_digest else
               "is the all-zero placeholder (sha256:000...), which no registry holds (or remove it to run image.tag)")
        return [f"{config_file}: image.digest {why}; {fix}"]
    return []  # require_digest without any digest does not load (pipelines.config.Image)


def build_args(settings: Settings) -> list[str]:
    """`docker buildx build` arguments for the env's pipeline image: its tag, and the CUDA torch index
    when the env trains on NVIDIA GPUs (CPU torch otherwise, as constraints.txt pins it)."""
    if not settings.image.tag:
        raise ValueError(f"config/{settings.env}.yaml: image.tag: not set; buildx pushes the image under a tag "
                         "before its digest is pinned")
    args = ["--tag", f"{settings.image.repository}:{settings.image.tag}"]
    gpu = settings.training.resources.gpu
    if gpu.count and gpu.resource.startswith("nvidia.com/"):
        args += ["--build-arg", f"TORCH_INDEX={CUDA_TORCH_INDEX}"]
    return args


def digest_from_metadata(path: Path | str) -> str:
    """The pushed image's digest from buildx's `--metadata-file` JSON.

    Raises:
        PinError: the file is missing, not JSON, or holds no valid `containerimage.digest`.
    """
    file = Path(path)
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise PinError(f"{file}: no such file (did `docker buildx build --metadata-file {file}` run?)") from None
    except json.JSONDecodeError as err:
        raise PinError(f"{file}: not JSON: {err}") from None
    digest = data.get(METADATA_DIGEST_KEY) if isinstance(data, dict) else None
    if not isinstance(digest, str) or not DIGEST.match(digest):
        raise PinError(f"{file}: {METADATA_DIGEST_KEY}: {digest!r} is not sha256:<64 hex> (was the image pushed?)")
    return digest


def pinned_text(text: str, digest: str, source: str = "<config>") -> str:
    """`text` (a config file) with its top-level `image.digest` set to `digest`, every other byte kept.

    The `digest:` line under the block-form `image:` mapping gets the new value (its comment stays);
    without one, a `digest:` line is added as the block's first key. The edit is checked by parsing
    both texts: only image.digest may differ.

    Raises:
        PinError: a bad digest, a flow-style `image: {...}`, or an edit that would change anything else.
    """
    if not DIGEST.match(digest):
        raise PinError(f"{source}: image.digest: {digest!r} is not sha256:<64 lowercase hex>")
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if _TOP_IMAGE.match(line.rstrip("\r\n"))), None)
    if start is None:
        if re.search(r"^image:", text, flags=re.M):
            raise PinError(f"{source}: image: write it as a block mapping (one key a line) to pin a digest")
        new = text + ("" if text.endswith("\n") or not text else "\n") + f"image:\n  digest: {digest}\n"
    else:
        new = "".join(_pin_block(lines, start, digest))
    _check_only_digest_changed(text, new, digest, source)
    return new


def _pin_block(lines: list[str], start: int, digest: str) -> list[str]:
    """`lines` with the digest line of the `image:` block at `start` replaced or added."""
    end, indent = start + 1, None
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
        if lines[end].strip() and not lines[end].lstrip().startswith("#") and indent is None:
            indent = lines[end][: len(lines[end]) - len(lines[end].lstrip())]
        end += 1
    for i in range(start + 1, end):
        body, newline = lines[i].rstrip("\r\n"), lines[i][len(lines[i].rstrip("\r\n")):]
        match = _DIGEST_LINE.match(body)
        if match and match["indent"] == indent:
            gap = match["gap"] or " "
            return [*lines[:i], f"{match['indent']}digest:{gap}{digest}{match['rest']}{newline}", *lines[i + 1:]]
    newline = "\r\n" if lines[start].endswith("\r\n") else "\n"
    return [*lines[: start + 1], f"{indent or '  '}digest: {digest}{newline}", *lines[start + 1:]]


def _check_only_digest_changed(old: str, new: str, digest: str, source: str) -> None:
    before, after = yaml.safe_load(old) or {}, yaml.safe_load(new) or {}
    if not isinstance(after.get("image"), dict) or after["image"].get("digest") != digest:
        raise PinError(f"{source}: image.digest: the line edit did not set it; edit the file by hand")
    expected = {**before, "image": {**(before.get("image") or {}), "digest": digest}}
    if after != expected:
        raise PinError(f"{source}: image: pinning would change more than image.digest; edit the file by hand")


def pin(config_file: Path | str, digest: str) -> bool:
    """Write `digest` as config_file's image.digest in place; False when it was already there."""
    file = Path(config_file)
    text = file.read_text()
    new = pinned_text(text, digest, source=str(file))
    if new == text:
        return False
    file.write_text(new)
    return True


def _shown(path: Path) -> Path:
    """`path` relative to the working directory when it lies below it (config/prod.yaml), else as given."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.images", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("build-args", "print `docker buildx build` arguments (tag, CUDA index) for ENV"),
                       ("pin", "write a pushed image's digest into config/ENV.yaml"),
                       ("check", "exit 1 and print why ENV's image must not render")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--env", required=True)
        sub.add_argument("--config-dir", default=None, help="default: the project's config/")
        if name == "pin":
            given = sub.add_mutually_exclusive_group(required=True)
            given.add_argument("--metadata", help="buildx --metadata-file output")
            given.add_argument("--digest", help="sha256:<64 hex>")
    args = parser.parse_args(argv)
    config_dir = Path(args.config_dir or CONFIG_DIR)
    config_file = _shown(config_dir / f"{args.env}.yaml")
    try:
        if args.command == "pin":
            digest = digest_from_metadata(args.metadata) if args.metadata else args.digest
            changed = pin(config_file, digest)
            print(f"{config_file}: image.digest {'pinned to' if changed else 'already'} {digest}")
            return 0
        settings = load_settings(args.env, config_dir)
        if args.command == "build-args":
            print(" ".join(build_args(settings)))
            return 0
        problems = image_problems(settings, config_file)
        print("\n".join(problems) or f"{config_file}: image: {settings.image.ref}")
        return 1 if problems else 0
    except (PinError, ValueError, OSError) as err:
        print(err, file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(_cli())
