"""``ensure_image()``: the cached image for this repository, built if needed.

A cache hit costs hashing the inputs (milliseconds) and returns at once. A
miss builds only the missing layer under the cache lock: the base when its
inputs changed (minutes), the final image when only agent code, the unit or
the workloads changed (seconds).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from . import cache as cache_mod
from .base import BaseSpec, build_base
from .final import ImageSpec, build_image
from .run import BuildError, BuildLog

LOG = logging.getLogger(__name__)

Layer = Literal["base", "image"]


@dataclass(frozen=True)
class Image:
    """A built image: what QEMU needs to boot it, and where it came from."""

    key: str
    base_key: str
    dir: Path
    #: Raw ext4 root filesystem; boot it through a qcow2 overlay, never directly.
    disk: Path
    kernel: Path
    initrd: Path
    kernel_version: str
    manifest: Mapping[str, object]
    #: Layers this call built: () on a cache hit, ("image",) after an agent
    #: change, ("base", "image") from scratch.
    built: tuple[Layer, ...]


@dataclass(frozen=True)
class Keys:
    base: str
    image: str


def keys(base: BaseSpec | None = None, spec: ImageSpec | None = None) -> Keys:
    """The cache keys of the image these inputs make, without building anything."""
    base = base or BaseSpec()
    spec = spec or ImageSpec()
    base_key = base.key()
    return Keys(base_key, spec.key(base_key))


def cached_image(cache: Path, image_key: str) -> Image | None:
    """The complete cache entry for ``image_key``, or None."""
    return _load(cache_mod.entry(cache, "image", image_key), built=())


def ensure_image(
    *,
    cache: Path | None = None,
    base: BaseSpec | None = None,
    spec: ImageSpec | None = None,
    rebuild: Layer | None = None,
    lock_timeout: float = 3600.0,
) -> Image:
    """Return the image for the current inputs, building missing layers.

    :param rebuild: force rebuilding this layer (and, for "base", the image).
    :raise BuildError: a build step failed; the message names the step and the log.
    :raise cache.CacheLockTimeout: another build kept the lock too long.
    """
    base = base or BaseSpec()
    spec = spec or ImageSpec()
    cache = cache or cache_mod.default_cache_dir(spec.repo)
    k = keys(base, spec)
    if rebuild is None:
        hit = cached_image(cache, k.image)
        if hit is not None:
            cache_mod.touch(hit.dir)
            cache_mod.touch(cache_mod.entry(cache, "base", k.base))
            return hit
    built: list[Layer] = []
    with cache_mod.locked(cache, lock_timeout):
        cache_mod.remove_stale(cache)
        base_dir = cache_mod.entry(cache, "base", k.base)
        if rebuild == "base" or not (base_dir / "manifest.json").is_file():
            _build_layer(cache, "base", k.base, lambda work, log: _base_manifest(base, k.base, work, log))
            built.append("base")
        cache_mod.touch(base_dir)
        image_dir = cache_mod.entry(cache, "image", k.image)
        if built or rebuild is not None or not (image_dir / "manifest.json").is_file():
            base_manifest = json.loads((base_dir / "manifest.json").read_text())

            def make(work: Path, log: BuildLog) -> dict[str, object]:
                facts = build_image(spec, k.image, k.base, base_dir, work, log)
                return {"kind": "image", "key": k.image, "base_key": k.base, "base": base_manifest, **facts}

            _build_layer(cache, "image", k.image, make)
            built.append("image")
        cache_mod.touch(image_dir)
        cache_mod.prune(cache)
    image = _load(image_dir, built=tuple(built))
    if image is None:
        raise BuildError(f"{image_dir} is incomplete right after building it")
    return image


def _build_layer(
    cache: Path,
    kind: Layer,
    key: str,
    make: Callable[[Path, BuildLog], dict[str, object]],
) -> None:
    """Build one layer in a temporary directory and publish it atomically."""
    work = cache_mod.tmp_dir(cache, kind, key)
    log = BuildLog(work / "build.log")
    LOG.info("building %s-%s in %s", kind, key, work)
    try:
        manifest = make(work, log)
        manifest["timings"] = log.timings
        manifest["built_at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    finally:
        log.close()
    final = cache_mod.entry(cache, kind, key)
    if final.exists():  # a forced rebuild replaces the old entry
        old = cache / f".tmp-old-{kind}-{key}-{os.getpid()}"
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    cache_mod.publish(work, final)


def _base_manifest(base: BaseSpec, key: str, work: Path, log: BuildLog) -> dict[str, object]:
    facts = build_base(base, key, work, log)
    repo = Path(__file__).resolve().parents[2]
    spec = {k: (_relative(v, repo) if isinstance(v, Path) else v) for k, v in asdict(base).items()}
    return {"kind": "base", "key": key, "spec": spec, **facts}


def _relative(path: Path, repo: Path) -> str:
    """Repository paths without the worktree they happened to be built from."""
    try:
        return str(path.resolve().relative_to(repo))
    except ValueError:
        return str(path)


def _load(entry: Path, built: tuple[Layer, ...]) -> Image | None:
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    paths = {name: entry / name for name in ("rootfs.raw", "vmlinuz", "initrd.img")}
    if not all(p.is_file() for p in paths.values()):
        return None
    return Image(
        key=manifest["key"],
        base_key=manifest["base_key"],
        dir=entry,
        disk=paths["rootfs.raw"],
        kernel=paths["vmlinuz"],
        initrd=paths["initrd.img"],
        kernel_version=manifest["base"]["kernel_version"],
        manifest=manifest,
        built=built,
    )
